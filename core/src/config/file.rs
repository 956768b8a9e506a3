//! File shapes: what `weir.toml` may contain. Every struct rejects unknown keys and every
//! field says what it does. These types are only read by [`super::Config`]'s constructors.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::provider::ProviderConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[server]`: listener and limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[log]`: log format and level.
    #[serde(default)]
    pub log: LogConfig,
    /// `[retry]`: retries and backoff before falling back to the next target.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `[providers.NAME]`: upstreams, each with a `kind`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[[models]]`: the models clients can ask for.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[admin]`: the admin API (status, reload, rollback, request log).
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[reload]`: hot reload of the config and plugin files.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// `[[plugins]]`: the global plugin chain, in order (runs for every model, before the
    /// model's own plugins).
    #[serde(default)]
    pub plugins: Vec<crate::plugin::PluginInstanceConfig>,
    /// `[state]`: where keys, usage, spend and plugin key-value state are kept (sled, or
    /// Redis shared by several instances).
    #[serde(default)]
    pub state: crate::state::StateConfig,
    /// `[prices.MODEL]`: USD per 1M tokens per model (client-facing or upstream name, `"*"`
    /// for any other), for the request log's `cost_usd` and for plugins.
    #[serde(default)]
    pub prices: BTreeMap<String, crate::prices::PriceConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`; `weir serve --listen` overrides it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes; larger bodies get a 413. Default 10 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Seconds in-flight requests (streams included) get to finish after SIGTERM/SIGINT.
    /// Default 30.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Seconds a client gets to send a whole request head (request line and headers), from
    /// the connection's start or from the first byte of a request on a kept-alive
    /// connection; past it the connection is closed. Like nginx's `client_header_timeout`.
    /// Default 60. Read at startup.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// Longest pause, in seconds, between two reads of a request body (not the whole body,
    /// like nginx's `client_body_timeout`); past it the request gets a 408 and the
    /// connection is closed. Default 60.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle between requests before it is closed.
    /// Like nginx's `keepalive_timeout`. Default 75. Read at startup.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_secs: u64,
    /// Client connections open at once. At the cap the gateway stops accepting (new
    /// connections wait in the kernel's backlog) until one closes, and logs a warning at
    /// most once every 10 s. Default: 10,000, or half the open-file limit (`ulimit -n`) if
    /// that is lower, so upstream connections and files still get descriptors. Read at
    /// startup.
    #[serde(default)]
    pub max_connections: Option<u64>,
    /// Seconds a stored Responses API response (`store`, the default) is kept for
    /// `previous_response_id` and `GET /v1/responses/{id}`. Default 30 days, as OpenAI.
    #[serde(default = "default_responses_ttl")]
    pub responses_ttl_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            shutdown_grace_secs: default_grace(),
            header_read_timeout_secs: default_header_read_timeout(),
            body_read_timeout_secs: default_body_read_timeout(),
            keepalive_timeout_secs: default_keepalive_timeout(),
            max_connections: None,
            responses_ttl_secs: default_responses_ttl(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_max_body() -> u64 {
    10 * 1024 * 1024
}
fn default_grace() -> u64 {
    30
}
fn default_header_read_timeout() -> u64 {
    60
}
fn default_body_read_timeout() -> u64 {
    60
}
fn default_keepalive_timeout() -> u64 {
    75
}
fn default_responses_ttl() -> u64 {
    30 * 24 * 3600
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` (default, for terminals) or `json` (one object per line, for collectors).
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter: `info` (default), `weir=debug`, ... `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// JSON objects, one per line.
    Json,
}

/// `[retry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts on each target before falling back to the next (1 = no retry). Default 2.
    #[serde(default = "default_attempts")]
    pub attempts_per_target: u32,
    /// Backoff before the first retry, in ms; doubles per retry. Default 100.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Backoff ceiling, in ms. Default 2000.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Longest upstream `Retry-After` (on a 408, 429 or 5xx) waited out before retrying the
    /// same target, in ms. A longer ask skips the retries on that target: the next target is
    /// tried, or the error (with the upstream's `retry-after`) goes back to the client.
    /// Default 10,000; 0 never waits on `Retry-After`.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts_per_target: default_attempts(),
            backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
            max_retry_after_ms: default_max_retry_after(),
        }
    }
}

fn default_attempts() -> u32 {
    2
}
fn default_backoff() -> u64 {
    100
}
fn default_max_backoff() -> u64 {
    2000
}
fn default_max_retry_after() -> u64 {
    10_000
}

/// `timeouts` of a provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP + TLS connect, ms. Default 5,000.
    #[serde(default = "default_connect")]
    pub connect_ms: u64,
    /// Until response headers (and for streams the first event), ms. Default 60,000.
    #[serde(default = "default_first_byte")]
    pub first_byte_ms: u64,
    /// Whole exchange including a stream, ms. Default 600,000.
    #[serde(default = "default_total")]
    pub total_ms: u64,
    /// Longest silence between two reads of a stream once its first event arrived, ms; a
    /// stream quiet for longer ends with an error event (a timeout). Bytes of any kind count
    /// (comments and pings keep a stream alive). Default 60,000; must be greater than 0.
    #[serde(default = "default_stream_idle")]
    pub stream_idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect_ms: default_connect(),
            first_byte_ms: default_first_byte(),
            total_ms: default_total(),
            stream_idle_ms: default_stream_idle(),
        }
    }
}

fn default_connect() -> u64 {
    5_000
}
fn default_first_byte() -> u64 {
    60_000
}
fn default_total() -> u64 {
    600_000
}
fn default_stream_idle() -> u64 {
    60_000
}

/// Default `max_response_bytes` of a provider: 32 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

/// The default of a provider's `max_response_bytes` (for `#[serde(default = ...)]`).
pub fn default_max_response_bytes() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}

/// `[[models]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// Targets in order: primary first, then fallbacks.
    pub targets: Vec<TargetConfig>,
    /// `[[models.plugins]]`: this model's plugins, run after the global ones.
    #[serde(default)]
    pub plugins: Vec<crate::plugin::PluginInstanceConfig>,
}

/// One target of a model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A name from `[providers]`.
    pub provider: String,
    /// The model name the provider knows; defaults to the model's own name.
    #[serde(default)]
    pub model: Option<String>,
}

/// `[admin]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener, separate from the API listener. Default `127.0.0.1:8081`.
    /// Read at startup only.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token every admin call must send (`Authorization: Bearer <token>`), at least 16
    /// characters; usually `"${WEIR_ADMIN_TOKEN:-}"`. Without a token the admin API does not
    /// start, on any address. Re-read on reload (rotation needs no restart).
    #[serde(default)]
    pub token: Option<String>,
    /// Request-log records kept (the oldest are deleted first). Default 100,000; 0 turns the
    /// request log off.
    #[serde(default = "default_request_log_max")]
    pub request_log_max_records: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
            request_log_max_records: default_request_log_max(),
        }
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("request_log_max_records", &self.request_log_max_records)
            .finish()
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:8081".to_owned()
}
fn default_request_log_max() -> u64 {
    100_000
}

/// `[reload]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Quiet time after the last file event before reloading, ms (editors write a file in
    /// several steps). Default 100.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
    /// Previous generations kept in memory, ready for rollback. Default 5.
    #[serde(default = "default_keep_generations")]
    pub keep_generations: usize,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            debounce_ms: default_debounce(),
            keep_generations: default_keep_generations(),
        }
    }
}

fn default_debounce() -> u64 {
    100
}
fn default_keep_generations() -> usize {
    5
}
