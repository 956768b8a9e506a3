//! Declared data dependencies: which metadata keys a plugin sets for later plugins, and which
//! it reads from earlier ones (as Envoy filters declare theirs).
//!
//! ```toml
//! [metadata]                  # in plugin.toml
//! provides = ["key", "tenant", "key.meta.*"]   # set in the request's metadata bag
//! requires = ["key"]          # must be provided by a plugin that runs earlier
//! optional = ["tenant"]       # read when present: whoever provides it must run earlier
//! ```
//!
//! The metadata bag is filled in chain order: a plugin's `on-request` sees what the plugins
//! before it set. [`check_order`] refuses a chain where a plugin would read a key before the
//! plugin that sets it has run (rate-limit before auth), or where a required key has no
//! provider at all. `Plugins::load` calls it for the global chain and for each model's chain,
//! so a misordered chain fails `weir check`, the first load and every reload (the serving
//! snapshot keeps serving).
//!
//! Names are metadata keys: dot-separated segments of `a-z 0-9 - _`, starting with a letter.
//! A trailing `.*` names a family (`key.meta.*`: every key under `key.meta.`). A provided
//! family covers every key in it; a required family is covered by a provider of the family
//! or of any key in it.

use serde::Deserialize;

use super::PluginError;
use super::manifest::Manifest;

/// Longest declared metadata key.
pub const MAX_KEY_LEN: usize = 128;

/// `[metadata]` of `plugin.toml`: the file shape.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataFile {
    /// Metadata keys the plugin sets for plugins after it.
    #[serde(default)]
    pub provides: Vec<String>,
    /// Keys the plugin cannot work without: a plugin earlier in the chain must provide each.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Keys the plugin reads when they are there: a chain without a provider is fine, but a
    /// provider must run earlier.
    #[serde(default)]
    pub optional: Vec<String>,
}

/// A plugin's validated metadata dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataDeps {
    /// Keys (or `prefix.*` families) it provides.
    pub provides: Vec<String>,
    /// Keys it requires from earlier plugins.
    pub requires: Vec<String>,
    /// Keys it reads if an earlier plugin provides them.
    pub optional: Vec<String>,
}

impl MetadataDeps {
    /// Validates the file shape. The error is `(key, reason)`, the key relative to the
    /// manifest (`metadata.requires[0]`).
    pub fn from_file(file: &MetadataFile) -> Result<MetadataDeps, (String, String)> {
        let list = |field: &str, names: &[String]| -> Result<Vec<String>, (String, String)> {
            let mut out: Vec<String> = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                validate_key(name).map_err(|r| (format!("metadata.{field}[{i}]"), r))?;
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
            Ok(out)
        };
        let deps = MetadataDeps {
            provides: list("provides", &file.provides)?,
            requires: list("requires", &file.requires)?,
            optional: list("optional", &file.optional)?,
        };
        for (field, names) in [("requires", &deps.requires), ("optional", &deps.optional)] {
            for (i, name) in names.iter().enumerate() {
                if deps.provides.iter().any(|p| covers(p, name)) {
                    return Err((
                        format!("metadata.{field}[{i}]"),
                        format!("'{name}' is also in `provides`: a plugin cannot depend on itself"),
                    ));
                }
            }
        }
        Ok(deps)
    }

    /// Whether the plugin declares nothing.
    pub fn is_empty(&self) -> bool {
        self.provides.is_empty() && self.requires.is_empty() && self.optional.is_empty()
    }
}

/// Checks a declared metadata key: 1-128 characters, dot-separated segments of `a-z 0-9 - _`
/// each starting with a letter or digit (the first with a letter), optionally ending `.*`.
pub fn validate_key(name: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "'{name}' is not a metadata key: dot-separated words of a-z, 0-9, '-' or '_', \
             starting with a letter, at most {MAX_KEY_LEN} characters; a trailing '.*' names \
             every key under a prefix"
        )
    };
    if name.is_empty()
        || name.len() > MAX_KEY_LEN
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
    {
        return Err(bad());
    }
    let stem = name.strip_suffix(".*").unwrap_or(name);
    let word_ok = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if stem.split('.').all(word_ok) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Whether a provided name covers a needed one: equal; or one is a family (`a.*`) the other
/// falls in.
pub fn covers(provided: &str, needed: &str) -> bool {
    fn in_family(family: &str, name: &str) -> bool {
        family
            .strip_suffix('*')
            .is_some_and(|prefix| prefix.ends_with('.') && name.starts_with(prefix))
    }
    provided == needed || in_family(provided, needed) || in_family(needed, provided)
}

/// A chain whose declared dependencies do not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DepsError {
    /// The key is provided, but only by a plugin later in the chain.
    #[error(
        "plugin '{plugin}' {need} metadata '{key}', which '{provider}' provides, but \
         '{provider}' runs after it: put '{provider}' first"
    )]
    ProvidedLater {
        /// Instance that reads the key.
        plugin: String,
        /// Whether the key is required or optional.
        need: Need,
        /// The key as the reader declares it.
        key: String,
        /// The (first) instance after it that provides the key.
        provider: String,
    },
    /// A required key that no instance of the chain provides.
    #[error(
        "plugin '{plugin}' requires metadata '{key}', which no plugin in this chain provides: \
         add a plugin that provides it before '{plugin}'"
    )]
    NotProvided {
        /// Instance that requires the key.
        plugin: String,
        /// The key.
        key: String,
    },
}

impl DepsError {
    /// As a config error at `key` of `weir.toml` (`plugins`, `models[0].plugins`).
    pub fn at(self, key: impl Into<String>) -> PluginError {
        PluginError::Config {
            key: key.into(),
            reason: self.to_string(),
        }
    }
}

/// How a plugin depends on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `requires`.
    Required,
    /// `optional`.
    Optional,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Need::Required => "requires",
            Need::Optional => "reads",
        })
    }
}

/// Checks the declared dependencies of a chain, given as `(instance name, manifest)` in run
/// order: every `requires` is provided by an instance earlier in the chain, and every
/// `optional` key that some instance provides is provided by an earlier one. The first
/// violation, in chain order, is the error.
pub fn check_order<'a, I>(chain: I) -> Result<(), DepsError>
where
    I: IntoIterator<Item = (&'a str, &'a Manifest)>,
{
    let chain: Vec<(&str, &MetadataDeps)> = chain
        .into_iter()
        .map(|(name, m)| (name, &m.metadata))
        .collect();
    for (i, (plugin, deps)) in chain.iter().enumerate() {
        let needs = deps
            .requires
            .iter()
            .map(|k| (k, Need::Required))
            .chain(deps.optional.iter().map(|k| (k, Need::Optional)));
        for (key, need) in needs {
            let provides = |d: &MetadataDeps| d.provides.iter().any(|p| covers(p, key));
            if chain[..i].iter().any(|(_, d)| provides(d)) {
                continue;
            }
            if let Some((provider, _)) = chain[i + 1..].iter().find(|(_, d)| provides(d)) {
                return Err(DepsError::ProvidedLater {
                    plugin: (*plugin).to_owned(),
                    need,
                    key: key.clone(),
                    provider: (*provider).to_owned(),
                });
            }
            if need == Need::Required {
                return Err(DepsError::NotProvided {
                    plugin: (*plugin).to_owned(),
                    key: key.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn manifest(name: &str, metadata: &str) -> Manifest {
        Manifest::parse(
            Path::new("/p"),
            &format!(
                "name = \"{name}\"\nversion = \"1\"\nkind = \"lua\"\n[metadata]\n{metadata}\n"
            ),
        )
        .unwrap()
    }

    fn auth() -> Manifest {
        manifest(
            "auth",
            "provides = [\"key\", \"key.rpm\", \"tenant\", \"key.meta.*\"]",
        )
    }

    fn rate_limit() -> Manifest {
        manifest(
            "rate-limit",
            "requires = [\"key\"]\noptional = [\"tenant\"]",
        )
    }

    #[test]
    fn a_provider_before_its_readers_is_accepted() {
        let (a, r) = (auth(), rate_limit());
        assert_eq!(check_order([("auth", &a), ("rate-limit", &r)]), Ok(()));
        // Nothing declared: nothing to check.
        let plain = manifest("plain", "");
        assert_eq!(check_order([("plain", &plain)]), Ok(()));
        assert_eq!(check_order(std::iter::empty()), Ok(()));
    }

    #[test]
    fn a_reader_before_its_provider_names_both() {
        let (a, r) = (auth(), rate_limit());
        let err = check_order([("limits", &r), ("keys", &a)]).unwrap_err();
        assert_eq!(
            err,
            DepsError::ProvidedLater {
                plugin: "limits".into(),
                need: Need::Required,
                key: "key".into(),
                provider: "keys".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "plugin 'limits' requires metadata 'key', which 'keys' provides, but 'keys' runs \
             after it: put 'keys' first"
        );
    }

    #[test]
    fn a_missing_required_key_is_refused_and_a_missing_optional_one_is_not() {
        let r = rate_limit();
        let err = check_order([("rate-limit", &r)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin 'rate-limit' requires metadata 'key', which no plugin in this chain \
             provides: add a plugin that provides it before 'rate-limit'"
        );
        let reader = manifest("reader", "optional = [\"tenant\"]");
        assert_eq!(check_order([("reader", &reader)]), Ok(()));
    }

    #[test]
    fn an_optional_key_provided_later_is_refused() {
        let reader = manifest("routing", "optional = [\"tenant\"]");
        let tagger = manifest("tenant-tagger", "provides = [\"tenant\"]");
        let err = check_order([("routing", &reader), ("tagger", &tagger)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin 'routing' reads metadata 'tenant', which 'tagger' provides, but 'tagger' \
             runs after it: put 'tagger' first"
        );
        assert_eq!(
            check_order([("tagger", &tagger), ("routing", &reader)]),
            Ok(())
        );
    }

    #[test]
    fn an_earlier_provider_wins_over_a_later_one() {
        let tagger = manifest("tenant-tagger", "provides = [\"tenant\"]");
        let reader = manifest("budget", "requires = [\"tenant\"]");
        let a = auth();
        assert_eq!(
            check_order([("tagger", &tagger), ("budget", &reader), ("auth", &a)]),
            Ok(())
        );
    }

    #[test]
    fn families_cover_their_keys() {
        assert!(covers("key.meta.*", "key.meta.tier"));
        assert!(covers("key.meta.*", "key.meta.*"));
        assert!(covers("key.meta.tier", "key.meta.*"));
        assert!(covers("key", "key"));
        assert!(!covers("key", "key.rpm"));
        assert!(!covers("key.*", "key"));
        assert!(!covers("key.meta.*", "key.metadata"));
        let a = auth();
        let reader = manifest("router", "requires = [\"key.meta.tier\"]");
        assert_eq!(check_order([("auth", &a), ("router", &reader)]), Ok(()));
        assert!(check_order([("router", &reader), ("auth", &a)]).is_err());
    }

    #[test]
    fn manifest_names_are_validated() {
        for bad in [
            "", "Key", "key..rpm", ".key", "key.", "1key", "key.*.x", "k y", "*",
        ] {
            let text = format!(
                "name = \"p\"\nversion = \"1\"\nkind = \"lua\"\n[metadata]\nprovides = [\"{bad}\"]\n"
            );
            let err = Manifest::parse(Path::new("/p"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains("metadata.provides[0]"), "{bad}: {err}");
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(validate_key(&long).is_err());
        for good in ["key", "key.rpm", "key.meta.*", "route.model", "x-1_y.2z"] {
            assert_eq!(validate_key(good), Ok(()), "{good}");
        }
        // Unknown fields are refused.
        let text = "name = \"p\"\nversion = \"1\"\nkind = \"lua\"\n[metadata]\nneeds = [\"key\"]\n";
        let err = Manifest::parse(Path::new("/p"), text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs"), "{err}");
        // A plugin cannot require what it provides.
        let text = "name = \"p\"\nversion = \"1\"\nkind = \"lua\"\n[metadata]\nprovides = [\"key\"]\nrequires = [\"key\"]\n";
        let err = Manifest::parse(Path::new("/p"), text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata.requires[0]"), "{err}");
    }
}
