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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::component::{ComponentType, Lift, Lower};

pub use super::manifest::HeaderSelection;

/// Ordered name/value pairs (WIT `pairs`). Header names are lower-case.
pub type Pairs = Vec<(String, String)>;

/// The API dialect the client spoke (WIT `dialect`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(enum)]
#[repr(u8)]
pub enum Dialect {
    /// OpenAI chat completions / embeddings.
    #[default]
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

/// One chat message, or one embeddings input as a `user` message (WIT `message-view`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct MessageView {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text: a string content as is, text parts joined with `"\n"`.
    pub content: String,
    /// Tool calls made by an assistant message.
    #[component(name = "tool-calls")]
    pub tool_calls: Vec<ToolCallView>,
    /// How many non-text content parts the message has (never removed by text changes).
    #[component(name = "other-parts")]
    pub other_parts: u32,
}

/// New arguments for one tool call (WIT `tool-call-edit`): of message `owner` (requests)
/// or choice `owner` (responses), call `index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct ToolCallEdit {
    /// Message index (requests) or choice index (responses).
    pub owner: u32,
    /// Tool call index within it.
    pub index: u32,
    /// The new arguments, a JSON document as text.
    pub arguments: String,
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
    /// Replace the messages (role + text; tool calls, non-text parts and names kept from
    /// the original at the same index).
    #[component(name = "set-messages")]
    pub set_messages: Option<Vec<MessageView>>,
    /// Replace the text of single messages (index, text), keeping their non-text parts.
    #[component(name = "set-message-text")]
    pub set_message_text: Vec<(u32, String)>,
    /// Replace tool-call arguments in the conversation.
    #[component(name = "set-tool-call-arguments")]
    pub set_tool_call_arguments: Vec<ToolCallEdit>,
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

    /// Whether they change the body (model, messages, text, tool calls or all of it).
    pub fn changes_body(&self) -> bool {
        self.set_body.is_some()
            || self.set_model.is_some()
            || self.set_messages.is_some()
            || !self.set_message_text.is_empty()
            || !self.set_tool_call_arguments.is_empty()
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
    /// Prompt tokens written to the provider's cache (Anthropic cache creation).
    #[component(name = "cache-write-tokens")]
    pub cache_write_tokens: u64,
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
    /// Replace the arguments of tool calls the model made (`owner` = choice index).
    #[component(name = "set-tool-call-arguments")]
    pub set_tool_call_arguments: Vec<ToolCallEdit>,
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
    /// The text (with what this plugin held before prepended).
    pub text: String,
    /// The host will not accept `hold` for this text (choice finished, stream ended).
    pub last: bool,
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
    /// text to the plugin again with the next text of the choice, and at the choice's
    /// finish, at the end of the stream and when the buffer is full with `last = true`.
    #[component(name = "hold")]
    Hold,
    /// End the stream with an error event carrying this message.
    #[component(name = "abort")]
    Abort(String),
}

/// One upstream attempt (WIT `attempt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower, serde::Serialize)]
#[component(record)]
pub struct Attempt {
    /// Provider name from the gateway config.
    pub provider: String,
    /// The upstream model.
    #[component(name = "target-model")]
    pub target_model: String,
    /// HTTP status from the target, 0 when none came.
    pub status: u16,
    /// Time from sending to the first byte of the answer (or the failure), ms.
    #[component(name = "latency-ms")]
    pub latency_ms: u64,
    /// `connect`, `timeout`, `status`, `stream`... when the attempt failed.
    pub error: Option<String>,
}

/// One plugin's decision on a request (WIT `plugin-decision`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower, serde::Serialize)]
#[component(record)]
pub struct PluginDecision {
    /// Instance name.
    pub plugin: String,
    /// `continue`, `reply_<status>`, `skipped_<kind>` (failed open or breaker open),
    /// `failure_<kind>` (failed closed), `shadow_<decision>`.
    pub decision: String,
}

/// What `on-log` sees, after the response was sent (WIT `log-entry`).
#[derive(Debug, Clone, Default, PartialEq, ComponentType, Lift, Lower)]
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
    /// Every upstream attempt, in order.
    pub attempts: Vec<Attempt>,
    /// What each `on-request` plugin decided, in chain order.
    pub decisions: Vec<PluginDecision>,
    /// Cost in USD from `[prices]`, when known.
    #[component(name = "cost-usd")]
    pub cost_usd: Option<f64>,
}

/// A call to a plugin's admin endpoint (WIT `admin-request`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct AdminRequest {
    /// `GET`, `POST`, `DELETE`...
    pub method: String,
    /// The path below the instance, starting with `/`.
    pub path: String,
    /// The query string without `?`.
    pub query: String,
    /// The request body.
    pub body: Vec<u8>,
}

/// The answer of a plugin's admin endpoint (WIT `admin-response`).
#[derive(Debug, Clone, Default, PartialEq, Eq, ComponentType, Lift, Lower)]
#[component(record)]
pub struct AdminResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Vec<u8>,
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
    /// `admin`.
    Admin,
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
            Hook::Admin => "admin",
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
/// read and write (shared by all plugins of one request), the calling plugin's private
/// scratch (`scratch-get` / `scratch-set`), and the deadline of this call.
#[derive(Debug)]
pub struct HookCtx<'a> {
    /// The request id, for logs.
    pub request_id: &'a str,
    /// The request-scoped metadata bag (`RequestCtx::metadata`).
    pub metadata: &'a mut BTreeMap<String, String>,
    /// This plugin's request scratch (a slot of `RequestCtx::scratch`).
    pub scratch: &'a mut BTreeMap<String, Vec<u8>>,
    /// The CPU deadline of this call when the chain sets one (scaled by input size, or
    /// the instance's `deadline_ms`); `None`: the manifest's deadline for the hook.
    pub deadline: Option<Duration>,
}

/// What the calling plugin may read of a request (from its manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Declared headers (`headers = [..]`, lower-case), or every header.
    pub headers: HeaderSelection,
    /// Capability `body`: the canonical body as JSON.
    pub body: bool,
}

/// The request `on-request` reads, through the WIT `request` resource or the Lua lazy
/// table. The chain moves the request's headers and body in for each call and back after
/// (no copy); the accessors copy only what a plugin asks for, and only what its
/// [`Access`] allows.
#[derive(Debug, Default)]
pub struct RequestView {
    /// The request id.
    pub request_id: String,
    /// Inbound dialect.
    pub dialect: Dialect,
    /// The request headers.
    pub headers: http::HeaderMap,
    /// The canonical body.
    pub body: crate::request::Body,
    /// The body as JSON, once a plugin with capability `body` asked (kept by the chain
    /// for the plugins after it until the body changes).
    pub body_json: Option<String>,
    /// What the calling plugin may read.
    pub access: Arc<Access>,
}

impl RequestView {
    /// Target endpoint.
    pub fn endpoint(&self) -> Endpoint {
        match self.body {
            crate::request::Body::Chat(_) => Endpoint::Chat,
            crate::request::Body::Embeddings(_) => Endpoint::Embeddings,
        }
    }

    /// The model asked for (after earlier plugins' changes).
    pub fn model(&self) -> &str {
        self.body.model()
    }

    /// Whether the client asked for a stream.
    pub fn stream(&self) -> bool {
        self.body.stream()
    }

    /// A declared header; several values joined with ", ". Undeclared: `None`.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        if !self.access.headers.allows(&name) {
            return None;
        }
        let mut values = self.headers.get_all(name.as_str()).iter();
        let first = values.next()?.to_str().ok()?;
        let mut out = first.to_owned();
        for v in values {
            if let Ok(v) = v.to_str() {
                out.push_str(", ");
                out.push_str(v);
            }
        }
        Some(out)
    }

    /// Every declared header present, in order (values that are not text are skipped).
    pub fn headers(&self) -> Pairs {
        let pair = |k: &http::HeaderName, v: &http::HeaderValue| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_owned(), v.to_owned()))
        };
        match &self.access.headers {
            HeaderSelection::All => self
                .headers
                .iter()
                .filter_map(|(k, v)| pair(k, v))
                .collect(),
            HeaderSelection::Only(names) => names
                .iter()
                .flat_map(|n| self.headers.get_all(n.as_str()).iter().map(move |v| (n, v)))
                .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.clone(), v.to_owned())))
                .collect(),
        }
    }

    /// Number of messages (embeddings: inputs).
    pub fn message_count(&self) -> u32 {
        let n = match &self.body {
            crate::request::Body::Chat(c) => c.messages.len(),
            crate::request::Body::Embeddings(e) => e.input_texts().len(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// One message by index.
    pub fn message(&self, index: u32) -> Option<MessageView> {
        let i = usize::try_from(index).ok()?;
        match &self.body {
            crate::request::Body::Chat(c) => c.messages.get(i).map(message_view),
            crate::request::Body::Embeddings(e) => {
                e.input_texts().into_iter().nth(i).map(input_view)
            }
        }
    }

    /// Every message, in order.
    pub fn messages(&self) -> Vec<MessageView> {
        match &self.body {
            crate::request::Body::Chat(c) => c.messages.iter().map(message_view).collect(),
            crate::request::Body::Embeddings(e) => {
                e.input_texts().into_iter().map(input_view).collect()
            }
        }
    }

    /// `max_tokens` / `max_completion_tokens`, when set.
    pub fn max_tokens(&self) -> Option<u32> {
        match &self.body {
            crate::request::Body::Chat(c) => c.max_output_tokens(),
            crate::request::Body::Embeddings(_) => None,
        }
    }

    /// The canonical body as JSON for a plugin with capability `body` (serialized on the
    /// first call of the request, kept for the next ones).
    pub fn body_json(&mut self) -> Option<String> {
        if !self.access.body {
            return None;
        }
        if self.body_json.is_none() {
            self.body_json = match &self.body {
                crate::request::Body::Chat(c) => serde_json::to_string(c).ok(),
                crate::request::Body::Embeddings(e) => serde_json::to_string(e).ok(),
            };
        }
        self.body_json.clone()
    }
}

/// The view of a chat message: text parts joined with `"\n"`, tool calls, the count of
/// other parts.
pub fn message_view(m: &crate::api::openai::ChatMessage) -> MessageView {
    use crate::api::openai::MessageContent;
    let (content, other_parts) = match &m.content {
        None => (String::new(), 0),
        Some(MessageContent::Text(t)) => (t.clone(), 0),
        Some(MessageContent::Parts(parts)) => {
            let texts: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
            let others = parts.iter().filter(|p| p.text.is_none()).count();
            (texts.join("\n"), u32::try_from(others).unwrap_or(u32::MAX))
        }
    };
    MessageView {
        role: m.role.clone(),
        content,
        tool_calls: m
            .tool_calls
            .iter()
            .flatten()
            .map(|t| ToolCallView {
                id: t.id.clone(),
                name: t.function.name.clone(),
                arguments: t.function.arguments.clone(),
            })
            .collect(),
        other_parts,
    }
}

fn input_view(content: String) -> MessageView {
    MessageView {
        role: "user".into(),
        content,
        tool_calls: Vec::new(),
        other_parts: 0,
    }
}

/// A plugin loaded into a runtime (WASM or Lua). Calls are synchronous and short
/// (microseconds); each is bounded by the plugin's deadline and memory limit.
///
/// An `Err` means the call failed and the instance that ran it was discarded; the chain
/// applies the plugin's failure policy. Hooks a plugin does not declare are never called.
pub trait PluginRuntime: Send + Sync {
    /// The plugin instance name (for logs and metrics).
    fn name(&self) -> &str;

    /// Runs `on-request`. The runtime moves `req` into its call (the request resource or
    /// lazy table reads it) and back before returning.
    fn on_request(
        &self,
        ctx: &mut HookCtx<'_>,
        req: &mut RequestView,
    ) -> Result<Decision, HookError>;

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

    /// Runs `admin` (a call to `/admin/plugins/<instance>/...`). The context has an empty
    /// bag and scratch.
    fn admin(&self, ctx: &mut HookCtx<'_>, req: &AdminRequest) -> Result<AdminResponse, HookError>;
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

/// The answer of the limiter (WIT `host.limit-result`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitResult {
    /// Admitted (and reserved).
    pub allowed: bool,
    /// The limit per window.
    pub limit: u64,
    /// Units still available after this call.
    pub remaining: u64,
    /// When refused: ms until the amount would be admitted.
    pub retry_after_ms: u64,
    /// Ms until the limiter is back at its full limit.
    pub reset_ms: u64,
}

/// A spend-ledger account in USD (WIT `host.ledger-balance`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LedgerBalance {
    /// Settled spend.
    pub spent: f64,
    /// Reserved by requests in flight.
    pub reserved: f64,
}

/// The answer of `ledger-reserve` (WIT `host.ledger-result`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LedgerResult {
    /// The reservation was made.
    pub allowed: bool,
    /// The balance after the call.
    pub balance: LedgerBalance,
}

/// What the upstream layer measured for a target (WIT `host.target-stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetStatsView {
    /// EWMA of the time to first byte of successful attempts, ms.
    pub latency_ewma_ms: f64,
    /// EWMA of the failure rate, 0..1.
    pub error_rate: f64,
    /// Attempts in flight now.
    pub in_flight: u32,
    /// Attempts since start.
    pub attempts: u64,
}

/// A model's price, USD per 1M tokens (WIT `host.price`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Price {
    /// Prompt tokens.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Cached prompt tokens.
    pub cached_input: f64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write: f64,
}

impl Price {
    /// The cost of `usage` in USD. Cached and cache-write tokens are part of the prompt
    /// tokens and priced at their own rates.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let written = usage.cache_write_tokens.min(usage.prompt_tokens - cached);
        let plain = usage.prompt_tokens - cached - written;
        #[allow(clippy::cast_precision_loss)]
        let tokens = |n: u64| n as f64 / 1_000_000.0;
        tokens(plain) * self.input
            + tokens(cached) * self.cached_input
            + tokens(written) * self.cache_write
            + tokens(usage.completion_tokens) * self.output
    }
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
    /// Up to `limit` live keys starting with `prefix`, in key order.
    fn kv_scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, String>;
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
    /// Limiter: admits and reserves `amount` of `limit` per `window_ms`, or refuses.
    fn limit_reserve(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String>;
    /// Limiter: `reserved` units of an admitted reservation become `used`.
    fn limit_settle(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String>;
    /// Ledger: reserves `amount` USD within `limit` on `account`.
    fn ledger_reserve(
        &self,
        account: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String>;
    /// Ledger: releases `reserved` and spends `cost`.
    fn ledger_settle(
        &self,
        account: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String>;
    /// Ledger: releases `reserved`.
    fn ledger_release(&self, account: &str, reserved: f64) -> Result<LedgerBalance, String>;
    /// Ledger: the balance of `account`.
    fn ledger_balance(&self, account: &str) -> Result<LedgerBalance, String>;
    /// What the upstream layer measured for a target (default: nothing).
    fn target_stats(&self, provider: &str, model: &str) -> Option<TargetStatsView> {
        let _ = (provider, model);
        None
    }
    /// A model's price from `[prices]` (default: none).
    fn price(&self, model: &str) -> Option<Price> {
        let _ = model;
        None
    }
    /// `len` (at most [`MAX_RANDOM_BYTES`]) bytes from the OS's secure random source.
    fn random_bytes(&self, len: usize) -> Result<Vec<u8>, String> {
        secure_random(len)
    }
}

/// Most bytes one `random-bytes` call returns.
pub const MAX_RANDOM_BYTES: usize = 4096;

/// `len` bytes from the operating system's secure random source (at most
/// [`MAX_RANDOM_BYTES`]).
pub fn secure_random(len: usize) -> Result<Vec<u8>, String> {
    if len > MAX_RANDOM_BYTES {
        return Err(format!("at most {MAX_RANDOM_BYTES} random bytes per call"));
    }
    let mut out = vec![0u8; len];
    getrandom::fill(&mut out).map_err(|e| format!("random source: {e}"))?;
    Ok(out)
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
///
/// Limiter and ledger calls go to an in-memory [`StateStore`](crate::state::StateStore)
/// with the same semantics as the gateway's; the clock can be fixed
/// ([`MemoryHost::set_now`]) so fixtures are repeatable.
#[derive(Debug, Default)]
pub struct MemoryHost {
    inner: Mutex<MemoryHostState>,
    store: crate::state::MemoryStore,
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
    /// A fixed clock (ms since the epoch), when set.
    pub now: Option<u64>,
    /// Target statistics to answer `target-stats` with, by (provider, model).
    pub targets: BTreeMap<(String, String), TargetStatsView>,
    /// Prices to answer `price` with.
    pub prices: BTreeMap<String, Price>,
}

impl MemoryHost {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fixes the clock at `ms` (or lets it run again with `None`).
    pub fn set_now(&self, ms: Option<u64>) {
        self.lock().now = ms;
    }

    /// Sets the statistics `target-stats` answers for (provider, model).
    pub fn set_target_stats(&self, provider: &str, model: &str, stats: TargetStatsView) {
        self.lock()
            .targets
            .insert((provider.to_owned(), model.to_owned()), stats);
    }

    /// The limiter and ledger over this host's store, on its clock.
    fn primitives(&self) -> super::host::Primitives<'_> {
        super::host::Primitives {
            store: &self.store,
            ns: "host",
            now_ms: self.now_ms(),
        }
    }

    /// Sets the price `price` answers for a model.
    pub fn set_price(&self, model: &str, price: Price) {
        self.lock().prices.insert(model.to_owned(), price);
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

    fn kv_scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, String> {
        let state = self.lock();
        let now = now_ms();
        let mut out: Vec<(String, Vec<u8>)> = state
            .kv
            .iter()
            .filter(|(k, (_, exp))| k.starts_with(prefix) && exp.is_none_or(|e| e > now))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        out.sort();
        out.truncate(limit);
        Ok(out)
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

    fn now_ms(&self) -> u64 {
        self.lock().now.unwrap_or_else(now_ms)
    }

    fn limit_reserve(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String> {
        self.primitives()
            .limit_reserve(key, limit, window_ms, amount)
    }

    fn limit_settle(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        self.primitives()
            .limit_settle(key, limit, window_ms, reserved, used)
    }

    fn ledger_reserve(
        &self,
        account: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String> {
        self.primitives()
            .ledger_reserve(account, limit, amount, ttl_ms)
    }

    fn ledger_settle(
        &self,
        account: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String> {
        self.primitives()
            .ledger_settle(account, reserved, cost, ttl_ms)
    }

    fn ledger_release(&self, account: &str, reserved: f64) -> Result<LedgerBalance, String> {
        self.primitives().ledger_release(account, reserved)
    }

    fn ledger_balance(&self, account: &str) -> Result<LedgerBalance, String> {
        self.primitives().ledger_balance(account)
    }

    fn target_stats(&self, provider: &str, model: &str) -> Option<TargetStatsView> {
        self.lock()
            .targets
            .get(&(provider.to_owned(), model.to_owned()))
            .copied()
    }

    fn price(&self, model: &str) -> Option<Price> {
        self.lock().prices.get(model).copied()
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
