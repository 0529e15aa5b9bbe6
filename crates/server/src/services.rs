//! The gRPC services: thin adapters from lanyard.v1 messages to [`Runtime`] flows.

use lanyard_audit::kinds;
use std::sync::Arc;
use std::time::Duration;

use lanyard_core::{GrantId, ReasonCode, Secret};
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::admin_service_server::AdminService;
use lanyard_proto::v1::exchange_service_server::ExchangeService;
use lanyard_store::{
    ConfigKind, GrantFilter, GrantStatus, NewAuditEvent, NewConfigObject, PageRequest,
};
use lanyard_trust::Workload;
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert;
use crate::error::ApiError;
use crate::metrics::{Outcome, destination_label};
use crate::runtime::{ExchangeInput, RequestCtx, Runtime, truncate};

/// How long a destination's own kill switch may take before it counts as failed.
const KILL_SWITCH_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) type Rpc<T> = Result<Response<T>, Status>;

pub use crate::audit_svc::AuditSvc;

/// Build the request context: a request ID (the caller's `x-request-id` when it is
/// short and plain, else a new one) and, on the admin socket, the peer's uid.
pub(crate) fn ctx_of<T>(req: &Request<T>) -> RequestCtx {
    let request_id = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let operator = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| format!("uid:{}", c.uid()));
    RequestCtx {
        request_id,
        operator,
    }
}

pub(crate) fn respond<T>(ctx: &RequestCtx, body: T) -> Response<T> {
    let mut r = Response::new(body);
    if let Ok(v) = ctx.request_id.parse() {
        r.metadata_mut().insert("x-request-id", v);
    }
    r
}

pub(crate) fn fail(ctx: &RequestCtx, e: ApiError) -> Status {
    tracing::info!(request_id = %ctx.request_id, reason = %e.reason, "request refused");
    crate::telemetry::record_refusal(e.reason);
    let mut s: Status = e.into();
    if let Ok(v) = ctx.request_id.parse() {
        s.metadata_mut().insert("x-request-id", v);
    }
    s
}

// === impl ExchangeService ===

/// The workload-facing service.
pub struct ExchangeSvc {
    /// The runtime.
    pub rt: Arc<Runtime>,
}

fn exchange_response(out: crate::runtime::ExchangeOutput) -> pb::ExchangeResponse {
    pb::ExchangeResponse {
        grant_id: out.grant.id.to_string(),
        expires_at: convert::ts(out.issued.expires_at),
        scopes: out.grant.scopes.clone(),
        workload_id: out.grant.workload_id.clone(),
        task_id: out.grant.task_id.clone().unwrap_or_default(),
        destination: out.grant.destination.clone(),
        revocability: convert::revocability_to_pb(out.revocability),
        credential: Some(convert::credential_to_pb(out.issued.credential)),
    }
}

#[tonic::async_trait]
impl ExchangeService for ExchangeSvc {
    async fn exchange(&self, req: Request<pb::ExchangeRequest>) -> Rpc<pb::ExchangeResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let started = std::time::Instant::now();
        let snapshot = self.rt.snapshot();
        let dest_label = destination_label(&snapshot, &r.destination);
        let input = ExchangeInput {
            subject_token: Secret::new(r.subject_token),
            subject_token_type: r.subject_token_type,
            actor_token: (!r.actor_token.is_empty()).then(|| Secret::new(r.actor_token)),
            actor_token_type: r.actor_token_type,
            destination: r.destination,
            scopes: r.scopes,
            ttl_secs: r.requested_ttl_seconds,
            audience: r.audience,
        };
        let span = tracing::info_span!("exchange", request_id = %ctx.request_id);
        let result = self.rt.exchange(input, &ctx).instrument(span).await;
        let outcome = outcome_of(&result);
        self.rt
            .metrics
            .exchange(dest_label, outcome, started.elapsed());
        match result {
            Ok(out) => Ok(respond(&ctx, exchange_response(out))),
            Err(e) => Err(fail(&ctx, e)),
        }
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Rpc<pb::ExchangeResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let token = Secret::new(r.subject_token);
        let span = tracing::info_span!("renew", request_id = %ctx.request_id);
        let result = self
            .rt
            .renew(
                &r.grant_id,
                &token,
                &r.subject_token_type,
                r.requested_ttl_seconds,
                &ctx,
            )
            .instrument(span)
            .await;
        self.rt.metrics.renew(outcome_of(&result));
        match result {
            Ok(out) => Ok(respond(&ctx, exchange_response(out))),
            Err(e) => Err(fail(&ctx, e)),
        }
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Rpc<pb::ReleaseResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let token = Secret::new(r.subject_token);
        let span = tracing::info_span!("release", request_id = %ctx.request_id);
        let result = self
            .rt
            .release(&r.grant_id, &token, &r.subject_token_type, &ctx)
            .instrument(span)
            .await;
        self.rt.metrics.release(outcome_of(&result));
        match result {
            Ok(out) => {
                let now = self.rt.clock.now_unix();
                Ok(respond(
                    &ctx,
                    pb::ReleaseResponse {
                        grant_id: out.grant.id.to_string(),
                        status: out.grant.status.as_str().into(),
                        receipt: Some(convert::receipt_to_pb(&out.grant, &out.outcome, now)),
                    },
                ))
            }
            Err(e) => Err(fail(&ctx, e)),
        }
    }

    async fn introspect(&self, req: Request<pb::IntrospectRequest>) -> Rpc<pb::IntrospectResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            if !matches!(
                r.client_token_type.as_str(),
                "" | crate::runtime::TOKEN_TYPE_JWT | crate::runtime::TOKEN_TYPE_ID_TOKEN
            ) {
                return Err(ApiError::invalid(
                    "client_token_type must be a JWT token type (or empty)",
                ));
            }
            let i = crate::introspect::introspect(&self.rt, &Secret::new(r.client_token), &r.token)
                .await?;
            Ok::<_, ApiError>(pb::IntrospectResponse {
                active: i.active,
                scope: i.scope.unwrap_or_default(),
                client_id: i.client_id.unwrap_or_default(),
                sub: i.sub.unwrap_or_default(),
                aud: i.aud.unwrap_or_default(),
                iss: i.iss.unwrap_or_default(),
                exp: i.exp.unwrap_or_default(),
                iat: i.iat.unwrap_or_default(),
                nbf: i.nbf.unwrap_or_default(),
                jti: i.jti.unwrap_or_default(),
                token_type: i.token_type.unwrap_or_default(),
                grant_id: i.grant_id.unwrap_or_default(),
                destination: i.destination.unwrap_or_default(),
            })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }
}

fn outcome_of<T>(result: &Result<T, ApiError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Allowed,
        Err(e) => Outcome::Denied(e.reason),
    }
}

// === impl AdminService ===

/// The operator service (admin socket only).
pub struct AdminSvc {
    /// The runtime.
    pub rt: Arc<Runtime>,
    /// lanyard's own issuer URL, which may never be registered as a trusted issuer.
    pub own_issuer_url: String,
}

impl AdminSvc {
    async fn put_object(
        &self,
        ctx: &RequestCtx,
        kind: ConfigKind,
        name: &str,
        spec: serde_json::Value,
        expected_revision: Option<i64>,
    ) -> Result<i64, ApiError> {
        let before = self.rt.store.config_get(kind, name).await?.map(|o| o.spec);
        let now_ms = self.rt.clock.now_unix_millis();
        let event = NewAuditEvent {
            time_ms: now_ms,
            kind: format!("{}.put", kind.as_str()),
            request_id: Some(ctx.request_id.clone()),
            trace_id: crate::telemetry::current_trace_id(),
            actor: ctx.operator.clone(),
            detail: json!({ "name": name, "before": before, "after": spec }),
            ..NewAuditEvent::default()
        };
        let obj = self
            .rt
            .store
            .config_put(
                NewConfigObject {
                    kind,
                    name: name.to_string(),
                    spec,
                    updated_by: ctx.operator.clone().unwrap_or_else(|| "unknown".into()),
                    now: now_ms / 1000,
                },
                expected_revision,
                event,
            )
            .await?;
        self.rt.reload(true).await?;
        tracing::info!(request_id = %ctx.request_id, kind = kind.as_str(), name, "configuration changed");
        Ok(obj.revision)
    }

    async fn delete_object(
        &self,
        ctx: &RequestCtx,
        kind: ConfigKind,
        name: &str,
    ) -> Result<(), ApiError> {
        let before = self.rt.store.config_get(kind, name).await?.map(|o| o.spec);
        if before.is_none() {
            return Err(ApiError::new(
                ReasonCode::NotFound,
                format!("no {} named {:?}", kind.as_str(), truncate(name)),
            ));
        }
        let event = NewAuditEvent {
            time_ms: self.rt.clock.now_unix_millis(),
            kind: format!("{}.delete", kind.as_str()),
            request_id: Some(ctx.request_id.clone()),
            trace_id: crate::telemetry::current_trace_id(),
            actor: ctx.operator.clone(),
            detail: json!({ "name": name, "before": before }),
            ..NewAuditEvent::default()
        };
        self.rt.store.config_delete(kind, name, event).await?;
        self.rt.reload(true).await?;
        Ok(())
    }

    fn key_status(&self, name: &str) -> Option<pb::KeySetStatus> {
        self.rt
            .verifier
            .status()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| pb::KeySetStatus {
                kids: s.kids,
                fetched_at: s.fetched_at.and_then(convert::ts),
                fresh_until: s.expires_at.and_then(convert::ts),
                last_error: s.last_error.unwrap_or_default(),
                stale: s.stale,
            })
    }

    /// The stored configuration object, or `NOT_FOUND` naming it as a `what`.
    async fn stored(
        &self,
        kind: ConfigKind,
        what: &str,
        name: &str,
    ) -> Result<lanyard_store::ConfigObject, ApiError> {
        self.rt.store.config_get(kind, name).await?.ok_or_else(|| {
            ApiError::new(
                ReasonCode::NotFound,
                format!("no {what} named {:?}", truncate(name)),
            )
        })
    }

    async fn issuer_out(&self, name: &str) -> Result<pb::Issuer, ApiError> {
        let obj = self.stored(ConfigKind::Issuer, "issuer", name).await?;
        let cfg: lanyard_trust::IssuerConfig =
            serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
        let mut out = convert::issuer_to_pb(&cfg, obj.revision);
        out.key_status = self.key_status(name);
        Ok(out)
    }
}

impl AdminSvc {
    /// Write a revocation job and follow it.
    async fn start_revocation(
        &self,
        ctx: &RequestCtx,
        selector: lanyard_store::RevokeSelector,
        reason: String,
        deny: Option<Option<Duration>>,
    ) -> Result<RevokeStream, ApiError> {
        let (job, deny_entry) = self
            .rt
            .revoke_start(
                crate::revoke::RevokeInput {
                    selector,
                    reason,
                    deny,
                    expired_only: false,
                },
                ctx,
            )
            .await?;
        // The job as stored; per-destination counts come with the receipts and summary.
        Ok(crate::revoke::follow(
            self.rt.clone(),
            convert::job_to_pb(&job, &[], deny_entry),
            false,
        ))
    }

    /// A job with its progress, or `NOT_FOUND`.
    async fn job_pb(&self, id: &str) -> Result<pb::RevocationJob, ApiError> {
        let job = self.rt.store.revocation_get(id).await?.ok_or_else(|| {
            ApiError::new(
                ReasonCode::NotFound,
                format!("no revocation job {:?}", truncate(id)),
            )
        })?;
        let progress = self.rt.store.revocation_progress(id).await?;
        let snap = self.rt.snapshot();
        Ok(convert::job_to_pb(
            &job,
            &progress,
            deny_entry_of(&snap, id),
        ))
    }
}

/// Pull `destination`'s own kill switch through its adapter and audit what happened
/// (`destination.kill_switch`). A failure at the destination is a result, not an
/// error: lanyard's side already holds.
async fn pull_kill_switch(
    rt: &Runtime,
    ctx: &RequestCtx,
    destination: &str,
    reason: &str,
) -> Result<pb::KillSwitchResult, ApiError> {
    let adapter = rt
        .snapshot()
        .destinations
        .get(destination)
        .map(|d| (d.adapter.clone(), d.spec.kind.clone()));
    let (outcome, detail) = match adapter {
        None => (
            "failed",
            "the destination is stored but not loaded on this server (see its log)".to_owned(),
        ),
        Some((adapter, kind)) => {
            match tokio::time::timeout(KILL_SWITCH_TIMEOUT, adapter.kill_switch(reason)).await {
                Ok(Ok(Some(detail))) => ("done", detail),
                Ok(Ok(None)) => (
                    "unsupported",
                    format!(
                        "the {kind} adapter has no kill switch lanyard can pull; the manual step at the destination is in docs/destinations/"
                    ),
                ),
                Ok(Err(e)) => ("failed", e.to_string()),
                Err(_) => (
                    "failed",
                    format!(
                        "the destination did not answer within {}s",
                        KILL_SWITCH_TIMEOUT.as_secs()
                    ),
                ),
            }
        }
    };
    let mut ev = rt.event_for(kinds::DESTINATION_KILL_SWITCH, ctx);
    ev.destination = Some(destination.to_owned());
    ev.decision = Some(outcome.into());
    if outcome == "failed" {
        ev.reason = Some(ReasonCode::DestinationFailed.as_str().into());
    }
    ev.detail = json!({"outcome": outcome, "detail": detail, "reason": truncate(reason)});
    rt.committer.commit(None, ev).await?;
    tracing::warn!(destination, outcome, %detail, "destination kill switch pulled");
    Ok(pb::KillSwitchResult {
        destination: destination.to_owned(),
        outcome: outcome.into(),
        detail,
    })
}

/// The deny entry a job wrote, if it is still there.
fn deny_entry_of(snap: &crate::runtime::Snapshot, job_id: &str) -> Option<String> {
    snap.deny
        .iter()
        .find(|d| d.job_id == job_id)
        .map(crate::revoke::DenyEntry::name)
}

/// A destination's key status on the wire: never the key.
fn secret_status_pb(
    destination: &str,
    status: Option<crate::proxy::SecretStatus>,
) -> pb::DestinationSecretStatus {
    match status {
        Some(s) => pb::DestinationSecretStatus {
            destination: destination.to_owned(),
            secret_set: true,
            secret_updated_at: convert::ts(s.updated_at),
            fingerprint: s.fingerprint,
            updated_by: s.updated_by,
            bound: s.bound,
        },
        None => pb::DestinationSecretStatus {
            destination: destination.to_owned(),
            ..Default::default()
        },
    }
}

fn valid_name(kind: &str, name: &str) -> Result<(), ApiError> {
    if lanyard_destination::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{kind} name {:?} must be 1-63 characters of [a-z0-9-]",
            truncate(name)
        )))
    }
}

use crate::revoke::RevokeStream;

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn put_issuer(&self, req: Request<pb::PutIssuerRequest>) -> Rpc<pb::Issuer> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let issuer = r.issuer.ok_or_else(|| ApiError::invalid("issuer is required"))?;
            valid_name("issuer", &issuer.name)?;
            let cfg = convert::issuer_from_pb(issuer)?;
            cfg.validate()?;
            if cfg.issuer_url.trim_end_matches('/') == self.own_issuer_url.trim_end_matches('/') {
                return Err(ApiError::invalid(
                    "lanyard's own issuer cannot be a trusted issuer: its tokens are never subject tokens",
                ));
            }
            // The new set must stay consistent: one issuer per issuer_url.
            let mut all: Vec<lanyard_trust::IssuerConfig> = self
                .rt
                .snapshot()
                .issuers
                .iter()
                .filter(|i| i.name != cfg.name)
                .cloned()
                .collect();
            all.push(cfg.clone());
            lanyard_trust::validate_issuers(&all)?;
            let spec = serde_json::to_value(&cfg).map_err(|e| ApiError::internal(&e))?;
            self.put_object(&ctx, ConfigKind::Issuer, &cfg.name, spec, r.expected_revision)
                .await?;
            self.issuer_out(&cfg.name).await
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn get_issuer(&self, req: Request<pb::GetRequest>) -> Rpc<pb::Issuer> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        self.issuer_out(&name)
            .await
            .map(|b| respond(&ctx, b))
            .map_err(|e| fail(&ctx, e))
    }

    async fn list_issuers(&self, req: Request<pb::ListRequest>) -> Rpc<pb::ListIssuersResponse> {
        let ctx = ctx_of(&req);
        let result = async {
            let mut issuers = Vec::new();
            for obj in self.rt.store.config_list(ConfigKind::Issuer).await? {
                let cfg: lanyard_trust::IssuerConfig =
                    serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
                let mut out = convert::issuer_to_pb(&cfg, obj.revision);
                out.key_status = self.key_status(&obj.name);
                issuers.push(out);
            }
            Ok::<_, ApiError>(pb::ListIssuersResponse { issuers })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn delete_issuer(&self, req: Request<pb::DeleteRequest>) -> Rpc<pb::DeleteResponse> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        self.delete_object(&ctx, ConfigKind::Issuer, &name)
            .await
            .map(|()| respond(&ctx, pb::DeleteResponse { name }))
            .map_err(|e| fail(&ctx, e))
    }

    async fn refresh_issuer_keys(&self, req: Request<pb::GetRequest>) -> Rpc<pb::Issuer> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        let result = async {
            // A failed fetch is reported in key_status.last_error, not as an RPC error.
            if let Err(e) = self.rt.verifier.refresh(&name).await
                && e.reason() == ReasonCode::IssuerUnknown
            {
                return Err(ApiError::new(
                    ReasonCode::NotFound,
                    format!("no issuer named {:?}", truncate(&name)),
                ));
            }
            self.issuer_out(&name).await
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn put_trust_rule(&self, req: Request<pb::PutTrustRuleRequest>) -> Rpc<pb::TrustRule> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let rule = r
                .rule
                .ok_or_else(|| ApiError::invalid("rule is required"))?;
            valid_name("trust rule", &rule.name)?;
            let rule = convert::rule_from_pb(rule)?;
            rule.validate(&self.rt.trust_domain)?;
            if self
                .rt
                .store
                .config_get(ConfigKind::Issuer, &rule.issuer)
                .await?
                .is_none()
            {
                return Err(ApiError::new(
                    ReasonCode::NotFound,
                    format!(
                        "trust rule names issuer {:?}, which does not exist",
                        truncate(&rule.issuer)
                    ),
                ));
            }
            let spec = serde_json::to_value(&rule).map_err(|e| ApiError::internal(&e))?;
            let rev = self
                .put_object(
                    &ctx,
                    ConfigKind::TrustRule,
                    &rule.name,
                    spec,
                    r.expected_revision,
                )
                .await?;
            Ok(convert::rule_to_pb(&rule, rev))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn list_trust_rules(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Rpc<pb::ListTrustRulesResponse> {
        let ctx = ctx_of(&req);
        let issuer = req.into_inner().issuer;
        let result = async {
            let mut rules = Vec::new();
            for obj in self.rt.store.config_list(ConfigKind::TrustRule).await? {
                let rule: lanyard_trust::TrustRule =
                    serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
                if issuer.is_empty() || rule.issuer == issuer {
                    rules.push(convert::rule_to_pb(&rule, obj.revision));
                }
            }
            Ok::<_, ApiError>(pb::ListTrustRulesResponse { rules })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn delete_trust_rule(&self, req: Request<pb::DeleteRequest>) -> Rpc<pb::DeleteResponse> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        self.delete_object(&ctx, ConfigKind::TrustRule, &name)
            .await
            .map(|()| respond(&ctx, pb::DeleteResponse { name }))
            .map_err(|e| fail(&ctx, e))
    }

    async fn put_destination(
        &self,
        req: Request<pb::PutDestinationRequest>,
    ) -> Rpc<pb::Destination> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let d = r
                .destination
                .ok_or_else(|| ApiError::invalid("destination is required"))?;
            valid_name("destination", &d.name)?;
            let spec = convert::destination_from_pb(d);
            crate::registry::build(&spec, self.rt.minter.clone(), self.rt.sealer.clone())?;
            let value = serde_json::to_value(&spec).map_err(|e| ApiError::internal(&e))?;
            let rev = self
                .put_object(
                    &ctx,
                    ConfigKind::Destination,
                    &spec.name,
                    value,
                    r.expected_revision,
                )
                .await?;
            Ok(convert::destination_to_pb(&spec, rev))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn list_destinations(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Rpc<pb::ListDestinationsResponse> {
        let ctx = ctx_of(&req);
        let result = async {
            let mut destinations = Vec::new();
            for obj in self.rt.store.config_list(ConfigKind::Destination).await? {
                let spec: lanyard_destination::DestinationSpec =
                    serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
                destinations.push(convert::destination_to_pb(&spec, obj.revision));
            }
            Ok::<_, ApiError>(pb::ListDestinationsResponse { destinations })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn delete_destination(&self, req: Request<pb::DeleteRequest>) -> Rpc<pb::DeleteResponse> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        let result = async {
            // Its grants could no longer be revoked there: revoke them first.
            let active = self
                .rt
                .store
                .grant_list(
                    &GrantFilter {
                        destination: Some(name.clone()),
                        status: Some(GrantStatus::Active),
                        ..GrantFilter::default()
                    },
                    &PageRequest {
                        limit: 1,
                        cursor: None,
                    },
                )
                .await?;
            if !active.items.is_empty() {
                return Err(ApiError::new(
                    ReasonCode::Conflict,
                    format!(
                        "destination {} still has active grants; revoke them first (lanyard revoke --destination {} --reason ...)",
                        truncate(&name),
                        truncate(&name)
                    ),
                ));
            }
            self.delete_object(&ctx, ConfigKind::Destination, &name)
                .await?;
            // Its static key goes with it.
            crate::proxy::delete_secret(&self.rt, &name, &ctx).await
        };
        result
            .await
            .map(|()| respond(&ctx, pb::DeleteResponse { name }))
            .map_err(|e| fail(&ctx, e))
    }

    async fn put_destination_secret(
        &self,
        req: Request<pb::PutDestinationSecretRequest>,
    ) -> Rpc<pb::DestinationSecretStatus> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let secret = Secret::new(r.secret);
        crate::proxy::put_secret(&self.rt, &r.destination, &secret, &ctx)
            .await
            .map(|s| respond(&ctx, secret_status_pb(&r.destination, Some(s))))
            .map_err(|e| fail(&ctx, e))
    }

    async fn get_destination_secret(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Rpc<pb::DestinationSecretStatus> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        let result = async {
            valid_name("destination", &name)?;
            if self
                .rt
                .store
                .config_get(ConfigKind::Destination, &name)
                .await?
                .is_none()
            {
                return Err(ApiError::new(
                    ReasonCode::NotFound,
                    format!("no destination named {name:?}"),
                ));
            }
            let status = crate::proxy::secret_status(&self.rt, &name).await?;
            Ok(secret_status_pb(&name, status))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn list_grants(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Rpc<pb::ListGrantsResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let status = if r.status.is_empty() {
                None
            } else {
                Some(GrantStatus::parse(&r.status).ok_or_else(|| {
                    ApiError::invalid("status must be active, released, revoked or expired")
                })?)
            };
            let opt = |s: String| (!s.is_empty()).then_some(s);
            let filter = GrantFilter {
                workload_id: opt(r.workload_id),
                workload_prefix: opt(r.workload_prefix),
                issuer: opt(r.issuer),
                destination: opt(r.destination),
                task_id: opt(r.task_id),
                status,
            };
            let page = self
                .rt
                .store
                .grant_list(
                    &filter,
                    &PageRequest {
                        limit: r.page_size,
                        cursor: opt(r.page_token),
                    },
                )
                .await?;
            Ok::<_, ApiError>(pb::ListGrantsResponse {
                grants: page.items.iter().map(convert::grant_to_pb).collect(),
                next_page_token: page.next_cursor.unwrap_or_default(),
            })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn get_grant(&self, req: Request<pb::GetRequest>) -> Rpc<pb::Grant> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        let result = async {
            let id = GrantId::parse(&name)
                .map_err(|_| ApiError::new(ReasonCode::GrantNotFound, "grant id is malformed"))?;
            let g = self.rt.store.grant_get(&id).await?.ok_or_else(|| {
                ApiError::new(ReasonCode::GrantNotFound, format!("no grant {id}"))
            })?;
            Ok::<_, ApiError>(convert::grant_to_pb(&g))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    type RevokeStream = RevokeStream;

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Rpc<Self::RevokeStream> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let selector = convert::selector_from_pb(r.selector)?;
            let deny =
                (r.deny_seconds > 0).then(|| Some(Duration::from_secs(u64::from(r.deny_seconds))));
            self.start_revocation(&ctx, selector, r.reason, deny).await
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    type WatchRevocationStream = RevokeStream;

    async fn watch_revocation(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Rpc<Self::WatchRevocationStream> {
        let ctx = ctx_of(&req);
        let id = req.into_inner().name;
        let result = async {
            let job = self.job_pb(&id).await?;
            Ok::<_, ApiError>(crate::revoke::follow(self.rt.clone(), job, true))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn get_revocation(
        &self,
        req: Request<pb::GetRevocationRequest>,
    ) -> Rpc<pb::GetRevocationResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let job = self.job_pb(&r.job_id).await?;
            let mut receipts = Vec::new();
            if r.include_receipts {
                let mut after = 0;
                loop {
                    let page = self
                        .rt
                        .store
                        .revocation_receipts(&r.job_id, after, 1000)
                        .await?;
                    let n = page.len();
                    for rec in page {
                        after = rec.seq;
                        receipts.push(convert::job_receipt_to_pb(&rec));
                    }
                    if n < 1000 {
                        break;
                    }
                }
            }
            Ok::<_, ApiError>(pb::GetRevocationResponse {
                job: Some(job),
                receipts,
            })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Rpc<pb::ListRevocationsResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let page = self
                .rt
                .store
                .revocation_list(&PageRequest {
                    limit: r.page_size,
                    cursor: (!r.page_token.is_empty()).then_some(r.page_token),
                })
                .await?;
            let snap = self.rt.snapshot();
            Ok::<_, ApiError>(pb::ListRevocationsResponse {
                jobs: page
                    .items
                    .iter()
                    .map(|j| convert::job_to_pb(j, &[], deny_entry_of(&snap, &j.id)))
                    .collect(),
                next_page_token: page.next_cursor.unwrap_or_default(),
            })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn abandon_revocation(
        &self,
        req: Request<pb::AbandonRevocationRequest>,
    ) -> Rpc<pb::RevocationJob> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let reason = r.reason.trim();
            if reason.is_empty() {
                return Err(ApiError::invalid(
                    "a reason is required; it is recorded in the audit stream",
                ));
            }
            let destination = Some(r.destination.as_str()).filter(|d| !d.is_empty());
            let mut ev = self.rt.event_for(kinds::REVOCATION_ABANDONED, &ctx);
            ev.decision = Some("abandon".into());
            ev.destination = destination.map(str::to_owned);
            ev.detail = json!({"job_id": r.job_id, "reason": truncate(reason)});
            let now_ms = self.rt.clock.now_unix_millis();
            self.rt
                .store
                .revocation_abandon(&r.job_id, destination, now_ms, ev)
                .await?;
            self.rt.revocations.bump();
            self.job_pb(&r.job_id).await
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    type DistrustIssuerStream = RevokeStream;

    async fn distrust_issuer(
        &self,
        req: Request<pb::DistrustIssuerRequest>,
    ) -> Rpc<Self::DistrustIssuerStream> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            self.stored(ConfigKind::Issuer, "issuer", &r.name).await?;
            self.start_revocation(
                &ctx,
                lanyard_store::RevokeSelector::Issuer(r.name),
                r.reason,
                Some(None),
            )
            .await
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    type DisableDestinationStream = RevokeStream;

    async fn disable_destination(
        &self,
        req: Request<pb::DisableDestinationRequest>,
    ) -> Rpc<Self::DisableDestinationStream> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            self.stored(ConfigKind::Destination, "destination", &r.name)
                .await?;
            // lanyard's side first, in one transaction: the deny entry and the job.
            let mut stream = self
                .start_revocation(
                    &ctx,
                    lanyard_store::RevokeSelector::Destination(r.name.clone()),
                    r.reason.clone(),
                    Some(None),
                )
                .await?;
            if !r.at_destination {
                return Ok(stream);
            }
            let first = futures::StreamExt::next(&mut stream).await;
            // In its own task: a client that hangs up mid-call must not stop the audit
            // event of a switch the destination may already have pulled.
            let (rt, task_ctx, name, reason) = (
                self.rt.clone(),
                ctx.clone(),
                r.name.clone(),
                r.reason.trim().to_owned(),
            );
            let result =
                tokio::spawn(async move { pull_kill_switch(&rt, &task_ctx, &name, &reason).await })
                    .await
                    .map_err(|e| ApiError::internal(&e))??;
            let head = first.into_iter().chain(std::iter::once(Ok(pb::RevokeEvent {
                event: Some(pb::revoke_event::Event::KillSwitch(result)),
            })));
            Ok(Box::pin(futures::StreamExt::chain(
                futures::stream::iter(head),
                stream,
            )) as RevokeStream)
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn list_deny_entries(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Rpc<pb::ListDenyEntriesResponse> {
        let ctx = ctx_of(&req);
        let result = async {
            let mut entries = Vec::new();
            for obj in self.rt.store.config_list(ConfigKind::DenyEntry).await? {
                let d: crate::revoke::DenyEntry =
                    serde_json::from_value(obj.spec).map_err(|e| ApiError::internal(&e))?;
                entries.push(convert::deny_to_pb(&d));
            }
            Ok::<_, ApiError>(pb::ListDenyEntriesResponse { entries })
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn lift_deny_entry(&self, req: Request<pb::DeleteRequest>) -> Rpc<pb::DeleteResponse> {
        let ctx = ctx_of(&req);
        let name = req.into_inner().name;
        self.rt
            .deny_lift(&name, &ctx)
            .await
            .map(|()| respond(&ctx, pb::DeleteResponse { name }))
            .map_err(|e| fail(&ctx, e))
    }

    async fn inventory(&self, req: Request<pb::InventoryRequest>) -> Rpc<pb::InventoryResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = crate::inventory::inventory(&self.rt, r).await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Rpc<pb::ExplainResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let token = Secret::new(r.subject_token);
        let mut out = pb::ExplainResponse::default();
        match self.rt.identify(&token, "").await {
            Err((e, issuer)) => {
                out.reason = e.reason.as_str().into();
                out.message = e.message;
                out.issuer = issuer.unwrap_or_default();
            }
            Ok(w) => {
                fill_workload(&mut out, &w);
                let snap = self.rt.snapshot();
                match snap.destinations.get(&r.destination) {
                    None => {
                        out.reason = ReasonCode::DestinationUnknown.as_str().into();
                        out.message =
                            format!("no destination named {:?}", truncate(&r.destination));
                    }
                    Some(dest) => match crate::runtime::check_request(
                        &dest.spec,
                        &r.scopes,
                        r.requested_ttl_seconds,
                        "",
                    ) {
                        Err(e) => {
                            out.reason = e.reason.as_str().into();
                            out.message = e.message;
                        }
                        Ok((checked, ttl)) => {
                            let scopes: Vec<String> =
                                checked.iter().map(|s| s.to_string()).collect();
                            let task = w.task.as_ref().map(|t| t.as_str().to_string());
                            let authorizer = self.rt.authorizer();
                            let now = self.rt.clock.now_unix();
                            // The same narrowing an exchange applies.
                            let (d, granted) = crate::runtime::narrow_scopes(&scopes, |s| {
                                authorizer.decide(&lanyard_policy::DecisionRequest {
                                    workload_id: w.id.as_str(),
                                    issuer: &w.issuer,
                                    claims: &w.claims,
                                    destination: &dest.spec.name,
                                    destination_kind: &dest.spec.kind,
                                    destination_labels: &dest.spec.labels,
                                    action: lanyard_policy::Action::Exchange,
                                    scopes: s,
                                    ttl_secs: ttl.as_secs(),
                                    task_id: task.as_deref(),
                                    now,
                                    delegation: &[],
                                    subject: w.id.as_str(),
                                })
                            });
                            out.allowed = d.allowed;
                            out.policy_version = d.policy_version;
                            out.determining_policies = d.determining_policies;
                            if d.allowed {
                                out.max_ttl_seconds = d
                                    .max_ttl_secs
                                    .map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX));
                                out.message = if granted.len() < scopes.len() {
                                    format!(
                                        "policy allows this exchange narrowed to scopes [{}]",
                                        granted.join(", ")
                                    )
                                } else {
                                    "policy allows this exchange".into()
                                };
                                out.granted_scopes = granted;
                            } else {
                                out.reason = ReasonCode::PolicyDenied.as_str().into();
                                out.message = if d.errors.is_empty() {
                                    "no policy permits this request (default deny), or a forbid matched"
                                    .into()
                                } else {
                                    format!("policy evaluation errors: {}", d.errors.join("; "))
                                };
                            }
                        }
                    },
                }
            }
        }
        let event = NewAuditEvent {
            time_ms: self.rt.clock.now_unix_millis(),
            kind: kinds::ADMIN_EXPLAIN.into(),
            request_id: Some(ctx.request_id.clone()),
            trace_id: crate::telemetry::current_trace_id(),
            actor: ctx.operator.clone(),
            workload_id: (!out.workload_id.is_empty()).then(|| out.workload_id.clone()),
            destination: Some(truncate(&r.destination)),
            decision: Some(if out.allowed { "allow" } else { "deny" }.into()),
            reason: (!out.reason.is_empty()).then(|| out.reason.clone()),
            subject_fingerprint: (!token.is_empty())
                .then(|| self.rt.fingerprinter.fingerprint(token.expose())),
            scopes: r.scopes.clone(),
            policy_version: (!out.policy_version.is_empty()).then(|| out.policy_version.clone()),
            ..NewAuditEvent::default()
        };
        if let Err(e) = self.rt.committer.commit(None, event).await {
            return Err(fail(&ctx, e));
        }
        Ok(respond(&ctx, out))
    }

    async fn put_policy(&self, req: Request<pb::PutPolicyRequest>) -> Rpc<pb::PolicyVersion> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let result = async {
            let v = crate::policy_store::put(&self.rt, &ctx, &r.text, &r.comment).await?;
            if r.activate {
                crate::policy_store::activate(&self.rt, &ctx, &v.version).await
            } else {
                Ok(v)
            }
        }
        .await;
        result.map(|v| respond(&ctx, v)).map_err(|e| fail(&ctx, e))
    }

    async fn get_policy(&self, req: Request<pb::GetPolicyRequest>) -> Rpc<pb::PolicyVersion> {
        let ctx = ctx_of(&req);
        let version = Some(req.into_inner().version).filter(|v| !v.is_empty());
        crate::policy_store::get(&self.rt, version.as_deref())
            .await
            .map(|v| respond(&ctx, v))
            .map_err(|e| fail(&ctx, e))
    }

    async fn list_policies(&self, req: Request<pb::ListRequest>) -> Rpc<pb::ListPoliciesResponse> {
        let ctx = ctx_of(&req);
        crate::policy_store::list(&self.rt)
            .await
            .map(|versions| respond(&ctx, pb::ListPoliciesResponse { versions }))
            .map_err(|e| fail(&ctx, e))
    }

    async fn dry_run_policy(
        &self,
        req: Request<pb::DryRunPolicyRequest>,
    ) -> Rpc<pb::DryRunPolicyResponse> {
        let ctx = ctx_of(&req);
        let r = req.into_inner();
        let ms = |t: &prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
        crate::dry_run::dry_run(
            &self.rt,
            &r.text,
            r.since.as_ref().map(ms),
            r.until.as_ref().map(ms),
        )
        .await
        .map(|v| respond(&ctx, v))
        .map_err(|e| fail(&ctx, e))
    }

    async fn activate_policy(
        &self,
        req: Request<pb::ActivatePolicyRequest>,
    ) -> Rpc<pb::PolicyVersion> {
        let ctx = ctx_of(&req);
        let version = req.into_inner().version;
        crate::policy_store::activate(&self.rt, &ctx, &version)
            .await
            .map(|v| respond(&ctx, v))
            .map_err(|e| fail(&ctx, e))
    }

    async fn list_signing_keys(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Rpc<pb::ListSigningKeysResponse> {
        let ctx = ctx_of(&req);
        let keys = self.rt.keys.list().iter().map(key_to_pb).collect();
        Ok(respond(&ctx, pb::ListSigningKeysResponse { keys }))
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> Rpc<pb::SigningKey> {
        let ctx = ctx_of(&req);
        let after = Duration::from_secs(u64::from(req.get_ref().activate_after_seconds));
        let result = async {
            let info = self
                .rt
                .keys
                .rotate(after)
                .map_err(|e| ApiError::internal(&e))?;
            let event = NewAuditEvent {
                time_ms: self.rt.clock.now_unix_millis(),
                kind: kinds::SIGNING_KEY_ROTATED.into(),
                request_id: Some(ctx.request_id.clone()),
                trace_id: crate::telemetry::current_trace_id(),
                actor: ctx.operator.clone(),
                detail: json!({ "kid": info.kid, "activate_after_secs": after.as_secs() }),
                ..NewAuditEvent::default()
            };
            self.rt.committer.commit(None, event).await?;
            Ok::<_, ApiError>(key_to_pb(&info))
        }
        .await;
        result.map(|b| respond(&ctx, b)).map_err(|e| fail(&ctx, e))
    }
}

fn key_to_pb(k: &lanyard_keys::KeyInfo) -> pb::SigningKey {
    pb::SigningKey {
        kid: k.kid.clone(),
        algorithm: k.alg.to_string(),
        created_at: convert::ts(k.created_at),
        activate_at: convert::ts(k.activate_at),
        retired_at: k.retired_at.and_then(convert::ts),
        state: format!("{:?}", k.state).to_lowercase(),
    }
}

fn fill_workload(out: &mut pb::ExplainResponse, w: &Workload) {
    out.workload_id = w.id.to_string();
    out.trust_rule = w.rule.clone();
    out.issuer = w.issuer.clone();
}
