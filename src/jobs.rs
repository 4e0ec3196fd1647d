//! Push jobs from SQL (API §2, §4): `poco_push` queues, `poco_wait` blocks until a job ends,
//! `poco_cancel` stops one, `poco.job_progress()` shows the live progress from shared memory.
//! The worker (src/worker.rs) starts queued jobs; each runs in its own process (src/push/).

use pgrx::prelude::*;

#[pg_schema]
pub mod poco {
    use crate::errors::{raise, OrRaise};
    use crate::{catalog, gucs, scope, shmem};
    use pgrx::prelude::*;
    use pgrx::{register_xact_callback, PgXactCallbackEvent};
    use poco_core::scope::scope_err;
    use poco_core::{PocoError, SqlState};
    use serde_json::json;
    use std::time::{Duration, Instant};

    fn need_worker_here() {
        if !shmem::preloaded() {
            raise(PocoError::NotPreloaded);
        }
        let here = Spi::get_one::<String>("SELECT pg_catalog.current_database()::text")
            .ok()
            .flatten()
            .unwrap_or_default();
        let db = gucs::database();
        if here != db {
            raise(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                format!("the poco_sync worker serves database \"{db}\", not \"{here}\": a job queued here would never run"),
                format!("Set poco.database = '{here}' in postgresql.conf and reload."),
            ));
        }
    }

    /// Queue a push of `parent_id` to each of its targets (or to `target_id` only).
    #[pg_extern(volatile, parallel_unsafe)]
    fn push(parent_id: Option<&str>, target_id: Option<i64>) -> SetOfIterator<'static, i64> {
        let parent = parent_id.unwrap_or_else(|| raise(PocoError::NullArgument("parent_id")));
        need_worker_here();
        let sc = scope::require().or_raise();
        let parent = scope::canonical_with(&sc, parent).or_raise();
        crate::authz::authorize_parent(&parent);
        let targets: Vec<i64> = match target_id {
            Some(t) => {
                crate::authz::authorize_target(t);
                let row = catalog::load_target(t).or_raise();
                if row.parent_id != parent {
                    raise(scope_err(
                        SqlState::InvalidParameterValue,
                        format!("target {t} is not a target of parent {parent}"),
                        "poco_status(parent_id) lists the parent's targets.",
                    ));
                }
                vec![t]
            }
            None => catalog::target_ids_of(&parent),
        };
        if targets.is_empty() {
            raise(scope_err(
                SqlState::UndefinedObject,
                format!("parent {parent} has no target to push to"),
                "Add one first: SELECT poco_add_target(parent_id, 'postgresql://user:password@host/db');",
            ));
        }
        let attempts = gucs::push_attempts();
        let mut ids = Vec::with_capacity(targets.len());
        for t in targets {
            let id = catalog::queue_push(&parent, t, attempts)
                .or_raise()
                .expect("RETURNING id");
            catalog::log_job_event(
                "push_queued",
                id,
                &format!("push of parent {parent} to target {t} queued as job {id}"),
                json!({}),
            );
            ids.push(id);
        }
        // The worker learns of the jobs when they commit (a rolled-back caller queued nothing).
        register_xact_callback(PgXactCallbackEvent::Commit, shmem::wake_worker);
        SetOfIterator::new(ids)
    }

    /// Queue a restore of a backup (None: the latest) on the target's learner.
    #[pg_extern(volatile, parallel_unsafe)]
    fn restore(target_id: Option<i64>, backup: Option<&str>) -> i64 {
        let t = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(t);
        need_worker_here();
        let row = catalog::load_target(t).or_raise();
        if let Some(b) = backup {
            if !b.starts_with("poco_backup_")
                || !b
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                raise(scope_err(
                    SqlState::InvalidParameterValue,
                    format!("\"{b}\" is not a poco_sync backup name"),
                    "Backups are schemas named poco_backup_<time>_<job> on the learner; poco.jobs.backup_schema names them.",
                ));
            }
        }
        // A continuous target's learner holds the copy at its stream's position: a backup from
        // another position under it would take batches meant for that position (#24).
        if catalog::continuous_for_update(t) {
            raise(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                format!("target {t} syncs continuously: a restored backup would not match its stream's position"),
                "Turn continuous sync off first (SELECT poco_disable_sync(parent_id)), restore, and turn it on again \
                 with SELECT poco_enable_sync(target_id), which takes a new snapshot.",
            ));
        }
        let id = catalog::queue_restore(&row.parent_id, t, gucs::push_attempts(), backup)
            .or_raise()
            .expect("RETURNING id");
        catalog::log_job_event(
            "restore_queued",
            id,
            &format!(
                "restore of {} on target {t} queued as job {id}",
                backup.unwrap_or("the latest backup")
            ),
            json!({}),
        );
        register_xact_callback(PgXactCallbackEvent::Commit, shmem::wake_worker);
        id
    }

    const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

    /// Block until the job ends; its final state, or 'timeout'.
    #[pg_extern(volatile, parallel_unsafe)]
    fn wait(job_id: Option<i64>, timeout_s: Option<f64>) -> String {
        let job = job_id.unwrap_or_else(|| raise(PocoError::NullArgument("job_id")));
        crate::authz::authorize_job(job);
        let timeout =
            Duration::from_secs_f64(timeout_s.unwrap_or(300.0).clamp(0.0, 86_400.0 * 365.0));
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            raise(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                "poco_wait cannot see the job advance inside a REPEATABLE READ or SERIALIZABLE transaction",
                "Call poco_wait in a READ COMMITTED transaction (the default).",
            ));
        }
        let start = Instant::now();
        loop {
            let (state, mine) = catalog::job_state(job).unwrap_or_else(|| {
                raise(scope_err(
                    SqlState::UndefinedObject,
                    format!("job {job} does not exist"),
                    "poco.jobs lists the jobs.",
                ))
            });
            if FINAL.contains(&state.as_str()) {
                return state;
            }
            if mine {
                raise(scope_err(
                    SqlState::ObjectNotInPrerequisiteState,
                    format!("job {job} was queued by this transaction, so no worker can start it before it commits"),
                    "Commit after poco_push, then call poco_wait.",
                ));
            }
            if start.elapsed() >= timeout {
                return "timeout".into();
            }
            let left = timeout
                .saturating_sub(start.elapsed())
                .min(Duration::from_millis(20));
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

    /// Cancel a queued or running job; true when there was something to cancel.
    #[pg_extern(volatile, parallel_unsafe)]
    fn cancel(job_id: Option<i64>) -> bool {
        let job = job_id.unwrap_or_else(|| raise(PocoError::NullArgument("job_id")));
        crate::authz::authorize_job(job);
        let (state, _) = catalog::job_state(job).unwrap_or_else(|| {
            raise(scope_err(
                SqlState::UndefinedObject,
                format!("job {job} does not exist"),
                "poco.jobs lists the jobs.",
            ))
        });
        match state.as_str() {
            "queued" => {
                let done = catalog::cancel_queued(job);
                if done {
                    catalog::log_job_event(
                        "push_cancelled",
                        job,
                        &format!("job {job} cancelled before it started"),
                        json!({}),
                    );
                    return true;
                }
                // It started meanwhile: cancel it running.
                cancel_running(job)
            }
            "running" => cancel_running(job),
            _ => false,
        }
    }

    fn cancel_running(job: i64) -> bool {
        if !shmem::preloaded() {
            return false;
        }
        match shmem::slot_of(job) {
            Some((i, _)) => {
                shmem::with_slot(i, |s| s.cancel = true);
                true
            }
            None => false,
        }
    }

    /// Live progress of running jobs (shared memory). Empty without the preloaded library.
    /// A role restricted by poco_grant_parent sees its own parents' jobs only.
    #[pg_extern(volatile, parallel_safe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn job_progress() -> TableIterator<
        'static,
        (
            name!(job_id, i64),
            name!(pid, i32),
            name!(tables_total, i32),
            name!(tables_done, i32),
            name!(rows_done, i64),
            name!(bytes_done, i64),
            name!(current_table, Option<String>),
            name!(cancelling, bool),
        ),
    > {
        let slots = if shmem::preloaded() {
            shmem::snapshot().slots.to_vec()
        } else {
            vec![]
        };
        let mut slots: Vec<_> = slots.into_iter().filter(|s| s.job_id != 0).collect();
        if let Some(own) = crate::authz::restricted_to() {
            let ids: Vec<i64> = slots.iter().map(|s| s.job_id).collect();
            let visible = catalog::jobs_of_parents(&ids, &own);
            slots.retain(|s| visible.contains(&s.job_id));
        }
        TableIterator::new(slots.into_iter().map(|s| {
            (
                s.job_id,
                s.pid,
                s.tables_total,
                s.tables_done,
                s.rows_done,
                s.bytes_done,
                s.current_table(),
                s.cancel,
            )
        }))
    }
}
