//! sqlx errors to [`StoreError`], in one place, and keeping the connection URL's
//! password out of every message.

use lanyard_store::StoreError;

/// SQLSTATEs that mean stored data is damaged (`data_corrupted`, `index_corrupted`).
const CORRUPTION: [&str; 2] = ["XX001", "XX002"];

/// Map a sqlx error. A unique violation becomes [`StoreError::Conflict`] with `what`.
pub(crate) fn map_err(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let what = what();
            StoreError::Conflict(if what.is_empty() {
                "duplicate key".into()
            } else {
                what
            })
        }
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| CORRUPTION.contains(&c.as_ref())) =>
        {
            StoreError::Corrupt(db.message().to_owned())
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::RowNotFound => StoreError::Corrupt(e.to_string()),
        sqlx::Error::Migrate(m) => map_migrate(*m),
        // Connection refused or lost, pool timed out, serialization failure, the
        // database gone...: the transaction did not commit, so nothing changed.
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

/// Connecting or migrating failed. Holds only text, with the password removed.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the postgres store: {0}")]
pub(crate) struct ConnectError(String);

/// Map an error from [`crate::PgStore::connect`], removing `url`'s password from the
/// message and dropping the source chain (which could repeat it).
///
/// ## Why
/// sqlx does not put the URL in its errors today, but a URL-parse or driver message
/// could quote it, and these errors end up in logs.
pub(crate) fn connect_err(e: StoreError, url: &str) -> StoreError {
    match e {
        StoreError::Unavailable(source) => {
            let mut text = source.to_string();
            let mut next = source.source();
            while let Some(cause) = next {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                next = cause.source();
            }
            StoreError::Unavailable(Box::new(ConnectError(redact(&text, url))))
        }
        StoreError::Corrupt(text) => StoreError::Corrupt(redact(&text, url)),
        StoreError::Conflict(text) => StoreError::Conflict(redact(&text, url)),
        StoreError::NotFound { what } => StoreError::NotFound {
            what: redact(&what, url),
        },
    }
}

/// `text` with every password in `url` (userinfo or `password=` parameter) replaced.
pub(crate) fn redact(text: &str, url: &str) -> String {
    let mut out = text.replace(url, "<connection url>");
    for secret in passwords(url) {
        if !secret.is_empty() {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

fn passwords(url: &str) -> Vec<&str> {
    let mut found = Vec::new();
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, _)) = rest
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default()
            .rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        found.push(password);
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some(("password", value)) = pair.split_once('=') {
                found.push(value);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let url = "postgres://app:hunter2@db.internal:5432/lanyard?sslmode=require&password=pw2";
        let text = format!("failed for {url}; saw hunter2 and pw2");
        let out = redact(&text, url);
        assert!(!out.contains("hunter2") && !out.contains("pw2"), "{out}");
        assert!(out.contains("<connection url>"));
        assert_eq!(redact("no secret", "postgres://u@h/db"), "no secret");
    }
}
