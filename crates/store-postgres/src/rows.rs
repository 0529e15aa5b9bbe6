//! Rows to records. Every column is read by name with `Row::try_get`; anything that
//! does not decode is [`StoreError::Corrupt`].

use lanyard_core::GrantId;
use lanyard_store::{
    AuditRecord, ConfigKind, ConfigObject, GrantRecord, GrantStatus, Result, StoreError,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use crate::error::{corrupt, db};

pub(crate) fn grant(row: &PgRow) -> Result<GrantRecord> {
    let id: String = row.try_get("id").map_err(db)?;
    let id = GrantId::parse(&id).map_err(|e| corrupt(format_args!("grant id {id:?}"), e))?;
    let status: String = row.try_get("status").map_err(db)?;
    let status = GrantStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("grant {id}: unknown status {status:?}")))?;
    Ok(GrantRecord {
        workload_id: row.try_get("workload_id").map_err(db)?,
        issuer: row.try_get("issuer").map_err(db)?,
        trust_rule: row.try_get("trust_rule").map_err(db)?,
        task_id: row.try_get("task_id").map_err(db)?,
        destination: row.try_get("destination").map_err(db)?,
        scopes: string_list(row, "scopes", &id)?,
        actor_chain: string_list(row, "actor_chain", &id)?,
        issued_at: row.try_get("issued_at").map_err(db)?,
        expires_at: row.try_get("expires_at").map_err(db)?,
        status,
        finished_at: row.try_get("finished_at").map_err(db)?,
        revocation_handle: row.try_get("revocation_handle").map_err(db)?,
        renew_count: row.try_get("renew_count").map_err(db)?,
        id,
    })
}

pub(crate) fn config(row: &PgRow) -> Result<ConfigObject> {
    let kind: String = row.try_get("kind").map_err(db)?;
    let name: String = row.try_get("name").map_err(db)?;
    let Json(spec) = row
        .try_get::<Json<serde_json::Value>, _>("spec")
        .map_err(db)?;
    Ok(ConfigObject {
        kind: ConfigKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown config kind {kind:?}")))?,
        spec,
        name,
        revision: row.try_get("revision").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
        updated_by: row.try_get("updated_by").map_err(db)?,
    })
}

pub(crate) fn audit(row: &PgRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.try_get("seq").map_err(db)?,
        time_ms: row.try_get("time_ms").map_err(db)?,
        kind: row.try_get("kind").map_err(db)?,
        payload: row.try_get("payload").map_err(db)?,
        prev_hash: row.try_get("prev_hash").map_err(db)?,
        hash: row.try_get("hash").map_err(db)?,
    })
}

/// A count as `u64`.
pub(crate) fn count(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|e| corrupt("negative count", e))
}

/// A JSON array of strings, as stored in `scopes` and `actor_chain`.
pub(crate) fn to_json_list(items: &[String]) -> String {
    // A list of strings always serializes.
    serde_json::to_string(items).unwrap_or_else(|_| String::from("[]"))
}

fn string_list(row: &PgRow, column: &str, id: &GrantId) -> Result<Vec<String>> {
    let text: String = row.try_get(column).map_err(db)?;
    serde_json::from_str(&text).map_err(|e| corrupt(format_args!("grant {id}: {column}"), e))
}
