//! The detectors: one candidate regex per kind of PII, a validator that rejects
//! look-alikes (Luhn for cards, mod-97 for IBANs, SSA ranges for SSNs, a real parser for
//! IPv6...), and a [`Scanner`] that runs them all over a text.
//!
//! Speed: the scanner first runs one [`RegexSet`] over the text (a single pass with a lazy
//! DFA) to learn which detectors can match at all; only those run their own regex and
//! validator. Clean text, the common case, costs that one pass.
//!
//! The regexes are compiled in ASCII mode over bytes (`\d`, `\w`, `\s` are ASCII), which
//! keeps Unicode tables out of the WASM binary; matches are snapped to UTF-8 character
//! boundaries before anyone slices the text.
//!
//! We use `regex-automata`'s meta regex (the engine behind `regex`) without its `std`
//! feature: its lazy DFA then keys states in a `BTreeMap` instead of a `HashMap`, whose
//! `RandomState` would ask WASI for a random seed (which the gateway's sandbox refuses).

use regex_automata::meta::{self, Regex};
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind, PatternSet};

/// A built-in kind of PII or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Builtin {
    /// Private key blocks (PEM `-----BEGIN ... PRIVATE KEY-----`).
    PrivateKey,
    /// JSON Web Tokens (`eyJ...` header `.` payload `.` signature).
    Jwt,
    /// Anthropic API keys (`sk-ant-...`).
    AnthropicKey,
    /// OpenAI API keys (`sk-...`, `sk-proj-...`).
    OpenaiKey,
    /// AWS access key ids (`AKIA...`, `ASIA...`).
    AwsAccessKey,
    /// E-mail addresses.
    Email,
    /// IBANs, checked with the country length and mod-97.
    Iban,
    /// Payment card numbers, checked with Luhn and the issuer prefix.
    CreditCard,
    /// US social security numbers in valid SSA ranges.
    Ssn,
    /// IPv6 addresses (checked by a real parser).
    Ipv6,
    /// IPv4 addresses.
    Ipv4,
    /// Phone numbers (international `+..`, North American, European national formats).
    Phone,
}

impl Builtin {
    /// Every built-in detector, in priority order: when two matches overlap, the one of
    /// the detector listed first wins (a JWT inside a private key block is part of the
    /// key; an e-mail's digits are not a phone number).
    pub const ALL: [Builtin; 12] = [
        Builtin::PrivateKey,
        Builtin::Jwt,
        Builtin::AnthropicKey,
        Builtin::OpenaiKey,
        Builtin::AwsAccessKey,
        Builtin::Email,
        Builtin::Iban,
        Builtin::CreditCard,
        Builtin::Ssn,
        Builtin::Ipv6,
        Builtin::Ipv4,
        Builtin::Phone,
    ];

    /// The config name (`credit_card`...).
    pub fn name(self) -> &'static str {
        match self {
            Builtin::PrivateKey => "private_key",
            Builtin::Jwt => "jwt",
            Builtin::AnthropicKey => "anthropic_key",
            Builtin::OpenaiKey => "openai_key",
            Builtin::AwsAccessKey => "aws_access_key",
            Builtin::Email => "email",
            Builtin::Iban => "iban",
            Builtin::CreditCard => "credit_card",
            Builtin::Ssn => "ssn",
            Builtin::Ipv6 => "ipv6",
            Builtin::Ipv4 => "ipv4",
            Builtin::Phone => "phone",
        }
    }

    /// Looks a detector up by its config name.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether this is a secret (credential) rather than personal data; the config
    /// group `secrets` addresses all of them.
    pub fn is_secret(self) -> bool {
        matches!(
            self,
            Builtin::PrivateKey
                | Builtin::Jwt
                | Builtin::AnthropicKey
                | Builtin::OpenaiKey
                | Builtin::AwsAccessKey
        )
    }

    /// The candidate regex (ASCII mode). Validators in [`Builtin::accept`] refine it.
    fn pattern(self) -> &'static str {
        match self {
            Builtin::PrivateKey => concat!(
                r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
                r"(?:[A-Za-z0-9+/=\s:,.()-]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
                r"|[A-Za-z0-9+/=\s:,.()-]*)"
            ),
            Builtin::Jwt => r"eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{10,}",
            Builtin::AnthropicKey => r"sk-ant-[A-Za-z0-9_-]{20,}",
            Builtin::OpenaiKey => r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
            Builtin::AwsAccessKey => r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}",
            Builtin::Email => r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}",
            Builtin::Iban => {
                r"[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)"
            }
            Builtin::CreditCard => r"[0-9](?:[ -]?[0-9]){12,18}",
            Builtin::Ssn => r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4}",
            Builtin::Ipv6 => r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?:\.[0-9]{1,3}){3})?",
            Builtin::Ipv4 => concat!(
                r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}",
                r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
            ),
            Builtin::Phone => concat!(
                // International: +, then 8 to 15 digits with light punctuation.
                r"\+[1-9](?:[ .()-]{0,2}[0-9]){7,14}",
                // North American: (415) 555-0100, 415-555-0100, 1 415.555.0100.
                r"|(?:1[ .-]?)?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}",
                // European national formats: 020 7946 0958, 030-1234567, 06 12 34 56 78.
                r"|0[1-9][0-9]{1,3}[ -][0-9]{3,4}[ -]?[0-9]{3,4}",
                r"|0[1-9](?:[ .][0-9]{2}){4}"
            ),
        }
    }

    /// Whether the candidate `m` at `start..end` of `text` is the real thing; returns the
    /// accepted span (IBANs may be trimmed to their country's length).
    fn accept(self, text: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
        let m = &text[start..end];
        let before = start.checked_sub(1).map(|i| text[i]);
        let after = text.get(end).copied();
        let alnum = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        let digit = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_digit());
        let ok = match self {
            Builtin::PrivateKey => true,
            Builtin::Jwt | Builtin::AnthropicKey => !is_token_byte(before) && !is_token_byte(after),
            Builtin::OpenaiKey => {
                !is_token_byte(before)
                    && !is_token_byte(after)
                    && !m.starts_with(b"sk-ant-")
                    && m[3..].iter().any(u8::is_ascii_digit)
                    && m[3..].iter().any(u8::is_ascii_alphabetic)
            }
            Builtin::AwsAccessKey => !alnum(before) && !alnum(after),
            Builtin::Email => {
                let tld_start = m.iter().rposition(|&c| c == b'.').map_or(0, |i| i + 1);
                let at = m.iter().position(|&c| c == b'@').unwrap_or(0);
                !alnum(after)
                    && m[..at].iter().any(u8::is_ascii_alphanumeric)
                    && !is_file_extension(&m[tld_start..])
            }
            Builtin::Iban => return iban_span(text, start, end),
            Builtin::CreditCard => {
                !digit(before)
                    && !digit(after)
                    && before != Some(b'-')
                    && after != Some(b'-')
                    && valid_card(m)
            }
            Builtin::Ssn => {
                !digit(before)
                    && !digit(after)
                    && before != Some(b'-')
                    && after != Some(b'-')
                    && valid_ssn(m)
            }
            Builtin::Ipv6 => {
                !is_token_byte(before)
                    && !is_token_byte(after)
                    && before != Some(b':')
                    && valid_ipv6(m)
            }
            Builtin::Ipv4 => {
                !alnum(before)
                    && before != Some(b'.')
                    && !digit(after)
                    && (after != Some(b'.') || !digit(text.get(end + 1).copied()))
                    && !preceded_by_version(&text[..start])
            }
            Builtin::Phone => {
                !alnum(before)
                    && before != Some(b'+')
                    && !alnum(after)
                    && (after != Some(b'-') || !digit(text.get(end + 1).copied()))
            }
        };
        ok.then_some((start, end))
    }
}

/// Which detector found something: a built-in or a custom pattern from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A built-in detector.
    Builtin(Builtin),
    /// The custom pattern at this index of the config's `custom` list.
    Custom(usize),
}

/// One detected span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Which detector found it.
    pub kind: Kind,
    /// Byte offset of the first byte (a character boundary).
    pub start: usize,
    /// Byte offset one past the last byte (a character boundary).
    pub end: usize,
}

/// A custom detector from config: a name and an ASCII-mode regex.
#[derive(Debug, Clone)]
pub struct CustomPattern {
    /// The detector name used in masks, block messages and metrics.
    pub name: String,
    /// The regex source.
    pub pattern: String,
}

/// Errors building a [`Scanner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannerError(pub String);

impl std::fmt::Display for ScannerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A compiled set of detectors.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// One pass telling which detectors may match (all patterns, overlapping semantics).
    set: Regex,
    /// The detectors, in set order (built-ins in priority order, then custom ones).
    detectors: Vec<(Kind, Regex)>,
}

/// The regex size limit for custom patterns (bytes of compiled program).
const SIZE_LIMIT: usize = 2 << 20;

/// Compiles `patterns` in ASCII byte mode; `all` reports every matching pattern (for the
/// prefilter set) instead of the leftmost-first match.
fn compile<P: AsRef<str>>(patterns: &[P], all: bool) -> Result<Regex, String> {
    let kind = if all {
        MatchKind::All
    } else {
        MatchKind::LeftmostFirst
    };
    Regex::builder()
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        .configure(
            meta::Config::new()
                .match_kind(kind)
                .utf8_empty(false)
                .nfa_size_limit(Some(SIZE_LIMIT * patterns.len().max(1))),
        )
        .build_many(patterns)
        .map_err(|e| e.to_string())
}

impl Scanner {
    /// Compiles the given built-ins (in [`Builtin::ALL`] priority order whatever the
    /// order given) and custom patterns.
    pub fn new(builtins: &[Builtin], custom: &[CustomPattern]) -> Result<Scanner, ScannerError> {
        let mut detectors = Vec::new();
        let mut sources = Vec::new();
        for b in Builtin::ALL.into_iter().filter(|b| builtins.contains(b)) {
            let re = compile(&[b.pattern()], false)
                .map_err(|e| ScannerError(format!("built-in detector {}: {e}", b.name())))?;
            detectors.push((Kind::Builtin(b), re));
            sources.push(b.pattern().to_owned());
        }
        for (i, c) in custom.iter().enumerate() {
            let re = compile(&[c.pattern.as_str()], false).map_err(|e| {
                ScannerError(format!(
                    "custom detector {:?}: invalid pattern: {e}",
                    c.name
                ))
            })?;
            if re.is_match(b"") {
                return Err(ScannerError(format!(
                    "custom detector {:?}: the pattern matches the empty string",
                    c.name
                )));
            }
            detectors.push((Kind::Custom(i), re));
            sources.push(c.pattern.clone());
        }
        let set =
            compile(&sources, true).map_err(|e| ScannerError(format!("detector set: {e}")))?;
        Ok(Scanner { set, detectors })
    }

    /// Whether no detector is enabled.
    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
    }

    /// Every accepted finding in `text`, sorted by position, without overlaps (on overlap
    /// the detector with the higher priority wins, then the longer match).
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        if self.detectors.is_empty() || text.is_empty() {
            return Vec::new();
        }
        let bytes = text.as_bytes();
        let mut hits = PatternSet::new(self.set.pattern_len());
        self.set
            .which_overlapping_matches(&Input::new(bytes), &mut hits);
        if hits.is_empty() {
            return Vec::new();
        }
        let mut found = Vec::new();
        for idx in hits.iter() {
            let (kind, re) = &self.detectors[idx.as_usize()];
            for m in re.find_iter(bytes) {
                let span = match kind {
                    Kind::Builtin(b) => b.accept(bytes, m.start(), m.end()),
                    Kind::Custom(_) => Some((m.start(), m.end())),
                };
                if let Some((start, end)) = span.and_then(|(s, e)| snap(text, s, e)) {
                    found.push(Finding {
                        kind: *kind,
                        start,
                        end,
                    });
                }
            }
        }
        resolve_overlaps(found)
    }
}

/// Shrinks `start..end` to UTF-8 character boundaries; `None` if nothing is left.
fn snap(text: &str, mut start: usize, mut end: usize) -> Option<(usize, usize)> {
    while start < end && !text.is_char_boundary(start) {
        start += 1;
    }
    while end > start && !text.is_char_boundary(end) {
        end -= 1;
    }
    (start < end).then_some((start, end))
}

/// Keeps non-overlapping findings: sorted by start; on overlap the higher-priority
/// detector (custom patterns first, then [`Builtin::ALL`] order) wins, then the longer.
fn resolve_overlaps(mut found: Vec<Finding>) -> Vec<Finding> {
    let rank = |k: Kind| match k {
        Kind::Custom(i) => (0, i),
        Kind::Builtin(b) => (1, b as usize),
    };
    found.sort_by(|a, b| {
        rank(a.kind)
            .cmp(&rank(b.kind))
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<Finding> = Vec::with_capacity(found.len());
    for f in found {
        if kept.iter().all(|k| f.end <= k.start || f.start >= k.end) {
            kept.push(f);
        }
    }
    kept.sort_by_key(|f| f.start);
    kept
}

/// Bytes that continue a token (keys, JWTs): letters, digits, `_`, `-`.
fn is_token_byte(c: Option<u8>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `icon@2x.png` is a file name, not an address.
fn is_file_extension(tld: &[u8]) -> bool {
    const EXTENSIONS: [&[u8]; 8] = [
        b"png", b"jpg", b"jpeg", b"gif", b"svg", b"webp", b"pdf", b"ico",
    ];
    EXTENSIONS.iter().any(|e| tld.eq_ignore_ascii_case(e))
}

/// `version 1.2.3.4` and `build 1.2.3.4` are versions, not addresses (`v1.2.3.4` is
/// already ruled out by the letter before it).
fn preceded_by_version(prefix: &[u8]) -> bool {
    let trimmed = prefix.trim_ascii_end();
    let trimmed = trimmed
        .strip_suffix(b":")
        .unwrap_or(trimmed)
        .trim_ascii_end();
    let word_start = trimmed
        .iter()
        .rposition(|c| !c.is_ascii_alphabetic())
        .map_or(0, |i| i + 1);
    let word = trimmed[word_start..].to_ascii_lowercase();
    matches!(word.as_slice(), b"version" | b"ver" | b"build" | b"release")
}

/// Luhn check plus a known issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners,
/// UnionPay, Maestro) and the length that goes with it.
fn valid_card(m: &[u8]) -> bool {
    let digits: Vec<u8> = m
        .iter()
        .filter(|c| c.is_ascii_digit())
        .map(|c| c - b'0')
        .collect();
    let n = digits.len();
    if !(13..=19).contains(&n) {
        return false;
    }
    // The separators must be consistent: all spaces, all dashes or none.
    let has_space = m.contains(&b' ');
    let has_dash = m.contains(&b'-');
    if has_space && has_dash {
        return false;
    }
    let prefix = |k: usize| {
        digits[..k]
            .iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let issuer_ok = match digits[0] {
        4 => matches!(n, 13 | 16 | 19),
        5 => (51..=55).contains(&prefix(2)) && n == 16 || matches!(prefix(2), 50 | 56..=58),
        2 => (2221..=2720).contains(&prefix(4)) && n == 16,
        3 => {
            (matches!(prefix(2), 34 | 37) && n == 15)
                || ((3528..=3589).contains(&prefix(4)) && n >= 16)
                || (matches!(prefix(2), 36 | 38 | 39) || (300..=305).contains(&prefix(3)))
                    && n >= 14
        }
        6 => {
            prefix(4) == 6011
                || prefix(2) == 65
                || (644..=649).contains(&prefix(3))
                || prefix(2) == 62
                || matches!(prefix(2), 63 | 67)
        }
        _ => false,
    };
    issuer_ok && luhn(&digits)
}

/// The Luhn checksum over decimal digits.
fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000; and not the
/// famous "Woolworth" number printed on sample cards.
fn valid_ssn(m: &[u8]) -> bool {
    let digits: Vec<u32> = m
        .iter()
        .filter(|c| c.is_ascii_digit())
        .map(|c| u32::from(c - b'0'))
        .collect();
    if digits.len() != 9 {
        return false;
    }
    let num = |r: std::ops::Range<usize>| digits[r].iter().fold(0, |acc, d| acc * 10 + d);
    let (area, group, serial) = (num(0..3), num(3..5), num(5..9));
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !(area == 78 && group == 5 && serial == 1120)
}

/// A real IPv6 parse, plus enough substance to rule out `a::b`-like code.
fn valid_ipv6(m: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(m) else {
        return false;
    };
    if s.parse::<std::net::Ipv6Addr>().is_err() {
        return false;
    }
    let groups = s.split(':').filter(|g| !g.is_empty()).count();
    let hex_digits = s.bytes().filter(u8::is_ascii_hexdigit).count();
    groups >= 2 && hex_digits >= 4
}

/// IBAN length per country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

/// Trims an IBAN candidate to its country's length and checks mod-97; returns the span.
fn iban_span(text: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    if start > 0 && text[start - 1].is_ascii_alphanumeric() {
        return None;
    }
    let m = &text[start..end];
    let want = IBAN_LENGTHS
        .iter()
        .find(|(cc, _)| &m[..2] == cc.as_slice())
        .map(|(_, n)| *n)?;
    // Walk the candidate until `want` alphanumerics are consumed.
    let mut count = 0;
    let mut cut = None;
    for (i, &c) in m.iter().enumerate() {
        if c.is_ascii_alphanumeric() {
            count += 1;
            if count == want {
                cut = Some(i + 1);
                break;
            }
        }
    }
    let cut = cut?;
    let span_end = start + cut;
    if text.get(span_end).is_some_and(u8::is_ascii_alphanumeric) {
        return None;
    }
    let compact: Vec<u8> = m[..cut]
        .iter()
        .copied()
        .filter(u8::is_ascii_alphanumeric)
        .collect();
    mod97(&compact).then_some((start, span_end))
}

/// ISO 7064 mod-97-10 over the rearranged IBAN (letters as 10..35).
fn mod97(iban: &[u8]) -> bool {
    let rearranged = iban[4..].iter().chain(&iban[..4]);
    let mut rem: u32 = 0;
    for &c in rearranged {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(text: &str) -> Vec<(&'static str, String)> {
        let scanner = Scanner::new(&Builtin::ALL, &[]).expect("scanner");
        scanner
            .scan(text)
            .into_iter()
            .map(|f| match f.kind {
                Kind::Builtin(b) => (b.name(), text[f.start..f.end].to_owned()),
                Kind::Custom(_) => ("custom", text[f.start..f.end].to_owned()),
            })
            .collect()
    }

    #[test]
    fn luhn_and_issuers() {
        assert!(valid_card(b"4111 1111 1111 1111"));
        assert!(valid_card(b"5555-5555-5555-4444"));
        assert!(valid_card(b"378282246310005"));
        assert!(!valid_card(b"4111 1111 1111 1112"));
        assert!(!valid_card(b"1234 5678 9012 3456"));
        assert!(!valid_card(b"4111 1111-1111 1111"));
    }

    #[test]
    fn iban_checksum_and_length() {
        assert_eq!(
            scan_all("pay to DE89 3704 0044 0532 0130 00 today"),
            vec![("iban", "DE89 3704 0044 0532 0130 00".to_owned())]
        );
        assert_eq!(
            scan_all("IBAN GB82WEST12345698765432."),
            vec![("iban", "GB82WEST12345698765432".to_owned())]
        );
        // One digit off: the checksum fails.
        assert!(scan_all("DE89 3704 0044 0532 0130 01").is_empty());
    }

    #[test]
    fn ssn_ranges() {
        assert!(valid_ssn(b"123-45-6789"));
        assert!(!valid_ssn(b"000-12-3456"));
        assert!(!valid_ssn(b"666-12-3456"));
        assert!(!valid_ssn(b"912-12-3456"));
        assert!(!valid_ssn(b"123-00-3456"));
        assert!(!valid_ssn(b"123-45-0000"));
    }

    #[test]
    fn secrets() {
        let found = scan_all(
            "keys: sk-proj-Abc123def456ghi789jkl012mno345 and sk-ant-api03-Zx9_yW8-vU7tS6rQ5pO4nM3 and AKIAIOSFODNN7EXAMPLE",
        );
        let names: Vec<_> = found.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec!["openai_key", "anthropic_key", "aws_access_key"]);
    }

    #[test]
    fn near_misses() {
        for text in [
            "task-assessment-framework-2024-q3",
            "release v1.2.3.4 shipped",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "at 2024-03-15 14:22:01 UTC",
            "std::vector<int> and Foo::Bar",
            "icon@2x.png",
            "order #4111111111111112",
            "price $1,299.99",
        ] {
            assert_eq!(scan_all(text), vec![], "{text}");
        }
    }

    #[test]
    fn overlaps_prefer_priority() {
        let found = scan_all("mail john.doe@example.com or call +1 415 555 0100");
        assert_eq!(
            found,
            vec![
                ("email", "john.doe@example.com".to_owned()),
                ("phone", "+1 415 555 0100".to_owned())
            ]
        );
    }

    #[test]
    fn ipv6_parsed() {
        assert_eq!(
            scan_all("from 2001:db8:85a3::8a2e:370:7334 now"),
            vec![("ipv6", "2001:db8:85a3::8a2e:370:7334".to_owned())]
        );
        assert!(scan_all("mac 00:1A:2B:3C:4D:5E").is_empty());
    }
}
