//! The pipeline: the one place where the phases of a request are ordered.
//!
//! ```text
//!  server ──> parse body once ──> RequestCtx
//!                                    │
//!            plugins: on_request (auth, limits, redaction, cache, routing; may reply)
//!                                    │
//!            resolve model -> targets (config, or a plugin's override)
//!                                    │
//!            upstream: send, retry, fall back (until the first byte reaches the client)
//!                                    │
//!            plugins: on_response / on_response_chunk (reverse order)
//!                                    │
//!            encode in the client's dialect (JSON or SSE) ──> client
//!                                    │
//!            metrics + log line (+ plugins' on_log, off the hot path)
//! ```
//!
//! A request takes [`Gateway::snapshot`] once at the start and keeps that snapshot (config,
//! HTTP clients, plugins) until its last byte, so a reload never changes a request in flight.

pub mod ctx;
pub mod error;
pub mod stream;
pub mod upstream;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

pub use ctx::{Dialect, RequestCtx};
pub use error::GatewayError;
use stream::{ChunkStream, StreamItem};
use upstream::{Answer, Served, Upstream};

use crate::api::anthropic::MessagesStreamEncoder;
use crate::api::openai::{ChatChunk, StreamOptions, Usage};
use crate::api::sse;
use crate::config::{Config, Model, Target};
use crate::telemetry::Metrics;

/// Everything a request needs that a reload replaces as a whole.
pub struct Snapshot {
    /// Validated configuration.
    pub config: Config,
    /// The generation that accepted this snapshot (0 until [`crate::reload`] numbers it).
    pub generation: u64,
    /// One pooled HTTP client per provider.
    clients: HashMap<String, reqwest::Client>,
}

impl Snapshot {
    /// Builds the HTTP clients for a config.
    pub fn build(config: Config) -> Result<Snapshot, GatewayError> {
        let mut clients = HashMap::new();
        for (name, entry) in &config.providers {
            let client = reqwest::Client::builder()
                .connect_timeout(entry.timeouts.connect)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256)
                .tcp_nodelay(true)
                .user_agent(concat!("weir/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| GatewayError::Internal(format!("HTTP client for provider {name}: {e}")))?;
            clients.insert(name.clone(), client);
        }
        Ok(Snapshot { config, generation: 0, clients })
    }

    fn model(&self, name: &str) -> Result<Arc<Model>, GatewayError> {
        self.config.models.get(name).cloned().ok_or_else(|| GatewayError::ModelNotFound(name.to_owned()))
    }

    /// The targets for a request: a plugin's override, else the model's configured list.
    fn targets(&self, overrides: &Option<Vec<ctx::TargetOverride>>, model: &Model) -> Result<Vec<Target>, GatewayError> {
        let Some(overrides) = overrides else {
            return Ok(model.targets.clone());
        };
        overrides
            .iter()
            .map(|t| {
                let provider = self.config.providers.get(&t.provider).ok_or_else(|| {
                    GatewayError::Internal(format!("a plugin routed to unknown provider '{}'", t.provider))
                })?;
                Ok(Target { provider: provider.clone(), model: t.model.clone() })
            })
            .collect()
    }
}

/// The running gateway: the current snapshot and the process-wide metrics.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// Metrics, shared by every snapshot.
    pub metrics: Metrics,
    /// Where finished requests are logged (off until installed).
    pub request_log: crate::requestlog::Sink,
}

impl Gateway {
    /// A gateway serving `snapshot`.
    pub fn new(snapshot: Snapshot, metrics: Metrics) -> Self {
        Gateway { snapshot: ArcSwap::from_pointee(snapshot), metrics, request_log: Default::default() }
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot; requests in flight keep the old one.
    pub fn swap(&self, snapshot: impl Into<Arc<Snapshot>>) {
        self.snapshot.store(snapshot.into());
    }
}

/// Records metrics and the log line of one request when it completes (or is dropped, which
/// is how a client disconnect shows).
struct Accounting {
    gw: Arc<Gateway>,
    span: tracing::Span,
    model: String,
    provider: String,
    started: Instant,
    upstream_time: Duration,
    status: StatusCode,
    usage: Option<Usage>,
    first_token: Option<Duration>,
    stream: bool,
    complete: bool,
    error: Option<&'static str>,
    /// Request-log fields the rest of the accounting does not track.
    log: crate::requestlog::Details,
}

impl Accounting {
    fn new(gw: &Arc<Gateway>, started: Instant, model: &str) -> Self {
        Accounting {
            gw: gw.clone(),
            span: tracing::Span::current(),
            model: model.to_owned(),
            provider: String::new(),
            started,
            upstream_time: Duration::ZERO,
            status: StatusCode::OK,
            usage: None,
            first_token: None,
            stream: false,
            complete: false,
            error: None,
            log: Default::default(),
        }
    }

    fn failed(mut self, e: &GatewayError) {
        self.status = e.status();
        self.error = Some(e.reason());
        self.complete = true;
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        let m = &self.gw.metrics;
        let elapsed = self.started.elapsed();
        let provider = if self.provider.is_empty() { "none" } else { self.provider.as_str() };
        m.requests.with_label_values(&[self.model.as_str(), provider, self.status.as_str()]).inc();
        m.request_duration.with_label_values(&[self.model.as_str()]).observe(elapsed.as_secs_f64());
        if !self.provider.is_empty() {
            m.upstream_duration.with_label_values(&[provider]).observe(self.upstream_time.as_secs_f64());
        }
        // For streams the upstream keeps producing after the first byte; overhead is only
        // meaningful up to the point the answer began.
        let overhead = if self.stream {
            self.first_token.unwrap_or(elapsed).saturating_sub(self.upstream_time)
        } else {
            elapsed.saturating_sub(self.upstream_time)
        };
        m.overhead.with_label_values(&[self.model.as_str()]).observe(overhead.as_secs_f64());
        if let Some(t) = self.first_token {
            m.ttft.with_label_values(&[self.model.as_str()]).observe(t.as_secs_f64());
        }
        if let Some(u) = self.usage {
            m.tokens.with_label_values(&[self.model.as_str(), "input"]).inc_by(u.prompt_tokens);
            m.tokens.with_label_values(&[self.model.as_str(), "output"]).inc_by(u.completion_tokens);
        }
        let _enter = self.span.enter();
        self.span.record("provider", provider);
        self.span.record("status", self.status.as_u16());
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let (tokens_in, tokens_out) = self.usage.map(|u| (u.prompt_tokens, u.completion_tokens)).unwrap_or((0, 0));
        if !self.complete {
            tracing::info!(latency_ms, tokens_in, tokens_out, "Client went away before the response ended.");
        } else if let Some(reason) = self.error {
            tracing::info!(latency_ms, error = reason, "Request failed.");
        } else {
            tracing::info!(latency_ms, tokens_in, tokens_out, stream = self.stream, "Request served.");
        }
        self.gw.request_log.push(|| crate::requestlog::Record {
            seq: 0,
            time_ms: crate::requestlog::now_ms(),
            request_id: std::mem::take(&mut self.log.request_id),
            key: self.log.key.take(),
            tenant: self.log.tenant.take(),
            model: std::mem::take(&mut self.model),
            provider: (!self.provider.is_empty()).then(|| std::mem::take(&mut self.provider)),
            target_model: self.log.target_model.take(),
            status: self.status.as_u16(),
            tokens_in,
            tokens_out,
            cost_usd: None,
            latency_ms,
            ttft_ms: self.first_token.map(|t| t.as_secs_f64() * 1000.0),
            stream: self.stream,
            outcome: match (self.complete, self.error) {
                (false, _) => "client_gone",
                (true, Some(_)) => "failed",
                (true, None) => "served",
            }
            .to_owned(),
            error: self.error.map(str::to_owned),
            generation: self.log.generation,
            plugins: std::mem::take(&mut self.log.plugins),
        });
    }
}

/// Serves a chat completion (from either dialect).
pub async fn chat(gw: &Arc<Gateway>, mut ctx: RequestCtx) -> Response {
    let snap = gw.snapshot();
    let dialect = ctx.dialect;
    let ctx::Body::Chat(req) = &mut ctx.body else {
        return GatewayError::Internal("chat called without a chat body".into()).into_response_for(dialect);
    };
    let client_model = req.model.clone();
    tracing::Span::current().record("model", client_model.as_str());
    let mut acct = Accounting::new(gw, ctx.started, &client_model);
    acct.log.request_id.clone_from(&ctx.request_id);
    acct.log.generation = snap.generation;
    let model = match snap.model(&client_model) {
        Ok(m) => m,
        Err(e) => return fail(acct, e, dialect),
    };
    let targets = match snap.targets(&ctx.targets, &model) {
        Ok(t) => t,
        Err(e) => return fail(acct, e, dialect),
    };
    let client_usage = req.include_usage();
    if req.stream {
        // Ask every OpenAI-dialect upstream for usage; the chunk is dropped again below if the
        // client did not ask for it.
        let opts = req.stream_options.get_or_insert_with(|| StreamOptions {
            include_usage: None,
            rest: Default::default(),
        });
        opts.include_usage = Some(true);
    }
    let up = Upstream {
        clients: &snap.clients,
        retry: snap.config.retry,
        metrics: &gw.metrics,
    };
    let passthrough_ok = dialect == Dialect::OpenAi;
    let served = match up.chat(req, &targets, passthrough_ok).await {
        Ok(s) => s,
        Err(e) => return fail(acct, e, dialect),
    };
    let Served { target, answer, upstream_time, attempts } = served;
    acct.provider.clone_from(&target.provider.name);
    acct.log.target_model = Some(target.model.clone());
    acct.upstream_time = upstream_time;
    tracing::debug!(provider = %target.provider.name, upstream_model = %target.model, attempts, "Upstream answered.");
    ctx.metadata.insert("provider".to_owned(), target.provider.name.clone());
    match answer {
        Answer::Json(resp) => {
            acct.usage = resp.usage;
            let body = match dialect {
                Dialect::OpenAi => serde_json::to_vec(&resp),
                Dialect::Anthropic => {
                    serde_json::to_vec(&crate::api::anthropic::from_chat_response(&resp, &client_model))
                }
            };
            match body {
                Ok(b) => {
                    acct.complete = true;
                    json_response(StatusCode::OK, b)
                }
                Err(e) => fail(acct, GatewayError::Internal(format!("encoding response: {e}")), dialect),
            }
        }
        Answer::Stream(stream) => {
            acct.stream = true;
            gw.metrics.active_streams.with_label_values(&[client_model.as_str()]).inc();
            let encoder = match dialect {
                Dialect::OpenAi => Encoder::OpenAi { include_usage: client_usage },
                Dialect::Anthropic => Encoder::Anthropic(Box::new(MessagesStreamEncoder::new(&client_model))),
            };
            sse_response(SseBody { stream, encoder, out: VecDeque::new(), finished: false, acct })
        }
    }
}

/// Serves an embeddings request.
pub async fn embeddings(gw: &Arc<Gateway>, mut ctx: RequestCtx) -> Response {
    let snap = gw.snapshot();
    let dialect = ctx.dialect;
    let ctx::Body::Embeddings(req) = &mut ctx.body else {
        return GatewayError::Internal("embeddings called without an embeddings body".into())
            .into_response_for(dialect);
    };
    let client_model = req.model.clone();
    tracing::Span::current().record("model", client_model.as_str());
    let mut acct = Accounting::new(gw, ctx.started, &client_model);
    acct.log.request_id.clone_from(&ctx.request_id);
    acct.log.generation = snap.generation;
    let model = match snap.model(&client_model) {
        Ok(m) => m,
        Err(e) => return fail(acct, e, dialect),
    };
    let targets = match snap.targets(&ctx.targets, &model) {
        Ok(t) => t,
        Err(e) => return fail(acct, e, dialect),
    };
    let up = Upstream {
        clients: &snap.clients,
        retry: snap.config.retry,
        metrics: &gw.metrics,
    };
    match up.embeddings(req, &targets).await {
        Ok(Served { target, answer: Answer::Json(resp), upstream_time, .. }) => {
            acct.provider.clone_from(&target.provider.name);
            acct.log.target_model = Some(target.model.clone());
            acct.upstream_time = upstream_time;
            acct.usage = resp.usage.map(|u| Usage::new(u.prompt_tokens, 0));
            match serde_json::to_vec(&resp) {
                Ok(b) => {
                    acct.complete = true;
                    json_response(StatusCode::OK, b)
                }
                Err(e) => fail(acct, GatewayError::Internal(format!("encoding response: {e}")), dialect),
            }
        }
        Ok(Served { .. }) => fail(acct, GatewayError::Internal("embeddings answered with a stream".into()), dialect),
        Err(e) => fail(acct, e, dialect),
    }
}

fn fail(acct: Accounting, e: GatewayError, dialect: Dialect) -> Response {
    if matches!(e, GatewayError::Internal(_)) {
        tracing::error!(error = %e, "Internal error.");
    }
    acct.failed(&e);
    e.into_response_for(dialect)
}

/// A JSON response from already-encoded bytes.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Encodes canonical items into the client's SSE dialect.
enum Encoder {
    OpenAi { include_usage: bool },
    Anthropic(Box<MessagesStreamEncoder>),
}

struct SseBody {
    stream: ChunkStream,
    encoder: Encoder,
    out: VecDeque<Bytes>,
    finished: bool,
    acct: Accounting,
}

impl SseBody {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.out.pop_front() {
                return Some(frame);
            }
            if self.finished {
                return None;
            }
            match self.stream.next().await {
                Some(Ok(item)) => self.encode(item),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Upstream stream failed after it started; ending it with an error event.");
                    self.acct.error = Some(e.reason());
                    self.finished = true;
                    self.acct.complete = true;
                    let message = e.client_message();
                    match &mut self.encoder {
                        Encoder::OpenAi { .. } => {
                            let body = e.body(Dialect::OpenAi);
                            self.out.push_back(sse::data_frame(body.to_string().as_bytes()));
                        }
                        Encoder::Anthropic(enc) => {
                            let mut frames = Vec::new();
                            enc.error(&message, &mut frames);
                            self.out.extend(frames);
                        }
                    }
                }
                None => {
                    self.finished = true;
                    self.acct.complete = true;
                    match &mut self.encoder {
                        Encoder::OpenAi { .. } => self.out.push_back(Bytes::from_static(sse::DONE_FRAME)),
                        Encoder::Anthropic(enc) => {
                            let mut frames = Vec::new();
                            enc.finish(&mut frames);
                            self.out.extend(frames);
                        }
                    }
                }
            }
        }
    }

    fn encode(&mut self, item: StreamItem) {
        match item {
            StreamItem::Raw { data, usage, usage_only } => {
                if usage.is_some() {
                    self.acct.usage = usage;
                }
                let Encoder::OpenAi { include_usage } = self.encoder else {
                    // Pass-through is only chosen for OpenAI clients.
                    return;
                };
                if usage_only && !include_usage {
                    return;
                }
                if !usage_only && self.acct.first_token.is_none() {
                    self.acct.first_token = Some(self.acct.started.elapsed());
                }
                self.out.push_back(sse::data_frame(data.as_bytes()));
            }
            StreamItem::Chunk(chunk) => {
                if chunk.usage.is_some() {
                    self.acct.usage = chunk.usage;
                }
                if self.acct.first_token.is_none() && has_content(&chunk) {
                    self.acct.first_token = Some(self.acct.started.elapsed());
                }
                match &mut self.encoder {
                    Encoder::OpenAi { include_usage } => {
                        if chunk.choices.is_empty() && chunk.usage.is_some() && !*include_usage {
                            return;
                        }
                        match serde_json::to_vec(&chunk) {
                            Ok(json) => self.out.push_back(sse::data_frame(&json)),
                            Err(e) => tracing::error!(error = %e, "Cannot encode a stream chunk."),
                        }
                    }
                    Encoder::Anthropic(enc) => {
                        let mut frames = Vec::new();
                        enc.encode(&chunk, &mut frames);
                        self.out.extend(frames);
                    }
                }
            }
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.acct.gw.metrics.active_streams.with_label_values(&[self.acct.model.as_str()]).dec();
    }
}

fn has_content(chunk: &ChatChunk) -> bool {
    chunk.choices.iter().any(|c| {
        c.delta.content.as_deref().is_some_and(|t| !t.is_empty()) || c.delta.tool_calls.is_some()
    })
}

fn sse_response(body: SseBody) -> Response {
    let span = body.acct.span.clone();
    let frames = futures::stream::unfold(body, move |mut body| {
        let span = span.clone();
        async move {
            let frame = tracing::Instrument::instrument(body.next_frame(), span).await;
            frame.map(|frame| (Ok::<_, Infallible>(frame), body))
        }
    });
    let mut resp = Response::new(Body::from_stream(frames));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
