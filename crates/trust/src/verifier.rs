//! Verifying subject tokens: parse strictly, route by `iss`, pin the algorithm to the
//! issuer's configuration and the key's type, check the signature, then the claims
//! against the injected clock, then the replay guard.
//!
//! ## Why the locking looks like this
//! One slow or broken issuer must never delay another. The issuer table is an
//! `Arc` snapshot behind a `std` lock held only to clone the `Arc`. Each issuer has its
//! own key snapshot (cloned cheaply by readers) and its own `tokio` mutex that makes
//! fetches single-flight. No lock shared between issuers is ever held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::{Map, Value};
use tracing::Instrument;

use lanyard_core::{Secret, SharedClock, UnixTime};

use crate::config::{Algorithm, DEFAULT_MAX_TOKEN_BYTES, IssuerConfig, KeySource};
use crate::error::{Result, TrustError};
use crate::fetch;
use crate::json::{StrictJsonError, parse_strict};
use crate::jwk::{self, VerifyingKey};
use crate::replay::ReplayGuard;

/// Header parameters that make lanyard refuse a token outright.
const REJECTED_HEADER_PARAMS: [&str; 5] = ["crit", "jku", "x5u", "jwk", "x5c"];
/// `typ` values accepted (compared case-insensitively).
const ACCEPTED_TYPES: [&str; 3] = ["jwt", "jose", "application/jwt"];
/// Longest `jti` recorded by the replay guard.
const MAX_JTI_LEN: usize = 256;

/// Settings of the [`Verifier`] that are not per issuer.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifierSettings {
    /// lanyard's own issuer URL: tokens with this `iss` are never accepted.
    pub own_issuer_url: String,
    /// Total time limit of one HTTP request (connect, headers and body). Default 5 s.
    pub http_timeout: Duration,
    /// Largest discovery or JWKS response read. Default 256 KiB.
    pub max_jwks_bytes: usize,
    /// Shortest time fetched keys are cached. Default 60 s.
    pub min_cache: Duration,
    /// Cache time when the response has no `max-age`. Default 300 s.
    pub default_cache: Duration,
    /// Longest time fetched keys are cached. Default 24 h.
    pub max_cache: Duration,
    /// Least time between fetches caused by an unknown `kid` or after a failed fetch,
    /// per issuer. Default 10 s.
    pub refetch_cooldown: Duration,
    /// How long after their fetch last-known-good keys may still be used while the
    /// issuer cannot be reached. Default 24 h.
    pub max_staleness: Duration,
    /// Allow plain `http` to any host. Without it, `http` is allowed only to loopback.
    pub allow_http: bool,
}

impl VerifierSettings {
    /// Settings with the defaults and lanyard's own issuer URL.
    pub fn new(own_issuer_url: impl Into<String>) -> Self {
        Self {
            own_issuer_url: own_issuer_url.into(),
            http_timeout: Duration::from_secs(5),
            max_jwks_bytes: 256 * 1024,
            min_cache: Duration::from_secs(60),
            default_cache: Duration::from_secs(300),
            max_cache: Duration::from_secs(24 * 3600),
            refetch_cooldown: Duration::from_secs(10),
            max_staleness: Duration::from_secs(24 * 3600),
            allow_http: false,
        }
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`TrustError::ConfigInvalid`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        if self.own_issuer_url.is_empty() {
            return Err(TrustError::config("own_issuer_url must not be empty"));
        }
        if self.http_timeout.is_zero() || self.http_timeout > Duration::from_secs(300) {
            return Err(TrustError::config(
                "http_timeout must be between 1 ms and 300 s",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_jwks_bytes) {
            return Err(TrustError::config(
                "max_jwks_bytes must be between 1 KiB and 16 MiB",
            ));
        }
        if !(self.min_cache <= self.default_cache && self.default_cache <= self.max_cache) {
            return Err(TrustError::config(
                "cache times must satisfy min_cache <= default_cache <= max_cache",
            ));
        }
        Ok(())
    }
}

/// The state of one issuer's keys, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeySetStatus {
    /// The issuer's configured name.
    pub name: String,
    /// `kid`s of the keys held.
    pub kids: Vec<String>,
    /// Number of keys held (keys without a `kid` included).
    pub key_count: usize,
    /// When the keys were fetched (or loaded, for inline keys).
    pub fetched_at: Option<UnixTime>,
    /// When the cache lifetime ends; `None` for inline keys or when nothing is held.
    pub expires_at: Option<UnixTime>,
    /// The last fetch error, cleared by a successful fetch.
    pub last_error: Option<String>,
    /// Keys are held but their cache lifetime has passed (served as last-known-good).
    pub stale: bool,
}

/// How often an issuer's keys were fetched over HTTP since this process started, for
/// metrics. Counted per issuer name and kept when the issuer is reconfigured or
/// removed, so the numbers only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FetchCounts {
    /// Fetch attempts (discovery plus JWKS counts as one), failed ones included.
    pub attempts: u64,
    /// Attempts that failed (transport, status, size, parse or discovery errors).
    pub failures: u64,
}

/// A token whose signature and claims verified.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedToken {
    /// The issuer's configured name.
    pub issuer: String,
    /// The token's `iss` (equal to the issuer's `issuer_url`).
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `aud`, always as a list.
    pub aud: Vec<String>,
    /// `exp`.
    pub exp: UnixTime,
    /// `iat`, if present.
    pub iat: Option<UnixTime>,
    /// `nbf`, if present.
    pub nbf: Option<UnixTime>,
    /// `jti`, if present.
    pub jti: Option<String>,
    /// The header `kid`, if present.
    pub kid: Option<String>,
    /// The algorithm that verified.
    pub alg: Algorithm,
    /// Every payload claim, standard ones included.
    pub claims: Map<String, Value>,
}

/// Verifies subject tokens against the configured issuers. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: VerifierSettings,
    clock: SharedClock,
    replay: Arc<dyn ReplayGuard>,
    http: reqwest::Client,
    table: RwLock<Arc<IssuerTable>>,
    /// Per issuer name; see [`FetchCounts`].
    fetch_counts: Mutex<BTreeMap<String, FetchCounts>>,
}

struct IssuerTable {
    by_iss: HashMap<String, Arc<IssuerState>>,
    by_name: HashMap<String, Arc<IssuerState>>,
    /// The largest size limit of any issuer: the check made before any parsing.
    max_token_bytes: usize,
}

impl Default for IssuerTable {
    fn default() -> Self {
        Self {
            by_iss: HashMap::new(),
            by_name: HashMap::new(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES as usize,
        }
    }
}

struct IssuerState {
    config: IssuerConfig,
    /// Why the configuration is unusable, if it is.
    invalid: Option<String>,
    keys: RwLock<Option<Arc<KeySnapshot>>>,
    /// Makes fetches single-flight for this issuer only.
    fetch_lock: tokio::sync::Mutex<()>,
    meta: Mutex<FetchMeta>,
}

#[derive(Default, Clone)]
struct FetchMeta {
    last_attempt_ms: Option<i64>,
    last_failed: bool,
    last_error: Option<String>,
}

struct KeySnapshot {
    keys: Vec<VerifyingKey>,
    fetched_at: UnixTime,
    /// `None`: never expires (inline keys).
    expires_at: Option<UnixTime>,
}

/// Whether verifying a token consumes its `jti` (for issuers with replay protection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplayCheck {
    /// A subject token ([`Verifier::verify`]): the `jti` is required and single-use.
    Enforce,
    /// A credential presented on every request ([`Verifier::verify_reusable`]): the
    /// `jti` is required and checked for shape, but neither looked up nor recorded.
    Reusable,
}

enum Pick {
    Found(VerifyingKey),
    WrongType,
    NoSuchKid,
    NoKidAmbiguous,
}

// === impl IssuerState ===

impl IssuerState {
    fn new(config: IssuerConfig, invalid: Option<String>) -> Self {
        Self {
            config,
            invalid,
            keys: RwLock::new(None),
            fetch_lock: tokio::sync::Mutex::new(()),
            meta: Mutex::new(FetchMeta::default()),
        }
    }

    fn snapshot(&self) -> Option<Arc<KeySnapshot>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn store(&self, snap: Arc<KeySnapshot>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(snap);
    }

    fn meta(&self) -> MutexGuard<'_, FetchMeta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_inline(&self) -> bool {
        matches!(self.config.keys, KeySource::InlineJwks { .. })
    }

    fn unavailable(&self, detail: impl Into<String>) -> TrustError {
        TrustError::IssuerUnavailable {
            issuer: self.config.name.clone(),
            detail: detail.into(),
        }
    }
}

impl KeySnapshot {
    fn pick(&self, kid: Option<&str>, alg: Algorithm) -> Pick {
        match kid {
            Some(kid) => {
                let mut seen = false;
                for k in self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)) {
                    seen = true;
                    if k.supports(alg) {
                        return Pick::Found(k.clone());
                    }
                }
                if seen {
                    Pick::WrongType
                } else {
                    Pick::NoSuchKid
                }
            }
            None => match self.keys.as_slice() {
                [only] if only.supports(alg) => Pick::Found(only.clone()),
                [_] => Pick::WrongType,
                _ => Pick::NoKidAmbiguous,
            },
        }
    }
}

// === impl Verifier ===

impl Verifier {
    /// A verifier with no issuers; add them with [`Verifier::set_issuers`].
    ///
    /// # Errors
    /// [`TrustError::ConfigInvalid`] if the settings are invalid or the HTTP client
    /// cannot be built.
    pub fn new(
        settings: VerifierSettings,
        clock: SharedClock,
        replay: Arc<dyn ReplayGuard>,
    ) -> Result<Self> {
        settings.validate()?;
        let http = fetch::build_client(&settings)
            .map_err(|e| TrustError::config(format!("cannot build the http client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                clock,
                replay,
                http,
                table: RwLock::new(Arc::new(IssuerTable::default())),
                fetch_counts: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &VerifierSettings {
        &self.inner.settings
    }

    /// Replace the issuer set. Cached keys of issuers whose configuration is unchanged
    /// (or changed without touching `issuer_url` and `keys`) are kept.
    ///
    /// Validate with [`crate::validate_issuers`] first: an invalid configuration, or a
    /// second issuer with the same name or `issuer_url`, is logged here and its tokens
    /// are refused ([`TrustError::IssuerUnavailable`] for an invalid one).
    pub fn set_issuers(&self, issuers: Vec<IssuerConfig>) {
        let old = self.table();
        let now = self.inner.clock.now_unix();
        let mut table = IssuerTable::default();
        let mut max_bytes = 0usize;
        for cfg in issuers {
            if table.by_name.contains_key(&cfg.name) || table.by_iss.contains_key(&cfg.issuer_url) {
                tracing::warn!(issuer = %cfg.name, "duplicate issuer name or issuer_url; ignored");
                continue;
            }
            let state = match old.by_name.get(&cfg.name) {
                Some(prev) if prev.config == cfg => Arc::clone(prev),
                prev => Arc::new(self.new_state(cfg, prev.map(Arc::as_ref), now)),
            };
            if state.invalid.is_none() {
                max_bytes = max_bytes.max(state.config.effective_max_token_bytes());
            }
            table
                .by_iss
                .insert(state.config.issuer_url.clone(), Arc::clone(&state));
            table.by_name.insert(state.config.name.clone(), state);
        }
        if max_bytes > 0 {
            table.max_token_bytes = max_bytes;
        }
        *self.inner.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    fn new_state(
        &self,
        cfg: IssuerConfig,
        prev: Option<&IssuerState>,
        now: UnixTime,
    ) -> IssuerState {
        let mut invalid = cfg.validate().err().map(|e| e.to_string());
        if invalid.is_none() && cfg.issuer_url == self.inner.settings.own_issuer_url {
            invalid = Some("issuer_url is lanyard's own issuer url".to_owned());
        }
        if let Some(why) = &invalid {
            tracing::warn!(issuer = %cfg.name, error = %why, "issuer configuration is invalid; its tokens will be refused");
        }
        let state = IssuerState::new(cfg, invalid);
        if state.invalid.is_some() {
            return state;
        }
        if let KeySource::InlineJwks { jwks } = &state.config.keys {
            if let Ok(keys) = jwk::parse_inline_jwks(jwks) {
                state.store(Arc::new(KeySnapshot {
                    keys,
                    fetched_at: now,
                    expires_at: None,
                }));
            }
        } else if let Some(prev) = prev
            && prev.config.keys == state.config.keys
            && prev.config.issuer_url == state.config.issuer_url
        {
            if let Some(snap) = prev.snapshot() {
                state.store(snap);
            }
            *state.meta() = prev.meta().clone();
        }
        state
    }

    fn table(&self) -> Arc<IssuerTable> {
        Arc::clone(&self.inner.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The key state of every issuer, ordered by name.
    pub fn status(&self) -> Vec<KeySetStatus> {
        let table = self.table();
        let mut out: Vec<_> = table.by_name.values().map(|s| self.status_of(s)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn status_of(&self, st: &IssuerState) -> KeySetStatus {
        let now = self.inner.clock.now_unix();
        let meta = st.meta().clone();
        let snap = st.snapshot();
        let last_error = st.invalid.clone().or(meta.last_error);
        match snap {
            None => KeySetStatus {
                name: st.config.name.clone(),
                kids: Vec::new(),
                key_count: 0,
                fetched_at: None,
                expires_at: None,
                last_error,
                stale: false,
            },
            Some(s) => KeySetStatus {
                name: st.config.name.clone(),
                kids: s.keys.iter().filter_map(|k| k.kid.clone()).collect(),
                key_count: s.keys.len(),
                fetched_at: Some(s.fetched_at),
                expires_at: s.expires_at,
                last_error,
                stale: s.expires_at.is_some_and(|e| now >= e),
            },
        }
    }

    /// How often each issuer's keys were fetched, ordered by issuer name. Issuers that
    /// were never fetched (inline keys, or no token seen yet) are absent.
    pub fn fetch_counts(&self) -> Vec<(String, FetchCounts)> {
        self.inner
            .fetch_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, c)| (name.clone(), *c))
            .collect()
    }

    fn count_fetch(&self, issuer: &str, failed: bool) {
        let mut counts = self
            .inner
            .fetch_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(issuer.to_owned()).or_default();
        c.attempts = c.attempts.saturating_add(1);
        if failed {
            c.failures = c.failures.saturating_add(1);
        }
    }

    /// Fetch an issuer's keys now, ignoring the cache and the refetch cooldown.
    ///
    /// # Errors
    /// [`TrustError::IssuerUnknown`] for an unknown name, [`TrustError::ConfigInvalid`]
    /// for an invalid issuer, [`TrustError::IssuerUnavailable`] if the fetch fails (the
    /// keys held before stay in use).
    pub async fn refresh(&self, issuer_name: &str) -> Result<KeySetStatus> {
        let st = self
            .table()
            .by_name
            .get(issuer_name)
            .cloned()
            .ok_or(TrustError::IssuerUnknown)?;
        if let Some(why) = &st.invalid {
            return Err(TrustError::config(why.clone()));
        }
        if !st.is_inline() {
            let guard = st.fetch_lock.lock().await;
            self.fetch_locked(&st, &guard)
                .await
                .map_err(|detail| st.unavailable(detail))?;
        }
        Ok(self.status_of(&st))
    }

    /// Verify a subject token. With the issuer's replay protection on, its `jti` is
    /// single-use ([`TrustError::TokenReplayed`] the second time).
    ///
    /// # Errors
    /// A [`TrustError`] whose [`TrustError::reason`] says why the token was refused.
    pub async fn verify(&self, token: &Secret) -> Result<VerifiedToken> {
        self.verify_with(token, ReplayCheck::Enforce).await
    }

    /// Verify a token its holder presents on every request rather than once, such as
    /// the platform token a resource server authenticates its introspection calls with.
    /// Every check of [`Verifier::verify`] applies (signature, issuer, audience, expiry,
    /// maximum age, and with replay protection a well-formed `jti`) except that the
    /// `jti` is neither looked up in nor recorded by the replay guard: the token stays
    /// usable until it expires, and using it here never burns it for an exchange.
    ///
    /// ## Why
    /// Replay protection makes a stolen subject token worthless for minting credentials.
    /// A client credential is reused by design; what it unlocks (introspecting tokens
    /// the caller already holds) is bounded by its short lifetime and by the
    /// destinations that list the caller.
    ///
    /// # Errors
    /// As [`Verifier::verify`], never [`TrustError::TokenReplayed`].
    pub async fn verify_reusable(&self, token: &Secret) -> Result<VerifiedToken> {
        self.verify_with(token, ReplayCheck::Reusable).await
    }

    async fn verify_with(&self, token: &Secret, replay: ReplayCheck) -> Result<VerifiedToken> {
        // The issuer name is logged only once `iss` matched a configured issuer: an
        // unmatched `iss` is attacker text and stays out of the logs.
        let mut routed: Option<String> = None;
        // Target `lanyard::trace`: exported as an OpenTelemetry span when tracing is on,
        // kept out of the log lines (the server's subscriber decides).
        let span = tracing::info_span!(target: "lanyard::trace", "token.verify", issuer = tracing::field::Empty);
        let result = self
            .verify_inner(token, replay, &mut routed)
            .instrument(span.clone())
            .await;
        if let Some(issuer) = &routed {
            span.record("issuer", issuer.as_str());
        }
        match &result {
            Ok(t) => {
                tracing::debug!(issuer = %t.issuer, kid = ?t.kid, alg = %t.alg, "subject token verified")
            }
            Err(e) => tracing::debug!(
                issuer = routed.as_deref().unwrap_or("-"),
                reason = %e.reason(),
                error = %e,
                "subject token refused"
            ),
        }
        result
    }

    async fn verify_inner(
        &self,
        token: &Secret,
        replay: ReplayCheck,
        routed: &mut Option<String>,
    ) -> Result<VerifiedToken> {
        let table = self.table();
        let raw = token.expose();
        if raw.len() > table.max_token_bytes {
            return Err(TrustError::TokenTooLarge {
                size: raw.len(),
                max: table.max_token_bytes,
            });
        }
        let (h64, p64, s64) = split_compact(raw)?;
        let header = decode_object(h64, "header")?;
        let payload = decode_object(p64, "payload")?;
        let Ok(signature) = URL_SAFE_NO_PAD.decode(s64) else {
            return Err(TrustError::TokenMalformed("signature is not base64url"));
        };

        for param in REJECTED_HEADER_PARAMS {
            if header.contains_key(param) {
                return Err(TrustError::TokenHeaderRejected(param));
            }
        }
        match header.get("typ") {
            None => {}
            Some(Value::String(t)) if ACCEPTED_TYPES.iter().any(|a| t.eq_ignore_ascii_case(a)) => {}
            Some(_) => {
                return Err(TrustError::TokenTypeRejected(
                    "token type is not accepted: typ must be absent, JWT, JOSE or application/jwt",
                ));
            }
        }
        let alg_name = match header.get("alg") {
            Some(Value::String(a)) => a.as_str(),
            _ => return Err(TrustError::TokenMalformed("header has no string alg")),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(TrustError::TokenMalformed("header kid is not a string")),
        };
        let iss = match payload.get("iss") {
            None => return Err(TrustError::ClaimMissing("iss".into())),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(TrustError::claim_invalid("iss", "must be a string")),
        };
        if iss == self.inner.settings.own_issuer_url {
            return Err(TrustError::TokenTypeRejected(
                "lanyard does not accept its own tokens as subject tokens",
            ));
        }

        // Route by `iss`. Nothing from the token is trusted until the signature verifies.
        let st = table
            .by_iss
            .get(iss)
            .cloned()
            .ok_or(TrustError::IssuerUnknown)?;
        drop(table);
        let cfg = &st.config;
        *routed = Some(cfg.name.clone());
        if st.invalid.is_some() {
            return Err(st.unavailable("issuer configuration is invalid"));
        }
        let max = cfg.effective_max_token_bytes();
        if raw.len() > max {
            return Err(TrustError::TokenTooLarge {
                size: raw.len(),
                max,
            });
        }
        let not_allowed = || {
            TrustError::AlgorithmNotAllowed(format!(
                "issuer `{}` accepts only {}",
                cfg.name,
                cfg.allowed_algorithms
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        let alg: Algorithm = alg_name.parse().map_err(|_| not_allowed())?;
        if !cfg.allowed_algorithms.contains(&alg) {
            return Err(not_allowed());
        }

        let key = self.select_key(&st, kid.as_deref(), alg).await?;
        let signed_len = h64.len() + 1 + p64.len();
        let message = raw
            .get(..signed_len)
            .ok_or(TrustError::TokenMalformed("token is truncated"))?;
        let valid = match &key.ec {
            // The pre-parsed EC key, for exactly the algorithm it was parsed for.
            Some((for_alg, parsed)) if *for_alg == alg => {
                parsed.verify_sig(message.as_bytes(), &signature).is_ok()
            }
            _ => matches!(
                jsonwebtoken::crypto::verify(s64, message.as_bytes(), &key.key, alg.to_jwt()),
                Ok(true)
            ),
        };
        if !valid {
            return Err(TrustError::SignatureInvalid);
        }

        self.check_claims(cfg, payload, alg, kid, replay).await
    }

    /// Find the key for `kid`/`alg`, fetching or refetching as the cache requires.
    async fn select_key(
        &self,
        st: &IssuerState,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<VerifyingKey> {
        let snap = self.current_keys(st).await?;
        let wrong_type = || {
            TrustError::AlgorithmNotAllowed(format!(
                "the key of issuer `{}` named by the token cannot verify {alg}",
                st.config.name
            ))
        };
        let unknown = || TrustError::KeyUnknown {
            issuer: st.config.name.clone(),
        };
        match snap.pick(kid, alg) {
            Pick::Found(k) => return Ok(k),
            Pick::WrongType => return Err(wrong_type()),
            Pick::NoKidAmbiguous => return Err(unknown()),
            Pick::NoSuchKid => {}
        }
        // An unknown kid may mean the issuer rotated: refetch once, rate-limited.
        if st.is_inline() || !self.refetch_allowed(st) {
            tracing::debug!(issuer = %st.config.name, "unknown kid; refetch not allowed yet");
            return Err(unknown());
        }
        let guard = st.fetch_lock.lock().await;
        let current = match st.snapshot() {
            Some(cur) if !Arc::ptr_eq(&cur, &snap) => cur,
            _ if !self.refetch_allowed(st) => return Err(unknown()),
            _ => {
                tracing::info!(issuer = %st.config.name, "unknown kid; refetching issuer keys");
                match self.fetch_locked(st, &guard).await {
                    Ok(s) => s,
                    Err(_) => return Err(unknown()),
                }
            }
        };
        drop(guard);
        match current.pick(kid, alg) {
            Pick::Found(k) => Ok(k),
            Pick::WrongType => Err(wrong_type()),
            Pick::NoSuchKid | Pick::NoKidAmbiguous => Err(unknown()),
        }
    }

    fn refetch_allowed(&self, st: &IssuerState) -> bool {
        let now_ms = self.inner.clock.now_unix_millis();
        let cooldown = duration_ms(self.inner.settings.refetch_cooldown);
        st.meta()
            .last_attempt_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= cooldown)
    }

    fn in_failure_cooldown(&self, st: &IssuerState) -> bool {
        let now_ms = self.inner.clock.now_unix_millis();
        let cooldown = duration_ms(self.inner.settings.refetch_cooldown);
        let meta = st.meta();
        meta.last_failed
            && meta
                .last_attempt_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < cooldown)
    }

    /// The keys to verify with now: fresh from the cache, freshly fetched, or
    /// last-known-good while the issuer is unreachable and within `max_staleness`.
    async fn current_keys(&self, st: &IssuerState) -> Result<Arc<KeySnapshot>> {
        let now = self.inner.clock.now_unix();
        let snap = st.snapshot();
        if let Some(s) = &snap
            && self.is_fresh(s, now)
        {
            return Ok(Arc::clone(s));
        }
        if st.is_inline() {
            return snap.ok_or_else(|| st.unavailable("inline keys are not usable"));
        }
        let last_error = || st.meta().last_error.clone().unwrap_or_default();
        match snap {
            Some(stale) => {
                if self.in_failure_cooldown(st) {
                    return self.serve_stale(st, stale, now);
                }
                // Don't queue behind a fetch already running: serve what we have.
                let Ok(guard) = st.fetch_lock.try_lock() else {
                    return self.serve_stale(st, stale, now);
                };
                if let Some(cur) = st.snapshot()
                    && !Arc::ptr_eq(&cur, &stale)
                {
                    return Ok(cur);
                }
                match self.fetch_locked(st, &guard).await {
                    Ok(s) => Ok(s),
                    Err(_) => self.serve_stale(st, stale, now),
                }
            }
            None => {
                if self.in_failure_cooldown(st) {
                    return Err(st.unavailable(last_error()));
                }
                let guard = st.fetch_lock.lock().await;
                if let Some(cur) = st.snapshot() {
                    return Ok(cur);
                }
                if self.in_failure_cooldown(st) {
                    return Err(st.unavailable(last_error()));
                }
                self.fetch_locked(st, &guard)
                    .await
                    .map_err(|detail| st.unavailable(detail))
            }
        }
    }

    fn is_fresh(&self, s: &KeySnapshot, now: UnixTime) -> bool {
        let Some(expires_at) = s.expires_at else {
            return true;
        };
        now < expires_at && !self.beyond_staleness(s, now)
    }

    fn beyond_staleness(&self, s: &KeySnapshot, now: UnixTime) -> bool {
        let max = duration_secs(self.inner.settings.max_staleness);
        now > s.fetched_at.saturating_add(max)
    }

    fn serve_stale(
        &self,
        st: &IssuerState,
        stale: Arc<KeySnapshot>,
        now: UnixTime,
    ) -> Result<Arc<KeySnapshot>> {
        if self.beyond_staleness(&stale, now) {
            let last = st.meta().last_error.clone().unwrap_or_default();
            return Err(st.unavailable(format!(
                "keys fetched at {} are older than the maximum staleness; last error: {last}",
                stale.fetched_at
            )));
        }
        tracing::debug!(issuer = %st.config.name, "serving last-known-good keys");
        Ok(stale)
    }

    /// Fetch and store the issuer's keys. The caller holds the issuer's fetch lock.
    async fn fetch_locked(
        &self,
        st: &IssuerState,
        _guard: &tokio::sync::MutexGuard<'_, ()>,
    ) -> std::result::Result<Arc<KeySnapshot>, String> {
        let span = tracing::info_span!(
            target: "lanyard::trace",
            "jwks.fetch",
            issuer = %st.config.name,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
        );
        let result = fetch::fetch_keys(&self.inner.http, &self.inner.settings, &st.config)
            .instrument(span.clone())
            .await;
        self.count_fetch(&st.config.name, result.is_err());
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        let now_ms = self.inner.clock.now_unix_millis();
        let now = now_ms.div_euclid(1000);
        match result {
            Ok(fetched) => {
                let snap = Arc::new(KeySnapshot {
                    expires_at: Some(now.saturating_add(duration_secs(fetched.ttl))),
                    keys: fetched.keys,
                    fetched_at: now,
                });
                st.store(Arc::clone(&snap));
                {
                    let mut meta = st.meta();
                    meta.last_attempt_ms = Some(now_ms);
                    meta.last_failed = false;
                    meta.last_error = None;
                }
                tracing::info!(
                    issuer = %st.config.name,
                    keys = snap.keys.len(),
                    kids = ?snap.keys.iter().filter_map(|k| k.kid.as_deref()).collect::<Vec<_>>(),
                    "issuer keys fetched"
                );
                Ok(snap)
            }
            Err(e) => {
                let detail = e.to_string();
                {
                    let mut meta = st.meta();
                    meta.last_attempt_ms = Some(now_ms);
                    meta.last_failed = true;
                    meta.last_error = Some(detail.clone());
                }
                tracing::warn!(issuer = %st.config.name, error = %detail, "fetching issuer keys failed");
                Err(detail)
            }
        }
    }

    /// Check the claims of a token whose signature verified.
    async fn check_claims(
        &self,
        cfg: &IssuerConfig,
        claims: Map<String, Value>,
        alg: Algorithm,
        kid: Option<String>,
        replay: ReplayCheck,
    ) -> Result<VerifiedToken> {
        let now = self.inner.clock.now_unix();
        let leeway = i64::from(cfg.leeway_secs);

        let exp =
            numeric_date(&claims, "exp")?.ok_or_else(|| TrustError::ClaimMissing("exp".into()))?;
        if now > exp.saturating_add(leeway) {
            return Err(TrustError::TokenExpired);
        }
        let nbf = numeric_date(&claims, "nbf")?;
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(TrustError::TokenNotYetValid("nbf"));
        }
        let iat = numeric_date(&claims, "iat")?;
        if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
            return Err(TrustError::TokenNotYetValid("iat"));
        }
        if let Some(max_age) = cfg.max_token_age_secs {
            let iat = iat.ok_or_else(|| TrustError::ClaimMissing("iat".into()))?;
            if now.saturating_sub(iat) > i64::from(max_age) {
                return Err(TrustError::TokenTooOld { max_secs: max_age });
            }
        }
        let sub = match claims.get("sub") {
            None => return Err(TrustError::ClaimMissing("sub".into())),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => {
                return Err(TrustError::claim_invalid(
                    "sub",
                    "must be a non-empty string",
                ));
            }
        };
        let aud = match claims.get("aud") {
            None => return Err(TrustError::ClaimMissing("aud".into())),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    TrustError::claim_invalid("aud", "must be a string or an array of strings")
                })?,
            Some(_) => {
                return Err(TrustError::claim_invalid(
                    "aud",
                    "must be a string or an array of strings",
                ));
            }
        };
        if !aud.iter().any(|a| cfg.audiences.contains(a)) {
            return Err(TrustError::AudienceMismatch {
                issuer: cfg.name.clone(),
            });
        }
        let jti = match claims.get("jti") {
            None => None,
            Some(Value::String(j)) => Some(j.clone()),
            Some(_) => return Err(TrustError::claim_invalid("jti", "must be a string")),
        };
        if cfg.replay_protection {
            let jti = jti
                .as_deref()
                .ok_or_else(|| TrustError::ClaimMissing("jti".into()))?;
            if jti.is_empty() || jti.len() > MAX_JTI_LEN {
                return Err(TrustError::claim_invalid("jti", "must be 1-256 bytes"));
            }
            // Keyed by `iss`, the namespace in which the issuer keeps `jti` unique.
            let first = match replay {
                ReplayCheck::Enforce => self
                    .inner
                    .replay
                    .check_and_record(&cfg.issuer_url, jti, exp.saturating_add(leeway))
                    .await
                    .map_err(TrustError::ReplayCheck)?,
                ReplayCheck::Reusable => true,
            };
            if !first {
                tracing::info!(issuer = %cfg.name, "replayed jti refused");
                return Err(TrustError::TokenReplayed);
            }
        }
        Ok(VerifiedToken {
            issuer: cfg.name.clone(),
            iss: cfg.issuer_url.clone(),
            sub,
            aud,
            exp,
            iat,
            nbf,
            jti,
            kid,
            alg,
            claims,
        })
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn duration_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Split a compact JWS into its three base64url segments.
fn split_compact(raw: &str) -> Result<(&str, &str, &str)> {
    let mut parts = raw.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TrustError::TokenMalformed(
            "expected a compact jws of three dot-separated parts",
        ));
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(TrustError::TokenMalformed("a token part is empty"));
    }
    let b64url = |x: &str| {
        x.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !(b64url(h) && b64url(p) && b64url(s)) {
        return Err(TrustError::TokenMalformed(
            "token parts must be unpadded base64url",
        ));
    }
    Ok((h, p, s))
}

fn decode_object(segment: &str, part: &'static str) -> Result<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        TrustError::TokenMalformed(if part == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    match parse_strict(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) | Err(StrictJsonError::Invalid) => {
            Err(TrustError::TokenMalformed(if part == "header" {
                "header is not a json object"
            } else {
                "payload is not a json object"
            }))
        }
        Err(StrictJsonError::Duplicate) => Err(TrustError::TokenDuplicateClaim(part)),
    }
}

/// A NumericDate claim: absent, or a number (fractions are truncated).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<UnixTime>> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                // Saturating float-to-int conversion; fractions of a second don't matter.
                Ok(Some(f.floor() as i64))
            } else {
                Err(TrustError::claim_invalid(name, "must be a number"))
            }
        }
        Some(_) => Err(TrustError::claim_invalid(name, "must be a number")),
    }
}

#[cfg(test)]
#[path = "verifier_tests.rs"]
mod tests;
