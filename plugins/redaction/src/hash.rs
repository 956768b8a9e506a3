//! The stable salted hash of `hash` mode.
//!
//! (Before contract 0.2 this module also sealed the pseudonym map into the request's
//! metadata bag, which every plugin and the log entry see; the map now lives in the
//! plugin's request scratch, private to it and never logged, so nothing needs sealing.)

use sha2::{Digest, Sha256};

/// `hash`-mode digest: the first 12 hex digits of SHA-256(salt, detector, value).
pub fn stable_hash(salt: &str, detector: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(detector.as_bytes());
    h.update([0]);
    h.update(value.as_bytes());
    hex(&h.finalize()[..6])
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_salted() {
        let a = stable_hash("salt-one-16chars", "email", "a@b.co");
        assert_eq!(a, stable_hash("salt-one-16chars", "email", "a@b.co"));
        assert_ne!(a, stable_hash("salt-two-16chars", "email", "a@b.co"));
        assert_eq!(a.len(), 12);
    }
}
