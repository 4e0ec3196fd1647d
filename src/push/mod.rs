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
//!
//! The steps, each in its file: `schema` (what is sent), `session` (the learner transaction),
//! `backup` (step 0, and restore), `rows` (step 4, the COPY data), `bookkeeping` (the job's
//! end on the platform); `run` below calls them in order.

mod backup;
mod bookkeeping;
mod rows;
mod schema;
mod session;

use crate::process::in_snapshot;
use backup::{backup, restore};
use bookkeeping::{platform_identity, record, shmem_totals};
use rows::stream_rows;
use schema::describe;
use session::{depends_hint, exec_on, open_learner, PREVIOUS_TABLES_SQL};

use crate::net::{self, JobError};
use crate::{catalog, gucs, keys, scope, shmem};
use bytes::Bytes;
use futures_util::SinkExt;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use poco_core::learner::{self, literal, ConstraintDef, TableDef};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::time::Instant;

pub const JOB_WORKER_TYPE: &str = "poco_sync push";

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    static TERMINATED: Cell<bool> = const { Cell::new(false) };
    /// When this attempt must stop (poco.push_deadline), and whether it did.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static PAST_DEADLINE: Cell<bool> = const { Cell::new(false) };
}

/// Cancelled by `poco_cancel`, told to stop (SIGTERM: shutdown, pg_terminate_backend), or
/// past the attempt's deadline (poco.push_deadline).
fn cancelled() -> bool {
    if BackgroundWorker::sigterm_received() {
        TERMINATED.with(|t| t.set(true)); // the flag clears when read: remember it
    }
    if DEADLINE.with(|d| d.get()).is_some_and(|d| Instant::now() >= d) {
        PAST_DEADLINE.with(|p| p.set(true));
    }
    let slot = SLOT.with(|s| s.get());
    TERMINATED.with(|t| t.get())
        || PAST_DEADLINE.with(|p| p.get())
        || (slot != usize::MAX && shmem::with_slot(slot, |s| s.cancel))
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
    let runtime = crate::process::io_runtime();

    let started = Instant::now();
    let job = BackgroundWorker::transaction(|| catalog::load_job(job_id));
    let Some(job) = job.filter(|j| j.state == "running") else {
        shmem::with_slot(slot, |s| *s = shmem::JobSlot::default());
        return;
    };
    let deadline = gucs::push_deadline();
    DEADLINE.with(|d| d.set(Some(Instant::now() + deadline)));
    let mut outcome = run(&job, &runtime);
    // Past its deadline (a learner reading slowly): the snapshot it held and its slot are
    // given back; a retry would be as slow, so the job fails.
    if matches!(&outcome, Err(e) if e.is_cancel())
        && PAST_DEADLINE.with(|p| p.get())
        && !shmem::with_slot(slot, |s| s.cancel)
        && !TERMINATED.with(|t| t.get())
    {
        outcome = Err(JobError::new(
            "57014",
            format!(
                "the push ran past its deadline of {} s (poco.push_deadline) and was stopped; the learner keeps its previous data",
                deadline.as_secs()
            ),
        )
        .hint("The learner took the data too slowly: check its network and load, or raise poco.push_deadline."));
    }
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

fn run(job: &catalog::JobRow, rt: &tokio::runtime::Runtime) -> Result<Done, JobError> {
    // Stable text output for COPY: the learner reads back exactly what we write.
    crate::process::pin_session();
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
        // poco_restore refuses a continuous target; one queued before sync was turned on (or
        // into poco.job by hand) is refused here, so no batch lands on a copy of another
        // position.
        if BackgroundWorker::transaction(|| catalog::continuous_for_update(target_id)) {
            return Err(JobError::new(
                "55000",
                format!("target {target_id} syncs continuously: a restored backup would not match its stream's position"),
            )
            .hint("Turn continuous sync off first (poco_disable_sync), restore, then poco_enable_sync(target_id)."));
        }
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
