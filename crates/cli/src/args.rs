//! The command line, as clap derive types. Parsing only: no I/O happens here, so the
//! tests in `tests/cli.rs` can check every command without a server.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where client commands reach the workload gRPC listener unless told otherwise.
pub const DEFAULT_GRPC: &str = "http://127.0.0.1:7600";
/// Where admin commands find the admin socket unless told otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "lanyard-data/admin.sock";

/// lanyard: a workload identity control plane. Workloads trade the identity token their
/// platform gives them for short-lived, scoped credentials; operators decide who gets
/// what, see every grant, and revoke.
#[derive(Debug, Parser)]
#[command(
    name = "lanyard",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Output format.
    #[arg(long, global = true, env = "LANYARD_OUTPUT", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// The admin Unix socket. Admin commands connect to it
    /// [default: lanyard-data/admin.sock]; `serve` listens on it
    /// [default: <data-dir>/admin.sock].
    #[arg(long, global = true, env = "LANYARD_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// The workload gRPC endpoint (exchange, renew, release).
    #[arg(long, global = true, env = "LANYARD_GRPC", value_name = "URL", default_value = DEFAULT_GRPC)]
    pub grpc: String,
}

impl GlobalArgs {
    /// The admin socket a client command connects to.
    pub fn admin_socket_or_default(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET))
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Readable tables.
    Table,
    /// JSON (one document; JSON lines for `audit tail`).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the lanyard server.
    Serve(ServeArgs),
    /// Development helpers for `serve --dev`.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Exchange a workload token for a credential at a destination.
    Exchange(ExchangeArgs),
    /// Renew a grant with fresh proof (a new token for the same workload and task).
    Renew(RenewArgs),
    /// Release a grant: the task is done, revoke its credential now.
    Release(ReleaseArgs),
    /// Run a command with credentials for one or more destinations, only while it runs:
    /// exchange the workload's platform token, start CMD with the credentials in its
    /// environment (or in private files with --files, renewed before expiry), forward
    /// signals, release every grant when CMD exits, and exit with CMD's code.
    Run(RunArgs),
    /// Manage trusted issuers (admin socket).
    #[command(subcommand)]
    Issuer(IssuerCommand),
    /// Manage trust rules that map tokens to workload IDs (admin socket).
    #[command(subcommand)]
    TrustRule(TrustRuleCommand),
    /// Manage destinations (admin socket).
    #[command(subcommand)]
    Destination(DestinationCommand),
    /// Look up grants (admin socket).
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Revoke every grant matching a selector at every destination, with a signed receipt
    /// per destination; or follow, show and list revocation jobs (admin socket).
    Revoke(RevokeArgs),
    /// Deny entries: workloads, prefixes and issuers whose new exchanges are refused
    /// (admin socket).
    #[command(subcommand)]
    Deny(DenyCommand),
    /// What a workload can reach by policy and which grants it holds now (admin socket).
    Inventory(InventoryArgs),
    /// Show what lanyard would decide for a token and request, issuing nothing (admin socket).
    Explain(ExplainArgs),
    /// lanyard's own signing keys (admin socket).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Versioned Cedar policy: put, get, history, diff, activate (admin socket).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read and verify the audit stream (admin socket).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A one-command tour: start a throwaway dev server and walk through a grant's life.
    Demo,
    /// Benchmark the exchange path: a throwaway dev server under load, next to the
    /// crypto-only floor (one token verify, one credential sign, one durable append)
    /// measured in the same run.
    Bench(BenchArgs),
}

// === serve ===

/// `lanyard serve`
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file (see deploy/lanyard.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Development mode: built-in dev issuer, trust rule, `dev-api` destination and an
    /// allow-dev policy. Without --data-dir, state lives in a throwaway directory.
    #[arg(long)]
    pub dev: bool,
    /// State directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Workload gRPC listen address (overrides `listen.grpc`).
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// HTTP listen address (overrides `listen.http`).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Cedar policy file (overrides `policy.file`).
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// Run the lanyard proxy (the broker for static-key destinations) on this address
    /// (overrides `proxy.listen`; see docs/proxy.md).
    #[arg(long, value_name = "ADDR")]
    pub proxy_listen: Option<String>,
}

// === dev ===

/// `lanyard dev ...`
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Mint a workload token from the dev issuer of a `serve --dev` data directory.
    /// Prints only the token, so `> token.jwt` works.
    Token(DevTokenArgs),
}

/// `lanyard dev token`
#[derive(Debug, Clone, Args)]
pub struct DevTokenArgs {
    /// The data directory of the running `serve --dev`.
    #[arg(long, env = "LANYARD_DATA_DIR", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The token's `sub` (the workload becomes spiffe://<trust-domain>/dev/<subject>).
    #[arg(long)]
    pub subject: String,
    /// The token's `task` claim, binding grants to one run.
    #[arg(long)]
    pub task: Option<String>,
    /// Token lifetime, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    pub ttl: i64,
}

// === workload commands ===

/// The subject token: a file, or `-` for standard input.
#[derive(Debug, Clone, Args)]
pub struct TokenArg {
    /// File holding the workload's token (`-` = standard input). Whitespace is trimmed.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
}

/// `lanyard run`
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// File holding the workload's platform token (a Kubernetes projected token, say),
    /// re-read for every exchange, renewal and release since such tokens rotate.
    #[arg(long, value_name = "FILE", env = "LANYARD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Instead of a file, request a GitHub Actions OIDC token with this audience for
    /// every call (needs `permissions: id-token: write`).
    #[arg(long, value_name = "AUDIENCE")]
    pub github_actions_audience: Option<String>,
    /// A destination: `NAME[,scope=S]...[,ttl=SECS][,env=PREFIX]` (repeatable). Its
    /// variables are `<PREFIX>_TOKEN`, `<PREFIX>_GRANT_ID`... (PREFIX defaults to the
    /// name in upper case).
    #[arg(long = "dest", value_name = "SPEC")]
    pub dest: Vec<String>,
    /// A TOML file of `[[destination]]` tables (`name`, `scopes`, `ttl`, `env`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Put the credentials in files (mode 0600) in a private directory (0700), renewed
    /// before they expire; the environment holds their paths (`<PREFIX>_TOKEN_FILE`...).
    #[arg(long)]
    pub files: bool,
    /// Say on standard error what was granted, renewed and released.
    #[arg(long, short)]
    pub verbose: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `lanyard exchange`
#[derive(Debug, Clone, Args)]
pub struct ExchangeArgs {
    #[command(flatten)]
    pub token: TokenArg,
    /// Destination to get a credential for.
    #[arg(long)]
    pub destination: String,
    /// A scope to request (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Requested lifetime, seconds (default: the destination's).
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u32>,
    /// RFC 8693 audience; must equal the destination's audience when set.
    #[arg(long)]
    pub audience: Option<String>,
    /// Write the grant ID to this file (mode 0600), for renew and release.
    #[arg(long, value_name = "FILE")]
    pub save_grant: Option<PathBuf>,
    /// Delegation (RFC 8693): a file holding the actor's token; the credential is for
    /// the subject token's workload, with this actor in its `act` claim.
    #[arg(long, value_name = "FILE")]
    pub actor_token_file: Option<PathBuf>,
}

/// Which grant: by ID or from a file written by `exchange --save-grant`.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct GrantRef {
    /// Grant ID.
    #[arg(long, value_name = "ID")]
    pub grant: Option<String>,
    /// File holding the grant ID (from `exchange --save-grant`).
    #[arg(long, value_name = "FILE")]
    pub grant_file: Option<PathBuf>,
}

/// `lanyard renew`
#[derive(Debug, Clone, Args)]
pub struct RenewArgs {
    #[command(flatten)]
    pub token: TokenArg,
    #[command(flatten)]
    pub grant: GrantRef,
    /// Requested lifetime from now, seconds (default: the destination's).
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u32>,
}

/// `lanyard release`
#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub token: TokenArg,
    #[command(flatten)]
    pub grant: GrantRef,
}

// === issuer ===

/// `lanyard issuer ...`
#[derive(Debug, Subcommand)]
pub enum IssuerCommand {
    /// Create or replace a trusted issuer.
    Put(IssuerPutArgs),
    /// List issuers.
    List,
    /// Show one issuer and the state of its key cache.
    Get {
        /// Issuer name.
        name: String,
    },
    /// Delete an issuer; its tokens are refused from then on.
    Delete {
        /// Issuer name.
        name: String,
    },
    /// Fetch an issuer's keys now and show what was found.
    Refresh {
        /// Issuer name.
        name: String,
    },
    /// Kill switch: refuse the issuer's tokens from now on and revoke every grant derived
    /// from them, with receipts. Undo with `lanyard deny lift issuer:NAME`.
    Distrust {
        /// Issuer name.
        name: String,
        /// Why (required; recorded in the audit stream and the receipts).
        #[arg(long)]
        reason: String,
    },
}

/// Where an issuer's keys come from: exactly one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct KeySourceArgs {
    /// OIDC discovery document URL (or the issuer base URL).
    #[arg(long, value_name = "URL")]
    pub discovery_url: Option<String>,
    /// JWKS URL.
    #[arg(long, value_name = "URL")]
    pub jwks_url: Option<String>,
    /// A JWKS document to store inline.
    #[arg(long, value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,
}

/// `lanyard issuer put`
#[derive(Debug, Clone, Args)]
pub struct IssuerPutArgs {
    /// Issuer name, [a-z0-9-]{1,63}.
    #[arg(long)]
    pub name: String,
    /// The exact `iss` claim its tokens carry.
    #[arg(long, value_name = "URL")]
    pub issuer_url: String,
    #[command(flatten)]
    pub keys: KeySourceArgs,
    /// Allowed `alg` (repeatable or comma-separated): RS256, PS256, ES256, ES384, EdDSA.
    #[arg(
        long = "alg",
        value_name = "ALG",
        required = true,
        value_delimiter = ','
    )]
    pub algs: Vec<String>,
    /// Accepted audience (repeatable).
    #[arg(long = "audience", value_name = "AUD", required = true)]
    pub audiences: Vec<String>,
    /// Clock leeway for exp/nbf/iat, seconds [server default: 30].
    #[arg(long, value_name = "SECS")]
    pub leeway: Option<u32>,
    /// Maximum token age from `iat`, seconds [default: no limit].
    #[arg(long, value_name = "SECS")]
    pub max_age: Option<u32>,
    /// Refuse a second use of the same `jti`.
    #[arg(long)]
    pub replay_protection: bool,
    /// Largest token accepted, bytes [server default: 16384].
    #[arg(long, value_name = "N")]
    pub max_token_bytes: Option<u32>,
}

// === trust-rule ===

/// `lanyard trust-rule ...`
#[derive(Debug, Subcommand)]
pub enum TrustRuleCommand {
    /// Create or replace a trust rule.
    Put(TrustRulePutArgs),
    /// List trust rules.
    List {
        /// Only the rules of this issuer.
        #[arg(long)]
        issuer: Option<String>,
    },
    /// Delete a trust rule.
    Delete {
        /// Rule name.
        name: String,
    },
}

/// `lanyard trust-rule put`
#[derive(Debug, Clone, Args)]
pub struct TrustRulePutArgs {
    /// Rule name, [a-z0-9-]{1,63}.
    #[arg(long)]
    pub name: String,
    /// The issuer whose tokens it matches.
    #[arg(long)]
    pub issuer: String,
    /// Workload ID template, e.g. 'spiffe://{trust_domain}/gh/{repository}'.
    #[arg(long, value_name = "TEMPLATE")]
    pub template: String,
    /// Claim path naming the task (e.g. run_id).
    #[arg(long, value_name = "CLAIM")]
    pub task_claim: Option<String>,
    /// Priority: lower is tried first; ties by name.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// Claim must equal VALUE (repeatable).
    #[arg(long, value_name = "CLAIM=VALUE", value_parser = parse_key_value)]
    pub exact: Vec<(String, String)>,
    /// Claim must match a glob ('*', '?') (repeatable).
    #[arg(long, value_name = "CLAIM=PATTERN", value_parser = parse_key_value)]
    pub glob: Vec<(String, String)>,
    /// Claim must equal one of the comma-separated values (repeatable).
    #[arg(long, value_name = "CLAIM=A,B,C", value_parser = parse_key_value)]
    pub one_of: Vec<(String, String)>,
}

// === destination ===

/// `lanyard destination ...`
#[derive(Debug, Subcommand)]
pub enum DestinationCommand {
    /// Create or replace a destination.
    Put(DestinationPutArgs),
    /// List destinations.
    List,
    /// Delete a destination.
    Delete {
        /// Destination name.
        name: String,
    },
    /// Kill switch: refuse exchanges for the destination from now on and revoke every
    /// grant of it, with receipts; with --at-destination also pull the destination's own
    /// switch where the adapter has one (claude: archive the federation rule). Undo
    /// lanyard's side with `lanyard deny lift destination:NAME`.
    Disable {
        /// Destination name.
        name: String,
        /// Why (required; recorded in the audit stream and the receipts).
        #[arg(long)]
        reason: String,
        /// Also pull the destination's own kill switch.
        #[arg(long)]
        at_destination: bool,
    },
    /// A destination's static key (`proxy` destinations), write-only: set or rotate it,
    /// or show whether one is set. The key is never printed, logged or returned.
    #[command(subcommand)]
    Secret(DestinationSecretCommand),
}

/// `lanyard destination secret ...`
#[derive(Debug, Subcommand)]
pub enum DestinationSecretCommand {
    /// Set or rotate the key, read from a file or standard input (never from the command
    /// line, where other users and shell history would see it). One line; a final
    /// newline is dropped.
    Set {
        /// Destination name.
        name: String,
        /// Read the key from this file; `-` or absent: standard input.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// Whether a key is set, since when, by whom, and its fingerprint.
    Show {
        /// Destination name.
        name: String,
    },
}

/// `lanyard destination put`
#[derive(Debug, Clone, Args)]
pub struct DestinationPutArgs {
    /// Destination name, [a-z0-9-]{1,63}.
    #[arg(long)]
    pub name: String,
    /// Adapter kind, e.g. `jwt`.
    #[arg(long)]
    pub kind: String,
    /// A scope it offers (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// TTL when a request names none, seconds [server default: 900].
    #[arg(long, value_name = "SECS")]
    pub default_ttl: Option<u32>,
    /// Longest TTL issued, seconds [server default: 3600].
    #[arg(long, value_name = "SECS")]
    pub max_ttl: Option<u32>,
    /// A label visible to policy (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// An adapter setting, as a string (repeatable).
    #[arg(long = "setting", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub settings: Vec<(String, String)>,
    /// Adapter settings as a JSON object, merged over --setting.
    #[arg(long, value_name = "JSON")]
    pub settings_json: Option<String>,
    /// Fail closed on audit delivery: refuse exchanges while this audit sink (`file` or
    /// `otlp`) is more than --max-audit-lag events behind, or not running.
    #[arg(long, value_name = "SINK", value_parser = ["file", "otlp"])]
    pub require_audit_sink: Option<String>,
    /// Events the required sink may lag behind the chain head.
    #[arg(
        long,
        value_name = "EVENTS",
        default_value_t = 1000,
        requires = "require_audit_sink"
    )]
    pub max_audit_lag: u32,
    /// A workload allowed to introspect this destination's lanyard tokens (RFC 7662):
    /// a SPIFFE ID, or a prefix ending in `/*`. Repeatable.
    #[arg(long = "introspection-client", value_name = "WORKLOAD_ID")]
    pub introspection_clients: Vec<String>,
}

// === grants ===

/// `lanyard grants ...`
#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// List grants, newest first.
    List(GrantsListArgs),
    /// Show one grant.
    Get {
        /// Grant ID.
        id: String,
    },
}

/// Grant status filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GrantStatusArg {
    /// Active.
    Active,
    /// Released by its workload.
    Released,
    /// Revoked by an operator.
    Revoked,
    /// Expired.
    Expired,
}

impl GrantStatusArg {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Released => "released",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

/// `lanyard grants list`
#[derive(Debug, Clone, Args)]
pub struct GrantsListArgs {
    /// Exact workload ID.
    #[arg(long, value_name = "ID")]
    pub workload: Option<String>,
    /// Workload ID prefix.
    #[arg(long, value_name = "P")]
    pub workload_prefix: Option<String>,
    /// Issuer name.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Destination name.
    #[arg(long)]
    pub destination: Option<String>,
    /// Task ID.
    #[arg(long)]
    pub task: Option<String>,
    /// Grant status.
    #[arg(long, value_enum)]
    pub status: Option<GrantStatusArg>,
    /// Page size, 1..1000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Follow page tokens to the end.
    #[arg(long)]
    pub all: bool,
}

// === explain ===

/// `lanyard explain`
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub token: TokenArg,
    /// Destination.
    #[arg(long)]
    pub destination: String,
    /// A scope (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Requested lifetime, seconds.
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u32>,
}

// === keys ===

/// `lanyard keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List lanyard's signing keys.
    List,
    /// Generate a new signing key; it is published at once.
    Rotate {
        /// Seconds until the new key starts signing.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        activate_after: u32,
    },
}

// === audit ===

/// `lanyard policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Store a new version from a Cedar file ("-" for stdin). It is validated against
    /// lanyard's schema; not in force until activated.
    Put {
        /// The policy file.
        file: PathBuf,
        /// Activate it in the same call.
        #[arg(long)]
        activate: bool,
        /// Why it changed, kept with the version.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Print a version's text (default: the active one).
    Get {
        /// e.g. v3.
        #[arg(value_name = "VERSION")]
        name: Option<String>,
    },
    /// Every stored version, newest first; `*` marks the active one.
    History,
    /// A unified diff between two versions.
    Diff {
        /// The older version.
        from: String,
        /// The newer version.
        to: String,
    },
    /// Replay the exchanges recorded in the audit stream against a proposed policy file
    /// and report who would gain and who would lose which destination and scope.
    DryRun {
        /// The proposed policy ("-" for stdin).
        file: PathBuf,
        /// How far back to replay, e.g. 24h, 7d.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
    },
    /// Make a stored version the one in force, on every replica.
    Activate {
        /// e.g. v3.
        #[arg(value_name = "VERSION")]
        name: String,
    },
}

/// `lanyard audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print audit events, one line each; with -f keep following new ones.
    Tail(AuditTailArgs),
    /// Prove the hash chain intact from genesis (or a signed checkpoint) to the head;
    /// exits non-zero naming the first broken event and what was done to it.
    Verify(AuditVerifyArgs),
    /// Sign the chain head now and print the checkpoint. Keep it outside lanyard:
    /// `audit verify --checkpoint FILE` later proves the chain still reaches it.
    Checkpoint,
    /// Print the fingerprint audit events carry for a token (the token is read from a
    /// file, never from the command line), to find the events it was used in.
    Fingerprint {
        /// File holding the token ("-" for stdin).
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
}

/// `lanyard audit verify`
#[derive(Debug, Clone, Args)]
pub struct AuditVerifyArgs {
    /// Start from this checkpoint (a file holding the JWS `audit checkpoint` printed)
    /// instead of genesis.
    #[arg(long, value_name = "FILE")]
    pub from_checkpoint: Option<PathBuf>,
    /// A checkpoint kept outside lanyard (file holding its JWS); the chain must reach it
    /// and match it. Repeatable.
    #[arg(long = "checkpoint", value_name = "FILE")]
    pub checkpoints: Vec<PathBuf>,
}

/// `lanyard audit tail`
#[derive(Debug, Clone, Args)]
pub struct AuditTailArgs {
    /// Keep the stream open and print new events as they are written.
    #[arg(short, long)]
    pub follow: bool,
    /// Start after this sequence number.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub after: i64,
    /// Only events of this kind (e.g. exchange.denied).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events of this workload ID.
    #[arg(long, value_name = "ID")]
    pub workload: Option<String>,
    /// Only events of this destination.
    #[arg(long)]
    pub destination: Option<String>,
    /// Only events about the token with this fingerprint (see `audit fingerprint`).
    #[arg(long, value_name = "FINGERPRINT")]
    pub fingerprint: Option<String>,
}

// === bench ===

/// `lanyard bench`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Measured load time, seconds (after the warmup).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Load time before measuring starts, seconds (discarded).
    #[arg(long, value_name = "SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
    /// Concurrent exchanges in flight (client tasks).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Operations timed for each step of the crypto-only floor.
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub floor_iterations: u32,
    /// Instead of the exchange path: build an audit chain of N events (with a signed
    /// checkpoint every 10,000) in a throwaway SQLite store, then time verifying it from
    /// genesis, as `lanyard audit verify` does.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub audit_chain: Option<u64>,
    /// Instead of the exchange path: seed N active grants of one workload into a fresh
    /// embedded store, start a dev server on it, and time one `lanyard revoke` of the
    /// workload to its last receipt (with the server's CPU time and peak memory).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000), conflicts_with = "audit_chain")]
    pub revoke: Option<u64>,
    /// Instead of the exchange path: seed N grants over N/1000 workloads (one in ten
    /// active) into a fresh embedded store and time `lanyard inventory` of one workload
    /// and a filtered grant listing.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1000..=100_000_000), conflicts_with_all = ["audit_chain", "revoke"])]
    pub inventory: Option<u64>,
}

/// Parse `KEY=VALUE` (split at the first `=`; the key must not be empty).
///
/// # Errors
/// When there is no `=` or the key is empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

// === revoke ===

/// `lanyard revoke`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RevokeArgs {
    /// Follow, show or list jobs instead of starting one.
    #[command(subcommand)]
    pub command: Option<RevokeCommand>,
    /// Which grants.
    #[command(flatten)]
    pub selector: Option<RevokeSelectorArgs>,
    /// Why (required; recorded in the audit stream and the signed receipts).
    #[arg(long, required = true)]
    pub reason: Option<String>,
    /// Also refuse new exchanges of the selected workload, workload prefix, issuer or
    /// destination for this long, e.g. `1h` (a deny entry; lift it early with
    /// `lanyard deny lift`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub deny_for: Option<std::time::Duration>,
}

/// Which grants to revoke: exactly one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeSelectorArgs {
    /// One grant.
    #[arg(long, value_name = "GRANT_ID")]
    pub grant: Option<String>,
    /// Every grant of a task.
    #[arg(long, value_name = "TASK_ID")]
    pub task: Option<String>,
    /// Every grant of a workload (exact SPIFFE ID).
    #[arg(long, value_name = "WORKLOAD_ID")]
    pub workload: Option<String>,
    /// Every grant of the workloads whose ID starts with this prefix.
    #[arg(long, value_name = "PREFIX")]
    pub workload_prefix: Option<String>,
    /// Every grant proved by tokens of this issuer (its name).
    #[arg(long, value_name = "NAME")]
    pub issuer: Option<String>,
    /// Every grant for this destination.
    #[arg(long, value_name = "NAME")]
    pub destination: Option<String>,
}

/// `lanyard revoke ...` subcommands.
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Show a job: per-destination progress and, with --receipts, its signed receipts.
    Status {
        /// Job ID (rvk_...).
        job: String,
        /// List every receipt (with its signature in JSON output).
        #[arg(long)]
        receipts: bool,
        /// Follow the job until every grant has been attempted, as `lanyard revoke` does.
        #[arg(long)]
        follow: bool,
    },
    /// List jobs, newest first.
    List {
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Give up on a job's failed steps (they stay valid at the destination until they
    /// expire); the job can then finish. Recorded in the audit stream.
    Abandon {
        /// Job ID (rvk_...).
        job: String,
        /// Only this destination's failed steps.
        #[arg(long)]
        destination: Option<String>,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
}

// === deny ===

/// `lanyard deny ...`
#[derive(Debug, Subcommand)]
pub enum DenyCommand {
    /// List deny entries.
    List,
    /// Lift a deny entry (its name as listed, e.g. `workload:spiffe://...`).
    Lift {
        /// Entry name.
        name: String,
    },
}

// === inventory ===

/// `lanyard inventory`
#[derive(Debug, Clone, Args)]
pub struct InventoryArgs {
    /// The workload (exact SPIFFE ID).
    pub workload: String,
    /// Only grants proved by this issuer.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Only grants for this destination.
    #[arg(long)]
    pub destination: Option<String>,
    /// Only grants of this task.
    #[arg(long)]
    pub task: Option<String>,
    /// Grants per page (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Every page of grants, not only the first.
    #[arg(long)]
    pub all: bool,
}
