//! A hostile learner (issue #15, point 11): the parent controls the learner database, and
//! may make it read slowly, stall on a trigger, answer with megabytes of error text, refuse
//! every batch, or hold gigabytes in poco_sync.tables. None of it may hold up another family,
//! hold the platform's xmin, grow poco_sync's memory without bound, or make poco_sync push
//! again and again in a tight loop.

use poco_e2e::{
    assert_arrives, assert_learner_equals_scope, enable_sync, learner, rss_anon_kb,
    sample_platform_with, wait_for, Db, FaultProxy, Options, Server, SECRET,
};
use std::time::{Duration, Instant};

fn synced(db: &Db, t: i64, limit: &str) -> bool {
    db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
        .as_deref()
        == Some("t")
}

/// Over about two seconds, the age of the oldest snapshot a stream process held (what holds
/// the platform's xmin back), in ms. Passes take snapshots all the time; none may be held
/// while a learner takes its batch.
fn oldest_stream_snapshot_ms(db: &Db) -> f64 {
    (0..40)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            db.value(
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start) * 1000), 0) FROM pg_stat_activity \
                  WHERE backend_type = 'poco_sync stream' AND backend_xmin IS NOT NULL",
            )
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
        })
        .fold(0.0, f64::max)
}

/// The bystander family (21) is not held up: five changes each arrive within 3 s.
fn bystander_unaffected(db: &Db, ta: i64, la: &Db, what: &str) {
    for i in 0..5 {
        let want = format!("{what} {i}");
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = '{want}' WHERE id = 21"
        ));
        assert_arrives(db, ta, la, 21, &want, Duration::from_secs(3));
    }
}

fn jobs_of(db: &Db, t: i64) -> i64 {
    db.value(&format!(
        "SELECT count(*) FROM poco.job WHERE target_id = {t}"
    ))
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}

#[test]
fn a_hostile_learner_harms_neither_the_platform_nor_other_families() {
    // Logging at its most verbose: the secrets sweep at the end reads it all.
    let mut opts = Options::platform_verbose();
    opts.extra_conf.extend([
        "poco.network_timeout = '4s'".to_string(),
        "poco.retry_delay = '200ms'".to_string(),
    ]);
    let (platform, db) = sample_platform_with("hostile", 4, &opts);
    let la = learner("hostile_bystander");
    let ta = enable_sync(&db, "21", &la);
    let a = la.connect("family");
    let lh = learner("hostile_learner");
    let proxy = FaultProxy::start(lh.port);
    let url = format!(
        "postgresql://postgres:{SECRET}@127.0.0.1:{}/family?sslmode=disable",
        proxy.port
    );
    let th: i64 = db.query(&format!("SELECT poco_enable_sync(22, '{url}')"))[0].get(0);
    assert_eq!(poco_e2e::latest_job_result(&db, th), "succeeded");
    let h = lh.connect("family");

    // 1. It reads at 10 kB/s while a 1 MB batch goes to it.
    proxy.delay_per_8k(800);
    db.execute(
        "UPDATE elearning.audit_log SET action = repeat('slow ', 600) \
          WHERE user_id IN (SELECT id FROM elearning.users WHERE id = 22 OR parent_id = 22)",
    );
    std::thread::sleep(Duration::from_millis(500)); // the batch is on its way
    bystander_unaffected(&db, ta, &a, "while 22 reads slowly");
    let held = oldest_stream_snapshot_ms(&db);
    assert!(held < 1000.0, "a stream held a snapshot for {held} ms");
    proxy.heal();
    assert!(
        synced(&db, th, "2 min"),
        "22 catches up once it reads at speed"
    );
    assert_learner_equals_scope(&db, &h, "22");

    // 2. It stalls on a trigger of its own (every wait is bounded by poco.network_timeout).
    h.execute(
        "CREATE FUNCTION public.stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(3600); RETURN NEW; END $$; \
         CREATE TRIGGER stall BEFORE UPDATE ON poco_sync.position FOR EACH ROW EXECUTE FUNCTION public.stall();",
    );
    db.execute("UPDATE elearning.users SET display_name = 'stalled' WHERE id = 22");
    std::thread::sleep(Duration::from_millis(500));
    bystander_unaffected(&db, ta, &a, "while 22 stalls");
    let held = oldest_stream_snapshot_ms(&db);
    assert!(held < 1000.0, "a stream held a snapshot for {held} ms");
    // (The learner's own backend sleeps on; end it so the trigger can go.)
    lh.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
    );
    h.execute("DROP TRIGGER stall ON poco_sync.position");
    assert!(
        synced(&db, th, "2 min"),
        "22 goes on once it stops stalling"
    );

    // 3. It answers with 5 MB of error text: what is kept of it is short.
    h.execute(
        "CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN RAISE EXCEPTION '%', repeat('NOISE ', 900000) USING DETAIL = repeat('DETAIL ', 900000); END $$; \
         CREATE TRIGGER shout BEFORE UPDATE ON poco_sync.position FOR EACH ROW EXECUTE FUNCTION public.shout();",
    );
    db.execute("UPDATE elearning.users SET display_name = 'shouted at' WHERE id = 22");
    let err = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT last_sync_error FROM poco.target WHERE id = {th} AND last_sync_error LIKE '%NOISE%'"
        ))
    })
    .expect("the learner's error is shown");
    assert!(
        err.len() < 3000,
        "{} bytes of the learner's error kept",
        err.len()
    );
    assert!(err.contains("more bytes"), "{}", &err[..200]);
    for table in ["poco.events", "poco.job"] {
        let longest: i64 = db
            .value(&format!(
                "SELECT coalesce(max(length(t::text)), 0) FROM {table} t"
            ))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(longest < 20_000, "{table}: a row of {longest} bytes");
    }
    bystander_unaffected(&db, ta, &a, "while 22 shouts");
    h.execute("DROP TRIGGER shout ON poco_sync.position");
    assert!(synced(&db, th, "2 min"));

    // 4. It refuses every batch as a constraint violation (each a new snapshot, which it
    // takes): the snapshots come further and further apart, not in a tight loop.
    h.execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN RAISE EXCEPTION 'no' USING ERRCODE = '23514'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON poco_sync.position FOR EACH ROW EXECUTE FUNCTION public.refuse();",
    );
    let before = jobs_of(&db, th);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        db.execute("UPDATE elearning.users SET display_name = display_name || '!' WHERE id = 22");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pushes = jobs_of(&db, th) - before;
    println!("hostile: a learner refusing every batch for 15 s got {pushes} new snapshots");
    assert!((1..=6).contains(&pushes), "{pushes} snapshots in 15 s");
    bystander_unaffected(&db, ta, &a, "while 22 refuses");
    h.execute("DROP TRIGGER refuse ON poco_sync.position");
    assert!(synced(&db, th, "5 min"), "22 takes batches again");
    assert_learner_equals_scope(&db, &h, "22");

    // 5. Its poco_sync.tables says it holds 20,000 tables of 100 kB names (2 GB once
    // decompressed): a push reads a bounded part of it, with the push process's memory small.
    h.execute(
        "INSERT INTO poco_sync.tables SELECT repeat('x', 100000) || g, 0, now() FROM generate_series(1, 20000) g",
    );
    db.execute("SELECT poco_disable_sync(22)");
    let job: i64 = db.query(&format!("SELECT poco_push(22, {th})"))[0].get(0);
    let probe = platform.connect("platform");
    let t0 = Instant::now();
    let mut peak = 0u64;
    while t0.elapsed() < Duration::from_secs(120) {
        if let Some(pid) = probe
            .value("SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'poco_sync push'")
        {
            peak = peak.max(rss_anon_kb(&pid).unwrap_or(0));
        }
        let state = probe
            .value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
            .unwrap_or_default();
        if state != "queued" && state != "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (state, err) = (
        db.value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
            .unwrap_or_default(),
        db.value(&format!(
            "SELECT coalesce(error, '') FROM poco.job WHERE id = {job}"
        ))
        .unwrap_or_default(),
    );
    println!(
        "hostile: push against a 2 GB poco_sync.tables ended {state} in {:?}, push process peak {} MB: {err}",
        t0.elapsed(),
        peak / 1024
    );
    assert_eq!(state, "succeeded", "{err}");
    assert!(t0.elapsed() < Duration::from_secs(90), "{:?}", t0.elapsed());
    assert!(peak < 256 * 1024, "push process peak {} MB", peak / 1024);
    bystander_unaffected(&db, ta, &a, "after all that");
    let _: &Server = &lh;
    // No learner password in any log line but the caller's own statements, any view, dump.
    poco_e2e::assert_secret_kept(&platform, &["poco_enable_sync("]);
}

/// A learner that answers the membership check of the careful path (no plpgsql there) with
/// huge keys (a non-deterministic collation makes '22' equal '22' followed by megabytes)
/// does not grow the stream's memory: what the learner returns for a key is read no longer
/// than the longest key the platform asked about.
#[test]
fn a_learner_answering_with_huge_keys_does_not_grow_the_stream() {
    let mut opts = Options::platform();
    opts.extra_conf
        .push("poco.network_timeout = '1min'".to_string());
    let (_platform, db) = sample_platform_with("hostile_keys", 4, &opts);
    let lh = learner("hostile_keys_learner");
    let t = enable_sync(&db, "22", &lh);
    let h = lh.connect("family");
    h.execute(
        "CREATE COLLATION public.ign (provider = icu, locale = 'und-u-ka-shifted-ks-level1', deterministic = false); \
         DROP EXTENSION plpgsql CASCADE; \
         ALTER TABLE elearning.users DROP CONSTRAINT users_pkey CASCADE; \
         ALTER TABLE elearning.users ALTER COLUMN id DROP IDENTITY IF EXISTS; \
         ALTER TABLE elearning.users ALTER COLUMN id TYPE text COLLATE public.ign",
    );
    let n: i64 = db
        .value("SELECT count(*) FROM elearning.users WHERE id = 22 OR parent_id = 22")
        .unwrap()
        .parse()
        .unwrap();
    for i in 0..=n {
        h.execute(&format!(
            "INSERT INTO elearning.users SELECT (pg_catalog.jsonb_populate_record(u, \
               pg_catalog.jsonb_build_object('id', '22' || repeat('-', 30000000), 'email', u.email || 'huge{i}'))).* \
               FROM elearning.users u WHERE u.id = '22' AND length(u.id) = 2"
        ));
    }
    let pid = db
        .value("SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'")
        .unwrap();
    let before = rss_anon_kb(&pid).unwrap_or(0);
    db.execute(
        "UPDATE elearning.users SET display_name = display_name || '!' WHERE id = 22 OR parent_id = 22",
    );
    let t0 = Instant::now();
    let mut peak = 0u64;
    while t0.elapsed() < Duration::from_secs(15) {
        peak = peak.max(rss_anon_kb(&pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "hostile keys: stream private memory {} MB before, {} MB peak ({} learner rows of 30 MB keys)",
        before / 1024,
        peak / 1024,
        n + 1
    );
    assert!(
        peak < before + 40 * 1024,
        "stream grew from {} MB to {} MB",
        before / 1024,
        peak / 1024
    );
    let _ = t;
}
