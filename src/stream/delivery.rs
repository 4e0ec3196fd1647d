//! Delivery: learner connections, and the batches sent to them (one round trip, or the
//! careful two).

use super::*;

/// A batch the learner committed. The `stream_ack_lost` failpoint (tests) makes the platform
/// miss the acknowledgement once, as if the connection had dropped after the commit.
pub(super) fn acknowledged(st: &mut State, target: i64, n: i64, at: &str) -> Outcome {
    if crate::failpoint::fires("stream_ack_lost") {
        st.conns.remove(&target);
        return Outcome::Failed {
            error: "failpoint stream_ack_lost: the batch's acknowledgement was lost".into(),
            changes: n,
        };
    }
    Outcome::Applied {
        changes: n,
        at: at.to_string(),
    }
}

/// How a re-snapshot for a learner's refusal says so (positions.rs backs these off).
pub(super) const REFUSED: &str = "the learner refused a batch";

/// A learner error for a batch: refused by the learner itself (a key or constraint its copy no
/// longer agrees with, a table or column changed there) means a new snapshot, since retrying
/// the same batch cannot help; anything else backs off and retries.
pub(super) fn refused(e: JobError, n: i64) -> Outcome {
    if e.sqlstate.starts_with("23") || (e.sqlstate.starts_with("42") && e.sqlstate != "42501") {
        Outcome::Resnapshot(format!("{REFUSED} ({}): {}", e.sqlstate, e.message))
    } else {
        Outcome::Failed {
            error: e.describe(),
            changes: n,
        }
    }
}

/// Send the pass's batches: every learner transaction in flight at once, two round trips each
/// (begin + read the position + the moved-rows checks; then the statements + the new position +
/// COMMIT, or ROLLBACK), with the decisions in between taken here, on the main thread.
pub(super) fn deliver(
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
                "{}; SELECT pg_catalog.left(position::text, 100000) FROM poco_sync.position LIMIT 2 FOR UPDATE",
                batch_begin(ms)
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
            BackgroundWorker::transaction(|| Spi::get_one_with_args::<bool>(
                "SELECT poco.snapshot_covers($1::pg_catalog.pg_snapshot, $2::pg_catalog.pg_snapshot) \
                    AND poco.snapshot_covers($3::pg_catalog.pg_snapshot, $1::pg_catalog.pg_snapshot)",
                &[a.into(), t.learner_position.as_str().into(), s.into()],
            ))
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
            (None, Ok(())) if sql.is_some() => acknowledged(st, t.id, b.n, s),
            (None, Ok(())) => Outcome::Applied {
                changes: 0,
                at: s.to_string(),
            }, // already there
        };
        out.push((t, o));
    }
    out
}

/// How a batch's learner transaction begins: the session settings its text forms need (the
/// keys it compares are text), a lock wait bounded by poco.network_timeout, and foreign keys
/// checked at its commit.
fn batch_begin(lock_timeout_ms: u128) -> String {
    format!(
        "BEGIN; SET LOCAL search_path = pg_catalog; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
         SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = 'hex'; \
         SET LOCAL lock_timeout = '{lock_timeout_ms}ms'; SET CONSTRAINTS ALL DEFERRED"
    )
}

/// Marks the one round trip path's own refusals on the learner.
pub(super) const GUARD: &str = "poco_sync guard: ";

/// The one round trip path: BEGIN, a DO block that checks the learner's position (the one
/// last written) and the moved-rows conditions, the statements, the new position, COMMIT.
pub(super) fn deliver_quick(
    rt: &tokio::runtime::Runtime,
    st: &mut State,
    s: &str,
    quick: Vec<(Target, Batch)>,
) -> Vec<(Target, Outcome)> {
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
                "{}; DO $poco_guard$ BEGIN {body} END $poco_guard$",
                batch_begin(ms)
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
    // Each batch goes on a task of its own; those that end soon (nearly all) are taken in
    // this pass, a slow learner's stays in flight and a later pass takes its outcome.
    let mut out = Vec::new();
    let mut sent: Vec<i64> = Vec::new();
    for ((t, b), sql) in quick.into_iter().zip(sqls) {
        let Some(sql) = sql else {
            st.careful.insert(t.id);
            out.push((t, Outcome::Again));
            continue;
        };
        let client = st.conns[&t.id].clone();
        let task = rt.spawn(async move {
            let r = net::step_bg("applying a batch", timeout, async {
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| JobError::learner("applying a batch", &e))
            })
            .await;
            // An error leaves the learner's transaction aborted: roll it back, or say the
            // connection is not to be used again.
            let usable = match &r {
                Ok(()) => true,
                Err(_) => net::step_bg("rolling back", timeout, async {
                    client
                        .batch_execute("ROLLBACK")
                        .await
                        .map_err(|e| JobError::learner("rolling back", &e))
                })
                .await
                .is_ok(),
            };
            (r, usable)
        });
        sent.push(t.id);
        st.in_flight.insert(
            t.id,
            InFlight {
                target: t,
                n: b.n,
                at: s.to_string(),
                task,
                sent: Instant::now(),
            },
        );
    }
    let deadline = Instant::now() + QUICK_WAIT;
    rt.block_on(async {
        while Instant::now() < deadline
            && sent
                .iter()
                .any(|id| st.in_flight.get(id).is_some_and(|f| !f.task.is_finished()))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    out.extend(harvest(rt, st));
    out
}

/// How long a pass waits for the batches it sent in one round trip before it goes on (a
/// learner that takes longer, reading slowly or held up by its own locks, answers a later
/// pass; meanwhile its target is left out of the passes, and nothing of it holds the others
/// or the platform: the batch was built and its snapshot released before it was sent).
const QUICK_WAIT: Duration = Duration::from_millis(250);

/// A batch sent in one round trip, not answered yet.
pub(super) struct InFlight {
    pub(super) target: Target,
    pub(super) n: i64,
    /// The position the batch brings the learner to.
    pub(super) at: String,
    pub(super) task: tokio::task::JoinHandle<(Result<(), JobError>, bool)>,
    pub(super) sent: Instant,
}

/// The outcomes of the batches in flight that have ended.
pub(super) fn harvest(rt: &tokio::runtime::Runtime, st: &mut State) -> Vec<(Target, Outcome)> {
    let done: Vec<i64> = st
        .in_flight
        .iter()
        .filter(|(_, f)| f.task.is_finished())
        .map(|(id, _)| *id)
        .collect();
    let mut out = Vec::new();
    for id in done {
        let f = st.in_flight.remove(&id).expect("listed above");
        let (r, usable) = rt.block_on(f.task).unwrap_or_else(|e| {
            (
                Err(JobError::new("XX000", format!("sending the batch: {e}"))),
                false,
            )
        });
        if !usable {
            st.conns.remove(&id);
        }
        let t = f.target;
        let o = match r {
            Ok(()) => acknowledged(st, t.id, f.n, &f.at),
            Err(e) => {
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
                    if f.sent.elapsed() > QUICK_WAIT {
                        debug1!(
                            "poco_sync stream: target {}: a batch answered after {} ms",
                            t.id,
                            f.sent.elapsed().as_millis()
                        );
                    }
                    refused(e, f.n)
                }
            }
        };
        out.push((t, o));
    }
    out
}

/// A connection being opened in the background (State::connecting).
pub(super) type Connecting = tokio::task::JoinHandle<Result<tokio_postgres::Client, JobError>>;

/// How long a pass waits for the connections it has just started (loopback and nearby
/// learners answer within it; a slow one is picked up by a later pass, and a black-holed one
/// costs the other targets this once per try, not poco.network_timeout). Short: the pass
/// holds its platform snapshot meanwhile.
pub(super) const CONNECT_WAIT: Duration = Duration::from_millis(20);

/// Connections for `targets` that have none: opened concurrently in the background (after a
/// restart a hundred learners would otherwise wait for each other, and a learner that does
/// not answer would hold up every other target). Returns the targets whose attempt failed;
/// those still connecting are in neither `st.conns` nor the result.
pub(super) fn connect_all(
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
                let root_dir = gucs::ssl_root_cert_dir();
                // What to connect with is read here (SPI, this thread).
                for t in &start {
                    let loaded = catalog::load_target(t.id).and_then(|target| {
                        crate::targets::poco::open_credentials(t.id, &key)
                            .map(|password| (target.spec, password))
                    });
                    match loaded {
                        Ok((spec, password)) => {
                            let root_dir = root_dir.clone();
                            let task = rt.spawn(async move {
                                let connect = net::connect(
                                    &spec,
                                    password.as_deref(),
                                    allow_private,
                                    root_dir,
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
                st.conns.insert(t.id, std::sync::Arc::new(client));
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
