//! Big data (issue #6): a 100 MB value pushed and synced whole; a table of 10 million rows
//! (POCO_BIG_ROWS) pushed with the push process's private memory flat, sampled from /proc
//! while it runs. The figures are printed; the bounds asserted are loose (the debug build).

use poco_e2e::{learner, wait_for, Db, Options, Server};
use std::time::{Duration, Instant};

fn platform(name: &str, ddl: &str) -> (Server, Db) {
    let mut opts = Options::platform();
    // One stream for every target: what one target's batch does, the others feel.
    opts.extra_conf.push("poco.sync_workers = 1".into());
    let p = Server::start(name, &opts);
    let db = p.connect("platform");
    db.execute(ddl);
    db.execute("ALTER SYSTEM SET poco.retry_delay = '100ms'");
    p.reload();
    (p, db)
}

/// A process's private resident memory (RssAnon) in kB, if it still runs.
use poco_e2e::rss_anon_kb;

#[test]
fn a_100_mb_value_is_pushed_and_synced_whole() {
    let (_p, db) = platform(
        "big_value",
        "CREATE TABLE fam (id bigint PRIMARY KEY, name text);
         CREATE TABLE blob (id bigint PRIMARY KEY, fam_id bigint NOT NULL REFERENCES fam, body text);
         INSERT INTO fam VALUES (1, 'one'), (2, 'two');
         SELECT poco_scope_root('fam', 'id = $1');
         SELECT poco_scope_table('blob');",
    );
    // 100 MiB of text that does not compress away (hex digests).
    db.execute(
        "INSERT INTO blob SELECT 1, 1, left(string_agg(md5(g::text), ''), 104857600) FROM generate_series(1, 3276800) g",
    );
    db.execute("INSERT INTO blob VALUES (2, 2, 'the other family')");
    let digest = |d: &Db| {
        d.value("SELECT length(body) || ' ' || md5(body) FROM blob WHERE id = 1")
            .unwrap_or_default()
    };
    let want = digest(&db);
    assert!(want.starts_with("104857600 "), "{want}");

    let lp = learner("big_value_push");
    let t0 = Instant::now();
    let job = poco_e2e::push_to_new_target(&db, "1", &lp);
    poco_e2e::assert_job_succeeds(&db, job, "5 min");
    println!("big_data: 100 MB value pushed in {:?}", t0.elapsed());
    let lpdb = lp.connect("family");
    assert_eq!(digest(&lpdb), want, "pushed whole");
    assert_eq!(
        lpdb.value("SELECT count(*) FROM blob").as_deref(),
        Some("1")
    );

    // Synced: the snapshot carries it, then a change to it travels as a batch.
    let ls = learner("big_value_sync");
    let t = poco_e2e::enable_sync(&db, "1", &ls);
    let lsdb = ls.connect("family");
    assert_eq!(digest(&lsdb), want, "snapshot whole");
    db.execute("UPDATE blob SET body = reverse(body) WHERE id = 1");
    let want2 = digest(&db);
    assert_ne!(want2, want);
    let t0 = Instant::now();
    let stream_peak = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| {
            let probe = _p.connect("platform");
            let mut peak = 0;
            while t0.elapsed() < Duration::from_secs(300) {
                for r in probe.query(
                    "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'",
                ) {
                    let pid: String = r.get(0);
                    peak = peak.max(rss_anon_kb(&pid).unwrap_or(0));
                }
                if digest(&lsdb) == want2 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        assert_eq!(
            db.value(&format!("SELECT poco_sync_wait({t}, '5 min')"))
                .as_deref(),
            Some("t")
        );
        sampler.join().unwrap()
    });
    println!(
        "big_data: a 100 MB change synced in {:?}; stream peak private memory {} MB",
        t0.elapsed(),
        stream_peak / 1024
    );
    assert_eq!(digest(&ls.connect("family")), want2, "synced whole");
    assert_eq!(
        ls.connect("family")
            .value("SELECT count(*) FROM blob WHERE fam_id <> 1")
            .as_deref(),
        Some("0")
    );

    // 300 MB: past what one batch statement can carry (jsonb holds at most 256 MB). That
    // target is snapshotted again (COPY carries it); family 2, on the same stream, is not
    // held up meanwhile.
    let l2 = learner("big_value_sync2");
    let t2 = poco_e2e::enable_sync(&db, "2", &l2);
    db.execute("UPDATE blob SET body = body || body || body WHERE id = 1");
    let want3 = digest(&db);
    assert!(want3.starts_with("314572800 "), "{want3}");
    for i in 0..3 {
        db.execute(&format!("UPDATE blob SET body = 'other {i}' WHERE id = 2"));
        assert_eq!(
            db.value(&format!("SELECT poco_sync_wait({t2}, '20 s')"))
                .as_deref(),
            Some("t"),
            "family 2 is not held up by family 1's giant batch"
        );
    }
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({t}, '5 min')"))
            .as_deref(),
        Some("t")
    );
    assert_eq!(digest(&ls.connect("family")), want3, "300 MB synced whole");
    let why = db.value(&format!(
        "SELECT message FROM poco.events WHERE kind = 'sync_resnapshot' AND target_id = {t} ORDER BY id DESC LIMIT 1"
    ));
    println!("big_data: 300 MB value: {why:?}");
    assert!(
        why.as_deref()
            .is_some_and(|m| m.contains("cannot be sent as one statement")),
        "{why:?}"
    );
}

#[test]
fn ten_million_rows_are_pushed_with_flat_memory() {
    let rows: u64 = poco_e2e::env_or("POCO_BIG_ROWS", 10_000_000);
    let (p, db) = platform(
        "big_rows",
        "CREATE TABLE fam (id bigint PRIMARY KEY, name text);
         CREATE TABLE many (id bigint, fam_id bigint NOT NULL, n integer, label text);
         INSERT INTO fam VALUES (1, 'one'), (2, 'two');",
    );
    let t0 = Instant::now();
    db.execute(&format!(
        "INSERT INTO many SELECT g, 1, g % 1000, 'row ' || g FROM generate_series(1, {rows}) g;
         INSERT INTO many SELECT g, 2, 0, 'other' FROM generate_series({rows} + 1, {rows} + 1000) g;
         ALTER TABLE many ADD PRIMARY KEY (id), ADD FOREIGN KEY (fam_id) REFERENCES fam;
         SELECT poco_scope_root('fam', 'id = $1');
         SELECT poco_scope_table('many');"
    ));
    println!(
        "big_data: {rows} rows loaded on the platform in {:?}",
        t0.elapsed()
    );
    let l = learner("big_rows_learner");
    let t0 = Instant::now();
    let job = poco_e2e::push_to_new_target(&db, "1", &l);
    // Sample the push process's private memory while it runs, with the rows done so far.
    let probe = p.connect("platform");
    let pid = wait_for(Duration::from_secs(60), || {
        probe.value("SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'poco_sync push'")
    })
    .expect("the push process runs");
    let mut samples: Vec<(i64, u64)> = Vec::new();
    while let Some(kb) = rss_anon_kb(&pid) {
        let done: i64 = probe
            .value(&format!("SELECT rows_done FROM poco.job WHERE id = {job}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        samples.push((done, kb));
        if t0.elapsed() > Duration::from_secs(900) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    poco_e2e::assert_job_succeeds(&db, job, "15 min");
    let took = t0.elapsed();
    let ldb = l.connect("family");
    let sums =
        "SELECT count(*) || ' ' || sum(id) || ' ' || sum(n) || ' ' || sum(length(label)) FROM many";
    assert_eq!(
        ldb.value(sums),
        db.value(&format!("{sums} WHERE fam_id = 1")),
        "every row, once, with its values"
    );
    assert_eq!(
        ldb.value("SELECT count(*) FROM many WHERE fam_id <> 1")
            .as_deref(),
        Some("0")
    );
    // Flat: the peak over the whole push is close to what it was after the first tenth.
    let early: Vec<u64> = samples
        .iter()
        .filter(|(d, _)| *d > 0 && (*d as u64) <= rows / 10)
        .map(|(_, kb)| *kb)
        .collect();
    let peak = samples.iter().map(|(_, kb)| *kb).max().unwrap_or(0);
    let early_peak = early.iter().copied().max().unwrap_or(0);
    println!(
        "big_data: {rows} rows pushed in {took:?}; push process private memory: {} MB after the first tenth, {} MB peak ({} samples)",
        early_peak / 1024,
        peak / 1024,
        samples.len()
    );
    assert!(samples.len() >= 5, "sampled while it ran");
    assert!(early_peak > 0, "sampled within the first tenth");
    assert!(
        peak <= early_peak + 16 * 1024,
        "memory grew with the rows: {} MB after the first tenth, {} MB at the peak",
        early_peak / 1024,
        peak / 1024
    );
    assert!(peak < 128 * 1024, "peak {} MB", peak / 1024);
}
