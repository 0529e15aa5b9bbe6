//! Conversions between the lanyard.v1 wire messages and the domain types.

use std::collections::BTreeMap;

use lanyard_destination::{Credential, DestinationSpec, Revocability, RevokeOutcome};
use lanyard_proto::v1 as pb;
use lanyard_store::{
    DestinationProgress, GrantRecord, RevocationJob, RevocationReceiptRecord, RevokeSelector,
};
use lanyard_trust::{Algorithm, ClaimCondition, ClaimMatcher, IssuerConfig, KeySource, TrustRule};
use prost_types::Timestamp;

use crate::error::ApiError;

/// Seconds to a protobuf timestamp.
pub fn ts(secs: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// A wire issuer to the domain config (validated by the caller).
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field.
pub fn issuer_from_pb(i: pb::Issuer) -> Result<IssuerConfig, ApiError> {
    let keys = match i.keys {
        Some(pb::issuer::Keys::DiscoveryUrl(url)) => KeySource::Discovery { url },
        Some(pb::issuer::Keys::JwksUrl(url)) => KeySource::JwksUrl { url },
        Some(pb::issuer::Keys::InlineJwks(text)) => KeySource::InlineJwks {
            jwks: serde_json::from_str(&text)
                .map_err(|e| ApiError::invalid(format!("inline_jwks is not JSON: {e}")))?,
        },
        None => {
            return Err(ApiError::invalid(
                "one of discovery_url, jwks_url or inline_jwks is required",
            ));
        }
    };
    let mut algs = Vec::with_capacity(i.allowed_algorithms.len());
    for a in &i.allowed_algorithms {
        algs.push(a.parse::<Algorithm>().map_err(|_| {
            ApiError::invalid(format!(
                "algorithm {:?} is not allowed; use RS256, PS256, ES256, ES384 or EdDSA",
                a.chars().take(20).collect::<String>()
            ))
        })?);
    }
    Ok(IssuerConfig {
        name: i.name,
        issuer_url: i.issuer_url,
        keys,
        allowed_algorithms: algs,
        audiences: i.audiences,
        leeway_secs: if i.leeway_seconds == 0 {
            30
        } else {
            i.leeway_seconds
        },
        max_token_age_secs: (i.max_token_age_seconds > 0).then_some(i.max_token_age_seconds),
        replay_protection: i.replay_protection,
        max_token_bytes: (i.max_token_bytes > 0).then_some(i.max_token_bytes),
    })
}

/// A domain issuer to the wire.
pub fn issuer_to_pb(c: &IssuerConfig, revision: i64) -> pb::Issuer {
    let keys = match &c.keys {
        KeySource::Discovery { url } => pb::issuer::Keys::DiscoveryUrl(url.clone()),
        KeySource::JwksUrl { url } => pb::issuer::Keys::JwksUrl(url.clone()),
        KeySource::InlineJwks { jwks } => pb::issuer::Keys::InlineJwks(jwks.to_string()),
    };
    pb::Issuer {
        name: c.name.clone(),
        issuer_url: c.issuer_url.clone(),
        keys: Some(keys),
        allowed_algorithms: c.allowed_algorithms.iter().map(|a| a.to_string()).collect(),
        audiences: c.audiences.clone(),
        leeway_seconds: c.leeway_secs,
        max_token_age_seconds: c.max_token_age_secs.unwrap_or(0),
        replay_protection: c.replay_protection,
        max_token_bytes: c.max_token_bytes.unwrap_or(0),
        revision,
        key_status: None,
    }
}

/// A wire trust rule to the domain.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field.
pub fn rule_from_pb(r: pb::TrustRule) -> Result<TrustRule, ApiError> {
    let mut conditions = Vec::with_capacity(r.conditions.len());
    for c in r.conditions {
        let matcher = match c.matcher {
            Some(pb::claim_condition::Matcher::Exact(v)) => ClaimMatcher::Exact(v),
            Some(pb::claim_condition::Matcher::Glob(v)) => ClaimMatcher::Glob(v),
            Some(pb::claim_condition::Matcher::OneOf(l)) => ClaimMatcher::OneOf(l.values),
            None => {
                return Err(ApiError::invalid(format!(
                    "condition on claim {:?} needs exact, glob or one_of",
                    c.claim
                )));
            }
        };
        conditions.push(ClaimCondition {
            claim: c.claim,
            matcher,
        });
    }
    Ok(TrustRule {
        name: r.name,
        issuer: r.issuer,
        priority: r.priority,
        conditions,
        workload_template: r.workload_template,
        task_claim: (!r.task_claim.is_empty()).then_some(r.task_claim),
    })
}

/// A domain trust rule to the wire.
pub fn rule_to_pb(r: &TrustRule, revision: i64) -> pb::TrustRule {
    pb::TrustRule {
        name: r.name.clone(),
        issuer: r.issuer.clone(),
        priority: r.priority,
        conditions: r
            .conditions
            .iter()
            .map(|c| pb::ClaimCondition {
                claim: c.claim.clone(),
                matcher: Some(match &c.matcher {
                    ClaimMatcher::Exact(v) => pb::claim_condition::Matcher::Exact(v.clone()),
                    ClaimMatcher::Glob(v) => pb::claim_condition::Matcher::Glob(v.clone()),
                    ClaimMatcher::OneOf(v) => {
                        pb::claim_condition::Matcher::OneOf(pb::StringList { values: v.clone() })
                    }
                }),
            })
            .collect(),
        workload_template: r.workload_template.clone(),
        task_claim: r.task_claim.clone().unwrap_or_default(),
        revision,
    }
}

/// A wire destination to the domain spec.
pub fn destination_from_pb(d: pb::Destination) -> DestinationSpec {
    DestinationSpec {
        name: d.name,
        kind: d.kind,
        default_ttl_secs: if d.default_ttl_seconds == 0 {
            900.min(u64::from(if d.max_ttl_seconds == 0 {
                3600
            } else {
                d.max_ttl_seconds
            }))
        } else {
            u64::from(d.default_ttl_seconds)
        },
        max_ttl_secs: if d.max_ttl_seconds == 0 {
            3600
        } else {
            u64::from(d.max_ttl_seconds)
        },
        scopes: d.scopes,
        labels: d.labels.into_iter().collect::<BTreeMap<_, _>>(),
        settings: d
            .settings
            .map(struct_to_json)
            .unwrap_or(serde_json::Value::Object(serde_json::Map::new())),
        require_audit_sink: Some(d.require_audit_sink).filter(|s| !s.is_empty()),
        max_audit_lag: u64::from(d.max_audit_lag),
        introspection_clients: d.introspection_clients,
    }
}

/// A domain destination to the wire.
pub fn destination_to_pb(s: &DestinationSpec, revision: i64) -> pb::Destination {
    pb::Destination {
        name: s.name.clone(),
        kind: s.kind.clone(),
        default_ttl_seconds: u32::try_from(s.default_ttl_secs).unwrap_or(u32::MAX),
        max_ttl_seconds: u32::try_from(s.max_ttl_secs).unwrap_or(u32::MAX),
        scopes: s.scopes.clone(),
        labels: s.labels.clone().into_iter().collect(),
        settings: match json_to_value(&s.settings).kind {
            Some(prost_types::value::Kind::StructValue(st)) => Some(st),
            _ => None,
        },
        revision,
        require_audit_sink: s.require_audit_sink.clone().unwrap_or_default(),
        max_audit_lag: u32::try_from(s.max_audit_lag).unwrap_or(u32::MAX),
        introspection_clients: s.introspection_clients.clone(),
    }
}

/// A grant record to the wire.
pub fn grant_to_pb(g: &GrantRecord) -> pb::Grant {
    pb::Grant {
        id: g.id.to_string(),
        workload_id: g.workload_id.clone(),
        issuer: g.issuer.clone(),
        trust_rule: g.trust_rule.clone(),
        task_id: g.task_id.clone().unwrap_or_default(),
        destination: g.destination.clone(),
        scopes: g.scopes.clone(),
        actor_chain: g.actor_chain.clone(),
        issued_at: ts(g.issued_at),
        expires_at: ts(g.expires_at),
        status: g.status.as_str().into(),
        finished_at: g.finished_at.and_then(ts),
        revocation_handle: g.revocation_handle.clone(),
        renew_count: g.renew_count,
    }
}

/// A credential to the wire. The one place a credential's secret is copied out.
pub fn credential_to_pb(c: Credential) -> pb::Credential {
    match c {
        Credential::Bearer {
            token,
            token_type,
            issued_token_type,
            header,
        } => pb::Credential {
            kind: Some(pb::credential::Kind::Bearer(pb::BearerToken {
                token: token.into_inner(),
                token_type,
                issued_token_type,
                header,
            })),
        },
        Credential::Database {
            host,
            port,
            database,
            username,
            password,
        } => pb::Credential {
            kind: Some(pb::credential::Kind::Database(pb::DatabaseCredentials {
                host,
                port: u32::from(port),
                database,
                username,
                password: password.into_inner(),
            })),
        },
        Credential::Aws {
            access_key_id,
            secret_access_key,
            session_token,
            region,
        } => pb::Credential {
            kind: Some(pb::credential::Kind::Aws(pb::AwsCredentials {
                access_key_id,
                secret_access_key: secret_access_key.into_inner(),
                session_token: session_token.into_inner(),
                region,
            })),
        },
    }
}

/// Revocability to the wire enum.
pub fn revocability_to_pb(r: Revocability) -> i32 {
    match r {
        Revocability::Immediate => pb::Revocability::Immediate as i32,
        Revocability::AtExpiry => pb::Revocability::AtExpiry as i32,
        Revocability::Eventual => pb::Revocability::Eventual as i32,
    }
}

/// A revocation outcome to a receipt.
pub fn receipt_to_pb(g: &GrantRecord, o: &RevokeOutcome, at: i64) -> pb::RevocationReceipt {
    let (outcome, expires_at, detail) = match o {
        RevokeOutcome::Revoked { detail } => ("revoked", None, detail.clone()),
        RevokeOutcome::Blocked { detail } => ("blocked", ts(g.expires_at), detail.clone()),
        RevokeOutcome::ExpiresAt { at, detail } => ("expires_at", ts(*at), detail.clone()),
    };
    pb::RevocationReceipt {
        grant_id: g.id.to_string(),
        destination: g.destination.clone(),
        outcome: outcome.into(),
        expires_at,
        detail,
        at: ts(at),
        ..pb::RevocationReceipt::default()
    }
}

/// Milliseconds to a protobuf timestamp.
pub fn ts_ms(ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

fn count32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A wire selector to the domain one.
///
/// # Errors
/// `INVALID_ARGUMENT` when none is set.
pub fn selector_from_pb(s: Option<pb::RevokeSelector>) -> Result<RevokeSelector, ApiError> {
    use pb::revoke_selector::Selector as S;
    match s.and_then(|s| s.selector) {
        Some(S::GrantId(v)) => Ok(RevokeSelector::Grant(v)),
        Some(S::TaskId(v)) => Ok(RevokeSelector::Task(v)),
        Some(S::WorkloadId(v)) => Ok(RevokeSelector::Workload(v)),
        Some(S::WorkloadPrefix(v)) => Ok(RevokeSelector::WorkloadPrefix(v)),
        Some(S::Issuer(v)) => Ok(RevokeSelector::Issuer(v)),
        Some(S::Destination(v)) => Ok(RevokeSelector::Destination(v)),
        None => Err(ApiError::invalid(
            "a selector is required: grant_id, task_id, workload_id, workload_prefix, issuer or destination",
        )),
    }
}

/// A domain selector to the wire.
pub fn selector_to_pb(s: &RevokeSelector) -> pb::RevokeSelector {
    use pb::revoke_selector::Selector as S;
    let v = s.value().to_owned();
    pb::RevokeSelector {
        selector: Some(match s {
            RevokeSelector::Grant(_) => S::GrantId(v),
            RevokeSelector::Task(_) => S::TaskId(v),
            RevokeSelector::Workload(_) => S::WorkloadId(v),
            RevokeSelector::WorkloadPrefix(_) => S::WorkloadPrefix(v),
            RevokeSelector::Issuer(_) => S::Issuer(v),
            RevokeSelector::Destination(_) => S::Destination(v),
        }),
    }
}

/// Per-destination step counts to the wire.
pub fn progress_to_pb(p: &DestinationProgress) -> pb::RevocationDestination {
    pb::RevocationDestination {
        destination: p.destination.clone(),
        pending: count32(p.pending),
        revoked: count32(p.revoked),
        expires_at: count32(p.expires_at),
        failed: count32(p.failed),
        latest_expiry: p.latest_expiry.and_then(ts),
        abandoned: count32(p.abandoned),
        blocked: count32(p.blocked),
    }
}

/// A job and its progress to the wire.
pub fn job_to_pb(
    j: &RevocationJob,
    progress: &[DestinationProgress],
    deny_entry: Option<String>,
) -> pb::RevocationJob {
    pb::RevocationJob {
        id: j.id.clone(),
        selector: Some(selector_to_pb(&j.selector)),
        reason: j.reason.clone(),
        requested_by: j.requested_by.clone(),
        created_at: ts_ms(j.created_at_ms),
        matched: count32(j.matched),
        state: j.state.as_str().into(),
        finished_at: j.finished_at_ms.and_then(ts_ms),
        destinations: progress.iter().map(progress_to_pb).collect(),
        receipts: u32::try_from(j.receipts).unwrap_or(u32::MAX),
        deny_entry: deny_entry.unwrap_or_default(),
    }
}

/// A stored job receipt to the wire.
pub fn job_receipt_to_pb(r: &RevocationReceiptRecord) -> pb::RevocationReceipt {
    pb::RevocationReceipt {
        grant_id: match r.grant_ids.as_slice() {
            [one] => one.clone(),
            _ => String::new(),
        },
        destination: r.destination.clone(),
        outcome: r.outcome.as_str().into(),
        expires_at: r.expires_at.and_then(ts),
        detail: r.detail.clone(),
        at: ts_ms(r.created_at_ms),
        signature: r.signature.clone(),
        job_id: r.job_id.clone(),
        seq: u32::try_from(r.seq).unwrap_or(u32::MAX),
        grant_ids: r.grant_ids.clone(),
        retry_at: r.retry_at_ms.and_then(ts_ms),
    }
}

/// A deny entry to the wire.
pub fn deny_to_pb(d: &crate::revoke::DenyEntry) -> pb::DenyEntry {
    pb::DenyEntry {
        name: d.name(),
        kind: d.kind.clone(),
        value: d.value.clone(),
        reason: d.reason.clone(),
        job_id: d.job_id.clone(),
        created_at: ts(d.created_at),
        expires_at: d.expires_at.and_then(ts),
        created_by: d.created_by.clone(),
    }
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
    }
}

/// JSON to a protobuf `Value`.
pub fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_struct() {
        let spec: DestinationSpec = serde_json::from_value(serde_json::json!({
            "name": "orders", "kind": "jwt", "scopes": ["read"],
            "settings": {"audience": "https://orders", "extra_claims": ["repository"], "n": 3}
        }))
        .unwrap();
        let back = destination_from_pb(destination_to_pb(&spec, 1));
        assert_eq!(back, spec);
    }
}
