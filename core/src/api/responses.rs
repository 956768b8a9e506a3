//! The OpenAI Responses API (`POST /v1/responses`), translated to and from the canonical
//! chat form so that every provider serves it and every plugin sees it as a chat request.
//!
//! - [`ResponsesRequest`] → [`to_chat_request`]: `instructions` become a leading system
//!   message, input items become messages (`message`, `function_call`,
//!   `function_call_output`, `reasoning`), function tools become chat tools, `text.format`
//!   becomes `response_format`, `reasoning.effort` becomes `reasoning_effort`. Hosted tools
//!   (web search, file search, namespaces...) have no chat equivalent: they are dropped with
//!   a debug log, never sent upstream.
//! - [`response_object`]: a canonical answer as a `response` object with its output items.
//! - [`ResponsesStreamEncoder`]: canonical chunks as the typed Responses events
//!   (`response.created`, `response.output_item.added`, `response.output_text.delta`,
//!   `response.function_call_arguments.delta`, ..., `response.completed`).
//! - [`Stored`]: what `store` keeps for `previous_response_id` and `GET /v1/responses/{id}`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::BadRequest;
use super::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, FunctionCall, FunctionDef,
    ImageUrl, MessageContent, Reasoning, Rest, Tool, ToolCall, Usage,
};
use super::sse::named_frame;

/// `POST /v1/responses` request body. Fields Weir does not use are kept in `rest` and echoed
/// nowhere: they are not chat-completions fields and never reach a chat upstream.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponsesRequest {
    /// Model name from Weir's config.
    pub model: String,
    /// A string (one user message) or a list of input items.
    #[serde(default)]
    pub input: Option<Value>,
    /// A system (developer) message for this response only; not carried over by
    /// `previous_response_id`.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Answer as typed server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Tools (`function` tools are served; hosted tools are dropped).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `auto`, `none`, `required` or `{"type":"function","name":..}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether the model may call several tools at once.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Output-token limit.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}, "verbosity": ..}`.
    #[serde(default)]
    pub text: Option<Value>,
    /// `{"effort": "low" | "medium" | "high", "summary": ..}`.
    #[serde(default)]
    pub reasoning: Option<Value>,
    /// Continue the conversation of a stored response.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Keep the response for `previous_response_id` and `GET` (default true, as OpenAI).
    #[serde(default)]
    pub store: Option<bool>,
    /// Caller's key-value metadata, echoed in the response.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// End-user identifier.
    #[serde(default)]
    pub user: Option<String>,
    /// Everything else (`include`, `truncation`, `prompt_cache_key`, ...).
    #[serde(flatten)]
    pub rest: Rest,
}

impl ResponsesRequest {
    /// Whether the response is stored (`store` defaults to true).
    pub fn store(&self) -> bool {
        self.store.unwrap_or(true)
    }
}

/// The parts of a request the response object echoes back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Echo {
    /// The model name the client asked for.
    pub model: String,
    /// `instructions`.
    pub instructions: Option<String>,
    /// The tools as the client sent them.
    pub tools: Vec<Value>,
    /// `tool_choice` (default `auto`).
    pub tool_choice: Value,
    /// `parallel_tool_calls` (default true).
    pub parallel_tool_calls: bool,
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// `previous_response_id`.
    pub previous_response_id: Option<String>,
    /// `store`.
    pub store: bool,
    /// `text` (default `{"format":{"type":"text"}}`).
    pub text: Value,
    /// `reasoning`.
    pub reasoning: Value,
    /// `metadata` (default `{}`).
    pub metadata: Value,
    /// `user`.
    pub user: Option<String>,
}

/// A translated request: the chat request to serve, the conversation to store, and what
/// the response echoes.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The canonical request (instructions first, then history, then the new input).
    pub chat: ChatRequest,
    /// The conversation without `instructions`: history plus the new input. The answer is
    /// appended to it when the response is stored.
    pub conversation: Vec<ChatMessage>,
    /// Fields echoed in the response object.
    pub echo: Echo,
}

/// Translates a Responses request into the canonical chat form. `history` is the stored
/// conversation of `previous_response_id` (empty without one).
pub fn to_chat_request(
    req: ResponsesRequest,
    history: Vec<ChatMessage>,
) -> Result<Translated, BadRequest> {
    let mut conversation = history;
    match &req.input {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => conversation.push(text_message("user", s)),
        Some(Value::Array(items)) => input_items(items, &mut conversation)?,
        Some(_) => {
            return Err(BadRequest::field(
                "input",
                "input must be a string or an array of input items",
            ));
        }
    }
    if conversation.is_empty() {
        return Err(BadRequest::field("input", "input must not be empty"));
    }
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(instructions) = req.instructions.as_deref().filter(|i| !i.is_empty()) {
        messages.push(text_message("system", instructions));
    }
    messages.extend(conversation.iter().cloned());

    let mut tools = Vec::new();
    for (i, t) in req.tools.iter().flatten().enumerate() {
        if let Some(tool) = function_tool(t, i)? {
            tools.push(tool);
        }
    }
    let tool_choice = match &req.tool_choice {
        None => None,
        Some(Value::String(s)) => Some(Value::String(s.clone())),
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::field("tool_choice.name", "a function tool_choice needs a name")
            })?;
            Some(json!({"type": "function", "function": {"name": name}}))
        }
        Some(other) => {
            tracing::debug!(tool_choice = %other, "Responses tool_choice has no chat equivalent; using auto.");
            None
        }
    };
    let mut rest = Rest::new();
    if let Some(effort) = req
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
    {
        rest.insert("reasoning_effort".into(), json!(effort));
    }
    if let Some(verbosity) = req.text.as_ref().and_then(|t| t.get("verbosity")) {
        rest.insert("verbosity".into(), verbosity.clone());
    }
    for key in req.rest.keys() {
        tracing::debug!(field = %key, "Responses field not forwarded to a chat upstream.");
    }
    let response_format = req
        .text
        .as_ref()
        .and_then(|t| t.get("format"))
        .map(response_format)
        .transpose()?
        .flatten();

    let echo = Echo {
        model: req.model.clone(),
        instructions: req.instructions.clone(),
        tools: req.tools.clone().unwrap_or_default(),
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        temperature: req.temperature,
        top_p: req.top_p,
        max_output_tokens: req.max_output_tokens,
        previous_response_id: req.previous_response_id.clone(),
        store: req.store(),
        text: req
            .text
            .clone()
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        reasoning: req
            .reasoning
            .clone()
            .unwrap_or_else(|| json!({"effort": null, "summary": null})),
        metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
        user: req.user.clone(),
    };
    let chat = ChatRequest {
        model: req.model,
        messages,
        stream: req.stream,
        stream_options: None,
        tools: (!tools.is_empty()).then_some(tools),
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
        max_tokens: None,
        max_completion_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        n: None,
        stop: None,
        response_format,
        user: req.user,
        rest,
    };
    Ok(Translated {
        chat,
        conversation,
        echo,
    })
}

fn text_message(role: &str, text: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: Some(MessageContent::Text(text.to_owned())),
        ..Default::default()
    }
}

fn str_field<'a>(item: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, BadRequest> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::field(format!("{at}.{key}"), format!("{key} must be a string")))
}

/// Appends the messages of `items` to `out`: consecutive function calls (and the reasoning
/// before them) become one assistant message, as chat completions expects.
fn input_items(items: &[Value], out: &mut Vec<ChatMessage>) -> Result<(), BadRequest> {
    let mut reasoning: Vec<Reasoning> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(obj) = item.as_object() else {
            return Err(BadRequest::field(at, "an input item must be an object"));
        };
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = str_field(obj, "role", &at)?;
                let role = match role {
                    "user" | "assistant" | "system" | "developer" => role,
                    other => {
                        return Err(BadRequest::field(
                            format!("{at}.role"),
                            format!(
                                "unknown role '{other}' (expected user, assistant, system or developer)"
                            ),
                        ));
                    }
                };
                let content = message_content(obj.get("content"), &format!("{at}.content"))?;
                let mut msg = ChatMessage {
                    role: role.to_owned(),
                    content: Some(content),
                    ..Default::default()
                };
                if role == "assistant" && !reasoning.is_empty() {
                    msg.reasoning = Some(std::mem::take(&mut reasoning));
                }
                out.push(msg);
            }
            "function_call" | "custom_tool_call" => {
                let call_id = str_field(obj, "call_id", &at)?;
                let name = str_field(obj, "name", &at)?;
                let arguments = if kind == "function_call" {
                    str_field(obj, "arguments", &at)?.to_owned()
                } else {
                    json!({"input": obj.get("input").and_then(Value::as_str).unwrap_or_default()})
                        .to_string()
                };
                let call = ToolCall {
                    id: call_id.to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: name.to_owned(),
                        arguments,
                    },
                };
                // Join the assistant message just before when it is still this turn's
                // (text or calls, no tool result yet).
                match out.last_mut() {
                    Some(last) if last.role == "assistant" && reasoning.is_empty() => {
                        last.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(ChatMessage {
                        role: "assistant".into(),
                        tool_calls: Some(vec![call]),
                        reasoning: (!reasoning.is_empty()).then(|| std::mem::take(&mut reasoning)),
                        ..Default::default()
                    }),
                }
            }
            "function_call_output" | "custom_tool_call_output" => {
                let call_id = str_field(obj, "call_id", &at)?;
                let output = match obj.get("output") {
                    Some(Value::String(s)) => MessageContent::Text(s.clone()),
                    Some(v @ Value::Array(_)) => message_content(Some(v), &format!("{at}.output"))?,
                    _ => {
                        return Err(BadRequest::field(
                            format!("{at}.output"),
                            "output must be a string or an array of content parts",
                        ));
                    }
                };
                out.push(ChatMessage {
                    role: "tool".into(),
                    content: Some(output),
                    tool_call_id: Some(call_id.to_owned()),
                    ..Default::default()
                });
            }
            "reasoning" => {
                let text: Vec<&str> = obj
                    .get("summary")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.get("text").and_then(Value::as_str))
                    .collect();
                let encrypted = obj
                    .get("encrypted_content")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let id = obj.get("id").and_then(Value::as_str).map(str::to_owned);
                reasoning.push(if text.is_empty() && encrypted.is_some() {
                    Reasoning {
                        kind: Reasoning::REDACTED.into(),
                        data: encrypted,
                        id,
                        ..Default::default()
                    }
                } else {
                    Reasoning {
                        kind: Reasoning::THINKING.into(),
                        text: Some(text.join("\n\n")),
                        signature: encrypted,
                        id,
                        ..Default::default()
                    }
                });
            }
            "item_reference" => {
                return Err(BadRequest::field(
                    format!("{at}.type"),
                    "item_reference is not supported; send the item itself or use previous_response_id",
                ));
            }
            other => {
                // Hosted-tool items (web_search_call, file_search_call, ...) describe work
                // done by OpenAI's servers; a chat upstream cannot take them back.
                tracing::debug!(item = %other, index = i, "Responses input item has no chat equivalent; dropped.");
            }
        }
    }
    if !reasoning.is_empty() {
        tracing::debug!(
            count = reasoning.len(),
            "Reasoning items not followed by an assistant item; dropped."
        );
    }
    Ok(())
}

/// Message content: a string, or input/output parts (`input_text`, `output_text`,
/// `input_image`, `input_file`, `refusal`).
fn message_content(content: Option<&Value>, at: &str) -> Result<MessageContent, BadRequest> {
    let parts = match content {
        Some(Value::String(s)) => return Ok(MessageContent::Text(s.clone())),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(BadRequest::field(
                at,
                "content must be a string or an array of content parts",
            ));
        }
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let obj = part
            .as_object()
            .ok_or_else(|| BadRequest::field(&at, "a content part must be an object"))?;
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "input_text" | "output_text" | "text" | "refusal" => {
                let key = if kind == "refusal" { "refusal" } else { "text" };
                out.push(ContentPart {
                    kind: "text".into(),
                    text: Some(str_field(obj, key, &at)?.to_owned()),
                    image_url: None,
                    rest: Rest::new(),
                });
            }
            "input_image" => {
                let url = obj
                    .get("image_url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        BadRequest::field(
                            format!("{at}.image_url"),
                            "input_image needs image_url (file_id is not supported)",
                        )
                    })?;
                out.push(ContentPart {
                    kind: "image_url".into(),
                    text: None,
                    image_url: Some(ImageUrl {
                        url: url.to_owned(),
                        detail: obj.get("detail").and_then(Value::as_str).map(str::to_owned),
                    }),
                    rest: Rest::new(),
                });
            }
            "input_file" => {
                let data = str_field(obj, "file_data", &at)?;
                let mut file = Map::new();
                file.insert("file_data".into(), json!(data));
                if let Some(name) = obj.get("filename") {
                    file.insert("filename".into(), name.clone());
                }
                let mut rest = Rest::new();
                rest.insert("file".into(), Value::Object(file));
                out.push(ContentPart {
                    kind: "file".into(),
                    text: None,
                    image_url: None,
                    rest,
                });
            }
            other => {
                return Err(BadRequest::field(
                    format!("{at}.type"),
                    format!("unsupported content part type '{other}'"),
                ));
            }
        }
    }
    // One text part is plain text: simpler for every upstream.
    if let [only] = out.as_slice()
        && only.kind == "text"
        && let Some(text) = &only.text
    {
        return Ok(MessageContent::Text(text.clone()));
    }
    Ok(MessageContent::Parts(out))
}

/// A `function` tool as a chat tool; hosted tools give `None` (dropped with a debug log).
fn function_tool(t: &Value, i: usize) -> Result<Option<Tool>, BadRequest> {
    let kind = t.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind != "function" {
        tracing::debug!(tool = %kind, index = i, "Responses tool has no chat equivalent; dropped.");
        return Ok(None);
    }
    let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
        BadRequest::field(format!("tools[{i}].name"), "a function tool needs a name")
    })?;
    let mut rest = Rest::new();
    if let Some(strict) = t.get("strict").filter(|s| !s.is_null()) {
        rest.insert("strict".into(), strict.clone());
    }
    Ok(Some(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: name.to_owned(),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            parameters: t.get("parameters").filter(|p| !p.is_null()).cloned(),
            rest,
        },
    }))
}

/// `text.format` as a chat `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, BadRequest> {
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            if !schema.contains_key("schema") {
                return Err(BadRequest::field(
                    "text.format.schema",
                    "a json_schema format needs a schema",
                ));
            }
            schema.entry("name").or_insert_with(|| json!("response"));
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(BadRequest::field(
            "text.format.type",
            format!("unknown text format '{other}' (expected text, json_object or json_schema)"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses: canonical answer -> `response` object
// ---------------------------------------------------------------------------------------------

/// A new id with an OpenAI-style prefix (`resp`, `msg`, `fc`, `rs`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Responses `usage`.
pub fn usage_json(usage: &Usage) -> Value {
    let cached = usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
    })
}

fn reasoning_item(r: &Reasoning) -> Value {
    let id = r.id.clone().unwrap_or_else(|| new_id("rs"));
    if r.kind == Reasoning::REDACTED {
        return json!({"type": "reasoning", "id": id, "summary": [], "encrypted_content": r.data});
    }
    let summary = match r.text.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => json!([{"type": "summary_text", "text": t}]),
        None => json!([]),
    };
    let mut item = json!({"type": "reasoning", "id": id, "summary": summary});
    if let Some(sig) = &r.signature {
        item["encrypted_content"] = json!(sig);
    }
    item
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    })
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn function_call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// `status` and `incomplete_details` for a chat finish reason.
fn status_of(finish_reason: Option<&str>) -> (&'static str, Value) {
    match finish_reason {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The `response` object around `output`; `usage`, `incomplete_details` and `error` start
/// as `null`.
pub fn envelope(id: &str, created_at: u64, echo: &Echo, status: &str, output: Vec<Value>) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": echo.model,
        "output": output,
        "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": echo.previous_response_id,
        "reasoning": echo.reasoning,
        "store": echo.store,
        "temperature": echo.temperature,
        "text": echo.text,
        "tool_choice": echo.tool_choice,
        "tools": echo.tools,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": null,
        "user": echo.user,
        "metadata": echo.metadata,
    })
}

/// A canonical answer as a `response` object with id `id`, and the assistant message it
/// adds to the conversation. Only choice 0 is used.
pub fn response_object(resp: &ChatResponse, id: &str, echo: &Echo) -> (Value, ChatMessage) {
    let choice = resp
        .choices
        .iter()
        .find(|c| c.index == 0)
        .or(resp.choices.first());
    let mut output = Vec::new();
    let mut message = ChatMessage {
        role: "assistant".into(),
        ..Default::default()
    };
    let mut finish = None;
    if let Some(choice) = choice {
        for r in choice.message.reasoning.iter().flatten() {
            output.push(reasoning_item(r));
        }
        if let Some(text) = choice
            .message
            .rest
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && choice.message.reasoning.is_none())
        {
            output.push(reasoning_item(&Reasoning {
                kind: Reasoning::THINKING.into(),
                text: Some(text.to_owned()),
                ..Default::default()
            }));
        }
        let text = choice.message.text();
        if !text.is_empty() {
            output.push(message_item(&new_id("msg"), &text, "completed"));
        }
        for call in choice.message.tool_calls.iter().flatten() {
            output.push(function_call_item(
                &new_id("fc"),
                &call.id,
                &call.function.name,
                &call.function.arguments,
                "completed",
            ));
        }
        message = choice.message.clone();
        message.role = "assistant".into();
        finish = choice.finish_reason.as_deref();
    }
    let (status, incomplete) = status_of(finish);
    let created = if resp.created > 0 {
        resp.created
    } else {
        now_secs()
    };
    let mut object = envelope(id, created, echo, status, output);
    object["usage"] = usage_json(&resp.usage.unwrap_or_default());
    object["incomplete_details"] = incomplete;
    (object, message)
}

// ---------------------------------------------------------------------------------------------
// Streams: canonical chunks -> typed Responses events
// ---------------------------------------------------------------------------------------------

/// The output item the stream is writing into.
#[derive(Debug)]
enum Open {
    /// A message item at this output index, with its text so far.
    Text {
        output: usize,
        id: String,
        text: String,
    },
    /// A reasoning item: canonical block index, output index, id, summary text, signature.
    Reasoning {
        block: u32,
        output: usize,
        id: String,
        text: String,
        signature: Option<String>,
        data: Option<String>,
    },
}

/// A function call item being streamed.
#[derive(Debug)]
struct OpenCall {
    output: usize,
    id: String,
    call_id: String,
    name: String,
    arguments: String,
    done: bool,
}

/// Encodes canonical chunks as a Responses event stream.
///
/// Events, as OpenAI sends them: `response.created` and `response.in_progress` first; per
/// output item `response.output_item.added`, its deltas (`response.output_text.delta`,
/// `response.reasoning_summary_text.delta`, `response.function_call_arguments.delta`) and
/// `...done` events, then `response.output_item.done`; finally `response.completed` (or
/// `response.incomplete` when the answer was cut at `max_output_tokens`, `response.failed`
/// on an error) with the whole response. Every event carries a `sequence_number`. Only
/// choice 0 is encoded.
#[derive(Debug)]
pub struct ResponsesStreamEncoder {
    id: String,
    created_at: u64,
    echo: Echo,
    started: bool,
    sequence: u64,
    open: Option<Open>,
    calls: Vec<(u32, OpenCall)>,
    /// Finished output items, by output index (`Value::Null` while one is open).
    output: Vec<Value>,
    /// The assistant message, for the stored conversation.
    message: ChatMessage,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    finished: bool,
    /// The final `response` object, once the stream ended.
    result: Option<Value>,
}

impl ResponsesStreamEncoder {
    /// An encoder for response `id`, echoing `echo`.
    pub fn new(id: &str, echo: Echo) -> Self {
        ResponsesStreamEncoder {
            id: id.to_owned(),
            created_at: now_secs(),
            echo,
            started: false,
            sequence: 0,
            open: None,
            calls: Vec::new(),
            output: Vec::new(),
            message: ChatMessage {
                role: "assistant".into(),
                ..Default::default()
            },
            finish_reason: None,
            usage: None,
            finished: false,
            result: None,
        }
    }

    fn event(&mut self, kind: &str, mut data: Value, out: &mut Vec<Bytes>) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push(named_frame(kind, data.to_string().as_bytes()));
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = envelope(
            &self.id,
            self.created_at,
            &self.echo,
            "in_progress",
            Vec::new(),
        );
        self.event("response.created", json!({"response": response}), out);
        let response = envelope(
            &self.id,
            self.created_at,
            &self.echo,
            "in_progress",
            Vec::new(),
        );
        self.event("response.in_progress", json!({"response": response}), out);
    }

    fn add_item(&mut self, item: Value, out: &mut Vec<Bytes>) -> usize {
        let index = self.output.len();
        self.output.push(Value::Null);
        self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        index
    }

    /// Closes the open text or reasoning item.
    fn close_open(&mut self, out: &mut Vec<Bytes>) {
        match self.open.take() {
            None => {}
            Some(Open::Text { output, id, text }) => {
                let base = json!({"item_id": id, "output_index": output, "content_index": 0});
                let mut done = base.clone();
                done["text"] = json!(text);
                done["logprobs"] = json!([]);
                self.event("response.output_text.done", done, out);
                let mut part = base;
                part["part"] = output_text(&text);
                self.event("response.content_part.done", part, out);
                let item = message_item(&id, &text, "completed");
                self.output[output] = item.clone();
                self.event(
                    "response.output_item.done",
                    json!({"output_index": output, "item": item}),
                    out,
                );
                let mut all = self.message.text();
                all.push_str(&text);
                self.message.content = Some(MessageContent::Text(all));
            }
            Some(Open::Reasoning {
                output,
                id,
                text,
                signature,
                data,
                ..
            }) => {
                let r = if data.is_some() && text.is_empty() {
                    Reasoning {
                        kind: Reasoning::REDACTED.into(),
                        data,
                        id: Some(id.clone()),
                        ..Default::default()
                    }
                } else {
                    Reasoning {
                        kind: Reasoning::THINKING.into(),
                        text: Some(text.clone()),
                        signature,
                        id: Some(id.clone()),
                        ..Default::default()
                    }
                };
                if !text.is_empty() {
                    let base = json!({"item_id": id, "output_index": output, "summary_index": 0});
                    let mut done = base.clone();
                    done["text"] = json!(text);
                    self.event("response.reasoning_summary_text.done", done, out);
                    let mut part = base;
                    part["part"] = json!({"type": "summary_text", "text": text});
                    self.event("response.reasoning_summary_part.done", part, out);
                }
                let item = reasoning_item(&r);
                self.output[output] = item.clone();
                self.event(
                    "response.output_item.done",
                    json!({"output_index": output, "item": item}),
                    out,
                );
                self.message.reasoning.get_or_insert_with(Vec::new).push(r);
            }
        }
    }

    fn close_call(&mut self, at: usize, out: &mut Vec<Bytes>) {
        let call = &mut self.calls[at].1;
        if call.done {
            return;
        }
        call.done = true;
        let (output, id, call_id, name, arguments) = (
            call.output,
            call.id.clone(),
            call.call_id.clone(),
            call.name.clone(),
            call.arguments.clone(),
        );
        self.event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": output, "name": name, "arguments": arguments}),
            out,
        );
        let item = function_call_item(&id, &call_id, &name, &arguments, "completed");
        self.output[output] = item.clone();
        self.event(
            "response.output_item.done",
            json!({"output_index": output, "item": item}),
            out,
        );
        self.message
            .tool_calls
            .get_or_insert_with(Vec::new)
            .push(ToolCall {
                id: call_id,
                kind: "function".into(),
                function: FunctionCall { name, arguments },
            });
    }

    fn close_calls(&mut self, out: &mut Vec<Bytes>) {
        for at in 0..self.calls.len() {
            self.close_call(at, out);
        }
    }

    fn text_delta(&mut self, delta: &str, out: &mut Vec<Bytes>) {
        if !matches!(self.open, Some(Open::Text { .. })) {
            self.close_open(out);
            self.close_calls(out);
            let id = new_id("msg");
            let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
            let output = self.add_item(item, out);
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": output, "content_index": 0, "part": output_text("")}),
                out,
            );
            self.open = Some(Open::Text {
                output,
                id,
                text: String::new(),
            });
        }
        if let Some(Open::Text { output, id, text }) = &mut self.open {
            text.push_str(delta);
            let data = json!({"item_id": id, "output_index": output, "content_index": 0, "delta": delta, "logprobs": []});
            self.event("response.output_text.delta", data, out);
        }
    }

    fn reasoning_delta(
        &mut self,
        block: u32,
        text: Option<&str>,
        signature: Option<&str>,
        data: Option<&str>,
        out: &mut Vec<Bytes>,
    ) {
        let same = matches!(&self.open, Some(Open::Reasoning { block: b, .. }) if *b == block);
        if !same {
            self.close_open(out);
            self.close_calls(out);
            let id = new_id("rs");
            let item = json!({"type": "reasoning", "id": id, "summary": []});
            let output = self.add_item(item, out);
            self.open = Some(Open::Reasoning {
                block,
                output,
                id,
                text: String::new(),
                signature: None,
                data: None,
            });
        }
        let mut events = Vec::new();
        if let Some(Open::Reasoning {
            output,
            id,
            text: so_far,
            signature: sig,
            data: d,
            ..
        }) = &mut self.open
        {
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                let base = json!({"item_id": id, "output_index": output, "summary_index": 0});
                if so_far.is_empty() {
                    let mut part = base.clone();
                    part["part"] = json!({"type": "summary_text", "text": ""});
                    events.push(("response.reasoning_summary_part.added", part));
                }
                so_far.push_str(t);
                let mut delta = base;
                delta["delta"] = json!(t);
                events.push(("response.reasoning_summary_text.delta", delta));
            }
            if let Some(s) = signature {
                sig.get_or_insert_with(String::new).push_str(s);
            }
            if let Some(x) = data {
                d.get_or_insert_with(String::new).push_str(x);
            }
        }
        for (kind, data) in events {
            self.event(kind, data, out);
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
        self.start(out);
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return;
        };
        let delta = &choice.delta;
        if let Some(parts) = &delta.reasoning_details {
            for p in parts {
                self.reasoning_delta(
                    p.index,
                    p.text.as_deref(),
                    p.signature.as_deref(),
                    p.data.as_deref(),
                    out,
                );
            }
        } else if let Some(t) = delta.reasoning_content.as_deref().filter(|t| !t.is_empty()) {
            self.reasoning_delta(u32::MAX, Some(t), None, None, out);
        }
        if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
            self.text_delta(text, out);
        }
        for call in delta.tool_calls.iter().flatten() {
            let at = match self.calls.iter().position(|(i, _)| *i == call.index) {
                Some(at) => at,
                None => {
                    self.close_open(out);
                    // One call streams at a time: the one before is finished.
                    self.close_calls(out);
                    let id = new_id("fc");
                    let call_id = call.id.clone().unwrap_or_else(|| new_id("call"));
                    let name = call
                        .function
                        .as_ref()
                        .and_then(|f| f.name.clone())
                        .unwrap_or_default();
                    let item = function_call_item(&id, &call_id, &name, "", "in_progress");
                    let output = self.add_item(item, out);
                    self.calls.push((
                        call.index,
                        OpenCall {
                            output,
                            id,
                            call_id,
                            name,
                            arguments: String::new(),
                            done: false,
                        },
                    ));
                    self.calls.len() - 1
                }
            };
            let args = call.function.as_ref().and_then(|f| f.arguments.as_deref());
            if let Some(args) = args.filter(|a| !a.is_empty()) {
                let c = &mut self.calls[at].1;
                c.arguments.push_str(args);
                if c.done {
                    // A fragment of a call already reported done (rare interleaving): kept
                    // in the final item, no event after its `done`.
                    let (output, arguments) = (c.output, c.arguments.clone());
                    if let Some(item) = self.output.get_mut(output) {
                        item["arguments"] = json!(arguments);
                    }
                    continue;
                }
                let data = json!({"item_id": c.id, "output_index": c.output, "delta": args});
                self.event("response.function_call_arguments.delta", data, out);
            }
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish_reason = Some(reason.clone());
        }
    }

    /// Ends the stream: closes open items and sends `response.completed` (or
    /// `response.incomplete`). Safe to call more than once.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.finished {
            return;
        }
        self.start(out);
        self.close_open(out);
        self.close_calls(out);
        self.finished = true;
        let (status, incomplete) = status_of(self.finish_reason.as_deref());
        let mut response = envelope(
            &self.id,
            self.created_at,
            &self.echo,
            status,
            self.output.clone(),
        );
        response["usage"] = usage_json(&self.usage.unwrap_or_default());
        response["incomplete_details"] = incomplete;
        let kind = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.event(kind, json!({"response": response.clone()}), out);
        self.result = Some(response);
    }

    /// Ends the stream with `response.failed` carrying `message` (a later
    /// [`Self::finish`] sends nothing). A failed response is not stored.
    pub fn error(&mut self, code: &str, message: &str, out: &mut Vec<Bytes>) {
        if self.finished {
            return;
        }
        self.start(out);
        self.close_open(out);
        self.close_calls(out);
        self.finished = true;
        let mut response = envelope(
            &self.id,
            self.created_at,
            &self.echo,
            "failed",
            self.output.clone(),
        );
        if let Some(u) = &self.usage {
            response["usage"] = usage_json(u);
        }
        response["error"] = json!({"code": code, "message": message});
        self.event("response.failed", json!({"response": response}), out);
    }

    /// The final `response` object and the assistant message, once [`Self::finish`] ran.
    pub fn take_result(&mut self) -> Option<(Value, ChatMessage)> {
        let response = self.result.take()?;
        Some((response, std::mem::take(&mut self.message)))
    }
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

/// A stored response: its object (for `GET`), the conversation up to and including its
/// answer (for `previous_response_id`), and whose it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// The credential scope that created it (see `server::responses`); others get 404.
    pub scope: String,
    /// The `response` object as the client received it.
    pub response: Value,
    /// The conversation: stored history, this request's input, and the answer.
    pub conversation: Vec<ChatMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::{
        ChunkChoice, Delta, FunctionCallDelta, ReasoningDelta, ToolCallDelta,
    };

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).expect("request")
    }

    #[test]
    fn input_items_become_chat_messages() {
        let t = to_chat_request(
            req(json!({
                "model": "m",
                "instructions": "be brief",
                "input": [
                    {"role": "user", "content": "list files"},
                    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}], "encrypted_content": "sig"},
                    {"type": "function_call", "call_id": "c1", "name": "sh", "arguments": "{\"cmd\":\"ls\"}"},
                    {"type": "function_call", "call_id": "c2", "name": "sh", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
                    {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "b"}]},
                    {"type": "web_search_call", "id": "ws_1"}
                ],
                "tools": [
                    {"type": "function", "name": "sh", "parameters": {"type": "object"}, "strict": false},
                    {"type": "web_search"}
                ],
                "tool_choice": {"type": "function", "name": "sh"},
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
                "reasoning": {"effort": "low"},
                "max_output_tokens": 50
            })),
            Vec::new(),
        )
        .expect("translates");
        let chat = serde_json::to_value(&t.chat).expect("json");
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(
            chat["messages"][1],
            json!({"role": "user", "content": "list files"})
        );
        let assistant = &chat["messages"][2];
        assert_eq!(assistant["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(assistant["reasoning_details"][0]["signature"], "sig");
        assert_eq!(chat["messages"][3]["tool_call_id"], "c1");
        assert_eq!(chat["messages"][4]["content"], "b");
        assert_eq!(chat["messages"].as_array().map(Vec::len), Some(5));
        assert_eq!(chat["tools"].as_array().map(Vec::len), Some(1));
        assert_eq!(chat["tool_choice"]["function"]["name"], "sh");
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
        assert_eq!(chat["reasoning_effort"], "low");
        assert_eq!(chat["max_completion_tokens"], 50);
        // The conversation to store has no instructions.
        assert_eq!(t.conversation.len(), 4);
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = to_chat_request(
            req(json!({"model": "m", "input": [{"type": "function_call", "name": "x"}]})),
            Vec::new(),
        )
        .expect_err("missing call_id");
        assert_eq!(e.field.as_deref(), Some("input[0].call_id"));
        let e = to_chat_request(req(json!({"model": "m", "input": []})), Vec::new())
            .expect_err("empty");
        assert_eq!(e.field.as_deref(), Some("input"));
        let e = to_chat_request(
            req(json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}})),
            Vec::new(),
        )
        .expect_err("format");
        assert_eq!(e.field.as_deref(), Some("text.format.type"));
    }

    fn chunk(delta: Delta, finish: Option<&str>) -> ChatChunk {
        ChatChunk {
            id: "c".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_owned),
                rest: Rest::new(),
            }],
            usage: None,
            rest: Rest::new(),
        }
    }

    fn events(out: &[Bytes]) -> Vec<Value> {
        out.iter()
            .map(|f| {
                let text = std::str::from_utf8(f).expect("utf8");
                let data = text
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("data line");
                serde_json::from_str(data).expect("json")
            })
            .collect()
    }

    #[test]
    fn stream_of_reasoning_text_and_a_tool_call() {
        let mut enc = ResponsesStreamEncoder::new("resp_1", Echo::default());
        let mut out = Vec::new();
        enc.encode(
            &chunk(
                Delta {
                    reasoning_details: Some(vec![ReasoningDelta {
                        index: 0,
                        kind: Some("thinking".into()),
                        text: Some("hmm".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                None,
            ),
            &mut out,
        );
        enc.encode(
            &chunk(
                Delta {
                    content: Some("Hel".into()),
                    ..Default::default()
                },
                None,
            ),
            &mut out,
        );
        enc.encode(
            &chunk(
                Delta {
                    content: Some("lo".into()),
                    ..Default::default()
                },
                None,
            ),
            &mut out,
        );
        for (id, args) in [(Some("call_1"), "{\"a\""), (None, ":1}")] {
            enc.encode(
                &chunk(
                    Delta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index: 0,
                            id: id.map(str::to_owned),
                            kind: None,
                            function: Some(FunctionCallDelta {
                                name: id.map(|_| "f".to_owned()),
                                arguments: Some(args.into()),
                            }),
                        }]),
                        ..Default::default()
                    },
                    None,
                ),
                &mut out,
            );
        }
        enc.encode(&chunk(Delta::default(), Some("tool_calls")), &mut out);
        enc.finish(&mut out);
        let evs = events(&out);
        let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let seq: Vec<u64> = evs
            .iter()
            .filter_map(|e| e["sequence_number"].as_u64())
            .collect();
        assert_eq!(seq, (0..evs.len() as u64).collect::<Vec<_>>());
        let done = &evs[evs.len() - 1]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][1]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][2]["arguments"], "{\"a\":1}");
        assert_eq!(done["output"][2]["call_id"], "call_1");
        let (_, message) = enc.take_result().expect("result");
        assert_eq!(message.text(), "Hello");
        assert_eq!(message.tool_calls.as_ref().map(Vec::len), Some(1));
        assert_eq!(message.reasoning.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn a_cut_answer_is_incomplete_and_an_error_fails() {
        let mut enc = ResponsesStreamEncoder::new("resp_1", Echo::default());
        let mut out = Vec::new();
        enc.encode(
            &chunk(
                Delta {
                    content: Some("x".into()),
                    ..Default::default()
                },
                Some("length"),
            ),
            &mut out,
        );
        enc.finish(&mut out);
        let last = events(&out).pop().expect("event");
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );

        let mut enc = ResponsesStreamEncoder::new("resp_2", Echo::default());
        let mut out = Vec::new();
        enc.error("upstream_error", "boom", &mut out);
        enc.finish(&mut out);
        let evs = events(&out);
        let last = evs.last().expect("event");
        assert_eq!(last["type"], "response.failed");
        assert_eq!(last["response"]["error"]["message"], "boom");
        assert!(enc.take_result().is_none());
    }

    // Golden files (tests/golden/responses): request translation, response objects and
    // event streams. Generated ids and timestamps are normalized (`<msg_id>`, 0).
    // `WEIR_BLESS=1` rewrites the expected files.
    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/responses/");

    fn read(name: &str) -> String {
        let path = format!("{DIR}{name}");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn check(name: &str, actual: &str) {
        if std::env::var("WEIR_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(format!("{DIR}{name}"), actual).expect("write golden");
            return;
        }
        assert_eq!(actual, read(name), "{name} differs; actual:\n{actual}");
    }

    fn normalize(v: &mut Value) {
        match v {
            Value::String(s) => {
                for prefix in ["msg", "fc", "rs", "call"] {
                    let rest = s.strip_prefix(prefix).and_then(|r| r.strip_prefix('_'));
                    if rest
                        .is_some_and(|r| r.len() == 32 && r.chars().all(|c| c.is_ascii_hexdigit()))
                    {
                        *s = format!("<{prefix}_id>");
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(normalize),
            Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    if k == "created_at" {
                        *val = json!(0);
                    } else {
                        normalize(val);
                    }
                }
            }
            _ => {}
        }
    }

    fn pretty(mut v: Value) -> String {
        normalize(&mut v);
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }

    fn golden_request(case: &str) {
        let r: ResponsesRequest =
            serde_json::from_str(&read(&format!("request/{case}.in.json"))).expect("fixture");
        let t = to_chat_request(r, Vec::new()).expect("translates");
        let out =
            json!({"chat": t.chat, "echo": t.echo, "stored_conversation": t.conversation.len()});
        check(&format!("request/{case}.out.json"), &pretty(out));
    }

    #[test]
    fn golden_request_agent_turn() {
        golden_request("agent_turn");
    }

    #[test]
    fn golden_request_multimodal_format() {
        golden_request("multimodal_format");
    }

    #[test]
    fn golden_response_text_and_tool_calls() {
        let resp: ChatResponse =
            serde_json::from_str(&read("response/text_tool_calls.in.json")).expect("fixture");
        let echo = Echo {
            model: "gpt".into(),
            tool_choice: json!("auto"),
            parallel_tool_calls: true,
            store: true,
            text: json!({"format": {"type": "text"}}),
            metadata: json!({}),
            ..Default::default()
        };
        let (object, message) = response_object(&resp, "resp_golden", &echo);
        check("response/text_tool_calls.out.json", &pretty(object));
        assert_eq!(message.tool_calls.as_ref().map(Vec::len), Some(2));
    }

    fn golden_stream(case: &str) {
        let chunks: Vec<ChatChunk> =
            serde_json::from_str(&read(&format!("stream/{case}.in.json"))).expect("fixture");
        let mut enc = ResponsesStreamEncoder::new("resp_golden", Echo::default());
        let mut out = Vec::new();
        for c in &chunks {
            enc.encode(c, &mut out);
        }
        enc.finish(&mut out);
        let before = out.len();
        enc.finish(&mut out);
        assert_eq!(out.len(), before, "finish is idempotent");
        let mut text = String::new();
        for frame in &out {
            let frame = std::str::from_utf8(frame).expect("utf8");
            let (event, data) = frame
                .trim_end()
                .split_once('\n')
                .expect("event and data lines");
            let data: Value =
                serde_json::from_str(data.trim_start_matches("data: ")).expect("json");
            let mut data = data;
            normalize(&mut data);
            text.push_str(&format!("{event}\ndata: {data}\n\n"));
        }
        check(&format!("stream/{case}.out.sse"), &text);
    }

    #[test]
    fn golden_stream_text() {
        golden_stream("text");
    }

    #[test]
    fn golden_stream_text_and_two_tools() {
        golden_stream("tools");
    }

    #[test]
    fn golden_stream_reasoning_cut_at_max_tokens() {
        golden_stream("reasoning");
    }
}
