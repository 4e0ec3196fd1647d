//! TLS to learners: a learner with `ssl = on` and a certificate the platform cannot verify
//! is accepted by `require` (encrypt, do not verify, as libpq); `verify-ca` checks the chain
//! only; `verify-full` also checks the host name; host names go out as SNI; a plaintext-only
//! learner is refused by `require`.

use poco_e2e::{Db, Options, Server};
use std::process::Command;

/// A test CA and a server certificate for DNS name `localhost` signed by it.
/// Returns (ca.crt, server.crt, server.key) as PEM text.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=poco test CA",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    (r("ca.crt"), r("server.crt"), r("server.key"))
}

fn platform_with_scope() -> (Server, Db) {
    let platform = Server::start("tls_platform", &Options::platform());
    let db = platform.connect("platform");
    db.execute(
        "CREATE TABLE fam (id int PRIMARY KEY, name text); INSERT INTO fam VALUES (1, 'one'), (2, 'two'); \
         SELECT poco_scope_root('fam', 'id = $1');",
    );
    (platform, db)
}

fn push(db: &Db, url: &str) -> (String, String) {
    let t: i64 = db.query(&format!("SELECT poco_add_target(1, '{url}')"))[0].get(0);
    let job: i64 = db.query(&format!("SELECT poco_push(1, {t})"))[0].get(0);
    let state = db
        .value(&format!("SELECT poco_wait({job}, '1 min')"))
        .unwrap();
    let err = db
        .value(&format!(
            "SELECT coalesce(error, '') FROM poco.jobs WHERE job_id = {job}"
        ))
        .unwrap();
    db.execute(&format!("SELECT poco_remove_target({t})"));
    (state, err)
}

#[test]
fn sslmodes_behave_as_in_libpq() {
    let (platform, db) = platform_with_scope();
    let tls = Server::start("tls_learner", &Options::learner());
    let (ca, crt, key) = certificates(&platform.dir.join("pki"));
    // Roots a target may name live in poco.ssl_root_cert_dir.
    let certs = platform.dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca_path = platform.write_key_file("certs/root.crt", &ca);
    db.execute(&format!(
        "ALTER SYSTEM SET poco.ssl_root_cert_dir = '{}'",
        certs.display()
    ));
    db.execute("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let crt_path = tls.write_key_file("server.crt", &crt);
    let key_path = tls.write_key_file("server.key", &key);
    let ldb = tls.connect("postgres");
    ldb.execute("ALTER SYSTEM SET ssl = on");
    ldb.execute(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        crt_path.display()
    ));
    ldb.execute(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        key_path.display()
    ));
    // Password authentication over TLS only, so channel binding (SCRAM-SHA-256-PLUS) is possible.
    ldb.execute("CREATE ROLE learner LOGIN PASSWORD 'Learner-pw-1' SUPERUSER");
    ldb.execute("CREATE DATABASE family");
    std::fs::write(
        tls.data_dir().join("pg_hba.conf"),
        "hostssl all learner 127.0.0.1/32 scram-sha-256\nhost all postgres 127.0.0.1/32 trust\nlocal all all trust\n",
    )
    .unwrap();
    tls.reload();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let host_ip = format!("learner:Learner-pw-1@127.0.0.1:{}/family", tls.port);
    let host_name = format!("learner:Learner-pw-1@localhost:{}/family", tls.port);
    let root = ca_path.display().to_string();

    // require: encrypted, the certificate (from a CA the platform does not trust) not checked.
    let (state, err) = push(&db, &format!("postgresql://{host_ip}?sslmode=require"));
    assert_eq!(state, "succeeded", "{err}");
    let fam = tls.connect("family");
    assert_eq!(
        fam.value("SELECT name FROM public.fam").as_deref(),
        Some("one")
    );
    // (pg_hba lets the learner role in over TLS only: every success here was encrypted.)
    // channel_binding=require (SCRAM-SHA-256-PLUS over TLS) and libpq options work.
    let (state, err) = push(&db, &format!("postgresql://{host_ip}?sslmode=require&channel_binding=require&options=-c%20work_mem%3D8MB"));
    assert_eq!(state, "succeeded", "{err}");

    // verify-full against our CA: the right host name passes, a wrong one (the IP, not in
    // the certificate) is refused; verify-ca only checks the chain, so the IP passes.
    let (state, err) = push(
        &db,
        &format!("postgresql://{host_name}?sslmode=verify-full&sslrootcert={root}"),
    );
    assert_eq!(state, "succeeded", "{err}");
    let (state, err) = push(
        &db,
        &format!("postgresql://{host_ip}?sslmode=verify-full&sslrootcert={root}"),
    );
    assert_eq!(state, "failed");
    assert!(
        err.contains("TLS verification failed") && err.contains("verify-full"),
        "{err}"
    );
    let (state, err) = push(
        &db,
        &format!("postgresql://{host_ip}?sslmode=verify-ca&sslrootcert={root}"),
    );
    assert_eq!(state, "succeeded", "{err}");
    // verify-ca with roots that did not sign the certificate (the system's) is refused.
    let (state, err) = push(&db, &format!("postgresql://{host_name}?sslmode=verify-ca"));
    assert_eq!(state, "failed");
    assert!(err.contains("TLS verification failed"), "{err}");

    // SNI, seen on the wire (a loopback proxy reads the ClientHello): the host name goes out
    // (Neon routes by it), not when sslsni=0, and never for an IP address.
    let proxy = poco_e2e::FaultProxy::start(tls.port);
    let via = format!("learner:Learner-pw-1@localhost:{}/family", proxy.port);
    let (state, err) = push(&db, &format!("postgresql://{via}?sslmode=require"));
    assert_eq!(state, "succeeded", "{err}");
    assert_eq!(proxy.last_sni().as_deref(), Some("localhost"));
    let (state, err) = push(
        &db,
        &format!("postgresql://{via}?sslmode=verify-full&sslrootcert={root}&sslsni=0"),
    );
    assert_eq!(state, "succeeded", "{err}");
    assert_eq!(proxy.last_sni(), None, "sslsni=0");
    let (state, err) = push(
        &db,
        &format!(
            "postgresql://learner:Learner-pw-1@127.0.0.1:{}/family?sslmode=require",
            proxy.port
        ),
    );
    assert_eq!(state, "succeeded", "{err}");
    assert_eq!(proxy.last_sni(), None, "no SNI for an IP address");

    // What the learner sends is capped inside TLS too (issue #24 point 5): a NOTICE of 20 MB,
    // raised by an event trigger on the push's own DDL, ends the push with a clear error.
    fam.execute(
        "CREATE FUNCTION public.noise() RETURNS event_trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE NOTICE '%', repeat('n', 20000000); END $$; \
         CREATE EVENT TRIGGER noise ON ddl_command_end EXECUTE FUNCTION public.noise()",
    );
    let (state, err) = push(&db, &format!("postgresql://{host_ip}?sslmode=require"));
    assert_eq!(state, "failed", "{err}");
    assert!(err.contains("poco_sync reads at most 16 MB per message"), "{err}");
    fam.execute("DROP EVENT TRIGGER noise");
    let (state, err) = push(&db, &format!("postgresql://{host_ip}?sslmode=require"));
    assert_eq!(state, "succeeded", "{err}");

    // A learner without TLS: require is refused with a clear error, and no retry helps.
    let plain = Server::start("tls_plain", &Options::learner());
    plain.psql("postgres", "CREATE DATABASE family");
    let (state, err) = push(
        &db,
        &format!(
            "postgresql://postgres:x@127.0.0.1:{}/family?sslmode=require",
            plain.port
        ),
    );
    assert_eq!(state, "failed");
    assert!(err.contains("does not offer TLS"), "{err}");
    assert!(!err.contains("Learner-pw-1"));
}

#[test]
fn an_sslrootcert_cannot_name_any_file_nor_hold_up_or_flood_a_push() {
    let (platform, db) = platform_with_scope();
    let learner = Server::start("tls_rootcert_learner", &Options::learner());
    let url = |cert: &str| {
        format!(
            "postgresql://postgres:x@localhost:{}/postgres?sslmode=verify-full&sslrootcert={cert}",
            learner.port
        )
    };
    // Without poco.ssl_root_cert_dir no file may be named; with it, only files inside.
    let refused = |cert: &str| {
        let e = db.error(&format!("SELECT poco_add_target(1, '{}')", url(cert)));
        assert_eq!(e.code().code(), "42501", "{cert}: {}", e.message());
        assert!(
            e.hint()
                .unwrap_or_default()
                .contains("poco.ssl_root_cert_dir"),
            "{cert}"
        );
    };
    refused("/dev/zero");
    let certs = platform.dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    db.execute(&format!(
        "ALTER SYSTEM SET poco.ssl_root_cert_dir = '{}'",
        certs.display()
    ));
    db.execute("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::thread::sleep(std::time::Duration::from_millis(300));
    for cert in [
        "/dev/zero",
        "relative.pem",
        &format!("{}/../key", certs.display()),
    ] {
        refused(cert);
    }
    // Inside the directory but not a certificate file: each push fails at once, saying why.
    let sh = |cmd: &str| {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .unwrap()
                .success(),
            "{cmd}"
        );
    };
    let d = certs.display();
    sh(&format!(
        "mkfifo {d}/pipe.pem && ln -s /dev/zero {d}/zero.pem && ln -s /etc/hostname {d}/out.pem \
         && head -c 2000000 /dev/urandom | base64 > {d}/huge.pem && chown -R {} {d}",
        poco_e2e::test_user()
    ));
    for (file, why) in [
        ("pipe.pem", "not a regular file"),
        ("zero.pem", "leads out of poco.ssl_root_cert_dir"),
        ("out.pem", "leads out of poco.ssl_root_cert_dir"),
        ("huge.pem", "larger than 1024 kB"),
    ] {
        let t0 = std::time::Instant::now();
        let (state, err) = push(&db, &url(&format!("{d}/{file}")));
        assert_eq!(state, "failed", "{file}: {err}");
        assert!(err.contains(why), "{file}: {err}");
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{file}: {:?}",
            t0.elapsed()
        );
    }
}
