//! Network faults during continuous sync (issue #6): two learners behind fault proxies, one
//! direct, a writer committing all along to their families and to one that does not sync.
//! POCO_PROXY_FAULTS (default 200) faults are injected, of every kind at random: a reset (RST)
//! at a random byte of either direction, a connection closed after a random number of bytes, a
//! black hole longer or shorter than the network timeout, latency, tiny chunks. At checkpoints
//! (writer paused, network healed) every learner is checked against its parent's scope by the
//! history checker: lost, duplicated, stale and leaked rows must all be 0. Network faults never
//! call for a new snapshot, the streams never crash, the direct learner keeps up all along, and
//! the password shows nowhere. POCO_PROXY_SEED replays a run.

use poco_e2e::{
    assert_secret_kept, check_learner, enable_sync, learner, sample_platform_with, Db, FaultProxy,
    Options, Rng, SECRET,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn hundreds_of_network_faults_during_sync_lose_duplicate_and_leak_nothing() {
    let target_faults = poco_e2e::env_or("POCO_PROXY_FAULTS", 200u64);
    let seed = poco_e2e::env_or("POCO_PROXY_SEED", 0x5eed_fa17u64);
    println!("sync_faults: seed {seed}, {target_faults} faults");
    let mut r = Rng(seed);
    let mut opts = Options::platform_verbose();
    opts.extra_conf.extend([
        "poco.retry_delay = '50ms'".to_string(),
        "poco.network_timeout = '2s'".to_string(),
    ]);
    let (platform, db) = sample_platform_with("sync_faults", 20, &opts);
    let (la, lb, lc) = (
        learner("sync_faults_a"),
        learner("sync_faults_b"),
        learner("sync_faults_c"),
    );
    let (pa, pb) = (FaultProxy::start(la.port), FaultProxy::start(lb.port));
    let via = |p: &FaultProxy| {
        format!(
            "postgresql://postgres:{SECRET}@127.0.0.1:{}/family?sslmode=disable",
            p.port
        )
    };
    let ta: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{}')", via(&pa)))[0].get(0);
    let tb: i64 = db.query(&format!("SELECT poco_enable_sync(22, '{}')", via(&pb)))[0].get(0);
    let tc = enable_sync(&db, "23", &lc);
    let wait = |db: &Db, t: i64, limit: &str| {
        db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
            .as_deref()
            == Some("t")
    };
    for t in [ta, tb, tc] {
        assert!(wait(&db, t, "1 min"), "target {t}'s first snapshot");
    }
    let started_at = db.value("SELECT pg_postmaster_start_time()::text");
    let jobs_before = db.value("SELECT count(*) FROM poco.job");

    // The writer: inserts, updates and deletes in families 21-24 (24 does not sync), one
    // transaction at a time under `turn`, so a checkpoint can hold it between transactions.
    let stop = Arc::new(AtomicBool::new(false));
    let turn = Arc::new(Mutex::new(()));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, turn, committed) = (stop.clone(), turn.clone(), committed.clone());
        let w = platform.connect("platform");
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                i += 1;
                let fam = 21 + i % 4;
                let sql = format!(
                    "BEGIN; INSERT INTO elearning.audit_log (user_id, action) VALUES ({fam}, 'fault {i}'); \
                     UPDATE elearning.users SET display_name = 'fault {i}' WHERE parent_id = {fam} AND id % 3 = {i} % 3; \
                     DELETE FROM elearning.audit_log WHERE user_id = {fam} AND action = 'fault {}'; \
                     INSERT INTO elearning.lesson_progress (enrollment_id, lesson_id, status, score) \
                       SELECT e.id, l.id, 'started', {} FROM elearning.enrollments e JOIN elearning.users u ON u.id = e.learner_id \
                         JOIN elearning.lessons l ON l.course_id = e.course_id WHERE u.parent_id = {fam} ORDER BY random() LIMIT 1 \
                       ON CONFLICT (enrollment_id, lesson_id) DO UPDATE SET score = EXCLUDED.score; COMMIT",
                    i.saturating_sub(8),
                    i % 100
                );
                {
                    let _t = turn.lock().unwrap();
                    w.execute(&sql);
                }
                committed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };

    let mut kinds: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut checkpoints = 0;
    let checkpoint = |what: &str| {
        pa.heal();
        pb.heal();
        let _t = turn.lock().unwrap();
        for (t, l, parent) in [(ta, &la, "21"), (tb, &lb, "22"), (tc, &lc, "23")] {
            assert!(wait(&db, t, "2 min"), "{what}: target {t} caught up");
            let rep = check_learner(&db, &l.connect("family"), parent);
            println!(
                "sync_faults {what}: parent {parent}: {} rows; lost {}, duplicated {}, stale {}, leaked {}",
                rep.rows, rep.lost, rep.duplicated, rep.stale, rep.leaked
            );
            assert!(
                rep.clean() && rep.rows > 0,
                "{what}, parent {parent}: {rep:?}"
            );
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut injected = 0u64;
    let mut slow_c = 0u32;
    while injected < target_faults {
        assert!(Instant::now() < deadline, "{injected} faults in 10 minutes");
        let p = if r.chance(50) { &pa } else { &pb };
        let before = p.injected();
        let kind = match r.below(20) {
            0..=9 => {
                p.reset_after(1 + r.below(30_000) as u64);
                let t = Instant::now();
                while p.reset_armed() && t.elapsed() < Duration::from_secs(3) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                p.reset_after(0);
                "reset"
            }
            10..=11 => {
                p.cut_after(1 + r.below(20_000) as u64);
                std::thread::sleep(Duration::from_millis(150 + r.below(200) as u64));
                p.cut_after(0);
                "cut"
            }
            12..=13 => {
                p.black_hole(true);
                std::thread::sleep(Duration::from_millis(300 + r.below(2_400) as u64));
                p.black_hole(false);
                "black hole"
            }
            14..=16 => {
                p.latency(Duration::from_millis(20 + r.below(300) as u64));
                std::thread::sleep(Duration::from_millis(200 + r.below(300) as u64));
                p.latency(Duration::ZERO);
                "latency"
            }
            _ => {
                p.tiny_chunks(1 + r.below(16) as u64);
                std::thread::sleep(Duration::from_millis(200 + r.below(300) as u64));
                p.tiny_chunks(0);
                "tiny chunks"
            }
        };
        let after = p.injected();
        // Counted only if it hit traffic.
        let hit = match kind {
            "reset" => after.resets > before.resets,
            "cut" => after.cuts > before.cuts,
            "black hole" => true,
            "latency" => after.delayed_chunks > before.delayed_chunks,
            _ => after.split_chunks > before.split_chunks,
        };
        if hit {
            injected += 1;
            *kinds.entry(kind).or_default() += 1;
        }
        // The direct learner is not held up by the others' faults.
        if !wait(&db, tc, "10 s") {
            slow_c += 1;
        }
        if hit && injected % 50 == 0 {
            checkpoints += 1;
            checkpoint(&format!("checkpoint {checkpoints} ({injected} faults)"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    checkpoint("end");
    let (a, b) = (pa.injected(), pb.injected());
    println!(
        "sync_faults: {injected} faults injected ({kinds:?}); proxy connections {} + {}; \
         writer transactions {}; checkpoints {} + end, each lost 0, duplicated 0, stale 0, leaked 0",
        a.connections,
        b.connections,
        committed.load(Ordering::Relaxed),
        checkpoints
    );
    assert!(injected >= target_faults);
    assert_eq!(
        slow_c, 0,
        "the direct learner kept up within 10 s after every fault"
    );
    assert!(
        a.connections > 1 && b.connections > 1,
        "the streams reconnected"
    );
    // Nothing crashed, and faults of the network never called for a new snapshot.
    assert_eq!(
        db.value("SELECT pg_postmaster_start_time()::text"),
        started_at
    );
    let log = platform.log();
    assert!(!log.contains("terminated by signal") && !log.contains("PANIC"));
    assert_eq!(
        db.value("SELECT count(*) FROM poco.job"),
        jobs_before,
        "no new snapshot"
    );
    for t in [ta, tb, tc] {
        assert_eq!(
            db.value(&format!("SELECT state FROM poco_status(21) WHERE target_id = {t} UNION ALL SELECT state FROM poco_status(22) WHERE target_id = {t} UNION ALL SELECT state FROM poco_status(23) WHERE target_id = {t}")).as_deref(),
            Some("streaming")
        );
    }
    drop(db);
    assert_secret_kept(&platform, &["poco_enable_sync("]);
}
