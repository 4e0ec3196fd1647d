//! Continuous sync end to end (issue #5): enabling it installs the capture and queues the
//! first snapshot, which becomes the target's position; changes reach the learner; disabling
//! removes the capture and keeps the learner's data.

use poco_e2e::{assert_learner_equals_scope, enable_sync as enable, learner, sample_platform, Db};

fn status(db: &Db, parent: &str) -> String {
    db.value(&format!(
        "SELECT continuous || ' ' || state || ' ' || (last_snapshot_at IS NOT NULL) || ' ' || coalesce(last_error, '-') \
           FROM poco_status({parent})"
    ))
    .unwrap_or_default()
}

fn captured_tables(db: &Db) -> String {
    db.value("SELECT count(*) FROM pg_trigger WHERE tgname = 'poco_capture'")
        .unwrap_or_default()
}

#[test]
fn enabling_sync_snapshots_and_captures_and_disabling_stops_the_capture() {
    let (_platform, db) = sample_platform("sync_enable", 20);
    let l = learner("sync_enable_learner");
    let url = l.target_url("family", "postgres", "pw");

    // A rolled-back enable leaves nothing: no target, no capture, no job.
    db.execute(&format!(
        "BEGIN; SELECT poco_enable_sync(21, '{url}'); ROLLBACK;"
    ));
    assert_eq!(
        db.value("SELECT count(*) FROM poco.target").as_deref(),
        Some("0")
    );
    assert_eq!(captured_tables(&db), "0");
    assert_eq!(
        db.value("SELECT count(*) FROM poco.job").as_deref(),
        Some("0")
    );

    let t: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    // Capture on exactly the scoped tables; the first snapshot queued.
    assert_eq!(
        captured_tables(&db),
        db.value("SELECT count(*) FROM poco.scope").unwrap()
    );
    let job: i64 = db.query(&format!("SELECT id FROM poco.job WHERE target_id = {t}"))[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("succeeded")
    );
    assert_eq!(status(&db, "21"), "true streaming true -");
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    // The learner records the platform snapshot whose state it holds.
    let pos = ldb
        .value("SELECT position FROM poco_sync.position")
        .unwrap();
    assert!(pos.contains(':'), "a pg_snapshot ({pos})");
    // Enabling again is a no-op (no second snapshot).
    let again: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    assert_eq!(again, t);
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM poco.job WHERE target_id = {t}"
        ))
        .as_deref(),
        Some("1")
    );

    // Changes of scoped tables are captured with their transaction; others are not. (Looked at
    // inside the writing transaction: once delivered, the stream prunes them.)
    db.execute("BEGIN");
    db.execute("UPDATE elearning.users SET display_name = display_name || '!' WHERE id = 21");
    db.execute("INSERT INTO elearning.platform_secrets (id, name, value) VALUES (9999, 'x', 'y')");
    assert_eq!(
        db.value(
            "SELECT string_agg(rel::regclass::text || ' ' || op::text || ' ' || (txid = pg_current_xact_id()::text::bigint), ',') \
               FROM poco.change WHERE rel = 'elearning.users'::regclass"
        )
        .as_deref(),
        Some("elearning.users U true")
    );
    assert_eq!(
        db.value(
            "SELECT count(*) FROM poco.change WHERE rel = 'elearning.platform_secrets'::regclass"
        )
        .as_deref(),
        Some("0")
    );
    db.execute("COMMIT");

    // The capture (SECURITY DEFINER, no SET search_path, for speed) qualifies every name and
    // operator: a writer's search_path that puts its own `=` first changes nothing.
    db.execute(
        "CREATE SCHEMA evil; \
         CREATE FUNCTION evil.eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$; \
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq)",
    );
    db.execute("BEGIN; SET LOCAL search_path = evil, pg_catalog, public");
    db.execute("UPDATE elearning.users SET display_name = display_name || '?' WHERE id = 21");
    assert_eq!(
        db.value(
            "SELECT count(*) FROM poco.change WHERE txid = pg_current_xact_id()::text::bigint"
        )
        .as_deref(),
        Some("1")
    );
    db.execute("COMMIT");

    // The stream applied that change over its own connection to the learner.
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({t}, '30 s')"))
            .as_deref(),
        Some("t")
    );
    let stream_conns =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poco_sync stream'";
    assert_eq!(ldb.value(stream_conns).as_deref(), Some("1"));

    // Disabling: no capture left (nobody else syncs), the log emptied, the learner's data stays,
    // the stream's connection to the learner closed.
    db.execute("SELECT poco_disable_sync(21)");
    let closed = poco_e2e::wait_for(std::time::Duration::from_secs(10), || {
        ldb.value(stream_conns).filter(|n| n == "0")
    });
    assert!(
        closed.is_some(),
        "the stream closed its connection to a learner that no longer syncs"
    );
    assert_eq!(captured_tables(&db), "0");
    assert_eq!(
        db.value("SELECT count(*) FROM poco.change").as_deref(),
        Some("0")
    );
    assert_eq!(status(&db, "21"), "false idle true -");
    assert!(ldb.value("SELECT count(*) FROM elearning.users").unwrap() != "0");
    let e = db.error(&format!("SELECT poco_sync_wait({t}, '1 s')"));
    assert_eq!(e.code().code(), "55000");
    assert!(e.message().contains("does not sync"), "{}", e.message());

    // Removing the last syncing target also removes the capture.
    let t2: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    assert_eq!(
        captured_tables(&db),
        db.value("SELECT count(*) FROM poco.scope").unwrap()
    );
    db.execute(&format!("SELECT poco_remove_target({t2})"));
    assert_eq!(captured_tables(&db), "0");
}

#[test]
fn committed_changes_reach_their_family_and_only_it() {
    let (platform, db) = sample_platform("sync_stream", 20);
    let (la, lb) = (learner("sync_stream_a"), learner("sync_stream_b"));
    let (ta, tb) = (enable(&db, "21", &la), enable(&db, "22", &lb));
    let (a, b) = (la.connect("family"), lb.connect("family"));

    // Inserts, updates and deletes (with an ON DELETE CASCADE below them) of both families.
    db.execute(
        "INSERT INTO elearning.audit_log (user_id, action, detail) \
         SELECT id, 'sync_test', '{\"k\": [1, \"two\"]}' FROM elearning.users WHERE parent_id IN (21, 22)",
    );
    db.execute("UPDATE elearning.users SET display_name = display_name || ' (renamed)' WHERE id = 21 OR parent_id = 22");
    db.execute(
        "DELETE FROM elearning.enrollments WHERE id = (SELECT min(e.id) FROM elearning.enrollments e \
           JOIN elearning.users u ON u.id = e.learner_id WHERE u.parent_id = 21)",
    );
    // A course the family did not use yet arrives with the enrollment that references it; a
    // title change reaches every family that uses the course.
    db.execute(
        "INSERT INTO elearning.enrollments (learner_id, course_id) \
         SELECT (SELECT min(id) FROM elearning.users WHERE parent_id = 21), c.id FROM elearning.courses c \
          WHERE c.id NOT IN (SELECT e.course_id FROM elearning.enrollments e JOIN elearning.users u ON u.id = e.learner_id \
                              WHERE u.parent_id = 21) ORDER BY c.id LIMIT 1",
    );
    db.execute("UPDATE elearning.courses SET title = title || ' v2'");
    // An update of a row that owns others (an enrollment with progress rows, ON DELETE CASCADE
    // on the learner too) is applied in place: its progress rows stay.
    db.execute(
        "UPDATE elearning.enrollments SET enrolled_at = enrolled_at + interval '1 day' \
          WHERE learner_id IN (SELECT id FROM elearning.users WHERE parent_id = 21)",
    );
    // Changes of another family (parent 23 has no target) cost the targets nothing visible.
    db.execute("UPDATE elearning.users SET display_name = 'other' WHERE parent_id = 23");

    // A transaction that takes its change (and its number) first and commits last: the batches
    // that pass meanwhile must not skip it. poco_sync_wait does not wait for it while it is open.
    let late = platform.connect("platform");
    late.execute(
        "BEGIN; INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'committed late')",
    );
    db.execute("INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'committed early')");
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({ta}, '30 s')"))
            .as_deref(),
        Some("t")
    );
    assert_eq!(a.value("SELECT string_agg(action, ',') FROM elearning.audit_log WHERE action LIKE 'committed %'").as_deref(), Some("committed early"));
    late.execute("COMMIT");

    for t in [ta, tb] {
        assert_eq!(
            db.value(&format!("SELECT poco_sync_wait({t}, '30 s')"))
                .as_deref(),
            Some("t"),
            "target {t} caught up"
        );
    }
    assert_learner_equals_scope(&db, &a, "21");
    assert_learner_equals_scope(&db, &b, "22");
    assert_eq!(
        a.value("SELECT count(*) FROM elearning.audit_log WHERE action = 'sync_test'")
            .as_deref()
            .map(|n| n != "0"),
        Some(true)
    );
    assert_eq!(
        a.value("SELECT count(*) FROM elearning.users WHERE display_name = 'other'")
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        a.value("SELECT string_agg(action, ',' ORDER BY action) FROM elearning.audit_log WHERE action LIKE 'committed %'").as_deref(),
        Some("committed early,committed late")
    );
    let st = db.value(&format!(
        "SELECT state || ' ' || (last_applied_at IS NOT NULL) || ' ' || lag_changes || ' ' || coalesce(last_error, '-') FROM poco_status(21)"
    ));
    assert_eq!(st.as_deref(), Some("streaming true 0 -"));
    // The learner's position is the platform's record of it.
    assert_eq!(
        a.value("SELECT position FROM poco_sync.position"),
        db.value(&format!(
            "SELECT learner_position::text FROM poco.target WHERE id = {ta}"
        ))
    );
    // Changes of a family without a target, and of unscoped tables, cost the targets nothing:
    // their positions advance without a batch on their learners.
    let batches = |l: &Db| l.value("SELECT batches FROM poco_sync.position").unwrap();
    let (before_a, before_b) = (batches(&a), batches(&b));
    db.execute("UPDATE elearning.users SET display_name = display_name || '.' WHERE id = 23 OR parent_id = 23");
    db.execute("INSERT INTO elearning.audit_log (user_id, action) SELECT id, 'family 23' FROM elearning.users WHERE parent_id = 23");
    db.execute("UPDATE elearning.platform_secrets SET value = value || '.'");
    for t in [ta, tb] {
        assert_eq!(
            db.value(&format!("SELECT poco_sync_wait({t}, '30 s')"))
                .as_deref(),
            Some("t")
        );
    }
    assert_eq!(
        (batches(&a), batches(&b)),
        (before_a, before_b),
        "no learner round trip for other families' changes"
    );
    // Delivered changes are pruned.
    let left = poco_e2e::wait_for(std::time::Duration::from_secs(10), || {
        db.value("SELECT count(*) FROM poco.change")
            .filter(|n| n == "0")
    });
    assert!(
        left.is_some(),
        "the change log is pruned once every target has the changes"
    );
}

#[test]
fn a_row_that_changes_family_leaves_with_what_it_owns_and_arrives_with_it() {
    let (_platform, db) = sample_platform("sync_moves", 20);
    let (la, lb) = (learner("sync_moves_a"), learner("sync_moves_b"));
    let (ta, tb) = (enable(&db, "21", &la), enable(&db, "22", &lb));
    let (a, b) = (la.connect("family"), lb.connect("family"));
    let wait_both = || {
        for t in [ta, tb] {
            assert_eq!(
                db.value(&format!("SELECT poco_sync_wait({t}, '1 min')"))
                    .as_deref(),
                Some("t"),
                "target {t} caught up"
            );
        }
    };

    // 1. A learner of family 21 moves to family 22: only their users row is touched, yet their
    //    enrollments, progress, attempts and log go with them.
    let moved: i64 = db.query(
        "SELECT u.id FROM elearning.users u WHERE u.parent_id = 21 \
          AND EXISTS (SELECT 1 FROM elearning.enrollments e WHERE e.learner_id = u.id) ORDER BY u.id LIMIT 1",
    )[0]
    .get(0);
    let owned = format!(
        "SELECT (SELECT count(*) FROM elearning.enrollments WHERE learner_id = {moved}) + \
                (SELECT count(*) FROM elearning.audit_log WHERE user_id = {moved})"
    );
    assert_ne!(
        a.value(&owned).as_deref(),
        Some("0"),
        "the learner owns rows on family 21's copy"
    );
    db.execute(&format!(
        "UPDATE elearning.users SET parent_id = 22 WHERE id = {moved}"
    ));
    wait_both();
    assert_learner_equals_scope(&db, &a, "21");
    assert_learner_equals_scope(&db, &b, "22");
    assert_eq!(
        a.value(&owned).as_deref(),
        Some("0"),
        "nothing of the moved learner stays with family 21"
    );
    assert_ne!(
        b.value(&owned).as_deref(),
        Some("0"),
        "family 22 has what the learner owns"
    );

    // 2. An enrollment moves from a learner of 22 to a learner of 21: its progress rows follow.
    db.execute(
        "UPDATE elearning.enrollments e SET learner_id = (SELECT min(id) FROM elearning.users WHERE parent_id = 21) \
          WHERE e.id = (SELECT min(e2.id) FROM elearning.enrollments e2 JOIN elearning.users u ON u.id = e2.learner_id \
                         WHERE u.parent_id = 22 AND e2.course_id NOT IN ( \
                           SELECT course_id FROM elearning.enrollments WHERE learner_id = (SELECT min(id) FROM elearning.users WHERE parent_id = 21)) \
                           AND EXISTS (SELECT 1 FROM elearning.lesson_progress p WHERE p.enrollment_id = e2.id))",
    );
    wait_both();
    assert_learner_equals_scope(&db, &a, "21");
    assert_learner_equals_scope(&db, &b, "22");
    // 3. The learner's copy was changed by hand (a column dropped): the batch it refuses is
    //    replaced by a new snapshot, which puts the copy right.
    a.execute("ALTER TABLE elearning.audit_log DROP COLUMN detail");
    db.execute("INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'after the learner changed')");
    wait_both();
    assert_learner_equals_scope(&db, &a, "21");
    // The moves were handled by new snapshots of both targets, and recorded.
    let resnaps: i64 =
        db.query("SELECT count(*) FROM poco.events WHERE kind = 'sync_resnapshot'")[0].get(0);
    assert!(resnaps >= 2, "{resnaps}");
}

#[test]
fn a_batch_whose_acknowledgement_is_lost_is_not_applied_twice() {
    let (platform, db) = sample_platform("sync_ack", 20);
    let l = learner("sync_ack_learner");
    let t = enable(&db, "21", &l);
    let ldb = l.connect("family");
    db.execute("ALTER SYSTEM SET poco.failpoint = 'stream_ack_lost'");
    db.execute("ALTER SYSTEM SET poco.retry_delay = '50ms'");
    platform.reload();
    std::thread::sleep(std::time::Duration::from_millis(500));

    // One change: the learner commits its batch, the platform never hears of it, and the next
    // pass finds the learner past the recorded position and brings it to the new snapshot
    // without a full snapshot.
    db.execute("UPDATE elearning.users SET display_name = 'once' WHERE id = 21");
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({t}, '30 s')"))
            .as_deref(),
        Some("t")
    );
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(
        ldb.value("SELECT batches FROM poco_sync.position")
            .as_deref(),
        Some("2"),
        "committed, then confirmed by a second batch"
    );
    assert_eq!(
        db.value("SELECT count(*) FROM poco.events WHERE kind = 'sync_resnapshot'")
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM poco.job WHERE target_id = {t}"
        ))
        .as_deref(),
        Some("1"),
        "no new snapshot"
    );
    assert_eq!(
        db.value(&format!(
            "SELECT learner_position::text FROM poco.target WHERE id = {t}"
        )),
        ldb.value("SELECT position FROM poco_sync.position")
    );
}

#[test]
fn a_learner_that_was_down_catches_up_exactly() {
    let (platform, db) = sample_platform("sync_down", 20);
    let l = learner("sync_down_learner");
    let t = enable(&db, "21", &l);
    db.execute("ALTER SYSTEM SET poco.retry_delay = '100ms'");
    platform.reload();

    // The learner goes away (Neon suspends idle databases); the platform keeps changing.
    l.stop("fast");
    db.execute("INSERT INTO elearning.audit_log (user_id, action) SELECT id, 'while down' FROM elearning.users WHERE parent_id = 21");
    db.execute(
        "UPDATE elearning.users SET display_name = display_name || ' (while down)' WHERE id = 21",
    );
    db.execute(
        "DELETE FROM elearning.enrollments WHERE id = (SELECT min(e.id) FROM elearning.enrollments e \
           JOIN elearning.users u ON u.id = e.learner_id WHERE u.parent_id = 21)",
    );
    // The target says what is wrong, and keeps the backlog.
    let err = poco_e2e::wait_for(std::time::Duration::from_secs(20), || {
        db.value("SELECT last_error FROM poco_status(21)")
            .filter(|e| !e.is_empty())
    });
    assert!(err.is_some(), "the failure shows in poco_status");
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({t}, '300 ms')"))
            .as_deref(),
        Some("f")
    );
    assert_ne!(
        db.value("SELECT count(*) FROM poco.change").as_deref(),
        Some("0"),
        "the backlog is kept"
    );

    // Back up: it catches up exactly, by itself, without a new snapshot.
    l.start_again();
    assert_eq!(
        db.value(&format!("SELECT poco_sync_wait({t}, '1 min')"))
            .as_deref(),
        Some("t")
    );
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(
        db.value("SELECT coalesce(last_error, '-') FROM poco_status(21)")
            .as_deref(),
        Some("-")
    );
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM poco.job WHERE target_id = {t}"
        ))
        .as_deref(),
        Some("1"),
        "no new snapshot"
    );
}

#[test]
fn the_history_checker_tells_lost_stale_and_leaked_rows_apart() {
    // The checker the fault tests rely on must see each kind of damage, or their zeros mean
    // nothing.
    let (_platform, db) = poco_e2e::sample_platform("checker", 20);
    let l = learner("checker_learner");
    let t: i64 = db.query(&format!(
        "SELECT poco_add_target(21, '{}')",
        l.target_url("family", "postgres", "pw")
    ))[0]
        .get(0);
    let job: i64 = db.query(&format!("SELECT poco_push(21, {t})"))[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("succeeded")
    );
    let ldb = l.connect("family");
    let clean = poco_e2e::check_learner(&db, &ldb, "21");
    assert!(clean.clean() && clean.rows > 100, "{clean:?}");
    // One row lost, one stale, one of another family leaked in.
    let other: String = db
        .value("SELECT id::text FROM elearning.audit_log WHERE user_id = 22 LIMIT 1")
        .unwrap();
    ldb.execute(
        "SET session_replication_role = replica; \
         DELETE FROM elearning.audit_log WHERE id = (SELECT min(id) FROM elearning.audit_log); \
         UPDATE elearning.audit_log SET action = 'tampered' WHERE id = (SELECT max(id) FROM elearning.audit_log)",
    );
    ldb.execute(&format!(
        "SET session_replication_role = replica; \
         INSERT INTO elearning.audit_log (id, user_id, action) OVERRIDING SYSTEM VALUE VALUES ({other}, 22, 'x')"
    ));
    let r = poco_e2e::check_learner(&db, &ldb, "21");
    assert_eq!(
        (r.lost, r.duplicated, r.stale, r.leaked),
        (1, 0, 1, 1),
        "{r:?}"
    );
}
