//! Failpoints (issue #6): poco_sync processes made to fail, or to die (SIGKILL), at the moments
//! that matter: mid-COPY, between tables, after the learner committed but before the platform
//! heard it (pushes and snapshots), while a stream loads the keys of a batch, and after a
//! batch's commit. Each time: the failpoint fired (its log line), the learner held the old copy
//! or the new one and never a mix, the retry or restart needed no hand, and in the end the
//! learner equals its parent's scope (history checker: nothing lost, duplicated, stale or
//! leaked), with no new snapshot where none is needed, and the password nowhere.

use poco_e2e::{
    assert_secret_kept, check_learner, enable_sync, learner, sample_platform_with, wait_for, Db,
    Options, Server, SECRET,
};
use std::time::Duration;

/// Arm failpoints (`spec` as in poco.failpoint; empty disarms) and give the running
/// processes time to read it.
fn arm(platform: &Server, spec: &str) {
    let db = reconnect(platform);
    db.execute(&format!("ALTER SYSTEM SET poco.failpoint = '{spec}'"));
    db.execute("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(600));
}

fn reconnect(platform: &Server) -> Db {
    wait_for(Duration::from_secs(60), || platform.try_connect("platform"))
        .expect("the platform answers (after its crash restart)")
}

/// Whether target `t` catches up within `secs` seconds, asked again after each crash restart.
fn synced_across_restarts(platform: &Server, t: i64, secs: u64) -> bool {
    wait_for(Duration::from_secs(secs), || {
        let db = platform.try_connect("platform")?;
        (db.try_value(&format!("SELECT poco_sync_wait({t}, '5 s')"))
            .ok()??
            == "t")
            .then_some(())
    })
    .is_some()
}

/// How many times the failpoint `name` fired (its log lines).
fn fired(platform: &Server, name: &str) -> usize {
    platform
        .log()
        .matches(&format!("failpoint {name} fired"))
        .count()
}

/// One value for the learner's whole copy: every table's rows, sorted, hashed.
fn fingerprint(l: &Db) -> String {
    let tables: Vec<String> = l
        .query("SELECT table_name FROM poco_sync.tables ORDER BY 1")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let parts: Vec<String> = tables
        .iter()
        .map(|t| {
            format!("(SELECT pg_catalog.md5(coalesce(pg_catalog.string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x)")
        })
        .collect();
    l.value(&format!("SELECT pg_catalog.md5({})", parts.join(" || ")))
        .unwrap()
}

fn clean(db: &Db, l: &Db, parent: &str, what: &str) {
    let r = check_learner(db, l, parent);
    assert!(r.clean() && r.rows > 0, "{what}: {r:?}");
}

/// A job's (state, attempts, error).
fn job(db: &Db, id: i64) -> (String, i32, String) {
    let r = &db.query(&format!(
        "SELECT state, attempts, coalesce(error, '') FROM poco.job WHERE id = {id}"
    ))[0];
    (r.get(0), r.get(1), r.get(2))
}

#[test]
fn failpoints_at_every_moment_that_matters_leave_old_or_new_and_recover() {
    let mut opts = Options::platform_verbose();
    opts.extra_conf.extend([
        "poco.retry_delay = '1500ms'".to_string(),
        "poco.copy_chunk = '8kB'".to_string(),
        "poco.push_attempts = 3".to_string(),
    ]);
    let (platform, db) = sample_platform_with("failpoints", 20, &opts);
    let (lp, ls) = (learner("failpoints_push"), learner("failpoints_sync"));
    let url = lp.target_url("family", "postgres", SECRET);
    db.execute(&format!("SELECT poco_add_target(23, '{url}')"));
    let push = |db: &Db| -> i64 { db.query("SELECT poco_push(23)")[0].get(0) };
    let first = push(&db);
    poco_e2e::assert_job_succeeds(&db, first, "1 min");
    let lpdb = lp.connect("family");

    // 1. Pushes failing at a moment, then retried (attempt 2) by themselves.
    for (n, point) in [
        "push_mid_copy",
        "push_between_tables",
        "push_after_learner_commit",
    ]
    .into_iter()
    .enumerate()
    {
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'failpoint {n}' WHERE id = 23 OR parent_id = 23"
        ));
        let before = fingerprint(&lpdb);
        arm(&platform, point);
        let id = push(&db);
        let failed = wait_for(Duration::from_secs(30), || {
            let (state, attempts, error) = job(&db, id);
            (attempts == 1 && state == "queued" && error.contains(point)).then_some(())
        });
        assert!(
            failed.is_some(),
            "{point}: the first attempt failed and was queued again: {:?}",
            job(&db, id)
        );
        assert_eq!(fired(&platform, point), 1, "{point} fired once");
        // Between the attempts, the learner holds the old copy, or (the platform did not hear
        // of the commit) the whole new one.
        if point == "push_after_learner_commit" {
            assert_ne!(fingerprint(&lpdb), before, "{point}: the learner committed");
            clean(&db, &lpdb, "23", point);
        } else {
            assert_eq!(
                fingerprint(&lpdb),
                before,
                "{point}: nothing of the failed attempt shows"
            );
        }
        poco_e2e::assert_job_succeeds(&db, id, "1 min");
        assert_eq!(
            job(&db, id).1,
            2,
            "{point}: succeeded at the second attempt"
        );
        clean(&db, &lpdb, "23", point);
        arm(&platform, "");
    }

    // 2. The push process killed at a moment (the server restarts): the interrupted push ends
    //    as failed, the learner holds the old copy (mid-COPY) or the whole new one (after its
    //    commit), and the next push is exact.
    for (n, point) in ["push_mid_copy", "push_after_learner_commit"]
        .into_iter()
        .enumerate()
    {
        let db = reconnect(&platform);
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'crash {n}' WHERE id = 23 OR parent_id = 23"
        ));
        let before = fingerprint(&lpdb);
        arm(&platform, &format!("{point}:crash"));
        let id = push(&db);
        drop(db);
        let ended = wait_for(Duration::from_secs(60), || {
            let db = platform.try_connect("platform")?;
            let (state, ..) = job(&db, id);
            (state == "failed").then_some(())
        });
        assert!(
            ended.is_some(),
            "{point}:crash: the interrupted push ended as failed"
        );
        assert!(platform.log().contains(&format!(
            "failpoint {point} fired: the process is killed here"
        )));
        let lpdb = lp.connect("family");
        if point == "push_mid_copy" {
            assert_eq!(
                fingerprint(&lpdb),
                before,
                "{point}:crash: the old copy, whole"
            );
        } else {
            assert_ne!(
                fingerprint(&lpdb),
                before,
                "{point}:crash: the new copy, whole"
            );
            clean(&reconnect(&platform), &lpdb, "23", point);
        }
        arm(&platform, "");
        let db = reconnect(&platform);
        let again = push(&db);
        poco_e2e::assert_job_succeeds(&db, again, "1 min");
        clean(&db, &lpdb, "23", point);
    }
    let kills = platform.log().matches("terminated by signal 9").count();
    assert!(
        kills >= 2,
        "the server saw both push processes killed ({kills})"
    );

    // 3. Continuous sync: a stream failing while it loads a batch's keys, or killed there, or
    //    killed after the learner committed a batch: each retried or restarted by itself, with
    //    no new snapshot (the learner's position says where it is).
    let db = reconnect(&platform);
    let t = enable_sync(&db, "21", &ls);
    let lsdb = ls.connect("family");
    let snapshots = |db: &Db| -> String {
        db.value(&format!(
            "SELECT count(*) FROM poco.job WHERE target_id = {t}"
        ))
        .unwrap()
    };
    let jobs_before = snapshots(&db);
    drop(db);
    for (n, spec) in [
        "stream_key_loading",
        "stream_key_loading:crash",
        "stream_ack_lost:crash",
    ]
    .into_iter()
    .enumerate()
    {
        let point = spec.split(':').next().unwrap();
        let fired_before = fired(&platform, point);
        arm(&platform, spec);
        let db = reconnect(&platform);
        db.execute(&format!(
            "BEGIN; UPDATE elearning.users SET display_name = 'stream {n}' WHERE id = 21; \
             INSERT INTO elearning.audit_log (user_id, action) SELECT id, 'stream {n}' FROM elearning.users WHERE parent_id = 21; COMMIT"
        ));
        drop(db);
        let reached = wait_for(Duration::from_secs(30), || {
            (fired(&platform, point) > fired_before).then_some(())
        });
        assert!(reached.is_some(), "{spec} fired");
        assert!(
            synced_across_restarts(&platform, t, 60),
            "{spec}: the target caught up by itself"
        );
        let db = reconnect(&platform);
        clean(&db, &lsdb, "21", spec);
        assert_eq!(
            lsdb.value(&format!(
                "SELECT count(*) FROM elearning.audit_log WHERE action = 'stream {n}'"
            )),
            db.value(&format!(
                "SELECT count(*) FROM elearning.audit_log WHERE action = 'stream {n}'"
            )),
            "{spec}: each change once"
        );
        assert_eq!(snapshots(&db), jobs_before, "{spec}: no new snapshot");
        arm(&platform, "");
    }

    // 4. The first snapshot of a continuous target killed between tables: retried by itself.
    let l2 = learner("failpoints_sync2");
    arm(&platform, "push_between_tables:crash");
    let db = reconnect(&platform);
    let url2 = l2.target_url("family", "postgres", SECRET);
    let t2: i64 = db.query(&format!("SELECT poco_enable_sync(22, '{url2}')"))[0].get(0);
    drop(db);
    assert!(
        synced_across_restarts(&platform, t2, 90),
        "the killed snapshot was taken again"
    );
    assert!(platform
        .log()
        .contains("failpoint push_between_tables fired: the process is killed here"));
    arm(&platform, "");
    let db = reconnect(&platform);
    clean(
        &db,
        &l2.connect("family"),
        "22",
        "snapshot killed between tables",
    );
    let kills = platform.log().matches("terminated by signal 9").count();
    assert!(kills >= 5, "five processes killed in all ({kills})");

    let own = assert_secret_kept(&platform, &["poco_add_target(", "poco_enable_sync("]);
    assert!(own >= 2);
}
