//! Failpoints for the fault tests: named moments where a process fails on purpose when
//! `poco.failpoint` (superuser only, off by default) names them. Its value is a comma-separated
//! list of `name` (the moment returns an error, once per process or, for pushes, on a job's
//! first attempt only) or `name:crash` (the process is killed there with SIGKILL, as a
//! `kill -9` would; once per data directory, marked by a file `poco_failpoint.<name>` in it,
//! so that the server's crash restart does not loop). Each firing is logged, so a test can
//! tell that the moment was reached.
//!
//! Known: `push_mid_copy`, `push_between_tables`, `push_after_learner_commit` (pushes and
//! snapshots), `stream_key_loading`, `stream_ack_lost`, `stream_attribution` (continuous sync;
//! the last fails every owner lookup of attribution for as long as it is armed), and
//! `stream_batch:<parent id>` (building that parent's batches fails while it is armed),
//! `stream_pass` (every pass of the streams fails as a whole while it is armed).

use crate::gucs;
use crate::net::JobError;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::BTreeSet;

thread_local! {
    static FIRED: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Whether `name` fails now (once per process). A `:crash` entry kills the process here.
pub fn fires(name: &str) -> bool {
    let first = FIRED.with(|f| !f.borrow().contains(name));
    fires_when(name, first) && FIRED.with(|f| f.borrow_mut().insert(name.to_string()))
}

/// Whether `name` is armed: true at every call while it is listed (a moment a test makes fail
/// for as long as it wants, not once).
pub fn armed(name: &str) -> bool {
    fires_when(name, true)
}

/// Whether `name` is armed for `who` (`name:who` in the list, or `name` alone: for everyone),
/// at every call while it is listed.
pub fn armed_for(name: &str, who: &str) -> bool {
    let Some(spec) = gucs::failpoint() else {
        return false;
    };
    spec.split(',').map(str::trim).any(|item| match item.split_once(':') {
        Some((n, w)) => n == name && w == who,
        None => item == name,
    })
}

/// A push's failpoint: on the job's first attempt, `name` fails the push there as a lost
/// connection would (a transient error, so the push is retried).
pub fn push_step(name: &str, attempt: i32, what: impl std::fmt::Display) -> Result<(), JobError> {
    if fires_when(name, attempt <= 1) {
        return Err(JobError::transient(
            "08006",
            format!("failpoint {name}: {what}"),
        ));
    }
    Ok(())
}

/// Whether `name` fails now, if `eligible` (a push's first attempt). A `:crash` entry kills the
/// process here whatever `eligible` says.
fn fires_when(name: &str, eligible: bool) -> bool {
    let Some(spec) = gucs::failpoint() else {
        return false;
    };
    for item in spec.split(',').map(str::trim) {
        let (n, mode) = item.split_once(':').unwrap_or((item, ""));
        if n != name {
            continue;
        }
        if mode == "crash" {
            // The working directory of a server process is its data directory.
            let marker = format!("poco_failpoint.{name}");
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok()
            {
                log!("poco_sync: failpoint {name} fired: the process is killed here");
                // SAFETY: signals this very process, as kill -9 from outside would.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            return false;
        }
        if eligible {
            log!("poco_sync: failpoint {name} fired");
        }
        return eligible;
    }
    false
}
