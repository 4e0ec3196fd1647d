//! The background worker: one per server, connected to `poco.database`. Each pass of its
//! latch loop checks interrupts, re-reads settings on SIGHUP, records a heartbeat and does
//! the work of the pass, which returns how long to sleep. Network work runs on one
//! current-thread tokio runtime on this (the main) thread; threads tokio starts block all
//! signals, and never touch pgrx.

use crate::process::{block_all_signals, pin_session};
use crate::{catalog, gucs, keys, shmem};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const WORKER_TYPE: &str = "poco_sync worker";

pub fn register() {
    BackgroundWorkerBuilder::new("poco_sync worker")
        .set_type(WORKER_TYPE)
        .set_function("poco_worker_main")
        .set_library("poco_sync")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

fn extension_installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'poco_sync')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn poco_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    pin_session();

    let pid = unsafe { pg_sys::MyProcPid };
    shmem::update(|w| {
        w.pid = pid;
        w.started_at = shmem::now();
        w.heartbeat_at = w.started_at;
        w.restarts += 1;
        w.state = shmem::STATE_STARTING;
    });

    // Built once; drives all network I/O from this thread with block_on.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(block_all_signals)
        .build()
        .expect("poco_sync: could not build the tokio runtime");

    log!("poco_sync worker started (pid {pid}, database \"{db}\")");

    let mut jobs = Jobs::default();
    let mut sleep = Duration::from_millis(10);
    // wait_latch returns false on SIGTERM or postmaster death: we leave at once.
    while BackgroundWorker::wait_latch(Some(sleep)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            keys::forget();
            if gucs::database() != db {
                log!(
                    "poco_sync worker: poco.database changed to \"{}\"; reconnecting",
                    gucs::database()
                );
                break; // exit code 1: the postmaster starts us again, connected to the new one
            }
        }
        sleep = one_pass(&runtime, &mut jobs);
    }

    shmem::update(|w| {
        w.pid = 0;
        w.state = shmem::STATE_STOPPED;
    });
    // Running jobs end with the server (or go on, when only we were terminated: their slots
    // stay, and our next start finds them alive).
    log!("poco_sync worker exiting (pid {pid})");
    drop(runtime);
    // Exit code 1: the postmaster restarts us after the restart interval if we were
    // terminated alone (pg_terminate_backend); at shutdown it does not.
    unsafe { pg_sys::proc_exit(1) };
}

/// The coordinator's own view of the jobs it started.
#[derive(Default)]
struct Jobs {
    /// Orphaned 'running' jobs are failed once, on the first pass with the extension.
    recovered: bool,
    handles: HashMap<usize, DynamicBackgroundWorker>,
    /// The sync stream processes (poco.sync_workers of them, splitting the targets), while
    /// any target syncs continuously.
    streams: Vec<Option<DynamicBackgroundWorker>>,
    /// (tables_done, rows_done, bytes_done) last published per job
    published: HashMap<i64, (i32, i64, i64)>,
    /// A running job's row as read once (parent, target, the estimate), not on every publish.
    rows: HashMap<i64, catalog::JobRow>,
    last_publish: Option<Instant>,
}

/// One pass of the loop; returns how long to sleep before the next.
fn one_pass(_runtime: &tokio::runtime::Runtime, jobs: &mut Jobs) -> Duration {
    let installed = BackgroundWorker::transaction(extension_installed);
    shmem::update(|w| {
        w.heartbeat_at = shmem::now();
        w.passes += 1;
        w.state = if installed {
            shmem::STATE_IDLE
        } else {
            shmem::STATE_WAITING_FOR_EXTENSION
        };
    });
    if !installed {
        return gucs::naptime();
    }
    reap(jobs);
    let to_start = BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        if !jobs.recovered {
            let live: Vec<i64> = shmem::snapshot()
                .slots
                .iter()
                .filter(|s| s.job_id != 0)
                .map(|s| s.job_id)
                .collect();
            for id in catalog::fail_orphans(
                &live,
                "the push was interrupted: the server or its poco_sync worker stopped while it ran",
            ) {
                catalog::log_job_event(
                    "push_failed",
                    id,
                    &format!("job {id} failed: interrupted by a server restart"),
                    json!({}),
                );
            }
            jobs.recovered = true;
        }
        publish(jobs);
        let free: Vec<usize> = {
            let w = shmem::snapshot();
            let running = w.slots.iter().filter(|s| s.job_id != 0).count();
            let room = gucs::max_jobs().saturating_sub(running);
            w.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.job_id == 0)
                .map(|(i, _)| i)
                .take(room)
                .collect()
        };
        let claimed = catalog::claim_jobs(free.len(), gucs::max_jobs_per_parent());
        let pairs: Vec<(usize, i64)> = free.into_iter().zip(claimed).collect();
        for (slot, id) in &pairs {
            shmem::with_slot(*slot, |s| {
                *s = shmem::JobSlot::default();
                s.job_id = *id;
                s.started_at = shmem::now();
            });
        }
        pairs
    }));
    // Started after the claim committed, so each job process sees its job 'running'.
    for (slot, id) in to_start {
        match start_job(slot, id) {
            Ok(h) => {
                jobs.handles.insert(slot, h);
            }
            Err(()) => {
                shmem::with_slot(slot, |s| *s = shmem::JobSlot::default());
                BackgroundWorker::transaction(|| {
                    catalog::requeue(
                        id,
                        1000,
                        "no background worker slot was free (max_worker_processes); waiting",
                    )
                });
            }
        }
    }
    // The sync stream runs while any target syncs (it exits by itself when none does).
    let want_stream = BackgroundWorker::transaction(catalog::any_continuous);
    let parts = gucs::sync_workers();
    if jobs.streams.len() != parts {
        // Split another way: the streams of the old split stop by themselves on the reload;
        // the new ones start once no old one runs (a target is never served by two).
        if jobs.streams.iter().flatten().any(running) {
            return Duration::from_millis(100).min(gucs::naptime());
        }
        jobs.streams = (0..parts).map(|_| None).collect();
    }
    if want_stream {
        for part in 0..parts {
            if jobs.streams[part].as_ref().is_some_and(running) || shmem::stream_alive(part) {
                continue;
            }
            jobs.streams[part] =
                BackgroundWorkerBuilder::new(&format!("poco_sync stream {} of {parts}", part + 1))
                    .set_type(crate::stream::STREAM_WORKER_TYPE)
                    .set_library("poco_sync")
                    .set_function("poco_stream_main")
                    .set_argument(Some(pg_sys::Datum::from(part | (parts << 8))))
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(None)
                    .set_notify_pid(unsafe { pg_sys::MyProcPid })
                    .load_dynamic()
                    .ok();
        }
    }
    let busy = shmem::snapshot().slots.iter().any(|s| s.job_id != 0);
    if busy {
        Duration::from_millis(100).min(gucs::naptime())
    } else {
        gucs::naptime()
    }
}

fn running(h: &DynamicBackgroundWorker) -> bool {
    !matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped))
}

fn start_job(slot: usize, job_id: i64) -> Result<DynamicBackgroundWorker, ()> {
    BackgroundWorkerBuilder::new(&format!("poco_sync push job {job_id}"))
        .set_type(crate::push::JOB_WORKER_TYPE)
        .set_library("poco_sync")
        .set_function("poco_job_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .set_extra(&job_id.to_string())
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .map_err(|_| ())
}

/// Job processes that are gone: a slot still holding a job means the process died without
/// recording its end (it records and clears the slot itself when it can).
fn reap(jobs: &mut Jobs) {
    let gone: Vec<usize> = jobs
        .handles
        .iter()
        .filter(|(_, h)| matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped)))
        .map(|(slot, _)| *slot)
        .collect();
    for slot in gone {
        jobs.handles.remove(&slot);
        let s = shmem::with_slot(slot, |s| std::mem::take(s));
        if s.job_id != 0 {
            jobs.published.remove(&s.job_id);
            BackgroundWorker::transaction(|| {
                let ids = catalog::fail_orphans(
                    &shmem::snapshot()
                        .slots
                        .iter()
                        .filter(|x| x.job_id != 0)
                        .map(|x| x.job_id)
                        .collect::<Vec<_>>(),
                    "the push's process exited before it finished",
                );
                for id in ids {
                    catalog::log_job_event(
                        "push_failed",
                        id,
                        &format!("job {id} failed: its process exited"),
                        json!({}),
                    );
                }
            });
        }
    }
}

/// Publish running jobs' progress (row update and NOTIFY poco_progress), at most 5 times a
/// second, and only what changed.
fn publish(jobs: &mut Jobs) {
    if jobs
        .last_publish
        .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
    {
        return;
    }
    jobs.last_publish = Some(Instant::now());
    let now = shmem::now();
    let running: Vec<shmem::JobSlot> = shmem::snapshot()
        .slots
        .iter()
        .filter(|s| s.job_id != 0 && s.pid != 0)
        .copied()
        .collect();
    jobs.published
        .retain(|id, _| running.iter().any(|s| s.job_id == *id));
    jobs.rows
        .retain(|id, _| running.iter().any(|s| s.job_id == *id));
    for s in running {
        let key = (s.tables_done, s.rows_done, s.bytes_done);
        if jobs.published.get(&s.job_id) == Some(&key) {
            continue;
        }
        jobs.published.insert(s.job_id, key);
        if !jobs.rows.contains_key(&s.job_id) {
            let Some(row) = catalog::load_job(s.job_id) else {
                continue;
            };
            jobs.rows.insert(s.job_id, row);
        }
        let job = &jobs.rows[&s.job_id];
        let elapsed_s = ((now - s.started_at).max(0) as f64) / 1e6;
        // Progress by rows against the last push of this target when there was one, else by tables.
        let fraction = match job.rows_expected {
            Some(exp) if exp > 0 => (s.rows_done as f64 / exp as f64).min(0.99),
            _ if s.tables_total > 0 => (s.tables_done as f64 / s.tables_total as f64).min(0.99),
            _ => 0.0,
        };
        let eta = if fraction > 0.01 {
            Some((elapsed_s * (1.0 - fraction) / fraction).round())
        } else {
            None
        };
        let payload = json!({
            "job_id": s.job_id, "target_id": job.target_id, "state": "running",
            "tables_total": s.tables_total, "tables_done": s.tables_done, "rows_done": s.rows_done,
            "bytes_done": s.bytes_done, "current_table": s.current_table(),
            "rows_expected": job.rows_expected, "percent": (fraction * 1000.0).round() / 10.0,
            "elapsed_s": (elapsed_s * 10.0).round() / 10.0, "eta_s": eta,
        });
        catalog::publish_progress(&s, &payload);
    }
}
