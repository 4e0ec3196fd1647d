//! Account scope (API §1): the declarations in poco.scope / poco.scope_exclusion, the FK graph
//! read from pg_catalog, and the SQL functions over them. Resolution and SQL generation are
//! pure (poco_core::scope); this module only loads, stores and runs.
//!
//! Every change re-compiles the whole scope before it commits, so poco.scope never holds a
//! declaration set that does not resolve (a failed change rolls back with its error).

use crate::catalog;
use crate::errors::{raise, OrRaise};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use poco_core::scope::{
    self as core_scope, Catalog, Column, Declarations, Exclusion, ForeignKey, Generated, RefMode,
    Scope, Table,
};
use poco_core::{PocoError, Result, SqlState};
use serde_json::json;
use std::collections::BTreeSet;

/// Schemas whose tables are never scoped nor searched for paths.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'poco') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

fn rows<F, T>(query: &str, args: &[DatumWithOid], mut f: F) -> Vec<T>
where
    F: FnMut(&pgrx::spi::SpiHeapTupleData<'_>) -> T,
{
    Spi::connect(|client| {
        let table = client.select(query, None, args).or_raise();
        table.map(|r| f(&r)).collect()
    })
}

fn s(row: &pgrx::spi::SpiHeapTupleData<'_>, i: usize) -> String {
    row.get::<String>(i).ok().flatten().unwrap_or_default()
}

fn oid_of(row: &pgrx::spi::SpiHeapTupleData<'_>, i: usize) -> u32 {
    row.get::<i64>(i).ok().flatten().unwrap_or(0) as u32
}

/// The user tables (not partitions, not system or poco's own), their columns, keys, indexes
/// and foreign keys.
pub fn load_catalog() -> Catalog {
    let mut cat = Catalog::default();
    let q = format!(
        "SELECT c.oid::int8, pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind::text, \
                (SELECT k.conkey FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p') \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {SYSTEM_SCHEMAS}"
    );
    for t in rows(&q, &[], |r| Table {
        oid: oid_of(r, 1),
        ident: s(r, 2),
        relkind: s(r, 3).chars().next().unwrap_or('r'),
        columns: Vec::new(),
        pk: r.get::<Vec<i16>>(4).ok().flatten(),
        indexes: Vec::new(),
    }) {
        cat.tables.insert(t.oid, t);
    }
    // A generated column's expression: the columns it reads and whether it calls a function
    // outside pg_catalog (pg_depend of its pg_attrdef; 'i' is its dependency on itself).
    let q = format!(
        "SELECT a.attrelid::int8, a.attnum, a.attname::text, pg_catalog.quote_ident(a.attname), \
                pg_catalog.format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', \
                (SELECT pg_catalog.array_agg(DISTINCT d.refobjsubid::int2) FROM pg_catalog.pg_attrdef ad \
                   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid \
                  WHERE a.attgenerated <> '' AND ad.adrelid = a.attrelid AND ad.adnum = a.attnum AND d.deptype = 'n' \
                    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = a.attrelid AND d.refobjsubid > 0), \
                EXISTS (SELECT 1 FROM pg_catalog.pg_attrdef ad \
                   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid \
                   JOIN pg_catalog.pg_proc p ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = d.refobjid \
                  WHERE a.attgenerated <> '' AND ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
                    AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace), \
                tp.plain, tp.safe, tp.json \
           FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          CROSS JOIN LATERAL ( \
                SELECT true, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid IN (114, 3802) WHERE a.atttypid < 16384 \
                UNION ALL \
                SELECT p.plain, p.safe, p.json FROM poco.type_profile(a.atttypid, a.atttypmod) p WHERE a.atttypid >= 16384 \
             ) tp(plain, safe, json) \
          WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS} \
          ORDER BY a.attrelid, a.attnum"
    );
    for (oid, col) in
        rows(&q, &[], |r| {
            (
                oid_of(r, 1),
                Column {
                    attnum: r.get::<i16>(2).ok().flatten().unwrap_or(0),
                    name: s(r, 3),
                    ident: s(r, 4),
                    type_sql: s(r, 5),
                    plain: r.get::<bool>(9).ok().flatten().unwrap_or(false),
                    safe_type: s(r, 10),
                    json: r.get::<bool>(11).ok().flatten().unwrap_or(false),
                    generated: r.get::<bool>(6).ok().flatten().unwrap_or(false).then(|| {
                        Generated {
                            reads: r.get::<Vec<i16>>(7).ok().flatten().unwrap_or_default(),
                            calls_user_function: r.get::<bool>(8).ok().flatten().unwrap_or(false),
                        }
                    }),
                },
            )
        })
    {
        if let Some(t) = cat.tables.get_mut(&oid) {
            t.columns.push(col);
        }
    }
    let q = "SELECT i.indrelid::int8, (i.indkey::int2[])[0:i.indnkeyatts - 1] \
               FROM pg_catalog.pg_index i WHERE i.indisvalid AND i.indpred IS NULL";
    for (oid, keys) in rows(q, &[], |r| {
        (
            oid_of(r, 1),
            r.get::<Vec<i16>>(2).ok().flatten().unwrap_or_default(),
        )
    }) {
        if let Some(t) = cat.tables.get_mut(&oid) {
            t.indexes.push(keys);
        }
    }
    let q = "SELECT k.conname::text, k.conrelid::int8, k.conkey, k.confrelid::int8, k.confkey \
               FROM pg_catalog.pg_constraint k WHERE k.contype = 'f' AND k.conparentid = 0 \
              ORDER BY k.conrelid::pg_catalog.regclass::pg_catalog.text, k.conname";
    for fk in rows(q, &[], |r| ForeignKey {
        name: s(r, 1),
        child: oid_of(r, 2),
        child_cols: r.get::<Vec<i16>>(3).ok().flatten().unwrap_or_default(),
        parent: oid_of(r, 4),
        parent_cols: r.get::<Vec<i16>>(5).ok().flatten().unwrap_or_default(),
    }) {
        if cat.tables.contains_key(&fk.child) && cat.tables.contains_key(&fk.parent) {
            cat.fks.push(fk);
        }
    }
    cat
}

pub fn load_declarations() -> Result<Declarations> {
    let mut d = Declarations::default();
    let q = "SELECT rel::oid::int8, role, predicate, via, mode FROM poco.scope ORDER BY rel::oid";
    for (oid, role, pred, via, mode) in rows(q, &[], |r| {
        (
            oid_of(r, 1),
            s(r, 2),
            r.get::<String>(3).ok().flatten(),
            r.get::<String>(4).ok().flatten(),
            s(r, 5),
        )
    }) {
        match role.as_str() {
            "root" => d.root = Some((oid, pred.unwrap_or_default())),
            "owned" => d.owned.push((oid, via)),
            _ => d.reference.push((oid, RefMode::parse(&mode)?)),
        }
    }
    d.excluded = rows(
        "SELECT rel::oid::int8, col::text, attnum FROM poco.scope_exclusion ORDER BY 1, 2",
        &[],
        |r| Exclusion {
            rel: oid_of(r, 1),
            name: s(r, 2),
            attnum: r.get::<i16>(3).ok().flatten(),
        },
    );
    Ok(d)
}

/// The compiled scope, or None when no root is declared.
pub fn current() -> Result<Option<Scope>> {
    core_scope::compile(&load_catalog(), &load_declarations()?)
}

pub fn require() -> Result<Scope> {
    current()?.ok_or_else(|| {
        core_scope::scope_err(
            SqlState::ObjectNotInPrerequisiteState,
            "no account scope is declared",
            "Declare the root first, e.g. SELECT poco_scope_root('users', 'id = $1 OR parent_id = $1'); then the owned and reference tables.",
        )
    })
}

/// The parent id in the root key's canonical text form ('007' → '7', upper → lower-case uuid).
/// Without a declared root the text is kept as given.
pub fn canonical_parent(parent: &str) -> Result<String> {
    // Only the root key's type is needed: one catalog query, not a whole compile (poco_status
    // calls this on every page view).
    let q = "SELECT (SELECT p.safe FROM poco.type_profile(a.atttypid, a.atttypmod) p) FROM poco.scope s \
               JOIN pg_catalog.pg_constraint k ON k.conrelid = s.rel AND k.contype = 'p' \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = s.rel AND a.attnum = k.conkey[1] \
              WHERE s.role = 'root' AND pg_catalog.cardinality(k.conkey) = 1";
    match rows(q, &[], |r| s(r, 1)).pop() {
        None => Ok(parent.to_string()),
        Some(key_type) => canonicalize(&key_type, parent),
    }
}

pub fn canonical_with(sc: &Scope, parent: &str) -> Result<String> {
    canonicalize(&sc.key_type, parent)
}

fn canonicalize(key_type: &str, parent: &str) -> Result<String> {
    let sql = poco_core::scope::canonical_parent_sql(key_type);
    let key_type = key_type.to_string();
    let shown = truncate(parent, 80);
    PgTryBuilder::new(|| {
        Ok(rows(&sql, &[parent.into()], |r| s(r, 1))
            .pop()
            .unwrap_or_default())
    })
    .catch_others(move |e| {
        let data_error = match &e {
            // Any SQLSTATE of class 22 (data exception): the low 12 bits hold the class.
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                (r.sql_error_code() as i32) & 0xFFF
                    == (PgSqlErrorCode::ERRCODE_DATA_EXCEPTION as i32) & 0xFFF
            }
            _ => false,
        };
        if !data_error {
            e.rethrow();
        }
        Err(core_scope::scope_err(
            SqlState::InvalidTextRepresentation,
            format!("invalid parent id \"{shown}\" for the root key type {key_type}"),
            format!("The parent id has the type of the scope root's primary key ({key_type})."),
        ))
    })
    .execute()
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// The canonical parent id of an existing account (targets are only stored for accounts).
pub fn existing_parent(parent: &str) -> Result<String> {
    let Some(sc) = current()? else {
        return Ok(parent.to_string());
    };
    let p = canonical_with(&sc, parent)?;
    if root_rows(&sc, &p) == 0 {
        let root = sc
            .table(sc.root)
            .map(|t| t.ident.clone())
            .unwrap_or_default();
        return Err(core_scope::scope_err(
            SqlState::UndefinedObject,
            format!(
                "parent {} has no account: no row of {root} matches the scope root's predicate",
                truncate(&p, 80)
            ),
            "Check the parent id; it is the root table's primary key value of the parent.",
        ));
    }
    Ok(p)
}

/// Number of root rows the parent has (0: no such account).
pub fn root_rows(sc: &Scope, parent: &str) -> i64 {
    let root = sc.table(sc.root).expect("root is scoped");
    rows(&root.count_sql, &[parent.into()], |r| {
        r.get::<i64>(1).ok().flatten().unwrap_or(0)
    })
    .pop()
    .unwrap_or(0)
}

/// A scoped table continuous sync cannot follow (#24 point 7), as the error to raise: one
/// without a primary key (a batch names rows by it: an owned table's batch failed for ever,
/// a reference table's made `ON CONFLICT ()`), or an UNLOGGED one, itself or a partition
/// (crash recovery empties it and no trigger fires: the learner would keep what the platform
/// lost). Undeclared tables on ownership paths count for UNLOGGED too. None: it can.
pub fn unsyncable(sc: &Scope) -> Option<PocoError> {
    let scoped: Vec<pg_sys::Oid> = sc.tables.iter().map(|t| pg_sys::Oid::from(t.oid)).collect();
    let paths: Vec<pg_sys::Oid> = sc.paths.iter().map(|p| pg_sys::Oid::from(p.oid)).collect();
    let found = rows(
        "WITH t(rel, scoped) AS (SELECT r, true FROM pg_catalog.unnest($1::pg_catalog.oid[]) r \
                                 UNION ALL SELECT r, false FROM pg_catalog.unnest($2::pg_catalog.oid[]) r) \
         SELECT t.rel::pg_catalog.regclass::text, \
                t.scoped AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = t.rel AND i.indisprimary), \
                (SELECT pg_catalog.min(p.rel::pg_catalog.regclass::text) \
                   FROM (SELECT t.rel UNION SELECT x.relid FROM pg_catalog.pg_partition_tree(t.rel) x) p(rel) \
                   JOIN pg_catalog.pg_class c ON c.oid = p.rel WHERE c.relpersistence = 'u') \
           FROM t ORDER BY t.rel::pg_catalog.regclass::text",
        &[scoped.into(), paths.into()],
        |r| {
            (
                s(r, 1),
                r.get::<bool>(2).ok().flatten().unwrap_or(false),
                r.get::<String>(3).ok().flatten(),
            )
        },
    );
    let quoted = |t: &str| t.replace('\'', "''");
    for (table, no_pk, unlogged) in found {
        if no_pk {
            return Some(core_scope::scope_err(
                SqlState::FeatureNotSupported,
                format!("continuous sync cannot follow {table}: it has no primary key"),
                format!(
                    "Continuous sync names each changed row by its primary key: add one (ALTER TABLE {table} ADD PRIMARY KEY (...)), \
                     or leave the table out (SELECT poco_scope_remove('{}')). poco_push copies it as it is.",
                    quoted(&table)
                ),
            ));
        }
        if let Some(u) = unlogged {
            return Some(core_scope::scope_err(
                SqlState::FeatureNotSupported,
                format!("continuous sync cannot follow {table}: {u} is UNLOGGED"),
                format!(
                    "Crash recovery empties an unlogged table without any trigger firing, so the learner would keep rows the platform lost: \
                     ALTER TABLE {u} SET LOGGED, or leave {table} out (SELECT poco_scope_remove('{}')). poco_push copies it as it is.",
                    quoted(&table)
                ),
            ));
        }
    }
    None
}

/// Why continuous sync could not follow the root predicate (None: it can). Continuous sync
/// sees the changes of captured tables' rows, and attributes a root row by its own image: a
/// predicate that reads other rows (a subquery) or calls a function that is not immutable
/// (now(), a function reading tables) can change its answer for a row nobody touched.
pub fn unfollowable(sc: &Scope) -> Option<String> {
    let root = sc.table(sc.root)?;
    let pred = poco_core::predicate::Predicate::parse(&sc.predicate).ok()?;
    if pred.has_subquery() {
        return Some("it reads other rows (a subquery)".into());
    }
    // Whether it calls a function that is not immutable (directly, through an operator or a
    // cast): PostgreSQL's own contain_mutable_functions over the predicate as parsed, read
    // from a view over it made in a subtransaction that is rolled back.
    let probe = format!(
        "CREATE VIEW poco.predicate_probe AS SELECT 1 AS x FROM ONLY {} {} WHERE ({})",
        root.ident,
        core_scope::ROOT_ALIAS,
        pred.with_param(&format!("NULL::{}", sc.key_type))
    );
    let (cx, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
    }
    let mutable = PgTryBuilder::new(|| {
        Spi::run(&probe).ok()?;
        let action = Spi::get_one::<String>(
            "SELECT ev_action::text FROM pg_catalog.pg_rewrite WHERE ev_class = 'poco.predicate_probe'::pg_catalog.regclass",
        )
        .ok()
        .flatten()?;
        let action = std::ffi::CString::new(action).ok()?;
        unsafe {
            let list = pg_sys::stringToNode(action.as_ptr()) as *mut pg_sys::List;
            if list.is_null() || (*list).length < 1 {
                return None;
            }
            let query = (*(*list).elements).ptr_value as *mut pg_sys::Query;
            let quals = (*(*query).jointree).quals;
            Some(pg_sys::contain_mutable_functions(quals))
        }
    })
    .catch_others(|_| None)
    .execute();
    unsafe {
        pg_sys::RollbackAndReleaseCurrentSubTransaction();
        pg_sys::MemoryContextSwitchTo(cx);
        pg_sys::CurrentResourceOwner = owner;
    }
    match mutable {
        Some(false) => None,
        Some(true) => {
            // Name them for the message, as far as the text shows them.
            let named = rows(
                "SELECT pg_catalog.string_agg(DISTINCT p.proname || '()', ', ') FROM pg_catalog.pg_proc p \
                  WHERE p.provolatile <> 'i' AND $1 ~* ('\\m' || p.proname || '\\s*\\(')",
                &[sc.predicate.as_str().into()],
                |r| r.get::<String>(1).ok().flatten(),
            )
            .pop()
            .flatten();
            Some(match named {
                Some(n) => format!("it calls {n}, which is not immutable"),
                None => "it calls a function that is not immutable".into(),
            })
        }
        None => Some("its functions could not be checked".into()),
    }
}

pub fn unfollowable_error(why: &str, when: &str) -> PocoError {
    core_scope::scope_err(
        SqlState::FeatureNotSupported,
        format!("{when}continuous sync cannot follow the scope root's predicate: {why}"),
        "Continuous sync attributes a root row by its own values: write the predicate over the root's columns with immutable functions only (SELECT poco_scope_root(...)), or copy this account with poco_push, which reads one snapshot.",
    )
}

/// Run the predicate once (no rows) so that PostgreSQL reports unknown columns, type errors
/// and non-boolean results now, phrased as a predicate error.
fn check_predicate_sql(sc: &Scope) {
    let root = sc.table(sc.root).expect("root");
    let sql = format!("{} LIMIT 0", root.count_sql); // planned in full, executes nothing
    let res: std::result::Result<(), (PgSqlErrorCode, String)> = PgTryBuilder::new(|| {
        Spi::run_with_args(&sql, &[Option::<String>::None.into()]).or_raise();
        Ok(())
    })
    .catch_others(|e| match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
            Err((r.sql_error_code(), r.message().to_string()))
        }
        other => other.rethrow(),
    })
    .execute();
    if let Err((code, msg)) = res {
        pgrx::pg_sys::panic::ErrorReport::new(code, format!("invalid root predicate: {msg}"), "poco_sync")
            .set_hint(format!(
                "The predicate is evaluated on {} alone, $1 being the parent id of type {}: name its columns plainly or as poco_root.column (no other alias), and qualify other tables with their schema.",
                root.ident, sc.key_type
            ))
            .report(PgLogLevel::ERROR);
    }
}

fn lock() {
    Spi::run("LOCK TABLE poco.scope, poco.scope_exclusion IN SHARE ROW EXCLUSIVE MODE").or_raise();
}

/// The table's display name, refusing what cannot be scoped (views, system schemas, temp).
fn checked_table(oid: pg_sys::Oid) -> String {
    let q = "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind::text, n.nspname::text, \
                    c.relispartition, c.relpersistence::text \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1";
    let found = rows(q, &[oid.into()], |r| {
        (
            s(r, 1),
            s(r, 2),
            s(r, 3),
            r.get::<bool>(4).ok().flatten().unwrap_or(false),
            s(r, 5),
        )
    })
    .pop();
    let Some((name, kind, nsp, partition, persistence)) = found else {
        raise(core_scope::scope_err(
            SqlState::UndefinedTable,
            format!("relation with OID {} does not exist", oid.to_u32()),
            "Pass an existing table.",
        ))
    };
    let bad = |m: String, h: &str| raise(core_scope::scope_err(SqlState::WrongObjectType, m, h));
    if kind != "r" && kind != "p" {
        bad(
            format!("{name} is not a table"),
            "Only tables and partitioned tables can be scoped.",
        );
    }
    if partition {
        bad(
            format!("{name} is a partition"),
            "Scope the partitioned table it belongs to.",
        );
    }
    if persistence == "t" || nsp.starts_with("pg_") || nsp == "information_schema" || nsp == "poco"
    {
        bad(
            format!("{name} is a system, temporary or poco_sync table"),
            "Scope the platform's own tables.",
        );
    }
    name
}

fn existing_role(oid: pg_sys::Oid) -> Option<String> {
    rows(
        "SELECT role FROM poco.scope WHERE rel = $1::oid::regclass",
        &[oid.into()],
        |r| s(r, 1),
    )
    .pop()
}

fn refuse_other_role(oid: pg_sys::Oid, name: &str, wanted: &str) {
    if let Some(role) = existing_role(oid) {
        if role != wanted {
            raise(core_scope::scope_err(
                SqlState::DuplicateObject,
                format!("{name} is already declared as {role}"),
                format!(
                    "A table has one role. Remove it first: SELECT poco_scope_remove('{}');",
                    name.replace('\'', "''")
                ),
            ));
        }
    }
}

/// Re-compile after a change; raise the first problem (the change then rolls back).
fn validate_and_log(message: String, detail: serde_json::Value) {
    let sc = current().or_raise();
    if let Some(sc) = &sc {
        check_predicate_sql(sc);
        let continuous =
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM poco.target WHERE continuous)")
                .ok()
                .flatten()
                .unwrap_or(false);
        if continuous {
            if let Some(why) = unfollowable(sc) {
                raise(unfollowable_error(
                    &why,
                    "while targets sync continuously, ",
                ));
            }
            if let Some(e) = unsyncable(sc) {
                raise(e);
            }
        }
    }
    catalog::log_event("scope_changed", None, None, &message, detail);
    sync_follows_scope("the account scope changed");
}

/// Continuous targets follow a scope change: capture on exactly the new scoped tables, and a
/// new snapshot of every target (its tables, rows and columns may all differ now).
fn sync_follows_scope(why: &str) {
    Spi::run("UPDATE poco.scope_generation SET n = n + 1").or_raise();
    Spi::run_with_args(
        "SELECT poco.refresh_capture(), poco.resnapshot_all($1) WHERE EXISTS (SELECT 1 FROM poco.target WHERE continuous)",
        &[why.into()],
    )
    .or_raise();
}

#[pg_schema]
pub mod poco {
    use super::*;

    /// The parent id in the root key's canonical text form (as given when no root is declared).
    #[pg_extern(stable, parallel_safe)]
    fn canonical_parent(parent_id: &str) -> String {
        super::canonical_parent(parent_id).or_raise()
    }

    /// Store one table's declaration (its role and that role's one setting), replacing what
    /// the table had; a new root replaces the old one. Returns the table's name.
    fn declare(
        oid: pg_sys::Oid,
        role: &str,
        predicate: Option<&str>,
        via: Option<&str>,
        mode: Option<&str>,
    ) -> String {
        lock();
        let name = checked_table(oid);
        refuse_other_role(oid, &name, role);
        if role == "root" {
            Spi::run_with_args(
                "DELETE FROM poco.scope WHERE role = 'root' AND rel::oid <> $1",
                &[oid.into()],
            )
            .or_raise();
        }
        Spi::run_with_args(
            "INSERT INTO poco.scope (rel, role, predicate, via, mode) VALUES ($1::oid::regclass, $2, $3, $4, $5) \
             ON CONFLICT (rel) DO UPDATE SET predicate = EXCLUDED.predicate, via = EXCLUDED.via, \
             mode = EXCLUDED.mode, updated_at = now()",
            &[oid.into(), role.into(), predicate.into(), via.into(), mode.into()],
        )
        .or_raise();
        name
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_root(tbl: Option<pg_sys::Oid>, predicate: Option<&str>) {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let pred = predicate.unwrap_or_else(|| raise(PocoError::NullArgument("predicate")));
        poco_core::predicate::Predicate::parse(pred).or_raise();
        let name = declare(oid, "root", Some(pred), None, None);
        validate_and_log(
            format!("scope root: {name} WHERE {pred}"),
            json!({"table": name, "role": "root", "predicate": pred}),
        );
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_table(tbl: Option<pg_sys::Oid>, via: Option<&str>) {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let name = declare(oid, "owned", None, via, None);
        validate_and_log(
            format!("scope: {name} is owned"),
            json!({"table": name, "role": "owned", "via": via}),
        );
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_reference(tbl: Option<pg_sys::Oid>, mode: Option<&str>) {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let mode = RefMode::parse(mode.unwrap_or("referenced"))
            .or_raise()
            .as_str();
        let name = declare(oid, "reference", None, None, Some(mode));
        validate_and_log(
            format!("scope: {name} is a reference table ({mode})"),
            json!({"table": name, "role": "reference", "mode": mode}),
        );
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_exclude_column(tbl: Option<pg_sys::Oid>, col: Option<&str>) {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let col = col.unwrap_or_else(|| raise(PocoError::NullArgument("col")));
        lock();
        let name = checked_table(oid);
        let attnum = rows(
            "SELECT attnum FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            &[oid.into(), col.into()],
            |r| r.get::<i16>(1).ok().flatten(),
        )
        .pop()
        .flatten();
        if attnum.is_none() {
            raise(core_scope::scope_err(
                SqlState::UndefinedColumn,
                format!("column \"{col}\" of {name} does not exist"),
                "Give the column's exact name (case matters for quoted names).",
            ));
        }
        // By column number (it follows renames) and name (a dump and restore keeps it).
        Spi::run_with_args(
            "INSERT INTO poco.scope_exclusion (rel, attnum, col) VALUES ($1::oid::regclass, $2, $3) \
             ON CONFLICT (rel, attnum) DO UPDATE SET col = EXCLUDED.col",
            &[oid.into(), attnum.into(), col.into()],
        )
        .or_raise();
        validate_and_log(
            format!("scope: column {col} of {name} is excluded"),
            json!({"table": name, "excluded": col}),
        );
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_include_column(tbl: Option<pg_sys::Oid>, col: Option<&str>) -> bool {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let col = col.unwrap_or_else(|| raise(PocoError::NullArgument("col")));
        lock();
        // The exclusion of the column of that name now (by number), or one declared under it.
        let n = rows(
            "DELETE FROM poco.scope_exclusion e WHERE e.rel = $1::oid::regclass AND (e.col = $2 OR e.attnum = \
               (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped)) \
             RETURNING 1",
            &[oid.into(), col.into()],
            |_| (),
        )
        .len();
        if n > 0 {
            validate_and_log(
                format!(
                    "scope: column {col} of OID {} is no longer excluded",
                    oid.to_u32()
                ),
                json!({"included": col}),
            );
        }
        n > 0
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_remove(tbl: Option<pg_sys::Oid>) -> bool {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        lock();
        let removed = rows(
            "DELETE FROM poco.scope WHERE rel::oid = $1 RETURNING rel::text, role",
            &[oid.into()],
            |r| (s(r, 1), s(r, 2)),
        )
        .pop();
        Spi::run_with_args(
            "DELETE FROM poco.scope_exclusion WHERE rel::oid = $1",
            &[oid.into()],
        )
        .or_raise();
        match removed {
            None => false,
            Some((name, role)) => {
                validate_and_log(
                    format!("scope: {name} ({role}) removed"),
                    json!({"table": name, "removed": role}),
                );
                true
            }
        }
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_clear() -> i64 {
        lock();
        let n = rows("DELETE FROM poco.scope RETURNING 1", &[], |_| ()).len() as i64;
        Spi::run("DELETE FROM poco.scope_exclusion").or_raise();
        catalog::log_event(
            "scope_changed",
            None,
            None,
            &format!("scope cleared ({n} tables)"),
            json!({"cleared": n}),
        );
        sync_follows_scope("the account scope was cleared");
        n
    }

    /// What a push for this parent would send, one row per scoped table.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn scope_preview(
        parent_id: Option<&str>,
    ) -> TableIterator<
        'static,
        (
            name!(table_name, String),
            name!(role, String),
            name!(rows, i64),
            name!(path, String),
            name!(foreign_keys_sent, Vec<String>),
            name!(foreign_keys_left_out, Vec<String>),
            name!(excluded_columns, Vec<String>),
            name!(warnings, Vec<String>),
        ),
    > {
        let parent = parent_id.unwrap_or_else(|| raise(PocoError::NullArgument("parent_id")));
        let sc = require().or_raise();
        let parent = canonical_with(&sc, parent).or_raise();
        crate::authz::authorize_parent(&parent);
        let out: Vec<_> = sc
            .tables
            .iter()
            .map(|t| {
                let n = rows(&t.count_sql, &[parent.as_str().into()], |r| {
                    r.get::<i64>(1).ok().flatten().unwrap_or(0)
                })
                .pop()
                .unwrap_or(0);
                let (sent, left): (Vec<_>, Vec<_>) = t.fks.iter().partition(|f| f.sent);
                (
                    t.ident.clone(),
                    t.role.as_str().to_string(),
                    n,
                    t.path.clone(),
                    sent.iter()
                        .map(|f| format!("{} ({})", f.text, f.reason))
                        .collect(),
                    left.iter()
                        .map(|f| format!("{} ({})", f.text, f.reason))
                        .collect(),
                    t.excluded.clone(),
                    t.warnings.clone(),
                )
            })
            .collect();
        TableIterator::new(out)
    }

    /// Refuse continuous sync for a scope whose root predicate it could not follow (SQLSTATE
    /// 0A000, see `unfollowable`); nothing when there is no scope yet.
    #[pg_extern(volatile, parallel_unsafe)]
    fn check_followable() {
        if let Ok(Some(sc)) = current() {
            if let Some(why) = unfollowable(&sc) {
                raise(unfollowable_error(&why, ""));
            }
            if let Some(e) = unsyncable(&sc) {
                raise(e);
            }
        }
    }

    /// The tables continuous sync captures: the scoped ones and the undeclared tables their
    /// ownership paths pass through (a change of one can move rows between families). When
    /// the scope does not compile, the declared tables.
    #[pg_extern(volatile, parallel_unsafe)]
    fn capture_relations() -> Vec<pg_sys::Oid> {
        match current() {
            Ok(Some(sc)) => sc.captured().into_iter().map(pg_sys::Oid::from).collect(),
            _ => rows(
                "SELECT rel::oid::int8 FROM poco.scope ORDER BY 1",
                &[],
                |r| pg_sys::Oid::from(oid_of(r, 1)),
            ),
        }
    }

    /// The compiled queries, for DBAs (EXPLAIN them) and for the push and sync code.
    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_queries() -> TableIterator<
        'static,
        (
            name!(table_name, String),
            name!(role, String),
            name!(path, String),
            name!(select_sql, String),
            name!(count_sql, String),
            name!(owners_sql, String),
        ),
    > {
        let sc = require().or_raise();
        TableIterator::new(
            sc.tables
                .into_iter()
                .map(|t| {
                    (
                        t.ident,
                        t.role.as_str().to_string(),
                        t.path,
                        t.select_sql,
                        t.count_sql,
                        t.owners_sql,
                    )
                })
                .collect::<Vec<_>>(),
        )
    }

    /// Problems a DBA should fix: FK columns on ownership paths without an index, tables
    /// without a primary key.
    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_check() -> TableIterator<
        'static,
        (
            name!(table_name, String),
            name!(severity, String),
            name!(message, String),
        ),
    > {
        let sc = require().or_raise();
        let mut out = Vec::new();
        for t in &sc.tables {
            for w in &t.warnings {
                out.push((t.ident.clone(), "warning".to_string(), w.clone()));
            }
            for f in t.fks.iter().filter(|f| !f.sent) {
                out.push((
                    t.ident.clone(),
                    "info".to_string(),
                    format!(
                        "foreign key left out on the learner: {} ({})",
                        f.text, f.reason
                    ),
                ));
            }
        }
        TableIterator::new(out)
    }

    /// Which of `parent_ids` (default: the parents that have targets) hold this row of `tbl`
    /// (given as jsonb) in their scope, given the current contents of the other tables.
    #[pg_extern(volatile, parallel_unsafe)]
    fn scope_owners(
        tbl: Option<pg_sys::Oid>,
        row_data: Option<pgrx::JsonB>,
        parent_ids: Option<Vec<Option<String>>>,
    ) -> SetOfIterator<'static, String> {
        let oid = tbl.unwrap_or_else(|| raise(PocoError::NullArgument("tbl")));
        let row = row_data.unwrap_or_else(|| raise(PocoError::NullArgument("row_data")));
        let sc = require().or_raise();
        let Some(t) = sc.table(oid.to_u32()) else {
            raise(core_scope::scope_err(
                SqlState::InvalidParameterValue,
                format!("{} is not in the account scope", checked_table(oid)),
                "See the scoped tables with: SELECT * FROM poco_scope_preview(<parent id>);",
            ))
        };
        let candidates: Vec<String> = match parent_ids {
            Some(v) => v
                .into_iter()
                .flatten()
                .map(|p| canonical_with(&sc, &p).or_raise())
                .collect(),
            None => rows(
                "SELECT DISTINCT parent_id FROM poco.target ORDER BY 1",
                &[],
                |r| s(r, 1),
            ),
        };
        let list: Vec<String> = candidates
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // (A NULL says the row reaches no root row: nobody holds it.)
        let out: Vec<String> = rows(&t.owners_sql, &[list.into(), row.into()], |r| {
            r.get::<String>(1).ok().flatten()
        })
        .into_iter()
        .flatten()
        .collect();
        SetOfIterator::new(out)
    }
}
