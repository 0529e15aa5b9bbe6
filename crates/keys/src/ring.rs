//! [`KeyRing`]: the signing keys on disk, their rotation schedule, signing with the key
//! active now, and the JWKS that publishes them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lanyard_core::{Secret, SharedClock, UnixTime};
use serde::{Deserialize, Serialize};

use crate::fs::{self as kfs, io_err};
use crate::material::{self, KeyMaterial, Signer};
use crate::{KeyError, Result, SigningAlgorithm};

/// Name of the metadata file in the key directory.
pub const METADATA_FILE: &str = "keys.json";
/// Extension of private key files (`<kid>.p8`, PKCS#8 DER).
pub const KEY_FILE_EXTENSION: &str = "p8";
/// How long a key stays published after it stopped signing, unless changed with
/// [`KeyRing::set_retire_after`].
pub const DEFAULT_RETIRE_AFTER: Duration = Duration::from_secs(24 * 3600);

const METADATA_FORMAT: u32 = 1;
/// Attempts at a key whose `kid` is not already in the ring (a collision is a 2^-128
/// event; the bound only keeps the loop finite).
const GENERATE_ATTEMPTS: usize = 4;

/// Where a key is in its life. See [`KeyRing`] for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published, not yet signing.
    Pending,
    /// Published and signing.
    Active,
    /// Published, no longer signing; tokens it signed still verify.
    Retiring,
    /// Dropped from the JWKS; kept in `keys.json` for audit.
    Retired,
}

/// What lanyard says about one key. Never includes private material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Key ID, as in the JWS header and the JWKS.
    pub kid: String,
    /// Signing algorithm.
    pub alg: SigningAlgorithm,
    /// When the key was generated (and published), Unix seconds.
    pub created_at: UnixTime,
    /// When it starts (or started) signing.
    pub activate_at: UnixTime,
    /// When it stops (or stopped) signing: its successor's `activate_at`.
    pub retired_at: Option<UnixTime>,
    /// State now.
    pub state: KeyState,
}

/// One entry of `keys.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    kid: String,
    alg: SigningAlgorithm,
    created_at: UnixTime,
    activate_at: UnixTime,
    retired_at: Option<UnixTime>,
    /// Snapshot as of the last write; recomputed on read.
    state: KeyState,
    /// The public key, so the JWKS can still be served after the `.p8` is deleted.
    jwk: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataFile {
    format: u32,
    keys: Vec<KeyRecord>,
}

struct Entry {
    record: KeyRecord,
    /// `None` once the key stopped signing and its private key was dropped.
    signer: Option<Signer>,
}

struct Inner {
    /// In creation order.
    entries: Vec<Entry>,
    retire_after: Duration,
}

/// lanyard's signing keys: load, generate, rotate with overlap, sign, publish.
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
///
/// # Schedule
/// Every key has `activate_at` (when it starts signing) and, once a successor exists,
/// `retired_at` (when it stops signing: the successor's `activate_at`). From those and
/// the ring's `retire_after` window its [`KeyState`] follows:
///
/// | state      | when                                            | in JWKS | signs |
/// |------------|-------------------------------------------------|---------|-------|
/// | `pending`  | `now < activate_at`                             | yes     | no    |
/// | `active`   | `activate_at <= now < retired_at`               | yes     | yes   |
/// | `retiring` | `retired_at <= now < retired_at + retire_after` | yes     | no    |
/// | `retired`  | `retired_at + retire_after <= now`              | no      | no    |
///
/// A rotation publishes the new key at once, so relying parties can fetch it before the
/// first token signed with it arrives. A rotation ends the signing of every older key at
/// the new key's activation at the latest, so a rotation that activates sooner than a
/// still-pending key supersedes it. `retired_at` only ever moves earlier, and exactly one
/// key is active at any time after the first one was created.
///
/// # On disk
/// `dir` (mode 0700) holds `<kid>.p8` (PKCS#8 DER, mode 0600) per key that may still sign
/// and `keys.json` (mode 0600) with every key's schedule and public JWK. Once a key has
/// stopped signing its private key can never be used again, so its `.p8` file is
/// **deleted** at the next open or rotation; its entry (with the public JWK) stays in
/// `keys.json` for audit. The `state` written to `keys.json` is a snapshot as of the last
/// write; lanyard always recomputes it from the timestamps. One process owns a directory
/// at a time.
pub struct KeyRing {
    dir: PathBuf,
    alg: SigningAlgorithm,
    clock: SharedClock,
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .read()
            .entries
            .iter()
            .map(|e| e.record.kid.clone())
            .collect();
        f.debug_struct("KeyRing")
            .field("dir", &self.dir)
            .field("alg", &self.alg)
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn state_at(r: &KeyRecord, now: UnixTime, retire_after: Duration) -> KeyState {
    match r.retired_at {
        Some(stop) if now >= stop => {
            if now < stop.saturating_add(secs(retire_after)) {
                KeyState::Retiring
            } else {
                KeyState::Retired
            }
        }
        _ if now >= r.activate_at => KeyState::Active,
        _ => KeyState::Pending,
    }
}

fn stopped_signing(r: &KeyRecord, now: UnixTime) -> bool {
    r.retired_at.is_some_and(|stop| now >= stop)
}

fn key_file_name(kid: &str) -> String {
    format!("{kid}.{KEY_FILE_EXTENSION}")
}

impl KeyRing {
    /// Open the key directory `dir`, creating it (mode 0700) and a first key of `alg` if
    /// needed. `alg` is the algorithm of keys generated from now on; existing keys keep
    /// theirs.
    ///
    /// Also installs aws-lc-rs as `jsonwebtoken`'s crypto provider unless one is already
    /// installed, so a feature mix-up elsewhere in the build cannot make signing panic.
    ///
    /// # Errors
    /// - [`KeyError::InsecurePermissions`] if `dir`, `keys.json` or a `.p8` file is
    ///   accessible by group or others (the message names the `chmod` that fixes it);
    /// - [`KeyError::NotADirectory`], [`KeyError::NotAFile`];
    /// - [`KeyError::Metadata`] if `keys.json` is unreadable, inconsistent with the key
    ///   files, or missing while key files exist;
    /// - [`KeyError::KeyMaterial`] if a key file is missing or does not parse;
    /// - [`KeyError::Io`], [`KeyError::Generate`].
    pub fn open(dir: &Path, alg: SigningAlgorithm, clock: SharedClock) -> Result<KeyRing> {
        install_crypto_provider();
        kfs::ensure_private_dir(dir)?;
        let now = clock.now_unix();
        let meta_path = dir.join(METADATA_FILE);

        // Look at everything in the directory first: loose permissions on any key file
        // are refused even for keys we would not load.
        let mut key_files = HashSet::new();
        let mut have_metadata = false;
        for (name, path) in kfs::list_dir(dir)? {
            if name.starts_with('.') && name.ends_with(kfs::TMP_SUFFIX) {
                tracing::info!(path = %path.display(), "removing leftover temporary file");
                kfs::remove_if_present(&path)?;
            } else if name == METADATA_FILE {
                kfs::check_private_file(&path)?;
                have_metadata = true;
            } else if let Some(kid) = name.strip_suffix(&format!(".{KEY_FILE_EXTENSION}")) {
                kfs::check_private_file(&path)?;
                key_files.insert(kid.to_owned());
            }
        }

        let records = if have_metadata {
            read_metadata(&meta_path)?
        } else if !key_files.is_empty() {
            return Err(KeyError::Metadata {
                path: meta_path,
                message: format!(
                    "missing, but {} key file(s) exist; restore it from backup or move the key files away to start afresh",
                    key_files.len()
                ),
            });
        } else {
            Vec::new()
        };

        let mut dirty = !have_metadata;
        let mut entries = Vec::with_capacity(records.len());
        let mut kids = HashSet::new();
        for record in records {
            if !material::is_valid_kid(&record.kid) || !kids.insert(record.kid.clone()) {
                return Err(KeyError::Metadata {
                    path: meta_path,
                    message: format!("invalid or duplicate kid {:?}", record.kid),
                });
            }
            let key_path = dir.join(key_file_name(&record.kid));
            let has_file = key_files.remove(&record.kid);
            if stopped_signing(&record, now) {
                if has_file {
                    tracing::info!(kid = %record.kid, path = %key_path.display(),
                        "deleting the private key of a key that no longer signs");
                    kfs::remove_if_present(&key_path)?;
                    dirty = true;
                }
                entries.push(Entry {
                    record,
                    signer: None,
                });
                continue;
            }
            if !has_file {
                return Err(KeyError::KeyMaterial {
                    kid: record.kid,
                    message: format!("private key file {} is missing", key_path.display()),
                });
            }
            let der = std::fs::read(&key_path).map_err(io_err(&key_path))?;
            let loaded = material::from_pkcs8(record.alg, &der).map_err(|message| {
                KeyError::KeyMaterial {
                    kid: record.kid.clone(),
                    message,
                }
            })?;
            if loaded.kid != record.kid || loaded.jwk != record.jwk {
                return Err(KeyError::KeyMaterial {
                    kid: record.kid,
                    message: format!(
                        "{} does not match its entry in {METADATA_FILE}",
                        key_path.display()
                    ),
                });
            }
            entries.push(Entry {
                record,
                signer: Some(loaded.signer),
            });
        }
        for orphan in &key_files {
            tracing::warn!(kid = %orphan, dir = %dir.display(),
                "key file not listed in keys.json is ignored (left by an interrupted rotation?)");
        }

        let ring = KeyRing {
            dir: dir.to_path_buf(),
            alg,
            clock,
            inner: RwLock::new(Inner {
                entries,
                retire_after: DEFAULT_RETIRE_AFTER,
            }),
        };
        {
            let mut inner = ring.write();
            if inner.entries.is_empty() {
                let (mat, der) = generate_unique(alg, &inner.entries)?;
                ring.write_key_file(&mat.kid, &der)?;
                let info = ring.new_entry(&mut inner, mat, now, now);
                tracing::info!(kid = %info.kid, alg = %alg, "generated the first signing key");
                dirty = true;
            }
            let snapshot_changed = inner
                .entries
                .iter()
                .any(|e| e.record.state != state_at(&e.record, now, inner.retire_after));
            if dirty || snapshot_changed {
                ring.persist(&inner.records_at(now))?;
            }
        }
        Ok(ring)
    }

    /// The directory the ring lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The algorithm of keys this ring generates.
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.alg
    }

    /// How long a key stays in the JWKS after it stopped signing. Should exceed the
    /// longest lifetime of a token lanyard signs, plus relying parties' clock skew.
    pub fn retire_after(&self) -> Duration {
        self.read().retire_after
    }

    /// Change the retire window (default [`DEFAULT_RETIRE_AFTER`]). Not persisted: the
    /// server sets it from configuration after every open.
    pub fn set_retire_after(&self, window: Duration) {
        self.write().retire_after = window;
    }

    /// Generate a new key, publish it in the JWKS now, and make it the signing key at
    /// `now + activate_after`. The key signing until then stops at that moment and stays
    /// published for the retire window after it.
    ///
    /// # Errors
    /// [`KeyError::Generate`], [`KeyError::Io`]. On error nothing changed: the ring and
    /// `keys.json` are as before.
    pub fn rotate(&self, activate_after: Duration) -> Result<KeyInfo> {
        let now = self.clock.now_unix();
        let activate_at = now.saturating_add(secs(activate_after));
        let mut inner = self.write();
        let (mat, der) = generate_unique(self.alg, &inner.entries)?;
        let kid = mat.kid.clone();
        self.write_key_file(&kid, &der)?;

        // Build the new schedule, persist it, and only then change memory.
        let mut records = inner.records_at(now);
        for r in &mut records {
            r.retired_at = Some(
                r.retired_at
                    .map_or(activate_at, |stop| stop.min(activate_at)),
            );
        }
        let mut new_record = KeyRecord {
            kid: kid.clone(),
            alg: self.alg,
            created_at: now,
            activate_at,
            retired_at: None,
            state: KeyState::Pending,
            jwk: mat.jwk.clone(),
        };
        new_record.state = state_at(&new_record, now, inner.retire_after);
        records.push(new_record);
        for r in &mut records {
            r.state = state_at(r, now, inner.retire_after);
        }
        if let Err(e) = self.persist(&records) {
            if let Err(cleanup) = kfs::remove_if_present(&self.dir.join(key_file_name(&kid))) {
                tracing::warn!(error = %cleanup, kid = %kid, "could not remove the key file of a failed rotation");
            }
            return Err(e);
        }
        for (entry, record) in inner.entries.iter_mut().zip(records.iter()) {
            entry.record = record.clone();
        }
        let info = self.new_entry(&mut inner, mat, now, activate_at);
        tracing::info!(kid = %info.kid, alg = %self.alg, activate_at, "rotated signing key");
        self.drop_stopped_keys(&mut inner, now);
        Ok(info)
    }

    /// Every key the ring knows, oldest first, with its state now.
    pub fn list(&self) -> Vec<KeyInfo> {
        let now = self.clock.now_unix();
        let inner = self.read();
        inner
            .entries
            .iter()
            .map(|e| info_of(&e.record, state_at(&e.record, now, inner.retire_after)))
            .collect()
    }

    /// The published key set: `{"keys": [...]}` with every pending, active and retiring
    /// key's public JWK, oldest first. Never private material.
    pub fn jwks(&self) -> serde_json::Value {
        let now = self.clock.now_unix();
        let inner = self.read();
        let keys: Vec<serde_json::Value> = inner
            .entries
            .iter()
            .filter(|e| state_at(&e.record, now, inner.retire_after) != KeyState::Retired)
            .map(|e| e.record.jwk.clone())
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Every key's public JWK, retired ones included, oldest first: what verifies
    /// something lanyard signed long ago, such as an audit checkpoint. Not for
    /// publishing (retired keys must not verify new tokens).
    pub fn all_public_jwks(&self) -> serde_json::Value {
        let inner = self.read();
        let keys: Vec<serde_json::Value> =
            inner.entries.iter().map(|e| e.record.jwk.clone()).collect();
        serde_json::json!({ "keys": keys })
    }

    /// The algorithms of the published keys, for discovery's
    /// `id_token_signing_alg_values_supported`.
    pub fn published_algorithms(&self) -> Vec<SigningAlgorithm> {
        let now = self.clock.now_unix();
        let inner = self.read();
        let mut algs: Vec<SigningAlgorithm> = inner
            .entries
            .iter()
            .filter(|e| state_at(&e.record, now, inner.retire_after) != KeyState::Retired)
            .map(|e| e.record.alg)
            .collect();
        algs.sort();
        algs.dedup();
        algs
    }

    /// Sign `claims` (a JSON object) with the key active now. The header carries `alg`,
    /// `kid` and `typ` = `header_typ`.
    ///
    /// # Errors
    /// [`KeyError::InvalidClaims`] if `claims` is not an object, [`KeyError::NoActiveKey`]
    /// if no key is active (the clock moved back before the first key), [`KeyError::Sign`].
    pub fn sign(&self, header_typ: &str, claims: &serde_json::Value) -> Result<Secret> {
        if !claims.is_object() {
            return Err(KeyError::InvalidClaims);
        }
        let now = self.clock.now_unix();
        let inner = self.read();
        let (record, key) = inner
            .entries
            .iter()
            .rev()
            .find(|e| state_at(&e.record, now, inner.retire_after) == KeyState::Active)
            .and_then(|e| e.signer.as_ref().map(|k| (&e.record, k)))
            .ok_or(KeyError::NoActiveKey { now })?;
        let header = serde_json::json!({
            "alg": record.alg.as_str(),
            "kid": record.kid,
            "typ": header_typ,
        });
        let header = serde_json::to_vec(&header).map_err(|e| KeyError::Sign(e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| KeyError::Sign(e.to_string()))?;
        let mut token = String::with_capacity((header.len() + payload.len()) * 4 / 3 + 96);
        URL_SAFE_NO_PAD.encode_string(&header, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = key.sign(token.as_bytes()).map_err(KeyError::Sign)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok(Secret::new(token))
    }

    /// Sign one token and verify it against the published JWKS. The server calls this at
    /// start: a crypto-provider mix-up (TOOLCHAIN §5) then fails startup, not the first
    /// exchange.
    ///
    /// # Errors
    /// [`KeyError::SelfTest`] saying which step failed, or the signing error.
    pub fn self_test(&self) -> Result<()> {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.self_test_inner()));
        match outcome {
            Ok(result) => result,
            Err(_) => Err(KeyError::SelfTest(
                "the JWT crypto backend panicked; check that exactly one jsonwebtoken crypto provider is configured".into(),
            )),
        }
    }

    fn self_test_inner(&self) -> Result<()> {
        let now = self.clock.now_unix();
        let claims = serde_json::json!({
            "iss": "lanyard-self-test", "sub": "lanyard-self-test", "aud": "lanyard-self-test",
            "iat": now, "exp": now.saturating_add(60),
            "jti": uuid::Uuid::new_v4().simple().to_string(),
        });
        let token = self.sign("JWT", &claims)?;
        let fail =
            |step: &str, e: &dyn std::fmt::Display| KeyError::SelfTest(format!("{step}: {e}"));
        let header = jsonwebtoken::decode_header(token.expose())
            .map_err(|e| fail("reading the header", &e))?;
        let kid = header
            .kid
            .ok_or_else(|| KeyError::SelfTest("the header has no kid".into()))?;
        let jwks = self.jwks();
        let jwk_value = jwks["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["kid"] == kid.as_str()))
            .cloned()
            .ok_or_else(|| KeyError::SelfTest(format!("kid {kid} is not in the JWKS")))?;
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(jwk_value).map_err(|e| fail("parsing the JWK", &e))?;
        let key =
            jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| fail("loading the JWK", &e))?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        // Only the signature path is under test; the clock may be a fake one.
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<serde_json::Value>(token.expose(), &key, &validation)
            .map_err(|e| fail("verifying the signature", &e))?;
        if data.claims != claims {
            return Err(KeyError::SelfTest(
                "claims changed in the round trip".into(),
            ));
        }
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // State is replaced only after persisting succeeded, so a panic elsewhere
        // cannot leave it half-updated; a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_key_file(&self, kid: &str, der: &[u8]) -> Result<()> {
        kfs::write_private_atomic(&self.dir, &key_file_name(kid), der)
    }

    fn persist(&self, records: &[KeyRecord]) -> Result<()> {
        let file = MetadataFile {
            format: METADATA_FORMAT,
            keys: records.to_vec(),
        };
        let path = self.dir.join(METADATA_FILE);
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Metadata {
            path: path.clone(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        kfs::write_private_atomic(&self.dir, METADATA_FILE, &bytes)
    }

    fn new_entry(
        &self,
        inner: &mut Inner,
        mat: KeyMaterial,
        now: UnixTime,
        activate_at: UnixTime,
    ) -> KeyInfo {
        let mut record = KeyRecord {
            kid: mat.kid,
            alg: self.alg,
            created_at: now,
            activate_at,
            retired_at: None,
            state: KeyState::Pending,
            jwk: mat.jwk,
        };
        record.state = state_at(&record, now, inner.retire_after);
        let info = info_of(&record, record.state);
        inner.entries.push(Entry {
            record,
            signer: Some(mat.signer),
        });
        info
    }

    /// Forget the private key of every key that stopped signing and delete its file.
    /// Failures are logged: the key is out of use either way, and open retries.
    fn drop_stopped_keys(&self, inner: &mut Inner, now: UnixTime) {
        for entry in &mut inner.entries {
            if entry.signer.is_some() && stopped_signing(&entry.record, now) {
                entry.signer = None;
                let path = self.dir.join(key_file_name(&entry.record.kid));
                match kfs::remove_if_present(&path) {
                    Ok(()) => tracing::info!(kid = %entry.record.kid,
                        "deleted the private key of a key that no longer signs"),
                    Err(e) => tracing::warn!(error = %e, "could not delete a retired private key"),
                }
            }
        }
    }
}

impl Inner {
    /// The records with their state as of `now`.
    fn records_at(&self, now: UnixTime) -> Vec<KeyRecord> {
        self.entries
            .iter()
            .map(|e| {
                let mut r = e.record.clone();
                r.state = state_at(&r, now, self.retire_after);
                r
            })
            .collect()
    }
}

fn info_of(r: &KeyRecord, state: KeyState) -> KeyInfo {
    KeyInfo {
        kid: r.kid.clone(),
        alg: r.alg,
        created_at: r.created_at,
        activate_at: r.activate_at,
        retired_at: r.retired_at,
        state,
    }
}

fn read_metadata(path: &Path) -> Result<Vec<KeyRecord>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let file: MetadataFile = serde_json::from_slice(&bytes).map_err(|e| KeyError::Metadata {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if file.format != METADATA_FORMAT {
        return Err(KeyError::Metadata {
            path: path.to_path_buf(),
            message: format!(
                "unsupported format {}, expected {METADATA_FORMAT}",
                file.format
            ),
        });
    }
    Ok(file.keys)
}

fn generate_unique(alg: SigningAlgorithm, existing: &[Entry]) -> Result<(KeyMaterial, Vec<u8>)> {
    for _ in 0..GENERATE_ATTEMPTS {
        let (mat, der) = material::generate(alg).map_err(KeyError::Generate)?;
        if existing.iter().all(|e| e.record.kid != mat.kid) {
            return Ok((mat, der));
        }
    }
    Err(KeyError::Generate(
        "kept generating a kid already in use".into(),
    ))
}

/// Make aws-lc-rs `jsonwebtoken`'s process-wide crypto provider unless one is installed.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want either way.
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}
