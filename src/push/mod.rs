//! One push job, run in its own dynamic background worker (started by src/worker.rs).
//!
//! Platform side: one REPEATABLE READ, READ ONLY transaction, so every table of the account is
//! read from the same snapshot; each table's scoped query runs as an SPI cursor fetched in
//! batches, turned into COPY text in a buffer of `poco.copy_chunk` bytes that is handed to the
//! network and reused: memory stays flat whatever the account's size.
//!
//! Learner side: one transaction that drops the previous copies, creates types and tables,
//! COPYs the rows, builds keys, indexes and foreign keys, sets sequences and writes the
//! bookkeeping in `poco_sync`. Any failure (or a cancel) drops the connection before COMMIT,
//! so the learner keeps its previous data.
//!
//! Progress goes to this job's shared-memory slot; the main worker publishes it.

use crate::net::{self, JobError};
use crate::{catalog, gucs, keys, scope, shmem};
use bytes::Bytes;
use futures_util::SinkExt;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use poco_core::learner::{self, copy_escape_into, literal, ConstraintDef, TableDef, TypeDef};
use poco_core::scope::Scope;
use serde_json::json;
use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::time::Instant;

pub const JOB_WORKER_TYPE: &str = "poco_sync push";

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    static TERMINATED: Cell<bool> = const { Cell::new(false) };
}

/// Cancelled by `poco_cancel`, or told to stop (SIGTERM: shutdown, pg_terminate_backend).
fn cancelled() -> bool {
    if BackgroundWorker::sigterm_received() {
        TERMINATED.with(|t| t.set(true)); // the flag clears when read: remember it
    }
    let slot = SLOT.with(|s| s.get());
    TERMINATED.with(|t| t.get()) || (slot != usize::MAX && shmem::with_slot(slot, |s| s.cancel))
}

fn progress(f: impl FnOnce(&mut shmem::JobSlot)) {
    let slot = SLOT.with(|s| s.get());
    if slot != usize::MAX {
        shmem::with_slot(slot, |s| {
            f(s);
            s.updated_at = shmem::now();
        });
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn poco_job_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let slot = arg.value();
    let job_id: i64 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    if slot >= shmem::MAX_SLOTS || shmem::with_slot(slot, |s| s.job_id) != job_id {
        log!("poco_sync push: slot {slot} does not hold job {job_id}; exiting");
        return;
    }
    SLOT.with(|s| s.set(slot));
    progress(|s| {
        s.pid = unsafe { pg_sys::MyProcPid };
        s.started_at = shmem::now();
    });
    // One I/O thread drives the learner connection (it never touches Postgres), so rows are
    // written to the socket while this thread reads and converts the next ones. Only this
    // (main) thread calls into Postgres: it blocks on the futures it needs. The I/O thread is
    // created with every signal blocked, so Postgres' signal handlers only run here.
    let runtime = crate::worker::io_runtime();

    let started = Instant::now();
    let job = BackgroundWorker::transaction(|| catalog::load_job(job_id));
    let Some(job) = job.filter(|j| j.state == "running") else {
        shmem::with_slot(slot, |s| *s = shmem::JobSlot::default());
        return;
    };
    let mut outcome = run(&job, &runtime);
    // Stopped by a server shutdown (SIGTERM), not by poco_cancel: a transient failure, so the
    // job runs again after the restart instead of ending as cancelled.
    if matches!(&outcome, Err(e) if e.is_cancel())
        && TERMINATED.with(|t| t.get())
        && !shmem::with_slot(slot, |s| s.cancel)
    {
        outcome = Err(JobError::transient(
            "57P01",
            "the server shut down while the push ran",
        ));
    }
    drop(runtime); // closes the learner connection: without COMMIT it rolls back
    let elapsed_ms = started.elapsed().as_millis() as i64;
    let p = shmem::with_slot(slot, |s| *s);
    BackgroundWorker::transaction(|| record(&job, &p, outcome, elapsed_ms));
    shmem::with_slot(slot, |s| *s = shmem::JobSlot::default());
    crate::shmem::wake_worker();
}

fn record(
    job: &catalog::JobRow,
    p: &shmem::JobSlot,
    outcome: Result<Done, JobError>,
    elapsed_ms: i64,
) {
    let base = json!({"duration_ms": elapsed_ms, "tables": p.tables_done, "rows": p.rows_done,
                      "bytes": p.bytes_done, "attempt": job.attempts});
    let mut end = catalog::JobEnd {
        job_id: job.id,
        state: "succeeded",
        retry_in_ms: 0,
        tables_total: p.tables_total,
        tables_done: p.tables_done,
        rows: p.rows_done,
        bytes: p.bytes_done,
        error: None,
        sqlstate: None,
        detail: json!({}),
        backup_schema: None,
    };
    let (kind, message);
    let err_text;
    let restore = job.kind == "restore";
    match &outcome {
        Ok(done) if restore => {
            end.backup_schema = done.backup_schema.as_deref();
            kind = "restore_succeeded";
            message = format!(
                "restored {} on target {}",
                done.backup_schema.as_deref().unwrap_or("?"),
                job.target_id.unwrap_or(0)
            );
        }
        Ok(done) => {
            end.detail = json!({"left_out": done.left_out, "duration_ms": elapsed_ms,
                                "binary_copy": done.binary_tables, "text_copy": done.text_tables});
            end.backup_schema = done.backup_schema.as_deref();
            kind = "push_succeeded";
            message = format!(
                "pushed parent {} to target {}: {} tables, {} rows, {} bytes in {} ms",
                job.parent_id,
                job.target_id.unwrap_or(0),
                p.tables_done,
                p.rows_done,
                p.bytes_done,
                elapsed_ms
            );
        }
        Err(e) => {
            err_text = match &e.hint {
                Some(h) => format!("{} (hint: {h})", e.message),
                None => e.message.clone(),
            };
            end.error = Some(&err_text);
            end.sqlstate = Some(&e.sqlstate);
            if e.is_cancel() {
                end.state = "cancelled";
                kind = "push_cancelled";
                message = format!(
                    "job {} cancelled; the learner keeps its previous data",
                    job.id
                );
            } else if e.transient && job.attempts < job.max_attempts {
                end.state = "queued";
                end.retry_in_ms = learner::backoff_ms(gucs::retry_delay_ms(), job.attempts as u32);
                kind = "push_retry";
                message = format!(
                    "job {} attempt {} of {} failed, retrying in {} ms: {}",
                    job.id, job.attempts, job.max_attempts, end.retry_in_ms, e.message
                );
            } else {
                end.state = "failed";
                kind = if restore {
                    "restore_failed"
                } else {
                    "push_failed"
                };
                message = format!(
                    "job {} failed after {} attempt(s): {}",
                    job.id, job.attempts, e.message
                );
            }
        }
    }
    catalog::finish_job(&end);
    // A continuous target follows the platform from the snapshot this push sent.
    if let (Ok(done), false) = (&outcome, restore) {
        catalog::sync_snapshot_done(job.target_id.unwrap_or(0), done.position.as_deref());
    } else if end.state == "failed" {
        catalog::sync_snapshot_failed(job.target_id.unwrap_or(0), end.error.unwrap_or(""));
    }
    let mut detail = base;
    if let Some(e) = end.error {
        detail["error"] = json!(e);
        detail["sqlstate"] = json!(end.sqlstate);
    }
    catalog::log_job_event(kind, job.id, &message, detail);
    let payload = json!({
        "job_id": job.id, "parent_id": job.parent_id, "target_id": job.target_id, "state": end.state,
        "tables_total": p.tables_total, "tables_done": p.tables_done, "rows_done": p.rows_done,
        "bytes_done": p.bytes_done, "percent": if end.state == "succeeded" { 100.0 } else { 0.0 },
        "eta_s": 0, "error": end.error,
    });
    Spi::run_with_args(
        "SELECT pg_catalog.pg_notify('poco_progress', $1)",
        &[payload.to_string().into()],
    )
    .unwrap_or_default();
    if end.state == "failed" || end.state == "queued" {
        log!("poco_sync: {message}");
    }
}

struct Done {
    left_out: Vec<String>,
    /// the platform snapshot the rows were read in (pg_current_snapshot() text)
    position: Option<String>,
    /// tables sent with binary COPY, and as text
    binary_tables: Vec<String>,
    text_tables: Vec<String>,
    /// The learner schema the previous copy was kept in (push with backups), or the one
    /// restored (restore).
    backup_schema: Option<String>,
}

/// A table as this push handles it.
struct Plan {
    scoped: poco_core::scope::ScopedTable,
    def: TableDef,
    fks: Vec<ConstraintDef>,
    /// referenced scoped tables (FK order)
    depends_on: Vec<u32>,
    /// every column's binary form is portable (see TABLE_SQL)
    binary: bool,
    types: Vec<u32>,
}

/// Run inside a REPEATABLE READ, READ ONLY transaction; committed (nothing to write) or
/// aborted on error.
pub(crate) fn in_snapshot<R>(f: impl FnOnce() -> Result<R, JobError>) -> Result<R, JobError> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
        pg_sys::XactReadOnly = true;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| Err(caught(e)))
        .execute();
    unsafe {
        if r.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    r
}

/// An error raised on the platform (or a panic), as a JobError.
fn caught(e: pg_sys::panic::CaughtError) -> JobError {
    let (code, msg) = match &e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r) => (
            unpack_sqlstate(r.sql_error_code() as i32),
            format!("platform: {}", r.message()),
        ),
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => (
            "XX000".to_string(),
            format!("platform: {}", ereport.message()),
        ),
    };
    JobError::new(&code, msg)
}

/// Run `f` in a subtransaction of the current transaction: an error raised in it (a value too
/// big for one statement, say) rolls back only the subtransaction and comes back as a
/// JobError, and the transaction (its snapshot, its other work) goes on, as a plpgsql
/// EXCEPTION block does.
pub(crate) fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, JobError> {
    let (cx, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
    }
    let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
        .catch_others(|e| Err(caught(e)))
        .execute();
    unsafe {
        if r.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cx);
        pg_sys::CurrentResourceOwner = owner;
    }
    r
}

fn unpack_sqlstate(code: i32) -> String {
    // PGSIXBIT packing: 6 bits per character, first character lowest.
    (0..5)
        .map(|i| ((((code >> (6 * i)) & 0x3F) as u8) + b'0') as char)
        .collect()
}

fn run(job: &catalog::JobRow, rt: &tokio::runtime::Runtime) -> Result<Done, JobError> {
    // Stable text output for COPY: the learner reads back exactly what we write.
    crate::worker::pin_session();
    let target_id = job.target_id.ok_or_else(|| {
        JobError::new("42704", "the job's target was removed before the push ran")
    })?;
    let (target, password) = BackgroundWorker::transaction(|| -> Result<_, JobError> {
        let key = keys::current().map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
        let t = catalog::load_target(target_id)
            .map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
        let pw = crate::targets::poco::open_credentials(target_id, &key)
            .map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
        Ok((t, pw))
    })?;
    let timeout = gucs::network_timeout();
    let chunk = gucs::copy_chunk();

    if job.kind == "restore" {
        let (sysid, dbname) = BackgroundWorker::transaction(platform_identity);
        let (client, _) =
            open_learner(rt, &target, password.as_deref(), target_id, &sysid, &dbname)?;
        return restore(rt, &client, job.backup_name.as_deref());
    }

    in_snapshot(|| {
        let sc = scope::require().map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
        let (sysid, dbname) = platform_identity();
        let position = Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text")
            .map_err(|e| JobError::new("XX000", e.to_string()))?
            .unwrap_or_default();
        let (plans, types, mut left_out) = describe(&sc)?;
        progress(|s| s.tables_total = plans.len() as i32);

        let cancelled: &dyn Fn() -> bool = &cancelled;
        let (client, learner_version) =
            open_learner(rt, &target, password.as_deref(), target_id, &sysid, &dbname)?;
        // Binary COPY where the types allow it and the learner is not older than the platform
        // (binary forms only ever gain cases, such as numeric infinity in 14).
        let binary_ok =
            gucs::binary_copy() && learner_version / 10000 >= pg_sys::PG_VERSION_NUM as i32 / 10000;
        let exec =
            |what: &str, sql: String| -> Result<(), JobError> { exec_on(rt, &client, what, sql) };
        let previous: Vec<String> = rt.block_on(net::step(
            "reading poco_sync.tables",
            timeout,
            cancelled,
            async {
                let rows = client
                    .query(PREVIOUS_TABLES_SQL, &[])
                    .await
                    .map_err(|e| JobError::learner("reading poco_sync.tables", &e))?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
            },
        ))?;

        // 0. Keep the previous copy in a backup schema, if the target asks for it.
        let backup_schema = if job.backups > 0 {
            backup(rt, &client, job, &plans, &types, &previous)?
        } else {
            None
        };
        // 1. Drop the previous copies (and tables an earlier scope pushed that it no longer has).
        let mut drop: BTreeSet<String> = plans.iter().map(|p| p.def.ident.clone()).collect();
        drop.extend(previous);
        exec(
            "dropping the previous copy",
            format!(
                "DROP TABLE IF EXISTS {}",
                drop.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )
        .map_err(|e| depends_hint(e))?;
        // 2. Types, dependencies first (drop in reverse).
        for t in types.iter().rev() {
            if let Some(d) = t.drop_sql() {
                exec(&format!("dropping type {}", t.ident), d).map_err(|e| depends_hint(e))?;
            }
        }
        let mut schemas: BTreeSet<&str> = plans.iter().map(|p| p.def.schema.as_str()).collect();
        schemas.extend(types.iter().map(|t| t.schema.as_str()));
        for s in schemas {
            exec(
                "creating schemas",
                format!("CREATE SCHEMA IF NOT EXISTS {s}"),
            )?;
        }
        for t in &types {
            let sql = t.create_sql().map_err(|m| JobError::new("0A000", m))?;
            exec(&format!("creating type {}", t.ident), sql)?;
        }
        // 3. Tables, columns only.
        for p in &plans {
            for s in p.def.create_sql() {
                exec(&format!("creating {}", p.def.ident), s)?;
            }
        }
        // 4. Rows, table by table in FK order, from the one snapshot.
        let mut counts: Vec<(String, i64)> = Vec::new();
        for p in &plans {
            if cancelled() {
                return Err(JobError::cancelled());
            }
            progress(|s| s.set_current_table(&p.def.ident));
            let binary = binary_ok && p.binary;
            // FREEZE: the table was created in this transaction, so its rows can be written
            // frozen and its pages all-visible. The learner's autovacuum then has nothing to
            // rewrite after a push (it would otherwise visit the whole copy to set hint bits
            // and the visibility map, and a later push's DROP would wait on it).
            let copy_sql = format!(
                "COPY {} ({}) FROM STDIN ({}FREEZE)",
                p.def.ident,
                p.def.column_list(),
                if binary { "FORMAT binary, " } else { "" }
            );
            let sink = rt.block_on(net::step("starting COPY", timeout, cancelled, async {
                client
                    .copy_in::<_, Bytes>(&copy_sql)
                    .await
                    .map_err(|e| JobError::learner(&format!("COPY {}", p.def.ident), &e))
            }))?;
            let mut sink = Box::pin(sink);
            let ident = p.def.ident.clone();
            let rows = stream_rows(
                &p.scoped.select_sql,
                &job.parent_id,
                chunk,
                binary,
                &mut |buf: Vec<u8>| {
                    let n = buf.len() as i64;
                    rt.block_on(net::step(
                        &format!("COPY {ident}"),
                        timeout,
                        cancelled,
                        async {
                            sink.as_mut()
                                .send(Bytes::from(buf))
                                .await
                                .map_err(|e| JobError::learner(&format!("COPY {ident}"), &e))
                        },
                    ))?;
                    progress(|s| s.bytes_done += n);
                    crate::failpoint::push_step(
                        "push_mid_copy",
                        job.attempts,
                        format_args!("the connection failed during COPY {ident}"),
                    )
                },
            )?;
            let loaded = rt.block_on(net::step(
                &format!("COPY {}", p.def.ident),
                timeout,
                cancelled,
                async {
                    sink.as_mut()
                        .finish()
                        .await
                        .map_err(|e| JobError::learner(&format!("COPY {}", p.def.ident), &e))
                },
            ))?;
            if loaded as i64 != rows {
                return Err(JobError::new(
                    "XX000",
                    format!(
                        "{}: sent {rows} rows but the learner loaded {loaded}",
                        p.def.ident
                    ),
                ));
            }
            counts.push((p.def.ident.clone(), rows));
            progress(|s| s.tables_done += 1);
            if counts.len() < plans.len() {
                crate::failpoint::push_step(
                    "push_between_tables",
                    job.attempts,
                    format_args!("the connection failed after {}", p.def.ident),
                )?;
            }
        }
        progress(|s| s.set_current_table("(indexes and keys)"));
        // 5. Keys, checks and indexes over the loaded rows, then foreign keys, then sequences.
        for p in &plans {
            for s in p.def.index_sql() {
                exec(&format!("indexing {}", p.def.ident), s)?;
            }
        }
        for p in &plans {
            for fk in &p.fks {
                exec(
                    &format!("foreign key {} of {}", fk.ident, p.def.ident),
                    learner::foreign_key_sql(&p.def.ident, fk),
                )?;
            }
            for s in p.def.sequence_sql() {
                exec(&format!("sequences of {}", p.def.ident), s)?;
            }
        }
        for p in &plans {
            left_out.extend(p.def.left_out.iter().cloned());
        }
        // 6. Bookkeeping, same transaction.
        let totals = shmem_totals();
        let mut book = vec![
            "DELETE FROM poco_sync.tables".to_string(),
            "DELETE FROM poco_sync.snapshot".to_string(),
            format!(
                "INSERT INTO poco_sync.snapshot (target_id, parent_id, job_id, platform, platform_system_identifier, \
                 pushed_at, tables, rows, bytes) VALUES ({target_id}, {}, {}, {}, {}, pg_catalog.now(), {}, {}, {})",
                literal(&job.parent_id),
                job.id,
                literal(&dbname),
                literal(&sysid),
                plans.len(),
                totals.0,
                totals.1
            ),
        ];
        for (t, n) in &counts {
            book.push(format!(
                "INSERT INTO poco_sync.tables VALUES ({}, {n}, pg_catalog.now())",
                literal(t)
            ));
        }
        book.push("DELETE FROM poco_sync.position".to_string());
        book.push(format!(
            "INSERT INTO poco_sync.position (position, updated_at) VALUES ({}, pg_catalog.now())",
            literal(&position)
        ));
        exec("writing poco_sync bookkeeping", book.join("; "))?;
        if cancelled() {
            return Err(JobError::cancelled());
        }
        progress(|s| s.set_current_table("(committing)"));
        if let Some(b) = &backup_schema {
            exec(
                "recording the backup",
                format!(
                    "UPDATE poco_sync.snapshot SET backup_schema = {}",
                    literal(b)
                ),
            )?;
        }
        exec("committing", "COMMIT".to_string())?;
        crate::failpoint::push_step(
            "push_after_learner_commit",
            job.attempts,
            "the learner committed, the platform did not hear it",
        )?;
        let (bin, txt): (Vec<_>, Vec<_>) = plans.iter().partition(|p| binary_ok && p.binary);
        Ok(Done {
            left_out,
            position: Some(position),
            backup_schema,
            binary_tables: bin.iter().map(|p| p.def.ident.clone()).collect(),
            text_tables: txt.iter().map(|p| p.def.ident.clone()).collect(),
        })
    })
}

/// The tables an earlier push left on the learner (dropped with the copy). The learner is the
/// parent's: what it answers is bounded (a poco_sync.tables of millions of rows, or of
/// gigabytes of names, is read no further) and only names of tables that exist there come
/// back, quoted by the learner's own regclass output.
const PREVIOUS_TABLES_SQL: &str = "SELECT c.oid::pg_catalog.regclass::pg_catalog.text FROM \
       (SELECT pg_catalog.left(t.table_name, 300) AS name FROM poco_sync.tables t LIMIT 10000) t \
       JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name) AND c.relkind IN ('r', 'p')";

fn exec_on(
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

fn query_on(
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
fn open_learner(
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

/// Move the learner's current copy (tables and the types they use) into a new schema
/// `poco_backup_<UTC time>_<job>`, with a map of what came from where; keep the last
/// `job.backups` such schemas. Nothing to keep (first push): no schema.
fn backup(
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
fn restore(
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

fn shmem_totals() -> (i64, i64) {
    let slot = SLOT.with(|s| s.get());
    if slot == usize::MAX {
        return (0, 0);
    }
    shmem::with_slot(slot, |s| (s.rows_done, s.bytes_done))
}

fn depends_hint(e: JobError) -> JobError {
    if e.sqlstate == "2BP01" {
        e.hint("Objects of the learner's own depend on the pushed tables or types (a view, a foreign key). \
                Drop them, or point them elsewhere: poco_sync replaces its tables on every push.")
    } else {
        e
    }
}

fn platform_identity() -> (String, String) {
    let r = Spi::get_two::<String, String>(
        "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), pg_catalog.current_database()::text",
    )
    .unwrap_or((None, None));
    (r.0.unwrap_or_default(), r.1.unwrap_or_default())
}

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
fn describe(sc: &Scope) -> Result<(Vec<Plan>, Vec<TypeDef>, Vec<String>), JobError> {
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
    // pg_catalog alone stays on the path for the rest of the job (worker::pin_session): SET
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

/// Run the scoped query as a cursor and hand COPY data (text, or binary with the types' send
/// functions) to `emit` in chunks of about `chunk` bytes. Returns the number of rows.
fn stream_rows(
    sql: &str,
    parent: &str,
    chunk: usize,
    binary: bool,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<(), JobError>,
) -> Result<i64, JobError> {
    const FETCH: i64 = 1000;
    let csql = CString::new(sql).map_err(|_| JobError::new("XX000", "query contains NUL"))?;
    let mut rows: i64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 64 * 1024);
    if binary {
        // Signature, flags (no OIDs), header extension length.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
    }
    let mut row_ctx = PgMemoryContexts::new("poco_sync copy rows");
    let mut pending_err: Option<JobError> = None;
    unsafe {
        if pg_sys::SPI_connect() < 0 {
            return Err(JobError::new("XX000", "SPI_connect failed"));
        }
        let mut argtypes = [pg_sys::TEXTOID];
        let ptext = CString::new(parent).unwrap_or_default();
        let mut values = [pg_sys::Datum::from(pg_sys::cstring_to_text(ptext.as_ptr()))];
        let nulls = [b' ' as std::os::raw::c_char];
        let portal = pg_sys::SPI_cursor_open_with_args(
            std::ptr::null(),
            csql.as_ptr(),
            1,
            argtypes.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            0,
        );
        let mut out_funcs: Vec<pg_sys::FmgrInfo> = Vec::new();
        let mut values_buf: Vec<pg_sys::Datum> = Vec::new();
        let mut nulls_buf: Vec<bool> = Vec::new();
        'fetch: loop {
            pg_sys::SPI_cursor_fetch(portal, true, FETCH);
            let n = pg_sys::SPI_processed as usize;
            let tt = pg_sys::SPI_tuptable;
            if n == 0 || tt.is_null() {
                break;
            }
            let tupdesc = (*tt).tupdesc;
            let natts = (*tupdesc).natts as usize;
            if out_funcs.is_empty() && natts > 0 {
                for i in 0..natts {
                    let att = (*tupdesc).attrs.as_ptr().add(i);
                    let mut func = pg_sys::InvalidOid;
                    let mut varlena = false;
                    if binary {
                        pg_sys::getTypeBinaryOutputInfo((*att).atttypid, &mut func, &mut varlena);
                    } else {
                        pg_sys::getTypeOutputInfo((*att).atttypid, &mut func, &mut varlena);
                    }
                    let mut finfo: pg_sys::FmgrInfo = std::mem::zeroed();
                    pg_sys::fmgr_info(func, &mut finfo);
                    out_funcs.push(finfo);
                }
                values_buf = vec![pg_sys::Datum::from(0usize); natts];
                nulls_buf = vec![false; natts];
            }
            let tuples = std::slice::from_raw_parts((*tt).vals, n);
            row_ctx.switch_to(|_| {
                for &tup in tuples {
                    pg_sys::heap_deform_tuple(
                        tup,
                        tupdesc,
                        values_buf.as_mut_ptr(),
                        nulls_buf.as_mut_ptr(),
                    );
                    if binary {
                        buf.extend_from_slice(&(natts as i16).to_be_bytes());
                        for i in 0..natts {
                            if nulls_buf[i] {
                                buf.extend_from_slice(&(-1i32).to_be_bytes());
                            } else {
                                let b = pg_sys::SendFunctionCall(&mut out_funcs[i], values_buf[i]);
                                let len = pgrx::varlena::varsize_any_exhdr(b);
                                let data = pgrx::varlena::vardata_any(b) as *const u8;
                                buf.extend_from_slice(&(len as i32).to_be_bytes());
                                buf.extend_from_slice(std::slice::from_raw_parts(data, len));
                            }
                        }
                        continue;
                    }
                    for i in 0..natts {
                        if i > 0 {
                            buf.push(b'\t');
                        }
                        if nulls_buf[i] {
                            buf.extend_from_slice(b"\\N");
                        } else {
                            let cs = pg_sys::OutputFunctionCall(&mut out_funcs[i], values_buf[i]);
                            copy_escape_into(&mut buf, CStr::from_ptr(cs).to_bytes());
                        }
                    }
                    buf.push(b'\n');
                }
            });
            row_ctx.reset();
            pg_sys::SPI_freetuptable(tt);
            rows += n as i64;
            progress(|s| s.rows_done += n as i64);
            if buf.len() >= chunk {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(chunk + 64 * 1024));
                if let Err(e) = emit(full) {
                    pending_err = Some(e);
                    break 'fetch;
                }
            }
            if cancelled() {
                pending_err = Some(JobError::cancelled());
                break;
            }
        }
        pg_sys::SPI_cursor_close(portal);
        pg_sys::SPI_finish();
    }
    if let Some(e) = pending_err {
        return Err(e);
    }
    if binary {
        buf.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    }
    if !buf.is_empty() {
        emit(buf)?;
    }
    Ok(rows)
}
