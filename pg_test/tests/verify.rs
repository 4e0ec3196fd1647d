//! poco_verify (issue #24 point 8): drift between a learner and its parent's scope is found,
//! table by table, and repaired on request; writes during the check give no false alarm.

use poco_e2e::{enable_sync, learner, push_to_new_target, sample_platform, Db};

/// (table, platform rows, learner rows, equal) of poco_verify(t [, repair]).
fn verify(db: &Db, t: i64, repair: bool) -> Vec<(String, i64, Option<i64>, bool)> {
    let start = std::time::Instant::now();
    let _took = Took(start, t);
    db.query(&format!(
        "SELECT table_name, platform_rows, learner_rows, equal FROM poco_verify({t}, {repair}) ORDER BY 1"
    ))
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

struct Took(std::time::Instant, i64);
impl Drop for Took {
    fn drop(&mut self) {
        println!("poco_verify({}): {} ms", self.1, self.0.elapsed().as_millis());
    }
}

fn differing(v: &[(String, i64, Option<i64>, bool)]) -> Vec<String> {
    v.iter().filter(|r| !r.3).map(|r| r.0.clone()).collect()
}

#[test]
fn drift_is_found_table_by_table_and_repaired_on_request() {
    let (platform, db) = sample_platform("verify_drift", 4);
    let (la, lb) = (learner("verify_drift_a"), learner("verify_drift_b"));
    let ta = enable_sync(&db, "21", &la);
    let job = push_to_new_target(&db, "22", &lb);
    poco_e2e::assert_job_succeeds(&db, job, "1 min");
    let tb: i64 = db.query(&format!("SELECT target_id FROM poco.job WHERE id = {job}"))[0].get(0);
    let tables: i64 = db.query("SELECT count(*) FROM poco.scope_tables")[0].get(0);

    // In step: every table equal, counts as the platform's scope has them.
    for t in [ta, tb] {
        let v = verify(&db, t, false);
        assert_eq!(v.len() as i64, tables);
        assert_eq!(differing(&v), Vec::<String>::new(), "target {t}: {v:?}");
        assert!(v.iter().all(|r| Some(r.1) == r.2));
        assert!(v.iter().any(|r| r.1 > 0));
    }
    let users = |v: &[(String, i64, Option<i64>, bool)]| {
        v.iter()
            .find(|r| r.0 == "elearning.users")
            .cloned()
            .expect("users is compared")
    };
    let parent_rows = users(&verify(&db, ta, false)).1;

    // Drift on the learner: a value changed (same count), a row gone, a table dropped.
    let a = la.connect("family");
    a.execute(
        "SET session_replication_role = replica; \
         UPDATE elearning.users SET display_name = 'tampered' WHERE id = 21; \
         DELETE FROM elearning.audit_log WHERE id = (SELECT min(id) FROM elearning.audit_log); \
         DROP TABLE elearning.quiz_attempts",
    );
    let v = verify(&db, ta, false);
    assert_eq!(
        differing(&v),
        ["elearning.audit_log", "elearning.quiz_attempts", "elearning.users"],
        "{v:?}"
    );
    let u = users(&v);
    assert_eq!((u.1, u.2), (parent_rows, Some(parent_rows)), "same count, other rows");
    let q = v.iter().find(|r| r.0 == "elearning.quiz_attempts").unwrap();
    assert_eq!(q.2, None, "a table the learner lacks");
    assert_eq!(
        db.value(&format!(
            "SELECT message FROM poco.events WHERE kind = 'verify' AND target_id = {ta} ORDER BY id DESC LIMIT 1"
        ))
        .as_deref()
        .map(|m| m.contains("differs") && m.contains("elearning.users")),
        Some(true)
    );
    // Without repair nothing is queued; with it a new snapshot puts the learner right.
    let jobs = format!("SELECT count(*) FROM poco.job WHERE target_id = {ta}");
    let before = db.value(&jobs);
    verify(&db, ta, false);
    assert_eq!(db.value(&jobs), before);
    let v = verify(&db, ta, true);
    assert_eq!(differing(&v).len(), 3);
    assert_ne!(db.value(&jobs), before, "repair queued a snapshot");
    assert_eq!(poco_e2e::latest_job_result(&db, ta), "succeeded");
    assert!(poco_e2e::wait_streaming(&db, ta, std::time::Duration::from_secs(60)).is_ok());
    assert_eq!(differing(&verify(&db, ta, false)), Vec::<String>::new());

    // A pushed (not continuous) target that the platform moved on from: found, and a repair
    // is a push.
    db.execute("UPDATE elearning.users SET display_name = 'moved on' WHERE id = 22");
    let v = verify(&db, tb, true);
    assert_eq!(differing(&v), ["elearning.users"], "{v:?}");
    assert_eq!(poco_e2e::latest_job_result(&db, tb), "succeeded");
    assert_eq!(differing(&verify(&db, tb, false)), Vec::<String>::new());

    // Writes of the family during the check are no drift: it is checked again.
    let writer = std::thread::spawn({
        let conninfo = platform.conninfo("platform");
        move || {
            let w = Db::connect(&conninfo);
            for i in 0..60 {
                w.execute(&format!(
                    "UPDATE elearning.users SET display_name = 'busy {i}' WHERE id = 21; \
                     INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'busy {i}')"
                ));
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    });
    for _ in 0..3 {
        let v = verify(&db, ta, false);
        assert_eq!(differing(&v), Vec::<String>::new(), "{v:?}");
    }
    writer.join().unwrap();

    // A transaction that has written waits for what others committed, not for itself: twice
    // in one statement (the first call's bookkeeping gave the transaction an xid), and after
    // a write of its own. Both timed out before.
    assert_eq!(
        db.value(&format!(
            "SELECT poco_sync_wait({ta}, '5 s')::text || poco_sync_wait({ta}, '5 s')::text"
        ))
        .as_deref(),
        Some("truetrue")
    );
    let own = platform.connect("platform");
    own.execute("BEGIN; UPDATE elearning.users SET display_name = 'own' WHERE id = 23");
    assert_eq!(
        own.value(&format!("SELECT poco_sync_wait({ta}, '5 s')")).as_deref(),
        Some("t")
    );
    own.execute("ROLLBACK");

    // Unknown targets and the REPEATABLE READ refusal.
    assert_eq!(db.error("SELECT * FROM poco_verify(99999)").code().code(), "42704");
    let e = db.error(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM poco_verify({ta}); COMMIT"
    ));
    assert_eq!(e.code().code(), "55000");
    db.execute("ROLLBACK");
}
