//! Settings plumbing shared by the adapters that call a destination over HTTP: parsing a
//! `settings` block, the checks every adapter makes (ranges, free text, words), the five
//! tuning settings every HTTP adapter has ([`Tuning`]: `timeout_secs`,
//! `max_response_bytes`, `max_attempts`, `breaker_threshold`, `breaker_cooldown_secs`)
//! with their defaults and ranges, and the client, circuit breaker and retry policy
//! built from them ([`Plumbing`]).
//!
//! Every error is [`DestinationError::InvalidSettings`] for the adapter's `kind`, its
//! message naming the setting as `settings.<field>`.
//!
//! An adapter's settings struct keeps the tuning fields itself (serde's `flatten` does
//! not work with `deny_unknown_fields`), with the defaults of this module:
//! ```text
//! #[serde(default = "lanyard_destination::settings::default_timeout_secs")]
//! pub timeout_secs: u64,
//! ```
//! and hands them over with [`tuning!`](crate::tuning).

use std::time::Duration;

use lanyard_core::SharedClock;
use reqwest::{Client, Url};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::http::{self, CircuitBreaker, ClientSettings, RetryPolicy};
use crate::{DestinationError, DestinationSpec, Result};

/// Default `timeout_secs`.
pub fn default_timeout_secs() -> u64 {
    10
}
/// Default `max_response_bytes` (1 MiB).
pub fn default_max_response_bytes() -> usize {
    1 << 20
}
/// Default `max_attempts`.
pub fn default_max_attempts() -> u32 {
    2
}
/// Default `breaker_threshold`.
pub fn default_breaker_threshold() -> u32 {
    5
}
/// Default `breaker_cooldown_secs`.
pub fn default_breaker_cooldown_secs() -> u64 {
    30
}

/// First backoff between attempts.
pub const RETRY_BASE_DELAY: Duration = Duration::from_millis(200);
/// Longest backoff between attempts.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

/// An [`DestinationError::InvalidSettings`] for `kind`.
pub fn invalid(kind: &str, message: String) -> DestinationError {
    DestinationError::InvalidSettings {
        kind: kind.to_owned(),
        message,
    }
}

/// `s` cut to 80 characters, to quote a bad value in a message.
pub fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Check that `spec` is of `kind` and its common settings are valid.
///
/// # Errors
/// [`DestinationError::InvalidSettings`].
pub fn check_spec(kind: &str, spec: &DestinationSpec) -> Result<()> {
    if spec.kind != kind {
        return Err(invalid(
            kind,
            format!(
                "destination {} has kind {:?}, not {kind:?}",
                spec.name, spec.kind
            ),
        ));
    }
    spec.validate()
}

/// Parse a `settings` block (`null` is an empty one) as `T`.
///
/// # Errors
/// [`DestinationError::InvalidSettings`] with serde's message (unknown or missing
/// fields, wrong types).
pub fn parse<T: DeserializeOwned>(kind: &str, settings: &Value) -> Result<T> {
    let value = match settings {
        Value::Null => Value::Object(Map::new()),
        other => other.clone(),
    };
    serde_json::from_value(value).map_err(|e| invalid(kind, format!("settings: {e}")))
}

/// [`http::check_endpoint`] for the setting `field`.
///
/// # Errors
/// [`DestinationError::InvalidSettings`] `settings.<field>: <why>`.
pub fn check_endpoint(kind: &str, field: &str, url: &str) -> Result<Url> {
    http::check_endpoint(url).map_err(|m| invalid(kind, format!("settings.{field}: {m}")))
}

/// Check `lo <= v <= hi`.
///
/// # Errors
/// [`DestinationError::InvalidSettings`] `settings.<field> must be lo..=hi, not v`.
pub fn check_range(kind: &str, field: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    if v < lo || v > hi {
        return Err(invalid(
            kind,
            format!("settings.{field} must be {lo}..={hi}, not {v}"),
        ));
    }
    Ok(())
}

/// Check free text: not blank, at most `max` bytes, no control characters.
///
/// # Errors
/// [`DestinationError::InvalidSettings`].
pub fn check_text(kind: &str, field: &str, v: &str, max: usize) -> Result<()> {
    if v.trim().is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(invalid(
            kind,
            format!("settings.{field} must be 1-{max} characters without control characters"),
        ));
    }
    Ok(())
}

/// The first scope `spec` offers that `map` (lanyard scope -> what it stands for at the
/// destination) has no entry for, if the map is in use at all (not empty).
pub fn first_unmapped_scope<'a, V>(
    spec: &'a DestinationSpec,
    map: &std::collections::BTreeMap<String, V>,
) -> Option<&'a str> {
    if map.is_empty() {
        return None;
    }
    spec.scopes
        .iter()
        .find(|s| !map.contains_key(s.as_str()))
        .map(String::as_str)
}

/// Check a word: not empty, at most `max` bytes, no whitespace or control characters.
///
/// # Errors
/// [`DestinationError::InvalidSettings`].
pub fn check_word(kind: &str, field: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            kind,
            format!("settings.{field} must be 1-{max} characters without whitespace"),
        ));
    }
    Ok(())
}

/// The tuning settings every HTTP adapter has. Build it from a settings struct with
/// [`tuning!`](crate::tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Per-request timeout, seconds, 1..=120.
    pub timeout_secs: u64,
    /// Largest answer read, bytes, 1024..=16 MiB.
    pub max_response_bytes: usize,
    /// Attempts per call, 1..=5.
    pub max_attempts: u32,
    /// Retryable failures in a row that open the breaker, 1..=1000.
    pub breaker_threshold: u32,
    /// How long the breaker stays open, seconds, 1..=3600.
    pub breaker_cooldown_secs: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            timeout_secs: default_timeout_secs(),
            max_response_bytes: default_max_response_bytes(),
            max_attempts: default_max_attempts(),
            breaker_threshold: default_breaker_threshold(),
            breaker_cooldown_secs: default_breaker_cooldown_secs(),
        }
    }
}

/// A [`Tuning`] from the same-named fields of a settings struct (`$s.timeout_secs`...).
#[macro_export]
macro_rules! tuning {
    ($s:expr) => {
        $crate::settings::Tuning {
            timeout_secs: $s.timeout_secs,
            max_response_bytes: $s.max_response_bytes,
            max_attempts: $s.max_attempts,
            breaker_threshold: $s.breaker_threshold,
            breaker_cooldown_secs: $s.breaker_cooldown_secs,
        }
    };
}

/// What an HTTP adapter calls its destination with.
#[derive(Debug)]
pub struct Plumbing {
    /// The client: no redirects, the tuning's timeout, the given proxy or none.
    pub client: Client,
    /// The circuit breaker.
    pub breaker: CircuitBreaker,
    /// Retries: `max_attempts`, backoff [`RETRY_BASE_DELAY`] doubling to
    /// [`RETRY_MAX_DELAY`].
    pub retry: RetryPolicy,
}

impl Tuning {
    /// Check the ranges, in the order the adapters document them.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] for `kind`.
    pub fn check(&self, kind: &str) -> Result<()> {
        check_range(kind, "timeout_secs", self.timeout_secs, 1, 120)?;
        check_range(
            kind,
            "max_response_bytes",
            u64::try_from(self.max_response_bytes).unwrap_or(u64::MAX),
            1024,
            16 << 20,
        )?;
        check_range(kind, "max_attempts", u64::from(self.max_attempts), 1, 5)?;
        check_range(
            kind,
            "breaker_threshold",
            u64::from(self.breaker_threshold),
            1,
            1000,
        )?;
        check_range(
            kind,
            "breaker_cooldown_secs",
            self.breaker_cooldown_secs,
            1,
            3600,
        )
    }

    /// The retry policy.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base_delay: RETRY_BASE_DELAY,
            max_delay: RETRY_MAX_DELAY,
        }
    }

    /// A circuit breaker named `name` (`destination <name>`, in its fail-fast message).
    pub fn breaker(&self, name: &str, clock: SharedClock) -> CircuitBreaker {
        CircuitBreaker::new(
            name,
            self.breaker_threshold,
            Duration::from_secs(self.breaker_cooldown_secs),
            clock,
        )
    }

    /// The client, through `proxy` if one is given.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] if the client cannot be built.
    pub fn client(&self, kind: &str, proxy: Option<Url>) -> Result<Client> {
        let mut s = ClientSettings::new(Duration::from_secs(self.timeout_secs));
        s.proxy = proxy;
        http::build_client(kind, &s)
    }

    /// Client, breaker (named `breaker_name`, reading `clock`) and retry policy.
    ///
    /// # Errors
    /// [`DestinationError::InvalidSettings`] if the client cannot be built.
    pub fn plumbing(
        &self,
        kind: &str,
        breaker_name: &str,
        clock: SharedClock,
        proxy: Option<Url>,
    ) -> Result<Plumbing> {
        Ok(Plumbing {
            client: self.client(kind, proxy)?,
            breaker: self.breaker(breaker_name, clock),
            retry: self.retry(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_defaults_and_ranges() {
        let t = Tuning::default();
        t.check("x").unwrap();
        assert_eq!(t.max_response_bytes, 1 << 20);
        for (t, want) in [
            (
                Tuning {
                    timeout_secs: 0,
                    ..t
                },
                "settings.timeout_secs must be 1..=120, not 0",
            ),
            (
                Tuning {
                    max_response_bytes: 10,
                    ..t
                },
                "settings.max_response_bytes must be 1024..=16777216, not 10",
            ),
            (
                Tuning {
                    max_attempts: 6,
                    ..t
                },
                "settings.max_attempts must be 1..=5, not 6",
            ),
            (
                Tuning {
                    breaker_threshold: 0,
                    ..t
                },
                "settings.breaker_threshold must be 1..=1000",
            ),
            (
                Tuning {
                    breaker_cooldown_secs: 4000,
                    ..t
                },
                "settings.breaker_cooldown_secs must be 1..=3600",
            ),
        ] {
            let msg = t.check("x").unwrap_err().to_string();
            assert!(
                msg.starts_with("invalid settings for destination kind x: "),
                "{msg}"
            );
            assert!(msg.contains(want), "{msg}");
        }
        let r = t.retry();
        assert_eq!(
            (r.max_attempts, r.base_delay, r.max_delay),
            (2, RETRY_BASE_DELAY, RETRY_MAX_DELAY)
        );
    }

    #[test]
    fn text_and_word() {
        check_text("x", "f", "a b", 8).unwrap();
        assert!(
            check_text("x", "f", " ", 8)
                .unwrap_err()
                .to_string()
                .contains("settings.f must be 1-8 characters without control characters")
        );
        check_word("x", "f", "ab", 8).unwrap();
        assert!(
            check_word("x", "f", "a b", 8)
                .unwrap_err()
                .to_string()
                .contains("settings.f must be 1-8 characters without whitespace")
        );
        assert!(check_word("x", "f", "abcdefghi", 8).is_err());
    }
}
