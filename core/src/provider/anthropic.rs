//! `anthropic`: the Anthropic Messages API (`POST /v1/messages`).
//!
//! Translation in both directions between Weir's canonical OpenAI shape and Anthropic's:
//!
//! - requests: system/developer messages become the top-level `system`; user, assistant and
//!   tool messages become content blocks (`text`, `image`, `document`, `tool_use`,
//!   `tool_result`), with consecutive same-role messages merged because Anthropic requires
//!   the roles to alternate;
//! - responses: text blocks are joined into `content`, `tool_use` blocks become `tool_calls`,
//!   `thinking` blocks become the canonical `reasoning` (streamed: `reasoning_content`);
//! - streams: [`AnthropicDecoder`] is a small state machine over the named events
//!   (`message_start`, `content_block_*`, `message_delta`, `message_stop`).
//!
//! Golden tests pin every translation; fixtures live in `tests/golden/anthropic/provider/`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};

use super::{Decoded, Provider, ProviderError, StreamDecoder, UpstreamRequest};
use crate::api::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, Choice, ChunkChoice, ContentPart, Delta,
    EmbeddingsRequest, EmbeddingsResponse, FunctionCall, FunctionCallDelta, MessageContent,
    PromptTokensDetails, Reasoning, ToolCall, ToolCallDelta, Usage,
};
use crate::api::sse::SseEvent;
use crate::config::{ConfigError, TimeoutsConfig};

/// `[providers.NAME]` with `kind = "anthropic"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicConfig {
    /// Base URL without `/v1` (Weir appends `/v1/messages`). Default
    /// `https://api.anthropic.com`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// API key sent as the `x-api-key` header. Optional for proxies that add their own.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Value of the `anthropic-version` header. Default `2023-06-01`.
    #[serde(default = "default_version")]
    pub version: String,
    /// `max_tokens` sent when the client gave none (Anthropic requires it). Default 4096.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Extra headers sent on every request (`anthropic-beta`, ...).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts and connection settings.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Largest non-streamed 2xx answer (chat or embeddings) read from this provider, in
    /// bytes; a larger one is not read further and the client gets a 502. Default 32 MiB.
    #[serde(default = "crate::config::file::default_max_response_bytes")]
    pub max_response_bytes: u64,
}

fn default_base_url() -> String {
    "https://api.anthropic.com".to_owned()
}

fn default_version() -> String {
    "2023-06-01".to_owned()
}

fn default_max_tokens() -> u32 {
    4096
}

/// A live `anthropic` provider.
#[derive(Debug)]
pub struct Anthropic {
    base_url: String,
    headers: HeaderMap,
    default_max_tokens: u32,
}

impl Anthropic {
    /// Builds the provider, validating URL, version, key and headers.
    pub fn new(name: &str, cfg: &AnthropicConfig) -> Result<Self, ConfigError> {
        let base_url = crate::config::validate_base_url(name, &cfg.base_url)?;
        if cfg.default_max_tokens == 0 {
            return Err(ConfigError::invalid(
                format!("providers.{name}.default_max_tokens"),
                "must be greater than 0",
            ));
        }
        let mut headers = super::openai::header_map(name, &cfg.headers)?;
        let version = HeaderValue::from_str(&cfg.version).map_err(|_| {
            ConfigError::invalid(
                format!("providers.{name}.version"),
                "contains characters not allowed in a header",
            )
        })?;
        headers.insert("anthropic-version", version);
        if let Some(key) = cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
            let mut v = HeaderValue::from_str(key).map_err(|_| {
                ConfigError::invalid(
                    format!("providers.{name}.api_key"),
                    "contains characters not allowed in a header",
                )
            })?;
            v.set_sensitive(true);
            headers.insert("x-api-key", v);
        }
        Ok(Anthropic {
            base_url,
            headers,
            default_max_tokens: cfg.default_max_tokens,
        })
    }
}

impl Provider for Anthropic {
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        let body = to_messages_body(req, model, self.default_max_tokens)?;
        let body = serde_json::to_vec(&body)
            .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))?;
        Ok(UpstreamRequest {
            url: format!("{}/v1/messages", self.base_url),
            headers: self.headers.clone(),
            body: Bytes::from(body),
        })
    }

    fn chat_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError> {
        parse_message(body, model, super::unix_now())
    }

    fn chat_request_from_anthropic_body(
        &self,
        raw: &[u8],
        _req: &ChatRequest,
        model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        Some(
            splice_messages_body(raw, model).map(|body| UpstreamRequest {
                url: format!("{}/v1/messages", self.base_url),
                headers: self.headers.clone(),
                body,
            }),
        )
    }

    fn forward_client_headers(&self, client: &HeaderMap, upstream: &mut HeaderMap) {
        forward_anthropic_headers(client, upstream);
    }

    fn speaks_anthropic(&self) -> bool {
        true
    }

    fn count_tokens_request(
        &self,
        raw: Option<&[u8]>,
        req: &ChatRequest,
        model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        let body = match raw {
            Some(raw) => splice_messages_body(raw, model),
            None => count_tokens_body(req, model, self.default_max_tokens),
        };
        Some(body.map(|body| UpstreamRequest {
            url: format!("{}/v1/messages/count_tokens", self.base_url),
            headers: self.headers.clone(),
            body,
        }))
    }

    fn count_tokens_response(&self, body: &[u8]) -> Result<u64, ProviderError> {
        #[derive(Deserialize)]
        struct Count {
            input_tokens: u64,
        }
        serde_json::from_slice::<Count>(body)
            .map(|c| c.input_tokens)
            .map_err(|e| ProviderError::InvalidResponse(e.to_string()))
    }

    fn stream_decoder(&self, model: &str) -> Box<dyn StreamDecoder> {
        Box::new(AnthropicDecoder::new(model))
    }

    fn embeddings_request(
        &self,
        _req: &EmbeddingsRequest,
        _model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        Err(no_embeddings())
    }

    fn embeddings_response(
        &self,
        _body: &[u8],
        _model: &str,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        Err(no_embeddings())
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        anthropic_error_message(body)
    }
}

fn no_embeddings() -> ProviderError {
    ProviderError::Unsupported("anthropic has no embeddings API".to_owned())
}

/// Reads the message of an Anthropic error body
/// (`{"type":"error","error":{"type":..,"message":..}}`), falling back to the OpenAI shape.
pub fn anthropic_error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    match v.pointer("/error/message").and_then(Value::as_str) {
        Some(m) => Some(m.to_owned()),
        None => super::openai_error_message(body),
    }
}

/// The client headers an Anthropic upstream is sent as the client gave them: the API
/// version and the beta features it opted into (they change what the body may hold).
pub const FORWARDED_HEADERS: [&str; 2] = ["anthropic-version", "anthropic-beta"];

/// Copies [`FORWARDED_HEADERS`] from the client's headers, replacing configured ones. Several
/// `anthropic-beta` headers are all kept.
pub fn forward_anthropic_headers(client: &HeaderMap, upstream: &mut HeaderMap) {
    for name in FORWARDED_HEADERS {
        let mut values = client.get_all(name).iter().cloned().peekable();
        if values.peek().is_none() {
            continue;
        }
        upstream.remove(name);
        for v in values {
            upstream.append(name, v);
        }
    }
}

/// The client's Anthropic body with only the model replaced, and `system` messages inside
/// `messages` (which Claude Code sends) folded, in order, into the top-level `system`.
/// Everything else stays byte-for-byte what the client meant.
pub fn splice_messages_body(raw: &[u8], model: &str) -> Result<Bytes, ProviderError> {
    let mut body: Map<String, Value> = serde_json::from_slice(raw)
        .map_err(|e| ProviderError::Unsupported(format!("cannot read the client body: {e}")))?;
    body.insert("model".into(), json!(model));
    fold_system_messages(&mut body);
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))
}

/// Moves `{"role":"system"}` entries of `messages` to the end of the top-level `system`
/// (as text blocks, keeping `cache_control`), in order.
fn fold_system_messages(body: &mut Map<String, Value>) {
    let Some(Value::Array(messages)) = body.get_mut("messages") else {
        return;
    };
    if !messages.iter().any(|m| m["role"] == "system") {
        return;
    }
    let mut folded = Vec::new();
    messages.retain(|m| {
        if m["role"] != "system" {
            return true;
        }
        match &m["content"] {
            Value::String(t) => folded.push(json!({"type": "text", "text": t})),
            Value::Array(blocks) => folded.extend(blocks.iter().cloned()),
            _ => {}
        }
        false
    });
    let mut system = match body.remove("system") {
        Some(Value::String(t)) if !t.is_empty() => vec![json!({"type": "text", "text": t})],
        Some(Value::Array(blocks)) => blocks,
        _ => Vec::new(),
    };
    system.extend(folded);
    tracing::debug!(
        blocks = system.len(),
        "Folded system messages into the top-level system."
    );
    body.insert("system".into(), Value::Array(system));
}

/// A `count_tokens` body from a canonical request: the Messages body without the fields
/// that only generation takes.
fn count_tokens_body(
    req: &ChatRequest,
    model: &str,
    default_max_tokens: u32,
) -> Result<Bytes, ProviderError> {
    let mut body = to_messages_body(req, model, default_max_tokens)?;
    if let Some(obj) = body.as_object_mut() {
        for key in [
            "max_tokens",
            "stream",
            "temperature",
            "top_p",
            "top_k",
            "stop_sequences",
            "metadata",
        ] {
            obj.remove(key);
        }
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))
}

/// Checks that a body is an Anthropic `Message` and reads its usage, for forwarding the body
/// as is.
pub fn peek_message(body: &[u8]) -> Result<Option<Usage>, ProviderError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        usage: Option<AnthropicUsage>,
    }
    let peek: Peek =
        serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse(e.to_string()))?;
    if peek.kind != "message" {
        return Err(ProviderError::InvalidResponse(format!(
            "expected a message, got type '{}'",
            peek.kind
        )));
    }
    Ok(peek.usage.map(AnthropicUsage::to_usage))
}

// ---------------------------------------------------------------------------------------------
// Requests: canonical -> Anthropic
// ---------------------------------------------------------------------------------------------

/// Builds the Anthropic Messages request body for a canonical request.
fn to_messages_body(
    req: &ChatRequest,
    model: &str,
    default_max_tokens: u32,
) -> Result<Value, ProviderError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(ProviderError::Unsupported(
            "n > 1 is not supported by anthropic".to_owned(),
        ));
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(model));

    let mut system: Vec<Value> = Vec::new();
    let mut messages = Messages::default();
    for (i, m) in req.messages.iter().enumerate() {
        match m.role.as_str() {
            "system" | "developer" => system.extend(system_blocks(m, i)?),
            "user" => messages.push("user", content_blocks(m.content.as_ref(), i)?),
            "assistant" => messages.push("assistant", assistant_blocks(m, i)?),
            "tool" => messages.push("user", vec![tool_result_block(m, i)?]),
            other => {
                return Err(ProviderError::Unsupported(format!(
                    "messages[{i}].role '{other}' is not supported by anthropic"
                )));
            }
        }
    }
    match system.as_slice() {
        [] => {}
        [only] if only.as_object().is_some_and(|o| o.len() == 2) => {
            // A single plain text block is sent as a string, the common form.
            body.insert("system".into(), only["text"].clone());
        }
        _ => {
            body.insert("system".into(), Value::Array(system));
        }
    }
    body.insert("messages".into(), Value::Array(messages.into_values()));

    let max_tokens = req.max_output_tokens().unwrap_or(default_max_tokens);
    body.insert("max_tokens".into(), json!(max_tokens));
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(k) = req.rest.get("top_k") {
        body.insert("top_k".into(), k.clone());
    }
    if let Some(stop) = &req.stop {
        body.insert("stop_sequences".into(), json!(stop.to_vec()));
    }
    if req.stream {
        body.insert("stream".into(), Value::Bool(true));
    }

    // Anthropic's `metadata` has one field, `user_id`; OpenAI's free-form keys would be
    // rejected, so only `user_id` is forwarded (the canonical `user` wins).
    let user_id = req.user.clone().map(Value::String).or_else(|| {
        req.rest
            .get("metadata")
            .and_then(|m| m.get("user_id"))
            .cloned()
    });
    if let Some(user_id) = user_id {
        body.insert("metadata".into(), json!({"user_id": user_id}));
    }

    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ProviderError::Unsupported(format!(
                    "tools[{i}].type '{}' is not supported by anthropic",
                    t.kind
                )));
            }
            let mut tool = Map::new();
            tool.insert("name".into(), json!(t.function.name));
            if let Some(d) = &t.function.description {
                tool.insert("description".into(), json!(d));
            }
            let schema = t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            tool.insert("input_schema".into(), schema);
            out.push(Value::Object(tool));
        }
        body.insert("tools".into(), Value::Array(out));
        if let Some(choice) = tool_choice(req.tool_choice.as_ref(), req.parallel_tool_calls)? {
            body.insert("tool_choice".into(), choice);
        }
    }
    Ok(Value::Object(body))
}

/// The Anthropic conversation under construction: pushing a message whose role equals the
/// previous one's appends to it, so roles always alternate.
#[derive(Default)]
struct Messages {
    list: Vec<(&'static str, Vec<Value>)>,
}

impl Messages {
    fn push(&mut self, role: &'static str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        match self.list.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => self.list.push((role, blocks)),
        }
    }

    fn into_values(self) -> Vec<Value> {
        self.list
            .into_iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect()
    }
}

/// `system`/`developer` message -> text blocks.
fn system_blocks(m: &ChatMessage, i: usize) -> Result<Vec<Value>, ProviderError> {
    let blocks = content_blocks(m.content.as_ref(), i)?;
    if let Some(j) = blocks.iter().position(|b| b["type"] != "text") {
        return Err(ProviderError::Unsupported(format!(
            "messages[{i}].content[{j}]: a system message may only hold text on anthropic"
        )));
    }
    Ok(blocks)
}

/// A text block, or nothing for empty text (Anthropic rejects empty text blocks).
fn text_block(text: &str, part: Option<&ContentPart>) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    let mut b = Map::new();
    b.insert("type".into(), json!("text"));
    b.insert("text".into(), json!(text));
    if let Some(cc) = part.and_then(|p| p.rest.get("cache_control")) {
        b.insert("cache_control".into(), cc.clone());
    }
    Some(Value::Object(b))
}

/// User (or tool-result) content -> content blocks.
fn content_blocks(content: Option<&MessageContent>, i: usize) -> Result<Vec<Value>, ProviderError> {
    match content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(t)) => Ok(text_block(t, None).into_iter().collect()),
        Some(MessageContent::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                if let Some(b) = part_block(p, i, j)? {
                    out.push(b);
                }
            }
            Ok(out)
        }
    }
}

/// One OpenAI content part -> one Anthropic block.
fn part_block(p: &ContentPart, i: usize, j: usize) -> Result<Option<Value>, ProviderError> {
    let at = || format!("messages[{i}].content[{j}]");
    match p.kind.as_str() {
        "text" => Ok(text_block(p.text.as_deref().unwrap_or_default(), Some(p))),
        "image_url" => {
            let url = p
                .image_url
                .as_ref()
                .map(|u| u.url.as_str())
                .ok_or_else(|| {
                    ProviderError::Unsupported(format!("{}: image_url part without a url", at()))
                })?;
            let source = if url.starts_with("data:") {
                let (media_type, data) = parse_data_url(url).ok_or_else(|| {
                    ProviderError::Unsupported(format!(
                        "{}: only base64 data: URLs are supported by anthropic",
                        at()
                    ))
                })?;
                json!({"type": "base64", "media_type": media_type, "data": data})
            } else if url.starts_with("https://") || url.starts_with("http://") {
                json!({"type": "url", "url": url})
            } else {
                return Err(ProviderError::Unsupported(format!(
                    "{}: image URL must be http(s) or data:",
                    at()
                )));
            };
            Ok(Some(with_cache_control(
                json!({"type": "image", "source": source}),
                p,
            )))
        }
        "file" => {
            // `{"type":"file","file":{"file_data":"data:application/pdf;base64,..."}}`.
            let data_url = p
                .rest
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
                .and_then(parse_data_url);
            match data_url {
                Some((media_type, data)) if media_type == "application/pdf" => {
                    Ok(Some(with_cache_control(
                        json!({"type": "document", "source": {
                            "type": "base64", "media_type": media_type, "data": data}}),
                        p,
                    )))
                }
                _ => Err(ProviderError::Unsupported(format!(
                    "{}: only inline PDF files (file_data) are supported by anthropic",
                    at()
                ))),
            }
        }
        other => Err(ProviderError::Unsupported(format!(
            "{}: content part type '{other}' is not supported by anthropic",
            at()
        ))),
    }
}

fn with_cache_control(mut block: Value, p: &ContentPart) -> Value {
    if let (Some(obj), Some(cc)) = (block.as_object_mut(), p.rest.get("cache_control")) {
        obj.insert("cache_control".into(), cc.clone());
    }
    block
}

/// Splits `data:<media type>;base64,<data>` into its media type and data.
fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type, data))
}

/// Assistant message -> text blocks then `tool_use` blocks.
fn assistant_blocks(m: &ChatMessage, i: usize) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = content_blocks(m.content.as_ref(), i)?;
    if let Some(j) = blocks.iter().position(|b| b["type"] != "text") {
        return Err(ProviderError::Unsupported(format!(
            "messages[{i}].content[{j}]: an assistant message may only hold text on anthropic"
        )));
    }
    // Earlier thinking goes first, as Anthropic sent it; unsigned reasoning (from another
    // provider) cannot be verified by Anthropic and is dropped.
    let mut thinking = Vec::new();
    for r in m.reasoning.iter().flatten() {
        match (r.kind.as_str(), &r.signature, &r.data) {
            (Reasoning::REDACTED, _, Some(data)) => {
                thinking.push(json!({"type": "redacted_thinking", "data": data}));
            }
            (Reasoning::THINKING, Some(sig), _) => thinking.push(json!({
                "type": "thinking",
                "thinking": r.text.clone().unwrap_or_default(),
                "signature": sig,
            })),
            _ => tracing::debug!(message = i, "Unsigned reasoning dropped for anthropic."),
        }
    }
    if !thinking.is_empty() {
        thinking.append(&mut blocks);
        blocks = thinking;
    }
    for call in m.tool_calls.iter().flatten() {
        let args = call.function.arguments.trim();
        let input: Value = if args.is_empty() {
            json!({})
        } else {
            serde_json::from_str(args).map_err(|e| {
                ProviderError::Unsupported(format!(
                    "messages[{i}]: tool call '{}' ({}) has arguments that are not valid JSON: {e}",
                    call.id, call.function.name
                ))
            })?
        };
        blocks.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.function.name,
            "input": input,
        }));
    }
    Ok(blocks)
}

/// `tool` message -> a `tool_result` block.
fn tool_result_block(m: &ChatMessage, i: usize) -> Result<Value, ProviderError> {
    let id = m.tool_call_id.as_deref().ok_or_else(|| {
        ProviderError::Unsupported(format!("messages[{i}]: tool message without tool_call_id"))
    })?;
    let content = match &m.content {
        None => Value::String(String::new()),
        Some(MessageContent::Text(t)) => Value::String(t.clone()),
        Some(c @ MessageContent::Parts(_)) => Value::Array(content_blocks(Some(c), i)?),
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// OpenAI `tool_choice` + `parallel_tool_calls` -> Anthropic `tool_choice`.
fn tool_choice(
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Value>, ProviderError> {
    let mut out = match choice {
        None => json!({"type": "auto"}),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => return Ok(Some(json!({"type": "none"}))),
            "required" => json!({"type": "any"}),
            other => {
                return Err(ProviderError::Unsupported(format!(
                    "tool_choice '{other}' is not supported by anthropic"
                )));
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => json!({"type": "tool", "name": name}),
            None => {
                return Err(ProviderError::Unsupported(
                    "tool_choice must be auto, none, required or a function".to_owned(),
                ));
            }
        },
    };
    if parallel == Some(false) {
        if let Some(obj) = out.as_object_mut() {
            obj.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
        return Ok(Some(out));
    }
    // Without a choice and with the default parallelism, let Anthropic use its default.
    Ok(choice.map(|_| out))
}

// ---------------------------------------------------------------------------------------------
// Responses: Anthropic -> canonical
// ---------------------------------------------------------------------------------------------

/// An Anthropic `Message` (only the fields Weir reads).
#[derive(Debug, Deserialize)]
struct MessageBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// A content block; fields depend on `type`.
#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

/// Anthropic `usage`. Every field is optional because `message_delta` sends a subset.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Fields present in `newer` replace ours (`message_delta` counts are cumulative).
    fn update(&mut self, newer: &AnthropicUsage) {
        self.input_tokens = newer.input_tokens.or(self.input_tokens);
        self.output_tokens = newer.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = newer
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = newer
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
    }

    /// Canonical usage: Anthropic counts cached input apart; OpenAI's prompt count includes it.
    fn to_usage(self) -> Usage {
        // Saturating: the numbers come from the upstream (found by tests/fuzz).
        let prompt = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0));
        let mut usage = Usage::new(prompt, self.output_tokens.unwrap_or(0));
        usage.prompt_tokens_details = self
            .cache_read_input_tokens
            .map(|cached_tokens| PromptTokensDetails { cached_tokens });
        usage.cache_creation_input_tokens = self.cache_creation_input_tokens;
        usage
    }
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new.
        _ => "stop",
    }
}

/// Parses an Anthropic message body into a canonical response.
fn parse_message(body: &[u8], model: &str, created: u64) -> Result<ChatResponse, ProviderError> {
    let msg: MessageBody =
        serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse(e.to_string()))?;
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    let mut reasoning = Vec::new();
    for b in &msg.content {
        match b.kind.as_str() {
            "text" => text
                .get_or_insert_with(String::new)
                .push_str(b.text.as_deref().unwrap_or_default()),
            "tool_use" => calls.push(ToolCall {
                id: b.id.clone().unwrap_or_default(),
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: b.name.clone().unwrap_or_default(),
                    arguments: b
                        .input
                        .as_ref()
                        .map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            }),
            "thinking" => reasoning.push(Reasoning {
                kind: Reasoning::THINKING.to_owned(),
                text: b.thinking.clone(),
                signature: b.signature.clone(),
                ..Reasoning::default()
            }),
            "redacted_thinking" => reasoning.push(Reasoning {
                kind: Reasoning::REDACTED.to_owned(),
                data: b.data.clone(),
                ..Reasoning::default()
            }),
            // Server tool blocks: not part of the canonical form.
            _ => {}
        }
    }
    let content = match text {
        Some(t) => Some(MessageContent::Text(t)),
        None if calls.is_empty() => Some(MessageContent::Text(String::new())),
        None => None,
    };
    let message = ChatMessage {
        role: "assistant".to_owned(),
        content,
        tool_calls: (!calls.is_empty()).then_some(calls),
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        ..ChatMessage::default()
    };
    Ok(ChatResponse {
        id: msg.id,
        object: "chat.completion".to_owned(),
        created,
        model: if msg.model.is_empty() {
            model.to_owned()
        } else {
            msg.model
        },
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: msg
                .stop_reason
                .as_deref()
                .map(|r| finish_reason(r).to_owned()),
            rest: Map::new(),
        }],
        usage: msg.usage.map(AnthropicUsage::to_usage),
        rest: Map::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Streams: Anthropic events -> canonical chunks
// ---------------------------------------------------------------------------------------------

/// One streamed event, by its `type`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: MessageBody,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop,
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<AnthropicUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorBody,
    },
    /// Event types added after this code was written are ignored.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct BlockDelta {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Decodes an Anthropic Messages stream into canonical chunks.
///
/// State: the message id and model (from `message_start`, repeated on every chunk), the usage
/// seen so far, and which Anthropic content-block index is which tool call (OpenAI numbers
/// tool calls 0, 1, ... while Anthropic numbers all blocks, text included).
#[derive(Debug)]
pub struct AnthropicDecoder {
    id: String,
    model: String,
    created: u64,
    usage: AnthropicUsage,
    tool_index: HashMap<u32, u32>,
    done: bool,
}

impl AnthropicDecoder {
    /// A decoder for one response; `model` is used if the upstream names none.
    pub fn new(model: &str) -> Self {
        AnthropicDecoder {
            id: String::new(),
            model: model.to_owned(),
            created: super::unix_now(),
            usage: AnthropicUsage::default(),
            tool_index: HashMap::new(),
            done: false,
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            rest: Map::new(),
        }
    }

    fn delta_chunk(&self, delta: Delta, finish_reason: Option<String>) -> ChatChunk {
        self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                rest: Map::new(),
            }],
            None,
        )
    }

    /// A chunk carrying one tool-call fragment.
    fn tool_delta(&self, call: ToolCallDelta) -> ChatChunk {
        self.delta_chunk(
            Delta {
                tool_calls: Some(vec![call]),
                ..Delta::default()
            },
            None,
        )
    }
}

impl StreamDecoder for AnthropicDecoder {
    fn decode(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        if self.done {
            return Ok(Decoded::default());
        }
        let parsed: StreamEvent = serde_json::from_str(&event.data).map_err(|e| {
            if event.event == "error" {
                ProviderError::StreamError(event.data.clone())
            } else {
                ProviderError::InvalidResponse(format!("bad {} event: {e}", event.event))
            }
        })?;
        let mut chunks = Vec::new();
        match parsed {
            StreamEvent::MessageStart { message } => {
                self.id = message.id;
                if !message.model.is_empty() {
                    self.model = message.model;
                }
                if let Some(u) = &message.usage {
                    self.usage.update(u);
                }
                chunks.push(self.delta_chunk(
                    Delta {
                        role: Some("assistant".to_owned()),
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    None,
                ));
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block.kind.as_str() {
                "text" => {
                    if let Some(text) = content_block.text.filter(|t| !t.is_empty()) {
                        chunks.push(self.delta_chunk(
                            Delta {
                                content: Some(text),
                                ..Delta::default()
                            },
                            None,
                        ));
                    }
                }
                "tool_use" => {
                    let k = u32::try_from(self.tool_index.len()).unwrap_or(u32::MAX);
                    self.tool_index.insert(index, k);
                    chunks.push(self.tool_delta(ToolCallDelta {
                        index: k,
                        id: content_block.id,
                        kind: Some("function".to_owned()),
                        function: Some(FunctionCallDelta {
                            name: content_block.name,
                            arguments: Some(String::new()),
                        }),
                    }));
                }
                _ => {}
            },
            StreamEvent::ContentBlockDelta { index, delta } => match delta.kind.as_str() {
                "text_delta" => {
                    if let Some(text) = delta.text.filter(|t| !t.is_empty()) {
                        chunks.push(self.delta_chunk(
                            Delta {
                                content: Some(text),
                                ..Delta::default()
                            },
                            None,
                        ));
                    }
                }
                "input_json_delta" => {
                    let k = self.tool_index.get(&index).copied().ok_or_else(|| {
                        ProviderError::InvalidResponse(format!(
                            "input_json_delta for content block {index}, which is not a tool_use"
                        ))
                    })?;
                    if let Some(json) = delta.partial_json.filter(|j| !j.is_empty()) {
                        chunks.push(self.tool_delta(ToolCallDelta {
                            function: Some(FunctionCallDelta {
                                name: None,
                                arguments: Some(json),
                            }),
                            index: k,
                            ..ToolCallDelta::default()
                        }));
                    }
                }
                "thinking_delta" => {
                    if let Some(text) = delta.thinking.filter(|t| !t.is_empty()) {
                        chunks.push(self.delta_chunk(
                            Delta {
                                reasoning_content: Some(text),
                                ..Delta::default()
                            },
                            None,
                        ));
                    }
                }
                // signature_delta, citations_delta: not canonical.
                _ => {}
            },
            StreamEvent::ContentBlockStop | StreamEvent::Ping | StreamEvent::Unknown => {}
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(u) = &usage {
                    self.usage.update(u);
                }
                let reason = delta
                    .stop_reason
                    .as_deref()
                    .map_or("stop", finish_reason)
                    .to_owned();
                chunks.push(self.delta_chunk(Delta::default(), Some(reason)));
                chunks.push(self.chunk(Vec::new(), Some(self.usage.to_usage())));
            }
            StreamEvent::MessageStop => self.done = true,
            StreamEvent::Error { error } => {
                let msg = if error.message.is_empty() {
                    error.kind
                } else {
                    error.message
                };
                return Err(ProviderError::StreamError(msg));
            }
        }
        Ok(Decoded {
            chunks,
            done: self.done,
        })
    }

    fn finish(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        if self.done {
            Ok(Vec::new())
        } else {
            Err(ProviderError::InvalidResponse(
                "stream ended before message_stop".to_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::anthropic::golden;
    use crate::api::sse::SseParser;

    #[test]
    fn client_body_keeps_everything_and_folds_system_messages() {
        let raw = br#"{"model":"alias","max_tokens":5,"thinking":{"type":"adaptive"},
            "output_config":{"effort":"high"},"system":"A.",
            "messages":[{"role":"user","content":[{"type":"text","text":"hi",
                "cache_control":{"type":"ephemeral"}}]},
                {"role":"system","content":"B."}]}"#;
        let body = splice_messages_body(raw, "claude-up").expect("splice");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({"model":"claude-up","max_tokens":5,"thinking":{"type":"adaptive"},
                "output_config":{"effort":"high"},
                "system":[{"type":"text","text":"A."},{"type":"text","text":"B."}],
                "messages":[{"role":"user","content":[{"type":"text","text":"hi",
                    "cache_control":{"type":"ephemeral"}}]}]})
        );
        let untouched = splice_messages_body(br#"{"model":"a","system":"S","messages":[]}"#, "b")
            .expect("splice");
        let v: Value = serde_json::from_slice(&untouched).expect("json");
        assert_eq!(v["system"], "S", "no system message: system stays a string");
    }

    #[test]
    fn client_anthropic_headers_replace_configured_ones() {
        let mut client = HeaderMap::new();
        client.insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        client.append("anthropic-beta", HeaderValue::from_static("a"));
        client.append("anthropic-beta", HeaderValue::from_static("b"));
        client.insert("x-api-key", HeaderValue::from_static("client"));
        let mut up = HeaderMap::new();
        up.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        up.insert("anthropic-beta", HeaderValue::from_static("configured"));
        up.insert("x-api-key", HeaderValue::from_static("provider"));
        forward_anthropic_headers(&client, &mut up);
        assert_eq!(up["anthropic-version"], "2024-01-01");
        let betas: Vec<_> = up.get_all("anthropic-beta").iter().collect();
        assert_eq!(betas, ["a", "b"]);
        assert_eq!(up["x-api-key"], "provider");

        let mut kept = HeaderMap::new();
        kept.insert("anthropic-beta", HeaderValue::from_static("configured"));
        forward_anthropic_headers(&HeaderMap::new(), &mut kept);
        assert_eq!(
            kept["anthropic-beta"], "configured",
            "nothing sent: config stays"
        );
    }

    #[test]
    fn peeked_usage_keeps_cache_reads_and_writes_apart() {
        let body = br#"{"type":"message","usage":{"input_tokens":10,
            "cache_creation_input_tokens":100,"cache_read_input_tokens":200,"output_tokens":7}}"#;
        let u = peek_message(body).expect("peek").expect("usage");
        assert_eq!(u.prompt_tokens, 310);
        assert_eq!(u.cache_read_tokens(), 200);
        assert_eq!(u.cache_write_tokens(), 100);
        assert!(peek_message(br#"{"type":"error"}"#).is_err());
    }

    const MODEL: &str = "claude-sonnet-4-5";

    fn provider() -> Anthropic {
        let cfg: AnthropicConfig =
            toml::from_str("base_url = \"http://127.0.0.1:9/\"\napi_key = \"sk-ant-x\"")
                .expect("cfg");
        Anthropic::new("claude", &cfg).expect("provider")
    }

    fn request_golden(case: &str) {
        let input = golden::read(&format!("provider/request/{case}.in.json"));
        let req: ChatRequest = serde_json::from_str(&input).expect("request fixture");
        let up = provider().chat_request(&req, MODEL).expect("translate");
        let body: Value = serde_json::from_slice(&up.body).expect("json body");
        golden::check_json(&format!("provider/request/{case}.out.json"), &body);
    }

    #[test]
    fn request_basic() {
        request_golden("basic");
    }

    #[test]
    fn request_system_multiturn() {
        request_golden("system_multiturn");
    }

    #[test]
    fn request_tools_tool_choice() {
        request_golden("tools_tool_choice");
    }

    #[test]
    fn request_tool_calls_and_results() {
        request_golden("tool_calls_results");
    }

    #[test]
    fn request_images() {
        request_golden("images");
    }

    #[test]
    fn response_text_and_tool_use() {
        let input = golden::read("provider/response/text_tool_use.in.json");
        let resp = parse_message(input.as_bytes(), MODEL, 0).expect("parse");
        let actual = serde_json::to_value(&resp).expect("json");
        golden::check_json("provider/response/text_tool_use.out.json", &actual);
    }

    fn stream_golden(case: &str) {
        let input = golden::read(&format!("provider/stream/{case}.in.sse"));
        let mut events = Vec::new();
        let mut parser = SseParser::new();
        parser.feed(input.as_bytes(), &mut events).expect("sse");
        let mut d = AnthropicDecoder::new(MODEL);
        d.created = 0;
        let mut chunks = Vec::new();
        let mut done = false;
        for e in &events {
            assert!(!done, "events after message_stop");
            let out = d.decode(e).expect("decode");
            chunks.extend(out.chunks);
            done = out.done;
        }
        assert!(done, "message_stop ends the stream");
        assert_eq!(d.finish().expect("finish"), Vec::new());
        let actual = serde_json::to_value(&chunks).expect("json");
        golden::check_json(&format!("provider/stream/{case}.out.json"), &actual);
    }

    #[test]
    fn stream_text() {
        stream_golden("text");
    }

    #[test]
    fn stream_two_tool_calls() {
        stream_golden("two_tools");
    }

    #[test]
    fn url_headers_and_key() {
        let p = provider();
        let req: ChatRequest =
            serde_json::from_str(r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#)
                .expect("req");
        let up = p.chat_request(&req, MODEL).expect("up");
        assert_eq!(up.url, "http://127.0.0.1:9/v1/messages");
        let key = up.headers.get("x-api-key").expect("key");
        assert!(key.is_sensitive());
        assert_eq!(key, "sk-ant-x");
        assert_eq!(
            up.headers.get("anthropic-version").map(|v| v.to_str().ok()),
            Some(Some("2023-06-01"))
        );
        assert!(up.headers.get("authorization").is_none());
    }

    #[test]
    fn config_rejects_unknown_fields_and_zero_max_tokens() {
        assert!(toml::from_str::<AnthropicConfig>("bogus = 1").is_err());
        let cfg: AnthropicConfig = toml::from_str("default_max_tokens = 0").expect("cfg");
        assert!(Anthropic::new("c", &cfg).is_err());
    }

    #[test]
    fn unsupported_requests_are_rejected() {
        let p = provider();
        let n2: ChatRequest = serde_json::from_str(
            r#"{"model":"a","n":2,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .expect("req");
        let err = p.chat_request(&n2, MODEL).expect_err("n>1");
        assert_eq!(err.to_string(), "n > 1 is not supported by anthropic");

        let bad_args: ChatRequest = serde_json::from_str(
            r#"{"model":"a","messages":[{"role":"user","content":"hi"},
            {"role":"assistant","tool_calls":[{"id":"call_9","type":"function",
             "function":{"name":"f","arguments":"{oops"}}]}]}"#,
        )
        .expect("req");
        let err = p.chat_request(&bad_args, MODEL).expect_err("bad json");
        assert!(err.to_string().contains("call_9"), "{err}");

        let emb: EmbeddingsRequest =
            serde_json::from_str(r#"{"model":"a","input":"x"}"#).expect("emb");
        assert!(matches!(
            p.embeddings_request(&emb, MODEL),
            Err(ProviderError::Unsupported(m)) if m == "anthropic has no embeddings API"
        ));
    }

    #[test]
    fn default_max_tokens_and_dropped_fields() {
        let req: ChatRequest = serde_json::from_str(
            r#"{"model":"a","messages":[{"role":"user","content":"hi"}],
                "seed":7,"logprobs":true,"top_k":5,"response_format":{"type":"json_object"}}"#,
        )
        .expect("req");
        let body = to_messages_body(&req, MODEL, 1234).expect("body");
        assert_eq!(body["max_tokens"], 1234);
        assert_eq!(body["top_k"], 5);
        assert!(body.get("seed").is_none());
        assert!(body.get("logprobs").is_none());
        assert!(body.get("response_format").is_none());
    }

    #[test]
    fn stream_error_event_and_truncation() {
        let mut d = AnthropicDecoder::new(MODEL);
        let err = d.decode(&SseEvent {
            event: "error".into(),
            data: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
                .into(),
        });
        assert!(matches!(err, Err(ProviderError::StreamError(m)) if m == "Overloaded"));
        let mut d = AnthropicDecoder::new(MODEL);
        let start = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","usage":{"input_tokens":1,"output_tokens":1}}}"#;
        d.decode(&SseEvent {
            event: "message_start".into(),
            data: start.into(),
        })
        .expect("start");
        assert!(matches!(
            d.finish(),
            Err(ProviderError::InvalidResponse(m)) if m == "stream ended before message_stop"
        ));
    }

    #[test]
    fn error_message_reads_anthropic_shape() {
        let p = provider();
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
        assert_eq!(
            p.error_message(body).as_deref(),
            Some("max_tokens: Field required")
        );
        assert_eq!(p.error_message(b"not json"), None);
    }
}
