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
    let runtime = crate::worker::with_signals_blocked(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .on_thread_start(crate::worker::block_all_signals)
            .build()
    })
    .expect("poco_sync: could not build the tokio runtime");
    BackgroundWorker::transaction(|| {
        Spi::run(
            "SELECT pg_catalog.set_config('DateStyle', 'ISO, YMD', false), \
                    pg_catalog.set_config('IntervalStyle', 'postgres', false), \
                    pg_catalog.set_config('TimeZone', 'UTC', false), \
                    pg_catalog.set_config('extra_float_digits', '3', false), \
                    pg_catalog.set_config('bytea_output', 'hex', false)",
        )
        .ok();
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
    conns: HashMap<i64, tokio_postgres::Client>,
    /// A target that failed waits until then (backoff) before it is tried again.
    retry_at: HashMap<i64, (Instant, u32)>,
    /// The last error of a whole pass, logged once.
    last_error: Option<String>,
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
    pks: HashMap<u32, Vec<String>>,
    fks: BTreeSet<(u32, u32)>,
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

enum Outcome {
    /// Nothing for this target between its position and S.
    Advanced,
    /// A batch was applied on the learner (or found already applied there).
    Applied {
        changes: i64,
    },
    /// TRUNCATE, or the learner holds another position: start over with a full snapshot.
    Resnapshot(String),
    Failed {
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
    let result = crate::push::in_snapshot(|| {
        let s = Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text")
            .map_err(|e| JobError::new("XX000", e.to_string()))?
            .unwrap_or_default();
        let mut targets = streaming_targets(st.part, st.parts);
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
        st.conns.retain(|id, _| targets.iter().any(|t| t.id == *id));
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
        let generation = Spi::get_one::<i64>("SELECT n FROM poco.scope_generation")
            .map_err(|e| JobError::new("XX000", e.to_string()))?
            .unwrap_or(0);
        if st
            .compiled
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            let sc =
                scope::require().map_err(|e| JobError::new(e.sqlstate().code(), e.to_string()))?;
            let pks = primary_keys(&sc);
            let fks = scoped_references(&sc);
            st.plans.clear();
            st.compiled = Some(std::rc::Rc::new(Compiled {
                generation,
                sc,
                pks,
                fks,
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
            if let Some(e) = unreachable.remove(&t.id) {
                // How many changes wait is not known (not read): the lag shown stays.
                steps.push((t, Step::Done(refused(e, -1))));
                continue;
            }
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
            match load_attributed(&mut st.plans, sc, pks, &snaps, &parents, max_changes) {
                Err(e) => {
                    for (t, _) in group {
                        let error = format!("reading the captured changes: {e}");
                        steps.push((t, Step::Done(Outcome::Failed { error, changes: 0 })));
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
                        .filter(|(_, c)| **c)
                        .map(|((t, _), _)| t)
                        .collect();
                    let mut failed = connect_all(rt, st, &sending);
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
                        if let Some(e) = failed.remove(&t.id) {
                            steps.push((t, Step::Done(refused(e, -1))));
                            continue;
                        }
                        if !st.conns.contains_key(&t.id) {
                            // Still connecting (in the background): a later pass sends it.
                            steps.push((t, Step::Done(Outcome::Again)));
                            continue;
                        }
                        // The target's share of the batch: its own changes, and those whose
                        // owner cannot be told, that its position has not seen.
                        let pi = parents.binary_search(&t.parent).ok().map(|i| i as u32);
                        let snap = &positions[si].1;
                        let mine: Vec<&Keyed> = loaded
                            .changes
                            .iter()
                            .zip(&loaded.owners)
                            .filter(|(c, o)| o.goes_to(pi) && !snap.visible(c.txid))
                            .map(|(c, _)| c)
                            .collect();
                        // In a subtransaction: an error building one target's batch is
                        // that target's, not the whole pass's (every target of the stream).
                        let plans = &mut st.plans;
                        let step = match crate::push::in_subtransaction(|| {
                            sync_target(plans, sc, pks, fks, &t, &mine)
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
                            Err(e) => Step::Done(Outcome::Failed {
                                error: format!("building the batch: {}", e.describe()),
                                changes: mine.len() as i64,
                            }),
                        };
                        steps.push((t, step));
                    }
                }
            }
        }
        let out = deliver(rt, st, &s, steps);
        Ok((s, out, true))
    });
    let (s, results, any) = match result {
        Ok(r) => r,
        Err(e) => {
            // Said once, not on every pass while it lasts (e.g. the scope was cleared).
            if st.last_error.as_deref() != Some(e.message.as_str()) {
                log!("poco_sync stream: {}", e.message);
                st.last_error = Some(e.message);
            }
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
            rows.map(|r| Target {
                id: r.get::<i64>(1).ok().flatten().unwrap_or(0),
                parent: r.get::<String>(2).ok().flatten().unwrap_or_default(),
                position: r.get::<String>(3).ok().flatten().unwrap_or_default(),
                recorded: r.get::<String>(3).ok().flatten().unwrap_or_default(),
                learner_position: r.get::<String>(4).ok().flatten().unwrap_or_default(),
            })
            .collect()
        })
        .unwrap_or_default()
    })
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
    out
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Bring one target from its position to `s`.
fn sync_target(
    plans: &mut Plans,
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    fks: &BTreeSet<(u32, u32)>,
    t: &Target,
    changes: &[&Keyed],
) -> Step {
    if changes.is_empty() {
        return Step::Done(Outcome::Advanced);
    }
    let n = changes.len() as i64;
    if changes.iter().any(|c| c.op == b'T') {
        return Step::Done(Outcome::Resnapshot("a scoped table was truncated".into()));
    }
    sync_keys(plans, sc, pks, fks, t, changes, n)
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

/// (table, operation, old row, new row)
type Change = (u32, String, Option<Value>, Option<Value>);

/// A change as a batch needs it once attributed: its table, operation (I, U, D, T) and the
/// primary key (as JSON text) of its old and new images. Kept small: a long backlog is held
/// as a list of these.
struct Keyed {
    txid: u64,
    rel: u32,
    op: u8,
    old: Option<Box<str>>,
    new: Option<Box<str>>,
}

/// A position (`pg_snapshot` as text, `xmin:xmax:xip,…`), to tell which changes it has seen.
struct Snap {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snap {
    fn parse(text: &str) -> Option<Snap> {
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
    fn visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }
}

/// The log as a pass needs it: the changes some target of the pass has not seen, whom each
/// concerns, and the targets (indexes) whose own share passed poco.sync_max_backlog.
struct Loaded {
    changes: Vec<Keyed>,
    owners: Vec<Owners>,
    too_many: BTreeSet<usize>,
}

/// Changes fetched and attributed at a time: what is held is then only their keys.
const LOAD_CHUNK: i64 = 2_000;

/// load_attributed's query, built once.
static LOAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT txid, rel, op::text, {}, {} FROM poco.change WHERE txid >= $1",
        key_image("old"),
        key_image("new")
    )
});

/// The SQL for a change image as load_attributed reads it (see there).
fn key_image(col: &str) -> String {
    format!(
        "CASE WHEN {col} IS NULL OR rel = $2 OR pg_catalog.octet_length({col}::text) <= 1048576 THEN {col}::pg_catalog.jsonb \
              ELSE (SELECT pg_catalog.jsonb_object_agg(e.key, CASE WHEN pg_catalog.octet_length(e.value::text) > 65536 \
                                                               THEN 'null'::pg_catalog.json ELSE e.value END) \
                      FROM pg_catalog.json_each({col}) e) END"
    )
}

/// The changes of transactions visible in S (the current snapshot) that some of `positions`
/// has not seen, and whom each concerns among `parents`. Read through a cursor a chunk at a
/// time: each chunk is attributed with its whole images, which are then cut down to their
/// primary keys (all a batch needs of them), so memory follows the number of changes, not
/// their size. A target whose share passes `max` (poco.sync_max_backlog; 0: no limit) is
/// given up (it is re-snapshotted) and what only it needed is dropped, so what is held stays
/// under `max` changes.
fn load_attributed(
    plans: &mut Plans,
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    positions: &[&Snap],
    parents: &[String],
    max: i64,
) -> Result<Loaded, String> {
    let mut out = Loaded {
        changes: Vec::new(),
        owners: Vec::new(),
        too_many: BTreeSet::new(),
    };
    let mut counts: Vec<i64> = vec![0; positions.len()];
    let from = positions.iter().map(|p| p.xmin).min().unwrap_or(0);
    // Attribution's own allocations (argument datums) are freed after each chunk.
    let mut cx = pgrx::PgMemoryContexts::new("poco_sync attribution");
    Spi::connect(|c| {
        // Visible in S (this transaction's snapshot) by construction; from the oldest
        // position's xmin: everything below it had ended before every position was taken.
        // Attribution and keys need the key and foreign key columns of an image, and the
        // root's predicate columns: an image over 1 MB of any other table comes without its
        // values over 64 kB (no key holds one: btree entries are at most ~2.7 kB), so a 100 MB
        // value is not parsed and copied here for nothing. The rows sent are read at S anyway.
        let mut cursor = c
            .try_open_cursor(
                LOAD_SQL.as_str(),
                &[
                    (from as i64).into(),
                    pgrx::pg_sys::Oid::from(sc.root).into(),
                ],
            )
            .map_err(|e| e.to_string())?;
        loop {
            let too_many = &out.too_many;
            let unseen_by_some = |txid: u64| {
                positions
                    .iter()
                    .enumerate()
                    .any(|(i, p)| !too_many.contains(&i) && !p.visible(txid))
            };
            // Converting the images to JSON allocates in the current context: cx, too.
            let fetched = unsafe {
                cx.switch_to(|_| {
                    let rows = cursor.fetch(LOAD_CHUNK as _)?;
                    let table = pg_sys::SPI_tuptable;
                    let mut n = 0usize;
                    let mut chunk: Vec<(u64, Change)> = Vec::new();
                    for r in rows {
                        n += 1;
                        let txid = r.get::<i64>(1).ok().flatten().unwrap_or(0) as u64;
                        if !unseen_by_some(txid) {
                            continue; // every target of the pass has it
                        }
                        chunk.push((
                            txid,
                            (
                                r.get::<pg_sys::Oid>(2)
                                    .ok()
                                    .flatten()
                                    .map(u32::from)
                                    .unwrap_or(0),
                                r.get::<String>(3).ok().flatten().unwrap_or_default(),
                                r.get::<pgrx::JsonB>(4).ok().flatten().map(|j| j.0),
                                r.get::<pgrx::JsonB>(5).ok().flatten().map(|j| j.0),
                            ),
                        ));
                    }
                    Ok::<_, pgrx::spi::SpiError>((n, chunk, table))
                })
            };
            let (n, chunk, table) = fetched.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<(), String>(());
            }
            let (txids, chunk): (Vec<u64>, Vec<Change>) = chunk.into_iter().unzip();
            let chunk_owners = unsafe { cx.switch_to(|_| attribute(plans, sc, &chunk, parents)) };
            unsafe {
                cx.reset();
                if !table.is_null() {
                    pg_sys::SPI_freetuptable(table);
                }
            }
            for (txid, (rel, op, old, new)) in txids.into_iter().zip(chunk) {
                for (i, p) in positions.iter().enumerate() {
                    if !p.visible(txid) {
                        counts[i] += 1;
                    }
                }
                let pk: &[String] = pks.get(&rel).map(|v| v.as_slice()).unwrap_or(&[]);
                let cut = |img: Option<Value>| img.map(|i| key_of(pk, &i).into_boxed_str());
                out.changes.push(Keyed {
                    txid,
                    rel,
                    op: op.as_bytes().first().copied().unwrap_or(b'?'),
                    old: cut(old),
                    new: cut(new),
                });
            }
            out.owners.extend(chunk_owners);
            if crate::failpoint::fires("stream_key_loading") {
                return Err(
                    "failpoint stream_key_loading: the pass failed while loading the changes' keys"
                        .into(),
                );
            }
            if max > 0 && out.changes.len() as i64 > max {
                // Give up the targets past the limit and drop what only they needed.
                for (i, n) in counts.iter().enumerate() {
                    if *n > max {
                        out.too_many.insert(i);
                    }
                }
                let too_many = &out.too_many;
                let keep: Vec<bool> = out
                    .changes
                    .iter()
                    .map(|c| {
                        positions
                            .iter()
                            .enumerate()
                            .any(|(i, p)| !too_many.contains(&i) && !p.visible(c.txid))
                    })
                    .collect();
                let mut k = keep.iter();
                out.changes.retain(|_| *k.next().expect("same length"));
                let mut k = keep.iter();
                out.owners.retain(|_| *k.next().expect("same length"));
                if out.too_many.len() == positions.len() {
                    return Ok(()); // nobody left to read for
                }
            }
        }
    })?;
    Ok(out)
}

/// Whom one change concerns, among the parents of a group.
enum Owners {
    /// These parents' scopes (indexes into the group's sorted parents) hold the row at S (as
    /// it is now, or as it was).
    Some(Vec<u32>),
    /// Every target: a reference row, TRUNCATE, or the owner could not be looked up.
    Everyone,
    /// Nobody can be named: the old image of a row whose chain is gone at S (deleted with its
    /// ancestors). It goes with every batch that is sent anyway: whoever held the row also
    /// gets its highest deleted ancestor's own change, whose parent is still there.
    Unknown,
}

impl Owners {
    /// The change is sent to this parent's learner (if its batch is sent at all).
    fn goes_to(&self, parent: Option<u32>) -> bool {
        match self {
            Owners::Some(s) => parent.is_some_and(|p| s.contains(&p)),
            Owners::Everyone | Owners::Unknown => true,
        }
    }
    /// The change alone makes a batch for this parent.
    fn concerns(&self, parent: Option<u32>) -> bool {
        match self {
            Owners::Some(s) => parent.is_some_and(|p| s.contains(&p)),
            Owners::Everyone => true,
            Owners::Unknown => false,
        }
    }
}

/// Whom each change concerns among `parents`: those whose scope, at S, holds the changed row
/// as it is now or as it was before (its old image). A row a learner holds and loses is
/// caught through its old image, or, when what moved is an ancestor, through the highest
/// changed ancestor's old image (above it nothing changed, so its chain at S is the one the
/// learner knew). Reference rows and TRUNCATE concern everyone.
fn attribute(plans: &mut Plans, sc: &Scope, changes: &[Change], parents: &[String]) -> Vec<Owners> {
    // The candidates as one text[] datum for the whole chunk (in the caller's memory context),
    // not one array per row image.
    let candidates: pgrx::datum::DatumWithOid = parents.to_vec().into();
    changes
        .iter()
        .map(|(rel, op, old, new)| {
            let Some(table) = sc.table(*rel) else {
                return Owners::Some(Vec::new());
            };
            if op == "T" || matches!(table.role, Role::Reference(_)) {
                return Owners::Everyone;
            }
            let mut found: Vec<u32> = Vec::new();
            let mut old_unknown = false;
            for (img, is_old) in [(old, true), (new, false)] {
                let Some(img) = img else { continue };
                let args = [
                    unsafe {
                        pgrx::datum::DatumWithOid::new_from_datum(
                            candidates.datum(),
                            candidates.oid(),
                        )
                    },
                    pgrx::JsonB(img.clone()).into(),
                ];
                match select_kept(
                    plans,
                    &table.owners_sql,
                    &[PgBuiltInOids::TEXTARRAYOID, PgBuiltInOids::JSONBOID],
                    &args,
                ) {
                    Ok(rows) => {
                        let before = found.len();
                        for p in rows.into_iter().flatten() {
                            if let Ok(i) = parents.binary_search(&p) {
                                if !found.contains(&(i as u32)) {
                                    found.push(i as u32);
                                }
                            }
                        }
                        if is_old && found.len() == before {
                            old_unknown = true;
                        }
                    }
                    Err(_) => return Owners::Everyone, // cannot tell: assume it concerns everyone
                }
            }
            if found.is_empty() && old_unknown {
                Owners::Unknown
            } else {
                Owners::Some(found)
            }
        })
        .collect()
}

fn sync_keys(
    plans: &mut Plans,
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    fks: &BTreeSet<(u32, u32)>,
    t: &Target,
    changes: &[&Keyed],
    n: i64,
) -> Step {
    // Keys touched, per table.
    let mut touched: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    // Keys of rows that existed before the batch and were updated (not inserted in it): if one
    // changed family, what it owns changed family with it.
    let mut updated: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut inserted: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for Keyed {
        rel, op, old, new, ..
    } in changes.iter().copied()
    {
        let Some(pk) = pks.get(rel) else { continue };
        if pk.is_empty() {
            return Step::Done(Outcome::Failed {
                error: format!("table {rel} has no primary key: it cannot be synced"),
                changes: n,
            });
        }
        for k in [old, new].into_iter().flatten() {
            let k = k.to_string();
            match op {
                b'U' => updated.entry(*rel).or_default().insert(k.clone()),
                b'I' => inserted.entry(*rel).or_default().insert(k.clone()),
                _ => false,
            };
            touched.entry(*rel).or_default().insert(k);
        }
    }
    let mut membership: Vec<MembershipCheck> = Vec::new();
    // Reference tables to re-check: touched ones, and those a touched table (or one re-checked)
    // points at: new references arrive, rows nothing points at any more leave.
    let mut recheck: BTreeSet<u32> = BTreeSet::new();
    loop {
        let before = recheck.len();
        for table in sc
            .tables
            .iter()
            .filter(|t| matches!(t.role, Role::Reference(_)))
        {
            let r = table.oid;
            if touched.contains_key(&r)
                || fks.iter().any(|(from, to)| {
                    *to == r && *from != r && (touched.contains_key(from) || recheck.contains(from))
                })
            {
                recheck.insert(r);
            }
        }
        if recheck.len() == before {
            break;
        }
    }
    // The learner's statements: deletes of touched keys, upserts of the rows in scope at S.
    let mut stmts: Vec<String> = Vec::new();
    for table in &sc.tables {
        let pk = &pks[&table.oid];
        let pk_list = pk
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let k_list = pk
            .iter()
            .map(|c| format!("k.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let t_list = pk
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let reference = matches!(table.role, Role::Reference(_));
        let keys: Option<String> = touched
            .get(&table.oid)
            .map(|k| format!("[{}]", k.iter().cloned().collect::<Vec<_>>().join(",")));
        if (keys.is_none() && !reference) || (reference && !recheck.contains(&table.oid)) {
            continue;
        }
        // Rows of the parent's scope at S: the touched ones, or (reference tables) all; and
        // their keys apart (the rows go to the learner as text, never parsed here).
        let key_agg = format!(
            "pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object({}))::text",
            pk.iter()
                .map(|c| format!("{}, s.{}", literal(c), quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows_sql = match &keys {
            Some(_) if !reference => {
                // `column = ANY (array)` per key column is pushed down into the scope's query,
                // where the primary key's index finds the touched rows (a semi-join against
                // the key list is not, and the planner then read the family's rows whole);
                // with several key columns the exact tuples are checked as well.
                let keyset = format!(
                    "pg_catalog.jsonb_populate_recordset(NULL::{}, $2::pg_catalog.jsonb) k",
                    table.ident
                );
                let mut conds: Vec<String> = pk
                    .iter()
                    .map(|c| {
                        format!(
                            "s.{c} = ANY (ARRAY(SELECT k.{c} FROM {keyset}))",
                            c = quote_ident(c)
                        )
                    })
                    .collect();
                if pk.len() > 1 {
                    conds.push(format!(
                        "({}) IN (SELECT {k_list} FROM {keyset})",
                        pk.iter()
                            .map(|c| format!("s.{}", quote_ident(c)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                format!(
                    "SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(s))::text, {key_agg} FROM ({}) s WHERE {}",
                    table.select_sql,
                    conds.join(" AND ")
                )
            }
            _ => format!(
                "SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(s))::text, {key_agg} FROM ({}) s",
                table.select_sql
            ),
        };
        let keys_text = keys.clone().unwrap_or_else(|| "[]".into());
        let read = select_kept_cols(
            plans,
            &rows_sql,
            &[PgBuiltInOids::TEXTOID, PgBuiltInOids::TEXTOID],
            &[t.parent.as_str().into(), keys_text.as_str().into()],
        );
        // (the rows as JSON text, their keys); no row of the scope among the keys: NULLs.
        let (rows_text, row_keys) = match read {
            Ok(mut v) if !v.is_empty() => {
                let mut cols = v.swap_remove(0).into_iter();
                (
                    cols.next().flatten().unwrap_or_else(|| "[]".into()),
                    cols.next().flatten().unwrap_or_else(|| "[]".into()),
                )
            }
            Ok(_) => ("[]".into(), "[]".into()),
            Err(e) => {
                return Step::Done(Outcome::Failed {
                    error: format!("reading {}: {e}", table.ident),
                    changes: n,
                })
            }
        };
        let rows_lit = literal(&rows_text);
        drop(rows_text);
        // The keys of the rows in scope at S.
        let in_now: BTreeSet<String> = match serde_json::from_str::<Vec<Value>>(&row_keys) {
            Ok(a) => a.iter().map(|r| key_of(pk, r)).collect(),
            Err(e) => {
                return Step::Done(Outcome::Failed {
                    error: format!("reading {}: {e}", table.ident),
                    changes: n,
                })
            }
        };
        drop(row_keys);
        if let (false, Some(upd)) = (reference, updated.get(&table.oid)) {
            let upd: BTreeSet<String> = upd
                .difference(inserted.get(&table.oid).unwrap_or(&BTreeSet::new()))
                .cloned()
                .collect();
            if !upd.is_empty() {
                let join = |keys: &BTreeSet<&String>| {
                    format!(
                        "FROM {} t JOIN pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k ON ({t_list}) = ({k_list})",
                        table.ident,
                        table.ident,
                        literal(&format!("[{}]", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",")))
                    )
                };
                // Moved out: updated, not in scope now, still on the learner. Moved in: updated,
                // in scope now, not on the learner.
                let out_keys: BTreeSet<&String> =
                    upd.iter().filter(|k| !in_now.contains(*k)).collect();
                let in_keys: BTreeSet<&String> =
                    upd.iter().filter(|k| in_now.contains(*k)).collect();
                let mut guard: Vec<String> = Vec::new();
                if !out_keys.is_empty() {
                    guard.push(format!("EXISTS (SELECT 1 {})", join(&out_keys)));
                }
                if !in_keys.is_empty() {
                    guard.push(format!(
                        "(SELECT pg_catalog.count(*) {}) <> {}",
                        join(&in_keys),
                        in_keys.len()
                    ));
                }
                let guard = if guard.is_empty() {
                    "false".to_string()
                } else {
                    guard.join(" OR ")
                };
                membership.push(MembershipCheck {
                    guard,
                    sql: format!(
                        "SELECT pg_catalog.jsonb_build_object({})::text FROM {} t \
                          JOIN pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k ON ({t_list}) = ({k_list})",
                        pk.iter().map(|c| format!("{}, t.{}", literal(c), quote_ident(c))).collect::<Vec<_>>().join(", "),
                        table.ident,
                        table.ident,
                        literal(&format!("[{}]", upd.iter().cloned().collect::<Vec<_>>().join(",")))
                    ),
                    table: table.ident.clone(),
                    pk: pk.clone(),
                    // Only asked about updated keys.
                    in_now: upd.intersection(&in_now).cloned().collect(),
                    updated: upd,
                });
            }
        }
        if reference {
            stmts.push(format!(
                "DELETE FROM {} t WHERE ({t_list}) NOT IN (SELECT {k_list} FROM pg_catalog.jsonb_populate_recordset(NULL::{}, {rows_lit}::pg_catalog.jsonb) k)",
                table.ident, table.ident
            ));
        } else if keys.is_some() {
            // Delete only the touched keys that are out of scope now. A row still in scope is
            // upserted in place: deleting and re-inserting it would fire the learner's ON DELETE
            // CASCADE / SET NULL on rows this batch does not send again.
            let gone: Vec<String> = touched[&table.oid]
                .iter()
                .filter(|k| !in_now.contains(*k))
                .cloned()
                .collect();
            if !gone.is_empty() {
                stmts.push(format!(
                    "DELETE FROM {} t USING pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k WHERE ({t_list}) = ({k_list})",
                    table.ident,
                    table.ident,
                    literal(&format!("[{}]", gone.join(",")))
                ));
            }
        }
        if !in_now.is_empty() {
            let cols = table.columns.join(", ");
            let set: Vec<String> = table
                .columns
                .iter()
                .filter(|c| !pk.iter().any(|p| quote_ident(p) == **c || p == *c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let action = if set.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", set.join(", "))
            };
            stmts.push(format!(
                "INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM pg_catalog.jsonb_populate_recordset(NULL::{}, {rows_lit}::pg_catalog.jsonb) \
                 ON CONFLICT ({pk_list}) DO {action}",
                table.ident, table.ident
            ));
        }
    }
    Step::Send(Batch {
        stmts,
        membership,
        n,
    })
}

/// What a pass does for one target: an outcome already known, or a batch to send.
enum Step {
    Done(Outcome),
    Send(Batch),
}

struct Batch {
    stmts: Vec<String>,
    membership: Vec<MembershipCheck>,
    n: i64,
}

/// A batch the learner committed. The `stream_ack_lost` failpoint (tests) makes the platform
/// miss the acknowledgement once, as if the connection had dropped after the commit.
fn acknowledged(st: &mut State, target: i64, n: i64) -> Outcome {
    if crate::failpoint::fires("stream_ack_lost") {
        st.conns.remove(&target);
        return Outcome::Failed {
            error: "failpoint stream_ack_lost: the batch's acknowledgement was lost".into(),
            changes: n,
        };
    }
    Outcome::Applied { changes: n }
}

/// A learner error for a batch: refused by the learner itself (a key or constraint its copy no
/// longer agrees with, a table or column changed there) means a new snapshot, since retrying
/// the same batch cannot help; anything else backs off and retries.
fn refused(e: JobError, n: i64) -> Outcome {
    if e.sqlstate.starts_with("23") || (e.sqlstate.starts_with("42") && e.sqlstate != "42501") {
        Outcome::Resnapshot(format!(
            "the learner refused a batch ({}): {}",
            e.sqlstate, e.message
        ))
    } else {
        Outcome::Failed {
            error: e.describe(),
            changes: n,
        }
    }
}

/// The key of a row (or row image) as canonical JSON text: the primary key columns only.
fn key_of(pk: &[String], row: &Value) -> String {
    key_value(pk, row).to_string()
}

/// The primary key columns of a row image.
fn key_value(pk: &[String], row: &Value) -> Value {
    Value::Object(
        pk.iter()
            .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
            .collect(),
    )
}

/// Updated rows of one table: which of them the learner holds (`sql`, run there) against
/// which are in the parent's scope now.
struct MembershipCheck {
    table: String,
    pk: Vec<String>,
    sql: String,
    /// The same check as a condition for the learner itself (true: a row moved), for the one
    /// round trip path.
    guard: String,
    updated: BTreeSet<String>,
    in_now: BTreeSet<String>,
}

/// Send the pass's batches: every learner transaction in flight at once, two round trips each
/// (begin + read the position + the moved-rows checks; then the statements + the new position +
/// COMMIT, or ROLLBACK), with the decisions in between taken here, on the main thread.
fn deliver(
    rt: &tokio::runtime::Runtime,
    st: &mut State,
    s: &str,
    steps: Vec<(Target, Step)>,
) -> Vec<(Target, Outcome)> {
    let timeout = gucs::network_timeout();
    let mut out: Vec<(Target, Outcome)> = Vec::new();
    let mut sends: Vec<(Target, Batch)> = Vec::new();
    for (t, step) in steps {
        match step {
            Step::Done(o) => out.push((t, o)),
            Step::Send(b) => sends.push((t, b)),
        }
    }
    // Connected in pass() before their batch was built.
    let mut connected = Vec::new();
    for (t, b) in sends {
        if st.conns.contains_key(&t.id) {
            st.used.insert(t.id, Instant::now());
            connected.push((t, b));
        } else {
            out.push((t, Outcome::Again));
        }
    }
    // Targets whose learner is where the platform last put it (nearly always) get their batch
    // in ONE round trip: the checks run on the learner, in a DO block that aborts the
    // transaction when they fail. The others, and those whose guard just failed, take the
    // careful path below (two round trips, the decisions taken here).
    let (quick, sends): (Vec<(Target, Batch)>, Vec<(Target, Batch)>) = connected
        .into_iter()
        .partition(|(t, _)| !t.learner_position.is_empty() && !st.careful.contains(&t.id));
    out.extend(deliver_quick(rt, st, s, quick));
    if sends.is_empty() {
        return out;
    }
    let ms = timeout.as_millis();
    // 1. Begin, read the learner's position, check the updated rows, all learners at once.
    let firsts: Vec<Result<Vec<Vec<String>>, JobError>> = {
        let conns = &st.conns;
        let futs = sends.iter().map(|(t, b)| {
            let mut sql = format!(
                "BEGIN; SET LOCAL search_path = pg_catalog; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
                 SET LOCAL TimeZone = 'UTC'; SET LOCAL lock_timeout = '{ms}ms'; SET CONSTRAINTS ALL DEFERRED; \
                 SELECT position FROM poco_sync.position FOR UPDATE"
            );
            for m in &b.membership {
                sql.push_str(";\n");
                sql.push_str(&m.sql);
            }
            let selects = 1 + b.membership.len();
            let client = &conns[&t.id];
            net::step("starting a batch", timeout, &stopping, async move {
                let msgs = client.simple_query(&sql).await.map_err(|e| JobError::learner("starting a batch", &e))?;
                // One row set per statement; the SELECTs are the last ones.
                let mut sets: Vec<Vec<String>> = Vec::new();
                let mut cur: Vec<String> = Vec::new();
                for m in msgs {
                    match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => cur.push(r.get(0).unwrap_or_default().to_string()),
                        tokio_postgres::SimpleQueryMessage::CommandComplete(_) => sets.push(std::mem::take(&mut cur)),
                        _ => {}
                    }
                }
                Ok(sets.split_off(sets.len().saturating_sub(selects)))
            })
        });
        rt.block_on(futures_util::future::join_all(futs))
    };
    // 2. Decide, here (the position check reads the platform's snapshots).
    let mut seconds: Vec<(Target, Batch, Option<String>)> = Vec::new(); // None: roll back
    let mut decided: BTreeMap<i64, Outcome> = BTreeMap::new(); // rolled back, for this reason
    for ((t, b), first) in sends.into_iter().zip(firsts) {
        let sets = match first {
            Ok(sets) => sets,
            Err(e) => {
                // The position table missing or unreadable: the learner is not a copy we know.
                st.conns.remove(&t.id);
                let o = if e.sqlstate.starts_with("42") && e.sqlstate != "42501" {
                    Outcome::Resnapshot(format!(
                        "the learner's poco_sync.position cannot be read ({})",
                        e.message
                    ))
                } else {
                    Outcome::Failed {
                        error: e.describe(),
                        changes: b.n,
                    }
                };
                out.push((t, o));
                continue;
            }
        };
        let at = sets.first().and_then(|r| r.first()).cloned();
        if at.as_deref() == Some(s) {
            // Applied before; the acknowledgement was lost.
            seconds.push((t, b, None));
            continue;
        }
        // The learner may be past the position last recorded here (a lost acknowledgement): a
        // batch that starts earlier and ends at S still gives it exactly the state at S
        // (touched keys are read in S), so it applies when the learner's position lies between
        // the recorded one and S.
        let between = at.as_deref().is_some_and(|a| {
            Spi::get_one_with_args::<bool>(
                "SELECT poco.snapshot_covers($1::pg_catalog.pg_snapshot, $2::pg_catalog.pg_snapshot) \
                    AND poco.snapshot_covers($3::pg_catalog.pg_snapshot, $1::pg_catalog.pg_snapshot)",
                &[a.into(), t.learner_position.as_str().into(), s.into()],
            )
            .ok()
            .flatten()
            .unwrap_or(false)
        });
        if !between {
            let why = format!(
                "the learner's poco_sync.position is not the one last written ({})",
                if at.is_some() {
                    "another snapshot"
                } else {
                    "missing"
                }
            );
            decided.insert(t.id, Outcome::Resnapshot(why));
            seconds.push((t, b, None));
            continue;
        }
        // An updated row that changed family (it is here and out of scope now, or in scope now
        // and not here) moved what it owns with it: first version, a new snapshot of the target.
        let mut moved: Option<String> = None;
        for (m, rows) in b.membership.iter().zip(sets.iter().skip(1)) {
            let here: BTreeSet<String> = rows
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(r).ok())
                .map(|v| key_of(&m.pk, &v))
                .collect();
            let moved_out = here.iter().any(|k| !m.in_now.contains(k));
            let moved_in = m
                .updated
                .iter()
                .any(|k| m.in_now.contains(k) && !here.contains(k));
            if moved_out || moved_in {
                moved = Some(format!(
                    "a row of {} moved {} this family, with what it owns",
                    m.table,
                    if moved_out { "out of" } else { "into" }
                ));
                break;
            }
        }
        if let Some(why) = moved {
            decided.insert(t.id, Outcome::Resnapshot(why));
            seconds.push((t, b, None));
            continue;
        }
        let mut all = b.stmts.clone();
        all.push(format!(
            "UPDATE poco_sync.position SET position = {}, updated_at = pg_catalog.now(), batches = batches + 1",
            literal(s)
        ));
        all.push("COMMIT".into());
        seconds.push((t, b, Some(all.join(";\n"))));
    }
    // 3. Commit (or roll back), all learners at once.
    let results: Vec<Result<(), JobError>> = {
        let conns = &st.conns;
        let futs = seconds.iter().map(|(t, _, sql)| {
            let client = &conns[&t.id];
            let sql = sql.clone().unwrap_or_else(|| "ROLLBACK".into());
            net::step("applying a batch", timeout, &stopping, async move {
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| JobError::learner("applying a batch", &e))
            })
        });
        rt.block_on(futures_util::future::join_all(futs))
    };
    for ((t, b, sql), r) in seconds.into_iter().zip(results) {
        let o = match (decided.remove(&t.id), r) {
            (Some(o), _) => o, // rolled back: the decision stands
            (None, Err(e)) => {
                st.conns.remove(&t.id);
                refused(e, b.n)
            }
            (None, Ok(())) if sql.is_some() => acknowledged(st, t.id, b.n),
            (None, Ok(())) => Outcome::Applied { changes: 0 }, // already there
        };
        out.push((t, o));
    }
    out
}

/// Marks the one round trip path's own refusals on the learner.
const GUARD: &str = "poco_sync guard: ";

/// The one round trip path: BEGIN, a DO block that checks the learner's position (the one
/// last written) and the moved-rows conditions, the statements, the new position, COMMIT.
fn deliver_quick(
    rt: &tokio::runtime::Runtime,
    st: &mut State,
    s: &str,
    quick: Vec<(Target, Batch)>,
) -> Vec<(Target, Outcome)> {
    if quick.is_empty() {
        return Vec::new();
    }
    let timeout = gucs::network_timeout();
    let ms = timeout.as_millis();
    let sqls: Vec<Option<String>> = quick
        .iter()
        .map(|(t, b)| {
            let mut body = format!(
                "IF (SELECT p.position::text FROM poco_sync.position p FOR UPDATE) IS DISTINCT FROM {} THEN \
                   RAISE EXCEPTION '{GUARD}position'; END IF;",
                literal(&t.learner_position)
            );
            for m in &b.membership {
                body.push_str(&format!(
                    "\nIF {} THEN RAISE EXCEPTION '{GUARD}moved %', {}; END IF;",
                    m.guard,
                    literal(&m.table)
                ));
            }
            if body.contains("$poco_guard$") {
                return None; // cannot be quoted this way: the careful path
            }
            let mut all = vec![format!(
                "BEGIN; SET LOCAL search_path = pg_catalog; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
                 SET LOCAL TimeZone = 'UTC'; SET LOCAL lock_timeout = '{ms}ms'; SET CONSTRAINTS ALL DEFERRED; \
                 DO $poco_guard$ BEGIN {body} END $poco_guard$"
            )];
            all.extend(b.stmts.iter().cloned());
            all.push(format!(
                "UPDATE poco_sync.position SET position = {}, updated_at = pg_catalog.now(), batches = batches + 1",
                literal(s)
            ));
            all.push("COMMIT".into());
            Some(all.join(";\n"))
        })
        .collect();
    let results: Vec<Option<Result<(), JobError>>> = {
        let conns = &st.conns;
        let futs = quick.iter().zip(&sqls).map(|((t, _), sql)| {
            let client = &conns[&t.id];
            async move {
                let sql = sql.as_ref()?;
                Some(
                    net::step("applying a batch", timeout, &stopping, async move {
                        client
                            .batch_execute(sql)
                            .await
                            .map_err(|e| JobError::learner("applying a batch", &e))
                    })
                    .await,
                )
            }
        });
        rt.block_on(futures_util::future::join_all(futs))
    };
    let mut out = Vec::new();
    let mut rollback: Vec<i64> = Vec::new();
    for ((t, b), r) in quick.into_iter().zip(results) {
        let o = match r {
            None => {
                st.careful.insert(t.id);
                Outcome::Again
            }
            Some(Ok(())) => acknowledged(st, t.id, b.n),
            Some(Err(e)) => {
                // The transaction is aborted on the learner: roll it back (or drop the
                // connection if that fails too).
                rollback.push(t.id);
                if let Some(what) = e.message.split(GUARD).nth(1) {
                    if what.starts_with("moved") {
                        Outcome::Resnapshot(format!(
                            "a row of {} moved, with what it owns",
                            what.trim_start_matches("moved ").trim()
                        ))
                    } else {
                        st.careful.insert(t.id);
                        Outcome::Again
                    }
                } else if e.sqlstate == "42704" || e.sqlstate == "0A000" {
                    // No plpgsql (DO) on this learner: the careful path from now on.
                    st.careful.insert(t.id);
                    Outcome::Again
                } else {
                    refused(e, b.n)
                }
            }
        };
        out.push((t, o));
    }
    if !rollback.is_empty() {
        let done: Vec<Result<(), JobError>> = {
            let conns = &st.conns;
            let futs = rollback
                .iter()
                .filter(|id| conns.contains_key(id))
                .map(|id| {
                    let client = &conns[id];
                    net::step("rolling back", timeout, &stopping, async move {
                        client
                            .batch_execute("ROLLBACK")
                            .await
                            .map_err(|e| JobError::learner("rolling back", &e))
                    })
                });
            rt.block_on(futures_util::future::join_all(futs))
        };
        let ids: Vec<i64> = rollback
            .iter()
            .copied()
            .filter(|id| st.conns.contains_key(id))
            .collect();
        for (id, r) in ids.into_iter().zip(done) {
            if r.is_err() {
                st.conns.remove(&id);
            }
        }
    }
    out
}

/// A connection being opened in the background (State::connecting).
type Connecting = tokio::task::JoinHandle<Result<tokio_postgres::Client, JobError>>;

/// How long a pass waits for the connections it has just started (loopback and nearby
/// learners answer within it; a slow one is picked up by a later pass, and a black-holed one
/// costs the other targets this once per try, not poco.network_timeout).
const CONNECT_WAIT: Duration = Duration::from_millis(200);

/// Connections for `targets` that have none: opened concurrently in the background (after a
/// restart a hundred learners would otherwise wait for each other, and a learner that does
/// not answer would hold up every other target). Returns the targets whose attempt failed;
/// those still connecting are in neither `st.conns` nor the result.
fn connect_all(
    rt: &tokio::runtime::Runtime,
    st: &mut State,
    targets: &[&Target],
) -> HashMap<i64, JobError> {
    let mut failed: HashMap<i64, JobError> = HashMap::new();
    let need: Vec<&Target> = targets
        .iter()
        .copied()
        .filter(|t| !st.conns.get(&t.id).is_some_and(|c| !c.is_closed()))
        .collect();
    if need.is_empty() {
        return failed;
    }
    let timeout = gucs::network_timeout();
    let start: Vec<&Target> = need
        .iter()
        .copied()
        .filter(|t| !st.connecting.contains_key(&t.id))
        .collect();
    if !start.is_empty() {
        match keys::current() {
            Ok(key) => {
                let allow_private = gucs::allow_private_targets();
                // What to connect with is read here (SPI, this thread).
                for t in &start {
                    let loaded = catalog::load_target(t.id).and_then(|target| {
                        crate::targets::poco::open_credentials(t.id, &key)
                            .map(|password| (target.spec, password))
                    });
                    match loaded {
                        Ok((spec, password)) => {
                            let task = rt.spawn(async move {
                                let connect = net::connect(
                                    &spec,
                                    password.as_deref(),
                                    allow_private,
                                    timeout,
                                    "poco_sync stream",
                                );
                                match tokio::time::timeout(timeout * 2, connect).await {
                                    Ok(r) => r,
                                    Err(_) => Err(JobError::transient(
                                        "57014",
                                        format!(
                                            "learner: connect: no answer within {} ms (poco.network_timeout)",
                                            (timeout * 2).as_millis()
                                        ),
                                    )),
                                }
                            });
                            st.connecting.insert(t.id, task);
                        }
                        Err(e) => {
                            failed.insert(t.id, JobError::new(e.sqlstate().code(), e.to_string()));
                        }
                    }
                }
                // Wait a little for the ones just started.
                let fresh: Vec<i64> = start.iter().map(|t| t.id).collect();
                let deadline = Instant::now() + CONNECT_WAIT;
                let connecting = &st.connecting;
                rt.block_on(async {
                    while Instant::now() < deadline
                        && fresh
                            .iter()
                            .any(|id| connecting.get(id).is_some_and(|h| !h.is_finished()))
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
            }
            Err(e) => {
                for t in &start {
                    failed.insert(t.id, JobError::new(e.sqlstate().code(), e.to_string()));
                }
            }
        }
    }
    for t in need {
        if !st.connecting.get(&t.id).is_some_and(|h| h.is_finished()) {
            continue; // still connecting (or never started: failed above)
        }
        let task = st.connecting.remove(&t.id).expect("checked above");
        match rt.block_on(task) {
            Ok(Ok(client)) => {
                st.conns.insert(t.id, client);
                st.used.insert(t.id, Instant::now());
            }
            Ok(Err(e)) => {
                failed.insert(t.id, e);
            }
            Err(e) => {
                failed.insert(
                    t.id,
                    JobError::new("XX000", format!("connecting to the learner: {e}")),
                );
            }
        }
    }
    failed
}

/// Record the pass on the platform, and prune what every target has.
fn record(st: &mut State, s: &str, results: &[(Target, Outcome)]) {
    // Targets with nothing to send reached S: noted here, recorded later (State::ahead).
    for (t, o) in results {
        match o {
            Outcome::Advanced => {
                st.retry_at.remove(&t.id);
                st.ahead.insert(t.id, (t.recorded.clone(), s.to_string()));
            }
            Outcome::Applied { .. } => {
                st.retry_at.remove(&t.id);
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
        .filter(|(_, o)| matches!(o, Outcome::Applied { .. }))
        .map(|(t, _)| (t.id, t.recorded.clone(), s.to_string()))
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
    for (moved, learner) in [
        (applied, "learner_position = m.to_position::pg_catalog.pg_snapshot, last_applied_at = pg_catalog.now(), last_sync_error = NULL,"),
        (reached, ""),
    ] {
        if moved.is_empty() {
            continue;
        }
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
    for (t, o) in results {
        match o {
            Outcome::Advanced | Outcome::Again => {}
            Outcome::Applied { changes } => {
                st.careful.remove(&t.id);
                debug1!(
                    "poco_sync stream: target {}: {changes} changes applied",
                    t.id
                );
            }
            Outcome::Resnapshot(why) => {
                st.retry_at.remove(&t.id);
                st.careful.remove(&t.id);
                resnapshot(t.id, why);
            }
            Outcome::Failed { error, changes } => {
                let tries = st.retry_at.get(&t.id).map(|x| x.1).unwrap_or(0) + 1;
                let wait =
                    poco_core::learner::backoff_ms(gucs::retry_delay_ms(), tries).min(10_000);
                st.retry_at
                    .insert(t.id, (Instant::now() + Duration::from_millis(wait), tries));
                Spi::run_with_args(
                    "UPDATE poco.target SET last_sync_error = $2, sync_lag = CASE WHEN $3 < 0 THEN sync_lag ELSE $3 END WHERE id = $1",
                    &[t.id.into(), error.as_str().into(), (*changes).into()],
                )
                .ok();
                if tries == 1 {
                    log!("poco_sync stream: target {}: {error}", t.id);
                }
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

/// Changes every continuous target has (or will not need: below the position of a target
/// waiting for a snapshot) are no longer needed.
fn prune() {
    Spi::run(
        "DELETE FROM poco.change WHERE txid < (SELECT pg_catalog.min(pg_catalog.pg_snapshot_xmin(sync_position)::text::bigint) \
           FROM poco.target WHERE continuous AND sync_position IS NOT NULL)",
    )
    .ok();
}

/// Start a target over with a full snapshot (poco.resnapshot: state, event, the push job).
fn resnapshot(target: i64, why: &str) {
    if let Err(e) = Spi::run_with_args(
        "SELECT poco.resnapshot($1, $2)",
        &[target.into(), why.into()],
    ) {
        log!("poco_sync stream: target {target}: could not queue its re-snapshot: {e}");
    }
}

/// Once a second: targets whose snapshot failed are tried again (with backoff), and targets
/// whose backlog passed poco.sync_max_backlog(_age) are re-snapshotted instead of holding the
/// log. Returns whether any target syncs continuously.
fn maintain(st: &mut State) -> bool {
    if st
        .maintained_at
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return st.any_continuous;
    }
    st.maintained_at = Some(Instant::now());
    let (max_rows, max_age) = gucs::sync_max_backlog();
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        // (id, state, seconds since the position moved, position)
        let rows: Vec<(i64, String, f64, String)> = Spi::connect(|c| {
            c.select(
                "SELECT t.id, t.sync_state, extract(epoch FROM pg_catalog.now() - coalesce(t.sync_position_at, pg_catalog.now()))::float8, \
                        coalesce(t.sync_position::text, '') \
                   FROM poco.target t \
                  WHERE t.continuous AND t.sync_state IN ('streaming', 'error') AND t.id % $2 = $1 \
                    AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) \
                  ORDER BY t.id",
                None,
                &[st.part.into(), st.parts.into()],
            )
            .map(|rows| {
                rows.map(|r| {
                    (
                        r.get::<i64>(1).ok().flatten().unwrap_or(0),
                        r.get::<String>(2).ok().flatten().unwrap_or_default(),
                        r.get::<f64>(3).ok().flatten().unwrap_or(0.0),
                        r.get::<String>(4).ok().flatten().unwrap_or_default(),
                    )
                })
                .collect()
            })
            .unwrap_or_default()
        });
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
                let n = *counted.entry(position.clone()).or_insert_with(|| {
                    Spi::get_one_with_args::<i64>(
                        "SELECT count(*) FROM (SELECT 1 FROM poco.change \
                          WHERE txid >= pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)::text::bigint \
                            AND NOT pg_catalog.pg_visible_in_snapshot(txid::text::pg_catalog.xid8, $1::pg_catalog.pg_snapshot) LIMIT $2) x",
                        &[position.as_str().into(), (max_rows + 1).into()],
                    )
                    .ok()
                    .flatten()
                    .unwrap_or(0)
                });
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
        }
        st.any_continuous =
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM poco.target WHERE continuous)")
                .ok()
                .flatten()
                .unwrap_or(false);
        st.any_continuous
    }))
}
