//! Configuration in two layers: [`RedactionConfig`] is the JSON the gateway passes to
//! `init` (unknown keys rejected); [`Policy::try_from`] validates it and compiles the
//! detectors, so a bad config fails the plugin's load, never a request.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::detect::{Builtin, CustomPattern, Kind, Scanner};

/// What to do with PII found in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Leave it alone (the detector is disabled for requests).
    Off,
    /// Replace it with `[EMAIL]`.
    Mask,
    /// Replace it with `[EMAIL:1f2e3d4c5b6a]`, a salted hash stable across requests.
    Hash,
    /// Refuse the request with a 400 naming the detector.
    Block,
    /// Replace it with `<EMAIL_1>` and put the original back in the response.
    Pseudonymize,
}

/// What to do with PII found in model output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Leave model output alone.
    Off,
    /// Replace it with `[EMAIL]`.
    Mask,
    /// Replace it with `[EMAIL:1f2e3d4c5b6a]`.
    Hash,
}

/// A detector's settings: a mode, or a table with a mode and an output mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DetectorConfig {
    /// Shorthand: `email = "pseudonymize"`.
    Mode(Mode),
    /// Full form: `email = { mode = "pseudonymize", output = "mask" }`.
    Table(DetectorTable),
}

/// The full form of [`DetectorConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorTable {
    /// What to do in requests. Default: the top-level `default_mode`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// What to do in model output. Default: the top-level `output`.
    #[serde(default)]
    pub output: Option<OutputMode>,
}

/// A custom detector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomConfig {
    /// Name used in masks (`[EMPLOYEE_ID]`), placeholders and block messages:
    /// lower-case letters, digits and `_`.
    pub name: String,
    /// The regex (Rust `regex` syntax, ASCII mode: `\d`, `\w`, `\s` are ASCII).
    pub pattern: String,
    /// What to do in requests. Default: `mask`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// What to do in model output. Default: the top-level `output`.
    #[serde(default)]
    pub output: Option<OutputMode>,
}

/// The plugin's config (the `config` table of its `[[plugins]]` entry).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Secret mixed into `hash` values. Required when a detector uses `hash` or
    /// `pseudonymize` (kept for configs written before the pseudonym map moved to the
    /// request scratch); at least 16 characters.
    #[serde(default)]
    pub salt: Option<String>,
    /// Mode of the built-in detectors not listed in `detectors`. Default `mask`.
    #[serde(default)]
    pub default_mode: Option<Mode>,
    /// Output mode of detectors that do not set one. Default `off`.
    #[serde(default)]
    pub output: Option<OutputMode>,
    /// Per-detector settings, by name (`email`, `phone`, `credit_card`, `iban`, `ssn`,
    /// `ipv4`, `ipv6`, `openai_key`, `anthropic_key`, `aws_access_key`, `jwt`,
    /// `private_key`) or group (`secrets`: the five credential kinds; `ip`: both IP
    /// versions). A name beats its group.
    #[serde(default)]
    pub detectors: BTreeMap<String, DetectorConfig>,
    /// Custom detectors, checked before the built-ins.
    #[serde(default)]
    pub custom: Vec<CustomConfig>,
    /// Roles whose messages are scanned. Default all: system, user, assistant, tool.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Bytes of streamed text the plugin may hold back while a match could still be
    /// incomplete (a split placeholder, a half-streamed phone number). Default 1024.
    #[serde(default)]
    pub stream_window: Option<usize>,
}

/// A detector's resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The name (`email`, or the custom name).
    pub name: String,
    /// The label used in masks and placeholders (`EMAIL`).
    pub label: String,
    /// Request mode.
    pub mode: Mode,
    /// Output mode.
    pub output: OutputMode,
}

/// The validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Scans requests: every detector whose mode is not `off`.
    pub input: Scanner,
    /// Scans model output: every detector whose output mode is not `off`.
    pub output: Scanner,
    /// Rules by [`Kind`].
    pub rules: BTreeMap<Kind, Rule>,
    /// Hash salt (empty when no detector hashes or pseudonymizes).
    pub salt: String,
    /// Roles to scan.
    pub roles: Vec<String>,
    /// Stream hold window, bytes.
    pub stream_window: usize,
}

impl Policy {
    /// The rule of `kind` (always present for kinds the scanners report).
    pub fn rule(&self, kind: Kind) -> Option<&Rule> {
        self.rules.get(&kind)
    }

    /// Whether any request detector pseudonymizes (the response hooks must restore).
    pub fn pseudonymizes(&self) -> bool {
        self.rules.values().any(|r| r.mode == Mode::Pseudonymize)
    }

    /// Whether model output is scanned at all.
    pub fn scans_output(&self) -> bool {
        !self.output.is_empty()
    }
}

/// A config group name and its membership test.
type Group = (&'static str, fn(Builtin) -> bool);

const GROUPS: [Group; 2] = [
    ("secrets", Builtin::is_secret),
    ("ip", |b| matches!(b, Builtin::Ipv4 | Builtin::Ipv6)),
];

fn split(cfg: Option<&DetectorConfig>) -> (Option<Mode>, Option<OutputMode>) {
    match cfg {
        None => (None, None),
        Some(DetectorConfig::Mode(m)) => (Some(*m), None),
        Some(DetectorConfig::Table(t)) => (t.mode, t.output),
    }
}

impl TryFrom<RedactionConfig> for Policy {
    type Error = String;

    fn try_from(cfg: RedactionConfig) -> Result<Policy, String> {
        for name in cfg.detectors.keys() {
            if Builtin::from_name(name).is_none() && !GROUPS.iter().any(|(g, _)| g == name) {
                return Err(format!(
                    "detectors.{name}: unknown detector (known: {}, and the groups secrets, ip)",
                    Builtin::ALL.map(Builtin::name).join(", ")
                ));
            }
        }
        let default_mode = cfg.default_mode.unwrap_or(Mode::Mask);
        let default_output = cfg.output.unwrap_or(OutputMode::Off);
        let mut rules = BTreeMap::new();
        for b in Builtin::ALL {
            let (own_mode, own_output) = split(cfg.detectors.get(b.name()));
            let (group_mode, group_output) = GROUPS
                .iter()
                .find(|(_, member)| member(b))
                .map_or((None, None), |(g, _)| split(cfg.detectors.get(*g)));
            rules.insert(
                Kind::Builtin(b),
                Rule {
                    name: b.name().to_owned(),
                    label: b.name().to_ascii_uppercase(),
                    mode: own_mode.or(group_mode).unwrap_or(default_mode),
                    output: own_output.or(group_output).unwrap_or(default_output),
                },
            );
        }
        let mut custom_patterns = Vec::new();
        for (i, c) in cfg.custom.iter().enumerate() {
            let valid_name = !c.name.is_empty()
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid_name {
                return Err(format!(
                    "custom[{i}].name {:?}: use lower-case letters, digits and _",
                    c.name
                ));
            }
            if Builtin::from_name(&c.name).is_some()
                || cfg.custom[..i].iter().any(|o| o.name == c.name)
            {
                return Err(format!("custom[{i}].name {:?} is already taken", c.name));
            }
            rules.insert(
                Kind::Custom(i),
                Rule {
                    name: c.name.clone(),
                    label: c.name.to_ascii_uppercase(),
                    mode: c.mode.unwrap_or(Mode::Mask),
                    output: c.output.unwrap_or(default_output),
                },
            );
            custom_patterns.push(CustomPattern {
                name: c.name.clone(),
                pattern: c.pattern.clone(),
            });
        }

        let needs_salt = rules.values().any(|r| {
            matches!(r.mode, Mode::Hash | Mode::Pseudonymize) || r.output == OutputMode::Hash
        });
        let salt = cfg.salt.unwrap_or_default();
        if needs_salt && salt.len() < 16 {
            return Err(
                "salt: required (at least 16 characters) when a detector uses hash or pseudonymize"
                    .to_owned(),
            );
        }

        let builtins_where = |keep: &dyn Fn(&Rule) -> bool| -> Vec<Builtin> {
            Builtin::ALL
                .into_iter()
                .filter(|b| rules.get(&Kind::Builtin(*b)).is_some_and(keep))
                .collect()
        };
        // Custom patterns keep their index in both scanners: disabled ones are replaced by
        // a pattern that cannot match, so `Kind::Custom(i)` means the same everywhere.
        let customs_where = |keep: &dyn Fn(&Rule) -> bool| -> Vec<CustomPattern> {
            custom_patterns
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if rules.get(&Kind::Custom(i)).is_some_and(keep) {
                        p.clone()
                    } else {
                        CustomPattern {
                            name: p.name.clone(),
                            pattern: NEVER.to_owned(),
                        }
                    }
                })
                .collect()
        };
        let input_on = |r: &Rule| r.mode != Mode::Off;
        let output_on = |r: &Rule| r.output != OutputMode::Off;
        let input = Scanner::new(
            &builtins_where(&input_on),
            &trim_never(customs_where(&input_on)),
        )
        .map_err(|e| e.to_string())?;
        let output = Scanner::new(
            &builtins_where(&output_on),
            &trim_never(customs_where(&output_on)),
        )
        .map_err(|e| e.to_string())?;

        let roles = cfg.roles.unwrap_or_else(|| {
            ["system", "user", "assistant", "tool"]
                .map(str::to_owned)
                .to_vec()
        });
        let stream_window = cfg.stream_window.unwrap_or(1024).clamp(64, 16 * 1024);
        Ok(Policy {
            input,
            output,
            rules,
            salt,
            roles,
            stream_window,
        })
    }
}

/// A regex that never matches (a byte after the end of input).
const NEVER: &str = r"\z.";

/// Drops trailing never-matching customs (they would only cost a set slot); the ones in
/// the middle stay so indexes line up.
fn trim_never(mut patterns: Vec<CustomPattern>) -> Vec<CustomPattern> {
    while patterns.last().is_some_and(|p| p.pattern == NEVER) {
        patterns.pop();
    }
    patterns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Result<Policy, String> {
        let cfg: RedactionConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Policy::try_from(cfg)
    }

    #[test]
    fn groups_and_names() {
        let p = policy(
            r#"{"salt": "0123456789abcdef", "detectors": {"secrets": "block", "jwt": "hash", "email": {"mode": "pseudonymize", "output": "mask"}}}"#,
        )
        .expect("policy");
        let mode = |b: Builtin| p.rule(Kind::Builtin(b)).map(|r| r.mode);
        assert_eq!(mode(Builtin::OpenaiKey), Some(Mode::Block));
        assert_eq!(mode(Builtin::Jwt), Some(Mode::Hash));
        assert_eq!(mode(Builtin::Email), Some(Mode::Pseudonymize));
        assert_eq!(mode(Builtin::Phone), Some(Mode::Mask));
        assert!(p.pseudonymizes());
        assert!(p.scans_output());
    }

    #[test]
    fn rejects_bad_config() {
        assert!(policy(r#"{"detectors": {"emial": "mask"}}"#).is_err());
        assert!(policy(r#"{"detectors": {"email": "hash"}}"#).is_err());
        assert!(policy(r#"{"custom": [{"name": "Bad Name", "pattern": "x"}]}"#).is_err());
        assert!(policy(r#"{"custom": [{"name": "x", "pattern": "("}]}"#).is_err());
        assert!(policy(r#"{"custom": [{"name": "x", "pattern": "a*"}]}"#).is_err());
        assert!(policy(r#"{"colour": 1}"#).is_err());
    }
}
