//! lanyard's own signing keys: generated and stored on disk with private permissions,
//! rotated with overlap, published as a JWKS and an OIDC discovery document, and used to
//! sign the tokens lanyard issues as an OIDC issuer.
//!
//! - [`KeyRing`] owns the key directory, the rotation schedule and signing.
//! - [`KeyRingMinter`] is the `TokenMinter` destination adapters sign with.
//! - [`SealKey`] is the `Sealer` adapters keep secrets for later with (AES-256-GCM).
//! - [`discovery_document`] is what `/.well-known/openid-configuration` serves.
//!
//! Keys are ES256 (default) or EdDSA, never RSA (RUSTSEC-2023-0071).

mod alg;
mod discovery;
mod fs;
mod material;
mod minter;
mod ring;
mod seal;

use std::path::PathBuf;

use lanyard_core::UnixTime;

pub use alg::{SigningAlgorithm, UnsupportedAlgorithm};
pub use discovery::{DISCOVERY_PATH, INTROSPECTION_PATH, JWKS_PATH, discovery_document};
pub use minter::KeyRingMinter;
pub use ring::{
    DEFAULT_RETIRE_AFTER, KEY_FILE_EXTENSION, KeyInfo, KeyRing, KeyState, METADATA_FILE,
    install_crypto_provider,
};
pub use seal::{SEAL_KEY_LEN, SealKey};

/// Errors from the key ring.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file or the directory is accessible by group or others.
    #[error("{} is accessible by group or others (mode {mode:04o}); fix it with `{fix}`", path.display())]
    InsecurePermissions {
        /// The offending path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The command that fixes it.
        fix: String,
    },
    /// The key directory path exists but is not a directory.
    #[error("key directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A key or metadata path is not a regular file (a symlink, say).
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// Reading or writing the key directory failed.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `keys.json` is unreadable or inconsistent.
    #[error("key metadata {} is invalid: {message}", path.display())]
    Metadata {
        /// Path of `keys.json`.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key file is missing or is not the key its metadata describes.
    #[error("signing key {kid}: {message}")]
    KeyMaterial {
        /// The key.
        kid: String,
        /// What is wrong.
        message: String,
    },
    /// Generating a key pair failed.
    #[error("generating a signing key failed: {0}")]
    Generate(String),
    /// No key is active at `now` (only possible if the clock moved back).
    #[error("no signing key is active at {now}")]
    NoActiveKey {
        /// The time asked about, Unix seconds.
        now: UnixTime,
    },
    /// The claims to sign are not a JSON object.
    #[error("claims to sign must be a json object")]
    InvalidClaims,
    /// The seal key is unusable (wrong length, no randomness).
    #[error("seal key: {0}")]
    Seal(String),
    /// Signing failed (serializing the header or claims, or the signature itself).
    #[error("signing failed: {0}")]
    Sign(String),
    /// The startup self-test failed.
    #[error("signing self-test failed: {0}")]
    SelfTest(String),
}

/// `Result` with [`KeyError`].
pub type Result<T, E = KeyError> = std::result::Result<T, E>;
