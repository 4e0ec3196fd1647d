//! Positions: snapshots as positions, what a pass records, pruning and maintenance.

use super::*;
use crate::catalog;

/// A position (`pg_snapshot` as text, `xmin:xmax:xip,…`), to tell which changes it has seen.
pub(super) struct Snap {
    pub(super) xmin: u64,
    pub(super) xmax: u64,
    pub(super) xip: Vec<u64>,
}

impl Snap {
    pub(super) fn parse(text: &str) -> Option<Snap> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut xip: Vec<u64> = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        xip.sort_unstable();
        Some(Snap { xmin, xmax, xip })
    }
    /// Whether the transaction's changes are visible in (were taken into) this position:
    /// `pg_visible_in_snapshot`.
    pub(super) fn visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }
}

/// Record the pass on the platform, and prune what every target has.
pub(super) fn record(st: &mut State, s: &str, results: &[(Target, Outcome)]) {
    // Targets with nothing to send reached S: noted here, recorded later (State::ahead).
    for (t, o) in results {
        match o {
            Outcome::Advanced => {
                st.retry_at.remove(&t.id);
                st.broken.remove(&t.id);
                st.ahead.insert(t.id, (t.recorded.clone(), s.to_string()));
            }
            Outcome::Applied { .. } => {
                st.retry_at.remove(&t.id);
                st.broken.remove(&t.id);
                st.ahead.remove(&t.id);
            }
            _ => {}
        }
    }
    let waited = crate::shmem::snapshot().sync_wait_at;
    let someone_waits = waited != 0 && crate::shmem::now() - waited < 2_000_000;
    let flush = someone_waits
        || st
            .recorded_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
    // Targets moved to S (applied) or to where they reached (nothing to send), in one
    // statement per kind: only if they are still where this pass found them (a push may have
    // moved them meanwhile).
    let applied: Vec<(i64, String, String)> = results
        .iter()
        .filter_map(|(t, o)| match o {
            Outcome::Applied { at, .. } => Some((t.id, t.recorded.clone(), at.clone())),
            _ => None,
        })
        .collect();
    let reached: Vec<(i64, String, String)> = if flush {
        st.recorded_at = Some(Instant::now());
        st.ahead
            .drain()
            .map(|(id, (recorded, reached))| (id, recorded, reached))
            .collect()
    } else {
        Vec::new()
    };
    catalog::move_positions(&applied, true);
    catalog::move_positions(&reached, false);
    for (t, o) in results {
        match o {
            Outcome::Advanced | Outcome::Again => {}
            Outcome::Applied { changes, .. } => {
                st.careful.remove(&t.id);
                debug1!(
                    "poco_sync stream: target {}: {changes} changes applied",
                    t.id
                );
            }
            Outcome::Resnapshot(why) => {
                st.retry_at.remove(&t.id);
                st.broken.remove(&t.id);
                st.careful.remove(&t.id);
                // Re-snapshots of one target because its learner refused batch after batch
                // wait longer each time: 1 s, 2 s, 4 s ... up to 5 min, instead of a full
                // push in a tight loop.
                let delay_s = if why.starts_with(REFUSED) {
                    let (n, last) = st
                        .resnaps
                        .get(&t.id)
                        .copied()
                        .unwrap_or((0, Instant::now()));
                    let n = if n > 0 && last.elapsed() < Duration::from_secs(600) {
                        n + 1
                    } else {
                        1
                    };
                    st.resnaps.insert(t.id, (n, Instant::now()));
                    if n >= 2 {
                        (1u64 << (n - 2).min(9)).min(300)
                    } else {
                        0
                    }
                } else {
                    0
                };
                resnapshot_after(t.id, why, delay_s);
            }
            Outcome::Failed { error, changes } => {
                let tries = st.retry_at.get(&t.id).map(|x| x.1).unwrap_or(0) + 1;
                let wait =
                    poco_core::learner::backoff_ms(gucs::retry_delay_ms(), tries).min(10_000);
                st.retry_at
                    .insert(t.id, (Instant::now() + Duration::from_millis(wait), tries));
                catalog::note_sync_error(t.id, error, *changes);
                if tries == 1 {
                    log!("poco_sync stream: target {}: {error}", t.id);
                }
            }
            Outcome::Broken { error, changes } => {
                let n = st.broken.get(&t.id).copied().unwrap_or(0) + 1;
                if n < BROKEN_LIMIT {
                    st.broken.insert(t.id, n);
                    let wait = poco_core::learner::backoff_ms(gucs::retry_delay_ms(), n).min(10_000);
                    st.retry_at
                        .insert(t.id, (Instant::now() + Duration::from_millis(wait), n));
                    catalog::note_sync_error(t.id, error, *changes);
                    if n == 1 {
                        log!("poco_sync stream: target {}: {error}", t.id);
                    }
                    continue;
                }
                // Retrying the same batch does not help: the target starts over from a new
                // snapshot, after maintenance's back-off (a snapshot copies rows a batch could
                // not carry, and moves the position past what could not be read).
                st.broken.remove(&t.id);
                st.retry_at.remove(&t.id);
                st.careful.remove(&t.id);
                let why = format!(
                    "continuous sync stopped after {BROKEN_LIMIT} failed passes, a new snapshot follows: {error}"
                );
                log!("poco_sync stream: target {}: {why}", t.id);
                catalog::sync_snapshot_failed(t.id, &why);
                catalog::log_event("sync_error", Some(&t.parent), Some(t.id), &why, serde_json::json!({}));
            }
        }
    }
    // One stream prunes (two would wait on each other's row locks), a few times a second.
    if st.part == 0
        && st
            .pruned_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(200))
    {
        st.pruned_at = Some(Instant::now());
        prune();
    }
}

/// Passes in a row that could not build a target's batch before it goes to `error`.
pub(super) const BROKEN_LIMIT: u32 = 3;

/// Changes every continuous target has (or will not need: below the position of a target
/// waiting for a snapshot) are no longer needed.
pub(super) fn prune() {
    catalog::prune_changes();
}

/// Start a target over with a full snapshot (poco.resnapshot: state, event, the push job).
pub(super) fn resnapshot(target: i64, why: &str) {
    resnapshot_after(target, why, 0)
}

/// `resnapshot`, its push queued to start in `delay_s` seconds.
pub(super) fn resnapshot_after(target: i64, why: &str, delay_s: u64) {
    if let Err(e) = catalog::resnapshot(target, why, delay_s) {
        log!("poco_sync stream: target {target}: could not queue its re-snapshot: {e}");
    }
}

/// Once a second: targets whose snapshot failed are tried again (with backoff), and targets
/// whose backlog passed poco.sync_max_backlog(_age) are re-snapshotted instead of holding the
/// log. Returns whether any target syncs continuously.
pub(super) fn maintain(st: &mut State) -> bool {
    if st
        .maintained_at
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return st.any_continuous;
    }
    st.maintained_at = Some(Instant::now());
    let (max_rows, max_age) = gucs::sync_max_backlog();
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        // A snapshot that ended without success and left its target waiting for nothing.
        for id in catalog::orphaned_snapshots_to_error(st.part, st.parts) {
            log!("poco_sync stream: target {id}: its snapshot ended without success; it is tried again after a back-off");
        }
        // (id, state, seconds since the position moved, position)
        let rows: Vec<(i64, String, f64, String)> = catalog::maintained_targets(st.part, st.parts)
            .into_iter()
            .map(|r| (r.id, r.state, r.behind_s, r.position))
            .collect();
        st.snapshot_retry.retain(|id, _| {
            rows.iter()
                .any(|(r, state, ..)| r == id && state == "error")
        });
        let mut counted: HashMap<String, i64> = HashMap::new();
        for (id, state, behind_s, position) in rows {
            if st
                .ahead
                .get(&id)
                .is_some_and(|(recorded, _)| *recorded == position)
            {
                continue; // caught up at the last pass, not recorded yet: not behind
            }
            if state == "error" {
                // The snapshot failed (its own retries spent): try again, waiting longer each time.
                let (at, tries) = *st.snapshot_retry.entry(id).or_insert_with(|| {
                    (
                        Instant::now()
                            + Duration::from_millis(poco_core::learner::backoff_ms(
                                gucs::retry_delay_ms(),
                                1,
                            )),
                        1,
                    )
                });
                if Instant::now() >= at {
                    let wait = poco_core::learner::backoff_ms(gucs::retry_delay_ms(), tries + 1)
                        .min(300_000);
                    st.snapshot_retry.insert(
                        id,
                        (Instant::now() + Duration::from_millis(wait), tries + 1),
                    );
                    resnapshot(id, "trying the failed snapshot again");
                }
                continue;
            }
            if behind_s < 1.0 {
                continue; // moved within the last second: not behind
            }
            if let Some(age) = max_age.filter(|a| behind_s >= a.as_secs_f64()) {
                st.retry_at.remove(&id);
                resnapshot(
                    id,
                    &format!(
                        "its backlog is older than poco.sync_max_backlog_age ({} s)",
                        age.as_secs()
                    ),
                );
                continue;
            }
            if max_rows > 0 && !position.is_empty() {
                let n = *counted
                    .entry(position.clone())
                    .or_insert_with(|| catalog::backlog(&position, max_rows + 1));
                if n > max_rows {
                    st.retry_at.remove(&id);
                    resnapshot(
                        id,
                        &format!("its backlog passed poco.sync_max_backlog ({max_rows} changes)"),
                    );
                }
            }
        }
        if st.part == 0 {
            prune();
            repair_capture();
        }
        st.any_continuous = catalog::any_continuous();
        st.any_continuous
    }))
}

/// A capture trigger missing or disabled in a way no event trigger saw (an event trigger
/// disabled, a catalog edited by hand): the capture is put right and every continuous target
/// re-snapshotted, since changes may have gone uncaptured meanwhile. Checked once a second.
pub(super) fn repair_capture() {
    let Some(fault) = catalog::capture_fault() else {
        return;
    };
    log!("poco_sync stream: the capture is not intact ({fault}); repairing it and re-snapshotting every continuous target");
    let why = format!("the capture was not intact ({fault}): changes may have gone uncaptured");
    if let Err(e) = catalog::repair_capture(&why, &fault) {
        log!("poco_sync stream: could not repair the capture: {e}");
    }
}
