//! Run a plugin's hooks natively in `cargo test`, against fixture requests and an
//! in-memory fake host.
//!
//! A plugin's hooks are plain Rust, so a test builds the plugin from a JSON config with
//! [`Harness::new`] and calls them; host calls ([`crate::kv`], [`crate::ctx`],
//! [`crate::scratch`], [`crate::limit`], [`crate::ledger`], [`crate::log`],
//! [`crate::metrics`], [`crate::http`], [`crate::target_stats`], [`crate::price`],
//! [`crate::sha256`]) go to a fake host kept per test thread, which the test can inspect
//! and steer afterwards ([`kv_get_string`], [`logs`], [`counter`], [`set_now_ms`],
//! [`set_price`]...). [`Harness::new`] resets it, so tests do not see each other's state.
//!
//! The fake limiter and ledger follow the gateway's semantics: GCRA with `T = window /
//! limit` (a reservation of `amount` is admitted iff `max(tat, now) + amount * T - now <=
//! window`; settling moves the stored TAT by `(used - reserved) * T`, never below now), and
//! a ledger that reserves iff `spent + reserved + amount <= limit`. Both read the clock of
//! [`set_now_ms`] when it is fixed.
//!
//! ```
//! use weir_sdk::{Decision, Plugin, Request, testing};
//!
//! struct Tag;
//! impl Plugin for Tag {
//!     type Config = weir_sdk::NoConfig;
//!     fn new(_: Self::Config) -> Result<Self, String> { Ok(Tag) }
//!     fn on_request(&self, req: &Request) -> Decision {
//!         weir_sdk::kv::incr("requests", 1, None).ok();
//!         Decision::cont().set_metadata("model", &req.model())
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
#[cfg(not(target_arch = "wasm32"))]
use crate::request::RequestData;
#[cfg_attr(target_arch = "wasm32", allow(unused_imports))]
use crate::{
    AdminRequest, AdminResponse, ChunkAction, Decision, Dialect, Endpoint, LogEntry, MessageView,
    ModelPrice, Plugin, Request, ResponseDecision, ResponseView, StreamEvent, TargetSnapshot,
    TextDelta, ToolCallView,
};

type FetchHandler = Box<dyn Fn(&FetchRequest) -> Result<FetchResponse, String>>;

/// A limiter key: its theoretical arrival time in units of `1 / limit` ms (so `T = window
/// / limit` stays exact), and the limit it was stored with.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    tat: u128,
    limit: u64,
}

/// A ledger account.
#[derive(Debug, Clone, Copy)]
struct Account {
    spent: f64,
    reserved: f64,
    expires: Option<u64>,
}

#[derive(Default)]
struct FakeHost {
    kv: HashMap<String, (Vec<u8>, Option<u64>)>,
    ctx: BTreeMap<String, String>,
    scratch: BTreeMap<String, Vec<u8>>,
    limits: HashMap<String, Gcra>,
    ledger: HashMap<String, Account>,
    targets: HashMap<(String, String), TargetSnapshot>,
    prices: HashMap<String, ModelPrice>,
    logs: Vec<(Level, String)>,
    counters: BTreeMap<String, u64>,
    histograms: BTreeMap<String, Vec<f64>>,
    now_ms: Option<u64>,
    fetch: Option<FetchHandler>,
    /// Calls of `random-bytes` so far (the fake's bytes are SHA-256 of a counter).
    random_calls: u64,
}

thread_local! {
    static HOST: RefCell<FakeHost> = RefCell::new(FakeHost::default());
}

fn with<R>(f: impl FnOnce(&mut FakeHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

/// Clears the fake host of this thread (key-value, limiter, ledger, metadata, scratch,
/// logs, metrics, clock, prices, target statistics, fetch handler; the fake
/// [`crate::random_bytes`] starts its sequence again). [`Harness::new`] calls it.
///
/// ```
/// weir_sdk::kv::set("k", b"v", None).unwrap();
/// weir_sdk::testing::reset();
/// assert_eq!(weir_sdk::kv::get("k").unwrap(), None);
/// ```
pub fn reset() {
    with(|h| *h = FakeHost::default());
}

/// Freezes the fake clock at `ms` (affects [`crate::now_ms`], key and account expiry, and
/// the limiter).
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

/// Ends the current request: clears the request-scoped state (the metadata bag and the
/// plugin's scratch), keeps everything else (key-value, limiter, ledger, metrics). Call it
/// between two requests of one test.
///
/// ```
/// weir_sdk::ctx::set("tenant", "acme");
/// weir_sdk::scratch::set("map", b"..");
/// weir_sdk::kv::set("kept", b"1", None).unwrap();
/// weir_sdk::testing::next_request();
/// assert_eq!(weir_sdk::ctx::get("tenant"), None);
/// assert_eq!(weir_sdk::scratch::get("map"), None);
/// assert!(weir_sdk::kv::get("kept").unwrap().is_some());
/// ```
pub fn next_request() {
    with(|h| {
        h.ctx.clear();
        h.scratch.clear();
    });
}

/// The plugin's scratch of the current request (what [`crate::scratch`] wrote).
///
/// ```
/// weir_sdk::testing::reset();
/// weir_sdk::scratch::set("k", b"v");
/// assert_eq!(weir_sdk::testing::scratch().get("k").map(Vec::as_slice), Some(&b"v"[..]));
/// ```
pub fn scratch() -> BTreeMap<String, Vec<u8>> {
    with(|h| h.scratch.clone())
}

/// Sets what [`crate::target_stats`] answers for (provider, model).
///
/// ```
/// use weir_sdk::TargetSnapshot;
/// weir_sdk::testing::set_target_stats("openai", "gpt-4o", TargetSnapshot {
///     latency_ewma_ms: 420.0, error_rate: 0.01, in_flight: 3, attempts: 100,
/// });
/// assert_eq!(weir_sdk::target_stats("openai", "gpt-4o").unwrap().in_flight, 3);
/// ```
pub fn set_target_stats(provider: &str, model: &str, stats: TargetSnapshot) {
    with(|h| {
        h.targets
            .insert((provider.to_owned(), model.to_owned()), stats);
    });
}

/// Sets the price [`crate::price`] answers for a model (USD per 1M tokens).
///
/// ```
/// use weir_sdk::ModelPrice;
/// weir_sdk::testing::set_price("gpt-4o", ModelPrice {
///     input: 2.5, output: 10.0, cached_input: 1.25, cache_write: 0.0,
/// });
/// assert_eq!(weir_sdk::price("gpt-4o").unwrap().output, 10.0);
/// ```
pub fn set_price(model: &str, price: ModelPrice) {
    with(|h| {
        h.prices.insert(model.to_owned(), price);
    });
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
    pub fn on_request(&self, req: &Request) -> Decision {
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

    /// Calls `on_response_chunk`. Like the gateway, it refuses a `hold` answered to a text
    /// marked `last` (the test panics).
    pub fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        let action = self.plugin.on_response_chunk(event);
        if let (ChunkAction::Hold, StreamEvent::TextDelta(d)) = (&action, event) {
            assert!(
                !d.last,
                "the plugin answered `hold` to a text marked `last` (the gateway counts it as a plugin failure)"
            );
        }
        action
    }

    /// Calls `on_log`.
    pub fn on_log(&self, entry: &LogEntry) {
        self.plugin.on_log(entry)
    }

    /// Calls `admin`.
    pub fn admin(&self, req: &AdminRequest) -> AdminResponse {
        self.plugin.admin(req)
    }
}

/// Starts a chat request for tests: id `req-test`, model `gpt-4o-mini`, OpenAI dialect,
/// no headers, no messages.
///
/// ```
/// let req = weir_sdk::testing::request()
///     .model("gpt-4o")
///     .header("x-tenant", "acme")
///     .system("be brief")
///     .user("hello")
///     .max_tokens(100)
///     .build();
/// assert_eq!(req.message_count(), 2);
/// assert_eq!(req.header("x-tenant").as_deref(), Some("acme"));
/// ```
#[cfg(not(target_arch = "wasm32"))]
pub fn request() -> RequestBuilder {
    RequestBuilder {
        data: RequestData {
            id: "req-test".into(),
            dialect: Dialect::Openai,
            endpoint: Endpoint::Chat,
            model: "gpt-4o-mini".into(),
            stream: false,
            headers: Vec::new(),
            messages: Vec::new(),
            max_tokens: None,
            body: None,
        },
    }
}

/// Builds a fixture [`Request`]; see [`request`].
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    data: RequestData,
}

#[cfg(not(target_arch = "wasm32"))]
impl RequestBuilder {
    /// Sets the request id.
    pub fn id(mut self, id: &str) -> Self {
        self.data.id = id.to_owned();
        self
    }

    /// Sets the request id (same as [`RequestBuilder::id`]).
    pub fn request_id(self, id: &str) -> Self {
        self.id(id)
    }

    /// Sets the model.
    pub fn model(mut self, model: &str) -> Self {
        self.data.model = model.to_owned();
        self
    }

    /// Sets the stream flag.
    pub fn stream(mut self, stream: bool) -> Self {
        self.data.stream = stream;
        self
    }

    /// Sets the dialect.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.data.dialect = dialect;
        self
    }

    /// Sets the endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.data.endpoint = endpoint;
        self
    }

    /// Adds a header (name lower-cased, as the gateway passes them).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.data
            .headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Adds a text message.
    pub fn message(self, role: &str, text: &str) -> Self {
        self.message_view(MessageView::new(role, text))
    }

    /// Adds a message as the gateway shows it (tool calls, `other_parts`...).
    ///
    /// ```
    /// use weir_sdk::{MessageView, ToolCallView};
    /// let req = weir_sdk::testing::request()
    ///     .message_view(MessageView {
    ///         role: "assistant".into(),
    ///         content: String::new(),
    ///         tool_calls: vec![ToolCallView {
    ///             id: "call_1".into(),
    ///             name: "send_mail".into(),
    ///             arguments: r#"{"to":"ann@corp.example"}"#.into(),
    ///         }],
    ///         other_parts: 0,
    ///     })
    ///     .build();
    /// assert_eq!(req.messages()[0].tool_calls[0].name, "send_mail");
    /// ```
    pub fn message_view(mut self, message: MessageView) -> Self {
        self.data.messages.push(message);
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

    /// Adds an assistant message.
    pub fn assistant(self, text: &str) -> Self {
        self.message("assistant", text)
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.data.max_tokens = Some(max_tokens);
        self
    }

    /// Sets the full body (as plugins with capability `body` see it).
    pub fn body(mut self, body: &serde_json::Value) -> Self {
        self.data.body = Some(body.to_string());
        self
    }

    /// The request.
    pub fn build(self) -> Request<'static> {
        Request::from_data(self.data)
    }
}

/// Reads a fixture request: `{"headers": {..}, "body": <chat request>}`, with optional
/// `"request_id"` and `"dialect"` (`"openai"` | `"anthropic"`), the shape `weir plugin test`
/// reads. The body is the gateway's canonical (OpenAI-shaped) request whatever the
/// dialect, read the way the gateway's views show it: text parts joined with `"\n"`,
/// non-text parts counted, `tool_calls` as tool calls (an Anthropic client's `tool_use`
/// blocks arrive there too), `max_tokens` / `max_completion_tokens`, and an embeddings
/// `input` as user messages. `body` is kept only if `with_body`.
///
/// ```
/// let fixture = r#"{
///   "headers": {"X-Tenant": "acme"},
///   "body": {"model": "gpt-4o", "max_tokens": 64, "messages": [
///     {"role": "user", "content": [
///       {"type": "text", "text": "what is this?"},
///       {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
///     ]}
///   ]}
/// }"#;
/// let req = weir_sdk::testing::request_from_fixture(fixture, false).unwrap();
/// assert_eq!(req.header("x-tenant").as_deref(), Some("acme"));
/// assert_eq!(req.last_user_text().as_deref(), Some("what is this?"));
/// assert_eq!(req.message(0).unwrap().other_parts, 1);
/// assert_eq!(req.max_tokens(), Some(64));
/// assert_eq!(req.body(), None);
/// ```
#[cfg(not(target_arch = "wasm32"))]
pub fn request_from_fixture(json: &str, with_body: bool) -> Result<Request<'static>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let body = value.get("body").cloned().unwrap_or_default();
    let mut builder = request();
    if let Some(id) = value.get("request_id").and_then(|v| v.as_str()) {
        builder = builder.id(id);
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
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(|v| v.as_u64()));
    if let Some(n) = max_tokens {
        builder = builder.max_tokens(u32::try_from(n).unwrap_or(u32::MAX));
    }
    for msg in body
        .get("messages")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        builder = builder.message_view(flatten_message(msg));
    }
    if body.get("messages").is_none() {
        let inputs: Vec<String> = match body.get("input") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        if body.get("input").is_some() {
            builder = builder.endpoint(Endpoint::Embeddings);
        }
        for input in inputs {
            builder = builder.user(&input);
        }
    }
    if with_body {
        builder = builder.body(&body);
    }
    Ok(builder.build())
}

/// A content (string or parts) to its text (text parts joined by newlines) and the count
/// of non-text parts.
#[cfg(not(target_arch = "wasm32"))]
fn flatten_content(content: Option<&serde_json::Value>) -> (String, u32) {
    match content {
        Some(serde_json::Value::String(s)) => (s.clone(), 0),
        Some(serde_json::Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect();
            let others = parts.iter().filter(|p| p.get("text").is_none()).count();
            (texts.join("\n"), u32::try_from(others).unwrap_or(u32::MAX))
        }
        _ => (String::new(), 0),
    }
}

/// One message to role + text + tool calls + the count of other parts.
#[cfg(not(target_arch = "wasm32"))]
fn flatten_message(msg: &serde_json::Value) -> MessageView {
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let (content, other_parts) = flatten_content(msg.get("content"));
    let tool_calls: Vec<ToolCallView> = msg
        .get("tool_calls")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .map(|call| {
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
        other_parts,
    }
}

/// A log entry for tests: request `req-test`, status 200, model `gpt-4o-mini` served by
/// `openai`, no usage; set fields as needed.
///
/// ```
/// let mut entry = weir_sdk::testing::log_entry();
/// entry.status = 429;
/// entry.usage = Some(weir_sdk::Usage { prompt_tokens: 10, ..Default::default() });
/// ```
pub fn log_entry() -> LogEntry {
    LogEntry {
        request_id: "req-test".into(),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        target_model: "gpt-4o-mini".into(),
        status: 200,
        ..LogEntry::default()
    }
}

/// A text delta event for choice `choice` (more text may follow: `last` is false).
///
/// ```
/// let event = weir_sdk::testing::text_delta(0, "Hel");
/// assert!(matches!(event, weir_sdk::StreamEvent::TextDelta(d) if !d.last));
/// ```
pub fn text_delta(choice: u32, text: &str) -> StreamEvent {
    StreamEvent::TextDelta(TextDelta {
        choice,
        text: text.to_owned(),
        last: false,
    })
}

/// A text delta marked `last`: held text handed back at a finish, at the end of the
/// stream or when the hold buffer is full. The plugin must not hold it.
///
/// ```
/// let event = weir_sdk::testing::last_text_delta(0, "tail");
/// assert!(matches!(event, weir_sdk::StreamEvent::TextDelta(d) if d.last));
/// ```
pub fn last_text_delta(choice: u32, text: &str) -> StreamEvent {
    StreamEvent::TextDelta(TextDelta {
        choice,
        text: text.to_owned(),
        last: true,
    })
}

/// A call of the plugin's admin endpoint with an empty query and body.
///
/// ```
/// let mut req = weir_sdk::testing::admin_request("POST", "/keys");
/// req.body = br#"{"name": "ci"}"#.to_vec();
/// assert_eq!(req.method, "POST");
/// ```
pub fn admin_request(method: &str, path: &str) -> AdminRequest {
    AdminRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        ..AdminRequest::default()
    }
}

/// The fake host behind the host wrappers on non-wasm targets; same signatures as the
/// generated imports.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) mod fake {
    use super::{Account, FakeHost, FetchRequest, FetchResponse, Gcra, Level, with};
    use crate::{LedgerBalance, LedgerResult, LimitResult, ModelPrice, TargetSnapshot};

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

    pub(crate) fn kv_scan(prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>, String> {
        with(|h| {
            let now = clock(h);
            let mut found: Vec<(String, Vec<u8>)> =
                h.kv.iter()
                    .filter(|(k, (_, exp))| k.starts_with(prefix) && exp.is_none_or(|e| e > now))
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect();
            found.sort();
            found.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            Ok(found)
        })
    }

    pub(crate) fn scratch_get(key: &str) -> Option<Vec<u8>> {
        with(|h| h.scratch.get(key).cloned())
    }

    pub(crate) fn scratch_set(key: &str, value: Option<&[u8]>) {
        with(|h| match value {
            Some(v) => {
                h.scratch.insert(key.to_owned(), v.to_vec());
            }
            None => {
                h.scratch.remove(key);
            }
        });
    }

    /// The stored TAT of `key` in units of `1 / limit` ms (rescaled if it was stored
    /// with another limit), or `None`.
    fn tat(h: &FakeHost, key: &str, limit: u64) -> Option<u128> {
        h.limits.get(key).map(|g| {
            if g.limit == limit || g.limit == 0 {
                g.tat
            } else {
                (g.tat * u128::from(limit)).div_ceil(u128::from(g.limit))
            }
        })
    }

    fn limit_answer(allowed: bool, limit: u64, window_ms: u64, backlog: u128) -> LimitResult {
        // `backlog` is `tat - now`, in units of 1 / limit ms; remaining = (window -
        // backlog_ms) / T.
        let capacity = u128::from(window_ms) * u128::from(limit);
        let remaining = capacity.saturating_sub(backlog) / u128::from(window_ms.max(1));
        LimitResult {
            allowed,
            limit,
            remaining: u64::try_from(remaining).unwrap_or(u64::MAX),
            retry_after_ms: 0,
            reset_ms: u64::try_from(backlog.div_ceil(u128::from(limit.max(1)))).unwrap_or(u64::MAX),
        }
    }

    pub(crate) fn limit_reserve(
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String> {
        if limit == 0 || window_ms == 0 {
            return Ok(LimitResult {
                allowed: amount == 0,
                limit,
                remaining: 0,
                retry_after_ms: if amount == 0 { 0 } else { window_ms },
                reset_ms: 0,
            });
        }
        with(|h| {
            let now = u128::from(clock(h)) * u128::from(limit);
            let capacity = u128::from(window_ms) * u128::from(limit);
            let start = tat(h, key, limit).unwrap_or(now).max(now);
            let cost = u128::from(amount) * u128::from(window_ms);
            let needed = start + cost - now;
            if needed <= capacity {
                h.limits.insert(
                    key.to_owned(),
                    Gcra {
                        tat: start + cost,
                        limit,
                    },
                );
                Ok(limit_answer(true, limit, window_ms, needed))
            } else {
                let mut answer = limit_answer(false, limit, window_ms, start - now);
                answer.retry_after_ms = if amount > limit {
                    // Never admitted: more than a whole window's worth.
                    window_ms
                } else {
                    u64::try_from((needed - capacity).div_ceil(u128::from(limit)))
                        .unwrap_or(u64::MAX)
                };
                Ok(answer)
            }
        })
    }

    pub(crate) fn limit_settle(
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        if limit == 0 || window_ms == 0 || reserved == used {
            return Ok(());
        }
        with(|h| {
            let now = u128::from(clock(h)) * u128::from(limit);
            let tat = tat(h, key, limit).unwrap_or(now);
            let delta = u128::from(used.abs_diff(reserved)) * u128::from(window_ms);
            let moved = if used > reserved {
                tat.max(now) + delta
            } else {
                tat.saturating_sub(delta)
            };
            h.limits.insert(
                key.to_owned(),
                Gcra {
                    tat: moved.max(now),
                    limit,
                },
            );
        });
        Ok(())
    }

    fn account(h: &FakeHost, name: &str) -> Option<Account> {
        let now = clock(h);
        h.ledger
            .get(name)
            .copied()
            .filter(|a| a.expires.is_none_or(|e| e > now))
    }

    fn balance_of(a: Option<Account>) -> LedgerBalance {
        a.map_or(
            LedgerBalance {
                spent: 0.0,
                reserved: 0.0,
            },
            |a| LedgerBalance {
                spent: a.spent,
                reserved: a.reserved,
            },
        )
    }

    fn new_account(h: &FakeHost, ttl_ms: Option<u64>) -> Account {
        Account {
            spent: 0.0,
            reserved: 0.0,
            expires: expiry(h, ttl_ms),
        }
    }

    pub(crate) fn ledger_reserve(
        name: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String> {
        with(|h| {
            let current = account(h, name);
            let mut a = current.unwrap_or_else(|| new_account(h, ttl_ms));
            if a.spent + a.reserved + amount > limit {
                return Ok(LedgerResult {
                    allowed: false,
                    balance: balance_of(current),
                });
            }
            a.reserved += amount;
            h.ledger.insert(name.to_owned(), a);
            Ok(LedgerResult {
                allowed: true,
                balance: balance_of(Some(a)),
            })
        })
    }

    pub(crate) fn ledger_settle(
        name: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String> {
        with(|h| {
            let mut a = account(h, name).unwrap_or_else(|| new_account(h, ttl_ms));
            a.reserved = (a.reserved - reserved).max(0.0);
            a.spent += cost;
            h.ledger.insert(name.to_owned(), a);
            Ok(balance_of(Some(a)))
        })
    }

    pub(crate) fn ledger_release(name: &str, reserved: f64) -> Result<LedgerBalance, String> {
        with(|h| {
            let Some(mut a) = account(h, name) else {
                return Ok(balance_of(None));
            };
            a.reserved = (a.reserved - reserved).max(0.0);
            h.ledger.insert(name.to_owned(), a);
            Ok(balance_of(Some(a)))
        })
    }

    pub(crate) fn ledger_read(name: &str) -> Result<LedgerBalance, String> {
        Ok(with(|h| balance_of(account(h, name))))
    }

    pub(crate) fn target_stats(provider: &str, model: &str) -> Option<TargetSnapshot> {
        with(|h| {
            h.targets
                .get(&(provider.to_owned(), model.to_owned()))
                .copied()
        })
    }

    pub(crate) fn price(model: &str) -> Option<ModelPrice> {
        with(|h| h.prices.get(model).copied())
    }

    pub(crate) fn sha256(data: &[u8]) -> Vec<u8> {
        super::sha256::digest(data).to_vec()
    }

    /// Deterministic per test (after [`super::reset`]): SHA-256 of a call counter and a
    /// block counter. Not random; tests only need distinct bytes.
    pub(crate) fn random_bytes(len: u32) -> Vec<u8> {
        let call = with(|h| {
            h.random_calls += 1;
            h.random_calls
        });
        let len = usize::try_from(len.min(4096)).unwrap_or(4096);
        let mut out = Vec::with_capacity(len);
        let mut block = 0u64;
        while out.len() < len {
            let mut seed = b"weir-sdk fake random ".to_vec();
            seed.extend_from_slice(&call.to_le_bytes());
            seed.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&super::sha256::digest(&seed));
            block += 1;
        }
        out.truncate(len);
        out
    }
}

/// SHA-256 (FIPS 180-4) for the fake host, so the SDK needs no hashing dependency.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
mod sha256 {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub(super) fn digest(data: &[u8]) -> [u8; 32] {
        let mut h: [u32; 8] = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ];
        let mut message = data.to_vec();
        let bits = u64::try_from(data.len())
            .unwrap_or(u64::MAX)
            .wrapping_mul(8);
        message.push(0x80);
        while message.len() % 64 != 56 {
            message.push(0);
        }
        message.extend_from_slice(&bits.to_be_bytes());
        for block in message.chunks_exact(64) {
            let mut w = [0u32; 64];
            for (i, word) in block.chunks_exact(4).enumerate() {
                w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16]
                    .wrapping_add(s0)
                    .wrapping_add(w[i - 7])
                    .wrapping_add(s1);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
            for i in 0..64 {
                let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = hh
                    .wrapping_add(s1)
                    .wrapping_add(ch)
                    .wrapping_add(K[i])
                    .wrapping_add(w[i]);
                let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = s0.wrapping_add(maj);
                hh = g;
                g = f;
                f = e;
                e = d.wrapping_add(t1);
                d = c;
                c = b;
                b = a;
                a = t1.wrapping_add(t2);
            }
            for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
                *x = x.wrapping_add(y);
            }
        }
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn known_vectors() {
            let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
            assert_eq!(
                hex(super::digest(b"")),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            );
            assert_eq!(
                hex(super::digest(
                    b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
                )),
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
            );
            let million = vec![b'a'; 1_000_000];
            assert_eq!(
                hex(super::digest(&million)),
                "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{reset, set_now_ms};
    use crate::{kv, ledger, limit};

    #[test]
    fn limiter_is_gcra() {
        reset();
        set_now_ms(10_000);
        // 10 units per second: T = 100 ms.
        let r = limit::reserve("k", 10, 1_000, 4).unwrap();
        assert!(r.allowed);
        assert_eq!((r.limit, r.remaining, r.reset_ms), (10, 6, 400));
        let r = limit::reserve("k", 10, 1_000, 7).unwrap();
        assert!(!r.allowed, "4 + 7 > 10");
        assert_eq!((r.remaining, r.retry_after_ms, r.reset_ms), (6, 100, 400));
        // Time gives units back.
        set_now_ms(10_100);
        let r = limit::reserve("k", 10, 1_000, 7).unwrap();
        assert!(r.allowed);
        assert_eq!((r.remaining, r.reset_ms), (0, 1_000));
        // More than the limit is never admitted.
        let r = limit::reserve("big", 10, 1_000, 11).unwrap();
        assert!(!r.allowed);
        // Amount 0 reads the state without changing it.
        assert_eq!(limit::reserve("k", 10, 1_000, 0).unwrap().remaining, 0);
    }

    #[test]
    fn limiter_settle_moves_the_tat_not_below_now() {
        reset();
        set_now_ms(0);
        limit::reserve("t", 100, 1_000, 50).unwrap();
        // Used 20 of 50: 30 given back.
        limit::settle("t", 100, 1_000, 50, 20).unwrap();
        assert_eq!(limit::reserve("t", 100, 1_000, 0).unwrap().remaining, 80);
        // Used more than reserved: charged.
        limit::settle("t", 100, 1_000, 10, 60).unwrap();
        assert_eq!(limit::reserve("t", 100, 1_000, 0).unwrap().remaining, 30);
        // Giving back more than was taken stops at a full limiter.
        limit::settle("t", 100, 1_000, 500, 0).unwrap();
        assert_eq!(limit::reserve("t", 100, 1_000, 0).unwrap().remaining, 100);
        set_now_ms(5_000);
        limit::settle("t", 100, 1_000, 10, 0).unwrap();
        let r = limit::reserve("t", 100, 1_000, 100).unwrap();
        assert!(r.allowed, "an idle key cannot bank more than the limit");
    }

    #[test]
    fn ledger_reserves_settles_releases_and_expires() {
        reset();
        set_now_ms(0);
        let r = ledger::reserve("a", 1.0, 0.75, Some(1_000)).unwrap();
        assert!(r.allowed);
        let r = ledger::reserve("a", 1.0, 0.5, Some(1_000)).unwrap();
        assert!(!r.allowed);
        assert_eq!((r.balance.spent, r.balance.reserved), (0.0, 0.75));
        let b = ledger::settle("a", 0.75, 0.25, None).unwrap();
        assert_eq!((b.spent, b.reserved), (0.25, 0.0));
        assert!(ledger::reserve("a", 1.0, 0.75, None).unwrap().allowed);
        assert_eq!(ledger::release("a", 0.75).unwrap().reserved, 0.0);
        // The account was created with a 1 s TTL.
        set_now_ms(1_000);
        assert_eq!(ledger::balance("a").unwrap().spent, 0.0);
        // A refused reservation creates nothing.
        assert!(!ledger::reserve("b", 1.0, 2.0, None).unwrap().allowed);
        assert_eq!(ledger::release("b", 1.0).unwrap().reserved, 0.0);
    }

    #[test]
    fn kv_scan_skips_expired_keys_and_stops_at_the_limit() {
        reset();
        set_now_ms(0);
        kv::set("p/1", b"a", None).unwrap();
        kv::set("p/2", b"b", Some(10)).unwrap();
        kv::set("p/3", b"c", None).unwrap();
        assert_eq!(kv::scan("p/", 2).unwrap().len(), 2);
        set_now_ms(10);
        let keys: Vec<String> = kv::scan("p/", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["p/1", "p/3"]);
    }
}
