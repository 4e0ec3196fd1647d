//! poco_sync: the PostgreSQL extension. This file only wires the modules together; the pure
//! logic lives in the `poco_core` crate (core/), SPI in `catalog`, the worker in `worker`.

use pgrx::prelude::*;

mod authz;
mod capped;
mod catalog;
mod errors;
mod failpoint;
mod gucs;
mod jobs;
mod keys;
mod net;
mod process;
mod push;
mod scope;
mod shmem;
mod status;
mod stream;
mod sync;
mod targets;
mod verify;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        keys::load_at_startup();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'poco_sync'",
            "poco.database = 'pgrx_tests'",
        ]
    }
}
