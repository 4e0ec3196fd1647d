//! The account scope on the sample e-learning platform (sample/), its errors, its life cycle
//! (change, remove, pg_dump and restore) and who may call what.

use poco_e2e::{sample_platform, Db, Options, Server};

fn count(db: &Db, sql: &str) -> i64 {
    db.query(sql)[0].get(0)
}

fn preview_rows(db: &Db, parent: i64, table: &str) -> i64 {
    count(
        db,
        &format!(
            "SELECT rows FROM poco_scope_preview({parent}::bigint) WHERE table_name = '{table}'"
        ),
    )
}

#[test]
fn the_sample_scope_selects_one_family_and_nothing_else() {
    let (_platform, db) = sample_platform("scope_sample", 40);
    let tables: Vec<String> = db
        .query("SELECT table_name FROM poco_scope_preview(21)")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    assert_eq!(
        tables,
        [
            "elearning.users",
            "elearning.audit_log",
            "elearning.enrollments",
            "elearning.quiz_attempts",
            "elearning.lesson_progress",
            "elearning.courses",
            "elearning.lessons",
            "elearning.quizzes"
        ]
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM poco_scope_preview(21) WHERE table_name LIKE '%secrets%'"
        ),
        0
    );

    // For several families, the preview equals hand-written queries over the sample's meaning.
    for parent in [21i64, 22, 23, 40, 60] {
        let fam =
            format!("(SELECT id FROM elearning.users WHERE id = {parent} OR parent_id = {parent})");
        let learners = format!("(SELECT id FROM elearning.users WHERE parent_id = {parent})");
        let expect = [
            ("elearning.users", format!("SELECT count(*) FROM {fam} f")),
            ("elearning.audit_log", format!("SELECT count(*) FROM elearning.audit_log WHERE user_id IN {fam}")),
            ("elearning.enrollments", format!("SELECT count(*) FROM elearning.enrollments WHERE learner_id IN {learners}")),
            ("elearning.quiz_attempts", format!("SELECT count(*) FROM elearning.quiz_attempts WHERE learner_id IN {learners}")),
            (
                "elearning.lesson_progress",
                format!("SELECT count(*) FROM elearning.lesson_progress p JOIN elearning.enrollments e ON e.id = p.enrollment_id WHERE e.learner_id IN {learners}"),
            ),
            (
                "elearning.quizzes",
                format!("SELECT count(DISTINCT quiz_id) FROM elearning.quiz_attempts WHERE learner_id IN {learners}"),
            ),
            (
                // Lessons with progress or a quiz attempted, then their prerequisites (the
                // sample's prerequisites chain every earlier lesson of the course).
                "elearning.lessons",
                format!(
                    "WITH RECURSIVE base AS (
                        SELECT p.lesson_id AS id FROM elearning.lesson_progress p JOIN elearning.enrollments e ON e.id = p.enrollment_id WHERE e.learner_id IN {learners}
                        UNION SELECT q.lesson_id FROM elearning.quizzes q WHERE q.id IN (SELECT quiz_id FROM elearning.quiz_attempts WHERE learner_id IN {learners})),
                      c AS (SELECT id FROM base UNION SELECT l.prerequisite_id FROM elearning.lessons l JOIN c ON l.id = c.id WHERE l.prerequisite_id IS NOT NULL)
                     SELECT count(*) FROM c"
                ),
            ),
        ];
        for (table, sql) in &expect {
            assert_eq!(
                preview_rows(&db, parent, table),
                count(&db, sql),
                "parent {parent}, {table}"
            );
        }
        assert!(preview_rows(&db, parent, "elearning.courses") > 0);
    }
    // Every row the compiled queries return belongs to the family, for every owned table.
    for row in db.query("SELECT table_name, select_sql FROM poco.scope_tables WHERE role = 'owned'")
    {
        let (table, sql): (String, String) = (row.get(0), row.get(1));
        let n =
            db.query_with(&format!("SELECT count(*) FROM ({sql}) q"), &[&"22"])[0].get::<_, i64>(0);
        assert!(n > 0, "{table}");
    }
    let sql: String = db.query(
        "SELECT select_sql FROM poco.scope_tables WHERE table_name = 'elearning.quiz_attempts'",
    )[0]
    .get(0);
    let outsiders = db.query_with(
        &format!("SELECT count(*) FROM ({sql}) q WHERE q.learner_id NOT IN (SELECT id FROM elearning.users WHERE parent_id = 22)"),
        &[&"22"],
    );
    assert_eq!(
        outsiders[0].get::<_, i64>(0),
        0,
        "an attempt of another family left"
    );

    // The excluded column never appears in what is selected; the FK verdicts are explained.
    let users_sql: String = db
        .query("SELECT select_sql FROM poco.scope_tables WHERE table_name = 'elearning.users'")[0]
        .get(0);
    assert!(!users_sql.contains("password_hash"), "{users_sql}");
    let cols = db.query_with(&format!("SELECT * FROM ({users_sql}) q LIMIT 1"), &[&"21"]);
    assert!(cols[0]
        .columns()
        .iter()
        .all(|c| c.name() != "password_hash"));
    let r = &db.query(
        "SELECT excluded_columns, foreign_keys_left_out FROM poco_scope_preview(21) WHERE table_name = 'elearning.users'",
    )[0];
    assert_eq!(r.get::<_, Vec<String>>(0), ["password_hash"]);
    assert!(r.get::<_, Vec<String>>(1)[0].contains("users_parent_id_fkey"));
    let r = &db.query(
        "SELECT path, foreign_keys_sent, foreign_keys_left_out FROM poco_scope_preview(21) WHERE table_name = 'elearning.quiz_attempts'",
    )[0];
    assert_eq!(
        r.get::<_, String>(0),
        "elearning.quiz_attempts(learner_id) → elearning.users"
    );
    let sent = r.get::<_, Vec<String>>(1).join("\n");
    assert!(
        sent.contains("quiz_attempts_learner_id_fkey")
            && sent.contains("quiz_attempts_quiz_id_fkey"),
        "{sent}"
    );
    let left = r.get::<_, Vec<String>>(2).join("\n");
    assert!(
        left.contains("quiz_attempts_reviewed_by_fkey") && left.contains("another account"),
        "{left}"
    );
    let left: Vec<String> = db.query("SELECT foreign_keys_left_out FROM poco_scope_preview(21) WHERE table_name = 'elearning.courses'")[0].get(0);
    assert!(
        left[0].contains("courses_author_id_fkey") && left[0].contains("pointing into an account"),
        "{left:?}"
    );

    // Parent ids are canonicalised through the root key type.
    assert_eq!(
        count(
            &db,
            "SELECT sum(rows)::int8 FROM poco_scope_preview('0022')"
        ),
        count(&db, "SELECT sum(rows)::int8 FROM poco_scope_preview(22)")
    );
    // A parent that does not exist has nothing; an admin id is its own single row.
    assert_eq!(
        count(
            &db,
            "SELECT sum(rows)::int8 FROM poco_scope_preview(999999) WHERE role <> 'reference'"
        ),
        0
    );

    // The index check: all FK columns on paths are indexed in the sample; drop one.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM poco_scope_check() WHERE severity = 'warning'"
        ),
        0
    );
    db.execute("DROP INDEX elearning.audit_log_user_idx");
    let w: String =
        db.query("SELECT message FROM poco_scope_check() WHERE severity = 'warning'")[0].get(0);
    assert!(
        w.contains("no index on elearning.audit_log(user_id)") && w.contains("CREATE INDEX"),
        "{w}"
    );

    // The owners of a row: the family that owns it, among the candidates.
    let owners: Vec<String> = db.query(
        "SELECT array_agg(o) FROM poco_scope_owners('elearning.quiz_attempts', \
           (SELECT to_jsonb(q) FROM elearning.quiz_attempts q JOIN elearning.users u ON u.id = q.learner_id WHERE u.parent_id = 23 LIMIT 1), \
           ARRAY['21', '22', '23', '24']) o",
    )[0]
        .get(0);
    assert_eq!(owners, ["23"]);
}

fn err(db: &Db, sql: &str) -> (String, String, String) {
    let e = db.error(sql);
    (
        e.code().code().to_string(),
        e.message().to_string(),
        e.hint().unwrap_or_default().to_string(),
    )
}

#[test]
fn scope_errors_say_what_is_wrong_and_change_nothing() {
    let platform = Server::start("scope_errors", &Options::platform());
    let db = platform.connect("platform");
    db.execute(
        "CREATE TABLE \"Users\" (id uuid PRIMARY KEY, parent uuid REFERENCES \"Users\", name text);
         CREATE TABLE notes (id int PRIMARY KEY, author uuid REFERENCES \"Users\", reviewer uuid REFERENCES \"Users\", body text);
         CREATE TABLE secrets (id int PRIMARY KEY, v text);
         CREATE TABLE nokey (a int, b int);
         CREATE TABLE composite (a int, b int, PRIMARY KEY (a, b));
         CREATE VIEW v AS SELECT 1 AS x;
         CREATE TABLE ra (id int PRIMARY KEY, rb int);
         CREATE TABLE rb (id int PRIMARY KEY, ra int REFERENCES ra);
         ALTER TABLE ra ADD FOREIGN KEY (rb) REFERENCES rb;
         CREATE TABLE owned_ref (id int PRIMARY KEY, user_id uuid REFERENCES \"Users\", ra int REFERENCES ra);
         INSERT INTO \"Users\" VALUES ('00000000-0000-4000-8000-000000000001', NULL, 'p');",
    );
    let (c, m, h) = err(&db, "SELECT poco_scope_table('notes')");
    assert_eq!(c, "55000");
    assert!(
        m.contains("no scope root is declared") && h.contains("poco_scope_root"),
        "{m} / {h}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM poco.scope"),
        0,
        "a failed declaration left a row"
    );

    let (c, m, _) = err(&db, "SELECT poco_scope_root('nokey', 'a = $1')");
    assert_eq!(
        (c.as_str(), m.as_str()),
        (
            "42P16",
            "the scope root public.nokey has no single-column primary key"
        )
    );
    let (c, _, _) = err(&db, "SELECT poco_scope_root('composite', 'a = $1')");
    assert_eq!(c, "42P16");
    let (c, m, h) = err(
        &db,
        "SELECT poco_scope_root('\"Users\"', 'id = $1) OR (true')",
    );
    assert_eq!(c, "42601");
    assert!(
        m.contains("closes a parenthesis") && h.contains("$1"),
        "{m}"
    );
    let (c, m, _) = err(&db, "SELECT poco_scope_root('\"Users\"', 'true')");
    assert_eq!(c, "42601");
    assert!(m.contains("does not use $1"), "{m}");
    let (c, m, _) = err(
        &db,
        "SELECT poco_scope_root('\"Users\"', 'id = $1; DROP TABLE secrets')",
    );
    assert_eq!(c, "42601");
    assert!(m.contains("semicolon"), "{m}");
    let (c, m, h) = err(&db, "SELECT poco_scope_root('\"Users\"', 'nope = $1')");
    assert_eq!(c, "42703");
    assert!(
        m.contains("invalid root predicate") && m.contains("nope") && h.contains("uuid"),
        "{m} / {h}"
    );
    let (c, m, _) = err(
        &db,
        "SELECT poco_scope_root('\"Users\"', 'name || $1::text')",
    );
    assert_eq!(c, "42804");
    assert!(m.contains("invalid root predicate"), "{m}");
    let (c, m, _) = err(&db, "SELECT poco_scope_root('v', 'x = $1')");
    assert_eq!(c, "42809");
    assert!(m.contains("public.v is not a table"), "{m}");
    assert_eq!(count(&db, "SELECT count(*) FROM poco.scope"), 0);

    db.execute("SELECT poco_scope_root('\"Users\"', 'id = $1 OR parent = $1')");
    let (c, m, h) = err(&db, "SELECT poco_scope_table('notes')");
    assert_eq!(c, "42702");
    assert!(
        m.contains("public.notes(author) → public.\"Users\"")
            && m.contains("public.notes(reviewer) → public.\"Users\""),
        "{m}"
    );
    assert!(h.contains("via => 'author'"), "{h}");
    let (c, m, h) = err(&db, "SELECT poco_scope_table('notes', via => 'body')");
    assert_eq!(c, "42703");
    assert!(
        m.contains("no foreign key or foreign-key column named \"body\"")
            && h.contains("notes_author_fkey"),
        "{m} / {h}"
    );
    let (c, m, _) = err(&db, "SELECT poco_scope_table('secrets')");
    assert_eq!(c, "42830");
    assert!(
        m.contains(
            "no foreign key path leads from public.secrets to the account root public.\"Users\""
        ),
        "{m}"
    );
    let (c, m, h) = err(&db, "SELECT poco_scope_table('owned_ref', via => 'ra')");
    assert_eq!(c, "42830");
    assert!(m.contains("does not lead to the account root"), "{m}");
    assert!(h.contains("owned_ref(user_id)"), "{h}");
    db.execute("SELECT poco_scope_table('notes', via => 'author')");
    db.execute("SELECT poco_scope_table('notes', via => 'notes_reviewer_fkey')"); // re-declaring updates
    assert_eq!(
        db.value("SELECT path FROM poco.scope_tables WHERE table_name = 'public.notes'")
            .unwrap(),
        "public.notes(reviewer) → public.\"Users\""
    );
    let (c, m, _) = err(&db, "SELECT poco_scope_reference('notes')");
    assert_eq!(c, "42710");
    assert!(m.contains("already declared as owned"), "{m}");
    let (c, m, h) = err(&db, "SELECT poco_scope_reference('secrets', 'some')");
    assert_eq!(c, "22023");
    assert!(
        m.contains("invalid reference mode") && h.contains("'all'"),
        "{m}"
    );

    // A cycle of 'referenced' tables is refused; with one of them 'all' it is fine.
    db.execute("SELECT poco_scope_reference('ra')");
    let (c, m, h) = err(&db, "SELECT poco_scope_reference('rb')");
    assert_eq!(c, "42P17");
    assert!(m.contains("cycle") && h.contains("'all'"), "{m} / {h}");
    db.execute("SELECT poco_scope_reference('rb', 'all')");

    let (c, m, _) = err(&db, "SELECT poco_scope_exclude_column('notes', 'id')");
    assert_eq!(c, "22023");
    assert!(m.contains("primary key"), "{m}");
    let (c, _, _) = err(&db, "SELECT poco_scope_exclude_column('notes', 'nope')");
    assert_eq!(c, "42703");
    let (c, m, h) = err(&db, "SELECT * FROM poco_scope_preview('not-a-uuid')");
    assert_eq!(c, "22P02");
    assert!(
        m.contains("invalid parent id") && h.contains("uuid"),
        "{m} / {h}"
    );
    let (c, m, _) = err(&db, "SELECT poco_add_target('00000000-0000-4000-8000-000000000099'::uuid, 'postgresql://u:p@127.0.0.1:1/d?sslmode=disable')");
    assert_eq!(c, "42704");
    assert!(m.contains("has no account"), "{m}");
    // A stored target's parent id is canonical (the uuid without braces), and so is lookup.
    db.execute("SELECT poco_add_target('{00000000-0000-4000-8000-000000000001}', 'postgresql://u:p@127.0.0.1:1/d?sslmode=disable')");
    assert_eq!(
        db.value("SELECT parent_id FROM poco.targets").unwrap(),
        "00000000-0000-4000-8000-000000000001"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM poco_status('00000000-0000-4000-8000-000000000001'::uuid)"
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM poco_status('{00000000-0000-4000-8000-000000000001}')"
        ),
        1
    );
    let (c, _, _) = err(&db, "SELECT poco_scope_owners('secrets', '{}'::jsonb)");
    assert_eq!(c, "22023");
    // Removing the root while owned tables need it: refused, nothing removed.
    let before = count(&db, "SELECT count(*) FROM poco.scope");
    let (c, m, _) = err(&db, "SELECT poco_scope_remove('\"Users\"')");
    assert_eq!(c, "55000");
    assert!(m.contains("no scope root"), "{m}");
    assert_eq!(count(&db, "SELECT count(*) FROM poco.scope"), before);
    // Every successful change is in the audit log.
    assert!(
        count(
            &db,
            "SELECT count(*) FROM poco.events WHERE kind = 'scope_changed'"
        ) >= 4
    );
}

#[test]
fn the_scope_can_change_and_survives_dump_and_restore() {
    let (platform, db) = sample_platform("scope_dump", 12);
    let before: Vec<(String, i64, String)> = db
        .query("SELECT table_name, rows, path FROM poco_scope_preview(23)")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    // Removing enrollments: lesson_progress still reaches users through it, undeclared.
    assert!(db.query("SELECT poco_scope_remove('elearning.enrollments')")[0].get::<_, bool>(0));
    let r = &db.query("SELECT rows, path, foreign_keys_left_out FROM poco_scope_preview(23) WHERE table_name = 'elearning.lesson_progress'")[0];
    assert_eq!(r.get::<_, String>(1), "elearning.lesson_progress(enrollment_id) → elearning.enrollments(learner_id) → elearning.users");
    assert_eq!(
        r.get::<_, i64>(0),
        before
            .iter()
            .find(|b| b.0 == "elearning.lesson_progress")
            .unwrap()
            .1
    );
    assert!(r.get::<_, Vec<String>>(2)[0].contains("elearning.enrollments is not in the scope"));
    db.execute("SELECT poco_scope_table('elearning.enrollments')");
    assert!(
        db.query("SELECT poco_scope_include_column('elearning.users', 'password_hash')")[0]
            .get::<_, bool>(0)
    );
    db.execute("SELECT poco_scope_exclude_column('elearning.users', 'password_hash')");

    // pg_dump keeps the declarations (extension configuration tables); a restore into a new
    // database resolves the same scope.
    let dump = platform.data_dir().parent().unwrap().join("platform.dump");
    let dump = dump.to_string_lossy().into_owned();
    platform.tool("pg_dump", &["-Fc", "-f", &dump, "platform"]);
    db.execute("CREATE DATABASE restored");
    let out = platform.tool("pg_restore", &["-d", "restored", &dump]);
    assert!(!out.contains("error"), "{out}");
    let restored = platform.connect("restored");
    let after: Vec<(String, i64, String)> = restored
        .query("SELECT table_name, rows, path FROM poco_scope_preview(23)")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        restored
            .value("SELECT string_agg(col, ',') FROM poco.scope_exclusion")
            .unwrap(),
        "password_hash"
    );

    // Dropping a scoped table removes its declaration (and says so in the audit log); a table
    // whose path needed it then fails to resolve, naming it.
    db.execute("DROP TABLE elearning.audit_log");
    assert_eq!(count(&db, "SELECT count(*) FROM poco_scope_preview(23)"), 7);
    assert!(db
        .value("SELECT message FROM poco.events ORDER BY id DESC LIMIT 1")
        .unwrap()
        .contains("elearning.audit_log (owned) was dropped"));
    db.execute("DROP TABLE elearning.enrollments CASCADE");
    let e = db.error("SELECT * FROM poco_scope_preview(23)");
    assert_eq!(e.code().code(), "42830");
    assert!(
        e.message()
            .contains("no foreign key path leads from elearning.lesson_progress"),
        "{}",
        e.message()
    );

    // poco_scope_clear forgets everything.
    assert_eq!(count(&db, "SELECT poco_scope_clear()"), 6);
    let e = db.error("SELECT * FROM poco_scope_preview(23)");
    assert_eq!(e.code().code(), "55000");
}

#[test]
fn applications_may_preview_but_not_change_the_scope() {
    let (_platform, db) = sample_platform("scope_grants", 5);
    db.execute("CREATE ROLE app LOGIN; SELECT poco_grant_usage('app');");
    let app = _platform.connect_as("app", "platform");
    assert!(count(&app, "SELECT count(*) FROM poco_scope_preview(21)") > 0);
    for sql in [
        "SELECT poco_scope_root('elearning.users', 'id = $1')",
        "SELECT poco_scope_table('elearning.audit_log')",
        "SELECT poco_scope_clear()",
        "SELECT poco_scope_exclude_column('elearning.users', 'email')",
    ] {
        assert_eq!(app.error(sql).code().code(), "42501", "{sql}");
    }
}
