//! `#[pg_test]` tests: run inside one server started by `cargo pgrx test` (preloaded, no key
//! file). Key handling and real learner servers are tested end to end in pg_test/.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn sqlstate_of(sql: &str) -> String {
        // Run in a subtransaction so the error can be inspected and the test goes on.
        let q = format!(
            "DO $$ BEGIN {sql}; RAISE EXCEPTION 'no error'; EXCEPTION WHEN OTHERS THEN \
             PERFORM set_config('poco_test.state', SQLSTATE || ' ' || SQLERRM, false); END $$"
        );
        Spi::run(&q).unwrap();
        Spi::get_one::<String>("SELECT current_setting('poco_test.state')")
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn storing_a_target_without_a_key_file_fails_with_a_hint() {
        let s = sqlstate_of("PERFORM poco_add_target(1, 'postgresql://u:pw@db.example.com/d')");
        assert!(s.starts_with("55000 poco.key_file is not set"), "{s}");
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM poco.target").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn bad_urls_are_refused_through_sql_with_their_sqlstate() {
        let cases = [
            ("'postgresql:///db'", "22023 target has no host"),
            ("'postgresql://u@a.example.com,b.example.com/d'", "22023 target names several hosts"),
            ("'postgresql://u@db.example.com:0/d'", "22023 invalid port \"0\" in target"),
            ("'postgresql://u@db.example.com/d?sslmode=nope'", "22023 invalid sslmode \"nope\""),
            ("'postgresql://u@%2Ftmp/d'", "22023 target host \"/tmp\" is a Unix-domain socket path"),
            ("'postgresql://u@127.0.0.1/d'", "42501 target host 127.0.0.1 is a loopback address"),
            ("'postgresql://u@db.example.com/d?sslmode=disable'", "22023 sslmode \"disable\" may send data unencrypted"),
            ("'{\"PGHOST\": \"db.example.com\", \"PGUSER\": \"u\", \"PGPORT\": \"1\", \"DATABASE_URL\": \"postgresql://u@db.example.com:2/d\"}'::jsonb",
             "22023 target gives two different values for the port"),
        ];
        for (arg, want) in cases {
            let s = sqlstate_of(&format!("PERFORM poco_add_target(7, {arg})"));
            assert_eq!(s, want, "{arg}");
        }
        let s =
            sqlstate_of("PERFORM poco_add_target(NULL::int, 'postgresql://u@db.example.com/d')");
        assert!(s.starts_with("22004"), "{s}");
    }

    #[pg_test]
    fn parent_id_of_every_key_type_reaches_the_same_function() {
        // No key configured here, so each call fails at the key step: after overload resolution.
        for arg in [
            "1",
            "1::bigint",
            "'5f1c8a7e-0000-4000-8000-000000000001'::uuid",
            "'abc'",
            "'abc'::text",
        ] {
            let s = sqlstate_of(&format!(
                "PERFORM poco_add_target({arg}, 'postgresql://u@db.example.com/d')"
            ));
            assert!(s.starts_with("55000"), "{arg}: {s}");
        }
    }

    #[pg_test]
    fn removing_an_unknown_target_says_so() {
        let s = sqlstate_of("PERFORM poco_remove_target(424242)");
        assert_eq!(s, "42704 target 424242 does not exist");
    }

    #[pg_test]
    fn targets_view_has_no_secret_column_and_functions_are_not_public() {
        let cols = Spi::get_one::<String>(
            "SELECT string_agg(attname, ',') FROM pg_attribute WHERE attrelid = 'poco.targets'::regclass AND attnum > 0",
        )
        .unwrap()
        .unwrap();
        assert!(!cols.contains("secret"), "{cols}");
        let public_exec = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p WHERE (p.proname LIKE 'poco\\_%' OR p.pronamespace = 'poco'::regnamespace) \
             AND has_function_privilege('public', p.oid, 'EXECUTE')",
        )
        .unwrap();
        assert_eq!(public_exec, Some(0));
        let key_setting_flags =
            Spi::get_one::<String>("SELECT context FROM pg_settings WHERE name = 'poco.key_file'")
                .unwrap();
        assert_eq!(key_setting_flags.as_deref(), Some("sighup"));
    }

    #[pg_test]
    fn the_worker_shows_a_heartbeat() {
        // The worker may still be (re)starting: the test database is created after boot.
        let mut alive = None;
        for _ in 0..50 {
            alive = Spi::get_one::<bool>(
                "SELECT pid IS NOT NULL AND state = 'idle' AND heartbeat_at > clock_timestamp() - interval '10 s' \
                   FROM poco.worker_status()",
            )
            .unwrap();
            if alive == Some(true) {
                break;
            }
            Spi::run("SELECT pg_sleep(0.2)").unwrap();
        }
        assert_eq!(alive, Some(true));
    }
}
