//! poco_sync's pure core. Nothing here uses pgrx or talks to a server, so all of it is
//! unit-tested with plain `cargo test -p poco_core`.

pub mod cap;
pub mod crypto;
pub mod error;
pub mod learner;
pub mod predicate;
pub mod record;
pub mod scope;
pub mod target;

pub use error::{PocoError, Result, SqlState};
