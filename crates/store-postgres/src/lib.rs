//! The PostgreSQL implementation of [`lanyard_store::Store`], safe for several lanyard
//! replicas sharing one database; the schema lives in `migrations/postgres`.
//!
//! ## Why it is safe with several replicas
//! - The audit chain has one head row. Every change locks it (`SELECT ... FOR UPDATE`)
//!   in the transaction that makes the change, as its last step before commit, so
//!   appends from every replica form one line and the lock is held only briefly.
//! - Configuration writes first bump the one-row generation counter, which locks it;
//!   so the `expected_revision` check and the write that follows it cannot interleave
//!   with another configuration write.
//! - Grant state changes are single `UPDATE ... WHERE status = 'active' ... RETURNING`
//!   statements: a concurrent change makes the second one match nothing.
//! - The replay cache is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE` statement.
//! - Lock order is always: generation row, data rows, audit head. No cycles, no
//!   deadlocks.

mod error;
mod revocation;
mod rows;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};

use lanyard_core::{GrantId, UnixTime};
use lanyard_store::{
    AuditRecord, ConfigKind, ConfigObject, DestinationProgress, GrantFilter, GrantRecord,
    GrantStatus, NewAuditEvent, NewConfigObject, NewRevocationJob, Page, PageRequest, Result,
    RevocationJob, RevocationReceiptRecord, RevocationStep, Store, StoreError, WorkloadSeen,
    link_after,
};

use crate::error::{connect_err, db, map_err, map_migrate};
use crate::rows::to_json_list;

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

/// How long a caller waits for a pooled connection (or a new one while the database is
/// restarting) before the store reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The migrations in `migrations/postgres`, embedded at compile time.
///
/// ## Why not `sqlx::migrate!`
/// The macro needs sqlx's `macros` feature, which builds the SQLite and PostgreSQL
/// drivers a second time for the proc-macro host (about 100 CPU-seconds per cold build).
/// The list is short and a test fails if a file in the folder is missing from it. The
/// checksums are the ones `migrate!` would compute, so switching later is seamless.
/// The migrator takes an advisory lock, so replicas starting together migrate once.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "revocation",
        include_str!("../../../migrations/postgres/0002_revocation.sql"),
    ),
    (
        3,
        "blocked",
        include_str!("../../../migrations/postgres/0003_blocked.sql"),
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

/// A [`Store`] on a PostgreSQL database. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl fmt::Debug for PgStore {
    // Not derived: the pool's connect options hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

// === impl PgStore ===

impl PgStore {
    /// Connect to `url` (`postgres://user:password@host:port/database?sslmode=...`) with
    /// a pool of up to `max_connections` (at least 1), and apply pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the database cannot be reached or the URL is
    /// invalid; [`StoreError::Corrupt`] if its schema has migrations this version does
    /// not know or that were edited. Messages never contain the password.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        Self::connect_inner(url, max_connections)
            .await
            .map_err(|e| connect_err(e, url))
    }

    async fn connect_inner(url: &str, max_connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(db)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(db)?;
        migrator().run(&pool).await.map_err(map_migrate)?;
        tracing::debug!("postgres store migrated");
        Ok(Self { pool })
    }

    /// Close every connection, waiting for them to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db)
    }
}

/// Append `events` after the chain head and move the head, inside the caller's
/// transaction. Returns the sequence numbers given to the events.
///
/// Call it last in the transaction: the head lock serializes every writer of every
/// replica until commit.
pub(crate) async fn append_events(
    conn: &mut PgConnection,
    events: &[NewAuditEvent],
) -> Result<Vec<i64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let seq: i64 = head.try_get("seq").map_err(db)?;
    let hash: String = head.try_get("hash").map_err(db)?;
    let links = link_after(seq, hash, events)?;
    let n = links.len();
    let (mut seqs, mut times, mut kinds, mut payloads, mut prevs, mut hashes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (link, event) in links.into_iter().zip(events) {
        seqs.push(link.seq);
        times.push(event.time_ms);
        kinds.push(event.kind.as_str());
        payloads.push(link.payload);
        prevs.push(link.prev_hash);
        hashes.push(link.hash);
    }
    // One statement for the whole batch: one round trip however many events.
    sqlx::query(
        "INSERT INTO audit_events (seq, time_ms, kind, payload, prev_hash, hash) \
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
                              $5::text[], $6::text[])",
    )
    .bind(&seqs)
    .bind(&times)
    .bind(&kinds)
    .bind(&payloads)
    .bind(&prevs)
    .bind(&hashes)
    .execute(&mut *conn)
    .await
    .map_err(|e| map_err(e, || "audit sequence number already used".into()))?;
    let (Some(&head_seq), Some(head_hash)) = (seqs.last(), hashes.last()) else {
        return Ok(seqs);
    };
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(head_seq)
        .bind(head_hash)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(seqs)
}

/// Write a configuration object (insert or replace) at `revision` (from
/// [`bump_generation`], taken first in the transaction) inside the caller's transaction.
/// Returns the object's creation time.
pub(crate) async fn write_config(
    conn: &mut PgConnection,
    obj: &NewConfigObject,
    revision: i64,
) -> Result<i64> {
    let row = sqlx::query(
        "INSERT INTO config_objects \
             (kind, name, spec, revision, created_at, updated_at, updated_by) \
         VALUES ($1, $2, $3, $4, $5, $5, $6) \
         ON CONFLICT (kind, name) DO UPDATE SET \
             spec = EXCLUDED.spec, revision = EXCLUDED.revision, \
             updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by \
         RETURNING created_at",
    )
    .bind(obj.kind.as_str())
    .bind(&obj.name)
    .bind(Json(&obj.spec))
    .bind(revision)
    .bind(obj.now)
    .bind(&obj.updated_by)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    row.try_get("created_at").map_err(db)
}

/// Bump the configuration generation; returns the new value. The row stays locked
/// until the transaction ends, serializing configuration writes across replicas.
pub(crate) async fn bump_generation(conn: &mut PgConnection) -> Result<i64> {
    let row =
        sqlx::query("UPDATE config_generation SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    row.try_get("value").map_err(db)
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
async fn missing_or_conflict(conn: &mut PgConnection, id: &GrantId, why: &str) -> StoreError {
    let exists = sqlx::query("SELECT 1 FROM grants WHERE id = $1")
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

/// Append `clause` to a query under construction, numbering its `$` after the values
/// already bound.
fn push_clause<'a>(sql: &mut String, args: &mut Vec<&'a str>, clause: &str, value: &'a str) {
    args.push(value);
    sql.push_str(&clause.replace('$', &format!("${}", args.len())));
}

// === impl Store for PgStore ===

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn config_put(
        &self,
        obj: NewConfigObject,
        expected_revision: Option<i64>,
        audit: NewAuditEvent,
    ) -> Result<ConfigObject> {
        let mut tx = self.begin().await?;
        // First: the generation lock makes the check below and the write atomic
        // with respect to every other configuration write. A refused put rolls the
        // bump back.
        let revision = bump_generation(&mut tx).await?;
        let current =
            sqlx::query("SELECT revision FROM config_objects WHERE kind = $1 AND name = $2")
                .bind(obj.kind.as_str())
                .bind(&obj.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .map(|row| row.try_get::<i64, _>("revision"))
                .transpose()
                .map_err(db)?;
        check_revision(obj.kind, &obj.name, current, expected_revision)?;
        let created_at = write_config(&mut tx, &obj, revision).await?;
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
            " FROM config_objects WHERE kind = $1 AND name = $2"
        );
        let row = sqlx::query(SQL)
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::config).transpose()
    }

    async fn config_list(&self, kind: ConfigKind) -> Result<Vec<ConfigObject>> {
        // `name` is COLLATE "C": byte order, whatever the database's locale.
        const SQL: &str = concat!(
            "SELECT ",
            config_columns!(),
            " FROM config_objects WHERE kind = $1 ORDER BY name"
        );
        let rows = sqlx::query(SQL)
            .bind(kind.as_str())
            .fetch_all(&self.pool)
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
        bump_generation(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM config_objects WHERE kind = $1 AND name = $2")
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
        append_events(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db)
    }

    async fn config_generation(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM config_generation WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        row.try_get("value").map_err(db)
    }

    async fn grant_insert_batch(
        &self,
        grants: &[GrantRecord],
        events: &[NewAuditEvent],
    ) -> Result<Vec<i64>> {
        const SQL: &str = concat!(
            "INSERT INTO grants (",
            grant_columns!(),
            ") SELECT * FROM UNNEST(\
                 $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], \
                 $12::bigint[], $13::text[], $14::bigint[])"
        );
        if grants.is_empty() && events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        if !grants.is_empty() {
            // One statement for the whole batch: one round trip however many grants.
            let column = |f: fn(&GrantRecord) -> String| grants.iter().map(f).collect::<Vec<_>>();
            sqlx::query(SQL)
                .bind(column(|g| g.id.to_string()))
                .bind(column(|g| g.workload_id.clone()))
                .bind(column(|g| g.issuer.clone()))
                .bind(column(|g| g.trust_rule.clone()))
                .bind(
                    grants
                        .iter()
                        .map(|g| g.task_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(column(|g| g.destination.clone()))
                .bind(column(|g| to_json_list(&g.scopes)))
                .bind(column(|g| to_json_list(&g.actor_chain)))
                .bind(grants.iter().map(|g| g.issued_at).collect::<Vec<_>>())
                .bind(grants.iter().map(|g| g.expires_at).collect::<Vec<_>>())
                .bind(column(|g| g.status.as_str().to_owned()))
                .bind(grants.iter().map(|g| g.finished_at).collect::<Vec<_>>())
                .bind(column(|g| g.revocation_handle.clone()))
                .bind(grants.iter().map(|g| g.renew_count).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err(e, || "a grant ID in the batch already exists".into()))?;
        }
        let seqs = append_events(&mut tx, events).await?;
        tx.commit().await.map_err(db)?;
        Ok(seqs)
    }

    async fn grant_get(&self, id: &GrantId) -> Result<Option<GrantRecord>> {
        const SQL: &str = concat!("SELECT ", grant_columns!(), " FROM grants WHERE id = $1");
        let row = sqlx::query(SQL)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
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
            " FROM grants WHERE TRUE"
        ));
        let mut args: Vec<&str> = Vec::new();
        let mut add = |clause: &str, value| push_clause(&mut sql, &mut args, clause, value);
        if let Some(v) = &filter.workload_id {
            add(" AND workload_id = $", v);
        }
        if let Some(v) = &filter.workload_prefix {
            // Not LIKE: `_` and `%` are common in IDs.
            add(" AND starts_with(workload_id, $)", v);
        }
        if let Some(v) = &filter.issuer {
            add(" AND issuer = $", v);
        }
        if let Some(v) = &filter.destination {
            add(" AND destination = $", v);
        }
        if let Some(v) = &filter.task_id {
            add(" AND task_id = $", v);
        }
        if let Some(v) = filter.status {
            add(" AND status = $", v.as_str());
        }
        if let Some(v) = &page.cursor {
            // `id` is COLLATE "C", so this bound agrees with the ORDER BY.
            add(" AND id < $", v);
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len() + 1));
        // The text is assembled from the fixed fragments above; values are bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for arg in args {
            query = query.bind(arg);
        }
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
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
             SET expires_at = $3, revocation_handle = $4, renew_count = renew_count + 1 \
             WHERE id = $1 AND status = 'active' AND expires_at > $2 \
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
            "UPDATE grants SET status = $2, finished_at = $3 \
             WHERE id = $1 AND status = 'active' \
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
        // SKIP LOCKED: replicas sweeping at once take disjoint rows, and a grant being
        // renewed or revoked right now is left for the next sweep. The CTE runs once;
        // as an `IN (subquery)` the planner may rescan the subquery and exceed the
        // limit. `finished_at` is when the grant stopped being valid, not when the
        // sweep ran.
        let done = sqlx::query(
            "WITH due AS MATERIALIZED ( \
                 SELECT id FROM grants \
                 WHERE status = 'active' AND expires_at <= $1 \
                   AND NOT (destination = ANY($3)) \
                 ORDER BY expires_at LIMIT $2 \
                 FOR UPDATE SKIP LOCKED) \
             UPDATE grants SET status = 'expired', finished_at = grants.expires_at \
             FROM due WHERE grants.id = due.id",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(keep)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn grant_count_active(&self, workload: Option<&str>, now: UnixTime) -> Result<u64> {
        // `status = 'active'` is a literal so the partial expiry index applies.
        let query = match workload {
            None => sqlx::query(
                "SELECT COUNT(*) AS n FROM grants WHERE status = 'active' AND expires_at > $1",
            )
            .bind(now),
            Some(w) => sqlx::query(
                "SELECT COUNT(*) AS n FROM grants \
                 WHERE workload_id = $2 AND status = 'active' AND expires_at > $1",
            )
            .bind(now)
            .bind(w),
        };
        let row = query.fetch_one(&self.pool).await.map_err(db)?;
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
        // yields a row only if one of the two happened; a concurrent first use waits
        // for the row lock and then sees the winner's unexpired record.
        let row = sqlx::query(
            "INSERT INTO seen_jti (issuer, jti, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = EXCLUDED.expires_at \
             WHERE seen_jti.expires_at <= $4 \
             RETURNING 1 AS fresh",
        )
        .bind(issuer)
        .bind(jti)
        .bind(expires_at)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(row.is_some())
    }

    async fn jti_purge(&self, now: UnixTime, limit: u32) -> Result<u64> {
        // A CTE, run once, for the reason given in `grant_expire_due`.
        let done = sqlx::query(
            "WITH due AS MATERIALIZED ( \
                 SELECT issuer, jti FROM seen_jti WHERE expires_at <= $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED) \
             DELETE FROM seen_jti USING due \
             WHERE seen_jti.issuer = due.issuer AND seen_jti.jti = due.jti",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
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
            " FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
        );
        let rows = sqlx::query(SQL)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(rows::audit).collect()
    }

    async fn audit_head(&self) -> Result<(i64, String)> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
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
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workload_id) DO UPDATE SET issuer = EXCLUDED.issuer, \
                     trust_rule = EXCLUDED.trust_rule, claims = EXCLUDED.claims, \
                     last_seen = EXCLUDED.last_seen",
            )
            .bind(&w.workload_id)
            .bind(&w.issuer)
            .bind(&w.trust_rule)
            .bind(Json(&w.claims))
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
             FROM workloads WHERE workload_id = $1",
        )
        .bind(workload_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let claims: Json<serde_json::Value> = row.try_get("claims").map_err(db)?;
        let claims = claims.0;
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
        revocation::get(&self.pool, id).await
    }

    async fn revocation_list(&self, page: &PageRequest) -> Result<Page<RevocationJob>> {
        revocation::list(&self.pool, page).await
    }

    async fn revocation_progress(&self, job_id: &str) -> Result<Vec<DestinationProgress>> {
        revocation::progress(&self.pool, job_id).await
    }

    async fn revocation_destinations(&self, job_id: &str) -> Result<Vec<String>> {
        // A loose index scan: the next destination after each, from the primary key.
        let rows = sqlx::query(
            "WITH RECURSIVE d(dest) AS ( \
                 SELECT (SELECT destination FROM revocation_steps WHERE job_id = $1 \
                         ORDER BY destination LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT destination FROM revocation_steps \
                         WHERE job_id = $1 AND destination > d.dest \
                         ORDER BY destination LIMIT 1) \
                 FROM d WHERE d.dest IS NOT NULL) \
             SELECT dest FROM d WHERE dest IS NOT NULL",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
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
        revocation::claim(&self.pool, owner, now_ms, lease_until_ms).await
    }

    async fn revocation_steps_due(
        &self,
        job_id: &str,
        destination: &str,
        now_ms: i64,
        after_grant: &str,
        limit: u32,
    ) -> Result<Vec<RevocationStep>> {
        revocation::steps_due(&self.pool, job_id, destination, now_ms, after_grant, limit).await
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
        revocation::receipts(&self.pool, job_id, after_seq, limit).await
    }

    async fn revocation_queue_depth(&self) -> Result<u64> {
        revocation::queue_depth(&self.pool).await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `migrations/postgres` is embedded, with the version and
    /// description `sqlx::migrate!` would give it.
    #[test]
    fn every_migration_file_is_embedded() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres");
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

    #[test]
    fn a_refused_put_names_the_revisions() {
        let err = check_revision(ConfigKind::Issuer, "x", Some(3), Some(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "conflict: issuer \"x\" is at revision 3, not 2"
        );
    }
}
