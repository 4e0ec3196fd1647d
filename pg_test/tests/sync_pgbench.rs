//! The platform under pgbench write load (issue #6): four clients change ten families for
//! POCO_PGBENCH_SECONDS (default 20) while three of them sync continuously and a fourth is
//! pushed again and again. pgbench must report no failed transaction, every push must succeed,
//! and at the end every learner equals its parent's scope by the history checker (lost,
//! duplicated, stale, leaked: 0), with the password nowhere.

use poco_e2e::{
    assert_secret_kept, check_learner, enable_sync, learner, sample_platform_with, Options, Server,
    SECRET,
};
use std::time::{Duration, Instant};

const SCRIPT: &str = r"\set fam random(21, 30)
\set n random(1, 1000000)
BEGIN;
INSERT INTO elearning.audit_log (user_id, action, detail) VALUES (:fam, 'pgbench ' || :n, jsonb_build_object('n', :n));
UPDATE elearning.users SET display_name = 'pgbench ' || :n WHERE parent_id = :fam AND id % 4 = :n % 4;
DELETE FROM elearning.audit_log WHERE id = (SELECT min(id) FROM elearning.audit_log WHERE user_id = :fam AND action LIKE 'pgbench %');
INSERT INTO elearning.lesson_progress (enrollment_id, lesson_id, status, score) SELECT e.id, l.id, 'started', :n % 100 FROM elearning.enrollments e JOIN elearning.users u ON u.id = e.learner_id JOIN elearning.lessons l ON l.course_id = e.course_id WHERE u.parent_id = :fam ORDER BY l.id, e.id OFFSET :n % 5 LIMIT 1 ON CONFLICT (enrollment_id, lesson_id) DO UPDATE SET score = EXCLUDED.score, status = 'done';
END;
";

#[test]
fn pgbench_write_load_while_three_families_sync_and_one_is_pushed() {
    let seconds: u64 = poco_e2e::env_or("POCO_PGBENCH_SECONDS", 20);
    let (platform, db) = sample_platform_with("pgbench", 30, &Options::platform_verbose());
    let ls: Vec<Server> = (0..3).map(|i| learner(&format!("pgbench_{i}"))).collect();
    let ts: Vec<i64> = ls
        .iter()
        .zip(["21", "22", "23"])
        .map(|(l, p)| enable_sync(&db, p, l))
        .collect();
    let lp = learner("pgbench_push");
    db.execute(&format!(
        "SELECT poco_add_target(24, '{}')",
        lp.target_url("family", "postgres", SECRET)
    ));
    let script = std::env::temp_dir().join(format!("poco_pgbench_{}.sql", std::process::id()));
    std::fs::write(&script, SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let out = std::thread::scope(|sc| {
        let bench = sc.spawn(|| {
            platform.tool(
                "pgbench",
                &[
                    "-n",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-T",
                    &seconds.to_string(),
                    "--max-tries=20",
                    "-f",
                    script.to_str().unwrap(),
                    "platform",
                ],
            )
        });
        // Pushes of family 24, one after the other, while pgbench runs.
        let start = Instant::now();
        let mut pushes = 0;
        while start.elapsed() < Duration::from_secs(seconds.saturating_sub(3)) {
            let job: i64 = db.query("SELECT poco_push(24)")[0].get(0);
            poco_e2e::assert_job_succeeds(&db, job, "2 min");
            pushes += 1;
        }
        assert!(pushes >= 2, "pushed {pushes} times under load");
        // The syncing targets keep up under load: each wait well within a minute.
        for t in &ts {
            assert_eq!(
                db.value(&format!("SELECT poco_sync_wait({t}, '1 min')"))
                    .as_deref(),
                Some("t")
            );
        }
        println!("pgbench: {pushes} pushes of family 24 succeeded under load");
        bench.join().unwrap()
    });
    std::fs::remove_file(&script).ok();
    let line = |key: &str| {
        out.lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("pgbench printed {key}: {out}"))
            .trim()
            .to_string()
    };
    let processed = line("number of transactions actually processed");
    let failed = line("number of failed transactions");
    println!("pgbench: {processed}; {failed}; {}", line("tps ="));
    assert!(
        failed.starts_with("number of failed transactions: 0 "),
        "{failed}"
    );
    let n: u64 = processed.split(':').nth(1).unwrap().trim().parse().unwrap();
    assert!(n > 100 * seconds, "pgbench kept writing ({n})");

    for (i, parent) in ["21", "22", "23"].into_iter().enumerate() {
        assert_eq!(
            db.value(&format!("SELECT poco_sync_wait({}, '1 min')", ts[i]))
                .as_deref(),
            Some("t")
        );
        let r = check_learner(&db, &ls[i].connect("family"), parent);
        println!(
            "pgbench: parent {parent}: {} rows; lost {}, duplicated {}, stale {}, leaked {}",
            r.rows, r.lost, r.duplicated, r.stale, r.leaked
        );
        assert!(r.clean() && r.rows > 0, "parent {parent}: {r:?}");
    }
    // The pushed family equals its scope as of the last push: pushed once more at rest.
    let job: i64 = db.query("SELECT poco_push(24)")[0].get(0);
    poco_e2e::assert_job_succeeds(&db, job, "1 min");
    let r = check_learner(&db, &lp.connect("family"), "24");
    assert!(r.clean() && r.rows > 0, "parent 24: {r:?}");
    drop(db);
    assert_secret_kept(&platform, &["poco_enable_sync(", "poco_add_target("]);
}
