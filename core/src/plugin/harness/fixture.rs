//! The fixture file format (see the [harness](super) docs and docs/plugins.md, "Testing a
//! plugin"): every shape rejects unknown keys.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The keys `expect` may have (the keys of a step's [`Outcome`]); any other fails the
/// fixture, so a misspelt expectation cannot pass by checking nothing.
pub const EXPECT_KEYS: &[&str] = &[
    "decision",
    "status",
    "headers",
    "body",
    "plugin",
    "kind",
    "error",
    "model",
    "messages",
    "metadata",
    "targets",
    "response_headers",
    "decisions",
    "response",
    "stream",
    "kv",
];

/// The keys `expect_log` may have: the fields of the entry `on_log` was given, and
/// `failure` (the failure kind of `on_log`, or `null`).
pub const EXPECT_LOG_KEYS: &[&str] = &[
    "failure",
    "request_id",
    "model",
    "provider",
    "target_model",
    "status",
    "stream",
    "usage",
    "latency_ms",
    "ttft_ms",
    "metadata",
    "attempts",
    "decisions",
    "cost_usd",
];

/// One fixture file: either one step at the top level (`request` or `admin`, with
/// `expect`), or `requests`, a sequence of steps.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// Display name; default: the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// What the fixture checks (free text).
    #[serde(default)]
    pub description: Option<String>,
    /// The instance config; default: `fixtures/config.json`, else `{}`.
    #[serde(default)]
    pub config: Option<Value>,
    /// State written into the plugin's namespace before the fixture runs, on a fresh
    /// instance.
    #[serde(default)]
    pub state: Option<FixtureState>,
    /// A fixed clock (ms since the Unix epoch) for `now-ms` and the limiter; default: the
    /// wall clock.
    #[serde(default)]
    pub clock_ms: Option<u64>,
    /// What `target-stats` answers: `{provider: {model: stats}}`.
    #[serde(default)]
    pub target_stats: BTreeMap<String, BTreeMap<String, FixtureTargetStats>>,
    /// What `price` answers: `{model: price}` (also the log entry's `cost_usd`).
    #[serde(default)]
    pub prices: BTreeMap<String, FixturePrice>,
    /// The steps, in order, against one instance and its state.
    #[serde(default)]
    pub requests: Option<Vec<Step>>,
    /// The incoming request (one-step fixture).
    #[serde(default)]
    pub request: Option<FixtureRequest>,
    /// An admin call instead of a request (one-step fixture).
    #[serde(default)]
    pub admin: Option<FixtureAdmin>,
    /// A response to run `on_response` on.
    #[serde(default)]
    pub response: Option<FixtureResponse>,
    /// Text deltas of a streamed answer, for the chunk hooks.
    #[serde(default)]
    pub stream: Option<Vec<String>>,
    /// Runs `on_log` after the request, with this entry.
    #[serde(default)]
    pub log: Option<FixtureLog>,
    /// The expected outcome (a subset of it).
    #[serde(default)]
    pub expect: Option<Value>,
    /// The expected `on_log` run (a subset of it).
    #[serde(default)]
    pub expect_log: Option<Value>,
}

impl Fixture {
    /// The fixture's steps: `requests`, or the one step at the top level.
    pub fn steps(&self) -> Result<Vec<Step>, String> {
        let top_level = [
            ("request", self.request.is_some()),
            ("admin", self.admin.is_some()),
            ("response", self.response.is_some()),
            ("stream", self.stream.is_some()),
            ("log", self.log.is_some()),
            ("expect", self.expect.is_some()),
            ("expect_log", self.expect_log.is_some()),
        ];
        let steps = match &self.requests {
            Some(steps) => {
                if let Some((key, _)) = top_level.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "{key}: with `requests`, put `{key}` in a step of `requests`"
                    ));
                }
                if steps.is_empty() {
                    return Err("requests: needs at least one step".into());
                }
                steps.clone()
            }
            None => vec![Step {
                name: None,
                advance_ms: None,
                request: self.request.clone(),
                admin: self.admin.clone(),
                response: self.response.clone(),
                stream: self.stream.clone(),
                log: self.log.clone(),
                expect: self
                    .expect
                    .clone()
                    .ok_or("expect: missing (what must come of the request)")?,
                expect_log: self.expect_log.clone(),
            }],
        };
        for (i, step) in steps.iter().enumerate() {
            let at = if self.requests.is_some() {
                format!("requests[{i}].")
            } else {
                String::new()
            };
            step.check().map_err(|e| format!("{at}{e}"))?;
        }
        Ok(steps)
    }
}

/// One step of a fixture: a request (with its response, stream and log) or an admin call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A label for the step (free text).
    #[serde(default)]
    pub name: Option<String>,
    /// Moves the fixed clock forward before the step (starting it from the wall clock when
    /// the fixture has no `clock_ms`).
    #[serde(default)]
    pub advance_ms: Option<u64>,
    /// The incoming request.
    #[serde(default)]
    pub request: Option<FixtureRequest>,
    /// An admin call instead of a request.
    #[serde(default)]
    pub admin: Option<FixtureAdmin>,
    /// A response to run `on_response` on.
    #[serde(default)]
    pub response: Option<FixtureResponse>,
    /// Text deltas of a streamed answer, for the chunk hooks.
    #[serde(default)]
    pub stream: Option<Vec<String>>,
    /// Runs `on_log` after the request, with this entry.
    #[serde(default)]
    pub log: Option<FixtureLog>,
    /// The expected outcome (a subset of it; `{}` checks nothing but that the step ran).
    pub expect: Value,
    /// The expected `on_log` run (a subset of it).
    #[serde(default)]
    pub expect_log: Option<Value>,
}

impl Step {
    fn check(&self) -> Result<(), String> {
        match (&self.request, &self.admin) {
            (None, None) => return Err("a step needs `request` or `admin`".into()),
            (Some(_), Some(_)) => return Err("a step has `request` or `admin`, not both".into()),
            (None, Some(admin)) => {
                if self.response.is_some() || self.stream.is_some() || self.log.is_some() {
                    return Err("an `admin` step has no response, stream or log".into());
                }
                if !admin.path.starts_with('/') {
                    return Err(format!("admin.path: must start with '/': {}", admin.path));
                }
            }
            (Some(_), None) => {}
        }
        if self.expect_log.is_some() && self.log.is_none() {
            return Err("expect_log: needs `log` (the entry on_log runs with)".into());
        }
        Ok(())
    }
}

/// `state`: what the plugin's namespace holds before the fixture runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureState {
    /// Keys and values; a string is stored as is, a number, boolean, object or array as its
    /// JSON text.
    #[serde(default)]
    pub kv: BTreeMap<String, Value>,
}

/// What `target-stats` answers for one target.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FixtureTargetStats {
    /// EWMA of the time to first byte, ms.
    pub latency_ewma_ms: f64,
    /// EWMA of the failure rate, 0..1.
    pub error_rate: f64,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Attempts since start.
    pub attempts: u64,
}

/// What `price` answers for one model, USD per 1M tokens.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FixturePrice {
    /// Prompt tokens.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Cached prompt tokens.
    pub cached_input: f64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write: f64,
}

/// The request of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureRequest {
    /// `openai` (default) or `anthropic`: the dialect the client spoke.
    #[serde(default)]
    pub dialect: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Metadata set by earlier plugins.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The canonical (OpenAI-shaped) body: a chat request, or an embeddings request when it
    /// has `input` instead of `messages`.
    pub body: Value,
}

/// A non-streaming response for `on_response`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureResponse {
    /// The assistant's text.
    pub text: String,
}

/// A call to the plugin's admin endpoint (`/admin/plugins/<instance>/<path>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureAdmin {
    /// `GET` (default), `POST`, `DELETE`...
    #[serde(default = "default_method")]
    pub method: String,
    /// The path below the instance, starting with `/`.
    pub path: String,
    /// The query string without `?`.
    #[serde(default)]
    pub query: String,
    /// The body: a string as is, anything else as JSON text.
    #[serde(default)]
    pub body: Option<Value>,
}

fn default_method() -> String {
    "GET".to_owned()
}

/// The log entry `on_log` runs with. Unset fields come from the request: `model`, the
/// metadata bag (these `metadata` entries are added to it), the plugins' `decisions`,
/// `stream`; `status` is the reply's, 503 after a plugin failure, else 200; `provider`
/// and `target_model` are the last attempt's; `cost_usd` is priced from `prices` (the
/// target model's price, else the model's) when there is `usage`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureLog {
    /// HTTP status sent to the client.
    #[serde(default)]
    pub status: Option<u16>,
    /// The provider that served the request.
    #[serde(default)]
    pub provider: Option<String>,
    /// The upstream model.
    #[serde(default)]
    pub target_model: Option<String>,
    /// Whether the response was streamed.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Token usage.
    #[serde(default)]
    pub usage: Option<FixtureUsage>,
    /// Total latency, ms.
    #[serde(default)]
    pub latency_ms: u64,
    /// Time to first token, ms.
    #[serde(default)]
    pub ttft_ms: Option<u64>,
    /// Metadata added to the request's bag.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The upstream attempts, in order.
    #[serde(default)]
    pub attempts: Vec<FixtureAttempt>,
    /// The cost in USD (instead of pricing `usage`).
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

/// Token usage in a fixture's log entry.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FixtureUsage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_tokens: u64,
}

/// One upstream attempt in a fixture's log entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureAttempt {
    /// Provider name.
    #[serde(default)]
    pub provider: String,
    /// The upstream model.
    #[serde(default)]
    pub target_model: String,
    /// HTTP status from the target, 0 when none came.
    #[serde(default)]
    pub status: u16,
    /// Time to the first byte (or the failure), ms.
    #[serde(default)]
    pub latency_ms: u64,
    /// Why the attempt failed.
    #[serde(default)]
    pub error: Option<String>,
}
