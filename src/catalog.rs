//! The SPI boundary: every query against poco's catalog tables lives here and returns owned
//! Rust values. Nothing outside this module builds SQL against the catalog.

use crate::errors::OrRaise;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;
use poco_core::target::TargetSpec;
use poco_core::{PocoError, Result};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct TargetRow {
    pub id: i64,
    pub parent_id: String,
    pub spec: TargetSpec,
    pub secret: Option<Vec<u8>>,
}

const TARGET_COLUMNS: &str = "id, parent_id, host, port, dbname, username, sslmode, params, secret";

fn row_to_target(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<TargetRow> {
    let get_s = |i: usize| -> String { row.get::<String>(i).ok().flatten().unwrap_or_default() };
    let params: BTreeMap<String, String> = row
        .get::<JsonB>(8)
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_value(j.0).ok())
        .unwrap_or_default();
    let spec = TargetSpec::from_stored(
        &get_s(3),
        row.get::<i32>(4).ok().flatten().unwrap_or(0),
        &get_s(5),
        &get_s(6),
        &get_s(7),
        params,
    )?;
    Ok(TargetRow {
        id: row.get::<i64>(1).ok().flatten().unwrap_or(0),
        parent_id: get_s(2),
        spec,
        secret: row.get::<Vec<u8>>(9).ok().flatten(),
    })
}

fn select_targets(where_clause: &str, args: &[DatumWithOid]) -> Result<Vec<TargetRow>> {
    let q = format!("SELECT {TARGET_COLUMNS} FROM poco.target {where_clause} ORDER BY id");
    Spi::connect(|client| {
        let table = client.select(q.as_str(), None, args).or_raise();
        table.map(|row| row_to_target(&row)).collect()
    })
}

pub fn load_target(id: i64) -> Result<TargetRow> {
    select_targets("WHERE id = $1", &[id.into()])?
        .pop()
        .ok_or(PocoError::NoSuchTarget(id))
}

/// Lock and load every target (for key rotation).
pub fn all_targets_for_update() -> Result<Vec<TargetRow>> {
    Spi::run("LOCK TABLE poco.target IN SHARE ROW EXCLUSIVE MODE").or_raise();
    select_targets("", &[])
}

pub fn next_target_id() -> i64 {
    Spi::get_one::<i64>("SELECT nextval('poco.target_id_seq')")
        .or_raise()
        .expect("nextval")
}

/// The first column of the first row, or None when there is no row (Spi::get_one errors then).
fn first_value<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect_mut(|client| {
        let mut table = client.update(query, Some(1), args).or_raise();
        table.next().and_then(|row| row.get::<T>(1).ok().flatten())
    })
}

/// A target of this parent that already points at the same server, database and user.
pub fn find_same_destination(parent_id: &str, spec: &TargetSpec) -> Option<i64> {
    first_value::<i64>(
        "SELECT id FROM poco.target WHERE parent_id = $1 AND host = $2 AND port = $3 \
         AND dbname = $4 AND username = $5 ORDER BY id LIMIT 1 FOR UPDATE",
        &[
            parent_id.into(),
            spec.host.as_string().into(),
            (spec.port as i32).into(),
            spec.dbname.clone().into(),
            spec.user.clone().into(),
        ],
    )
}

pub struct NewTarget<'a> {
    pub id: i64,
    pub parent_id: &'a str,
    pub label: Option<&'a str>,
    pub spec: &'a TargetSpec,
    pub secret: Option<Vec<u8>>,
    pub key_id: String,
}

fn params_json(spec: &TargetSpec) -> JsonB {
    JsonB(serde_json::to_value(&spec.params).expect("params are strings"))
}

/// Write a target: a new row, or the existing row with this id (same destination stored
/// again: new credentials, options and label, same id, since the id is sealed into the AAD).
pub fn upsert_target(t: &NewTarget) {
    Spi::run_with_args(
        "INSERT INTO poco.target (id, parent_id, label, host, port, dbname, username, sslmode, \
         params, url_redacted, secret, key_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
         ON CONFLICT (id) DO UPDATE SET label = coalesce(EXCLUDED.label, poco.target.label), \
         sslmode = EXCLUDED.sslmode, params = EXCLUDED.params, url_redacted = EXCLUDED.url_redacted, \
         secret = EXCLUDED.secret, key_id = EXCLUDED.key_id, updated_at = now()",
        &[
            t.id.into(),
            t.parent_id.into(),
            t.label.into(),
            t.spec.host.as_string().into(),
            (t.spec.port as i32).into(),
            t.spec.dbname.clone().into(),
            t.spec.user.clone().into(),
            t.spec.sslmode.as_str().into(),
            params_json(t.spec).into(),
            t.spec.redacted_url().into(),
            t.secret.clone().into(),
            t.key_id.clone().into(),
        ],
    )
    .or_raise();
}

pub fn set_secret(id: i64, secret: Option<Vec<u8>>, key_id: &str) {
    Spi::run_with_args(
        "UPDATE poco.target SET secret = $2, key_id = $3, updated_at = now() WHERE id = $1",
        &[id.into(), secret.into(), key_id.into()],
    )
    .or_raise();
}

/// Delete a target; returns (parent id, redacted URL) of what was deleted.
pub fn delete_target(id: i64) -> Result<(String, String)> {
    Spi::connect_mut(|client| {
        let mut table = client
            .update(
                "DELETE FROM poco.target WHERE id = $1 RETURNING parent_id, url_redacted",
                None,
                &[id.into()],
            )
            .or_raise();
        let row = table.next().ok_or(PocoError::NoSuchTarget(id))?;
        let get = |i| row.get::<String>(i).ok().flatten().unwrap_or_default();
        Ok((get(1), get(2)))
    })
}

/// Append to the audit log `poco.events`.
pub fn log_event(
    kind: &str,
    parent_id: Option<&str>,
    target_id: Option<i64>,
    message: &str,
    detail: serde_json::Value,
) {
    Spi::run_with_args(
        "INSERT INTO poco.events (kind, parent_id, target_id, message, detail) VALUES ($1,$2,$3,$4,$5)",
        &[kind.into(), parent_id.into(), target_id.into(), message.into(), JsonB(detail).into()],
    )
    .or_raise();
}

// ---- Jobs (poco.job). See src/jobs.rs (SQL functions) and src/worker.rs, src/push.rs.

pub fn target_ids_of(parent_id: &str) -> Vec<i64> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT id FROM poco.target WHERE parent_id = $1 ORDER BY id",
                None,
                &[parent_id.into()],
            )
            .or_raise()
            .filter_map(|r| r.get::<i64>(1).ok().flatten())
            .collect()
    })
}

/// Append a job's event: the actor is whoever asked for the job, also when the worker logs.
pub fn log_job_event(kind: &str, job_id: i64, message: &str, detail: serde_json::Value) {
    Spi::run_with_args(
        "INSERT INTO poco.events (kind, parent_id, target_id, job_id, actor, message, detail) \
         SELECT $1, j.parent_id, j.target_id, j.id, j.requested_by, $3, $4 FROM poco.job j WHERE j.id = $2",
        &[kind.into(), job_id.into(), message.into(), JsonB(detail).into()],
    )
    .or_raise();
}

/// (state, queued by the current transaction) of a job, read with a fresh snapshot.
pub fn job_state(job_id: i64) -> Option<(String, bool)> {
    Spi::connect_mut(|client| {
        let mut t = client
            .update(
                "SELECT state, xmin::text::bigint FROM poco.job WHERE id = $1",
                Some(1),
                &[job_id.into()],
            )
            .or_raise();
        t.next().map(|r| {
            let state = r.get::<String>(1).ok().flatten().unwrap_or_default();
            let xmin = r.get::<i64>(2).ok().flatten().unwrap_or(0) as u32;
            let mine = unsafe {
                pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin))
            };
            (state, mine)
        })
    })
}

pub fn cancel_queued(job_id: i64) -> bool {
    first_value::<i64>(
        "UPDATE poco.job SET state = 'cancelled', finished_at = now(), \
         error = 'cancelled by ' || session_user || ' before it started' \
         WHERE id = $1 AND state = 'queued' RETURNING id",
        &[job_id.into()],
    )
    .is_some()
}

/// What a job worker needs to start.
pub struct JobRow {
    pub id: i64,
    pub parent_id: String,
    pub target_id: Option<i64>,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    /// rows of the last successful push to the same target (for the progress estimate)
    pub rows_expected: Option<i64>,
    /// 'push' or 'restore'
    pub kind: String,
    /// previous copies the target keeps on the learner
    pub backups: i32,
    /// restore: the backup schema asked for (None: the latest)
    pub backup_name: Option<String>,
}

pub fn load_job(job_id: i64) -> Option<JobRow> {
    Spi::connect(|client| {
        let mut t = client
            .select(
                "SELECT j.id, j.parent_id, j.target_id, j.state, j.attempts, j.max_attempts, \
                        (SELECT p.rows_done FROM poco.job p WHERE p.target_id = j.target_id AND p.kind = 'push' \
                          AND p.state = 'succeeded' ORDER BY p.id DESC LIMIT 1), \
                        j.kind, COALESCE(t.backups, 0), j.detail->>'backup' \
                   FROM poco.job j LEFT JOIN poco.target t ON t.id = j.target_id WHERE j.id = $1",
                Some(1),
                &[job_id.into()],
            )
            .or_raise();
        t.next().map(|r| JobRow {
            id: r.get::<i64>(1).ok().flatten().unwrap_or(0),
            parent_id: r.get::<String>(2).ok().flatten().unwrap_or_default(),
            target_id: r.get::<i64>(3).ok().flatten(),
            state: r.get::<String>(4).ok().flatten().unwrap_or_default(),
            attempts: r.get::<i32>(5).ok().flatten().unwrap_or(0),
            max_attempts: r.get::<i32>(6).ok().flatten().unwrap_or(1),
            rows_expected: r.get::<i64>(7).ok().flatten(),
            kind: r
                .get::<String>(8)
                .ok()
                .flatten()
                .unwrap_or_else(|| "push".into()),
            backups: r.get::<i32>(9).ok().flatten().unwrap_or(0),
            backup_name: r.get::<String>(10).ok().flatten(),
        })
    })
}

/// Jobs left 'running' whose process is gone (the server restarted, or a job worker died):
/// they end as failed. `live` are the jobs that do have a process. A continuous target whose
/// snapshot it was shows the error, so that its stream takes the snapshot again (as after a
/// snapshot that failed by itself).
pub fn fail_orphans(live: &[i64], why: &str) -> Vec<i64> {
    Spi::connect_mut(|client| {
        client
            .update(
                "WITH f AS (UPDATE poco.job SET state = 'failed', finished_at = now(), error = $2, error_sqlstate = '57P01' \
                             WHERE state = 'running' AND id <> ALL($1) RETURNING id, target_id), \
                      t AS (UPDATE poco.target SET sync_state = 'error', last_sync_error = $2 \
                             WHERE continuous AND id IN (SELECT target_id FROM f)) \
                 SELECT id FROM f",
                None,
                &[live.to_vec().into(), why.into()],
            )
            .or_raise()
            .filter_map(|r| r.get::<i64>(1).ok().flatten())
            .collect()
    })
}

/// Claim up to `n` queued jobs whose time has come, one per target at a time: they become
/// 'running' (attempts + 1). Returns their ids.
pub fn claim_jobs(n: usize) -> Vec<i64> {
    if n == 0 {
        return vec![];
    }
    Spi::connect_mut(|client| {
        client
            .update(
                "WITH c AS (
                   SELECT j.id FROM poco.job j
                    WHERE j.state = 'queued' AND j.next_attempt_at <= now()
                      AND NOT EXISTS (SELECT 1 FROM poco.job r WHERE r.state = 'running' AND r.target_id = j.target_id)
                      AND j.id = (SELECT min(q.id) FROM poco.job q WHERE q.state = 'queued' AND q.target_id IS NOT DISTINCT FROM j.target_id)
                    ORDER BY j.next_attempt_at, j.id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 UPDATE poco.job j SET state = 'running', attempts = j.attempts + 1,
                        started_at = now(), finished_at = NULL, tables_done = 0, rows_done = 0, bytes_done = 0
                   FROM c WHERE j.id = c.id RETURNING j.id",
                None,
                &[(n as i64).into()],
            )
            .or_raise()
            .filter_map(|r| r.get::<i64>(1).ok().flatten())
            .collect()
    })
}

/// Put a claimed job back in the queue (no process could be started for it).
pub fn requeue(job_id: i64, delay_ms: u64, why: &str) {
    Spi::run_with_args(
        "UPDATE poco.job SET state = 'queued', attempts = greatest(attempts - 1, 0), \
         next_attempt_at = now() + $2 * interval '1 millisecond', error = $3 WHERE id = $1 AND state = 'running'",
        &[job_id.into(), (delay_ms as i64).into(), why.into()],
    )
    .or_raise();
}

/// Copy a running job's progress into its row and tell listeners (`NOTIFY poco_progress`).
pub fn publish_progress(s: &crate::shmem::JobSlot, payload: &serde_json::Value) {
    Spi::run_with_args(
        "UPDATE poco.job SET tables_total = $2, tables_done = $3, rows_done = $4, bytes_done = $5, \
         current_table = $6 WHERE id = $1 AND state = 'running'",
        &[
            s.job_id.into(),
            s.tables_total.into(),
            s.tables_done.into(),
            s.rows_done.into(),
            s.bytes_done.into(),
            s.current_table().into(),
        ],
    )
    .or_raise();
    Spi::run_with_args(
        "SELECT pg_catalog.pg_notify('poco_progress', $1)",
        &[payload.to_string().into()],
    )
    .or_raise();
}

/// A job's end: its final row (or back to the queue for a retry), its event, its last NOTIFY.
pub struct JobEnd<'a> {
    pub job_id: i64,
    /// 'succeeded', 'failed', 'cancelled', or 'queued' (retry after `retry_in_ms`)
    pub state: &'a str,
    pub retry_in_ms: u64,
    pub tables_total: i32,
    pub tables_done: i32,
    pub rows: i64,
    pub bytes: i64,
    pub error: Option<&'a str>,
    pub sqlstate: Option<&'a str>,
    pub detail: serde_json::Value,
    pub backup_schema: Option<&'a str>,
}

pub fn finish_job(e: &JobEnd) {
    Spi::run_with_args(
        "UPDATE poco.job SET state = $2, backup_schema = COALESCE($11, backup_schema), \
                finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END, \
                next_attempt_at = now() + $3 * interval '1 millisecond', \
                tables_total = $4, tables_done = $5, rows_done = $6, bytes_done = $7, \
                current_table = NULL, error = pg_catalog.left($8, 4000), error_sqlstate = $9, detail = detail || $10 \
          WHERE id = $1",
        &[
            e.job_id.into(),
            e.state.into(),
            (e.retry_in_ms as i64).into(),
            e.tables_total.into(),
            e.tables_done.into(),
            e.rows.into(),
            e.bytes.into(),
            e.error.into(),
            e.sqlstate.into(),
            JsonB(e.detail.clone()).into(),
            e.backup_schema.into(),
        ],
    )
    .or_raise();
}

/// A push succeeded: a continuous target now streams from the push's snapshot.
pub fn sync_snapshot_done(target_id: i64, position: Option<&str>) {
    Spi::run_with_args(
        "UPDATE poco.target SET sync_position = $2::pg_catalog.pg_snapshot, learner_position = $2::pg_catalog.pg_snapshot, \
                last_snapshot_at = pg_catalog.now(), sync_position_at = pg_catalog.now(), \
                sync_state = CASE WHEN NOT continuous THEN 'off' \
                                  WHEN EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = $1 AND j.state = 'queued') THEN 'resnapshot' \
                                  ELSE 'streaming' END, \
                sync_lag = 0, last_sync_error = NULL \
          WHERE id = $1 AND $2 IS NOT NULL",
        &[target_id.into(), position.into()],
    )
    .or_raise();
}

/// A push failed for good: a continuous target shows the error (the worker tries again later).
pub fn sync_snapshot_failed(target_id: i64, error: &str) {
    Spi::run_with_args(
        "UPDATE poco.target SET sync_state = 'error', last_sync_error = pg_catalog.left($2, 4000) WHERE id = $1 AND continuous",
        &[target_id.into(), error.into()],
    )
    .or_raise();
}
