//! Process plumbing shared by the push and stream processes: signals (threads started with
//! every signal blocked), the I/O runtime, the session settings they pin, and the
//! transactions they run on the platform (a read-only snapshot, subtransactions), with
//! errors raised in them caught as JobErrors.

use crate::net::JobError;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

/// Run `f` (which starts threads) with every signal blocked on this thread, so the threads it
/// starts inherit a fully blocked mask from their first instruction; restore the mask after.
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// The runtime of a push or stream process: one I/O thread (created with every signal
/// blocked, so PostgreSQL's signal handlers only run on the main thread, the only one that
/// calls into PostgreSQL) and up to two blocking threads.
pub fn io_runtime() -> tokio::runtime::Runtime {
    with_signals_blocked(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .on_thread_start(block_all_signals)
            .build()
    })
    .expect("poco_sync: could not build the tokio runtime")
}

/// Settings every poco_sync process keeps for its whole session: `search_path` is pg_catalog
/// alone, so no operator, function or type of another schema (`public`, `$user`) can be picked
/// by a statement poco runs on the platform (an `=` for varchar or a domain in `public` would
/// otherwise win over the built-in one); and a stable text form for the values it copies (the
/// learner reads back exactly what is written).
pub fn pin_session() {
    BackgroundWorker::transaction(|| {
        Spi::run(
            "SELECT pg_catalog.set_config('search_path', 'pg_catalog', false), \
                    pg_catalog.set_config('DateStyle', 'ISO, YMD', false), \
                    pg_catalog.set_config('IntervalStyle', 'postgres', false), \
                    pg_catalog.set_config('TimeZone', 'UTC', false), \
                    pg_catalog.set_config('extra_float_digits', '3', false), \
                    pg_catalog.set_config('bytea_output', 'hex', false)",
        )
        .expect("poco_sync: could not pin the session settings");
    });
}

pub fn block_all_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
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
