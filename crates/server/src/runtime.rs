//! The running control plane: the configuration snapshot (issuers, trust rules,
//! destinations) loaded from the store, and the exchange, renew and release flows that
//! the gRPC services call. Transport-free, so every flow is testable on its own.

use lanyard_audit::kinds;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use lanyard_audit::Fingerprinter;
use lanyard_audit::sink::SinkStatus;
use lanyard_core::{GrantId, ReasonCode, Scope, Secret, SharedClock, Ttl, WorkloadId};
use lanyard_destination::{
    Destination, DestinationSpec, IssueRequest, Issued, Revocability, RevokeOutcome, RevokeRequest,
    TokenMinter,
};
use lanyard_keys::KeyRing;
use lanyard_policy::{Action, Authorizer, Decision, DecisionRequest};
use lanyard_store::{ConfigKind, GrantRecord, GrantStatus, NewAuditEvent, Store};
use lanyard_trust::{IssuerConfig, TrustRule, Verifier, Workload, match_trust_rules};
use serde_json::json;
use tracing::Instrument;

use crate::commit::Committer;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry;

/// Token types accepted as `subject_token_type`.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// OIDC ID tokens are JWTs too.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// One configured destination: its spec and its adapter.
#[derive(Clone)]
pub struct DestinationEntry {
    /// Settings.
    pub spec: DestinationSpec,
    /// Adapter instance.
    pub adapter: Arc<dyn Destination>,
}

/// The configuration in force, swapped whole on reload.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// Store generation it was loaded at.
    pub generation: i64,
    /// Issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Trust rules, sorted by priority then name.
    pub rules: Vec<TrustRule>,
    /// Destinations by name.
    pub destinations: HashMap<String, DestinationEntry>,
    /// Deny entries (expired ones are kept until lifted but refuse nothing).
    pub deny: Vec<crate::revoke::DenyEntry>,
}

/// Who is calling and which request this is, for audit and logs.
#[derive(Debug, Clone, Default)]
pub struct RequestCtx {
    /// Request ID.
    pub request_id: String,
    /// Operator identity for admin calls (e.g. `uid:1000`).
    pub operator: Option<String>,
}

/// What a workload asked for.
pub struct ExchangeInput {
    /// Subject token.
    pub subject_token: Secret,
    /// Its type URN (empty = JWT).
    pub subject_token_type: String,
    /// Actor token, for delegation.
    pub actor_token: Option<Secret>,
    /// Its type URN (empty = JWT).
    pub actor_token_type: String,
    /// Destination name.
    pub destination: String,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// Requested TTL, seconds (0 = default).
    pub ttl_secs: u32,
    /// Optional audience (must name the destination).
    pub audience: String,
}

/// What the workload gets back.
pub struct ExchangeOutput {
    /// The recorded grant.
    pub grant: GrantRecord,
    /// The credential.
    pub issued: Issued,
    /// How revocable it is.
    pub revocability: Revocability,
}

/// The result of a release.
pub struct ReleaseOutput {
    /// The grant after release.
    pub grant: GrantRecord,
    /// What the destination did.
    pub outcome: RevokeOutcome,
}

/// The running control plane.
pub struct Runtime {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Token verification.
    pub verifier: Verifier,
    /// Authorization.
    pub authorizer: RwLock<Arc<dyn Authorizer>>,
    /// lanyard's signing keys.
    pub keys: Arc<KeyRing>,
    /// The minter adapters use.
    pub minter: Arc<dyn TokenMinter>,
    /// Time.
    pub clock: SharedClock,
    /// Group commit.
    pub committer: Committer,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Names tokens in audit events without containing them.
    pub fingerprinter: Arc<Fingerprinter>,
    /// Seals what adapters keep to revoke later (`<data_dir>/seal.key`).
    pub sealer: Arc<dyn lanyard_destination::Sealer>,
    /// The audit sinks this server runs, by name, and where each stands.
    pub audit_sinks: RwLock<BTreeMap<String, Arc<SinkStatus>>>,
    /// The longest delegation chain accepted (`[policy] max_delegation_depth`).
    pub max_delegation_depth: std::sync::atomic::AtomicUsize,
    /// Prometheus metrics (`GET /metrics`), shared with background tasks.
    pub metrics: Arc<Metrics>,
    /// Revocation worker identity, settings and wake-ups.
    pub revocations: crate::revoke::Revocations,
    /// The claims this server last recorded per workload (for inventory).
    pub seen: crate::inventory::SeenCache,
    snapshot: RwLock<Arc<Snapshot>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Runtime {
    /// Assemble a runtime. Call [`Runtime::reload`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        verifier: Verifier,
        authorizer: Arc<dyn Authorizer>,
        keys: Arc<KeyRing>,
        minter: Arc<dyn TokenMinter>,
        clock: SharedClock,
        committer: Committer,
        trust_domain: String,
        fingerprinter: Arc<Fingerprinter>,
        sealer: Arc<dyn lanyard_destination::Sealer>,
    ) -> Self {
        Self {
            metrics: Arc::new(Metrics::for_runtime(verifier.clone(), clock.clone())),
            store,
            verifier,
            authorizer: RwLock::new(authorizer),
            keys,
            minter,
            clock,
            committer,
            trust_domain,
            fingerprinter,
            sealer,
            audit_sinks: RwLock::new(BTreeMap::new()),
            max_delegation_depth: std::sync::atomic::AtomicUsize::new(3),
            revocations: crate::revoke::Revocations::default(),
            seen: crate::inventory::SeenCache::default(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The authorizer in force.
    pub fn authorizer(&self) -> Arc<dyn Authorizer> {
        match self.authorizer.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reload issuers, trust rules and destinations from the store if its generation
    /// moved (or always, with `force`). Objects that no longer validate are skipped and
    /// logged, never fatal.
    ///
    /// # Errors
    /// `STORE_UNAVAILABLE`.
    pub async fn reload(&self, force: bool) -> Result<bool, ApiError> {
        let _guard = self.reload_lock.lock().await;
        let generation = self.store.config_generation().await?;
        if !force && generation == self.snapshot().generation {
            return Ok(false);
        }
        let mut snap = Snapshot {
            generation,
            ..Snapshot::default()
        };
        for obj in self.store.config_list(ConfigKind::Issuer).await? {
            match serde_json::from_value::<IssuerConfig>(obj.spec) {
                Ok(c) => snap.issuers.push(c),
                Err(e) => {
                    tracing::error!(issuer = %obj.name, error = %e, "stored issuer is invalid; skipped")
                }
            }
        }
        for obj in self.store.config_list(ConfigKind::TrustRule).await? {
            match serde_json::from_value::<TrustRule>(obj.spec) {
                Ok(r) => snap.rules.push(r),
                Err(e) => {
                    tracing::error!(rule = %obj.name, error = %e, "stored trust rule is invalid; skipped")
                }
            }
        }
        snap.rules
            .sort_by(|a, b| a.priority.cmp(&b.priority).then(a.name.cmp(&b.name)));
        for obj in self.store.config_list(ConfigKind::Destination).await? {
            let built = serde_json::from_value::<DestinationSpec>(obj.spec)
                .map_err(|e| e.to_string())
                .and_then(|spec| {
                    registry::build(&spec, self.minter.clone(), self.sealer.clone())
                        .map(|adapter| DestinationEntry { spec, adapter })
                        .map_err(|e| e.to_string())
                });
            match built {
                Ok(entry) => {
                    snap.destinations.insert(obj.name.clone(), entry);
                }
                Err(e) => {
                    tracing::error!(destination = %obj.name, error = %e, "stored destination is invalid; skipped")
                }
            }
        }
        for obj in self.store.config_list(ConfigKind::DenyEntry).await? {
            match serde_json::from_value::<crate::revoke::DenyEntry>(obj.spec) {
                Ok(d) => snap.deny.push(d),
                Err(e) => {
                    tracing::error!(entry = %obj.name, error = %e, "stored deny entry is invalid; skipped")
                }
            }
        }
        self.verifier.set_issuers(snap.issuers.clone());
        // The policy: a stored version once one was activated, else the bootstrap one.
        if let Some(version) = crate::policy_store::active_version(self).await?
            && version != self.authorizer().version()
        {
            match crate::policy_store::load(self, &version).await {
                Ok(a) => {
                    let a: Arc<dyn Authorizer> = Arc::new(a);
                    match self.authorizer.write() {
                        Ok(mut g) => *g = a,
                        Err(p) => *p.into_inner() = a,
                    }
                    tracing::info!(%version, "policy version in force");
                }
                Err(e) => tracing::error!(
                    %version,
                    error = %e.message,
                    "the active policy version could not be loaded; the previous one stays in force"
                ),
            }
        }
        let n = (
            snap.issuers.len(),
            snap.rules.len(),
            snap.destinations.len(),
        );
        match self.snapshot.write() {
            Ok(mut g) => *g = Arc::new(snap),
            Err(p) => *p.into_inner() = Arc::new(snap),
        }
        tracing::info!(
            generation,
            issuers = n.0,
            trust_rules = n.1,
            destinations = n.2,
            "configuration loaded"
        );
        Ok(true)
    }

    /// Whether exchanges for `spec` may proceed as far as audit delivery goes: the sink
    /// it requires runs here and lags no more than it allows.
    ///
    /// # Errors
    /// `AUDIT_DELIVERY_LAGGING` saying which sink and by how much.
    fn audit_delivery_ok(&self, spec: &DestinationSpec) -> Result<(), ApiError> {
        let Some(sink) = &spec.require_audit_sink else {
            return Ok(());
        };
        let status = match self.audit_sinks.read() {
            Ok(g) => g.get(sink).cloned(),
            Err(p) => p.into_inner().get(sink).cloned(),
        };
        let Some(status) = status else {
            return Err(ApiError::new(
                ReasonCode::AuditDeliveryLagging,
                format!(
                    "destination {} requires the {sink:?} audit sink, which this server does not run",
                    spec.name
                ),
            ));
        };
        let lag = status.lag();
        if u64::try_from(lag).unwrap_or(0) > spec.max_audit_lag {
            return Err(ApiError::new(
                ReasonCode::AuditDeliveryLagging,
                format!(
                    "destination {} requires the {sink:?} audit sink to be at most {} events behind; it is {lag} behind, retry once it catches up",
                    spec.name, spec.max_audit_lag
                ),
            ));
        }
        Ok(())
    }

    /// Verify an actor token and build the delegation chain it forms with `subject`.
    ///
    /// # Errors
    /// The actor token's verification error (its message prefixed `actor_token:`), or
    /// `DELEGATION_DENIED` for a chain that is too deep or an actor acting for itself.
    async fn delegation(
        &self,
        token: &Secret,
        token_type: &str,
        subject: &Workload,
    ) -> Result<Delegation, ApiError> {
        let actor = self
            .identify(token, token_type)
            .await
            .map_err(|(e, _)| ApiError::new(e.reason, format!("actor_token: {}", e.message)))?;
        // A denied actor (or one from a distrusted issuer) acts for nobody.
        if let Some(e) = self.deny_check(actor.id.as_str(), &actor.issuer) {
            return Err(ApiError::new(
                e.reason,
                format!("actor_token: {}", e.message),
            ));
        }
        if actor.id == subject.id {
            return Err(ApiError::new(
                ReasonCode::DelegationDenied,
                "the actor token names the same workload as the subject token",
            ));
        }
        let mut chain = vec![actor.id.to_string()];
        chain.extend(prior_actors(&subject.claims));
        let max = self
            .max_delegation_depth
            .load(std::sync::atomic::Ordering::Relaxed);
        if chain.len() > max {
            return Err(ApiError::new(
                ReasonCode::DelegationDenied,
                format!(
                    "the delegation chain has {} actors; at most {max} are accepted",
                    chain.len()
                ),
            ));
        }
        Ok(Delegation {
            workload: actor,
            chain,
        })
    }

    /// The audit fingerprint of a presented token (`None` for an empty one).
    fn fingerprint(&self, token: &Secret) -> Option<String> {
        (!token.is_empty()).then(|| self.fingerprinter.fingerprint(token.expose()))
    }

    /// An audit event of `kind` for this request: time, request and trace IDs, operator.
    pub(crate) fn event_for(&self, kind: &str, ctx: &RequestCtx) -> NewAuditEvent {
        NewAuditEvent {
            time_ms: self.clock.now_unix_millis(),
            kind: kind.into(),
            request_id: Some(ctx.request_id.clone()),
            trace_id: crate::telemetry::current_trace_id(),
            actor: ctx.operator.clone(),
            ..NewAuditEvent::default()
        }
    }

    /// Verify a subject token and map it to a workload.
    ///
    /// # Errors
    /// The trust error's reason (`TOKEN_EXPIRED`, `ISSUER_UNKNOWN`, `NO_TRUST_RULE`...).
    pub async fn identify(
        &self,
        token: &Secret,
        token_type: &str,
    ) -> Result<Workload, (ApiError, Option<String>)> {
        if token.is_empty() {
            return Err((ApiError::invalid("subject_token is required"), None));
        }
        if !matches!(token_type, "" | TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) {
            return Err((
                ApiError::invalid(format!(
                    "subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}"
                )),
                None,
            ));
        }
        let verified = self
            .verifier
            .verify(token)
            .await
            .map_err(|e| (e.into(), None))?;
        let issuer = verified.issuer.clone();
        let snap = self.snapshot();
        match_trust_rules(&snap.rules, &verified, &self.trust_domain)
            .map_err(|e| (e.into(), Some(issuer)))
    }

    /// Verify a caller's own platform token presented as client authentication (the
    /// introspection endpoint) and map it to a workload: the checks and trust rules of
    /// [`Runtime::identify`], except that the token's `jti` is not consumed, because a
    /// client presents the same token on every call
    /// ([`Verifier::verify_reusable`](lanyard_trust::Verifier::verify_reusable)).
    ///
    /// # Errors
    /// As [`Runtime::identify`] (`TOKEN_MALFORMED` for an empty token), never
    /// `TOKEN_REPLAYED`.
    pub async fn identify_client(&self, token: &Secret) -> Result<Workload, ApiError> {
        if token.is_empty() {
            return Err(ApiError::new(
                ReasonCode::TokenMalformed,
                "client authentication is required: present your own platform token",
            ));
        }
        let verified = self.verifier.verify_reusable(token).await?;
        let snap = self.snapshot();
        let workload = match_trust_rules(&snap.rules, &verified, &self.trust_domain)?;
        // A distrusted issuer or a denied workload authenticates nobody.
        if let Some(e) = self.deny_check(workload.id.as_str(), &workload.issuer) {
            return Err(e);
        }
        Ok(workload)
    }

    /// Write a denial to the audit stream, then return the error. If the audit write
    /// fails, the caller gets `STORE_UNAVAILABLE` instead: no unaudited decision.
    async fn deny(&self, mut event: NewAuditEvent, err: ApiError) -> ApiError {
        event.decision = Some("deny".into());
        event.reason = Some(err.reason.as_str().into());
        if let Err(e) = self.committer.commit(None, event).await {
            return e;
        }
        err
    }

    /// The exchange flow: verify, map, check destination, scopes and policy, issue,
    /// record, audit.
    ///
    /// # Errors
    /// An [`ApiError`] with a stable reason; every denial is audited first.
    pub async fn exchange(
        &self,
        input: ExchangeInput,
        ctx: &RequestCtx,
    ) -> Result<ExchangeOutput, ApiError> {
        let mut ev = self.event_for(kinds::EXCHANGE_DENIED, ctx);
        ev.destination = Some(input.destination.clone()).filter(|d| !d.is_empty());
        ev.subject_fingerprint = self.fingerprint(&input.subject_token);
        ev.scopes.clone_from(&input.scopes);
        ev.detail = json!({ "requested_ttl_secs": input.ttl_secs });
        if input.destination.is_empty() {
            return Err(self
                .deny(ev, ApiError::invalid("destination is required"))
                .await);
        }
        let workload = match self
            .identify(&input.subject_token, &input.subject_token_type)
            .await
        {
            Ok(w) => w,
            Err((e, issuer)) => {
                ev.issuer = issuer;
                return Err(self.deny(ev, e).await);
            }
        };
        ev.workload_id = Some(workload.id.to_string());
        ev.issuer = Some(workload.issuer.clone());
        ev.task_id = workload.task.as_ref().map(|t| t.to_string());
        if let Some(e) =
            self.grant_deny_check(workload.id.as_str(), &workload.issuer, &input.destination)
        {
            return Err(self.deny(ev, e).await);
        }
        // The verified claims policy saw (never the token): what `policy dry-run`
        // replays a proposed policy against.
        ev.detail["claims"] = serde_json::Value::Object(workload.claims.clone());
        // Delegation (RFC 8693): the actor token's workload acts for the subject.
        let actor = match &input.actor_token {
            None => None,
            Some(token) => match self
                .delegation(token, &input.actor_token_type, &workload)
                .await
            {
                Ok(a) => {
                    ev.detail["actor_chain"] = json!(a.chain);
                    Some(a)
                }
                Err(e) => return Err(self.deny(ev, e).await),
            },
        };
        let chain: &[String] = actor.as_ref().map_or(&[], |a| a.chain.as_slice());
        let snap = self.snapshot();
        let Some(dest) = snap.destinations.get(&input.destination) else {
            return Err(self
                .deny(
                    ev,
                    ApiError::new(
                        ReasonCode::DestinationUnknown,
                        format!("no destination named {:?}", truncate(&input.destination)),
                    ),
                )
                .await);
        };
        let (scopes, ttl) =
            match check_request(&dest.spec, &input.scopes, input.ttl_secs, &input.audience) {
                Ok(v) => v,
                Err(e) => return Err(self.deny(ev, e).await),
            };
        let now = self.clock.now_unix();
        let ttl = match &actor {
            Some(a) => match a.attenuate(&workload, &scopes, ttl, now) {
                Ok(t) => t,
                Err(e) => return Err(self.deny(ev, e).await),
            },
            None => ttl,
        };
        ev.detail["ttl_secs"] = json!(ttl.as_secs());
        let subject = workload.id.to_string();
        let (decision, scopes) = narrow_scopes(&scopes, |s| {
            let d = self.decide(
                Action::Exchange,
                &workload,
                dest,
                s,
                ttl,
                now,
                chain,
                &subject,
            );
            match &actor {
                // A delegated request needs the actor's act_for as well.
                Some(a) if d.allowed => {
                    let act = self.decide(
                        Action::ActFor,
                        &a.workload,
                        dest,
                        s,
                        ttl,
                        now,
                        chain,
                        &subject,
                    );
                    if act.allowed { d } else { act }
                }
                _ => d,
            }
        });
        if decision.allowed && scopes.len() < input.scopes.len() {
            ev.detail["requested_scopes"] = json!(input.scopes);
        }
        ev.policy_version = Some(decision.policy_version.clone());
        ev.detail["determining_policies"] = json!(decision.determining_policies);
        if !decision.allowed {
            let msg = format!(
                "policy denied workload {} access to destination {}",
                workload.id, dest.spec.name
            );
            return Err(self
                .deny(ev, ApiError::new(ReasonCode::PolicyDenied, msg))
                .await);
        }
        if let Err(e) = self.audit_delivery_ok(&dest.spec) {
            return Err(self.deny(ev, e).await);
        }
        if let Some(max) = decision.max_active_grants {
            let held = match self
                .store
                .grant_count_active(Some(workload.id.as_str()), now)
                .await
            {
                Ok(n) => n,
                Err(e) => return Err(self.deny(ev, e.into()).await),
            };
            if held >= max {
                let msg = format!(
                    "workload {} holds {held} active grants; policy {} allows at most {max}",
                    workload.id,
                    decision.determining_policies.join(", ")
                );
                return Err(self
                    .deny(ev, ApiError::new(ReasonCode::PolicyDenied, msg))
                    .await);
            }
        }
        let ttl = cap_ttl(ttl, &decision, &mut ev);
        let grant_id = GrantId::generate();
        let issued = match dest
            .adapter
            .issue(IssueRequest {
                grant_id: &grant_id,
                workload: &workload.id,
                issuer: &workload.issuer,
                task: workload.task.as_ref(),
                scopes: &scopes,
                ttl,
                now,
                actor_chain: chain,
                claims: &workload.claims,
            })
            .instrument(crate::telemetry::issue_span(
                &dest.spec.name,
                &dest.spec.kind,
            ))
            .await
        {
            Ok(i) => i,
            Err(e) => return Err(self.deny(ev, e.into()).await),
        };
        let grant = GrantRecord {
            id: grant_id.clone(),
            workload_id: workload.id.to_string(),
            issuer: workload.issuer.clone(),
            trust_rule: workload.rule.clone(),
            task_id: workload.task.as_ref().map(|t| t.to_string()),
            destination: dest.spec.name.clone(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            actor_chain: chain.to_vec(),
            issued_at: now,
            expires_at: issued.expires_at,
            status: GrantStatus::Active,
            finished_at: None,
            revocation_handle: issued.revocation_handle.clone(),
            renew_count: 0,
        };
        ev.kind = kinds::EXCHANGE_GRANTED.into();
        ev.decision = Some("allow".into());
        ev.grant_id = Some(grant_id.to_string());
        ev.scopes.clone_from(&grant.scopes);
        ev.detail["ttl_secs"] = json!(ttl.as_secs());
        ev.detail["expires_at"] = json!(issued.expires_at);
        ev.detail["trust_rule"] = json!(workload.rule);
        if let Err(e) = self.committer.commit(Some(grant.clone()), ev).await {
            // Nothing records the credential: take it back at the destination (a
            // database role would otherwise outlive everything), then fail.
            let undo = dest.adapter.revoke(RevokeRequest {
                grant_id: &grant.id,
                revocation_handle: &grant.revocation_handle,
                workload_id: &grant.workload_id,
                expires_at: grant.expires_at,
                now,
            });
            if let Err(r) = undo.await {
                tracing::error!(grant = %grant.id, destination = %grant.destination, error = %r, "a credential issued for a grant that could not be stored was not revoked at its destination; revoke it by hand");
            }
            return Err(e);
        }
        // A deny entry written while this exchange was in flight (after the check above,
        // before the commit) did not see this grant: revoke it now and hand nothing out.
        if let Some(e) =
            self.grant_deny_check(workload.id.as_str(), &workload.issuer, &dest.spec.name)
        {
            let input = crate::revoke::RevokeInput {
                selector: lanyard_store::RevokeSelector::Grant(grant_id.to_string()),
                reason: format!("issued while a deny entry was being written: {}", e.message),
                deny: None,
                expired_only: false,
            };
            if let Err(r) = self.revoke_start(input, ctx).await {
                tracing::error!(grant = %grant_id, error = %r.message, "revoking a grant issued during a deny entry failed; revoke it by hand");
            }
            return Err(e);
        }
        self.seen.note(&self.store, now, &workload);
        // Debug, not info: the audit stream records every grant; see docs/operations.md.
        tracing::debug!(
            request_id = %ctx.request_id,
            workload = %workload.id,
            destination = %dest.spec.name,
            grant = %grant_id,
            ttl = ttl.as_secs(),
            "exchange granted"
        );
        Ok(ExchangeOutput {
            grant,
            issued,
            revocability: dest.adapter.revocability(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        action: Action,
        workload: &Workload,
        dest: &DestinationEntry,
        scopes: &[Scope],
        ttl: Ttl,
        now: i64,
        delegation: &[String],
        subject: &str,
    ) -> Decision {
        let scope_strings: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let task = workload.task.as_ref().map(|t| t.as_str().to_string());
        let span = crate::telemetry::policy_span(action.as_str(), &dest.spec.name);
        let _entered = span.enter();
        let decision = self.authorizer().decide(&DecisionRequest {
            workload_id: workload.id.as_str(),
            issuer: &workload.issuer,
            claims: &workload.claims,
            destination: &dest.spec.name,
            destination_kind: &dest.spec.kind,
            destination_labels: &dest.spec.labels,
            action,
            scopes: &scope_strings,
            ttl_secs: ttl.as_secs(),
            task_id: task.as_deref(),
            now,
            delegation,
            subject,
        });
        span.record(
            "lanyard.decision",
            if decision.allowed { "allow" } else { "deny" },
        );
        span.record("lanyard.policy_version", decision.policy_version.as_str());
        decision
    }

    /// Load a grant and check that `workload` may act on it.
    async fn owned_grant(
        &self,
        grant_id: &str,
        workload: &Workload,
    ) -> Result<GrantRecord, ApiError> {
        let id = GrantId::parse(grant_id)
            .map_err(|_| ApiError::new(ReasonCode::GrantNotFound, "grant_id is malformed"))?;
        let grant =
            self.store.grant_get(&id).await?.ok_or_else(|| {
                ApiError::new(ReasonCode::GrantNotFound, format!("no grant {id}"))
            })?;
        let same_task = grant.task_id.as_deref() == workload.task.as_ref().map(|t| t.as_str());
        if grant.workload_id != workload.id.as_str() || !same_task {
            // Same answer whether the grant belongs to another workload or another task.
            return Err(ApiError::new(
                ReasonCode::GrantMismatch,
                "the subject token is not for this grant's workload and task",
            ));
        }
        Ok(grant)
    }

    /// Verify `token` and check that its workload and task own `grant_id`. Returns the
    /// workload, the grant, and the audit event (kind `denied_kind`, fields filled in)
    /// for the caller to finish. A failure is audited as `denied_kind` first.
    async fn prove_grant(
        &self,
        denied_kind: &str,
        grant_id: &str,
        token: &Secret,
        token_type: &str,
        ctx: &RequestCtx,
    ) -> Result<(Workload, GrantRecord, NewAuditEvent), ApiError> {
        let mut ev = self.event_for(denied_kind, ctx);
        ev.grant_id = Some(truncate(grant_id));
        ev.subject_fingerprint = self.fingerprint(token);
        let workload = match self.identify(token, token_type).await {
            Ok(w) => w,
            Err((e, issuer)) => {
                ev.issuer = issuer;
                return Err(self.deny(ev, e).await);
            }
        };
        ev.workload_id = Some(workload.id.to_string());
        ev.issuer = Some(workload.issuer.clone());
        let grant = match self.owned_grant(grant_id, &workload).await {
            Ok(g) => g,
            Err(e) => return Err(self.deny(ev, e).await),
        };
        ev.destination = Some(grant.destination.clone());
        ev.task_id = grant.task_id.clone();
        Ok((workload, grant, ev))
    }

    /// Renew an active grant with fresh proof.
    ///
    /// # Errors
    /// `GRANT_NOT_FOUND`, `GRANT_MISMATCH`, `GRANT_NOT_ACTIVE`, `POLICY_DENIED`, and any
    /// token reason.
    pub async fn renew(
        &self,
        grant_id: &str,
        token: &Secret,
        token_type: &str,
        ttl_secs: u32,
        ctx: &RequestCtx,
    ) -> Result<ExchangeOutput, ApiError> {
        let (workload, grant, mut ev) = self
            .prove_grant(kinds::GRANT_RENEW_DENIED, grant_id, token, token_type, ctx)
            .await?;
        let now = self.clock.now_unix();
        if grant.status == GrantStatus::Revoked {
            return Err(self.deny(ev, revoked_error()).await);
        }
        if let Some(e) =
            self.grant_deny_check(workload.id.as_str(), &workload.issuer, &grant.destination)
        {
            return Err(self.deny(ev, e).await);
        }
        if grant.status != GrantStatus::Active || grant.expires_at <= now {
            let e = ApiError::new(
                ReasonCode::GrantNotActive,
                format!("grant is {}; exchange again", effective_status(&grant, now)),
            );
            return Err(self.deny(ev, e).await);
        }
        let snap = self.snapshot();
        let Some(dest) = snap.destinations.get(&grant.destination) else {
            let e = ApiError::new(
                ReasonCode::DestinationUnknown,
                format!("destination {:?} no longer exists", grant.destination),
            );
            return Err(self.deny(ev, e).await);
        };
        let requested = if ttl_secs == 0 {
            None
        } else {
            Some(
                Ttl::from_secs(u64::from(ttl_secs))
                    .map_err(|e| ApiError::new(ReasonCode::TtlInvalid, e.to_string()))?,
            )
        };
        let ttl = dest.spec.effective_ttl(requested);
        let scopes: Vec<Scope> = grant
            .scopes
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect();
        if !grant.actor_chain.is_empty() {
            let e = ApiError::new(
                ReasonCode::DelegationDenied,
                "a delegated grant is not renewed: exchange again with a fresh actor token",
            );
            return Err(self.deny(ev, e).await);
        }
        let subject = workload.id.to_string();
        let decision = self.decide(
            Action::Renew,
            &workload,
            dest,
            &scopes,
            ttl,
            now,
            &[],
            &subject,
        );
        ev.policy_version = Some(decision.policy_version.clone());
        ev.scopes.clone_from(&grant.scopes);
        ev.detail = json!({"determining_policies": decision.determining_policies});
        if !decision.allowed {
            let e = ApiError::new(ReasonCode::PolicyDenied, "policy denied renewal");
            return Err(self.deny(ev, e).await);
        }
        let ttl = cap_ttl(ttl, &decision, &mut ev);
        let workload_id =
            WorkloadId::parse(&grant.workload_id).map_err(|e| ApiError::internal(&e))?;
        let no_actors: [String; 0] = [];
        let issued = match dest
            .adapter
            .renew(
                IssueRequest {
                    grant_id: &grant.id,
                    workload: &workload_id,
                    issuer: &workload.issuer,
                    task: workload.task.as_ref(),
                    scopes: &scopes,
                    ttl,
                    now,
                    actor_chain: &no_actors,
                    claims: &workload.claims,
                },
                &grant.revocation_handle,
            )
            .instrument(crate::telemetry::issue_span(
                &dest.spec.name,
                &dest.spec.kind,
            ))
            .await
        {
            Ok(i) => i,
            Err(e) => return Err(self.deny(ev, e.into()).await),
        };
        ev.kind = kinds::GRANT_RENEWED.into();
        ev.decision = Some("allow".into());
        ev.detail["expires_at"] = json!(issued.expires_at);
        ev.detail["ttl_secs"] = json!(ttl.as_secs());
        let grant = self
            .store
            .grant_renew(
                &grant.id,
                now,
                issued.expires_at,
                &issued.revocation_handle,
                ev,
            )
            .instrument(crate::telemetry::store_commit_span("grant.renew"))
            .await
            .map_err(lost_race)?;
        Ok(ExchangeOutput {
            grant,
            issued,
            revocability: dest.adapter.revocability(),
        })
    }

    /// Release a grant: mark it released, then revoke at the destination.
    ///
    /// # Errors
    /// `GRANT_NOT_FOUND`, `GRANT_MISMATCH`, `GRANT_NOT_ACTIVE`, and any token reason.
    pub async fn release(
        &self,
        grant_id: &str,
        token: &Secret,
        token_type: &str,
        ctx: &RequestCtx,
    ) -> Result<ReleaseOutput, ApiError> {
        let (_workload, grant, mut ev) = self
            .prove_grant(
                kinds::GRANT_RELEASE_DENIED,
                grant_id,
                token,
                token_type,
                ctx,
            )
            .await?;
        let now = self.clock.now_unix();
        if grant.status == GrantStatus::Revoked {
            return Err(self.deny(ev, revoked_error()).await);
        }
        if grant.status != GrantStatus::Active {
            let e = ApiError::new(
                ReasonCode::GrantNotActive,
                format!("grant is already {}", grant.status.as_str()),
            );
            return Err(self.deny(ev, e).await);
        }
        let snap = self.snapshot();
        let outcome = match snap.destinations.get(&grant.destination) {
            Some(dest) => dest
                .adapter
                .revoke(RevokeRequest {
                    grant_id: &grant.id,
                    revocation_handle: &grant.revocation_handle,
                    workload_id: &grant.workload_id,
                    expires_at: grant.expires_at,
                    now,
                })
                .instrument(crate::telemetry::revoke_span(
                    &dest.spec.name,
                    &dest.spec.kind,
                ))
                .await
                .map_err(ApiError::from)?,
            None => RevokeOutcome::ExpiresAt {
                at: grant.expires_at,
                detail: "destination no longer configured; the credential expires by itself".into(),
            },
        };
        ev.kind = kinds::GRANT_RELEASED.into();
        ev.decision = Some("allow".into());
        ev.detail = json!({ "receipt": outcome });
        let grant = self
            .store
            .grant_finish(&grant.id, GrantStatus::Released, now, ev)
            .instrument(crate::telemetry::store_commit_span("grant.release"))
            .await
            .map_err(lost_race)?;
        Ok(ReleaseOutput { grant, outcome })
    }
}

/// Check scopes, TTL and audience against the destination.
/// A verified actor and the delegation chain it forms.
pub struct Delegation {
    /// The actor's workload.
    pub workload: Workload,
    /// Actors, nearest first: the actor token's workload, then earlier actors the
    /// subject token names in its own `act` claim.
    pub chain: Vec<String>,
}

impl Delegation {
    /// Each hop may only narrow: the scopes must be within what the actor token and the
    /// subject token allow (their `scope` or `scp` claim, when present), and the TTL is
    /// cut to what is left of both tokens' lifetimes.
    ///
    /// # Errors
    /// `DELEGATION_DENIED` naming the scope that would widen a token's.
    pub fn attenuate(
        &self,
        subject: &Workload,
        scopes: &[Scope],
        ttl: Ttl,
        now: i64,
    ) -> Result<Ttl, ApiError> {
        for (who, claims) in [
            ("actor", &self.workload.claims),
            ("subject", &subject.claims),
        ] {
            if let Some(allowed) = scope_claim(claims)
                && let Some(s) = scopes.iter().find(|s| !allowed.contains(&s.to_string()))
            {
                return Err(ApiError::new(
                    ReasonCode::DelegationDenied,
                    format!(
                        "the {who} token allows scopes [{}]; {s} would widen them",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        let left = [&self.workload.claims, &subject.claims]
            .iter()
            .filter_map(|c| c.get("exp").and_then(serde_json::Value::as_i64))
            .map(|exp| exp - now)
            .min()
            .unwrap_or(i64::MAX)
            .max(1);
        match u64::try_from(left) {
            Ok(left) if left < ttl.as_secs() => {
                Ttl::from_secs(left).map_err(|e| ApiError::internal(&e))
            }
            _ => Ok(ttl),
        }
    }
}

/// The `sub` of each earlier actor named in a token's nested `act` claim (RFC 8693 §4.1).
fn prior_actors(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    let mut out = Vec::new();
    let mut act = claims.get("act");
    while let Some(serde_json::Value::Object(a)) = act {
        if out.len() >= 16 {
            break;
        }
        out.push(
            a.get("sub")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("(unnamed actor)")
                .to_owned(),
        );
        act = a.get("act");
    }
    out
}

/// A token's scopes: `scope` (space-separated, RFC 8693) or `scp` (a list).
fn scope_claim(claims: &serde_json::Map<String, serde_json::Value>) -> Option<Vec<String>> {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(serde_json::Value::String(s)), _) => {
            Some(s.split_whitespace().map(str::to_owned).collect())
        }
        (_, Some(serde_json::Value::Array(a))) => Some(
            a.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    }
}

/// The TTL after the policy's cap (`@max_ttl_secs` on the permits that allowed it); a
/// cap that shortened it is noted in the audit event.
fn cap_ttl(ttl: Ttl, decision: &Decision, ev: &mut NewAuditEvent) -> Ttl {
    match decision.max_ttl_secs {
        Some(cap) if cap < ttl.as_secs() => match Ttl::from_secs(cap) {
            Ok(capped) => {
                ev.detail["ttl_capped_by_policy"] = json!(cap);
                capped
            }
            Err(_) => ttl,
        },
        _ => ttl,
    }
}

/// A grant's scopes are what was asked intersected with what policy allows. The whole
/// request first; if it is denied, the scopes policy allows on their own, provided that
/// together they are allowed. Returns the decision that stands and the scopes it covers
/// (all of them when denied).
pub fn narrow_scopes<S: Clone>(
    scopes: &[S],
    decide: impl Fn(&[S]) -> Decision,
) -> (Decision, Vec<S>) {
    let whole = decide(scopes);
    if whole.allowed || scopes.len() < 2 {
        return (whole, scopes.to_vec());
    }
    let allowed: Vec<S> = scopes
        .iter()
        .filter(|s| decide(std::slice::from_ref(*s)).allowed)
        .cloned()
        .collect();
    if allowed.is_empty() {
        return (whole, scopes.to_vec());
    }
    let narrowed = decide(&allowed);
    if narrowed.allowed {
        (narrowed, allowed)
    } else {
        (whole, scopes.to_vec())
    }
}

pub(crate) fn check_request(
    spec: &DestinationSpec,
    requested_scopes: &[String],
    ttl_secs: u32,
    audience: &str,
) -> Result<(Vec<Scope>, Ttl), ApiError> {
    let mut scopes = Vec::with_capacity(requested_scopes.len());
    for s in requested_scopes {
        let scope = Scope::parse(s)
            .map_err(|e| ApiError::new(ReasonCode::ScopeNotAllowed, e.to_string()))?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    let unknown = spec.unknown_scopes(&scopes);
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
        return Err(ApiError::new(
            ReasonCode::ScopeNotAllowed,
            format!(
                "destination {} does not offer scope(s) {}; it offers: {}",
                spec.name,
                names.join(", "),
                spec.scopes.join(", ")
            ),
        ));
    }
    let requested = if ttl_secs == 0 {
        None
    } else {
        Some(
            Ttl::from_secs(u64::from(ttl_secs))
                .map_err(|e| ApiError::new(ReasonCode::TtlInvalid, e.to_string()))?,
        )
    };
    if !audience.is_empty() {
        let dest_aud = spec.settings.get("audience").and_then(|a| a.as_str());
        if audience != spec.name && Some(audience) != dest_aud {
            return Err(ApiError::invalid(
                "audience does not match the destination (leave it empty, or give the destination's audience)",
            ));
        }
    }
    Ok((scopes, spec.effective_ttl(requested)))
}

/// A grant that changed state between our read and our write (a concurrent release,
/// revoke or expiry sweep) is no longer active; other store errors map as usual.
fn lost_race(e: lanyard_store::StoreError) -> ApiError {
    match e {
        lanyard_store::StoreError::Conflict(_) => ApiError::new(
            ReasonCode::GrantNotActive,
            "grant is no longer active; exchange again",
        ),
        other => other.into(),
    }
}

fn revoked_error() -> ApiError {
    ApiError::new(
        ReasonCode::GrantRevoked,
        "the grant was revoked by an operator; its credential no longer works",
    )
}

fn effective_status(g: &GrantRecord, now: i64) -> &'static str {
    if g.status == GrantStatus::Active && g.expires_at <= now {
        "expired"
    } else {
        g.status.as_str()
    }
}

/// Shorten caller-supplied text before echoing it.
pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}
