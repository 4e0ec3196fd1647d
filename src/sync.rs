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

    /// Block until target `target_id` has applied every change visible in `snap` (the caller's
    /// snapshot at the call); false on timeout.
    #[pg_extern(volatile, parallel_unsafe)]
    fn sync_wait(target_id: Option<i64>, snap: Option<String>, timeout_s: Option<f64>) -> bool {
        let target = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(target);
        let snap = snap.unwrap_or_default();
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
