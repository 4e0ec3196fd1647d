//! Continuous sync from SQL (API §2): `poco_sync_wait` blocks until a target's position covers
//! the caller's snapshot. The capture triggers, `poco_enable_sync` and `poco_disable_sync` are
//! SQL (sql/finalize.sql); the rules are in docs/sync-design.md.

use pgrx::prelude::*;

#[pg_schema]
pub mod poco {
    use crate::errors::raise;
    use pgrx::prelude::*;
    use poco_core::scope::scope_err;
    use poco_core::{PocoError, SqlState};
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    thread_local! {
        /// The local transaction that last registered the wake-up (one per transaction).
        static WAKE_LXID: Cell<u32> = const { Cell::new(0) };
    }

    /// Statement trigger next to the capture: when the transaction commits, set the stream's
    /// latch, so a change is picked up at once instead of at the stream's next poll.
    #[pg_trigger]
    fn capture_wake<'a>(
        _trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<
        Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>,
        pgrx::heap_tuple::PgHeapTupleError,
    > {
        let lxid = unsafe { (*pg_sys::MyProc).lxid };
        if WAKE_LXID.with(|w| w.replace(lxid)) != lxid {
            pgrx::register_xact_callback(
                pgrx::PgXactCallbackEvent::Commit,
                crate::shmem::wake_stream,
            );
        }
        Ok(None)
    }

    /// `snap` (pg_current_snapshot() text of the caller) with the caller's own transaction
    /// counted as in progress. PostgreSQL leaves a transaction's own xid out of its snapshot's
    /// in-progress list, so a snapshot taken by a transaction that has written (an earlier
    /// statement, or poco_sync's own bookkeeping in the same call) reads as if that write were
    /// committed, and no position could ever cover it: the wait always timed out.
    fn own_xact_in_progress(snap: &str) -> String {
        let own = Spi::get_one::<String>("SELECT pg_catalog.pg_current_xact_id_if_assigned()::text")
            .ok()
            .flatten()
            .and_then(|x| x.parse::<u64>().ok());
        let mut parts = snap.splitn(3, ':');
        let (Some(own), Some(xmin), Some(xmax)) = (
            own,
            parts.next().and_then(|v| v.parse::<u64>().ok()),
            parts.next().and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return snap.to_string();
        };
        let mut xip: Vec<u64> = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        if own >= xmax || xip.contains(&own) {
            return snap.to_string();
        }
        xip.push(own);
        xip.sort_unstable();
        let list: Vec<String> = xip.iter().map(u64::to_string).collect();
        format!("{}:{xmax}:{}", xmin.min(own), list.join(","))
    }

    /// Block until target `target_id` has applied every change visible in `snap` (the caller's
    /// snapshot at the call); false on timeout.
    #[pg_extern(volatile, parallel_unsafe)]
    pub(crate) fn sync_wait(
        target_id: Option<i64>,
        snap: Option<String>,
        timeout_s: Option<f64>,
    ) -> bool {
        let target = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(target);
        let snap = own_xact_in_progress(&snap.unwrap_or_default());
        let timeout =
            Duration::from_secs_f64(timeout_s.unwrap_or(60.0).clamp(0.0, 86_400.0 * 365.0));
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            raise(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                "poco_sync_wait cannot see the target advance inside a REPEATABLE READ or SERIALIZABLE transaction",
                "Call poco_sync_wait in a READ COMMITTED transaction (the default).",
            ));
        }
        let start = Instant::now();
        let mut asked: Option<Instant> = None;
        loop {
            if asked.is_none_or(|at| at.elapsed() >= Duration::from_millis(250)) {
                crate::shmem::sync_waiting();
                asked = Some(Instant::now());
            }
            let row = crate::catalog::sync_caught_up(target, &snap);
            match row {
                (None, _) => raise(scope_err(
                    SqlState::UndefinedObject,
                    format!("target {target} does not exist"),
                    "poco.targets lists the targets.",
                )),
                (Some(false), _) => raise(scope_err(
                    SqlState::ObjectNotInPrerequisiteState,
                    format!("target {target} does not sync continuously"),
                    "Turn it on with poco_enable_sync(parent_id, url); for a one-off copy use poco_push and poco_wait.",
                )),
                (Some(true), Some(true)) => return true,
                _ => {}
            }
            if start.elapsed() >= timeout {
                return false;
            }
            let left = timeout
                .saturating_sub(start.elapsed())
                .min(Duration::from_millis(2));
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    left.as_millis().max(1) as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            pgrx::check_for_interrupts!();
        }
    }
}

/// `poco.record_image(record) RETURNS text`: a row's composite text form (record_out) as the
/// stream reads it back, whatever the writing session's output settings. The capture trigger
/// runs in the writer's session, and record_out spells dates, times, intervals, floats and
/// bytea by that session's DateStyle, IntervalStyle, TimeZone, extra_float_digits and
/// bytea_output; the stream reads images under fixed settings (process::pin_session), so an
/// image written under `SQL, DMY` failed to parse there and stopped every family (#24).
/// The settings are swapped for the length of the call, as plain variables (a SET or a
/// set_config per row would cost a GUC save and restore on every captured row), and put back
/// even when record_out fails. lc_monetary is not swapped (money output reads a cached
/// localeconv): a money value in an image is read as written, and no key can be money here
/// (a root key must be a built-in type of its own; see docs/sync-design.md).
///
/// Written against the fmgr interface by hand rather than with #[pg_extern]: the argument is
/// the pseudo-type `record`, which pgrx does not map, and record_out needs an FmgrInfo of its
/// own to cache its column output functions in.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_poco_record_image() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

extern "C" {
    /// utils/bytea.h (not in pgrx's bindings): 0 escape, 1 hex.
    static mut bytea_output: std::ffi::c_int;
}

thread_local! {
    static UTC: std::cell::Cell<*mut pg_sys::pg_tz> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// # Safety
/// Called by PostgreSQL's fmgr with one non-null `record` argument (the function is STRICT).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn poco_record_image(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let arg = (*fcinfo).args.as_slice(1)[0].value;
    let flinfo = (*fcinfo).flinfo;
    let mut out = (*flinfo).fn_extra as *mut pg_sys::FmgrInfo;
    if out.is_null() {
        out = pg_sys::MemoryContextAllocZero(
            (*flinfo).fn_mcxt,
            std::mem::size_of::<pg_sys::FmgrInfo>(),
        ) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(
            pg_sys::Oid::from(pg_sys::F_RECORD_OUT),
            out,
            (*flinfo).fn_mcxt,
        );
        (*flinfo).fn_extra = out.cast();
    }
    let utc = UTC.with(|u| {
        if u.get().is_null() {
            u.set(pg_sys::pg_tzset(c"UTC".as_ptr()));
        }
        u.get()
    });
    let saved = (
        pg_sys::DateStyle,
        pg_sys::DateOrder,
        pg_sys::IntervalStyle,
        pg_sys::extra_float_digits,
        bytea_output,
        pg_sys::session_timezone,
    );
    let restore = move || {
        pg_sys::DateStyle = saved.0;
        pg_sys::DateOrder = saved.1;
        pg_sys::IntervalStyle = saved.2;
        pg_sys::extra_float_digits = saved.3;
        bytea_output = saved.4;
        pg_sys::session_timezone = saved.5;
    };
    pg_sys::DateStyle = pg_sys::USE_ISO_DATES as _;
    pg_sys::DateOrder = pg_sys::DATEORDER_YMD as _;
    pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as _;
    // Above 0: the shortest text that reads back bit-exact.
    pg_sys::extra_float_digits = 1;
    bytea_output = 1;
    if !utc.is_null() {
        pg_sys::session_timezone = utc;
    }
    let text = PgTryBuilder::new(|| pg_sys::OutputFunctionCall(out, arg))
        .finally(|| restore())
        .execute();
    pg_sys::Datum::from(pg_sys::cstring_to_text(text))
}
