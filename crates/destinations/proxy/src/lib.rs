//! The `proxy` destination: a broker for APIs that accept only a long-lived static key.
//! The workload never sees the key. It gets a short-lived lanyard token whose one `aud`
//! is this destination's proxy audience, and calls lanyard's proxy listener
//! (`[proxy] listen`) at `<proxy url>/d/<name>/<path>` with that token where the SDK
//! puts its API key. The proxy (in `lanyard-server`) verifies the token as introspection
//! does, checks the method and path against the rules of the granted scopes, swaps the
//! token for the real key (registered write-only with `PutDestinationSecret`) and
//! streams the answer back.
//!
//! This crate owns what can be decided without I/O: the settings, issuing the token,
//! path normalization ([`normalize_path`]), rule matching ([`ProxySettings::allowed`]),
//! header checks and filtering ([`check_request_headers`], [`take_token`],
//! [`forward_headers`], [`response_headers`]), what a static key is bound to
//! ([`KeyBinding`]), finding the key in a streamed answer ([`KeyScanner`]) and the
//! per-grant [`RateLimiter`].
//!
//! # Settings
//! ```json
//! {"upstream_url": "https://api.anthropic.com", "key_header": "x-api-key", "key_prefix": "",
//!  "rules": {"claude:read":  [{"methods": ["GET"], "path": "/v1/models/**"}],
//!            "claude:write": [{"methods": ["POST"], "path": "/v1/messages"}]},
//!  "max_request_bytes": 1048576, "max_response_bytes": 67108864,
//!  "requests_per_minute": 600, "strip_headers": ["anthropic-admin-key"]}
//! ```
//! Every key of `rules` must be one of the destination's scopes, so read, write and
//! escalation stay separate scopes; a request is allowed when a rule of a granted scope
//! lists its method and its normalized path matches the rule's pattern. In a pattern,
//! a segment `*` matches exactly one segment, `*` inside a segment matches any
//! characters of that segment, and a final `**` matches any number of segments
//! (including none).
//!
//! # Revocation
//! [`Revocability::Immediate`]: the proxy checks the grant in the store on every
//! request, and cuts a streaming answer when the grant is revoked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header::{HeaderMap, HeaderName};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, Revocability,
    RevokeOutcome, RevokeRequest, TokenMinter,
};
use lanyard_destination_jwt::JwtDestination;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The adapter kind this crate implements.
pub const KIND: &str = "proxy";
/// The proxy listener's route prefix: `/<ROUTE_PREFIX>/<destination>/<path>`.
pub const ROUTE_PREFIX: &str = "d";
/// What a revocation receipt says for a `proxy` credential.
pub const REVOKED_DETAIL: &str =
    "refused by lanyard's proxy from now on; streams in flight are cut";
/// Default `max_request_bytes` (1 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Default `max_response_bytes` (64 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 << 20;
/// Default `requests_per_minute` per grant.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 600;
/// Largest `max_request_bytes` accepted (64 MiB: the proxy holds a request body in
/// memory before it forwards it).
pub const MAX_MAX_REQUEST_BYTES: u64 = 64 << 20;
/// At most this many rules in all.
pub const MAX_RULES: usize = 256;
/// Methods a rule may name.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Headers that may carry a key, removed from every forwarded request whatever the
/// settings say (the configured `key_header` and `strip_headers` are removed too).
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "cookie",
];
/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction; headers
/// a `Connection` header names are removed as well.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
/// Other request headers the proxy sets itself or drops.
const NOT_FORWARDED: &[&str] = &["host", "content-length", "expect"];
/// Request headers that let a server, a framework or a gateway in front of the upstream
/// read another method, path or client than the one lanyard checked: never forwarded
/// (a deny list, so the SDK's own headers, e.g. `anthropic-version`, pass).
pub const OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-original-uri",
    "x-envoy-original-path",
    "x-envoy-original-url",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];
/// Prefixes of request header names never forwarded, for the same reason
/// (`x-forwarded-for`, `-host`, `-proto`, `-prefix`, `-path`, `-uri`...).
pub const OVERRIDE_HEADER_PREFIXES: &[&str] = &["x-forwarded-", "x-envoy-"];
/// Response headers never sent back: cookies the upstream sets are the key owner's
/// session, not the workload's.
pub const RESPONSE_DROPPED: &[&str] = &["set-cookie", "set-cookie2"];

/// Whether a request header may override the method, path or client the upstream sees.
pub fn is_override_header(name: &str) -> bool {
    OVERRIDE_HEADERS.contains(&name) || OVERRIDE_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Adapter errors are [`DestinationError`]s.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

// === settings ===

/// One rule: which methods on which paths a scope allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Upper-case HTTP methods, from [`METHODS`].
    pub methods: Vec<String>,
    /// A path pattern: starts with `/`; `*` matches one segment (or characters inside a
    /// segment), a final `**` any number of segments.
    pub path: String,
}

/// The `settings` block of a `proxy` destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Where requests go: `https://...` (or `http://` on loopback), optionally with a
    /// base path that every forwarded path is appended to.
    pub upstream_url: String,
    /// The header the upstream API takes its key in (and the workload's SDK sends
    /// lanyard's token in), e.g. `x-api-key` or `authorization`. Lowercase.
    pub key_header: String,
    /// What comes before the key in that header, e.g. `Bearer ` (empty for `x-api-key`).
    #[serde(default)]
    pub key_prefix: String,
    /// Per scope, the requests it allows.
    pub rules: BTreeMap<String, Vec<Rule>>,
    /// Largest request body forwarded; larger ones are refused with 413.
    #[serde(default = "default_max_request")]
    pub max_request_bytes: u64,
    /// Largest response body streamed back; a longer one is cut there.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: u64,
    /// Requests per minute per grant (token bucket, burst of the same size); more are
    /// refused with 429 and `Retry-After`.
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// More request header names to remove before forwarding (lowercase).
    #[serde(default)]
    pub strip_headers: Vec<String>,
}

fn default_max_request() -> u64 {
    DEFAULT_MAX_REQUEST_BYTES
}
fn default_max_response() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}
fn default_rpm() -> u32 {
    DEFAULT_REQUESTS_PER_MINUTE
}

/// A compiled rule.
#[derive(Debug, Clone)]
struct CompiledRule {
    methods: Vec<String>,
    pattern: Pattern,
}

/// Settings parsed, validated and compiled.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The settings as given.
    pub settings: ProxySettings,
    /// `upstream_url` without a trailing `/`.
    pub upstream_base: String,
    /// `key_header`, parsed.
    pub key_header: HeaderName,
    /// The origin of `upstream_url` (`scheme://host[:port]`): where the key goes.
    pub upstream_origin: String,
    rules: BTreeMap<String, Vec<CompiledRule>>,
    strip: Vec<HeaderName>,
}

impl ProxyConfig {
    /// Parse and validate a `settings` block for a destination offering `scopes`.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value, scopes: &[String]) -> Result<Self> {
        let bad = |message: String| DestinationError::InvalidSettings {
            kind: KIND.to_owned(),
            message,
        };
        let s: ProxySettings =
            serde_json::from_value(settings.clone()).map_err(|e| bad(format!("settings: {e}")))?;
        let url = lanyard_destination::http::check_endpoint(&s.upstream_url)
            .map_err(|m| bad(format!("settings.upstream_url: {m}")))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "settings.upstream_url must not have a query or fragment".into(),
            ));
        }
        let key_header = HeaderName::from_bytes(s.key_header.as_bytes())
            .ok()
            .filter(|h| h.as_str() == s.key_header)
            .ok_or_else(|| {
                bad(format!(
                    "settings.key_header {:?} must be a lowercase header name",
                    s.key_header
                ))
            })?;
        if HOP_BY_HOP
            .iter()
            .chain(NOT_FORWARDED)
            .any(|h| *h == key_header.as_str())
        {
            return Err(bad(format!(
                "settings.key_header {:?} cannot carry a key",
                s.key_header
            )));
        }
        if s.key_prefix.len() > 64
            || !s
                .key_prefix
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(bad(
                "settings.key_prefix must be at most 64 printable ASCII characters".into(),
            ));
        }
        if s.max_request_bytes == 0 || s.max_request_bytes > MAX_MAX_REQUEST_BYTES {
            return Err(bad(format!(
                "settings.max_request_bytes must be 1..={MAX_MAX_REQUEST_BYTES}"
            )));
        }
        if s.max_response_bytes == 0 {
            return Err(bad("settings.max_response_bytes must be at least 1".into()));
        }
        if s.requests_per_minute == 0 {
            return Err(bad("settings.requests_per_minute must be at least 1".into()));
        }
        let mut strip = Vec::new();
        for name in &s.strip_headers {
            let h = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .filter(|h| h.as_str() == name)
                .ok_or_else(|| {
                    bad(format!(
                        "settings.strip_headers: {name:?} is not a lowercase header name"
                    ))
                })?;
            strip.push(h);
        }
        if s.rules.is_empty() {
            return Err(bad(
                "settings.rules must give at least one scope its requests".into(),
            ));
        }
        let total: usize = s.rules.values().map(Vec::len).sum();
        if total > MAX_RULES {
            return Err(bad(format!(
                "settings.rules has more than {MAX_RULES} rules"
            )));
        }
        let mut rules = BTreeMap::new();
        for (scope, list) in &s.rules {
            if !scopes.contains(scope) {
                return Err(bad(format!(
                    "settings.rules names scope {scope:?}, which the destination does not offer"
                )));
            }
            let mut compiled = Vec::new();
            for (i, rule) in list.iter().enumerate() {
                let at = format!("settings.rules.{scope}[{i}]");
                if rule.methods.is_empty() {
                    return Err(bad(format!("{at}.methods must not be empty")));
                }
                for m in &rule.methods {
                    if !METHODS.contains(&m.as_str()) {
                        return Err(bad(format!(
                            "{at}.methods: {m:?} is not one of {}",
                            METHODS.join(", ")
                        )));
                    }
                }
                let pattern =
                    Pattern::parse(&rule.path).map_err(|m| bad(format!("{at}.path: {m}")))?;
                compiled.push(CompiledRule {
                    methods: rule.methods.clone(),
                    pattern,
                });
            }
            rules.insert(scope.clone(), compiled);
        }
        Ok(Self {
            upstream_base: s.upstream_url.trim_end_matches('/').to_owned(),
            upstream_origin: url.origin().ascii_serialization(),
            key_header,
            rules,
            strip,
            settings: s,
        })
    }

    /// The first rule of a granted scope allowing `method` on `path`: its scope and
    /// its path pattern (what the audit event names, never the raw path).
    pub fn allowed<'a>(
        &'a self,
        scopes: &[String],
        method: &str,
        path: &NormalizedPath,
    ) -> Option<(&'a str, &'a str)> {
        self.rules
            .iter()
            .filter(|(scope, _)| scopes.contains(scope))
            .find_map(|(scope, rules)| {
                rules
                    .iter()
                    .find(|r| r.methods.iter().any(|m| m == method) && r.pattern.matches(path))
                    .map(|r| (scope.as_str(), r.pattern.text.as_str()))
            })
    }

    /// The upstream URL for a normalized path and the raw query (if any).
    pub fn upstream_url(&self, path: &NormalizedPath, query: Option<&str>) -> String {
        match query {
            Some(q) => format!("{}{}?{q}", self.upstream_base, path.raw),
            None => format!("{}{}", self.upstream_base, path.raw),
        }
    }

    /// The header value that carries `key` upstream: `key_prefix` + key.
    pub fn key_value(&self, key: &str) -> String {
        format!("{}{key}", self.settings.key_prefix)
    }

    /// What the destination's key is bound to: it is sent only while these settings
    /// stay as they were when it was set.
    pub fn binding(&self) -> KeyBinding {
        KeyBinding {
            kind: KIND.to_owned(),
            upstream_origin: self.upstream_origin.clone(),
            key_header: self.settings.key_header.clone(),
            key_prefix: self.settings.key_prefix.clone(),
        }
    }
}

/// The settings a destination's static key is bound to when it is set: where it goes
/// and how. An admin who changes any of them (e.g. points `upstream_url` at a host they
/// control) must set the key again, which is audited, before the proxy sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBinding {
    /// The destination's kind (`proxy`).
    pub kind: String,
    /// The origin of `upstream_url`.
    pub upstream_origin: String,
    /// `key_header`.
    pub key_header: String,
    /// `key_prefix`.
    pub key_prefix: String,
}

impl KeyBinding {
    /// The associated data a key is sealed with: the destination's name and this
    /// binding, unambiguously encoded. A sealed key moved to another destination, or
    /// opened for changed settings, does not open.
    pub fn aad(&self, destination: &str) -> Vec<u8> {
        json!([
            "lanyard-destination-secret/v2",
            destination,
            self.kind,
            self.upstream_origin,
            self.key_header,
            self.key_prefix
        ])
        .to_string()
        .into_bytes()
    }
}

// === the destination ===

/// The proxy audience of destination `name` at lanyard `issuer_url`: the one `aud` of
/// its tokens, `<issuer>/proxy/<name>`.
pub fn audience(issuer_url: &str, name: &str) -> String {
    format!("{}/proxy/{name}", issuer_url.trim_end_matches('/'))
}

/// A `proxy` destination.
pub struct ProxyDestination {
    config: ProxyConfig,
    inner: JwtDestination,
}

impl std::fmt::Debug for ProxyDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDestination")
            .field("upstream", &self.config.upstream_base)
            .finish_non_exhaustive()
    }
}

impl ProxyDestination {
    /// Build the adapter from its spec.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`].
    pub fn new(spec: &DestinationSpec, minter: Arc<dyn TokenMinter>) -> Result<Self> {
        if spec.kind != KIND {
            return Err(DestinationError::InvalidSettings {
                kind: KIND.to_owned(),
                message: format!(
                    "destination {} has kind {:?}, not {KIND:?}",
                    spec.name, spec.kind
                ),
            });
        }
        spec.validate()?;
        let config = ProxyConfig::from_value(&spec.settings, &spec.scopes)?;
        // The token is a `jwt` destination's access token for the proxy audience.
        let jwt_spec = DestinationSpec {
            kind: lanyard_destination_jwt::KIND.to_owned(),
            settings: json!({"audience": audience(minter.issuer_url(), &spec.name)}),
            ..spec.clone()
        };
        let inner = JwtDestination::new(&jwt_spec, minter)?;
        Ok(Self { config, inner })
    }

    /// The compiled settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }
}

#[async_trait]
impl Destination for ProxyDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::Immediate
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let issued = self.inner.issue(req).await?;
        let Credential::Bearer {
            token,
            issued_token_type,
            ..
        } = issued.credential
        else {
            return Err(DestinationError::BadRequest(
                "the proxy token could not be minted".into(),
            ));
        };
        Ok(Issued {
            credential: Credential::Bearer {
                token,
                token_type: self.config.settings.key_prefix.trim().to_owned(),
                issued_token_type,
                header: self.config.settings.key_header.clone(),
            },
            expires_at: issued.expires_at,
            revocation_handle: issued.revocation_handle,
        })
    }

    /// Nothing to call: the proxy checks the grant on every request.
    async fn revoke(&self, _req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        Ok(RevokeOutcome::Revoked {
            detail: REVOKED_DETAIL.to_owned(),
        })
    }
}

// === paths ===

/// Why a request path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not starting with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// An empty segment (`//`) other than a final `/`.
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("the path has a . or .. segment")]
    DotSegment,
    /// An encoded `/`, `\`, `%` or control character, a raw `\` or `;`, or a bad escape.
    #[error("the path has an encoded separator, a backslash, a semicolon or a bad escape")]
    Forbidden,
    /// A segment that decodes to non-ASCII, or ends in `.` or a space (which some
    /// servers strip, e.g. `messages.` read as `messages`).
    #[error("the path has a non-ASCII character or a segment ending in . or a space")]
    Ambiguous,
}

/// A request path that passed [`normalize_path`]: the raw text to forward and its
/// decoded segments to match rules against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The path as received (already canonical: nothing to resolve).
    pub raw: String,
    /// The percent-decoded segments; a final empty one for a trailing `/`.
    pub segments: Vec<String>,
}

/// Check a request path (without the `/d/<name>` prefix; empty means `/`). lanyard does
/// not resolve anything: a path that an upstream might read differently from lanyard
/// is refused, so the path that was checked is the path that is forwarded.
///
/// Refused: no leading `/`; `//`; `.` or `..` segments, also when percent-encoded
/// (`%2e%2e`); encoded `/` (`%2f`), `\` (`%5c`), `%` (`%25`, double encoding) or
/// control characters; a raw `\` or `;`; a `%` not followed by two hex digits; a
/// segment that decodes to non-ASCII or ends in `.` or a space.
///
/// # Errors
/// [`PathError`].
pub fn normalize_path(raw: &str) -> Result<NormalizedPath, PathError> {
    let raw = if raw.is_empty() { "/" } else { raw };
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if raw
        .bytes()
        .any(|b| b == b'\\' || b == b';' || !b.is_ascii_graphic())
    {
        return Err(PathError::Forbidden);
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            if i == last {
                segments.push(String::new());
                continue;
            }
            return Err(PathError::EmptySegment);
        }
        let decoded = decode_segment(part)?;
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        if !decoded.is_ascii() || decoded.ends_with('.') || decoded.ends_with(' ') {
            return Err(PathError::Ambiguous);
        }
        segments.push(decoded);
    }
    Ok(NormalizedPath {
        raw: raw.to_owned(),
        segments,
    })
}

/// Strict percent-decoding of one segment; what decodes to a separator, `%` or a
/// control character is refused.
fn decode_segment(s: &str) -> Result<String, PathError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |x: u8| (x as char).is_ascii_hexdigit();
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(&h), Some(&l)) if hex(h) && hex(l) => i += 3,
                _ => return Err(PathError::Forbidden),
            }
        } else {
            i += 1;
        }
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(s).collect();
    let text = String::from_utf8(bytes).map_err(|_| PathError::Forbidden)?;
    if text
        .chars()
        .any(|c| c == '/' || c == '\\' || c == '%' || c == ';' || c.is_control())
    {
        return Err(PathError::Forbidden);
    }
    Ok(text)
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    segments: Vec<String>,
    /// Ends in `**`.
    rest: bool,
}

impl Pattern {
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let rest_text = text
            .strip_prefix('/')
            .ok_or_else(|| format!("{text:?} must start with /"))?;
        if text.len() > 512 {
            return Err("longer than 512 characters".into());
        }
        let mut segments: Vec<String> = rest_text.split('/').map(str::to_owned).collect();
        let rest = segments.last().is_some_and(|s| s == "**");
        if rest {
            segments.pop();
        }
        let last = segments.len().saturating_sub(1);
        for (i, seg) in segments.iter().enumerate() {
            if seg.is_empty() && (rest || i != last) {
                return Err(format!("{text:?} has an empty segment"));
            }
            if seg.contains("**") {
                return Err(format!("{text:?}: ** is allowed only as the last segment"));
            }
            if seg == "." || seg == ".." {
                return Err(format!("{text:?} has a . or .. segment"));
            }
            if seg.bytes().any(|b| {
                b == b'%'
                    || b == b'\\'
                    || b == b';'
                    || b == b'?'
                    || b == b'#'
                    || !b.is_ascii_graphic()
            }) {
                return Err(format!(
                    "{text:?} may hold only plain path characters (no %, \\, ;, ?, #)"
                ));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
            rest,
        })
    }

    fn matches(&self, path: &NormalizedPath) -> bool {
        let got = &path.segments;
        if self.rest {
            got.len() >= self.segments.len()
                && self
                    .segments
                    .iter()
                    .zip(got)
                    .all(|(p, s)| segment_matches(p, s))
        } else {
            got.len() == self.segments.len()
                && self
                    .segments
                    .iter()
                    .zip(got)
                    .all(|(p, s)| segment_matches(p, s))
        }
    }
}

/// `*` in `pattern` matches any run of characters (none included); a lone `*` matches
/// any non-empty segment.
fn segment_matches(pattern: &str, seg: &str) -> bool {
    if pattern == "*" {
        return !seg.is_empty();
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == seg;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !seg.starts_with(first) || seg.len() < first.len() + last.len() || !seg.ends_with(last) {
        return false;
    }
    let mut at = first.len();
    let end = seg.len() - last.len();
    for mid in &parts[1..parts.len() - 1] {
        match seg.get(at..end).and_then(|s| s.find(mid)) {
            Some(p) => at += p + mid.len(),
            None => return false,
        }
    }
    true
}

// === headers ===

/// Why request headers are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No key header, or not starting with the prefix, or empty.
    #[error("no lanyard token in the {0} header")]
    Missing(String),
    /// The key header appears more than once.
    #[error("the {0} header appears more than once")]
    Duplicate(String),
    /// `Connection` names a header that must not be dropped by an intermediary.
    #[error("the Connection header names {0}")]
    ConnectionNames(String),
    /// Both `Transfer-Encoding` and `Content-Length`, several `Content-Length`s, or a
    /// transfer coding other than `chunked`.
    #[error("conflicting or unsupported framing headers (Transfer-Encoding, Content-Length)")]
    Framing,
    /// A header value that is not visible ASCII.
    #[error("a header value is not valid")]
    BadValue,
}

/// The header names a `Connection` header lists, lowercase.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Refuse requests whose headers could smuggle a request or a key past the proxy.
///
/// # Errors
/// [`HeaderError`].
pub fn check_request_headers(headers: &HeaderMap, config: &ProxyConfig) -> Result<(), HeaderError> {
    let key = &config.key_header;
    if headers.get_all(key).iter().count() > 1 {
        return Err(HeaderError::Duplicate(key.as_str().to_owned()));
    }
    let guarded: Vec<&str> = [key.as_str(), "content-length", "transfer-encoding", "host"]
        .into_iter()
        .chain(CREDENTIAL_HEADERS.iter().copied())
        .chain(config.strip.iter().map(HeaderName::as_str))
        .collect();
    if let Some(t) = connection_tokens(headers)
        .into_iter()
        .find(|t| guarded.contains(&t.as_str()))
    {
        return Err(HeaderError::ConnectionNames(t));
    }
    let te: Vec<_> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    let cl = headers.get_all(http::header::CONTENT_LENGTH).iter().count();
    if (!te.is_empty() && cl > 0) || cl > 1 || te.len() > 1 {
        return Err(HeaderError::Framing);
    }
    if let Some(v) = te.first()
        && !v
            .to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked"))
    {
        return Err(HeaderError::Framing);
    }
    Ok(())
}

/// The lanyard token the workload sent in the key header, after the key prefix (the
/// prefix's scheme compared case-insensitively).
///
/// # Errors
/// [`HeaderError::Missing`], [`HeaderError::Duplicate`], [`HeaderError::BadValue`].
pub fn take_token<'h>(
    headers: &'h HeaderMap,
    config: &ProxyConfig,
) -> Result<&'h str, HeaderError> {
    let key = &config.key_header;
    let mut values = headers.get_all(key).iter();
    let missing = || HeaderError::Missing(key.as_str().to_owned());
    let value = values.next().ok_or_else(missing)?;
    if values.next().is_some() {
        return Err(HeaderError::Duplicate(key.as_str().to_owned()));
    }
    let value = value.to_str().map_err(|_| HeaderError::BadValue)?;
    let prefix = &config.settings.key_prefix;
    let token = match value.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
        _ => return Err(missing()),
    };
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

/// The request headers to forward: everything but hop-by-hop headers, headers the
/// `Connection` header names, every header that could carry a key (the key header,
/// [`CREDENTIAL_HEADERS`], `strip_headers`), headers that could override the method,
/// path or client ([`is_override_header`]), `Host`, `Content-Length` and `Expect`.
/// The caller then adds the real key.
pub fn forward_headers(headers: &HeaderMap, config: &ProxyConfig) -> HeaderMap {
    let named = connection_tokens(headers);
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let drop = HOP_BY_HOP.contains(&n)
            || CREDENTIAL_HEADERS.contains(&n)
            || NOT_FORWARDED.contains(&n)
            || *name == config.key_header
            || config.strip.contains(name)
            || is_override_header(n)
            || named.iter().any(|t| t == n);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Why an upstream's answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// A response header carries the destination's key.
    #[error("the upstream's answer carries the destination's key in a header")]
    KeyInHeader,
}

/// The response headers to send back: the upstream's, without hop-by-hop headers and
/// those its `Connection` header names, without `Set-Cookie`, and without a `Location`
/// or `Content-Location` pointing at another origin than the upstream's (a relative one,
/// or one on the upstream's origin, passes).
///
/// # Errors
/// [`ResponseError::KeyInHeader`] when any header value contains `key`: the answer is
/// refused whole.
pub fn response_headers(
    headers: &HeaderMap,
    config: &ProxyConfig,
    key: &[u8],
) -> Result<HeaderMap, ResponseError> {
    let finder = memchr::memmem::Finder::new(key);
    let named = connection_tokens(headers);
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !key.is_empty() && finder.find(value.as_bytes()).is_some() {
            return Err(ResponseError::KeyInHeader);
        }
        let n = name.as_str();
        let drop = HOP_BY_HOP.contains(&n)
            || RESPONSE_DROPPED.contains(&n)
            || named.iter().any(|t| t == n)
            || ((n == "location" || n == "content-location")
                && !same_origin_or_relative(value.as_bytes(), &config.upstream_origin));
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    Ok(out)
}

/// Whether a `Location` value is relative, or absolute on `origin`.
fn same_origin_or_relative(value: &[u8], origin: &str) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let text = text.trim();
    // Scheme-relative (`//host/...`) and backslash tricks are other origins.
    if text.starts_with("//") || text.contains('\\') {
        return false;
    }
    match url::Url::parse(text) {
        Ok(u) => u.origin().ascii_serialization() == origin,
        Err(url::ParseError::RelativeUrlWithoutBase) => true,
        Err(_) => false,
    }
}

/// Finds the destination's key in a streamed answer, across chunk boundaries: it keeps
/// the last `key.len() - 1` bytes seen, so a key split over chunks is found too.
#[derive(Debug)]
pub struct KeyScanner {
    finder: memchr::memmem::Finder<'static>,
    tail: Vec<u8>,
    buf: Vec<u8>,
}

impl KeyScanner {
    /// A scanner for `key` (not empty).
    pub fn new(key: &[u8]) -> Self {
        Self {
            finder: memchr::memmem::Finder::new(key).into_owned(),
            tail: Vec::with_capacity(key.len()),
            buf: Vec::new(),
        }
    }

    /// Whether the key appears in the bytes seen so far, this chunk included.
    pub fn found_in(&mut self, chunk: &[u8]) -> bool {
        let keep = self.finder.needle().len().saturating_sub(1);
        if keep == 0 {
            return self.finder.find(chunk).is_some();
        }
        // Across the boundary: the kept tail and the chunk's first bytes.
        self.buf.clear();
        self.buf.extend_from_slice(&self.tail);
        self.buf.extend_from_slice(&chunk[..chunk.len().min(keep)]);
        if self.finder.find(&self.buf).is_some() || self.finder.find(chunk).is_some() {
            return true;
        }
        if chunk.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            let drop = (self.tail.len() + chunk.len()).saturating_sub(keep);
            self.tail.drain(..drop);
            self.tail.extend_from_slice(chunk);
        }
        false
    }
}

// === rate limit ===

/// Token buckets per key (a grant ID), in memory: `per_minute` requests a minute with a
/// burst of the same size.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    /// Take one request from `key`'s bucket at `now`.
    ///
    /// # Errors
    /// How long until the next request would be allowed.
    pub fn check(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(per_minute.max(1));
        let rate = capacity / 60.0;
        let mut buckets = match self.buckets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            // A full bucket is the same as none: forget those that refilled.
            buckets.retain(|_, b| {
                let refilled = b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate;
                refilled < capacity
            });
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests;
