//! A learner cannot exhaust the platform (issue #24 point 5): what poco_sync reads from a
//! learner is capped on the client side, per message and per answer. A fake server completes
//! the startup, then sends a 1 GB ParameterStatus, a 1 GB DataRow, or rows without end: the
//! push ends with a clear error (SQLSTATE 54000) while the push process's memory stays flat.
//! The peak RSS of each is printed (BENCHMARKS.md).

use poco_e2e::{rss_anon_kb, sample_platform, Flood, FloodServer, SECRET};
use std::time::{Duration, Instant};

#[test]
fn a_flooding_learner_ends_the_push_with_a_clear_error_and_flat_memory() {
    let (platform, db) = sample_platform("flood", 3);
    let probe = platform.connect("platform");
    for mode in [Flood::HugeParameterStatus, Flood::HugeDataRow, Flood::EndlessRows] {
        let server = FloodServer::start(mode);
        let url = format!(
            "postgresql://postgres:{SECRET}@127.0.0.1:{}/family?sslmode=prefer",
            server.port
        );
        let job: i64 = db.query(&format!("SELECT poco_push(21, poco_add_target(21, '{url}'))"))[0].get(0);
        let t0 = Instant::now();
        let mut peak = 0u64;
        let state = loop {
            assert!(t0.elapsed() < Duration::from_secs(120), "{mode:?}: the push did not end");
            if let Some(pid) = probe.value(
                "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'poco_sync push'",
            ) {
                peak = peak.max(rss_anon_kb(&pid).unwrap_or(0));
            }
            let state = probe
                .value(&format!("SELECT state FROM poco.job WHERE id = {job}"))
                .unwrap_or_default();
            if state != "queued" && state != "running" {
                break state;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let error = db
            .value(&format!("SELECT coalesce(error, '') FROM poco.job WHERE id = {job}"))
            .unwrap_or_default();
        let sent = server.sent.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "flood {mode:?}: job {state} in {} ms, peak push RSS {peak} kB, {} MB sent by the server: {error}",
            t0.elapsed().as_millis(),
            sent >> 20
        );
        assert_eq!(state, "failed", "{mode:?}: {error}");
        let want = if mode == Flood::EndlessRows {
            "the most poco_sync reads from a learner for one statement"
        } else {
            "poco_sync reads at most 16 MB per message"
        };
        assert!(error.contains(want), "{mode:?}: {error}");
        assert!(peak < 120 * 1024, "{mode:?}: the push process reached {peak} kB");
    }
}
