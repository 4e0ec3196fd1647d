//! The platform's side of a job's end: poco.job and poco.events updated, the continuous
//! target's position recorded, progress notified.

use super::{Done, SLOT};
use crate::net::JobError;
use crate::{catalog, gucs, shmem};
use pgrx::prelude::*;
use poco_core::learner;
use serde_json::json;

pub(super) fn record(
    job: &catalog::JobRow,
    p: &shmem::JobSlot,
    outcome: Result<Done, JobError>,
    elapsed_ms: i64,
) {
    let base = json!({"duration_ms": elapsed_ms, "tables": p.tables_done, "rows": p.rows_done,
                      "bytes": p.bytes_done, "attempt": job.attempts});
    let mut end = catalog::JobEnd {
        job_id: job.id,
        state: "succeeded",
        retry_in_ms: 0,
        tables_total: p.tables_total,
        tables_done: p.tables_done,
        rows: p.rows_done,
        bytes: p.bytes_done,
        error: None,
        sqlstate: None,
        detail: json!({}),
        backup_schema: None,
    };
    let (kind, message);
    let err_text;
    let restore = job.kind == "restore";
    match &outcome {
        Ok(done) if restore => {
            end.backup_schema = done.backup_schema.as_deref();
            kind = "restore_succeeded";
            message = format!(
                "restored {} on target {}",
                done.backup_schema.as_deref().unwrap_or("?"),
                job.target_id.unwrap_or(0)
            );
        }
        Ok(done) => {
            end.detail = json!({"left_out": done.left_out, "duration_ms": elapsed_ms,
                                "binary_copy": done.binary_tables, "text_copy": done.text_tables});
            end.backup_schema = done.backup_schema.as_deref();
            kind = "push_succeeded";
            message = format!(
                "pushed parent {} to target {}: {} tables, {} rows, {} bytes in {} ms",
                job.parent_id,
                job.target_id.unwrap_or(0),
                p.tables_done,
                p.rows_done,
                p.bytes_done,
                elapsed_ms
            );
        }
        Err(e) => {
            err_text = match &e.hint {
                Some(h) => format!("{} (hint: {h})", e.message),
                None => e.message.clone(),
            };
            end.error = Some(&err_text);
            end.sqlstate = Some(&e.sqlstate);
            if e.is_cancel() {
                end.state = "cancelled";
                kind = "push_cancelled";
                message = format!(
                    "job {} cancelled; the learner keeps its previous data",
                    job.id
                );
            } else if e.transient && job.attempts < job.max_attempts {
                end.state = "queued";
                end.retry_in_ms = learner::backoff_ms(gucs::retry_delay_ms(), job.attempts as u32);
                kind = "push_retry";
                message = format!(
                    "job {} attempt {} of {} failed, retrying in {} ms: {}",
                    job.id, job.attempts, job.max_attempts, end.retry_in_ms, e.message
                );
            } else {
                end.state = "failed";
                kind = if restore {
                    "restore_failed"
                } else {
                    "push_failed"
                };
                message = format!(
                    "job {} failed after {} attempt(s): {}",
                    job.id, job.attempts, e.message
                );
            }
        }
    }
    catalog::finish_job(&end);
    // A continuous target follows the platform from the snapshot this push sent.
    if let (Ok(done), false) = (&outcome, restore) {
        catalog::sync_snapshot_done(job.target_id.unwrap_or(0), done.position.as_deref());
    } else if end.state == "failed" {
        catalog::sync_snapshot_failed(job.target_id.unwrap_or(0), end.error.unwrap_or(""));
    } else if end.state == "cancelled" {
        // A continuous target's snapshot ends in error whatever ended it: maintenance tries it
        // again (poco_disable_sync is how continuous sync stops).
        catalog::sync_snapshot_failed(
            job.target_id.unwrap_or(0),
            &format!("its snapshot (job {}) was cancelled; it is tried again after a back-off", job.id),
        );
    }
    let mut detail = base;
    if let Some(e) = end.error {
        detail["error"] = json!(e);
        detail["sqlstate"] = json!(end.sqlstate);
    }
    catalog::log_job_event(kind, job.id, &message, detail);
    let payload = json!({
        "job_id": job.id, "target_id": job.target_id, "state": end.state,
        "tables_total": p.tables_total, "tables_done": p.tables_done, "rows_done": p.rows_done,
        "bytes_done": p.bytes_done, "percent": if end.state == "succeeded" { 100.0 } else { 0.0 },
        "eta_s": 0,
    });
    Spi::run_with_args(
        "SELECT pg_catalog.pg_notify('poco_progress', $1)",
        &[payload.to_string().into()],
    )
    .unwrap_or_default();
    if end.state == "failed" || end.state == "queued" {
        log!("poco_sync: {message}");
    }
}

pub(super) fn shmem_totals() -> (i64, i64) {
    let slot = SLOT.with(|s| s.get());
    if slot == usize::MAX {
        return (0, 0);
    }
    shmem::with_slot(slot, |s| (s.rows_done, s.bytes_done))
}

pub(super) fn platform_identity() -> (String, String) {
    let r = Spi::get_two::<String, String>(
        "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), pg_catalog.current_database()::text",
    )
    .unwrap_or((None, None));
    (r.0.unwrap_or_default(), r.1.unwrap_or_default())
}
