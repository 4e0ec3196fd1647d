//! The sync stream (docs/sync-design.md): one background worker process that, pass after
//! pass, takes a REPEATABLE READ snapshot `S` of the platform and brings every streaming
//! target from its position to `S`: the keys its captured changes touched are read in `S`
//! through the parent's scope and upserted or deleted on the learner in one transaction that
//! also moves the learner's `poco_sync.position`.
//!
//! First version: keys touched directly, and the reference tables re-checked whole for the
//! family on every batch that has changes. Rows that change family only through an ancestor
//! (a subtree moved without being touched) are not followed yet; see the issue notes.

use crate::net::{self, JobError};
use crate::{catalog, gucs, keys, scope};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use poco_core::learner::literal;
use poco_core::scope::{Role, Scope};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

mod attribution;
mod batch;
mod capture;
mod delivery;
mod positions;

use attribution::*;
use batch::*;
use capture::*;
use delivery::*;
use positions::*;

pub const STREAM_WORKER_TYPE: &str = "poco_sync stream";

fn stopping() -> bool {
    BackgroundWorker::sigterm_received()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn poco_stream_main(arg: pg_sys::Datum) {
    // This process serves the targets whose id modulo `parts` is `part`.
    let arg = arg.value();
    let (part, parts) = (arg & 0xff, (arg >> 8).max(1));
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    let runtime = crate::process::io_runtime();
    crate::process::pin_session();
    // The stream never waits long for a table lock: DDL that takes one (DROP TRIGGER when
    // sync is turned off, ALTER TABLE) while a pass reads would otherwise wait for the pass,
    // and the pass for it on the next table: a deadlock the DDL's session could lose. A pass
    // that times out is simply run again.
    BackgroundWorker::transaction(|| {
        Spi::run("SELECT pg_catalog.set_config('lock_timeout', '200ms', false)")
            .expect("poco_sync: could not set lock_timeout");
    });
    if part >= crate::shmem::MAX_STREAMS || !crate::shmem::claim_stream(part) {
        return; // another process serves this part (started by an earlier coordinator)
    }
    let mut st = State {
        part: part as i64,
        parts: parts as i64,
        ..State::default()
    };
    log!(
        "poco_sync stream {} of {parts} started (pid {})",
        part + 1,
        unsafe { pg_sys::MyProcPid }
    );
    let mut idle_passes = 0u32;
    while !stopping() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::sync_workers() != parts {
                break; // split another way now: the coordinator starts the new streams
            }
        }
        let (busy, any_target) = pass(&runtime, &mut st);
        if !any_target {
            idle_passes += 1;
            if idle_passes > 200 {
                break; // nobody syncs: the coordinator starts us again when someone does
            }
        } else {
            idle_passes = 0;
        }
        // Commits of captured changes set our latch; the timeout only bounds a missed wake-up.
        let ms = if busy { 1 } else { 20 };
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(ms))) {
            break;
        }
    }
    crate::shmem::update(|w| {
        if w.stream_pids[part] == unsafe { pg_sys::MyProcPid } {
            w.stream_pids[part] = 0
        }
    });
    drop(runtime);
    log!("poco_sync stream exiting");
}

#[derive(Default)]
struct State {
    /// This stream serves the targets whose id modulo `parts` is `part`.
    part: i64,
    parts: i64,
    conns: HashMap<i64, std::sync::Arc<tokio_postgres::Client>>,
    /// Batches sent and not answered yet (delivery::InFlight): a slow learner's batch goes on
    /// in the background while the passes serve the other targets.
    in_flight: HashMap<i64, InFlight>,
    /// Re-snapshots this process asked for each target: how many in a row, and the last one.
    resnaps: HashMap<i64, (u32, Instant)>,
    /// A target that failed waits until then (backoff) before it is tried again.
    retry_at: HashMap<i64, (Instant, u32)>,
    /// Passes in a row whose batch for a target the platform could not build (Outcome::Broken).
    broken: HashMap<i64, u32>,
    /// The last error of a whole pass, logged once, and when it was last noted on the targets.
    last_error: Option<String>,
    noted_at: Option<Instant>,
    /// Prepared attribution queries, by SQL text (a scope change gives new texts; Postgres
    /// re-plans them by itself after DDL).
    plans: HashMap<String, pgrx::spi::OwnedPreparedStatement>,
    /// Targets whose snapshot failed: when to try again, and how many times it was tried.
    snapshot_retry: HashMap<i64, (Instant, u32)>,
    /// Targets whose next batch takes the careful (two round trip) path.
    careful: BTreeSet<i64>,
    /// When each learner connection last carried a batch (or was opened).
    used: HashMap<i64, Instant>,
    /// Connections being opened in the background, by target.
    connecting: HashMap<i64, Connecting>,
    /// Targets the stream connected to ahead of their first batch.
    preconnected: BTreeSet<i64>,
    /// The compiled scope of the last pass.
    compiled: Option<std::rc::Rc<Compiled>>,
    /// Targets a pass found nothing for: (position recorded, position reached). Moving them is
    /// recorded at most once a second (or at once while a session waits in poco_sync_wait),
    /// not on every pass: rewriting every target's row on every pass cost more than the
    /// changes. A crash loses only the knowledge that nothing was there to send.
    ahead: HashMap<i64, (String, String)>,
    recorded_at: Option<Instant>,
    pruned_at: Option<Instant>,
    /// The last run of maintain(), and whether any target synced continuously then.
    maintained_at: Option<Instant>,
    any_continuous: bool,
}

struct Compiled {
    generation: i64,
    sc: Scope,
    /// How each relation's row images are read (capture::RelImage).
    rels: RelImages,
    pks: HashMap<u32, Vec<String>>,
    fks: BTreeSet<(u32, u32)>,
    /// A scoped table continuous sync cannot follow since a DDL (its primary key dropped, SET
    /// UNLOGGED): declarations refuse such tables, a platform's migration is never refused.
    /// Every target then fails with this, until the table is put right (scope::unsyncable).
    unsyncable: Option<String>,
}

struct Target {
    id: i64,
    parent: String,
    /// Where this pass starts: the recorded position, or the one this process moved the
    /// target to without recording it yet (State::ahead).
    position: String,
    /// The position recorded in poco.target.
    recorded: String,
    learner_position: String,
}

/// How a target's last_sync_error starts when the stream's pass failed as a whole (cleared
/// once the target moves again).
pub(crate) const PASS_FAILED: &str = "the stream pass failed";

enum Outcome {
    /// Nothing for this target between its position and S.
    Advanced,
    /// A batch was applied on the learner (or found already applied there).
    Applied {
        changes: i64,
        /// The position the learner is at now (the snapshot of the pass that built it).
        at: String,
    },
    /// TRUNCATE, or the learner holds another position: start over with a full snapshot.
    Resnapshot(String),
    Failed {
        error: String,
        changes: i64,
    },
    /// The platform could not build the target's batch (its changes could not be read, or its
    /// rows): retried as Failed is, and after BROKEN_LIMIT passes in a row the target goes to
    /// `error` and is re-snapshotted after a back-off (maintenance), so that it never stays
    /// behind for good while it says `streaming`.
    Broken {
        error: String,
        changes: i64,
    },
    /// Not sent this pass, for no fault of the target's (the one round trip path's guard
    /// found the learner elsewhere): the next pass takes the careful path.
    Again,
}

/// One pass: (did work, is any target streaming).
fn pass(rt: &tokio::runtime::Runtime, st: &mut State) -> (bool, bool) {
    let installed = BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'poco_sync')",
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    });
    if !installed {
        return (false, false);
    }
    let continuous = maintain(st);
    let result = crate::process::in_snapshot(|| {
        if crate::failpoint::armed("stream_pass") {
            return Err(JobError::new("XX000", "failpoint stream_pass: the pass failed"));
        }
        let s = Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text")
            .map_err(|e| JobError::new("XX000", e.to_string()))?
            .unwrap_or_default();
        let mut targets = streaming_targets(st.part, st.parts);
        // A target whose batch is still in flight sits this pass out (its connection stays).
        let flying: BTreeSet<i64> = st.in_flight.keys().copied().collect();
        targets.retain(|t| !flying.contains(&t.id));
        // Start where this process left a target (if nobody moved it since: a push would).
        st.ahead.retain(|id, (recorded, _)| {
            targets
                .iter()
                .any(|t| t.id == *id && t.recorded == *recorded)
        });
        for t in &mut targets {
            if let Some((_, reached)) = st.ahead.get(&t.id) {
                t.position = reached.clone();
            }
        }
        // Close the connections of targets that no longer stream (disabled, removed).
        st.conns
            .retain(|id, _| flying.contains(id) || targets.iter().any(|t| t.id == *id));
        // Connections idle for poco.sync_idle_timeout are closed (opened again with the next
        // batch): a serverless learner can suspend, and idle families hold no connection.
        if let Some(idle) = gucs::sync_idle_timeout() {
            let used = &st.used;
            st.conns
                .retain(|id, _| used.get(id).is_some_and(|at| at.elapsed() < idle));
        }
        st.used.retain(|id, _| st.conns.contains_key(id));
        st.connecting.retain(|id, task| {
            let keep = targets.iter().any(|t| t.id == *id);
            if !keep {
                task.abort();
            }
            keep
        });
        if targets.is_empty() {
            return Ok((s, Vec::new(), false));
        }
        // The compiled scope, its keys and references are kept while poco.scope_generation
        // (bumped with every scope or schema change, read in S) stays the same.
        let generation = crate::catalog::scope_generation()
            .map_err(|e| JobError::new("XX000", e.to_string()))?;
        if st
            .compiled
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            let sc =
                scope::require().map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
            let pks = primary_keys(&sc);
            let fks = scoped_references(&sc);
            let unsyncable = crate::scope::unsyncable(&sc).map(|e| match e.hint() {
                Some(h) => format!("{e} (SQLSTATE {}) HINT: {h}", e.sqlstate().code()),
                None => e.to_string(),
            });
            st.plans.clear();
            st.compiled = Some(std::rc::Rc::new(Compiled {
                generation,
                sc,
                rels: Default::default(),
                pks,
                fks,
                unsyncable,
            }));
        }
        let compiled = st.compiled.clone().expect("compiled above");
        let (sc, pks, fks) = (&compiled.sc, &compiled.pks, &compiled.fks);
        let in_backoff = |st: &State, t: &Target| {
            st.retry_at
                .get(&t.id)
                .is_some_and(|(at, _)| Instant::now() < *at)
        };
        // A target that starts streaming gets its learner connection now, not with its first
        // batch (after a restart every target would pay the connection then, at once). Tried
        // once per target and process; a failure is left for the first batch to report.
        let fresh: Vec<&Target> = targets
            .iter()
            .filter(|t| {
                !in_backoff(st, t)
                    && !st.conns.contains_key(&t.id)
                    && !st.preconnected.contains(&t.id)
            })
            .collect();
        if !fresh.is_empty() {
            for t in &fresh {
                st.preconnected.insert(t.id);
            }
            connect_all(rt, st, &fresh);
        }
        // A target whose last batch failed is connected to first: while its learner does not
        // answer, its backlog is not read and attributed again on every try.
        let retrying: Vec<&Target> = targets
            .iter()
            .filter(|t| {
                !in_backoff(st, t)
                    && st.retry_at.contains_key(&t.id)
                    && !st.conns.get(&t.id).is_some_and(|c| !c.is_closed())
            })
            .collect();
        let mut unreachable = if retrying.is_empty() {
            HashMap::new()
        } else {
            connect_all(rt, st, &retrying)
        };
        let retrying: Vec<i64> = retrying.iter().map(|t| t.id).collect();
        // When a failing learner answers again, the targets still waiting out their backoff
        // are probed at once (in the background, a short wait) and those that answer join
        // this pass: learners that come back together catch up together, from one read of
        // the log instead of one read per target as each backoff ends.
        if retrying.iter().any(|id| st.conns.contains_key(id)) {
            let waiting_out: Vec<&Target> = targets.iter().filter(|t| in_backoff(st, t)).collect();
            if !waiting_out.is_empty() {
                connect_all(rt, st, &waiting_out);
                for t in &waiting_out {
                    if st.conns.contains_key(&t.id) {
                        st.retry_at.remove(&t.id);
                    }
                }
            }
        }
        // Retried targets still connecting wait for a later pass, their backlog unread.
        let still_connecting: BTreeSet<i64> = retrying
            .iter()
            .copied()
            .filter(|id| !unreachable.contains_key(id) && !st.conns.contains_key(id))
            .collect();
        // Targets that were brought to the same position (all of them, usually: every pass
        // moves every caught-up target to its S) share one read of the changes and one
        // attribution.
        let mut steps: Vec<(Target, Step)> = Vec::new();
        // Every target of the pass shares one read of the log, from the oldest position among
        // them (positions are snapshots taken one after another, so each target's range is
        // part of the oldest one's), and one attribution; each then takes the changes its
        // own position has not seen. Targets whose positions drifted apart (a learner that
        // failed for a while) cost one read, not one each.
        // The pass's targets, each with the index of its position among the distinct ones
        // (nearly always a single one: every pass moves every caught-up target to its S).
        let mut group: Vec<(Target, usize)> = Vec::new();
        let mut positions: Vec<(String, Snap)> = Vec::new();
        for t in targets {
            if in_backoff(st, &t) {
                continue;
            }
            if let Some(why) = &compiled.unsyncable {
                let error = why.clone();
                steps.push((t, Step::Done(Outcome::Failed { error, changes: 0 })));
                continue;
            }
            // A learner that could not be reached stays in the group: its share of the
            // changes is counted (its lag), then it is refused below.
            if still_connecting.contains(&t.id) {
                steps.push((t, Step::Done(Outcome::Again)));
                continue;
            }
            if let Some(i) = positions.iter().position(|(text, _)| *text == t.position) {
                group.push((t, i));
                continue;
            }
            match Snap::parse(&t.position) {
                Some(snap) => {
                    positions.push((t.position.clone(), snap));
                    group.push((t, positions.len() - 1));
                }
                None => {
                    let why = format!("its position {} cannot be read", t.position);
                    steps.push((t, Step::Done(Outcome::Resnapshot(why))));
                }
            }
        }
        if !group.is_empty() {
            let (max_changes, _) = gucs::sync_max_backlog();
            let parents: Vec<String> = group
                .iter()
                .map(|(t, _)| t.parent.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let snaps: Vec<&Snap> = positions.iter().map(|(_, p)| p).collect();
            match load_attributed(
                &mut st.plans,
                sc,
                &compiled.rels,
                pks,
                &snaps,
                &parents,
                max_changes,
            ) {
                Err(e) => {
                    for (t, _) in group {
                        let error = format!("reading the captured changes: {e}");
                        steps.push((t, Step::Done(Outcome::Broken { error, changes: -1 })));
                    }
                }
                Ok(loaded) => {
                    // Which targets have something to send: those connect first, so that a
                    // batch is only built for a learner that can take it now.
                    let mut concerned: Vec<bool> = Vec::with_capacity(group.len());
                    for (t, si) in &group {
                        let pi = parents.binary_search(&t.parent).ok().map(|i| i as u32);
                        let snap = &positions[*si].1;
                        concerned.push(
                            !loaded.too_many.contains(si)
                                && loaded
                                    .changes
                                    .iter()
                                    .zip(&loaded.owners)
                                    .any(|(c, o)| o.concerns(pi) && !snap.visible(c.txid)),
                        );
                    }
                    let sending: Vec<&Target> = group
                        .iter()
                        .zip(&concerned)
                        .filter(|((t, _), c)| **c && !unreachable.contains_key(&t.id))
                        .map(|((t, _), _)| t)
                        .collect();
                    let mut failed = connect_all(rt, st, &sending);
                    failed.extend(unreachable.drain());
                    for ((t, si), concerned) in group.into_iter().zip(concerned) {
                        if loaded.too_many.contains(&si) {
                            // One batch that large is not held in memory: a full snapshot is
                            // constant memory, and for so many changes not slower.
                            let why = format!(
                                "more than {max_changes} changes waited in one batch (poco.sync_max_backlog)"
                            );
                            steps.push((t, Step::Done(Outcome::Resnapshot(why))));
                            continue;
                        }
                        if !concerned {
                            steps.push((t, Step::Done(Outcome::Advanced)));
                            continue;
                        }
                        // The target's share of the batch: its own changes, and those whose
                        // owner cannot be told, that its position has not seen.
                        let pi = parents.binary_search(&t.parent).ok().map(|i| i as u32);
                        let snap = &positions[si].1;
                        let mine: Vec<(&Keyed, &Owners)> = loaded
                            .changes
                            .iter()
                            .zip(&loaded.owners)
                            .filter(|(c, o)| o.concerns(pi) && !snap.visible(c.txid))
                            .collect();
                        if let Some(e) = failed.remove(&t.id) {
                            // Its lag: what waits for it.
                            steps.push((t, Step::Done(refused(e, mine.len() as i64))));
                            continue;
                        }
                        if !st.conns.contains_key(&t.id) {
                            // Still connecting (in the background): a later pass sends it.
                            steps.push((t, Step::Done(Outcome::Again)));
                            continue;
                        }
                        // A row of this family that changed family (or one that joined it)
                        // took what it owns along: a new snapshot, decided here, so that no
                        // batch naming the moved rows is ever sent.
                        if let Some((c, _)) = mine.iter().find(|(c, o)| {
                            c.op == b'U'
                                && o.moved()
                                    .is_some_and(|m| pi.is_some_and(|p| m.contains(&p)))
                        }) {
                            let name = sc
                                .table(c.rel)
                                .map(|x| x.ident.as_str())
                                .or_else(|| sc.path_table(c.rel).map(|x| x.ident.as_str()))
                                .unwrap_or("?");
                            steps.push((
                                t,
                                Step::Done(Outcome::Resnapshot(format!(
                                    "a row of {name} moved between families, with what it owns"
                                ))),
                            ));
                            continue;
                        }
                        // In a subtransaction: an error building one target's batch is
                        // that target's, not the whole pass's (every target of the stream).
                        let plans = &mut st.plans;
                        let step = match crate::process::in_subtransaction(|| {
                            if crate::failpoint::armed_for("stream_batch", &t.parent) {
                                pgrx::error!("failpoint stream_batch: the batch could not be built");
                            }
                            sync_target(plans, sc, pks, fks, &t, pi, &mine)
                        }) {
                            Ok(step) => step,
                            // A program limit (a value or a table's rows in one batch past
                            // jsonb's 256 MB): the batch cannot be built, a COPY can.
                            Err(e) if e.sqlstate.starts_with("54") => {
                                Step::Done(Outcome::Resnapshot(format!(
                                    "the batch cannot be sent as one statement ({}): a new snapshot copies the rows",
                                    e.describe()
                                )))
                            }
                            Err(e) => Step::Done(Outcome::Broken {
                                error: format!("building the batch: {}", e.describe()),
                                changes: mine.len() as i64,
                            }),
                        };
                        steps.push((t, step));
                    }
                }
            }
        }
        Ok((s, steps, true))
    });
    // The batches are built: the snapshot is released before any is sent, so a learner that
    // is slow to take its batch holds neither the platform's xmin nor the other targets.
    let (s, results, any) = match result.map(|(s, steps, any)| {
        let out = deliver(rt, st, &s, steps);
        (s, out, any || !st.in_flight.is_empty())
    }) {
        Ok(r) => r,
        Err(e) => {
            // Said once, not on every pass while it lasts (e.g. the scope was cleared).
            let new = st.last_error.as_deref() != Some(e.message.as_str());
            if new {
                log!("poco_sync stream: {}", e.message);
            }
            // And on every target of this stream, so that none says `streaming` with no error
            // while nothing moves (again every few seconds, for targets that joined since).
            if new || st.noted_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
                st.noted_at = Some(Instant::now());
                let why = format!("{PASS_FAILED}: {}", e.message);
                let (part, parts) = (st.part, st.parts);
                BackgroundWorker::transaction(|| {
                    crate::catalog::note_pass_error(part, parts, &why)
                });
            }
            st.last_error = Some(e.message);
            return (false, continuous);
        }
    };
    st.last_error = None;
    let busy = results
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Applied { .. }));
    if !results.is_empty() {
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| record(st, &s, &results)));
    }
    (busy, any || continuous)
}

fn streaming_targets(part: i64, parts: i64) -> Vec<Target> {
    crate::catalog::streaming_targets(part, parts)
        .into_iter()
        .map(|r| Target {
            id: r.id,
            parent: r.parent_id,
            recorded: r.position.clone(),
            position: r.position,
            learner_position: r.learner_position,
        })
        .collect()
}

/// (referencing, referenced) pairs of scoped tables joined by a foreign key.
fn scoped_references(sc: &Scope) -> BTreeSet<(u32, u32)> {
    let oids: Vec<pg_sys::Oid> = sc.tables.iter().map(|t| pg_sys::Oid::from(t.oid)).collect();
    Spi::connect(|c| {
        c.select(
            "SELECT conrelid, confrelid FROM pg_catalog.pg_constraint \
              WHERE contype = 'f' AND conrelid = ANY ($1) AND confrelid = ANY ($1)",
            None,
            &[oids.into()],
        )
        .map(|rows| {
            rows.filter_map(|r| {
                Some((
                    u32::from(r.get::<pg_sys::Oid>(1).ok()??),
                    u32::from(r.get::<pg_sys::Oid>(2).ok()??),
                ))
            })
            .collect()
        })
        .unwrap_or_default()
    })
}

/// Primary key column names (unquoted, in key order) of every scoped table.
fn primary_keys(sc: &Scope) -> HashMap<u32, Vec<String>> {
    let mut out = HashMap::new();
    for t in &sc.tables {
        let cols: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT a.attname::text FROM pg_catalog.pg_index i \
                   CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY k(attnum, n) \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
                None,
                &[pg_sys::Oid::from(t.oid).into()],
            )
            .map(|rows| rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
        });
        out.insert(t.oid, cols);
    }
    // Undeclared tables on the paths: their old images are found by key in the log.
    for p in &sc.paths {
        out.insert(p.oid, p.pk.clone());
    }
    out
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Prepared statements kept by the stream, by SQL text (a scope change gives new texts;
/// Postgres re-plans them by itself after DDL).
type Plans = HashMap<String, pgrx::spi::OwnedPreparedStatement>;

/// Run `sql` through a plan prepared once (for these parameter types) and kept; the first
/// column of each row, as text.
fn select_kept(
    plans: &mut Plans,
    sql: &str,
    types: &[PgBuiltInOids],
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<Option<String>>, pgrx::spi::SpiError> {
    select_kept_cols(plans, sql, types, args).map(|rows| {
        rows.into_iter()
            .map(|r| r.into_iter().next().flatten())
            .collect()
    })
}

/// `select_kept`, every column of each row as text.
fn select_kept_cols(
    plans: &mut Plans,
    sql: &str,
    types: &[PgBuiltInOids],
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<Vec<Option<String>>>, pgrx::spi::SpiError> {
    if !plans.contains_key(sql) {
        let types: Vec<PgOid> = types.iter().map(|t| PgOid::BuiltIn(*t)).collect();
        let p = Spi::connect(|c| c.prepare(sql, &types).map(|p| p.keep()))?;
        plans.insert(sql.to_string(), p);
    }
    Spi::connect(|c| {
        c.select(&plans[sql], None, args).map(|rows| {
            rows.map(|r| {
                (1..=r.columns())
                    .map(|i| r.get::<String>(i).ok().flatten())
                    .collect()
            })
            .collect()
        })
    })
}
