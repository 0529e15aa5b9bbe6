//! [`SealKey`]: lanyard's [`Sealer`], AES-256-GCM under a 32-byte key file (mode 0600,
//! created on first start, refused when others can read it).
//!
//! A sealed value is `v1.<key id>.<base64url(nonce || ciphertext || tag)>`: a fresh
//! random 96-bit nonce per value, the caller's `aad` authenticated with it, and the key
//! id (the first 8 bytes of SHA-256 over the key, hex) so a value sealed under another
//! key is refused by name instead of failing as "altered". Replicas sharing a database
//! must share the key file, as they share the signing keys.
//!
//! Written on aws-lc-rs's AEAD (already lanyard's crypto provider) rather than a
//! separate crate: sealing is the one call `LessSafeKey::seal_in_place_append_tag`.

use std::io::Write as _;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lanyard_core::Secret;
use lanyard_destination::{SealError, Sealer};
use sha2::{Digest as _, Sha256};

use crate::fs::{check_private_file, io_err};
use crate::{KeyError, Result};

/// Length of the key file.
pub const SEAL_KEY_LEN: usize = 32;
const VERSION: &str = "v1";

/// An AES-256-GCM sealing key.
pub struct SealKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SealKey {
    /// A key from raw bytes (tests, or a key held elsewhere).
    ///
    /// # Errors
    /// [`KeyError::Seal`] if `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| KeyError::Seal("a seal key must be 32 bytes".into()))?;
        let digest = Sha256::digest(bytes);
        Ok(Self {
            key: LessSafeKey::new(unbound),
            id: hex(&digest[..8]),
        })
    }

    /// Read the key at `path`, or create it (random, mode 0600) if it does not exist. A
    /// key file others can read, a symlink, or one of the wrong length is refused.
    ///
    /// # Errors
    /// [`KeyError`] naming the file and the problem.
    pub fn open_or_create(path: &Path) -> Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => {
                check_private_file(path)?;
                let bytes = std::fs::read(path).map_err(io_err(path))?;
                if bytes.len() != SEAL_KEY_LEN {
                    return Err(KeyError::Seal(format!(
                        "{} holds {} bytes; a seal key is {SEAL_KEY_LEN}",
                        path.display(),
                        bytes.len()
                    )));
                }
                Self::from_bytes(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; SEAL_KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| KeyError::Seal("no randomness for a seal key".into()))?;
                // Written whole to a temporary file, then linked into place: a crash never
                // leaves a short key, and of two servers starting at once exactly one
                // key wins (link fails if the name exists) and both use it.
                use std::os::unix::fs::OpenOptionsExt as _;
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io_err(&tmp))?;
                file.write_all(&key).map_err(io_err(&tmp))?;
                file.sync_all().map_err(io_err(&tmp))?;
                drop(file);
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Self::from_bytes(&key),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::open_or_create(path)
                    }
                    Err(e) => Err(io_err(path)(e)),
                }
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// The key id sealed values carry.
    pub fn id(&self) -> &str {
        &self.id
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sealer for SealKey {
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> std::result::Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError("no randomness for a nonce".into()))?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| SealError("sealing failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(format!(
            "{VERSION}.{}.{}",
            self.id,
            URL_SAFE_NO_PAD.encode(out)
        ))
    }

    fn open(&self, sealed: &str, aad: &[u8]) -> std::result::Result<Secret, SealError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(VERSION), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError("not a sealed value (v1.<key id>.<data>)".into()));
        };
        if id != self.id {
            return Err(SealError(format!(
                "sealed under key {id}, not this server's seal key {}; replicas must share the seal key file",
                self.id
            )));
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError("sealed value is not base64url".into()))?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError("sealed value is too short".into()));
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError("bad nonce".into()))?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| {
                SealError("sealed value was altered or belongs to another record".into())
            })?;
        let text =
            std::str::from_utf8(plain).map_err(|_| SealError("sealed value is not text".into()))?;
        Ok(Secret::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn seals_and_opens_bound_to_aad() {
        let k = SealKey::from_bytes(&[7u8; 32]).unwrap();
        let a = k.seal(b"token-1", b"grant-a").unwrap();
        let b = k.seal(b"token-1", b"grant-a").unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(a.starts_with(&format!("v1.{}.", k.id())));
        assert!(!a.contains("token-1"));
        assert_eq!(k.open(&a, b"grant-a").unwrap().expose(), "token-1");
        assert!(k.open(&a, b"grant-b").is_err(), "bound to its record");
        let mut altered = a.clone();
        altered.pop();
        altered.push(if a.ends_with('A') { 'B' } else { 'A' });
        assert!(k.open(&altered, b"grant-a").is_err());
        let other = SealKey::from_bytes(&[8u8; 32]).unwrap();
        let err = other.open(&a, b"grant-a").unwrap_err().to_string();
        assert!(err.contains("share the seal key"), "{err}");
        for bad in [
            "",
            "v1",
            "v2.x.y",
            &format!("v1.{}.!!", k.id()),
            &format!("v1.{}.AAAA", k.id()),
        ] {
            assert!(k.open(bad, b"grant-a").is_err(), "{bad}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let first = SealKey::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SealKey::open_or_create(&path).unwrap();
        assert_eq!(first.id(), again.id());
        let sealed = first.seal(b"x", b"").unwrap();
        assert_eq!(again.open(&sealed, b"").unwrap().expose(), "x");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SealKey::open_or_create(&path).is_err(), "loose permissions");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(SealKey::open_or_create(&path).is_err(), "wrong length");
    }
}
