//! The credentials key: read from `poco.key_file` at server start (in the postmaster, so every
//! backend and the worker inherit it), re-read only when the setting names another file.

use crate::gucs;
use poco_core::crypto::{load_key_file, Key};
use poco_core::{PocoError, Result};
use std::sync::Mutex;

/// (path it was read from, what reading it gave)
static CACHE: Mutex<Option<(String, Result<Key>)>> = Mutex::new(None);

pub fn load_at_startup() {
    if let Some(path) = gucs::key_file() {
        let loaded = load_key_file(&path);
        if let Err(e) = &loaded {
            // Do not keep the server from starting: storing or using a target will fail with
            // this error and its hint until the file is fixed and the server reloaded.
            pgrx::warning!("poco_sync: {e}");
        }
        *CACHE.lock().unwrap() = Some((path, loaded));
    }
}

/// The current key, or why there is none.
pub fn current() -> Result<Key> {
    let path = gucs::key_file().ok_or(PocoError::NoKeyConfigured)?;
    let mut cache = CACHE.lock().unwrap();
    match cache.as_ref() {
        Some((p, Ok(k))) if *p == path => return Ok(k.clone()),
        _ => {}
    }
    // Not loaded yet, another file, or it failed before (it may have been fixed since).
    let loaded = load_key_file(&path);
    *cache = Some((path, loaded.clone()));
    loaded
}

/// Forget the cached key, so the next use re-reads the file (after SIGHUP).
pub fn forget() {
    *CACHE.lock().unwrap() = None;
}
