//! Push step 0 and restore: the learner's previous copy kept in a backup schema before a push
//! overwrites it, and a backup brought back.

use super::session::{depends_hint, exec_on, query_on, PREVIOUS_TABLES_SQL};
use super::{Done, Plan};
use crate::catalog;
use crate::net::JobError;
use poco_core::learner::{literal, TypeDef};
use std::collections::BTreeSet;

/// Move the learner's current copy (tables and the types they use) into a new schema
/// `poco_backup_<UTC time>_<job>`, with a map of what came from where; keep the last
/// `job.backups` such schemas. Nothing to keep (first push): no schema.
pub(super) fn backup(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    job: &catalog::JobRow,
    plans: &[Plan],
    types: &[TypeDef],
    previous: &[String],
) -> Result<Option<String>, JobError> {
    let mut tables: BTreeSet<String> = plans.iter().map(|p| p.def.ident.clone()).collect();
    tables.extend(previous.iter().cloned());
    // (kind, original schema, original name) of what exists now.
    let mut objects: Vec<(&str, String, String)> = Vec::new();
    for t in &tables {
        let r = query_on(rt, client, "looking for the previous copy", &format!(
            "SELECT pg_catalog.quote_ident(n.nspname), pg_catalog.quote_ident(c.relname) FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = pg_catalog.to_regclass({})",
            literal(t)
        ))?;
        if let Some(row) = r.first() {
            objects.push(("table", row.get(0), row.get(1)));
        }
    }
    if objects.is_empty() {
        return Ok(None);
    }
    for t in types.iter().filter(|t| t.extension.is_none()) {
        let r = query_on(rt, client, "looking for the previous types", &format!(
            "SELECT pg_catalog.quote_ident(n.nspname), pg_catalog.quote_ident(t.typname), t.typtype::text FROM pg_catalog.pg_type t \
               JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = pg_catalog.to_regtype({})",
            literal(&t.ident)
        ))?;
        if let Some(row) = r.first() {
            let kind = if row.get::<_, String>(2) == "d" {
                "domain"
            } else {
                "type"
            };
            objects.push((kind, row.get(0), row.get(1)));
        }
    }
    let stamp: String = query_on(rt, client, "naming the backup", "SELECT pg_catalog.to_char(pg_catalog.clock_timestamp() AT TIME ZONE 'UTC', 'YYYYMMDD\"t\"HH24MISS')")?[0].get(0);
    let schema = format!("poco_backup_{stamp}_{}", job.id);
    let mut sql = vec![
        format!("CREATE SCHEMA {schema}"),
        format!("COMMENT ON SCHEMA {schema} IS 'poco_sync: the copy replaced by push job {}; restore with poco_restore()'", job.id),
        format!("CREATE TABLE {schema}.poco_objects (kind text NOT NULL, orig_schema text NOT NULL, orig_name text NOT NULL, name text NOT NULL)"),
        format!("CREATE TABLE {schema}.poco_snapshot AS SELECT * FROM poco_sync.snapshot"),
        format!("CREATE TABLE {schema}.poco_tables AS SELECT * FROM poco_sync.tables"),
    ];
    for (i, (kind, sch, name)) in objects.iter().enumerate() {
        let kw = match *kind {
            "table" => "TABLE",
            "domain" => "DOMAIN",
            _ => "TYPE",
        };
        let tmp = format!("poco_bk_{}_{i}", job.id);
        sql.push(format!("ALTER {kw} {sch}.{name} RENAME TO {tmp}"));
        sql.push(format!("ALTER {kw} {sch}.{tmp} SET SCHEMA {schema}"));
        sql.push(format!(
            "INSERT INTO {schema}.poco_objects VALUES ({}, {}, {}, {})",
            literal(kind),
            literal(sch),
            literal(name),
            literal(&tmp)
        ));
    }
    exec_on(rt, client, "keeping the previous copy", sql.join("; ")).map_err(depends_hint)?;
    // Keep the newest `backups` schemas (this one included).
    let old = query_on(rt, client, "listing backups", &format!(
        "SELECT pg_catalog.quote_ident(nspname) FROM pg_catalog.pg_namespace WHERE nspname ~ '^poco_backup_[0-9]{{8}}t[0-9]{{6}}_[0-9]+$' \
          ORDER BY nspname DESC OFFSET {} LIMIT 1000",
        job.backups.max(1)
    ))?;
    for r in old {
        exec_on(
            rt,
            client,
            "dropping an old backup",
            format!("DROP SCHEMA {} CASCADE", r.get::<_, String>(0)),
        )?;
    }
    Ok(Some(schema))
}

/// Bring a backup back (the latest when none is named): the current copy is dropped, the
/// kept tables and types return to their names, the bookkeeping to what it was; one
/// transaction, then the backup schema is gone.
pub(super) fn restore(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    name: Option<&str>,
) -> Result<Done, JobError> {
    let pick = match name {
        Some(n) => format!("SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname = {}", literal(n)),
        None => "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname ~ '^poco_backup_[0-9]{8}t[0-9]{6}_[0-9]+$' \
                 ORDER BY nspname DESC LIMIT 1".to_string(),
    };
    let schema: String = match query_on(rt, client, "finding the backup", &pick)?.first() {
        Some(r) => r.get(0),
        None => {
            return Err(JobError::new("42704", format!("the learner has no backup {}", name.unwrap_or("at all")))
                .hint("Backups are kept when the target asks for them: SELECT poco_set_backups(target_id, 3); then push."))
        }
    };
    let objs = query_on(rt, client, "reading the backup", &format!(
        "SELECT kind, orig_schema, orig_name, name FROM {schema}.poco_objects \
          WHERE kind IN ('table', 'type', 'domain') ORDER BY (kind = 'table') DESC, name LIMIT 100000"
    ))?;
    let current = query_on(rt, client, "reading poco_sync.tables", PREVIOUS_TABLES_SQL)?;
    let mut sql = Vec::new();
    let drop: Vec<String> = current.iter().map(|r| r.get::<_, String>(0)).collect();
    if !drop.is_empty() {
        sql.push(format!("DROP TABLE IF EXISTS {}", drop.join(", ")));
    }
    for r in objs.iter().filter(|r| r.get::<_, String>(0) != "table") {
        let kw = if r.get::<_, String>(0) == "domain" {
            "DOMAIN"
        } else {
            "TYPE"
        };
        sql.push(format!(
            "DROP {kw} IF EXISTS {}.{}",
            r.get::<_, String>(1),
            r.get::<_, String>(2)
        ));
    }
    // Types first (the tables use them), then tables.
    for r in objs.iter().rev() {
        let (kind, sch, orig, tmp): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let kw = match kind.as_str() {
            "table" => "TABLE",
            "domain" => "DOMAIN",
            _ => "TYPE",
        };
        sql.push(format!("CREATE SCHEMA IF NOT EXISTS {sch}"));
        sql.push(format!("ALTER {kw} {schema}.{tmp} SET SCHEMA {sch}"));
        sql.push(format!("ALTER {kw} {sch}.{tmp} RENAME TO {orig}"));
    }
    sql.push("DELETE FROM poco_sync.snapshot".into());
    sql.push(format!(
        "INSERT INTO poco_sync.snapshot SELECT * FROM {schema}.poco_snapshot"
    ));
    sql.push("DELETE FROM poco_sync.tables".into());
    sql.push(format!(
        "INSERT INTO poco_sync.tables SELECT * FROM {schema}.poco_tables"
    ));
    sql.push(format!("DROP SCHEMA {schema} CASCADE"));
    sql.push("COMMIT".into());
    exec_on(rt, client, &format!("restoring {schema}"), sql.join("; ")).map_err(depends_hint)?;
    Ok(Done {
        left_out: vec![],
        position: None,
        backup_schema: Some(schema),
        binary_tables: vec![],
        text_tables: vec![],
    })
}
