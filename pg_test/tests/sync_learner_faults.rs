//! Faults on the learner's side during continuous sync (issue #6): the learner server stopped
//! immediately in the middle of a batch and started again; its disk full; its user's
//! privileges revoked, then its login. Each time the target shows a clear error in
//! poco_status, another target keeps syncing unhindered, and once the learner is whole again
//! the target catches up by itself (no new snapshot), equal to its scope by the history
//! checker. The password shows nowhere.
//!
//! The disk-full case mounts a small tmpfs for a learner tablespace: it needs root, like the
//! rest of the harness (which runs the servers as an unprivileged user through sudo).

use poco_e2e::{
    assert_secret_kept, check_learner, enable_sync, learner, sample_platform_with, wait_for, Db,
    FaultProxy, Options, Server, SECRET,
};
use std::process::Command;
use std::time::Duration;

fn synced(db: &Db, t: i64, limit: &str) -> bool {
    db.value(&format!("SELECT poco_sync_wait({t}, '{limit}')"))
        .as_deref()
        == Some("t")
}

/// (state, last_error) of a target of `parent`.
fn status(db: &Db, parent: &str, t: i64) -> (String, Option<String>) {
    let r = &db.query(&format!(
        "SELECT state, last_error FROM poco_status({parent}) WHERE target_id = {t}"
    ))[0];
    (r.get(0), r.get(1))
}

fn assert_clean(db: &Db, l: &Server, parent: &str, what: &str) {
    let r = check_learner(db, &l.connect("family"), parent);
    println!(
        "{what}: parent {parent}: {} rows; lost {}, duplicated {}, stale {}, leaked {}",
        r.rows, r.lost, r.duplicated, r.stale, r.leaked
    );
    assert!(r.clean() && r.rows > 0, "{what}: {r:?}");
}

/// The other target keeps up while one fails: three changes of its family, each synced in
/// under 5 s.
fn other_keeps_up(db: &Db, t: i64, learner: &Server, what: &str) {
    let ldb = learner.connect("family");
    for i in 0..3 {
        let want = format!("other {what} {i}");
        db.execute(&format!(
            "UPDATE elearning.users SET display_name = '{want}' WHERE id = 22"
        ));
        poco_e2e::assert_arrives(db, t, &ldb, 22, &want, Duration::from_secs(5));
    }
}

fn jobs(db: &Db, t: i64) -> String {
    db.value(&format!(
        "SELECT count(*) FROM poco.job WHERE target_id = {t}"
    ))
    .unwrap()
}

fn platform(name: &str) -> (Server, Db) {
    let mut opts = Options::platform_verbose();
    opts.extra_conf.extend([
        "poco.retry_delay = '100ms'".to_string(),
        "poco.network_timeout = '3s'".to_string(),
    ]);
    sample_platform_with(name, 20, &opts)
}

#[test]
fn a_learner_stopped_immediately_mid_batch_gets_the_whole_batch_after_its_restart() {
    let (platform, db) = platform("learner_stop");
    let la = learner("learner_stop_a");
    let lb = learner("learner_stop_b");
    let proxy = FaultProxy::start(la.port);
    let url = format!(
        "postgresql://postgres:{SECRET}@127.0.0.1:{}/family?sslmode=disable",
        proxy.port
    );
    let ta: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    let tb = enable_sync(&db, "22", &lb);
    assert!(synced(&db, ta, "1 min"));
    let before = jobs(&db, ta);
    for cycle in 0..3 {
        // A big transaction; its batch crawls to the learner (8 kB per 60 ms upstream), so a
        // stop one second later lands in the middle of it.
        proxy.delay_per_8k(60);
        let tag = format!("stop {cycle}");
        db.execute(&format!(
            "INSERT INTO elearning.audit_log (user_id, action, detail) \
             SELECT 21, '{tag}', jsonb_build_object('n', g, 'pad', repeat('x', 200)) FROM generate_series(1, 3000) g"
        ));
        std::thread::sleep(Duration::from_millis(1000));
        la.stop("immediate");
        // Nothing of the batch is there after the restart (the stream is kept away meanwhile).
        proxy.black_hole(true);
        la.start_again();
        let ldb = la.connect("family");
        assert_eq!(
            ldb.value(&format!(
                "SELECT count(*) FROM elearning.audit_log WHERE action = '{tag}'"
            ))
            .as_deref(),
            Some("0"),
            "cycle {cycle}: the stop came in the middle of the batch, and none of it stayed"
        );
        drop(ldb);
        other_keeps_up(&db, tb, &lb, &tag);
        proxy.heal();
        assert!(
            synced(&db, ta, "1 min"),
            "cycle {cycle}: caught up after the restart"
        );
        assert_clean(&db, &la, "21", &tag);
        assert_eq!(
            la.connect("family")
                .value(&format!(
                    "SELECT count(*) FROM elearning.audit_log WHERE action = '{tag}'"
                ))
                .as_deref(),
            Some("3000")
        );
    }
    assert_eq!(jobs(&db, ta), before, "no new snapshot");
    assert!(proxy.cuts() == 0 && proxy.injected().black_holes == 3);
    drop(db);
    assert_secret_kept(&platform, &["poco_enable_sync("]);
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_or_revoked_privileges_on_a_learner_show_clearly_and_heal_by_themselves() {
    let (platform, db) = platform("learner_disk");
    // Learner A: database `family` owned by role fam, in a tablespace on a 24 MB tmpfs.
    let la = Server::start("learner_disk_a", &Options::learner());
    let dir = std::env::temp_dir().join(format!("poco_tmpfs_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=24m,mode=0700",
            "tmpfs",
            dir.to_str().unwrap(),
        ],
    );
    let mnt = Tmpfs(dir.clone());
    sh("chown", &[&poco_e2e::test_user(), dir.to_str().unwrap()]);
    la.psql("postgres", "CREATE ROLE fam LOGIN");
    la.psql(
        "postgres",
        &format!("CREATE TABLESPACE small LOCATION '{}'", dir.display()),
    );
    la.psql(
        "postgres",
        "CREATE DATABASE family OWNER fam TABLESPACE small",
    );
    let lb = learner("learner_disk_b");
    let url = la.target_url("family", "fam", SECRET);
    let ta: i64 = db.query(&format!("SELECT poco_enable_sync(21, '{url}')"))[0].get(0);
    let tb = enable_sync(&db, "22", &lb);
    assert!(
        synced(&db, ta, "1 min"),
        "the first snapshot, as a non-superuser owner"
    );
    assert_clean(&db, &la, "21", "before");
    let before = jobs(&db, ta);

    // 1. The disk fills up: ~40 MB of hardly compressible text for a 24 MB disk.
    for i in 0..40 {
        db.execute(&format!(
            "INSERT INTO elearning.audit_log (user_id, action, detail) \
             SELECT 21, 'big {i}', jsonb_build_object('pad', (SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 32000) g))"
        ));
    }
    // Each fault: the error shows in poco_status with its SQLSTATE and hint, the other target
    // keeps syncing, and once the learner is whole again the target catches up by itself.
    let fault = |what: &str, needle: &str, want: &[&str], heal: &dyn Fn()| {
        let e = wait_for(Duration::from_secs(60), || {
            status(&db, "21", ta).1.filter(|e| e.contains(needle))
        })
        .unwrap_or_else(|| panic!("{what}: the error shows in poco_status"));
        println!("{what}: {}", e.replace(SECRET, "<the password>"));
        assert!(want.iter().all(|w| e.contains(w)), "{what}: {e}");
        other_keeps_up(&db, tb, &lb, what);
        heal();
        assert!(synced(&db, ta, "2 min"), "{what}: caught up once healed");
        assert_eq!(status(&db, "21", ta), ("streaming".to_string(), None));
        assert_clean(&db, &la, "21", &format!("after {what}"));
    };
    fault(
        "disk full",
        "No space left on device",
        &["SQLSTATE 53100", "HINT: The learner's disk is full"],
        &|| sh("mount", &["-o", "remount,size=256m", dir.to_str().unwrap()]),
    );

    // 2. The user's privileges on the copy are revoked.
    la.psql(
        "family",
        "REVOKE INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA elearning FROM fam",
    );
    db.execute("INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'revoked')");
    fault(
        "privileges revoked",
        "permission denied",
        &[
            "SQLSTATE 42501",
            "HINT: The target's user lacks a privilege",
        ],
        &|| {
            la.psql(
                "family",
                "GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA elearning TO fam",
            );
        },
    );

    // 3. The user may no longer log in.
    la.psql("postgres", "ALTER ROLE fam NOLOGIN");
    // (a connection already open would carry on: the learner's admin closes the stream's)
    la.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'fam'",
    );
    db.execute("INSERT INTO elearning.audit_log (user_id, action) VALUES (21, 'no login')");
    fault(
        "login revoked",
        "not permitted to log in",
        &["SQLSTATE 28000", "HINT: Check the user and password"],
        &|| {
            la.psql("postgres", "ALTER ROLE fam LOGIN");
        },
    );

    assert_eq!(jobs(&db, ta), before, "no new snapshot was needed");
    drop(db);
    la.stop("immediate");
    drop(mnt);
    assert_secret_kept(&platform, &["poco_enable_sync("]);
}
