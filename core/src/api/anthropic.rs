//! The Anthropic Messages dialect, inbound: clients using an Anthropic SDK call Weir's
//! `POST /v1/messages`, and any provider serves them.
//!
//! Three translations, each the reverse of [`crate::provider::anthropic`]:
//!
//! - [`to_chat_request`]: a [`MessagesRequest`] into the canonical [`ChatRequest`];
//! - [`from_chat_response`]: a canonical [`ChatResponse`] into an Anthropic `Message`;
//! - [`MessagesStreamEncoder`]: canonical [`ChatChunk`]s into Anthropic's named SSE events.
//!
//! Errors use [`error_body`]. Golden tests pin every translation; fixtures live in
//! `tests/golden/anthropic/inbound/`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

use super::BadRequest;
use super::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, FunctionCall, FunctionDef,
    ImageUrl, MessageContent, Reasoning, Rest, Stop, StreamOptions, Tool, ToolCall, Usage,
};
use super::sse::named_frame;

/// `POST /v1/messages` request body. Lenient: fields Weir does not read stay in `rest`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct MessagesRequest {
    /// The model name the client asked for (a name from Weir's config).
    pub model: String,
    /// The conversation, alternating `user` and `assistant`.
    pub messages: Vec<InputMessage>,
    /// System prompt: a string or a list of text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Content>,
    /// Output-token limit (required by Anthropic; optional here, the provider has a default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Answer as a stream of named server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Tool definitions (`name`, `description`, `input_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDefinition>>,
    /// `{"type":"auto"|"any"|"none"}` or `{"type":"tool","name":..}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Custom stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// `{"user_id": ..}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Everything else (`thinking`, `service_tier`, ...), kept but not translated.
    #[serde(flatten)]
    pub rest: Rest,
}

/// One message of an Anthropic conversation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct InputMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or content blocks.
    pub content: Content,
    /// Everything else, kept but not translated.
    #[serde(flatten)]
    pub rest: Rest,
}

/// Message (or system) content: a plain string or a list of blocks.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<ContentBlock>),
}

/// One content block. Which fields are set depends on `type`: `text` (`text`), `image` and
/// `document` (`source`), `tool_use` (`id`, `name`, `input`), `tool_result` (`tool_use_id`,
/// `content`, `is_error`), `thinking`...
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ContentBlock {
    /// Block type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Source of an `image` or `document` block (`base64` or `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Value>,
    /// Id of a `tool_use` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Tool name of a `tool_use` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Arguments of a `tool_use` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The call a `tool_result` block answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_use_id: Option<String>,
    /// Result of a `tool_result` block: a string or blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// Everything else (`cache_control`, `is_error`, `citations`...), passed through where
    /// the canonical form can carry it.
    #[serde(flatten)]
    pub rest: Rest,
}

/// A client-defined tool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ToolDefinition {
    /// `custom` or absent for client tools; server tools (`web_search_...`) are refused.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Tool name.
    #[serde(default)]
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Everything else (`cache_control`), kept but not translated.
    #[serde(flatten)]
    pub rest: Rest,
}

// ---------------------------------------------------------------------------------------------
// Requests: Anthropic -> canonical
// ---------------------------------------------------------------------------------------------

/// Translates an Anthropic Messages request into the canonical request.
///
/// Fields with no canonical meaning (`thinking`, `service_tier`, `cache_control` on tools)
/// are dropped. Errors name the offending field, e.g. `messages[1].content[0].type`.
pub fn to_chat_request(req: MessagesRequest) -> Result<ChatRequest, BadRequest> {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        messages.push(system_message(system)?);
    }
    for (i, m) in req.messages.iter().enumerate() {
        match m.role.as_str() {
            "user" => user_messages(&m.content, i, &mut messages)?,
            "assistant" => messages.push(assistant_message(&m.content, i)?),
            // Claude Code sends one (last); kept in place as a canonical system message.
            "system" => messages.push(system_message(&m.content)?),
            other => {
                return Err(BadRequest::field(
                    format!("messages[{i}].role"),
                    format!("role must be 'user', 'assistant' or 'system', not '{other}'"),
                ));
            }
        }
    }

    let tools = match &req.tools {
        None => None,
        Some(tools) => {
            let mut out = Vec::with_capacity(tools.len());
            for (i, t) in tools.iter().enumerate() {
                if let Some(t) = tool(t, i)? {
                    out.push(t);
                }
            }
            // Only server tools: none left to offer a translated upstream.
            (!out.is_empty()).then_some(out)
        }
    };
    let (tool_choice, parallel_tool_calls) = match &req.tool_choice {
        None => (None, None),
        Some(_) if tools.is_none() => (None, None),
        Some(choice) => tool_choice(choice)?,
    };

    let user = req
        .metadata
        .as_ref()
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut rest = Rest::new();
    if let Some(k) = req.top_k {
        rest.insert("top_k".into(), json!(k));
    }
    if let Some(effort) = req.rest.get("thinking").and_then(reasoning_effort) {
        rest.insert("reasoning_effort".into(), json!(effort));
    }
    Ok(ChatRequest {
        model: req.model,
        messages,
        stream: req.stream,
        stream_options: req.stream.then(|| StreamOptions {
            include_usage: Some(true),
            rest: Rest::new(),
        }),
        tools,
        tool_choice,
        parallel_tool_calls,
        max_tokens: req.max_tokens,
        max_completion_tokens: None,
        temperature: req.temperature,
        top_p: req.top_p,
        n: None,
        stop: req.stop_sequences.map(Stop::Many),
        response_format: None,
        user,
        rest,
    })
}

fn message(role: &str, content: Option<MessageContent>) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content,
        ..ChatMessage::default()
    }
}

/// `system` -> one system message (a string, or text parts when there are several blocks).
fn system_message(system: &Content) -> Result<ChatMessage, BadRequest> {
    let content = match system {
        Content::Text(t) => MessageContent::Text(t.clone()),
        Content::Blocks(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                if b.kind != "text" {
                    return Err(BadRequest::field(
                        format!("system[{j}].type"),
                        "system blocks must be of type 'text'",
                    ));
                }
                parts.push(text_part(b));
            }
            simplify(parts)
        }
    };
    Ok(message("system", Some(content)))
}

/// Parts holding one plain text part become a string, the form every provider understands.
fn simplify(parts: Vec<ContentPart>) -> MessageContent {
    match parts.as_slice() {
        [only] if only.kind == "text" && only.rest.is_empty() => {
            MessageContent::Text(only.text.clone().unwrap_or_default())
        }
        _ => MessageContent::Parts(parts),
    }
}

fn text_part(b: &ContentBlock) -> ContentPart {
    let mut rest = Rest::new();
    if let Some(cc) = b.rest.get("cache_control") {
        rest.insert("cache_control".into(), cc.clone());
    }
    ContentPart {
        kind: "text".to_owned(),
        text: Some(b.text.clone().unwrap_or_default()),
        image_url: None,
        rest,
    }
}

/// A user message: `tool_result` blocks become `tool` messages (first, in order), the other
/// blocks one user message after them.
fn user_messages(
    content: &Content,
    i: usize,
    out: &mut Vec<ChatMessage>,
) -> Result<(), BadRequest> {
    let blocks = match content {
        Content::Text(t) => {
            out.push(message("user", Some(MessageContent::Text(t.clone()))));
            return Ok(());
        }
        Content::Blocks(blocks) => blocks,
    };
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match b.kind.as_str() {
            "text" => parts.push(text_part(b)),
            "image" | "document" => parts.push(media_part(b, &at)?),
            "tool_result" => {
                let id = b.tool_use_id.clone().ok_or_else(|| {
                    BadRequest::field(format!("{at}.tool_use_id"), "tool_result needs tool_use_id")
                })?;
                let mut m = message(
                    "tool",
                    Some(MessageContent::Text(tool_result_text(b, &at)?)),
                );
                m.tool_call_id = Some(id);
                out.push(m);
            }
            other => return Err(unsupported_block(&at, other, "a user")),
        }
    }
    if !parts.is_empty() {
        out.push(message("user", Some(simplify(parts))));
    }
    Ok(())
}

/// The text of a `tool_result`: its string content, or its text blocks joined.
fn tool_result_text(b: &ContentBlock, at: &str) -> Result<String, BadRequest> {
    match &b.content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => {
            let mut texts = Vec::new();
            for (k, item) in items.iter().enumerate() {
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(
                        item.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    _ => {
                        return Err(BadRequest::field(
                            format!("{at}.content[{k}].type"),
                            "only text blocks are supported in a tool_result",
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(BadRequest::field(
            format!("{at}.content"),
            "must be a string or an array of blocks",
        )),
    }
}

/// `image` (base64 or url) -> `image_url` part; `document` (base64 PDF) -> `file` part.
fn media_part(b: &ContentBlock, at: &str) -> Result<ContentPart, BadRequest> {
    let source = b.source.as_ref().ok_or_else(|| {
        BadRequest::field(format!("{at}.source"), format!("{} needs a source", b.kind))
    })?;
    let field = |name: &str| {
        source.get(name).and_then(Value::as_str).ok_or_else(|| {
            BadRequest::field(format!("{at}.source.{name}"), "missing or not a string")
        })
    };
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!("data:{};base64,{}", field("media_type")?, field("data")?),
        Some("url") if b.kind == "image" => field("url")?.to_owned(),
        _ => {
            return Err(BadRequest::field(
                format!("{at}.source.type"),
                if b.kind == "image" {
                    "image source must be 'base64' or 'url'"
                } else {
                    "document source must be 'base64'"
                },
            ));
        }
    };
    let mut rest = Rest::new();
    if let Some(cc) = b.rest.get("cache_control") {
        rest.insert("cache_control".into(), cc.clone());
    }
    if b.kind == "image" {
        Ok(ContentPart {
            kind: "image_url".to_owned(),
            text: None,
            image_url: Some(ImageUrl { url, detail: None }),
            rest,
        })
    } else {
        rest.insert("file".into(), json!({"file_data": url}));
        Ok(ContentPart {
            kind: "file".to_owned(),
            text: None,
            image_url: None,
            rest,
        })
    }
}

/// An assistant message: text blocks joined into `content`, `tool_use` blocks into
/// `tool_calls`; `thinking` blocks dropped.
fn assistant_message(content: &Content, i: usize) -> Result<ChatMessage, BadRequest> {
    let blocks = match content {
        Content::Text(t) => return Ok(message("assistant", Some(MessageContent::Text(t.clone())))),
        Content::Blocks(blocks) => blocks,
    };
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    let mut reasoning = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match b.kind.as_str() {
            "text" => text
                .get_or_insert_with(String::new)
                .push_str(b.text.as_deref().unwrap_or_default()),
            "tool_use" => {
                let id = b
                    .id
                    .clone()
                    .ok_or_else(|| BadRequest::field(format!("{at}.id"), "tool_use needs an id"))?;
                let name = b.name.clone().ok_or_else(|| {
                    BadRequest::field(format!("{at}.name"), "tool_use needs a name")
                })?;
                let input = b.input.clone().unwrap_or_else(|| json!({}));
                calls.push(ToolCall {
                    id,
                    kind: "function".to_owned(),
                    function: FunctionCall {
                        name,
                        arguments: input.to_string(),
                    },
                });
            }
            "thinking" => reasoning.push(Reasoning {
                kind: Reasoning::THINKING.to_owned(),
                text: b
                    .rest
                    .get("thinking")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                signature: b
                    .rest
                    .get("signature")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                ..Reasoning::default()
            }),
            "redacted_thinking" => reasoning.push(Reasoning {
                kind: Reasoning::REDACTED.to_owned(),
                data: b
                    .rest
                    .get("data")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                ..Reasoning::default()
            }),
            other if SERVER_BLOCKS.iter().any(|p| other.starts_with(p)) => {
                // Server tool calls and results run at Anthropic; only an Anthropic upstream
                // (sent the client's body as is) can take them back.
                tracing::debug!(block = other, at = %at, "Server tool block has no canonical form; dropped.");
            }
            other => return Err(unsupported_block(&at, other, "an assistant")),
        }
    }
    let content = match text {
        Some(t) => Some(MessageContent::Text(t)),
        None if calls.is_empty() => Some(MessageContent::Text(String::new())),
        None => None,
    };
    let mut m = message("assistant", content);
    m.tool_calls = (!calls.is_empty()).then_some(calls);
    m.reasoning = (!reasoning.is_empty()).then_some(reasoning);
    Ok(m)
}

fn unsupported_block(at: &str, kind: &str, whose: &str) -> BadRequest {
    BadRequest::field(
        format!("{at}.type"),
        format!("block type '{kind}' is not supported in {whose} message"),
    )
}

/// Prefixes of the block types of Anthropic-run (server) tools: `server_tool_use`,
/// `web_search_tool_result`, `web_fetch_tool_result`, `code_execution_tool_result`,
/// `mcp_tool_use`...
const SERVER_BLOCKS: [&str; 6] = [
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "mcp_tool_",
];

/// Anthropic `thinking` -> OpenAI `reasoning_effort`, by budget: up to 4096 tokens `low`, up
/// to 16384 `medium`, more `high`. `adaptive` and `disabled` map to nothing (the model's
/// default), with a debug line.
fn reasoning_effort(thinking: &Value) -> Option<&'static str> {
    match thinking.get("type").and_then(Value::as_str) {
        Some("enabled") => {
            let budget = thinking.get("budget_tokens").and_then(Value::as_u64)?;
            Some(match budget {
                0..=4096 => "low",
                4097..=16384 => "medium",
                _ => "high",
            })
        }
        other => {
            tracing::debug!(thinking = ?other, "Thinking mode has no reasoning_effort; left to the model.");
            None
        }
    }
}

/// A client tool -> a function tool. Server tools (`web_search_20250305`, ...) have no
/// canonical form: `None`, with a debug line (an Anthropic upstream is sent the client's own
/// body, server tools included, while no plugin changes it).
fn tool(t: &ToolDefinition, i: usize) -> Result<Option<Tool>, BadRequest> {
    if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
        tracing::debug!(
            tool = %t.name,
            kind,
            index = i,
            "Server tool has no canonical form; dropped from the translated request."
        );
        return Ok(None);
    }
    if t.name.is_empty() {
        return Err(BadRequest::field(
            format!("tools[{i}].name"),
            "a tool needs a name",
        ));
    }
    Ok(Some(Tool {
        kind: "function".to_owned(),
        function: FunctionDef {
            name: t.name.clone(),
            description: t.description.clone(),
            parameters: Some(
                t.input_schema
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            ),
            rest: Rest::new(),
        },
    }))
}

/// Anthropic `tool_choice` -> OpenAI `tool_choice` and `parallel_tool_calls`.
fn tool_choice(choice: &Value) -> Result<(Option<Value>, Option<bool>), BadRequest> {
    let mapped = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::field(
                    "tool_choice.name",
                    "tool_choice of type 'tool' needs a name",
                )
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(BadRequest::field(
                "tool_choice.type",
                "must be 'auto', 'any', 'tool' or 'none'",
            ));
        }
    };
    let parallel = match choice.get("disable_parallel_tool_use") {
        Some(Value::Bool(true)) => Some(false),
        _ => None,
    };
    Ok((Some(mapped), parallel))
}

// ---------------------------------------------------------------------------------------------
// Responses: canonical -> Anthropic
// ---------------------------------------------------------------------------------------------

/// OpenAI `finish_reason` -> Anthropic `stop_reason`.
fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// A message id with the `msg_` prefix Anthropic clients expect.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else if id.is_empty() {
        format!("msg_{}", uuid::Uuid::new_v4().simple())
    } else {
        format!("msg_{id}")
    }
}

/// Anthropic `usage`: its `input_tokens` excludes cache reads and writes, reported apart.
fn usage_json(usage: &Usage) -> Value {
    let cached = usage.prompt_tokens_details.map(|d| d.cached_tokens);
    let written = usage.cache_creation_input_tokens;
    let mut u = Map::new();
    let input = usage
        .prompt_tokens
        .saturating_sub(cached.unwrap_or(0))
        .saturating_sub(written.unwrap_or(0));
    u.insert("input_tokens".into(), json!(input));
    if let Some(w) = written {
        u.insert("cache_creation_input_tokens".into(), json!(w));
    }
    if let Some(c) = cached {
        u.insert("cache_read_input_tokens".into(), json!(c));
    }
    u.insert("output_tokens".into(), json!(usage.completion_tokens));
    Value::Object(u)
}

/// Tool arguments as a JSON object; unparseable arguments become `{}`.
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

/// The message's reasoning as Anthropic `thinking` / `redacted_thinking` blocks: the
/// canonical `reasoning`, else an OpenAI-compatible server's `reasoning_content` string.
fn thinking_blocks(message: &ChatMessage) -> Vec<Value> {
    if let Some(reasoning) = &message.reasoning {
        return reasoning
            .iter()
            .map(|r| {
                if r.kind == Reasoning::REDACTED {
                    json!({"type": "redacted_thinking", "data": r.data.clone().unwrap_or_default()})
                } else {
                    json!({"type": "thinking",
                        "thinking": r.text.clone().unwrap_or_default(),
                        "signature": r.signature.clone().unwrap_or_default()})
                }
            })
            .collect();
    }
    match message
        .rest
        .get("reasoning_content")
        .and_then(Value::as_str)
    {
        Some(t) if !t.is_empty() => {
            vec![json!({"type": "thinking", "thinking": t, "signature": ""})]
        }
        _ => Vec::new(),
    }
}

/// Translates a canonical response into an Anthropic `Message`. Only choice 0 is used;
/// `model` is the name to report (the one the client asked for).
pub fn from_chat_response(resp: &ChatResponse, model: &str) -> Value {
    let choice = resp
        .choices
        .iter()
        .find(|c| c.index == 0)
        .or(resp.choices.first());
    let mut content = Vec::new();
    let mut reason = "end_turn";
    if let Some(choice) = choice {
        content.extend(thinking_blocks(&choice.message));
        let text = choice.message.text();
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        let calls = choice.message.tool_calls.as_deref().unwrap_or_default();
        for call in calls {
            content.push(json!({
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": tool_input(&call.function.arguments),
            }));
        }
        reason = match choice.finish_reason.as_deref() {
            Some(r) => stop_reason(r),
            None if !calls.is_empty() => "tool_use",
            None => "end_turn",
        };
    }
    let usage = usage_json(&resp.usage.unwrap_or_default());
    json!({
        "id": message_id(&resp.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": null,
        "usage": usage,
    })
}

/// The Anthropic error body for a status: `{"type":"error","error":{"type":..,"message":..}}`.
pub fn error_body(status: http::StatusCode, message: &str) -> Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

// ---------------------------------------------------------------------------------------------
// Streams: canonical chunks -> Anthropic events
// ---------------------------------------------------------------------------------------------

/// The content block currently open in the Anthropic stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    /// A text block at this Anthropic index.
    Text(u32),
    /// A `tool_use` block at this Anthropic index.
    Tool(u32),
    /// A `thinking` block at this Anthropic index.
    Thinking(u32),
}

/// Encodes canonical chunks as an Anthropic Messages event stream.
///
/// Event order, as Anthropic sends it: `message_start` once; per content block
/// `content_block_start`, `content_block_delta`s, `content_block_stop` (one block open at a
/// time, indexes counting from 0); `message_delta` with the stop reason and usage;
/// `message_stop`. Only choice 0 is encoded.
///
/// The canonical stream may give the finish reason and the usage in separate chunks, in
/// either order, so `message_delta` waits until both are known, or until [`Self::finish`].
#[derive(Debug)]
pub struct MessagesStreamEncoder {
    model: String,
    started: bool,
    open: Option<OpenBlock>,
    next_index: u32,
    /// OpenAI tool-call index -> Anthropic block index.
    tools: HashMap<u32, u32>,
    stop_reason: Option<&'static str>,
    usage: Option<Usage>,
    delta_sent: bool,
    finished: bool,
}

impl MessagesStreamEncoder {
    /// An encoder for one response; `model` is the name reported to the client.
    pub fn new(model: &str) -> Self {
        MessagesStreamEncoder {
            model: model.to_owned(),
            started: false,
            open: None,
            next_index: 0,
            tools: HashMap::new(),
            stop_reason: None,
            usage: None,
            delta_sent: false,
            finished: false,
        }
    }

    /// Encodes one canonical chunk, pushing zero or more SSE frames onto `out`.
    pub fn encode(&mut self, chunk: &ChatChunk, out: &mut Vec<Bytes>) {
        if self.finished {
            return;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        self.start(&chunk.id, out);
        if let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) {
            let reasoning = choice.delta.reasoning_content.as_deref();
            if let Some(text) = reasoning.filter(|t| !t.is_empty()) {
                let index = match self.open {
                    Some(OpenBlock::Thinking(index)) => index,
                    _ => self.open_block(
                        OpenBlock::Thinking,
                        json!({"type": "thinking", "thinking": "", "signature": ""}),
                        out,
                    ),
                };
                let delta = json!({"type": "thinking_delta", "thinking": text});
                self.block_delta(index, delta, out);
            }
            if let Some(text) = choice.delta.content.as_deref().filter(|t| !t.is_empty()) {
                let index = match self.open {
                    Some(OpenBlock::Text(index)) => index,
                    _ => self.open_block(OpenBlock::Text, json!({"type": "text", "text": ""}), out),
                };
                let delta = json!({"type": "text_delta", "text": text});
                self.block_delta(index, delta, out);
            }
            for call in choice.delta.tool_calls.iter().flatten() {
                let index = match self.tools.get(&call.index) {
                    Some(&index) => index,
                    None => {
                        let name = call.function.as_ref().and_then(|f| f.name.clone());
                        let id = call
                            .id
                            .clone()
                            .unwrap_or_else(|| format!("toolu_{}", uuid::Uuid::new_v4().simple()));
                        let block = json!({
                            "type": "tool_use",
                            "id": id,
                            "name": name.unwrap_or_default(),
                            "input": {},
                        });
                        let index = self.open_block(OpenBlock::Tool, block, out);
                        self.tools.insert(call.index, index);
                        index
                    }
                };
                let args = call.function.as_ref().and_then(|f| f.arguments.as_deref());
                if let Some(args) = args.filter(|a| !a.is_empty()) {
                    // Fragments of an earlier, already closed call (rare interleaving) are
                    // still sent to that call's block, which Anthropic SDKs accumulate by index.
                    let delta = json!({"type": "input_json_delta", "partial_json": args});
                    self.block_delta(index, delta, out);
                }
            }
            if let Some(reason) = choice.finish_reason.as_deref() {
                self.stop_reason = Some(stop_reason(reason));
            }
        }
        if self.stop_reason.is_some() && self.usage.is_some() {
            self.message_delta(out);
        }
    }

    /// Ends the stream: closes any open block, sends `message_delta` if it is still due and
    /// `message_stop`. Safe to call more than once and after an odd upstream ending.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.finished {
            return;
        }
        self.start("", out);
        self.message_delta(out);
        out.push(frame("message_stop", &json!({"type": "message_stop"})));
        self.finished = true;
    }

    /// Sends an Anthropic `error` event and ends the stream (a later [`Self::finish`] sends
    /// nothing).
    pub fn error(&mut self, message: &str, out: &mut Vec<Bytes>) {
        if self.finished {
            return;
        }
        let body = error_body(http::StatusCode::INTERNAL_SERVER_ERROR, message);
        out.push(frame("error", &body));
        self.finished = true;
    }

    /// Sends `message_start` before the first event.
    fn start(&mut self, id: &str, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        // Output is counted in `message_delta`; input is known here only if a provider sent
        // usage up front.
        let mut usage = usage_json(&self.usage.unwrap_or_default());
        usage["output_tokens"] = json!(0);
        let message = json!({
            "type": "message_start",
            "message": {
                "id": message_id(id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage,
            },
        });
        out.push(frame("message_start", &message));
    }

    /// Closes the open block and starts a new one; returns its index.
    fn open_block(
        &mut self,
        kind: impl FnOnce(u32) -> OpenBlock,
        block: Value,
        out: &mut Vec<Bytes>,
    ) -> u32 {
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some(kind(index));
        let event = json!({"type": "content_block_start", "index": index, "content_block": block});
        out.push(frame("content_block_start", &event));
        index
    }

    fn close_block(&mut self, out: &mut Vec<Bytes>) {
        if let Some(OpenBlock::Text(index) | OpenBlock::Tool(index) | OpenBlock::Thinking(index)) =
            self.open.take()
        {
            let event = json!({"type": "content_block_stop", "index": index});
            out.push(frame("content_block_stop", &event));
        }
    }

    fn block_delta(&mut self, index: u32, delta: Value, out: &mut Vec<Bytes>) {
        let event = json!({"type": "content_block_delta", "index": index, "delta": delta});
        out.push(frame("content_block_delta", &event));
    }

    /// Closes the open block and sends `message_delta`, once.
    fn message_delta(&mut self, out: &mut Vec<Bytes>) {
        if self.delta_sent {
            return;
        }
        self.delta_sent = true;
        self.close_block(out);
        let reason = self.stop_reason.unwrap_or(if self.tools.is_empty() {
            "end_turn"
        } else {
            "tool_use"
        });
        let usage = usage_json(&self.usage.unwrap_or_default());
        let event = json!({
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": null},
            "usage": usage,
        });
        out.push(frame("message_delta", &event));
    }
}

/// One named event; `Value` serialization cannot fail.
fn frame(event: &str, data: &Value) -> Bytes {
    named_frame(event, data.to_string().as_bytes())
}

/// Golden-file helpers shared by the Anthropic translation tests (this module and
/// [`crate::provider::anthropic`]). `WEIR_BLESS=1` rewrites the expected files.
#[cfg(test)]
pub(crate) mod golden {
    use serde_json::Value;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/anthropic/");

    fn bless() -> bool {
        std::env::var("WEIR_BLESS").is_ok_and(|v| v == "1")
    }

    /// Reads a fixture.
    pub(crate) fn read(name: &str) -> String {
        let path = format!("{DIR}{name}");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn write(name: &str, text: &str) {
        let path = std::path::PathBuf::from(format!("{DIR}{name}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create golden dir");
        }
        std::fs::write(&path, text).expect("write golden");
    }

    /// Compares `actual` with the JSON in `name`, as values (key order and spacing ignored).
    pub(crate) fn check_json(name: &str, actual: &Value) {
        if bless() {
            let text = serde_json::to_string_pretty(actual).expect("json") + "\n";
            write(name, &text);
            return;
        }
        let expected: Value = serde_json::from_str(&read(name)).expect("golden is JSON");
        assert_eq!(
            actual,
            &expected,
            "{name} differs; actual:\n{}",
            serde_json::to_string_pretty(actual).expect("json")
        );
    }

    /// Compares `actual` with the text in `name`, byte for byte.
    pub(crate) fn check_text(name: &str, actual: &str) {
        if bless() {
            write(name, actual);
            return;
        }
        let expected = read(name);
        assert_eq!(actual, expected, "{name} differs; actual:\n{actual}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::ChatResponse;

    fn inbound_request(case: &str) {
        let input = golden::read(&format!("inbound/request/{case}.in.json"));
        let req: MessagesRequest = serde_json::from_str(&input).expect("request fixture");
        let chat = to_chat_request(req).expect("translate");
        let actual = serde_json::to_value(&chat).expect("json");
        golden::check_json(&format!("inbound/request/{case}.out.json"), &actual);
    }

    #[test]
    fn request_tool_results() {
        inbound_request("tool_results");
    }

    #[test]
    fn request_system_images_stream() {
        inbound_request("system_images_stream");
    }

    #[test]
    fn response_text_and_tool_use() {
        let input = golden::read("inbound/response/text_tool_use.in.json");
        let resp: ChatResponse = serde_json::from_str(&input).expect("response fixture");
        let actual = from_chat_response(&resp, "claude-alias");
        golden::check_json("inbound/response/text_tool_use.out.json", &actual);
    }

    fn inbound_stream(case: &str) {
        let input = golden::read(&format!("inbound/stream/{case}.in.json"));
        let chunks: Vec<ChatChunk> = serde_json::from_str(&input).expect("chunks fixture");
        let mut enc = MessagesStreamEncoder::new("claude-alias");
        let mut out = Vec::new();
        for c in &chunks {
            enc.encode(c, &mut out);
        }
        enc.finish(&mut out);
        let before = out.len();
        enc.finish(&mut out);
        assert_eq!(out.len(), before, "finish is idempotent");
        let text: String = out
            .iter()
            .map(|b| std::str::from_utf8(b).expect("utf8"))
            .collect();
        golden::check_text(&format!("inbound/stream/{case}.out.sse"), &text);
    }

    #[test]
    fn response_thinking_and_cache_usage() {
        let input = golden::read("inbound/response/thinking_cache.in.json");
        let resp: ChatResponse = serde_json::from_str(&input).expect("response fixture");
        let actual = from_chat_response(&resp, "claude-alias");
        golden::check_json("inbound/response/thinking_cache.out.json", &actual);
    }

    #[test]
    fn stream_reasoning_content_becomes_thinking() {
        inbound_stream("thinking");
    }

    #[test]
    fn stream_text() {
        inbound_stream("text");
    }

    #[test]
    fn stream_text_and_two_tools() {
        inbound_stream("tools");
    }

    fn events(out: &[Bytes]) -> Vec<String> {
        out.iter()
            .map(|b| {
                let s = std::str::from_utf8(b).expect("utf8");
                s.lines()
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .expect("named event")
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn stream_closes_cleanly_when_upstream_ends_early() {
        let mut enc = MessagesStreamEncoder::new("m");
        let mut out = Vec::new();
        let chunk: ChatChunk = serde_json::from_str(
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
        )
        .expect("chunk");
        enc.encode(&chunk, &mut out);
        enc.finish(&mut out);
        assert_eq!(
            events(&out),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );

        let mut empty = MessagesStreamEncoder::new("m");
        let mut out = Vec::new();
        empty.finish(&mut out);
        assert_eq!(
            events(&out),
            ["message_start", "message_delta", "message_stop"]
        );
    }

    #[test]
    fn stream_error_ends_the_stream() {
        let mut enc = MessagesStreamEncoder::new("m");
        let mut out = Vec::new();
        enc.error("upstream timed out", &mut out);
        enc.finish(&mut out);
        assert_eq!(events(&out), ["error"]);
        let data = std::str::from_utf8(&out[0])
            .expect("utf8")
            .lines()
            .nth(1)
            .and_then(|l| l.strip_prefix("data: "))
            .expect("data")
            .to_owned();
        let v: Value = serde_json::from_str(&data).expect("json");
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["message"], "upstream timed out");
    }

    #[test]
    fn bad_requests_name_the_field() {
        let req: MessagesRequest = serde_json::from_str(
            r#"{"model":"m","max_tokens":10,"messages":[
                {"role":"user","content":"hi"},
                {"role":"assistant","content":[{"type":"future_block","id":"x"}]}]}"#,
        )
        .expect("req");
        let err = to_chat_request(req).expect_err("bad block");
        assert_eq!(err.field.as_deref(), Some("messages[1].content[0].type"));

        let req: MessagesRequest = serde_json::from_str(
            r#"{"model":"m","max_tokens":10,"messages":[
                {"role":"user","content":"hi"},
                {"role":"assistant","content":[{"type":"server_tool_use","id":"x"},
                    {"type":"thinking","thinking":"hmm","signature":"sig"},
                    {"type":"text","text":"ok"}]}]}"#,
        )
        .expect("req");
        let chat = to_chat_request(req).expect("server tool blocks are dropped");
        let reasoning = chat.messages[1].reasoning.as_deref().expect("reasoning");
        assert_eq!(reasoning[0].text.as_deref(), Some("hmm"));
        assert_eq!(reasoning[0].signature.as_deref(), Some("sig"));

        let req: MessagesRequest =
            serde_json::from_str(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#)
                .expect("req");
        let err = to_chat_request(req).expect_err("bad role");
        assert_eq!(err.field.as_deref(), Some("messages[0].role"));

        let req: MessagesRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
        )
        .expect("req");
        let chat = to_chat_request(req).expect("server tools are dropped");
        assert_eq!(chat.tools, None);
    }

    #[test]
    fn error_bodies_by_status() {
        use http::StatusCode;
        let kind = |s: StatusCode| error_body(s, "x")["error"]["type"].clone();
        assert_eq!(kind(StatusCode::BAD_REQUEST), "invalid_request_error");
        assert_eq!(kind(StatusCode::UNAUTHORIZED), "authentication_error");
        assert_eq!(kind(StatusCode::FORBIDDEN), "permission_error");
        assert_eq!(kind(StatusCode::NOT_FOUND), "not_found_error");
        assert_eq!(kind(StatusCode::PAYLOAD_TOO_LARGE), "request_too_large");
        assert_eq!(kind(StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(kind(StatusCode::BAD_GATEWAY), "api_error");
        assert_eq!(kind(StatusCode::SERVICE_UNAVAILABLE), "overloaded_error");
        assert_eq!(error_body(StatusCode::BAD_REQUEST, "oops")["type"], "error");
    }
}
