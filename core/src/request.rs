//! [`RequestCtx`]: everything the pipeline and the plugins know about one request.
//!
//! A leaf module (it depends on the wire types of [`crate::api`] only), so that the
//! pipeline and the plugin chain both use it without importing each other.

use std::collections::BTreeMap;
use std::time::Instant;

use http::HeaderMap;

use crate::api::openai::{ChatRequest, EmbeddingsRequest};
use crate::plugin::contract::PluginDecision;

/// The API dialect the client spoke; errors and responses are encoded back in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1/chat/completions`, `/v1/embeddings`.
    OpenAi,
    /// `/v1/messages`.
    Anthropic,
    /// `/v1/responses`, the OpenAI Responses API. Errors are OpenAI-shaped; plugins see the
    /// request as an OpenAI chat request.
    Responses,
}

impl Dialect {
    /// Label for logs and plugins.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Responses => "responses",
        }
    }

    /// The dialect of errors for a request path: Anthropic's under `/v1/messages`, OpenAI's
    /// everywhere else (the Responses API's errors are OpenAI's).
    pub fn for_path(path: &str) -> Dialect {
        let anthropic = path
            .strip_prefix("/v1/messages")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']));
        if anthropic {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// The request body, parsed once into the canonical form.
#[derive(Debug, Clone)]
pub enum Body {
    /// A chat completion (from either dialect).
    Chat(ChatRequest),
    /// An embeddings request.
    Embeddings(EmbeddingsRequest),
}

impl Default for Body {
    /// An empty chat request (what is left in a context while a hook reads the body).
    fn default() -> Self {
        Body::Chat(ChatRequest::default())
    }
}

impl Body {
    /// The model the body asks for.
    pub fn model(&self) -> &str {
        match self {
            Body::Chat(c) => &c.model,
            Body::Embeddings(e) => &e.model,
        }
    }

    /// Whether the client asked for a stream.
    pub fn stream(&self) -> bool {
        matches!(self, Body::Chat(c) if c.stream)
    }
}

/// A target chosen by a plugin (routing): a provider name from config and an upstream model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOverride {
    /// A name from `[providers]`.
    pub provider: String,
    /// The upstream model name.
    pub model: String,
}

/// Per-request state shared by the pipeline phases and the plugins, in order.
#[derive(Debug)]
pub struct RequestCtx {
    /// `x-request-id`, accepted from the client or generated.
    pub request_id: String,
    /// Inbound dialect.
    pub dialect: Dialect,
    /// When the gateway received the request.
    pub started: Instant,
    /// Inbound headers; plugins may add or remove (e.g. strip the client's key).
    pub headers: HeaderMap,
    /// The canonical body; plugins may rewrite it (redaction, model change).
    pub body: Body,
    /// The client's body bytes, kept while they still say what `body` says (an OpenAI-dialect
    /// chat request no plugin changed), so an OpenAI-compatible upstream can be sent them
    /// with only the model replaced instead of a re-encoding. Cleared by any body mutation.
    pub client_body: Option<bytes::Bytes>,
    /// Targets set by a plugin; `None` means the model's configured targets.
    pub targets: Option<Vec<TargetOverride>>,
    /// Request-scoped key-value bag shared by the plugins of one request (`tenant`, `key`...).
    pub metadata: BTreeMap<String, String>,
    /// Each plugin's private request scratch (WIT `scratch-get` / `scratch-set`).
    pub scratch: Scratch,
    /// What each `on-request` plugin decided, in chain order (for the request log).
    pub decisions: Vec<PluginDecision>,
}

/// The request-scoped scratch of every plugin instance of a chain, by the instance's
/// position in it: private to the plugin, never logged, dropped with the request.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    slots: Vec<BTreeMap<String, Vec<u8>>>,
}

impl Scratch {
    /// The scratch of the instance at `position` in its chain.
    pub fn slot(&mut self, position: usize) -> &mut BTreeMap<String, Vec<u8>> {
        if self.slots.len() <= position {
            self.slots.resize_with(position + 1, BTreeMap::new);
        }
        &mut self.slots[position]
    }

    /// Bytes held, over every slot (for limits and tests).
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .flat_map(|s| s.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum()
    }
}
