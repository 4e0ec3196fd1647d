//! Raise a `PocoError` as a PostgreSQL ERROR with its SQLSTATE, message and hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use poco_core::{PocoError, SqlState};

fn code(s: SqlState) -> PgSqlErrorCode {
    use PgSqlErrorCode::*;
    match s {
        SqlState::InvalidParameterValue => ERRCODE_INVALID_PARAMETER_VALUE,
        SqlState::NullValueNotAllowed => ERRCODE_NULL_VALUE_NOT_ALLOWED,
        SqlState::InvalidTextRepresentation => ERRCODE_INVALID_TEXT_REPRESENTATION,
        SqlState::InsufficientPrivilege => ERRCODE_INSUFFICIENT_PRIVILEGE,
        SqlState::UndefinedObject => ERRCODE_UNDEFINED_OBJECT,
        SqlState::ObjectNotInPrerequisiteState => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        SqlState::UndefinedFile => ERRCODE_UNDEFINED_FILE,
        SqlState::IoError => ERRCODE_IO_ERROR,
        SqlState::DataCorrupted => ERRCODE_DATA_CORRUPTED,
        SqlState::UnableToConnect => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        SqlState::ConnectionFailure => ERRCODE_CONNECTION_FAILURE,
        SqlState::QueryCanceled => ERRCODE_QUERY_CANCELED,
        SqlState::Internal => ERRCODE_INTERNAL_ERROR,
        SqlState::SyntaxError => ERRCODE_SYNTAX_ERROR,
        SqlState::UndefinedColumn => ERRCODE_UNDEFINED_COLUMN,
        SqlState::UndefinedTable => ERRCODE_UNDEFINED_TABLE,
        SqlState::WrongObjectType => ERRCODE_WRONG_OBJECT_TYPE,
        SqlState::InvalidForeignKey => ERRCODE_INVALID_FOREIGN_KEY,
        SqlState::AmbiguousColumn => ERRCODE_AMBIGUOUS_COLUMN,
        SqlState::InvalidObjectDefinition => ERRCODE_INVALID_OBJECT_DEFINITION,
        SqlState::InvalidTableDefinition => ERRCODE_INVALID_TABLE_DEFINITION,
        SqlState::DuplicateObject => ERRCODE_DUPLICATE_OBJECT,
        SqlState::FeatureNotSupported => ERRCODE_FEATURE_NOT_SUPPORTED,
    }
}

/// Build the report for `e` (messages in `PocoError` never carry secrets).
pub fn report_of(e: &PocoError) -> ErrorReport {
    let mut r = ErrorReport::new(code(e.sqlstate()), e.to_string(), "poco_sync");
    if let Some(h) = e.hint() {
        r = r.set_hint(h);
    }
    r
}

/// Raise `e` as an ERROR; does not return.
pub fn raise(e: PocoError) -> ! {
    report_of(&e).report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, PocoError> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| raise(e))
    }
}

impl<T> OrRaise<T> for Result<T, pgrx::spi::Error> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| raise(PocoError::Internal(format!("SPI: {e}"))))
    }
}
