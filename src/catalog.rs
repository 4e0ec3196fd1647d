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

/// Whether the target syncs continuously, its row locked against poco_enable_sync until the
/// caller's transaction ends.
pub fn continuous_for_update(id: i64) -> bool {
    first_value::<bool>(
        "SELECT continuous FROM poco.target WHERE id = $1 FOR UPDATE",
        &[id.into()],
    )
    .unwrap_or(false)
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

// ---- Jobs (poco.job). See src/jobs.rs (SQL functions) and src/worker.rs, src/push/.

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

/// Claim up to `n` queued jobs whose time has come, one per target at a time and at most
/// `per_parent` running per parent: they become 'running' (attempts + 1). Parents with fewer
/// running jobs go first, so one parent's slow learners never take every slot while others
/// wait. Returns their ids.
pub fn claim_jobs(n: usize, per_parent: usize) -> Vec<i64> {
    if n == 0 {
        return vec![];
    }
    Spi::connect_mut(|client| {
        client
            .update(
                "WITH ready AS (
                   SELECT j.id, j.parent_id, j.next_attempt_at,
                          (SELECT count(*) FROM poco.job r WHERE r.state = 'running' AND r.parent_id = j.parent_id) AS running,
                          row_number() OVER (PARTITION BY j.parent_id ORDER BY j.next_attempt_at, j.id) AS nth
                     FROM poco.job j
                    WHERE j.state = 'queued' AND j.next_attempt_at <= now()
                      AND NOT EXISTS (SELECT 1 FROM poco.job r WHERE r.state = 'running' AND r.target_id = j.target_id)
                      AND j.id = (SELECT min(q.id) FROM poco.job q WHERE q.state = 'queued' AND q.target_id IS NOT DISTINCT FROM j.target_id)),
                 c AS (
                   SELECT j.id FROM poco.job j JOIN ready USING (id)
                    WHERE ready.running + ready.nth <= $2
                    ORDER BY ready.running + ready.nth, ready.next_attempt_at, j.id LIMIT $1 FOR UPDATE OF j SKIP LOCKED)
                 UPDATE poco.job j SET state = 'running', attempts = j.attempts + 1,
                        started_at = now(), finished_at = NULL, tables_done = 0, rows_done = 0, bytes_done = 0
                   FROM c WHERE j.id = c.id RETURNING j.id",
                None,
                &[(n as i64).into(), (per_parent as i64).into()],
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

/// Which of these jobs belong to one of these parents.
pub fn jobs_of_parents(ids: &[i64], parents: &[String]) -> Vec<i64> {
    if ids.is_empty() {
        return vec![];
    }
    Spi::connect(|c| {
        c.select(
            "SELECT id FROM poco.job WHERE id = ANY($1) AND parent_id = ANY($2)",
            None,
            &[ids.to_vec().into(), parents.to_vec().into()],
        )
        .map(|rows| {
            rows.filter_map(|r| r.get::<i64>(1).ok().flatten())
                .collect()
        })
        .or_raise()
    })
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
                                  WHEN EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = $1 AND j.kind = 'push' AND j.state = 'queued') THEN 'resnapshot' \
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

// ---- Continuous sync: the targets a stream serves, their positions and errors, re-snapshots,
// the change log's pruning and the capture's health. Statements run by the stream processes
// (src/stream/), the worker and poco_sync_wait.

/// A continuous target as a stream pass starts it.
pub struct StreamingRow {
    pub id: i64,
    pub parent_id: String,
    /// `sync_position` as text
    pub position: String,
    /// `learner_position` as text ('' when unknown)
    pub learner_position: String,
}

/// The streaming targets of stream `part` of `parts` (id modulo parts) with no push queued
/// or running, by id.
pub fn streaming_targets(part: i64, parts: i64) -> Vec<StreamingRow> {
    Spi::connect(|c| {
        c.select(
            "SELECT t.id, t.parent_id, t.sync_position::text, coalesce(t.learner_position::text, '') FROM poco.target t \
              WHERE t.continuous AND t.sync_state = 'streaming' AND t.sync_position IS NOT NULL \
                AND t.id % $2 = $1 \
                AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) \
              ORDER BY t.id",
            None,
            &[part.into(), parts.into()],
        )
        .map(|rows| {
            rows.map(|r| StreamingRow {
                id: r.get::<i64>(1).ok().flatten().unwrap_or(0),
                parent_id: r.get::<String>(2).ok().flatten().unwrap_or_default(),
                position: r.get::<String>(3).ok().flatten().unwrap_or_default(),
                learner_position: r.get::<String>(4).ok().flatten().unwrap_or_default(),
            })
            .collect()
        })
        .unwrap_or_default()
    })
}

/// poco.scope_generation: bumped with every scope or schema change.
pub fn scope_generation() -> std::result::Result<i64, pgrx::spi::Error> {
    Ok(Spi::get_one::<i64>("SELECT n FROM poco.scope_generation")?.unwrap_or(0))
}

/// Whether any target syncs continuously.
pub fn any_continuous() -> bool {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM poco.target WHERE continuous)")
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Move streaming targets, each (id, from, to), to position `to`, only if still at `from` (a
/// push may have moved them meanwhile). `applied`: a batch reached the learner, which is now
/// at `to` too.
pub fn move_positions(moved: &[(i64, String, String)], applied: bool) {
    if moved.is_empty() {
        return;
    }
    // A pass that failed as a whole said so on every target: moving again, it is over.
    let learner = if applied {
        "learner_position = m.to_position::pg_catalog.pg_snapshot, last_applied_at = pg_catalog.now(), last_sync_error = NULL,".to_string()
    } else {
        format!(
            "last_sync_error = CASE WHEN pg_catalog.starts_with(t.last_sync_error, {}) THEN NULL ELSE t.last_sync_error END,",
            poco_core::learner::literal(crate::stream::PASS_FAILED)
        )
    };
    let ids: Vec<i64> = moved.iter().map(|m| m.0).collect();
    let from: Vec<String> = moved.iter().map(|m| m.1.clone()).collect();
    let to: Vec<String> = moved.iter().map(|m| m.2.clone()).collect();
    Spi::run_with_args(
        &format!(
            "UPDATE poco.target t SET sync_position = m.to_position::pg_catalog.pg_snapshot, {learner} \
                    sync_position_at = pg_catalog.now(), sync_lag = 0 \
               FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::text[])) \
                    AS m(id, from_position, to_position) \
              WHERE t.id = m.id AND t.sync_state = 'streaming' AND t.sync_position::text = m.from_position"
        ),
        &[ids.into(), from.into(), to.into()],
    )
    .ok();
}

/// The stream's pass failed as a whole: said on each streaming target of stream `part` of
/// `parts` (cleared when the target moves again, `move_positions`).
pub fn note_pass_error(part: i64, parts: i64, error: &str) {
    Spi::run_with_args(
        "UPDATE poco.target SET last_sync_error = pg_catalog.left($3, 4000) \
          WHERE continuous AND sync_state = 'streaming' AND id % $2 = $1",
        &[part.into(), parts.into(), error.into()],
    )
    .ok();
}

/// Continuous targets of stream `part` of `parts` left in `snapshot` or `resnapshot` with no
/// job queued or running (the job was cancelled before it started, or ended without a
/// position): put in `error` with the reason, which maintenance retries. Their ids.
pub fn orphaned_snapshots_to_error(part: i64, parts: i64) -> Vec<i64> {
    Spi::connect_mut(|c| {
        c.update(
            "UPDATE poco.target t SET sync_state = 'error', last_sync_error = pg_catalog.left( \
                    'its snapshot ended without success (' || coalesce((SELECT 'job ' || j.id || ': ' || j.state || coalesce(': ' || j.error, '') \
                       FROM poco.job j WHERE j.target_id = t.id ORDER BY j.id DESC LIMIT 1), 'no job') || \
                    '); it is tried again after a back-off', 4000) \
              WHERE t.continuous AND t.sync_state IN ('snapshot', 'resnapshot') AND t.id % $2 = $1 \
                AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) \
             RETURNING t.id, t.parent_id, t.last_sync_error",
            None,
            &[part.into(), parts.into()],
        )
        .map(|rows| {
            rows.filter_map(|r| {
                let id = r.get::<i64>(1).ok().flatten()?;
                let parent = r.get::<String>(2).ok().flatten();
                let why = r.get::<String>(3).ok().flatten().unwrap_or_default();
                Some((id, parent, why))
            })
            .collect::<Vec<_>>()
        })
        .unwrap_or_default()
    })
    .into_iter()
    .map(|(id, parent, why)| {
        log_event("sync_error", parent.as_deref(), Some(id), &why, serde_json::json!({}));
        id
    })
    .collect()
}

/// A batch for the target failed: its error (cut) and, when known (>= 0), its backlog.
pub fn note_sync_error(target_id: i64, error: &str, changes: i64) {
    Spi::run_with_args(
        "UPDATE poco.target SET last_sync_error = pg_catalog.left($2, 4000), sync_lag = CASE WHEN $3 < 0 THEN sync_lag ELSE $3 END WHERE id = $1",
        &[target_id.into(), error.into(), changes.into()],
    )
    .ok();
}

/// Changes every continuous target has (or will not need: below the position of a target
/// waiting for a snapshot) are no longer needed. A target in `error` with no job holds
/// nothing back: it starts over from a new snapshot, and poco.resnapshot then sets its
/// position to the current snapshot, a floor below that snapshot's. With no target to hold
/// them, changes below the current snapshot's xmin go (any snapshot to come sees them).
pub fn prune_changes() {
    Spi::run(
        "DELETE FROM poco.change WHERE txid < coalesce( \
           (SELECT pg_catalog.min(pg_catalog.pg_snapshot_xmin(t.sync_position)::text::bigint) \
              FROM poco.target t WHERE t.continuous AND t.sync_position IS NOT NULL \
               AND (t.sync_state <> 'error' \
                    OR EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')))), \
           pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint)",
    )
    .ok();
}

/// Start a target over with a full snapshot, its push queued to start in `delay_s` seconds
/// (poco.resnapshot: state, event, the push job).
pub fn resnapshot(
    target_id: i64,
    why: &str,
    delay_s: u64,
) -> std::result::Result<(), pgrx::spi::Error> {
    Spi::run_with_args(
        "SELECT poco.resnapshot($1, $2, pg_catalog.make_interval(secs => $3))",
        &[target_id.into(), why.into(), (delay_s as f64).into()],
    )
}

/// A continuous target as maintenance sees it.
pub struct MaintainedRow {
    pub id: i64,
    pub state: String,
    /// seconds since its position last moved
    pub behind_s: f64,
    pub position: String,
}

/// The streaming or failed continuous targets of stream `part` of `parts` with no push
/// queued or running, by id.
pub fn maintained_targets(part: i64, parts: i64) -> Vec<MaintainedRow> {
    Spi::connect(|c| {
        c.select(
            "SELECT t.id, t.sync_state, extract(epoch FROM pg_catalog.now() - coalesce(t.sync_position_at, pg_catalog.now()))::float8, \
                    coalesce(t.sync_position::text, '') \
               FROM poco.target t \
              WHERE t.continuous AND t.sync_state IN ('streaming', 'error') AND t.id % $2 = $1 \
                AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) \
              ORDER BY t.id",
            None,
            &[part.into(), parts.into()],
        )
        .map(|rows| {
            rows.map(|r| MaintainedRow {
                id: r.get::<i64>(1).ok().flatten().unwrap_or(0),
                state: r.get::<String>(2).ok().flatten().unwrap_or_default(),
                behind_s: r.get::<f64>(3).ok().flatten().unwrap_or(0.0),
                position: r.get::<String>(4).ok().flatten().unwrap_or_default(),
            })
            .collect()
        })
        .unwrap_or_default()
    })
}

/// How many logged changes a target at `position` has not seen, counted up to `limit`.
pub fn backlog(position: &str, limit: i64) -> i64 {
    Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM (SELECT 1 FROM poco.change \
          WHERE txid >= pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)::text::bigint \
            AND NOT pg_catalog.pg_visible_in_snapshot(txid::text::pg_catalog.xid8, $1::pg_catalog.pg_snapshot) LIMIT $2) x",
        &[position.into(), limit.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// What is wrong with the capture triggers (poco.capture_fault()), if anything.
pub fn capture_fault() -> Option<String> {
    Spi::get_one::<String>("SELECT poco.capture_fault()")
        .ok()
        .flatten()
}

/// Put the capture right, re-snapshot every continuous target and say why in poco.events.
pub fn repair_capture(why: &str, fault: &str) -> std::result::Result<(), pgrx::spi::Error> {
    Spi::run_with_args(
        "SELECT poco.refresh_capture(), poco.resnapshot_all($1)",
        &[why.into()],
    )?;
    Spi::run_with_args(
        "INSERT INTO poco.events (kind, message, detail) \
         VALUES ('capture_repaired', $1, pg_catalog.jsonb_build_object('fault', $2::text))",
        &[why.into(), fault.into()],
    )
}

/// For poco_sync_wait: (continuous, caught up with snapshot `snap` and no push pending), or
/// None when the target does not exist.
pub fn sync_caught_up(target_id: i64, snap: &str) -> (Option<bool>, Option<bool>) {
    Spi::get_two_with_args::<bool, bool>(
        "SELECT continuous, sync_state = 'streaming' AND poco.snapshot_covers(sync_position, $2::pg_catalog.pg_snapshot) \
                AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = $1 AND j.state IN ('queued', 'running')) \
           FROM poco.target WHERE id = $1",
        &[target_id.into(), snap.into()],
    )
    .unwrap_or((None, None))
}

/// Queue a push of the parent to the target; returns the job's id.
pub fn queue_push(
    parent_id: &str,
    target_id: i64,
    max_attempts: i32,
) -> std::result::Result<Option<i64>, pgrx::spi::Error> {
    Spi::get_one_with_args::<i64>(
        "INSERT INTO poco.job (parent_id, target_id, max_attempts) VALUES ($1, $2, $3) RETURNING id",
        &[parent_id.into(), target_id.into(), max_attempts.into()],
    )
}

/// Queue a restore of a backup (None: the latest) on the target's learner; returns the job's id.
pub fn queue_restore(
    parent_id: &str,
    target_id: i64,
    max_attempts: i32,
    backup: Option<&str>,
) -> std::result::Result<Option<i64>, pgrx::spi::Error> {
    Spi::get_one_with_args::<i64>(
        "INSERT INTO poco.job (kind, parent_id, target_id, max_attempts, detail) \
         VALUES ('restore', $1, $2, $3, jsonb_strip_nulls(jsonb_build_object('backup', $4::text))) RETURNING id",
        &[parent_id.into(), target_id.into(), max_attempts.into(), backup.into()],
    )
}
