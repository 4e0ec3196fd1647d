//! Continuous sync over a target's life (issue #5): a snapshot that failed is tried again by
//! itself; a learner down past the backlog limit is re-snapshotted by itself when it comes
//! back; schema and scope changes on the platform reach the learner without a hand; the
//! platform killed (kill -9) while it streams loses and duplicates nothing.

use poco_e2e::{assert_learner_equals_scope, enable_sync, learner, sample_platform, wait_for, Db};
use std::collections::BTreeMap;
use std::time::Duration;

fn state(db: &Db, t: i64) -> String {
    db.value(&format!(
        "SELECT state FROM poco_status(21) WHERE target_id = {t}"
    ))
    .unwrap_or_default()
}

fn synced(db: &Db, t: i64, limit: &str) -> bool {
    db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
        .as_deref()
        == Some("t")
}

#[test]
fn a_failed_snapshot_and_a_learner_past_the_backlog_limit_recover_by_themselves() {
    let (platform, db) = sample_platform("sync_backlog", 20);
    db.execute("ALTER SYSTEM SET poco.retry_delay = '100ms'");
    db.execute("ALTER SYSTEM SET poco.push_attempts = 1");
    db.execute("ALTER SYSTEM SET poco.sync_max_backlog = 5");
    platform.reload();
    let l = learner("sync_backlog_learner");
    let url = l.target_url("family", "postgres", "pw");

    // 1. The learner is down when sync is enabled: the first snapshot fails and shows it.
    l.stop("fast");
    let t: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    assert!(
        wait_for(Duration::from_secs(30), || Some(state(&db, t))
            .filter(|s| s == "error"))
        .is_some(),
        "{}",
        state(&db, t)
    );
    assert!(
        !synced(&db, t, "200 ms"),
        "no sync while the first snapshot has not succeeded"
    );
    // Changes meanwhile are not lost: the next snapshot includes them.
    db.execute(
        "UPDATE elearning.users SET display_name = 'while the first snapshot failed' WHERE id = 21",
    );
    // Back up: the snapshot is tried again by itself and the target streams.
    l.start_again();
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    let retried: i64 = db.query(&format!(
        "SELECT count(*) FROM poco.job WHERE target_id = {t}"
    ))[0]
        .get(0);
    assert!(
        retried >= 2,
        "the snapshot was queued again ({retried} jobs)"
    );

    // 2. Down again while more changes than poco.sync_max_backlog (5) pile up.
    drop(ldb);
    l.stop("fast");
    db.execute("INSERT INTO elearning.audit_log (user_id, action) SELECT 21, 'backlog ' || g FROM generate_series(1, 20) g");
    db.execute("UPDATE elearning.users SET display_name = 'past the backlog limit' WHERE id = 21");
    // The target gives up its backlog (the log is pruned) and waits for a new snapshot.
    let gave_up = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT 1 FROM poco.events WHERE kind = 'sync_resnapshot' AND target_id = {t} AND message LIKE '%sync_max_backlog%'"
        ))
    });
    assert!(
        gave_up.is_some(),
        "re-snapshot decided for the backlog limit ({})",
        state(&db, t)
    );
    let pruned = wait_for(Duration::from_secs(10), || {
        db.value("SELECT count(*) FROM poco.change")
            .filter(|n| n == "0")
    });
    assert!(
        pruned.is_some(),
        "the backlog of a target waiting for a snapshot is not kept"
    );
    assert!(!synced(&db, t, "200 ms"));
    db.execute("DELETE FROM elearning.audit_log WHERE action = 'backlog 3'");
    // Back up: re-snapshotted by itself, exact, and streaming again.
    l.start_again();
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    db.execute("UPDATE elearning.users SET display_name = 'streaming again' WHERE id = 21");
    assert!(synced(&db, t, "30 s"));
    assert_eq!(
        ldb.value("SELECT display_name FROM elearning.users WHERE id = 21")
            .as_deref(),
        Some("streaming again")
    );
    assert_eq!(state(&db, t), "streaming");

    // 3. Learner up, but one transaction brings more changes than the limit: that batch is
    //    not held in memory; a re-snapshot replaces it, and the learner ends exact.
    db.execute("INSERT INTO elearning.audit_log (user_id, action) SELECT 21, 'one big batch ' || g FROM generate_series(1, 20) g");
    let replaced = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT 1 FROM poco.events WHERE kind = 'sync_resnapshot' AND target_id = {t} AND message LIKE '%in one batch%'"
        ))
    });
    assert!(
        replaced.is_some(),
        "a batch past the limit became a re-snapshot"
    );
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    assert_learner_equals_scope(&db, &l.connect("family"), "21");
}

#[test]
fn schema_and_scope_changes_reach_the_learner_without_a_hand() {
    let (_platform, db) = sample_platform("sync_schema", 20);
    let l = learner("sync_schema_learner");
    let t = enable_sync(&db, "21", &l);
    assert!(synced(&db, t, "1 min"));
    let ldb = l.connect("family");
    let columns = |d: &Db, table: &str| {
        d.value(&format!(
            "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns \
              WHERE table_schema = 'elearning' AND table_name = '{table}'"
        ))
        .unwrap_or_default()
    };

    // A column added (with a default that fills every row) and then used.
    db.execute("ALTER TABLE elearning.audit_log ADD COLUMN source text NOT NULL DEFAULT 'web'");
    db.execute("INSERT INTO elearning.audit_log (user_id, action, source) VALUES (21, 'from the app', 'app')");
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    assert!(
        columns(&ldb, "audit_log").contains("source text"),
        "{}",
        columns(&ldb, "audit_log")
    );
    assert_learner_equals_scope(&db, &ldb, "21");

    // A column's type changed (the learner would refuse or silently coerce the new values).
    db.execute("ALTER TABLE elearning.audit_log ALTER COLUMN action TYPE varchar(200)");
    db.execute("UPDATE elearning.audit_log SET action = action || ' (v2)' WHERE user_id = 21");
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    assert!(
        columns(&ldb, "audit_log").contains("action character varying"),
        "{}",
        columns(&ldb, "audit_log")
    );
    assert_learner_equals_scope(&db, &ldb, "21");

    // An enum value added and used (the learner's copy of the type lacks it).
    db.execute("ALTER TYPE elearning.user_role ADD VALUE 'tutor'");
    db.execute("UPDATE elearning.users SET role = 'tutor' WHERE id = 21");
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    assert_learner_equals_scope(&db, &ldb, "21");

    // A table added to the scope arrives, and its later changes are captured and streamed.
    db.execute(
        "CREATE TABLE elearning.badges (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
           user_id bigint NOT NULL REFERENCES elearning.users(id), name text NOT NULL)",
    );
    db.execute("INSERT INTO elearning.badges (user_id, name) SELECT id, 'first' FROM elearning.users WHERE id IN (21, 22)");
    db.execute("SELECT poco_scope_table('elearning.badges')");
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    assert_eq!(
        ldb.value("SELECT count(*) FROM elearning.badges")
            .as_deref(),
        Some("1"),
        "family 21's badge only"
    );
    db.execute("INSERT INTO elearning.badges (user_id, name) SELECT id, 'second' FROM elearning.users WHERE id IN (21, 22)");
    assert!(synced(&db, t, "30 s"));
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(
        ldb.value("SELECT string_agg(name, ',' ORDER BY id) FROM elearning.badges")
            .as_deref(),
        Some("first,second")
    );

    // An ALTER of a table outside the scope costs the target nothing.
    let resnaps = || {
        db.value(&format!(
            "SELECT count(*) FROM poco.events WHERE kind = 'sync_resnapshot' AND target_id = {t}"
        ))
        .unwrap()
    };
    let before = resnaps();
    db.execute("ALTER TABLE elearning.platform_secrets ADD COLUMN note text");
    db.execute("UPDATE elearning.users SET display_name = 'after an unscoped ALTER' WHERE id = 21");
    assert!(synced(&db, t, "30 s"));
    assert_eq!(resnaps(), before, "no re-snapshot for an unscoped table");
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(state(&db, t), "streaming");
}

#[test]
fn kill_9_at_random_moments_while_pushing_and_streaming_loses_and_duplicates_nothing() {
    // POCO_KILL_CYCLES (default 50) times, after a random pause, kill -9 of a random poco_sync
    // process (a stream, the coordinator, or a push job when one runs): the postmaster
    // restarts the whole server each time (crash recovery), the writer's sessions included.
    let cycles: usize = poco_e2e::env_or("POCO_KILL_CYCLES", 50);
    let mut seed: u64 = poco_e2e::env_or("POCO_KILL_SEED", 0x00c0_ffee);
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut opts = poco_e2e::Options::platform_verbose();
    opts.extra_conf.push("poco.retry_delay = '100ms'".into());
    let (platform, db) = poco_e2e::sample_platform_with("sync_kill", 20, &opts);
    let (la, lb, lc) = (
        learner("sync_kill_a"),
        learner("sync_kill_b"),
        learner("sync_kill_c"),
    );
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    // A third family is pushed now and then (full overwrites), not synced.
    db.execute(&format!(
        "SELECT poco_add_target(23, '{}')",
        lc.target_url("family", "postgres", poco_e2e::SECRET)
    ));
    assert!(synced(&db, ta, "1 min") && synced(&db, tb, "1 min"));
    drop(db);

    let conninfo = platform.conninfo("platform");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A writer that commits all along (inserts, updates, deletes of the three families) and
    // reconnects after each crash; what it committed is whatever the platform holds at the end.
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Every transaction recorded: committed (its COMMIT answered) or in doubt (an
            // error, as when the server was killed: it may or may not have committed).
            let mut committed: Vec<u64> = Vec::new();
            let mut in_doubt: Vec<u64> = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 1_000_000 {
                let Ok(w) = Db::try_connect(&conninfo) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 1_000_000 {
                    i += 1;
                    let fam = 21 + (i % 3);
                    let sql = format!(
                        "BEGIN; INSERT INTO elearning.audit_log (user_id, action) VALUES ({fam}, 'kill {i}'); \
                         UPDATE elearning.users SET display_name = 'kill {i}' WHERE id = {fam}; \
                         DELETE FROM elearning.audit_log WHERE user_id = {fam} AND action = 'kill {}'; COMMIT",
                        // Half the time, the same family's row of 9 transactions ago.
                        if i % 6 < 3 { i.saturating_sub(9) } else { 0 }
                    );
                    if w.try_value(&sql).is_err() {
                        in_doubt.push(i);
                        break;
                    }
                    committed.push(i);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            (committed, in_doubt)
        })
    };

    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(100 + rand(500)));
        // Back up after the last crash: the streams run again.
        let d = wait_for(Duration::from_secs(60), || {
            let d = Db::try_connect(&platform.conninfo("platform")).ok()?;
            d.value("SELECT pid FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'")?;
            Some(d)
        })
        .unwrap_or_else(|| panic!("cycle {cycle}: the platform and its streams came back"));
        if rand(4) == 0 {
            let _ = d.try_value("SELECT poco_push(23)");
            std::thread::sleep(Duration::from_millis(rand(100)));
        }
        let victims: Vec<(String, String)> = d
            .query(
                "SELECT backend_type, pid::text FROM pg_stat_activity \
                  WHERE backend_type IN ('poco_sync stream', 'poco_sync worker', 'poco_sync push') ORDER BY pid",
            )
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        drop(d);
        if victims.is_empty() {
            continue;
        }
        let (kind, pid) = &victims[rand(victims.len() as u64) as usize];
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
        *kills.entry(kind.clone()).or_default() += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (committed, in_doubt) = writer.join().unwrap();
    let total: usize = kills.values().sum();
    println!(
        "kill -9 cycles: {total} ({kills:?}); writer transactions committed: {}, in doubt: {}",
        committed.len(),
        in_doubt.len()
    );
    assert!(
        committed.len() > 50,
        "the writer kept committing ({})",
        committed.len()
    );
    assert_eq!(total, cycles, "a process was killed in every cycle");
    let crashes = platform.log().matches("terminated by signal 9").count();
    assert!(
        crashes >= cycles,
        "the postmaster saw {crashes} of the {cycles} kills"
    );

    let db = wait_for(Duration::from_secs(60), || {
        Db::try_connect(&platform.conninfo("platform")).ok()
    })
    .unwrap();
    // The pushed family: one more push after the storm, then exact.
    let job: i64 = db.query("SELECT poco_push(23)")[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '2 min')"))
            .as_deref(),
        Some("succeeded")
    );
    for (t, l, parent) in [
        (Some(ta), &la, "21"),
        (Some(tb), &lb, "22"),
        (None, &lc, "23"),
    ] {
        if let Some(t) = t {
            assert!(
                synced(&db, t, "2 min"),
                "target {t} caught up after the crashes"
            );
        }
        let ldb = l.connect("family");
        let report = poco_e2e::check_learner(&db, &ldb, parent);
        println!(
            "history checker, parent {parent}: {} rows; lost {}, duplicated {}, stale {}, leaked {}",
            report.rows, report.lost, report.duplicated, report.stale, report.leaked
        );
        assert!(report.clean(), "parent {parent}: {report:?}");
        // And against the writer's own record: each committed insert once, nothing else.
        // Transaction i inserts 'kill i'; transaction i+9 deletes it when (i+9) % 6 < 3. The
        // row is there if i committed and its deleter did not run; either way if one of them
        // is in doubt; never if the deleter committed.
        let fam: u64 = parent.parse().unwrap();
        let done: std::collections::BTreeSet<u64> = committed.iter().copied().collect();
        let doubt: std::collections::BTreeSet<u64> = in_doubt.iter().copied().collect();
        let deleter = |i: u64| Some(i + 9).filter(|j| j % 6 < 3);
        let ours = |i: &&u64| 21 + **i % 3 == fam;
        let name = |i: &u64| format!("kill {i}");
        let c: std::collections::BTreeSet<String> = done
            .iter()
            .filter(ours)
            .filter(|i| deleter(**i).is_none_or(|j| !done.contains(&j) && !doubt.contains(&j)))
            .map(name)
            .collect();
        let d: std::collections::BTreeSet<String> = done
            .iter()
            .chain(doubt.iter())
            .filter(ours)
            .filter(|i| doubt.contains(i) || deleter(**i).is_some_and(|j| doubt.contains(&j)))
            .map(name)
            .collect();
        let sql = format!(
            "SELECT action FROM elearning.audit_log WHERE user_id = {parent} AND action LIKE 'kill %'"
        );
        for (side, h) in [
            ("platform", poco_e2e::check_history(&db, &sql, &c, &d)),
            ("learner", poco_e2e::check_history(&ldb, &sql, &c, &d)),
        ] {
            println!(
                "recorded history, parent {parent}, {side}: {} committed; missing {}, duplicated {}, unexpected {}",
                h.committed, h.missing, h.duplicated, h.unexpected
            );
            assert!(
                h.clean() && h.committed > 0,
                "parent {parent}, {side}: {h:?}"
            );
        }
        // Nothing of the other families.
        assert_eq!(
            ldb.value(&format!(
                "SELECT count(*) FROM elearning.audit_log WHERE user_id IN (21, 22, 23) AND user_id <> {parent}"
            ))
            .as_deref(),
            Some("0")
        );
    }
    drop(db);
    poco_e2e::assert_secret_kept(&platform, &["poco_enable_sync(", "poco_add_target("]);
}

#[test]
fn a_target_enabled_while_another_streams_under_load_misses_nothing() {
    // The log is pruned below the oldest position while the first target streams; the second
    // target's snapshot job needs the changes committed after its own snapshot, which the
    // first target already has.
    let (platform, db) = sample_platform("sync_second", 20);
    let (la, lb) = (learner("sync_second_a"), learner("sync_second_b"));
    let ta: i64 = db.query(&format!(
        "SELECT poco_enable_sync(21, '{}')",
        la.target_url("family", "postgres", "pw")
    ))[0]
        .get(0);
    assert!(synced(&db, ta, "1 min"));
    let conninfo = platform.conninfo("platform");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let w = Db::connect(&conninfo);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 20_000 {
                i += 1;
                w.execute(&format!(
                    "INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'second {i}'), (22, 'second {i}'); \
                     UPDATE elearning.users SET display_name = 'second {i}' WHERE id IN (21, 22)"
                ));
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let tb: i64 = db.query(&format!(
        "SELECT poco_enable_sync(22, '{}')",
        lb.target_url("family", "postgres", "pw")
    ))[0]
        .get(0);
    // Keep writing while B's snapshot runs and after it.
    let _ = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT 1 FROM poco.target WHERE id = {tb} AND sync_state = 'streaming'"
        ))
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 20, "the writer kept writing ({n})");
    for (t, l, parent) in [(ta, &la, "21"), (tb, &lb, "22")] {
        assert!(synced(&db, t, "1 min"), "target {t}");
        assert_learner_equals_scope(&db, &l.connect("family"), parent);
    }
}

#[test]
fn targets_are_split_between_stream_processes_and_split_again_on_reload() {
    let (platform, db) = sample_platform("sync_split", 20);
    let (la, lb) = (learner("sync_split_a"), learner("sync_split_b"));
    let mut targets = Vec::new();
    for (parent, l) in [("21", &la), ("22", &lb)] {
        targets.push((enable_sync(&db, parent, l), parent, l));
    }
    let streams = |n: usize| {
        wait_for(Duration::from_secs(30), || {
            db.value(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'",
            )
            .filter(|c| c == &n.to_string())
        })
        .is_some()
    };
    let round = |label: &str| {
        for (t, parent, l) in &targets {
            db.execute(&format!(
                "UPDATE elearning.users SET display_name = '{label}' WHERE id = {parent}"
            ));
            assert!(synced(&db, *t, "1 min"), "target {t} ({label})");
            let ldb = l.connect("family");
            assert_eq!(
                ldb.value(&format!(
                    "SELECT display_name FROM elearning.users WHERE id = {parent}"
                ))
                .as_deref(),
                Some(label)
            );
            assert_learner_equals_scope(&db, &ldb, parent);
            // One stream, and only one, writes to each learner.
            let writers = wait_for(Duration::from_secs(10), || {
                ldb.value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poco_sync stream'")
                    .filter(|c| c == "1")
            });
            assert!(writers.is_some(), "one stream connection to target {t}");
        }
    };
    // The default splits the targets between two processes.
    assert!(streams(2), "two stream processes by default");
    round("two streams");
    assert!(platform.log().contains("poco_sync stream 2 of 2 started"));
    // Split again on reload: the old streams stop, the new ones take over, nothing is missed.
    for n in [1usize, 3] {
        db.execute(&format!("ALTER SYSTEM SET poco.sync_workers = {n}"));
        platform.reload();
        assert!(streams(n), "{n} stream processes after the reload");
        round(&format!("{n} streams"));
        assert!(platform
            .log()
            .contains(&format!("poco_sync stream {n} of {n} started")));
    }
}

#[test]
fn a_learner_that_black_holes_connections_does_not_hold_up_the_others() {
    // A stuck connection attempt lasts 2 × poco.network_timeout (40 s here); the other target
    // of the same stream must keep its usual pace meanwhile.
    let (platform, db) = sample_platform("sync_blackhole", 20);
    db.execute("ALTER SYSTEM SET poco.network_timeout = '20s'");
    db.execute("ALTER SYSTEM SET poco.sync_workers = 1");
    platform.reload();
    let (la, lb) = (learner("sync_blackhole_a"), learner("sync_blackhole_b"));
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    assert!(synced(&db, ta, "1 min") && synced(&db, tb, "1 min"));
    // Learner B goes away and its port answers TCP but never speaks (a black hole).
    lb.stop("immediate");
    let hole = std::net::TcpListener::bind(("127.0.0.1", lb.port)).expect("bind B's port");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in hole.incoming().take(50).flatten() {
                held.lock().unwrap().push(s); // keep it open, say nothing
            }
        });
    }
    // B now has a change to send: its connection attempt hangs in the black hole.
    db.execute("UPDATE elearning.users SET display_name = 'into the hole' WHERE id = 22");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !held.lock().unwrap().is_empty(),
        "the stream tried to reach B"
    );
    // A keeps syncing within its usual time, ten times over the next seconds.
    let ldb = la.connect("family");
    for i in 0..10 {
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'A {i}' WHERE id = 21"
        ));
        // (not held up by B's black hole)
        poco_e2e::assert_arrives(&db, ta, &ldb, 21, &format!("A {i}"), Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!synced(&db, tb, "10 ms"), "B cannot have synced");
}

#[test]
fn an_idle_learner_connection_is_closed_and_opened_again_with_the_next_batch() {
    let (platform, db) = sample_platform("sync_idle", 20);
    db.execute("ALTER SYSTEM SET poco.sync_idle_timeout = '1s'");
    platform.reload();
    let l = learner("sync_idle_learner");
    let t = enable_sync(&db, "21", &l);
    assert!(synced(&db, t, "1 min"));
    let ldb = l.connect("family");
    let conns = |n: &'static str| {
        wait_for(Duration::from_secs(20), || {
            ldb.value(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poco_sync stream'",
            )
            .filter(|c| c == n)
        })
        .is_some()
    };
    db.execute("UPDATE elearning.users SET display_name = 'before idle' WHERE id = 21");
    assert!(synced(&db, t, "30 s"));
    assert!(
        conns("1"),
        "a batch was just sent over the stream's connection"
    );
    // Nothing to send for longer than poco.sync_idle_timeout: the connection is closed.
    assert!(conns("0"), "the idle connection was closed");
    // The next change opens it again and arrives.
    db.execute("UPDATE elearning.users SET display_name = 'after idle' WHERE id = 21");
    assert!(synced(&db, t, "30 s"));
    assert_eq!(
        ldb.value("SELECT display_name FROM elearning.users WHERE id = 21")
            .as_deref(),
        Some("after idle")
    );
    assert!(conns("1"), "opened again for the batch");
}

#[test]
fn a_learner_that_refuses_every_batch_shows_its_error_and_slows_nobody() {
    let mut opts = poco_e2e::Options::platform_verbose();
    opts.extra_conf.push("poco.sync_workers = 1".into());
    opts.extra_conf.push("poco.retry_delay = '100ms'".into());
    let (platform, db) = poco_e2e::sample_platform_with("sync_poison", 20, &opts);
    let (la, lb) = (learner("sync_poison_a"), learner("sync_poison_b"));
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    assert!(synced(&db, ta, "1 min") && synced(&db, tb, "1 min"));
    // Learner B refuses every batch that touches its users (not an integrity or schema error:
    // retrying is all the platform can do).
    let lbdb = lb.connect("family");
    lbdb.execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'poisoned learner'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON elearning.users \
         FOR EACH ROW EXECUTE FUNCTION public.refuse()",
    );
    let stream = || {
        db.value("SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'")
    };
    let before = stream();
    assert!(before.is_some());
    let ldb = la.connect("family");
    for i in 0..10 {
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'round {i}' WHERE id IN (21, 22)"
        ));
        // (not held up by B's refusals)
        let want = format!("round {i}");
        poco_e2e::assert_arrives(&db, ta, &ldb, 21, &want, Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(200));
    }
    // B shows why, keeps its changes, and the stream did not crash-loop over it.
    let shown = wait_for(Duration::from_secs(10), || {
        db.value(&format!(
            "SELECT last_error FROM poco_status(22) WHERE target_id = {tb} AND last_error LIKE '%poisoned learner%'"
        ))
    });
    assert!(shown.is_some(), "poco_status shows B's error");
    assert!(!synced(&db, tb, "10 ms"));
    assert_eq!(stream(), before, "the same stream process throughout");
    // B accepts batches again: it catches up by itself, exact.
    lbdb.execute("DROP TRIGGER refuse ON elearning.users");
    assert!(synced(&db, tb, "1 min"), "{}", state(&db, tb));
    assert_learner_equals_scope(&db, &lbdb, "22");
    assert_eq!(
        lbdb.value("SELECT display_name FROM elearning.users WHERE id = 22")
            .as_deref(),
        Some("round 9")
    );
    drop(db);
    poco_e2e::assert_secret_kept(&platform, &["poco_enable_sync("]);
}
