//! Revocation jobs, steps and receipts on PostgreSQL. The set-based statements (one
//! `INSERT ... SELECT` to snapshot the matched grants, one `UPDATE` per receipt) keep a
//! job of 100,000 grants to a handful of statements.

use lanyard_store::{
    DestinationProgress, JobState, NewAuditEvent, NewConfigObject, NewRevocationJob, Page,
    PageRequest, Result, RevocationJob, RevocationReceiptRecord, RevocationStep, RevokeSelector,
    StepState, StoreError,
};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::error::{corrupt, db, map_err};
use crate::rows::count;
use crate::{append_events, bump_generation, write_config};

const JOB_COLUMNS: &str = "id, selector_kind, selector_value, reason, requested_by, created_at, \
     matched, state, finished_at, next_run_at, receipts, sweep_at";
const STEP_COLUMNS: &str = "job_id, grant_id, destination, workload_id, revocation_handle, \
     expires_at, state, attempts, next_attempt_at, detail";
const RECEIPT_COLUMNS: &str = "job_id, seq, destination, outcome, grant_ids, expires_at, detail, \
     created_at, signature, retry_at";

/// The `WHERE` fragment matching a selector's grants, with the value bound at `$2`.
fn selector_clause(selector: &RevokeSelector) -> String {
    match selector.column() {
        (column, true) => format!("starts_with({column}, $2)"),
        (column, false) => format!("{column} = $2"),
    }
}

/// The grants a job matches by time, and what they become.
struct Matching {
    filter: String,
    status: &'static str,
    finished_at: String,
}

impl Matching {
    /// `now` is the placeholder bound to the job's `now`.
    fn of(job: &NewRevocationJob, now: &str) -> Self {
        if job.expired_only {
            Matching {
                filter: format!("expires_at <= {now}"),
                status: "'expired'",
                finished_at: "expires_at".into(),
            }
        } else {
            Matching {
                filter: format!("expires_at > {now}"),
                status: "'revoked'",
                finished_at: now.to_owned(),
            }
        }
    }
}

pub(crate) async fn create(
    conn: &mut PgConnection,
    job: &NewRevocationJob,
    deny: Option<NewConfigObject>,
    mut audit: NewAuditEvent,
) -> Result<RevocationJob> {
    sqlx::query(
        "INSERT INTO revocation_jobs (id, selector_kind, selector_value, reason, requested_by, \
             created_at, matched, state, next_run_at, sweep_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 0, 'running', $6, $7)",
    )
    .bind(&job.id)
    .bind(job.selector.kind())
    .bind(job.selector.value())
    .bind(&job.reason)
    .bind(&job.requested_by)
    .bind(job.now_ms)
    .bind(job.sweep_at_ms)
    .execute(&mut *conn)
    .await
    .map_err(|e| map_err(e, || format!("revocation job {} already exists", job.id)))?;
    let when = Matching::of(job, "$3");
    // One statement: the grants marked revoked are exactly the steps written, whatever
    // commits concurrently. `status = 'active'` as a literal: the partial index applies.
    let insert = format!(
        "WITH revoked AS ( \
             UPDATE grants SET status = {}, finished_at = {} \
             WHERE {} AND status = 'active' AND {} \
             RETURNING id, destination, workload_id, revocation_handle, expires_at) \
         INSERT INTO revocation_steps \
             (job_id, grant_id, destination, workload_id, revocation_handle, expires_at, state) \
         SELECT $1, id, destination, workload_id, revocation_handle, expires_at, 'pending' \
         FROM revoked",
        when.status,
        when.finished_at,
        selector_clause(&job.selector),
        when.filter
    );
    let matched = sqlx::query(AssertSqlSafe(insert))
        .bind(&job.id)
        .bind(job.selector.value())
        .bind(job.now)
        .execute(&mut *conn)
        .await
        .map_err(db)?
        .rows_affected();
    if matched == 0 && job.expired_only {
        // Nothing expired: write nothing (the caller's transaction is dropped).
        return Err(StoreError::NotFound {
            what: "expired active grants".into(),
        });
    }
    let matched_i = i64::try_from(matched).map_err(|e| corrupt("matched", e))?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "UPDATE revocation_jobs SET matched = $2, \
             state = CASE WHEN $2 = 0 AND sweep_at IS NULL THEN 'done' ELSE 'running' END, \
             finished_at = CASE WHEN $2 = 0 AND sweep_at IS NULL THEN created_at ELSE NULL END \
         WHERE id = $1 RETURNING {JOB_COLUMNS}"
    )))
    .bind(&job.id)
    .bind(matched_i)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    if let Some(obj) = deny {
        let revision = bump_generation(&mut *conn).await?;
        write_config(&mut *conn, &obj, revision).await?;
    }
    audit.detail["matched"] = serde_json::json!(matched);
    append_events(&mut *conn, std::slice::from_ref(&audit)).await?;
    job_row(&row)
}

pub(crate) async fn get(pool: &PgPool, id: &str) -> Result<Option<RevocationJob>> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM revocation_jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    row.as_ref().map(job_row).transpose()
}

pub(crate) async fn list(pool: &PgPool, page: &PageRequest) -> Result<Page<RevocationJob>> {
    let limit = page.effective_limit();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM revocation_jobs WHERE $1::text IS NULL OR id < $1 \
         ORDER BY id DESC LIMIT $2"
    )))
    .bind(page.cursor.as_deref())
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let mut items = rows.iter().map(job_row).collect::<Result<Vec<_>>>()?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

pub(crate) async fn progress(pool: &PgPool, job_id: &str) -> Result<Vec<DestinationProgress>> {
    // Grouped by destination only, the primary key's order: one pass, no sort.
    let rows = sqlx::query(
        "SELECT destination, \
             SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS pending, \
             SUM(CASE WHEN state = 'revoked' THEN 1 ELSE 0 END) AS revoked, \
             SUM(CASE WHEN state = 'blocked' THEN 1 ELSE 0 END) AS blocked, \
             SUM(CASE WHEN state = 'expires_at' THEN 1 ELSE 0 END) AS expiring, \
             SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed, \
             SUM(CASE WHEN state = 'abandoned' THEN 1 ELSE 0 END) AS abandoned, \
             MAX(CASE WHEN state = 'expires_at' THEN expires_at END) AS latest \
         FROM revocation_steps WHERE job_id = $1 \
         GROUP BY destination ORDER BY destination",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| {
            let n = |c: &str| -> Result<u64> { count(row.try_get::<i64, _>(c).map_err(db)?) };
            Ok(DestinationProgress {
                destination: row.try_get("destination").map_err(db)?,
                pending: n("pending")?,
                revoked: n("revoked")?,
                blocked: n("blocked")?,
                expires_at: n("expiring")?,
                failed: n("failed")?,
                abandoned: n("abandoned")?,
                latest_expiry: row.try_get("latest").map_err(db)?,
            })
        })
        .collect()
}

pub(crate) async fn claim(
    pool: &PgPool,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
) -> Result<Option<RevocationJob>> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "UPDATE revocation_jobs SET lease_owner = $1, lease_until = $3 \
         WHERE id = (SELECT id FROM revocation_jobs \
                     WHERE state = 'running' AND next_run_at <= $2 \
                       AND (lease_owner IS NULL OR lease_until <= $2) \
                     ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING {JOB_COLUMNS}"
    )))
    .bind(owner)
    .bind(now_ms)
    .bind(lease_until_ms)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    row.as_ref().map(job_row).transpose()
}

pub(crate) async fn steps_due(
    pool: &PgPool,
    job_id: &str,
    destination: &str,
    now_ms: i64,
    after_grant: &str,
    limit: u32,
) -> Result<Vec<RevocationStep>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {STEP_COLUMNS} FROM revocation_steps \
         WHERE job_id = $1 AND destination = $2 AND state IN ('pending', 'failed') \
           AND next_attempt_at <= $3 AND grant_id > $4 \
         ORDER BY grant_id LIMIT $5"
    )))
    .bind(job_id)
    .bind(destination)
    .bind(now_ms)
    .bind(after_grant)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter().map(step_row).collect()
}

/// Take `owner`'s lease on to `lease_until_ms`, or fail if it lost it.
async fn hold_lease(
    conn: &mut PgConnection,
    owner: &str,
    job_id: &str,
    lease_until_ms: i64,
) -> Result<()> {
    let held = sqlx::query(
        "UPDATE revocation_jobs SET lease_until = $3 \
         WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
    )
    .bind(job_id)
    .bind(owner)
    .bind(lease_until_ms)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    if held == 0 {
        return Err(StoreError::Conflict(format!(
            "revocation job {job_id} is no longer leased to {owner}"
        )));
    }
    Ok(())
}

pub(crate) async fn record(
    conn: &mut PgConnection,
    owner: &str,
    job_id: &str,
    lease_until_ms: i64,
    receipts: &[RevocationReceiptRecord],
    events: &[NewAuditEvent],
) -> Result<Vec<i64>> {
    hold_lease(&mut *conn, owner, job_id, lease_until_ms).await?;
    for r in receipts {
        if r.job_id != job_id || r.outcome == StepState::Pending {
            return Err(StoreError::Conflict(format!(
                "receipt {} of job {} cannot be recorded for job {job_id} with outcome {}",
                r.seq,
                r.job_id,
                r.outcome.as_str()
            )));
        }
        let ids = Json(&r.grant_ids);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO revocation_receipts ({RECEIPT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )))
        .bind(job_id)
        .bind(r.seq)
        .bind(&r.destination)
        .bind(r.outcome.as_str())
        .bind(ids)
        .bind(r.expires_at)
        .bind(&r.detail)
        .bind(r.created_at_ms)
        .bind(&r.signature)
        .bind(r.retry_at_ms)
        .execute(&mut *conn)
        .await
        .map_err(|e| map_err(e, || format!("receipt {} of job {job_id} exists", r.seq)))?;
        sqlx::query(
            "UPDATE revocation_steps SET state = $3, \
                 detail = CASE WHEN $3 = 'failed' THEN $4 ELSE detail END, attempts = attempts + 1, \
                 next_attempt_at = $5, receipt_seq = $6 \
             WHERE job_id = $1 AND destination = $7 AND grant_id = ANY($2)",
        )
        .bind(job_id)
        .bind(&r.grant_ids)
        .bind(r.outcome.as_str())
        .bind(&r.detail)
        .bind(r.retry_at_ms.unwrap_or(0))
        .bind(r.seq)
        .bind(&r.destination)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        sqlx::query("UPDATE revocation_jobs SET receipts = GREATEST(receipts, $2) WHERE id = $1")
            .bind(job_id)
            .bind(r.seq)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    append_events(&mut *conn, events).await
}

pub(crate) async fn defer(
    conn: &mut PgConnection,
    owner: &str,
    job_id: &str,
    destination: &str,
    grant_ids: &[String],
    retry_at_ms: i64,
) -> Result<()> {
    let lease: Option<i64> = sqlx::query_scalar(
        "SELECT lease_until FROM revocation_jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
    )
    .bind(job_id)
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    if lease.is_none() {
        return Err(StoreError::Conflict(format!(
            "revocation job {job_id} is no longer leased to {owner}"
        )));
    }
    sqlx::query(
        "UPDATE revocation_steps SET next_attempt_at = $4 \
         WHERE job_id = $1 AND destination = $2 AND grant_id = ANY($3) AND state = 'failed'",
    )
    .bind(job_id)
    .bind(destination)
    .bind(grant_ids)
    .bind(retry_at_ms)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

pub(crate) async fn abandon(
    conn: &mut PgConnection,
    job_id: &str,
    destination: Option<&str>,
    now_ms: i64,
    mut audit: NewAuditEvent,
) -> Result<u64> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM revocation_jobs WHERE id = $1")
            .bind(job_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    match state.as_deref() {
        None => {
            return Err(StoreError::NotFound {
                what: format!("revocation job {job_id}"),
            });
        }
        Some("running") => {}
        Some(_) => {
            return Err(StoreError::Conflict(format!(
                "revocation job {job_id} is done; nothing to give up"
            )));
        }
    }
    let n = sqlx::query(
        "UPDATE revocation_steps SET state = 'abandoned' \
         WHERE job_id = $1 AND ($2::text IS NULL OR destination = $2) AND state = 'failed'",
    )
    .bind(job_id)
    .bind(destination)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    sqlx::query(
        "UPDATE revocation_jobs SET state = 'done', finished_at = $2 \
         WHERE id = $1 AND lease_owner IS NULL AND sweep_at IS NULL \
           AND NOT EXISTS (SELECT 1 FROM revocation_steps \
                           WHERE job_id = $1 AND state IN ('pending', 'failed'))",
    )
    .bind(job_id)
    .bind(now_ms)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    audit.detail["abandoned"] = serde_json::json!(n);
    append_events(&mut *conn, std::slice::from_ref(&audit)).await?;
    Ok(n)
}

pub(crate) async fn sweep(
    conn: &mut PgConnection,
    owner: &str,
    job_id: &str,
    now: i64,
) -> Result<u64> {
    let job = sqlx::query(
        "SELECT selector_kind, selector_value FROM revocation_jobs \
         WHERE id = $1 AND lease_owner = $2 AND state = 'running' FOR UPDATE",
    )
    .bind(job_id)
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?
    .ok_or_else(|| {
        StoreError::Conflict(format!(
            "revocation job {job_id} is no longer leased to {owner}"
        ))
    })?;
    let kind: String = job.try_get("selector_kind").map_err(db)?;
    let value: String = job.try_get("selector_value").map_err(db)?;
    let selector = RevokeSelector::from_parts(&kind, value)
        .ok_or_else(|| StoreError::Corrupt(format!("job {job_id}: selector kind {kind:?}")))?;
    let sql = format!(
        "WITH revoked AS ( \
             UPDATE grants SET status = 'revoked', finished_at = $3 \
             WHERE {} AND status = 'active' AND expires_at > $3 \
             RETURNING id, destination, workload_id, revocation_handle, expires_at) \
         INSERT INTO revocation_steps \
             (job_id, grant_id, destination, workload_id, revocation_handle, expires_at, state) \
         SELECT $1, id, destination, workload_id, revocation_handle, expires_at, 'pending' \
         FROM revoked ON CONFLICT DO NOTHING",
        selector_clause(&selector)
    );
    let added = sqlx::query(AssertSqlSafe(sql))
        .bind(job_id)
        .bind(selector.value())
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db)?
        .rows_affected();
    sqlx::query("UPDATE revocation_jobs SET sweep_at = NULL, matched = matched + $2 WHERE id = $1")
        .bind(job_id)
        .bind(i64::try_from(added).map_err(|e| corrupt("added", e))?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(added)
}

pub(crate) async fn release(
    conn: &mut PgConnection,
    owner: &str,
    job_id: &str,
    now_ms: i64,
    done_event: NewAuditEvent,
) -> Result<RevocationJob> {
    hold_lease(&mut *conn, owner, job_id, 0).await?;
    let todo = sqlx::query(
        "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS due FROM revocation_steps \
         WHERE job_id = $1 AND state IN ('pending', 'failed')",
    )
    .bind(job_id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let n: i64 = todo.try_get("n").map_err(db)?;
    let mut due: Option<i64> = todo.try_get("due").map_err(db)?;
    let sweep_at: Option<i64> =
        sqlx::query_scalar("SELECT sweep_at FROM revocation_jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    if let Some(at) = sweep_at {
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    let row = if n == 0 && sweep_at.is_none() {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE revocation_jobs SET state = 'done', finished_at = $2, lease_owner = NULL, \
                 lease_until = 0 WHERE id = $1 RETURNING {JOB_COLUMNS}"
        )))
        .bind(job_id)
        .bind(now_ms)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        append_events(&mut *conn, std::slice::from_ref(&done_event)).await?;
        row
    } else {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE revocation_jobs SET next_run_at = $2, lease_owner = NULL, lease_until = 0 \
             WHERE id = $1 RETURNING {JOB_COLUMNS}"
        )))
        .bind(job_id)
        .bind(due.unwrap_or(now_ms))
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?
    };
    job_row(&row)
}

pub(crate) async fn receipts(
    pool: &PgPool,
    job_id: &str,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<RevocationReceiptRecord>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {RECEIPT_COLUMNS} FROM revocation_receipts \
         WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    )))
    .bind(job_id)
    .bind(after_seq)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter().map(receipt_row).collect()
}

pub(crate) async fn queue_depth(pool: &PgPool) -> Result<u64> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM revocation_steps s JOIN revocation_jobs j ON j.id = s.job_id \
         WHERE j.state = 'running' AND s.state IN ('pending', 'failed')",
    )
    .fetch_one(pool)
    .await
    .map_err(db)?;
    count(row.try_get("n").map_err(db)?)
}

fn job_row(row: &PgRow) -> Result<RevocationJob> {
    let id: String = row.try_get("id").map_err(db)?;
    let kind: String = row.try_get("selector_kind").map_err(db)?;
    let value: String = row.try_get("selector_value").map_err(db)?;
    let state: String = row.try_get("state").map_err(db)?;
    Ok(RevocationJob {
        selector: RevokeSelector::from_parts(&kind, value)
            .ok_or_else(|| StoreError::Corrupt(format!("job {id}: selector kind {kind:?}")))?,
        reason: row.try_get("reason").map_err(db)?,
        requested_by: row.try_get("requested_by").map_err(db)?,
        created_at_ms: row.try_get("created_at").map_err(db)?,
        matched: count(row.try_get("matched").map_err(db)?)?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job {id}: state {state:?}")))?,
        finished_at_ms: row.try_get("finished_at").map_err(db)?,
        next_run_at_ms: row.try_get("next_run_at").map_err(db)?,
        receipts: row.try_get("receipts").map_err(db)?,
        sweep_at_ms: row.try_get("sweep_at").map_err(db)?,
        id,
    })
}

fn step_row(row: &PgRow) -> Result<RevocationStep> {
    let state: String = row.try_get("state").map_err(db)?;
    Ok(RevocationStep {
        job_id: row.try_get("job_id").map_err(db)?,
        grant_id: row.try_get("grant_id").map_err(db)?,
        destination: row.try_get("destination").map_err(db)?,
        workload_id: row.try_get("workload_id").map_err(db)?,
        revocation_handle: row.try_get("revocation_handle").map_err(db)?,
        expires_at: row.try_get("expires_at").map_err(db)?,
        state: StepState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("step state {state:?}")))?,
        attempts: row.try_get("attempts").map_err(db)?,
        next_attempt_at_ms: row.try_get("next_attempt_at").map_err(db)?,
        detail: row.try_get("detail").map_err(db)?,
    })
}

fn receipt_row(row: &PgRow) -> Result<RevocationReceiptRecord> {
    let outcome: String = row.try_get("outcome").map_err(db)?;
    let ids: Json<Vec<String>> = row.try_get("grant_ids").map_err(db)?;
    Ok(RevocationReceiptRecord {
        job_id: row.try_get("job_id").map_err(db)?,
        seq: row.try_get("seq").map_err(db)?,
        destination: row.try_get("destination").map_err(db)?,
        outcome: StepState::parse(&outcome)
            .ok_or_else(|| StoreError::Corrupt(format!("receipt outcome {outcome:?}")))?,
        grant_ids: ids.0,
        expires_at: row.try_get("expires_at").map_err(db)?,
        detail: row.try_get("detail").map_err(db)?,
        created_at_ms: row.try_get("created_at").map_err(db)?,
        signature: row.try_get("signature").map_err(db)?,
        retry_at_ms: row.try_get("retry_at").map_err(db)?,
    })
}
