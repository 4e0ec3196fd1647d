//! Only `poco_cancel` cancels (issue #24 point 4). A learner that cancels the push's statement
//! (`pg_cancel_backend`, `statement_timeout`: SQLSTATE 57014) or a network that stops answering
//! is a transient failure: retried with back-off, then `failed`. A continuous target whose
//! snapshot ends in any way but success goes to `error` with the reason, and maintenance tries
//! it again; none stays in `snapshot` or `resnapshot` with no job, and none that nobody works on
//! holds back the pruning of `poco.change`.

use poco_e2e::{
    check_learner, enable_sync, learner, sample_platform_with, wait_for, Db, FaultProxy, Options,
    Server, SECRET,
};
use std::time::Duration;

fn platform(name: &str) -> (Server, Db) {
    let mut opts = Options::platform();
    opts.extra_conf.extend([
        "poco.retry_delay = '200ms'".to_string(),
        "poco.network_timeout = '3s'".to_string(),
    ]);
    sample_platform_with(name, 3, &opts)
}

/// The target's sync state and last error.
fn state(db: &Db, t: i64) -> String {
    db.value(&format!(
        "SELECT sync_state || ' ' || coalesce(last_sync_error, '-') FROM poco.target WHERE id = {t}"
    ))
    .unwrap_or_default()
}

/// The target's jobs, oldest first: `state attempts`.
fn jobs(db: &Db, t: i64) -> Vec<String> {
    db.query(&format!(
        "SELECT state || ' ' || attempts FROM poco.job WHERE target_id = {t} ORDER BY id"
    ))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn events(db: &Db, t: i64) -> String {
    db.value(&format!(
        "SELECT string_agg(kind || ': ' || message, E'\\n' ORDER BY id) FROM poco.events WHERE target_id = {t}"
    ))
    .unwrap_or_default()
}

fn synced(db: &Db, t: i64, limit: &str) -> bool {
    db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
        .as_deref()
        == Some("t")
}

/// The reproduction: the learner cancels the snapshot's statement (an operator's
/// `pg_cancel_backend` there). The job ended as `cancelled`, as if poco_cancel had been called,
/// and the continuous target stayed in `resnapshot` with no job, for good.
#[test]
fn a_learner_cancelling_the_snapshot_is_retried_not_cancelled() {
    let (_platform, db) = platform("ends_cancel");
    let la = learner("ends_cancel_a");
    let t = enable_sync(&db, "21", &la);
    // A learner session holds a lock the snapshot needs: its statement waits there.
    let holder = la.connect("family");
    holder.execute("BEGIN; LOCK TABLE elearning.users IN ACCESS EXCLUSIVE MODE");
    let before = jobs(&db, t).len();
    db.execute(&format!("SELECT poco.resnapshot({t}, 'a test asked')"));
    let admin = la.connect("postgres");
    let waiting = wait_for(Duration::from_secs(20), || {
        admin
            .value(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'family' AND wait_event_type = 'Lock' LIMIT 1",
            )
            .filter(|p| !p.is_empty())
    })
    .expect("the snapshot waits on the learner's lock");
    assert_eq!(
        admin
            .value(&format!("SELECT pg_cancel_backend({waiting})"))
            .as_deref(),
        Some("t")
    );
    std::thread::sleep(Duration::from_millis(300));
    holder.execute("ROLLBACK");
    assert!(
        synced(&db, t, "30 s"),
        "target {t}: {}\njobs {:?}\n{}",
        state(&db, t),
        jobs(&db, t),
        events(&db, t)
    );
    let js = jobs(&db, t);
    assert_eq!(js.len(), before + 1, "one job, retried: {js:?}");
    assert_eq!(js.last().map(String::as_str), Some("succeeded 2"), "{js:?}");
    assert!(events(&db, t).contains("push_retry"), "{}", events(&db, t));
    assert_eq!(state(&db, t), "streaming -");
    db.execute("UPDATE elearning.users SET display_name = 'after the cancel' WHERE id = 21");
    assert!(synced(&db, t, "30 s"), "{}", state(&db, t));
    let l = la.connect("family");
    let report = check_learner(&db, &l, "21");
    assert!(report.clean(), "{report:?}");
}
