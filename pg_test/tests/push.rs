//! Full-overwrite pushes end to end: the sample platform pushed to real learner servers, row
//! by row equal to what the scope selects; a second parent replaces the first; jobs are
//! transactional; the platform never pushes into itself.

use poco_e2e::{assert_learner_equals_scope, sample_platform, wait_for, Db, Options, Server};
use std::time::Duration;

fn learner(name: &str, dbname: &str) -> Server {
    let s = Server::start(name, &Options::learner());
    s.psql("postgres", &format!("CREATE DATABASE {dbname}"));
    s
}

fn push_and_wait(db: &Db, parent: &str) -> Vec<(i64, String)> {
    let ids: Vec<i64> = db
        .query(&format!("SELECT poco_push({parent})"))
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect();
    assert!(!ids.is_empty());
    ids.into_iter()
        .map(|id| {
            let state: String = db.query(&format!("SELECT poco_wait({id}, '2 min')"))[0].get(0);
            (id, state)
        })
        .collect()
}

fn job_error(db: &Db, id: i64) -> String {
    db.value(&format!(
        "SELECT coalesce(error, '') FROM poco.jobs WHERE job_id = {id}"
    ))
    .unwrap_or_default()
}

#[test]
fn a_push_copies_exactly_the_scope_and_a_second_parent_replaces_the_first() {
    let (_platform, db) = sample_platform("push_sample", 40);
    let l = learner("push_sample_learner", "family");
    let url = l.target_url("family", "postgres", "pw");
    db.execute(&format!(
        "SELECT poco_add_target(21, '{url}', 'first family')"
    ));
    db.execute(&format!(
        "SELECT poco_add_target(22, '{url}', 'second family')"
    ));

    let res = push_and_wait(&db, "21");
    assert_eq!(res.len(), 1);
    let (job, state) = &res[0];
    assert_eq!(state, "succeeded", "job {job}: {}", job_error(&db, *job));
    let ldb = l.connect("family");
    let rows = assert_learner_equals_scope(&db, &ldb, "21");
    assert!(rows > 50, "the family has rows ({rows})");
    // Never the excluded column, never the unscoped table.
    assert_eq!(
        ldb.value(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'password_hash'"
        )
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        ldb.value("SELECT to_regclass('elearning.platform_secrets') IS NULL")
            .as_deref(),
        Some("t")
    );
    // Bookkeeping in the same transaction.
    assert_eq!(
        ldb.value("SELECT parent_id || '/' || job_id FROM poco_sync.snapshot")
            .unwrap(),
        format!("21/{job}")
    );
    let job_rows: i64 = db.query(&format!(
        "SELECT rows_done FROM poco.jobs WHERE job_id = {job}"
    ))[0]
        .get(0);
    assert_eq!(job_rows as usize, rows, "poco.jobs counts every row sent");
    // Keys and foreign keys exist on the learner.
    let fks: i64 = ldb.query("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'elearning'::regnamespace")[0].get(0);
    assert!(fks >= 5, "scoped foreign keys recreated ({fks})");
    assert_eq!(ldb.value("SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND connamespace = 'elearning'::regnamespace").as_deref(), Some("8"));
    // Loaded with COPY FREEZE: every page of every pushed table is all-visible and all-frozen
    // at once, so the learner's autovacuum has no copy to rewrite after a push.
    ldb.execute("CREATE EXTENSION pg_visibility");
    let unfrozen = ldb.value(
        "SELECT string_agg(c.oid::regclass::text, ',') FROM pg_class c, pg_visibility_map_summary(c.oid) v \
          WHERE c.relnamespace = 'elearning'::regnamespace AND c.relkind = 'r' \
            AND (v.all_visible, v.all_frozen) <> (pg_relation_size(c.oid) / 8192, pg_relation_size(c.oid) / 8192)",
    );
    assert_eq!(
        unfrozen, None,
        "tables with pages not all-visible and all-frozen"
    );
    let pages: i64 = ldb.query("SELECT sum(pg_relation_size(c.oid) / 8192)::int8 FROM pg_class c WHERE c.relnamespace = 'elearning'::regnamespace AND c.relkind = 'r'")[0].get(0);
    assert!(pages >= 8, "the family's tables have pages ({pages})");

    // The second family overwrites: nothing of the first stays.
    let res = push_and_wait(&db, "22");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    assert_learner_equals_scope(&db, &ldb, "22");
    assert_eq!(
        ldb.value("SELECT count(*) FROM elearning.users WHERE id = 21 OR parent_id = 21")
            .as_deref(),
        Some("0")
    );

    // The push was logged with who asked, rows, bytes and duration.
    let ev = db.value(&format!(
        "SELECT actor || ' ' || (detail->>'rows') || ' ' || ((detail->>'bytes')::bigint > 0) || ' ' || (detail ? 'duration_ms') \
           FROM poco.events WHERE kind = 'push_succeeded' AND job_id = {}",
        res[0].0
    ));
    assert!(
        ev.as_deref()
            .is_some_and(|e| e.starts_with("postgres ") && e.ends_with(" true true")),
        "{ev:?}"
    );
}

#[test]
fn a_rolled_back_push_sends_nothing_and_the_platform_never_pushes_into_itself() {
    let (platform, db) = sample_platform("push_tx", 10);
    let l = learner("push_tx_learner", "family");
    let url = l.target_url("family", "postgres", "pw");
    db.execute(&format!("SELECT poco_add_target(3, '{url}')"));

    db.execute("BEGIN");
    let job: i64 = db.query("SELECT poco_push(3)")[0].get(0);
    // Waiting inside the queuing transaction can only time out: refused with a hint.
    let e = db.error(&format!("SELECT poco_wait({job}, '1 s')"));
    assert_eq!(e.code().code(), "55000", "{e:?}");
    db.execute("ROLLBACK");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        db.value(&format!("SELECT count(*) FROM poco.job WHERE id = {job}"))
            .as_deref(),
        Some("0")
    );
    let ldb = l.connect("family");
    assert_eq!(
        ldb.value("SELECT to_regclass('poco_sync.snapshot') IS NULL")
            .as_deref(),
        Some("t"),
        "nothing arrived"
    );

    // A target that is the platform database itself is refused; the platform is untouched.
    let before = db
        .value("SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM elearning.users u")
        .unwrap();
    let self_url = platform.target_url("platform", "postgres", "pw");
    let t: i64 = db.query(&format!("SELECT poco_add_target(3, '{self_url}')"))[0].get(0);
    let job: i64 = db.query(&format!("SELECT poco_push(3, {t})"))[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("failed")
    );
    let err = job_error(&db, job);
    assert!(err.contains("platform database itself"), "{err}");
    assert_eq!(
        db.value("SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM elearning.users u")
            .unwrap(),
        before
    );
    assert_eq!(
        db.value("SELECT to_regclass('poco_sync.snapshot') IS NULL")
            .as_deref(),
        Some("t")
    );

    // Errors at enqueue time carry SQLSTATE and hint.
    let e = db.error("SELECT poco_push(99999)");
    assert_eq!(e.code().code(), "42704", "{e:?}");
    let e = db.error("SELECT poco_wait(987654)");
    assert_eq!(e.code().code(), "42704", "{e:?}");
    let ok = wait_for(Duration::from_secs(5), || Some(()));
    assert!(ok.is_some());
}

const TYPES_SCHEMA: &str = r#"
CREATE SCHEMA "Ünï Sch";
SET search_path = "Ünï Sch", public;
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s complicated');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text, m mood);
CREATE TABLE "Famille Ö" (id bigint PRIMARY KEY, "Name ""quoted""" text NOT NULL);
CREATE TABLE things (
  id serial PRIMARY KEY,
  fam bigint NOT NULL REFERENCES "Famille Ö"(id),
  j jsonb, n numeric, arr integer[], moods mood[], m mood DEFAULT 'happy', b bytea,
  ts timestamptz, tsn timestamp, iv interval, u uuid, f8 float8, f4 real, t text, p pair,
  d posint, dt date, tm time, tz timetz, ip inet, r tstzrange, ok boolean, ch char(3), vc varchar(10),
  big int8, pt point, "Ключ" text, xs text[], bits bit varying(8), money_ money,
  gen integer GENERATED ALWAYS AS (id * 2) STORED,
  ident integer GENERATED BY DEFAULT AS IDENTITY,
  CONSTRAINT "n is not 42" CHECK (n IS NULL OR n <> 42)
);
CREATE INDEX "things lower t" ON things (lower(t));
CREATE UNIQUE INDEX things_u ON things (u) WHERE u IS NOT NULL;
CREATE TABLE nodes (id integer PRIMARY KEY, fam bigint NOT NULL REFERENCES "Famille Ö"(id),
                    parent integer REFERENCES nodes(id));
CREATE TABLE a (id integer PRIMARY KEY, fam bigint NOT NULL REFERENCES "Famille Ö"(id), b_id integer);
CREATE TABLE b (id integer PRIMARY KEY, a_id integer NOT NULL REFERENCES a(id), label text);
ALTER TABLE a ADD CONSTRAINT a_b_fk FOREIGN KEY (b_id) REFERENCES b(id) DEFERRABLE INITIALLY DEFERRED;

INSERT INTO "Famille Ö" VALUES (1, 'one "1"'), (2, E'two\ttwo');
INSERT INTO things (fam, j, n, arr, moods, m, b, ts, tsn, iv, u, f8, f4, t, p, d, dt, tm, tz, ip, r, ok, ch, vc, big, pt, "Ключ", xs, bits, money_) VALUES
 (1, '{"a": [1, 2.50, "ü\u00e9x"], "b": {"c": null}}', 'NaN', '{1,NULL,3}', '{happy,"it''s complicated",NULL}', 'sad',
  '\x00ff5c0a', 'infinity', '-infinity', '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  'NaN', '-Infinity', E'tab\there\nnew line\\back\\slash\r', '(7,"x,y",sad)', 5, '2024-02-29', '23:59:59.999999',
  '12:00+05:30', '192.168.0.1/24', '[2024-01-01 00:00+00,2024-02-01 00:00+00)', true, 'ab', 'vc', 9223372036854775807,
  '(1.5,-2)', 'кириллица', '{"a\\b","c\"d",NULL,""}', B'101', 12.34),
 (1, 'null', '123456789012345678901234567890.123456789012345678901234567890', '{}', '{}', 'happy', '\x', '2024-06-01 12:34:56.789+02',
  '2024-06-01 12:34:56', '-1 days +02:00', NULL, 'Infinity', 1.17549435e-38, '\N', NULL, NULL, '0001-01-01 BC', '00:00', NULL,
  '::1', 'empty', false, NULL, '', -1, NULL, NULL, '{}', NULL, 0),
 (1, '[]', '-0.000001', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0.0, 'NaN', '', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (2, '{"other": "family"}', 1, NULL, NULL, 'happy', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'second family', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
-- The same values in a table of built-in types, enums and domains only: sent as binary COPY
-- (things, with an array of enums and a composite, goes as text).
CREATE TABLE flat (id integer PRIMARY KEY, fam bigint NOT NULL REFERENCES "Famille Ö"(id),
  j jsonb, n numeric, arr integer[], m mood, b bytea, ts timestamptz, tsn timestamp, iv interval, u uuid,
  f8 float8, f4 real, t text, d posint, dt date, tm time, tz timetz, ip inet, r tstzrange, ok boolean,
  ch char(3), vc varchar(10), big int8, pt point, "Ключ" text, xs text[], bits bit varying(8), money_ money,
  js json, tv tsvector, nums numeric[]);
INSERT INTO flat SELECT id, fam, j, n, arr, m, b, ts, tsn, iv, u, f8, f4, t, d, dt, tm, tz, ip, r, ok, ch, vc, big,
  pt, "Ключ", xs, bits, money_, j::json, to_tsvector('simple', t), ARRAY[n, 'NaN', NULL, '-Infinity'] FROM things;
INSERT INTO nodes VALUES (1, 1, NULL), (2, 1, 1), (3, 1, 2), (4, 2, NULL), (5, 2, 4);
BEGIN;
INSERT INTO a VALUES (1, 1, 10), (2, 2, 20);
INSERT INTO b VALUES (10, 1, 'cycle one'), (20, 2, 'cycle two');
COMMIT;
RESET search_path;
SELECT poco_scope_root('"Ünï Sch"."Famille Ö"', 'id = $1');
SELECT poco_scope_table('"Ünï Sch".things');
SELECT poco_scope_table('"Ünï Sch".nodes');
SELECT poco_scope_table('"Ünï Sch".flat');
SELECT poco_scope_table('"Ünï Sch".a', via => 'fam');
SELECT poco_scope_table('"Ünï Sch".b');
"#;

#[test]
fn every_type_round_trips_and_odd_names_cycles_and_self_references_load() {
    let platform = Server::start("push_types", &Options::platform());
    let db = platform.connect("platform");
    db.execute(TYPES_SCHEMA);
    let l = learner("push_types_learner", "family");
    db.execute(&format!(
        "SELECT poco_add_target(1, '{}')",
        l.target_url("family", "postgres", "pw")
    ));
    let res = push_and_wait(&db, "1");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    let ldb = l.connect("family");
    let rows = assert_learner_equals_scope(&db, &ldb, "1");
    assert_eq!(rows, 1 + 3 + 3 + 3 + 1 + 1);
    // Tables of built-in types, enums and domains went as binary COPY; things (an array of
    // enums, a composite: their binary forms carry the platform's type OIDs) as text.
    let formats = format!(
        "SELECT (SELECT string_agg(x, ',' ORDER BY x) FROM jsonb_array_elements_text(detail->'binary_copy') x) || ' / ' || \
                (SELECT string_agg(x, ',' ORDER BY x) FROM jsonb_array_elements_text(detail->'text_copy') x) \
           FROM poco.jobs WHERE job_id = {}",
        res[0].0
    );
    assert_eq!(
        db.value(&formats).as_deref(),
        Some("\"Ünï Sch\".\"Famille Ö\",\"Ünï Sch\".a,\"Ünï Sch\".b,\"Ünï Sch\".flat,\"Ünï Sch\".nodes / \"Ünï Sch\".things")
    );
    assert_columns_equal(&db, &ldb);
    // The same column types, NULL versus the text \N kept apart.
    let types = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull, ', ' ORDER BY attnum) \
                 FROM pg_attribute WHERE attrelid = '\"Ünï Sch\".things'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(ldb.value(types), db.value(types));
    assert_eq!(
        ldb.value("SELECT count(*) FROM \"Ünï Sch\".things WHERE t = '\\N'")
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        ldb.value("SELECT count(*) FROM \"Ünï Sch\".things WHERE t IS NULL")
            .as_deref(),
        Some("0")
    );
    // Constraints, indexes, identity, sequences past the data, enum order, the domain's check.
    assert_eq!(
        ldb.value("SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint WHERE conrelid = '\"Ünï Sch\".things'::regclass"),
        Some("n is not 42,things_fam_fkey,things_pkey".into())
    );
    assert_eq!(
        ldb.value("SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'things'"),
        Some("things lower t,things_pkey,things_u".into())
    );
    let next: i64 =
        ldb.query("SELECT nextval(pg_get_serial_sequence('\"Ünï Sch\".things', 'id'))")[0].get(0);
    assert!(next > 3, "serial sequence set past the data ({next})");
    let e = ldb.error("INSERT INTO \"Ünï Sch\".things (fam, n) VALUES (1, 42)");
    assert_eq!(e.code().code(), "23514", "the check constraint came along");
    let e = ldb.error("SELECT 0::\"Ünï Sch\".posint");
    assert_eq!(e.code().code(), "23514", "the domain's check came along");
    assert_eq!(
        ldb.value("SELECT string_agg(x::text, ',' ORDER BY x) FROM unnest(enum_range(NULL::\"Ünï Sch\".mood)) x"),
        Some("happy,sad,it's complicated".into())
    );
    // The self-reference and the cycle loaded (their rows are all there); nothing of family 2.
    assert_eq!(
        ldb.value("SELECT string_agg(id::text, ',' ORDER BY id) FROM \"Ünï Sch\".nodes")
            .as_deref(),
        Some("1,2,3")
    );
    assert_eq!(
        ldb.value("SELECT label FROM \"Ünï Sch\".b").as_deref(),
        Some("cycle one")
    );
    assert_eq!(
        ldb.value("SELECT count(*) FROM \"Ünï Sch\".things WHERE fam = 2")
            .as_deref(),
        Some("0")
    );

    // A second push over the first works the same (types and tables replaced), here with
    // binary COPY turned off: every table as text, the same values.
    set_conf(&platform, &db, &[("poco.binary_copy", "off")]);
    let res = push_and_wait(&db, "1");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    let formats = format!("SELECT jsonb_array_length(detail->'binary_copy') || ' ' || jsonb_array_length(detail->'text_copy') FROM poco.jobs WHERE job_id = {}", res[0].0);
    assert_eq!(db.value(&formats).as_deref(), Some("0 6"));
    assert_learner_equals_scope(&db, &ldb, "1");
    assert_columns_equal(&db, &ldb);
}

/// Column by column, the family's values in things and flat are equal on both sides as
/// values too (not only as row text).
fn assert_columns_equal(db: &Db, ldb: &Db) {
    for table in ["things", "flat"] {
        let cols: Vec<String> = db
            .query(&format!(
                "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = '\"Ünï Sch\".{table}'::regclass AND attnum > 0 ORDER BY attnum"
            ))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(cols.len() > 25);
        for c in &cols {
            let q = format!("SELECT string_agg(coalesce({c}::text, '<NULL>'), '|' ORDER BY id) FROM \"Ünï Sch\".{table} WHERE fam = 1");
            assert_eq!(ldb.value(&q), db.value(&q), "{table}.{c}");
        }
    }
}

/// A digest of everything the learner holds in the pushed tables.
fn learner_digest(ldb: &Db) -> String {
    ldb.value(
        "SELECT md5(string_agg(x, '|' ORDER BY x)) FROM ( \
           SELECT 'u' || u::text AS x FROM elearning.users u UNION ALL \
           SELECT 'a' || a::text FROM elearning.audit_log a UNION ALL \
           SELECT 'e' || e::text FROM elearning.enrollments e UNION ALL \
           SELECT 'q' || q::text FROM elearning.quizzes q) s",
    )
    .unwrap()
}

fn set_conf(platform: &Server, db: &Db, settings: &[(&str, &str)]) {
    for (k, v) in settings {
        db.execute(&format!("ALTER SYSTEM SET {k} = '{v}'"));
    }
    platform.reload();
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn the_learner_keeps_its_copy_when_a_push_fails_midway_or_is_cancelled() {
    let (platform, db) = sample_platform("push_fault", 20);
    set_conf(
        &platform,
        &db,
        &[
            ("poco.push_attempts", "2"),
            ("poco.retry_delay", "200ms"),
            ("poco.copy_chunk", "16kB"),
        ],
    );
    // A family big enough that its COPY takes many chunks.
    db.execute(
        "INSERT INTO elearning.audit_log (user_id, action, detail) \
         SELECT 21, 'page_view', jsonb_build_object('page', g, 'pad', repeat('x', 200)) FROM generate_series(1, 4000) g",
    );
    let l = learner("push_fault_learner", "family");
    let proxy = poco_e2e::FaultProxy::start(l.port);
    let url = format!(
        "postgresql://postgres:pw@127.0.0.1:{}/family?sslmode=disable",
        proxy.port
    );
    db.execute(&format!("SELECT poco_add_target(21, '{url}')"));
    let res = push_and_wait(&db, "21");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    let ldb = l.connect("family");
    let before = learner_digest(&ldb);
    let bytes: i64 = db.query(&format!(
        "SELECT bytes_done FROM poco.jobs WHERE job_id = {}",
        res[0].0
    ))[0]
        .get(0);
    assert!(
        bytes > 600_000,
        "the family's COPY data is large ({bytes} bytes)"
    );
    // The platform changes: a push that got through would change the learner.
    db.execute("UPDATE elearning.users SET display_name = display_name || ' v2' WHERE id = 21 OR parent_id = 21");

    // 1. The connection dies in the middle of the COPY, on every attempt: retried, then failed.
    proxy.cut_after(bytes as u64 / 2);
    let res = push_and_wait(&db, "21");
    let job = res[0].0;
    assert_eq!(res[0].1, "failed", "{}", job_error(&db, job));
    assert_eq!(
        db.value(&format!(
            "SELECT attempts FROM poco.jobs WHERE job_id = {job}"
        ))
        .as_deref(),
        Some("2")
    );
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM poco.events WHERE job_id = {job} AND kind = 'push_retry'"
        ))
        .as_deref(),
        Some("1")
    );
    assert!(
        proxy.cuts() >= 2,
        "both attempts were cut ({})",
        proxy.cuts()
    );
    assert_eq!(learner_digest(&ldb), before, "the learner kept its copy");
    proxy.cut_after(0);

    // 2. A failure late in the learner transaction (all rows in, building keys): not transient,
    //    so no retry; the learner is unchanged.
    ldb.execute(
        "CREATE FUNCTION public.fail_late() RETURNS event_trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE object_identity = 'elearning.quizzes') \
         THEN RAISE EXCEPTION 'late failure injected'; END IF; END $$; \
         CREATE EVENT TRIGGER fail_late ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION public.fail_late();",
    );
    let res = push_and_wait(&db, "21");
    let job = res[0].0;
    assert_eq!(res[0].1, "failed");
    let err = job_error(&db, job);
    assert!(err.contains("late failure injected"), "{err}");
    assert_eq!(
        db.value(&format!(
            "SELECT attempts || ' ' || error_sqlstate FROM poco.jobs WHERE job_id = {job}"
        ))
        .as_deref(),
        Some("1 P0001")
    );
    let done: i64 = db.query(&format!(
        "SELECT tables_done::bigint FROM poco.jobs WHERE job_id = {job}"
    ))[0]
        .get(0);
    assert_eq!(done, 8, "every table's rows had been sent");
    assert_eq!(learner_digest(&ldb), before);
    ldb.execute("DROP EVENT TRIGGER fail_late");

    // 3. Cancelled while the rows stream (the proxy slows them down).
    proxy.delay_per_8k(40);
    let job: i64 = db.query("SELECT poco_push(21)")[0].get(0);
    let running = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT 1 FROM poco.jobs WHERE job_id = {job} AND state = 'running' AND bytes_done > 0"
        ))
    });
    assert!(running.is_some(), "the job started streaming");
    assert_eq!(
        db.value(&format!("SELECT poco_cancel({job})")).as_deref(),
        Some("t")
    );
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '30 s')"))
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        db.value(&format!("SELECT poco_cancel({job})")).as_deref(),
        Some("f"),
        "nothing left to cancel"
    );
    assert_eq!(learner_digest(&ldb), before);
    proxy.delay_per_8k(0);

    // 4. With the network healthy again the push goes through, with the platform's new data.
    let res = push_and_wait(&db, "21");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    assert_ne!(learner_digest(&ldb), before);
    assert_learner_equals_scope(&db, &ldb, "21");
}

#[test]
fn a_job_whose_process_is_killed_ends_failed_and_the_next_push_works() {
    let (platform, db) = sample_platform("push_crash", 10);
    db.execute(
        "INSERT INTO elearning.audit_log (user_id, action, detail) \
         SELECT 3, 'page_view', jsonb_build_object('pad', repeat('y', 300)) FROM generate_series(1, 3000) g",
    );
    let l = learner("push_crash_learner", "family");
    let proxy = poco_e2e::FaultProxy::start(l.port);
    proxy.delay_per_8k(50);
    let url = format!(
        "postgresql://postgres:pw@127.0.0.1:{}/family?sslmode=disable",
        proxy.port
    );
    db.execute(&format!("SELECT poco_add_target(3, '{url}')"));
    let job: i64 = db.query("SELECT poco_push(3)")[0].get(0);
    let pid = wait_for(Duration::from_secs(30), || {
        db.value(&format!(
            "SELECT pid FROM poco.jobs WHERE job_id = {job} AND bytes_done > 0"
        ))
    })
    .expect("the job is streaming");
    // SIGKILL of a server process: the postmaster restarts the whole server.
    unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    drop(db);
    // Poll with a fresh connection each time: the crash restart may still be ahead of us, and
    // only the restarted worker marks the job failed.
    let state = wait_for(Duration::from_secs(90), || {
        let d = platform.try_connect("platform")?;
        d.try_value(&format!("SELECT state || ': ' || coalesce(error, '') FROM poco.jobs WHERE job_id = {job} AND state <> 'running'"))
            .ok()
            .flatten()
    });
    let state = state.expect("the job ended");
    assert!(
        state.starts_with("failed: ") && state.contains("interrupted"),
        "{state}"
    );
    let ldb = l.connect("family");
    assert_eq!(
        ldb.value("SELECT to_regclass('poco_sync.snapshot') IS NULL")
            .as_deref(),
        Some("t"),
        "nothing committed"
    );

    proxy.delay_per_8k(0);
    let db = platform.connect("platform");
    let res = push_and_wait(&db, "3");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    assert_learner_equals_scope(&db, &ldb, "3");
}

#[test]
fn progress_advances_while_a_push_runs_and_is_announced() {
    let (platform, db) = sample_platform("push_progress", 10);
    db.execute(
        "INSERT INTO elearning.audit_log (user_id, action, detail) \
         SELECT 3, 'page_view', jsonb_build_object('pad', repeat('z', 300)) FROM generate_series(1, 3000) g",
    );
    let l = learner("push_progress_learner", "family");
    let proxy = poco_e2e::FaultProxy::start(l.port);
    let url = format!(
        "postgresql://postgres:pw@127.0.0.1:{}/family?sslmode=disable",
        proxy.port
    );
    db.execute(&format!("SELECT poco_add_target(3, '{url}')"));
    // A first push gives the estimate (rows of the last push) for the second.
    let res = push_and_wait(&db, "3");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    let total: i64 = db.query(&format!(
        "SELECT rows_done FROM poco.jobs WHERE job_id = {}",
        res[0].0
    ))[0]
        .get(0);

    let listener = poco_e2e::listen(&platform.conninfo("platform"), "poco_progress");
    proxy.delay_per_8k(30);
    let job: i64 = db.query("SELECT poco_push(3)")[0].get(0);
    // poco.jobs shows the rows and bytes advance while it runs.
    let mut seen: Vec<(i64, i64)> = Vec::new();
    for _ in 0..200 {
        let r = db.query(&format!("SELECT state, rows_done, bytes_done, current_table FROM poco.jobs WHERE job_id = {job}"));
        let state: String = r[0].get(0);
        if state == "running" {
            let rb = (r[0].get::<_, i64>(1), r[0].get::<_, i64>(2));
            if rb.1 > 0 && seen.last() != Some(&rb) {
                assert!(
                    r[0].get::<_, Option<String>>(3).is_some(),
                    "a current table while streaming"
                );
                seen.push(rb);
            }
        } else if state != "queued" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen.len() >= 2, "progress advanced in poco.jobs: {seen:?}");
    assert!(
        seen.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "{seen:?}"
    );
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("succeeded")
    );

    std::thread::sleep(Duration::from_millis(300));
    let notes: Vec<serde_json::Value> = listener
        .rx
        .try_iter()
        .map(|p| serde_json::from_str::<serde_json::Value>(&p).expect("JSON payload"))
        .filter(|v| v["job_id"] == job)
        .collect();
    let running: Vec<&serde_json::Value> =
        notes.iter().filter(|v| v["state"] == "running").collect();
    assert!(
        running.len() >= 2,
        "several progress notifications: {notes:?}"
    );
    for v in &running {
        for k in [
            "tables_total",
            "tables_done",
            "rows_done",
            "bytes_done",
            "percent",
            "elapsed_s",
        ] {
            assert!(v.get(k).is_some_and(|x| !x.is_null()), "{k} in {v}");
        }
        assert_eq!(v["rows_expected"], total);
        assert!(v["percent"].as_f64().unwrap() < 100.0);
    }
    assert!(
        running.iter().any(|v| v["eta_s"].is_number()),
        "an estimate of time left: {running:?}"
    );
    let last = notes.last().unwrap();
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(last["percent"], 100.0);
    assert_eq!(last["rows_done"], total);
}

#[test]
fn transient_failures_are_retried_with_backoff_and_addresses_are_checked_when_connecting() {
    let (platform, db) = sample_platform("push_retry", 5);
    set_conf(
        &platform,
        &db,
        &[("poco.push_attempts", "3"), ("poco.retry_delay", "300ms")],
    );
    // A closed loopback port: connection refused, three attempts 300 ms then 600 ms apart.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    db.execute(&format!(
        "SELECT poco_add_target(2, 'postgresql://u:p@127.0.0.1:{closed}/x?sslmode=disable')"
    ));
    let t0 = std::time::Instant::now();
    let res = push_and_wait(&db, "2");
    let took = t0.elapsed();
    let job = res[0].0;
    assert_eq!(res[0].1, "failed");
    assert_eq!(
        db.value(&format!(
            "SELECT attempts || ' ' || error_sqlstate FROM poco.jobs WHERE job_id = {job}"
        ))
        .as_deref(),
        Some("3 08001")
    );
    let delays = db.value(&format!(
        "SELECT string_agg((detail->>'attempt') || ':' || (message ~ 'retrying in (300|600) ms')::text, ',' ORDER BY id) \
           FROM poco.events WHERE job_id = {job} AND kind = 'push_retry'"
    ));
    assert_eq!(
        delays.as_deref(),
        Some("1:true,2:true"),
        "exponential backoff"
    );
    assert!(
        took >= Duration::from_millis(900),
        "the backoff was waited ({took:?})"
    );
    db.execute("DELETE FROM poco.target");

    // Stored while private targets were allowed, pushed after they no longer are: the
    // resolved address is checked when connecting, and the job fails at once.
    let l = learner("push_retry_learner", "family");
    db.execute(&format!(
        "SELECT poco_add_target(2, 'postgresql://postgres:p@localhost:{}/family?sslmode=require')",
        l.port
    ));
    set_conf(&platform, &db, &[("poco.allow_private_targets", "off")]);
    let res = push_and_wait(&db, "2");
    assert_eq!(res[0].1, "failed");
    let err = job_error(&db, res[0].0);
    assert!(
        err.contains("resolves to") && err.contains("loopback"),
        "{err}"
    );
    assert_eq!(
        db.value(&format!(
            "SELECT attempts FROM poco.jobs WHERE job_id = {}",
            res[0].0
        ))
        .as_deref(),
        Some("1")
    );
}

#[test]
fn backups_keep_the_previous_copies_and_one_call_restores_one() {
    let (_platform, db) = sample_platform("push_backup", 10);
    let l = learner("push_backup_learner", "family");
    let t: i64 = db.query(&format!(
        "SELECT poco_add_target(3, '{}')",
        l.target_url("family", "postgres", "pw")
    ))[0]
        .get(0);
    db.execute(&format!("SELECT poco_set_backups({t}, 2)"));
    let e = db.error(&format!("SELECT poco_set_backups({t}, -1)"));
    assert_eq!(e.code().code(), "22023");
    let ldb = l.connect("family");
    let mut digests = Vec::new();
    let mut backups = Vec::new();
    for round in 1..=4 {
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = 'round {round}' WHERE id = 3"
        ));
        let res = push_and_wait(&db, "3");
        assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
        backups.push(db.value(&format!(
            "SELECT backup_schema FROM poco.jobs WHERE job_id = {}",
            res[0].0
        )));
        digests.push(learner_digest(&ldb));
    }
    assert_eq!(backups[0], None, "nothing to keep before the first push");
    assert!(
        backups[1..]
            .iter()
            .all(|b| b.as_deref().is_some_and(|s| s.starts_with("poco_backup_"))),
        "{backups:?}"
    );
    // The last two kept; each holds the copy its push replaced.
    let kept: Vec<String> = ldb
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'poco_backup_%' ORDER BY 1",
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kept,
        [backups[2].clone().unwrap(), backups[3].clone().unwrap()]
    );
    assert_eq!(
        ldb.value(&format!(
            "SELECT count(*) FROM {}.poco_objects WHERE kind = 'type'",
            kept[1]
        ))
        .as_deref(),
        Some("1"),
        "the enum was kept too"
    );
    assert_eq!(
        ldb.value("SELECT display_name FROM elearning.users WHERE id = 3")
            .as_deref(),
        Some("round 4")
    );

    // Restore the latest: the copy of round 3 is back, in one transaction, and its backup is gone.
    let job: i64 = db.query(&format!("SELECT poco_restore({t})"))[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job})")).as_deref(),
        Some("succeeded"),
        "{}",
        job_error(&db, job)
    );
    assert_eq!(learner_digest(&ldb), digests[2]);
    assert_eq!(
        ldb.value("SELECT display_name FROM elearning.users WHERE id = 3")
            .as_deref(),
        Some("round 3")
    );
    assert_eq!(
        ldb.value("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'poco_backup_%'")
            .as_deref(),
        Some("1")
    );
    assert!(
        ldb.value("SELECT 1 FROM pg_type WHERE typname = 'user_role'")
            .is_some(),
        "the enum type is back"
    );
    // Restore a named one: round 2's copy.
    let job: i64 = db.query(&format!("SELECT poco_restore({t}, '{}')", kept[0]))[0].get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job})")).as_deref(),
        Some("succeeded"),
        "{}",
        job_error(&db, job)
    );
    assert_eq!(learner_digest(&ldb), digests[1]);
    // A push after restores works as usual.
    let res = push_and_wait(&db, "3");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    assert_learner_equals_scope(&db, &ldb, "3");

    // Errors: a name that is not a backup; no such backup.
    let e = db.error(&format!("SELECT poco_restore({t}, 'public; DROP TABLE x')"));
    assert_eq!(e.code().code(), "22023");
    let job: i64 = db.query(&format!(
        "SELECT poco_restore({t}, 'poco_backup_20000101t000000_1')"
    ))[0]
        .get(0);
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job})")).as_deref(),
        Some("failed")
    );
    assert!(
        job_error(&db, job).contains("no backup"),
        "{}",
        job_error(&db, job)
    );
}
