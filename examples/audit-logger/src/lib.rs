//! Audit logger: after each response, stores a summary of the request in the plugin's
//! key-value state (one key per request id, expiring after `ttl_secs`) and keeps
//! per-tenant counters of requests and tokens. It never stores prompt or completion
//! text: the summary holds ids, model, status, usage, timings, the number of upstream
//! attempts and the cost only.
//!
//! Build: `scripts/build-plugins.sh` (writes `plugin.wasm`); test: `cargo test`.

use serde::{Deserialize, Serialize};
use weir_sdk::{LogEntry, Plugin};

/// The `config` table of this plugin in the gateway config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How long a request summary is kept, in seconds (default 7 days).
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Prefix of every key this plugin writes.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// The metadata entry naming the tenant (set by e.g. the tenant tagger).
    #[serde(default = "default_tenant_key")]
    pub tenant_key: String,
}

fn default_ttl_secs() -> u64 {
    7 * 24 * 3600
}

fn default_prefix() -> String {
    "audit:".into()
}

fn default_tenant_key() -> String {
    "tenant".into()
}

/// What is stored per request: identifiers and numbers, never prompt text.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// The request id.
    pub request_id: String,
    /// When the entry was written (ms since the Unix epoch).
    pub at_ms: u64,
    /// The tenant, or `unknown`.
    pub tenant: String,
    /// The model the client asked for.
    pub model: String,
    /// The provider that served it.
    pub provider: String,
    /// The upstream model.
    pub target_model: String,
    /// HTTP status sent to the client.
    pub status: u16,
    /// Whether it was streamed.
    pub stream: bool,
    /// Total latency (ms).
    pub latency_ms: u64,
    /// Time to first token (ms), for streams.
    pub ttft_ms: Option<u64>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// Upstream attempts (retries and fallbacks each make one).
    #[serde(default)]
    pub attempts: usize,
    /// The cost in USD from the gateway's `[prices]`, when known.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

/// The plugin.
pub struct AuditLogger {
    config: Config,
}

impl AuditLogger {
    fn summary(&self, entry: &LogEntry) -> Summary {
        let tenant = entry
            .metadata
            .iter()
            .find(|(k, _)| *k == self.config.tenant_key)
            .map_or("unknown", |(_, v)| v.as_str());
        let usage = entry.usage.unwrap_or_default();
        Summary {
            request_id: entry.request_id.clone(),
            at_ms: weir_sdk::now_ms(),
            tenant: tenant.to_owned(),
            model: entry.model.clone(),
            provider: entry.provider.clone(),
            target_model: entry.target_model.clone(),
            status: entry.status,
            stream: entry.stream,
            latency_ms: entry.latency_ms,
            ttft_ms: entry.ttft_ms,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            attempts: entry.attempts.len(),
            cost_usd: entry.cost_usd,
        }
    }
}

impl Plugin for AuditLogger {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.ttl_secs == 0 {
            return Err("`ttl_secs` must be at least 1".into());
        }
        Ok(AuditLogger { config })
    }

    fn on_log(&self, entry: &LogEntry) {
        let summary = self.summary(entry);
        let prefix = &self.config.key_prefix;
        let ttl_ms = self.config.ttl_secs.saturating_mul(1000);
        let tokens = summary.prompt_tokens + summary.completion_tokens;
        let result = serde_json::to_vec(&summary)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                weir_sdk::kv::set(
                    &format!("{prefix}req:{}", summary.request_id),
                    &json,
                    Some(ttl_ms),
                )
            })
            .and_then(|()| {
                weir_sdk::kv::incr(
                    &format!("{prefix}tenant:{}:requests", summary.tenant),
                    1,
                    None,
                )
            })
            .and_then(|_| {
                let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
                weir_sdk::kv::incr(
                    &format!("{prefix}tenant:{}:tokens", summary.tenant),
                    tokens,
                    None,
                )
            });
        match result {
            Ok(_) => weir_sdk::metrics::counter_add("audit_entries", 1),
            Err(e) => weir_sdk::log::warn(&format!(
                "audit entry for {} not stored: {e}",
                summary.request_id
            )),
        }
    }
}

weir_sdk::export!(AuditLogger);
