//! The operator commands on the admin socket: issuers, trust rules, destinations,
//! grants, explain and signing keys.

use anyhow::Context;
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::args::{
    DestinationCommand, DestinationPutArgs, DestinationSecretCommand, ExplainArgs, GlobalArgs,
    GrantsCommand, GrantsListArgs, IssuerCommand, IssuerPutArgs, KeysCommand, OutputFormat,
    TrustRuleCommand, TrustRulePutArgs,
};
use crate::client::{RpcResultExt, admin_client, admin_target};
use crate::output::{self, emit, emit_json, joined, kv_table, list_table, now, or_dash};
use crate::workload::read_token;

/// A connected admin client and the name of where it is connected, for messages.
struct Admin {
    client: AdminServiceClient<Channel>,
    target: String,
}

impl Admin {
    async fn connect(g: &GlobalArgs) -> anyhow::Result<Self> {
        let path = g.admin_socket_or_default();
        Ok(Self {
            client: admin_client(&path).await?,
            target: admin_target(&path),
        })
    }
}

fn print(
    g: &GlobalArgs,
    json: impl FnOnce() -> Value,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match g.output {
        OutputFormat::Json => emit_json(&json())?,
        OutputFormat::Table => emit(&table())?,
    }
    Ok(())
}

fn print_deleted(g: &GlobalArgs, kind: &str, r: &pb::DeleteResponse) -> anyhow::Result<()> {
    print(
        g,
        || json!({ "deleted": r.name }),
        || format!("deleted {kind} {}", r.name),
    )
}

// === issuer ===

/// `lanyard issuer ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn issuer(g: &GlobalArgs, cmd: &IssuerCommand) -> anyhow::Result<()> {
    let mut a = Admin::connect(g).await?;
    match cmd {
        IssuerCommand::Put(p) => {
            let issuer = issuer_from_args(p)?;
            let r = a
                .client
                .put_issuer(pb::PutIssuerRequest {
                    issuer: Some(issuer),
                    expected_revision: None,
                })
                .await
                .or_rpc_error(&a.target)?;
            print_issuer(g, &r)
        }
        IssuerCommand::List => {
            let r = a
                .client
                .list_issuers(pb::ListRequest::default())
                .await
                .or_rpc_error(&a.target)?;
            print(
                g,
                || json!({ "issuers": r.issuers.iter().map(output::issuer_json).collect::<Vec<_>>() }),
                || {
                    list_table(
                        &[
                            "name",
                            "issuer url",
                            "keys",
                            "algorithms",
                            "audiences",
                            "key ids",
                            "stale",
                        ],
                        r.issuers
                            .iter()
                            .map(|i| {
                                let k = i.key_status.as_ref();
                                vec![
                                    i.name.clone(),
                                    i.issuer_url.clone(),
                                    output::issuer_keys(i).0.to_string(),
                                    joined(&i.allowed_algorithms),
                                    joined(&i.audiences),
                                    k.map_or("-".into(), |k| joined(&k.kids)),
                                    k.map_or("-".into(), |k| output::yes_no(k.stale)),
                                ]
                            })
                            .collect(),
                    )
                },
            )
        }
        IssuerCommand::Get { name } => {
            let r = a
                .client
                .get_issuer(pb::GetRequest { name: name.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print_issuer(g, &r)
        }
        IssuerCommand::Delete { name } => {
            let r = a
                .client
                .delete_issuer(pb::DeleteRequest { name: name.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print_deleted(g, "issuer", &r)
        }
        IssuerCommand::Refresh { name } => {
            let r = a
                .client
                .refresh_issuer_keys(pb::GetRequest { name: name.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print_issuer(g, &r)
        }
        IssuerCommand::Distrust { name, reason } => {
            let stream = a
                .client
                .distrust_issuer(pb::DistrustIssuerRequest {
                    name: name.clone(),
                    reason: reason.clone(),
                })
                .await
                .or_rpc_error(&a.target)?;
            crate::revoke::show_stream(g, stream, &a.target).await
        }
    }
}

/// The longest key file read.
const MAX_SECRET_INPUT: u64 = 64 << 10;

/// Read a key from `path` (`-` or `None`: standard input): one line, final newline
/// dropped. Errors never include the contents.
fn read_secret_input(path: Option<&std::path::Path>) -> anyhow::Result<lanyard_core::Secret> {
    use std::io::Read as _;
    let mut raw = String::new();
    match path.filter(|p| p.as_os_str() != "-") {
        Some(p) => std::fs::File::open(p)
            .and_then(|f| f.take(MAX_SECRET_INPUT).read_to_string(&mut raw))
            .map_err(|e| anyhow::anyhow!("cannot read {}: {}", p.display(), e.kind()))?,
        None => std::io::stdin()
            .take(MAX_SECRET_INPUT)
            .read_to_string(&mut raw)
            .map_err(|e| anyhow::anyhow!("cannot read standard input: {}", e.kind()))?,
    };
    let line = raw.strip_suffix('\n').unwrap_or(&raw);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() || line.contains(['\r', '\n']) {
        anyhow::bail!("the key must be one non-empty line");
    }
    Ok(lanyard_core::Secret::new(line))
}

async fn destination_secret(
    g: &GlobalArgs,
    a: &mut Admin,
    cmd: &DestinationSecretCommand,
) -> anyhow::Result<()> {
    let r = match cmd {
        DestinationSecretCommand::Set { name, from_file } => {
            let secret = read_secret_input(from_file.as_deref())?;
            a.client
                .put_destination_secret(pb::PutDestinationSecretRequest {
                    destination: name.clone(),
                    secret: secret.into_inner(),
                })
                .await
                .or_rpc_error(&a.target)?
        }
        DestinationSecretCommand::Show { name } => a
            .client
            .get_destination_secret(pb::GetRequest { name: name.clone() })
            .await
            .or_rpc_error(&a.target)?,
    };
    print(
        g,
        || {
            json!({
                "destination": r.destination,
                "secret_set": r.secret_set,
                "secret_updated_at": output::ts_json(r.secret_updated_at.as_ref()),
                "fingerprint": r.fingerprint,
                "updated_by": r.updated_by,
                "bound": r.bound,
            })
        },
        || {
            kv_table(&[
                ("destination", r.destination.clone()),
                (
                    "secret set",
                    if r.secret_set { "yes" } else { "no" }.to_owned(),
                ),
                ("updated", output::when(r.secret_updated_at.as_ref(), now())),
                ("updated by", or_dash(&r.updated_by)),
                ("fingerprint", or_dash(&r.fingerprint)),
                (
                    "bound",
                    match (r.secret_set, r.bound) {
                        (false, _) => "-".to_owned(),
                        (true, true) => "yes (to the destination's current upstream and key header)".to_owned(),
                        (true, false) => "NO: the destination's upstream or key header changed since its key was set; the proxy does not send it (set the key again with `lanyard destination secret set`)".to_owned(),
                    },
                ),
            ])
        },
    )
}

fn print_issuer(g: &GlobalArgs, i: &pb::Issuer) -> anyhow::Result<()> {
    print(
        g,
        || output::issuer_json(i),
        || kv_table(&output::issuer_rows(i, now())),
    )
}

/// The wire issuer for `issuer put`.
///
/// # Errors
/// When `--jwks-file` cannot be read or is not JSON.
pub fn issuer_from_args(p: &IssuerPutArgs) -> anyhow::Result<pb::Issuer> {
    let keys = if let Some(u) = &p.keys.discovery_url {
        pb::issuer::Keys::DiscoveryUrl(u.clone())
    } else if let Some(u) = &p.keys.jwks_url {
        pb::issuer::Keys::JwksUrl(u.clone())
    } else if let Some(f) = &p.keys.jwks_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading JWKS file {}", f.display()))?;
        serde_json::from_str::<Value>(&text)
            .with_context(|| format!("JWKS file {} is not JSON", f.display()))?;
        pb::issuer::Keys::InlineJwks(text)
    } else {
        anyhow::bail!("one of --discovery-url, --jwks-url or --jwks-file is required");
    };
    Ok(pb::Issuer {
        name: p.name.clone(),
        issuer_url: p.issuer_url.clone(),
        keys: Some(keys),
        allowed_algorithms: p
            .algs
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
        audiences: p.audiences.clone(),
        leeway_seconds: p.leeway.unwrap_or(0),
        max_token_age_seconds: p.max_age.unwrap_or(0),
        replay_protection: p.replay_protection,
        max_token_bytes: p.max_token_bytes.unwrap_or(0),
        ..Default::default()
    })
}

// === trust-rule ===

/// The wire trust rule for `trust-rule put`.
pub fn rule_from_args(p: &TrustRulePutArgs) -> pb::TrustRule {
    use pb::claim_condition::Matcher;
    let mut conditions = Vec::new();
    for (claim, v) in &p.exact {
        conditions.push(pb::ClaimCondition {
            claim: claim.clone(),
            matcher: Some(Matcher::Exact(v.clone())),
        });
    }
    for (claim, v) in &p.glob {
        conditions.push(pb::ClaimCondition {
            claim: claim.clone(),
            matcher: Some(Matcher::Glob(v.clone())),
        });
    }
    for (claim, v) in &p.one_of {
        conditions.push(pb::ClaimCondition {
            claim: claim.clone(),
            matcher: Some(Matcher::OneOf(pb::StringList {
                values: v.split(',').map(str::to_string).collect(),
            })),
        });
    }
    pb::TrustRule {
        name: p.name.clone(),
        issuer: p.issuer.clone(),
        priority: p.priority,
        conditions,
        workload_template: p.template.clone(),
        task_claim: p.task_claim.clone().unwrap_or_default(),
        revision: 0,
    }
}

fn rule_rows(r: &pb::TrustRule) -> Vec<(&'static str, String)> {
    vec![
        ("name", r.name.clone()),
        ("issuer", r.issuer.clone()),
        ("priority", r.priority.to_string()),
        (
            "conditions",
            if r.conditions.is_empty() {
                "- (every token of the issuer)".into()
            } else {
                output::conditions_str(&r.conditions)
            },
        ),
        ("workload template", r.workload_template.clone()),
        ("task claim", or_dash(&r.task_claim)),
        ("revision", r.revision.to_string()),
    ]
}

/// `lanyard trust-rule ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn trust_rule(g: &GlobalArgs, cmd: &TrustRuleCommand) -> anyhow::Result<()> {
    let mut a = Admin::connect(g).await?;
    match cmd {
        TrustRuleCommand::Put(p) => {
            let r = a
                .client
                .put_trust_rule(pb::PutTrustRuleRequest {
                    rule: Some(rule_from_args(p)),
                    expected_revision: None,
                })
                .await
                .or_rpc_error(&a.target)?;
            print(g, || output::rule_json(&r), || kv_table(&rule_rows(&r)))
        }
        TrustRuleCommand::List { issuer } => {
            let r = a
                .client
                .list_trust_rules(pb::ListRequest {
                    issuer: issuer.clone().unwrap_or_default(),
                })
                .await
                .or_rpc_error(&a.target)?;
            print(
                g,
                || json!({ "rules": r.rules.iter().map(output::rule_json).collect::<Vec<_>>() }),
                || {
                    list_table(
                        &[
                            "name",
                            "issuer",
                            "priority",
                            "conditions",
                            "template",
                            "task claim",
                        ],
                        r.rules
                            .iter()
                            .map(|t| {
                                vec![
                                    t.name.clone(),
                                    t.issuer.clone(),
                                    t.priority.to_string(),
                                    output::conditions_str(&t.conditions),
                                    t.workload_template.clone(),
                                    or_dash(&t.task_claim),
                                ]
                            })
                            .collect(),
                    )
                },
            )
        }
        TrustRuleCommand::Delete { name } => {
            let r = a
                .client
                .delete_trust_rule(pb::DeleteRequest { name: name.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print_deleted(g, "trust rule", &r)
        }
    }
}

// === destination ===

/// The settings object of `destination put`: `--setting` strings, then `--settings-json`
/// merged over them.
///
/// # Errors
/// When `--settings-json` is not a JSON object.
pub fn settings_from_args(
    p: &DestinationPutArgs,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut settings: serde_json::Map<String, Value> = p
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Some(text) = &p.settings_json {
        match serde_json::from_str::<Value>(text).context("--settings-json is not JSON")? {
            Value::Object(o) => settings.extend(o),
            _ => anyhow::bail!("--settings-json must be a JSON object"),
        }
    }
    Ok(settings)
}

/// The wire destination for `destination put`.
///
/// # Errors
/// As [`settings_from_args`].
pub fn destination_from_args(p: &DestinationPutArgs) -> anyhow::Result<pb::Destination> {
    let settings = settings_from_args(p)?;
    let settings = match lanyard_server::convert::json_to_value(&Value::Object(settings)).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    Ok(pb::Destination {
        name: p.name.clone(),
        kind: p.kind.clone(),
        default_ttl_seconds: p.default_ttl.unwrap_or(0),
        max_ttl_seconds: p.max_ttl.unwrap_or(0),
        scopes: p.scopes.clone(),
        labels: p.labels.iter().cloned().collect(),
        settings,
        revision: 0,
        require_audit_sink: p.require_audit_sink.clone().unwrap_or_default(),
        max_audit_lag: if p.require_audit_sink.is_some() {
            p.max_audit_lag
        } else {
            0
        },
        introspection_clients: p.introspection_clients.clone(),
    })
}

fn destination_rows(d: &pb::Destination) -> Vec<(&'static str, String)> {
    vec![
        ("name", d.name.clone()),
        ("kind", d.kind.clone()),
        ("scopes", joined(&d.scopes)),
        (
            "requires audit sink",
            if d.require_audit_sink.is_empty() {
                "-".into()
            } else {
                format!("{} (lag <= {})", d.require_audit_sink, d.max_audit_lag)
            },
        ),
        (
            "default ttl",
            output::human_duration(u64::from(d.default_ttl_seconds)),
        ),
        (
            "max ttl",
            output::human_duration(u64::from(d.max_ttl_seconds)),
        ),
        ("labels", output::labels_str(d)),
        ("introspection clients", joined(&d.introspection_clients)),
        (
            "settings",
            d.settings
                .as_ref()
                .map_or("{}".into(), |s| output::struct_json(s).to_string()),
        ),
        ("revision", d.revision.to_string()),
    ]
}

/// `lanyard destination ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn destination(g: &GlobalArgs, cmd: &DestinationCommand) -> anyhow::Result<()> {
    // Validate local input before connecting.
    let put = match cmd {
        DestinationCommand::Put(p) => Some(destination_from_args(p)?),
        _ => None,
    };
    let mut a = Admin::connect(g).await?;
    match cmd {
        DestinationCommand::Put(_) => {
            let r = a
                .client
                .put_destination(pb::PutDestinationRequest {
                    destination: put,
                    expected_revision: None,
                })
                .await
                .or_rpc_error(&a.target)?;
            print(
                g,
                || output::destination_json(&r),
                || kv_table(&destination_rows(&r)),
            )
        }
        DestinationCommand::List => {
            let r = a
                .client
                .list_destinations(pb::ListRequest::default())
                .await
                .or_rpc_error(&a.target)?;
            print(
                g,
                || json!({ "destinations": r.destinations.iter().map(output::destination_json).collect::<Vec<_>>() }),
                || {
                    list_table(
                        &["name", "kind", "scopes", "default ttl", "max ttl", "labels"],
                        r.destinations
                            .iter()
                            .map(|d| {
                                vec![
                                    d.name.clone(),
                                    d.kind.clone(),
                                    joined(&d.scopes),
                                    output::human_duration(u64::from(d.default_ttl_seconds)),
                                    output::human_duration(u64::from(d.max_ttl_seconds)),
                                    output::labels_str(d),
                                ]
                            })
                            .collect(),
                    )
                },
            )
        }
        DestinationCommand::Delete { name } => {
            let r = a
                .client
                .delete_destination(pb::DeleteRequest { name: name.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print_deleted(g, "destination", &r)
        }
        DestinationCommand::Disable {
            name,
            reason,
            at_destination,
        } => {
            let stream = a
                .client
                .disable_destination(pb::DisableDestinationRequest {
                    name: name.clone(),
                    reason: reason.clone(),
                    at_destination: *at_destination,
                })
                .await
                .or_rpc_error(&a.target)?;
            crate::revoke::show_stream(g, stream, &a.target).await
        }
        DestinationCommand::Secret(cmd) => destination_secret(g, &mut a, cmd).await,
    }
}

// === grants ===

/// The first page request of `grants list`.
pub fn grants_request(l: &GrantsListArgs) -> pb::ListGrantsRequest {
    pb::ListGrantsRequest {
        workload_id: l.workload.clone().unwrap_or_default(),
        workload_prefix: l.workload_prefix.clone().unwrap_or_default(),
        issuer: l.issuer.clone().unwrap_or_default(),
        destination: l.destination.clone().unwrap_or_default(),
        task_id: l.task.clone().unwrap_or_default(),
        status: l.status.map(|s| s.as_str().to_string()).unwrap_or_default(),
        page_size: l.limit.unwrap_or(0),
        page_token: String::new(),
    }
}

/// `lanyard grants ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn grants(g: &GlobalArgs, cmd: &GrantsCommand) -> anyhow::Result<()> {
    let mut a = Admin::connect(g).await?;
    match cmd {
        GrantsCommand::List(l) => {
            let mut req = grants_request(l);
            let mut grants = Vec::new();
            let next = loop {
                let r = a
                    .client
                    .list_grants(req.clone())
                    .await
                    .or_rpc_error(&a.target)?;
                grants.extend(r.grants);
                if !l.all || r.next_page_token.is_empty() {
                    break r.next_page_token;
                }
                req.page_token = r.next_page_token;
            };
            match g.output {
                OutputFormat::Json => emit_json(&json!({
                    "grants": grants.iter().map(output::grant_json).collect::<Vec<_>>(),
                    "next_page_token": next,
                }))?,
                OutputFormat::Table => {
                    if grants.is_empty() {
                        emit("no grants match")?;
                    } else {
                        emit(&output::grants_table(&grants, now()))?;
                    }
                    if !next.is_empty() {
                        output::note("more grants match: use --all, or a larger --limit");
                    }
                }
            }
            Ok(())
        }
        GrantsCommand::Get { id } => {
            let r = a
                .client
                .get_grant(pb::GetRequest { name: id.clone() })
                .await
                .or_rpc_error(&a.target)?;
            print(
                g,
                || output::grant_json(&r),
                || kv_table(&output::grant_rows(&r, now())),
            )
        }
    }
}

// === explain ===

/// `lanyard explain`. Exits zero when the explanation was produced, allowed or not.
///
/// # Errors
/// When the token cannot be read or the admin socket cannot be reached.
pub async fn explain(g: &GlobalArgs, e: &ExplainArgs) -> anyhow::Result<()> {
    let token = read_token(&e.token.token_file)?;
    let mut a = Admin::connect(g).await?;
    let r = a
        .client
        .explain(pb::ExplainRequest {
            subject_token: token.into_inner(),
            destination: e.destination.clone(),
            scopes: e.scopes.clone(),
            requested_ttl_seconds: e.ttl.unwrap_or(0),
        })
        .await
        .or_rpc_error(&a.target)?;
    print(
        g,
        || output::explain_json(&r),
        || {
            kv_table(&[
                ("allowed", output::yes_no(r.allowed)),
                ("reason", or_dash(&r.reason)),
                ("message", or_dash(&r.message)),
                ("workload", or_dash(&r.workload_id)),
                ("trust rule", or_dash(&r.trust_rule)),
                ("issuer", or_dash(&r.issuer)),
                ("granted scopes", or_dash(&r.granted_scopes.join(", "))),
                (
                    "max ttl (policy)",
                    if r.max_ttl_seconds == 0 {
                        "-".into()
                    } else {
                        format!("{}s", r.max_ttl_seconds)
                    },
                ),
                ("policy version", or_dash(&r.policy_version)),
                ("determining policies", joined(&r.determining_policies)),
            ])
        },
    )
}

// === keys ===

fn key_row(k: &pb::SigningKey, now: i64) -> Vec<String> {
    vec![
        k.kid.clone(),
        k.algorithm.clone(),
        k.state.clone(),
        output::rfc3339(k.created_at.as_ref()),
        output::when(k.activate_at.as_ref(), now),
        output::when(k.retired_at.as_ref(), now),
    ]
}

const KEY_HEADER: &[&str] = &[
    "kid",
    "algorithm",
    "state",
    "created",
    "signs from",
    "retired",
];

/// `lanyard keys ...`
///
/// # Errors
/// When the admin socket cannot be reached or the server refuses.
pub async fn keys(g: &GlobalArgs, cmd: &KeysCommand) -> anyhow::Result<()> {
    let mut a = Admin::connect(g).await?;
    match cmd {
        KeysCommand::List => {
            let r = a
                .client
                .list_signing_keys(pb::ListRequest::default())
                .await
                .or_rpc_error(&a.target)?;
            let now = now();
            print(
                g,
                || json!({ "keys": r.keys.iter().map(output::signing_key_json).collect::<Vec<_>>() }),
                || list_table(KEY_HEADER, r.keys.iter().map(|k| key_row(k, now)).collect()),
            )
        }
        KeysCommand::Rotate { activate_after } => {
            let r = a
                .client
                .rotate_signing_key(pb::RotateSigningKeyRequest {
                    activate_after_seconds: *activate_after,
                })
                .await
                .or_rpc_error(&a.target)?;
            let now = now();
            print(
                g,
                || output::signing_key_json(&r),
                || list_table(KEY_HEADER, vec![key_row(&r, now)]),
            )
        }
    }
}
