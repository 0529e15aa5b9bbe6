//! Configuration in two stages: a serde [`FileConfig`] layered as defaults, the TOML
//! file, `LANYARD_*` environment variables and command-line flags, then validated into a
//! typed [`Config`] before anything starts. `deploy/lanyard.toml` documents every key.
//!
//! Environment variables name keys with `__` between sections:
//! `LANYARD_DATA_DIR`, `LANYARD_LISTEN__GRPC`, `LANYARD_STORE__URL`, ...

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use lanyard_keys::SigningAlgorithm;
use serde::{Deserialize, Serialize};

/// Errors loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, environment or flags could not be read or parsed.
    #[error("configuration could not be loaded: {0}")]
    Load(String),
    /// A value is invalid.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The configuration file, as written. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Where lanyard keeps its state (SQLite database, signing keys, admin socket).
    pub data_dir: PathBuf,
    /// lanyard's SPIFFE trust domain; workload IDs are `spiffe://<trust_domain>/...`.
    pub trust_domain: String,
    /// lanyard's own issuer URL (the `iss` of tokens it mints; serves discovery and
    /// JWKS). Empty: `http://<listen.http>`.
    pub issuer_url: String,
    /// Listeners.
    pub listen: ListenConfig,
    /// Storage.
    pub store: StoreConfig,
    /// Policy.
    pub policy: PolicyConfig,
    /// lanyard's signing keys.
    pub signing: SigningConfig,
    /// The AES-256-GCM key (32 bytes, mode 0600, created on first start) that seals what
    /// adapters keep to revoke later, such as an access token an RFC 7009 server needs.
    /// Empty: `<data_dir>/seal.key`. Replicas sharing a database must share this file.
    pub seal_key_file: String,
    /// Fetching issuer keys.
    pub trust: TrustConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The audit stream.
    pub audit: AuditConfig,
    /// Traces (OpenTelemetry over OTLP).
    pub telemetry: TelemetryConfig,
    /// Revocation jobs.
    pub revocation: RevocationConfig,
    /// The broker for static-key destinations (`kind = "proxy"`).
    pub proxy: ProxySection,
}

/// `[proxy]`: the HTTP listener that brokers requests to `proxy` destinations
/// (docs/proxy.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Where the proxy listens, e.g. `127.0.0.1:7602`. Empty: no proxy listener.
    pub listen: String,
    /// How often a streaming answer re-reads its grant from the store, so a revocation
    /// made on another replica cuts it; revocations on this server cut it at once.
    #[serde(with = "humantime_serde")]
    pub recheck_interval: Duration,
    /// Longest wait for the upstream's next bytes before the answer is cut.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Connections the proxy serves at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection whose request headers take longer to arrive is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest wait for a client to send its request body or take the next bytes of an
    /// answer.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Requests in flight at once per grant; more get 429.
    pub max_in_flight_per_grant: u32,
}

impl Default for ProxySection {
    fn default() -> Self {
        let d = crate::proxy::ProxyListenSettings::default();
        Self {
            listen: String::new(),
            recheck_interval: d.recheck_interval,
            upstream_timeout: d.upstream_timeout,
            max_connections: d.max_connections,
            header_read_timeout: d.header_read_timeout,
            client_timeout: d.client_timeout,
            max_in_flight_per_grant: d.max_in_flight_per_grant,
        }
    }
}

/// `[revocation]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// How long a worker holds a job without renewing its lease; after a crash, the job
    /// resumes (here after restart, or on another replica) within this time.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an idle worker looks for jobs written by other replicas.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often expired grants are swept; a destination that leaves state behind (a
    /// `postgres` role) has its expired grants revoked there by the same sweep.
    #[serde(with = "humantime_serde")]
    pub expiry_sweep_interval: Duration,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            expiry_sweep_interval: Duration::from_secs(30),
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint for traces, e.g. `http://127.0.0.1:4317`. Empty:
    /// tracing is off and no OpenTelemetry machinery runs.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Fraction of new traces sampled, 0.0 to 1.0. A request that arrives with a W3C
    /// `traceparent` follows its caller's sampling decision instead.
    #[serde(deserialize_with = "number_or_string")]
    pub sample_ratio: f64,
}

/// `[audit]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The HMAC key that fingerprints tokens in audit events (32 bytes, mode 0600,
    /// created on first start). Empty: `<data_dir>/audit-hmac.key`. Replicas sharing a
    /// database must share this file.
    pub hmac_key_file: String,
    /// How often to sign a checkpoint of the chain head into the chain (only when
    /// events were written since the last one). `0s` turns periodic checkpoints off.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// The JSON-lines file sink.
    pub file: AuditFileConfig,
    /// The OpenTelemetry logs sink.
    pub otlp: AuditOtlpConfig,
}

/// `[audit.file]`: a copy of the stream as JSON lines, rotated by size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditFileConfig {
    /// The file (created mode 0600). Empty: no file sink.
    pub path: String,
    /// Rotate before the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`<path>.1` is the newest).
    pub keep: usize,
}

/// `[audit.otlp]`: the stream as OpenTelemetry log records over OTLP/gRPC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditOtlpConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Empty: no OTLP sink.
    pub endpoint: String,
    /// Per-export timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `service.name` of the log records' resource.
    pub service_name: String,
}

impl Default for AuditFileConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            max_bytes: 100 * 1024 * 1024,
            keep: 10,
        }
    }
}

impl Default for AuditOtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            timeout: Duration::from_secs(10),
            service_name: "lanyard".into(),
        }
    }
}

/// `[listen]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Workload gRPC listener (ExchangeService, health, reflection).
    pub grpc: String,
    /// HTTP listener (OIDC discovery, JWKS, health).
    pub http: String,
    /// Admin Unix socket (AdminService, AuditService). Empty: `<data_dir>/admin.sock`.
    pub admin_socket: String,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, in data_dir) or `postgres`.
    pub backend: String,
    /// PostgreSQL URL (`postgres://user@host:port/db`); required for `postgres`.
    pub url: String,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// Largest number of grants committed in one transaction (group commit).
    pub max_batch: usize,
}

/// `[policy]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A Cedar policy file. Empty: no policy, so every exchange is denied (default deny).
    pub file: String,
    /// The longest delegation chain accepted (actors between the subject and the
    /// credential).
    pub max_delegation_depth: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            file: String::new(),
            max_delegation_depth: 3,
        }
    }
}

/// `[signing]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// `ES256` or `EdDSA`.
    pub algorithm: SigningAlgorithm,
    /// How long a key stays published after it stopped signing.
    #[serde(with = "humantime_serde")]
    pub retire_after: Duration,
}

/// `[trust]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Timeout of one discovery or JWKS fetch.
    #[serde(with = "humantime_serde")]
    pub http_timeout: Duration,
    /// Largest JWKS or discovery document accepted, bytes.
    pub max_jwks_bytes: usize,
    /// How long last-known-good keys are used while an issuer is unreachable.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// Least time between two refetches triggered by unknown `kid`s.
    #[serde(with = "humantime_serde")]
    pub refetch_cooldown: Duration,
    /// Allow plain-http issuer URLs on non-loopback hosts (never in production).
    pub allow_http: bool,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest gRPC request accepted, bytes.
    pub max_request_bytes: usize,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter, e.g. `info` or `lanyard_server=debug,info`.
    pub level: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("lanyard-data"),
            trust_domain: "lanyard.local".into(),
            issuer_url: String::new(),
            listen: ListenConfig::default(),
            store: StoreConfig::default(),
            policy: PolicyConfig::default(),
            signing: SigningConfig::default(),
            seal_key_file: String::new(),
            trust: TrustConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
            telemetry: TelemetryConfig::default(),
            revocation: RevocationConfig::default(),
            proxy: ProxySection::default(),
        }
    }
}
impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "lanyard".into(),
            sample_ratio: 1.0,
        }
    }
}

/// A float given in TOML as a number, or as a string (environment variables arrive as
/// strings: `LANYARD_TELEMETRY__SAMPLE_RATIO=0.25`).
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Float(f64),
        Int(i64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Float(f) => Ok(f),
        #[allow(clippy::cast_precision_loss)]
        Raw::Int(i) => Ok(i as f64),
        Raw::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{t:?} is not a number"))),
    }
}
impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            hmac_key_file: String::new(),
            checkpoint_interval: Duration::from_secs(300),
            file: AuditFileConfig::default(),
            otlp: AuditOtlpConfig::default(),
        }
    }
}
impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            grpc: "127.0.0.1:7600".into(),
            http: "127.0.0.1:7601".into(),
            admin_socket: String::new(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: "sqlite".into(),
            url: String::new(),
            max_connections: 16,
            max_batch: 128,
        }
    }
}
impl Default for SigningConfig {
    fn default() -> Self {
        Self {
            algorithm: SigningAlgorithm::ES256,
            retire_after: Duration::from_secs(24 * 3600),
        }
    }
}
impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            http_timeout: Duration::from_secs(5),
            max_jwks_bytes: 256 * 1024,
            max_staleness: Duration::from_secs(24 * 3600),
            refetch_cooldown: Duration::from_secs(10),
            allow_http: false,
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024,
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    /// `--data-dir`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--grpc-listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<String>,
    /// `--http-listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// `--admin-socket`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<String>,
    /// `--policy-file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_file: Option<String>,
    /// `--proxy-listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_listen: Option<String>,
}

impl FileConfig {
    /// Layer defaults, the TOML file (if given), `LANYARD_*` env and flags.
    ///
    /// # Errors
    /// [`ConfigError::Load`] naming the bad file, key or value.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        flags: &FlagOverrides,
    ) -> Result<FileConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(FileConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file_exact(f));
        }
        // Env is passed in rather than read here so tests never touch process env.
        let env_toml = env_to_toml(env)?;
        fig = fig.merge(Toml::string(&env_toml));
        let mut cfg: FileConfig = fig
            .extract()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        if let Some(d) = &flags.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(v) = &flags.grpc_listen {
            cfg.listen.grpc = v.clone();
        }
        if let Some(v) = &flags.http_listen {
            cfg.listen.http = v.clone();
        }
        if let Some(v) = &flags.admin_socket {
            cfg.listen.admin_socket = v.clone();
        }
        if let Some(v) = &flags.policy_file {
            cfg.policy.file = v.clone();
        }
        if let Some(v) = &flags.proxy_listen {
            cfg.proxy.listen = v.clone();
        }
        Ok(cfg)
    }

    /// Validate into a typed [`Config`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let grpc_listen: SocketAddr =
            self.listen.grpc.parse().map_err(|e| ConfigError::Invalid {
                key: "listen.grpc",
                message: format!("{:?} is not host:port: {e}", self.listen.grpc),
            })?;
        let http_listen: SocketAddr =
            self.listen.http.parse().map_err(|e| ConfigError::Invalid {
                key: "listen.http",
                message: format!("{:?} is not host:port: {e}", self.listen.http),
            })?;
        let audit = AuditSettings {
            hmac_key_file: if self.audit.hmac_key_file.is_empty() {
                self.data_dir.join("audit-hmac.key")
            } else {
                PathBuf::from(&self.audit.hmac_key_file)
            },
            checkpoint_interval: self.audit.checkpoint_interval,
            file: (!self.audit.file.path.is_empty()).then(|| self.audit.file.clone()),
            otlp: (!self.audit.otlp.endpoint.is_empty()).then(|| self.audit.otlp.clone()),
        };
        if let Some(o) = &audit.otlp
            && !o.endpoint.starts_with("http://")
        {
            return Err(ConfigError::Invalid {
                key: "audit.otlp.endpoint",
                message: format!(
                    "{:?} is not an http:// URL (TLS to the collector is not supported yet; use a local collector or sidecar)",
                    o.endpoint
                ),
            });
        }
        let admin_socket = if self.listen.admin_socket.is_empty() {
            self.data_dir.join("admin.sock")
        } else {
            PathBuf::from(&self.listen.admin_socket)
        };
        let td_ok = !self.trust_domain.is_empty()
            && self.trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            });
        if !td_ok {
            return Err(ConfigError::Invalid {
                key: "trust_domain",
                message: "must be lowercase letters, digits, '.', '-' or '_'".into(),
            });
        }
        let store = match self.store.backend.as_str() {
            "sqlite" => StoreBackend::Sqlite {
                path: self.data_dir.join("lanyard.db"),
            },
            "postgres" => {
                if self.store.url.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "store.url",
                        message: "required when store.backend = \"postgres\"".into(),
                    });
                }
                StoreBackend::Postgres {
                    url: self.store.url.clone(),
                    max_connections: self.store.max_connections.max(1),
                }
            }
            other => {
                return Err(ConfigError::Invalid {
                    key: "store.backend",
                    message: format!("{other:?} is not \"sqlite\" or \"postgres\""),
                });
            }
        };
        let issuer_url = if self.issuer_url.is_empty() {
            format!("http://{http_listen}")
        } else {
            self.issuer_url.trim_end_matches('/').to_string()
        };
        if !(issuer_url.starts_with("https://") || issuer_url.starts_with("http://")) {
            return Err(ConfigError::Invalid {
                key: "issuer_url",
                message: "must be an http(s) URL".into(),
            });
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid {
                key: "log.format",
                message: "must be \"text\" or \"json\"".into(),
            });
        }
        let telemetry = if self.telemetry.otlp_endpoint.is_empty() {
            None
        } else {
            let endpoint = self
                .telemetry
                .otlp_endpoint
                .trim_end_matches('/')
                .to_string();
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: "telemetry.otlp_endpoint",
                    message: "must be an http(s) URL, e.g. http://127.0.0.1:4317".into(),
                });
            }
            if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
                return Err(ConfigError::Invalid {
                    key: "telemetry.sample_ratio",
                    message: "must be between 0.0 and 1.0".into(),
                });
            }
            if self.telemetry.service_name.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "telemetry.service_name",
                    message: "must not be empty".into(),
                });
            }
            Some(TelemetrySettings {
                otlp_endpoint: endpoint,
                service_name: self.telemetry.service_name.clone(),
                sample_ratio: self.telemetry.sample_ratio,
            })
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.revocation.lease) {
            return Err(ConfigError::Invalid {
                key: "revocation.lease",
                message: "must be between 1s and 1h".into(),
            });
        }
        if !(Duration::from_millis(50)..=Duration::from_secs(60))
            .contains(&self.revocation.poll_interval)
        {
            return Err(ConfigError::Invalid {
                key: "revocation.poll_interval",
                message: "must be between 50ms and 60s".into(),
            });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&self.revocation.expiry_sweep_interval)
        {
            return Err(ConfigError::Invalid {
                key: "revocation.expiry_sweep_interval",
                message: "must be between 1s and 1h".into(),
            });
        }
        let proxy_listen = if self.proxy.listen.is_empty() {
            None
        } else {
            Some(
                self.proxy
                    .listen
                    .parse::<SocketAddr>()
                    .map_err(|e| ConfigError::Invalid {
                        key: "proxy.listen",
                        message: format!("{:?} is not host:port: {e}", self.proxy.listen),
                    })?,
            )
        };
        if !(Duration::from_millis(50)..=Duration::from_secs(60))
            .contains(&self.proxy.recheck_interval)
        {
            return Err(ConfigError::Invalid {
                key: "proxy.recheck_interval",
                message: "must be between 50ms and 60s".into(),
            });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&self.proxy.upstream_timeout)
        {
            return Err(ConfigError::Invalid {
                key: "proxy.upstream_timeout",
                message: "must be between 1s and 1h".into(),
            });
        }
        if !(1..=1_000_000).contains(&self.proxy.max_connections) {
            return Err(ConfigError::Invalid {
                key: "proxy.max_connections",
                message: "must be between 1 and 1000000".into(),
            });
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300))
            .contains(&self.proxy.header_read_timeout)
        {
            return Err(ConfigError::Invalid {
                key: "proxy.header_read_timeout",
                message: "must be between 100ms and 5m".into(),
            });
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&self.proxy.client_timeout)
        {
            return Err(ConfigError::Invalid {
                key: "proxy.client_timeout",
                message: "must be between 100ms and 1h".into(),
            });
        }
        if !(1..=100_000).contains(&self.proxy.max_in_flight_per_grant) {
            return Err(ConfigError::Invalid {
                key: "proxy.max_in_flight_per_grant",
                message: "must be between 1 and 100000".into(),
            });
        }
        if self.limits.max_request_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "limits.max_request_bytes",
                message: "must be at least 1024".into(),
            });
        }
        Ok(Config {
            seal_key_file: if self.seal_key_file.is_empty() {
                self.data_dir.join("seal.key")
            } else {
                PathBuf::from(&self.seal_key_file)
            },
            data_dir: self.data_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            issuer_url,
            grpc_listen,
            http_listen,
            admin_socket,
            store,
            max_batch: self.store.max_batch.clamp(1, 4096),
            issuer_url_derived: self.issuer_url.is_empty(),
            policy_file: (!self.policy.file.is_empty()).then(|| PathBuf::from(&self.policy.file)),
            max_delegation_depth: self.policy.max_delegation_depth,
            signing: self.signing.clone(),
            trust: self.trust.clone(),
            max_request_bytes: self.limits.max_request_bytes,
            log: self.log.clone(),
            audit,
            telemetry,
            revocation: crate::revoke::RevocationSettings {
                lease: self.revocation.lease,
                poll: self.revocation.poll_interval,
                expiry_sweep: self.revocation.expiry_sweep_interval,
            },
            proxy: crate::proxy::ProxyListenSettings {
                listen: proxy_listen,
                recheck_interval: self.proxy.recheck_interval,
                upstream_timeout: self.proxy.upstream_timeout,
                max_connections: self.proxy.max_connections,
                header_read_timeout: self.proxy.header_read_timeout,
                client_timeout: self.proxy.client_timeout,
                max_in_flight_per_grant: self.proxy.max_in_flight_per_grant,
            },
        })
    }
}

/// Validated `[telemetry]` settings, present only when an OTLP endpoint is set.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// OTLP/gRPC endpoint, without trailing slash.
    pub otlp_endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Sampling ratio for traces without a sampled parent, 0.0 to 1.0.
    pub sample_ratio: f64,
}

/// Validated `[audit]` settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// The fingerprint key file.
    pub hmac_key_file: PathBuf,
    /// Periodic checkpoints; zero = off.
    pub checkpoint_interval: Duration,
    /// The file sink, when configured.
    pub file: Option<AuditFileConfig>,
    /// The OTLP logs sink, when configured.
    pub otlp: Option<AuditOtlpConfig>,
}

/// `LANYARD_*` variables read by the CLI client or the test harness, not by `serve`.
pub const CLIENT_ENV: &[&str] = &["ADMIN_SOCKET", "GRPC", "OUTPUT", "BIN", "BLESS"];

/// Turn `LANYARD_*` variables into a TOML document (`LANYARD_LISTEN__GRPC=x` becomes
/// `[listen] grpc = "x"`). Values that parse as TOML scalars keep their type.
fn env_to_toml(env: &[(String, String)]) -> Result<String, ConfigError> {
    let mut root = toml::Table::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("LANYARD_") else {
            continue;
        };
        // Client-side and test-harness variables are not server configuration.
        if CLIENT_ENV.contains(&rest) || rest.starts_with("TEST_") || rest.starts_with("REQUIRE_") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        let value = match v.parse::<i64>() {
            Ok(i) => toml::Value::Integer(i),
            Err(_) => match v.as_str() {
                "true" => toml::Value::Boolean(true),
                "false" => toml::Value::Boolean(false),
                _ => toml::Value::String(v.clone()),
            },
        };
        let mut table = &mut root;
        for (i, seg) in path.iter().enumerate() {
            if i + 1 == path.len() {
                table.insert(seg.clone(), value.clone());
            } else {
                let entry = table
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = match entry {
                    toml::Value::Table(t) => t,
                    _ => {
                        return Err(ConfigError::Load(format!(
                            "environment variable {k} conflicts with another"
                        )));
                    }
                };
            }
        }
    }
    Ok(toml::to_string(&root).unwrap_or_default())
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    /// Embedded SQLite file.
    Sqlite {
        /// Database file.
        path: PathBuf,
    },
    /// PostgreSQL.
    Postgres {
        /// Connection URL.
        url: String,
        /// Pool size.
        max_connections: u32,
    },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory.
    pub data_dir: PathBuf,
    /// The seal key file.
    pub seal_key_file: PathBuf,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// lanyard's issuer URL, without trailing slash.
    pub issuer_url: String,
    /// The issuer URL was derived from `listen.http` (so a port-0 listener updates it
    /// once bound).
    pub issuer_url_derived: bool,
    /// Workload gRPC address.
    pub grpc_listen: SocketAddr,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Store.
    pub store: StoreBackend,
    /// Group-commit batch limit.
    pub max_batch: usize,
    /// Cedar policy file.
    pub policy_file: Option<PathBuf>,
    /// Longest delegation chain accepted.
    pub max_delegation_depth: usize,
    /// Signing keys.
    pub signing: SigningConfig,
    /// Issuer key fetching.
    pub trust: TrustConfig,
    /// Largest request, bytes.
    pub max_request_bytes: usize,
    /// Logging.
    pub log: LogConfig,
    /// The audit stream.
    pub audit: AuditSettings,
    /// Traces; `None` when off.
    pub telemetry: Option<TelemetrySettings>,
    /// Revocation worker.
    pub revocation: crate::revoke::RevocationSettings,
    /// The proxy listener.
    pub proxy: crate::proxy::ProxyListenSettings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:7600");
        assert_eq!(c.issuer_url, "http://127.0.0.1:7601");
        assert_eq!(c.admin_socket, PathBuf::from("lanyard-data/admin.sock"));
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("l.toml");
        std::fs::write(
            &f,
            "data_dir = \"/from-file\"\n[listen]\ngrpc = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let env = vec![
            (
                "LANYARD_LISTEN__GRPC".to_string(),
                "127.0.0.1:3".to_string(),
            ),
            ("LANYARD_STORE__MAX_BATCH".to_string(), "7".to_string()),
            ("OTHER".to_string(), "x".to_string()),
            (
                "LANYARD_TEST_PG_URL".to_string(),
                "postgres://x".to_string(),
            ),
            (
                "LANYARD_ADMIN_SOCKET".to_string(),
                "/tmp/client.sock".to_string(),
            ),
        ];
        let flags = FlagOverrides {
            http_listen: Some("127.0.0.1:4".into()),
            ..Default::default()
        };
        let c = FileConfig::load(Some(&f), &env, &flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from-file"));
        assert_eq!(c.listen.grpc, "127.0.0.1:3");
        assert_eq!(c.listen.http, "127.0.0.1:4");
        assert_eq!(c.store.max_batch, 7);
        assert_eq!(
            c.listen.admin_socket, "",
            "the client's variable is not server config"
        );
        let e =
            FileConfig::load(None, &[("LANYARD_DATA_DRI".into(), "x".into())], &flags).unwrap_err();
        assert!(e.to_string().contains("data_dri"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("l.toml");
        std::fs::write(&f, "data_dri = \"x\"\n").unwrap();
        let e = FileConfig::load(Some(&f), &[], &FlagOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("data_dri"), "{e}");
        let mut c = FileConfig::default();
        c.store.backend = "postgres".into();
        assert!(c.validate().unwrap_err().to_string().contains("store.url"));
        let mut c = FileConfig::default();
        c.listen.grpc = "nope".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn telemetry_is_off_by_default_and_env_turns_it_on() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.telemetry, None);
        let env = vec![
            (
                "LANYARD_TELEMETRY__OTLP_ENDPOINT".to_string(),
                "http://127.0.0.1:4317/".to_string(),
            ),
            (
                "LANYARD_TELEMETRY__SAMPLE_RATIO".to_string(),
                "0.25".to_string(),
            ),
        ];
        let c = FileConfig::load(None, &env, &FlagOverrides::default())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            c.telemetry,
            Some(TelemetrySettings {
                otlp_endpoint: "http://127.0.0.1:4317".into(),
                service_name: "lanyard".into(),
                sample_ratio: 0.25,
            })
        );
        let env = vec![
            (
                "LANYARD_TELEMETRY__OTLP_ENDPOINT".to_string(),
                "http://127.0.0.1:4317".to_string(),
            ),
            (
                "LANYARD_TELEMETRY__SAMPLE_RATIO".to_string(),
                "1".to_string(),
            ),
        ];
        let f = FileConfig::load(None, &env, &FlagOverrides::default()).unwrap();
        assert_eq!(f.telemetry.sample_ratio, 1.0);
        let mut bad = f.clone();
        bad.telemetry.sample_ratio = 1.5;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("telemetry.sample_ratio"), "{e}");
        let mut bad = f;
        bad.telemetry.otlp_endpoint = "127.0.0.1:4317".into();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("telemetry.otlp_endpoint"), "{e}");
        let e = FileConfig::load(
            None,
            &[("LANYARD_TELEMETRY__SAMPLE_RATIO".into(), "lots".into())],
            &FlagOverrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn the_proxy_is_off_by_default_and_validated() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.proxy.listen, None);
        let env = vec![(
            "LANYARD_PROXY__LISTEN".to_string(),
            "127.0.0.1:7602".to_string(),
        )];
        let f = FileConfig::load(None, &env, &FlagOverrides::default()).unwrap();
        assert_eq!(
            f.clone().validate().unwrap().proxy.listen,
            Some("127.0.0.1:7602".parse().unwrap())
        );
        let mut bad = f.clone();
        bad.proxy.listen = "nope".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("proxy.listen")
        );
        let mut bad = f.clone();
        bad.proxy.recheck_interval = Duration::from_millis(1);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("proxy.recheck_interval"), "{e}");
        let d = f.clone().validate().unwrap().proxy;
        assert_eq!(d.max_connections, 1024);
        assert_eq!(d.header_read_timeout, Duration::from_secs(10));
        for (key, change) in [
            (
                "proxy.max_connections",
                (|c: &mut FileConfig| c.proxy.max_connections = 0) as fn(&mut FileConfig),
            ),
            ("proxy.header_read_timeout", |c| {
                c.proxy.header_read_timeout = Duration::ZERO
            }),
            ("proxy.client_timeout", |c| {
                c.proxy.client_timeout = Duration::from_secs(86_400)
            }),
            ("proxy.max_in_flight_per_grant", |c| {
                c.proxy.max_in_flight_per_grant = 0
            }),
        ] {
            let mut bad = f.clone();
            change(&mut bad);
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn the_example_config_parses() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/lanyard.toml");
        let c = FileConfig::load(Some(&example), &[], &FlagOverrides::default()).unwrap();
        c.validate().unwrap();
    }
}
