//! Worker state in shared memory: what `poco.worker` shows (pid, heartbeat), and the latch
//! the worker sleeps on so that committing transactions can wake it.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Copy, Clone, Default)]
pub struct WorkerShared {
    pub pid: i32,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub passes: u64,
    pub restarts: u32,
    pub state: u8,
}

unsafe impl PGRXSharedMemory for WorkerShared {}

pub const STATE_STOPPED: u8 = 0;
pub const STATE_STARTING: u8 = 1;
pub const STATE_IDLE: u8 = 2;
pub const STATE_WAITING_FOR_EXTENSION: u8 = 3;

pub fn state_name(s: u8) -> &'static str {
    match s {
        STATE_STARTING => "starting",
        STATE_IDLE => "idle",
        STATE_WAITING_FOR_EXTENSION => "waiting for CREATE EXTENSION",
        _ => "stopped",
    }
}

pub static WORKER: PgLwLock<WorkerShared> = unsafe { PgLwLock::new(c"poco_sync_worker") };

/// True in processes forked from a postmaster that preloaded us: only they have the segment.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(WORKER);
    PRELOADED.store(true, Ordering::SeqCst);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::SeqCst)
}

pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

pub fn update(f: impl FnOnce(&mut WorkerShared)) {
    let mut g = WORKER.exclusive();
    f(&mut g);
}

pub fn snapshot() -> WorkerShared {
    *WORKER.share()
}
