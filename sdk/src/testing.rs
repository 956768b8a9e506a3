//! Run a plugin's hooks natively in `cargo test`, against fixture requests and an
//! in-memory fake host.
//!
//! A plugin's hooks are plain Rust, so a test builds the plugin from a JSON config with
//! [`Harness::new`] and calls them; host calls ([`crate::kv`], [`crate::ctx`],
//! [`crate::log`], [`crate::metrics`], [`crate::http`]) go to a fake host kept per test
//! thread, which the test can inspect afterwards ([`kv_get_string`], [`logs`],
//! [`counter`]...). [`Harness::new`] resets it, so tests do not see each other's state.
//!
//! ```
//! use weir_sdk::{Decision, Plugin, RequestView, testing};
//!
//! struct Tag;
//! impl Plugin for Tag {
//!     type Config = weir_sdk::NoConfig;
//!     fn new(_: Self::Config) -> Result<Self, String> { Ok(Tag) }
//!     fn on_request(&self, req: &RequestView) -> Decision {
//!         weir_sdk::kv::incr("requests", 1, None).ok();
//!         Decision::cont().set_metadata("model", &req.model)
//!     }
//! }
//!
//! let harness = testing::Harness::<Tag>::new("{}").unwrap();
//! let decision = harness.on_request(&testing::request().model("gpt-4o").build());
//! assert!(!decision.is_reply());
//! assert_eq!(weir_sdk::ctx::get("model").as_deref(), Some("gpt-4o"));
//! assert_eq!(testing::kv_get_string("requests").as_deref(), Some("1"));
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use crate::__bindings::weir::plugin::host::{FetchRequest, FetchResponse, Level};
use crate::{
    ChunkAction, Decision, Dialect, Endpoint, LogEntry, MessageView, Plugin, RequestView,
    ResponseDecision, ResponseView, StreamEvent, TextDelta, ToolCallView,
};

type FetchHandler = Box<dyn Fn(&FetchRequest) -> Result<FetchResponse, String>>;

#[derive(Default)]
struct FakeHost {
    kv: HashMap<String, (Vec<u8>, Option<u64>)>,
    ctx: BTreeMap<String, String>,
    logs: Vec<(Level, String)>,
    counters: BTreeMap<String, u64>,
    histograms: BTreeMap<String, Vec<f64>>,
    now_ms: Option<u64>,
    fetch: Option<FetchHandler>,
}

thread_local! {
    static HOST: RefCell<FakeHost> = RefCell::new(FakeHost::default());
}

fn with<R>(f: impl FnOnce(&mut FakeHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

/// Clears the fake host of this thread (key-value, metadata, logs, metrics, clock,
/// fetch handler). [`Harness::new`] calls it.
///
/// ```
/// weir_sdk::kv::set("k", b"v", None).unwrap();
/// weir_sdk::testing::reset();
/// assert_eq!(weir_sdk::kv::get("k").unwrap(), None);
/// ```
pub fn reset() {
    with(|h| *h = FakeHost::default());
}

/// Freezes the fake clock at `ms` (affects [`crate::now_ms`] and key expiry).
///
/// ```
/// weir_sdk::testing::set_now_ms(1_000);
/// assert_eq!(weir_sdk::now_ms(), 1_000);
/// ```
pub fn set_now_ms(ms: u64) {
    with(|h| h.now_ms = Some(ms));
}

/// Answers [`crate::http::fetch`] calls with `handler` (by default they fail).
///
/// ```
/// use weir_sdk::http::{fetch, FetchRequest, FetchResponse};
/// weir_sdk::testing::set_fetch_handler(|_req| {
///     Ok(FetchResponse { status: 200, headers: vec![], body: b"ok".to_vec() })
/// });
/// let req = FetchRequest { method: "GET".into(), url: "https://x.test/".into(),
///     headers: vec![], body: vec![], timeout_ms: 100 };
/// assert_eq!(fetch(&req).unwrap().status, 200);
/// ```
pub fn set_fetch_handler(
    handler: impl Fn(&FetchRequest) -> Result<FetchResponse, String> + 'static,
) {
    with(|h| h.fetch = Some(Box::new(handler)));
}

/// A live key of the fake key-value store, as text.
///
/// ```
/// weir_sdk::kv::set_string("a", "b", None).unwrap();
/// assert_eq!(weir_sdk::testing::kv_get_string("a").as_deref(), Some("b"));
/// ```
pub fn kv_get_string(key: &str) -> Option<String> {
    fake::kv_get(key)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// The live keys of the fake key-value store, sorted.
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::kv::set("b", b"", None).unwrap();
/// weir_sdk::kv::set("a", b"", None).unwrap();
/// assert_eq!(weir_sdk::testing::kv_keys(), vec!["a", "b"]);
/// ```
pub fn kv_keys() -> Vec<String> {
    with(|h| {
        let now = fake::clock(h);
        let mut keys: Vec<String> =
            h.kv.iter()
                .filter(|(_, (_, exp))| exp.is_none_or(|e| e > now))
                .map(|(k, _)| k.clone())
                .collect();
        keys.sort();
        keys
    })
}

/// The TTL a live key was written with, in milliseconds from now.
///
/// ```
/// weir_sdk::testing::set_now_ms(0);
/// weir_sdk::kv::set("s", b"", Some(500)).unwrap();
/// assert_eq!(weir_sdk::testing::kv_ttl_ms("s"), Some(500));
/// ```
pub fn kv_ttl_ms(key: &str) -> Option<u64> {
    with(|h| {
        let now = fake::clock(h);
        h.kv.get(key)
            .and_then(|(_, exp)| *exp)
            .map(|e| e.saturating_sub(now))
    })
}

/// Messages logged so far, as (`"info"`, message) pairs.
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::log::warn("careful");
/// assert_eq!(weir_sdk::testing::logs(), vec![("warn".to_string(), "careful".to_string())]);
/// ```
pub fn logs() -> Vec<(String, String)> {
    with(|h| {
        h.logs
            .iter()
            .map(|(level, msg)| {
                let level = match level {
                    Level::Trace => "trace",
                    Level::Debug => "debug",
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                };
                (level.to_owned(), msg.clone())
            })
            .collect()
    })
}

/// A counter's total so far.
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::metrics::counter_add("hits", 2);
/// assert_eq!(weir_sdk::testing::counter("hits"), 2);
/// ```
pub fn counter(name: &str) -> u64 {
    with(|h| h.counters.get(name).copied().unwrap_or(0))
}

/// A histogram's observations so far.
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::metrics::histogram_observe("size", 3.0);
/// assert_eq!(weir_sdk::testing::histogram("size"), vec![3.0]);
/// ```
pub fn histogram(name: &str) -> Vec<f64> {
    with(|h| h.histograms.get(name).cloned().unwrap_or_default())
}

/// The whole request-scoped metadata bag.
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::ctx::set("k", "v");
/// assert_eq!(weir_sdk::testing::metadata().get("k").map(String::as_str), Some("v"));
/// ```
pub fn metadata() -> BTreeMap<String, String> {
    with(|h| h.ctx.clone())
}

/// Runs a plugin's hooks natively, as the gateway would call them.
///
/// Like the gateway's chain, it applies a decision's `set_metadata` entries to the
/// request-scoped bag, so later hooks (and [`crate::ctx::get`]) see them.
pub struct Harness<P: Plugin> {
    plugin: P,
}

impl<P: Plugin> Harness<P> {
    /// Resets the fake host and builds the plugin from `config_json`, as `init` would.
    ///
    /// ```
    /// struct P;
    /// impl weir_sdk::Plugin for P {
    ///     type Config = weir_sdk::NoConfig;
    ///     fn new(_: Self::Config) -> Result<Self, String> { Ok(P) }
    /// }
    /// assert!(weir_sdk::testing::Harness::<P>::new("").is_ok());
    /// ```
    pub fn new(config_json: &str) -> Result<Harness<P>, String> {
        reset();
        Ok(Harness {
            plugin: crate::build_plugin::<P>(config_json)?,
        })
    }

    /// The plugin.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// Calls `on_request` and applies its metadata changes to the bag.
    pub fn on_request(&self, req: &RequestView) -> Decision {
        let decision = self.plugin.on_request(req);
        if let Decision::Continue(m) = &decision {
            for (k, v) in &m.set_metadata {
                fake::ctx_set(k, v);
            }
        }
        decision
    }

    /// Calls `on_response` and applies its metadata changes to the bag.
    pub fn on_response(&self, resp: &ResponseView) -> ResponseDecision {
        let decision = self.plugin.on_response(resp);
        if let ResponseDecision::Continue(m) = &decision {
            for (k, v) in &m.set_metadata {
                fake::ctx_set(k, v);
            }
        }
        decision
    }

    /// Calls `on_response_chunk`.
    pub fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        self.plugin.on_response_chunk(event)
    }

    /// Calls `on_log`.
    pub fn on_log(&self, entry: &LogEntry) {
        self.plugin.on_log(entry)
    }
}

/// Starts a chat request for tests: model `gpt-4o-mini`, OpenAI dialect, no headers.
///
/// ```
/// let req = weir_sdk::testing::request()
///     .model("gpt-4o")
///     .header("x-tenant", "acme")
///     .system("be brief")
///     .user("hello")
///     .build();
/// assert_eq!(req.messages.len(), 2);
/// ```
pub fn request() -> RequestBuilder {
    RequestBuilder {
        req: RequestView {
            request_id: "req-test".into(),
            dialect: Dialect::Openai,
            endpoint: Endpoint::Chat,
            model: "gpt-4o-mini".into(),
            stream: false,
            headers: Vec::new(),
            messages: Vec::new(),
            body: None,
        },
    }
}

/// Builds a [`RequestView`]; see [`request`].
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    req: RequestView,
}

impl RequestBuilder {
    /// Sets the request id.
    pub fn request_id(mut self, id: &str) -> Self {
        self.req.request_id = id.to_owned();
        self
    }

    /// Sets the model.
    pub fn model(mut self, model: &str) -> Self {
        self.req.model = model.to_owned();
        self
    }

    /// Sets the stream flag.
    pub fn stream(mut self, stream: bool) -> Self {
        self.req.stream = stream;
        self
    }

    /// Sets the dialect.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.req.dialect = dialect;
        self
    }

    /// Adds a header (name lower-cased, as the gateway passes them).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.req
            .headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Adds a message.
    pub fn message(mut self, role: &str, text: &str) -> Self {
        self.req.messages.push(MessageView {
            role: role.to_owned(),
            content: text.to_owned(),
            tool_calls: Vec::new(),
        });
        self
    }

    /// Adds a system message.
    pub fn system(self, text: &str) -> Self {
        self.message("system", text)
    }

    /// Adds a user message.
    pub fn user(self, text: &str) -> Self {
        self.message("user", text)
    }

    /// Sets the full body (as plugins with capability `body` see it).
    pub fn body(mut self, body: &serde_json::Value) -> Self {
        self.req.body = Some(body.to_string());
        self
    }

    /// The request.
    pub fn build(self) -> RequestView {
        self.req
    }
}

/// Reads a fixture request: `{"headers": {..}, "body": <OpenAI chat request>}`, with
/// optional `"request_id"` and `"dialect"` (`"openai"` | `"anthropic"`). Messages are
/// flattened to text the way the gateway does; `body` is kept only if `with_body`.
///
/// ```
/// let fixture = r#"{
///   "headers": {"X-Tenant": "acme"},
///   "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
/// }"#;
/// let req = weir_sdk::testing::request_from_fixture(fixture, false).unwrap();
/// assert_eq!(req.header("x-tenant"), Some("acme"));
/// assert_eq!(req.last_user_text(), Some("hi"));
/// ```
pub fn request_from_fixture(json: &str, with_body: bool) -> Result<RequestView, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let body = value.get("body").cloned().unwrap_or_default();
    let mut builder = request();
    if let Some(id) = value.get("request_id").and_then(|v| v.as_str()) {
        builder = builder.request_id(id);
    }
    if value.get("dialect").and_then(|v| v.as_str()) == Some("anthropic") {
        builder = builder.dialect(Dialect::Anthropic);
    }
    if let Some(headers) = value.get("headers").and_then(|v| v.as_object()) {
        for (name, v) in headers {
            builder = builder.header(name, v.as_str().unwrap_or_default());
        }
    }
    if let Some(model) = body.get("model").and_then(|v| v.as_str()) {
        builder = builder.model(model);
    }
    if let Some(stream) = body.get("stream").and_then(|v| v.as_bool()) {
        builder = builder.stream(stream);
    }
    let mut req = builder.build();
    for msg in body
        .get("messages")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        req.messages.push(flatten_message(msg));
    }
    if with_body {
        req.body = Some(body.to_string());
    }
    Ok(req)
}

/// One OpenAI message to role + text (text parts joined by newlines) + tool calls.
fn flatten_message(msg: &serde_json::Value) -> MessageView {
    let content = match msg.get("content") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    let tool_calls = msg
        .get("tool_calls")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .map(|call| {
            let text = |v: Option<&serde_json::Value>| {
                v.and_then(|v| v.as_str()).unwrap_or_default().to_owned()
            };
            let function = call.get("function");
            ToolCallView {
                id: text(call.get("id")),
                name: text(function.and_then(|f| f.get("name"))),
                arguments: text(function.and_then(|f| f.get("arguments"))),
            }
        })
        .collect();
    MessageView {
        role: msg
            .get("role")
            .and_then(|v| v.as_str())
            .unwrap_or("user")
            .to_owned(),
        content,
        tool_calls,
    }
}

/// A log entry for tests: status 200, model `gpt-4o-mini`, no usage; set fields as
/// needed.
///
/// ```
/// let mut entry = weir_sdk::testing::log_entry();
/// entry.status = 429;
/// ```
pub fn log_entry() -> LogEntry {
    LogEntry {
        request_id: "req-test".into(),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        target_model: "gpt-4o-mini".into(),
        status: 200,
        stream: false,
        usage: None,
        latency_ms: 0,
        ttft_ms: None,
        metadata: Vec::new(),
    }
}

/// A text delta event for choice `choice`.
///
/// ```
/// let event = weir_sdk::testing::text_delta(0, "Hel");
/// assert!(matches!(event, weir_sdk::StreamEvent::TextDelta(_)));
/// ```
pub fn text_delta(choice: u32, text: &str) -> StreamEvent {
    StreamEvent::TextDelta(TextDelta {
        choice,
        text: text.to_owned(),
    })
}

/// The fake host behind the host wrappers on non-wasm targets; same signatures as the
/// generated imports.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) mod fake {
    use super::{FakeHost, FetchRequest, FetchResponse, Level, with};

    pub(super) fn clock(h: &FakeHost) -> u64 {
        h.now_ms.unwrap_or_else(system_now_ms)
    }

    fn system_now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn live(h: &FakeHost, key: &str) -> Option<Vec<u8>> {
        let now = clock(h);
        h.kv.get(key)
            .filter(|(_, exp)| exp.is_none_or(|e| e > now))
            .map(|(v, _)| v.clone())
    }

    fn expiry(h: &FakeHost, ttl_ms: Option<u64>) -> Option<u64> {
        ttl_ms.map(|t| clock(h).saturating_add(t))
    }

    pub(crate) fn now_ms() -> u64 {
        with(|h| clock(h))
    }

    pub(crate) fn count_tokens(text: &str) -> u32 {
        u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(with(|h| live(h, key)))
    }

    pub(crate) fn kv_set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        with(|h| {
            let exp = expiry(h, ttl_ms);
            h.kv.insert(key.to_owned(), (value.to_vec(), exp));
        });
        Ok(())
    }

    pub(crate) fn kv_incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        with(|h| {
            let (current, exp) = match live(h, key) {
                Some(v) => {
                    let n = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok())
                        .ok_or_else(|| format!("key {key} does not hold an integer"))?;
                    (n, h.kv.get(key).and_then(|(_, e)| *e))
                }
                None => (0, expiry(h, ttl_ms)),
            };
            let next = current.saturating_add(delta);
            h.kv.insert(key.to_owned(), (next.to_string().into_bytes(), exp));
            Ok(next)
        })
    }

    pub(crate) fn kv_cas(
        key: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String> {
        with(|h| {
            if live(h, key).as_deref() != expected {
                return Ok(false);
            }
            match value {
                Some(v) => {
                    let exp = expiry(h, ttl_ms);
                    h.kv.insert(key.to_owned(), (v.to_vec(), exp));
                }
                None => {
                    h.kv.remove(key);
                }
            }
            Ok(true)
        })
    }

    pub(crate) fn kv_delete(key: &str) -> Result<bool, String> {
        with(|h| {
            let existed = live(h, key).is_some();
            h.kv.remove(key);
            Ok(existed)
        })
    }

    pub(crate) fn log(level: Level, message: &str) {
        with(|h| h.logs.push((level, message.to_owned())));
    }

    pub(crate) fn counter_add(name: &str, value: u64) {
        with(|h| *h.counters.entry(name.to_owned()).or_default() += value);
    }

    pub(crate) fn histogram_observe(name: &str, value: f64) {
        with(|h| h.histograms.entry(name.to_owned()).or_default().push(value));
    }

    pub(crate) fn ctx_get(key: &str) -> Option<String> {
        with(|h| h.ctx.get(key).cloned())
    }

    pub(crate) fn ctx_set(key: &str, value: &str) {
        with(|h| {
            h.ctx.insert(key.to_owned(), value.to_owned());
        });
    }

    pub(crate) fn http_fetch(request: &FetchRequest) -> Result<FetchResponse, String> {
        with(|h| match &h.fetch {
            Some(handler) => handler(request),
            None => Err(format!(
                "fetch of {} refused: no fetch handler in the test host",
                request.url
            )),
        })
    }
}
