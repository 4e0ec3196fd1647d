//! Targets end to end: storing learner credentials on a real platform server, and proving
//! the password never leaves in clear (catalog, views, pg_dump, server log).

use poco_e2e::{hex_key, Options, Server};

const MARKER: &str = "Mk7-secret-pw-Zq41";

/// Every line of the server log that mentions the marker must be the caller's own statement.
fn assert_marker_only_in_statements(log: &str, marker: &str) {
    for line in log.lines().filter(|l| l.contains(marker)) {
        assert!(
            line.contains(" STATEMENT: ") || line.contains(" statement: "),
            "password in a server log line: {}",
            line.replace(marker, "<the marker>")
        );
    }
}

#[test]
fn a_stored_target_never_shows_its_password() {
    let mut opts = Options::platform();
    opts.extra_conf = vec![
        "log_min_messages = debug1".into(),
        "log_error_verbosity = verbose".into(),
        "log_min_error_statement = error".into(),
    ];
    let platform = Server::start("platform", &opts);
    let learner = Server::start("learner", &Options::learner());
    let db = platform.connect("platform");

    let url = learner.target_url("family", "learner_user", MARKER);
    let id: i64 = db.query(&format!(
        "SELECT poco_add_target(42, '{url}', 'home laptop')"
    ))[0]
        .get(0);
    let jid: i64 = db.query(&format!(
        "SELECT poco_add_target('7f0c3d7e-1a2b-4c3d-8e9f-001122334455'::uuid, \
         '{{\"PGHOST\": \"127.0.0.1\", \"PGPORT\": {}, \"PGUSER\": \"u2\", \"PGPASSWORD\": \"{MARKER}\", \
           \"PGDATABASE\": \"fam2\", \"PGSSLMODE\": \"disable\"}}'::jsonb)",
        learner.port
    ))[0]
        .get(0);
    assert_ne!(id, jid);

    // What the view shows: everything but the password.
    let row = &db.query(&format!("SELECT parent_id, label, url_redacted, host, port, dbname, username, sslmode, has_password FROM poco.targets WHERE target_id = {id}"))[0];
    assert_eq!(row.get::<_, String>(0), "42");
    assert_eq!(row.get::<_, String>(1), "home laptop");
    assert_eq!(
        row.get::<_, String>(2),
        format!(
            "postgresql://learner_user:***@127.0.0.1:{}/family?sslmode=disable",
            learner.port
        )
    );
    assert_eq!(row.get::<_, String>(3), "127.0.0.1");
    assert_eq!(row.get::<_, i32>(4), learner.port as i32);
    assert_eq!(
        (row.get::<_, String>(5), row.get::<_, String>(6)),
        ("family".into(), "learner_user".into())
    );
    assert_eq!(row.get::<_, String>(7), "disable");
    assert!(row.get::<_, bool>(8));
    assert_eq!(
        db.value(&format!(
            "SELECT parent_id FROM poco.targets WHERE target_id = {jid}"
        ))
        .unwrap(),
        "7f0c3d7e-1a2b-4c3d-8e9f-001122334455"
    );

    // The stored credentials open with the configured key.
    assert!(db
        .value(&format!("SELECT poco_check_target({id})"))
        .unwrap()
        .starts_with("ok: credentials open with key"));

    // The same destination again updates the target instead of adding a second one.
    let again: i64 = db.query(&format!("SELECT poco_add_target(42, '{url}')"))[0].get(0);
    assert_eq!(again, id);
    assert_eq!(
        db.value("SELECT count(*) FROM poco.targets WHERE parent_id = '42'")
            .unwrap(),
        "1"
    );

    // poco_status shows the target, redacted.
    let st = db
        .value("SELECT url_redacted || ' ' || state FROM poco_status(42)")
        .unwrap();
    assert!(
        st.contains("learner_user:***@") && st.ends_with(" idle"),
        "{st}"
    );

    // Refused input that carries the marker: the error does not echo it.
    for bad in [
        format!("postgresql://u:{MARKER}@127.0.0.1:0/d"),
        format!("postgresql://u:{MARKER}@a.example.com,b.example.com/d"),
        format!("postgresql://u:{MARKER}@db.example.com/d?sslmode=sometimes"),
        format!("postgresql://u:{MARKER}@db.example.com/d?nonsense=1"),
    ] {
        let e = db.error(&format!("SELECT poco_add_target(42, '{bad}')"));
        let all = format!("{} {:?} {:?}", e.message(), e.detail(), e.hint());
        assert!(
            !all.contains(MARKER),
            "{}",
            all.replace(MARKER, "<the marker>")
        );
        assert_eq!(e.code().code(), "22023", "{all}");
        assert!(e.hint().is_some());
    }

    // Audit trail of configuration changes.
    let kinds = db
        .value("SELECT string_agg(kind, ',' ORDER BY id) FROM poco.events")
        .unwrap();
    assert_eq!(kinds, "target_added,target_added,target_updated");

    // Nowhere in the catalog, in any column, as text.
    for rel in ["poco.target", "poco.targets", "poco.events"] {
        let n = db.value(&format!("SELECT count(*) FROM {rel} x WHERE x::text LIKE '%{MARKER}%' OR encode(convert_to(x::text, 'UTF8'), 'hex') LIKE '%' || encode(convert_to('{MARKER}', 'UTF8'), 'hex') || '%'")).unwrap();
        assert_eq!(n, "0", "{rel}");
    }
    // Not in pg_dump (which keeps the catalog: pg_extension_config_dump), nor pg_dumpall.
    let dump = platform.tool("pg_dump", &["-d", "platform"]);
    assert!(dump.contains("poco.target"), "the dump keeps the targets");
    assert!(dump.contains("learner_user"));
    assert!(!dump.contains(MARKER));
    assert!(!platform.tool("pg_dumpall", &[]).contains(MARKER));
    // Not in pg_settings or pg_stat_activity of another session.
    assert_eq!(
        db.value(&format!(
            "SELECT count(*) FROM pg_settings WHERE setting LIKE '%{}%'",
            &hex_key(1)[..16]
        ))
        .unwrap(),
        "0"
    );

    // Removal forgets the credentials and is audited.
    db.execute(&format!("SELECT poco_remove_target({id})"));
    assert_eq!(
        db.value(&format!("SELECT count(*) FROM poco.target WHERE id = {id}"))
            .unwrap(),
        "0"
    );
    assert_eq!(
        db.value("SELECT kind FROM poco.events ORDER BY id DESC LIMIT 1")
            .unwrap(),
        "target_removed"
    );

    drop(db);
    assert_marker_only_in_statements(&platform.log(), MARKER);
    assert!(
        !platform.log().contains(&hex_key(1)),
        "the key is in the server log"
    );
}

#[test]
fn tampered_or_moved_ciphertext_and_wrong_key_are_clear_errors_and_rotation_works() {
    let platform = Server::start("platform", &Options::platform());
    let db = platform.connect("platform");
    let a: i64 = db.query(
        "SELECT poco_add_target(1, 'postgresql://alice:pw-one@127.0.0.1:5999/a?sslmode=disable')",
    )[0]
    .get(0);
    let b: i64 = db.query(
        "SELECT poco_add_target(2, 'postgresql://bob:pw-two@127.0.0.1:5999/b?sslmode=disable')",
    )[0]
    .get(0);

    // One flipped bit.
    db.execute(&format!("UPDATE poco.target SET secret = set_byte(secret, 30, get_byte(secret, 30) # 1) WHERE id = {a}"));
    let e = db.error(&format!("SELECT poco_check_target({a})"));
    assert_eq!(e.code().code(), "XX001");
    assert_eq!(
        e.message(),
        format!("stored credentials of target {a} failed authentication")
    );
    assert!(e
        .hint()
        .unwrap()
        .contains("Remove the target and add it again"));

    // b's ciphertext moved into a's row: bound to b's identity, it does not open there.
    db.execute(&format!("UPDATE poco.target SET secret = (SELECT secret FROM poco.target WHERE id = {b}) WHERE id = {a}"));
    let e = db.error(&format!("SELECT poco_check_target({a})"));
    assert_eq!(
        e.message(),
        format!("stored credentials of target {a} failed authentication")
    );
    // ... nor does a row redirected to another host.
    db.execute(&format!(
        "UPDATE poco.target SET host = '127.0.0.2' WHERE id = {b}"
    ));
    assert_eq!(
        db.error(&format!("SELECT poco_check_target({b})"))
            .code()
            .code(),
        "XX001"
    );
    db.execute(&format!(
        "UPDATE poco.target SET host = '127.0.0.1' WHERE id = {b}"
    ));
    assert!(db
        .value(&format!("SELECT poco_check_target({b})"))
        .unwrap()
        .starts_with("ok"));
    db.execute(&format!("SELECT poco_remove_target({a})"));

    // Another key configured: a clear "wrong key" error, naming the way out.
    let new_key = platform.write_key_file("key2", &hex_key(2));
    db.execute(&format!(
        "ALTER SYSTEM SET poco.key_file = '{}'",
        new_key.display()
    ));
    platform.reload();
    let db = platform.connect("platform");
    let e = db.error(&format!("SELECT poco_check_target({b})"));
    assert_eq!(e.code().code(), "XX001");
    assert!(
        e.message().contains("were encrypted with another key"),
        "{}",
        e.message()
    );
    assert!(e.hint().unwrap().contains("poco_rotate_key"));

    // Rotation re-encrypts everything under the new key, all or nothing, and is audited.
    let old = platform.dir.join("key");
    let n = db
        .value(&format!("SELECT poco_rotate_key('{}')", old.display()))
        .unwrap();
    assert_eq!(n, "1");
    assert!(db
        .value(&format!("SELECT poco_check_target({b})"))
        .unwrap()
        .starts_with("ok"));
    assert_eq!(
        db.value("SELECT kind FROM poco.events ORDER BY id DESC LIMIT 1")
            .unwrap(),
        "key_rotated"
    );
    // A rotation from a key that opens nothing changes nothing.
    let stray = platform.write_key_file("key3", &hex_key(3));
    db.execute(&format!(
        "ALTER SYSTEM SET poco.key_file = '{}'",
        stray.display()
    ));
    platform.reload();
    let db = platform.connect("platform");
    let e = db.error(&format!("SELECT poco_rotate_key('{}')", old.display()));
    assert_eq!(e.code().code(), "XX001");
    db.execute(&format!(
        "ALTER SYSTEM SET poco.key_file = '{}'",
        new_key.display()
    ));
    platform.reload();
    let db = platform.connect("platform");
    assert!(
        db.value(&format!("SELECT poco_check_target({b})"))
            .unwrap()
            .starts_with("ok"),
        "untouched by the failed rotation"
    );
}

#[test]
fn key_file_must_exist_be_private_and_hold_a_key() {
    let mut opts = Options::platform();
    opts.key = None;
    let platform = Server::start("platform", &opts);
    let db = platform.connect("platform");
    let add = "SELECT poco_add_target(1, 'postgresql://u:pw@127.0.0.1:5999/d?sslmode=disable')";
    let e = db.error(add);
    assert_eq!(
        (e.code().code(), e.message()),
        ("55000", "poco.key_file is not set")
    );
    assert!(e.hint().unwrap().contains("poco.key_file"));

    let set_key = |path: &std::path::Path| {
        db.execute(&format!(
            "ALTER SYSTEM SET poco.key_file = '{}'",
            path.display()
        ));
        platform.reload();
        platform.connect("platform")
    };
    let missing = platform.dir.join("nope");
    let e = set_key(&missing).error(add);
    assert_eq!(e.code().code(), "58P01");

    let open = platform.write_key_file("open.key", &hex_key(4));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let e = set_key(&open).error(add);
    assert_eq!(e.code().code(), "42501");
    assert!(e.message().contains("accessible by group or others"));
    assert!(e.hint().unwrap().contains("chmod 0600"));

    let short = platform.write_key_file("short.key", "abcd");
    let e = set_key(&short).error(add);
    assert_eq!(e.code().code(), "22P02");
    assert!(!e.message().contains("abcd") && !e.hint().unwrap_or_default().contains("abcd"));

    let good = platform.write_key_file("good.key", &hex_key(5));
    let db2 = set_key(&good);
    db2.execute(add);
    assert_eq!(db2.value("SELECT count(*) FROM poco.targets").unwrap(), "1");
    // nothing half-written by the failed attempts
    assert_eq!(db2.value("SELECT count(*) FROM poco.events").unwrap(), "1");

    // The key file setting is hidden from non-superusers.
    db2.execute("CREATE ROLE app LOGIN");
    let app = platform.connect_as("app", "platform");
    let e = app.error("SHOW poco.key_file");
    assert_eq!(e.code().code(), "42501");
    assert_eq!(
        app.value("SELECT count(*) FROM pg_settings WHERE name = 'poco.key_file'")
            .unwrap(),
        "0"
    );
}

#[test]
fn private_targets_are_refused_unless_allowed() {
    let mut opts = Options::platform();
    opts.allow_private = false;
    let platform = Server::start("platform", &opts);
    let db = platform.connect("platform");
    for (url, code) in [
        ("postgresql://u:pw@127.0.0.1:5432/d", "42501"),
        ("postgresql://u:pw@[::1]/d", "42501"),
        ("postgresql://u:pw@10.0.0.8/d", "42501"),
        ("postgresql://u:pw@169.254.169.254/d", "42501"),
        ("postgresql://u:pw@localhost/d", "42501"),
        (
            "postgresql://u:pw@db.example.com/d?sslmode=disable",
            "22023",
        ),
    ] {
        let e = db.error(&format!("SELECT poco_add_target(1, '{url}')"));
        assert_eq!(e.code().code(), code, "{url}: {}", e.message());
        assert!(e.hint().unwrap().contains("allow_private_targets"), "{url}");
    }
    // A public name is accepted (nothing is resolved or contacted when storing).
    db.execute("SELECT poco_add_target(1, 'postgresql://u:pw@ep-quiet-sky-123.us-east-2.aws.neon.tech/neondb?sslmode=require')");
    assert_eq!(
        db.value("SELECT sslmode FROM poco.targets").unwrap(),
        "require"
    );
    // A non-superuser cannot turn the setting on for its session.
    db.execute("CREATE ROLE app LOGIN");
    let app = platform.connect_as("app", "platform");
    assert_eq!(
        app.error("SET poco.allow_private_targets = on")
            .code()
            .code(),
        "55P02"
    );
    // Nor call the functions until granted.
    assert_eq!(app.error("SELECT poco_status(1)").code().code(), "42501");
    db.execute("SELECT poco_grant_usage('app')");
    assert_eq!(
        app.value("SELECT count(*) FROM poco_status(1)").unwrap(),
        "1"
    );
    assert_eq!(app.value("SELECT count(*) FROM poco.targets").unwrap(), "1");
    assert_eq!(
        app.error("SELECT secret FROM poco.target").code().code(),
        "42501"
    );
}
