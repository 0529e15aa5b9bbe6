//! Fetching issuer keys over HTTP: OIDC discovery, JWKS URLs, the https-only rule, the
//! response size cap and the `Cache-Control` lifetime.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::{ACCEPT, CACHE_CONTROL, HeaderMap};
use reqwest::{Client, Url, redirect};
use serde_json::Value;

use crate::config::{IssuerConfig, KeySource};
use crate::jwk::{self, JwkRejection, VerifyingKey};
use crate::verifier::VerifierSettings;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Why fetching an issuer's keys failed. The text goes into the issuer's status and
/// logs; it names configured or discovered URLs, never key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("url `{0}` is not a valid http(s) url")]
    BadUrl(String),
    #[error("url `{0}` is refused: https is required except for loopback hosts")]
    Insecure(String),
    #[error("request to `{url}` timed out")]
    Timeout { url: String },
    #[error("request to `{url}` failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("`{url}` answered http {status}")]
    Status { url: String, status: u16 },
    #[error("response from `{url}` exceeds {max} bytes")]
    TooLarge { url: String, max: usize },
    #[error("response from `{url}` is not valid json")]
    Json { url: String },
    #[error("discovery document at `{url}`: {why}")]
    Discovery { url: String, why: &'static str },
    #[error("jwks at `{url}`: {why}")]
    Jwks { url: String, why: &'static str },
    #[error("inline keys are not fetched")]
    Inline,
}

/// Keys fetched from an issuer and how long they may be cached.
pub(crate) struct FetchedKeys {
    pub(crate) keys: Vec<VerifyingKey>,
    pub(crate) ttl: Duration,
}

/// The shared HTTP client: a total timeout and redirects only to allowed URLs.
pub(crate) fn build_client(settings: &VerifierSettings) -> Result<Client, reqwest::Error> {
    let allow_http = settings.allow_http;
    let policy = redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if check_url(attempt.url().as_str(), allow_http).is_err() {
            attempt.error("redirect to a url that is not allowed")
        } else {
            attempt.follow()
        }
    });
    Client::builder()
        .timeout(settings.http_timeout)
        .connect_timeout(settings.http_timeout)
        .redirect(policy)
        .user_agent(concat!("lanyard-trust/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Accept `https`, and `http` only to loopback hosts unless `allow_http`.
pub(crate) fn check_url(url: &str, allow_http: bool) -> Result<Url, FetchError> {
    let parsed = Url::parse(url).map_err(|_| FetchError::BadUrl(url.to_owned()))?;
    if parsed.host().is_none() {
        return Err(FetchError::BadUrl(url.to_owned()));
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_http || is_loopback(&parsed) => Ok(parsed),
        "http" => Err(FetchError::Insecure(url.to_owned())),
        _ => Err(FetchError::BadUrl(url.to_owned())),
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

/// Fetch an issuer's keys from its discovery document or JWKS URL.
pub(crate) async fn fetch_keys(
    http: &Client,
    settings: &VerifierSettings,
    issuer: &IssuerConfig,
) -> Result<FetchedKeys, FetchError> {
    let jwks_url = match &issuer.keys {
        KeySource::Discovery { url } => {
            let doc_url = KeySource::discovery_document_url(url);
            let (body, _) = get_capped(http, settings, &doc_url).await?;
            let doc: Value = serde_json::from_slice(&body).map_err(|_| FetchError::Json {
                url: doc_url.clone(),
            })?;
            let discovered = |why| FetchError::Discovery {
                url: doc_url.clone(),
                why,
            };
            let iss = doc
                .get("issuer")
                .and_then(Value::as_str)
                .ok_or_else(|| discovered("has no `issuer`"))?;
            if iss != issuer.issuer_url {
                return Err(discovered(
                    "`issuer` does not equal the configured issuer_url",
                ));
            }
            doc.get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or_else(|| discovered("has no `jwks_uri`"))?
                .to_owned()
        }
        KeySource::JwksUrl { url } => url.clone(),
        KeySource::InlineJwks { .. } => return Err(FetchError::Inline),
    };
    let (body, headers) = get_capped(http, settings, &jwks_url).await?;
    let doc: Value = serde_json::from_slice(&body).map_err(|_| FetchError::Json {
        url: jwks_url.clone(),
    })?;
    let parsed = jwk::parse_jwks(&doc).map_err(|why| FetchError::Jwks {
        url: jwks_url.clone(),
        why,
    })?;
    for (kid, why) in &parsed.rejected {
        match why {
            JwkRejection::Symmetric => tracing::warn!(
                issuer = %issuer.name, kid = ?kid,
                "issuer jwks holds a symmetric (oct) key; refused"
            ),
            other => tracing::debug!(
                issuer = %issuer.name, kid = ?kid, reason = other.describe(),
                "issuer jwks key skipped"
            ),
        }
    }
    Ok(FetchedKeys {
        keys: parsed.keys,
        ttl: cache_ttl(&headers, settings),
    })
}

/// GET `url` and read at most `max_jwks_bytes` of its body.
async fn get_capped(
    http: &Client,
    settings: &VerifierSettings,
    url: &str,
) -> Result<(Vec<u8>, HeaderMap), FetchError> {
    let parsed = check_url(url, settings.allow_http)?;
    let max = settings.max_jwks_bytes;
    let transport = |source: reqwest::Error| {
        if source.is_timeout() {
            FetchError::Timeout {
                url: url.to_owned(),
            }
        } else {
            FetchError::Transport {
                url: url.to_owned(),
                source,
            }
        }
    };
    let mut resp = http
        .get(parsed)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(transport)?;
    if !resp.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        });
    }
    let too_large = || FetchError::TooLarge {
        url: url.to_owned(),
        max,
    };
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(too_large());
    }
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, headers))
}

/// How long a fetched JWKS may be cached: `max-age` clamped to `[min_cache, max_cache]`,
/// `default_cache` without one, `min_cache` for `no-store`/`no-cache`.
pub(crate) fn cache_ttl(headers: &HeaderMap, s: &VerifierSettings) -> Duration {
    let clamp = |d: Duration| d.max(s.min_cache).min(s.max_cache);
    let mut max_age = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return clamp(s.min_cache);
            }
            if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                max_age = Some(Duration::from_secs(secs));
            }
        }
    }
    clamp(max_age.unwrap_or(s.default_cache))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn https_required_except_loopback() {
        for ok in [
            "https://issuer.example/jwks",
            "http://127.0.0.1:8080/jwks",
            "http://127.9.9.9/jwks",
            "http://[::1]:1/x",
            "http://localhost:1/x",
            "http://LOCALHOST/x",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://issuer.example/jwks",
            "http://10.0.0.1/jwks",
            "http://localhost.evil.example/x",
            "http://[::2]/x",
        ] {
            assert!(
                matches!(check_url(bad, false), Err(FetchError::Insecure(_))),
                "{bad}"
            );
            assert!(check_url(bad, true).is_ok(), "{bad} with allow_http");
        }
        for bad in ["ftp://x/y", "file:///etc/passwd", "nonsense", "https://"] {
            assert!(
                matches!(check_url(bad, true), Err(FetchError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cache_control_is_clamped() {
        let s = VerifierSettings::new("https://lanyard.test");
        let ttl = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            cache_ttl(&h, &s).as_secs()
        };
        assert_eq!(ttl(None), 300);
        assert_eq!(ttl(Some("public, max-age=120")), 120);
        assert_eq!(ttl(Some("max-age=5")), 60);
        assert_eq!(ttl(Some("max-age=9999999")), 86_400);
        assert_eq!(ttl(Some("no-store")), 60);
        assert_eq!(ttl(Some("max-age=600, no-cache")), 60);
        assert_eq!(ttl(Some("max-age=banana")), 300);
        assert_eq!(ttl(Some("MAX-AGE=\"900\"")), 900);
    }
}
