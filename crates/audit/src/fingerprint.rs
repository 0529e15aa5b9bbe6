//! HMAC fingerprints: how an audit event names a token without containing it.
//!
//! `fingerprint(token) = "hmac-sha256:" + hex(HMAC-SHA256(key, token))` with a random
//! 32-byte key per deployment, as Vault's audit devices do. The key never leaves
//! lanyard; an auditor who holds a token asks lanyard (`lanyard audit fingerprint`) for
//! its fingerprint and searches the stream for it. Without the key, a fingerprint
//! cannot be linked to a token, and a token cannot be recovered from it.
//!
//! The key lives in a file readable by its owner only (`<data_dir>/audit-hmac.key` by
//! default). Replicas that share a database must share this file too, or their
//! fingerprints of the same token differ.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};

/// Prefix of every fingerprint, naming the algorithm.
pub const PREFIX: &str = "hmac-sha256:";
/// Key length in bytes.
pub const KEY_LEN: usize = 32;

/// Errors opening the fingerprint key.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// Reading or writing the key file failed.
    #[error("audit fingerprint key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable or writable by others than its owner.
    #[error(
        "audit fingerprint key {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file does not hold exactly [`KEY_LEN`] bytes.
    #[error("audit fingerprint key {path} holds {len} bytes, expected {KEY_LEN}")]
    Length {
        /// The key file.
        path: PathBuf,
        /// What it holds.
        len: usize,
    },
    /// The system random generator failed.
    #[error("generating the audit fingerprint key failed")]
    Random,
}

/// Computes fingerprints with one deployment key.
pub struct Fingerprinter {
    key: hmac::Key,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter { key: [redacted] }")
    }
}

impl Fingerprinter {
    /// A fingerprinter over `key` bytes (tests, or a key held elsewhere).
    pub fn from_key(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// Read the key at `path`, or create it (mode 0600, random bytes) if it does not
    /// exist. An existing key readable by others is refused, not fixed silently.
    ///
    /// # Errors
    /// [`FingerprintError`] saying what is wrong with the file.
    pub fn open_or_create(path: &Path) -> Result<Self, FingerprintError> {
        let io = |source| FingerprintError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                check_private(path)?;
                if bytes.len() != KEY_LEN {
                    return Err(FingerprintError::Length {
                        path: path.to_owned(),
                        len: bytes.len(),
                    });
                }
                Ok(Self::from_key(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| FingerprintError::Random)?;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    options.mode(0o600);
                }
                let mut file = options.open(path).map_err(io)?;
                file.write_all(&key).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(Self::from_key(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The fingerprint of `token`: `hmac-sha256:` and 64 hex digits.
    pub fn fingerprint(&self, token: &str) -> String {
        let tag = hmac::sign(&self.key, token.as_bytes());
        let mut out = String::with_capacity(PREFIX.len() + 64);
        out.push_str(PREFIX);
        out.push_str(&hex::encode(tag.as_ref()));
        out
    }
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), FingerprintError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|source| FingerprintError::Io {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(FingerprintError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), FingerprintError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_fingerprint_other_key_other() {
        let a = Fingerprinter::from_key(&[1; KEY_LEN]);
        let b = Fingerprinter::from_key(&[2; KEY_LEN]);
        let fa = a.fingerprint("eyJ.token.sig");
        assert!(fa.starts_with(PREFIX));
        assert_eq!(fa.len(), PREFIX.len() + 64);
        assert_eq!(fa, a.fingerprint("eyJ.token.sig"));
        assert_ne!(fa, a.fingerprint("eyJ.token.sih"));
        assert_ne!(fa, b.fingerprint("eyJ.token.sig"));
        assert!(!fa.contains("eyJ"));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit-hmac.key");
        let first = Fingerprinter::open_or_create(&path).unwrap();
        let again = Fingerprinter::open_or_create(&path).unwrap();
        assert_eq!(first.fingerprint("t"), again.fingerprint("t"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Fingerprinter::open_or_create(&path).unwrap_err();
            assert!(
                matches!(err, FingerprintError::Permissions { mode: 0o644, .. }),
                "{err}"
            );
        }
        std::fs::write(dir.path().join("short.key"), b"abc").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(
                dir.path().join("short.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        assert!(matches!(
            Fingerprinter::open_or_create(&dir.path().join("short.key")),
            Err(FingerprintError::Length { len: 3, .. })
        ));
    }
}
