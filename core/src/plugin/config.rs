//! `[[plugins]]` (global) and `[[models.plugins]]` (per model) in `weir.toml`: which plugin
//! instances run, in which order, with which config.
//!
//! ```toml
//! [[plugins]]
//! path = "plugins/prompt-guard"      # folder with plugin.toml, relative to this file
//! config = { phrases = ["ignore previous instructions"] }
//!
//! [[models]]
//! name = "gpt-4o"
//! targets = [{ provider = "openai" }]
//! [[models.plugins]]
//! path = "plugins/tenant-tagger"
//! name = "tagger-gpt4o"              # instance name: metrics, logs and kv namespace
//! failure = "open"
//! deadline_ms = 50                   # overrides the manifest's [limits] deadline_ms
//! chunk_deadline_ms = 10             # ... and chunk_deadline_ms
//! ```

use std::time::Duration;

use serde::Deserialize;

use super::breaker::BreakerConfigFile;
use super::manifest::{FailurePolicy, Limits};

/// Largest `deadline_ms` / `chunk_deadline_ms` an instance may set, ms.
pub const MAX_INSTANCE_DEADLINE_MS: u64 = 10_000;

/// One plugin instance in a chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginInstanceConfig {
    /// The plugin folder (the one holding `plugin.toml`), relative to the config file.
    pub path: String,
    /// Instance name; default: the manifest's `name`. It labels metrics and logs and names
    /// the key-value namespace, so two instances with the same name share state.
    #[serde(default)]
    pub name: Option<String>,
    /// Configuration handed to the plugin's `init` as JSON; checked against the manifest's
    /// `config_schema` when the gateway loads. Default: an empty table.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Overrides the manifest's failure policy: `closed` (503) or `open` (skip).
    #[serde(default)]
    pub failure: Option<FailurePolicy>,
    /// `enforce` (default) applies the plugin's decisions; `shadow` runs the plugin and logs
    /// what it would have done, but never changes or fails a request.
    #[serde(default)]
    pub mode: Mode,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub breaker: BreakerConfigFile,
    /// Overrides the manifest's `limits.deadline_ms` (on-request, on-response), ms: 1 to
    /// 10000.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Overrides the manifest's `limits.chunk_deadline_ms` (on-response-chunk), ms: 1 to
    /// 10000.
    #[serde(default)]
    pub chunk_deadline_ms: Option<u64>,
}

impl PluginInstanceConfig {
    /// The manifest's `limits` with this instance's overrides. The error is `(key, reason)`,
    /// the key relative to the instance (`deadline_ms`).
    pub fn limits(&self, manifest: Limits) -> Result<Limits, (String, String)> {
        let mut limits = manifest;
        if let Some(ms) = self.deadline_ms {
            limits.deadline = instance_deadline("deadline_ms", ms)?;
        }
        if let Some(ms) = self.chunk_deadline_ms {
            limits.chunk_deadline = instance_deadline("chunk_deadline_ms", ms)?;
        }
        Ok(limits)
    }
}

fn instance_deadline(key: &str, ms: u64) -> Result<Duration, (String, String)> {
    if (1..=MAX_INSTANCE_DEADLINE_MS).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err((
            key.to_owned(),
            format!("{ms} is out of range: a deadline is 1 to {MAX_INSTANCE_DEADLINE_MS} ms"),
        ))
    }
}

/// How an instance's decisions are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are applied.
    #[default]
    Enforce,
    /// Decisions are logged, not applied; failures never fail the request.
    Shadow,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(extra: &str) -> PluginInstanceConfig {
        toml::from_str(&format!("path = \"p\"\n{extra}")).unwrap()
    }

    #[test]
    fn deadlines_override_the_manifest() {
        let base = Limits::default();
        assert_eq!(instance("").limits(base).unwrap(), base);
        let l = instance("deadline_ms = 80\nchunk_deadline_ms = 10000")
            .limits(base)
            .unwrap();
        assert_eq!(l.deadline, Duration::from_millis(80));
        assert_eq!(l.chunk_deadline, Duration::from_secs(10));
        assert_eq!(l.log_deadline, base.log_deadline);
    }

    #[test]
    fn out_of_range_deadlines_are_refused() {
        let base = Limits::default();
        let (key, reason) = instance("deadline_ms = 0").limits(base).unwrap_err();
        assert_eq!(key, "deadline_ms");
        assert!(reason.contains("1 to 10000 ms"), "{reason}");
        let (key, _) = instance("chunk_deadline_ms = 10001")
            .limits(base)
            .unwrap_err();
        assert_eq!(key, "chunk_deadline_ms");
        assert!(toml::from_str::<PluginInstanceConfig>("path = \"p\"\ndeadline = 5").is_err());
    }
}
