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

pub mod client;
pub mod count;
pub mod error;
pub mod onlog;
pub mod responses;
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

pub use crate::request::{Dialect, RequestCtx};
pub use count::count_tokens;
pub use error::GatewayError;
use responses::ResponsesCall;
use stream::{ChunkStream, Passthrough, StreamItem};
use upstream::{Answer, AttemptRecord, OpenAttempt, Served, Upstream};

use crate::api::anthropic::MessagesStreamEncoder;
use crate::api::openai::{ChatChunk, StreamOptions, Usage};
use crate::api::responses::ResponsesStreamEncoder;
use crate::api::sse;
use crate::config::{Config, Model, Target};
use crate::plugin::contract::LogEntry;
use crate::plugin::host::PluginMetrics;
use crate::plugin::{Chain, ChunkFilter, Flow, Plugins, response_headers};
use crate::state::StateStore;
use crate::telemetry::Metrics;

/// Process-wide services every snapshot shares. Built once at startup; they outlive
/// reloads (sled locks its directory, and Prometheus metrics register once).
#[derive(Clone)]
pub struct Services {
    /// Plugin key-value state (sled by default).
    pub state: Arc<dyn StateStore>,
    /// `weir_plugin_*` metrics.
    pub plugin_metrics: PluginMetrics,
    /// Latency, error rate and in-flight attempts per upstream target, fed by every attempt.
    pub target_stats: Arc<crate::targets::TargetStats>,
}

impl Services {
    /// Services whose plugin metrics are registered in `metrics`' registry.
    pub fn new(state: Arc<dyn StateStore>, metrics: &Metrics) -> Result<Services, GatewayError> {
        let plugin_metrics = PluginMetrics::register(&metrics.registry)
            .map_err(|e| GatewayError::Internal(format!("registering plugin metrics: {e}")))?;
        Ok(Services {
            state,
            plugin_metrics,
            target_stats: Default::default(),
        })
    }

    /// Services with unregistered metrics (tests, `weir plugin test`).
    pub fn unregistered(state: Arc<dyn StateStore>) -> Result<Services, GatewayError> {
        let plugin_metrics = PluginMetrics::unregistered()
            .map_err(|e| GatewayError::Internal(format!("plugin metrics: {e}")))?;
        Ok(Services {
            state,
            plugin_metrics,
            target_stats: Default::default(),
        })
    }
}

/// Everything a request needs that a reload replaces as a whole.
pub struct Snapshot {
    /// Validated configuration.
    pub config: Config,
    /// The loaded plugin instances and each model's chain.
    pub plugins: Plugins,
    /// The shared services this snapshot was built with (a reload builds with the same).
    pub services: Services,
    /// The generation that accepted this snapshot (0 until [`crate::reload`] numbers it).
    pub generation: u64,
    /// One pooled HTTP client per provider.
    clients: HashMap<String, client::HttpClient>,
}

/// What plugins read beyond their state (`target-stats`, `price`): the process's target
/// statistics (shared by every generation) and this config's `[prices]`.
fn host_lookups(services: &Services, config: &Config) -> crate::plugin::host::HostLookups {
    use crate::plugin::contract::{Price, TargetStatsView};
    let stats = services.target_stats.clone();
    let prices = config.prices.clone();
    crate::plugin::host::HostLookups {
        target_stats: Box::new(move |provider, model| {
            stats.get(provider, model).map(|s| TargetStatsView {
                latency_ewma_ms: s.latency_ewma_ms,
                error_rate: s.error_rate,
                in_flight: s.in_flight,
                attempts: s.attempts,
            })
        }),
        price: Box::new(move |model| {
            prices.get(model).map(|p| Price {
                input: p.input,
                output: p.output,
                cached_input: p.cached_input,
                cache_write: p.cache_write,
            })
        }),
        now: None,
    }
}

impl Snapshot {
    /// Builds the HTTP clients and loads every plugin of a config. Loading plugins compiles
    /// WASM and runs `init`: call it off the async workers (`spawn_blocking`).
    pub fn build(config: Config, services: &Services) -> Result<Snapshot, GatewayError> {
        let mut clients = HashMap::new();
        for (name, entry) in &config.providers {
            // No redirects are followed (a redirect would carry the provider's key to another
            // host) and nothing is retried below the pipeline's own retry and fallback.
            let client = client::HttpClient::new(entry.timeouts.connect).map_err(|e| {
                GatewayError::Internal(format!("HTTP client for provider {name}: {e}"))
            })?;
            clients.insert(name.clone(), client);
        }
        let plugins = Plugins::load_with(
            &config,
            services.state.clone(),
            &services.plugin_metrics,
            Arc::new(host_lookups(services, &config)),
        )
        .map_err(|e| GatewayError::PluginLoad(e.to_string()))?;
        Ok(Snapshot {
            config,
            plugins,
            services: services.clone(),
            generation: 0,
            clients,
        })
    }

    fn model(&self, name: &str) -> Result<Arc<Model>, GatewayError> {
        self.config
            .models
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::ModelNotFound(name.to_owned()))
    }

    /// The targets for a request: a plugin's override (routing), else the configured list of
    /// the model the request names after the request plugins ran.
    fn targets(
        &self,
        overrides: &Option<Vec<crate::request::TargetOverride>>,
        model: &str,
    ) -> Result<Vec<Target>, GatewayError> {
        let Some(overrides) = overrides else {
            return Ok(self.model(model)?.targets.clone());
        };
        if overrides.is_empty() {
            return Err(GatewayError::Internal(
                "a plugin routed to an empty target list".into(),
            ));
        }
        overrides
            .iter()
            .map(|t| {
                let provider = self.config.providers.get(&t.provider).ok_or_else(|| {
                    GatewayError::Internal(format!(
                        "a plugin routed to unknown provider '{}'",
                        t.provider
                    ))
                })?;
                Ok(Target {
                    provider: provider.clone(),
                    model: t.model.clone(),
                })
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
    /// The threads that run plugins' `on_log` hooks.
    pub on_log: onlog::LogWorkers,
}

impl Gateway {
    /// A gateway serving `snapshot`.
    pub fn new(snapshot: Snapshot, metrics: Metrics) -> Self {
        Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            request_log: Default::default(),
            on_log: Default::default(),
        }
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
    /// The chain whose `on_log` runs once the request is over (only if it has log hooks).
    log_chain: Option<Chain>,
    /// The request metadata at the end of the request, for `on_log`.
    metadata: std::collections::BTreeMap<String, String>,
    /// The plugins' request scratch, for `on_log`.
    scratch: crate::request::Scratch,
    /// What each request plugin decided (request log, `on_log`).
    decisions: Vec<crate::plugin::contract::PluginDecision>,
    /// The upstream model that answered.
    target_model: String,
    /// Every upstream attempt, in order (retries and fallbacks included).
    attempts: Vec<AttemptRecord>,
    /// A served stream's attempt, finished in the target statistics when the request ends.
    open_attempt: Option<OpenAttempt>,
    /// The price table of the snapshot serving the request, for `cost_usd`.
    prices: Option<Arc<crate::prices::Prices>>,
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
            log_chain: None,
            metadata: Default::default(),
            scratch: Default::default(),
            decisions: Vec::new(),
            target_model: String::new(),
            attempts: Vec::new(),
            open_attempt: None,
            prices: None,
        }
    }

    /// Takes what the plugins left in the request for `on_log` and the request log: the
    /// metadata bag (a copy: the response headers are read from it afterwards), their
    /// scratch and their decisions.
    fn capture(&mut self, ctx: &mut RequestCtx) {
        self.metadata.clone_from(&ctx.metadata);
        self.scratch = std::mem::take(&mut ctx.scratch);
        if self.decisions.is_empty() {
            self.decisions = std::mem::take(&mut ctx.decisions);
        }
    }

    /// The served stream broke after its first event (truncated, stalled, garbled, cut): its
    /// attempt failed after all, and the request is an upstream failure with the status it
    /// would have had (502, or 504 for a timeout) in metrics, the request log and `on_log`,
    /// although the client's response had already gone out as a 200.
    fn stream_broke(&mut self, e: &GatewayError) {
        self.status = e.status();
        if self.open_attempt.is_some()
            && let Some(last) = self.attempts.last_mut()
        {
            last.error = Some(upstream::STREAM_BROKEN.to_owned());
        }
    }

    /// The request's cost from its usage and the snapshot's prices, when both are known.
    fn cost_usd(&self) -> Option<f64> {
        let u = self.usage?;
        // Cache reads and writes are part of `prompt_tokens`, priced at their own rates.
        self.prices.as_ref()?.cost_usd(
            &self.model,
            self.log.target_model.as_deref().unwrap_or_default(),
            u.prompt_tokens,
            u.completion_tokens,
            u.cache_read_tokens(),
            u.cache_write_tokens(),
        )
    }

    fn failed(&mut self, e: &GatewayError) {
        self.status = e.status();
        self.error = Some(e.reason());
        self.complete = true;
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if let Some(open) = self.open_attempt.take() {
            let broke = self.attempts.last().is_some_and(|a| a.error.is_some());
            open.finish(!broke);
        }
        let m = &self.gw.metrics;
        let elapsed = self.started.elapsed();
        let provider = if self.provider.is_empty() {
            "none"
        } else {
            self.provider.as_str()
        };
        m.requests
            .with_label_values(&[self.model.as_str(), provider, self.status.as_str()])
            .inc();
        m.request_duration
            .with_label_values(&[self.model.as_str()])
            .observe(elapsed.as_secs_f64());
        if !self.provider.is_empty() {
            m.upstream_duration
                .with_label_values(&[provider])
                .observe(self.upstream_time.as_secs_f64());
        }
        // For streams the upstream keeps producing after the first byte; overhead is only
        // meaningful up to the point the answer began.
        let overhead = if self.stream {
            self.first_token
                .unwrap_or(elapsed)
                .saturating_sub(self.upstream_time)
        } else {
            elapsed.saturating_sub(self.upstream_time)
        };
        m.overhead
            .with_label_values(&[self.model.as_str()])
            .observe(overhead.as_secs_f64());
        if let Some(t) = self.first_token {
            m.ttft
                .with_label_values(&[self.model.as_str()])
                .observe(t.as_secs_f64());
        }
        if let Some(u) = self.usage {
            m.tokens
                .with_label_values(&[self.model.as_str(), "input"])
                .inc_by(u.prompt_tokens);
            m.tokens
                .with_label_values(&[self.model.as_str(), "output"])
                .inc_by(u.completion_tokens);
        }
        // Provider and status go on the final line rather than into the span: recording a
        // span field makes the log formatter re-format the span's fields.
        let _enter = self.span.enter();
        let status = self.status.as_u16();
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let (tokens_in, tokens_out) = self
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens))
            .unwrap_or((0, 0));
        if !self.complete {
            tracing::info!(
                provider,
                status,
                latency_ms,
                tokens_in,
                tokens_out,
                "Client went away before the response ended."
            );
        } else if let Some(reason) = self.error {
            tracing::info!(
                provider,
                status,
                latency_ms,
                error = reason,
                "Request failed."
            );
        } else {
            tracing::info!(
                provider,
                status,
                latency_ms,
                tokens_in,
                tokens_out,
                stream = self.stream,
                "Request served."
            );
        }
        let cost_usd = self.cost_usd();
        // Set by the auth plugin (`key` is the key id); read before `on_log` takes the bag.
        let key = self.metadata.get("key").cloned();
        let tenant = self.metadata.get("tenant").cloned();
        if let Some(chain) = self.log_chain.take() {
            let entry = LogEntry {
                request_id: self.log.request_id.clone(),
                model: self.model.clone(),
                provider: self.provider.clone(),
                target_model: self.target_model.clone(),
                status: self.status.as_u16(),
                stream: self.stream,
                usage: self.usage.map(|u| crate::plugin::contract::Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    cached_tokens: u
                        .prompt_tokens_details
                        .map(|d| d.cached_tokens)
                        .unwrap_or(0),
                    cache_write_tokens: 0,
                }),
                latency_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                ttft_ms: self
                    .first_token
                    .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                metadata: std::mem::take(&mut self.metadata).into_iter().collect(),
                attempts: self
                    .attempts
                    .iter()
                    .map(|a| crate::plugin::contract::Attempt {
                        provider: a.provider.clone(),
                        target_model: a.target_model.clone(),
                        status: a.status,
                        latency_ms: a.latency_ms,
                        error: a.error.clone(),
                    })
                    .collect(),
                decisions: self.decisions.clone(),
                cost_usd,
            };
            // Off the hot path: the response is already on its way.
            self.gw
                .on_log
                .submit(chain, entry, std::mem::take(&mut self.scratch));
        }
        self.gw.request_log.push(|| crate::requestlog::Record {
            seq: 0,
            time_ms: crate::requestlog::now_ms(),
            request_id: std::mem::take(&mut self.log.request_id),
            key,
            tenant,
            model: std::mem::take(&mut self.model),
            provider: (!self.provider.is_empty()).then(|| std::mem::take(&mut self.provider)),
            target_model: self.log.target_model.take(),
            status: self.status.as_u16(),
            tokens_in,
            tokens_out,
            cost_usd,
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
            attempts: std::mem::take(&mut self.attempts),
            decisions: std::mem::take(&mut self.decisions)
                .into_iter()
                .map(|d| crate::requestlog::PluginDecision {
                    plugin: d.plugin,
                    decision: d.decision,
                })
                .collect(),
        });
    }
}

/// Runs the request plugins and resolves the targets. `Err` is the response that ends the
/// request (a plugin's reply, a fail-closed plugin failure, an unknown model).
fn admit(
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    acct: &mut Accounting,
    responses: Option<&ResponsesCall>,
) -> Result<(Chain, Vec<Target>), Box<Response>> {
    let dialect = ctx.dialect;
    let chain = snap.plugins.chain(ctx.body.model()).clone();
    // `on_log` runs for every request the chain saw, replies and failures included, so a
    // plugin can settle what it reserved even when a later plugin refused the request.
    if chain.wants_log() {
        acct.log_chain = Some(chain.clone());
    }
    match chain.on_request(ctx) {
        Ok(Flow::Continue) => {}
        Ok(Flow::Reply(mut reply)) => {
            acct.status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            acct.complete = true;
            acct.capture(ctx);
            if let Some(call) = responses {
                reply = responses_reply(reply, call, snap);
            }
            return Err(Box::new(with_plugin_headers(
                reply_response(reply),
                &ctx.metadata,
            )));
        }
        Err(failure) => {
            tracing::warn!(plugin = %failure.plugin, kind = failure.kind, "Fail-closed plugin failed; refusing the request.");
            acct.capture(ctx);
            let resp = fail_ref(
                acct,
                GatewayError::PluginFailed {
                    plugin: failure.plugin,
                    kind: failure.kind,
                },
                dialect,
            );
            return Err(Box::new(with_plugin_headers(resp, &ctx.metadata)));
        }
    }
    match snap.targets(&ctx.targets, ctx.body.model()) {
        Ok(t) => Ok((chain, t)),
        Err(e) => {
            acct.capture(ctx);
            Err(Box::new(with_plugin_headers(
                fail_ref(acct, e, dialect),
                &ctx.metadata,
            )))
        }
    }
}

/// Serves a chat completion (OpenAI or Anthropic dialect).
pub async fn chat(gw: &Arc<Gateway>, ctx: RequestCtx) -> Response {
    serve_chat(gw, ctx, None).await
}

/// Serves a Responses API request, translated to a chat request: the answer is encoded as a
/// `response` object (or typed events) and stored when `call` says so.
pub async fn responses(gw: &Arc<Gateway>, ctx: RequestCtx, call: ResponsesCall) -> Response {
    serve_chat(gw, ctx, Some(call)).await
}

async fn serve_chat(
    gw: &Arc<Gateway>,
    mut ctx: RequestCtx,
    responses: Option<ResponsesCall>,
) -> Response {
    let snap = gw.snapshot();
    let dialect = ctx.dialect;
    let client_model = ctx.body.model().to_owned();
    tracing::Span::current().record("model", client_model.as_str());
    let mut acct = Accounting::new(gw, ctx.started, &client_model);
    acct.log.request_id.clone_from(&ctx.request_id);
    acct.log.generation = snap.generation;
    acct.prices = Some(snap.config.prices.clone());
    let (chain, targets) = match admit(&snap, &mut ctx, &mut acct, responses.as_ref()) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let crate::request::Body::Chat(req) = &mut ctx.body else {
        return fail(
            acct,
            GatewayError::Internal("a plugin replaced a chat body with another kind".into()),
            dialect,
        );
    };
    let client_usage = req.include_usage();
    let stream = req.stream;
    if stream {
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
        stats: &snap.services.target_stats,
    };
    // Forward the upstream answer (body or chunks) untouched only when the client speaks the
    // same dialect and no plugin needs to see or change it.
    let passthrough_ok = matches!(dialect, Dialect::OpenAi | Dialect::Anthropic)
        && if stream {
            !chain.wants_chunks()
        } else {
            !chain.wants_response()
        };
    let served = match up
        .chat(
            req,
            upstream::ClientRequest {
                dialect,
                raw: ctx.client_body.as_deref(),
                headers: &ctx.headers,
            },
            &targets,
            passthrough_ok,
            &mut acct.attempts,
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            acct.capture(&mut ctx);
            return with_plugin_headers(fail(acct, e, dialect), &ctx.metadata);
        }
    };
    let Served {
        target,
        answer,
        upstream_time,
        attempts,
        open,
    } = served;
    acct.open_attempt = open;
    acct.provider.clone_from(&target.provider.name);
    acct.log.target_model = Some(target.model.clone());
    acct.target_model.clone_from(&target.model);
    acct.upstream_time = upstream_time;
    tracing::debug!(provider = %target.provider.name, upstream_model = %target.model, attempts, "Upstream answered.");
    match answer {
        Answer::Raw { body, usage } => {
            acct.usage = usage;
            acct.complete = true;
            acct.capture(&mut ctx);
            with_plugin_headers(json_response(StatusCode::OK, body), &ctx.metadata)
        }
        Answer::Json(mut resp) => {
            acct.usage = resp.usage;
            match chain.on_response(&mut ctx, &mut resp) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Reply(mut reply)) => {
                    acct.status = StatusCode::from_u16(reply.status)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    acct.complete = true;
                    acct.capture(&mut ctx);
                    if let Some(call) = &responses {
                        reply = responses_reply(reply, call, &snap);
                    }
                    return with_plugin_headers(reply_response(reply), &ctx.metadata);
                }
                Err(failure) => {
                    acct.capture(&mut ctx);
                    let resp = fail(
                        acct,
                        GatewayError::PluginFailed {
                            plugin: failure.plugin,
                            kind: failure.kind,
                        },
                        dialect,
                    );
                    return with_plugin_headers(resp, &ctx.metadata);
                }
            }
            let body = match (&responses, dialect) {
                (Some(call), _) => {
                    let (object, answer) =
                        crate::api::responses::response_object(&resp, &call.id, &call.echo);
                    call.store(snap.services.state.as_ref(), object.clone(), answer);
                    serde_json::to_vec(&object)
                }
                (None, Dialect::Anthropic) => serde_json::to_vec(
                    &crate::api::anthropic::from_chat_response(&resp, &client_model),
                ),
                (None, _) => serde_json::to_vec(&resp),
            };
            acct.capture(&mut ctx);
            let out = match body {
                Ok(b) => {
                    acct.complete = true;
                    json_response(StatusCode::OK, b)
                }
                Err(e) => fail(
                    acct,
                    GatewayError::Internal(format!("encoding response: {e}")),
                    dialect,
                ),
            };
            with_plugin_headers(out, &ctx.metadata)
        }
        Answer::Stream(upstream) => {
            acct.stream = true;
            gw.metrics
                .active_streams
                .with_label_values(&[client_model.as_str()])
                .inc();
            let encoder = match (responses, dialect) {
                (Some(call), _) => Encoder::Responses(Box::new((
                    ResponsesStreamEncoder::new(&call.id, call.echo.clone()),
                    call,
                ))),
                (None, Dialect::Anthropic) if upstream.passthrough() == Passthrough::Anthropic => {
                    Encoder::AnthropicRaw
                }
                (None, Dialect::Anthropic) => {
                    Encoder::Anthropic(Box::new(MessagesStreamEncoder::new(&client_model)))
                }
                (None, _) => Encoder::OpenAi {
                    include_usage: client_usage,
                },
            };
            // The filter takes the plugins' scratch for the stream and gives it back at the end.
            let filter = chain.wants_chunks().then(|| chain.chunk_filter(&mut ctx));
            acct.capture(&mut ctx);
            let resp = sse_response(SseBody {
                stream: *upstream,
                encoder,
                filter,
                out: VecDeque::new(),
                finished: false,
                acct,
            });
            with_plugin_headers(resp, &ctx.metadata)
        }
    }
}

/// The response for a plugin's reply. The body is sent as the plugin wrote it.
fn reply_response(reply: crate::plugin::Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, reply.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in reply.headers {
        match (
            http::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(n), Ok(v)) => {
                h.insert(n, v);
            }
            _ => {
                tracing::warn!(header = %name, "A plugin reply carried an invalid header; dropped.")
            }
        }
    }
    resp
}

/// Adds the response headers plugins asked for (rate-limit counters, cache status...).
fn with_plugin_headers(
    mut resp: Response,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Response {
    let h = resp.headers_mut();
    for (name, value) in response_headers(metadata) {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::try_from(name),
            HeaderValue::try_from(value),
        ) {
            h.insert(n, v);
        }
    }
    resp
}

/// Serves an embeddings request.
pub async fn embeddings(gw: &Arc<Gateway>, mut ctx: RequestCtx) -> Response {
    let snap = gw.snapshot();
    let dialect = ctx.dialect;
    let client_model = ctx.body.model().to_owned();
    tracing::Span::current().record("model", client_model.as_str());
    let mut acct = Accounting::new(gw, ctx.started, &client_model);
    acct.log.request_id.clone_from(&ctx.request_id);
    acct.log.generation = snap.generation;
    acct.prices = Some(snap.config.prices.clone());
    let (_chain, targets) = match admit(&snap, &mut ctx, &mut acct, None) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    acct.capture(&mut ctx);
    let crate::request::Body::Embeddings(req) = &mut ctx.body else {
        return fail(
            acct,
            GatewayError::Internal("a plugin replaced an embeddings body with another kind".into()),
            dialect,
        );
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            let message = format!("encoding_format must be 'float' or 'base64', not '{other}'");
            return fail(
                acct,
                GatewayError::BadRequest(crate::api::BadRequest::field("encoding_format", message)),
                dialect,
            );
        }
    };
    let up = Upstream {
        clients: &snap.clients,
        retry: snap.config.retry,
        metrics: &gw.metrics,
        stats: &snap.services.target_stats,
    };
    match up.embeddings(req, &targets, &mut acct.attempts).await {
        Ok(Served {
            target,
            answer: Answer::Json(resp),
            upstream_time,
            ..
        }) => {
            acct.provider.clone_from(&target.provider.name);
            acct.log.target_model = Some(target.model.clone());
            acct.upstream_time = upstream_time;
            acct.usage = resp.usage.map(|u| Usage::new(u.prompt_tokens, 0));
            let mut resp = resp;
            if base64 {
                encode_embeddings_base64(&mut resp);
            }
            match serde_json::to_vec(&resp) {
                Ok(b) => {
                    acct.complete = true;
                    json_response(StatusCode::OK, b)
                }
                Err(e) => fail(
                    acct,
                    GatewayError::Internal(format!("encoding response: {e}")),
                    dialect,
                ),
            }
        }
        Ok(Served { .. }) => fail(
            acct,
            GatewayError::Internal("embeddings answered with a stream".into()),
            dialect,
        ),
        Err(e) => fail(acct, e, dialect),
    }
}

/// `encoding_format: "base64"`, as OpenAI encodes it: each vector as the base64 of its
/// little-endian `f32`s. Upstreams that honour the field natively (OpenAI, Azure) already
/// answered strings, which are left alone; float arrays (Gemini, the mock) are converted.
fn encode_embeddings_base64(resp: &mut crate::api::openai::EmbeddingsResponse) {
    use base64::Engine as _;
    for item in &mut resp.data {
        let serde_json::Value::Array(values) = &item.embedding else {
            continue;
        };
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            let f = v.as_f64().unwrap_or_default() as f32;
            bytes.extend_from_slice(&f.to_le_bytes());
        }
        item.embedding =
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

fn fail(mut acct: Accounting, e: GatewayError, dialect: Dialect) -> Response {
    fail_ref(&mut acct, e, dialect)
}

/// Marks the request failed (the accounting records it when dropped) and encodes the error.
fn fail_ref(acct: &mut Accounting, e: GatewayError, dialect: Dialect) -> Response {
    if matches!(e, GatewayError::Internal(_)) {
        tracing::error!(error = %e, "Internal error.");
    }
    acct.failed(&e);
    e.into_response_for(dialect)
}

/// A JSON response from already-encoded bytes.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut resp = (status, body.into()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A plugin's reply to a Responses client (plugins see it as an OpenAI chat request): a
/// chat completion (a cache hit, a canned answer) becomes a `response` object, a chat
/// completion stream becomes typed Responses events, and either is stored like an upstream
/// answer. Errors are OpenAI-shaped already and pass unchanged.
fn responses_reply(
    mut reply: crate::plugin::Reply,
    call: &ResponsesCall,
    snap: &Snapshot,
) -> crate::plugin::Reply {
    if reply.status != 200 {
        return reply;
    }
    let state = snap.services.state.as_ref();
    let is_sse = reply
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream"));
    if is_sse {
        let mut parser = sse::SseParser::new();
        let mut events = Vec::new();
        if parser.feed(&reply.body, &mut events).is_err() {
            return reply;
        }
        parser.finish();
        let mut enc = ResponsesStreamEncoder::new(&call.id, call.echo.clone());
        let mut frames = Vec::new();
        for event in events.iter().filter(|e| e.data != "[DONE]") {
            match serde_json::from_str::<ChatChunk>(&event.data) {
                Ok(chunk) => enc.encode(&chunk, &mut frames),
                Err(e) => {
                    tracing::debug!(error = %e, "A plugin's stream event is not a chat chunk; skipped.")
                }
            }
        }
        enc.finish(&mut frames);
        if let Some((object, answer)) = enc.take_result() {
            call.store(state, object, answer);
        }
        reply.body = frames.concat();
        return reply;
    }
    let Ok(chat) = serde_json::from_slice::<crate::api::openai::ChatResponse>(&reply.body) else {
        return reply;
    };
    let (object, answer) = crate::api::responses::response_object(&chat, &call.id, &call.echo);
    call.store(state, object.clone(), answer);
    reply.body = object.to_string().into_bytes();
    reply
}

/// Encodes canonical items into the client's SSE dialect.
enum Encoder {
    OpenAi {
        include_usage: bool,
    },
    Anthropic(Box<MessagesStreamEncoder>),
    /// Anthropic events forwarded as the Anthropic upstream sent them.
    AnthropicRaw,
    /// The encoder and the call whose response is stored at the end.
    Responses(Box<(ResponsesStreamEncoder, ResponsesCall)>),
}

struct SseBody {
    stream: ChunkStream,
    encoder: Encoder,
    /// The chain's chunk hooks, when any plugin has one.
    filter: Option<ChunkFilter>,
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
                Some(Ok(StreamItem::Chunk(chunk))) if self.filter.is_some() => {
                    let mut filtered = Vec::new();
                    let result = match &mut self.filter {
                        Some(f) => f.on_chunk(chunk, &mut filtered),
                        None => Ok(()),
                    };
                    for c in filtered {
                        self.encode(StreamItem::Chunk(c));
                    }
                    if let Err(stop) = result {
                        tracing::info!(plugin = %stop.plugin, "A plugin stopped the stream.");
                        self.end_with_error(GatewayError::PluginStopped {
                            plugin: stop.plugin,
                            message: stop.message,
                        });
                    }
                }
                Some(Ok(item)) => self.encode(item),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, reason = e.reason(), "Upstream stream failed after it started; ending it with an error event.");
                    self.acct.stream_broke(&e);
                    self.end_with_error(e);
                }
                None => {
                    if let Some(f) = &mut self.filter {
                        let mut held = Vec::new();
                        let result = f.finish(&mut held);
                        for c in held {
                            self.encode(StreamItem::Chunk(c));
                        }
                        if let Err(stop) = result {
                            self.end_with_error(GatewayError::PluginStopped {
                                plugin: stop.plugin,
                                message: stop.message,
                            });
                            continue;
                        }
                    }
                    self.finished = true;
                    self.acct.complete = true;
                    if let Some(f) = &mut self.filter {
                        self.acct.metadata.clone_from(f.metadata());
                        self.acct.scratch = f.take_scratch();
                    }
                    match &mut self.encoder {
                        Encoder::OpenAi { .. } => {
                            self.out.push_back(Bytes::from_static(sse::DONE_FRAME))
                        }
                        Encoder::Anthropic(enc) => {
                            let mut frames = Vec::new();
                            enc.finish(&mut frames);
                            self.out.extend(frames);
                        }
                        // The upstream's own `message_stop` has been forwarded.
                        Encoder::AnthropicRaw => {}
                        Encoder::Responses(pair) => {
                            let (enc, call) = &mut **pair;
                            let mut frames = Vec::new();
                            enc.finish(&mut frames);
                            self.out.extend(frames);
                            if let Some((object, answer)) = enc.take_result() {
                                let state = self.acct.gw.snapshot().services.state.clone();
                                call.store(state.as_ref(), object, answer);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream with an error event in the client's dialect.
    fn end_with_error(&mut self, e: GatewayError) {
        self.acct.error = Some(e.reason());
        self.finished = true;
        self.acct.complete = true;
        if let Some(f) = &mut self.filter {
            self.acct.metadata.clone_from(f.metadata());
            self.acct.scratch = f.take_scratch();
        }
        let message = e.client_message();
        match &mut self.encoder {
            Encoder::OpenAi { .. } => {
                let body = e.body(Dialect::OpenAi);
                self.out
                    .push_back(sse::data_frame(body.to_string().as_bytes()));
            }
            Encoder::Anthropic(enc) => {
                let mut frames = Vec::new();
                enc.error(&message, &mut frames);
                self.out.extend(frames);
            }
            Encoder::AnthropicRaw => {
                let body = crate::api::anthropic::error_body(e.status(), &message);
                self.out
                    .push_back(sse::named_frame("error", body.to_string().as_bytes()));
            }
            Encoder::Responses(pair) => {
                let mut frames = Vec::new();
                pair.0.error(e.reason(), &message, &mut frames);
                self.out.extend(frames);
            }
        }
    }

    fn encode(&mut self, item: StreamItem) {
        match item {
            StreamItem::Raw {
                data,
                usage,
                usage_only,
            } => {
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
            StreamItem::Named {
                event,
                data,
                usage,
                content,
            } => {
                if usage.is_some() {
                    self.acct.usage = usage;
                }
                if !matches!(self.encoder, Encoder::AnthropicRaw) {
                    // Named pass-through is only chosen for Anthropic clients.
                    return;
                }
                if content && self.acct.first_token.is_none() {
                    self.acct.first_token = Some(self.acct.started.elapsed());
                }
                self.out
                    .push_back(sse::named_frame(&event, data.as_bytes()));
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
                    Encoder::AnthropicRaw => {
                        tracing::error!("A decoded chunk on an Anthropic pass-through stream.");
                    }
                    Encoder::Responses(pair) => {
                        let mut frames = Vec::new();
                        pair.0.encode(&chunk, &mut frames);
                        self.out.extend(frames);
                    }
                }
            }
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        // A client that went away mid-stream: the plugins' state still reaches `on_log`.
        if !self.finished
            && let Some(f) = &mut self.filter
        {
            self.acct.metadata.clone_from(f.metadata());
            self.acct.scratch = f.take_scratch();
        }
        self.acct
            .gw
            .metrics
            .active_streams
            .with_label_values(&[self.acct.model.as_str()])
            .dec();
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
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
