//! A slow learner cannot hold the platform's xmin or every job slot (issue #24 point 6): a
//! push has a deadline (poco.push_deadline), and no parent runs more than its share of
//! poco.max_jobs (poco.max_jobs_per_parent, half of it by default) while others wait.

use poco_e2e::{learner, sample_platform_with, wait_for, Db, FaultProxy, Options, SECRET};
use std::time::{Duration, Instant};

fn job_state(db: &Db, job: i64) -> String {
    db.value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
        .unwrap_or_default()
}

/// Two targets of parent 21 behind proxies that read 8 kB/s, with poco.max_jobs = 2: parent
/// 22's push still runs at once, and each slow push ends at its deadline with a clear error.
#[test]
fn slow_learners_of_one_parent_hold_neither_every_slot_nor_past_the_deadline() {
    let mut opts = Options::platform();
    opts.extra_conf.extend([
        "poco.max_jobs = 2".to_string(),
        "poco.push_deadline = '6s'".to_string(),
    ]);
    let (platform, db) = sample_platform_with("slow_learner", 3, &opts);
    let (l1, l2, l3) = (learner("slow_a"), learner("slow_b"), learner("slow_c"));
    let (p1, p2) = (FaultProxy::start(l1.port), FaultProxy::start(l2.port));
    for p in [&p1, &p2] {
        p.delay_per_8k(1000); // 8 kB/s towards the learner
    }
    let url = |port: u16| format!("postgresql://postgres:{SECRET}@127.0.0.1:{port}/family?sslmode=disable");
    let slow: Vec<i64> = [p1.port, p2.port]
        .iter()
        .map(|port| {
            db.query(&format!("SELECT poco_push(21, poco_add_target(21, '{}'))", url(*port)))[0]
                .get(0)
        })
        .collect();
    let running_of_21 = "SELECT count(*) FROM poco.job WHERE parent_id = '21' AND state = 'running'";
    let probe = platform.connect("platform");
    let started = wait_for(Duration::from_secs(10), || {
        (probe.value(running_of_21).as_deref() == Some("1")).then_some(())
    });
    assert!(started.is_some(), "a push of 21 runs");
    // Parent 22's push runs at once, beside the slow one.
    let t0 = Instant::now();
    let other: i64 = db.query(&format!("SELECT poco_push(22, poco_add_target(22, '{}'))", url(l3.port)))[0].get(0);
    let mut most_of_21 = 0;
    loop {
        let n: i64 = probe.value(running_of_21).unwrap_or_default().parse().unwrap_or(0);
        most_of_21 = most_of_21.max(n);
        let s = job_state(&db, other);
        if s != "queued" && s != "running" {
            assert_eq!(s, "succeeded");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "parent 22's push waited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = t0.elapsed();
    assert!(
        slow.iter().any(|j| job_state(&db, *j) != "failed"),
        "22's push ran while 21's were still there"
    );
    // Each slow push ends at its deadline, one after the other (21's share is one slot).
    let mut ends = Vec::new();
    for j in &slow {
        let t = Instant::now();
        let ended = wait_for(Duration::from_secs(40), || {
            let s = job_state(&db, *j);
            let n: i64 = probe.value(running_of_21).unwrap_or_default().parse().unwrap_or(0);
            most_of_21 = most_of_21.max(n);
            (s != "queued" && s != "running").then_some(s)
        });
        assert_eq!(ended.as_deref(), Some("failed"), "job {j}");
        let err = db
            .value(&format!("SELECT coalesce(error, '') || ' ' || coalesce(error_sqlstate, '') FROM poco.job WHERE id = {j}"))
            .unwrap_or_default();
        assert!(err.contains("past its deadline of 6 s (poco.push_deadline)") && err.ends_with("57014"), "{err}");
        let took: f64 = db
            .value(&format!("SELECT extract(epoch FROM finished_at - started_at)::float8 FROM poco.job WHERE id = {j}"))
            .unwrap_or_default()
            .parse()
            .unwrap_or(0.0);
        assert!((5.5..12.0).contains(&took), "job {j} ran {took} s");
        ends.push((t.elapsed(), took));
    }
    assert_eq!(most_of_21, 1, "parent 21 never held both slots");
    println!(
        "slow learners: parent 22's push done in {} ms beside them; the slow pushes ran {:.1} s and {:.1} s (deadline 6 s)",
        waited.as_millis(),
        ends[0].1,
        ends[1].1
    );
    // Their learners keep what they had (nothing: they never got a copy).
    for l in [&l1, &l2] {
        assert_eq!(
            l.connect("family")
                .value("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = 'elearning'")
                .as_deref(),
            Some("0")
        );
    }
}
