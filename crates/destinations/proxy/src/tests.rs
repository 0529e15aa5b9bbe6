use std::sync::Arc;

use http::HeaderValue;
use lanyard_core::{GrantId, Scope, Ttl, WorkloadId};
use lanyard_keys::{KeyRing, KeyRingMinter, SigningAlgorithm};

use super::*;

fn settings() -> Value {
    json!({
        "upstream_url": "https://api.example.com/base/",
        "key_header": "x-api-key",
        "rules": {
            "read": [{"methods": ["GET"], "path": "/v1/models/**"},
                     {"methods": ["GET"], "path": "/v1/files/*/content"}],
            "write": [{"methods": ["POST"], "path": "/v1/messages"},
                      {"methods": ["POST"], "path": "/v1/batches/msg_*"}],
            "admin": [{"methods": ["POST", "DELETE"], "path": "/v1/organizations/**"}],
        },
        "strip_headers": ["anthropic-admin-key"],
    })
}

fn scopes() -> Vec<String> {
    ["read", "write", "admin"].map(String::from).to_vec()
}

fn config() -> ProxyConfig {
    ProxyConfig::from_value(&settings(), &scopes()).unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn defaults_and_upstream_url() {
    let c = config();
    assert_eq!(c.settings.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
    assert_eq!(c.settings.requests_per_minute, DEFAULT_REQUESTS_PER_MINUTE);
    let p = normalize_path("/v1/messages").unwrap();
    assert_eq!(
        c.upstream_url(&p, Some("beta=true")),
        "https://api.example.com/base/v1/messages?beta=true"
    );
    assert_eq!(
        c.upstream_url(&p, None),
        "https://api.example.com/base/v1/messages"
    );
    assert_eq!(c.key_value("sk-1"), "sk-1");
    assert_eq!(
        audience("https://lanyard.example/", "claude"),
        "https://lanyard.example/proxy/claude"
    );
}

#[test]
fn bad_settings_are_refused() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"upstream_url": "http://api.example.com"}),
            "https is required",
        ),
        (
            json!({"upstream_url": "https://u:p@api.example.com"}),
            "credentials",
        ),
        (
            json!({"upstream_url": "https://api.example.com/?a=1"}),
            "query",
        ),
        (json!({"key_header": "X-Api-Key"}), "lowercase"),
        (json!({"key_header": "connection"}), "cannot carry"),
        (json!({"key_header": "host"}), "cannot carry"),
        (json!({"key_prefix": "Bearer\n"}), "key_prefix"),
        (json!({"max_request_bytes": 0}), "max_request_bytes"),
        (json!({"max_response_bytes": 0}), "max_response_bytes"),
        (json!({"requests_per_minute": 0}), "requests_per_minute"),
        (json!({"strip_headers": ["Bad Header"]}), "strip_headers"),
        (json!({"rules": {}}), "at least one scope"),
        (
            json!({"rules": {"other": [{"methods": ["GET"], "path": "/x"}]}}),
            "does not offer",
        ),
        (
            json!({"rules": {"read": [{"methods": [], "path": "/x"}]}}),
            "methods must not be empty",
        ),
        (
            json!({"rules": {"read": [{"methods": ["get"], "path": "/x"}]}}),
            "is not one of",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "x"}]}}),
            "must start with /",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "/a//b"}]}}),
            "empty segment",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "/a/**/b"}]}}),
            "last segment",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "/a/../b"}]}}),
            ". or ..",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "/a/%2e"}]}}),
            "plain path",
        ),
        (
            json!({"rules": {"read": [{"methods": ["GET"], "path": "/a", "x": 1}]}}),
            "unknown field",
        ),
        (json!({"bogus": 1}), "unknown field"),
    ];
    for (patch, want) in cases {
        let mut v = settings();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        let err = ProxyConfig::from_value(&v, &scopes())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{patch}: {err}");
        assert!(
            err.starts_with("invalid settings for destination kind proxy"),
            "{err}"
        );
    }
    // Loopback may be plain http (tests, sidecars).
    let mut v = settings();
    v["upstream_url"] = json!("http://127.0.0.1:9/");
    ProxyConfig::from_value(&v, &scopes()).unwrap();
}

#[test]
fn path_normalization_refuses_anything_an_upstream_could_read_differently() {
    for ok in [
        "/",
        "",
        "/v1/messages",
        "/v1/messages/",
        "/v1/files/a%20b",
        "/v1/x-y_z.~",
    ] {
        normalize_path(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    assert_eq!(
        normalize_path("/v1/files/a%20b/").unwrap().segments,
        s(&["v1", "files", "a b", ""])
    );
    for (bad, want) in [
        ("v1/messages", PathError::NotAbsolute),
        ("/v1/../admin", PathError::DotSegment),
        ("/v1/./messages", PathError::DotSegment),
        ("/..", PathError::DotSegment),
        ("/v1/%2e%2e/admin", PathError::DotSegment),
        ("/v1/%2E%2e/admin", PathError::DotSegment),
        ("/v1/.%2e/admin", PathError::DotSegment),
        ("/v1/%2e/admin", PathError::DotSegment),
        ("/v1//messages", PathError::EmptySegment),
        ("//v1/messages", PathError::EmptySegment),
        ("/v1/messages%2f..%2fadmin", PathError::Forbidden),
        ("/v1/messages%2F..%2Fadmin", PathError::Forbidden),
        ("/v1/a%5cb", PathError::Forbidden),
        ("/v1\\..\\admin", PathError::Forbidden),
        ("/v1/%252e%252e/admin", PathError::Forbidden),
        ("/v1/..;/admin", PathError::Forbidden),
        ("/v1/a;b", PathError::Forbidden),
        ("/v1/%00", PathError::Forbidden),
        ("/v1/%0a", PathError::Forbidden),
        ("/v1/%zz", PathError::Forbidden),
        ("/v1/%2", PathError::Forbidden),
        ("/v1/%", PathError::Forbidden),
        ("/v1/%ff", PathError::Forbidden),
        ("/v1/a b", PathError::Forbidden),
        ("/v1/messages.", PathError::Ambiguous),
        ("/v1/messages%2e", PathError::Ambiguous),
        ("/v1/messages%20", PathError::Ambiguous),
        ("/v1/messages%20/x", PathError::Ambiguous),
        ("/v1/m%c3%a9ssages", PathError::Ambiguous),
        ("/v1/%e2%80%8bmessages", PathError::Ambiguous),
    ] {
        assert_eq!(normalize_path(bad), Err(want), "{bad:?}");
    }
}

#[test]
fn rules_match_method_and_normalized_path_per_granted_scope() {
    let c = config();
    let allowed = |scopes: &[&str], method: &str, path: &str| {
        c.allowed(&s(scopes), method, &normalize_path(path).unwrap())
            .map(|(scope, pattern)| format!("{scope} {pattern}"))
    };
    assert_eq!(
        allowed(&["read"], "GET", "/v1/models/claude").as_deref(),
        Some("read /v1/models/**")
    );
    assert!(
        allowed(&["read"], "GET", "/v1/models").is_some(),
        "** matches none"
    );
    assert!(allowed(&["read"], "GET", "/v1/models/a/b/c").is_some());
    assert!(allowed(&["read"], "GET", "/v1/modelsx").is_none());
    assert!(allowed(&["read"], "GET", "/v1/files/f1/content").is_some());
    assert!(allowed(&["read"], "GET", "/v1/files/f1/f2/content").is_none());
    // Read cannot write; write cannot escalate.
    assert!(allowed(&["read"], "POST", "/v1/messages").is_none());
    assert_eq!(
        allowed(&["read", "write"], "POST", "/v1/messages").as_deref(),
        Some("write /v1/messages")
    );
    assert!(
        allowed(&["write"], "POST", "/v1/messages/").is_none(),
        "trailing / is another path"
    );
    assert!(allowed(&["write"], "GET", "/v1/messages").is_none());
    assert!(allowed(&["write"], "POST", "/v1/organizations/keys").is_none());
    assert!(allowed(&["admin"], "DELETE", "/v1/organizations/keys/1").is_some());
    // A glob inside a segment.
    assert!(allowed(&["write"], "POST", "/v1/batches/msg_123").is_some());
    assert!(allowed(&["write"], "POST", "/v1/batches/msg_").is_some());
    assert!(allowed(&["write"], "POST", "/v1/batches/xmsg_1").is_none());
    // Decoded before matching: an encoded letter is the letter.
    assert!(allowed(&["write"], "POST", "/v1/m%65ssages").is_some());
    assert!(allowed(&[], "GET", "/v1/models/x").is_none());
    assert!(allowed(&["unknown"], "GET", "/v1/models/x").is_none());
}

#[test]
fn segment_globs() {
    for (p, seg, want) in [
        ("*", "a", true),
        ("*", "", false),
        ("a*", "a", true),
        ("a*c", "abc", true),
        ("a*c", "ac", true),
        ("a*c", "acb", false),
        ("*b*", "abc", true),
        ("a*b*c", "aXbYc", true),
        ("a*b*c", "acb", false),
        ("abc", "abc", true),
        ("abc", "abd", false),
    ] {
        assert_eq!(segment_matches(p, seg), want, "{p} {seg}");
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn smuggling_headers_are_refused() {
    let c = config();
    assert!(
        check_request_headers(&headers(&[("x-api-key", "t"), ("content-length", "3")]), &c).is_ok()
    );
    assert!(check_request_headers(&headers(&[("transfer-encoding", "chunked")]), &c).is_ok());
    for (h, want) in [
        (
            vec![("x-api-key", "a"), ("x-api-key", "b")],
            "more than once",
        ),
        (
            vec![("connection", "keep-alive, X-Api-Key")],
            "names x-api-key",
        ),
        (vec![("connection", "authorization")], "names authorization"),
        (
            vec![("connection", "anthropic-admin-key")],
            "names anthropic-admin-key",
        ),
        (
            vec![("connection", "content-length")],
            "names content-length",
        ),
        (
            vec![("transfer-encoding", "chunked"), ("content-length", "3")],
            "framing",
        ),
        (
            vec![("content-length", "3"), ("content-length", "4")],
            "framing",
        ),
        (vec![("transfer-encoding", "gzip, chunked")], "framing"),
        (
            vec![
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            "framing",
        ),
    ] {
        let err = check_request_headers(&headers(&h), &c)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{h:?}: {err}");
    }
}

#[test]
fn the_token_is_taken_after_the_prefix() {
    let c = config();
    assert_eq!(take_token(&headers(&[("x-api-key", "tok")]), &c), Ok("tok"));
    assert!(matches!(
        take_token(&headers(&[]), &c),
        Err(HeaderError::Missing(_))
    ));
    assert!(matches!(
        take_token(&headers(&[("x-api-key", " ")]), &c),
        Err(HeaderError::Missing(_))
    ));
    assert!(matches!(
        take_token(&headers(&[("x-api-key", "a"), ("x-api-key", "b")]), &c),
        Err(HeaderError::Duplicate(_))
    ));
    let mut v = settings();
    v["key_header"] = json!("authorization");
    v["key_prefix"] = json!("Bearer ");
    let c = ProxyConfig::from_value(&v, &scopes()).unwrap();
    assert_eq!(
        take_token(&headers(&[("authorization", "Bearer tok")]), &c),
        Ok("tok")
    );
    assert_eq!(
        take_token(&headers(&[("authorization", "bearer tok")]), &c),
        Ok("tok")
    );
    assert!(take_token(&headers(&[("authorization", "Basic tok")]), &c).is_err());
    assert!(take_token(&headers(&[("authorization", "Bearer")]), &c).is_err());
    assert_eq!(c.key_value("sk-1"), "Bearer sk-1");
}

#[test]
fn forwarded_headers_carry_no_key_and_no_hop_by_hop() {
    let c = config();
    let h = headers(&[
        ("x-api-key", "lanyard-token"),
        ("authorization", "Bearer other"),
        ("proxy-authorization", "Basic x"),
        ("cookie", "s=1"),
        ("api-key", "k"),
        ("x-goog-api-key", "k"),
        ("anthropic-admin-key", "k"),
        ("connection", "keep-alive, x-custom-hop"),
        ("keep-alive", "timeout=5"),
        ("x-custom-hop", "1"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("host", "proxy.local"),
        ("content-length", "2"),
        ("expect", "100-continue"),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
        ("accept", "text/event-stream"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-url", "/v1/organizations/keys"),
        ("x-rewrite-url", "/v1/organizations/keys"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "admin.internal"),
        ("x-forwarded-prefix", "/admin"),
        ("x-envoy-original-path", "/v1/organizations/keys"),
        ("forwarded", "for=10.0.0.1;host=admin.internal"),
    ]);
    let out = forward_headers(&h, &c);
    let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, ["content-type", "anthropic-version", "accept"]);
    let resp = response_headers(
        &headers(&[
            ("content-type", "text/event-stream"),
            ("connection", "x-up-hop"),
            ("x-up-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("request-id", "r1"),
            ("set-cookie", "session=abc"),
        ]),
        &c,
        b"sk-real",
    )
    .unwrap();
    let names: Vec<&str> = resp.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, ["content-type", "request-id"]);
}

#[test]
fn answers_with_the_key_or_a_cross_origin_location_are_refused_or_filtered() {
    let c = config();
    for (name, value) in [
        ("x-debug", "key=sk-real-123"),
        ("location", "https://evil.example/?k=sk-real-123"),
    ] {
        assert_eq!(
            response_headers(&headers(&[(name, value)]), &c, b"sk-real-123"),
            Err(ResponseError::KeyInHeader),
            "{name}"
        );
    }
    let location = |v: &str| {
        response_headers(&headers(&[("location", v)]), &c, b"sk-real-123")
            .unwrap()
            .get("location")
            .is_some()
    };
    assert!(location("/v1/messages/1"), "relative");
    assert!(location("v1/messages/1"), "relative");
    assert!(location("https://api.example.com/base/v1/x"), "same origin");
    assert!(
        location("https://API.example.com:443/x"),
        "same origin, spelled otherwise"
    );
    for other in [
        "https://evil.example/x",
        "http://api.example.com/x",
        "https://api.example.com:8443/x",
        "//evil.example/x",
        "/\\evil.example/x",
        "https://api.example.com.evil.example/x",
    ] {
        assert!(!location(other), "{other}");
    }
}

#[test]
fn the_key_is_found_in_a_stream_whatever_the_chunks() {
    let key = b"sk-static-0123456789";
    let body: Vec<u8> = [&b"data: {\"text\": \""[..], key, b"\"}\n\n"].concat();
    for size in 1..=body.len() {
        let mut scan = KeyScanner::new(key);
        let found = body.chunks(size).any(|c| scan.found_in(c));
        assert!(found, "chunks of {size}");
    }
    // Almost the key, in pieces, is not the key.
    let mut scan = KeyScanner::new(key);
    for c in [
        &b"sk-static-"[..],
        b"012345678",
        b"X",
        b"sk-static-0123456789"[..19].as_ref(),
    ] {
        assert!(!scan.found_in(c));
    }
    assert!(scan.found_in(b"9"), "completed by the last byte");
}

#[test]
fn a_key_is_bound_to_where_and_how_it_is_sent() {
    let c = config();
    let b = c.binding();
    assert_eq!(b.upstream_origin, "https://api.example.com");
    assert_eq!(b.key_header, "x-api-key");
    let mut moved = settings();
    moved["upstream_url"] = json!("https://api.example.com/other-base");
    assert_eq!(
        ProxyConfig::from_value(&moved, &scopes())
            .unwrap()
            .binding(),
        b,
        "a base path on the same origin keeps the binding"
    );
    for (key, value) in [
        ("upstream_url", json!("https://attacker.example")),
        ("upstream_url", json!("https://api.example.com:8443")),
        ("key_header", json!("authorization")),
        ("key_prefix", json!("Bearer ")),
    ] {
        let mut changed = settings();
        changed[key] = value.clone();
        let other = ProxyConfig::from_value(&changed, &scopes())
            .unwrap()
            .binding();
        assert_ne!(other, b, "{key} = {value}");
        assert_ne!(other.aad("llm"), b.aad("llm"), "{key} = {value}");
    }
    assert_ne!(b.aad("llm"), b.aad("llm2"), "bound to the name");
}

#[test]
fn rate_limit_is_a_token_bucket_per_key() {
    let l = RateLimiter::default();
    let t0 = Instant::now();
    for _ in 0..3 {
        l.check("g1", 3, t0).unwrap();
    }
    let wait = l.check("g1", 3, t0).unwrap_err();
    assert!(
        wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
        "{wait:?}"
    );
    l.check("g2", 3, t0).unwrap();
    l.check("g1", 3, t0 + Duration::from_secs(20)).unwrap();
    assert!(l.check("g1", 3, t0 + Duration::from_secs(20)).is_err());
}

#[tokio::test]
async fn issues_a_lanyard_token_for_the_proxy_audience_in_the_key_header() {
    lanyard_keys::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(
        KeyRing::open(
            &dir.path().join("keys"),
            SigningAlgorithm::ES256,
            lanyard_core::SystemClock::shared(),
        )
        .unwrap(),
    );
    let minter = Arc::new(KeyRingMinter::new(ring, "https://lanyard.example"));
    let spec: DestinationSpec = serde_json::from_value(json!({
        "name": "claude", "kind": "proxy", "scopes": scopes(), "settings": settings(),
        "default_ttl_secs": 300, "max_ttl_secs": 600,
    }))
    .unwrap();
    let d = ProxyDestination::new(&spec, minter).unwrap();
    assert_eq!(d.revocability(), Revocability::Immediate);
    let grant = GrantId::generate();
    let workload = WorkloadId::parse("spiffe://lanyard.local/ci/agent").unwrap();
    let scopes = [Scope::parse("write").unwrap()];
    let issued = d
        .issue(IssueRequest {
            grant_id: &grant,
            workload: &workload,
            issuer: "ci",
            task: None,
            scopes: &scopes,
            ttl: Ttl::from_secs(120).unwrap(),
            now: 1_900_000_000,
            actor_chain: &[],
            claims: &serde_json::Map::new(),
        })
        .await
        .unwrap();
    assert_eq!(issued.expires_at, 1_900_000_120);
    let Credential::Bearer {
        token,
        token_type,
        header,
        ..
    } = issued.credential
    else {
        panic!("bearer expected");
    };
    assert_eq!((header.as_str(), token_type.as_str()), ("x-api-key", ""));
    let payload = token.expose().split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://lanyard.example/proxy/claude");
    assert_eq!(claims["scope"], "write");
    assert_eq!(claims["lanyard"]["grant_id"], grant.as_str());
    assert_eq!(claims["lanyard"]["destination"], "claude");
    assert_eq!(claims["sub"], workload.as_str());
    // Another kind is refused.
    let mut other = spec.clone();
    other.kind = "jwt".into();
    assert!(
        ProxyDestination::new(
            &other,
            Arc::new(KeyRingMinter::new(
                Arc::new(
                    KeyRing::open(
                        &dir.path().join("k2"),
                        SigningAlgorithm::ES256,
                        lanyard_core::SystemClock::shared()
                    )
                    .unwrap()
                ),
                "https://x",
            ))
        )
        .is_err()
    );
}
