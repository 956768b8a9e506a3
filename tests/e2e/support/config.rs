//! [`ConfigBuilder`]: writes `weir.toml` text for a test, one section at a time.
//!
//! Defaults suit tests: JSON-free pretty logs at `info`, one attempt per target (so upstream
//! hit counts are exact unless a test asks for retries) and a short backoff.

use std::fmt::Write;

/// Upstream timeouts for a provider, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect_ms: u64,
    /// Until response headers / the first event.
    pub first_byte_ms: u64,
    /// Whole exchange.
    pub total_ms: u64,
}

impl Timeouts {
    /// A first-byte timeout of `ms`, generous connect and total.
    pub fn first_byte(ms: u64) -> Timeouts {
        Timeouts {
            connect_ms: 2_000,
            first_byte_ms: ms,
            total_ms: 60_000,
        }
    }
}

/// Builds config text.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    server: String,
    log: String,
    retry: String,
    providers: String,
    models: String,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder {
            server: String::new(),
            log: "[log]\nformat = \"pretty\"\nlevel = \"info\"\n".to_owned(),
            retry: "[retry]\nattempts_per_target = 1\nbackoff_ms = 10\nmax_backoff_ms = 50\n"
                .to_owned(),
            providers: String::new(),
            models: String::new(),
        }
    }
}

impl ConfigBuilder {
    /// An empty config with test defaults.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// `[server]` lines (`max_body_bytes = 1024`, ...).
    pub fn server(mut self, lines: &str) -> ConfigBuilder {
        self.server = format!("[server]\n{lines}\n");
        self
    }

    /// `[log]` level (`debug`, `weir=trace`, ...).
    pub fn log_level(mut self, level: &str) -> ConfigBuilder {
        self.log = format!("[log]\nformat = \"pretty\"\nlevel = \"{level}\"\n");
        self
    }

    /// `[retry]`: attempts per target and first backoff.
    pub fn retry(mut self, attempts_per_target: u32, backoff_ms: u64) -> ConfigBuilder {
        self.retry = format!(
            "[retry]\nattempts_per_target = {attempts_per_target}\nbackoff_ms = {backoff_ms}\nmax_backoff_ms = {}\n",
            backoff_ms * 4
        );
        self
    }

    /// `[retry]` as raw `key = value` lines (for settings [`Self::retry`] does not set).
    pub fn retry_lines(mut self, lines: &str) -> ConfigBuilder {
        self.retry = format!("[retry]\n{lines}\n");
        self
    }

    /// A provider table: `kind` plus raw `key = value` lines.
    pub fn provider(mut self, name: &str, kind: &str, lines: &str) -> ConfigBuilder {
        let _ = write!(
            self.providers,
            "\n[providers.{name}]\nkind = \"{kind}\"\n{lines}\n"
        );
        self
    }

    /// An `openai` provider at `base_url` (which ends in `/v1`).
    pub fn openai(
        self,
        name: &str,
        base_url: &str,
        api_key: &str,
        timeouts: Option<Timeouts>,
    ) -> ConfigBuilder {
        let lines = format!(
            "base_url = \"{base_url}\"\napi_key = \"{api_key}\"\n{}",
            timeouts_line(timeouts)
        );
        self.provider(name, "openai", &lines)
    }

    /// An `anthropic` provider at `base_url` (the host root).
    pub fn anthropic(
        self,
        name: &str,
        base_url: &str,
        api_key: &str,
        timeouts: Option<Timeouts>,
    ) -> ConfigBuilder {
        let lines = format!(
            "base_url = \"{base_url}\"\napi_key = \"{api_key}\"\n{}",
            timeouts_line(timeouts)
        );
        self.provider(name, "anthropic", &lines)
    }

    /// A `gemini` provider at `base_url` (the host root).
    pub fn gemini(
        self,
        name: &str,
        base_url: &str,
        api_key: &str,
        timeouts: Option<Timeouts>,
    ) -> ConfigBuilder {
        let lines = format!(
            "base_url = \"{base_url}\"\napi_key = \"{api_key}\"\n{}",
            timeouts_line(timeouts)
        );
        self.provider(name, "gemini", &lines)
    }

    /// A `[[models]]` entry with `(provider, upstream model)` targets in order.
    pub fn model(mut self, name: &str, targets: &[(&str, &str)]) -> ConfigBuilder {
        let targets: Vec<String> = targets
            .iter()
            .map(|(p, m)| format!("{{ provider = \"{p}\", model = \"{m}\" }}"))
            .collect();
        let _ = write!(
            self.models,
            "\n[[models]]\nname = \"{name}\"\ntargets = [{}]\n",
            targets.join(", ")
        );
        self
    }

    /// The config text.
    pub fn build(&self) -> String {
        format!(
            "{}{}{}{}{}",
            self.server, self.log, self.retry, self.providers, self.models
        )
    }
}

fn timeouts_line(t: Option<Timeouts>) -> String {
    match t {
        None => String::new(),
        Some(t) => format!(
            "timeouts = {{ connect_ms = {}, first_byte_ms = {}, total_ms = {} }}\n",
            t.connect_ms, t.first_byte_ms, t.total_ms
        ),
    }
}
