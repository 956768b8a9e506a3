//! Text transformations: redacting request texts (mask, hash, block, pseudonymize),
//! redacting model output, restoring pseudonyms, the JSON values of tool-call arguments,
//! and deciding when streamed text is safe to release. Pure functions over strings,
//! independent of the SDK, so they are tested natively and shared by the request, response
//! and chunk hooks.

use std::borrow::Cow;
use std::ops::Range;

use crate::config::{Mode, OutputMode, Policy, Rule};
use crate::detect::Finding;
use crate::hash::stable_hash;

/// Longest placeholder the restorer recognises (`<` + label + `_` + number + `>`).
pub const MAX_PLACEHOLDER: usize = 64;

/// Placeholders handed out for one request, in order: (`<EMAIL_1>`, original value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pseudonyms {
    entries: Vec<(String, String)>,
}

impl Pseudonyms {
    /// Whether no placeholder was handed out.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The placeholder for `value` under `label`, reusing the one already given to the
    /// same value; new numbers skip placeholders that `taken` says occur in the input
    /// already (so a user typing `<EMAIL_1>` cannot collide with ours).
    pub fn placeholder(
        &mut self,
        label: &str,
        value: &str,
        taken: &dyn Fn(&str) -> bool,
    ) -> String {
        let prefix = format!("<{label}_");
        if let Some((p, _)) = self
            .entries
            .iter()
            .find(|(p, v)| v == value && p.starts_with(&prefix))
        {
            return p.clone();
        }
        let mut n = self
            .entries
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .count()
            + 1;
        loop {
            let candidate = format!("{prefix}{n}>");
            if !taken(&candidate) && !self.entries.iter().any(|(p, _)| *p == candidate) {
                self.entries.push((candidate.clone(), value.to_owned()));
                return candidate;
            }
            n += 1;
        }
    }

    /// Serializes the map (JSON array of pairs) for the request scratch.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.entries).unwrap_or_default()
    }

    /// Reads what [`Pseudonyms::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Option<Pseudonyms> {
        serde_json::from_slice(bytes)
            .ok()
            .map(|entries| Pseudonyms { entries })
    }

    /// Replaces every known placeholder in `text` by its original value.
    pub fn restore<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if self.entries.is_empty() || !text.contains('<') {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut changed = false;
        while let Some(lt) = rest.find('<') {
            out.push_str(&rest[..lt]);
            let tail = &rest[lt..];
            let window = &tail[..floor_boundary(tail, MAX_PLACEHOLDER)];
            let hit = window.find('>').and_then(|gt| {
                let candidate = &tail[..=gt];
                self.entries
                    .iter()
                    .find(|(p, _)| p == candidate)
                    .map(|(_, v)| (gt + 1, v))
            });
            match hit {
                Some((len, value)) => {
                    out.push_str(value);
                    rest = &tail[len..];
                    changed = true;
                }
                None => {
                    out.push('<');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        if changed {
            Cow::Owned(out)
        } else {
            Cow::Borrowed(text)
        }
    }
}

impl Pseudonyms {
    /// Like [`Pseudonyms::restore`], for raw JSON text (a streamed fragment of tool-call
    /// arguments, where placeholders sit inside string literals): the original values are
    /// put back JSON-escaped, so a value with a quote or a backslash cannot break the
    /// document.
    pub fn restore_json_fragment<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let escaped = Pseudonyms {
            entries: self
                .entries
                .iter()
                .map(|(p, v)| (p.clone(), json_escape(v)))
                .collect(),
        };
        match escaped.restore(text) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            Cow::Owned(s) => Cow::Owned(s),
        }
    }
}

/// `value` escaped for the inside of a JSON string literal (no surrounding quotes).
fn json_escape(value: &str) -> String {
    let quoted = serde_json::to_string(value).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or_default()
        .to_owned()
}

/// The values of a JSON text (tool-call arguments), found by a lexer that keeps the text
/// byte for byte: string literals (object keys included, decoded) and numbers. Redacting
/// them one by one and splicing them back changes nothing else of the document (spacing,
/// key order), and always yields valid JSON: a replaced string is re-encoded, a replaced
/// number becomes a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonValues<'t> {
    text: &'t str,
    /// (byte span in `text`, decoded value).
    values: Vec<(Range<usize>, String)>,
}

impl<'t> JsonValues<'t> {
    /// Lexes `text`; `None` when it is not JSON-shaped (an unterminated or undecodable
    /// string literal): treat it as plain text then.
    pub fn parse(text: &'t str) -> Option<JsonValues<'t>> {
        let bytes = text.as_bytes();
        let mut values = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    let mut j = i + 1;
                    loop {
                        match bytes.get(j)? {
                            b'\\' => j += 2,
                            b'"' => break,
                            _ => j += 1,
                        }
                    }
                    let literal = &text[i..=j];
                    let decoded: String = serde_json::from_str(literal).ok()?;
                    values.push((i..j + 1, decoded));
                    i = j + 1;
                }
                b'-' | b'0'..=b'9' => {
                    let mut j = i + 1;
                    while j < bytes.len()
                        && matches!(bytes[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                    {
                        j += 1;
                    }
                    values.push((i..j, text[i..j].to_owned()));
                    i = j;
                }
                _ => i += 1,
            }
        }
        Some(JsonValues { text, values })
    }

    /// The decoded values, in document order.
    pub fn values(&self) -> impl Iterator<Item = &str> + Clone {
        self.values.iter().map(|(_, v)| v.as_str())
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the text has no string or number at all.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The text with value `i` replaced by `new[i]` where it is `Some` (encoded as a JSON
    /// string); `None` when nothing changed.
    pub fn rebuild(&self, new: &[Option<String>]) -> Option<String> {
        if new.iter().all(Option::is_none) {
            return None;
        }
        let mut out = String::with_capacity(self.text.len() + 16);
        let mut at = 0;
        for ((span, _), new) in self.values.iter().zip(new) {
            let Some(new) = new else {
                continue;
            };
            out.push_str(&self.text[at..span.start]);
            out.push_str(&serde_json::to_string(new).unwrap_or_default());
            at = span.end;
        }
        out.push_str(&self.text[at..]);
        Some(out)
    }

    /// Applies `f` to every value (`None`: unchanged) and rebuilds the text; `None` when
    /// nothing changed.
    pub fn map(&self, mut f: impl FnMut(&str) -> Option<String>) -> Option<String> {
        let new: Vec<Option<String>> = self.values().map(&mut f).collect();
        self.rebuild(&new)
    }
}

/// Applies `f` to the values of tool-call arguments (see [`JsonValues`]), or to the whole
/// text when it is not JSON-shaped; `None` when nothing changed.
pub fn map_arguments(arguments: &str, mut f: impl FnMut(&str) -> Option<String>) -> Option<String> {
    match JsonValues::parse(arguments) {
        Some(values) => values.map(f),
        None => f(arguments),
    }
}

/// The largest char boundary of `s` at or below `max`.
fn floor_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A request refused by a `block` detector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The detector's name (never the value).
    pub detector: String,
}

/// The result of redacting a request's texts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redacted {
    /// The new content of each text, `None` where it did not change.
    pub contents: Vec<Option<String>>,
    /// Placeholders handed out (for `pseudonymize`).
    pub pseudonyms: Pseudonyms,
    /// Findings per detector name, for metrics.
    pub counts: Vec<(String, u64)>,
}

/// Redacts the texts `(role, text)` of a request under `policy`: message contents, and
/// the values of tool-call arguments under their message's role. A `block` finding
/// anywhere refuses the whole request, before anything is rewritten. Placeholders are
/// shared by all texts (the same value gets the same one everywhere).
pub fn redact_request<'m>(
    policy: &Policy,
    messages: impl Iterator<Item = (&'m str, &'m str)> + Clone,
) -> Result<Redacted, Blocked> {
    let scans: Vec<Vec<Finding>> = messages
        .clone()
        .map(|(role, content)| {
            if policy.roles.iter().any(|r| r == role) {
                policy.input.scan(content)
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut out = Redacted::default();
    for f in scans.iter().flatten() {
        let Some(rule) = policy.rule(f.kind) else {
            continue;
        };
        if rule.mode == Mode::Block {
            return Err(Blocked {
                detector: rule.name.clone(),
            });
        }
        match out.counts.iter_mut().find(|(n, _)| *n == rule.name) {
            Some((_, c)) => *c += 1,
            None => out.counts.push((rule.name.clone(), 1)),
        }
    }
    let all: Vec<&str> = messages.clone().map(|(_, c)| c).collect();
    let taken = |p: &str| all.iter().any(|c| c.contains(p));
    for ((_, content), findings) in messages.zip(&scans) {
        if findings.is_empty() {
            out.contents.push(None);
            continue;
        }
        let new = replace(
            content,
            findings,
            |rule, value| match rule.mode {
                Mode::Off | Mode::Block => None,
                Mode::Mask => Some(format!("[{}]", rule.label)),
                Mode::Hash => Some(hashed(policy, rule, value)),
                Mode::Pseudonymize => Some(out.pseudonyms.placeholder(&rule.label, value, &taken)),
            },
            policy,
        );
        out.contents.push(Some(new));
    }
    Ok(out)
}

/// Redacts model output under the detectors' output modes; returns the text unchanged
/// (borrowed) when nothing was found.
pub fn redact_output<'t>(policy: &Policy, text: &'t str) -> Cow<'t, str> {
    if !policy.scans_output() {
        return Cow::Borrowed(text);
    }
    let findings = policy.output.scan(text);
    if findings.is_empty() {
        return Cow::Borrowed(text);
    }
    Cow::Owned(replace(
        text,
        &findings,
        |rule, value| match rule.output {
            OutputMode::Off => None,
            OutputMode::Mask => Some(format!("[{}]", rule.label)),
            OutputMode::Hash => Some(hashed(policy, rule, value)),
        },
        policy,
    ))
}

fn hashed(policy: &Policy, rule: &Rule, value: &str) -> String {
    format!(
        "[{}:{}]",
        rule.label,
        stable_hash(&policy.salt, &rule.name, value)
    )
}

/// Rebuilds `text` with each finding replaced by what `with` returns (`None` keeps it).
fn replace(
    text: &str,
    findings: &[Finding],
    mut with: impl FnMut(&Rule, &str) -> Option<String>,
    policy: &Policy,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        let value = &text[f.start..f.end];
        let replacement = policy.rule(f.kind).and_then(|rule| with(rule, value));
        out.push_str(&text[at..f.start]);
        out.push_str(replacement.as_deref().unwrap_or(value));
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Whether streamed text that ends like `text` must be held back a little longer:
/// a placeholder may be cut (`... <EMA`), or, when output is scanned, the last word may
/// be the first half of a number, IBAN or key block that continues in the next chunk.
///
/// Text is released at a whitespace after a word that cannot start or continue a match,
/// so a phone number streamed as `+1 415 ` + `555 0100.` is scanned whole.
pub fn must_hold(text: &str, restoring: bool, scanning: bool) -> bool {
    if restoring && open_placeholder(text) {
        return true;
    }
    if !scanning {
        return false;
    }
    let Some(last) = text.chars().last() else {
        return false;
    };
    if !last.is_whitespace() {
        return true;
    }
    if let Some(begin) = text.rfind("-----BEGIN") {
        if !text[begin..].contains("-----END") {
            return true;
        }
        if !text[begin..].trim_end().ends_with("-----") {
            return true;
        }
    }
    let word = text
        .trim_end()
        .rsplit(char::is_whitespace)
        .next()
        .unwrap_or("");
    word.bytes()
        .any(|b| b.is_ascii_digit() || matches!(b, b'@' | b':' | b'+' | b'(' | b'/' | b'='))
        || (!word.is_empty()
            && word.len() <= 4
            && word
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
}

/// Whether `text` ends inside something that may become a placeholder (`<`, `<EMA`,
/// `<EMAIL_1`).
pub fn open_placeholder(text: &str) -> bool {
    let from = text.len().saturating_sub(MAX_PLACEHOLDER);
    let from = (from..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    match text[from..].rfind('<') {
        Some(lt) => text[from + lt + 1..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedactionConfig;

    fn policy(json: &str) -> Policy {
        let cfg: RedactionConfig = serde_json::from_str(json).expect("config");
        Policy::try_from(cfg).expect("policy")
    }

    #[test]
    fn pseudonyms_are_stable_and_restored() {
        let p = policy(
            r#"{"salt": "0123456789abcdef", "default_mode": "off", "detectors": {"email": "pseudonymize", "phone": "mask"}}"#,
        );
        let msgs = [
            ("system", "Reply to ann@corp.example."),
            (
                "user",
                "Mail ann@corp.example and bob@corp.example, call +44 20 7946 0958.",
            ),
        ];
        let r = redact_request(&p, msgs.iter().copied()).expect("not blocked");
        assert_eq!(r.contents[0].as_deref(), Some("Reply to <EMAIL_1>."));
        assert_eq!(
            r.contents[1].as_deref(),
            Some("Mail <EMAIL_1> and <EMAIL_2>, call [PHONE].")
        );
        assert_eq!(
            r.pseudonyms
                .restore("Sent to <EMAIL_2> and <EMAIL_1>; <EMAIL_3> unknown"),
            "Sent to bob@corp.example and ann@corp.example; <EMAIL_3> unknown"
        );
        let back = Pseudonyms::from_bytes(&r.pseudonyms.to_bytes()).expect("json");
        assert_eq!(back, r.pseudonyms);
    }

    #[test]
    fn user_typed_placeholder_is_skipped() {
        let p = policy(
            r#"{"salt": "0123456789abcdef", "default_mode": "off", "detectors": {"email": "pseudonymize"}}"#,
        );
        let msgs = [("user", "Literal <EMAIL_1> and real x@y.example")];
        let r = redact_request(&p, msgs.iter().copied()).expect("not blocked");
        assert_eq!(
            r.contents[0].as_deref(),
            Some("Literal <EMAIL_1> and real <EMAIL_2>")
        );
    }

    #[test]
    fn block_names_the_detector() {
        let p = policy(r#"{"detectors": {"credit_card": "block"}}"#);
        let msgs = [("user", "card 4111 1111 1111 1111 please")];
        assert_eq!(
            redact_request(&p, msgs.iter().copied()),
            Err(Blocked {
                detector: "credit_card".into()
            })
        );
    }

    #[test]
    fn roles_filter() {
        let p = policy(r#"{"roles": ["user"]}"#);
        let msgs = [
            ("system", "ops@corp.example"),
            ("user", "hi ops@corp.example"),
        ];
        let r = redact_request(&p, msgs.iter().copied()).expect("ok");
        assert_eq!(r.contents, vec![None, Some("hi [EMAIL]".to_owned())]);
    }

    #[test]
    fn output_masking() {
        let p = policy(r#"{"output": "mask", "default_mode": "off"}"#);
        assert_eq!(
            redact_output(&p, "Reach me at eve@evil.example or 123-45-6789."),
            "Reach me at [EMAIL] or [SSN]."
        );
        assert!(matches!(
            redact_output(&p, "nothing here"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn json_values_keep_the_document_byte_for_byte() {
        let text = "{ \"to\" : \"a\\u0040b.example\", \"n\": -1.5e3, \"ok\": true }";
        let values = JsonValues::parse(text).expect("JSON-shaped");
        assert_eq!(
            values.values().collect::<Vec<_>>(),
            ["to", "a@b.example", "n", "-1.5e3", "ok"]
        );
        assert_eq!(values.map(|_| None), None);
        assert_eq!(
            values.map(|v| v.contains('@').then(|| "[EMAIL]".to_owned())),
            Some("{ \"to\" : \"[EMAIL]\", \"n\": -1.5e3, \"ok\": true }".to_owned())
        );
        // A replaced number becomes a string, so the document stays valid.
        let card = JsonValues::parse("{\"card\": 4111111111111111}").expect("JSON-shaped");
        let out = card
            .map(|v| v.starts_with("4111").then(|| "[CREDIT_CARD]".to_owned()))
            .expect("changed");
        assert_eq!(out, "{\"card\": \"[CREDIT_CARD]\"}");
        // Replacements with quotes are escaped.
        let quoted = JsonValues::parse("[\"x\"]").expect("JSON-shaped");
        assert_eq!(
            quoted.map(|_| Some("say \"hi\"".to_owned())).as_deref(),
            Some("[\"say \\\"hi\\\"\"]")
        );
    }

    #[test]
    fn unterminated_arguments_are_scanned_as_text() {
        assert_eq!(JsonValues::parse("{\"to\": \"ann@corp"), None);
        assert_eq!(
            map_arguments("{\"to\": \"ann@corp", |t| Some(t.replace("ann", "x"))).as_deref(),
            Some("{\"to\": \"x@corp")
        );
    }

    #[test]
    fn json_fragments_restore_escaped() {
        let mut p = Pseudonyms::default();
        let ph = p.placeholder("Q", "a\"b\\c", &|_| false);
        assert_eq!(ph, "<Q_1>");
        assert_eq!(p.restore_json_fragment("\"<Q_1>\""), "\"a\\\"b\\\\c\"");
        assert!(matches!(p.restore_json_fragment("none"), Cow::Borrowed(_)));
    }

    #[test]
    fn hold_rules() {
        assert!(open_placeholder("Hello <EMA"));
        assert!(open_placeholder("Hello <"));
        assert!(!open_placeholder("a < b"));
        assert!(!open_placeholder("<EMAIL_1> done"));
        assert!(must_hold("call +1 415 ", false, true));
        assert!(must_hold("mid-word", false, true));
        assert!(!must_hold("call me later ", false, true));
        assert!(must_hold("IBAN GB82 WEST ", false, true));
        assert!(must_hold(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE \n",
            false,
            true
        ));
        assert!(!must_hold("mid-word", true, false));
        assert!(must_hold("x <EMAIL_", true, false));
    }
}
