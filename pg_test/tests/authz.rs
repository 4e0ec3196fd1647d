//! Per-parent authorization (issue #15, point 12): a role granted one parent with
//! poco_grant_parent acts for that parent only, through every function and view; an
//! application that connects as one role does SET ROLE to the signed-in parent's role.

use poco_e2e::{learner, sample_platform, Db};

fn denied(db: &Db, sql: &str) {
    let e = db.error(sql);
    assert_eq!(e.code().code(), "42501", "{sql}: {}", e.message());
}

fn ids(db: &Db, sql: &str) -> Vec<String> {
    db.query(sql)
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[test]
fn a_role_granted_one_parent_acts_for_that_parent_only() {
    let (platform, db) = sample_platform("authz", 4);
    let l21 = learner("authz_21");
    let l22 = learner("authz_22");
    let url = |l: &poco_e2e::Server| l.target_url("family", "postgres", "pw");
    db.execute(
        "CREATE ROLE p21 LOGIN; CREATE ROLE p22 LOGIN; CREATE ROLE app LOGIN NOINHERIT; \
         SELECT poco_grant_parent('p21', 21); SELECT poco_grant_parent('p22', '22'); \
         SELECT poco_grant_usage('app'); GRANT p21, p22 TO app;",
    );
    // The DBA made a target for 22 (its id is what 21 will try to reach).
    let t22: i64 = db.query(&format!("SELECT poco_add_target(22, '{}')", url(&l22)))[0].get(0);
    let j22: i64 = db.query(&format!("SELECT poco_push(22, {t22})"))[0].get(0);
    poco_e2e::assert_job_succeeds(&db, j22, "1 min");
    db.execute(&format!("SELECT poco_enable_sync(22, '{}')", url(&l22)));

    for (who, as21) in [
        ("p21", platform.connect_as("p21", "platform")),
        ("app as p21", {
            let a = platform.connect_as("app", "platform");
            a.execute("SET ROLE p21");
            a
        }),
    ] {
        // Its own parent: everything works.
        let t21: i64 = as21.query(&format!(
            "SELECT poco_add_target(21, '{}', 'laptop')",
            url(&l21)
        ))[0]
            .get(0);
        let j21: i64 = as21.query(&format!("SELECT poco_push(21, {t21})"))[0].get(0);
        assert_eq!(
            as21.value(&format!("SELECT poco_wait({j21}, '1 min')"))
                .as_deref(),
            Some("succeeded"),
            "{who}"
        );
        as21.query("SELECT * FROM poco_status(21)");
        as21.query("SELECT * FROM poco_scope_preview(21)");
        as21.query(&format!("SELECT poco_check_target({t21})"));
        // Another parent's, by parent id or by target and job id: refused, and nothing changed.
        for sql in [
            format!("SELECT poco_add_target(22, '{}')", url(&l21)),
            "SELECT * FROM poco_status(22)".to_string(),
            "SELECT poco_push(22)".to_string(),
            format!("SELECT poco_push(21, {t22})"),
            format!("SELECT poco_push(22, {t22})"),
            format!("SELECT poco_remove_target({t22})"),
            format!("SELECT poco_check_target({t22})"),
            format!("SELECT poco_set_backups({t22}, 2)"),
            format!("SELECT poco_restore({t22})"),
            format!("SELECT poco_wait({j22}, '1 s')"),
            format!("SELECT poco_cancel({j22})"),
            format!("SELECT poco_sync_wait({t22}, '1 s')"),
            format!("SELECT poco_enable_sync(22, '{}')", url(&l21)),
            "SELECT poco_disable_sync(22)".to_string(),
            "SELECT * FROM poco_scope_preview(22)".to_string(),
            // A target or job that does not exist looks the same as another parent's.
            "SELECT poco_remove_target(999999)".to_string(),
            "SELECT poco_wait(999999, '1 s')".to_string(),
        ] {
            denied(&as21, &sql);
        }
        // Its views show its own rows only.
        assert_eq!(
            ids(&as21, "SELECT DISTINCT parent_id FROM poco.targets"),
            ["21"],
            "{who}"
        );
        assert_eq!(
            ids(&as21, "SELECT DISTINCT parent_id FROM poco.jobs"),
            ["21"],
            "{who}"
        );
        assert_eq!(
            ids(
                &as21,
                "SELECT DISTINCT coalesce(parent_id, '-') FROM poco.events ORDER BY 1"
            ),
            ["21"],
            "{who}"
        );
        // Scope declarations stay the DBA's.
        denied(
            &as21,
            "SELECT poco_scope_exclude_column('elearning.users', 'email')",
        );
        as21.execute(&format!("SELECT poco_remove_target({t21})"));
    }
    // Nothing of 22's moved.
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM poco.target WHERE id = {t22} AND continuous"
        ))
        .as_deref(),
        Some("1")
    );
    // The application role acting as itself (it may SET ROLE to the parents' roles, and
    // inherits nothing from them) acts for every parent.
    let l23 = learner("authz_23");
    db.execute(&format!("SELECT poco_add_target(23, '{}')", url(&l23)));
    let app = platform.connect_as("app", "platform");
    assert_eq!(
        ids(
            &app,
            "SELECT DISTINCT parent_id FROM poco.targets ORDER BY 1"
        ),
        ["22", "23"]
    );
    app.query("SELECT * FROM poco_status(23)");
    // A role whose last parent is revoked does not fall back to every parent.
    db.execute("SELECT poco_revoke_parent('p22', 22)");
    let p22 = platform.connect_as("p22", "platform");
    denied(&p22, "SELECT * FROM poco_status(22)");
    denied(&p22, "SELECT * FROM poco.targets");
    // poco_grant_parent itself is a superuser's.
    denied(&app, "SELECT poco_grant_parent('app', 21)");
}

/// A role granted one parent learns nothing of another family's running job: not from
/// poco.job_progress() nor poco.jobs, and the progress notifications (which any role can
/// LISTEN to: PostgreSQL has no rights on channels) carry job numbers only, never a parent
/// or an error text.
#[test]
fn a_role_granted_one_parent_sees_nothing_of_another_familys_running_job() {
    let (platform, db) = sample_platform("authz_progress", 4);
    db.execute(
        "INSERT INTO elearning.audit_log (user_id, action, detail) \
         SELECT 22, 'page_view', jsonb_build_object('pad', repeat('z', 300)) FROM generate_series(1, 3000) g; \
         CREATE ROLE p21 LOGIN; SELECT poco_grant_parent('p21', 21);",
    );
    let l = learner("authz_progress_22");
    let proxy = poco_e2e::FaultProxy::start(l.port);
    db.execute(&format!(
        "SELECT poco_add_target(22, 'postgresql://postgres:pw@127.0.0.1:{}/family?sslmode=disable')",
        proxy.port
    ));
    let heard = poco_e2e::listen(&platform.conninfo_as("p21", "platform"), "poco_progress");
    let as21 = platform.connect_as("p21", "platform");
    proxy.delay_per_8k(30);
    let job: i64 = db.query("SELECT poco_push(22)")[0].get(0);
    let mut looks = 0;
    for _ in 0..400 {
        let running = db
            .value(&format!(
                "SELECT count(*) FROM poco.job_progress() WHERE job_id = {job}"
            ))
            .as_deref()
            == Some("1");
        if running {
            looks += 1;
            assert_eq!(
                as21.value("SELECT count(*) FROM poco.job_progress()")
                    .as_deref(),
                Some("0"),
                "22's running job shown to p21"
            );
            assert_eq!(
                as21.value("SELECT count(*) FROM poco.jobs").as_deref(),
                Some("0")
            );
        } else if looks > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(looks >= 2, "the push was seen running ({looks} looks)");
    proxy.delay_per_8k(0);
    poco_e2e::assert_job_succeeds(&db, job, "1 min");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let notes: Vec<serde_json::Value> = heard
        .rx
        .try_iter()
        .map(|p| serde_json::from_str(&p).expect("JSON payload"))
        .collect();
    assert!(
        notes.iter().any(|v| v["job_id"] == job && v["state"] == "succeeded"),
        "{notes:?}"
    );
    let numbers = [
        "job_id", "target_id", "state", "tables_total", "tables_done", "rows_done", "bytes_done",
        "current_table", "rows_expected", "percent", "elapsed_s", "eta_s",
    ];
    for v in &notes {
        for k in v.as_object().unwrap().keys() {
            assert!(numbers.contains(&k.as_str()), "{k} in a notification: {v}");
        }
    }
}
