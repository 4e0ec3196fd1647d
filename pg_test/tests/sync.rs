//! Continuous sync end to end (issue #5): enabling it installs the capture and queues the
//! first snapshot, which becomes the target's position; changes reach the learner; disabling
//! removes the capture and keeps the learner's data.

use poco_e2e::{assert_learner_equals_scope, sample_platform, Db, Options, Server};

fn learner(name: &str) -> Server {
    let s = Server::start(name, &Options::learner());
    s.psql("postgres", "CREATE DATABASE family");
    s
}

fn status(db: &Db, parent: &str) -> String {
    db.value(&format!(
        "SELECT continuous || ' ' || state || ' ' || (last_snapshot_at IS NOT NULL) || ' ' || coalesce(last_error, '-') \
           FROM poco_status({parent})"
    ))
    .unwrap_or_default()
}

fn captured_tables(db: &Db) -> String {
    db.value("SELECT count(*) FROM pg_trigger WHERE tgname = 'poco_capture'").unwrap_or_default()
}

#[test]
fn enabling_sync_snapshots_and_captures_and_disabling_stops_the_capture() {
    let (_platform, db) = sample_platform("sync_enable", 20);
    let l = learner("sync_enable_learner");
    let url = l.target_url("family", "postgres", "pw");

    // A rolled-back enable leaves nothing: no target, no capture, no job.
    db.execute(&format!("BEGIN; SELECT poco_enable_sync(21, '{url}'); ROLLBACK;"));
    assert_eq!(db.value("SELECT count(*) FROM poco.target").as_deref(), Some("0"));
    assert_eq!(captured_tables(&db), "0");
    assert_eq!(db.value("SELECT count(*) FROM poco.job").as_deref(), Some("0"));

    let t: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    // Capture on exactly the scoped tables; the first snapshot queued.
    assert_eq!(captured_tables(&db), db.value("SELECT count(*) FROM poco.scope").unwrap());
    let job: i64 = db.query(&format!("SELECT id FROM poco.job WHERE target_id = {t}"))[0].get(0);
    assert_eq!(db.value(&format!("SELECT poco_wait({job}, '1 min')")).as_deref(), Some("succeeded"));
    assert_eq!(status(&db, "21"), "true streaming true -");
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    // The learner records the platform snapshot whose state it holds.
    let pos = ldb.value("SELECT position FROM poco_sync.position").unwrap();
    assert!(pos.contains(':'), "a pg_snapshot ({pos})");
    // Enabling again is a no-op (no second snapshot).
    let again: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    assert_eq!(again, t);
    assert_eq!(db.value(&format!("SELECT count(*) FROM poco.job WHERE target_id = {t}")).as_deref(), Some("1"));

    // Changes of scoped tables are captured with their transaction; others are not.
    db.execute("UPDATE elearning.users SET display_name = display_name || '!' WHERE id = 21");
    db.execute("INSERT INTO elearning.platform_secrets (id, name, value) VALUES (9999, 'x', 'y')");
    assert_eq!(
        db.value("SELECT string_agg(rel::regclass::text || ' ' || op::text, ',') FROM poco.change WHERE rel = 'elearning.users'::regclass").as_deref(),
        Some("elearning.users U")
    );
    assert_eq!(db.value("SELECT count(*) FROM poco.change WHERE rel = 'elearning.platform_secrets'::regclass").as_deref(), Some("0"));

    // Disabling: no capture left (nobody else syncs), the log emptied, the learner's data stays.
    db.execute("SELECT poco_disable_sync(21)");
    assert_eq!(captured_tables(&db), "0");
    assert_eq!(db.value("SELECT count(*) FROM poco.change").as_deref(), Some("0"));
    assert_eq!(status(&db, "21"), "false idle true -");
    assert!(ldb.value("SELECT count(*) FROM elearning.users").unwrap() != "0");
    let e = db.error(&format!("SELECT poco_sync_wait({t}, '1 s')"));
    assert_eq!(e.code().code(), "55000");
    assert!(e.message().contains("does not sync"), "{}", e.message());
}
