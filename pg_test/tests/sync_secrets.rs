//! Secrets under continuous sync (issue #6, first part): with logging at its most verbose,
//! a learner password used by the stream through enabling, batches, a learner going down
//! (connection errors) and back, appears nowhere on the platform but in the caller's own
//! statement: not in the server log, pg_stat_activity, pg_stat_statements (track = all),
//! pg_settings, poco_status, poco.targets or poco.events.

use poco_e2e::{
    assert_learner_equals_scope, assert_secret_kept, sample_platform_with, wait_for, Options,
    Server, SECRET,
};
use std::time::Duration;

#[test]
fn the_learner_password_never_shows_while_syncing() {
    let mut opts = Options::platform_verbose();
    opts.extra_conf.push("poco.retry_delay = '100ms'".into());
    let (platform, db) = sample_platform_with("sync_secrets", 20, &opts);
    db.execute("CREATE EXTENSION pg_stat_statements");
    let l = Server::start("sync_secrets_learner", &Options::learner());
    l.psql("postgres", "CREATE DATABASE family");
    let url = l.target_url("family", "postgres", SECRET);
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

    // pg_stat_statements did record the sync's statements, and the log is at its most
    // verbose (else the sweep proves nothing).
    let tracked: i64 = db
        .query("SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%poco_enable_sync%'")[0]
        .get(0);
    assert!(tracked > 0);
    assert!(
        platform.log().contains("DEBUG"),
        "the log is at its most verbose"
    );
    // Only the caller's own statement carries it (log_statement and, at debug levels, the
    // parse/bind/execute messages echo it).
    let statement = format!("SELECT poco_enable_sync(21, '{url}')");
    let own = assert_secret_kept(&platform, &[&statement]);
    assert!(
        own >= 1,
        "the caller's statement is logged (log_statement = all)"
    );
}
