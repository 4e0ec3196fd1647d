//! Sealing the scope (issue #15): each test here is a way data could leave the platform, or
//! be lost, that an outside review found, and it failed before its fix. Leaks are looked for
//! with marker values (what must stay on the platform) in everything a learner could see: its
//! dumped database and every statement its server logged (`learner_view`).

use poco_e2e::{
    assert_absent, assert_learner_equals_scope, enable_sync, learner_view, logging_learner,
    sample_platform, Db,
};

fn synced(db: &Db, t: i64) -> bool {
    db.value(&format!("SELECT poco_sync_wait({t}, '1 min')"))
        .as_deref()
        == Some("t")
}

fn state(db: &Db, t: i64) -> String {
    db.value(&format!(
        "SELECT sync_state || ' ' || coalesce(last_sync_error, '-') FROM poco.target WHERE id = {t}"
    ))
    .unwrap_or_default()
}

/// Targets of parents 21 and 22 caught up, each learner equal to its family's scope.
fn both_exact(db: &Db, (ta, a): (i64, &Db), (tb, b): (i64, &Db)) {
    assert!(
        synced(db, ta) && synced(db, tb),
        "{} / {}",
        state(db, ta),
        state(db, tb)
    );
    assert_learner_equals_scope(db, a, "21");
    assert_learner_equals_scope(db, b, "22");
}

fn learner_columns(l: &Db, table: &str) -> Vec<String> {
    l.query(&format!(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'elearning.{table}'::regclass \
          AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    ))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn preview_excluded(db: &Db, table: &str) -> Vec<String> {
    db.query(&format!(
        "SELECT excluded_columns FROM poco_scope_preview(21) WHERE table_name = 'elearning.{table}'"
    ))[0]
        .get(0)
}

/// Every platform user's password hash, and its first 12 characters.
fn hash_markers(db: &Db) -> Vec<String> {
    db.query("SELECT password_hash, left(password_hash, 12) FROM elearning.users")
        .iter()
        .flat_map(|r| [r.get::<_, String>(0), r.get::<_, String>(1)])
        .collect()
}

#[test]
fn generated_columns_that_read_an_excluded_column_never_leave() {
    let (_platform, db) = sample_platform("seal_generated", 4);
    let markers = hash_markers(&db);
    db.execute(
        "CREATE FUNCTION public.hash_hint(bigint) RETURNS text LANGUAGE sql IMMUTABLE \
           AS $$ SELECT left(password_hash, 12) FROM elearning.users WHERE id = $1 $$; \
         ALTER TABLE elearning.users \
           ADD COLUMN pw_hint text GENERATED ALWAYS AS (left(password_hash, 12)) STORED, \
           ADD COLUMN pw_len integer GENERATED ALWAYS AS (length(password_hash)) STORED, \
           ADD COLUMN shout text GENERATED ALWAYS AS (upper(display_name)) STORED; \
         ALTER TABLE elearning.enrollments \
           ADD COLUMN learner_hint text GENERATED ALWAYS AS (public.hash_hint(learner_id)) STORED; \
         CREATE INDEX users_hash_prefix ON elearning.users (left(password_hash, 4)); \
         CREATE INDEX users_hint_idx ON elearning.users (pw_hint); \
         CREATE INDEX users_hashed ON elearning.users (email) WHERE password_hash <> ''; \
         ALTER TABLE elearning.users ADD CONSTRAINT hash_not_obvious CHECK (password_hash <> 'hunter2');",
    );
    // The preview says what stays behind, and why.
    let ex = preview_excluded(&db, "users");
    for c in ["password_hash", "pw_hint", "pw_len"] {
        assert!(ex.contains(&c.to_string()), "{c} excluded: {ex:?}");
    }
    assert!(!ex.contains(&"shout".to_string()), "{ex:?}");
    assert!(
        preview_excluded(&db, "enrollments").contains(&"learner_hint".to_string()),
        "a generated column calling a function outside pg_catalog may read an excluded column"
    );
    let warnings = db
        .value("SELECT array_to_string(warnings, ' | ') FROM poco_scope_preview(21) WHERE table_name = 'elearning.users'")
        .unwrap_or_default();
    assert!(
        warnings.contains("pw_hint") && warnings.contains("password_hash"),
        "{warnings}"
    );

    let l = logging_learner("seal_generated_learner");
    let t = enable_sync(&db, "21", &l);
    db.execute(
        "UPDATE elearning.users SET display_name = 'Renamed', password_hash = md5('new secret') WHERE id = 21; \
         INSERT INTO elearning.enrollments (learner_id, course_id) SELECT id, 3 FROM elearning.users WHERE parent_id = 21 LIMIT 1 \
           ON CONFLICT DO NOTHING;",
    );
    assert!(synced(&db, t), "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_eq!(
        learner_columns(&ldb, "users"),
        [
            "id",
            "role",
            "parent_id",
            "email",
            "display_name",
            "birth_year",
            "created_at",
            "shout"
        ]
    );
    assert!(!learner_columns(&ldb, "enrollments").contains(&"learner_hint".to_string()));
    assert_eq!(
        ldb.value("SELECT shout FROM elearning.users WHERE id = 21")
            .as_deref(),
        Some("RENAMED"),
        "a generated column of sent columns is sent"
    );
    assert_learner_equals_scope(&db, &ldb, "21");
    let mut markers = markers;
    markers.extend(hash_markers(&db));
    assert_absent(&learner_view(&l), &markers, "password hashes");
}

#[test]
fn an_excluded_column_stays_excluded_when_renamed_dropped_or_re_added() {
    let (_platform, db) = sample_platform("seal_renamed", 3);
    let mut markers = hash_markers(&db);
    let l = logging_learner("seal_renamed_learner");
    let t = enable_sync(&db, "21", &l);
    let ldb = l.connect("family");

    // Renamed: the exclusion follows the column, not its old name.
    db.execute("ALTER TABLE elearning.users RENAME COLUMN password_hash TO pw_secret");
    db.execute("UPDATE elearning.users SET pw_secret = md5('after the rename') WHERE id = 21");
    assert!(synced(&db, t), "{}", state(&db, t));
    assert!(preview_excluded(&db, "users").contains(&"pw_secret".to_string()));
    assert!(!learner_columns(&ldb, "users").contains(&"pw_secret".to_string()));
    // The old name now names another column: that one is not the secret, it is sent.
    db.execute("ALTER TABLE elearning.users RENAME COLUMN email TO password_hash");
    assert!(synced(&db, t), "{}", state(&db, t));
    let cols = learner_columns(&ldb, "users");
    assert!(
        cols.contains(&"password_hash".to_string()) && !cols.contains(&"pw_secret".to_string()),
        "{cols:?}"
    );
    // Following the advice to include the old name does not send the renamed column.
    db.value("SELECT poco_scope_include_column('elearning.users', 'email')");
    assert!(preview_excluded(&db, "users").contains(&"pw_secret".to_string()));

    // Dropped, then a column of the same name added again: the new one is excluded too.
    db.execute("ALTER TABLE elearning.users DROP COLUMN pw_secret");
    assert!(synced(&db, t), "{}", state(&db, t));
    db.execute(
        "ALTER TABLE elearning.users ADD COLUMN pw_secret text; \
         UPDATE elearning.users SET pw_secret = 'Re-added-' || md5(id::text || 'again')",
    );
    markers.extend(
        db.query("SELECT pw_secret FROM elearning.users")
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    assert!(synced(&db, t), "{}", state(&db, t));
    assert!(!learner_columns(&ldb, "users").contains(&"pw_secret".to_string()));
    assert!(preview_excluded(&db, "users").contains(&"pw_secret".to_string()));
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_absent(&learner_view(&l), &markers, "excluded values");
}

/// The owned tables' rows of parent 21, per table, as the preview counts them.
fn preview_counts(db: &Db) -> String {
    db.value("SELECT string_agg(table_name || '=' || rows, ' ' ORDER BY table_name) FROM poco_scope_preview(21)")
        .unwrap_or_default()
}

#[test]
fn a_root_predicate_means_the_same_in_every_compiled_query() {
    let (_platform, db) = sample_platform("seal_predicate", 6);
    let want = preview_counts(&db);
    // The alias the compiled queries give other tables: refused, whatever it would bind to.
    for p in [
        "t.id = $1 OR t.parent_id = $1",
        "users.id = $1",
        "o1.id = $1",
    ] {
        let e = db.error(&format!("SELECT poco_scope_root('elearning.users', '{p}')"));
        assert_eq!(e.code().code(), "42P01", "{p}: {}", e.message());
        assert!(
            e.hint().unwrap_or_default().contains("poco_root"),
            "{p}: {:?}",
            e.hint()
        );
        assert_eq!(preview_counts(&db), want, "{p}: the scope is unchanged");
    }
    // Names the compiled queries use themselves.
    let e = db.error(
        "SELECT poco_scope_root('elearning.users', 'id = $1 OR EXISTS (SELECT 1 FROM elearning.users poco_p WHERE poco_p.id = parent_id AND poco_p.id = $1)')",
    );
    assert_eq!(e.code().code(), "42601", "{}", e.message());
    // The root's own alias and correlated subqueries mean what they say everywhere.
    for p in [
        "poco_root.id = $1 OR poco_root.parent_id = $1",
        "id = $1 OR id IN (SELECT u.id FROM elearning.users u WHERE u.parent_id = $1)",
        "EXISTS (SELECT 1 FROM elearning.users t WHERE t.id = poco_root.id AND (t.id = $1 OR t.parent_id = $1))",
    ] {
        db.execute(&format!(
            "SELECT poco_scope_root('elearning.users', '{}')",
            p.replace('\'', "''")
        ));
        assert_eq!(preview_counts(&db), want, "{p}");
        // And a row's owners, found from the row upwards, agree.
        assert_eq!(
            db.value(
                "SELECT string_agg(o, ',') FROM poco_scope_owners('elearning.lesson_progress', \
                   (SELECT to_jsonb(p) FROM elearning.lesson_progress p JOIN elearning.enrollments e ON e.id = p.enrollment_id \
                      JOIN elearning.users u ON u.id = e.learner_id WHERE u.parent_id = 22 LIMIT 1), \
                   ARRAY['21', '22', '23']) o"
            )
            .as_deref(),
            Some("22"),
            "{p}"
        );
    }
}

#[test]
fn operators_of_other_schemas_are_never_picked_by_poco() {
    let (platform, db) = sample_platform("seal_search_path", 3);
    db.execute(
        "CREATE TABLE elearning.badges (code varchar(20) PRIMARY KEY, user_id bigint NOT NULL REFERENCES elearning.users (id)); \
         CREATE TABLE elearning.badge_notes (id bigint PRIMARY KEY, badge_code varchar(20) NOT NULL REFERENCES elearning.badges (code), note text); \
         CREATE INDEX ON elearning.badges (user_id); CREATE INDEX ON elearning.badge_notes (badge_code); \
         INSERT INTO elearning.badges SELECT 'b' || id, id FROM elearning.users; \
         INSERT INTO elearning.badge_notes SELECT id, 'b' || id, 'note' FROM elearning.users; \
         SELECT poco_scope_table('elearning.badges'); SELECT poco_scope_table('elearning.badge_notes'); \
         CREATE FUNCTION public.hijack_eq(varchar, varchar) RETURNS boolean LANGUAGE plpgsql IMMUTABLE \
           AS $$ BEGIN RAISE WARNING 'POCO-HIJACK by %', current_user; RETURN $1::text = $2::text; END $$; \
         CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.hijack_eq);",
    );
    // This session's own statements never see public's operator: any call is poco's.
    db.execute("SET search_path = pg_catalog");
    let l = poco_e2e::learner("seal_search_path_learner");
    let t = enable_sync(&db, "21", &l);
    db.execute(
        "INSERT INTO elearning.badge_notes VALUES (1000, 'b21', 'new'); \
         UPDATE elearning.badge_notes SET note = 'changed' WHERE badge_code = 'b22'",
    );
    assert!(synced(&db, t), "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(
        ldb.value("SELECT note FROM elearning.badge_notes WHERE id = 1000")
            .as_deref(),
        Some("new")
    );
    let hijacked = platform
        .log()
        .lines()
        .filter(|l| l.contains("POCO-HIJACK"))
        .count();
    assert_eq!(hijacked, 0, "an operator in public was called by poco_sync");
}

#[test]
fn no_code_of_a_non_superuser_runs_with_poco_sync_rights() {
    // Mallory owns an enum with a cast to json and a domain whose check calls her function;
    // scoped columns use both. Row images, attribution, batches, the preview and the owners
    // lookup must never run her code as poco_sync's superuser.
    let (platform, db) = sample_platform("seal_user_code", 3);
    db.execute(
        "CREATE ROLE mallory LOGIN; CREATE ROLE app LOGIN; SELECT poco_grant_usage('app'); \
         CREATE SCHEMA m AUTHORIZATION mallory; GRANT USAGE ON SCHEMA m TO PUBLIC; \
         GRANT USAGE ON SCHEMA elearning TO app; GRANT ALL ON ALL TABLES IN SCHEMA elearning TO app; \
         GRANT ALL ON ALL SEQUENCES IN SCHEMA elearning TO app;",
    );
    let mallory = platform.connect_as("mallory", "platform");
    mallory.execute(
        "CREATE TYPE m.mood AS ENUM ('happy', 'sad'); \
         CREATE FUNCTION m.mood_json(m.mood) RETURNS json LANGUAGE plpgsql \
           AS $$ BEGIN RAISE WARNING 'POCO-PWNED by %', current_user; RETURN to_json($1::text); END $$; \
         CREATE CAST (m.mood AS json) WITH FUNCTION m.mood_json(m.mood); \
         CREATE FUNCTION m.ok(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE \
           AS $$ BEGIN RAISE WARNING 'POCO-PWNED by %', current_user; RETURN true; END $$; \
         CREATE DOMAIN m.code AS text CHECK (m.ok(VALUE));",
    );
    db.execute(
        "ALTER TABLE elearning.users ADD COLUMN mood m.mood NOT NULL DEFAULT 'happy', ADD COLUMN moods m.mood[]; \
         ALTER TABLE elearning.enrollments ADD COLUMN code m.code;",
    );
    let from = platform.log().len();
    let app = platform.connect_as("app", "platform");
    let l = logging_learner("seal_user_code_learner");
    let url = l.target_url("family", "postgres", "pw");
    let t: i64 = app.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    let first = poco_e2e::latest_job_result(&db, t);
    app.execute(
        "UPDATE elearning.users SET mood = 'sad', moods = '{sad,happy}' WHERE id = 21; \
         UPDATE elearning.enrollments SET code = 'c-' || id WHERE learner_id IN (SELECT id FROM elearning.users WHERE parent_id = 21); \
         INSERT INTO elearning.enrollments (learner_id, course_id, code) SELECT id, 5, 'fresh' FROM elearning.users WHERE parent_id = 21 \
           ON CONFLICT DO NOTHING; \
         DELETE FROM elearning.lesson_progress WHERE enrollment_id IN (SELECT min(id) FROM elearning.enrollments WHERE learner_id IN (SELECT id FROM elearning.users WHERE parent_id = 21));",
    );
    let caught_up = synced(&db, t);
    app.query("SELECT * FROM poco_scope_preview(21)");
    db.query(
        "SELECT poco_scope_owners('elearning.enrollments', \
           jsonb_build_object('id', e.id, 'learner_id', e.learner_id, 'course_id', e.course_id, 'code', e.code::text)) \
           FROM elearning.enrollments e LIMIT 3",
    );
    // Looked at before the checks below, whose oracle reads the platform with to_jsonb.
    let log = platform.log();
    let pwned: Vec<&str> = log[from..]
        .lines()
        .filter(|l| l.contains("POCO-PWNED") && !l.contains("POCO-PWNED by app"))
        .collect();
    assert!(
        pwned.is_empty(),
        "{} calls as another role than the writer's, e.g. {:?}",
        pwned.len(),
        &pwned[..pwned.len().min(3)]
    );
    assert!(
        log[from..].contains("POCO-PWNED by app"),
        "the writer's own checks ran (the test would see them)"
    );
    // A domain check calling the platform's function stays behind (the platform checked).
    assert_eq!(first, "succeeded");
    assert!(caught_up, "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(
        ldb.value("SELECT mood::text || ' ' || moods::text FROM elearning.users WHERE id = 21")
            .as_deref(),
        Some("sad {sad,happy}")
    );
    assert_eq!(
        ldb.value("SELECT count(*) FROM elearning.enrollments WHERE code LIKE 'c-%' OR code = 'fresh'")
            .as_deref(),
        db.value("SELECT count(*) FROM elearning.enrollments e JOIN elearning.users u ON u.id = e.learner_id WHERE u.parent_id = 21")
            .as_deref()
    );
}

#[test]
fn a_batch_never_names_another_familys_keys() {
    // Parents 21 and 22 sync; 23 does not. Rows with keys no other value has (98765xxxx) are
    // deleted while both sync, directly and through ON DELETE CASCADE (whose rows' owners can
    // no longer be found at the batch's snapshot: their enrollment is gone): each learner
    // must see its own family's keys only, not even in a DELETE it received.
    let (_platform, db) = sample_platform("seal_foreign_keys", 4);
    let fam = |p: i64, base: i64| {
        format!(
            "INSERT INTO elearning.enrollments (id, learner_id, course_id) \
               SELECT {base} + row_number() OVER (ORDER BY id), id, 999 FROM elearning.users WHERE parent_id = {p}; \
             INSERT INTO elearning.lesson_progress (enrollment_id, lesson_id, status) \
               SELECT e.id, l.id, 'done' FROM elearning.enrollments e, elearning.lessons l \
                WHERE e.id > {base} AND e.id < {base} + 100 AND l.course_id = 999; \
             INSERT INTO elearning.audit_log (id, user_id, action) SELECT {base} + 50 + id, id, 'marked' FROM elearning.users WHERE id = {p};"
        )
    };
    db.execute(
        "INSERT INTO elearning.courses (id, title) VALUES (999, 'Extra'); \
         INSERT INTO elearning.lessons (id, course_id, position, title, body) \
           SELECT 9990 + i, 999, i, 'Extra ' || i, 'text' FROM generate_series(1, 3) i;",
    );
    db.execute(&fam(21, 987_610_000));
    db.execute(&fam(22, 987_620_000));
    db.execute(&fam(23, 987_630_000));
    let (la, lb) = (
        logging_learner("seal_foreign_keys_a"),
        logging_learner("seal_foreign_keys_b"),
    );
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    // One transaction touching all three families, so both targets' batches go together.
    db.execute(
        "BEGIN; \
         DELETE FROM elearning.enrollments WHERE id > 987610000 AND id < 987640000; \
         DELETE FROM elearning.audit_log WHERE id > 987610000 AND id < 987640000; \
         UPDATE elearning.users SET display_name = display_name || '.' WHERE id IN (21, 22); \
         COMMIT;",
    );
    assert!(
        synced(&db, ta) && synced(&db, tb),
        "{} / {}",
        state(&db, ta),
        state(&db, tb)
    );
    let (a, b) = (la.connect("family"), lb.connect("family"));
    assert_learner_equals_scope(&db, &a, "21");
    assert_learner_equals_scope(&db, &b, "22");
    let markers = |p: &str| vec![format!("9876{p}")];
    assert_absent(
        &learner_view(&la),
        &[markers("2"), markers("3")].concat(),
        "learner of 21",
    );
    assert_absent(
        &learner_view(&lb),
        &[markers("1"), markers("3")].concat(),
        "learner of 22",
    );
    // Its own family's deletes did reach each learner, by key: the cascaded rows' owners were
    // told from their enrollment's own change in the log (no reconciling of the table).
    let view = learner_view(&la);
    assert!(view.contains("98761"), "21's own deletes were sent to it");
    assert!(
        !view.contains(
            "DELETE FROM elearning.lesson_progress t WHERE (t.enrollment_id, t.lesson_id) NOT IN"
        ),
        "the cascade was resolved through the log"
    );
}

#[test]
fn rows_moved_through_an_undeclared_path_table_follow_their_family() {
    // class_notes are owned through classrooms, a table the scope does not declare (used for
    // the join, never sent): moving a classroom to another family moves its notes.
    let (_platform, db) = sample_platform("seal_path_table", 4);
    db.execute(
        "CREATE TABLE elearning.classrooms (id bigint PRIMARY KEY, owner_id bigint NOT NULL REFERENCES elearning.users (id)); \
         CREATE TABLE elearning.class_notes (id bigint PRIMARY KEY, \
             classroom_id bigint NOT NULL REFERENCES elearning.classrooms (id) ON DELETE CASCADE, note text NOT NULL); \
         CREATE INDEX ON elearning.classrooms (owner_id); CREATE INDEX ON elearning.class_notes (classroom_id); \
         INSERT INTO elearning.classrooms VALUES (501, 21), (502, 22), (503, 23); \
         INSERT INTO elearning.class_notes SELECT 987700000 + c * 10 + i, c, 'note ' || i FROM generate_series(501, 503) c, generate_series(1, 3) i; \
         SELECT poco_scope_table('elearning.class_notes');",
    );
    let (la, lb) = (
        logging_learner("seal_path_table_a"),
        logging_learner("seal_path_table_b"),
    );
    let (ta, tb) = (enable_sync(&db, "21", &la), enable_sync(&db, "22", &lb));
    let (a, b) = (la.connect("family"), lb.connect("family"));
    let notes =
        |l: &Db| l.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM elearning.class_notes");
    assert_eq!(notes(&a).as_deref(), Some("987705011,987705012,987705013"));
    // Classroom 501 goes to family 22, with its notes.
    db.execute("UPDATE elearning.classrooms SET owner_id = 22 WHERE id = 501");
    both_exact(&db, (ta, &a), (tb, &b));
    assert_eq!(notes(&a), None, "21 no longer holds 501's notes");
    // A classroom deleted with its notes (cascade): gone from its family, named to nobody else.
    db.execute("DELETE FROM elearning.classrooms WHERE id IN (502, 503); UPDATE elearning.users SET display_name = display_name || '.' WHERE id = 21");
    both_exact(&db, (ta, &a), (tb, &b));
    assert_absent(
        &learner_view(&la),
        &["98770502".to_string(), "98770503".to_string()],
        "learner of 21",
    );
    assert_absent(
        &learner_view(&lb),
        &["98770503".to_string()],
        "learner of 22",
    );
}

#[test]
fn a_root_predicate_that_reads_more_than_its_row_is_refused_for_continuous_sync() {
    let (_platform, db) = sample_platform("seal_predicate_reads", 3);
    let l = poco_e2e::learner("seal_predicate_reads_learner");
    let url = l.target_url("family", "postgres", "pw");
    for (p, why) in [
        (
            "id = $1 OR id IN (SELECT u.id FROM elearning.users u WHERE u.parent_id = $1)",
            "reads other rows",
        ),
        (
            "(id = $1 OR parent_id = $1) AND created_at <= now()",
            "now()",
        ),
    ] {
        db.execute(&format!(
            "SELECT poco_scope_root('elearning.users', '{}')",
            p.replace('\'', "''")
        ));
        // A push reads one snapshot: fine.
        let job = poco_e2e::push_to_new_target(&db, "21", &l);
        poco_e2e::assert_job_succeeds(&db, job, "1 min");
        // Continuous sync could not follow changes of what else it reads.
        let e = db.error(&format!("SELECT poco_enable_sync(21, '{url}')"));
        assert_eq!(e.code().code(), "0A000", "{p}: {}", e.message());
        assert!(e.message().contains(why), "{p}: {}", e.message());
        assert!(
            e.hint().unwrap_or_default().contains("poco_scope_root"),
            "{:?}",
            e.hint()
        );
    }
    // While a target syncs, such a predicate cannot be declared.
    db.execute("SELECT poco_scope_root('elearning.users', 'id = $1 OR parent_id = $1')");
    let t = enable_sync(&db, "21", &l);
    let e = db.error(
        "SELECT poco_scope_root('elearning.users', 'id = $1 OR id IN (SELECT u.id FROM elearning.users u WHERE u.parent_id = $1)')",
    );
    assert_eq!(e.code().code(), "0A000", "{}", e.message());
    assert!(synced(&db, t), "{}", state(&db, t));
}

#[test]
fn a_partitioned_table_syncs_through_its_partitions_and_their_changes() {
    let (_platform, db) = sample_platform("seal_partitions", 3);
    db.execute(
        "CREATE TABLE elearning.sessions (id bigint NOT NULL, user_id bigint NOT NULL REFERENCES elearning.users (id), \
             day date NOT NULL, what text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day); \
         CREATE INDEX ON elearning.sessions (user_id); \
         CREATE TABLE elearning.sessions_2025 PARTITION OF elearning.sessions FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
         -- A partition made apart, its columns in another order, then attached.
         CREATE TABLE elearning.sessions_2026 (what text, day date NOT NULL, user_id bigint NOT NULL, id bigint NOT NULL); \
         ALTER TABLE elearning.sessions ATTACH PARTITION elearning.sessions_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         INSERT INTO elearning.sessions SELECT u.id * 10 + d, u.id, date '2025-06-01' + d * 180, 'seen' FROM elearning.users u, generate_series(0, 1) d \
          WHERE u.id IN (21, 22); \
         SELECT poco_scope_table('elearning.sessions');",
    );
    let l = logging_learner("seal_partitions_learner");
    let t = enable_sync(&db, "21", &l);
    let ldb = l.connect("family");
    let count = |l: &Db| {
        l.value("SELECT count(*) FROM elearning.sessions")
            .unwrap_or_default()
    };
    assert_eq!(count(&ldb), "2");
    let changed = |sql: &str| {
        db.execute(sql);
        assert!(synced(&db, t), "{sql}: {}", state(&db, t));
        assert_learner_equals_scope(&db, &ldb, "21");
    };
    // Rows written to each partition, one moved across partitions, one deleted.
    changed("INSERT INTO elearning.sessions VALUES (1, 21, '2025-03-03', 'new 2025'), (2, 21, '2026-03-03', 'new 2026')");
    assert_eq!(count(&ldb), "4");
    changed("UPDATE elearning.sessions SET day = '2026-07-07', what = 'moved' WHERE id = 1");
    changed("DELETE FROM elearning.sessions WHERE id = 2");
    // Written through a partition directly.
    changed("INSERT INTO elearning.sessions_2026 (id, user_id, day, what) VALUES (3, 21, '2026-02-02', 'direct')");
    assert_eq!(count(&ldb), "4");
    // A partition created after sync started, written; then one partition truncated.
    changed(
        "CREATE TABLE elearning.sessions_2027 PARTITION OF elearning.sessions FOR VALUES FROM ('2027-01-01') TO ('2028-01-01'); \
         INSERT INTO elearning.sessions VALUES (4, 21, '2027-01-05', 'later partition')",
    );
    assert_eq!(count(&ldb), "5");
    changed("TRUNCATE elearning.sessions_2027");
    assert_eq!(count(&ldb), "4");
    changed("TRUNCATE elearning.sessions_2025");
    // Detached: its rows leave the scope; attached again: they come back.
    changed("ALTER TABLE elearning.sessions DETACH PARTITION elearning.sessions_2026");
    assert_eq!(count(&ldb), "0");
    changed("ALTER TABLE elearning.sessions ATTACH PARTITION elearning.sessions_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')");
    assert_eq!(count(&ldb), "2");
    // Sync off and on, and the table out of the scope and back, with partitions in place.
    db.execute("SELECT poco_disable_sync(21)");
    assert_eq!(
        db.value("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'poco_capture%'")
            .as_deref(),
        Some("0")
    );
    let t = enable_sync(&db, "21", &l);
    db.execute("SELECT poco_scope_remove('elearning.sessions')");
    assert!(synced(&db, t), "{}", state(&db, t));
    db.execute("SELECT poco_scope_table('elearning.sessions')");
    db.execute("INSERT INTO elearning.sessions VALUES (5, 21, '2026-09-09', 'after all that')");
    assert!(synced(&db, t), "{}", state(&db, t));
    assert_learner_equals_scope(&db, &ldb, "21");
    assert_eq!(count(&ldb), "3");
}

#[test]
fn a_capture_dropped_disabled_or_bypassed_is_repaired_and_loses_nothing() {
    let (_platform, db) = sample_platform("seal_triggers", 3);
    let l = poco_e2e::learner("seal_triggers_learner");
    let t = enable_sync(&db, "21", &l);
    let ldb = l.connect("family");
    let name = |l: &Db| {
        l.value("SELECT display_name FROM elearning.users WHERE id = 21")
            .unwrap_or_default()
    };
    let write = |sql: &str, want: &str| {
        db.execute(&format!(
            "{sql}; UPDATE elearning.users SET display_name = '{want}' WHERE id = 21"
        ));
        assert!(synced(&db, t), "{sql}: {}", state(&db, t));
        assert_eq!(name(&ldb), want, "{sql}");
        assert_learner_equals_scope(&db, &ldb, "21");
    };
    write(
        "DROP TRIGGER poco_capture ON elearning.users",
        "after a dropped trigger",
    );
    write(
        "ALTER TABLE elearning.users DISABLE TRIGGER poco_capture",
        "after a disabled trigger",
    );
    write(
        "ALTER TABLE elearning.users DISABLE TRIGGER ALL",
        "after all triggers disabled",
    );
    write(
        "SET session_replication_role = replica",
        "under replica role",
    );
    db.execute("RESET session_replication_role");
    write(
        "ALTER TRIGGER poco_capture ON elearning.users RENAME TO renamed",
        "after a renamed trigger",
    );
    assert_eq!(
        db.value("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'elearning.users'::regclass AND tgfoid = 'poco.capture()'::regprocedure").as_deref(),
        Some("2"),
        "one row and one TRUNCATE trigger, the renamed one gone"
    );
    // What no event trigger sees (event triggers off): the stream finds it within seconds,
    // repairs the capture and re-snapshots, so the write made meanwhile arrives too.
    db.execute(
        "ALTER EVENT TRIGGER poco_capture_ddl DISABLE; DROP TRIGGER poco_capture ON elearning.users; \
         ALTER EVENT TRIGGER poco_capture_ddl ENABLE ALWAYS; \
         UPDATE elearning.users SET display_name = 'uncaptured' WHERE id = 21",
    );
    assert!(
        poco_e2e::wait_for(std::time::Duration::from_secs(30), || (name(&ldb)
            == "uncaptured")
            .then_some(()))
        .is_some(),
        "{}",
        state(&db, t)
    );
    assert_eq!(
        db.value("SELECT count(*) FROM poco.events WHERE kind = 'capture_repaired'")
            .as_deref(),
        Some("1")
    );
    assert!(synced(&db, t), "{}", state(&db, t));
    assert_learner_equals_scope(&db, &ldb, "21");
}

/// A restore queued for a continuous target while a snapshot of it ends is not a re-snapshot:
/// the target streams on (it once stayed in 'resnapshot' with no job to end it, and its
/// changes stopped reaching the learner).
#[test]
fn a_queued_restore_does_not_stop_a_continuous_target() {
    let (_platform, db) = sample_platform("seal_restore_queued", 3);
    let l = poco_e2e::learner("seal_restore_queued_learner");
    let t = enable_sync(&db, "21", &l);
    assert!(synced(&db, t), "{}", state(&db, t));
    // A new snapshot held up on the learner (a session of its own holds a lock on a table
    // the push replaces) while a restore is queued behind it.
    let holder = l.connect("family");
    holder.execute("BEGIN; LOCK TABLE elearning.users IN ACCESS SHARE MODE");
    let job: i64 = db.query("SELECT poco_push('21')")[0].get(0);
    let mut running = false;
    for _ in 0..200 {
        if db
            .value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
            .as_deref()
            == Some("running")
        {
            running = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(running, "the push did not start");
    db.execute(&format!(
        "INSERT INTO poco.job (kind, parent_id, target_id, next_attempt_at) \
         VALUES ('restore', '21', {t}, now() + interval '1 hour')"
    ));
    holder.execute("COMMIT");
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("succeeded")
    );
    assert_eq!(state(&db, t), "streaming -");
    // And a change made now still arrives.
    db.execute("UPDATE elearning.users SET display_name = 'after the snapshot' WHERE id = 21");
    db.execute(&format!(
        "DELETE FROM poco.job WHERE target_id = {t} AND kind = 'restore' AND state = 'queued'"
    ));
    assert!(synced(&db, t), "{}", state(&db, t));
    let ldb = l.connect("family");
    assert_eq!(
        ldb.value("SELECT display_name FROM elearning.users WHERE id = 21")
            .as_deref(),
        Some("after the snapshot")
    );
}
