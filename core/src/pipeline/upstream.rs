//! Sending a request upstream: timeouts, retries with backoff, and fallback across targets.
//!
//! The rule: retry and fall back on connect errors, timeouts, 408, 429 and 5xx, and on a 2xx
//! the gateway cannot use (garbage JSON, a stream that breaks before its first event), but
//! only **before the first byte reaches the client**. For streams that means the first event
//! is read here, before the response is committed; after that, a failure ends the stream with
//! an error event instead.
//!
//! An upstream's `Retry-After` (or `retry-after-ms`) on a retryable status sets the wait before
//! the retry on the same target, up to `retry.max_retry_after_ms`; past that the target is not
//! retried. A non-streamed answer is read up to the provider's `max_response_bytes`, never
//! further.
//!
//! Every attempt (each retry and each fallback) is recorded twice: as an [`AttemptRecord`]
//! in the request's list (the request log's `attempts`), and as a sample in the process-wide
//! [`TargetStats`]. A served stream's attempt stays in flight until the stream ends
//! ([`OpenAttempt`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::timeout_at;

use super::client::{self, HttpClient, HttpError};
use super::error::GatewayError;
use super::stream::{ChunkStream, Passthrough, StreamLimits};
use crate::api::openai::{ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};
use crate::config::{ProviderEntry, Retry, Target};
use crate::provider::{Provider, ProviderError, ProviderImpl, UpstreamRequest};
use crate::request::Dialect;
use crate::targets::{InFlight, TargetStats};
use crate::telemetry::Metrics;

/// Largest upstream error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// One upstream attempt of a request, as the request log keeps it. Never holds an upstream
/// message (it may quote the prompt): only names, numbers and a short error kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Provider name (`[providers.NAME]`).
    pub provider: String,
    /// The upstream model name sent.
    pub target_model: String,
    /// The upstream's HTTP status; 0 when no response arrived (200 for the mock).
    pub status: u16,
    /// Start of the attempt to its first byte (success) or to its failure, ms.
    pub latency_ms: u64,
    /// Why the attempt failed: `connect`, `timeout`, `status`, `body`, `too_large` (a JSON
    /// answer over `max_response_bytes`), `invalid_response`, `stream` (broken, truncated or
    /// stalled before the first event, or after it on the served attempt), `unsupported`,
    /// `internal`. `None` for the attempt that served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The error kind of a stream that broke after the response was committed.
pub const STREAM_BROKEN: &str = "stream";

/// The served attempt of a stream, still in flight: the target's statistics get its outcome
/// when the stream ends. Dropping it without [`OpenAttempt::finish`] records nothing.
#[derive(Debug)]
pub struct OpenAttempt {
    in_flight: InFlight,
    first_byte: Duration,
}

impl OpenAttempt {
    /// Ends the attempt: `ok` is false when the stream broke after its first event.
    pub fn finish(self, ok: bool) {
        self.in_flight.finish(self.first_byte, ok);
    }
}

/// One failed attempt and whether another attempt may help.
struct AttemptError {
    error: GatewayError,
    /// Short kind for the attempt record (see [`AttemptRecord::error`]).
    kind: &'static str,
    /// Retry the same target (after backoff).
    retry_same: bool,
    /// Try the next target.
    fall_back: bool,
    /// How long the upstream asked to wait before trying again (`Retry-After`).
    retry_after: Option<Duration>,
}

impl AttemptError {
    fn retryable(kind: &'static str, error: GatewayError) -> Self {
        AttemptError {
            error,
            kind,
            retry_same: true,
            fall_back: true,
            retry_after: None,
        }
    }
    fn next_target(kind: &'static str, error: GatewayError) -> Self {
        AttemptError {
            error,
            kind,
            retry_same: false,
            fall_back: true,
            retry_after: None,
        }
    }
    fn fatal(kind: &'static str, error: GatewayError) -> Self {
        AttemptError {
            error,
            kind,
            retry_same: false,
            fall_back: false,
            retry_after: None,
        }
    }

    /// Whether the failure says something about the target's health. Not when no request
    /// left the gateway, nor when the upstream refused the request itself (400, 413, 422):
    /// one caller's bad requests must not make a target look unhealthy for everyone.
    /// An answer too large for `max_response_bytes` is blamed on the request too (it asked
    /// for that much).
    fn blames_target(&self, status: u16) -> bool {
        !matches!(self.kind, "unsupported" | "internal" | "too_large")
            && !matches!(status, 400 | 413 | 422)
    }

    fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }
}

/// What one attempt observed, filled in as it goes.
struct Trace {
    started: Instant,
    /// The upstream's status, 0 until a response arrived.
    status: u16,
    /// Start to response headers (JSON) or to the first stream event.
    first_byte: Option<Duration>,
}

impl Trace {
    fn start() -> Self {
        Trace {
            started: Instant::now(),
            status: 0,
            first_byte: None,
        }
    }

    fn first_byte(&mut self, status: u16) {
        self.status = status;
        self.first_byte = Some(self.started.elapsed());
    }
}

/// Converts a duration to whole ms, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What an upstream answered, ready for encoding.
pub enum Answer<T> {
    /// A complete JSON response.
    Json(T),
    /// A complete OpenAI-shaped JSON response to forward byte for byte (checked to be a chat
    /// completion, usage read): only when the client speaks OpenAI and no plugin wants to see
    /// or change the response.
    Raw {
        /// The upstream body.
        body: Bytes,
        /// The usage it reports.
        usage: Option<crate::api::openai::Usage>,
    },
    /// A stream whose first item has already arrived.
    Stream(Box<ChunkStream>),
}

/// A successful exchange: the target that answered and the answer.
pub struct Served<T> {
    /// The target that answered.
    pub target: Target,
    /// The answer.
    pub answer: Answer<T>,
    /// Time spent upstream until the answer (or the first stream item) arrived.
    pub upstream_time: Duration,
    /// Attempts made, the successful one included.
    pub attempts: u32,
    /// A stream's attempt, in flight until the stream ends (`None` for JSON answers).
    pub open: Option<OpenAttempt>,
}

/// The upstream side of the pipeline: shared HTTP clients and the retry policy.
pub struct Upstream<'a> {
    /// HTTP client per provider name (one pool per provider, with its connect timeout).
    pub clients: &'a std::collections::HashMap<String, HttpClient>,
    /// Retry policy.
    pub retry: Retry,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Per-target statistics every attempt feeds.
    pub stats: &'a TargetStats,
}

/// What the client sent besides the canonical request, for building upstream requests.
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest<'a> {
    /// The client's dialect.
    pub dialect: Dialect,
    /// The client's body bytes while they still say what the canonical request says.
    pub raw: Option<&'a [u8]>,
    /// The client's headers (after plugins), for the ones a provider forwards.
    pub headers: &'a http::HeaderMap,
}

impl Upstream<'_> {
    /// Runs a chat request over `targets` in order. `req.model` is rewritten per target.
    /// `client` is what the client sent besides `req`: its dialect, its own bytes of `req`
    /// when no plugin changed it (see [`crate::pipeline::RequestCtx::client_body`]) and its
    /// headers. Each attempt is appended to `log`.
    pub async fn chat(
        &self,
        req: &mut ChatRequest,
        client_body: ClientRequest<'_>,
        targets: &[Target],
        passthrough_ok: bool,
        log: &mut Vec<AttemptRecord>,
    ) -> Result<Served<ChatResponse>, GatewayError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last: Option<GatewayError> = None;
        for target in targets {
            req.model.clone_from(&target.model);
            let mut retry_after = None;
            for attempt in 0..self.retry.attempts_per_target {
                if attempt > 0 {
                    tokio::time::sleep(self.backoff(attempt, retry_after)).await;
                }
                attempts += 1;
                let in_flight = self.stats.start(&target.provider.name, &target.model);
                let mut trace = Trace::start();
                let result = self
                    .chat_once(req, client_body, target, passthrough_ok, &mut trace)
                    .await;
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.error.reason(),
                };
                self.metrics
                    .attempts
                    .with_label_values(&[target.provider.name.as_str(), outcome])
                    .inc();
                match result {
                    Ok(answer) => {
                        let upstream_time = started.elapsed();
                        let stream = matches!(answer, Answer::Stream(_));
                        let open = settle(target, &trace, None, in_flight, stream, log);
                        return Ok(Served {
                            target: target.clone(),
                            answer,
                            upstream_time,
                            attempts,
                            open,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(
                            provider = %target.provider.name,
                            model = %target.model,
                            attempt = attempt + 1,
                            error = %e.error,
                            kind = e.kind,
                            "Upstream attempt failed."
                        );
                        settle(target, &trace, Some(&e), in_flight, false, log);
                        let (retry_same, fall_back) = (e.retry_same, e.fall_back);
                        retry_after = e.retry_after;
                        last = Some(e.error);
                        if !fall_back {
                            return Err(
                                last.unwrap_or_else(|| GatewayError::Internal("no attempt".into()))
                            );
                        }
                        let retries_left = attempt + 1 < self.retry.attempts_per_target;
                        if !retry_same || (retries_left && self.waits_too_long(target, retry_after))
                        {
                            break;
                        }
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| GatewayError::Internal("model has no targets".into())))
    }

    /// Runs an embeddings request over `targets` in order. Each attempt is appended to `log`.
    pub async fn embeddings(
        &self,
        req: &mut EmbeddingsRequest,
        targets: &[Target],
        log: &mut Vec<AttemptRecord>,
    ) -> Result<Served<EmbeddingsResponse>, GatewayError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last: Option<GatewayError> = None;
        for target in targets {
            req.model.clone_from(&target.model);
            let mut retry_after = None;
            for attempt in 0..self.retry.attempts_per_target {
                if attempt > 0 {
                    tokio::time::sleep(self.backoff(attempt, retry_after)).await;
                }
                attempts += 1;
                let in_flight = self.stats.start(&target.provider.name, &target.model);
                let mut trace = Trace::start();
                let result = self.embeddings_once(req, target, &mut trace).await;
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.error.reason(),
                };
                self.metrics
                    .attempts
                    .with_label_values(&[target.provider.name.as_str(), outcome])
                    .inc();
                match result {
                    Ok(resp) => {
                        settle(target, &trace, None, in_flight, false, log);
                        return Ok(Served {
                            target: target.clone(),
                            answer: Answer::Json(resp),
                            upstream_time: started.elapsed(),
                            attempts,
                            open: None,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(provider = %target.provider.name, error = %e.error, kind = e.kind, "Upstream attempt failed.");
                        settle(target, &trace, Some(&e), in_flight, false, log);
                        let (retry_same, fall_back) = (e.retry_same, e.fall_back);
                        retry_after = e.retry_after;
                        last = Some(e.error);
                        if !fall_back {
                            return Err(
                                last.unwrap_or_else(|| GatewayError::Internal("no attempt".into()))
                            );
                        }
                        let retries_left = attempt + 1 < self.retry.attempts_per_target;
                        if !retry_same || (retries_left && self.waits_too_long(target, retry_after))
                        {
                            break;
                        }
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| GatewayError::Internal("model has no targets".into())))
    }

    /// The wait before retry `attempt` (1 = the first retry): the exponential backoff, or
    /// the upstream's `Retry-After` when longer (already checked against the cap).
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        let backoff = self
            .retry
            .backoff
            .saturating_mul(factor)
            .min(self.retry.max_backoff);
        retry_after.map_or(backoff, |ra| ra.max(backoff))
    }

    /// Whether the upstream asked to wait longer than `retry.max_retry_after_ms`: then the
    /// target is not retried.
    fn waits_too_long(&self, target: &Target, retry_after: Option<Duration>) -> bool {
        let Some(ra) = retry_after.filter(|ra| *ra > self.retry.max_retry_after) else {
            return false;
        };
        tracing::info!(
            provider = %target.provider.name,
            retry_after_ms = millis(ra),
            max_retry_after_ms = millis(self.retry.max_retry_after),
            "Upstream asked to retry later than the cap; not retrying this target."
        );
        true
    }

    /// Counts the input tokens of `req` with `target`'s own counting API. `Ok(None)`: the
    /// provider has none (the caller estimates). One attempt, no retries.
    pub async fn count_tokens(
        &self,
        req: &ChatRequest,
        client: ClientRequest<'_>,
        target: &Target,
    ) -> Result<Option<u64>, GatewayError> {
        let entry = &target.provider;
        let ProviderImpl::Http(provider) = &entry.imp else {
            return Ok(None);
        };
        let provider = provider.as_ref();
        let raw = client.raw.filter(|_| client.dialect == Dialect::Anthropic);
        let Some(up) = provider.count_tokens_request(raw, req, &target.model) else {
            return Ok(None);
        };
        let mut up = up.map_err(|e| translate_error(entry, e).error)?;
        provider.forward_client_headers(client.headers, &mut up.headers);
        let deadline = Instant::now() + entry.timeouts.total;
        let mut trace = Trace::start();
        let resp = self
            .send(entry, provider, up, deadline, &mut trace)
            .await
            .map_err(|e| e.error)?;
        let body = read_body(entry, resp, deadline)
            .await
            .map_err(|e| e.error)?;
        provider
            .count_tokens_response(&body)
            .map(Some)
            .map_err(|e| translate_error(entry, e).error)
    }

    async fn chat_once(
        &self,
        req: &ChatRequest,
        client: ClientRequest<'_>,
        target: &Target,
        passthrough_ok: bool,
        trace: &mut Trace,
    ) -> Result<Answer<ChatResponse>, AttemptError> {
        let entry = &target.provider;
        let provider = match &entry.imp {
            ProviderImpl::Mock(mock) => {
                let latency = mock.latency();
                if req.stream {
                    // The mock's latency is slept before its first chunk, after this point.
                    trace.first_byte(200);
                    return Ok(Answer::Stream(Box::new(ChunkStream::mock(
                        mock.stream(req, &target.model),
                        latency,
                    ))));
                }
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                trace.first_byte(200);
                return Ok(Answer::Json(mock.chat(req, &target.model)));
            }
            ProviderImpl::Http(p) => p.as_ref(),
        };
        let verbatim = client.raw.and_then(|raw| {
            if client.dialect == Dialect::Anthropic {
                provider.chat_request_from_anthropic_body(raw, req, &target.model)
            } else if client.dialect == Dialect::OpenAi {
                provider.chat_request_from_client_body(raw, req, &target.model)
            } else {
                None
            }
        });
        let mut up = verbatim
            .unwrap_or_else(|| provider.chat_request(req, &target.model))
            .map_err(|e| translate_error(entry, e))?;
        provider.forward_client_headers(client.headers, &mut up.headers);
        let same_dialect = if client.dialect == Dialect::Anthropic {
            provider
                .speaks_anthropic()
                .then_some(Passthrough::Anthropic)
        } else if client.dialect == Dialect::OpenAi {
            provider.passthrough_stream().then_some(Passthrough::OpenAi)
        } else {
            None
        };
        let passthrough = match same_dialect {
            Some(p) if passthrough_ok => p,
            _ => Passthrough::Off,
        };
        let deadline = Instant::now() + entry.timeouts.total;
        let resp = self.send(entry, provider, up, deadline, trace).await?;
        if req.stream {
            let mut stream = ChunkStream::http(
                resp,
                provider.stream_decoder(&target.model),
                passthrough,
                entry.name.clone(),
                StreamLimits {
                    deadline,
                    total: entry.timeouts.total,
                    idle: entry.timeouts.stream_idle,
                },
            );
            // Read the first item before committing to this target.
            let first_deadline = (Instant::now() + entry.timeouts.first_byte).min(deadline);
            match timeout_at(first_deadline.into(), stream.prefetch()).await {
                Err(_) => Err(AttemptError::retryable(
                    "timeout",
                    GatewayError::UpstreamTimeout {
                        provider: entry.name.clone(),
                        phase: "first byte",
                    },
                )),
                Ok(Err(e)) => {
                    let kind = match e {
                        GatewayError::UpstreamTimeout { .. } => "timeout",
                        _ => STREAM_BROKEN,
                    };
                    Err(AttemptError::retryable(kind, e))
                }
                Ok(Ok(())) => {
                    // The first event is the stream's first byte.
                    trace.first_byte(trace.status);
                    Ok(Answer::Stream(Box::new(stream)))
                }
            }
        } else {
            let body = read_body(entry, resp, deadline).await?;
            if passthrough != Passthrough::Off {
                // Same dialect both ways and nobody looks: forward the bytes, read only usage.
                let peeked = if passthrough == Passthrough::Anthropic {
                    crate::provider::anthropic::peek_message(&body)
                } else {
                    crate::provider::openai::peek_chat_response(&body)
                };
                return peeked
                    .map(|usage| Answer::Raw { body, usage })
                    .map_err(|e| translate_error(entry, e));
            }
            provider
                .chat_response(&body, &target.model)
                .map(Answer::Json)
                .map_err(|e| translate_error(entry, e))
        }
    }

    async fn embeddings_once(
        &self,
        req: &EmbeddingsRequest,
        target: &Target,
        trace: &mut Trace,
    ) -> Result<EmbeddingsResponse, AttemptError> {
        let entry = &target.provider;
        let provider = match &entry.imp {
            ProviderImpl::Mock(mock) => {
                trace.first_byte(200);
                return Ok(mock.embeddings(req, &target.model));
            }
            ProviderImpl::Http(p) => p.as_ref(),
        };
        let up = provider
            .embeddings_request(req, &target.model)
            .map_err(|e| translate_error(entry, e))?;
        let deadline = Instant::now() + entry.timeouts.total;
        let resp = self.send(entry, provider, up, deadline, trace).await?;
        let body = read_body(entry, resp, deadline).await?;
        provider
            .embeddings_response(&body, &target.model)
            .map_err(|e| translate_error(entry, e))
    }

    /// Sends the request and waits for a 2xx status within the first-byte timeout.
    async fn send(
        &self,
        entry: &ProviderEntry,
        provider: &dyn Provider,
        up: UpstreamRequest,
        deadline: Instant,
        trace: &mut Trace,
    ) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
        let client = self.clients.get(&entry.name).ok_or_else(|| {
            AttemptError::fatal(
                "internal",
                GatewayError::Internal(format!("no HTTP client for provider {}", entry.name)),
            )
        })?;
        let first_deadline = (Instant::now() + entry.timeouts.first_byte).min(deadline);
        let send = client.post(&up.url, up.headers, up.body);
        let resp = match timeout_at(first_deadline.into(), send).await {
            Err(_) => {
                return Err(AttemptError::retryable(
                    "timeout",
                    GatewayError::UpstreamTimeout {
                        provider: entry.name.clone(),
                        phase: "first byte",
                    },
                ));
            }
            Ok(Err(e)) => {
                let kind = if e.is_timeout() { "timeout" } else { "connect" };
                return Err(AttemptError::retryable(kind, request_error(entry, &e)));
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        trace.first_byte(status.as_u16());
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers(), std::time::SystemTime::now());
        let body = read_error_body(resp, deadline).await;
        let message = provider
            .error_message(&body)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(512).collect());
        let retryable = status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error();
        if status.is_server_error() {
            return Err(AttemptError::retryable(
                "status",
                GatewayError::UpstreamFailed {
                    provider: entry.name.clone(),
                    reason: format!("status {}: {message}", status.as_u16()),
                },
            )
            .with_retry_after(retry_after));
        }
        let err = GatewayError::UpstreamStatus {
            provider: entry.name.clone(),
            status,
            message,
            retry_after,
        };
        Err(if retryable {
            AttemptError::retryable("status", err).with_retry_after(retry_after)
        } else {
            AttemptError::fatal("status", err)
        })
    }
}

/// Reads a whole 2xx body before the deadline, up to the provider's `max_response_bytes`.
async fn read_body(
    entry: &ProviderEntry,
    resp: http::Response<hyper::body::Incoming>,
    deadline: Instant,
) -> Result<Bytes, AttemptError> {
    let limit = entry.max_response_bytes;
    match timeout_at(deadline.into(), client::read_limited(resp, limit)).await {
        Err(_) => Err(AttemptError::retryable(
            "timeout",
            GatewayError::UpstreamTimeout {
                provider: entry.name.clone(),
                phase: "total",
            },
        )),
        Ok(Err(HttpError::TooLarge(limit))) => {
            tracing::warn!(
                provider = %entry.name,
                max_response_bytes = limit,
                "Upstream answer exceeds max_response_bytes; not read further."
            );
            Err(AttemptError::next_target(
                "too_large",
                GatewayError::UpstreamFailed {
                    provider: entry.name.clone(),
                    reason: format!("answer exceeds max_response_bytes ({limit} bytes)"),
                },
            ))
        }
        Ok(Err(e)) => Err(AttemptError::retryable("body", request_error(entry, &e))),
        Ok(Ok(b)) => Ok(b),
    }
}

/// How long an upstream asked to wait: `retry-after-ms` (Azure OpenAI, OpenAI), else
/// `Retry-After` as delay-seconds or an HTTP-date (a date in the past is no wait). `None`
/// when absent or unreadable.
fn retry_after(headers: &http::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Duration::from_millis(ms));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads at most [`MAX_ERROR_BODY`] bytes of an error body; gives up quietly at the deadline.
async fn read_error_body(
    resp: http::Response<hyper::body::Incoming>,
    deadline: Instant,
) -> Vec<u8> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(chunk)) = client::next_chunk(&mut body).await {
            out.extend_from_slice(&chunk);
            if out.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    let cap = (Instant::now() + Duration::from_secs(5)).min(deadline);
    let _ = timeout_at(cap.into(), read).await;
    out
}

/// Maps an HTTP client error (never carrying the URL: it may hold a key in its query).
pub(crate) fn request_error(entry: &ProviderEntry, e: &HttpError) -> GatewayError {
    if e.is_timeout() {
        return GatewayError::UpstreamTimeout {
            provider: entry.name.clone(),
            phase: "connect",
        };
    }
    GatewayError::UpstreamFailed {
        provider: entry.name.clone(),
        reason: e.to_string(),
    }
}

fn translate_error(entry: &ProviderEntry, e: ProviderError) -> AttemptError {
    match e {
        ProviderError::Unsupported(m) => {
            AttemptError::next_target("unsupported", GatewayError::Unsupported(m))
        }
        ProviderError::InvalidResponse(m) | ProviderError::StreamError(m) => {
            AttemptError::next_target(
                "invalid_response",
                GatewayError::UpstreamFailed {
                    provider: entry.name.clone(),
                    reason: m,
                },
            )
        }
    }
}

/// Records one attempt: appends it to the request's `log` and gives its outcome to the
/// target's statistics. A served stream's attempt (`open_stream`) is returned still in
/// flight instead, for the stream's end to finish.
fn settle(
    target: &Target,
    trace: &Trace,
    error: Option<&AttemptError>,
    in_flight: InFlight,
    open_stream: bool,
    log: &mut Vec<AttemptRecord>,
) -> Option<OpenAttempt> {
    let latency = match error {
        None => trace.first_byte.unwrap_or_else(|| trace.started.elapsed()),
        Some(_) => trace.started.elapsed(),
    };
    log.push(AttemptRecord {
        provider: target.provider.name.clone(),
        target_model: target.model.clone(),
        status: trace.status,
        latency_ms: millis(latency),
        error: error.map(|e| e.kind.to_owned()),
    });
    match error {
        None if open_stream => {
            return Some(OpenAttempt {
                in_flight,
                first_byte: latency,
            });
        }
        None => in_flight.finish(latency, true),
        Some(e) if e.blames_target(trace.status) => in_flight.finish(latency, false),
        // Says nothing about the target: only leaves the in-flight count.
        Some(_) => drop(in_flight),
    }
    None
}

/// A stream item error (after the stream was committed) as a gateway error.
pub(crate) fn stream_item_error(provider: &str, e: ProviderError) -> GatewayError {
    GatewayError::UpstreamFailed {
        provider: provider.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target() -> Target {
        let cfg = crate::config::Config::from_toml(
            std::path::Path::new("weir.toml"),
            "[providers.p]\nkind = \"mock\"\n\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"p\", model = \"up-m\" }]\n",
        )
        .unwrap();
        cfg.models["m"].targets[0].clone()
    }

    fn trace(status: u16) -> Trace {
        let mut t = Trace::start();
        if status != 0 {
            t.first_byte(status);
        }
        t
    }

    fn failure(kind: &'static str) -> AttemptError {
        AttemptError::retryable(kind, GatewayError::Internal("test".into()))
    }

    #[test]
    fn every_attempt_is_recorded_and_fed_to_the_target_stats() {
        let stats = TargetStats::default();
        let t = target();
        let mut log = Vec::new();
        let in_flight = stats.start("p", "up-m");
        assert!(
            settle(
                &t,
                &trace(0),
                Some(&failure("connect")),
                in_flight,
                false,
                &mut log
            )
            .is_none()
        );
        let in_flight = stats.start("p", "up-m");
        assert!(settle(&t, &trace(200), None, in_flight, false, &mut log).is_none());
        assert_eq!(
            log.iter()
                .map(|a| (
                    a.provider.as_str(),
                    a.target_model.as_str(),
                    a.status,
                    a.error.as_deref()
                ))
                .collect::<Vec<_>>(),
            vec![("p", "up-m", 0, Some("connect")), ("p", "up-m", 200, None)]
        );
        let s = stats.get("p", "up-m").unwrap();
        assert_eq!((s.attempts, s.in_flight), (2, 0));
        assert!((s.error_rate - 0.1 * 0.9).abs() < 1e-9, "{}", s.error_rate);
    }

    #[test]
    fn the_requests_own_faults_do_not_count_against_the_target() {
        let stats = TargetStats::default();
        let t = target();
        let mut log = Vec::new();
        for (status, kind) in [(400, "status"), (422, "status"), (0, "unsupported")] {
            let in_flight = stats.start("p", "up-m");
            settle(
                &t,
                &trace(status),
                Some(&failure(kind)),
                in_flight,
                false,
                &mut log,
            );
        }
        let s = stats.get("p", "up-m").unwrap();
        assert_eq!((s.attempts, s.in_flight, s.error_rate), (0, 0, 0.0));
        assert_eq!(log.len(), 3, "they are still in the request's attempts");
        for (status, kind) in [
            (503, "status"),
            (429, "status"),
            (401, "status"),
            (200, "invalid_response"),
        ] {
            let in_flight = stats.start("p", "up-m");
            settle(
                &t,
                &trace(status),
                Some(&failure(kind)),
                in_flight,
                false,
                &mut log,
            );
        }
        assert_eq!(stats.get("p", "up-m").unwrap().attempts, 4);
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        use std::time::SystemTime;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        assert_eq!(retry_after(&headers(&[]), now), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", " 7 ")]), now),
            Some(Duration::from_secs(7))
        );
        let in_30s = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &in_30s)]), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "1"), ("retry-after-ms", "2500")]),
                now
            ),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")]), now), None);
    }

    #[test]
    fn a_served_stream_stays_in_flight_until_finished() {
        let stats = TargetStats::default();
        let t = target();
        let mut log = Vec::new();
        let in_flight = stats.start("p", "up-m");
        let open = settle(&t, &trace(200), None, in_flight, true, &mut log).unwrap();
        let s = stats.get("p", "up-m").unwrap();
        assert_eq!((s.attempts, s.in_flight), (0, 1));
        assert_eq!(log[0].error, None);
        open.finish(false);
        let s = stats.get("p", "up-m").unwrap();
        assert_eq!((s.attempts, s.in_flight), (1, 0));
        assert!(s.error_rate > 0.0);
    }
}
