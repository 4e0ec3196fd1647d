//! Observability: the worker's heartbeat (`poco.worker`).

use pgrx::prelude::*;

#[pg_schema]
pub mod poco {
    use crate::errors::raise;
    use crate::shmem;
    use pgrx::prelude::*;
    use poco_core::PocoError;

    fn ts(v: i64) -> Option<TimestampWithTimeZone> {
        if v == 0 {
            None
        } else {
            TimestampWithTimeZone::try_from(v).ok()
        }
    }

    /// The background worker's state; fails with a hint when the library is not preloaded,
    /// since the worker then does not exist.
    #[pg_extern(volatile, parallel_safe)]
    fn worker_status() -> TableIterator<
        'static,
        (
            name!(pid, Option<i32>),
            name!(state, String),
            name!(database, String),
            name!(started_at, Option<TimestampWithTimeZone>),
            name!(heartbeat_at, Option<TimestampWithTimeZone>),
            name!(passes, i64),
            name!(starts, i32),
        ),
    > {
        if !shmem::preloaded() {
            raise(PocoError::NotPreloaded);
        }
        let w = shmem::snapshot();
        TableIterator::once((
            (w.pid != 0).then_some(w.pid),
            shmem::state_name(w.state).to_string(),
            crate::gucs::database(),
            ts(w.started_at),
            ts(w.heartbeat_at),
            w.passes as i64,
            w.restarts as i32,
        ))
    }
}
