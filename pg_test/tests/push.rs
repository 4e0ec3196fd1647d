//! Full-overwrite pushes end to end: the sample platform pushed to real learner servers, row
//! by row equal to what the scope selects; a second parent replaces the first; jobs are
//! transactional; the platform never pushes into itself.

use poco_e2e::{wait_for, Db, Options, Server};
use std::path::Path;
use std::time::Duration;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path).to_string_lossy().into_owned()
}

fn sample_platform(name: &str, parents: u32) -> (Server, Db) {
    let platform = Server::start(name, &Options::platform());
    for f in ["sample/schema.sql", "sample/data.sql", "sample/scope.sql"] {
        let out = platform.tool(
            "psql",
            &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", &format!("parents={parents}"), "-d", "platform", "-f", &repo(f)],
        );
        assert!(!out.contains("ERROR"), "{f}: {out}");
    }
    let db = platform.connect("platform");
    (platform, db)
}

fn learner(name: &str, dbname: &str) -> Server {
    let s = Server::start(name, &Options::learner());
    s.psql("postgres", &format!("CREATE DATABASE {dbname}"));
    s
}

fn push_and_wait(db: &Db, parent: &str) -> Vec<(i64, String)> {
    let ids: Vec<i64> =
        db.query(&format!("SELECT poco_push({parent})")).iter().map(|r| r.get::<_, i64>(0)).collect();
    assert!(!ids.is_empty());
    ids.into_iter()
        .map(|id| {
            let state: String = db.query(&format!("SELECT poco_wait({id}, '2 min')"))[0].get(0);
            (id, state)
        })
        .collect()
}

fn job_error(db: &Db, id: i64) -> String {
    db.value(&format!("SELECT coalesce(error, '') FROM poco.jobs WHERE job_id = {id}")).unwrap_or_default()
}

/// Every scoped table on the learner holds exactly the rows the scope selects for `parent`
/// on the platform (compared as sorted row texts), and the learner has no other table of
/// the platform's.
fn assert_learner_equals_scope(platform: &Db, learner: &Db, parent: &str) -> usize {
    let tables = platform.query("SELECT table_name, select_sql FROM poco.scope_tables ORDER BY table_name");
    let mut total = 0;
    for t in &tables {
        let name: String = t.get(0);
        let sql: String = t.get(1);
        let mut want: Vec<String> = platform
            .query_with(&format!("SELECT s::text FROM ({sql}) s"), &[&parent])
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let mut got: Vec<String> =
            learner.query(&format!("SELECT s::text FROM {name} s")).iter().map(|r| r.get::<_, String>(0)).collect();
        want.sort();
        got.sort();
        assert_eq!(got.len(), want.len(), "{name}: row count for parent {parent}");
        assert!(got == want, "{name}: rows differ for parent {parent}");
        total += got.len();
    }
    total
}

#[test]
fn a_push_copies_exactly_the_scope_and_a_second_parent_replaces_the_first() {
    let (_platform, db) = sample_platform("push_sample", 40);
    let l = learner("push_sample_learner", "family");
    let url = l.target_url("family", "postgres", "pw");
    db.execute(&format!("SELECT poco_add_target(21, '{url}', 'first family')"));
    db.execute(&format!("SELECT poco_add_target(22, '{url}', 'second family')"));

    let res = push_and_wait(&db, "21");
    assert_eq!(res.len(), 1);
    let (job, state) = &res[0];
    assert_eq!(state, "succeeded", "job {job}: {}", job_error(&db, *job));
    let ldb = l.connect("family");
    let rows = assert_learner_equals_scope(&db, &ldb, "21");
    assert!(rows > 50, "the family has rows ({rows})");
    // Never the excluded column, never the unscoped table.
    assert_eq!(
        ldb.value("SELECT count(*) FROM information_schema.columns WHERE column_name = 'password_hash'").as_deref(),
        Some("0")
    );
    assert_eq!(ldb.value("SELECT to_regclass('elearning.platform_secrets') IS NULL").as_deref(), Some("t"));
    // Bookkeeping in the same transaction.
    assert_eq!(ldb.value("SELECT parent_id || '/' || job_id FROM poco_sync.snapshot").unwrap(), format!("21/{job}"));
    let job_rows: i64 = db.query(&format!("SELECT rows_done FROM poco.jobs WHERE job_id = {job}"))[0].get(0);
    assert_eq!(job_rows as usize, rows, "poco.jobs counts every row sent");
    // Keys and foreign keys exist on the learner.
    let fks: i64 = ldb.query("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'elearning'::regnamespace")[0].get(0);
    assert!(fks >= 5, "scoped foreign keys recreated ({fks})");
    assert_eq!(ldb.value("SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND connamespace = 'elearning'::regnamespace").as_deref(), Some("8"));

    // The second family overwrites: nothing of the first stays.
    let res = push_and_wait(&db, "22");
    assert_eq!(res[0].1, "succeeded", "{}", job_error(&db, res[0].0));
    assert_learner_equals_scope(&db, &ldb, "22");
    assert_eq!(ldb.value("SELECT count(*) FROM elearning.users WHERE id = 21 OR parent_id = 21").as_deref(), Some("0"));

    // The push was logged with who asked, rows, bytes and duration.
    let ev = db.value(&format!(
        "SELECT actor || ' ' || (detail->>'rows') || ' ' || ((detail->>'bytes')::bigint > 0) || ' ' || (detail ? 'duration_ms') \
           FROM poco.events WHERE kind = 'push_succeeded' AND job_id = {}",
        res[0].0
    ));
    assert!(ev.as_deref().is_some_and(|e| e.starts_with("postgres ") && e.ends_with(" true true")), "{ev:?}");
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
    assert_eq!(db.value(&format!("SELECT count(*) FROM poco.job WHERE id = {job}")).as_deref(), Some("0"));
    let ldb = l.connect("family");
    assert_eq!(ldb.value("SELECT to_regclass('poco_sync.snapshot') IS NULL").as_deref(), Some("t"), "nothing arrived");

    // A target that is the platform database itself is refused; the platform is untouched.
    let before = db.value("SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM elearning.users u").unwrap();
    let self_url = platform.target_url("platform", "postgres", "pw");
    let t: i64 = db.query(&format!("SELECT poco_add_target(3, '{self_url}')"))[0].get(0);
    let job: i64 = db.query(&format!("SELECT poco_push(3, {t})"))[0].get(0);
    assert_eq!(db.value(&format!("SELECT poco_wait({job}, '1 min')")).as_deref(), Some("failed"));
    let err = job_error(&db, job);
    assert!(err.contains("platform database itself"), "{err}");
    assert_eq!(db.value("SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM elearning.users u").unwrap(), before);
    assert_eq!(db.value("SELECT to_regclass('poco_sync.snapshot') IS NULL").as_deref(), Some("t"));

    // Errors at enqueue time carry SQLSTATE and hint.
    let e = db.error("SELECT poco_push(99999)");
    assert_eq!(e.code().code(), "42704", "{e:?}");
    let e = db.error("SELECT poco_wait(987654)");
    assert_eq!(e.code().code(), "42704", "{e:?}");
    let ok = wait_for(Duration::from_secs(5), || Some(()));
    assert!(ok.is_some());
}
