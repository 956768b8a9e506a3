//! The plugin chain: what the pipeline calls.
//!
//! [`Plugins::load`] builds every instance configured in `weir.toml` (global `[[plugins]]`
//! first, then each model's `[[models.plugins]]`), and [`Plugins::chain`] hands out the
//! ordered [`Chain`] of a model. A chain runs one hook over its instances and turns their
//! answers into what the pipeline needs:
//!
//! - [`Chain::on_request`], in configured order: each plugin may continue with mutations
//!   (applied to the [`RequestCtx`] before the next plugin runs) or reply, which ends the
//!   chain with [`Flow::Reply`].
//! - [`Chain::on_response`] and [`Chain::chunk_filter`], in reverse order (the plugin
//!   closest to the provider sees the response first, like nested middleware).
//! - [`Chain::on_log`], in configured order, after the response was sent; the pipeline
//!   runs it on a blocking thread.
//!
//! Failures: a hook that errors, traps, times out or runs out of memory, and a call refused
//! by the plugin's open circuit breaker, count in `weir_plugin_failures_total{plugin,kind}`
//! and then follow the instance's policy: `closed` returns a [`PluginFailure`] (the pipeline
//! answers 503 naming the plugin), `open` skips the plugin. Instances in `shadow` mode never
//! change or fail a request.
//!
//! Response headers: plugins set them (`set_response_headers` on request, `set_headers` on
//! response); the chain stores them in `RequestCtx::metadata` under
//! [`RESPONSE_HEADER_PREFIX`] and the pipeline reads them with [`response_headers`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::PluginError;
use super::breaker::{Admission, Breaker, BreakerConfig};
use super::config::{Mode, PluginInstanceConfig};
use super::contract::{
    ChoiceView, ChunkAction, Decision, Dialect as ViewDialect, Endpoint, Finish, HookCtx,
    HookError, LogEntry, MessageView, Mutations, PluginRuntime, Reply, RequestView,
    ResponseDecision, ResponseMutations, ResponseView, StreamEvent, TextDelta, ToolCallDelta,
    ToolCallView, Usage,
};
use super::host::{GatewayHost, PluginMetrics};
use super::lua::LuaPlugin;
use super::manifest::{FailurePolicy, HeaderSelection, Manifest, PluginKind, validate_name};
use super::wasm::{WasmEngine, WasmLimits, WasmPlugin};
use crate::api::openai::{
    ChatChunk, ChatRequest, ChatResponse, ChunkChoice, Delta, EmbeddingsRequest, FunctionCallDelta,
    MessageContent, PromptTokensDetails,
};
use crate::config::Config;
use crate::pipeline::ctx::{Body, Dialect, RequestCtx, TargetOverride};
use crate::state::StateStore;

/// Metadata keys under this prefix are response headers set by plugins.
pub const RESPONSE_HEADER_PREFIX: &str = "weir.response-header.";

/// The response headers plugins set for this request, from the metadata bag.
pub fn response_headers(
    metadata: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&str, &str)> + '_ {
    metadata
        .range(RESPONSE_HEADER_PREFIX.to_owned()..)
        .take_while(|(k, _)| k.starts_with(RESPONSE_HEADER_PREFIX))
        .map(|(k, v)| (&k[RESPONSE_HEADER_PREFIX.len()..], v.as_str()))
}

/// What the pipeline does after a hook phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on (the request or response may have been changed in place).
    Continue,
    /// Answer the client with this reply now; the provider (or the rest of the chain) is
    /// skipped. `body` is sent as is (plugins usually send JSON).
    Reply(Reply),
}

/// A plugin with `failure = "closed"` failed: the pipeline answers 503 naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin '{plugin}' failed ({kind})")]
pub struct PluginFailure {
    /// Instance name.
    pub plugin: String,
    /// The `kind` label: `trap`, `timeout`, `oom`, `error`, `unavailable`, `circuit_open`.
    pub kind: &'static str,
}

/// Why a stream must end early: a plugin aborted it (budget exhausted, policy violation) or a
/// fail-closed chunk hook failed. The pipeline ends the stream with an error event carrying
/// `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream stopped by plugin '{plugin}': {message}")]
pub struct StreamStop {
    /// Instance name.
    pub plugin: String,
    /// Message for the client's error event.
    pub message: String,
}

/// One loaded plugin instance.
pub struct Instance {
    name: String,
    kind: PluginKind,
    manifest: Arc<Manifest>,
    runtime: Arc<dyn PluginRuntime>,
    failure: FailurePolicy,
    mode: Mode,
    breaker: Breaker,
    metrics: PluginMetrics,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("failure", &self.failure)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Loads the instance described by `cfg`; `base` is the config file's folder and `key`
    /// its position in the config (`plugins[0]`), for error messages.
    pub fn load(
        base: &Path,
        cfg: &PluginInstanceConfig,
        key: &str,
        state: Arc<dyn StateStore>,
        metrics: &PluginMetrics,
    ) -> Result<Arc<Instance>, PluginError> {
        let manifest = Manifest::load(&base.join(&cfg.path))?;
        let name = cfg.name.clone().unwrap_or_else(|| manifest.name.clone());
        validate_name(&name).map_err(|reason| PluginError::Config {
            key: format!("{key}.name"),
            reason,
        })?;
        let config = cfg
            .config
            .clone()
            .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new()));
        manifest
            .check_config(&config)
            .map_err(|(path, reason)| PluginError::Config {
                key: format!("{key}.{path}"),
                reason,
            })?;
        let host = Arc::new(GatewayHost::new(
            &name,
            state,
            manifest.capabilities.clone(),
            metrics.clone(),
        ));
        let runtime = load_runtime(&manifest, &name, config, host)?;
        Ok(Arc::new(Instance::new(
            name,
            Arc::new(manifest),
            runtime,
            cfg,
            metrics.clone(),
        )))
    }

    /// An instance around an already loaded runtime (tests, the harness).
    pub fn new(
        name: String,
        manifest: Arc<Manifest>,
        runtime: Arc<dyn PluginRuntime>,
        cfg: &PluginInstanceConfig,
        metrics: PluginMetrics,
    ) -> Instance {
        Instance {
            kind: manifest.kind,
            failure: cfg.failure.unwrap_or(manifest.failure),
            mode: cfg.mode,
            breaker: Breaker::new(BreakerConfig::from(&cfg.breaker)),
            name,
            manifest,
            runtime,
            metrics,
        }
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admission by the breaker; a refusal is counted as a failure.
    fn admit(&self) -> Option<Admission> {
        match self.breaker.admit() {
            Admission::Reject => {
                self.count_failure("circuit_open");
                None
            }
            a => Some(a),
        }
    }

    /// Records a call's outcome in the breaker (and metrics and logs on failure).
    fn record(&self, admission: Admission, result: Result<(), &HookError>) {
        if let Err(e) = result {
            self.count_failure(e.kind());
            tracing::warn!(plugin = %self.name, kind = e.kind(), error = %e, "Plugin hook failed.");
        }
        if self.breaker.record(admission, result.is_ok()) {
            if self.breaker.is_open() {
                tracing::warn!(plugin = %self.name, "Plugin circuit breaker opened.");
            } else {
                tracing::info!(plugin = %self.name, "Plugin circuit breaker closed.");
            }
        }
    }

    fn count_failure(&self, kind: &str) {
        self.metrics
            .failures
            .with_label_values(&[self.name.as_str(), kind])
            .inc();
    }

    /// The policy for a failure of `kind`: `Err` stops the request.
    /// Counts a shadow-mode decision (never enforced).
    fn shadow(&self, decision: &str) {
        self.metrics
            .shadow
            .with_label_values(&[self.name.as_str(), decision])
            .inc();
    }

    fn on_failure(&self, kind: &'static str) -> Result<(), PluginFailure> {
        if self.mode == Mode::Shadow {
            self.shadow("failure");
        }
        match (self.mode, self.failure) {
            (Mode::Enforce, FailurePolicy::Closed) => Err(PluginFailure {
                plugin: self.name.clone(),
                kind,
            }),
            _ => Ok(()),
        }
    }
}

fn load_runtime(
    manifest: &Manifest,
    name: &str,
    config: serde_json::Value,
    host: Arc<GatewayHost>,
) -> Result<Arc<dyn PluginRuntime>, PluginError> {
    match manifest.kind {
        PluginKind::Lua => Ok(Arc::new(LuaPlugin::load(manifest, name, config, host)?)),
        PluginKind::Wasm => {
            let load_err = |reason: String| PluginError::Load {
                plugin: name.to_owned(),
                reason,
            };
            let engine = WasmEngine::global().map_err(|e| load_err(e.to_string()))?;
            let limits = WasmLimits {
                memory_bytes: manifest.limits.memory_bytes,
                request_deadline: manifest.limits.deadline,
                chunk_deadline: manifest.limits.chunk_deadline,
                log_deadline: manifest.limits.log_deadline,
                init_deadline: manifest.limits.init_deadline,
                ..WasmLimits::default()
            };
            let plugin = WasmPlugin::load_file(
                &engine,
                name,
                &manifest.entry,
                &config.to_string(),
                limits,
                host,
            )
            .map_err(|e| load_err(e.to_string()))?;
            Ok(Arc::new(plugin))
        }
    }
}

/// Every configured plugin instance, and the chain of each model.
#[derive(Debug, Default)]
pub struct Plugins {
    global: Chain,
    models: HashMap<String, Chain>,
}

impl Plugins {
    /// No plugins at all.
    pub fn empty() -> Plugins {
        Plugins::default()
    }

    /// Loads every instance in `cfg` (global `[[plugins]]`, then each model's), checking
    /// manifests, configs against their schemas, and running each plugin's `init`. Any error
    /// fails the whole load, so a config that loads serves.
    pub fn load(
        cfg: &Config,
        state: Arc<dyn StateStore>,
        metrics: &PluginMetrics,
    ) -> Result<Plugins, PluginError> {
        let base = cfg.path.parent().unwrap_or_else(|| Path::new("."));
        let mut global = Vec::new();
        for (i, p) in cfg.file.plugins.iter().enumerate() {
            global.push(Instance::load(
                base,
                p,
                &format!("plugins[{i}]"),
                state.clone(),
                metrics,
            )?);
        }
        let global_chain = Chain::new(global.clone()).map_err(|reason| PluginError::Config {
            key: "plugins".into(),
            reason,
        })?;
        let mut models = HashMap::new();
        for (i, m) in cfg.file.models.iter().enumerate() {
            if m.plugins.is_empty() {
                continue;
            }
            let mut instances = global.clone();
            for (j, p) in m.plugins.iter().enumerate() {
                instances.push(Instance::load(
                    base,
                    p,
                    &format!("models[{i}].plugins[{j}]"),
                    state.clone(),
                    metrics,
                )?);
            }
            let chain = Chain::new(instances).map_err(|reason| PluginError::Config {
                key: format!("models[{i}].plugins"),
                reason,
            })?;
            models.insert(m.name.clone(), chain);
        }
        Ok(Plugins {
            global: global_chain,
            models,
        })
    }

    /// A single chain used for every model (tests, the harness).
    pub fn from_chain(chain: Chain) -> Plugins {
        Plugins {
            global: chain,
            models: HashMap::new(),
        }
    }

    /// The chain of `model`: the global instances, then the model's own, in config order.
    pub fn chain(&self, model: &str) -> &Chain {
        self.models.get(model).unwrap_or(&self.global)
    }
}

/// An ordered list of plugin instances. Cheap to clone (one reference count), so the
/// pipeline can move it into the task that runs `on_log`.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    instances: Arc<[Arc<Instance>]>,
    any_request: bool,
    any_response: bool,
    any_chunk: bool,
    any_log: bool,
}

impl Chain {
    /// A chain of `instances` in this order; instance names must be unique.
    pub fn new(instances: Vec<Arc<Instance>>) -> Result<Chain, String> {
        for (i, a) in instances.iter().enumerate() {
            if instances[..i].iter().any(|b| b.name == a.name) {
                return Err(format!(
                    "two instances are named '{}'; give one a different `name`",
                    a.name
                ));
            }
        }
        let any = |f: fn(&Manifest) -> bool| instances.iter().any(|i| f(&i.manifest));
        Ok(Chain {
            any_request: any(|m| m.hooks.on_request),
            any_response: any(|m| m.hooks.on_response),
            any_chunk: any(|m| m.hooks.on_response_chunk),
            any_log: any(|m| m.hooks.on_log),
            instances: instances.into(),
        })
    }

    /// Whether the chain has no instances at all.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Whether any instance has a chunk hook (otherwise streams need no filtering).
    pub fn wants_chunks(&self) -> bool {
        self.any_chunk
    }

    /// Whether any instance has a response hook.
    pub fn wants_response(&self) -> bool {
        self.any_response
    }

    /// Whether any instance has a log hook.
    pub fn wants_log(&self) -> bool {
        self.any_log
    }

    /// Runs `on_request` in configured order, applying each plugin's mutations to `ctx`
    /// before the next runs. Stops at the first reply.
    pub fn on_request(&self, ctx: &mut RequestCtx) -> Result<Flow, PluginFailure> {
        if !self.any_request {
            return Ok(Flow::Continue);
        }
        // Messages are flattened once and rebuilt only when a plugin changes the body; the
        // body JSON (capability `body`) is serialized once and again only after a change.
        let mut view: Option<RequestView> = None;
        let mut body: Option<Option<String>> = None;
        for inst in self.instances.iter() {
            if !inst.manifest.hooks.on_request {
                continue;
            }
            let Some(admission) = inst.admit() else {
                inst.on_failure("circuit_open")?;
                continue;
            };
            let v = view.get_or_insert_with(|| request_view(ctx));
            v.model.clear();
            v.model.push_str(ctx.body.model());
            v.headers = select_headers(&ctx.headers, &inst.manifest.headers);
            v.body = if inst.manifest.capabilities.body {
                body.get_or_insert_with(|| body_json(&ctx.body)).clone()
            } else {
                None
            };
            let mut hctx = HookCtx {
                request_id: &ctx.request_id,
                metadata: &mut ctx.metadata,
            };
            let result = inst.runtime.on_request(&mut hctx, v);
            let outcome = match result {
                Ok(decision) if inst.mode == Mode::Shadow => {
                    match &decision {
                        Decision::Continue(_) => inst.shadow("continue"),
                        Decision::Reply(r) => inst.shadow(&format!("reply_{}", r.status)),
                    }
                    tracing::info!(plugin = %inst.name, decision = ?decision_label(&decision), "Shadow plugin decision (not applied).");
                    Ok(None)
                }
                Ok(Decision::Reply(reply)) => Ok(Some(reply)),
                Ok(Decision::Continue(m)) => {
                    let body_changed =
                        m.set_body.is_some() || m.set_model.is_some() || m.set_messages.is_some();
                    match apply_request(ctx, m) {
                        Ok(stale) => {
                            if stale {
                                view = None;
                            }
                            if body_changed {
                                body = None;
                            }
                            Ok(None)
                        }
                        Err(reason) => Err(HookError::Plugin(reason)),
                    }
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(reply) => {
                    inst.record(admission, Ok(()));
                    if let Some(reply) = reply {
                        return Ok(Flow::Reply(reply));
                    }
                }
                Err(e) => {
                    inst.record(admission, Err(&e));
                    inst.on_failure(e.kind())?;
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Runs `on_response` on a complete (non-streaming) response, in reverse order.
    pub fn on_response(
        &self,
        ctx: &mut RequestCtx,
        resp: &mut ChatResponse,
    ) -> Result<Flow, PluginFailure> {
        if !self.any_response {
            return Ok(Flow::Continue);
        }
        let mut view = response_view(&ctx.request_id, resp);
        for inst in self.instances.iter().rev() {
            if !inst.manifest.hooks.on_response {
                continue;
            }
            let Some(admission) = inst.admit() else {
                inst.on_failure("circuit_open")?;
                continue;
            };
            let mut hctx = HookCtx {
                request_id: &ctx.request_id,
                metadata: &mut ctx.metadata,
            };
            let result = inst.runtime.on_response(&mut hctx, &view);
            let outcome = match result {
                Ok(decision) if inst.mode == Mode::Shadow => {
                    match &decision {
                        ResponseDecision::Continue(_) => inst.shadow("continue"),
                        ResponseDecision::Reply(r) => inst.shadow(&format!("reply_{}", r.status)),
                    }
                    tracing::debug!(plugin = %inst.name, "Shadow plugin response decision (not applied).");
                    Ok(None)
                }
                Ok(ResponseDecision::Reply(reply)) => Ok(Some(reply)),
                Ok(ResponseDecision::Continue(m)) => {
                    apply_response(ctx, resp, &mut view, m).map(|()| None)
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(reply) => {
                    inst.record(admission, Ok(()));
                    if let Some(reply) = reply {
                        return Ok(Flow::Reply(reply));
                    }
                }
                Err(e) => {
                    inst.record(admission, Err(&e));
                    inst.on_failure(e.kind())?;
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// A filter for one stream's chunks, running the chunk hooks in reverse order. It keeps
    /// a copy of the request's metadata; read it back with [`ChunkFilter::metadata`].
    pub fn chunk_filter(&self, ctx: &RequestCtx) -> ChunkFilter {
        let stages = self
            .instances
            .iter()
            .rev()
            .filter(|i| i.manifest.hooks.on_response_chunk)
            .map(|i| Stage {
                inst: i.clone(),
                held: BTreeMap::new(),
                skipped: false,
            })
            .collect();
        ChunkFilter {
            stages,
            request_id: ctx.request_id.clone(),
            metadata: ctx.metadata.clone(),
            template: None,
        }
    }

    /// Runs `on_log` in configured order. Failures are counted and logged; they cannot
    /// change a response that was already sent. Meant for a blocking thread.
    pub fn on_log(&self, entry: &LogEntry) {
        if !self.any_log {
            return;
        }
        let mut metadata: BTreeMap<String, String> = entry.metadata.iter().cloned().collect();
        for inst in self.instances.iter() {
            if !inst.manifest.hooks.on_log {
                continue;
            }
            let Some(admission) = inst.admit() else {
                continue;
            };
            let mut hctx = HookCtx {
                request_id: &entry.request_id,
                metadata: &mut metadata,
            };
            let result = inst.runtime.on_log(&mut hctx, entry);
            inst.record(admission, result.as_ref().map(|_| ()));
        }
    }
}

/// A short label for a request decision, for logs (never the reply body: it may echo input).
fn decision_label(d: &Decision) -> String {
    match d {
        Decision::Continue(_) => "continue".to_owned(),
        Decision::Reply(r) => format!("reply {}", r.status),
    }
}

/// The view of the request shared by all plugins of a chain call, without the
/// per-plugin parts (headers, body).
fn request_view(ctx: &RequestCtx) -> RequestView {
    let (endpoint, messages) = match &ctx.body {
        Body::Chat(c) => (
            Endpoint::Chat,
            c.messages
                .iter()
                .map(|m| MessageView {
                    role: m.role.clone(),
                    content: m.text(),
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
                })
                .collect(),
        ),
        Body::Embeddings(e) => (
            Endpoint::Embeddings,
            e.input_texts()
                .into_iter()
                .map(|content| MessageView {
                    role: "user".into(),
                    content,
                    tool_calls: Vec::new(),
                })
                .collect(),
        ),
    };
    RequestView {
        request_id: ctx.request_id.clone(),
        dialect: match ctx.dialect {
            Dialect::OpenAi => ViewDialect::OpenAi,
            Dialect::Anthropic => ViewDialect::Anthropic,
        },
        endpoint,
        model: ctx.body.model().to_owned(),
        stream: ctx.body.stream(),
        headers: Vec::new(),
        messages,
        body: None,
    }
}

fn select_headers(headers: &http::HeaderMap, selection: &HeaderSelection) -> Vec<(String, String)> {
    let pair = |k: &HeaderName, v: &HeaderValue| {
        v.to_str()
            .ok()
            .map(|v| (k.as_str().to_owned(), v.to_owned()))
    };
    match selection {
        HeaderSelection::All => headers.iter().filter_map(|(k, v)| pair(k, v)).collect(),
        HeaderSelection::Only(names) => names
            .iter()
            .flat_map(|n| headers.get_all(n.as_str()).iter().map(move |v| (n, v)))
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.clone(), v.to_owned())))
            .collect(),
    }
}

fn body_json(body: &Body) -> Option<String> {
    match body {
        Body::Chat(c) => serde_json::to_string(c).ok(),
        Body::Embeddings(e) => serde_json::to_string(e).ok(),
    }
}

fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("'{name}' is not a valid header name"))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header '{name}' is not valid"))?;
    Ok((n, v))
}

fn set_response_header(
    metadata: &mut BTreeMap<String, String>,
    name: &str,
    value: &str,
) -> Result<(), String> {
    let (n, _) = header_pair(name, value)?;
    metadata.insert(
        format!("{RESPONSE_HEADER_PREFIX}{}", n.as_str()),
        value.to_owned(),
    );
    Ok(())
}

/// Applies a plugin's request mutations. Returns whether the flattened messages changed
/// (the shared view must be rebuilt). A malformed mutation changes nothing and is an error.
fn apply_request(ctx: &mut RequestCtx, m: Mutations) -> Result<bool, String> {
    if m.is_empty() {
        return Ok(false);
    }
    // Validate everything first, so a bad mutation leaves the request untouched.
    let set_headers = m
        .set_headers
        .iter()
        .map(|(k, v)| header_pair(k, v))
        .collect::<Result<Vec<_>, _>>()?;
    let remove_headers = m
        .remove_headers
        .iter()
        .map(|k| {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("'{k}' is not a valid header name"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (k, v) in &m.set_response_headers {
        header_pair(k, v)?;
    }
    let new_body = match &m.set_body {
        None => None,
        Some(json) => Some(match &ctx.body {
            Body::Chat(_) => Body::Chat(
                serde_json::from_str::<ChatRequest>(json)
                    .map_err(|e| format!("set_body is not a chat request: {e}"))?,
            ),
            Body::Embeddings(_) => Body::Embeddings(
                serde_json::from_str::<EmbeddingsRequest>(json)
                    .map_err(|e| format!("set_body is not an embeddings request: {e}"))?,
            ),
        }),
    };

    if new_body.is_some() || m.set_model.is_some() || m.set_messages.is_some() {
        // The client's bytes no longer say what the request says.
        ctx.client_body = None;
    }
    let mut stale = false;
    if let Some(body) = new_body {
        ctx.body = body;
        stale = true;
    }
    if let Some(model) = m.set_model {
        match &mut ctx.body {
            Body::Chat(c) => c.model = model,
            Body::Embeddings(e) => e.model = model,
        }
    }
    if let Some(messages) = m.set_messages {
        replace_messages(&mut ctx.body, messages);
        stale = true;
    }
    for name in remove_headers {
        ctx.headers.remove(name);
    }
    for (k, v) in set_headers {
        ctx.headers.insert(k, v);
    }
    if let Some(targets) = m.set_targets {
        ctx.targets = Some(
            targets
                .into_iter()
                .map(|t| TargetOverride {
                    provider: t.provider,
                    model: t.model,
                })
                .collect(),
        );
    }
    for (k, v) in m.set_metadata {
        ctx.metadata.insert(k, v);
    }
    for (k, v) in &m.set_response_headers {
        set_response_header(&mut ctx.metadata, k, v)?;
    }
    Ok(stale)
}

/// Replaces the messages: role and text from the plugin; everything else (tool calls,
/// images of an unchanged message, names) kept from the original at the same index.
fn replace_messages(body: &mut Body, messages: Vec<MessageView>) {
    match body {
        Body::Chat(c) => {
            let old = std::mem::take(&mut c.messages);
            c.messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, mv)| {
                    let mut msg = old.get(i).cloned().unwrap_or_default();
                    if msg.text() != mv.content {
                        msg.content = Some(MessageContent::Text(mv.content));
                    }
                    msg.role = mv.role;
                    msg
                })
                .collect();
        }
        Body::Embeddings(e) => {
            let texts: Vec<serde_json::Value> = messages
                .into_iter()
                .map(|m| serde_json::Value::String(m.content))
                .collect();
            e.input = match <[serde_json::Value; 1]>::try_from(texts) {
                Ok([one]) if e.input.is_string() => one,
                Ok([one]) => serde_json::Value::Array(vec![one]),
                Err(many) => serde_json::Value::Array(many),
            };
        }
    }
}

fn response_view(request_id: &str, resp: &ChatResponse) -> ResponseView {
    ResponseView {
        request_id: request_id.to_owned(),
        model: resp.model.clone(),
        status: 200,
        choices: resp
            .choices
            .iter()
            .map(|c| ChoiceView {
                index: c.index,
                text: c.message.text(),
                tool_calls: c
                    .message
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|t| ToolCallView {
                        id: t.id.clone(),
                        name: t.function.name.clone(),
                        arguments: t.function.arguments.clone(),
                    })
                    .collect(),
                finish_reason: c.finish_reason.clone(),
            })
            .collect(),
        usage: resp.usage.map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
        }),
    }
}

fn apply_response(
    ctx: &mut RequestCtx,
    resp: &mut ChatResponse,
    view: &mut ResponseView,
    m: ResponseMutations,
) -> Result<(), HookError> {
    for (k, v) in &m.set_headers {
        header_pair(k, v).map_err(HookError::Plugin)?;
    }
    for (index, text) in m.set_choice_text {
        let choice = resp
            .choices
            .iter_mut()
            .find(|c| c.index == index)
            .ok_or_else(|| HookError::Plugin(format!("set_choice_text: no choice {index}")))?;
        choice.message.content = Some(MessageContent::Text(text.clone()));
        if let Some(v) = view.choices.iter_mut().find(|c| c.index == index) {
            v.text = text;
        }
    }
    for (k, v) in &m.set_headers {
        set_response_header(&mut ctx.metadata, k, v).map_err(HookError::Plugin)?;
    }
    for (k, v) in m.set_metadata {
        ctx.metadata.insert(k, v);
    }
    Ok(())
}

/// One plugin's place in a stream: its hold buffers (per choice) and whether a fail-open
/// failure took it out of this stream.
struct Stage {
    inst: Arc<Instance>,
    held: BTreeMap<u32, String>,
    skipped: bool,
}

/// Runs a stream's chunks through the chain's chunk hooks.
///
/// Each chunk is split into normalized events (text delta, tool-call delta, usage, finish),
/// each event goes through the plugins (reverse order), and the surviving events are put
/// back into chunks. When every plugin passes, the original chunk is forwarded untouched.
///
/// Hold: a plugin that answers `hold` to a text delta gets that text back, with the next
/// delta of the same choice appended, on its next call, so a pattern split across chunks
/// can be caught. At most `limits.hold_bytes` are held; beyond that, or at the choice's
/// finish, or at the end of the stream, the held text is released downstream.
pub struct ChunkFilter {
    stages: Vec<Stage>,
    request_id: String,
    metadata: BTreeMap<String, String>,
    /// The first chunk, emptied: id, model and pass-through fields for rebuilt chunks.
    template: Option<ChatChunk>,
}

impl std::fmt::Debug for ChunkFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFilter")
            .field("stages", &self.stages.len())
            .finish_non_exhaustive()
    }
}

/// What one stage did to one event.
enum Step {
    /// Forwarded unchanged.
    Same,
    /// Changed, dropped, held or released held text.
    Changed,
}

impl ChunkFilter {
    /// Whether the filter has no plugin (every chunk passes untouched).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The request metadata, including changes made by chunk hooks (for `on_log`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Filters one chunk; pushes the chunks to send (none while text is held) onto `out`.
    pub fn on_chunk(
        &mut self,
        chunk: ChatChunk,
        out: &mut Vec<ChatChunk>,
    ) -> Result<(), StreamStop> {
        if self.stages.is_empty() {
            out.push(chunk);
            return Ok(());
        }
        if self.template.is_none() {
            let mut t = chunk.clone();
            t.choices.clear();
            t.usage = None;
            self.template = Some(t);
        }
        let events = events_of(&chunk);
        let held_before = self.stages.iter().any(|s| !s.held.is_empty());
        if events.is_empty() {
            out.push(chunk);
            return Ok(());
        }
        let (events, changed) = self.run(0, events)?;
        if !changed && !held_before {
            out.push(chunk);
            return Ok(());
        }
        // Keep the role of a first delta, which events do not carry.
        for c in &chunk.choices {
            if let Some(role) = &c.delta.role {
                out.push(self.chunk_with(ChunkChoice {
                    index: c.index,
                    delta: Delta {
                        role: Some(role.clone()),
                        ..Delta::default()
                    },
                    finish_reason: None,
                    rest: Default::default(),
                }));
            }
        }
        for e in events {
            out.push(self.chunk_of(e));
        }
        Ok(())
    }

    /// The stream ended: releases held text.
    ///
    /// The holder sees its held text once more (it may still replace it; another `hold` is
    /// not possible and releases the text as is), then the plugins after it do.
    pub fn finish(&mut self, out: &mut Vec<ChatChunk>) -> Result<(), StreamStop> {
        for i in 0..self.stages.len() {
            let held = std::mem::take(&mut self.stages[i].held);
            if held.is_empty() {
                continue;
            }
            let mut events = Vec::new();
            for (choice, text) in held {
                let ev = StreamEvent::TextDelta(TextDelta { choice, text });
                self.call(i, ev, &mut events, true)?;
            }
            let (events, _) = self.run(i + 1, events)?;
            for e in events {
                out.push(self.chunk_of(e));
            }
        }
        Ok(())
    }

    /// Runs `events` through the stages from `first` on.
    fn run(
        &mut self,
        first: usize,
        mut events: Vec<StreamEvent>,
    ) -> Result<(Vec<StreamEvent>, bool), StreamStop> {
        let mut changed = false;
        for i in first..self.stages.len() {
            let mut next = Vec::with_capacity(events.len());
            for e in events {
                if let Step::Changed = self.step(i, e, &mut next)? {
                    changed = true;
                }
            }
            events = next;
        }
        Ok((events, changed))
    }

    /// One event through stage `i`.
    fn step(
        &mut self,
        i: usize,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
    ) -> Result<Step, StreamStop> {
        // At a choice's finish, its held text goes first (the plugin sees it once more).
        let mut released = false;
        if let StreamEvent::Finish(Finish { choice, .. }) = &event
            && let Some(text) = self.stages[i].held.remove(choice)
        {
            let ev = StreamEvent::TextDelta(TextDelta {
                choice: *choice,
                text,
            });
            self.call(i, ev, out, true)?;
            released = true;
        }
        let step = self.call(i, event, out, false)?;
        Ok(if released { Step::Changed } else { step })
    }

    /// Calls stage `i`'s hook on `event` (text merged with what it held) and acts on the
    /// answer. `final_text`: the text cannot be held again (finish).
    fn call(
        &mut self,
        i: usize,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
        final_text: bool,
    ) -> Result<Step, StreamStop> {
        let stage = &mut self.stages[i];
        let (event, merged) = match event {
            StreamEvent::TextDelta(mut d) => match stage.held.remove(&d.choice) {
                Some(mut held) => {
                    held.push_str(&d.text);
                    d.text = held;
                    (StreamEvent::TextDelta(d), true)
                }
                None => (StreamEvent::TextDelta(d), false),
            },
            other => (other, false),
        };
        if stage.skipped {
            out.push(event);
            return Ok(if merged { Step::Changed } else { Step::Same });
        }
        let inst = stage.inst.clone();
        let Some(admission) = inst.admit() else {
            return self.failed(i, &inst, "circuit_open", event, out, merged);
        };
        let mut hctx = HookCtx {
            request_id: &self.request_id,
            metadata: &mut self.metadata,
        };
        let result = inst.runtime.on_chunk(&mut hctx, &event);
        inst.record(admission, result.as_ref().map(|_| ()));
        let action = match result {
            Ok(a) => a,
            Err(e) => return self.failed(i, &inst, e.kind(), event, out, merged),
        };
        if inst.mode == Mode::Shadow {
            inst.shadow(match &action {
                ChunkAction::Pass => "pass",
                ChunkAction::Replace(_) => "replace",
                ChunkAction::Hold => "hold",
                ChunkAction::Abort(_) => "abort",
            });
            tracing::debug!(plugin = %inst.name, ?action, "Shadow plugin chunk action (not applied).");
            out.push(event);
            return Ok(if merged { Step::Changed } else { Step::Same });
        }
        match action {
            ChunkAction::Pass => {
                out.push(event);
                Ok(if merged { Step::Changed } else { Step::Same })
            }
            ChunkAction::Replace(events) => {
                out.extend(events);
                Ok(Step::Changed)
            }
            ChunkAction::Abort(message) => Err(StreamStop {
                plugin: inst.name.clone(),
                message,
            }),
            ChunkAction::Hold => match event {
                StreamEvent::TextDelta(d)
                    if !final_text && d.text.len() <= inst.manifest.limits.hold_bytes =>
                {
                    self.stages[i].held.insert(d.choice, d.text);
                    Ok(Step::Changed)
                }
                StreamEvent::TextDelta(d) => {
                    if !final_text {
                        tracing::debug!(plugin = %inst.name, bytes = d.text.len(), "Hold buffer full; releasing held text.");
                    }
                    out.push(StreamEvent::TextDelta(d));
                    Ok(Step::Changed)
                }
                // Only text can be held; anything else passes.
                other => {
                    out.push(other);
                    Ok(if merged { Step::Changed } else { Step::Same })
                }
            },
        }
    }

    /// A stage failed on `event`: stop the stream (closed) or take the stage out of this
    /// stream and pass the event on (open).
    fn failed(
        &mut self,
        i: usize,
        inst: &Instance,
        kind: &'static str,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
        merged: bool,
    ) -> Result<Step, StreamStop> {
        if let Err(f) = inst.on_failure(kind) {
            return Err(StreamStop {
                plugin: f.plugin,
                message: format!("plugin '{}' failed ({kind})", inst.name),
            });
        }
        let stage = &mut self.stages[i];
        stage.skipped = true;
        out.push(event);
        let held = std::mem::take(&mut stage.held);
        for (choice, text) in held {
            out.push(StreamEvent::TextDelta(TextDelta { choice, text }));
        }
        Ok(if merged { Step::Changed } else { Step::Same })
    }

    fn chunk_with(&self, choice: ChunkChoice) -> ChatChunk {
        let mut c = self.template.clone().unwrap_or_else(empty_chunk);
        c.choices.push(choice);
        c
    }

    fn chunk_of(&self, event: StreamEvent) -> ChatChunk {
        let choice = |index: u32, delta: Delta, finish_reason: Option<String>| ChunkChoice {
            index,
            delta,
            finish_reason,
            rest: Default::default(),
        };
        match event {
            StreamEvent::TextDelta(d) => self.chunk_with(choice(
                d.choice,
                Delta {
                    content: Some(d.text),
                    ..Delta::default()
                },
                None,
            )),
            StreamEvent::ToolCallDelta(d) => self.chunk_with(choice(
                d.choice,
                Delta {
                    tool_calls: Some(vec![crate::api::openai::ToolCallDelta {
                        index: d.index,
                        kind: d.id.as_ref().map(|_| "function".to_owned()),
                        id: d.id,
                        function: Some(FunctionCallDelta {
                            name: d.name,
                            arguments: Some(d.arguments),
                        }),
                    }]),
                    ..Delta::default()
                },
                None,
            )),
            StreamEvent::Finish(f) => {
                self.chunk_with(choice(f.choice, Delta::default(), Some(f.reason)))
            }
            StreamEvent::Usage(u) => {
                let mut c = self.template.clone().unwrap_or_else(empty_chunk);
                let mut usage =
                    crate::api::openai::Usage::new(u.prompt_tokens, u.completion_tokens);
                if u.cached_tokens > 0 {
                    usage.prompt_tokens_details = Some(PromptTokensDetails {
                        cached_tokens: u.cached_tokens,
                    });
                }
                c.usage = Some(usage);
                c
            }
        }
    }
}

fn empty_chunk() -> ChatChunk {
    ChatChunk {
        id: String::new(),
        object: "chat.completion.chunk".into(),
        created: 0,
        model: String::new(),
        choices: Vec::new(),
        usage: None,
        rest: Default::default(),
    }
}

/// The normalized events of a chunk, in order: per choice text, tool calls, finish; then
/// usage. Empty text deltas (a role-only first chunk) carry no event.
fn events_of(chunk: &ChatChunk) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    for c in &chunk.choices {
        if let Some(text) = &c.delta.content
            && !text.is_empty()
        {
            events.push(StreamEvent::TextDelta(TextDelta {
                choice: c.index,
                text: text.clone(),
            }));
        }
        for t in c.delta.tool_calls.iter().flatten() {
            let f = t.function.as_ref();
            events.push(StreamEvent::ToolCallDelta(ToolCallDelta {
                choice: c.index,
                index: t.index,
                id: t.id.clone(),
                name: f.and_then(|f| f.name.clone()),
                arguments: f.and_then(|f| f.arguments.clone()).unwrap_or_default(),
            }));
        }
        if let Some(reason) = &c.finish_reason {
            events.push(StreamEvent::Finish(Finish {
                choice: c.index,
                reason: reason.clone(),
            }));
        }
    }
    if let Some(u) = &chunk.usage {
        events.push(StreamEvent::Usage(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
        }));
    }
    events
}

#[cfg(test)]
mod tests;
