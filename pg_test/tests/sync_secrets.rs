//! Secrets under continuous sync (issue #6, first part): with logging at its most verbose,
//! a learner password used by the stream through enabling, batches, a learner going down
//! (connection errors) and back, appears nowhere on the platform but in the caller's own
//! statement: not in the server log, pg_stat_activity, pg_stat_statements (track = all),
//! pg_settings, poco_status, poco.targets or poco.events.

use poco_e2e::{assert_learner_equals_scope, sample_platform_with, wait_for, Options, Server};
use std::time::Duration;

const MARKER: &str = "Sx9-sync-secret-Qv27";

/// The marker split in two, so that a query looking for it does not contain it.
fn like_marker() -> String {
    let (a, b) = MARKER.split_at(7);
    format!("'%' || '{a}' || '{b}' || '%'")
}

#[test]
fn the_learner_password_never_shows_while_syncing() {
    let mut opts = Options::platform();
    opts.extra_conf = vec![
        "shared_preload_libraries = 'poco_sync, pg_stat_statements'".into(),
        "pg_stat_statements.track = all".into(),
        "log_min_messages = debug5".into(),
        "log_min_error_statement = debug5".into(),
        "log_error_verbosity = verbose".into(),
        "log_statement = all".into(),
        "log_connections = on".into(),
        "log_disconnections = on".into(),
        "poco.retry_delay = '100ms'".into(),
    ];
    let (platform, db) = sample_platform_with("sync_secrets", 20, &opts);
    db.execute("CREATE EXTENSION pg_stat_statements");
    let l = Server::start("sync_secrets_learner", &Options::learner());
    l.psql("postgres", "CREATE DATABASE family");
    l.psql(
        "postgres",
        &format!("CREATE ROLE fam LOGIN SUPERUSER PASSWORD '{MARKER}'"),
    );
    let url = l.target_url("family", "fam", MARKER);
    let t: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    let synced = |limit: &str| {
        db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
            .as_deref()
            == Some("t")
    };
    assert!(synced("1 min"));
    db.execute("UPDATE elearning.users SET display_name = 'while syncing' WHERE id = 21");
    assert!(synced("30 s"));
    // The learner goes away: the stream fails to reach it, logs it, and retries.
    l.stop("immediate");
    db.execute("UPDATE elearning.users SET display_name = 'while down' WHERE id = 21");
    let failed = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT last_error FROM poco_status(21) WHERE target_id = {t} AND last_error IS NOT NULL"
        ))
    });
    assert!(failed.is_some(), "the failure shows in poco_status");
    l.start_again();
    assert!(synced("1 min"));
    assert_learner_equals_scope(&db, &l.connect("family"), "21");

    // Looked for from another session, with a query that does not hold the marker.
    let check = platform.connect("platform");
    let like = like_marker();
    for (what, sql) in [
        ("pg_stat_activity", format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE {like} AND pid <> {}", db.value("SELECT pg_backend_pid()").unwrap())),
        ("pg_stat_statements", format!("SELECT count(*) FROM pg_stat_statements WHERE query LIKE {like}")),
        ("pg_settings", format!("SELECT count(*) FROM pg_settings WHERE setting LIKE {like} OR reset_val LIKE {like}")),
        ("poco_status", format!("SELECT count(*) FROM poco_status(21) s WHERE s::text LIKE {like}")),
        ("poco.targets", format!("SELECT count(*) FROM poco.targets s WHERE s::text LIKE {like}")),
        ("poco.events", format!("SELECT count(*) FROM poco.events s WHERE s::text LIKE {like}")),
        ("poco.target", format!("SELECT count(*) FROM poco.target s WHERE s::text LIKE {like}")),
    ] {
        assert_eq!(check.value(&sql).as_deref(), Some("0"), "the marker shows in {what}");
    }
    // pg_stat_statements did record the sync's statements (else the check proves nothing).
    let tracked: i64 = check
        .query("SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%poco_enable_sync%'")[0]
        .get(0);
    assert!(tracked > 0);
    // The server log: only the caller's own statements carry it.
    let log = platform.log();
    assert!(log.contains("DEBUG"), "the log is at its most verbose");
    // (log_statement and, at debug levels, the parse/bind/execute messages echo it.)
    let statement = format!("SELECT poco_enable_sync(21, '{url}')");
    let mut own = 0;
    for line in log.lines().filter(|l| l.contains(MARKER)) {
        assert!(
            line.contains(&statement),
            "the password in a server log line: {}",
            line.replace(MARKER, "<the marker>")
        );
        own += 1;
    }
    assert!(
        own >= 1,
        "the caller's statement is logged (log_statement = all)"
    );
}
