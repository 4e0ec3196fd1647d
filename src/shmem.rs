//! Worker state in shared memory: what `poco.worker` shows (pid, heartbeat), the job slots
//! (the live progress of running pushes, and their cancel flags), and the wake-up of the
//! worker when a transaction that queued work commits.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::sync::atomic::{AtomicBool, Ordering};

/// Most jobs that can run at once (`poco.max_jobs` is capped at this).
pub const MAX_SLOTS: usize = 16;
const TABLE_NAME_LEN: usize = 128;

/// One running job. `job_id == 0` means the slot is free.
#[derive(Copy, Clone)]
pub struct JobSlot {
    pub job_id: i64,
    pub pid: i32,
    pub cancel: bool,
    pub tables_total: i32,
    pub tables_done: i32,
    pub rows_done: i64,
    pub bytes_done: i64,
    pub started_at: i64,
    pub updated_at: i64,
    current_table: [u8; TABLE_NAME_LEN],
}

impl Default for JobSlot {
    fn default() -> Self {
        JobSlot {
            job_id: 0,
            pid: 0,
            cancel: false,
            tables_total: 0,
            tables_done: 0,
            rows_done: 0,
            bytes_done: 0,
            started_at: 0,
            updated_at: 0,
            current_table: [0; TABLE_NAME_LEN],
        }
    }
}

impl JobSlot {
    pub fn current_table(&self) -> Option<String> {
        let end = self
            .current_table
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TABLE_NAME_LEN);
        (end > 0).then(|| String::from_utf8_lossy(&self.current_table[..end]).into_owned())
    }
    pub fn set_current_table(&mut self, name: &str) {
        self.current_table = [0; TABLE_NAME_LEN];
        // Cut on a character boundary so the name stays valid UTF-8.
        let mut n = name.len().min(TABLE_NAME_LEN);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        self.current_table[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
}

#[derive(Copy, Clone, Default)]
pub struct WorkerShared {
    pub pid: i32,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub passes: u64,
    pub restarts: u32,
    pub state: u8,
    pub slots: [JobSlot; MAX_SLOTS],
    /// The sync stream processes, by part (0: not running).
    pub stream_pids: [i32; MAX_STREAMS],
    /// When a session last asked, from poco_sync_wait, for positions to be recorded at once.
    pub sync_wait_at: i64,
}

unsafe impl PGRXSharedMemory for WorkerShared {}

/// Most sync stream processes (poco.sync_workers).
pub const MAX_STREAMS: usize = 8;

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

/// The slot of `job_id`, if it is running.
pub fn slot_of(job_id: i64) -> Option<(usize, JobSlot)> {
    let g = WORKER.share();
    g.slots
        .iter()
        .enumerate()
        .find(|(_, s)| s.job_id == job_id)
        .map(|(i, s)| (i, *s))
}

pub fn with_slot<R>(i: usize, f: impl FnOnce(&mut JobSlot) -> R) -> R {
    let mut g = WORKER.exclusive();
    f(&mut g.slots[i])
}

/// Wake the worker (set its latch). Safe in a commit callback: no allocation, no ERROR.
pub fn wake_worker() {
    if !preloaded() {
        return;
    }
    let pid = WORKER.share().pid;
    if pid != 0 {
        unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            if !proc_.is_null() {
                pg_sys::SetLatch(&mut (*proc_).procLatch);
            }
        }
    }
}

/// Wake the sync streams (set their latches) when a transaction that changed scoped rows
/// commits. Safe in a commit callback: no allocation, no ERROR.
pub fn wake_stream() {
    if !preloaded() {
        return;
    }
    let pids = WORKER.share().stream_pids;
    for pid in pids {
        if pid != 0 {
            unsafe {
                let proc_ = pg_sys::BackendPidGetProc(pid);
                if !proc_.is_null() {
                    pg_sys::SetLatch(&mut (*proc_).procLatch);
                }
            }
        }
    }
}

/// Whether a live process holds stream part `k` (a process that died by an ERROR leaves its
/// pid behind; a server crash resets the segment).
pub fn stream_alive(k: usize) -> bool {
    let pid = WORKER.share().stream_pids[k];
    pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// Take stream part `k` for this process, unless another live process holds it.
pub fn claim_stream(k: usize) -> bool {
    let me = unsafe { pg_sys::MyProcPid };
    let mut g = WORKER.exclusive();
    let pid = g.stream_pids[k];
    if pid != 0 && pid != me && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() } {
        return false;
    }
    g.stream_pids[k] = me;
    true
}

/// A session waits in poco_sync_wait: ask the streams to record positions at once (they
/// otherwise record a target that had nothing to send about once a second), and wake them.
pub fn sync_waiting() {
    if !preloaded() {
        return;
    }
    update(|w| w.sync_wait_at = now());
    wake_stream();
}
