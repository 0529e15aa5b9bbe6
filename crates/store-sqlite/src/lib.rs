//! The SQLite implementation of [`lanyard_store::Store`]: one database file in WAL
//! mode, one writer connection, a small read pool, and the schema in `migrations/sqlite`.
//!
//! ## Why one writer
//! SQLite allows one writer at a time. With several writing connections, a second
//! writer that began its transaction as a reader fails with `SQLITE_BUSY` when it tries
//! to upgrade, whatever the busy timeout. A pool of exactly one write connection, with
//! every write transaction opened by `BEGIN IMMEDIATE`, queues writers in the pool
//! instead, so they never see `SQLITE_BUSY`. Readers use their own connections and, in
//! WAL mode, never wait for the writer.

/// The grant columns, in the order the insert binds them.
macro_rules! grant_columns {
    () => {
        "id, workload_id, issuer, trust_rule, task_id, destination, scopes, actor_chain, \
         issued_at, expires_at, status, finished_at, revocation_handle, renew_count"
    };
}

macro_rules! config_columns {
    () => {
        "kind, name, spec, revision, created_at, updated_at, updated_by"
    };
}

macro_rules! audit_columns {
    () => {
        "seq, time_ms, kind, payload, prev_hash, hash"
    };
}

mod error;
mod revocation;
mod rows;

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqlitePool, Transaction};

use lanyard_core::{GrantId, UnixTime};
use lanyard_store::{
    AuditRecord, ChainLink, ConfigKind, ConfigObject, DestinationProgress, GrantFilter,
    GrantRecord, GrantStatus, NewAuditEvent, NewConfigObject, NewRevocationJob, Page, PageRequest,
    Result, RevocationJob, RevocationReceiptRecord, RevocationStep, Store, StoreError,
    WorkloadSeen, link_after,
};

use crate::error::{corrupt, db, map_err, map_migrate};
use crate::rows::to_json_list;

/// How long a connection waits for SQLite's file lock (another process, a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a pooled connection before the store is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read connections. Reads are short; the machine this runs on has few cores.
const READERS: u32 = 4;
/// Page cache of the writer (`PRAGMA cache_size`, negative = KiB; grown on demand).
/// SQLite's default of 2 MiB makes a transaction that touches more pages than that
/// spill to the WAL before it commits: revoking 100,000 grants in one job took twice
/// as long with it.
const WRITER_CACHE: &str = "-65536";
/// Prepared statements the writer keeps. A group-commit batch of N grants is one
/// multi-row INSERT of N rows into each of two tables, a statement per batch size; with
/// sqlx's default of 100 the sizes up to `[store] max_batch` (128 by default) evicted
/// each other and SQLite re-parsed the INSERTs on most batches.
const WRITER_STATEMENTS: usize = 1024;
/// Page cache of each reader.
const READER_CACHE: &str = "-16384";

/// The migrations in `migrations/sqlite`, embedded at compile time.
///
/// ## Why not `sqlx::migrate!`
/// The macro needs sqlx's `macros` feature, which builds the SQLite and PostgreSQL
/// drivers a second time for the proc-macro host (about 100 CPU-seconds per cold build).
/// The list is short and a test fails if a file in the folder is missing from it. The
/// checksums are the ones `migrate!` would compute, so switching later is seamless.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "revocation",
        include_str!("../../../migrations/sqlite/0002_revocation.sql"),
    ),
    (
        3,
        "blocked",
        include_str!("../../../migrations/sqlite/0003_blocked.sql"),
    ),
];

fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(sql),
                    false,
                )
            })
            .collect(),
    )
}

/// A [`Store`] on one SQLite database file. Cheap to clone; clones share the pools.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
    /// Keeps the directory of an [`SqliteStore::open_memory`] store alive.
    _temp_dir: Option<Arc<tempfile::TempDir>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The database file could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create database file {}", path.display())]
struct CreateFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

// === impl SqliteStore ===

impl SqliteStore {
    /// Open (creating it if needed) the database at `path` and apply any pending
    /// migrations. A new file is created with mode 0600 on unix; SQLite gives its `-wal`
    /// and `-shm` files the same mode. Commits are durable (`synchronous=FULL`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the file cannot be created or opened;
    /// [`StoreError::Corrupt`] if it is not a lanyard database this version understands.
    pub async fn open(path: &Path) -> Result<Self> {
        create_private(path)?;
        Self::open_file(path, SqliteSynchronous::Full, None).await
    }

    /// A throwaway store for tests, deleted when the last clone is dropped.
    ///
    /// ## Why a temporary file and not `:memory:`
    /// A shared-cache in-memory database locks whole tables and reports conflicts as
    /// `SQLITE_LOCKED`, which the busy timeout does not cover; it would behave unlike the
    /// real store under concurrency. A file in a temporary directory, with
    /// `synchronous=OFF` since durability does not matter here, runs exactly the code
    /// paths [`SqliteStore::open`] does, with several connections.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the temporary directory cannot be created.
    pub async fn open_memory() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("lanyard-sqlite-")
            .tempdir()
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let path = dir.path().join("lanyard.db");
        create_private(&path)?;
        Self::open_file(&path, SqliteSynchronous::Off, Some(Arc::new(dir))).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close every connection, waiting for them to finish.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn open_file(
        path: &Path,
        synchronous: SqliteSynchronous,
        temp_dir: Option<Arc<tempfile::TempDir>>,
    ) -> Result<Self> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(synchronous);
        // WAL is a property of the file: the writer sets it once, readers inherit it.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(
                base.clone()
                    .journal_mode(SqliteJournalMode::Wal)
                    .pragma("cache_size", WRITER_CACHE)
                    .statement_cache_capacity(WRITER_STATEMENTS),
            )
            .await
            .map_err(db)?;
        migrator().run(&writer).await.map_err(map_migrate)?;
        tracing::debug!(path = %path.display(), "sqlite store migrated");
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(base.read_only(true).pragma("cache_size", READER_CACHE))
            .await
            .map_err(db)?;
        Ok(Self {
            writer,
            reader,
            path: path.to_owned(),
            _temp_dir: temp_dir,
        })
    }

    /// Start a write transaction. `BEGIN IMMEDIATE` takes the write lock up front, so
    /// the transaction never has to upgrade a read lock (which is what fails with
    /// `SQLITE_BUSY`).
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }
}

/// Create the file if it does not exist, readable by its owner only.
fn create_private(path: &Path) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(drop).map_err(|source| {
        StoreError::Unavailable(Box::new(CreateFileError {
            path: path.to_owned(),
            source,
        }))
    })
}

/// The writer connection of one batch, closed (not returned to the pool) unless the
/// batch committed. `insert_batch` opens its transaction with raw SQL, which sqlx does
/// not track: after a failure (an `OR ROLLBACK` may or may not have ended it), or when
/// the caller's future is dropped part-way, the connection could still be inside a
/// transaction holding the write lock. Closing it makes SQLite roll that back.
struct BatchConn {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    finished: bool,
}

impl Drop for BatchConn {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

/// Insert a batch of grants and their audit events in one transaction on `conn`.
///
/// Two calls to sqlx's SQLite worker thread, whatever the batch size: one takes the
/// write lock and reads the audit chain head, the other runs every INSERT, moves the
/// head and commits, as one multi-statement query. Each call is a hand-off between the
/// committer task and the worker thread, and while the writer waits for one, no other
/// batch can commit: with six calls per batch (begin, grants, head, events, head,
/// commit) the commit cycle, not the CPU, set the pace at 128 clients.
///
/// On any error the caller closes the connection (the transaction is then rolled back
/// by SQLite), so a failure part-way through leaves nothing behind.
async fn insert_batch(
    conn: &mut SqliteConnection,
    grants: &[GrantRecord],
    events: &[NewAuditEvent],
) -> Result<Vec<i64>> {
    let head = sqlx::query("BEGIN IMMEDIATE; SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let chain = Chain::after(&head, events)?;
    let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("");
    // Multi-row INSERTs. OR ROLLBACK: a constraint failure ends the whole transaction
    // (which is what the caller gets anyway), so SQLite keeps no statement journal for
    // these multi-row statements. That journal cost about 11 µs per grant.
    for chunk in grants.chunks(INSERT_CHUNK) {
        qb.push(concat!(
            "INSERT OR ROLLBACK INTO grants (",
            grant_columns!(),
            ") "
        ));
        qb.push_values(chunk, |mut b, g| {
            b.push_bind(g.id.as_str().to_owned())
                .push_bind(g.workload_id.clone())
                .push_bind(g.issuer.clone())
                .push_bind(g.trust_rule.clone())
                .push_bind(g.task_id.clone())
                .push_bind(g.destination.clone())
                .push_bind(to_json_list(&g.scopes))
                .push_bind(to_json_list(&g.actor_chain))
                .push_bind(g.issued_at)
                .push_bind(g.expires_at)
                .push_bind(g.status.as_str())
                .push_bind(g.finished_at)
                .push_bind(g.revocation_handle.clone())
                .push_bind(g.renew_count);
        });
        qb.push("; ");
    }
    let first_seq = chain.first_seq();
    let seqs = chain.push_inserts(&mut qb);
    qb.push("COMMIT");
    qb.build().execute(&mut *conn).await.map_err(|e| {
        let events_conflict = matches!(
            &e,
            sqlx::Error::Database(d) if d.message().contains("audit_events")
        );
        map_err(e, || {
            if events_conflict {
                format!("audit event {first_seq} already exists")
            } else {
                format!(
                    "a grant in this batch already exists ({} grants)",
                    grants.len()
                )
            }
        })
    })?;
    Ok(seqs)
}

/// Rows per multi-row INSERT (14 columns each stays far below SQLite's 32766 variables).
const INSERT_CHUNK: usize = 256;

/// Audit events linked into the chain after a head ([`link_after`]), with their kinds
/// and times, ready to insert.
struct Chain {
    rows: Vec<(ChainLink, i64, String)>,
}

impl Chain {
    /// Link `events` after the head in `head` (a row of `seq, hash`).
    fn after(head: &sqlx::sqlite::SqliteRow, events: &[NewAuditEvent]) -> Result<Self> {
        let seq: i64 = head.try_get("seq").map_err(db)?;
        let hash: String = head.try_get("hash").map_err(db)?;
        let links = link_after(seq, hash, events)?;
        Ok(Self {
            rows: links
                .into_iter()
                .zip(events)
                .map(|(l, e)| (l, e.time_ms, e.kind.clone()))
                .collect(),
        })
    }

    /// The first event's sequence number (0 when there are none), for error messages.
    fn first_seq(&self) -> i64 {
        self.rows.first().map_or(0, |(link, _, _)| link.seq)
    }

    /// Append the INSERTs of the rows and the head update to `qb`, each statement ended
    /// with `; `, moving the rows' text into the query. Nothing when there are no
    /// events. Returns the events' sequence numbers.
    fn push_inserts(self, qb: &mut sqlx::QueryBuilder<sqlx::Sqlite>) -> Vec<i64> {
        let rows = self.rows;
        let seqs = rows.iter().map(|(link, _, _)| link.seq).collect();
        let Some((head, _, _)) = rows.last() else {
            return seqs;
        };
        let (head_seq, head_hash) = (head.seq, head.hash.clone());
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            qb.push(
                "INSERT OR ROLLBACK INTO audit_events (seq, time_ms, kind, payload, prev_hash, hash) ",
            );
            qb.push_values(
                rows.by_ref().take(INSERT_CHUNK),
                |mut b, (link, time_ms, kind)| {
                    b.push_bind(link.seq)
                        .push_bind(time_ms)
                        .push_bind(kind)
                        .push_bind(link.payload)
                        .push_bind(link.prev_hash)
                        .push_bind(link.hash);
                },
            );
            qb.push("; ");
        }
        qb.push("UPDATE audit_head SET seq = ");
        qb.push_bind(head_seq);
        qb.push(", hash = ");
        qb.push_bind(head_hash);
        qb.push(" WHERE id = 1; ");
        seqs
    }
}

/// Append `events` after the chain head and move the head, inside the caller's
/// transaction. Returns the sequence numbers given to the events.
pub(crate) async fn append_events(
    conn: &mut SqliteConnection,
    events: &[NewAuditEvent],
) -> Result<Vec<i64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let chain = Chain::after(&head, events)?;
    let first_seq = chain.first_seq();
    let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("");
    let seqs = chain.push_inserts(&mut qb);
    qb.build()
        .execute(&mut *conn)
        .await
        .map_err(|e| map_err(e, || format!("audit event {first_seq} already exists")))?;
    Ok(seqs)
}

/// Bump the configuration generation; returns the new value.
async fn bump_generation(conn: &mut SqliteConnection) -> Result<i64> {
    let row =
        sqlx::query("UPDATE config_generation SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    row.try_get("value").map_err(db)
}

/// Write a configuration object (insert or replace) and bump the generation, inside the
/// caller's transaction. Returns the new revision and the object's creation time.
pub(crate) async fn upsert_config(
    conn: &mut SqliteConnection,
    obj: &NewConfigObject,
) -> Result<(i64, i64)> {
    let spec = serde_json::to_string(&obj.spec).map_err(|e| corrupt("config spec", e))?;
    let revision = bump_generation(&mut *conn).await?;
    let row = sqlx::query(
        "INSERT INTO config_objects \
             (kind, name, spec, revision, created_at, updated_at, updated_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6) \
         ON CONFLICT (kind, name) DO UPDATE SET \
             spec = excluded.spec, revision = excluded.revision, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by \
         RETURNING created_at",
    )
    .bind(obj.kind.as_str())
    .bind(&obj.name)
    .bind(&spec)
    .bind(revision)
    .bind(obj.now)
    .bind(&obj.updated_by)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    Ok((revision, row.try_get("created_at").map_err(db)?))
}

/// Whether a put with `expected` may replace an object now at `current`.
fn check_revision(
    kind: ConfigKind,
    name: &str,
    current: Option<i64>,
    expected: Option<i64>,
) -> Result<()> {
    let kind = kind.as_str();
    match (expected, current) {
        (None, _) | (Some(0), None) => Ok(()),
        (Some(want), Some(have)) if want == have => Ok(()),
        (Some(0), Some(have)) => Err(StoreError::Conflict(format!(
            "{kind} {name:?} already exists (revision {have})"
        ))),
        (Some(want), None) => Err(StoreError::Conflict(format!(
            "{kind} {name:?} does not exist (expected revision {want})"
        ))),
        (Some(want), Some(have)) => Err(StoreError::Conflict(format!(
            "{kind} {name:?} is at revision {have}, not {want}"
        ))),
    }
}

/// `NotFound` if the grant does not exist, else `Conflict` with `why`.
async fn missing_or_conflict(conn: &mut SqliteConnection, id: &GrantId, why: &str) -> StoreError {
    let exists = sqlx::query("SELECT 1 FROM grants WHERE id = ?1")
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await;
    match exists {
        Ok(Some(_)) => StoreError::Conflict(format!("grant {id} {why}")),
        Ok(None) => StoreError::NotFound {
            what: format!("grant {id}"),
        },
        Err(e) => db(e),
    }
}

/// Append `clause` to a query under construction, numbering its `?` after the values
/// already bound.
fn push_clause<'a>(sql: &mut String, args: &mut Vec<&'a str>, clause: &str, value: &'a str) {
    args.push(value);
    sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
}

fn limit_i64(limit: u32) -> i64 {
    i64::from(limit)
}

// === impl Store for SqliteStore ===

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn config_put(
        &self,
        obj: NewConfigObject,
        expected_revision: Option<i64>,
        audit: NewAuditEvent,
    ) -> Result<ConfigObject> {
        let mut tx = self.begin().await?;
        let current =
            sqlx::query("SELECT revision FROM config_objects WHERE kind = ?1 AND name = ?2")
                .bind(obj.kind.as_str())
                .bind(&obj.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .map(|row| row.try_get::<i64, _>("revision"))
                .transpose()
                .map_err(db)?;
        check_revision(obj.kind, &obj.name, current, expected_revision)?;
        let (revision, created_at) = upsert_config(&mut tx, &obj).await?;
        append_events(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db)?;
        Ok(ConfigObject {
            kind: obj.kind,
            name: obj.name,
            spec: obj.spec,
            revision,
            created_at,
            updated_at: obj.now,
            updated_by: obj.updated_by,
        })
    }

    async fn config_get(&self, kind: ConfigKind, name: &str) -> Result<Option<ConfigObject>> {
        const SQL: &str = concat!(
            "SELECT ",
            config_columns!(),
            " FROM config_objects WHERE kind = ?1 AND name = ?2"
        );
        let row = sqlx::query(SQL)
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::config).transpose()
    }

    async fn config_list(&self, kind: ConfigKind) -> Result<Vec<ConfigObject>> {
        const SQL: &str = concat!(
            "SELECT ",
            config_columns!(),
            " FROM config_objects WHERE kind = ?1 ORDER BY name"
        );
        let rows = sqlx::query(SQL)
            .bind(kind.as_str())
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(rows::config).collect()
    }

    async fn config_delete(
        &self,
        kind: ConfigKind,
        name: &str,
        audit: NewAuditEvent,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let deleted = sqlx::query("DELETE FROM config_objects WHERE kind = ?1 AND name = ?2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound {
                what: format!("{} {name:?}", kind.as_str()),
            });
        }
        bump_generation(&mut tx).await?;
        append_events(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db)
    }

    async fn config_generation(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM config_generation WHERE id = 1")
            .fetch_one(&self.reader)
            .await
            .map_err(db)?;
        row.try_get("value").map_err(db)
    }

    async fn grant_insert_batch(
        &self,
        grants: &[GrantRecord],
        events: &[NewAuditEvent],
    ) -> Result<Vec<i64>> {
        if grants.is_empty() && events.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = BatchConn {
            conn: self.writer.acquire().await.map_err(db)?,
            finished: false,
        };
        let result = insert_batch(&mut batch.conn, grants, events).await;
        batch.finished = result.is_ok();
        result
    }

    async fn grant_get(&self, id: &GrantId) -> Result<Option<GrantRecord>> {
        const SQL: &str = concat!("SELECT ", grant_columns!(), " FROM grants WHERE id = ?1");
        let row = sqlx::query(SQL)
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::grant).transpose()
    }

    async fn grant_list(
        &self,
        filter: &GrantFilter,
        page: &PageRequest,
    ) -> Result<Page<GrantRecord>> {
        let limit = page.effective_limit();
        let mut sql = String::from(concat!(
            "SELECT ",
            grant_columns!(),
            " FROM grants WHERE 1 = 1"
        ));
        let mut args: Vec<&str> = Vec::new();
        let mut add = |clause: &str, value| push_clause(&mut sql, &mut args, clause, value);
        if let Some(v) = &filter.workload_id {
            add(" AND workload_id = ?", v);
        }
        if let Some(v) = &filter.workload_prefix {
            // Not LIKE: `_` and `%` are common in IDs, and LIKE ignores ASCII case.
            add(" AND substr(workload_id, 1, length(?)) = ?", v);
        }
        if let Some(v) = &filter.issuer {
            add(" AND issuer = ?", v);
        }
        if let Some(v) = &filter.destination {
            add(" AND destination = ?", v);
        }
        if let Some(v) = &filter.task_id {
            add(" AND task_id = ?", v);
        }
        if let Some(v) = filter.status {
            add(" AND status = ?", v.as_str());
        }
        if let Some(v) = &page.cursor {
            add(" AND id < ?", v);
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len() + 1));
        // The text is assembled from the fixed fragments above; values are bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for arg in args {
            query = query.bind(arg);
        }
        let rows = query
            .bind(limit_i64(limit) + 1)
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        let mut items = rows.iter().map(rows::grant).collect::<Result<Vec<_>>>()?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|g| g.id.to_string())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn grant_renew(
        &self,
        id: &GrantId,
        now: UnixTime,
        new_expires_at: UnixTime,
        new_revocation_handle: &str,
        audit: NewAuditEvent,
    ) -> Result<GrantRecord> {
        const SQL: &str = concat!(
            "UPDATE grants \
             SET expires_at = ?3, revocation_handle = ?4, renew_count = renew_count + 1 \
             WHERE id = ?1 AND status = 'active' AND expires_at > ?2 \
             RETURNING ",
            grant_columns!()
        );
        let mut tx = self.begin().await?;
        let row = sqlx::query(SQL)
            .bind(id.as_str())
            .bind(now)
            .bind(new_expires_at)
            .bind(new_revocation_handle)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(missing_or_conflict(&mut tx, id, "is not active").await);
        };
        let grant = rows::grant(&row)?;
        append_events(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db)?;
        Ok(grant)
    }

    async fn grant_finish(
        &self,
        id: &GrantId,
        to: GrantStatus,
        now: UnixTime,
        audit: NewAuditEvent,
    ) -> Result<GrantRecord> {
        const SQL: &str = concat!(
            "UPDATE grants SET status = ?2, finished_at = ?3 \
             WHERE id = ?1 AND status = 'active' \
             RETURNING ",
            grant_columns!()
        );
        if !matches!(to, GrantStatus::Released | GrantStatus::Revoked) {
            return Err(StoreError::Conflict(format!(
                "a grant can only be finished as released or revoked, not {}",
                to.as_str()
            )));
        }
        let mut tx = self.begin().await?;
        let row = sqlx::query(SQL)
            .bind(id.as_str())
            .bind(to.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(missing_or_conflict(&mut tx, id, "is not active").await);
        };
        let grant = rows::grant(&row)?;
        append_events(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db)?;
        Ok(grant)
    }

    async fn grant_expire_due(&self, now: UnixTime, limit: u32, keep: &[String]) -> Result<u64> {
        // `finished_at` is when the grant stopped being valid, not when the sweep ran.
        let done = sqlx::query(
            "UPDATE grants SET status = 'expired', finished_at = expires_at \
             WHERE id IN (SELECT id FROM grants \
                          WHERE status = 'active' AND expires_at <= ?1 \
                            AND destination NOT IN (SELECT value FROM json_each(?3)) \
                          ORDER BY expires_at LIMIT ?2)",
        )
        .bind(now)
        .bind(limit_i64(limit))
        .bind(to_json_list(keep))
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn grant_count_active(&self, workload: Option<&str>, now: UnixTime) -> Result<u64> {
        // `status = 'active'` is a literal so the partial expiry index applies.
        let query = match workload {
            None => sqlx::query(
                "SELECT COUNT(*) AS n FROM grants WHERE status = 'active' AND expires_at > ?1",
            )
            .bind(now),
            Some(w) => sqlx::query(
                "SELECT COUNT(*) AS n FROM grants \
                 WHERE workload_id = ?2 AND status = 'active' AND expires_at > ?1",
            )
            .bind(now)
            .bind(w),
        };
        let row = query.fetch_one(&self.reader).await.map_err(db)?;
        rows::count(row.try_get("n").map_err(db)?)
    }

    async fn jti_record(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: UnixTime,
        now: UnixTime,
    ) -> Result<bool> {
        // One statement: insert, or take over a record that has expired. RETURNING
        // yields a row only if one of the two happened.
        let row = sqlx::query(
            "INSERT INTO seen_jti (issuer, jti, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at \
             WHERE seen_jti.expires_at <= ?4 \
             RETURNING 1 AS fresh",
        )
        .bind(issuer)
        .bind(jti)
        .bind(expires_at)
        .bind(now)
        .fetch_optional(&self.writer)
        .await
        .map_err(db)?;
        Ok(row.is_some())
    }

    async fn jti_purge(&self, now: UnixTime, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM seen_jti WHERE rowid IN \
             (SELECT rowid FROM seen_jti WHERE expires_at <= ?1 LIMIT ?2)",
        )
        .bind(now)
        .bind(limit_i64(limit))
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn audit_append(&self, events: &[NewAuditEvent]) -> Result<Vec<i64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let seqs = append_events(&mut tx, events).await?;
        tx.commit().await.map_err(db)?;
        Ok(seqs)
    }

    async fn audit_list(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        const SQL: &str = concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        );
        let rows = sqlx::query(SQL)
            .bind(after)
            .bind(limit_i64(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(rows::audit).collect()
    }

    async fn audit_head(&self) -> Result<(i64, String)> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.reader)
            .await
            .map_err(db)?;
        Ok((
            row.try_get("seq").map_err(db)?,
            row.try_get("hash").map_err(db)?,
        ))
    }

    async fn workload_seen(&self, seen: &[WorkloadSeen]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for w in seen {
            sqlx::query(
                "INSERT INTO workloads \
                     (workload_id, issuer, trust_rule, claims, first_seen, last_seen) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (workload_id) DO UPDATE SET issuer = excluded.issuer, \
                     trust_rule = excluded.trust_rule, claims = excluded.claims, \
                     last_seen = excluded.last_seen",
            )
            .bind(&w.workload_id)
            .bind(&w.issuer)
            .bind(&w.trust_rule)
            .bind(serde_json::to_string(&w.claims).map_err(|e| corrupt("workload claims", e))?)
            .bind(w.first_seen)
            .bind(w.last_seen)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn workload_get(&self, workload_id: &str) -> Result<Option<WorkloadSeen>> {
        let row = sqlx::query(
            "SELECT workload_id, issuer, trust_rule, claims, first_seen, last_seen \
             FROM workloads WHERE workload_id = ?1",
        )
        .bind(workload_id)
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get("claims").map_err(db)?;
        let claims = serde_json::from_str(&text).map_err(|e| corrupt("workload claims", e))?;
        Ok(Some(WorkloadSeen {
            workload_id: row.try_get("workload_id").map_err(db)?,
            issuer: row.try_get("issuer").map_err(db)?,
            trust_rule: row.try_get("trust_rule").map_err(db)?,
            claims,
            first_seen: row.try_get("first_seen").map_err(db)?,
            last_seen: row.try_get("last_seen").map_err(db)?,
        }))
    }

    async fn revocation_create(
        &self,
        job: &NewRevocationJob,
        deny: Option<NewConfigObject>,
        audit: NewAuditEvent,
    ) -> Result<RevocationJob> {
        let mut tx = self.begin().await?;
        let created = revocation::create(&mut tx, job, deny, audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(created)
    }

    async fn revocation_get(&self, id: &str) -> Result<Option<RevocationJob>> {
        revocation::get(&self.reader, id).await
    }

    async fn revocation_list(&self, page: &PageRequest) -> Result<Page<RevocationJob>> {
        revocation::list(&self.reader, page).await
    }

    async fn revocation_progress(&self, job_id: &str) -> Result<Vec<DestinationProgress>> {
        revocation::progress(&self.reader, job_id).await
    }

    async fn revocation_destinations(&self, job_id: &str) -> Result<Vec<String>> {
        // A loose index scan: the next destination after each, from the primary key.
        let rows = sqlx::query(
            "WITH RECURSIVE d(dest) AS ( \
                 SELECT (SELECT destination FROM revocation_steps WHERE job_id = ?1 \
                         ORDER BY destination LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT destination FROM revocation_steps \
                         WHERE job_id = ?1 AND destination > d.dest \
                         ORDER BY destination LIMIT 1) \
                 FROM d WHERE d.dest IS NOT NULL) \
             SELECT dest FROM d WHERE dest IS NOT NULL",
        )
        .bind(job_id)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("dest").map_err(db))
            .collect()
    }

    async fn revocation_claim(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Option<RevocationJob>> {
        revocation::claim(&self.writer, owner, now_ms, lease_until_ms).await
    }

    async fn revocation_steps_due(
        &self,
        job_id: &str,
        destination: &str,
        now_ms: i64,
        after_grant: &str,
        limit: u32,
    ) -> Result<Vec<RevocationStep>> {
        revocation::steps_due(
            &self.reader,
            job_id,
            destination,
            now_ms,
            after_grant,
            limit,
        )
        .await
    }

    async fn revocation_record(
        &self,
        owner: &str,
        job_id: &str,
        lease_until_ms: i64,
        receipts: &[RevocationReceiptRecord],
        events: &[NewAuditEvent],
    ) -> Result<Vec<i64>> {
        let mut tx = self.begin().await?;
        let seqs =
            revocation::record(&mut tx, owner, job_id, lease_until_ms, receipts, events).await?;
        tx.commit().await.map_err(db)?;
        Ok(seqs)
    }

    async fn revocation_defer(
        &self,
        owner: &str,
        job_id: &str,
        destination: &str,
        grant_ids: &[String],
        retry_at_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        revocation::defer(&mut tx, owner, job_id, destination, grant_ids, retry_at_ms).await?;
        tx.commit().await.map_err(db)
    }

    async fn revocation_abandon(
        &self,
        job_id: &str,
        destination: Option<&str>,
        now_ms: i64,
        audit: NewAuditEvent,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = revocation::abandon(&mut tx, job_id, destination, now_ms, audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(n)
    }

    async fn revocation_sweep(&self, owner: &str, job_id: &str, now: UnixTime) -> Result<u64> {
        let mut tx = self.begin().await?;
        let added = revocation::sweep(&mut tx, owner, job_id, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(added)
    }

    async fn revocation_release(
        &self,
        owner: &str,
        job_id: &str,
        now_ms: i64,
        done_event: NewAuditEvent,
    ) -> Result<RevocationJob> {
        let mut tx = self.begin().await?;
        let job = revocation::release(&mut tx, owner, job_id, now_ms, done_event).await?;
        tx.commit().await.map_err(db)?;
        Ok(job)
    }

    async fn revocation_receipts(
        &self,
        job_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<RevocationReceiptRecord>> {
        revocation::receipts(&self.reader, job_id, after_seq, limit).await
    }

    async fn revocation_queue_depth(&self) -> Result<u64> {
        revocation::queue_depth(&self.reader).await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(db)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `migrations/sqlite` is embedded, with the version and description
    /// `sqlx::migrate!` would give it.
    #[test]
    fn every_migration_file_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/sqlite");
        let mut files: Vec<(i64, String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .map(|p| {
                let stem = p.file_stem().unwrap().to_str().unwrap().to_owned();
                let (version, description) = stem.split_once('_').unwrap();
                let sql = std::fs::read_to_string(&p).unwrap();
                (version.parse().unwrap(), description.replace('_', " "), sql)
            })
            .collect();
        files.sort();
        let embedded: Vec<_> = MIGRATIONS
            .iter()
            .map(|&(v, d, sql)| (v, d.to_owned(), sql.to_owned()))
            .collect();
        assert_eq!(embedded, files);
    }
}
