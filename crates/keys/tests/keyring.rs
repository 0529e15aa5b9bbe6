//! Key ring behaviour against a real temp directory: files and permissions, persistence,
//! signing verified through the published JWKS, and the rotation timeline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
use lanyard_core::{FakeClock, SharedClock};
use lanyard_destination::TokenMinter;
use lanyard_keys::{
    KeyError, KeyRing, KeyRingMinter, KeyState, METADATA_FILE, SigningAlgorithm, discovery_document,
};
use serde_json::json;

const T0: i64 = 1_750_000_000;
const HOUR: u64 = 3600;

fn clock() -> (FakeClock, SharedClock) {
    let c = FakeClock::at(T0);
    (c.clone(), Arc::new(c))
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.p8"))
}

fn kids_in_jwks(ring: &KeyRing) -> Vec<String> {
    ring.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Verify `token` with the JWKS entry its `kid` names; returns the claims and the kid.
fn verify(ring: &KeyRing, token: &str) -> (serde_json::Value, String) {
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.clone().unwrap();
    let jwks = ring.jwks();
    let entry = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap()
        .clone();
    let alg: jsonwebtoken::Algorithm = serde_json::from_value(entry["alg"].clone()).unwrap();
    assert_eq!(header.alg, alg);
    let jwk: Jwk = serde_json::from_value(entry).unwrap();
    let key = DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = Validation::new(alg);
    v.validate_exp = false; // the fake clock is not the wall clock jsonwebtoken reads
    v.required_spec_claims.clear();
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).unwrap();
    (data.claims, kid)
}

fn active_kid(ring: &KeyRing) -> String {
    let token = ring.sign("JWT", &json!({"sub": "x"})).unwrap();
    verify(ring, token.expose()).1
}

#[test]
fn open_creates_private_dir_key_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/keys");
    let (_, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::default(), c).unwrap();

    assert_eq!(mode(&dir), 0o700);
    let keys = ring.list();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k.alg, SigningAlgorithm::ES256);
    assert_eq!((k.created_at, k.activate_at, k.retired_at), (T0, T0, None));
    assert_eq!(k.state, KeyState::Active);
    assert_eq!(mode(&key_path(&dir, &k.kid)), 0o600);
    assert_eq!(mode(&dir.join(METADATA_FILE)), 0o600);

    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(METADATA_FILE)).unwrap()).unwrap();
    assert_eq!(meta["format"], 1);
    assert_eq!(meta["keys"][0]["kid"], k.kid.as_str());
    assert_eq!(meta["keys"][0]["alg"], "ES256");
    assert_eq!(meta["keys"][0]["state"], "active");
    assert!(
        meta["keys"][0]["jwk"].get("d").is_none(),
        "no private part in metadata"
    );
    // Nothing else (no temp files) is left behind.
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![format!("{}.p8", k.kid), METADATA_FILE.to_owned()];
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn reopen_keeps_keys_and_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (fake, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap();
    let first = ring.list();
    fake.advance(10);
    let next = ring.rotate(Duration::from_secs(HOUR)).unwrap();
    let before = ring.list();
    let jwks = ring.jwks();
    drop(ring);

    // Reopening, even asking for another algorithm, keeps what exists.
    let again = KeyRing::open(&dir, SigningAlgorithm::EdDSA, c.clone()).unwrap();
    assert_eq!(again.list(), before);
    assert_eq!(again.jwks(), jwks);
    assert_eq!(active_kid(&again), first[0].kid);

    // The schedule continues after the restart.
    fake.advance(HOUR as i64);
    assert_eq!(active_kid(&again), next.kid);
    drop(again);
    let third = KeyRing::open(&dir, SigningAlgorithm::EdDSA, c).unwrap();
    assert_eq!(active_kid(&third), next.kid);
    // New keys use the algorithm the ring was opened with.
    assert_eq!(
        third.rotate(Duration::ZERO).unwrap().alg,
        SigningAlgorithm::EdDSA
    );
}

#[test]
fn insecure_permissions_are_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (_, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap();
    let kid = ring.list()[0].kid.clone();
    drop(ring);

    let key = key_path(&dir, &kid);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap_err();
    assert!(
        matches!(err, KeyError::InsecurePermissions { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&key.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("chmod 600 {}", key.display())),
        "{msg}"
    );
    assert!(msg.contains("0644"), "{msg}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    let meta = dir.join(METADATA_FILE);
    fs::set_permissions(&meta, fs::Permissions::from_mode(0o640)).unwrap();
    let msg = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("chmod 600 {}", meta.display())),
        "{msg}"
    );
    fs::set_permissions(&meta, fs::Permissions::from_mode(0o600)).unwrap();

    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let msg = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("chmod 700 {}", dir.display())),
        "{msg}"
    );
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();

    // A stray, readable key file not even listed in keys.json is refused too.
    let stray = dir.join("stray.p8");
    fs::write(&stray, b"x").unwrap();
    fs::set_permissions(&stray, fs::Permissions::from_mode(0o604)).unwrap();
    assert!(KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).is_err());
    fs::remove_file(&stray).unwrap();

    KeyRing::open(&dir, SigningAlgorithm::ES256, c).unwrap();
}

#[test]
fn existing_insecure_dir_is_refused_and_not_a_dir_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
    let (_, c) = clock();
    let err = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap_err();
    assert!(err.to_string().contains("chmod 700"), "{err}");
    assert!(
        fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing written"
    );

    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        KeyRing::open(&file, SigningAlgorithm::ES256, c).unwrap_err(),
        KeyError::NotADirectory(_)
    ));
}

#[test]
fn missing_or_tampered_state_is_an_error_not_a_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (_, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap();
    let kid = ring.list()[0].kid.clone();
    drop(ring);

    // keys.json gone, key file present.
    let meta = fs::read(dir.join(METADATA_FILE)).unwrap();
    fs::remove_file(dir.join(METADATA_FILE)).unwrap();
    let err = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap_err();
    assert!(matches!(err, KeyError::Metadata { .. }), "{err:?}");

    // Restored metadata, key file gone.
    fs::write(dir.join(METADATA_FILE), &meta).unwrap();
    fs::set_permissions(dir.join(METADATA_FILE), fs::Permissions::from_mode(0o600)).unwrap();
    let der = fs::read(key_path(&dir, &kid)).unwrap();
    fs::remove_file(key_path(&dir, &kid)).unwrap();
    let err = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap_err();
    assert!(matches!(err, KeyError::KeyMaterial { .. }), "{err:?}");

    // A different key under that name is detected.
    let other = tempfile::tempdir().unwrap();
    let other_ring =
        KeyRing::open(&other.path().join("k"), SigningAlgorithm::ES256, c.clone()).unwrap();
    let other_kid = other_ring.list()[0].kid.clone();
    fs::copy(
        key_path(&other.path().join("k"), &other_kid),
        key_path(&dir, &kid),
    )
    .unwrap();
    let err = KeyRing::open(&dir, SigningAlgorithm::ES256, c.clone()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    fs::write(key_path(&dir, &kid), &der).unwrap();
    KeyRing::open(&dir, SigningAlgorithm::ES256, c).unwrap();
}

#[test]
fn sign_and_verify_through_jwks_for_both_algorithms() {
    for alg in SigningAlgorithm::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let (_, c) = clock();
        let ring = KeyRing::open(&tmp.path().join("keys"), *alg, c).unwrap();
        ring.self_test().unwrap();

        let claims = json!({"sub": "spiffe://lanyard.local/x", "aud": "a", "n": 1});
        let token = ring.sign("at+jwt", &claims).unwrap();
        let header = jsonwebtoken::decode_header(token.expose()).unwrap();
        assert_eq!(header.alg, alg.jwt_algorithm());
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.kid.as_deref(), Some(ring.list()[0].kid.as_str()));
        let (got, _) = verify(&ring, token.expose());
        assert_eq!(got, claims);

        let jwks = ring.jwks();
        let k = &jwks["keys"][0];
        match alg {
            SigningAlgorithm::ES256 => {
                assert_eq!(
                    (k["kty"].as_str(), k["crv"].as_str()),
                    (Some("EC"), Some("P-256"))
                );
                assert!(k["y"].is_string());
            }
            SigningAlgorithm::EdDSA => {
                assert_eq!(
                    (k["kty"].as_str(), k["crv"].as_str()),
                    (Some("OKP"), Some("Ed25519"))
                );
                assert!(k.get("y").is_none());
            }
        }
        assert_eq!(k["use"], "sig");
        assert_eq!(k["alg"], alg.as_str());
        assert!(k.get("d").is_none());

        assert!(matches!(
            ring.sign("JWT", &json!(["not", "an", "object"])),
            Err(KeyError::InvalidClaims)
        ));
    }
}

#[test]
fn rotation_timeline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (fake, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::ES256, c).unwrap();
    ring.set_retire_after(Duration::from_secs(2 * HOUR));
    assert_eq!(ring.retire_after(), Duration::from_secs(2 * HOUR));
    let old = ring.list()[0].kid.clone();

    fake.advance(100);
    let new = ring.rotate(Duration::from_secs(HOUR)).unwrap();
    assert_eq!(new.state, KeyState::Pending);
    assert_eq!(new.activate_at, T0 + 100 + HOUR as i64);
    // Published at once, but the old key still signs.
    assert_eq!(kids_in_jwks(&ring), vec![old.clone(), new.kid.clone()]);
    assert_eq!(active_kid(&ring), old);
    let l = ring.list();
    assert_eq!(l[0].retired_at, Some(new.activate_at));
    assert_eq!(
        (l[0].state, l[1].state),
        (KeyState::Active, KeyState::Pending)
    );

    // One second before activation: still the old key.
    fake.set(new.activate_at - 1);
    assert_eq!(active_kid(&ring), old);
    // At activation the new key signs; the old one stays published.
    fake.set(new.activate_at);
    assert_eq!(active_kid(&ring), new.kid);
    assert_eq!(kids_in_jwks(&ring), vec![old.clone(), new.kid.clone()]);
    let l = ring.list();
    assert_eq!(
        (l[0].state, l[1].state),
        (KeyState::Retiring, KeyState::Active)
    );

    // Until the retire window after it stopped signing has passed.
    fake.set(new.activate_at + 2 * HOUR as i64 - 1);
    assert_eq!(kids_in_jwks(&ring), vec![old.clone(), new.kid.clone()]);
    fake.set(new.activate_at + 2 * HOUR as i64);
    assert_eq!(kids_in_jwks(&ring), vec![new.kid.clone()]);
    assert_eq!(ring.list()[0].state, KeyState::Retired);
    assert_eq!(active_kid(&ring), new.kid);

    // The old private key is deleted at the next open; its record stays for audit.
    assert!(key_path(&dir, &old).exists());
    let (_, c2) = {
        let f = FakeClock::at(new.activate_at + 2 * HOUR as i64);
        (f.clone(), Arc::new(f) as SharedClock)
    };
    let reopened = KeyRing::open(&dir, SigningAlgorithm::ES256, c2).unwrap();
    assert!(!key_path(&dir, &old).exists());
    assert!(key_path(&dir, &new.kid).exists());
    // The retire window is configuration, not state: the default applies after a
    // reopen until the server sets it again.
    assert_eq!(reopened.retire_after(), lanyard_keys::DEFAULT_RETIRE_AFTER);
    assert_eq!(reopened.list()[0].state, KeyState::Retiring);
    reopened.set_retire_after(Duration::from_secs(2 * HOUR));
    let l = reopened.list();
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].kid.as_str(), l[0].state),
        (old.as_str(), KeyState::Retired)
    );
    assert_eq!(kids_in_jwks(&reopened), vec![new.kid.clone()]);
}

#[test]
fn immediate_rotation_and_superseded_pending_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (fake, c) = clock();
    let ring = KeyRing::open(&dir, SigningAlgorithm::EdDSA, c).unwrap();
    let a = ring.list()[0].kid.clone();

    let b = ring.rotate(Duration::from_secs(HOUR)).unwrap();
    fake.advance(600);
    // A second rotation that activates sooner supersedes the pending key.
    let cc = ring.rotate(Duration::ZERO).unwrap();
    assert_eq!(cc.state, KeyState::Active);
    assert_eq!(active_kid(&ring), cc.kid);
    let l = ring.list();
    assert_eq!(l[0].retired_at, Some(T0 + 600));
    assert_eq!(l[1].retired_at, Some(T0 + 600));
    assert_eq!(
        (l[0].state, l[1].state),
        (KeyState::Retiring, KeyState::Retiring)
    );
    // Stopped keys' private files are gone right away; their public keys stay published.
    assert!(!key_path(&dir, &a).exists());
    assert!(!key_path(&dir, &b.kid).exists());
    assert_eq!(
        kids_in_jwks(&ring),
        vec![a.clone(), b.kid.clone(), cc.kid.clone()]
    );
    // When B's original activation time comes, C keeps signing.
    fake.set(b.activate_at + 1);
    assert_eq!(active_kid(&ring), cc.kid);

    // Rotated keys never reuse a kid.
    let mut kids: HashSet<String> = ring.list().into_iter().map(|k| k.kid).collect();
    for _ in 0..5 {
        assert!(kids.insert(ring.rotate(Duration::ZERO).unwrap().kid));
    }
    assert_eq!(ring.list().len(), 8);
}

#[test]
fn minter_signs_with_the_ring_and_discovery_lists_published_algorithms() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = clock();
    let ring = Arc::new(KeyRing::open(&tmp.path().join("k"), SigningAlgorithm::EdDSA, c).unwrap());
    let minter = KeyRingMinter::new(ring.clone(), "https://lanyard.example");
    assert_eq!(minter.issuer_url(), "https://lanyard.example");
    let token = minter
        .mint(&json!({"iss": minter.issuer_url()}), "at+jwt")
        .unwrap();
    let (claims, _) = verify(&ring, token.expose());
    assert_eq!(claims["iss"], "https://lanyard.example");
    assert!(minter.mint(&json!(1), "JWT").is_err());

    let doc = discovery_document(minter.issuer_url(), &ring.published_algorithms());
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["EdDSA"])
    );
    // Debug shows no key material.
    let shown = format!("{ring:?}");
    assert!(shown.contains("kids"), "{shown}");
}
