//! Verifier tests: every refusal reason, and key fetching against a real local issuer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jsonwebtoken::EncodingKey;
use lanyard_core::{FakeClock, ReasonCode, Secret, SharedClock};
use serde_json::{Value, json};

use super::*;
use crate::replay::InMemoryReplayGuard;
use crate::testutil::{TestIssuer, TestKey, b64, sign_text_with};

const OWN: &str = "https://lanyard.test";
const NOW: i64 = 1_700_000_000;
const SUBJECT: &str = "secret-subject-value";

fn settings() -> VerifierSettings {
    let mut s = VerifierSettings::new(OWN);
    s.http_timeout = Duration::from_secs(2);
    s
}

fn make(settings: VerifierSettings) -> (Verifier, FakeClock) {
    let clock = FakeClock::at(NOW);
    let shared: SharedClock = Arc::new(clock.clone());
    let replay = Arc::new(InMemoryReplayGuard::new(Arc::clone(&shared), 1000));
    (Verifier::new(settings, shared, replay).unwrap(), clock)
}

fn issuer(name: &str, iss: &str, keys: KeySource, algs: &[Algorithm]) -> IssuerConfig {
    IssuerConfig {
        name: name.into(),
        issuer_url: iss.into(),
        keys,
        allowed_algorithms: algs.to_vec(),
        audiences: vec!["lanyard".into(), "other-aud".into()],
        leeway_secs: 30,
        max_token_age_secs: None,
        replay_protection: false,
        max_token_bytes: None,
    }
}

fn inline(keys: &[&TestKey]) -> KeySource {
    KeySource::InlineJwks {
        jwks: json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
    }
}

fn jwks_url(server: &TestIssuer) -> KeySource {
    KeySource::JwksUrl {
        url: server.jwks_url(),
    }
}

fn claims(iss: &str) -> Value {
    json!({
        "iss": iss, "sub": SUBJECT, "aud": "lanyard",
        "exp": NOW + 600, "iat": NOW, "nbf": NOW, "jti": "j-1",
    })
}

async fn verify(v: &Verifier, t: &str) -> Result<VerifiedToken> {
    v.verify(&Secret::new(t)).await
}

async fn reason(v: &Verifier, t: &str) -> ReasonCode {
    match verify(v, t).await {
        Ok(_) => panic!("token was accepted"),
        Err(e) => e.reason(),
    }
}

/// Poll `f` until it holds, with a deadline (no fixed sleeps).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn happy_path_every_algorithm_every_key_source() {
    for alg in Algorithm::ALL {
        let key = TestKey::new(alg, &format!("k-{alg}"));
        let server = TestIssuer::start(&[&key]).await;
        let (v, _clock) = make(settings());
        let disc_iss = server.base().to_owned();
        v.set_issuers(vec![
            issuer(
                "disc",
                &disc_iss,
                KeySource::Discovery {
                    url: server.base().into(),
                },
                &[alg],
            ),
            issuer("jwks", "https://jwks.example", jwks_url(&server), &[alg]),
            issuer("inline", "https://inline.example", inline(&[&key]), &[alg]),
        ]);
        for (name, iss) in [
            ("disc", disc_iss.as_str()),
            ("jwks", "https://jwks.example"),
            ("inline", "https://inline.example"),
        ] {
            let t = key.token(&claims(iss));
            let vt = verify(&v, &t)
                .await
                .unwrap_or_else(|e| panic!("{alg} via {name}: {e}"));
            assert_eq!(vt.issuer, name);
            assert_eq!(vt.iss, iss);
            assert_eq!(vt.alg, alg);
            assert_eq!(vt.sub, SUBJECT);
            assert_eq!(vt.aud, vec!["lanyard".to_owned()]);
            assert_eq!(vt.exp, NOW + 600);
            assert_eq!(vt.iat, Some(NOW));
            assert_eq!(vt.nbf, Some(NOW));
            assert_eq!(vt.jti.as_deref(), Some("j-1"));
            assert_eq!(vt.kid.as_deref(), Some(key.kid.as_str()));
            assert_eq!(vt.claims["sub"], json!(SUBJECT));
        }
        assert_eq!(server.knobs.discovery_hits.load(Ordering::SeqCst), 1);
        assert_eq!(server.knobs.jwks_hits(), 2, "one fetch per fetching issuer");
        let status = v.status();
        assert_eq!(status.len(), 3);
        assert!(
            status
                .iter()
                .all(|s| s.kids == vec![key.kid.clone()] && !s.stale)
        );
    }
}

struct Fixture {
    v: Verifier,
    clock: FakeClock,
    rsa: TestKey,
    ec: TestKey,
}

const MAIN: &str = "https://main.example";
const PS: &str = "https://ps.example";
const SMALL: &str = "https://small.example";
const STRICT: &str = "https://strict.example";
const SOLO: &str = "https://solo.example";

fn fixture() -> Fixture {
    let rsa = TestKey::new(Algorithm::RS256, "rsa");
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let (v, clock) = make(settings());
    let mut small = issuer("small", SMALL, inline(&[&ec]), &[Algorithm::ES256]);
    small.max_token_bytes = Some(400);
    let mut strict = issuer("strict", STRICT, inline(&[&ec]), &[Algorithm::ES256]);
    strict.replay_protection = true;
    strict.max_token_age_secs = Some(300);
    v.set_issuers(vec![
        issuer(
            "main",
            MAIN,
            inline(&[&rsa, &ec]),
            &[Algorithm::RS256, Algorithm::ES256],
        ),
        issuer("ps", PS, inline(&[&rsa]), &[Algorithm::PS256]),
        small,
        strict,
        issuer("solo", SOLO, inline(&[&ec]), &[Algorithm::ES256]),
    ]);
    Fixture { v, clock, rsa, ec }
}

fn with(iss: &str, f: impl FnOnce(&mut Value)) -> Value {
    let mut c = claims(iss);
    f(&mut c);
    c
}

fn raw_payload(ec: &TestKey, payload: &str) -> String {
    ec.sign_text(&ec.header().to_string(), payload)
}

#[tokio::test]
async fn refusals_have_the_right_reason_and_leak_nothing() {
    let Fixture { v, rsa, ec, .. } = fixture();
    let good = ec.token(&claims(MAIN));
    verify(&v, &good).await.unwrap();
    verify(&v, &rsa.token(&claims(MAIN))).await.unwrap();

    let parts: Vec<&str> = good.split('.').collect();
    let good_payload_b64 = parts[1];
    let zero_sig = format!("{}.{}.{}", parts[0], parts[1], b64([0u8; 64]));
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(with(MAIN, |c| c["sub"] = json!("admin")).to_string()),
        parts[2]
    );
    let other_ec = TestKey::new(Algorithm::ES256, "ec");
    let hs_confused = sign_text_with(
        &EncodingKey::from_secret(&rsa.public_der),
        jsonwebtoken::Algorithm::HS256,
        &json!({"alg": "HS256", "typ": "JWT", "kid": "rsa"}).to_string(),
        &claims(MAIN).to_string(),
    );
    let hdr = |extra: Value| {
        let mut h = ec.header();
        for (k, val) in extra.as_object().unwrap() {
            h[k] = val.clone();
        }
        ec.sign(&h, &claims(MAIN))
    };
    let mut es_on_rsa_kid = ec.header();
    es_on_rsa_kid["kid"] = json!("rsa");
    let mut no_kid = ec.header();
    no_kid.as_object_mut().unwrap().remove("kid");
    let pad = "p".repeat(300);

    let cases: Vec<(&str, String, ReasonCode)> = vec![
        ("oversized", "a".repeat(20_000), ReasonCode::TokenTooLarge),
        (
            "over the issuer's own limit",
            ec.token(&with(SMALL, |c| c["pad"] = json!(pad))),
            ReasonCode::TokenTooLarge,
        ),
        ("one part", "abc".into(), ReasonCode::TokenMalformed),
        ("two parts", "e30.e30".into(), ReasonCode::TokenMalformed),
        (
            "four parts",
            "e30.e30.AA.AA".into(),
            ReasonCode::TokenMalformed,
        ),
        (
            "empty signature",
            "e30.e30.".into(),
            ReasonCode::TokenMalformed,
        ),
        (
            "padding",
            "e30=.e30.AAAA".into(),
            ReasonCode::TokenMalformed,
        ),
        (
            "not base64",
            "!!!.e30.AAAA".into(),
            ReasonCode::TokenMalformed,
        ),
        (
            "bad base64 length",
            "e.e30.AAAA".into(),
            ReasonCode::TokenMalformed,
        ),
        (
            "header not json",
            format!("{}.e30.AAAA", b64("nope")),
            ReasonCode::TokenMalformed,
        ),
        (
            "header an array",
            format!("{}.e30.AAAA", b64("[]")),
            ReasonCode::TokenMalformed,
        ),
        (
            "payload an array",
            format!("{}.{}.AAAA", parts[0], b64("[1]")),
            ReasonCode::TokenMalformed,
        ),
        (
            "no alg",
            format!("{}.{}.AAAA", b64("{}"), good_payload_b64),
            ReasonCode::TokenMalformed,
        ),
        (
            "kid not a string",
            ec.sign(&json!({"alg": "ES256", "kid": 7}), &claims(MAIN)),
            ReasonCode::TokenMalformed,
        ),
        (
            "alg none",
            format!(
                "{}.{}.AAAA",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                good_payload_b64
            ),
            ReasonCode::AlgorithmNotAllowed,
        ),
        (
            "alg none, empty signature",
            format!("{}.{}.", b64(r#"{"alg":"none"}"#), good_payload_b64),
            ReasonCode::TokenMalformed,
        ),
        (
            "hs256 keyed with the rsa public key",
            hs_confused,
            ReasonCode::AlgorithmNotAllowed,
        ),
        (
            "rs256 at a ps256-only issuer",
            rsa.token(&claims(PS)),
            ReasonCode::AlgorithmNotAllowed,
        ),
        (
            "es256 against an rsa key",
            ec.sign(&es_on_rsa_kid, &claims(MAIN)),
            ReasonCode::AlgorithmNotAllowed,
        ),
        (
            "es256 zero signature",
            zero_sig,
            ReasonCode::SignatureInvalid,
        ),
        ("tampered payload", tampered, ReasonCode::SignatureInvalid),
        (
            "another key, same kid",
            other_ec.token(&claims(MAIN)),
            ReasonCode::SignatureInvalid,
        ),
        (
            "jku",
            hdr(json!({"jku": "https://evil.example/jwks"})),
            ReasonCode::TokenHeaderRejected,
        ),
        (
            "x5u",
            hdr(json!({"x5u": "https://evil.example/cert"})),
            ReasonCode::TokenHeaderRejected,
        ),
        (
            "jwk",
            hdr(json!({"jwk": ec.jwk.clone()})),
            ReasonCode::TokenHeaderRejected,
        ),
        (
            "x5c",
            hdr(json!({"x5c": ["MIIB"]})),
            ReasonCode::TokenHeaderRejected,
        ),
        (
            "crit",
            hdr(json!({"crit": ["exp"]})),
            ReasonCode::TokenHeaderRejected,
        ),
        (
            "typ lanyard+jwt",
            hdr(json!({"typ": "lanyard+jwt"})),
            ReasonCode::TokenTypeRejected,
        ),
        (
            "typ at+jwt",
            hdr(json!({"typ": "at+jwt"})),
            ReasonCode::TokenTypeRejected,
        ),
        (
            "typ a number",
            hdr(json!({"typ": 1})),
            ReasonCode::TokenTypeRejected,
        ),
        (
            "own issuer",
            ec.token(&claims(OWN)),
            ReasonCode::TokenTypeRejected,
        ),
        (
            "duplicate sub",
            raw_payload(
                &ec,
                &format!(
                    r#"{{"iss":"{MAIN}","sub":"a","sub":"b","aud":"lanyard","exp":{}}}"#,
                    NOW + 60
                ),
            ),
            ReasonCode::TokenDuplicateClaim,
        ),
        (
            "duplicate aud",
            raw_payload(
                &ec,
                &format!(
                    r#"{{"iss":"{MAIN}","sub":"a","aud":"x","aud":"lanyard","exp":{}}}"#,
                    NOW + 60
                ),
            ),
            ReasonCode::TokenDuplicateClaim,
        ),
        (
            "duplicate exp",
            raw_payload(
                &ec,
                &format!(
                    r#"{{"iss":"{MAIN}","sub":"a","aud":"lanyard","exp":1,"exp":{}}}"#,
                    NOW + 60
                ),
            ),
            ReasonCode::TokenDuplicateClaim,
        ),
        (
            "duplicate header kid",
            ec.sign_text(
                r#"{"alg":"ES256","kid":"rsa","kid":"ec"}"#,
                &claims(MAIN).to_string(),
            ),
            ReasonCode::TokenDuplicateClaim,
        ),
        (
            "iss null",
            ec.token(&with(MAIN, |c| c["iss"] = Value::Null)),
            ReasonCode::ClaimInvalid,
        ),
        (
            "missing exp",
            ec.token(&remove(claims(MAIN), "exp")),
            ReasonCode::ClaimMissing,
        ),
        (
            "missing aud",
            ec.token(&remove(claims(MAIN), "aud")),
            ReasonCode::ClaimMissing,
        ),
        (
            "missing sub",
            ec.token(&remove(claims(MAIN), "sub")),
            ReasonCode::ClaimMissing,
        ),
        (
            "no iss at all",
            ec.token(&remove(claims(MAIN), "iss")),
            ReasonCode::ClaimMissing,
        ),
        (
            "numeric aud",
            ec.token(&with(MAIN, |c| c["aud"] = json!(5))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "aud array with a number",
            ec.token(&with(MAIN, |c| c["aud"] = json!(["lanyard", 5]))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "exp a string",
            ec.token(&with(MAIN, |c| c["exp"] = json!("soon"))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "iss a number",
            ec.token(&with(MAIN, |c| c["iss"] = json!(7))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "sub a number",
            ec.token(&with(MAIN, |c| c["sub"] = json!(7))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "sub empty",
            ec.token(&with(MAIN, |c| c["sub"] = json!(""))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "jti a number",
            ec.token(&with(MAIN, |c| c["jti"] = json!(7))),
            ReasonCode::ClaimInvalid,
        ),
        (
            "unknown issuer",
            ec.token(&claims("https://nobody.example")),
            ReasonCode::IssuerUnknown,
        ),
        (
            "wrong audience",
            ec.token(&with(MAIN, |c| c["aud"] = json!(["someone-else"]))),
            ReasonCode::AudienceMismatch,
        ),
        (
            "unknown kid",
            hdr(json!({"kid": "nope"})),
            ReasonCode::KeyUnknown,
        ),
        (
            "no kid, two keys",
            ec.sign(&no_kid, &claims(MAIN)),
            ReasonCode::KeyUnknown,
        ),
    ];
    for (name, token, want) in cases {
        let got = verify(&v, &token).await;
        let err = match got {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => e,
        };
        assert_eq!(err.reason(), want, "{name}: {err}");
        let msg = err.to_string();
        assert!(
            !msg.contains(SUBJECT),
            "{name}: message leaks a claim: {msg}"
        );
        assert!(
            !msg.contains("nobody.example"),
            "{name}: message leaks iss: {msg}"
        );
        assert!(
            !msg.contains("evil"),
            "{name}: message leaks a header: {msg}"
        );
        if token.len() > 8 {
            assert!(!msg.contains(&token), "{name}: message leaks the token");
        }
    }

    // The sane neighbours of some refusals are accepted.
    let small_ok = ec.token(&claims(SMALL));
    assert!(small_ok.len() < 400);
    verify(&v, &small_ok).await.unwrap();
    let ps_key_token = {
        let mut h = rsa.header();
        h["alg"] = json!("PS256");
        sign_text_with_alg(&rsa, jsonwebtoken::Algorithm::PS256, &h, &claims(PS))
    };
    assert_eq!(
        verify(&v, &ps_key_token).await.unwrap().alg,
        Algorithm::PS256
    );
    for typ in ["jwt", "JOSE", "application/JWT"] {
        verify(&v, &hdr(json!({"typ": typ}))).await.unwrap();
    }
    let mut h = ec.header();
    h.as_object_mut().unwrap().remove("typ");
    verify(&v, &ec.sign(&h, &claims(MAIN))).await.unwrap();
    verify(&v, &ec.sign(&no_kid, &claims(SOLO))).await.unwrap();
    let multi = ec.token(&with(MAIN, |c| c["aud"] = json!(["x", "other-aud"])));
    assert_eq!(
        verify(&v, &multi).await.unwrap().aud,
        vec!["x", "other-aud"]
    );
}

fn remove(mut c: Value, key: &str) -> Value {
    c.as_object_mut().unwrap().remove(key);
    c
}

fn sign_text_with_alg(k: &TestKey, alg: jsonwebtoken::Algorithm, h: &Value, c: &Value) -> String {
    // Re-sign with the same RSA key material under another algorithm.
    sign_text_with(k.encoding_key(), alg, &h.to_string(), &c.to_string())
}

#[tokio::test]
async fn time_claims_use_the_injected_clock() {
    let Fixture { v, clock, ec, .. } = fixture();
    let t = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(MAIN);
        f(&mut c);
        ec.token(&c)
    };
    // exp: within the 30 s leeway passes, beyond it fails.
    verify(&v, &t(&|c| c["exp"] = json!(NOW - 30)))
        .await
        .unwrap();
    assert_eq!(
        reason(&v, &t(&|c| c["exp"] = json!(NOW - 31))).await,
        ReasonCode::TokenExpired
    );
    // Fractional NumericDates are accepted.
    verify(&v, &t(&|c| c["exp"] = json!(NOW as f64 + 10.5)))
        .await
        .unwrap();
    // nbf and iat in the future.
    verify(&v, &t(&|c| c["nbf"] = json!(NOW + 30)))
        .await
        .unwrap();
    assert_eq!(
        reason(&v, &t(&|c| c["nbf"] = json!(NOW + 31))).await,
        ReasonCode::TokenNotYetValid
    );
    assert_eq!(
        reason(&v, &t(&|c| c["iat"] = json!(NOW + 31))).await,
        ReasonCode::TokenNotYetValid
    );
    assert_eq!(
        reason(&v, &t(&|c| c["nbf"] = json!("later"))).await,
        ReasonCode::ClaimInvalid
    );
    // Moving the clock expires a token that was good.
    let good = ec.token(&claims(MAIN));
    verify(&v, &good).await.unwrap();
    clock.advance(600 + 31);
    assert_eq!(reason(&v, &good).await, ReasonCode::TokenExpired);
    clock.set(NOW);

    // max_token_age_secs (300 at `strict`) needs iat and bounds it.
    let st = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(STRICT);
        f(&mut c);
        ec.token(&c)
    };
    verify(
        &v,
        &st(&|c| {
            c["iat"] = json!(NOW - 300);
            c["jti"] = json!("age-ok");
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        reason(
            &v,
            &st(&|c| {
                c["iat"] = json!(NOW - 301);
                c["jti"] = json!("age-old");
            })
        )
        .await,
        ReasonCode::TokenTooOld
    );
    let no_iat = ec.token(&remove(with(STRICT, |c| c["jti"] = json!("no-iat")), "iat"));
    assert_eq!(reason(&v, &no_iat).await, ReasonCode::ClaimMissing);
}

#[tokio::test]
async fn replay_protection_is_single_use_and_fails_closed() {
    let Fixture { v, ec, .. } = fixture();
    let t = ec.token(&claims(STRICT));
    verify(&v, &t).await.unwrap();
    assert_eq!(reason(&v, &t).await, ReasonCode::TokenReplayed);
    verify(&v, &ec.token(&with(STRICT, |c| c["jti"] = json!("j-2"))))
        .await
        .unwrap();
    let no_jti = ec.token(&remove(claims(STRICT), "jti"));
    assert_eq!(reason(&v, &no_jti).await, ReasonCode::ClaimMissing);
    let long = ec.token(&with(STRICT, |c| c["jti"] = json!("j".repeat(300))));
    assert_eq!(reason(&v, &long).await, ReasonCode::ClaimInvalid);
    // A token refused earlier (bad signature) does not burn its jti.
    let other = TestKey::new(Algorithm::ES256, "ec");
    let forged = other.token(&with(STRICT, |c| c["jti"] = json!("j-3")));
    assert_eq!(reason(&v, &forged).await, ReasonCode::SignatureInvalid);
    verify(&v, &ec.token(&with(STRICT, |c| c["jti"] = json!("j-3"))))
        .await
        .unwrap();
    // Without replay protection the same token verifies twice.
    let m = ec.token(&claims(MAIN));
    verify(&v, &m).await.unwrap();
    verify(&v, &m).await.unwrap();
}

#[tokio::test]
async fn reusable_verification_neither_checks_nor_burns_the_jti() {
    let Fixture { v, ec, clock, .. } = fixture();
    let t = Secret::new(ec.token(&with(STRICT, |c| c["jti"] = json!("client-1"))));
    // A client credential verifies again and again...
    for _ in 0..3 {
        v.verify_reusable(&t).await.unwrap();
    }
    // ...and was not burnt for a subject-token use, which stays single-use.
    v.verify(&t).await.unwrap();
    assert_eq!(
        v.verify(&t).await.unwrap_err().reason(),
        ReasonCode::TokenReplayed
    );
    v.verify_reusable(&t).await.unwrap();
    // Every other check still applies: jti required, expiry.
    let no_jti = Secret::new(ec.token(&remove(claims(STRICT), "jti")));
    assert_eq!(
        v.verify_reusable(&no_jti).await.unwrap_err().reason(),
        ReasonCode::ClaimMissing
    );
    clock.advance(3600);
    assert_eq!(
        v.verify_reusable(&t).await.unwrap_err().reason(),
        ReasonCode::TokenExpired
    );
}

#[tokio::test]
async fn replay_guard_errors_fail_closed() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let clock = FakeClock::at(NOW);
    let shared: SharedClock = Arc::new(clock);
    let guard = Arc::new(InMemoryReplayGuard::new(Arc::clone(&shared), 1));
    let v = Verifier::new(settings(), shared, guard).unwrap();
    let mut cfg = issuer("strict", STRICT, inline(&[&ec]), &[Algorithm::ES256]);
    cfg.replay_protection = true;
    v.set_issuers(vec![cfg]);
    verify(&v, &ec.token(&claims(STRICT))).await.unwrap();
    let e = verify(&v, &ec.token(&with(STRICT, |c| c["jti"] = json!("j-2"))))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), ReasonCode::Internal);
}

#[tokio::test]
async fn oct_keys_in_a_fetched_jwks_are_refused() {
    let rsa = TestKey::new(Algorithm::RS256, "rsa");
    let server = TestIssuer::start(&[&rsa]).await;
    *server.knobs.jwks.lock().unwrap() = json!({"keys": [
        rsa.jwk.clone(),
        {"kty": "oct", "kid": "hmac", "k": b64(&rsa.public_der)},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa.jwk["n"].clone(), "e": "AQAB"},
    ]});
    let (v, _clock) = make(settings());
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::RS256],
    )]);
    let hs = sign_text_with(
        &EncodingKey::from_secret(&rsa.public_der),
        jsonwebtoken::Algorithm::HS256,
        &json!({"alg": "HS256", "kid": "hmac"}).to_string(),
        &claims("https://up.example").to_string(),
    );
    assert_eq!(reason(&v, &hs).await, ReasonCode::AlgorithmNotAllowed);
    let mut h = rsa.header();
    h["kid"] = json!("hmac");
    assert_eq!(
        reason(&v, &rsa.sign(&h, &claims("https://up.example"))).await,
        ReasonCode::KeyUnknown
    );
    h["kid"] = json!("enc");
    assert_eq!(
        reason(&v, &rsa.sign(&h, &claims("https://up.example"))).await,
        ReasonCode::KeyUnknown
    );
    verify(&v, &rsa.token(&claims("https://up.example")))
        .await
        .unwrap();
    assert_eq!(v.status()[0].kids, vec!["rsa".to_owned()]);
}

#[tokio::test]
async fn oversized_jwks_is_refused() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    *server.knobs.oversize.lock().unwrap() = Some(10_000);
    let mut s = settings();
    s.max_jwks_bytes = 4096;
    let (v, _clock) = make(s);
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let e = v.refresh("up").await.unwrap_err();
    assert_eq!(e.reason(), ReasonCode::IssuerUnavailable);
    assert!(e.to_string().contains("exceeds 4096 bytes"), "{e}");
    let st = &v.status()[0];
    assert!(st.last_error.as_deref().unwrap().contains("exceeds"));
    assert_eq!(st.key_count, 0);
    assert_eq!(
        reason(&v, &ec.token(&claims("https://up.example"))).await,
        ReasonCode::IssuerUnavailable
    );
}

/// A raw HTTP server that streams a chunked body (no content-length) of `total` bytes.
async fn chunked_server(total: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
                for _ in 0..total / 1024 {
                    if sock.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    url
}

#[tokio::test]
async fn oversized_chunked_jwks_is_cut_off() {
    let url = chunked_server(64 * 1024).await;
    let mut s = settings();
    s.max_jwks_bytes = 4096;
    let (v, _clock) = make(s);
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        KeySource::JwksUrl { url },
        &[Algorithm::ES256],
    )]);
    let e = v.refresh("up").await.unwrap_err();
    assert!(e.to_string().contains("exceeds 4096 bytes"), "{e}");
}

#[tokio::test]
async fn cache_control_sets_the_cache_lifetime() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    *server.knobs.cache_control.lock().unwrap() = Some("public, max-age=120".into());
    let (v, clock) = make(settings());
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let t = ec.token(&with("https://up.example", |c| {
        c["exp"] = json!(NOW + 3600)
    }));
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 1);
    let st = &v.status()[0];
    assert_eq!(st.fetched_at, Some(NOW));
    assert_eq!(st.expires_at, Some(NOW + 120));
    clock.advance(119);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 1, "still cached");
    clock.advance(2);
    assert!(v.status()[0].stale);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 2, "refetched after max-age");
    // no-store → min_cache (60 s).
    *server.knobs.cache_control.lock().unwrap() = Some("no-store".into());
    clock.advance(121);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 3);
    let st = &v.status()[0];
    assert_eq!(st.expires_at.unwrap() - st.fetched_at.unwrap(), 60);
    // No header → default_cache (300 s).
    *server.knobs.cache_control.lock().unwrap() = None;
    v.refresh("up").await.unwrap();
    let st = &v.status()[0];
    assert_eq!(st.expires_at.unwrap() - st.fetched_at.unwrap(), 300);
}

#[tokio::test]
async fn unknown_kid_refetches_once_per_cooldown() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    let (v, clock) = make(settings());
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let c = with("https://up.example", |c| c["exp"] = json!(NOW + 3600));
    verify(&v, &ec.token(&c)).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 1);
    let mut h = ec.header();
    h["kid"] = json!("unknown");
    let unknown = ec.sign(&h, &c);
    // Right after the first fetch the cooldown holds: no refetch.
    assert_eq!(reason(&v, &unknown).await, ReasonCode::KeyUnknown);
    assert_eq!(server.knobs.jwks_hits(), 1);
    clock.advance(11);
    for _ in 0..5 {
        assert_eq!(reason(&v, &unknown).await, ReasonCode::KeyUnknown);
    }
    assert_eq!(
        server.knobs.jwks_hits(),
        2,
        "exactly one refetch within the cooldown"
    );
    clock.advance(5);
    assert_eq!(reason(&v, &unknown).await, ReasonCode::KeyUnknown);
    assert_eq!(server.knobs.jwks_hits(), 2);
    clock.advance(6);
    assert_eq!(reason(&v, &unknown).await, ReasonCode::KeyUnknown);
    assert_eq!(server.knobs.jwks_hits(), 3);
    // Concurrent unknown-kid tokens share one refetch.
    clock.advance(11);
    let mut handles = Vec::new();
    for _ in 0..8 {
        let v = v.clone();
        let t = unknown.clone();
        handles.push(tokio::spawn(
            async move { verify(&v, &t).await.map(|_| ()) },
        ));
    }
    for h in handles {
        assert_eq!(
            h.await.unwrap().unwrap_err().reason(),
            ReasonCode::KeyUnknown
        );
    }
    assert_eq!(server.knobs.jwks_hits(), 4);
}

#[tokio::test]
async fn key_rotation_is_picked_up_and_removed_keys_refused() {
    let k1 = TestKey::new(Algorithm::ES256, "k1");
    let k2 = TestKey::new(Algorithm::ES256, "k2");
    let server = TestIssuer::start(&[&k1]).await;
    let (v, clock) = make(settings());
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let c = with("https://up.example", |c| c["exp"] = json!(NOW + 3600));
    verify(&v, &k1.token(&c)).await.unwrap();
    server.knobs.set_keys(&[&k2]);
    clock.advance(11);
    let vt = verify(&v, &k2.token(&c)).await.unwrap();
    assert_eq!(vt.kid.as_deref(), Some("k2"));
    assert_eq!(server.knobs.jwks_hits(), 2);
    assert_eq!(v.status()[0].kids, vec!["k2".to_owned()]);
    assert_eq!(reason(&v, &k1.token(&c)).await, ReasonCode::KeyUnknown);
    clock.advance(11);
    assert_eq!(reason(&v, &k1.token(&c)).await, ReasonCode::KeyUnknown);
    assert_eq!(
        server.knobs.jwks_hits(),
        3,
        "the removed kid caused one refetch"
    );
}

#[tokio::test]
async fn issuer_down_serves_last_known_good_until_max_staleness() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    let mut s = settings();
    s.max_staleness = Duration::from_secs(3600);
    let (v, clock) = make(s);
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let t = ec.token(&with("https://up.example", |c| {
        c["exp"] = json!(NOW + 7200)
    }));
    verify(&v, &t).await.unwrap();
    server.knobs.fail.store(true, Ordering::SeqCst);

    clock.advance(301);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 2, "tried to refresh");
    let st = &v.status()[0];
    assert!(st.stale);
    assert!(st.last_error.as_deref().unwrap().contains("503"), "{st:?}");
    // Within the failure cooldown no new fetch is attempted.
    clock.advance(5);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 2);
    clock.advance(10);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 3);
    // One success, then two failed refreshes; the counts say so, per issuer.
    assert_eq!(
        v.fetch_counts(),
        vec![(
            "up".to_string(),
            crate::FetchCounts {
                attempts: 3,
                failures: 2
            }
        )]
    );

    clock.set(NOW + 3601);
    let e = verify(&v, &t).await.unwrap_err();
    assert_eq!(e.reason(), ReasonCode::IssuerUnavailable);
    assert!(e.to_string().contains("staleness"), "{e}");

    server.knobs.fail.store(false, Ordering::SeqCst);
    clock.advance(11);
    verify(&v, &t).await.unwrap();
    let st = &v.status()[0];
    assert!(!st.stale);
    assert_eq!(st.last_error, None);
    let counts = v.fetch_counts()[0].1;
    assert_eq!(counts.attempts - counts.failures, 2, "{counts:?}");
    // Reconfiguring the issuer keeps its counts: they only grow.
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256, Algorithm::RS256],
    )]);
    assert_eq!(v.fetch_counts()[0].1, counts);
}

#[tokio::test]
async fn issuer_never_reached_is_unavailable_and_not_hammered() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    server.knobs.fail.store(true, Ordering::SeqCst);
    let (v, clock) = make(settings());
    v.set_issuers(vec![issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    )]);
    let t = ec.token(&claims("https://up.example"));
    assert_eq!(reason(&v, &t).await, ReasonCode::IssuerUnavailable);
    assert_eq!(reason(&v, &t).await, ReasonCode::IssuerUnavailable);
    assert_eq!(server.knobs.jwks_hits(), 1);
    clock.advance(10);
    server.knobs.fail.store(false, Ordering::SeqCst);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 2);
}

#[tokio::test]
async fn discovery_issuer_must_match_and_urls_must_be_https() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    *server.knobs.discovery_issuer.lock().unwrap() = "https://evil.example".into();
    let (v, _clock) = make(settings());
    v.set_issuers(vec![
        issuer(
            "disc",
            server.base(),
            KeySource::Discovery {
                url: format!("{}/.well-known/openid-configuration", server.base()),
            },
            &[Algorithm::ES256],
        ),
        issuer(
            "plain",
            "https://plain.example",
            KeySource::JwksUrl {
                url: "http://jwks.example.com/jwks".into(),
            },
            &[Algorithm::ES256],
        ),
    ]);
    let e = v.refresh("disc").await.unwrap_err();
    assert_eq!(e.reason(), ReasonCode::IssuerUnavailable);
    assert!(e.to_string().contains("does not equal"), "{e}");
    assert_eq!(
        server.knobs.jwks_hits(),
        0,
        "jwks_uri of a mismatched document is not fetched"
    );
    let e = v.refresh("plain").await.unwrap_err();
    assert!(e.to_string().contains("https is required"), "{e}");
    assert_eq!(
        v.refresh("nope").await.unwrap_err().reason(),
        ReasonCode::IssuerUnknown
    );
}

#[tokio::test]
async fn set_issuers_keeps_cached_keys_of_unchanged_issuers() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let server = TestIssuer::start(&[&ec]).await;
    let (v, _clock) = make(settings());
    let up = issuer(
        "up",
        "https://up.example",
        jwks_url(&server),
        &[Algorithm::ES256],
    );
    v.set_issuers(vec![up.clone()]);
    let t = ec.token(&claims("https://up.example"));
    verify(&v, &t).await.unwrap();
    let other = issuer(
        "other",
        "https://other.example",
        inline(&[&ec]),
        &[Algorithm::ES256],
    );
    v.set_issuers(vec![other.clone(), up.clone()]);
    verify(&v, &t).await.unwrap();
    let mut changed_aud = up.clone();
    changed_aud.audiences.push("more".into());
    v.set_issuers(vec![other.clone(), changed_aud.clone()]);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 1, "keys kept across set_issuers");
    let mut changed_url = changed_aud;
    changed_url.keys = KeySource::JwksUrl {
        url: format!("{}?v=2", server.jwks_url()),
    };
    v.set_issuers(vec![other, changed_url]);
    verify(&v, &t).await.unwrap();
    assert_eq!(server.knobs.jwks_hits(), 2, "a new key source is fetched");
    // Removing an issuer refuses its tokens.
    v.set_issuers(vec![]);
    assert_eq!(reason(&v, &t).await, ReasonCode::IssuerUnknown);
}

#[tokio::test]
async fn invalid_issuer_configs_are_refused_not_trusted() {
    let ec = TestKey::new(Algorithm::ES256, "ec");
    let (v, _clock) = make(settings());
    let mut bad = issuer(
        "bad",
        "https://bad.example",
        inline(&[&ec]),
        &[Algorithm::ES256],
    );
    bad.audiences.clear();
    let own = issuer("own", OWN, inline(&[&ec]), &[Algorithm::ES256]);
    let dup = issuer(
        "bad",
        "https://dup.example",
        inline(&[&ec]),
        &[Algorithm::ES256],
    );
    v.set_issuers(vec![bad, own, dup]);
    assert_eq!(
        reason(&v, &ec.token(&claims("https://bad.example"))).await,
        ReasonCode::IssuerUnavailable
    );
    assert_eq!(
        reason(&v, &ec.token(&claims("https://dup.example"))).await,
        ReasonCode::IssuerUnknown
    );
    assert_eq!(
        reason(&v, &ec.token(&claims(OWN))).await,
        ReasonCode::TokenTypeRejected
    );
    let status = v.status();
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|s| s.last_error.is_some()));
    assert_eq!(
        v.refresh("bad").await.unwrap_err().reason(),
        ReasonCode::ConfigInvalid
    );
}

#[tokio::test]
async fn a_slow_issuer_does_not_block_another() {
    let slow_key = TestKey::new(Algorithm::ES256, "slow");
    let fast_key = TestKey::new(Algorithm::ES256, "fast");
    let slow = TestIssuer::start(&[&slow_key]).await;
    let fast = TestIssuer::start(&[&fast_key]).await;
    slow.knobs.delay_ms.store(30_000, Ordering::SeqCst);
    let mut s = settings();
    s.http_timeout = Duration::from_secs(3);
    let (v, _clock) = make(s);
    v.set_issuers(vec![
        issuer(
            "slow",
            "https://slow.example",
            jwks_url(&slow),
            &[Algorithm::ES256],
        ),
        issuer(
            "fast",
            "https://fast.example",
            jwks_url(&fast),
            &[Algorithm::ES256],
        ),
    ]);
    let slow_token = slow_key.token(&claims("https://slow.example"));
    let mut hanging = Vec::new();
    for _ in 0..2 {
        let v = v.clone();
        let t = slow_token.clone();
        hanging.push(tokio::spawn(
            async move { verify(&v, &t).await.map(|_| ()) },
        ));
    }
    eventually("the slow issuer to be asked", || {
        slow.knobs.jwks_hits() >= 1
    })
    .await;

    let started = Instant::now();
    let fast_token = fast_key.token(&claims("https://fast.example"));
    let vt = tokio::time::timeout(Duration::from_millis(1500), verify(&v, &fast_token))
        .await
        .expect("verification for the fast issuer was blocked by the slow one")
        .unwrap();
    assert_eq!(vt.issuer, "fast");
    assert!(started.elapsed() < Duration::from_millis(1500));
    // Admin reads and issuer changes don't block either.
    assert_eq!(v.status().len(), 2);

    for h in hanging {
        let e = h.await.unwrap().unwrap_err();
        assert_eq!(e.reason(), ReasonCode::IssuerUnavailable);
        assert!(e.to_string().contains("timed out"), "{e}");
    }
    assert_eq!(
        slow.knobs.jwks_hits(),
        1,
        "fetches are single-flight per issuer"
    );
}

#[test]
fn settings_are_validated() {
    let clock: SharedClock = Arc::new(FakeClock::at(NOW));
    let guard = Arc::new(InMemoryReplayGuard::new(Arc::clone(&clock), 10));
    let mut s = settings();
    s.min_cache = Duration::from_secs(600);
    assert!(Verifier::new(s, Arc::clone(&clock), guard.clone()).is_err());
    let mut s = settings();
    s.own_issuer_url.clear();
    assert!(Verifier::new(s, Arc::clone(&clock), guard.clone()).is_err());
    let mut s = settings();
    s.http_timeout = Duration::ZERO;
    assert!(Verifier::new(s, clock, guard).is_err());
}

/// Every algorithm refuses a signature from another key with the same kid, and a
/// signature with one bit flipped (EC keys verify through their pre-parsed form).
#[tokio::test]
async fn forged_and_altered_signatures_are_refused_for_every_algorithm() {
    for alg in Algorithm::ALL {
        let key = TestKey::new(alg, "k");
        let impostor = TestKey::new(alg, "k");
        let (v, _clock) = make(settings());
        v.set_issuers(vec![issuer(
            "inline",
            "https://inline.example",
            inline(&[&key]),
            &[alg],
        )]);
        let good = key.token(&claims("https://inline.example"));
        verify(&v, &good)
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        let forged = impostor.token(&claims("https://inline.example"));
        assert_eq!(
            reason(&v, &forged).await,
            ReasonCode::SignatureInvalid,
            "{alg}"
        );
        let (signed, sig) = good.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[0] ^= 1;
        let altered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(
            reason(&v, &altered).await,
            ReasonCode::SignatureInvalid,
            "{alg}"
        );
    }
}
