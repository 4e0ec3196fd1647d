//! The background worker: one per server, connected to `poco.database`. Each pass of its
//! latch loop checks interrupts, re-reads settings on SIGHUP, records a heartbeat and does
//! the work of the pass, which returns how long to sleep. Network work runs on one
//! current-thread tokio runtime on this (the main) thread; threads tokio starts block all
//! signals, and never touch pgrx.

use crate::{gucs, keys, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

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

fn block_all_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn extension_installed() -> bool {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'poco_sync')")
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

    let mut sleep = Duration::from_millis(10);
    // wait_latch returns false on SIGTERM or postmaster death: we leave at once.
    while BackgroundWorker::wait_latch(Some(sleep)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            keys::forget();
            if gucs::database() != db {
                log!("poco_sync worker: poco.database changed to \"{}\"; reconnecting", gucs::database());
                break; // exit code 1: the postmaster starts us again, connected to the new one
            }
        }
        sleep = one_pass(&runtime);
    }

    shmem::update(|w| {
        w.pid = 0;
        w.state = shmem::STATE_STOPPED;
    });
    log!("poco_sync worker exiting (pid {pid})");
    drop(runtime);
    // Exit code 1: the postmaster restarts us after the restart interval if we were
    // terminated alone (pg_terminate_backend); at shutdown it does not.
    unsafe { pg_sys::proc_exit(1) };
}

/// One pass of the loop; returns how long to sleep before the next.
fn one_pass(_runtime: &tokio::runtime::Runtime) -> Duration {
    let installed = BackgroundWorker::transaction(extension_installed);
    shmem::update(|w| {
        w.heartbeat_at = shmem::now();
        w.passes += 1;
        w.state = if installed { shmem::STATE_IDLE } else { shmem::STATE_WAITING_FOR_EXTENSION };
    });
    gucs::naptime()
}
