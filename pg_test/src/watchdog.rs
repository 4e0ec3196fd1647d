//! The suite's watchdog (issue #24 point 9): when a platform server of a scenario is dropped
//! at the scenario's end (not when the scenario failed), four things are asserted:
//! - no target sits in `snapshot` or `resnapshot` without a queued or running job;
//! - no `streaming` target is behind with no error (it catches up within WAIT, or says why);
//! - `poco.change` is not held by a target nobody works on (pruning keeps up);
//! - `poco_verify` finds no difference on every target that says it is up to date.
//!
//! Learners dropped before their platform (they are declared after it) are handed over and
//! stopped after the check, so that poco_verify can still read them. Each check prints
//! `poco_e2e watchdog: ... checked`, which scripts/test.sh counts.

use super::{Db, Server};
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// How long a streaming target may take to catch up (or show an error) at the end.
const WAIT: &str = "20 s";

thread_local! {
    static PLATFORMS: Cell<usize> = const { Cell::new(0) };
    static HANDED: RefCell<Vec<Server>> = const { RefCell::new(Vec::new()) };
    static SKIP_VERIFY: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// For a scenario whose learners are made to differ on purpose (a hostile learner editing its
/// own copy): the watchdog's other checks still run; poco_verify's is skipped, and says why.
pub fn watchdog_skips_verify(why: &str) {
    SKIP_VERIFY.with(|s| *s.borrow_mut() = Some(why.to_string()));
}

pub(super) fn platform_started() {
    PLATFORMS.with(|p| p.set(p.get() + 1));
}

/// A learner being dropped while a platform of this scenario lives: kept running until the
/// platform's check is done. Whether it was taken.
pub(super) fn hand_over(s: &mut Server) -> bool {
    if PLATFORMS.with(|p| p.get()) == 0 || std::thread::panicking() {
        return false;
    }
    let copy = Server {
        name: s.name.clone(),
        dir: s.dir.clone(),
        port: s.port,
        bindir: s.bindir.clone(),
        platform: false,
        handed_off: false,
    };
    HANDED.with(|h| h.borrow_mut().push(copy));
    true
}

pub(super) fn platform_dropped(p: &Server) {
    PLATFORMS.with(|n| n.set(n.get().saturating_sub(1)));
    let handed: Vec<Server> = if PLATFORMS.with(|n| n.get()) == 0 {
        HANDED.with(|h| std::mem::take(&mut *h.borrow_mut()))
    } else {
        Vec::new()
    };
    if std::thread::panicking() || std::env::var_os("POCO_NO_WATCHDOG").is_some() {
        return; // `handed` stops the learners as it goes
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(p)));
    match result {
        Ok(Ok(line)) => println!("poco_e2e watchdog: {}: {line}; checked", p.name),
        Ok(Err(why)) => {
            p.stop("immediate");
            drop(handed);
            panic!("poco_e2e watchdog: {}: {why}", p.name);
        }
        Err(e) => {
            p.stop("immediate");
            drop(handed);
            std::panic::resume_unwind(e);
        }
    }
    drop(handed);
}

fn ids(db: &Db, sql: &str) -> Vec<i64> {
    db.query(sql).iter().map(|r| r.get::<_, i64>(0)).collect()
}

/// Poll `f` every 100 ms for at most `limit`; its last answer.
fn settle<T>(limit: Duration, mut f: impl FnMut() -> (bool, T)) -> (bool, T) {
    let t = Instant::now();
    loop {
        let (ok, v) = f();
        if ok || t.elapsed() >= limit {
            return (ok, v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check(p: &Server) -> Result<String, String> {
    let Some(db) = p.try_connect("platform") else {
        return Ok("no platform database, nothing to check".into());
    };
    if db
        .try_value("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'poco_sync'")
        .ok()
        .flatten()
        .is_none()
    {
        return Ok("poco_sync not installed, nothing to check".into());
    }
    // Failpoints a scenario left armed would keep failing on purpose.
    if db.value("SELECT current_setting('poco.failpoint', true)").is_some_and(|v| !v.is_empty()) {
        db.execute("ALTER SYSTEM RESET poco.failpoint");
        db.execute("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(600));
    }
    // 1. Nobody waits for a snapshot that will not come.
    let orphans = "SELECT t.id FROM poco.target t WHERE t.continuous AND t.sync_state IN ('snapshot', 'resnapshot') \
         AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) ORDER BY 1";
    let (ok, v) = settle(Duration::from_secs(10), || {
        let v = ids(&db, orphans);
        (v.is_empty(), v)
    });
    if !ok {
        return Err(format!("targets {v:?} wait in snapshot/resnapshot with no job"));
    }
    // 2. Streaming targets catch up, or say why not.
    let streaming = ids(
        &db,
        "SELECT id FROM poco.target WHERE continuous AND sync_state = 'streaming' ORDER BY 1",
    );
    let mut up_to_date = Vec::new();
    for t in &streaming {
        let caught_up = db
            .try_value(&format!("SELECT poco_sync_wait({t}, '{WAIT}')"))
            .ok()
            .flatten()
            .as_deref()
            == Some("t");
        let (state, error) = {
            let r = db.query(&format!(
                "SELECT sync_state, coalesce(last_sync_error, '') FROM poco.target WHERE id = {t}"
            ));
            match r.first() {
                Some(r) => (r.get::<_, String>(0), r.get::<_, String>(1)),
                None => continue, // removed meanwhile
            }
        };
        if state != "streaming" {
            continue;
        }
        if !caught_up && error.is_empty() {
            return Err(format!(
                "target {t} is streaming, behind after {WAIT}, and shows no error"
            ));
        }
        if caught_up && error.is_empty() {
            up_to_date.push(*t);
        }
    }
    // 3. poco.change is pruned below what the targets someone works on still need.
    let held = "SELECT count(*) FROM poco.change WHERE txid < coalesce( \
           (SELECT min(pg_snapshot_xmin(t.sync_position)::text::bigint) FROM poco.target t \
             WHERE t.continuous AND t.sync_position IS NOT NULL \
               AND (t.sync_state <> 'error' OR EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')))), \
           pg_snapshot_xmin(pg_current_snapshot())::text::bigint)";
    let (ok, n) = settle(Duration::from_secs(10), || {
        let n = db.value(held).unwrap_or_default();
        (n == "0", n)
    });
    if !ok {
        return Err(format!("{n} changes of poco.change are held by no target anyone works on"));
    }
    // 4. Up to date means equal.
    let skip = SKIP_VERIFY.with(|s| s.borrow_mut().take());
    let mut verified = 0;
    let mut unreachable = 0;
    if skip.is_none() {
        for t in &up_to_date {
            match db.try_query(&format!(
                "SELECT table_name FROM poco_verify({t}) WHERE NOT equal ORDER BY 1"
            )) {
                Ok(rows) => {
                    let differ: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    if !differ.is_empty() {
                        return Err(format!(
                            "target {t} says it is up to date, and poco_verify finds {differ:?} differ"
                        ));
                    }
                    verified += 1;
                }
                // A learner the scenario stopped or took away: nothing to compare.
                Err(_) => unreachable += 1,
            }
        }
    }
    Ok(format!(
        "{} streaming, {verified} verified equal{}{}",
        streaming.len(),
        if unreachable > 0 {
            format!(", {unreachable} unreachable")
        } else {
            String::new()
        },
        skip.map(|w| format!(", poco_verify skipped: {w}")).unwrap_or_default()
    ))
}
