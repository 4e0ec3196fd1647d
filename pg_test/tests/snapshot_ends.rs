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
    platform_with(name, &[])
}

fn platform_with(name: &str, conf: &[&str]) -> (Server, Db) {
    let mut opts = Options::platform();
    opts.extra_conf.extend([
        "poco.retry_delay = '200ms'".to_string(),
        "poco.network_timeout = '3s'".to_string(),
    ]);
    opts.extra_conf.extend(conf.iter().map(|c| c.to_string()));
    sample_platform_with(name, 3, &opts)
}

/// The id of the target's newest job.
fn last_job(db: &Db, t: i64) -> i64 {
    db.query(&format!("SELECT max(id) FROM poco.job WHERE target_id = {t}"))[0].get(0)
}

/// Hold a lock the snapshot needs, on the learner: its statement waits there. Returns the
/// holding session and the waiting backend's pid, once it waits.
fn hold_and_wait(l: &Server, db: &Db, t: i64, delay: &str) -> (Db, String) {
    let holder = l.connect("family");
    holder.execute("BEGIN; LOCK TABLE elearning.users IN ACCESS EXCLUSIVE MODE");
    db.execute(&format!("SELECT poco.resnapshot({t}, 'a test asked', '{delay}')"));
    let admin = l.connect("postgres");
    let pid = wait_for(Duration::from_secs(20), || {
        admin
            .value(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'family' AND wait_event_type = 'Lock' LIMIT 1",
            )
            .filter(|p| !p.is_empty())
    })
    .expect("the snapshot waits on the learner's lock");
    (holder, pid)
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
    let before = jobs(&db, t).len();
    let (holder, waiting) = hold_and_wait(&la, &db, t, "0");
    let admin = la.connect("postgres");
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

/// A network that stops answering during the snapshot (the fault proxy's black hole): each
/// attempt times out and is retried, the job ends `failed` (never `cancelled`), the target
/// goes to `error` with the reason, and maintenance tries it again once the network is back.
#[test]
fn a_black_hole_during_the_snapshot_is_retried_then_an_error_maintenance_retries() {
    let (_platform, db) = platform_with(
        "ends_hole",
        &["poco.push_attempts = 2", "poco.network_timeout = '2s'"],
    );
    let la = learner("ends_hole_a");
    let pa = FaultProxy::start(la.port);
    let url = format!("postgresql://postgres:{SECRET}@127.0.0.1:{}/family?sslmode=disable", pa.port);
    let t: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    assert!(synced(&db, t, "1 min"), "{}", state(&db, t));
    pa.black_hole(true);
    db.execute(&format!("SELECT poco.resnapshot({t}, 'a test asked')"));
    let job = last_job(&db, t);
    let ended = wait_for(Duration::from_secs(40), || {
        db.value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
            .filter(|s| s != "queued" && s != "running")
    });
    assert_eq!(ended.as_deref(), Some("failed"), "{:?}\n{}", jobs(&db, t), events(&db, t));
    let ev = events(&db, t);
    assert!(ev.contains("push_retry") && !ev.contains("push_cancelled"), "{ev}");
    // (The target's `error` is short-lived: maintenance retries it; the events keep it.)
    let failed = db
        .value(&format!(
            "SELECT message FROM poco.events WHERE kind = 'push_failed' AND job_id = {job}"
        ))
        .unwrap_or_default();
    assert!(failed.contains("timed out") || failed.contains("no answer"), "{failed}");
    pa.heal();
    pa.black_hole(false);
    assert!(synced(&db, t, "60 s"), "{}\n{:?}\n{}", state(&db, t), jobs(&db, t), events(&db, t));
    assert_eq!(state(&db, t), "streaming -");
    assert!(events(&db, t).contains("trying the failed snapshot again"));
    db.execute("UPDATE elearning.users SET display_name = 'after the hole' WHERE id = 21");
    assert!(synced(&db, t, "30 s"), "{}", state(&db, t));
    let report = check_learner(&db, &la.connect("family"), "21");
    assert!(report.clean(), "{report:?}");
}

/// poco_cancel of a continuous target's snapshot, running or queued: the job is `cancelled`,
/// the target goes to `error` saying so (never stays in `resnapshot` with no job), and
/// maintenance tries it again.
#[test]
fn poco_cancel_of_a_snapshot_ends_in_error_and_is_tried_again() {
    let (_platform, db) = platform("ends_pococancel");
    let la = learner("ends_pococancel_a");
    let t = enable_sync(&db, "21", &la);
    // Running: it waits on a learner lock when it is cancelled.
    let (holder, _) = hold_and_wait(&la, &db, t, "0");
    let job = last_job(&db, t);
    assert_eq!(db.value(&format!("SELECT poco_cancel({job})")).as_deref(), Some("t"));
    let ended = wait_for(Duration::from_secs(20), || {
        db.value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
            .filter(|s| s == "cancelled")
    });
    assert!(ended.is_some(), "{:?}", jobs(&db, t));
    // It went to `error` (briefly: maintenance tries it again, and that try waits on the lock).
    let retried = wait_for(Duration::from_secs(10), || {
        let e = events(&db, t);
        let after = e.split_once("push_cancelled")?.1;
        after.contains("trying the failed snapshot again").then_some(())
    });
    assert!(retried.is_some(), "target {t}: {}\n{}", state(&db, t), events(&db, t));
    holder.execute("ROLLBACK");
    assert!(synced(&db, t, "30 s"), "{}\n{}", state(&db, t), events(&db, t));
    assert_eq!(state(&db, t), "streaming -");
    // Queued (held back for an hour): cancelled before it started.
    db.execute(&format!("SELECT poco.resnapshot({t}, 'later', '1 hour')"));
    let job = last_job(&db, t);
    assert_eq!(db.value(&format!("SELECT poco_cancel({job})")).as_deref(), Some("t"));
    let seen = wait_for(Duration::from_secs(10), || {
        let e = events(&db, t);
        e.contains(&format!(
            "sync_error: its snapshot ended without success (job {job}: cancelled: cancelled by"
        ))
            .then_some(e)
    });
    assert!(seen.is_some(), "target {t}: {}\n{}", state(&db, t), events(&db, t));
    assert!(synced(&db, t, "30 s"), "{}\n{}", state(&db, t), events(&db, t));
    assert_eq!(state(&db, t), "streaming -");
    db.execute("UPDATE elearning.users SET display_name = 'after poco_cancel' WHERE id = 21");
    assert!(synced(&db, t, "30 s"), "{}", state(&db, t));
    let report = check_learner(&db, &la.connect("family"), "21");
    assert!(report.clean(), "{report:?}");
}

/// A target in `error` with no job (its snapshot failed; the next try is a while away) holds
/// back no pruning of `poco.change`: the other families' changes go once they have them.
#[test]
fn a_target_in_error_holds_back_no_pruning() {
    let (_platform, db) = platform_with(
        "ends_prune",
        &["poco.push_attempts = 1", "poco.retry_delay = '60s'"],
    );
    let (la, lb) = (learner("ends_prune_a"), learner("ends_prune_b"));
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    la.stop("fast");
    db.execute(&format!("SELECT poco.resnapshot({ta}, 'a test asked')"));
    let failed = wait_for(Duration::from_secs(30), || {
        state(&db, ta).starts_with("error ").then_some(())
    });
    assert!(failed.is_some(), "{}\n{:?}", state(&db, ta), jobs(&db, ta));
    for n in 0..20 {
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'pruned {n}' WHERE id = 22"
        ));
    }
    assert!(synced(&db, tb, "30 s"), "{}", state(&db, tb));
    let pruned = wait_for(Duration::from_secs(10), || {
        (db.value("SELECT count(*) FROM poco.change").as_deref() == Some("0")).then_some(())
    });
    assert!(
        pruned.is_some(),
        "{} changes kept; target {ta}: {}",
        db.value("SELECT count(*) FROM poco.change").unwrap_or_default(),
        state(&db, ta)
    );
    assert!(state(&db, ta).starts_with("error "), "{}", state(&db, ta));
}
