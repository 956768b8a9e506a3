//! Configuration: the TOML file shapes ([`file`]), `${ENV}` interpolation ([`env`]), and the
//! validated runtime [`Config`] built from them.
//!
//! Loading is two steps, as everywhere in Weir: deserialize the file shape (unknown keys are
//! rejected, every error names the file, the key and the reason), then convert into runtime
//! types with `TryFrom`-style constructors that check everything a request would otherwise
//! trip over (URLs, header values, targets naming unknown providers). A config that loads
//! serves.

pub mod env;
pub mod file;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use file::{FileConfig, LogFormat, TimeoutsConfig};

use crate::provider::{self, ProviderKind};

/// Error loading or validating configuration. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// Path of the file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}: {reason}")]
    Syntax {
        /// Path of the file.
        file: PathBuf,
        /// Parser message with line and column.
        reason: String,
    },
    /// A key is unknown, missing, of the wrong type, or has an invalid value.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// Path of the file (filled in by [`Config::load`]).
        file: PathBuf,
        /// Dotted key path, e.g. `providers.openai.base_url`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    /// An invalid value at `key`; the file is filled in by the loader.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: PathBuf::new(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn in_file(self, path: &Path) -> Self {
        match self {
            ConfigError::Invalid { key, reason, .. } => ConfigError::Invalid {
                file: path.to_owned(),
                key,
                reason,
            },
            other => other,
        }
    }
}

/// Checks a provider base URL and strips its trailing slash.
pub fn validate_base_url(provider: &str, url: &str) -> Result<String, ConfigError> {
    let key = format!("providers.{provider}.base_url");
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| {
            ConfigError::invalid(&key, format!("'{url}' must start with http:// or https://"))
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ConfigError::invalid(&key, format!("'{url}' has no host")));
    }
    if trimmed.parse::<http::Uri>().is_err() {
        return Err(ConfigError::invalid(
            &key,
            format!("'{url}' is not a valid URL"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// Upstream timeouts of one provider.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// From sending the request to the response headers (and, for streams, the first event).
    pub first_byte: Duration,
    /// Whole exchange, streams included.
    pub total: Duration,
    /// Longest silence between two reads of a committed stream.
    pub stream_idle: Duration,
}

impl Timeouts {
    /// Validated timeouts of provider `provider`.
    pub fn from_config(provider: &str, t: &TimeoutsConfig) -> Result<Self, ConfigError> {
        if t.stream_idle_ms == 0 {
            return Err(ConfigError::invalid(
                format!("providers.{provider}.timeouts.stream_idle_ms"),
                "must be greater than 0",
            ));
        }
        Ok(Timeouts {
            connect: Duration::from_millis(t.connect_ms),
            first_byte: Duration::from_millis(t.first_byte_ms),
            total: Duration::from_millis(t.total_ms),
            stream_idle: Duration::from_millis(t.stream_idle_ms),
        })
    }
}

/// A configured provider instance.
pub struct ProviderEntry {
    /// Name from the config table (`[providers.NAME]`).
    pub name: String,
    /// Which dialect it speaks.
    pub kind: ProviderKind,
    /// The translation (or, for `mock`, the in-process responder).
    pub imp: provider::ProviderImpl,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Largest non-streamed 2xx answer read, in bytes (`max_response_bytes`); a larger one
    /// is a 502, and is never read past this.
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for ProviderEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the provider itself: it holds credentials.
        f.debug_struct("ProviderEntry")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// One upstream target of a model: a provider and the model name it knows.
#[derive(Debug, Clone)]
pub struct Target {
    /// The provider.
    pub provider: Arc<ProviderEntry>,
    /// Upstream model name.
    pub model: String,
}

/// A model the gateway serves.
#[derive(Debug, Clone)]
pub struct Model {
    /// The name clients ask for.
    pub name: String,
    /// Targets in order: the first is primary, the rest are fallbacks.
    pub targets: Vec<Target>,
}

/// Retry and fallback policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts per target (1 = no retry on the same target).
    pub attempts_per_target: u32,
    /// First backoff; doubled per retry.
    pub backoff: Duration,
    /// Backoff ceiling.
    pub max_backoff: Duration,
    /// Longest upstream `Retry-After` waited out before a retry on the same target.
    pub max_retry_after: Duration,
}

/// The admin API, validated (see [`file::AdminConfig`]).
#[derive(Debug, Clone)]
pub struct Admin {
    /// Admin listener address (read at startup only).
    pub listen: SocketAddr,
    /// The token admin calls must present; `None` means the admin API does not start.
    pub token: Option<crate::admin::AdminToken>,
    /// Request-log records kept; 0 turns the request log off.
    pub request_log_max_records: u64,
}

/// Hot-reload settings (see [`file::ReloadConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Reload {
    /// Quiet time after the last file event before reloading.
    pub debounce: Duration,
    /// Previous generations kept in memory for rollback.
    pub keep_generations: usize,
}

/// Client connection limits (see [`file::ServerConfig`]), read at startup.
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// Time to send a whole request head.
    pub header_read_timeout: Duration,
    /// Idle time allowed between requests on a kept-alive connection.
    pub keepalive_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
}

/// The default `server.max_connections`: 10,000, or half the open-file limit if that is
/// lower (the other half is for upstream connections, state files and plugins).
fn default_max_connections() -> usize {
    const DEFAULT: usize = 10_000;
    #[cfg(unix)]
    {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if let Some(soft) = limit.current {
            let half = usize::try_from(soft / 2).unwrap_or(usize::MAX);
            return DEFAULT.min(half).max(1);
        }
    }
    DEFAULT
}

/// The validated, runtime configuration.
#[derive(Debug)]
pub struct Config {
    /// Where the file came from.
    pub path: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Longest pause between two reads of a request body.
    pub body_read_timeout: Duration,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long stored Responses API responses live.
    pub responses_ttl: Duration,
    /// Client connection limits.
    pub connections: Connections,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`info`, `weir=debug`, ...).
    pub log_level: String,
    /// Retry policy.
    pub retry: Retry,
    /// Providers by name (disabled ones excluded).
    pub providers: HashMap<String, Arc<ProviderEntry>>,
    /// Served models by name.
    pub models: HashMap<String, Arc<Model>>,
    /// Model names in config order, for `/v1/models`.
    pub model_order: Vec<String>,
    /// The admin API.
    pub admin: Admin,
    /// Hot reload.
    pub reload: Reload,
    /// The `[prices]` table (shared by the requests of this snapshot and its plugins).
    pub prices: Arc<crate::prices::Prices>,
    /// The file shape, kept for subsystems that read their own sections (plugins).
    pub file: FileConfig,
    /// Non-fatal findings (disabled providers, unserved models), logged once logging is up.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates config text; `path` is used in messages and for relative paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        let disabled = env::interpolate(&mut value, &|k| std::env::var(k).ok())
            .map_err(|e| e.in_file(path))?;
        let file: FileConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                file: path.to_owned(),
                key,
                reason: e
                    .inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            }
        })?;
        Self::build(path, file, &disabled).map_err(|e| e.in_file(path))
    }

    fn build(path: &Path, file: FileConfig, disabled: &[String]) -> Result<Config, ConfigError> {
        let listen = file.server.listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("server.listen", format!("'{}': {e}", file.server.listen))
        })?;
        if file.server.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        file.state
            .validate()
            .map_err(|reason| ConfigError::invalid("state", reason))?;
        for (key, secs) in [
            (
                "server.header_read_timeout_secs",
                file.server.header_read_timeout_secs,
            ),
            (
                "server.body_read_timeout_secs",
                file.server.body_read_timeout_secs,
            ),
            (
                "server.keepalive_timeout_secs",
                file.server.keepalive_timeout_secs,
            ),
            ("server.responses_ttl_secs", file.server.responses_ttl_secs),
        ] {
            if secs == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        let max_connections = match file.server.max_connections {
            Some(0) => {
                return Err(ConfigError::invalid(
                    "server.max_connections",
                    "must be at least 1",
                ));
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => default_max_connections(),
        };
        let connections = Connections {
            header_read_timeout: Duration::from_secs(file.server.header_read_timeout_secs),
            keepalive_timeout: Duration::from_secs(file.server.keepalive_timeout_secs),
            max_connections,
        };
        if file.retry.attempts_per_target == 0 {
            return Err(ConfigError::invalid(
                "retry.attempts_per_target",
                "must be at least 1",
            ));
        }
        let admin = Admin {
            listen: file.admin.listen.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid("admin.listen", format!("'{}': {e}", file.admin.listen))
            })?,
            token: crate::admin::AdminToken::from_config(file.admin.token.as_deref())
                .map_err(|reason| ConfigError::invalid("admin.token", reason))?,
            request_log_max_records: file.admin.request_log_max_records,
        };
        let reload = Reload {
            debounce: Duration::from_millis(file.reload.debounce_ms),
            keep_generations: file.reload.keep_generations,
        };
        let prices = crate::prices::Prices::from_config(&file.prices).map_err(
            |crate::prices::PricesError::Invalid { key, reason }| ConfigError::invalid(key, reason),
        )?;
        let mut warnings = Vec::new();
        let mut providers = HashMap::new();
        for (name, spec) in &file.providers {
            if disabled.iter().any(|d| d == name) {
                warnings.push(format!(
                    "provider '{name}' is disabled: its api_key is empty (export the variable it names to enable it)"
                ));
                continue;
            }
            let entry = provider::build(name, spec)?;
            providers.insert(name.clone(), Arc::new(entry));
        }
        // Without models, every request 404s unless a plugin answers or routes it. A file
        // that parses but defines none is far more often a mistake (a half-written save, the
        // wrong file) than a wish, and a reload must not swap it in: refused here, so at
        // startup, `weir check` and reload alike.
        if file.models.is_empty() {
            return Err(ConfigError::invalid(
                "models",
                "config defines no models (add at least one [[models]] entry)",
            ));
        }
        let mut models = HashMap::new();
        let mut model_order = Vec::new();
        for (i, m) in file.models.iter().enumerate() {
            let key = format!("models[{i}]");
            if m.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    "must not be empty",
                ));
            }
            if models.contains_key(&m.name) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("model '{}' is defined twice", m.name),
                ));
            }
            if m.targets.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.targets"),
                    "needs at least one target",
                ));
            }
            let mut targets = Vec::new();
            for (j, t) in m.targets.iter().enumerate() {
                if disabled.iter().any(|d| d == &t.provider) {
                    continue;
                }
                let provider = providers.get(&t.provider).ok_or_else(|| {
                    ConfigError::invalid(
                        format!("{key}.targets[{j}].provider"),
                        format!("no provider named '{}' in [providers]", t.provider),
                    )
                })?;
                let model = t.model.clone().unwrap_or_else(|| m.name.clone());
                targets.push(Target {
                    provider: provider.clone(),
                    model,
                });
            }
            if targets.is_empty() {
                warnings.push(format!(
                    "model '{}' is not served: all of its providers are disabled",
                    m.name
                ));
                continue;
            }
            model_order.push(m.name.clone());
            models.insert(
                m.name.clone(),
                Arc::new(Model {
                    name: m.name.clone(),
                    targets,
                }),
            );
        }
        Ok(Config {
            path: path.to_owned(),
            listen,
            max_body_bytes: usize::try_from(file.server.max_body_bytes).unwrap_or(usize::MAX),
            body_read_timeout: Duration::from_secs(file.server.body_read_timeout_secs),
            shutdown_grace: Duration::from_secs(file.server.shutdown_grace_secs),
            responses_ttl: Duration::from_secs(file.server.responses_ttl_secs),
            connections,
            log_format: file.log.format,
            log_level: file.log.level.clone(),
            retry: Retry {
                attempts_per_target: file.retry.attempts_per_target,
                backoff: Duration::from_millis(file.retry.backoff_ms),
                max_backoff: Duration::from_millis(file.retry.max_backoff_ms),
                max_retry_after: Duration::from_millis(file.retry.max_retry_after_ms),
            },
            providers,
            models,
            model_order,
            admin,
            reload,
            prices: Arc::new(prices),
            file,
            warnings,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = "[providers.local]\nkind = \"mock\"\n\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"local\", model = \"mock-1\" }]\n";

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("weir.toml"), &format!("{BASE}\n{extra}"))
    }

    #[test]
    fn prices_table_is_loaded_with_defaults() {
        let cfg = load(
            "[prices.\"gpt-4o-mini\"]\ninput = 0.15\noutput = 0.60\ncached_input = 0.075\ncache_write = 0.1875\n\n[prices.m]\ninput = 1\noutput = 4\n",
        )
        .unwrap();
        let mini = cfg.prices.get("gpt-4o-mini").unwrap();
        assert_eq!((mini.cached_input, mini.cache_write), (0.075, 0.1875));
        let m = cfg.prices.get("m").unwrap();
        assert_eq!(
            (m.input, m.output, m.cached_input, m.cache_write),
            (1.0, 4.0, 0.1, 1.25)
        );
        assert!(load("").unwrap().prices.is_empty());
    }

    #[test]
    fn server_timeouts_and_connection_cap_are_validated() {
        let cfg = load("").unwrap();
        assert_eq!(cfg.connections.header_read_timeout, Duration::from_secs(60));
        assert_eq!(cfg.body_read_timeout, Duration::from_secs(60));
        assert_eq!(cfg.connections.keepalive_timeout, Duration::from_secs(75));
        assert!((1..=10_000).contains(&cfg.connections.max_connections));
        let cfg = load("[server]\nheader_read_timeout_secs = 2\nbody_read_timeout_secs = 3\nkeepalive_timeout_secs = 4\nmax_connections = 5\n").unwrap();
        assert_eq!(cfg.connections.header_read_timeout, Duration::from_secs(2));
        assert_eq!(cfg.body_read_timeout, Duration::from_secs(3));
        assert_eq!(cfg.connections.keepalive_timeout, Duration::from_secs(4));
        assert_eq!(cfg.connections.max_connections, 5);
        for bad in [
            "header_read_timeout_secs = 0",
            "body_read_timeout_secs = 0",
            "keepalive_timeout_secs = 0",
            "max_connections = 0",
        ] {
            let err = load(&format!("[server]\n{bad}\n")).unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert!(
                err.to_string()
                    .contains(&format!("server.{key}: must be at least 1")),
                "{err}"
            );
        }
        let err = load("[server]\nidle_timeout_secs = 5\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_prices_name_the_file_and_key() {
        let err = load("[prices.m]\ninput = -0.1\noutput = 1\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("weir.toml: prices.m.input: -0.1 is not a price"),
            "{err}"
        );
        let err = load("[prices.\"gpt-4.1\"]\ninput = 1\noutput = nan\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("weir.toml: prices.\"gpt-4.1\".output: NaN is not a price"),
            "{err}"
        );
        let err = load("[prices.m]\ninput = 1\noutput = 1\ncached = 0.5\n").unwrap_err();
        let ConfigError::Invalid { key, reason, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(key, "prices.m.cached");
        assert!(reason.contains("unknown field `cached`"), "{err}");
        let err = load("[prices.m]\noutput = 1\n").unwrap_err();
        assert!(err.to_string().contains("missing field `input`"), "{err}");
    }
    fn provider(lines: &str) -> Result<Config, ConfigError> {
        load(&format!(
            "[providers.up]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n{lines}\n"
        ))
    }

    #[test]
    fn stream_limits_have_defaults_and_are_validated() {
        let cfg = provider("").unwrap();
        let up = &cfg.providers["up"];
        assert_eq!(up.timeouts.stream_idle, Duration::from_secs(60));
        assert_eq!(up.max_response_bytes, 32 * 1024 * 1024);
        assert_eq!(cfg.retry.max_retry_after, Duration::from_secs(10));

        let cfg =
            provider("max_response_bytes = 1024\ntimeouts = { stream_idle_ms = 1500 }").unwrap();
        let up = &cfg.providers["up"];
        assert_eq!(up.timeouts.stream_idle, Duration::from_millis(1500));
        assert_eq!(
            up.timeouts.total,
            Duration::from_secs(600),
            "others keep defaults"
        );
        assert_eq!(up.max_response_bytes, 1024);
        let cfg = load("[retry]\nmax_retry_after_ms = 0\n").unwrap();
        assert_eq!(cfg.retry.max_retry_after, Duration::ZERO);

        let err = provider("timeouts = { stream_idle_ms = 0 }").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "weir.toml: providers.up.timeouts.stream_idle_ms: must be greater than 0"
            ),
            "{err}"
        );
        let err = provider("max_response_bytes = 0").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("weir.toml: providers.up.max_response_bytes: must be greater than 0"),
            "{err}"
        );
        let err = provider("timeouts = { idle_ms = 5 }").unwrap_err();
        assert!(err.to_string().contains("unknown field `idle_ms`"), "{err}");
    }
}
