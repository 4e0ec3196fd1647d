//! The push's learner session: connect, refuse the platform itself, begin the one learner
//! transaction with stable settings, and run statements in it with the network timeout.

use super::cancelled;
use crate::net::{self, JobError};
use crate::{catalog, gucs};
use poco_core::learner;

/// The tables an earlier push left on the learner (dropped with the copy). The learner is the
/// parent's: what it answers is bounded (a poco_sync.tables of millions of rows, or of
/// gigabytes of names, is read no further) and only names of tables that exist there come
/// back, quoted by the learner's own regclass output.
pub(super) const PREVIOUS_TABLES_SQL: &str = "SELECT c.oid::pg_catalog.regclass::pg_catalog.text FROM \
       (SELECT pg_catalog.left(t.table_name, 300) AS name FROM poco_sync.tables t LIMIT 10000) t \
       JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name) AND c.relkind IN ('r', 'p')";

pub(super) fn exec_on(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    what: &str,
    sql: String,
) -> Result<(), JobError> {
    let what = what.to_string();
    rt.block_on(net::step(
        &what.clone(),
        gucs::network_timeout(),
        &cancelled,
        async {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| JobError::learner(&what, &e))
        },
    ))
}

pub(super) fn query_on(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    what: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::Row>, JobError> {
    rt.block_on(net::step(
        what,
        gucs::network_timeout(),
        &cancelled,
        async {
            client
                .query(sql, &[])
                .await
                .map_err(|e| JobError::learner(what, &e))
        },
    ))
}

/// Connect, refuse the platform itself, begin the learner transaction with stable settings
/// and make sure the bookkeeping schema exists.
pub(super) fn open_learner(
    rt: &tokio::runtime::Runtime,
    target: &catalog::TargetRow,
    password: Option<&str>,
    target_id: i64,
    sysid: &str,
    dbname: &str,
) -> Result<(tokio_postgres::Client, i32), JobError> {
    let timeout = gucs::network_timeout();
    let client = rt.block_on(net::step(
        "connect",
        timeout * 2,
        &cancelled,
        net::connect(
            &target.spec,
            password,
            gucs::allow_private_targets(),
            gucs::ssl_root_cert_dir(),
            timeout,
            "poco_sync push",
        ),
    ))?;
    // Never write into ourselves: same cluster (system identifier) and same database.
    let row = query_on(
        rt,
        &client,
        "identifying the server",
        "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), pg_catalog.current_database()::text, \
                pg_catalog.current_setting('server_version_num')::int4",
    )?;
    let (lsys, ldb) = (
        row[0].get::<_, Option<String>>(0),
        row[0].get::<_, String>(1),
    );
    let version: i32 = row[0].get(2);
    if lsys.as_deref() == Some(sysid) && ldb == dbname {
        return Err(JobError::new(
            "42809",
            format!("target {target_id} is the platform database itself ({dbname}, system {sysid}); refusing to overwrite it"),
        )
        .hint("A target must be another database, e.g. the parent's own Neon or Supabase database."));
    }
    let ms = timeout.as_millis();
    exec_on(
        rt,
        &client,
        "starting the transaction",
        format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL search_path = pg_catalog; \
             SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
             SET LOCAL TimeZone = 'UTC'; SET LOCAL lock_timeout = '{ms}ms'; \
             SET LOCAL idle_in_transaction_session_timeout = 0; SET LOCAL statement_timeout = 0"
        ),
    )?;
    for s in learner::BOOKKEEPING_SQL {
        exec_on(rt, &client, "creating the poco_sync schema", s.to_string())?;
    }
    Ok((client, version))
}

pub(super) fn depends_hint(e: JobError) -> JobError {
    if e.sqlstate == "2BP01" {
        e.hint("Objects of the learner's own depend on the pushed tables or types (a view, a foreign key). \
                Drop them, or point them elsewhere: poco_sync replaces its tables on every push.")
    } else {
        e
    }
}
