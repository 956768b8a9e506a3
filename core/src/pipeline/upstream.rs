//! Sending a request upstream: timeouts, retries with backoff, and fallback across targets.
//!
//! The rule: retry and fall back on connect errors, timeouts, 408, 429 and 5xx, and on a 2xx
//! the gateway cannot use (garbage JSON, a stream that breaks before its first event), but
//! only **before the first byte reaches the client**. For streams that means the first event
//! is read here, before the response is committed; after that, a failure ends the stream with
//! an error event instead.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::time::timeout_at;

use super::client::{self, HttpClient, HttpError};
use super::error::GatewayError;
use super::stream::ChunkStream;
use crate::api::openai::{ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};
use crate::config::{ProviderEntry, Retry, Target};
use crate::provider::{Provider, ProviderError, ProviderImpl, UpstreamRequest};
use crate::telemetry::Metrics;

/// Largest upstream error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// One failed attempt and whether another attempt may help.
struct AttemptError {
    error: GatewayError,
    /// Retry the same target (after backoff).
    retry_same: bool,
    /// Try the next target.
    fall_back: bool,
}

impl AttemptError {
    fn retryable(error: GatewayError) -> Self {
        AttemptError {
            error,
            retry_same: true,
            fall_back: true,
        }
    }
    fn next_target(error: GatewayError) -> Self {
        AttemptError {
            error,
            retry_same: false,
            fall_back: true,
        }
    }
    fn fatal(error: GatewayError) -> Self {
        AttemptError {
            error,
            retry_same: false,
            fall_back: false,
        }
    }
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
}

/// The upstream side of the pipeline: shared HTTP clients and the retry policy.
pub struct Upstream<'a> {
    /// HTTP client per provider name (one pool per provider, with its connect timeout).
    pub clients: &'a std::collections::HashMap<String, HttpClient>,
    /// Retry policy.
    pub retry: Retry,
    /// Metrics.
    pub metrics: &'a Metrics,
}

impl Upstream<'_> {
    /// Runs a chat request over `targets` in order. `req.model` is rewritten per target.
    /// `client_body` is the client's own bytes of `req` when no plugin changed it (see
    /// [`crate::pipeline::RequestCtx::client_body`]).
    pub async fn chat(
        &self,
        req: &mut ChatRequest,
        client_body: Option<&[u8]>,
        targets: &[Target],
        passthrough_ok: bool,
    ) -> Result<Served<ChatResponse>, GatewayError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last: Option<GatewayError> = None;
        for target in targets {
            req.model.clone_from(&target.model);
            for attempt in 0..self.retry.attempts_per_target {
                if attempt > 0 {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                attempts += 1;
                let result = self
                    .chat_once(req, client_body, target, passthrough_ok)
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
                        return Ok(Served {
                            target: target.clone(),
                            answer,
                            upstream_time,
                            attempts,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(
                            provider = %target.provider.name,
                            model = %target.model,
                            attempt = attempt + 1,
                            error = %e.error,
                            "Upstream attempt failed."
                        );
                        let (retry_same, fall_back) = (e.retry_same, e.fall_back);
                        last = Some(e.error);
                        if !fall_back {
                            return Err(
                                last.unwrap_or_else(|| GatewayError::Internal("no attempt".into()))
                            );
                        }
                        if !retry_same {
                            break;
                        }
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| GatewayError::Internal("model has no targets".into())))
    }

    /// Runs an embeddings request over `targets` in order.
    pub async fn embeddings(
        &self,
        req: &mut EmbeddingsRequest,
        targets: &[Target],
    ) -> Result<Served<EmbeddingsResponse>, GatewayError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last: Option<GatewayError> = None;
        for target in targets {
            req.model.clone_from(&target.model);
            for attempt in 0..self.retry.attempts_per_target {
                if attempt > 0 {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                attempts += 1;
                let result = self.embeddings_once(req, target).await;
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
                        return Ok(Served {
                            target: target.clone(),
                            answer: Answer::Json(resp),
                            upstream_time: started.elapsed(),
                            attempts,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(provider = %target.provider.name, error = %e.error, "Upstream attempt failed.");
                        let (retry_same, fall_back) = (e.retry_same, e.fall_back);
                        last = Some(e.error);
                        if !fall_back {
                            return Err(
                                last.unwrap_or_else(|| GatewayError::Internal("no attempt".into()))
                            );
                        }
                        if !retry_same {
                            break;
                        }
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| GatewayError::Internal("model has no targets".into())))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.retry
            .backoff
            .saturating_mul(factor)
            .min(self.retry.max_backoff)
    }

    async fn chat_once(
        &self,
        req: &ChatRequest,
        client_body: Option<&[u8]>,
        target: &Target,
        passthrough_ok: bool,
    ) -> Result<Answer<ChatResponse>, AttemptError> {
        let entry = &target.provider;
        let provider = match &entry.imp {
            ProviderImpl::Mock(mock) => {
                let latency = mock.latency();
                if req.stream {
                    return Ok(Answer::Stream(Box::new(ChunkStream::mock(
                        mock.stream(req, &target.model),
                        latency,
                    ))));
                }
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                return Ok(Answer::Json(mock.chat(req, &target.model)));
            }
            ProviderImpl::Http(p) => p.as_ref(),
        };
        let up = client_body
            .and_then(|raw| provider.chat_request_from_client_body(raw, req, &target.model))
            .unwrap_or_else(|| provider.chat_request(req, &target.model))
            .map_err(|e| translate_error(entry, e))?;
        let deadline = Instant::now() + entry.timeouts.total;
        let resp = self.send(entry, provider, up, deadline).await?;
        if req.stream {
            let passthrough = passthrough_ok && provider.passthrough_stream();
            let mut stream = ChunkStream::http(
                resp,
                provider.stream_decoder(&target.model),
                passthrough,
                entry.name.clone(),
                deadline,
                entry.timeouts.total,
            );
            // Read the first item before committing to this target.
            let first_deadline = (Instant::now() + entry.timeouts.first_byte).min(deadline);
            match timeout_at(first_deadline.into(), stream.prefetch()).await {
                Err(_) => Err(AttemptError::retryable(GatewayError::UpstreamTimeout {
                    provider: entry.name.clone(),
                    phase: "first byte",
                })),
                Ok(Err(e)) => Err(AttemptError::retryable(e)),
                Ok(Ok(())) => Ok(Answer::Stream(Box::new(stream))),
            }
        } else {
            let body = read_body(entry, resp, deadline).await?;
            if passthrough_ok && provider.passthrough_stream() {
                // Same dialect both ways and nobody looks: forward the bytes, read only usage.
                return crate::provider::openai::peek_chat_response(&body)
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
    ) -> Result<EmbeddingsResponse, AttemptError> {
        let entry = &target.provider;
        let provider = match &entry.imp {
            ProviderImpl::Mock(mock) => return Ok(mock.embeddings(req, &target.model)),
            ProviderImpl::Http(p) => p.as_ref(),
        };
        let up = provider
            .embeddings_request(req, &target.model)
            .map_err(|e| translate_error(entry, e))?;
        let deadline = Instant::now() + entry.timeouts.total;
        let resp = self.send(entry, provider, up, deadline).await?;
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
    ) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
        let client = self.clients.get(&entry.name).ok_or_else(|| {
            AttemptError::fatal(GatewayError::Internal(format!(
                "no HTTP client for provider {}",
                entry.name
            )))
        })?;
        let first_deadline = (Instant::now() + entry.timeouts.first_byte).min(deadline);
        let send = client.post(&up.url, up.headers, up.body);
        let resp = match timeout_at(first_deadline.into(), send).await {
            Err(_) => {
                return Err(AttemptError::retryable(GatewayError::UpstreamTimeout {
                    provider: entry.name.clone(),
                    phase: "first byte",
                }));
            }
            Ok(Err(e)) => return Err(AttemptError::retryable(request_error(entry, &e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_error_body(resp, deadline).await;
        let message = provider
            .error_message(&body)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(512).collect());
        let retryable = status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error();
        if status.is_server_error() {
            return Err(AttemptError::retryable(GatewayError::UpstreamFailed {
                provider: entry.name.clone(),
                reason: format!("status {}: {message}", status.as_u16()),
            }));
        }
        let err = GatewayError::UpstreamStatus {
            provider: entry.name.clone(),
            status,
            message,
        };
        Err(if retryable {
            AttemptError::retryable(err)
        } else {
            AttemptError::fatal(err)
        })
    }
}

/// Reads a whole 2xx body before the deadline.
async fn read_body(
    entry: &ProviderEntry,
    resp: http::Response<hyper::body::Incoming>,
    deadline: Instant,
) -> Result<Bytes, AttemptError> {
    match timeout_at(deadline.into(), client::read_all(resp.into_body())).await {
        Err(_) => Err(AttemptError::retryable(GatewayError::UpstreamTimeout {
            provider: entry.name.clone(),
            phase: "total",
        })),
        Ok(Err(e)) => Err(AttemptError::retryable(request_error(entry, &e))),
        Ok(Ok(b)) => Ok(b),
    }
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
        ProviderError::Unsupported(m) => AttemptError::next_target(GatewayError::Unsupported(m)),
        ProviderError::InvalidResponse(m) | ProviderError::StreamError(m) => {
            AttemptError::next_target(GatewayError::UpstreamFailed {
                provider: entry.name.clone(),
                reason: m,
            })
        }
    }
}

/// A stream item error (after the stream was committed) as a gateway error.
pub(crate) fn stream_item_error(provider: &str, e: ProviderError) -> GatewayError {
    GatewayError::UpstreamFailed {
        provider: provider.to_owned(),
        reason: e.to_string(),
    }
}
