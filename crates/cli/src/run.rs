//! `lanyard run -- CMD`: get credentials for a command only while it runs.
//!
//! 1. The workload's platform token is read (a file, re-read every time since projected
//!    tokens rotate, or a GitHub Actions OIDC token requested for each call) and
//!    exchanged for each destination asked for (`--dest`, or a small TOML file).
//! 2. CMD starts with the credentials in its environment, or, with `--files`, in files
//!    (mode 0600) in a private directory (mode 0700) that its environment points to.
//!    They are never put on a command line, logged, or set in this process's own
//!    environment: only the child's.
//! 3. With `--files`, each grant is renewed with fresh proof when two thirds of its
//!    lifetime have passed, and its files are replaced atomically. (A running process's
//!    environment cannot change, so in environment mode credentials live for the TTL
//!    asked for; use `--files` for commands that outlive it.)
//! 4. Signals are forwarded to CMD (SIGINT and SIGQUIT only when this process has no
//!    terminal on standard input: from a terminal the kernel already delivers them to
//!    the whole foreground group). When CMD exits, however it exits, every grant is
//!    released and the private directory removed, and `lanyard run` exits with CMD's
//!    code (128 + the signal number when a signal ended it).
//!
//! If `lanyard run` itself is killed with SIGKILL nothing can be released; the grants
//! then end at their expiry.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use lanyard_core::Secret;
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Channel;

use crate::args::{GlobalArgs, RunArgs};
use crate::client::{RpcResultExt as _, exchange_client, grpc_url};
use crate::output::note;

/// `lanyard run` ended because its command did: exit with this code, printing nothing.
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the command exited with {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// One destination to get a credential for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestSpec {
    /// Destination name.
    pub name: String,
    /// Scopes to request.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// TTL to request, seconds (the destination's default when unset).
    #[serde(default)]
    pub ttl: Option<u32>,
    /// Environment variable prefix (default: the name in upper case, `-` as `_`).
    #[serde(default)]
    pub env: Option<String>,
}

impl DestSpec {
    /// The prefix of this destination's variables.
    pub fn prefix(&self) -> String {
        self.env.clone().unwrap_or_else(|| {
            self.name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect()
        })
    }

    /// Parse `NAME[,scope=S]...[,ttl=SECS][,env=PREFIX]`.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default().trim().to_owned();
        if name.is_empty() {
            anyhow::bail!("--dest {s:?}: the destination name comes first");
        }
        let mut spec = DestSpec {
            name,
            scopes: Vec::new(),
            ttl: None,
            env: None,
        };
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("--dest {s:?}: {part:?} is not key=value"))?;
            match k.trim() {
                "scope" => spec.scopes.push(v.trim().to_owned()),
                "ttl" => {
                    spec.ttl = Some(
                        v.trim()
                            .parse()
                            .with_context(|| format!("--dest {s:?}: ttl must be seconds"))?,
                    );
                }
                "env" => spec.env = Some(v.trim().to_owned()),
                other => anyhow::bail!("--dest {s:?}: unknown key {other:?} (scope, ttl, env)"),
            }
        }
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> anyhow::Result<()> {
        // Also a directory name in --files mode: never a path.
        if self.name.is_empty()
            || self.name.len() > 63
            || self.name.starts_with('-')
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            anyhow::bail!(
                "destination {:?}: a name is 1-63 characters of [a-z0-9-]",
                self.name
            );
        }
        let p = self.prefix();
        if p.is_empty()
            || p.starts_with(|c: char| c.is_ascii_digit())
            || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            anyhow::bail!(
                "destination {}: env prefix {p:?} must be letters, digits and _ (not starting with a digit)",
                self.name
            );
        }
        Ok(())
    }
}

/// The `--config` file: `[[destination]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    #[serde(default)]
    destination: Vec<DestSpec>,
}

/// Where the subject token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file, re-read for every call.
    File(PathBuf),
    /// GitHub Actions: requested from `ACTIONS_ID_TOKEN_REQUEST_URL` for this audience.
    GithubActions(String),
}

impl TokenSource {
    /// A fresh token.
    ///
    /// # Errors
    /// When it cannot be read or requested.
    pub async fn token(&self) -> anyhow::Result<Secret> {
        match self {
            TokenSource::File(p) => crate::workload::read_token(p),
            TokenSource::GithubActions(audience) => github_actions_token(audience).await,
        }
    }
}

/// Request a GitHub Actions OIDC token for `audience`.
async fn github_actions_token(audience: &str) -> anyhow::Result<Secret> {
    let url = std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL").context(
        "ACTIONS_ID_TOKEN_REQUEST_URL is not set: run inside GitHub Actions with `permissions: id-token: write`",
    )?;
    let bearer = std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
        .context("ACTIONS_ID_TOKEN_REQUEST_TOKEN is not set")?;
    let mut url = reqwest::Url::parse(&url).context("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL")?;
    url.query_pairs_mut().append_pair("audience", audience);
    #[derive(Deserialize)]
    struct Answer {
        value: String,
    }
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .context("requesting a GitHub Actions OIDC token")?;
    let status = resp.status();
    if !status.is_success() {
        anyhow::bail!("the GitHub Actions token service answered http {status}");
    }
    let a: Answer = resp
        .json()
        .await
        .context("the GitHub Actions token service answered without a token")?;
    if a.value.trim().is_empty() {
        anyhow::bail!("the GitHub Actions token service answered an empty token");
    }
    Ok(Secret::new(a.value.trim()))
}

/// A credential held for the command.
struct Held {
    spec: DestSpec,
    grant_id: String,
    expires_at: i64,
    /// When to renew next (files mode).
    renew_at: i64,
    credential: Option<pb::Credential>,
}

fn now() -> i64 {
    use lanyard_core::Clock as _;
    lanyard_core::SystemClock.now_unix()
}

/// The variables for one credential: `(suffix, value, secret)`.
fn fields(h: &Held) -> Vec<(&'static str, String, bool)> {
    let mut out = vec![
        ("GRANT_ID", h.grant_id.clone(), false),
        ("EXPIRES_AT", h.expires_at.to_string(), false),
    ];
    use pb::credential::Kind;
    match h.credential.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(Kind::Bearer(b)) => {
            out.push(("TOKEN", b.token.clone(), true));
            out.push(("TOKEN_TYPE", b.token_type.clone(), false));
            out.push(("HEADER", b.header.clone(), false));
        }
        Some(Kind::Aws(a)) => {
            out.push(("ACCESS_KEY_ID", a.access_key_id.clone(), false));
            out.push(("SECRET_ACCESS_KEY", a.secret_access_key.clone(), true));
            out.push(("SESSION_TOKEN", a.session_token.clone(), true));
            out.push(("REGION", a.region.clone(), false));
        }
        Some(Kind::Database(d)) => {
            let enc = |s: &str| -> String { form_component(s) };
            out.push(("HOST", d.host.clone(), false));
            out.push(("PORT", d.port.to_string(), false));
            out.push(("DATABASE", d.database.clone(), false));
            out.push(("USER", d.username.clone(), false));
            out.push(("PASSWORD", d.password.clone(), true));
            out.push((
                "URL",
                format!(
                    "postgresql://{}:{}@{}:{}/{}",
                    enc(&d.username),
                    enc(&d.password),
                    d.host,
                    d.port,
                    enc(&d.database)
                ),
                true,
            ));
        }
        None => {}
    }
    out
}

/// Everything but RFC 3986 §2.3 unreserved characters.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode a URL component (user, password, database name).
fn form_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// Write `text` to `dir/name` atomically: a new file (mode 0600, created exclusively
/// under a random name) renamed over it.
fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let mut f = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing in {}", dir.display()))?;
    f.as_file().sync_all().ok();
    f.persist(dir.join(name))
        .map(drop)
        .with_context(|| format!("replacing {}", dir.join(name).display()))
}

/// Write one credential's files under `root/<name>/` and return the variables that
/// point to them.
fn write_files(root: &Path, h: &Held) -> anyhow::Result<Vec<(String, String)>> {
    let dir = root.join(&h.spec.name);
    if !dir.exists() {
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let prefix = h.spec.prefix();
    let mut vars = Vec::new();
    let mut json = serde_json::Map::new();
    for (suffix, value, _) in fields(h) {
        let file = suffix.to_ascii_lowercase();
        write_atomic(&dir, &file, &value)?;
        json.insert(file.clone(), serde_json::Value::String(value));
        vars.push((
            format!("{prefix}_{suffix}_FILE"),
            dir.join(&file).display().to_string(),
        ));
    }
    write_atomic(
        &dir,
        "credential.json",
        &serde_json::Value::Object(json).to_string(),
    )?;
    vars.push((
        format!("{prefix}_CREDENTIAL_FILE"),
        dir.join("credential.json").display().to_string(),
    ));
    Ok(vars)
}

/// The destinations asked for on the command line and in the file.
fn specs(a: &RunArgs) -> anyhow::Result<Vec<DestSpec>> {
    let mut out = Vec::new();
    if let Some(path) = &a.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: RunFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for d in file.destination {
            d.check()?;
            out.push(d);
        }
    }
    for d in &a.dest {
        out.push(DestSpec::parse(d)?);
    }
    if out.is_empty() {
        anyhow::bail!("name at least one destination: --dest NAME (or --config FILE)");
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &out {
        if !seen.insert(d.prefix()) {
            anyhow::bail!(
                "two destinations use the variable prefix {}; give one another with env=",
                d.prefix()
            );
        }
    }
    Ok(out)
}

async fn exchange_one(
    client: &mut ExchangeServiceClient<Channel>,
    source: &TokenSource,
    spec: &DestSpec,
    target: &str,
) -> anyhow::Result<Held> {
    let token = source.token().await?;
    let r = client
        .exchange(pb::ExchangeRequest {
            subject_token: token.into_inner(),
            destination: spec.name.clone(),
            scopes: spec.scopes.clone(),
            requested_ttl_seconds: spec.ttl.unwrap_or(0),
            ..Default::default()
        })
        .await
        .or_rpc_error(target)
        .with_context(|| format!("exchanging for destination {}", spec.name))?;
    let issued_at = now();
    let expires_at = r.expires_at.map_or(0, |t| t.seconds);
    Ok(Held {
        spec: spec.clone(),
        grant_id: r.grant_id,
        expires_at,
        renew_at: first_renewal(issued_at, expires_at).max(issued_at + 1),
        credential: r.credential,
    })
}

async fn release_all(
    client: &mut ExchangeServiceClient<Channel>,
    source: &TokenSource,
    held: &[Held],
    target: &str,
    verbose: bool,
) {
    for h in held {
        let result = async {
            let token = source.token().await?;
            client
                .release(pb::ReleaseRequest {
                    grant_id: h.grant_id.clone(),
                    subject_token: token.into_inner(),
                    ..Default::default()
                })
                .await
                .or_rpc_error(target)?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) if verbose => note(&format!(
                "lanyard run: released {} (grant {})",
                h.spec.name, h.grant_id
            )),
            Ok(()) => {}
            Err(e) => note(&format!(
                "lanyard run: warning: could not release grant {} for {}: {}; it ends at its expiry",
                h.grant_id,
                h.spec.name,
                crate::error_line(&e)
            )),
        }
    }
}

/// When `h` is first due for renewal: two thirds into its lifetime.
fn first_renewal(issued_at: i64, expires_at: i64) -> i64 {
    issued_at + (expires_at - issued_at).max(0) * 2 / 3
}

/// After a failed renewal: a quarter of what is left, between 5 s and a minute, and
/// never after the credential has expired (then every 5 s).
fn retry_renewal(now: i64, expires_at: i64) -> i64 {
    let remaining = (expires_at - now).max(0);
    now + (remaining / 4).clamp(5, 60)
}

/// The signals `lanyard run` handles, installed before anything is asked for.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next signal received.
    async fn next(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal as S;
        tokio::select! {
            _ = self.term.recv() => S::TERM,
            _ = self.hup.recv() => S::HUP,
            _ = self.int.recv() => S::INT,
            _ = self.quit.recv() => S::QUIT,
            _ = self.usr1.recv() => S::USR1,
            _ = self.usr2.recv() => S::USR2,
        }
    }
}

/// Whether a SIGINT or SIGQUIT this process got must be passed on: not when it came
/// from the terminal while this process group is in the foreground, since the kernel
/// then delivered it to the command (same group) as well.
fn forward_keyboard_signal() -> bool {
    match rustix::termios::tcgetpgrp(std::io::stdin()) {
        Ok(foreground) => foreground != rustix::process::getpgrp(),
        Err(_) => true,
    }
}

/// Exit code for a signal number: 128 + n, as shells report it.
fn signal_code(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(255)
}

/// Bound on one exchange, renewal or release call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `lanyard run`
///
/// # Errors
/// [`ExitWith`] with the command's code once it has run, or 128 + n when signal n
/// arrived before it started; any other error when it could not start (every grant
/// obtained is released first).
pub async fn run(g: &GlobalArgs, a: &RunArgs) -> anyhow::Result<()> {
    // First, so that a signal during the exchanges releases what was granted.
    let mut signals = Signals::install()?;
    let specs = specs(a)?;
    let Some((program, args)) = a.command.split_first() else {
        anyhow::bail!("give the command to run after --");
    };
    let source = match (&a.token_file, &a.github_actions_audience) {
        (Some(f), None) if f.as_os_str() == "-" => anyhow::bail!(
            "--token-file - cannot be used with run: the token is read again for every renewal and release, and standard input belongs to the command"
        ),
        (Some(f), None) => TokenSource::File(f.clone()),
        (None, Some(aud)) => TokenSource::GithubActions(aud.clone()),
        _ => anyhow::bail!("give exactly one of --token-file or --github-actions-audience"),
    };
    let target = grpc_url(&g.grpc);
    let mut client = exchange_client(&g.grpc).await?;

    let mut held: Vec<Held> = Vec::with_capacity(specs.len());
    let outcome = async {
        for spec in &specs {
            let h = tokio::select! {
                r = tokio::time::timeout(CALL_TIMEOUT, exchange_one(&mut client, &source, spec, &target)) => {
                    r.map_err(|_| anyhow::anyhow!("exchanging for destination {} timed out", spec.name))??
                }
                sig = signals.next() => return Ok(Some(signal_code(sig.as_raw()))),
            };
            if a.verbose {
                note(&format!(
                    "lanyard run: {} granted (grant {}, expires in {}s)",
                    spec.name,
                    h.grant_id,
                    h.expires_at - now()
                ));
            }
            held.push(h);
        }
        anyhow::Ok(None)
    }
    .await;
    let code = match outcome {
        Ok(None) => {
            supervise(
                a,
                program,
                args,
                &mut client,
                &source,
                &mut held,
                &target,
                &mut signals,
            )
            .await
        }
        Ok(Some(code)) => Ok(code),
        Err(e) => Err(e),
    };
    release_all(&mut client, &source, &held, &target, a.verbose).await;
    Err(match code {
        Ok(code) => ExitWith(code).into(),
        Err(e) => e,
    })
}

/// Start the command with the credentials, forward signals, renew, and wait for it.
/// Returns its exit code. The private directory is removed on every path out.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    a: &RunArgs,
    program: &str,
    args: &[String],
    client: &mut ExchangeServiceClient<Channel>,
    source: &TokenSource,
    held: &mut [Held],
    target: &str,
    signals: &mut Signals,
) -> anyhow::Result<u8> {
    let dir = if a.files {
        Some(
            tempfile::Builder::new()
                .prefix("lanyard-run-")
                .tempdir()
                .context("creating the private credentials directory")?,
        )
    } else {
        None
    };
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    match &dir {
        Some(d) => {
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700))?;
            env.insert(
                "LANYARD_CREDENTIALS_DIR".into(),
                d.path().display().to_string(),
            );
            for h in held.iter() {
                env.extend(write_files(d.path(), h)?);
            }
        }
        None => {
            for h in held.iter() {
                let prefix = h.spec.prefix();
                for (suffix, value, _) in fields(h) {
                    env.insert(format!("{prefix}_{suffix}"), value);
                }
            }
        }
    }
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .envs(&env)
        .kill_on_drop(true)
        .spawn();
    drop(env);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            // As `env` and `timeout` do: 127 not found, 126 not executable.
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            note(&format!("lanyard run: cannot start {program}: {e}"));
            return Ok(code);
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw);
    let forward = |sig: rustix::process::Signal| {
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, sig);
        }
    };
    let status = loop {
        let next = if dir.is_some() {
            held.iter().enumerate().map(|(i, h)| (h.renew_at, i)).min()
        } else {
            None
        };
        let wait = next.map_or(Duration::from_secs(3600), |(at, _)| {
            Duration::from_secs(u64::try_from((at - now()).max(0)).unwrap_or(0))
        });
        tokio::select! {
            status = child.wait() => break status.context("waiting for the command")?,
            sig = signals.next() => {
                use rustix::process::Signal as S;
                if !matches!(sig, S::INT | S::QUIT) || forward_keyboard_signal() {
                    forward(sig);
                }
            }
            () = tokio::time::sleep(wait), if next.is_some() => {
                let Some((_, i)) = next else { continue };
                let path = dir.as_ref().map(tempfile::TempDir::path);
                // Bounded, so signals and the command's exit are seen again soon.
                let renewing = renew(client, source, &mut held[i], path, target, a.verbose);
                tokio::select! {
                    () = renewing => {}
                    status = child.wait() => break status.context("waiting for the command")?,
                }
            }
        }
    };
    drop(dir);
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => signal_code(s),
        (None, None) => 1,
    })
}

/// Renew one grant with fresh proof and rewrite its files; on failure, try again later
/// (the current credential keeps working until its expiry).
async fn renew(
    client: &mut ExchangeServiceClient<Channel>,
    source: &TokenSource,
    h: &mut Held,
    dir: Option<&Path>,
    target: &str,
    verbose: bool,
) {
    let result = tokio::time::timeout(CALL_TIMEOUT, async {
        let token = source.token().await?;
        let r = client
            .renew(pb::RenewRequest {
                grant_id: h.grant_id.clone(),
                subject_token: token.into_inner(),
                requested_ttl_seconds: h.spec.ttl.unwrap_or(0),
                ..Default::default()
            })
            .await
            .or_rpc_error(target)?;
        anyhow::Ok(r)
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
    match result {
        Ok(r) => {
            let issued_at = now();
            h.expires_at = r.expires_at.map_or(h.expires_at, |t| t.seconds);
            h.renew_at = first_renewal(issued_at, h.expires_at).max(issued_at + 1);
            h.credential = r.credential;
            if let Some(dir) = dir
                && let Err(e) = write_files(dir, h)
            {
                note(&format!(
                    "lanyard run: warning: renewed {} but could not write its files: {e:#}",
                    h.spec.name
                ));
            }
            if verbose {
                note(&format!(
                    "lanyard run: renewed {} (expires in {}s)",
                    h.spec.name,
                    h.expires_at - now()
                ));
            }
        }
        Err(e) => {
            let n = now();
            h.renew_at = retry_renewal(n, h.expires_at);
            note(&format!(
                "lanyard run: warning: renewing {} failed ({}); {}s left, trying again in {}s",
                h.spec.name,
                crate::error_line(&e),
                (h.expires_at - n).max(0),
                h.renew_at - n
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_specs_parse() {
        let d = DestSpec::parse("orders-api,scope=orders:read,scope=orders:write,ttl=60").unwrap();
        assert_eq!(d.name, "orders-api");
        assert_eq!(d.scopes, vec!["orders:read", "orders:write"]);
        assert_eq!(d.ttl, Some(60));
        assert_eq!(d.prefix(), "ORDERS_API");
        assert_eq!(DestSpec::parse("db,env=PG").unwrap().prefix(), "PG");
        for bad in [
            "",
            ",scope=x",
            "a,ttl=x",
            "a,bogus=1",
            "a,scope",
            "a,env=1X",
            "a,env=A-B",
            "../etc",
            "/abs",
            "Orders",
        ] {
            assert!(DestSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn database_urls_are_encoded() {
        assert_eq!(form_component("p@ss:/w?rd"), "p%40ss%3A%2Fw%3Frd");
    }

    #[test]
    fn renewal_is_two_thirds_in_and_retries_back_off() {
        assert_eq!(first_renewal(1000, 1300), 1200);
        assert_eq!(first_renewal(1000, 1000), 1000);
        // A quarter of what is left, at least 5 s and at most a minute.
        assert_eq!(retry_renewal(1000, 1100), 1025);
        assert_eq!(retry_renewal(1000, 1004), 1005);
        assert_eq!(retry_renewal(1000, 5000), 1060);
        assert_eq!(retry_renewal(1000, 900), 1005, "expired: every 5 s");
    }
}
