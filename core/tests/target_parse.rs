use poco_core::target::{classify_ip, parse_json, parse_url, SslMode, TargetHost, TargetSpec};
use poco_core::PocoError;
use serde_json::json;

fn ok(url: &str) -> TargetSpec {
    parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn err(url: &str) -> PocoError {
    match parse_url(url) {
        Ok(t) => panic!("{url} was accepted: {t:?}"),
        Err(e) => e,
    }
}

fn refused_public(url: &str) -> PocoError {
    let t = ok(url);
    t.validate(true)
        .expect("allowed when private targets are on");
    t.validate(false).expect_err(url)
}

#[test]
fn neon_url_parses_with_require_default_and_sni_name() {
    let t = ok("postgresql://alex:AbC123xyz@ep-cool-darkness-123456.us-east-2.aws.neon.tech/neondb?sslmode=require");
    assert_eq!(
        t.host,
        TargetHost::Name("ep-cool-darkness-123456.us-east-2.aws.neon.tech".into())
    );
    assert_eq!(t.port, 5432);
    assert_eq!(t.dbname, "neondb");
    assert_eq!(t.user, "alex");
    assert_eq!(t.password.as_ref().unwrap().expose(), "AbC123xyz");
    assert_eq!(t.sslmode, SslMode::Require);
    t.validate(false).unwrap();
}

#[test]
fn postgres_scheme_default_sslmode_port_and_dbname() {
    let t = ok("postgres://bob@db.example.com");
    assert_eq!(t.sslmode, SslMode::Require, "sslmode defaults to require");
    assert_eq!(t.port, 5432);
    assert_eq!(
        t.dbname, "bob",
        "libpq defaults the database to the user name"
    );
    assert!(t.password.is_none());
    let t = ok("POSTGRESQL://bob@db.example.com:6543/x");
    assert_eq!(t.port, 6543);
}

#[test]
fn percent_encoding_in_every_part() {
    let t = ok("postgresql://us%40er:p%40ss%3Aw%2Fo%20rd%2B@db.example.com:5433/my%20db?application_name=a%26b");
    assert_eq!(t.user, "us@er");
    assert_eq!(t.password.unwrap().expose(), "p@ss:w/o rd+");
    assert_eq!(t.dbname, "my db");
    assert_eq!(t.params["application_name"], "a&b");
    // '+' in a query value stays a plus (libpq semantics, not form decoding)
    let t = ok("postgresql://u@db.example.com/d?password=a+b");
    assert_eq!(t.password.unwrap().expose(), "a+b");
}

#[test]
fn ipv6_hosts() {
    let t = ok("postgresql://u:p@[2001:4860:4860::8888]:5432/d");
    assert_eq!(
        t.host,
        TargetHost::V6("2001:4860:4860::8888".parse().unwrap())
    );
    t.validate(false).unwrap();
    assert!(t.redacted_url().contains("@[2001:4860:4860::8888]:5432/"));
    let t = ok("postgresql://u@[::1]/d?sslmode=disable");
    assert_eq!(t.host, TargetHost::V6("::1".parse().unwrap()));
    assert!(matches!(
        t.validate(false),
        Err(PocoError::PlaintextRefused(_))
    ));
    let t = ok("postgresql://u@[::1]/d");
    assert!(matches!(
        t.validate(false),
        Err(PocoError::PrivateAddress(_, "loopback"))
    ));
}

#[test]
fn query_parameters_host_port_user_dbname() {
    let t = ok("postgresql:///appdb?host=db.example.com&port=7000&user=carol&password=x&sslmode=verify-full&sslrootcert=system&channel_binding=require&options=-c%20statement_timeout%3D0&connect_timeout=5&sslsni=1&target_session_attrs=read-write&gssencmode=disable");
    assert_eq!(t.host, TargetHost::Name("db.example.com".into()));
    assert_eq!(t.port, 7000);
    assert_eq!(t.user, "carol");
    assert_eq!(t.dbname, "appdb");
    assert_eq!(t.sslmode, SslMode::VerifyFull);
    assert_eq!(t.params["channel_binding"], "require");
    assert_eq!(t.params["options"], "-c statement_timeout=0");
    assert_eq!(t.params["sslrootcert"], "system");
}

#[test]
fn host_names_are_canonicalised() {
    assert_eq!(
        ok("postgresql://u@DB.Example.COM./d").host,
        TargetHost::Name("db.example.com".into())
    );
    assert_eq!(
        ok("postgresql://u@münchen.de/d").host,
        TargetHost::Name("xn--mnchen-3ya.de".into())
    );
    // every spelling getaddrinfo accepts for an IPv4 address becomes that address
    for spelled in ["127.1", "0x7f.1", "2130706433", "0177.0.0.1", "127.0.0.1"] {
        let t = ok(&format!("postgresql://u@{spelled}/d"));
        assert_eq!(
            t.host,
            TargetHost::V4("127.0.0.1".parse().unwrap()),
            "{spelled}"
        );
        assert!(
            matches!(
                t.validate(false),
                Err(PocoError::PrivateAddress(_, "loopback"))
            ),
            "{spelled}"
        );
    }
}

#[test]
fn refuses_no_host() {
    assert_eq!(err("postgresql:///db"), PocoError::NoHost);
    assert_eq!(err("postgresql://user:pw@/db"), PocoError::NoHost);
    assert_eq!(err("postgresql://user@:5432/db"), PocoError::NoHost);
}

#[test]
fn refuses_unix_sockets() {
    assert!(matches!(
        err("postgresql://u@%2Fvar%2Frun%2Fpostgresql/db"),
        PocoError::UnixSocket(_)
    ));
    assert!(matches!(
        err("postgresql:///db?host=/tmp"),
        PocoError::UnixSocket(_)
    ));
    assert!(matches!(
        err("postgresql://u@db.example.com/db?host=%2Ftmp"),
        PocoError::UnixSocket(_)
    ));
    assert!(matches!(
        err("postgresql:///db?host=@abstract"),
        PocoError::UnixSocket(_)
    ));
    assert!(matches!(
        parse_json(&json!({"PGHOST": "/var/run/postgresql", "PGUSER": "u"})),
        Err(PocoError::UnixSocket(_))
    ));
}

#[test]
fn refuses_several_hosts() {
    assert_eq!(
        err("postgresql://u@h1.example.com,h2.example.com/db"),
        PocoError::SeveralHosts
    );
    assert_eq!(
        err("postgresql://u@h1.example.com:5432,h2.example.com:5433/db"),
        PocoError::SeveralHosts
    );
    assert_eq!(
        err("postgresql://u@/db?host=a.example.com,b.example.com"),
        PocoError::SeveralHosts
    );
    assert_eq!(
        err("postgresql://u@a.example.com/db?port=5432,5433"),
        PocoError::SeveralHosts
    );
}

#[test]
fn refuses_bad_ports() {
    for p in ["0", "65536", "99999", "abc", "-1"] {
        let e = err(&format!("postgresql://u@db.example.com:{p}/d"));
        assert!(matches!(e, PocoError::BadPort(_)), "{p}: {e:?}");
    }
    assert!(matches!(
        err("postgresql://u@db.example.com/d?port=0"),
        PocoError::BadPort(_)
    ));
    assert!(matches!(
        err("postgresql://u@db.example.com/d?port=x"),
        PocoError::BadPort(_)
    ));
}

#[test]
fn refuses_unknown_and_bad_sslmode() {
    assert_eq!(
        err("postgresql://u@db.example.com/d?sslmode=required"),
        PocoError::BadSslMode("required".into())
    );
    assert_eq!(
        err("postgresql://u@db.example.com/d?sslmode="),
        PocoError::BadSslMode("".into())
    );
    assert_eq!(
        err("postgresql://u@db.example.com/d?sslmode=REQUIRE"),
        PocoError::BadSslMode("REQUIRE".into())
    );
    for m in ["disable", "allow", "prefer"] {
        let e = refused_public(&format!("postgresql://u@db.example.com/d?sslmode={m}"));
        assert_eq!(e, PocoError::PlaintextRefused(m.into()));
    }
    for m in ["require", "verify-ca", "verify-full"] {
        ok(&format!("postgresql://u@db.example.com/d?sslmode={m}"))
            .validate(false)
            .unwrap();
    }
}

#[test]
fn refuses_unknown_and_redirecting_parameters() {
    for p in [
        "hostaddr=1.2.3.4",
        "service=foo",
        "passfile=/etc/passwd",
        "sslcert=/x",
        "sslkey=/x",
        "replication=database",
        "load_balance_hosts=random",
        "frobnicate=1",
        "requiressl=1",
    ] {
        let e = err(&format!("postgresql://u@db.example.com/d?{p}"));
        assert!(matches!(e, PocoError::UnknownParameter(_)), "{p}: {e:?}");
    }
    for p in [
        "channel_binding=maybe",
        "sslsni=2",
        "connect_timeout=-1",
        "gssencmode=require",
        "target_session_attrs=standby",
    ] {
        let e = err(&format!("postgresql://u@db.example.com/d?{p}"));
        assert!(matches!(e, PocoError::BadParameterValue(_)), "{p}: {e:?}");
    }
    assert!(matches!(
        err("postgresql://u@db.example.com/d#frag"),
        PocoError::BadUrl(_)
    ));
    assert!(matches!(
        err("mysql://u@db.example.com/d"),
        PocoError::BadUrl(_)
    ));
    assert!(matches!(err("db.example.com"), PocoError::BadUrl(_)));
    assert!(matches!(
        err("postgresql://u@db.example.com/a/b"),
        PocoError::BadUrl(_)
    ));
    assert_eq!(err("postgresql://db.example.com/d"), PocoError::NoUser);
}

#[test]
fn two_values_for_the_same_thing_must_agree() {
    assert_eq!(
        err("postgresql://u@db.example.com:5432/d?port=5433"),
        PocoError::Conflict("the port".into())
    );
    assert_eq!(
        err("postgresql://u@db.example.com/d?dbname=e"),
        PocoError::Conflict("the database".into())
    );
    assert_eq!(
        err("postgresql://u@db.example.com/d?user=v"),
        PocoError::Conflict("the user".into())
    );
    assert_eq!(
        err("postgresql://u@a.example.com/d?host=b.example.com"),
        PocoError::Conflict("the host".into())
    );
    // agreeing duplicates are fine (case of a host name does not matter)
    ok("postgresql://u@A.example.com:5432/d?host=a.example.com&port=5432&dbname=d&user=u");
}

#[test]
fn refuses_loopback_link_local_and_private_addresses_unless_allowed() {
    let cases = [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "\"this network\" (0.0.0.0/8)"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("[::1]", "loopback"),
        ("[fe80::1]", "link-local"),
        ("[fd00::1]", "unique local (private)"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::ffff:10.0.0.1]", "private"),
        ("[::]", "unspecified"),
        ("[64:ff9b::a00:1]", "private"),
        ("[2002:c0a8:101::1]", "private"),
        ("localhost", "loopback"),
        ("db.localhost", "loopback"),
        ("printer.local", "link-local (mDNS)"),
        ("db.internal", "private-network"),
        ("learnerdb", "single-label (local network)"),
    ];
    for (host, kind) in cases {
        let e = refused_public(&format!("postgresql://u:p@{host}/d"));
        assert!(
            matches!(&e, PocoError::PrivateAddress(_, k) if *k == kind),
            "{host}: {e:?}"
        );
    }
    for public in [
        "8.8.8.8",
        "[2001:4860:4860::8888]",
        "ep-x.us-east-2.aws.neon.tech",
        "db.supabase.co",
    ] {
        ok(&format!("postgresql://u:p@{public}/d"))
            .validate(false)
            .unwrap();
    }
    assert_eq!(classify_ip("93.184.216.34".parse().unwrap()), None);
    assert_eq!(classify_ip("10.0.0.1".parse().unwrap()), Some("private"));
}

#[test]
fn json_form_every_key_and_agreement() {
    let t = parse_json(
        &json!({"PGHOST": "db.example.com", "PGPORT": 6432, "PGUSER": "dan",
        "PGPASSWORD": "s3cret", "PGDATABASE": "family", "PGSSLMODE": "verify-full"}),
    )
    .unwrap();
    assert_eq!(t.host, TargetHost::Name("db.example.com".into()));
    assert_eq!(t.port, 6432);
    assert_eq!((t.user.as_str(), t.dbname.as_str()), ("dan", "family"));
    assert_eq!(t.password.unwrap().expose(), "s3cret");
    assert_eq!(t.sslmode, SslMode::VerifyFull);

    // DATABASE_URL plus keys that fill what it lacks
    let t = parse_json(&json!({"DATABASE_URL": "postgresql://dan@db.example.com/family", "PGPASSWORD": "pw", "PGPORT": "6000"})).unwrap();
    assert_eq!(t.password.unwrap().expose(), "pw");
    assert_eq!(t.port, 6000);
    // ... and keys that agree with it
    parse_json(&json!({"DATABASE_URL": "postgresql://dan:pw@db.example.com:6000/family", "PGPASSWORD": "pw", "PGPORT": "6000", "PGHOST": "DB.example.com", "PGUSER": "dan", "PGDATABASE": "family"})).unwrap();
    // ... or disagree
    for (k, v, what) in [
        ("PGPASSWORD", "other", "the password"),
        ("PGPORT", "6001", "the port"),
        ("PGHOST", "x.example.com", "the host"),
        ("PGUSER", "eve", "the user"),
        ("PGDATABASE", "x", "the database"),
    ] {
        let mut o = json!({"DATABASE_URL": "postgresql://dan:pw@db.example.com:6000/family"});
        o[k] = json!(v);
        assert_eq!(
            parse_json(&o).unwrap_err(),
            PocoError::Conflict(what.into()),
            "{k}"
        );
    }
    assert!(matches!(
        parse_json(&json!({"PGHOST": "db.example.com", "PGUSER": "u", "PGFOO": "x"})),
        Err(PocoError::UnknownJsonKey(_))
    ));
    assert!(matches!(
        parse_json(&json!({"PGHOST": 5, "PGUSER": "u"})),
        Err(PocoError::BadJsonValue(_))
    ));
    assert_eq!(
        parse_json(&json!([1])).unwrap_err(),
        PocoError::BadJsonShape
    );
    assert_eq!(
        parse_json(&json!({"PGUSER": "u"})).unwrap_err(),
        PocoError::NoHost
    );
    assert_eq!(
        parse_json(&json!({"PGHOST": "db.example.com"})).unwrap_err(),
        PocoError::NoUser
    );
    // a bare JSON string is a URL
    assert_eq!(
        parse_json(&json!("postgresql://u@db.example.com/d"))
            .unwrap()
            .dbname,
        "d"
    );
}

#[test]
fn redacted_url_and_debug_never_show_the_password() {
    let marker = "MARKER-pw-93f1";
    let t = ok(&format!(
        "postgresql://u:{marker}@db.example.com/d?application_name=x"
    ));
    let red = t.redacted_url();
    assert_eq!(
        red,
        "postgresql://u:***@db.example.com:5432/d?sslmode=require&application_name=x"
    );
    assert!(!format!("{t:?}").contains(marker));
    // errors never carry the password either, whatever part of the URL is wrong
    for bad in [
        format!("postgresql://u:{marker}@db.example.com:0/d"),
        format!("postgresql://u:{marker}@db.example.com/d?sslmode=x"),
        format!("postgresql://u:{marker}@a,b/d"),
        format!("postgresql://u:{marker}@/d"),
        format!("postgresql://u:{marker}@db.example.com/d?zzz=1"),
    ] {
        let e = err(&bad);
        assert!(
            !e.to_string().contains(marker) && !e.hint().unwrap_or_default().contains(marker),
            "{e}"
        );
    }
}

#[test]
fn associated_data_binds_identity() {
    let t = ok("postgresql://u:p@db.example.com/d");
    assert_ne!(t.associated_data(1, "7"), t.associated_data(2, "7"));
    assert_ne!(t.associated_data(1, "7"), t.associated_data(1, "8"));
    let t2 = ok("postgresql://u:p@evil.example.com/d");
    assert_ne!(t.associated_data(1, "7"), t2.associated_data(1, "7"));
}

#[test]
fn user_info_after_three_slashes_is_refused_not_taken_as_a_database_name() {
    // Found by target_fuzz.rs: libpq would read "alex:secret@db.example.com" as the database
    // name, and poco_sync would then show the password as part of the name.
    for url in [
        "postgresql:///alex:secret@db.example.com?host=db.example.com",
        "postgres:///:secret@db.example.com:5432?host=db.example.com",
        "postgresql://db.example.com/alex:secret@other",
    ] {
        let e = err(url);
        assert!(
            matches!(e, PocoError::BadUrl(_)) && !e.to_string().contains("secret"),
            "{url}: {e}"
        );
    }
    // A real '@' in a database name, written %40, is still fine.
    assert_eq!(ok("postgresql://u@db.example.com/my%40db").dbname, "my@db");
}

#[test]
fn sslrootcert_names_a_file_inside_the_allowed_directory_only() {
    use poco_core::target::root_cert_in;
    let code = |p: &str, d: Option<&str>| root_cert_in(p, d).map_err(|e| e.sqlstate().code());
    assert_eq!(code("/etc/poco/ca/root.crt", Some("/etc/poco/ca")), Ok(()));
    assert_eq!(
        code("/etc/poco/ca/sub/root.crt", Some("/etc/poco/ca/")),
        Ok(())
    );
    for p in [
        "/dev/zero",
        "/etc/poco/ca/../../passwd",
        "ca/root.crt",
        "/etc/poco/ca",
        "/etc/poco/cab/x",
    ] {
        assert_eq!(code(p, Some("/etc/poco/ca")), Err("42501"), "{p}");
    }
    assert_eq!(
        code("/etc/poco/ca/root.crt", None),
        Err("42501"),
        "no directory set: files refused"
    );
}
