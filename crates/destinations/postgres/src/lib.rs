//! The `postgres` destination: one short-lived PostgreSQL login role per grant, a member
//! of pre-created `NOLOGIN` group roles, disabled, disconnected and dropped on revocation.
//! Vault's database secrets engine, with the fixes PROTOCOLS.md §5 recommends.
//!
//! # Credential
//! [`Credential::Database`] with `host`, `port` and `database` from the settings, a new
//! role as `username`, and a password of [`PASSWORD_LEN`] random `[A-Za-z0-9]`
//! characters. The role's `VALID UNTIL` is the grant's expiry; the revocation handle is
//! the role name.
//!
//! # Settings
//! ```json
//! {
//!   "host": "orders-db.internal", "port": 5432, "database": "orders",
//!   "admin_url_file": "/run/secrets/orders-db-admin-url",
//!   "scope_roles": {"db:read": ["orders_readonly"], "db:write": ["orders_readwrite"]}
//! }
//! ```
//!
//! | key                        | default         | meaning |
//! |----------------------------|-----------------|---------|
//! | `host`                     | required        | host the workload connects to (returned in the credential) |
//! | `port`                     | `5432`          | port the workload connects to |
//! | `database`                 | required        | database the workload connects to; lanyard's admin connections use it too (it replaces the admin URL's database), so `REASSIGN OWNED`/`DROP OWNED` act there |
//! | `admin_url_file`           | one of the two  | file holding the admin URL `postgres://user:password@host:port/db?sslmode=...`, read once when the destination is built |
//! | `admin_url_env`            | one of the two  | name of an environment variable holding the admin URL, instead of a file |
//! | `scope_roles`              | per scope       | scope -> group roles the new role is made a member of, e.g. `{"db:read": ["orders_readonly"]}`; every offered scope needs an entry (an empty list grants login only), and no other scope may appear |
//! | `creation_statements`      | `[]`            | SQL templates run after the built-in `CREATE ROLE` and `GRANT`s, in the same transaction |
//! | `revocation_statements`    | `[]`            | SQL templates run during revocation, after login is disabled and sessions are ended, before objects and the role are dropped; in one transaction |
//! | `owner_role`               | the admin user  | role given the objects the ephemeral role owns (`REASSIGN OWNED BY ... TO`) |
//! | `role_prefix`              | `lanyard_`      | start of every role name: `[a-z_][a-z0-9_]*`, at most [`MAX_PREFIX_LEN`] bytes, not `pg_...` |
//! | `max_connections_per_role` | `10`            | `CONNECTION LIMIT` of each role, 1..=10000 |
//! | `pool_size`                | `4`             | admin connections lanyard keeps, 1..=64 |
//! | `connect_timeout_secs`     | `5`             | how long a call waits for an admin connection, 1..=300; an unreachable database fails the call after this |
//! | `statement_timeout_secs`   | `30`            | `statement_timeout` of admin sessions, 1..=3600 |
//!
//! Unknown keys are refused. Settings are stored and listed by the admin API, so they
//! hold no secret: the admin URL (which holds the admin password) comes from a file or
//! an environment variable, and an error about it names the path or variable, never its
//! contents. Group role and owner names may hold any printable characters (they are
//! always quoted), up to 63 bytes, but not `pg_...` (built-in roles such as
//! `pg_write_server_files` are superuser-equivalent: make your own group and grant it the
//! built-in role if you mean to) and not the `role_prefix` (those roles are dropped).
//!
//! # Statement templates
//! `creation_statements` and `revocation_statements` are SQL with placeholders. Each
//! placeholder expands to a complete, quoted SQL token, so it is written bare:
//!
//! | placeholder      | expands to                                        | where |
//! |------------------|---------------------------------------------------|-------|
//! | `{{name}}`       | the role, as a quoted identifier: `"lanyard_0190..."` | both |
//! | `{{grant_id}}`   | the grant ID, as a string literal: `'grt_0190...'` | both |
//! | `{{scopes}}`     | granted scopes, comma-separated, as a string literal: `'db:read,db:write'` | creation |
//! | `{{expiration}}` | the expiry, as a timestamp literal: `'2030-01-02 03:04:05+00'` | creation |
//!
//! So `GRANT SELECT ON audit_view TO {{name}}` is right and `"{{name}}"` is refused when
//! the settings are loaded, as are unknown placeholders. There is no `{{password}}`: the
//! password never appears in any statement (see below).
//!
//! # What each call does
//! **Issue**, in one transaction: `CREATE ROLE <prefix><grant hex> WITH LOGIN INHERIT
//! NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT n
//! PASSWORD '<SCRAM verifier>' VALID UNTIL '<expiry>'`, `COMMENT ON ROLE ... IS 'lanyard
//! grant <grant id>'`, `GRANT "<group>" TO <role>` for each group of each granted scope,
//! then `creation_statements`. The role name is the prefix followed by the 32 hex digits
//! of the grant's UUIDv7, so it is unique, at most 63 bytes, and names its grant; issuing
//! twice for one grant fails (not retryable) instead of replacing the first role.
//!
//! **Renew** checks the role still exists, belongs to the grant and can log in, then sets
//! a new password and `VALID UNTIL`. Group memberships are unchanged.
//!
//! **Revoke** runs these steps outside any transaction, so that the first ones hold even
//! if a later one fails, and records each in the receipt:
//! 1. the role is gone: `Revoked` with "role ... already gone" (revoking is idempotent);
//! 2. `ALTER ROLE u NOLOGIN`;
//! 3. `SELECT pg_terminate_backend(pid, wait) FROM pg_stat_activity WHERE usename = u`,
//!    in every database, waiting up to 5 s (or a quarter of `statement_timeout_secs`)
//!    for each session to end;
//! 4. `revocation_statements`, in one transaction (a retried revocation runs them again,
//!    so write them to be idempotent);
//! 5. `REASSIGN OWNED BY u TO <owner>; DROP OWNED BY u`, which also removes privileges
//!    granted directly to `u`. **These act only in `database`**: PostgreSQL roles are
//!    cluster-wide but ownership and privileges are per database. If the role owns
//!    objects or holds privileges in another database, step 6 fails with PostgreSQL's
//!    list of them; clean them up there and revoke again;
//! 6. `DROP ROLE IF EXISTS u`.
//!
//! A failure returns [`DestinationError::Upstream`] (retryable) naming the step, e.g.
//! `revoke: DROP ROLE for role ...: ... (SQLSTATE 2BP01): 1 object in database other`.
//! Every built-in step is idempotent, so a retry carries on from where the last attempt
//! stopped, and the receipt lists every step of the attempt that finished.
//!
//! Renew and revoke only touch a role whose comment names the grant they were called
//! for, so a damaged handle can never drop a role lanyard did not create for that grant;
//! such a role is refused with a non-retryable [`DestinationError::Upstream`].
//!
//! ## Why `revocation_statements` run after `NOLOGIN`
//! Vault runs custom revocation statements first, in one transaction, and never ends
//! sessions (PROTOCOLS.md §5). Here they run once login is disabled and sessions have
//! ended, so a failing custom statement cannot leave the role able to work.
//!
//! ## Why the password is never sent
//! The role's password is set as a SCRAM-SHA-256 verifier computed here (PostgreSQL
//! stores a verifier it is given as is), so the password is not in any statement,
//! server log (`log_statement`), `pg_stat_activity` row or error message. Password
//! login then works with `scram-sha-256` and `md5` lines in `pg_hba.conf`. The password
//! is ASCII, so SASLprep leaves it unchanged. sqlx's statement logging is off for the
//! admin connections too.
//!
//! # Revocation
//! [`Revocability::Immediate`]: once revoke returns, the role cannot log in, its sessions
//! have ended and it no longer exists. `VALID UNTIL` only limits password logins and ends
//! no session, so an expired grant's role is revoked by lanyard's expiry sweep
//! ([`Destination::revoke_at_expiry`] is true here: a revocation job per sweep, with
//! receipts, `[revocation] expiry_sweep_interval`). Roles left behind by other means are
//! found with `SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE
//! rolname LIKE 'lanyard\_%'`. The password and `VALID UNTIL` are only checked when
//! `pg_hba.conf` asks for a password (`scram-sha-256`, `md5`) for these roles; under
//! `trust`, `peer` or `cert` anyone who can name the role logs in until it is revoked.
//!
//! # The admin role
//! Needs PostgreSQL 14 or later (`pg_terminate_backend` with a timeout). A superuser
//! works. A non-superuser admin needs `CREATEROLE`, membership in `pg_signal_backend`
//! (to end sessions), the right to grant each group role (on PostgreSQL 16+, `ADMIN
//! OPTION` on it), and on PostgreSQL 16+ the privileges of the roles it creates for
//! `REASSIGN OWNED` (e.g. `ALTER ROLE admin SET createrole_self_grant = 'set, inherit'`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, PgPool};

use lanyard_core::{GrantId, Scope, Secret, UnixTime};
use lanyard_destination::{
    Credential, Destination, DestinationError, DestinationSpec, IssueRequest, Issued, MintError,
    Revocability, RevokeOutcome, RevokeRequest,
};

/// The adapter kind this crate implements.
pub const KIND: &str = "postgres";
/// Length of generated passwords, `[A-Za-z0-9]` characters (about 238 bits).
pub const PASSWORD_LEN: usize = 40;
/// PBKDF2 iterations of the SCRAM verifiers this adapter computes (PostgreSQL's default).
pub const SCRAM_ITERATIONS: u32 = 4096;
/// PostgreSQL's longest identifier, bytes (`NAMEDATALEN - 1`).
pub const MAX_IDENTIFIER_LEN: usize = 63;
/// Hex digits of a grant ID in a role name.
const GRANT_HEX_LEN: usize = 32;
/// Longest `role_prefix`, so that a role name fits in [`MAX_IDENTIFIER_LEN`].
pub const MAX_PREFIX_LEN: usize = MAX_IDENTIFIER_LEN - GRANT_HEX_LEN;
/// Longest wait for one terminated session to exit during revocation, milliseconds; a
/// quarter of the statement timeout when that is shorter.
const TERMINATE_WAIT_MS: i64 = 5000;
/// Placeholders allowed in `creation_statements`.
const CREATION_PLACEHOLDERS: &[&str] = &["name", "grant_id", "scopes", "expiration"];
/// Placeholders allowed in `revocation_statements` (scopes and expiry are not known then).
const REVOCATION_PLACEHOLDERS: &[&str] = &["name", "grant_id"];

/// Adapter errors are [`DestinationError`]s, so the server maps every adapter's errors to
/// wire statuses in one place.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

fn invalid(message: String) -> DestinationError {
    DestinationError::InvalidSettings {
        kind: KIND.to_owned(),
        message,
    }
}

fn upstream(message: String, retryable: bool) -> DestinationError {
    DestinationError::Upstream { message, retryable }
}

// === impl PostgresSettings ===

/// The `settings` block of a `postgres` destination (see the crate docs for each key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Host the workload connects to.
    pub host: String,
    /// Port the workload connects to.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database the workload connects to, and where lanyard manages roles.
    pub database: String,
    /// File holding the admin connection URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_url_file: Option<PathBuf>,
    /// Environment variable holding the admin connection URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_url_env: Option<String>,
    /// Scope -> group roles granted to the new role.
    #[serde(default)]
    pub scope_roles: BTreeMap<String, Vec<String>>,
    /// SQL templates run after `CREATE ROLE`, in the issue transaction.
    #[serde(default)]
    pub creation_statements: Vec<String>,
    /// SQL templates run during revocation.
    #[serde(default)]
    pub revocation_statements: Vec<String>,
    /// Role given the objects an ephemeral role owns; the admin user when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_role: Option<String>,
    /// Start of every role name.
    #[serde(default = "default_prefix")]
    pub role_prefix: String,
    /// `CONNECTION LIMIT` of each role.
    #[serde(default = "default_connections_per_role")]
    pub max_connections_per_role: u32,
    /// Admin connections kept.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// How long a call waits for an admin connection, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// `statement_timeout` of admin sessions, seconds.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_secs: u64,
}

fn default_port() -> u16 {
    5432
}
fn default_prefix() -> String {
    "lanyard_".to_owned()
}
fn default_connections_per_role() -> u32 {
    10
}
fn default_pool_size() -> u32 {
    4
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_statement_timeout() -> u64 {
    30
}

impl PostgresSettings {
    /// Parse and validate a `settings` block for a destination offering `offered_scopes`.
    /// Does not read the admin URL (see [`PostgresDestination::new`]).
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] naming the problem.
    pub fn from_value(settings: &Value, offered_scopes: &[String]) -> Result<Self> {
        let value = match settings {
            Value::Null => Value::Object(Map::new()),
            other => other.clone(),
        };
        let parsed: PostgresSettings =
            serde_json::from_value(value).map_err(|e| invalid(format!("settings: {e}")))?;
        parsed.validate(offered_scopes).map_err(invalid)?;
        Ok(parsed)
    }

    fn validate(&self, offered_scopes: &[String]) -> std::result::Result<(), String> {
        if self.host.trim().is_empty() || self.host.chars().any(char::is_control) {
            return Err("settings.host must be a non-empty host name or address".into());
        }
        if self.port == 0 {
            return Err("settings.port must be 1..=65535".into());
        }
        if self.database.is_empty()
            || self.database.len() > MAX_IDENTIFIER_LEN
            || self.database.chars().any(char::is_control)
        {
            return Err(format!(
                "settings.database must be 1-{MAX_IDENTIFIER_LEN} bytes without control characters"
            ));
        }
        match (&self.admin_url_file, &self.admin_url_env) {
            (None, None) => {
                return Err(
                    "settings needs admin_url_file (a file holding the admin URL) or admin_url_env"
                        .into(),
                );
            }
            (Some(_), Some(_)) => {
                return Err(
                    "settings.admin_url_file and settings.admin_url_env are exclusive; set one"
                        .into(),
                );
            }
            (Some(path), None) if path.as_os_str().is_empty() => {
                return Err("settings.admin_url_file must not be empty".into());
            }
            (None, Some(var)) if !valid_env_name(var) => {
                return Err(format!(
                    "settings.admin_url_env {var:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
                ));
            }
            _ => {}
        }
        check_prefix(&self.role_prefix)?;
        for scope in offered_scopes {
            if !self.scope_roles.contains_key(scope) {
                return Err(format!(
                    "settings.scope_roles has no entry for offered scope {scope:?} (use [] to grant login only)"
                ));
            }
        }
        for (scope, groups) in &self.scope_roles {
            if !offered_scopes.contains(scope) {
                return Err(format!(
                    "settings.scope_roles names scope {scope:?}, which the destination does not offer"
                ));
            }
            for group in groups {
                check_role_name(group, &self.role_prefix)
                    .map_err(|e| format!("settings.scope_roles[{scope:?}]: {e}"))?;
            }
        }
        if let Some(owner) = &self.owner_role {
            check_role_name(owner, &self.role_prefix)
                .map_err(|e| format!("settings.owner_role: {e}"))?;
        }
        for (i, t) in self.creation_statements.iter().enumerate() {
            check_template(t, CREATION_PLACEHOLDERS)
                .map_err(|e| format!("settings.creation_statements[{i}]: {e}"))?;
        }
        for (i, t) in self.revocation_statements.iter().enumerate() {
            check_template(t, REVOCATION_PLACEHOLDERS)
                .map_err(|e| format!("settings.revocation_statements[{i}]: {e}"))?;
        }
        if !(1..=10_000).contains(&self.max_connections_per_role) {
            return Err("settings.max_connections_per_role must be 1..=10000".into());
        }
        if !(1..=64).contains(&self.pool_size) {
            return Err("settings.pool_size must be 1..=64".into());
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return Err("settings.connect_timeout_secs must be 1..=300".into());
        }
        if !(1..=3600).contains(&self.statement_timeout_secs) {
            return Err("settings.statement_timeout_secs must be 1..=3600".into());
        }
        Ok(())
    }

    /// The group roles for `scopes`, each once, in order of first appearance.
    fn groups_for(&self, scopes: &[Scope]) -> Result<Vec<&str>> {
        let mut groups: Vec<&str> = Vec::new();
        for scope in scopes {
            let Some(roles) = self.scope_roles.get(scope.as_str()) else {
                return Err(DestinationError::BadRequest(format!(
                    "scope {scope} is not offered by this destination"
                )));
            };
            for role in roles {
                if !groups.contains(&role.as_str()) {
                    groups.push(role);
                }
            }
        }
        Ok(groups)
    }
}

fn valid_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    let mut bytes = prefix.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok || prefix.len() > MAX_PREFIX_LEN {
        return Err(format!(
            "settings.role_prefix {prefix:?} must be 1-{MAX_PREFIX_LEN} characters of [a-z0-9_], not starting with a digit"
        ));
    }
    if prefix.starts_with("pg_") {
        return Err(format!(
            "settings.role_prefix {prefix:?} must not start with pg_ (reserved by PostgreSQL)"
        ));
    }
    Ok(())
}

/// Check a role name taken from settings (a group or the owner).
fn check_role_name(name: &str, prefix: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_IDENTIFIER_LEN {
        return Err(format!(
            "role name {name:?} must be 1-{MAX_IDENTIFIER_LEN} bytes"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "role name {name:?} must not contain control characters"
        ));
    }
    if name.starts_with("pg_") {
        return Err(format!(
            "role name {name:?} is a built-in role (pg_...); create a group role and grant it that instead"
        ));
    }
    if name.starts_with(prefix) {
        return Err(format!(
            "role name {name:?} starts with role_prefix {prefix:?}; roles with that prefix are dropped on revocation"
        ));
    }
    Ok(())
}

// === templates ===

/// Check a statement template: not empty, every `{{...}}` one of `allowed`, none inside
/// quotes.
fn check_template(template: &str, allowed: &[&str]) -> std::result::Result<(), String> {
    if template.trim().is_empty() {
        return Err("statement is empty".into());
    }
    if template.contains('\0') {
        return Err("statement contains a NUL byte".into());
    }
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let before = rest[..start].chars().next_back();
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("statement has a {{ without a closing }}".into());
        };
        let name = &after[..end];
        let next = after[end + 2..].chars().next();
        if name == "password" {
            return Err(
                "{{password}} is not available: the password never appears in statements".into(),
            );
        }
        if !allowed.contains(&name) {
            let list: Vec<String> = allowed.iter().map(|p| format!("{{{{{p}}}}}")).collect();
            return Err(format!(
                "unknown placeholder {{{{{name}}}}}; use one of {}",
                list.join(", ")
            ));
        }
        if matches!(before, Some('"' | '\'')) || matches!(next, Some('"' | '\'')) {
            return Err(format!(
                "placeholder {{{{{name}}}}} is quoted; placeholders expand to complete quoted tokens, so write {{{{{name}}}}} bare"
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// What the placeholders of a template expand to, each already quoted.
#[derive(Debug, Default)]
struct TemplateVars {
    name: String,
    grant_id: String,
    scopes: String,
    expiration: String,
}

/// Expand a template checked by [`check_template`]. The expansions hold no `{{`, so the
/// order of replacement does not matter.
fn render(template: &str, vars: &TemplateVars) -> String {
    template
        .replace("{{name}}", &vars.name)
        .replace("{{grant_id}}", &vars.grant_id)
        .replace("{{scopes}}", &vars.scopes)
        .replace("{{expiration}}", &vars.expiration)
}

// === quoting, names, passwords ===

/// `s` as a quoted SQL identifier: wrapped in `"`, with `"` doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `s` as a SQL string literal: wrapped in `'`, with `'` doubled, and in the `E'...'`
/// form with `\` doubled when it holds a backslash, so it means the same whatever
/// `standard_conforming_strings` is (PostgreSQL's own `quote_literal`).
pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// The role name for `grant`: `prefix` followed by the grant's 32 hex digits, lowercase.
/// With a prefix accepted by the settings it is at most 63 bytes of `[a-z0-9_]`.
pub fn role_name(prefix: &str, grant: &GrantId) -> String {
    let id = grant.as_str();
    let hex = id.strip_prefix("grt_").unwrap_or(id);
    format!("{prefix}{}", hex.to_ascii_lowercase())
}

/// Check a revocation handle before it goes into a statement: a role name as
/// [`role_name`] makes them.
fn check_handle(handle: &str) -> Result<&str> {
    let ok = !handle.is_empty()
        && handle.len() <= MAX_IDENTIFIER_LEN
        && !handle.starts_with("pg_")
        && handle
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(handle)
    } else {
        Err(upstream(
            format!("revocation handle {handle:?} is not a role name this destination creates"),
            false,
        ))
    }
}

/// The comment put on every role, naming its grant.
fn role_comment(grant: &GrantId) -> String {
    format!("lanyard grant {grant}")
}

/// A fresh password of [`PASSWORD_LEN`] characters of `[A-Za-z0-9]`, from the system's
/// CSPRNG.
///
/// # Errors
/// [`DestinationError::Mint`] if the random generator fails.
pub fn generate_password() -> Result<Secret> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while out.len() < PASSWORD_LEN {
        random(&mut buf)?;
        // 248 = 4 * 62: dropping bytes >= 248 makes every character equally likely.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == PASSWORD_LEN {
                break;
            }
            if let Some(c) = ALPHABET.get(usize::from(b % 62)) {
                out.push(char::from(*c));
            }
        }
    }
    Ok(Secret::new(out))
}

fn random(buf: &mut [u8]) -> Result<()> {
    aws_lc_rs::rand::fill(buf)
        .map_err(|_| DestinationError::Mint(MintError("the system random generator failed".into())))
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` with `salt` and
/// `iterations` (RFC 5802, RFC 7677):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64. `password` must
/// be unchanged by SASLprep (ASCII letters and digits are).
pub fn scram_sha256_verifier(password: &str, salt: &[u8], iterations: NonZeroU32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key.as_ref()),
        B64.encode(server_key.as_ref())
    )
}

/// A verifier for `password` with a fresh 16-byte salt.
fn new_verifier(password: &Secret) -> Result<String> {
    let mut salt = [0u8; 16];
    random(&mut salt)?;
    let iterations = NonZeroU32::new(SCRAM_ITERATIONS).unwrap_or(NonZeroU32::MIN);
    Ok(scram_sha256_verifier(password.expose(), &salt, iterations))
}

/// `t` as a PostgreSQL `timestamptz` literal body in UTC: `2030-01-02 03:04:05+00`.
fn pg_timestamp(t: UnixTime) -> Result<String> {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S+00").to_string())
        .ok_or_else(|| DestinationError::BadRequest(format!("expiry {t} is out of range")))
}

// === errors ===

/// Describe a sqlx error without secrets, and say whether a retry may help.
///
/// Statements are never included: PostgreSQL's errors carry its message, SQLSTATE and
/// detail, not the statement text.
fn describe(e: &sqlx::Error, connect_timeout_secs: u64) -> (String, bool) {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let mut msg = format!("{} (SQLSTATE {code})", db.message());
            if let Some(detail) = db
                .try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::detail)
            {
                msg.push_str(": ");
                msg.push_str(detail);
            }
            let retryable = retryable_sqlstate(&code);
            (msg, retryable)
        }
        sqlx::Error::PoolTimedOut => (
            format!(
                "no admin connection within {connect_timeout_secs}s (database unreachable or every connection busy)"
            ),
            true,
        ),
        sqlx::Error::Io(io) => (format!("connection to the database failed: {io}"), true),
        sqlx::Error::Tls(tls) => (format!("tls with the database failed: {tls}"), true),
        sqlx::Error::Protocol(p) => (format!("database protocol error: {p}"), true),
        sqlx::Error::PoolClosed => ("the admin connection pool is closed".into(), false),
        sqlx::Error::WorkerCrashed => ("the database connection worker crashed".into(), true),
        other => (other.to_string(), false),
    }
}

/// Whether a SQLSTATE names a condition that may pass: connection exceptions (08),
/// transaction rollback (40), insufficient resources (53), operator intervention
/// including statement timeouts (57), system errors (58), and lock timeouts (55P03).
fn retryable_sqlstate(code: &str) -> bool {
    ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "55P03"
}

// === impl PostgresDestination ===

/// A `postgres` destination: creates one login role per grant.
pub struct PostgresDestination {
    name: String,
    settings: PostgresSettings,
    admin: PgConnectOptions,
    /// Built on first use.
    ///
    /// ## Why not in `new`
    /// sqlx's pool spawns its maintenance task when built, which needs a Tokio runtime;
    /// `new` runs when config is loaded and must not care whether one is running.
    pool: OnceLock<PgPool>,
}

impl std::fmt::Debug for PostgresDestination {
    // Not derived: the admin connect options hold the admin password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDestination")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("admin_user", &self.admin.get_username())
            .field("admin_host", &self.admin.get_host())
            .field("admin_port", &self.admin.get_port())
            .finish_non_exhaustive()
    }
}

/// A role's row as renew and revoke need it.
struct RoleRow {
    can_login: bool,
    comment: Option<String>,
}

const ROLE_QUERY: &str =
    "SELECT rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1";

impl PostgresDestination {
    /// Build the adapter from its spec: validate the common settings and the `postgres`
    /// settings block, and read the admin URL. Connects to nothing: the first call does.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`], naming the admin URL's file or variable
    /// (never its contents) when it cannot be read or parsed.
    pub fn new(spec: &DestinationSpec) -> Result<Self> {
        if spec.kind != KIND {
            return Err(invalid(format!(
                "destination {} has kind {:?}, not {KIND:?}",
                spec.name, spec.kind
            )));
        }
        spec.validate()?;
        let settings = PostgresSettings::from_value(&spec.settings, &spec.scopes)?;
        let (url, source) = read_admin_url(&settings)?;
        let admin = PgConnectOptions::from_str(url.expose())
            .map_err(|e| {
                invalid(format!(
                    "the admin URL in {source} is not a valid postgres URL: {}",
                    redact(&e.to_string(), url.expose())
                ))
            })?
            .database(&settings.database)
            .application_name("lanyard")
            .options([(
                "statement_timeout",
                format!("{}s", settings.statement_timeout_secs),
            )])
            .disable_statement_logging();
        Ok(Self {
            name: spec.name.clone(),
            settings,
            admin,
            pool: OnceLock::new(),
        })
    }

    /// The parsed settings.
    pub fn settings(&self) -> &PostgresSettings {
        &self.settings
    }

    /// Close the admin connections, waiting for calls in flight.
    pub async fn close(&self) {
        if let Some(pool) = self.pool.get() {
            pool.close().await;
        }
    }

    fn pool(&self) -> &PgPool {
        self.pool.get_or_init(|| {
            PgPoolOptions::new()
                .max_connections(self.settings.pool_size)
                .acquire_timeout(Duration::from_secs(self.settings.connect_timeout_secs))
                .connect_lazy_with(self.admin.clone())
        })
    }

    /// Map a sqlx error in `step` for `role`; `retryable` overrides the error's own
    /// judgement when `Some`.
    fn sql_err(
        &self,
        step: &str,
        role: &str,
        e: &sqlx::Error,
        retryable: Option<bool>,
    ) -> DestinationError {
        let (msg, own) = describe(e, self.settings.connect_timeout_secs);
        upstream(
            format!("{step} for role {role}: {msg}"),
            retryable.unwrap_or(own),
        )
    }

    /// The role's row, if it exists.
    async fn role_row<'e, E>(&self, conn: E, role: &str) -> sqlx::Result<Option<RoleRow>>
    where
        E: sqlx::PgExecutor<'e>,
    {
        let row: Option<(bool, Option<String>)> = sqlx::query_as(ROLE_QUERY)
            .bind(role)
            .fetch_optional(conn)
            .await?;
        Ok(row.map(|(can_login, comment)| RoleRow { can_login, comment }))
    }

    /// Refuse to touch a role that lanyard did not create for `grant`.
    fn check_owned(&self, role: &str, row: &RoleRow, grant: &GrantId) -> Result<()> {
        let want = role_comment(grant);
        if row.comment.as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        Err(upstream(
            format!(
                "role {role} exists but its comment is {:?}, not {want:?}: it was not created by lanyard for this grant, so it is left alone",
                row.comment.as_deref().unwrap_or("")
            ),
            false,
        ))
    }

    /// `owner_role` quoted for SQL, and as shown in receipts.
    fn owner(&self) -> (String, String) {
        match &self.settings.owner_role {
            Some(owner) => (quote_ident(owner), owner.clone()),
            None => (
                "CURRENT_USER".to_owned(),
                self.admin.get_username().to_owned(),
            ),
        }
    }

    /// Run one statement (simple protocol, nothing cached or logged).
    async fn exec<'e, E>(conn: E, sql: String) -> sqlx::Result<()>
    where
        E: sqlx::PgExecutor<'e>,
    {
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
        Ok(())
    }

    async fn revoke_role(&self, role: &str, grant: &GrantId) -> Result<RevokeOutcome> {
        let pool = self.pool();
        let q = quote_ident(role);
        // Every failure is retryable: each step is idempotent and the next attempt
        // resumes the sequence.
        let fail = |step: &str, e: &sqlx::Error| self.sql_err(step, role, e, Some(true));

        let Some(row) = self
            .role_row(pool, role)
            .await
            .map_err(|e| fail("revoke: look up role", &e))?
        else {
            return Ok(RevokeOutcome::Revoked {
                detail: format!("role {role} already gone"),
            });
        };
        self.check_owned(role, &row, grant)?;
        let mut done: Vec<String> = Vec::new();

        Self::exec(pool, format!("ALTER ROLE {q} NOLOGIN"))
            .await
            .map_err(|e| fail("revoke: ALTER ROLE NOLOGIN", &e))?;
        done.push("login disabled (NOLOGIN)".into());

        let statement_ms = i64::try_from(self.settings.statement_timeout_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX);
        let wait_ms = TERMINATE_WAIT_MS.min(statement_ms / 4);
        let ended: Vec<Option<bool>> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity WHERE usename = $1",
        )
        .bind(role)
        .bind(wait_ms)
        .fetch_all(pool)
        .await
        .map_err(|e| fail("revoke: pg_terminate_backend", &e))?;
        let terminated = ended.iter().filter(|r| **r == Some(true)).count();
        let lingering = ended.len() - terminated;
        let mut sessions = format!(
            "{terminated} session{} terminated",
            if terminated == 1 { "" } else { "s" }
        );
        if lingering > 0 {
            sessions.push_str(&format!(
                " ({lingering} signalled but still exiting after {wait_ms} ms)"
            ));
        }
        done.push(sessions);

        if !self.settings.revocation_statements.is_empty() {
            let vars = TemplateVars {
                name: q.clone(),
                grant_id: quote_literal(grant.as_str()),
                ..TemplateVars::default()
            };
            let mut tx = pool
                .begin()
                .await
                .map_err(|e| fail("revoke: BEGIN (revocation_statements)", &e))?;
            for (i, t) in self.settings.revocation_statements.iter().enumerate() {
                Self::exec(&mut *tx, render(t, &vars))
                    .await
                    .map_err(|e| fail(&format!("revoke: revocation_statements[{i}]"), &e))?;
            }
            tx.commit()
                .await
                .map_err(|e| fail("revoke: COMMIT (revocation_statements)", &e))?;
            let n = self.settings.revocation_statements.len();
            done.push(format!(
                "{n} revocation statement{} run",
                if n == 1 { "" } else { "s" }
            ));
        }

        let (owner_sql, owner_shown) = self.owner();
        // One simple-protocol string: both statements commit together.
        Self::exec(
            pool,
            format!("REASSIGN OWNED BY {q} TO {owner_sql}; DROP OWNED BY {q}"),
        )
        .await
        .map_err(|e| fail("revoke: REASSIGN OWNED / DROP OWNED", &e))?;
        done.push(format!(
            "objects reassigned to {owner_shown} and remaining privileges dropped in database {}",
            self.settings.database
        ));

        Self::exec(pool, format!("DROP ROLE IF EXISTS {q}"))
            .await
            .map_err(|e| fail("revoke: DROP ROLE", &e))?;
        done.push("role dropped".into());

        tracing::info!(destination = %self.name, role, "postgres role revoked");
        Ok(RevokeOutcome::Revoked {
            detail: format!("role {role}: {}", done.join("; ")),
        })
    }
}

/// Read the admin URL named by the settings. Returns it and where it came from, for
/// messages.
fn read_admin_url(settings: &PostgresSettings) -> Result<(Secret, String)> {
    let (raw, source) = match (&settings.admin_url_file, &settings.admin_url_env) {
        (Some(path), _) => {
            let source = format!("admin_url_file {}", path.display());
            // Owner-only, checked on the open file; errors never quote the contents.
            let text = lanyard_destination::read_secret_file(
                KIND,
                "admin_url_file",
                &path.to_string_lossy(),
            )?
            .expose()
            .to_owned();
            (text, source)
        }
        (None, Some(var)) => {
            let source = format!("admin_url_env {var}");
            let text = std::env::var(var).map_err(|e| {
                invalid(match e {
                    std::env::VarError::NotPresent => format!("{source} is not set"),
                    std::env::VarError::NotUnicode(_) => format!("{source} is not valid UTF-8"),
                })
            })?;
            (text, source)
        }
        (None, None) => {
            return Err(invalid(
                "settings needs admin_url_file or admin_url_env".into(),
            ));
        }
    };
    let url = raw.trim();
    if url.is_empty() {
        return Err(invalid(format!("{source} is empty")));
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(format!("{source} does not hold a postgres:// URL")));
    }
    Ok((Secret::new(url), source))
}

/// `text` with `url`, and the password in it, replaced.
fn redact(text: &str, url: &str) -> String {
    let mut out = text.replace(url, "<admin url>");
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw)
        .unwrap_or_default();
    if !password.is_empty() {
        out = out.replace(password, "<redacted>");
    }
    out
}

#[async_trait]
impl Destination for PostgresDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn revocability(&self) -> Revocability {
        Revocability::Immediate
    }

    /// An expired grant's role stays (unable to log in with its password, sessions
    /// still open) until it is revoked, so lanyard revokes it once the grant expires.
    fn revoke_at_expiry(&self) -> bool {
        true
    }

    async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued> {
        let role = role_name(&self.settings.role_prefix, req.grant_id);
        let q = quote_ident(&role);
        let groups = self.settings.groups_for(req.scopes)?;
        let expires_at = req.now.saturating_add(req.ttl.as_secs_i64());
        let until = quote_literal(&pg_timestamp(expires_at)?);
        let password = generate_password()?;
        let verifier = quote_literal(&new_verifier(&password)?);
        let fail = |step: &str, e: &sqlx::Error| self.sql_err(step, &role, e, None);

        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| fail("issue: BEGIN", &e))?;
        let create = format!(
            "CREATE ROLE {q} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE \
             NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {} PASSWORD {verifier} VALID UNTIL {until}",
            self.settings.max_connections_per_role
        );
        if let Err(e) = Self::exec(&mut *tx, create).await {
            if let sqlx::Error::Database(db) = &e
                && db.code().as_deref() == Some("42710")
            {
                return Err(upstream(
                    format!(
                        "issue: role {role} already exists: grant {} was issued before; revoke it instead of issuing again",
                        req.grant_id
                    ),
                    false,
                ));
            }
            return Err(fail("issue: CREATE ROLE", &e));
        }
        Self::exec(
            &mut *tx,
            format!(
                "COMMENT ON ROLE {q} IS {}",
                quote_literal(&role_comment(req.grant_id))
            ),
        )
        .await
        .map_err(|e| fail("issue: COMMENT ON ROLE", &e))?;
        for group in &groups {
            Self::exec(&mut *tx, format!("GRANT {} TO {q}", quote_ident(group)))
                .await
                .map_err(|e| fail(&format!("issue: GRANT {group:?}"), &e))?;
        }
        if !self.settings.creation_statements.is_empty() {
            let scopes: Vec<&str> = req.scopes.iter().map(Scope::as_str).collect();
            let vars = TemplateVars {
                name: q.clone(),
                grant_id: quote_literal(req.grant_id.as_str()),
                scopes: quote_literal(&scopes.join(",")),
                expiration: until.clone(),
            };
            for (i, t) in self.settings.creation_statements.iter().enumerate() {
                Self::exec(&mut *tx, render(t, &vars))
                    .await
                    .map_err(|e| fail(&format!("issue: creation_statements[{i}]"), &e))?;
            }
        }
        tx.commit().await.map_err(|e| fail("issue: COMMIT", &e))?;
        tracing::info!(destination = %self.name, role, groups = ?groups, expires_at, "postgres role created");
        Ok(Issued {
            credential: Credential::Database {
                host: self.settings.host.clone(),
                port: self.settings.port,
                database: self.settings.database.clone(),
                username: role.clone(),
                password,
            },
            expires_at,
            revocation_handle: role,
        })
    }

    /// Set a new password and `VALID UNTIL` on the grant's existing role.
    async fn renew(&self, req: IssueRequest<'_>, previous_handle: &str) -> Result<Issued> {
        let role = check_handle(previous_handle)?.to_owned();
        let q = quote_ident(&role);
        let expires_at = req.now.saturating_add(req.ttl.as_secs_i64());
        let until = quote_literal(&pg_timestamp(expires_at)?);
        let password = generate_password()?;
        let verifier = quote_literal(&new_verifier(&password)?);
        let fail = |step: &str, e: &sqlx::Error| self.sql_err(step, &role, e, None);

        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| fail("renew: BEGIN", &e))?;
        let Some(row) = self
            .role_row(&mut *tx, &role)
            .await
            .map_err(|e| fail("renew: look up role", &e))?
        else {
            return Err(upstream(
                format!("renew: role {role} no longer exists; exchange again"),
                false,
            ));
        };
        self.check_owned(&role, &row, req.grant_id)?;
        if !row.can_login {
            return Err(upstream(
                format!(
                    "renew: role {role} cannot log in (a revocation has begun); exchange again"
                ),
                false,
            ));
        }
        Self::exec(
            &mut *tx,
            format!("ALTER ROLE {q} WITH PASSWORD {verifier} VALID UNTIL {until}"),
        )
        .await
        .map_err(|e| fail("renew: ALTER ROLE", &e))?;
        tx.commit().await.map_err(|e| fail("renew: COMMIT", &e))?;
        tracing::info!(destination = %self.name, role, expires_at, "postgres role renewed");
        Ok(Issued {
            credential: Credential::Database {
                host: self.settings.host.clone(),
                port: self.settings.port,
                database: self.settings.database.clone(),
                username: role.clone(),
                password,
            },
            expires_at,
            revocation_handle: role,
        })
    }

    /// Disable, disconnect and drop the role; see the crate docs for the steps.
    async fn revoke(&self, req: RevokeRequest<'_>) -> Result<RevokeOutcome> {
        let role = check_handle(req.revocation_handle)?;
        self.revoke_role(role, req.grant_id).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn offered() -> Vec<String> {
        vec!["db:read".into(), "db:write".into()]
    }

    fn base() -> Value {
        json!({
            "host": "db.internal", "database": "orders",
            "admin_url_file": "/run/secrets/admin-url",
            "scope_roles": {"db:read": ["app_readonly"], "db:write": ["app_readwrite", "app readonly \"x\""]}
        })
    }

    fn with(mut v: Value, key: &str, val: Value) -> Value {
        v[key] = val;
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        if let Some(m) = v.as_object_mut() {
            m.remove(key);
        }
        v
    }

    #[test]
    fn settings_defaults() {
        let s = PostgresSettings::from_value(&base(), &offered()).unwrap();
        assert_eq!(s.port, 5432);
        assert_eq!(s.role_prefix, "lanyard_");
        assert_eq!(s.max_connections_per_role, 10);
        assert_eq!(s.pool_size, 4);
        assert_eq!(s.connect_timeout_secs, 5);
        assert_eq!(s.statement_timeout_secs, 30);
        assert_eq!(s.owner_role, None);
        assert!(s.creation_statements.is_empty());
        let env = with(
            without(base(), "admin_url_file"),
            "admin_url_env",
            json!("ORDERS_DB_ADMIN_URL"),
        );
        PostgresSettings::from_value(&env, &offered()).unwrap();
    }

    #[test]
    fn settings_validation() {
        let cases = [
            (json!(null), "missing field `host`"),
            (json!("x"), "invalid type"),
            (with(base(), "bogus", json!(1)), "unknown field `bogus`"),
            (with(base(), "host", json!(" ")), "settings.host"),
            (with(base(), "port", json!(0)), "settings.port"),
            (with(base(), "port", json!(70000)), "invalid value"),
            (with(base(), "database", json!("")), "settings.database"),
            (without(base(), "admin_url_file"), "needs admin_url_file"),
            (with(base(), "admin_url_env", json!("X")), "are exclusive"),
            (
                with(
                    without(base(), "admin_url_file"),
                    "admin_url_env",
                    json!("1BAD"),
                ),
                "not an environment variable name",
            ),
            (
                with(base(), "scope_roles", json!({"db:read": ["a"]})),
                "no entry for offered scope \"db:write\"",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": [], "db:write": [], "db:admin": []}),
                ),
                "does not offer",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": [""], "db:write": []}),
                ),
                "must be 1-63 bytes",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": ["a".repeat(64)], "db:write": []}),
                ),
                "must be 1-63 bytes",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": ["bad\nname"], "db:write": []}),
                ),
                "control characters",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": ["pg_write_server_files"], "db:write": []}),
                ),
                "built-in role",
            ),
            (
                with(
                    base(),
                    "scope_roles",
                    json!({"db:read": ["lanyard_group"], "db:write": []}),
                ),
                "starts with role_prefix",
            ),
            (
                with(base(), "owner_role", json!("pg_monitor")),
                "owner_role",
            ),
            (with(base(), "role_prefix", json!("")), "role_prefix"),
            (with(base(), "role_prefix", json!("Up_")), "role_prefix"),
            (with(base(), "role_prefix", json!("1x_")), "role_prefix"),
            (with(base(), "role_prefix", json!("pg_x_")), "reserved"),
            (
                with(base(), "role_prefix", json!("a".repeat(32))),
                "1-31 characters",
            ),
            (
                with(base(), "max_connections_per_role", json!(0)),
                "max_connections_per_role",
            ),
            (with(base(), "pool_size", json!(0)), "pool_size"),
            (
                with(base(), "connect_timeout_secs", json!(0)),
                "connect_timeout_secs",
            ),
            (
                with(base(), "statement_timeout_secs", json!(99999)),
                "statement_timeout_secs",
            ),
            (
                with(base(), "creation_statements", json!(["  "])),
                "creation_statements[0]: statement is empty",
            ),
            (
                with(
                    base(),
                    "creation_statements",
                    json!(["GRANT x TO \"{{name}}\""]),
                ),
                "is quoted",
            ),
            (
                with(
                    base(),
                    "creation_statements",
                    json!(["ALTER ROLE {{name}} PASSWORD '{{password}}'"]),
                ),
                "{{password}} is not available",
            ),
            (
                with(base(), "creation_statements", json!(["SELECT {{nope}}"])),
                "unknown placeholder {{nope}}",
            ),
            (
                with(base(), "creation_statements", json!(["SELECT {{name"])),
                "without a closing",
            ),
            (
                with(
                    base(),
                    "revocation_statements",
                    json!(["SELECT {{scopes}}"]),
                ),
                "revocation_statements[0]: unknown placeholder {{scopes}}",
            ),
        ];
        for (value, want) in cases {
            let err = PostgresSettings::from_value(&value, &offered()).unwrap_err();
            assert!(
                matches!(err, DestinationError::InvalidSettings { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(want), "{value}: {msg}");
            assert!(
                msg.starts_with("invalid settings for destination kind postgres"),
                "{msg}"
            );
        }
    }

    #[test]
    fn quoting_is_injection_proof() {
        assert_eq!(quote_ident("app_readonly"), "\"app_readonly\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("x\"; DROP ROLE admin; --"),
            "\"x\"\"; DROP ROLE admin; --\""
        );
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
    }

    #[test]
    fn role_names_come_from_the_grant() {
        let g = GrantId::generate();
        let name = role_name("lanyard_", &g);
        assert_eq!(name.len(), "lanyard_".len() + 32);
        assert!(name.ends_with(&g.as_str()[4..]));
        assert_eq!(name, role_name("lanyard_", &g), "deterministic");
        assert_ne!(name, role_name("lanyard_", &GrantId::generate()));
        let upper = GrantId::parse("grt_0190ABCDEF0123456789ABCDEF012345").unwrap();
        let longest = role_name(&"p".repeat(MAX_PREFIX_LEN), &upper);
        assert_eq!(longest.len(), MAX_IDENTIFIER_LEN);
        assert!(longest.ends_with("0190abcdef0123456789abcdef012345"));
        assert!(check_handle(&longest).is_ok());
        for bad in ["", "Lanyard_x", "a\"b", "pg_x", &"a".repeat(64), "a b"] {
            assert!(check_handle(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn templates_expand_to_quoted_tokens() {
        let t = "GRANT SELECT ON t TO {{name}}; COMMENT ON ROLE {{name}} IS {{scopes}}; SELECT {{expiration}}, {{grant_id}}";
        check_template(t, CREATION_PLACEHOLDERS).unwrap();
        let vars = TemplateVars {
            name: quote_ident("lanyard_ab"),
            grant_id: quote_literal("grt_ab"),
            scopes: quote_literal("db:read,db:write"),
            expiration: quote_literal("2030-01-02 03:04:05+00"),
        };
        assert_eq!(
            render(t, &vars),
            "GRANT SELECT ON t TO \"lanyard_ab\"; COMMENT ON ROLE \"lanyard_ab\" IS 'db:read,db:write'; SELECT '2030-01-02 03:04:05+00', 'grt_ab'"
        );
        assert!(check_template("SELECT '{{expiration}}'", CREATION_PLACEHOLDERS).is_err());
        assert!(check_template("SELECT {{ name }}", CREATION_PLACEHOLDERS).is_err());
        check_template("SELECT '{' || '{'", CREATION_PLACEHOLDERS).unwrap();
    }

    #[test]
    fn passwords_are_long_random_alphanumerics() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.expose().bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn scram_verifier_matches_postgres() {
        // PostgreSQL 15 with password_encryption = scram-sha-256:
        // CREATE ROLE v PASSWORD 'pencil'; SELECT rolpassword FROM pg_authid ...
        let want = "SCRAM-SHA-256$4096:y62B5eIjZ6RZ104IfDwoYQ==$7q34dYM2mJYTOIFfuwC5lro4U6gPvGxeDM3UDQG3WZ8=:iB+a1nmDhHjyPQ8wDhLoqhmSlmTGCw1IDGXSj2s8t8o=";
        let salt = B64.decode("y62B5eIjZ6RZ104IfDwoYQ==").unwrap();
        let got = scram_sha256_verifier("pencil", &salt, NonZeroU32::new(4096).unwrap());
        assert_eq!(got, want);
        let fresh = new_verifier(&Secret::new("pencil")).unwrap();
        assert!(fresh.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!fresh.contains("pencil"));
        assert_ne!(fresh, want, "fresh salt");
    }

    #[test]
    fn timestamps_and_errors() {
        assert_eq!(pg_timestamp(0).unwrap(), "1970-01-01 00:00:00+00");
        assert!(pg_timestamp(i64::MAX).is_err());
        assert!(retryable_sqlstate("08006"));
        assert!(retryable_sqlstate("57014"));
        assert!(retryable_sqlstate("40001"));
        assert!(!retryable_sqlstate("42501"));
        assert!(!retryable_sqlstate("28P01"));
        let (msg, retry) = describe(&sqlx::Error::PoolTimedOut, 3);
        assert!(retry);
        assert!(msg.contains("3s"), "{msg}");
    }

    #[test]
    fn redaction_hides_the_admin_password() {
        let url = "postgres://admin:s3cr%40t@db:5432/x";
        assert_eq!(redact(&format!("bad {url}"), url), "bad <admin url>");
        assert_eq!(redact("saw s3cr%40t", url), "saw <redacted>");
        assert_eq!(redact("nothing", "postgres://db/x"), "nothing");
    }

    fn spec(settings: Value) -> DestinationSpec {
        serde_json::from_value(json!({
            "name": "orders-db", "kind": "postgres", "scopes": ["db:read", "db:write"],
            "settings": settings
        }))
        .unwrap()
    }

    #[test]
    fn new_reads_the_admin_url_without_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "postgres://admin:hunter2@127.0.0.1:1/other\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let d =
            PostgresDestination::new(&spec(with(base(), "admin_url_file", json!(path)))).unwrap();
        assert_eq!(d.kind(), KIND);
        assert_eq!(d.revocability(), Revocability::Immediate);
        assert_eq!(d.admin.get_database(), Some("orders"));
        let debug = format!("{d:?}");
        assert!(!debug.contains("hunter2"), "{debug}");

        let missing = dir.path().join("missing");
        let err = PostgresDestination::new(&spec(with(base(), "admin_url_file", json!(missing))))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("not found"), "{err}");

        std::fs::write(&path, "mysql://admin:hunter2@db/x").unwrap();
        let err = PostgresDestination::new(&spec(with(base(), "admin_url_file", json!(path))))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold a postgres:// URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        std::fs::write(&path, "postgres://admin:hunter2@db:notaport/x").unwrap();
        let err = PostgresDestination::new(&spec(with(base(), "admin_url_file", json!(path))))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid postgres URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        let mut wrong = spec(base());
        wrong.kind = "jwt".into();
        assert!(PostgresDestination::new(&wrong).is_err());
    }
}
