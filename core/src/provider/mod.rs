//! Providers: one file per upstream dialect, all behind the [`Provider`] trait.
//!
//! A provider is pure translation: it turns Weir's canonical request (the OpenAI shape in
//! [`crate::api::openai`]) into an [`UpstreamRequest`] and the upstream's answer back into the
//! canonical response or stream chunks. It never does I/O; [`crate::pipeline`] sends what the
//! provider builds, with timeouts, retries and fallback. The one exception is [`mock`], which
//! answers in-process for offline work (see its docs).
//!
//! The registry is the closed enum [`ProviderKind`] plus [`build`]: "where is X registered" is
//! one grep.

pub mod anthropic;
pub mod azure;
pub mod gemini;
#[cfg(test)]
mod golden;
pub mod mock;
pub mod openai;

use bytes::Bytes;
use http::HeaderMap;

use crate::api::openai::{
    ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse,
};
use crate::api::sse::SseEvent;
use crate::config::{ConfigError, ProviderEntry, TimeoutsConfig};

/// `[providers.NAME]`: the `kind` key picks the dialect, the rest is that provider's config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// OpenAI or any OpenAI-compatible server.
    Openai(openai::OpenAiConfig),
    /// Azure OpenAI.
    Azure(azure::AzureConfig),
    /// Anthropic Messages API.
    Anthropic(anthropic::AnthropicConfig),
    /// Google Gemini (generateContent).
    Gemini(gemini::GeminiConfig),
    /// In-process responder for offline work and tests.
    Mock(mock::MockConfig),
}

/// The dialect of a provider, for logs and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `openai`
    OpenAi,
    /// `azure`
    Azure,
    /// `anthropic`
    Anthropic,
    /// `gemini`
    Gemini,
    /// `mock`
    Mock,
}

impl ProviderKind {
    /// The config name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Mock => "mock",
        }
    }
}

/// A live provider: an HTTP dialect, or the in-process mock.
pub enum ProviderImpl {
    /// Sent over HTTP by the pipeline.
    Http(Box<dyn Provider>),
    /// Answered in-process.
    Mock(mock::Mock),
}

/// Builds a provider from its config. The registry: one arm per kind.
pub fn build(name: &str, cfg: &ProviderConfig) -> Result<ProviderEntry, ConfigError> {
    let (kind, imp, timeouts, max_response_bytes): (
        ProviderKind,
        ProviderImpl,
        &TimeoutsConfig,
        u64,
    ) = match cfg {
        ProviderConfig::Openai(c) => (
            ProviderKind::OpenAi,
            ProviderImpl::Http(Box::new(openai::OpenAi::new(name, c)?)),
            &c.timeouts,
            c.max_response_bytes,
        ),
        ProviderConfig::Azure(c) => (
            ProviderKind::Azure,
            ProviderImpl::Http(Box::new(azure::Azure::new(name, c)?)),
            &c.timeouts,
            c.max_response_bytes,
        ),
        ProviderConfig::Anthropic(c) => (
            ProviderKind::Anthropic,
            ProviderImpl::Http(Box::new(anthropic::Anthropic::new(name, c)?)),
            &c.timeouts,
            c.max_response_bytes,
        ),
        ProviderConfig::Gemini(c) => (
            ProviderKind::Gemini,
            ProviderImpl::Http(Box::new(gemini::Gemini::new(name, c)?)),
            &c.timeouts,
            c.max_response_bytes,
        ),
        ProviderConfig::Mock(c) => (
            ProviderKind::Mock,
            ProviderImpl::Mock(mock::Mock::new(name, c)?),
            &c.timeouts,
            // Answers in-process: nothing is read.
            crate::config::file::DEFAULT_MAX_RESPONSE_BYTES,
        ),
    };
    if max_response_bytes == 0 {
        return Err(ConfigError::invalid(
            format!("providers.{name}.max_response_bytes"),
            "must be greater than 0",
        ));
    }
    Ok(ProviderEntry {
        name: name.to_owned(),
        kind,
        imp,
        timeouts: crate::config::Timeouts::from_config(name, timeouts)?,
        max_response_bytes: usize::try_from(max_response_bytes).unwrap_or(usize::MAX),
    })
}

/// Error from a provider's translation code.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The canonical request cannot be expressed in this provider's dialect (e.g. embeddings
    /// on Anthropic). Becomes a 400 for the client.
    #[error("{0}")]
    Unsupported(String),
    /// The upstream answered 2xx with a body we cannot read. Becomes a 502.
    #[error("upstream sent an invalid response: {0}")]
    InvalidResponse(String),
    /// The upstream reported an error inside a 2xx stream (Anthropic `error` event, ...).
    #[error("upstream stream error: {0}")]
    StreamError(String),
}

/// An HTTP request to send upstream. Always a POST of a JSON body.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Full URL.
    pub url: String,
    /// Headers, credentials included. Never logged.
    pub headers: HeaderMap,
    /// JSON body.
    pub body: Bytes,
}

/// What a [`StreamDecoder`] made of one upstream event.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    /// Canonical chunks to send on, in order.
    pub chunks: Vec<ChatChunk>,
    /// The upstream said the stream is complete (OpenAI `[DONE]`, Anthropic `message_stop`).
    pub done: bool,
}

/// Turns one provider's streamed events into canonical [`ChatChunk`]s. One decoder per
/// response; it may keep state (Anthropic content-block indexes, tool-call counters).
pub trait StreamDecoder: Send {
    /// Decodes one server-sent event.
    fn decode(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError>;

    /// Called when the upstream body ends. Returns chunks still held (if any), or an error if
    /// the stream ended before the dialect's completion marker in a way that loses data.
    fn finish(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        Ok(Vec::new())
    }
}

/// The translation contract every HTTP provider implements.
///
/// `model` arguments are the upstream model name from the target (not the client's alias).
pub trait Provider: Send + Sync {
    /// Builds the upstream chat request. `req.stream` says whether to ask for a stream.
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError>;

    /// Parses a 2xx non-streaming chat response body.
    fn chat_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError>;

    /// A fresh decoder for a streamed chat response.
    fn stream_decoder(&self, model: &str) -> Box<dyn StreamDecoder>;

    /// Builds the upstream embeddings request.
    fn embeddings_request(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError>;

    /// Parses a 2xx embeddings response body.
    fn embeddings_response(
        &self,
        body: &[u8],
        model: &str,
    ) -> Result<EmbeddingsResponse, ProviderError>;

    /// The upstream request built from the client's own OpenAI-dialect body bytes, when the
    /// parsed `req` differs from them only by what the pipeline sets (`model`, and
    /// `stream_options` for a stream). `None` (the default) means "use [`Provider::chat_request`]".
    /// Only providers that speak OpenAI implement it: copying the client's bytes is cheaper
    /// than encoding the request again.
    fn chat_request_from_client_body(
        &self,
        _raw: &[u8],
        _req: &ChatRequest,
        _model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        None
    }

    /// The upstream request built from the client's own Anthropic Messages body bytes, when
    /// no plugin changed the request: lossless (thinking, server tools, `cache_control`,
    /// unknown fields all stay). `None` (the default) means "use [`Provider::chat_request`]".
    /// Only the Anthropic provider implements it.
    fn chat_request_from_anthropic_body(
        &self,
        _raw: &[u8],
        _req: &ChatRequest,
        _model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        None
    }

    /// Copies the client headers this provider forwards (Anthropic: `anthropic-version`,
    /// `anthropic-beta`) onto an upstream request's headers. Default: none.
    fn forward_client_headers(&self, _client: &http::HeaderMap, _upstream: &mut http::HeaderMap) {}

    /// The upstream request that counts a chat request's input tokens (`count_tokens`),
    /// when the provider has such an API; `raw` is the client's Anthropic body while no
    /// plugin changed it. `None` (the default): Weir estimates with a tokenizer.
    fn count_tokens_request(
        &self,
        _raw: Option<&[u8]>,
        _req: &ChatRequest,
        _model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        None
    }

    /// Reads the input-token count from a 2xx answer to [`Provider::count_tokens_request`].
    fn count_tokens_response(&self, _body: &[u8]) -> Result<u64, ProviderError> {
        Err(ProviderError::Unsupported(
            "this provider has no token counting API".to_owned(),
        ))
    }

    /// Whether upstream answers are Anthropic Messages documents and events, so the pipeline
    /// may forward them untouched to an Anthropic client no plugin watches.
    fn speaks_anthropic(&self) -> bool {
        false
    }

    /// Extracts a human-readable message from an upstream error body (non-2xx), for logs and
    /// for the client's error message. Default: the OpenAI `{"error":{"message":..}}` shape.
    fn error_message(&self, body: &[u8]) -> Option<String> {
        openai_error_message(body)
    }

    /// Whether upstream answers are already canonical OpenAI documents (chat completions and
    /// their stream chunks), so the pipeline may forward the upstream bytes untouched when the
    /// client speaks OpenAI and no plugin needs to see them.
    fn passthrough_stream(&self) -> bool {
        false
    }
}

/// Reads `error.message` (or a top-level `message`) from a JSON error body.
pub fn openai_error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("error").filter(|e| e.is_string()))?;
    msg.as_str().map(str::to_owned)
}

/// Current Unix time in seconds, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
