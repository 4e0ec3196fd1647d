//! What a push sends: every scoped table described from the platform's catalog (columns,
//! constraints, indexes, sequences) and the types they use, in foreign key order.

use super::Plan;
use crate::net::JobError;
use pgrx::prelude::*;
use poco_core::learner::{self, ConstraintDef, TableDef, TypeDef};
use poco_core::scope::Scope;
use std::collections::BTreeSet;

const TABLE_SQL: &str = r#"
WITH c AS (SELECT c.oid, c.relname, n.nspname FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::pg_catalog.int8::pg_catalog.oid),
     ex AS (SELECT $2::pg_catalog.int2[] AS nums),
     -- Objects the learner cannot have: functions outside pg_catalog, other tables' sequences,
     -- operators, operator classes and the like that are not built in.
     foreign_dep AS (
       SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, c
        WHERE d.deptype = 'n' AND (
              (d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND NOT EXISTS (
                 SELECT 1 FROM pg_catalog.pg_proc p WHERE p.oid = d.refobjid AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace))
           OR (d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> c.oid AND NOT EXISTS (
                 SELECT 1 FROM pg_catalog.pg_depend o WHERE o.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND o.objid = d.refobjid AND o.refobjid = c.oid AND o.deptype IN ('a', 'i')))
           OR d.refclassid NOT IN ('pg_catalog.pg_class'::pg_catalog.regclass, 'pg_catalog.pg_proc'::pg_catalog.regclass,
                                   'pg_catalog.pg_type'::pg_catalog.regclass, 'pg_catalog.pg_collation'::pg_catalog.regclass,
                                   'pg_catalog.pg_namespace'::pg_catalog.regclass)))
SELECT pg_catalog.jsonb_build_object(
  'schema', pg_catalog.quote_ident(c.nspname),
  'ident', pg_catalog.quote_ident(c.nspname) || '.' || pg_catalog.quote_ident(c.relname),
  'columns', COALESCE((
     SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
              'ident', pg_catalog.quote_ident(a.attname),
              'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
              'not_null', a.attnotnull,
              'identity', a.attidentity::text,
              'collation', CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN
                   (SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                      FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                     WHERE co.oid = a.attcollation) END,
              'default', CASE WHEN a.attgenerated = '' AND ad.oid IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM foreign_dep f WHERE f.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND f.objid = ad.oid)
                   THEN pg_catalog.pg_get_expr(ad.adbin, ad.adrelid) END,
              'default_left_out', a.attgenerated = '' AND ad.oid IS NOT NULL AND EXISTS (
                   SELECT 1 FROM foreign_dep f WHERE f.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND f.objid = ad.oid),
              -- Binary COPY is portable when the binary form names no OID the learner would not
              -- share: through domains down to the base type, an enum (sent as its label) or a
              -- type fixed in every catalog (OID below 10000), arrays only of such types, and
              -- no reg* type (sent as an OID).
              'binary', (WITH RECURSIVE b(oid, depth) AS (
                     SELECT a.atttypid, 0
                   UNION ALL
                     SELECT bt.typbasetype, b.depth + 1 FROM b JOIN pg_catalog.pg_type bt ON bt.oid = b.oid
                      WHERE bt.typtype = 'd' AND b.depth < 32)
                 SELECT bt.typtype = 'e' OR (bt.typsend <> 0 AND NOT EXISTS (
                          SELECT 1 FROM pg_catalog.pg_type x WHERE x.oid IN (bt.oid, bt.typelem)
                             AND (x.oid >= 10000 OR x.typsend = 0 OR x.typname LIKE 'reg%')))
                   FROM b JOIN pg_catalog.pg_type bt ON bt.oid = b.oid ORDER BY b.depth DESC LIMIT 1))
            ORDER BY a.attnum)
       FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
       LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attnum <> ALL (ex.nums)), '[]'),
  'constraints', COALESCE((
     SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
              'ident', pg_catalog.quote_ident(k.conname), 'kind', k.contype::text,
              'def', pg_catalog.pg_get_constraintdef(k.oid),
              'ok', NOT (COALESCE(k.conkey, '{}') && ex.nums) AND (k.contype = 'f' OR NOT EXISTS (
                      SELECT 1 FROM foreign_dep f WHERE f.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND f.objid = k.oid)),
              'references', k.confrelid::pg_catalog.int8)
            ORDER BY k.contype, k.conname)
       FROM pg_catalog.pg_constraint k
      WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u', 'c', 'x', 'f')), '[]'),
  'indexes', COALESCE((
     SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
              'def', pg_catalog.pg_get_indexdef(i.indexrelid),
              'name', ic.relname,
              'ok', NOT (i.indkey::pg_catalog.int2[] && ex.nums) AND NOT EXISTS (
                      SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                         AND d.objid = i.indexrelid AND d.refobjid = c.oid AND d.refobjsubid = ANY (ex.nums))
                    AND NOT EXISTS (SELECT 1 FROM foreign_dep f WHERE f.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                       AND f.objid = i.indexrelid))
            ORDER BY ic.relname)
       FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      WHERE i.indrelid = c.oid AND NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.conindid = i.indexrelid
               AND k.contype IN ('p', 'u', 'x'))), '[]'),
  'sequences', COALESCE((
     SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
              'ident', pg_catalog.quote_ident(sn.nspname) || '.' || pg_catalog.quote_ident(s.relname),
              'column', pg_catalog.quote_ident(a.attname),
              'options', pg_catalog.format('AS %s INCREMENT BY %s MINVALUE %s MAXVALUE %s START WITH %s CACHE %s %s',
                   pg_catalog.format_type(q.seqtypid, NULL), q.seqincrement, q.seqmin, q.seqmax, q.seqstart, q.seqcache,
                   CASE WHEN q.seqcycle THEN 'CYCLE' ELSE 'NO CYCLE' END)))
       FROM pg_catalog.pg_depend d
       JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
       JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
       JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
       JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
      WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
        AND d.refobjid = c.oid AND d.deptype = 'a' AND a.attidentity = '' AND a.attnum <> ALL (ex.nums)), '[]'),
  'type_oids', COALESCE((
     SELECT pg_catalog.jsonb_agg(DISTINCT x.oid::pg_catalog.int8) FROM (
       SELECT a.atttypid AS oid FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attnum <> ALL (ex.nums)
       UNION
       SELECT d.refobjid FROM pg_catalog.pg_depend d
        WHERE d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype = 'n'
          AND ((d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid IN (SELECT ad.oid FROM pg_catalog.pg_attrdef ad WHERE ad.adrelid = c.oid))
            OR (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid IN (SELECT k.oid FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid)))
     ) x), '[]'))
FROM c, ex
"#;

/// Types to create, dependencies first: user types reached from the columns through arrays,
/// domains, composites and ranges. Built-in types (pg_catalog, information_schema) are not.
const TYPES_SQL: &str = r#"
WITH RECURSIVE deps(oid, depth) AS (
    SELECT x::pg_catalog.oid, 0 FROM pg_catalog.unnest($1::pg_catalog.int8[]) x
  UNION
    SELECT n.dep, d.depth + 1 FROM deps d JOIN pg_catalog.pg_type ty ON ty.oid = d.oid
    CROSS JOIN LATERAL (
        SELECT ty.typelem WHERE ty.typelem <> 0 AND ty.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc
        UNION ALL SELECT ty.typbasetype WHERE ty.typtype = 'd'
        UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                   WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE ty.typtype = 'r' AND r.rngtypid = ty.oid
    ) n(dep)
    WHERE d.depth < 32
)
SELECT pg_catalog.jsonb_build_object(
  'ident', pg_catalog.format_type(t.oid, NULL),
  'schema', pg_catalog.quote_ident(n.nspname),
  'kind', CASE WHEN t.typtype = 'c' AND rc.relkind <> 'c' THEN 'table-row' ELSE t.typtype::text END,
  'labels', COALESCE((SELECT pg_catalog.jsonb_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid), '[]'),
  'base', CASE WHEN t.typtype = 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod)
               WHEN t.typtype = 'r' THEN (SELECT pg_catalog.format_type(r.rngsubtype, NULL) FROM pg_catalog.pg_range r WHERE r.rngtypid = t.oid) END,
  'not_null', t.typnotnull,
  'default', CASE WHEN t.typdefaultbin IS NOT NULL THEN pg_catalog.pg_get_expr(t.typdefaultbin, 0) ELSE t.typdefault END,
  -- A domain CHECK calling a function outside pg_catalog is left out (the learner has no
  -- such function; the platform enforced it on every value sent).
  'checks', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(pg_catalog.quote_ident(k.conname), pg_catalog.pg_get_constraintdef(k.oid)) ORDER BY k.conname)
                        FROM pg_catalog.pg_constraint k WHERE k.contypid = t.oid AND k.contype = 'c' AND NOT EXISTS (
                          SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
                           WHERE d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid = k.oid
                             AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                             AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace)), '[]'),
  'checks_left_out', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.quote_ident(k.conname) ORDER BY k.conname)
                        FROM pg_catalog.pg_constraint k WHERE k.contypid = t.oid AND k.contype = 'c' AND EXISTS (
                          SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
                           WHERE d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid = k.oid
                             AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                             AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace)), '[]'),
  'attributes', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(pg_catalog.quote_ident(a.attname), pg_catalog.format_type(a.atttypid, a.atttypmod)) ORDER BY a.attnum)
                        FROM pg_catalog.pg_attribute a WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped), '[]'),
  'extension', (SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
                 WHERE d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.objid = t.oid
                   AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e'))
FROM (SELECT oid, max(depth) AS depth FROM deps GROUP BY oid) d
JOIN pg_catalog.pg_type t ON t.oid = d.oid
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_catalog.pg_class rc ON rc.oid = t.typrelid
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT (t.typelem <> 0 AND t.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc)
ORDER BY d.depth DESC, t.oid
"#;

#[derive(serde::Deserialize)]
struct RawColumn {
    #[serde(flatten)]
    col: learner::ColumnDef,
    default_left_out: bool,
    #[serde(default)]
    binary: bool,
}

#[derive(serde::Deserialize)]
struct RawConstraint {
    ident: String,
    kind: String,
    def: String,
    ok: bool,
    references: i64,
}

#[derive(serde::Deserialize)]
struct RawIndex {
    def: String,
    name: String,
    ok: bool,
}

#[derive(serde::Deserialize)]
struct RawTable {
    schema: String,
    ident: String,
    columns: Vec<RawColumn>,
    constraints: Vec<RawConstraint>,
    indexes: Vec<RawIndex>,
    sequences: Vec<learner::SequenceDef>,
    type_oids: Vec<i64>,
}

fn json_query(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<serde_json::Value> {
    Spi::connect(|c| {
        c.select(sql, None, args)
            .map(|t| {
                t.filter_map(|r| r.get::<pgrx::JsonB>(1).ok().flatten().map(|j| j.0))
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Describe every scoped table and the types they use, in FK order.
pub(super) fn describe(sc: &Scope) -> Result<(Vec<Plan>, Vec<TypeDef>, Vec<String>), JobError> {
    // Names in the descriptions come out schema-qualified with pg_catalog alone on the path.
    Spi::run("SET LOCAL search_path = pg_catalog")
        .map_err(|e| JobError::new("XX000", e.to_string()))?;
    let mut plans = Vec::new();
    let mut left_out = Vec::new();
    for st in &sc.tables {
        let v = json_query(
            TABLE_SQL,
            &[(st.oid as i64).into(), st.excluded_attnums.clone().into()],
        )
        .pop()
        .ok_or_else(|| JobError::new("42P01", format!("table {} vanished", st.ident)))?;
        let raw: RawTable = serde_json::from_value(v)
            .map_err(|e| JobError::new("XX000", format!("describing {}: {e}", st.ident)))?;
        let mut def = TableDef {
            schema: raw.schema,
            ident: raw.ident,
            columns: Vec::new(),
            constraints: Vec::new(),
            indexes: Vec::new(),
            sequences: raw.sequences,
            left_out: Vec::new(),
        };
        let binary = raw.columns.iter().all(|c| c.binary);
        for c in raw.columns {
            if c.default_left_out {
                def.left_out.push(format!(
                    "{}.{}: default calls a platform function",
                    def.ident, c.col.ident
                ));
            }
            def.columns.push(c.col);
        }
        let sent_fks: BTreeSet<&str> = st
            .fks
            .iter()
            .filter(|f| f.sent)
            .map(|f| f.name.as_str())
            .collect();
        let mut fks = Vec::new();
        let mut depends_on = Vec::new();
        for k in raw.constraints {
            let c = ConstraintDef {
                ident: k.ident,
                kind: k.kind,
                def: k.def,
            };
            if c.kind == "f" {
                let name = unquote(&c.ident);
                if sent_fks.contains(name.as_str()) {
                    depends_on.push(k.references as u32);
                    fks.push(c);
                }
            } else if k.ok {
                def.constraints.push(c);
            } else {
                def.left_out.push(format!(
                    "{}: constraint {} uses an excluded column or a platform function",
                    def.ident, c.ident
                ));
            }
        }
        for i in raw.indexes {
            if i.ok {
                def.indexes.push(i.def);
            } else {
                def.left_out.push(format!(
                    "{}: index {} uses an excluded column or a platform function",
                    def.ident, i.name
                ));
            }
        }
        left_out.extend(def.left_out.drain(..));
        plans.push(Plan {
            scoped: st.clone(),
            def,
            fks,
            depends_on,
            binary,
            types: raw.type_oids.iter().map(|&o| o as u32).collect(),
        });
    }
    let all_types: BTreeSet<i64> = plans
        .iter()
        .flat_map(|p| p.types.iter().map(|&o| o as i64))
        .collect();
    let mut types = Vec::new();
    for v in json_query(
        TYPES_SQL,
        &[all_types.into_iter().collect::<Vec<i64>>().into()],
    ) {
        let t: TypeDef = serde_json::from_value(v)
            .map_err(|e| JobError::new("XX000", format!("describing types: {e}")))?;
        if t.kind == "table-row" {
            return Err(JobError::new(
                "0A000",
                format!("a scoped column has the row type of table {}", t.ident),
            )
            .hint(
                "Use a standalone composite type (CREATE TYPE … AS (…)) or jsonb for that column.",
            ));
        }
        for c in &t.checks_left_out {
            left_out.push(format!("{}: check {c} calls a platform function", t.ident));
        }
        // Several types of one extension: one CREATE EXTENSION.
        if t.extension.is_some() && types.iter().any(|x: &TypeDef| x.extension == t.extension) {
            continue;
        }
        types.push(t);
    }
    // pg_catalog alone stays on the path for the rest of the job (process::pin_session): SET
    // LOCAL ... TO DEFAULT would bring back the server's "$user", public.
    Ok((fk_order(plans), types, left_out))
}

fn unquote(ident: &str) -> String {
    if ident.starts_with('"') && ident.ends_with('"') && ident.len() >= 2 {
        ident[1..ident.len() - 1].replace("\"\"", "\"")
    } else {
        ident.to_string()
    }
}

/// Referenced tables before the tables that reference them (cycles: declaration order).
fn fk_order(plans: Vec<Plan>) -> Vec<Plan> {
    let oids: BTreeSet<u32> = plans.iter().map(|p| p.scoped.oid).collect();
    let mut done: BTreeSet<u32> = BTreeSet::new();
    let mut pending: Vec<Plan> = plans;
    let mut out = Vec::new();
    while !pending.is_empty() {
        let ready = pending.iter().position(|p| {
            p.depends_on
                .iter()
                .all(|d| *d == p.scoped.oid || done.contains(d) || !oids.contains(d))
        });
        let i = ready.unwrap_or(0); // a cycle: take the first, its keys are added after all rows
        let p = pending.remove(i);
        done.insert(p.scoped.oid);
        out.push(p);
    }
    out
}
