//! Versioned policy in the store: put (validated, numbered `v1`, `v2`...), get, history,
//! activate. A version is a configuration object of kind `policy`, immutable once
//! written; the active version is the one object of kind `policy_activation`. Both are
//! written with their audit event in one transaction and bump the configuration
//! generation, so every replica switches at its next reload.
//!
//! Before any version is activated, the policy in force is the bootstrap one (the
//! `[policy] file`, the dev policy, or deny-all).

use lanyard_core::ReasonCode;
use lanyard_policy::CedarAuthorizer;
use lanyard_proto::v1 as pb;
use lanyard_store::{ConfigKind, ConfigObject, NewAuditEvent, NewConfigObject, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::runtime::{RequestCtx, Runtime};

/// Name of the activation object.
const ACTIVE: &str = "active";
/// Attempts at a fresh version number when another writer takes the same one.
const NUMBER_ATTEMPTS: usize = 8;

/// A stored version's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// Cedar text.
    pub text: String,
    /// SHA-256 of the text, hex.
    pub sha256: String,
    /// Policy IDs in the set.
    pub policy_ids: Vec<String>,
    /// Free text from the uploader.
    #[serde(default)]
    pub comment: String,
}

/// The activation object's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Activation {
    version: String,
}

fn version_number(name: &str) -> Option<u64> {
    name.strip_prefix('v')?.parse().ok()
}

fn to_pb(obj: &ConfigObject, active: bool) -> Result<pb::PolicyVersion, ApiError> {
    let p: StoredPolicy = serde_json::from_value(obj.spec.clone()).map_err(|e| {
        ApiError::new(
            ReasonCode::Internal,
            format!("stored policy {} is unreadable: {e}", obj.name),
        )
    })?;
    Ok(pb::PolicyVersion {
        version: obj.name.clone(),
        text: p.text,
        active,
        created_at: Some(prost_types::Timestamp {
            seconds: obj.created_at,
            nanos: 0,
        }),
        created_by: obj.updated_by.clone(),
        sha256: p.sha256,
        policy_ids: p.policy_ids,
        comment: p.comment,
    })
}

/// Parse and validate `text` as it would be activated.
fn validate(text: &str, version: &str) -> Result<CedarAuthorizer, ApiError> {
    CedarAuthorizer::from_text(text, version)
        .map_err(|e| ApiError::new(ReasonCode::ConfigInvalid, e.to_string()))
}

/// The active stored version's name, if one was activated.
///
/// # Errors
/// `STORE_UNAVAILABLE`.
pub async fn active_version(rt: &Runtime) -> Result<Option<String>, ApiError> {
    Ok(rt
        .store
        .config_get(ConfigKind::PolicyActivation, ACTIVE)
        .await?
        .and_then(|o| serde_json::from_value::<Activation>(o.spec).ok())
        .map(|a| a.version))
}

/// Load the authorizer for stored `version`.
///
/// # Errors
/// `NOT_FOUND`, `CONFIG_INVALID` (it no longer validates), `STORE_UNAVAILABLE`.
pub async fn load(rt: &Runtime, version: &str) -> Result<CedarAuthorizer, ApiError> {
    let obj = rt
        .store
        .config_get(ConfigKind::Policy, version)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ReasonCode::NotFound,
                format!("no policy version {version:?}"),
            )
        })?;
    let p: StoredPolicy = serde_json::from_value(obj.spec).map_err(|e| {
        ApiError::new(
            ReasonCode::Internal,
            format!("stored policy {version} is unreadable: {e}"),
        )
    })?;
    validate(&p.text, version)
}

/// Store `text` as the next version.
///
/// # Errors
/// `CONFIG_INVALID` with Cedar's diagnostics; `STORE_UNAVAILABLE`.
pub async fn put(
    rt: &Runtime,
    ctx: &RequestCtx,
    text: &str,
    comment: &str,
) -> Result<pb::PolicyVersion, ApiError> {
    let checked = validate(text, "candidate")?;
    let stored = StoredPolicy {
        text: text.to_owned(),
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
        policy_ids: checked.policy_ids(),
        comment: comment.to_owned(),
    };
    let spec = serde_json::to_value(&stored)
        .map_err(|e| ApiError::new(ReasonCode::Internal, e.to_string()))?;
    for _ in 0..NUMBER_ATTEMPTS {
        let next = rt
            .store
            .config_list(ConfigKind::Policy)
            .await?
            .iter()
            .filter_map(|o| version_number(&o.name))
            .max()
            .unwrap_or(0)
            + 1;
        let version = format!("v{next}");
        let now_ms = rt.clock.now_unix_millis();
        let event = NewAuditEvent {
            time_ms: now_ms,
            kind: lanyard_audit::kinds::POLICY_PUT.into(),
            request_id: Some(ctx.request_id.clone()),
            trace_id: crate::telemetry::current_trace_id(),
            actor: ctx.operator.clone(),
            policy_version: Some(version.clone()),
            detail: json!({
                "name": version,
                "sha256": stored.sha256,
                "policy_ids": stored.policy_ids,
                "comment": comment,
                "after": text,
            }),
            ..NewAuditEvent::default()
        };
        let put = rt
            .store
            .config_put(
                NewConfigObject {
                    kind: ConfigKind::Policy,
                    name: version.clone(),
                    spec: spec.clone(),
                    updated_by: ctx.operator.clone().unwrap_or_else(|| "unknown".into()),
                    now: now_ms / 1000,
                },
                // Must not exist: versions are immutable, and a concurrent writer that
                // took this number makes us take the next.
                Some(0),
                event,
            )
            .await;
        match put {
            Ok(obj) => return to_pb(&obj, false),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        ReasonCode::Conflict,
        "other writers kept taking the next policy version number; try again",
    ))
}

/// Make `version` the active policy.
///
/// # Errors
/// `NOT_FOUND`, `CONFIG_INVALID`, `STORE_UNAVAILABLE`.
pub async fn activate(
    rt: &Runtime,
    ctx: &RequestCtx,
    version: &str,
) -> Result<pb::PolicyVersion, ApiError> {
    // Validate again: the schema may have changed since the upload.
    load(rt, version).await?;
    let before = active_version(rt).await?;
    let now_ms = rt.clock.now_unix_millis();
    let event = NewAuditEvent {
        time_ms: now_ms,
        kind: lanyard_audit::kinds::POLICY_ACTIVATED.into(),
        request_id: Some(ctx.request_id.clone()),
        trace_id: crate::telemetry::current_trace_id(),
        actor: ctx.operator.clone(),
        policy_version: Some(version.to_owned()),
        detail: json!({
            "before": before.clone().unwrap_or_else(|| rt.authorizer().version()),
            "after": version,
        }),
        ..NewAuditEvent::default()
    };
    rt.store
        .config_put(
            NewConfigObject {
                kind: ConfigKind::PolicyActivation,
                name: ACTIVE.into(),
                spec: json!(Activation {
                    version: version.to_owned()
                }),
                updated_by: ctx.operator.clone().unwrap_or_else(|| "unknown".into()),
                now: now_ms / 1000,
            },
            None,
            event,
        )
        .await?;
    rt.reload(true).await?;
    get(rt, Some(version)).await
}

/// One version, or (`None`) the policy in force.
///
/// # Errors
/// `NOT_FOUND`, `STORE_UNAVAILABLE`.
pub async fn get(rt: &Runtime, version: Option<&str>) -> Result<pb::PolicyVersion, ApiError> {
    let active = active_version(rt).await?;
    let Some(name) = version.map(str::to_owned).or_else(|| active.clone()) else {
        // Nothing activated: the bootstrap policy decides.
        let a = rt.authorizer();
        return Ok(pb::PolicyVersion {
            version: a.version(),
            active: true,
            comment: "the bootstrap policy ([policy] file, the dev policy, or deny-all); no stored version has been activated".into(),
            ..Default::default()
        });
    };
    let obj = rt
        .store
        .config_get(ConfigKind::Policy, &name)
        .await?
        .ok_or_else(|| {
            ApiError::new(ReasonCode::NotFound, format!("no policy version {name:?}"))
        })?;
    to_pb(&obj, active.as_deref() == Some(name.as_str()))
}

/// Every stored version, newest first.
///
/// # Errors
/// `STORE_UNAVAILABLE`.
pub async fn list(rt: &Runtime) -> Result<Vec<pb::PolicyVersion>, ApiError> {
    let active = active_version(rt).await?;
    let mut objs = rt.store.config_list(ConfigKind::Policy).await?;
    objs.sort_by_key(|o| std::cmp::Reverse(version_number(&o.name).unwrap_or(0)));
    objs.iter()
        .map(|o| to_pb(o, active.as_deref() == Some(o.name.as_str())))
        .collect()
}
