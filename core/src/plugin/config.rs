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
//! ```

use serde::Deserialize;

use super::breaker::BreakerConfigFile;
use super::manifest::FailurePolicy;

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
