//! The admin token: stored as its SHA-256 and checked in constant time.

use sha2::{Digest, Sha256};

/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The admin token. Only its SHA-256 digest is kept; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Validates `[admin] token`: absent or empty means no token (the admin API stays off);
    /// otherwise at least [`MIN_TOKEN_LEN`] characters without whitespace.
    pub fn from_config(token: Option<&str>) -> Result<Option<AdminToken>, String> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        if token.chars().count() < MIN_TOKEN_LEN {
            return Err(format!(
                "must be at least {MIN_TOKEN_LEN} characters (generate one with `openssl rand -hex 32`)"
            ));
        }
        if token.chars().any(char::is_whitespace) {
            return Err("must not contain whitespace".to_owned());
        }
        Ok(Some(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }))
    }

    /// Whether `presented` is the token. Both sides are hashed to 32 bytes first, so the
    /// comparison takes the same time whatever the length or content of `presented`.
    pub fn verify(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        constant_time_eq(&digest, &self.digest)
    }
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_rules_and_check() {
        assert_eq!(AdminToken::from_config(None), Ok(None));
        assert_eq!(AdminToken::from_config(Some("")), Ok(None));
        assert!(AdminToken::from_config(Some("short")).is_err());
        assert!(AdminToken::from_config(Some("has a space in it, sadly")).is_err());
        let t = AdminToken::from_config(Some("0123456789abcdef"))
            .unwrap()
            .unwrap();
        assert!(t.verify("0123456789abcdef"));
        assert!(!t.verify("0123456789abcdeF"));
        assert!(!t.verify(""));
        assert!(!format!("{t:?}").contains("0123"));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }
}
