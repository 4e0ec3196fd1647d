//! One error enum for the whole extension. Every variant maps to one SQLSTATE and, where the
//! user can act, a hint. Messages never contain a password, key or ciphertext: variants carry
//! only what is safe to show (parameter names, host names, counts), never a secret value.

use thiserror::Error;

/// The SQLSTATE classes poco_sync raises. The extension layer maps these onto pgrx's codes;
/// `code()` gives the five characters for tests and for the pure core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlState {
    /// 22023 invalid_parameter_value
    InvalidParameterValue,
    /// 22004 null_value_not_allowed
    NullValueNotAllowed,
    /// 22P02 invalid_text_representation
    InvalidTextRepresentation,
    /// 42501 insufficient_privilege
    InsufficientPrivilege,
    /// 42704 undefined_object
    UndefinedObject,
    /// 55000 object_not_in_prerequisite_state
    ObjectNotInPrerequisiteState,
    /// 58P01 undefined_file
    UndefinedFile,
    /// 58030 io_error
    IoError,
    /// XX001 data_corrupted (a ciphertext that fails authentication or was made with another key)
    DataCorrupted,
    /// 08001 sqlclient_unable_to_establish_sqlconnection
    UnableToConnect,
    /// 08006 connection_failure
    ConnectionFailure,
    /// 57014 query_canceled
    QueryCanceled,
    /// XX000 internal_error
    Internal,
    /// 42601 syntax_error
    SyntaxError,
    /// 42703 undefined_column
    UndefinedColumn,
    /// 42P01 undefined_table
    UndefinedTable,
    /// 42809 wrong_object_type
    WrongObjectType,
    /// 42830 invalid_foreign_key
    InvalidForeignKey,
    /// 42702 ambiguous_column
    AmbiguousColumn,
    /// 42P17 invalid_object_definition
    InvalidObjectDefinition,
    /// 42P16 invalid_table_definition
    InvalidTableDefinition,
    /// 42710 duplicate_object
    DuplicateObject,
    /// 0A000 feature_not_supported
    FeatureNotSupported,
}

impl SqlState {
    pub fn code(self) -> &'static str {
        match self {
            SqlState::InvalidParameterValue => "22023",
            SqlState::NullValueNotAllowed => "22004",
            SqlState::InvalidTextRepresentation => "22P02",
            SqlState::InsufficientPrivilege => "42501",
            SqlState::UndefinedObject => "42704",
            SqlState::ObjectNotInPrerequisiteState => "55000",
            SqlState::UndefinedFile => "58P01",
            SqlState::IoError => "58030",
            SqlState::DataCorrupted => "XX001",
            SqlState::UnableToConnect => "08001",
            SqlState::ConnectionFailure => "08006",
            SqlState::QueryCanceled => "57014",
            SqlState::Internal => "XX000",
            SqlState::SyntaxError => "42601",
            SqlState::UndefinedColumn => "42703",
            SqlState::UndefinedTable => "42P01",
            SqlState::WrongObjectType => "42809",
            SqlState::InvalidForeignKey => "42830",
            SqlState::AmbiguousColumn => "42702",
            SqlState::InvalidObjectDefinition => "42P17",
            SqlState::InvalidTableDefinition => "42P16",
            SqlState::DuplicateObject => "42710",
            SqlState::FeatureNotSupported => "0A000",
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PocoError {
    // ---- target parsing and validation -------------------------------------------------
    #[error("invalid target URL: {0}")]
    BadUrl(String),
    #[error("target has no host")]
    NoHost,
    #[error("target host \"{0}\" is a Unix-domain socket path")]
    UnixSocket(String),
    #[error("target names several hosts")]
    SeveralHosts,
    #[error("invalid port \"{0}\" in target")]
    BadPort(String),
    #[error("invalid sslmode \"{0}\"")]
    BadSslMode(String),
    #[error("sslmode \"{0}\" may send data unencrypted")]
    PlaintextRefused(String),
    #[error("unsupported connection parameter \"{0}\"")]
    UnknownParameter(String),
    #[error("invalid value for connection parameter \"{0}\"")]
    BadParameterValue(String),
    #[error("target gives two different values for {0}")]
    Conflict(String),
    #[error("target has no user name")]
    NoUser,
    #[error("target host {0} is a {1} address")]
    PrivateAddress(String, &'static str),
    #[error("unknown key \"{0}\" in target object")]
    UnknownJsonKey(String),
    #[error("target object key \"{0}\" must be a string")]
    BadJsonValue(String),
    #[error("target must be a URL string or a JSON object")]
    BadJsonShape,

    #[error("{0} must not be NULL")]
    NullArgument(&'static str),

    // ---- key and crypto -----------------------------------------------------------------
    #[error("poco.key_file is not set")]
    NoKeyConfigured,
    #[error("could not read key file \"{0}\": {1}")]
    KeyFileUnreadable(String, String),
    #[error("key file \"{0}\" is accessible by group or others")]
    KeyFileMode(String),
    #[error("key file \"{0}\" does not hold a 32-byte key")]
    KeyFileFormat(String),
    #[error("stored credentials of target {0} were encrypted with another key (key id {1})")]
    WrongKey(i64, String),
    #[error("stored credentials of target {0} failed authentication")]
    Tampered(i64),

    // ---- catalog and state --------------------------------------------------------------
    #[error("target {0} does not exist")]
    NoSuchTarget(i64),
    #[error("poco_sync is not loaded through shared_preload_libraries")]
    NotPreloaded,
    #[error("could not connect to target {0}: {1}")]
    Connect(i64, String),
    // ---- account scope -------------------------------------------------------------------
    #[error("invalid root predicate: {0}")]
    ScopePredicate(String),
    /// A scope declaration error whose hint depends on the schema (candidate paths, names).
    #[error("{message}")]
    Scope {
        state: SqlState,
        message: String,
        hint: String,
    },
    #[error("{0}")]
    Internal(String),
}

impl PocoError {
    pub fn sqlstate(&self) -> SqlState {
        use PocoError::*;
        match self {
            BadUrl(_) | NoHost | UnixSocket(_) | SeveralHosts | BadPort(_) | BadSslMode(_)
            | PlaintextRefused(_) | UnknownParameter(_) | BadParameterValue(_) | Conflict(_)
            | NoUser | UnknownJsonKey(_) | BadJsonValue(_) | BadJsonShape => {
                SqlState::InvalidParameterValue
            }
            NullArgument(_) => SqlState::NullValueNotAllowed,
            PrivateAddress(..) => SqlState::InsufficientPrivilege,
            NoKeyConfigured => SqlState::ObjectNotInPrerequisiteState,
            KeyFileUnreadable(..) => SqlState::UndefinedFile,
            KeyFileMode(_) => SqlState::InsufficientPrivilege,
            KeyFileFormat(_) => SqlState::InvalidTextRepresentation,
            WrongKey(..) | Tampered(_) => SqlState::DataCorrupted,
            NoSuchTarget(_) => SqlState::UndefinedObject,
            NotPreloaded => SqlState::ObjectNotInPrerequisiteState,
            Connect(..) => SqlState::UnableToConnect,
            ScopePredicate(_) => SqlState::SyntaxError,
            Scope { state, .. } => *state,
            Internal(_) => SqlState::Internal,
        }
    }

    pub fn hint(&self) -> Option<String> {
        use PocoError::*;
        let h = match self {
            BadUrl(_) => "Use postgresql://user:password@host[:port]/dbname?sslmode=require, or a JSON object with DATABASE_URL or PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.",
            NoHost => "Give the learner server's host name, e.g. postgresql://user:pw@ep-example.us-east-2.aws.neon.tech/neondb.",
            UnixSocket(_) => "poco_sync connects to learner servers over TCP; give a host name or address.",
            SeveralHosts => "Give exactly one host; multi-host URLs are not supported.",
            BadPort(_) => "The port must be a number from 1 to 65535.",
            BadSslMode(_) => "Use sslmode=require, verify-ca or verify-full (disable only for private test servers).",
            PlaintextRefused(_) => "Use sslmode=require (the default), verify-ca or verify-full. Plaintext is only allowed when poco.allow_private_targets is on.",
            UnknownParameter(_) => "Supported parameters: sslmode, sslrootcert, sslsni, channel_binding, options, application_name, connect_timeout, target_session_attrs, user, password, dbname, port, host.",
            BadParameterValue(_) => "Check the parameter's value against the libpq documentation.",
            Conflict(_) => "Where both DATABASE_URL and a PG* key give a value, they must agree; drop one of them.",
            NoUser => "Put the user name in the URL (postgresql://user:password@host/db) or in PGUSER.",
            PrivateAddress(..) => "Learner databases must be reachable public servers. For development and tests set poco.allow_private_targets = on in postgresql.conf.",
            UnknownJsonKey(_) => "Allowed keys: DATABASE_URL, PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE.",
            BadJsonValue(_) => "Give every value as a JSON string (PGPORT may also be a number).",
            BadJsonShape => "Pass a URL as text or a JSON object such as {\"DATABASE_URL\": \"postgresql://...\"}.",
            NullArgument(_) => "Pass a value for every argument that has no default.",
            NoKeyConfigured => "Write a 32-byte key (64 hex digits or base64) to a file only the server's OS user can read, and set poco.key_file to its path in postgresql.conf.",
            KeyFileUnreadable(..) => "Check that poco.key_file names an existing file the PostgreSQL server's OS user can read.",
            KeyFileMode(_) => "Run chmod 0600 on the key file (owner: the PostgreSQL server's OS user).",
            KeyFileFormat(_) => "The key file must hold 32 raw bytes, 64 hex digits or 44 characters of base64, e.g. from: openssl rand -hex 32",
            WrongKey(..) => "poco.key_file points at a different key than the one this target was stored with; set it back, or run poco_rotate_key('<old key file>') to re-encrypt the targets under the current key.",
            Tampered(_) => "The stored ciphertext was altered or moved from another target. Remove the target and add it again.",
            NoSuchTarget(_) => "List the targets with: SELECT * FROM poco.targets;",
            NotPreloaded => "Add poco_sync to shared_preload_libraries in postgresql.conf and restart the server.",
            Connect(..) => "Check that the learner server is running and reachable, and that the user, password and database are right.",
            ScopePredicate(_) => "Give one boolean expression over the root table's columns that uses $1 for the parent id, e.g. 'id = $1 OR parent_id = $1'.",
            Scope { hint, .. } => return Some(hint.clone()),
            Internal(_) => return None,
        };
        Some(h.to_string())
    }
}

pub type Result<T, E = PocoError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_facing_error_has_a_hint_and_a_real_sqlstate() {
        let all = [
            PocoError::BadUrl("x".into()),
            PocoError::NoHost,
            PocoError::UnixSocket("/tmp".into()),
            PocoError::SeveralHosts,
            PocoError::BadPort("0".into()),
            PocoError::BadSslMode("x".into()),
            PocoError::PlaintextRefused("disable".into()),
            PocoError::UnknownParameter("x".into()),
            PocoError::BadParameterValue("x".into()),
            PocoError::Conflict("port".into()),
            PocoError::NoUser,
            PocoError::PrivateAddress("127.0.0.1".into(), "loopback"),
            PocoError::UnknownJsonKey("x".into()),
            PocoError::BadJsonValue("x".into()),
            PocoError::BadJsonShape,
            PocoError::NullArgument("parent_id"),
            PocoError::NoKeyConfigured,
            PocoError::KeyFileUnreadable("f".into(), "e".into()),
            PocoError::KeyFileMode("f".into()),
            PocoError::KeyFileFormat("f".into()),
            PocoError::WrongKey(1, "ab".into()),
            PocoError::Tampered(1),
            PocoError::NoSuchTarget(1),
            PocoError::NotPreloaded,
            PocoError::Connect(1, "refused".into()),
            PocoError::ScopePredicate("x".into()),
            PocoError::Scope {
                state: SqlState::InvalidForeignKey,
                message: "m".into(),
                hint: "h".into(),
            },
        ];
        for e in all {
            assert!(e.hint().is_some(), "{e:?} has no hint");
            assert_ne!(e.sqlstate().code(), "XX000", "{e:?} is an internal error");
            assert_eq!(e.sqlstate().code().len(), 5);
        }
        assert!(PocoError::NotPreloaded
            .hint()
            .unwrap()
            .contains("shared_preload_libraries"));
    }
}
