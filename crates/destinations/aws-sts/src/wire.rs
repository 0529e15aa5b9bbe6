//! The AWS Query API on the wire: form POSTs with a capped answer, the XML answers of
//! `AssumeRoleWithWebIdentity`, `GetRolePolicy` and errors
//! (`<ErrorResponse><Error><Type/><Code/><Message/></Error>`), which answers are worth
//! retrying, and SigV4 signing of IAM calls (the `aws-sigv4` crate).
//!
//! XML is read with `roxmltree`, whose default options refuse DTDs (so no entity
//! expansion), after the answer was capped at `max_response_bytes`.

use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use lanyard_core::{Secret, UnixTime};
use lanyard_destination::{DestinationError, http};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, StatusCode, Url};

/// The `Content-Type` of every Query API request.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Longest AWS error code passed through.
const MAX_CODE_LEN: usize = 64;

/// AWS error codes worth another try (besides any 5xx and 429 answer).
const RETRYABLE_CODES: &[&str] = &[
    "IDPCommunicationError",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalError",
    "ServiceFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    "ConcurrentModification",
];

// === transport ===

/// POST the form `body` to `url` with `headers`; the status and at most `max` bytes of
/// the answer (a longer 2xx answer is an error, a longer error answer is read as empty).
///
/// # Errors
/// Retryable [`DestinationError::Upstream`] when no answer came (connect, timeout,
/// reset); non-retryable when a 2xx answer exceeds `max`.
pub async fn post_form(
    client: &Client,
    url: &Url,
    mut headers: HeaderMap,
    body: String,
    max: usize,
) -> Result<(StatusCode, Vec<u8>), DestinationError> {
    let host = http::host_of(url);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(FORM_CONTENT_TYPE));
    headers.insert(ACCEPT, HeaderValue::from_static("text/xml"));
    let mut resp = client
        .post(url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| http::transport_error(&host, &e))?;
    let status = resp.status();
    match http::read_capped(&mut resp, &host, max).await? {
        Some(buf) => Ok((status, buf)),
        None if status.is_success() => Err(http::too_large(&host, max)),
        None => Ok((status, Vec::new())),
    }
}

/// The form body `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

// === errors ===

/// An AWS error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// HTTP status.
    pub status: u16,
    /// `<Code>`, if it is a plausible code.
    pub code: Option<String>,
    /// `<Message>`, sanitized.
    pub message: Option<String>,
}

impl AwsError {
    /// Whether another try may succeed: 5xx, 429, or a throttling/outage code.
    pub fn retryable(&self) -> bool {
        self.status >= 500
            || self.status == 429
            || self
                .code
                .as_deref()
                .is_some_and(|c| RETRYABLE_CODES.contains(&c))
    }

    /// Whether the code is `code`.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// The error for the caller: `<host> answered http 400: <Code>: <Message>`.
    pub fn into_error(self, host: &str) -> DestinationError {
        let retryable = self.retryable();
        let mut message = format!("{host} answered http {}", self.status);
        if let Some(code) = &self.code {
            message.push_str(": ");
            message.push_str(code);
        }
        if let Some(m) = &self.message {
            message.push_str(": ");
            message.push_str(m);
        }
        DestinationError::Upstream { message, retryable }
    }
}

/// Read a non-2xx answer: its code and sanitized message when it is AWS's XML error
/// shape, the bare status otherwise.
pub fn parse_error(status: StatusCode, body: &[u8]) -> AwsError {
    let mut out = AwsError {
        status: status.as_u16(),
        code: None,
        message: None,
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return out;
    };
    let Ok(doc) = roxmltree::Document::parse(text) else {
        return out;
    };
    let root = doc.root_element();
    // <ErrorResponse><Error>..</Error></ErrorResponse>, or a bare <Error> (S3 style).
    let error = if root.has_tag_name("Error") {
        Some(root)
    } else {
        child(root, "Error")
    };
    let Some(error) = error else {
        return out;
    };
    out.code = child_text(error, "Code").filter(|c| {
        !c.is_empty()
            && c.len() <= MAX_CODE_LEN
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
    });
    out.message = child_text(error, "Message")
        .map(|m| http::sanitize_description(&m))
        .filter(|m| !m.is_empty());
    out
}

/// A 2xx answer that does not have the expected shape.
fn malformed(url: &Url, what: &str, why: &str) -> DestinationError {
    DestinationError::Upstream {
        message: format!(
            "{} answered with a malformed {what} ({why})",
            http::host_of(url)
        ),
        retryable: false,
    }
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn child_text(node: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    child(node, name).map(|c| c.text().unwrap_or_default().trim().to_owned())
}

fn path<'a, 'i>(root: roxmltree::Node<'a, 'i>, names: &[&str]) -> Option<roxmltree::Node<'a, 'i>> {
    let (first, rest) = names.split_first()?;
    if root.tag_name().name() != *first {
        return None;
    }
    rest.iter().try_fold(root, |n, name| child(n, name))
}

fn parse_doc<'i>(
    body: &'i [u8],
    url: &Url,
    what: &str,
) -> Result<roxmltree::Document<'i>, DestinationError> {
    let text = std::str::from_utf8(body).map_err(|_| malformed(url, what, "not utf-8"))?;
    roxmltree::Document::parse(text).map_err(|_| malformed(url, what, "not xml"))
}

// === AssumeRoleWithWebIdentity ===

/// What `AssumeRoleWithWebIdentity` answered.
pub struct StsCredentials {
    /// `AccessKeyId`.
    pub access_key_id: String,
    /// `SecretAccessKey`.
    pub secret_access_key: Secret,
    /// `SessionToken`.
    pub session_token: Secret,
    /// `Expiration`, Unix seconds (rounded down).
    pub expiration: UnixTime,
    /// `AssumedRoleUser/Arn`, if present.
    pub assumed_role_arn: Option<String>,
}

impl std::fmt::Debug for StsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .field("assumed_role_arn", &self.assumed_role_arn)
            .finish_non_exhaustive()
    }
}

/// Parse a 2xx `AssumeRoleWithWebIdentity` answer.
///
/// # Errors
/// Non-retryable [`DestinationError::Upstream`] naming what is missing, never a value.
pub fn parse_assume_role(body: &[u8], url: &Url) -> Result<StsCredentials, DestinationError> {
    const WHAT: &str = "AssumeRoleWithWebIdentity response";
    let doc = parse_doc(body, url, WHAT)?;
    let result = path(
        doc.root_element(),
        &[
            "AssumeRoleWithWebIdentityResponse",
            "AssumeRoleWithWebIdentityResult",
        ],
    )
    .ok_or_else(|| malformed(url, WHAT, "no AssumeRoleWithWebIdentityResult"))?;
    let creds =
        child(result, "Credentials").ok_or_else(|| malformed(url, WHAT, "no Credentials"))?;
    let field = |name: &'static str| {
        child_text(creds, name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| malformed(url, WHAT, &format!("no {name}")))
    };
    let access_key_id = field("AccessKeyId")?;
    if access_key_id.len() > 128 || !access_key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(malformed(url, WHAT, "AccessKeyId is not an access key ID"));
    }
    let secret_access_key = Secret::new(field("SecretAccessKey")?);
    let session_token = Secret::new(field("SessionToken")?);
    let expiration = parse_time(&field("Expiration")?)
        .ok_or_else(|| malformed(url, WHAT, "Expiration is not an ISO 8601 time"))?;
    let assumed_role_arn = child(result, "AssumedRoleUser")
        .and_then(|u| child_text(u, "Arn"))
        .filter(|a| !a.is_empty() && a.len() <= 2048 && !a.chars().any(char::is_control));
    Ok(StsCredentials {
        access_key_id,
        secret_access_key,
        session_token,
        expiration,
        assumed_role_arn,
    })
}

/// Parse an ISO 8601 / RFC 3339 time (`2026-11-24T05:00:00Z`, fractions allowed).
pub fn parse_time(s: &str) -> Option<UnixTime> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

/// `t` as `2026-11-24T05:00:00Z`.
pub fn iso(t: UnixTime) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.to_string())
}

// === GetRolePolicy ===

/// The policy document of a 2xx `GetRolePolicy` answer (IAM URL-encodes it).
///
/// # Errors
/// Non-retryable [`DestinationError::Upstream`].
pub fn parse_get_role_policy(body: &[u8], url: &Url) -> Result<String, DestinationError> {
    const WHAT: &str = "GetRolePolicy response";
    let doc = parse_doc(body, url, WHAT)?;
    let encoded = path(
        doc.root_element(),
        &[
            "GetRolePolicyResponse",
            "GetRolePolicyResult",
            "PolicyDocument",
        ],
    )
    .map(|n| n.text().unwrap_or_default().trim().to_owned())
    .ok_or_else(|| malformed(url, WHAT, "no PolicyDocument"))?;
    percent_encoding::percent_decode_str(&encoded)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| malformed(url, WHAT, "PolicyDocument is not URL-encoded UTF-8"))
}

// === SigV4 ===

/// IAM credentials lanyard signs with.
pub struct AdminKeys {
    /// `aws_access_key_id`.
    pub access_key_id: String,
    /// `aws_secret_access_key`.
    pub secret_access_key: Secret,
    /// `aws_session_token`, for temporary credentials.
    pub session_token: Option<Secret>,
}

impl std::fmt::Debug for AdminKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminKeys")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The headers that sign a form POST of `body` to `url` (`X-Amz-Date`,
/// `Authorization`, and `X-Amz-Security-Token` for temporary credentials), at
/// `at_millis` (Unix milliseconds). The request must carry [`FORM_CONTENT_TYPE`], which
/// is signed.
///
/// # Errors
/// [`DestinationError::Upstream`] (not retryable) if signing fails.
pub fn sign_form(
    keys: &AdminKeys,
    region: &str,
    service: &str,
    url: &Url,
    body: &str,
    at_millis: i64,
) -> Result<HeaderMap, DestinationError> {
    let fail = |what: String| DestinationError::Upstream {
        message: format!("signing the {service} request failed: {what}"),
        retryable: false,
    };
    let identity = Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.expose().to_owned(),
        keys.session_token.as_ref().map(|t| t.expose().to_owned()),
        None,
        "lanyard-credentials-file",
    )
    .into();
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_millis).unwrap_or(0));
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| fail(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        "POST",
        url.as_str(),
        std::iter::once(("content-type", FORM_CONTENT_TYPE)),
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| fail(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| fail(e.to_string()))?
        .into_parts();
    let mut headers = HeaderMap::new();
    for (name, value) in instructions.headers() {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| fail(e.to_string()))?;
        let mut value = HeaderValue::from_str(value).map_err(|e| fail(e.to_string()))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Read IAM credentials from AWS shared-credentials text (`[profile]` sections of
/// `aws_access_key_id`, `aws_secret_access_key`, optional `aws_session_token`).
///
/// # Errors
/// A message naming the missing key or profile, never a value.
pub fn parse_credentials(text: &str, profile: &str) -> Result<AdminKeys, String> {
    let mut section: Option<&str> = None;
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut found = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            section = Some(name.strip_prefix("profile ").unwrap_or(name).trim());
            found |= section == Some(profile);
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "profile [{profile}] has a line that is not key = value"
            ));
        };
        let v = v.trim().to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    if !found {
        return Err(format!("has no [{profile}] profile"));
    }
    let id = id
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("profile [{profile}] has no aws_access_key_id"))?;
    if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!(
            "profile [{profile}]: aws_access_key_id is not an access key ID"
        ));
    }
    let secret = secret
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("profile [{profile}] has no aws_secret_access_key"))?;
    Ok(AdminKeys {
        access_key_id: id,
        secret_access_key: Secret::new(secret),
        session_token: token.filter(|t| !t.is_empty()).map(Secret::new),
    })
}

/// Read and parse the credentials file at `path`, which must be readable by its owner
/// only.
///
/// # Errors
/// A message naming the path and the problem, never the contents.
pub fn read_credentials(path: &std::path::Path, profile: &str) -> Result<AdminKeys, String> {
    let source = format!("credentials_file {}", path.display());
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {source}: {}", e.kind()))?;
    check_private(&meta).map_err(|m| format!("{source} {m}"))?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {source}: {}", e.kind()))?;
    parse_credentials(&text, profile).map_err(|m| format!("{source} {m}"))
}

#[cfg(unix)]
fn check_private(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "is readable or writable by group or others (mode {mode:04o}); chmod 600 it"
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_meta: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::parse("https://sts.amazonaws.com/").unwrap()
    }

    const OK: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>spiffe://lanyard.local/ci/agent</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/deployer/lanyard-grt_1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:lanyard-grt_1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANlanyardTestSessionNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2026-11-24T05:00:00Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <SourceIdentity>grt_1</SourceIdentity>
    <Provider>lanyard.example.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn assume_role_answers_parse() {
        let c = parse_assume_role(OK.as_bytes(), &url()).unwrap();
        assert_eq!(c.access_key_id, "ASgeIAIOSFODNN7EXAMPLE");
        assert_eq!(
            c.secret_access_key.expose(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
        );
        assert_eq!(
            c.session_token.expose(),
            "AQoDYXdzEE0a8ANlanyardTestSessionNO1ewxE5TijQyp+IEXAMPLE"
        );
        assert_eq!(c.expiration, parse_time("2026-11-24T05:00:00Z").unwrap());
        assert_eq!(iso(c.expiration), "2026-11-24T05:00:00Z");
        assert_eq!(
            c.assumed_role_arn.as_deref(),
            Some("arn:aws:sts::123456789012:assumed-role/deployer/lanyard-grt_1")
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("wJalr") && !dbg.contains("AQoD"), "{dbg}");
        // moto's fractional seconds.
        assert_eq!(
            parse_time("2026-11-24T03:12:46.366743Z"),
            parse_time("2026-11-24T03:12:46Z")
        );
    }

    #[test]
    fn malformed_answers_are_refused_without_echo() {
        for (body, want) in [
            ("not xml at all", "not xml"),
            ("<a><b></a>", "not xml"),
            ("<Other/>", "no AssumeRoleWithWebIdentityResult"),
            (
                "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult/></AssumeRoleWithWebIdentityResponse>",
                "no Credentials",
            ),
            (
                &OK.replace(
                    "<SessionToken>AQoDYXdzEE0a8ANlanyardTestSessionNO1ewxE5TijQyp+IEXAMPLE</SessionToken>",
                    "",
                ),
                "no SessionToken",
            ),
            (
                &OK.replace("2026-11-24T05:00:00Z", "tomorrow"),
                "Expiration is not",
            ),
            (
                &OK.replace("ASgeIAIOSFODNN7EXAMPLE", "AS/gei"),
                "not an access key ID",
            ),
            // A DTD (entity expansion) is refused.
            (
                "<!DOCTYPE x [<!ENTITY a \"aaaa\">]><AssumeRoleWithWebIdentityResponse/>",
                "not xml",
            ),
        ] {
            let e = parse_assume_role(body.as_bytes(), &url()).unwrap_err();
            let m = e.to_string();
            assert!(m.contains(want), "{body}: {m}");
            assert!(!m.contains("wJalr"), "{m}");
            assert!(!http::is_retryable(&e));
        }
        assert!(parse_assume_role(&[0xff, 0xfe], &url()).is_err());
    }

    #[test]
    fn error_answers_map_to_codes() {
        let body = |code: &str, msg: &str| {
            format!(
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{msg}</Message></Error><RequestId>r</RequestId></ErrorResponse>"
            )
        };
        for (status, code, retryable) in [
            (400, "InvalidIdentityToken", false),
            (400, "ExpiredTokenException", false),
            (400, "ExpiredToken", false),
            (403, "AccessDenied", false),
            (400, "MalformedPolicyDocument", false),
            (400, "PackedPolicyTooLarge", false),
            (400, "ValidationError", false),
            (404, "NoSuchEntity", false),
            (409, "LimitExceeded", false),
            (400, "IDPCommunicationError", true),
            (400, "Throttling", true),
            (500, "InternalFailure", true),
            (503, "ServiceUnavailable", true),
        ] {
            let e = parse_error(
                StatusCode::from_u16(status).unwrap(),
                body(code, "Incorrect token audience").as_bytes(),
            );
            assert_eq!(e.code.as_deref(), Some(code));
            assert_eq!(e.retryable(), retryable, "{code}");
            let err = e.into_error("sts.amazonaws.com");
            assert_eq!(http::is_retryable(&err), retryable);
            assert_eq!(
                err.to_string(),
                format!(
                    "destination call failed: sts.amazonaws.com answered http {status}: {code}: Incorrect token audience"
                )
            );
        }
        // Token text in a message is redacted; control characters are dropped.
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            body(
                "InvalidIdentityToken",
                "bad token eyJhbGciOiJFUzI1NiJ9.e30.sig\nhere",
            )
            .as_bytes(),
        );
        assert_eq!(e.message.as_deref(), Some("bad token [redacted] here"));
        // A code that is not a code is dropped; a body that is not XML gives the status.
        let e = parse_error(StatusCode::BAD_REQUEST, body("Bad Code!", "m").as_bytes());
        assert_eq!((e.code, e.message.as_deref()), (None, Some("m")));
        let e = parse_error(StatusCode::BAD_GATEWAY, b"<html>bad gateway");
        assert_eq!((e.code, e.message), (None, None));
        assert!(
            parse_error(StatusCode::BAD_GATEWAY, b"")
                .into_error("h")
                .to_string()
                .ends_with("h answered http 502")
        );
        // A bare <Error> (S3 style) is read too.
        let e = parse_error(
            StatusCode::FORBIDDEN,
            b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>",
        );
        assert!(e.is("AccessDenied"));
    }

    #[tokio::test]
    async fn answers_are_capped_and_transport_failures_retryable() {
        use axum::Router;
        use axum::routing::post;
        let app = Router::new()
            .route("/big", post(|| async { "x".repeat(5000) }))
            .route(
                "/big-error",
                post(|| async { (axum::http::StatusCode::BAD_REQUEST, "x".repeat(5000)) }),
            )
            .route("/echo", post(|body: String| async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = http::build_client(
            "aws-sts",
            &http::ClientSettings::new(Duration::from_secs(5)),
        )
        .unwrap();
        let at = |p: &str| Url::parse(&format!("http://{addr}/{p}")).unwrap();
        let (status, body) = post_form(
            &client,
            &at("echo"),
            HeaderMap::new(),
            form(&[("Action", "X"), ("Policy", "{\"a\": \"b c+d\"}")]),
            1024,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"Action=X&Policy=%7B%22a%22%3A+%22b+c%2Bd%22%7D");
        let e = post_form(&client, &at("big"), HeaderMap::new(), String::new(), 1024)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("exceeds 1024 bytes"), "{e}");
        assert!(!http::is_retryable(&e));
        let (status, body) = post_form(
            &client,
            &at("big-error"),
            HeaderMap::new(),
            String::new(),
            1024,
        )
        .await
        .unwrap();
        assert_eq!((status, body.len()), (StatusCode::BAD_REQUEST, 0));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let dead = Url::parse(&format!("http://{closed}/")).unwrap();
        let e = post_form(&client, &dead, HeaderMap::new(), String::new(), 1024)
            .await
            .unwrap_err();
        assert!(http::is_retryable(&e), "{e}");
        assert!(e.to_string().contains("could not connect"), "{e}");
    }

    #[test]
    fn get_role_policy_documents_are_url_decoded() {
        let body = "<GetRolePolicyResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><GetRolePolicyResult><RoleName>r1</RoleName><PolicyName>lanyard-revoked</PolicyName><PolicyDocument>%7B%22Version%22%3A%20%222012-10-17%22%2C%20%22Statement%22%3A%20%5B%5D%2C%20%22x%22%3A%20%22a%2Bb%22%7D</PolicyDocument></GetRolePolicyResult></GetRolePolicyResponse>";
        let u = Url::parse("https://iam.amazonaws.com/").unwrap();
        assert_eq!(
            parse_get_role_policy(body.as_bytes(), &u).unwrap(),
            r#"{"Version": "2012-10-17", "Statement": [], "x": "a+b"}"#
        );
        assert!(parse_get_role_policy(b"<GetRolePolicyResponse/>", &u).is_err());
    }

    /// AWS's published SigV4 test vector `post-x-www-form-urlencoded`
    /// (aws-sig-v4-test-suite): the same request signed here must give the same
    /// signature. Checked against botocore too.
    #[test]
    fn sigv4_matches_the_published_vector() {
        let keys = AdminKeys {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: None,
        };
        let at = parse_time("2015-08-30T12:36:00Z").unwrap() * 1000;
        let u = Url::parse("https://example.amazonaws.com/").unwrap();
        // The vector's Content-Type has no charset; sign the same bytes by hand.
        let identity = Credentials::new(
            "AKIDEXAMPLE",
            keys.secret_access_key.expose(),
            None,
            None,
            "t",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("service")
            .time(UNIX_EPOCH + Duration::from_millis(at as u64))
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let req = SignableRequest::new(
            "POST",
            u.as_str(),
            std::iter::once(("content-type", "application/x-www-form-urlencoded")),
            SignableBody::Bytes(b"Param1=value1"),
        )
        .unwrap();
        let (ins, _) = sign(req, &params).unwrap().into_parts();
        let auth: Vec<_> = ins
            .headers()
            .filter(|(n, _)| *n == "authorization")
            .collect();
        assert_eq!(
            auth[0].1,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
        // sign_form signs the charset Content-Type it sends; the signature botocore
        // computes for this IAM request.
        let h = sign_form(
            &keys,
            "us-east-1",
            "iam",
            &Url::parse("https://iam.amazonaws.com/").unwrap(),
            "Action=ListUsers&Version=2010-05-08",
            at,
        )
        .unwrap();
        assert_eq!(h["x-amz-date"], "20150830T123600Z");
        assert_eq!(
            h["authorization"].to_str().unwrap(),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d76d0de3e0ffe5a7a23cfce21b99d6f4e5060aad86bd9dc7c617f224e5b492a"
        );
        assert!(h.get("x-amz-security-token").is_none());
        let temp = AdminKeys {
            session_token: Some(Secret::new("session-token")),
            ..keys
        };
        let h = sign_form(
            &temp,
            "us-east-1",
            "iam",
            &Url::parse("https://iam.amazonaws.com/").unwrap(),
            "Action=ListUsers&Version=2010-05-08",
            at,
        )
        .unwrap();
        assert_eq!(h["x-amz-security-token"], "session-token");
    }

    #[test]
    fn credentials_files() {
        let text = "# admin\n[other]\naws_access_key_id = AKIAOTHER\naws_secret_access_key = o\n\n[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = s3cr3t/key\naws_session_token = tok\nregion = us-east-1\n";
        let k = parse_credentials(text, "default").unwrap();
        assert_eq!(k.access_key_id, "AKIAEXAMPLE");
        assert_eq!(k.secret_access_key.expose(), "s3cr3t/key");
        assert_eq!(k.session_token.as_ref().unwrap().expose(), "tok");
        assert!(!format!("{k:?}").contains("s3cr3t"));
        let k = parse_credentials(text, "other").unwrap();
        assert_eq!(k.access_key_id, "AKIAOTHER");
        assert!(k.session_token.is_none());
        for (text, want) in [
            (
                "[default]\naws_access_key_id = A\n",
                "no aws_secret_access_key",
            ),
            (
                "[default]\naws_secret_access_key = s3cr3t\n",
                "no aws_access_key_id",
            ),
            ("[x]\n", "no [default] profile"),
            ("[default]\njunk s3cr3t\n", "not key = value"),
            (
                "[default]\naws_access_key_id = a/b\naws_secret_access_key = s3cr3t\n",
                "not an access key ID",
            ),
        ] {
            let m = parse_credentials(text, "default").unwrap_err();
            assert!(m.contains(want), "{text}: {m}");
            assert!(!m.contains("s3cr3t"), "{m}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        std::fs::write(&p, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            let m = read_credentials(&p, "default").unwrap_err();
            assert!(m.contains("mode 0644"), "{m}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(
            read_credentials(&p, "default").unwrap().access_key_id,
            "AKIAEXAMPLE"
        );
        let m = read_credentials(&dir.path().join("missing"), "default").unwrap_err();
        assert!(m.contains("cannot read"), "{m}");
    }
}
