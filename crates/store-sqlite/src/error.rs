//! sqlx errors to [`StoreError`], in one place.

use lanyard_store::StoreError;
use sqlx::error::DatabaseError;

/// SQLite primary result codes that mean the file itself is damaged.
const SQLITE_CORRUPT: i64 = 11;
const SQLITE_NOTADB: i64 = 26;

/// Map a sqlx error. A unique violation becomes [`StoreError::Conflict`] with `what`
/// (e.g. `grant grt_... already exists`); callers that cannot hit one pass `""`.
pub(crate) fn map_err(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(non_empty(what(), "duplicate key"))
        }
        sqlx::Error::Database(db) if is_corruption(db.as_ref()) => {
            StoreError::Corrupt(db.message().to_owned())
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::RowNotFound => StoreError::Corrupt(e.to_string()),
        sqlx::Error::Migrate(m) => map_migrate(*m),
        // Busy, I/O, disk full, pool closed or timed out, a crashed worker thread...:
        // the transaction did not commit, so nothing changed.
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// Map an error where no unique violation is possible.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    map_err(e, String::new)
}

/// Map a migration error: a database changed behind the migrator's back (edited or
/// newer migrations) is [`StoreError::Corrupt`], anything else is unavailability.
pub(crate) fn map_migrate(e: sqlx::migrate::MigrateError) -> StoreError {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::VersionMismatch(_) | M::VersionMissing(_) | M::Dirty(_) | M::VersionTooOld(..) => {
            StoreError::Corrupt(format!("migrations: {e}"))
        }
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// A value read from the database that does not decode.
pub(crate) fn corrupt(what: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn is_corruption(db: &dyn DatabaseError) -> bool {
    db.code()
        .and_then(|c| c.parse::<i64>().ok())
        .is_some_and(|c| matches!(c & 0xff, SQLITE_CORRUPT | SQLITE_NOTADB))
}

fn non_empty(s: String, default: &str) -> String {
    if s.is_empty() { default.to_owned() } else { s }
}
