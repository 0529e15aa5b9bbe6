//! [`Secret`] holds token text, credentials and keys. It has no `Debug`, `Display` or
//! `Serialize`, so a secret cannot reach a log line or a response by accident.

/// A secret string: subject tokens, issued credentials, private keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// Read the secret. Call sites are where a secret leaves the type; keep them few.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Take the secret out.
    pub fn into_inner(self) -> String {
        self.0
    }
    /// Length in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("eyJhbGciOi.secret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("17 bytes"));
    }
}
