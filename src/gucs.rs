//! `poco.*` settings. The key itself is never a setting: only the path of its file, and that
//! path is visible to superusers only.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ALLOW_PRIVATE: GucSetting<bool> = GucSetting::<bool>::new(false);
static NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

pub fn init() {
    GucRegistry::define_string_guc(
        c"poco.database",
        c"Database whose poco_sync background worker sends data to learners.",
        c"Install the extension there. On a change (and reload) the worker reconnects to the new database.",
        &DATABASE,
        // Not PGC_POSTMASTER: that cannot be defined when the library is loaded after start.
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"poco.key_file",
        c"File holding the 32-byte AES-256 key that encrypts learner credentials.",
        c"64 hex digits, base64, or 32 raw bytes; the file must not be accessible by group or others.",
        &KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"poco.allow_private_targets",
        c"Allow learner targets on loopback, link-local and private addresses, and sslmode=disable.",
        c"For development and tests only.",
        &ALLOW_PRIVATE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"poco.naptime",
        c"How long the worker sleeps between passes when idle.",
        c"The worker is also woken when work is committed.",
        &NAPTIME_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get().and_then(|c| c.into_string().ok()).filter(|s| !s.is_empty())
}

pub fn database() -> String {
    string(&DATABASE).unwrap_or_else(|| "postgres".into())
}

pub fn key_file() -> Option<String> {
    string(&KEY_FILE)
}

pub fn allow_private_targets() -> bool {
    ALLOW_PRIVATE.get()
}

pub fn naptime() -> std::time::Duration {
    std::time::Duration::from_millis(NAPTIME_MS.get().max(10) as u64)
}
