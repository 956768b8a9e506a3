//! Hashing and sealing with SHA-256: the stable salted hash of `hash` mode, and the sealed
//! pseudonym map kept in the request-scoped metadata bag.
//!
//! The bag is shared with every plugin of the request and ends up in the `on-log` entry,
//! so the map of placeholders to original values must not sit there in clear text. It is
//! encrypted with a SHA-256 keystream (key from the salt, a fresh nonce per request) and
//! authenticated with an HMAC-style tag: a log or a plugin reading the bag sees only hex.

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

/// A key derived from the salt, for sealing.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Derives the sealing key from the configured salt.
    pub fn derive(salt: &str) -> SealKey {
        let mut h = Sha256::new();
        h.update(b"weir-redaction/seal/v1\0");
        h.update(salt.as_bytes());
        SealKey(h.finalize().into())
    }

    fn block(&self, nonce: &[u8], counter: u64) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(nonce);
        h.update(counter.to_le_bytes());
        h.finalize().into()
    }

    fn tag(&self, nonce: &[u8], ciphertext: &[u8]) -> [u8; 16] {
        let inner: [u8; 32] = Sha256::new()
            .chain_update(self.0)
            .chain_update(b"tag")
            .chain_update(nonce)
            .chain_update(ciphertext)
            .finalize()
            .into();
        let outer: [u8; 32] = Sha256::new()
            .chain_update(self.0)
            .chain_update(inner)
            .finalize()
            .into();
        let mut tag = [0; 16];
        tag.copy_from_slice(&outer[..16]);
        tag
    }

    fn xor(&self, nonce: &[u8], data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(32).enumerate() {
            let ks = self.block(nonce, i as u64);
            for (b, k) in chunk.iter_mut().zip(ks) {
                *b ^= k;
            }
        }
    }

    /// Encrypts `plain` under a nonce derived from `nonce_seed` (the request id), as hex.
    pub fn seal(&self, nonce_seed: &str, plain: &[u8]) -> String {
        let digest = Sha256::new()
            .chain_update(b"nonce")
            .chain_update(nonce_seed.as_bytes())
            .finalize();
        let nonce = &digest[..16];
        let mut data = plain.to_vec();
        self.xor(nonce, &mut data);
        let tag = self.tag(nonce, &data);
        let mut out = Vec::with_capacity(32 + data.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&data);
        hex(&out)
    }

    /// Decrypts what [`SealKey::seal`] produced; `None` if it was tampered with.
    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        let raw = unhex(sealed)?;
        if raw.len() < 32 {
            return None;
        }
        let (nonce, rest) = raw.split_at(16);
        let (tag, data) = rest.split_at(16);
        if self.tag(nonce, data) != tag {
            return None;
        }
        let mut plain = data.to_vec();
        self.xor(nonce, &mut plain);
        Some(plain)
    }
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

fn unhex(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let key = SealKey::derive("0123456789abcdef");
        let sealed = key.seal("req-1", b"<EMAIL_1>=jane@example.com");
        assert!(!sealed.contains("jane"));
        assert_eq!(
            key.open(&sealed).as_deref(),
            Some(&b"<EMAIL_1>=jane@example.com"[..])
        );
        let mut bad = sealed.into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(key.open(&String::from_utf8(bad).expect("utf8")), None);
        assert_eq!(SealKey::derive("another salt 123").open("00"), None);
    }

    #[test]
    fn hash_is_stable_and_salted() {
        let a = stable_hash("salt-one-16chars", "email", "a@b.co");
        assert_eq!(a, stable_hash("salt-one-16chars", "email", "a@b.co"));
        assert_ne!(a, stable_hash("salt-two-16chars", "email", "a@b.co"));
        assert_eq!(a.len(), 12);
    }
}
