//! Continuous sync under a randomized concurrent workload: several client connections change
//! many families at once (inserts, updates, deletes with cascades, learners and enrollments
//! moving between families, shared course titles, transactions that commit late); afterwards
//! every syncing learner holds exactly its parent's scope, checked row by row against the
//! platform (so nothing lost, nothing stale, nothing of another family).
//!
//! POCO_SYNC_SEED replays a run (the seed is printed); POCO_SYNC_TXNS (default 60) sets the
//! transactions per client.

use poco_e2e::{assert_learner_equals_scope, sample_platform, Options, Rng, Server};

const FAMILIES: [i64; 6] = [21, 22, 23, 24, 25, 26]; // 21-24 sync; 25, 26 do not
const CLIENTS: u64 = 3;

/// One random transaction's statements.
fn random_txn(r: &mut Rng, moves: bool) -> String {
    let fam = |r: &mut Rng| FAMILIES[r.below(FAMILIES.len())];
    let learner_of = |f: i64| {
        format!("(SELECT id FROM elearning.users WHERE parent_id = {f} ORDER BY random() LIMIT 1)")
    };
    let mut stmts = Vec::new();
    for _ in 0..r.range(1, 4) {
        let f = fam(r);
        // Mostly everyday changes; moves between families (handled by new snapshots) are rare.
        let pick = r.below(30);
        let pick = if !moves && (pick == 25 || pick == 26) {
            0
        } else {
            pick
        };
        let s = match pick {
            0..=7 => format!(
                "INSERT INTO elearning.audit_log (user_id, action, detail) SELECT u.id, 'rand', jsonb_build_object('n', {}) \
                   FROM elearning.users u WHERE u.id = {f} OR u.parent_id = {f} ORDER BY random() LIMIT 2",
                r.next() % 1000
            ),
            8..=10 => format!(
                "UPDATE elearning.audit_log SET detail = detail || '{{\"u\": 1}}' WHERE id IN (SELECT a.id FROM elearning.audit_log a \
                   JOIN elearning.users u ON u.id = a.user_id WHERE u.parent_id = {f} ORDER BY random() LIMIT 3)"
            ),
            11..=13 => format!(
                "DELETE FROM elearning.audit_log WHERE id IN (SELECT a.id FROM elearning.audit_log a \
                   JOIN elearning.users u ON u.id = a.user_id WHERE u.id = {f} OR u.parent_id = {f} ORDER BY random() LIMIT 2)"
            ),
            14..=17 => format!(
                "INSERT INTO elearning.enrollments (learner_id, course_id) \
                 SELECT l.id, c.id FROM {} l(id), LATERAL (SELECT id FROM elearning.courses ORDER BY random() LIMIT 1) c \
                 WHERE l.id IS NOT NULL ON CONFLICT DO NOTHING",
                format!("(SELECT {})", learner_of(f))
            ),
            18..=19 => format!(
                "DELETE FROM elearning.enrollments WHERE id IN (SELECT e.id FROM elearning.enrollments e \
                   JOIN elearning.users u ON u.id = e.learner_id WHERE u.parent_id = {f} ORDER BY random() LIMIT 1)"
            ),
            20..=24 => format!(
                "INSERT INTO elearning.lesson_progress (enrollment_id, lesson_id, status, score) \
                 SELECT e.id, l.id, 'started', {} FROM elearning.enrollments e JOIN elearning.users u ON u.id = e.learner_id \
                   JOIN elearning.lessons l ON l.course_id = e.course_id WHERE u.parent_id = {f} ORDER BY random() LIMIT 2 \
                 ON CONFLICT (enrollment_id, lesson_id) DO UPDATE SET status = 'done', score = EXCLUDED.score",
                r.below(100)
            ),
            25 => {
                // A learner moves to another family (never leaving a family without learners).
                let to = fam(r);
                format!(
                    "UPDATE elearning.users SET parent_id = {to} WHERE id = (SELECT id FROM elearning.users WHERE parent_id = {f} \
                       AND (SELECT count(*) FROM elearning.users WHERE parent_id = {f}) > 1 ORDER BY random() LIMIT 1)"
                )
            }
            26 => {
                let to = fam(r);
                format!(
                    "UPDATE elearning.enrollments e SET learner_id = t.id FROM (SELECT {} AS id) t \
                      WHERE t.id IS NOT NULL AND e.id = (SELECT e2.id FROM elearning.enrollments e2 JOIN elearning.users u \
                        ON u.id = e2.learner_id WHERE u.parent_id = {f} ORDER BY random() LIMIT 1) \
                        AND NOT EXISTS (SELECT 1 FROM elearning.enrollments x WHERE x.learner_id = t.id AND x.course_id = e.course_id)",
                    learner_of(to)
                )
            }
            _ => format!("UPDATE elearning.courses SET title = 'Course ' || id || ' rev {}' WHERE id = (SELECT id FROM elearning.courses ORDER BY random() LIMIT 1)", r.next() % 100),
        };
        stmts.push(s);
    }
    stmts.join(";\n")
}

#[test]
fn a_randomized_concurrent_workload_ends_with_every_learner_equal_to_its_scope() {
    let seed: u64 = std::env::var("POCO_SYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let txns: usize = std::env::var("POCO_SYNC_TXNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    println!("sync_random: POCO_SYNC_SEED={seed} POCO_SYNC_TXNS={txns}");
    let (platform, db) = sample_platform("sync_random", 20);
    let mut learners = Vec::new();
    for f in &FAMILIES[..4] {
        let l = Server::start(&format!("sync_random_l{f}"), &Options::learner());
        l.psql("postgres", "CREATE DATABASE family");
        let t = poco_e2e::enable_sync(&db, &f.to_string(), &l);
        learners.push((*f, t, l));
    }

    // Two phases: with moves between families (handled by new snapshots), then without (every
    // change goes by batches). The learners are checked after each.
    for (phase, moves) in [(1, true), (2, false)] {
        run_clients(&platform, seed.wrapping_add(phase), txns, moves);
        for (f, t, l) in &learners {
            assert_eq!(
                db.value(&format!("SELECT poco_sync_wait({t}, '2 min')"))
                    .as_deref(),
                Some("t"),
                "seed {seed}, phase {phase}: target {t} (family {f}) caught up; status: {:?}",
                db.value(&format!(
                    "SELECT state || ' ' || coalesce(last_error, '-') FROM poco_status({f})"
                ))
            );
            let ldb = l.connect("family");
            let rows = assert_learner_equals_scope(&db, &ldb, &f.to_string());
            assert!(rows > 0);
        }
    }
    println!(
        "sync_random: {} batches applied, {} re-snapshots (moves between families)",
        learners
            .iter()
            .map(|(_, _, l)| l
                .connect("family")
                .value("SELECT batches FROM poco_sync.position")
                .unwrap_or_default())
            .collect::<Vec<_>>()
            .join("+"),
        db.value("SELECT count(*) FROM poco.events WHERE kind = 'sync_resnapshot'")
            .unwrap_or_default()
    );
    for r in db.query("SELECT message, count(*)::int8 FROM poco.events WHERE kind = 'sync_resnapshot' GROUP BY 1 ORDER BY 2 DESC") {
        println!("sync_random:   {} × {}", r.get::<_, i64>(1), r.get::<_, String>(0));
    }
}

/// The clients, concurrently; every fourth transaction of a client holds its changes open for a
/// while before committing (others commit meanwhile).
fn run_clients(platform: &Server, seed: u64, txns: usize, moves: bool) {
    let mut committed = 0usize;
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                sc.spawn(move || {
                    let conn = platform.connect("platform");
                    let mut r = Rng(seed ^ (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let mut ok = 0;
                    for i in 0..txns {
                        let body = random_txn(&mut r, moves);
                        let late = if i % 4 == 3 {
                            "; SELECT pg_sleep(0.15)"
                        } else {
                            ""
                        };
                        match conn.try_value(&format!("BEGIN; {body}{late}; COMMIT")) {
                            Ok(_) => ok += 1,
                            Err(_) => {
                                let _ = conn.try_value("ROLLBACK"); // a deadlock or conflict between clients
                            }
                        }
                    }
                    ok
                })
            })
            .collect();
        for h in handles {
            committed += h.join().unwrap();
        }
    });
    println!(
        "sync_random: {committed} of {} transactions committed (moves: {moves})",
        CLIENTS as usize * txns
    );
    assert!(
        committed > CLIENTS as usize * txns / 2,
        "most transactions committed ({committed})"
    );
}
