//! The background worker: running after start, back after being killed, gone fast on shutdown,
//! re-reads settings on SIGHUP; and a clear error when the library is not preloaded.

use poco_e2e::{wait_for, Options, Server};
use std::time::Duration;

fn worker_pid(s: &Server) -> Option<i32> {
    let db = s.connect("platform");
    db.value("SELECT pid FROM pg_stat_activity WHERE backend_type = 'poco_sync worker'")
        .and_then(|p| p.parse().ok())
}

fn alive_with_heartbeat(s: &Server) -> Option<i32> {
    let db = s.connect("platform");
    let v = db.value(
        "SELECT pid FROM poco.worker WHERE state = 'idle' AND heartbeat_at > clock_timestamp() - interval '5 s'",
    )?;
    v.parse().ok()
}

#[test]
fn worker_runs_restarts_and_stops_fast() {
    let platform = Server::start("platform", &Options::platform());
    let pid = wait_for(Duration::from_secs(20), || alive_with_heartbeat(&platform))
        .expect("worker running");
    assert_eq!(
        worker_pid(&platform),
        Some(pid),
        "pg_stat_activity and poco.worker agree"
    );

    // The heartbeat advances.
    let db = platform.connect("platform");
    let p1: i64 = db.query("SELECT passes FROM poco.worker")[0].get(0);
    std::thread::sleep(Duration::from_millis(2500));
    let p2: i64 = db.query("SELECT passes FROM poco.worker")[0].get(0);
    assert!(p2 > p1, "heartbeat passes {p1} -> {p2}");

    // SIGHUP: settings are re-read.
    db.execute("ALTER SYSTEM SET poco.naptime = '100ms'");
    platform.reload();
    let p3: i64 = db.query("SELECT passes FROM poco.worker")[0].get(0);
    std::thread::sleep(Duration::from_millis(2000));
    let p4: i64 = db.query("SELECT passes FROM poco.worker")[0].get(0);
    assert!(
        p4 - p3 >= 8,
        "after naptime = 100ms the worker loops faster: {p3} -> {p4}"
    );

    // Terminated alone, it comes back.
    db.execute(&format!("SELECT pg_terminate_backend({pid})"));
    let pid2 = wait_for(Duration::from_secs(20), || {
        alive_with_heartbeat(&platform).filter(|p| *p != pid)
    })
    .expect("worker back after pg_terminate_backend");
    drop(db);

    // Killed with SIGKILL: the postmaster restarts everything, the worker included.
    unsafe { libc::kill(pid2, libc::SIGKILL) };
    let pid3 = wait_for(Duration::from_secs(60), || {
        // The server is restarting: connections fail for a while, which is not an error here.
        let db = platform.try_connect("platform")?;
        let v = db
            .try_value("SELECT pid FROM poco.worker WHERE state = 'idle' AND heartbeat_at > clock_timestamp() - interval '5 s'")
            .ok()??;
        v.parse::<i32>().ok().filter(|p| *p != pid2)
    })
    .expect("worker back after kill -9");
    assert_ne!(pid3, pid2);
    let starts: i32 = platform
        .connect("platform")
        .query("SELECT starts FROM poco.worker")[0]
        .get(0);
    assert!(starts >= 1);

    // Fast shutdown: the worker leaves at once, the whole server is down well within 5 s.
    let took = platform.stop("fast");
    assert!(took < Duration::from_secs(5), "fast shutdown took {took:?}");
    assert!(
        unsafe { libc::kill(pid3, 0) } != 0,
        "worker process still exists"
    );
    let log = platform.log();
    assert!(
        log.contains("poco_sync worker exiting"),
        "clean exit logged"
    );
    assert!(!log.contains("PANIC"), "{log}");
}

#[test]
fn without_preload_the_worker_functions_say_what_to_do() {
    let mut opts = Options::platform();
    opts.preload = false;
    let platform = Server::start("platform", &opts);
    let db = platform.connect("platform");
    let e = db.error("SELECT * FROM poco.worker");
    assert_eq!(e.code().code(), "55000");
    assert_eq!(
        e.message(),
        "poco_sync is not loaded through shared_preload_libraries"
    );
    assert!(e.hint().unwrap().contains("shared_preload_libraries"));
    // Storing targets does not need the worker.
    db.execute("SELECT poco_add_target(1, 'postgresql://u:pw@127.0.0.1:5999/d?sslmode=disable')");
    assert_eq!(db.value("SELECT count(*) FROM poco.targets").unwrap(), "1");
}
