//! Printing: readable tables, JSON documents, timestamps and durations, and the JSON form
//! of every wire message the CLI shows (the generated messages have no serde).
//!
//! ## Why
//! Everything goes through [`emit`] so that a closed pipe (`lanyard audit tail | head`)
//! is an error the caller handles, never a panic.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use comfy_table::{Table, presets};
use lanyard_core::{Clock, SystemClock};
use lanyard_proto::v1 as pb;
use prost_types::Timestamp;
use serde_json::{Value, json};

/// Write `text` and a newline to standard output.
///
/// # Errors
/// When standard output is closed or fails.
pub fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Write a line to standard error, ignoring failure (there is nowhere left to report it).
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Print a JSON value, pretty.
///
/// # Errors
/// When standard output fails.
pub fn emit_json(v: &Value) -> std::io::Result<()> {
    emit(&serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()))
}

/// A two-column "field  value" table.
pub fn kv_table(rows: &[(&str, String)]) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v.clone()]);
    }
    trim_lines(&t.to_string())
}

/// A list with a header row.
pub fn list_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    for r in rows {
        t.add_row(r);
    }
    trim_lines(&t.to_string())
}

fn trim_lines(s: &str) -> String {
    s.lines()
        .map(|l| l.trim_end().strip_prefix(' ').unwrap_or(l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The current time, seconds.
pub fn now() -> i64 {
    SystemClock.now_unix()
}

/// RFC 3339 (UTC, whole seconds), or "-" when unset.
pub fn rfc3339(ts: Option<&Timestamp>) -> String {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// RFC 3339 as a JSON value, or null when unset.
pub fn ts_json(ts: Option<&Timestamp>) -> Value {
    match ts {
        Some(_) => Value::String(rfc3339(ts)),
        None => Value::Null,
    }
}

/// A duration the way Go prints it, without sub-second parts: `42s`, `5m0s`, `2h3m0s`,
/// and days for anything longer: `3d4h`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `in 5m0s` or `3m12s ago`, relative to `now`.
pub fn relative(ts: Option<&Timestamp>, now: i64) -> String {
    match ts {
        None => "-".into(),
        Some(t) if t.seconds >= now => {
            format!("in {}", human_duration((t.seconds - now).unsigned_abs()))
        }
        Some(t) => format!("{} ago", human_duration((now - t.seconds).unsigned_abs())),
    }
}

/// RFC 3339 followed by the relative time: `2026-01-01T00:05:00Z (in 5m0s)`.
pub fn when(ts: Option<&Timestamp>, now: i64) -> String {
    match ts {
        None => "-".into(),
        Some(_) => format!("{} ({})", rfc3339(ts), relative(ts, now)),
    }
}

/// A list of strings for a table cell; "-" when empty.
pub fn joined(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// An optional string for a table cell; "-" when empty.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Revocability in words.
pub fn revocability_str(r: i32) -> &'static str {
    match pb::Revocability::try_from(r) {
        Ok(pb::Revocability::Immediate) => "immediate",
        Ok(pb::Revocability::AtExpiry) => "at_expiry",
        Ok(pb::Revocability::Eventual) => "eventual",
        Ok(pb::Revocability::Unspecified) | Err(_) => "unspecified",
    }
}

fn revocability_words(r: i32) -> String {
    match pb::Revocability::try_from(r) {
        Ok(pb::Revocability::Immediate) => "immediate (release or revoke stops it at once)".into(),
        Ok(pb::Revocability::AtExpiry) => {
            "at expiry (the destination cannot revoke early; it lives until it expires)".into()
        }
        Ok(pb::Revocability::Eventual) => {
            "eventual (a deny rule blocks it after propagation)".into()
        }
        Ok(pb::Revocability::Unspecified) | Err(_) => "unspecified".into(),
    }
}

// === protobuf Struct <-> JSON ===

/// A protobuf `Struct` as JSON.
pub fn struct_json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                #[allow(clippy::cast_possible_truncation)] // integral and in range, checked above
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_json).collect()),
    }
}

// === exchange / renew / release ===

/// The credential as JSON. Contains the secret: only `exchange` and `renew` print it.
pub fn credential_json(c: Option<&pb::Credential>) -> Value {
    match c.and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Bearer(b)) => json!({
            "type": "bearer",
            "token": b.token,
            "token_type": b.token_type,
            "issued_token_type": b.issued_token_type,
            "header": b.header,
        }),
        Some(pb::credential::Kind::Aws(a)) => json!({
            "type": "aws",
            "access_key_id": a.access_key_id,
            "secret_access_key": a.secret_access_key,
            "session_token": a.session_token,
            "region": a.region,
        }),
        Some(pb::credential::Kind::Database(d)) => json!({
            "type": "database",
            "host": d.host,
            "port": d.port,
            "database": d.database,
            "username": d.username,
            "password": d.password,
        }),
        None => Value::Null,
    }
}

/// An exchange or renew response as JSON, credential included.
pub fn exchange_json(r: &pb::ExchangeResponse) -> Value {
    json!({
        "grant_id": r.grant_id,
        "workload_id": r.workload_id,
        "task_id": r.task_id,
        "destination": r.destination,
        "scopes": r.scopes,
        "expires_at": ts_json(r.expires_at.as_ref()),
        "revocability": revocability_str(r.revocability),
        "credential": credential_json(r.credential.as_ref()),
    })
}

/// The non-secret rows describing an exchange or renew response.
pub fn exchange_rows(r: &pb::ExchangeResponse, now: i64) -> Vec<(&'static str, String)> {
    vec![
        ("grant id", r.grant_id.clone()),
        ("workload", r.workload_id.clone()),
        ("task", or_dash(&r.task_id)),
        ("destination", r.destination.clone()),
        ("scopes", joined(&r.scopes)),
        ("expires at", when(r.expires_at.as_ref(), now)),
        ("revocability", revocability_words(r.revocability)),
    ]
}

/// The rows carrying the credential itself. Secret: only `exchange` and `renew` print it.
pub fn credential_rows(c: Option<&pb::Credential>) -> Vec<(&'static str, String)> {
    match c.and_then(|c| c.kind.as_ref()) {
        Some(pb::credential::Kind::Bearer(b)) => vec![
            (
                "header",
                format!("{}: {} <token>", or_dash(&b.header), b.token_type),
            ),
            ("token type", or_dash(&b.issued_token_type)),
            ("token", b.token.clone()),
        ],
        Some(pb::credential::Kind::Aws(a)) => vec![
            ("access key id", a.access_key_id.clone()),
            ("secret access key", a.secret_access_key.clone()),
            ("session token", a.session_token.clone()),
            ("region", or_dash(&a.region)),
        ],
        Some(pb::credential::Kind::Database(d)) => vec![
            ("host", format!("{}:{}", d.host, d.port)),
            ("database", d.database.clone()),
            ("username", d.username.clone()),
            ("password", d.password.clone()),
        ],
        None => vec![("credential", "-".into())],
    }
}

/// A revocation receipt as JSON.
pub fn receipt_json(r: &pb::RevocationReceipt) -> Value {
    json!({
        "grant_id": r.grant_id,
        "destination": r.destination,
        "outcome": r.outcome,
        "expires_at": ts_json(r.expires_at.as_ref()),
        "detail": r.detail,
        "at": ts_json(r.at.as_ref()),
        "signature": r.signature,
        "job_id": r.job_id,
        "seq": r.seq,
        "grant_ids": r.grant_ids,
        "retry_at": ts_json(r.retry_at.as_ref()),
    })
}

/// A release response as JSON.
pub fn release_json(r: &pb::ReleaseResponse) -> Value {
    json!({
        "grant_id": r.grant_id,
        "status": r.status,
        "receipt": r.receipt.as_ref().map(receipt_json),
    })
}

/// Rows describing a release response.
pub fn release_rows(r: &pb::ReleaseResponse, now: i64) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("grant id", r.grant_id.clone()),
        ("status", r.status.clone()),
    ];
    if let Some(rc) = &r.receipt {
        rows.push(("destination", or_dash(&rc.destination)));
        rows.push(("outcome", or_dash(&rc.outcome)));
        if rc.expires_at.is_some() {
            rows.push(("stops working", when(rc.expires_at.as_ref(), now)));
        }
        rows.push(("detail", or_dash(&rc.detail)));
        rows.push(("at", rfc3339(rc.at.as_ref())));
    }
    rows
}

// === admin objects ===

/// Key status as JSON.
pub fn key_status_json(k: Option<&pb::KeySetStatus>) -> Value {
    match k {
        None => Value::Null,
        Some(k) => json!({
            "kids": k.kids,
            "fetched_at": ts_json(k.fetched_at.as_ref()),
            "fresh_until": ts_json(k.fresh_until.as_ref()),
            "stale": k.stale,
            "last_error": k.last_error,
        }),
    }
}

/// An issuer's key source as (kind, value).
pub fn issuer_keys(i: &pb::Issuer) -> (&'static str, String) {
    match &i.keys {
        Some(pb::issuer::Keys::DiscoveryUrl(u)) => ("discovery_url", u.clone()),
        Some(pb::issuer::Keys::JwksUrl(u)) => ("jwks_url", u.clone()),
        Some(pb::issuer::Keys::InlineJwks(j)) => ("inline_jwks", j.clone()),
        None => ("none", String::new()),
    }
}

/// An issuer as JSON.
pub fn issuer_json(i: &pb::Issuer) -> Value {
    let (kind, value) = issuer_keys(i);
    let keys = if kind == "inline_jwks" {
        serde_json::from_str(&value).unwrap_or(Value::String(value))
    } else {
        Value::String(value)
    };
    json!({
        "name": i.name,
        "issuer_url": i.issuer_url,
        "keys": { "type": kind, "value": keys },
        "allowed_algorithms": i.allowed_algorithms,
        "audiences": i.audiences,
        "leeway_seconds": i.leeway_seconds,
        "max_token_age_seconds": i.max_token_age_seconds,
        "replay_protection": i.replay_protection,
        "max_token_bytes": i.max_token_bytes,
        "revision": i.revision,
        "key_status": key_status_json(i.key_status.as_ref()),
    })
}

/// Rows describing an issuer, key cache included.
pub fn issuer_rows(i: &pb::Issuer, now: i64) -> Vec<(&'static str, String)> {
    let (kind, value) = issuer_keys(i);
    let keys = if kind == "inline_jwks" {
        format!("inline JWKS ({} bytes)", value.len())
    } else {
        format!("{kind} {value}")
    };
    let mut rows = vec![
        ("name", i.name.clone()),
        ("issuer url", i.issuer_url.clone()),
        ("keys from", keys),
        ("algorithms", joined(&i.allowed_algorithms)),
        ("audiences", joined(&i.audiences)),
        ("leeway", human_duration(u64::from(i.leeway_seconds))),
        (
            "max token age",
            if i.max_token_age_seconds == 0 {
                "no limit".into()
            } else {
                human_duration(u64::from(i.max_token_age_seconds))
            },
        ),
        ("replay protection", on_off(i.replay_protection)),
        (
            "max token bytes",
            if i.max_token_bytes == 0 {
                "default".into()
            } else {
                i.max_token_bytes.to_string()
            },
        ),
        ("revision", i.revision.to_string()),
    ];
    match &i.key_status {
        None => rows.push(("key status", "not loaded yet".into())),
        Some(k) => {
            rows.push(("key ids", joined(&k.kids)));
            rows.push(("fetched at", when(k.fetched_at.as_ref(), now)));
            rows.push(("fresh until", when(k.fresh_until.as_ref(), now)));
            rows.push(("stale", yes_no(k.stale)));
            rows.push(("last error", or_dash(&k.last_error)));
        }
    }
    rows
}

fn on_off(b: bool) -> String {
    if b { "on".into() } else { "off".into() }
}

/// "yes" or "no".
pub fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

/// One claim condition in words and as JSON.
pub fn condition_str(c: &pb::ClaimCondition) -> String {
    match &c.matcher {
        Some(pb::claim_condition::Matcher::Exact(v)) => format!("{} == {v:?}", c.claim),
        Some(pb::claim_condition::Matcher::Glob(v)) => format!("{} ~ {v:?}", c.claim),
        Some(pb::claim_condition::Matcher::OneOf(l)) => {
            format!("{} in [{}]", c.claim, l.values.join(","))
        }
        None => format!("{} ?", c.claim),
    }
}

/// All conditions of a rule, joined by "and"; "-" when there are none.
pub fn conditions_str(c: &[pb::ClaimCondition]) -> String {
    if c.is_empty() {
        "-".into()
    } else {
        c.iter()
            .map(condition_str)
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

fn condition_json(c: &pb::ClaimCondition) -> Value {
    match &c.matcher {
        Some(pb::claim_condition::Matcher::Exact(v)) => json!({"claim": c.claim, "exact": v}),
        Some(pb::claim_condition::Matcher::Glob(v)) => json!({"claim": c.claim, "glob": v}),
        Some(pb::claim_condition::Matcher::OneOf(l)) => {
            json!({"claim": c.claim, "one_of": l.values})
        }
        None => json!({"claim": c.claim}),
    }
}

/// A trust rule as JSON.
pub fn rule_json(r: &pb::TrustRule) -> Value {
    json!({
        "name": r.name,
        "issuer": r.issuer,
        "priority": r.priority,
        "conditions": r.conditions.iter().map(condition_json).collect::<Vec<_>>(),
        "workload_template": r.workload_template,
        "task_claim": r.task_claim,
        "revision": r.revision,
    })
}

/// A destination as JSON.
pub fn destination_json(d: &pb::Destination) -> Value {
    json!({
        "name": d.name,
        "kind": d.kind,
        "default_ttl_seconds": d.default_ttl_seconds,
        "max_ttl_seconds": d.max_ttl_seconds,
        "scopes": d.scopes,
        "labels": d.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "settings": d.settings.as_ref().map_or(json!({}), struct_json),
        "revision": d.revision,
        "require_audit_sink": d.require_audit_sink,
        "max_audit_lag": d.max_audit_lag,
        "introspection_clients": d.introspection_clients,
    })
}

/// A destination's labels as `k=v,...`.
pub fn labels_str(d: &pb::Destination) -> String {
    let mut v: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    joined(&v)
}

/// A grant as JSON.
pub fn grant_json(g: &pb::Grant) -> Value {
    json!({
        "id": g.id,
        "workload_id": g.workload_id,
        "issuer": g.issuer,
        "trust_rule": g.trust_rule,
        "task_id": g.task_id,
        "destination": g.destination,
        "scopes": g.scopes,
        "actor_chain": g.actor_chain,
        "issued_at": ts_json(g.issued_at.as_ref()),
        "expires_at": ts_json(g.expires_at.as_ref()),
        "status": g.status,
        "finished_at": ts_json(g.finished_at.as_ref()),
        "revocation_handle": g.revocation_handle,
        "renew_count": g.renew_count,
    })
}

/// Rows describing a grant.
pub fn grant_rows(g: &pb::Grant, now: i64) -> Vec<(&'static str, String)> {
    vec![
        ("id", g.id.clone()),
        ("status", g.status.clone()),
        ("workload", g.workload_id.clone()),
        ("issuer", or_dash(&g.issuer)),
        ("trust rule", or_dash(&g.trust_rule)),
        ("task", or_dash(&g.task_id)),
        ("destination", g.destination.clone()),
        ("scopes", joined(&g.scopes)),
        ("actor chain", joined(&g.actor_chain)),
        ("issued at", when(g.issued_at.as_ref(), now)),
        ("expires at", when(g.expires_at.as_ref(), now)),
        ("finished at", when(g.finished_at.as_ref(), now)),
        ("revocation handle", or_dash(&g.revocation_handle)),
        ("renewals", g.renew_count.to_string()),
    ]
}

/// The grants list table.
pub fn grants_table(grants: &[pb::Grant], now: i64) -> String {
    list_table(
        &[
            "id",
            "workload",
            "destination",
            "scopes",
            "status",
            "expires",
        ],
        grants
            .iter()
            .map(|g| {
                vec![
                    g.id.clone(),
                    g.workload_id.clone(),
                    g.destination.clone(),
                    joined(&g.scopes),
                    g.status.clone(),
                    relative(g.expires_at.as_ref(), now),
                ]
            })
            .collect(),
    )
}

/// An explain response as JSON.
pub fn explain_json(e: &pb::ExplainResponse) -> Value {
    json!({
        "allowed": e.allowed,
        "reason": e.reason,
        "message": e.message,
        "workload_id": e.workload_id,
        "trust_rule": e.trust_rule,
        "issuer": e.issuer,
        "policy_version": e.policy_version,
        "determining_policies": e.determining_policies,
        "granted_scopes": e.granted_scopes,
        "max_ttl_seconds": (e.max_ttl_seconds > 0).then_some(e.max_ttl_seconds),
    })
}

/// A signing key as JSON.
pub fn signing_key_json(k: &pb::SigningKey) -> Value {
    json!({
        "kid": k.kid,
        "algorithm": k.algorithm,
        "state": k.state,
        "created_at": ts_json(k.created_at.as_ref()),
        "activate_at": ts_json(k.activate_at.as_ref()),
        "retired_at": ts_json(k.retired_at.as_ref()),
    })
}

// === audit ===

/// An audit event as JSON, the payload parsed.
pub fn audit_json(e: &pb::AuditEvent) -> Value {
    json!({
        "seq": e.seq,
        "time": audit_time(e),
        "kind": e.kind,
        "payload": serde_json::from_str::<Value>(&e.payload_json)
            .unwrap_or_else(|_| Value::String(e.payload_json.clone())),
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    })
}

fn audit_time(e: &pb::AuditEvent) -> String {
    e.time
        .as_ref()
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// The payload fields shown on an audit line, in this order.
const AUDIT_FIELDS: &[&str] = &[
    "decision",
    "reason",
    "workload_id",
    "destination",
    "task_id",
    "grant_id",
    "issuer",
    "actor",
    "policy_version",
    "subject_fingerprint",
    "trace_id",
];

/// One readable line: `SEQ TIME KIND key=value ...`.
pub fn audit_line(e: &pb::AuditEvent) -> String {
    let payload: Value = serde_json::from_str(&e.payload_json).unwrap_or(Value::Null);
    let mut line = format!("{:>6}  {}  {:<20}", e.seq, audit_time(e), e.kind);
    for f in AUDIT_FIELDS {
        if let Some(v) = payload.get(*f).and_then(Value::as_str) {
            // Long hashes shortened for reading; `--output json` has them whole.
            let v = match (*f, v.char_indices().nth(24)) {
                ("subject_fingerprint" | "trace_id", Some((cut, _))) => format!("{}…", &v[..cut]),
                _ => v.to_owned(),
            };
            line.push_str(&format!(" {f}={v}"));
        }
    }
    let detail = payload.get("detail");
    for f in ["name", "kid"] {
        if let Some(v) = detail.and_then(|d| d.get(f)).and_then(Value::as_str) {
            line.push_str(&format!(" {f}={v}"));
        }
    }
    // Scopes are a top-level field; events written before they were kept them in detail.
    if let Some(scopes) = payload
        .get("scopes")
        .or_else(|| detail.and_then(|d| d.get("scopes")))
        .and_then(Value::as_array)
    {
        let s: Vec<&str> = scopes.iter().filter_map(Value::as_str).collect();
        if !s.is_empty() {
            line.push_str(&format!(" scopes={}", s.join(",")));
        }
    }
    line.trim_end().to_string()
}

// === JWT ===

/// Decode a compact JWT's header and claims, without verifying anything.
///
/// # Errors
/// When the text is not three dot-separated base64url JSON parts.
pub fn decode_jwt(token: &str) -> anyhow::Result<(Value, Value)> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("the credential is not a compact JWT (header.payload.signature)");
    };
    let part = |s: &str, what: &str| -> anyhow::Result<Value> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|e| anyhow::anyhow!("JWT {what} is not base64url: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("JWT {what} is not JSON: {e}"))
    };
    Ok((part(h, "header")?, part(p, "payload")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_go() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(300), "5m0s");
        assert_eq!(human_duration(3723), "1h2m3s");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3600), "2d3h");
        let ts = Timestamp {
            seconds: 1300,
            nanos: 0,
        };
        assert_eq!(relative(Some(&ts), 1000), "in 5m0s");
        assert_eq!(relative(Some(&ts), 1312), "12s ago");
        assert_eq!(
            rfc3339(Some(&Timestamp {
                seconds: 0,
                nanos: 0
            })),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn jwt_parts_decode() {
        let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let t = format!(
            "{}.{}.sig",
            enc(&json!({"alg": "ES256"})),
            enc(&json!({"sub": "a"}))
        );
        let (h, p) = decode_jwt(&t).unwrap();
        assert_eq!(h["alg"], "ES256");
        assert_eq!(p["sub"], "a");
        assert!(decode_jwt("a.b").is_err());
    }

    #[test]
    fn struct_values_become_json() {
        let v = lanyard_server::convert::json_to_value(&json!({"a": "x", "n": 3, "l": [true]}));
        let Some(prost_types::value::Kind::StructValue(s)) = v.kind else {
            panic!("not a struct")
        };
        assert_eq!(struct_json(&s), json!({"a": "x", "n": 3, "l": [true]}));
    }
}
