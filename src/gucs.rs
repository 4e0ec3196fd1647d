//! `poco.*` settings. The key itself is never a setting: only the path of its file, and that
//! path is visible to superusers only.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
static KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ALLOW_PRIVATE: GucSetting<bool> = GucSetting::<bool>::new(false);
static NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static MAX_JOBS: GucSetting<i32> = GucSetting::<i32>::new(2);
static PUSH_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(4);
static RETRY_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static NETWORK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static PUSH_DEADLINE_S: GucSetting<i32> = GucSetting::<i32>::new(6 * 3600);
static MAX_JOBS_PER_PARENT: GucSetting<i32> = GucSetting::<i32>::new(0);
static BATCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(256 * 1024);
static BINARY_COPY: GucSetting<bool> = GucSetting::<bool>::new(true);
static SYNC_MAX_BACKLOG: GucSetting<i32> = GucSetting::<i32>::new(100_000);
static SYNC_MAX_BACKLOG_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
static FAILPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SYNC_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
static SYNC_IDLE_S: GucSetting<i32> = GucSetting::<i32>::new(60);
static SSL_ROOT_CERT_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
    GucRegistry::define_string_guc(
        c"poco.ssl_root_cert_dir",
        c"Directory a target's sslrootcert file must be in (unset: only sslrootcert=system).",
        c"A target's URL comes from the application; without this bound it could name any file the server can read (a device, a pipe, another key).",
        &SSL_ROOT_CERT_DIR,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"poco.database",
        c"Database whose poco_sync background worker sends data to learners.",
        c"Install the extension there. On a change (and reload) the worker reconnects to the new database.",
        &DATABASE,
        // Not PGC_POSTMASTER: that cannot be defined when the library is loaded after start.
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"poco.key_file",
        c"File holding the 32-byte AES-256 key that encrypts learner credentials.",
        c"64 hex digits, base64, or 32 raw bytes; the file must not be accessible by group or others.",
        &KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"poco.allow_private_targets",
        c"Allow learner targets on loopback, link-local and private addresses, and sslmode=disable.",
        c"For development and tests only.",
        &ALLOW_PRIVATE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.naptime",
        c"How long the worker sleeps between passes when idle.",
        c"The worker is also woken when work is committed.",
        &NAPTIME_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"poco.max_jobs",
        c"How many pushes run at once (each in its own background worker process).",
        c"Each running job takes one of max_worker_processes.",
        &MAX_JOBS,
        1,
        crate::shmem::MAX_SLOTS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.push_attempts",
        c"How many times a push is tried when it fails for a transient reason.",
        c"Connection refused or lost, timeouts, the learner restarting. Other errors fail at once.",
        &PUSH_ATTEMPTS,
        1,
        100,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.retry_delay",
        c"Delay before the first retry of a push; it doubles with each further attempt.",
        c"Capped at 5 minutes.",
        &RETRY_DELAY_MS,
        10,
        300_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"poco.network_timeout",
        c"Longest wait for any one network operation with a learner (connect, query, COPY chunk).",
        c"A learner that does not answer within it fails the attempt (and is retried).",
        &NETWORK_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"poco.push_deadline",
        c"Longest a push (or a snapshot) may run, per attempt, before it is stopped.",
        c"A push holds a snapshot of the platform (its xmin) and a job slot while it runs: a \
          learner that reads slowly cannot hold them longer than this. The job then fails with \
          SQLSTATE 57014 and the learner keeps its previous data.",
        &PUSH_DEADLINE_S,
        1,
        30 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"poco.max_jobs_per_parent",
        c"Most pushes of one parent's targets that run at once; 0 (the default): half of \
          poco.max_jobs, at least 1.",
        c"So that one parent's slow learners never hold every job slot while other parents wait.",
        &MAX_JOBS_PER_PARENT,
        0,
        crate::shmem::MAX_SLOTS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.copy_chunk",
        c"Bytes of COPY data gathered before they are handed to the network.",
        c"Memory per running job is a small multiple of this.",
        &BATCH_BYTES,
        8 * 1024,
        64 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"poco.failpoint",
        c"Tests only: make poco_sync processes fail at named moments (name, or name:crash; comma-separated).",
        c"Empty (the default) turns failpoints off. Known: push_mid_copy, push_between_tables, push_after_learner_commit, stream_key_loading, stream_ack_lost, stream_attribution, stream_batch:<parent id>, stream_pass.",
        &FAILPOINT,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"poco.sync_workers",
        c"How many sync stream processes split the continuous targets between them.",
        c"Target id modulo this number picks a target's stream. On a change (and reload) the \
          streams stop and start again split the new way.",
        &SYNC_WORKERS,
        1,
        crate::shmem::MAX_STREAMS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.sync_idle_timeout",
        c"How long a stream keeps a learner connection that carries no batch.",
        c"Past it the connection is closed (a serverless learner may then suspend) and opened \
          again with the next batch. 0: keep connections open.",
        &SYNC_IDLE_S,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"poco.sync_max_backlog",
        c"Most captured changes kept for a continuous target that cannot take them (learner down).",
        c"Past it (or past poco.sync_max_backlog_age) the target's backlog is dropped and it is \
          re-snapshotted by itself when its learner answers again. It is also the most changes \
          one batch holds in memory: a larger one is replaced by a re-snapshot. 0: no row limit.",
        &SYNC_MAX_BACKLOG,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.sync_max_backlog_age",
        c"Longest time a continuous target may stay behind before it is re-snapshotted instead.",
        c"Counted from the last time its position moved while changes waited for it. 0: no age limit.",
        &SYNC_MAX_BACKLOG_AGE_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"poco.binary_copy",
        c"Push tables whose column types are all built in (or enums) with binary COPY.",
        c"Binary COPY is used only when the learner's major version is at least the platform's; \
          tables with arrays of user types, composites or extension types always go as text. \
          Turn off to send everything as text.",
        &BINARY_COPY,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get()
        .and_then(|c| c.into_string().ok())
        .filter(|s| !s.is_empty())
}

pub fn database() -> String {
    string(&DATABASE).unwrap_or_else(|| "postgres".into())
}

pub fn key_file() -> Option<String> {
    string(&KEY_FILE)
}

pub fn allow_private_targets() -> bool {
    ALLOW_PRIVATE.get()
}

pub fn naptime() -> std::time::Duration {
    std::time::Duration::from_millis(NAPTIME_MS.get().max(10) as u64)
}

pub fn max_jobs() -> usize {
    MAX_JOBS.get().clamp(1, crate::shmem::MAX_SLOTS as i32) as usize
}

pub fn push_attempts() -> i32 {
    PUSH_ATTEMPTS.get().max(1)
}

pub fn retry_delay_ms() -> u64 {
    RETRY_DELAY_MS.get().max(10) as u64
}

pub fn push_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(PUSH_DEADLINE_S.get().max(1) as u64)
}

/// Most running pushes per parent (poco.max_jobs_per_parent; 0: half of poco.max_jobs).
pub fn max_jobs_per_parent() -> usize {
    match MAX_JOBS_PER_PARENT.get() {
        n if n > 0 => n as usize,
        _ => (max_jobs() / 2).max(1),
    }
}

pub fn network_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(NETWORK_TIMEOUT_MS.get().max(100) as u64)
}

pub fn copy_chunk() -> usize {
    BATCH_BYTES.get().max(8 * 1024) as usize
}

pub fn binary_copy() -> bool {
    BINARY_COPY.get()
}

pub fn failpoint() -> Option<String> {
    string(&FAILPOINT)
}

/// Backlog limits of a continuous target: (rows, 0 = none; age, None = none).
pub fn sync_max_backlog() -> (i64, Option<std::time::Duration>) {
    let age = SYNC_MAX_BACKLOG_AGE_S.get();
    (
        SYNC_MAX_BACKLOG.get().max(0) as i64,
        (age > 0).then(|| std::time::Duration::from_secs(age as u64)),
    )
}

/// How many stream processes split the continuous targets.
pub fn sync_workers() -> usize {
    SYNC_WORKERS
        .get()
        .clamp(1, crate::shmem::MAX_STREAMS as i32) as usize
}

/// How long an idle learner connection of a stream is kept (None: forever).
pub fn sync_idle_timeout() -> Option<std::time::Duration> {
    let s = SYNC_IDLE_S.get();
    (s > 0).then(|| std::time::Duration::from_secs(s as u64))
}

pub fn ssl_root_cert_dir() -> Option<String> {
    string(&SSL_ROOT_CERT_DIR).filter(|s| !s.is_empty())
}
