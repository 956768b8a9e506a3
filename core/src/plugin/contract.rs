//! The plugin contract on the host side: plain Rust mirrors of `sdk/wit/weir.wit`.
//!
//! Both runtimes (WASM in [`super::wasm`], Lua) implement [`PluginRuntime`] with these
//! types, and the chain only ever talks to that trait. The record and variant types derive
//! wasmtime's component traits so the WASM host lowers them straight into guest memory,
//! without an intermediate copy; field order and names must match the WIT file exactly
//! (the WASM host type-checks them against every component when it loads).
//!
//! Host functions a plugin may call (key-value state, metrics, logs, fetch) go through
//! [`HostApi`], one object per plugin instance (namespaced by plugin name), supplied by
//! whoever loads the plugin. The request-scoped bag (`ctx-get` / `ctx-set`) is the
//! [`HookCtx`] the chain passes to each call.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::component::{ComponentType, Lift, Lower};

/// Ordered name/value pairs (WIT `pairs`). Header names are lower-case.
pub type Pairs = Vec<(String, String)>;

/// The API dialect the client spoke (WIT `dialect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(enum)]
#[repr(u8)]
pub enum Dialect {
    /// OpenAI chat completions / embeddings.
    #[component(name = "openai")]
    OpenAi,
    /// Anthropic messages.
    #[component(name = "anthropic")]
    Anthropic,
}

/// Which endpoint a request targets (WIT `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(enum)]
#[repr(u8)]
pub enum Endpoint {
    /// Chat completion.
    #[component(name = "chat")]
    Chat,
    /// Embeddings.
    #[component(name = "embeddings")]
    Embeddings,
}

/// A tool call requested by the model (WIT `tool-call-view`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ToolCallView {
    /// Provider-assigned call id.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments, a JSON document as text.
    pub arguments: String,
}

/// One chat message flattened to text (WIT `message-view`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct MessageView {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the message (text parts joined with a newline).
    pub content: String,
    /// Tool calls made by an assistant message.
    #[component(name = "tool-calls")]
    pub tool_calls: Vec<ToolCallView>,
}

/// What `on-request` sees (WIT `request-view`).
///
/// The request-scoped metadata bag is not copied in: plugins read it with `ctx-get`
/// (backed by [`HookCtx::metadata`]).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct RequestView {
    /// The request id (`x-request-id`).
    #[component(name = "request-id")]
    pub request_id: String,
    /// Inbound dialect.
    pub dialect: Dialect,
    /// Target endpoint.
    pub endpoint: Endpoint,
    /// The model the client asked for, after earlier plugins' changes.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Only the headers the manifest declares, or all of them with `headers = ["*"]`.
    pub headers: Pairs,
    /// The conversation, flattened to text.
    pub messages: Vec<MessageView>,
    /// The full canonical body as JSON, only for plugins with capability `body`.
    pub body: Option<String>,
}

impl RequestView {
    /// The first header named `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A provider target chosen by a routing plugin (WIT `target`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct Target {
    /// A provider name from the gateway config.
    pub provider: String,
    /// The upstream model name.
    pub model: String,
}

/// Changes a request hook asks for (WIT `mutations`); empty fields change nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct Mutations {
    /// Set (replace) request headers.
    #[component(name = "set-headers")]
    pub set_headers: Pairs,
    /// Remove request headers.
    #[component(name = "remove-headers")]
    pub remove_headers: Vec<String>,
    /// Replace the model.
    #[component(name = "set-model")]
    pub set_model: Option<String>,
    /// Replace the messages (role + text; tool calls kept from the originals by index).
    #[component(name = "set-messages")]
    pub set_messages: Option<Vec<MessageView>>,
    /// Replace the whole canonical body (JSON text).
    #[component(name = "set-body")]
    pub set_body: Option<String>,
    /// Set the route targets (primary first, then fallbacks).
    #[component(name = "set-targets")]
    pub set_targets: Option<Vec<Target>>,
    /// Set entries in the request-scoped metadata bag.
    #[component(name = "set-metadata")]
    pub set_metadata: Pairs,
    /// Headers to add to the response sent to the client.
    #[component(name = "set-response-headers")]
    pub set_response_headers: Pairs,
}

impl Mutations {
    /// Whether these mutations change nothing.
    pub fn is_empty(&self) -> bool {
        self == &Mutations::default()
    }
}

/// An immediate answer that ends the chain (WIT `reply`).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Pairs,
    /// Response body (usually JSON).
    pub body: Vec<u8>,
}

/// Result of `on-request` (WIT `decision`).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(variant)]
pub enum Decision {
    /// Go on to the next plugin, with changes.
    #[component(name = "continue")]
    Continue(Mutations),
    /// Answer now; later plugins and the provider are skipped.
    #[component(name = "reply")]
    Reply(Reply),
}

/// Token usage (WIT `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct Usage {
    /// Prompt tokens.
    #[component(name = "prompt-tokens")]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[component(name = "completion-tokens")]
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    #[component(name = "cached-tokens")]
    pub cached_tokens: u64,
}

/// One choice of a non-streaming response (WIT `choice-view`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ChoiceView {
    /// Choice index.
    pub index: u32,
    /// The assistant text.
    pub text: String,
    /// Tool calls made by the model.
    #[component(name = "tool-calls")]
    pub tool_calls: Vec<ToolCallView>,
    /// Why generation stopped.
    #[component(name = "finish-reason")]
    pub finish_reason: Option<String>,
}

/// What `on-response` sees (WIT `response-view`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ResponseView {
    /// The request id.
    #[component(name = "request-id")]
    pub request_id: String,
    /// The model that answered.
    pub model: String,
    /// HTTP status from the provider.
    pub status: u16,
    /// The choices.
    pub choices: Vec<ChoiceView>,
    /// Token usage, when known.
    pub usage: Option<Usage>,
}

/// Changes `on-response` asks for (WIT `response-mutations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ResponseMutations {
    /// Replace the text of choices: (choice index, new text).
    #[component(name = "set-choice-text")]
    pub set_choice_text: Vec<(u32, String)>,
    /// Headers to add to the response sent to the client.
    #[component(name = "set-headers")]
    pub set_headers: Pairs,
    /// Set entries in the request-scoped metadata bag.
    #[component(name = "set-metadata")]
    pub set_metadata: Pairs,
}

/// Result of `on-response` (WIT `response-decision`).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(variant)]
pub enum ResponseDecision {
    /// Keep the response, with changes.
    #[component(name = "continue")]
    Continue(ResponseMutations),
    /// Replace the response entirely.
    #[component(name = "reply")]
    Reply(Reply),
}

/// A text fragment of a choice (WIT `text-delta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct TextDelta {
    /// Choice index.
    pub choice: u32,
    /// The text.
    pub text: String,
}

/// A fragment of a tool call (WIT `tool-call-delta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ToolCallDelta {
    /// Choice index.
    pub choice: u32,
    /// Tool call index within the choice.
    pub index: u32,
    /// Call id (first fragment only).
    pub id: Option<String>,
    /// Function name (first fragment only).
    pub name: Option<String>,
    /// A fragment of the JSON arguments.
    pub arguments: String,
}

/// The end of a choice (WIT `finish`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct Finish {
    /// Choice index.
    pub choice: u32,
    /// Finish reason (`stop`, `length`, `tool_calls`...).
    pub reason: String,
}

/// A normalized stream event, whatever the provider (WIT `stream-event`).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(variant)]
pub enum StreamEvent {
    /// Text delta.
    #[component(name = "text-delta")]
    TextDelta(TextDelta),
    /// Tool call delta.
    #[component(name = "tool-call-delta")]
    ToolCallDelta(ToolCallDelta),
    /// Usage report.
    #[component(name = "usage")]
    Usage(Usage),
    /// End of a choice.
    #[component(name = "finish")]
    Finish(Finish),
}

/// Result of `on-response-chunk` (WIT `chunk-action`).
#[derive(Debug, Clone, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(variant)]
pub enum ChunkAction {
    /// Forward the event unchanged.
    #[component(name = "pass")]
    Pass,
    /// Forward these events instead (possibly none).
    #[component(name = "replace")]
    Replace(Vec<StreamEvent>),
    /// Hold the text back; the chain buffers it (bounded) and hands the accumulated
    /// text to the plugin again with the next event.
    #[component(name = "hold")]
    Hold,
    /// End the stream with an error event carrying this message.
    #[component(name = "abort")]
    Abort(String),
}

/// What `on-log` sees, after the response was sent (WIT `log-entry`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct LogEntry {
    /// The request id.
    #[component(name = "request-id")]
    pub request_id: String,
    /// The model the client asked for.
    pub model: String,
    /// The provider that served the request (empty if none).
    pub provider: String,
    /// The upstream model (empty if none).
    #[component(name = "target-model")]
    pub target_model: String,
    /// HTTP status sent to the client.
    pub status: u16,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Token usage, when known.
    pub usage: Option<Usage>,
    /// Total latency in milliseconds.
    #[component(name = "latency-ms")]
    pub latency_ms: u64,
    /// Time to first token in milliseconds (streams).
    #[component(name = "ttft-ms")]
    pub ttft_ms: Option<u64>,
    /// The request-scoped metadata bag at the end of the request.
    pub metadata: Pairs,
}

/// The hooks of the contract, for deadlines, metrics and manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `init(config)`, once per fresh instance.
    Init,
    /// `on-request`.
    OnRequest,
    /// `on-response`.
    OnResponse,
    /// `on-response-chunk`.
    OnResponseChunk,
    /// `on-log`.
    OnLog,
}

impl Hook {
    /// The WIT / manifest name (`on-request`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Init => "init",
            Hook::OnRequest => "on-request",
            Hook::OnResponse => "on-response",
            Hook::OnResponseChunk => "on-response-chunk",
            Hook::OnLog => "on-log",
        }
    }
}

/// Why a hook call failed. Every variant means the instance that ran it was discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The plugin trapped or panicked (WASM trap, Lua runtime error).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The hook ran past its CPU deadline.
    #[error("plugin exceeded its deadline of {deadline_ms} ms")]
    Timeout {
        /// The deadline that was exceeded.
        deadline_ms: u64,
    },
    /// The plugin hit its memory limit.
    #[error("plugin exceeded its memory limit")]
    OutOfMemory,
    /// The plugin reported an error itself (e.g. `init` rejected its config), or returned
    /// a malformed decision.
    #[error("plugin error: {0}")]
    Plugin(String),
    /// The host could not run the plugin at all (instantiation failed).
    #[error("plugin unavailable: {0}")]
    Unavailable(String),
}

impl HookError {
    /// The `kind` label of `weir_plugin_failures_total{plugin,kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            HookError::Trap(_) => "trap",
            HookError::Timeout { .. } => "timeout",
            HookError::OutOfMemory => "oom",
            HookError::Plugin(_) => "error",
            HookError::Unavailable(_) => "unavailable",
        }
    }
}

/// Request-scoped context for one hook call: the metadata bag that `ctx-get` / `ctx-set`
/// read and write, shared by all plugins of one request.
#[derive(Debug)]
pub struct HookCtx<'a> {
    /// The request id, for logs.
    pub request_id: &'a str,
    /// The request-scoped metadata bag (`RequestCtx::metadata`).
    pub metadata: &'a mut BTreeMap<String, String>,
}

/// A plugin loaded into a runtime (WASM or Lua). Calls are synchronous and short
/// (microseconds); each is bounded by the plugin's deadline and memory limit.
///
/// An `Err` means the call failed and the instance that ran it was discarded; the chain
/// applies the plugin's failure policy. Hooks a plugin does not declare are never called.
pub trait PluginRuntime: Send + Sync {
    /// The plugin instance name (for logs and metrics).
    fn name(&self) -> &str;

    /// Runs `on-request`.
    fn on_request(&self, ctx: &mut HookCtx<'_>, req: &RequestView) -> Result<Decision, HookError>;

    /// Runs `on-response` on a complete, non-streaming response.
    fn on_response(
        &self,
        ctx: &mut HookCtx<'_>,
        resp: &ResponseView,
    ) -> Result<ResponseDecision, HookError>;

    /// Runs `on-response-chunk` on one normalized stream event.
    fn on_chunk(
        &self,
        ctx: &mut HookCtx<'_>,
        event: &StreamEvent,
    ) -> Result<ChunkAction, HookError>;

    /// Runs `on-log` after the response was sent.
    fn on_log(&self, ctx: &mut HookCtx<'_>, entry: &LogEntry) -> Result<(), HookError>;
}

/// Log level of `weir.log` / WIT `host.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// An outbound HTTP request (`http-fetch`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchRequest {
    /// `GET`, `POST`...
    pub method: String,
    /// Absolute URL; its host must be in the plugin's allow-list.
    pub url: String,
    /// Request headers.
    pub headers: Pairs,
    /// Request body.
    pub body: Vec<u8>,
    /// Timeout in milliseconds.
    pub timeout_ms: u32,
}

/// The answer to a [`FetchRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Pairs,
    /// Response body.
    pub body: Vec<u8>,
}

/// The host functions a plugin may call, one object per plugin (keys are namespaced by
/// plugin name inside the implementation). Errors are plain messages handed to the plugin.
///
/// Implementations must be fast: they run synchronously inside a hook call. The CPU
/// deadline only counts time spent in plugin code, so a slow host function (notably
/// `http_fetch`) must enforce its own timeout.
pub trait HostApi: Send + Sync {
    /// Reads a key.
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Writes a key with an optional TTL in milliseconds.
    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String>;
    /// Adds `delta` to an integer key (missing = 0), returning the new value; the TTL
    /// applies when the key is created.
    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String>;
    /// Sets `key` to `value` (`None` deletes) only if its current value is `expected`
    /// (`None` = absent); returns whether it swapped.
    fn kv_cas(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String>;
    /// Deletes a key; returns whether it existed.
    fn kv_delete(&self, key: &str) -> Result<bool, String>;
    /// Logs a message from the plugin.
    fn log(&self, level: LogLevel, message: &str);
    /// Adds to a counter labelled with the plugin name.
    fn counter_add(&self, name: &str, value: u64);
    /// Observes a histogram value labelled with the plugin name.
    fn histogram_observe(&self, name: &str, value: f64);
    /// Wall-clock milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64 {
        now_ms()
    }
    /// Estimates the tokens in `text` (default: about four bytes per token).
    fn count_tokens(&self, text: &str) -> u32 {
        estimate_tokens(text)
    }
    /// Outbound HTTP limited to the plugin's allow-list (default: refused).
    fn http_fetch(&self, req: &FetchRequest) -> Result<FetchResponse, String> {
        Err(format!(
            "fetch of {} is not allowed for this plugin",
            req.url
        ))
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A cheap token estimate: about four bytes of text per token, at least one for
/// non-empty text.
pub fn estimate_tokens(text: &str) -> u32 {
    if text.is_empty() {
        return 0;
    }
    u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
}

/// An in-memory [`HostApi`] for tests, the offline harness and benchmarks: key-value with
/// TTL in a map, logs and metrics recorded for assertions.
#[derive(Debug, Default)]
pub struct MemoryHost {
    inner: Mutex<MemoryHostState>,
}

/// What a [`MemoryHost`] has recorded.
#[derive(Debug, Default, Clone)]
pub struct MemoryHostState {
    /// Keys with their value and expiry (ms since the epoch).
    pub kv: HashMap<String, (Vec<u8>, Option<u64>)>,
    /// Logged messages.
    pub logs: Vec<(LogLevel, String)>,
    /// Counter totals by name.
    pub counters: BTreeMap<String, u64>,
    /// Histogram observations by name.
    pub histograms: BTreeMap<String, Vec<f64>>,
}

impl MemoryHost {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything recorded so far (expired keys removed).
    pub fn snapshot(&self) -> MemoryHostState {
        let mut state = self.lock();
        let now = now_ms();
        state.kv.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
        state.clone()
    }

    /// Reads a live key as UTF-8 text.
    pub fn get_string(&self, key: &str) -> Option<String> {
        self.kv_get(key)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryHostState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(state: &MemoryHostState, key: &str) -> Option<Vec<u8>> {
        let now = now_ms();
        state
            .kv
            .get(key)
            .filter(|(_, exp)| exp.is_none_or(|e| e > now))
            .map(|(v, _)| v.clone())
    }
}

fn expiry(ttl_ms: Option<u64>) -> Option<u64> {
    ttl_ms.map(|t| now_ms().saturating_add(t))
}

impl HostApi for MemoryHost {
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(Self::live(&self.lock(), key))
    }

    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        self.lock()
            .kv
            .insert(key.to_owned(), (value.to_vec(), expiry(ttl_ms)));
        Ok(())
    }

    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        let mut state = self.lock();
        let (current, exp) = match Self::live(&state, key) {
            Some(v) => {
                let text = std::str::from_utf8(&v).map_err(|e| e.to_string())?;
                let n: i64 = text
                    .parse()
                    .map_err(|_| format!("key {key} does not hold an integer"))?;
                (n, state.kv.get(key).and_then(|(_, e)| *e))
            }
            None => (0, expiry(ttl_ms)),
        };
        let next = current.saturating_add(delta);
        state
            .kv
            .insert(key.to_owned(), (next.to_string().into_bytes(), exp));
        Ok(next)
    }

    fn kv_cas(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String> {
        let mut state = self.lock();
        if Self::live(&state, key).as_deref() != expected {
            return Ok(false);
        }
        match value {
            Some(v) => {
                state
                    .kv
                    .insert(key.to_owned(), (v.to_vec(), expiry(ttl_ms)));
            }
            None => {
                state.kv.remove(key);
            }
        }
        Ok(true)
    }

    fn kv_delete(&self, key: &str) -> Result<bool, String> {
        let mut state = self.lock();
        let existed = Self::live(&state, key).is_some();
        state.kv.remove(key);
        Ok(existed)
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.lock().logs.push((level, message.to_owned()));
    }

    fn counter_add(&self, name: &str, value: u64) {
        *self.lock().counters.entry(name.to_owned()).or_default() += value;
    }

    fn histogram_observe(&self, name: &str, value: f64) {
        self.lock()
            .histograms
            .entry(name.to_owned())
            .or_default()
            .push(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_host_kv_incr_cas_delete() {
        let host = MemoryHost::new();
        assert_eq!(host.kv_incr("n", 2, None), Ok(2));
        assert_eq!(host.kv_incr("n", 3, None), Ok(5));
        assert_eq!(host.kv_cas("k", None, Some(b"a"), None), Ok(true));
        assert_eq!(host.kv_cas("k", None, Some(b"b"), None), Ok(false));
        assert_eq!(host.kv_cas("k", Some(b"a"), Some(b"b"), None), Ok(true));
        assert_eq!(host.kv_get("k"), Ok(Some(b"b".to_vec())));
        assert_eq!(host.kv_delete("k"), Ok(true));
        assert_eq!(host.kv_delete("k"), Ok(false));
        host.kv_set("gone", b"x", Some(0)).ok();
        assert_eq!(host.kv_get("gone"), Ok(None));
    }

    #[test]
    fn hook_error_kinds() {
        assert_eq!(HookError::Timeout { deadline_ms: 5 }.kind(), "timeout");
        assert_eq!(HookError::OutOfMemory.kind(), "oom");
        assert_eq!(HookError::Trap("x".into()).kind(), "trap");
    }
}
