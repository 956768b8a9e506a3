//! `gemini`: Google's Gemini API (`generativelanguage.googleapis.com`, `generateContent`).
//!
//! Translation, in both directions:
//!
//! | canonical (OpenAI)                      | Gemini                                              |
//! |-----------------------------------------|-----------------------------------------------------|
//! | `system` / `developer` messages         | `systemInstruction.parts[].text`                    |
//! | `user` / `assistant` messages           | `contents[]` with role `user` / `model`             |
//! | `image_url` (`data:` / `https:`)        | `inlineData` / `fileData`                           |
//! | assistant `tool_calls`                  | `functionCall` parts                                |
//! | `tool` messages (consecutive ones)      | one `user` turn of `functionResponse` parts         |
//! | `tools`, `tool_choice`                  | `tools[].functionDeclarations`, `toolConfig`        |
//! | sampling fields, `response_format`      | `generationConfig`                                  |
//! | `choices`, `usage`                      | `candidates`, `usageMetadata`                       |
//!
//! JSON Schemas (tool parameters, `json_schema` response formats) are cleaned down to the
//! OpenAPI subset Gemini accepts ([`clean_schema`]). Gemini has no tool-call ids: they are
//! generated (`call_0`, `call_1`, ...) and a tool result finds its function name through the
//! assistant message that made the call. Gemini-only request fields a client may send
//! (`safetySettings`, `cachedContent`) pass through; other unknown fields are dropped.
//!
//! Streams are `streamGenerateContent?alt=sse`: every event is a whole
//! `GenerateContentResponse` and there is no end marker, so [`GeminiDecoder`] decides from the
//! finish reason whether the stream completed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Decoded, Provider, ProviderError, StreamDecoder, UpstreamRequest};
use crate::api::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, Choice, ChunkChoice, ContentPart, Delta,
    Embedding, EmbeddingsRequest, EmbeddingsResponse, FunctionCall, FunctionCallDelta,
    MessageContent, PromptTokensDetails, ToolCall, ToolCallDelta, Usage,
};
use crate::api::sse::SseEvent;
use crate::config::{ConfigError, TimeoutsConfig};

/// `[providers.NAME]` with `kind = "gemini"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiConfig {
    /// Base URL up to and including the API version. Default
    /// `https://generativelanguage.googleapis.com/v1beta`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// API key, sent as the `x-goog-api-key` header.
    pub api_key: String,
    /// Extra headers sent on every request.
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
    "https://generativelanguage.googleapis.com/v1beta".to_owned()
}

/// A live `gemini` provider.
#[derive(Debug)]
pub struct Gemini {
    base_url: String,
    headers: HeaderMap,
}

impl Gemini {
    /// Builds the provider, validating URL, key and headers.
    pub fn new(name: &str, cfg: &GeminiConfig) -> Result<Self, ConfigError> {
        let base_url = crate::config::validate_base_url(name, &cfg.base_url)?;
        let mut headers = super::openai::header_map(name, &cfg.headers)?;
        let key_name = format!("providers.{name}.api_key");
        if cfg.api_key.is_empty() {
            return Err(ConfigError::invalid(key_name, "must not be empty"));
        }
        let mut key = HeaderValue::from_str(&cfg.api_key).map_err(|_| {
            ConfigError::invalid(key_name, "contains characters not allowed in a header")
        })?;
        key.set_sensitive(true);
        headers.insert("x-goog-api-key", key);
        Ok(Gemini { base_url, headers })
    }

    fn request(&self, url: String, body: &Value) -> Result<UpstreamRequest, ProviderError> {
        let body = serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))?;
        Ok(UpstreamRequest {
            url,
            headers: self.headers.clone(),
            body,
        })
    }
}

impl Provider for Gemini {
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        let path = model_path(model)?;
        let url = if req.stream {
            format!("{}/{path}:streamGenerateContent?alt=sse", self.base_url)
        } else {
            format!("{}/{path}:generateContent", self.base_url)
        };
        self.request(url, &chat_body(req)?)
    }

    fn count_tokens_request(
        &self,
        _raw: Option<&[u8]>,
        req: &ChatRequest,
        model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        let build = || {
            let path = model_path(model)?;
            let mut inner = chat_body(req)?;
            if let Some(obj) = inner.as_object_mut() {
                obj.insert("model".into(), Value::String(path.clone()));
            }
            let body = json!({ "generateContentRequest": inner });
            self.request(format!("{}/{path}:countTokens", self.base_url), &body)
        };
        Some(build())
    }

    fn count_tokens_response(&self, body: &[u8]) -> Result<u64, ProviderError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Count {
            #[serde(default)]
            total_tokens: u64,
        }
        serde_json::from_slice::<Count>(body)
            .map(|c| c.total_tokens)
            .map_err(|e| ProviderError::InvalidResponse(e.to_string()))
    }

    fn chat_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError> {
        let resp: GenerateContentResponse = serde_json::from_slice(body)
            .map_err(|e| ProviderError::InvalidResponse(e.to_string()))?;
        Ok(chat_response(resp, model))
    }

    fn stream_decoder(&self, model: &str) -> Box<dyn StreamDecoder> {
        Box::new(GeminiDecoder::new(model))
    }

    fn embeddings_request(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        let path = model_path(model)?;
        let texts = req.input_texts();
        if texts.is_empty() {
            return Err(ProviderError::Unsupported(
                "gemini embeddings need a string or an array of strings as input".to_owned(),
            ));
        }
        let requests: Vec<Value> = texts
            .into_iter()
            .map(|text| {
                let mut r = json!({ "model": path, "content": { "parts": [{ "text": text }] } });
                if let Some(d) = req.dimensions {
                    r["outputDimensionality"] = json!(d);
                }
                r
            })
            .collect();
        let url = format!("{}/{path}:batchEmbedContents", self.base_url);
        self.request(url, &json!({ "requests": requests }))
    }

    fn embeddings_response(
        &self,
        body: &[u8],
        model: &str,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        let resp: BatchEmbedResponse = serde_json::from_slice(body)
            .map_err(|e| ProviderError::InvalidResponse(e.to_string()))?;
        let data = resp
            .embeddings
            .into_iter()
            .zip(0u32..)
            .map(|(e, index)| Embedding {
                object: "embedding".to_owned(),
                index,
                embedding: Value::from(e.values),
            })
            .collect();
        Ok(EmbeddingsResponse {
            object: "list".to_owned(),
            data,
            model: model.to_owned(),
            usage: None,
            rest: Map::new(),
        })
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        google_error_message(body)
    }
}

/// The resource path of a model: `models/{model}`, or the name as given when it already names
/// a collection (`models/x`, `tunedModels/x`).
fn model_path(model: &str) -> Result<String, ProviderError> {
    let valid = !model.is_empty()
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'));
    if !valid {
        return Err(ProviderError::Unsupported(format!(
            "'{model}' is not a valid gemini model name"
        )));
    }
    Ok(if model.contains('/') {
        model.to_owned()
    } else {
        format!("models/{model}")
    })
}

/// Reads the message of a Google error body: `{"error":{"code","message","status"}}`, also when
/// wrapped in an array (`[{"error":..}]`, as failed streaming calls answer).
fn google_error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let v = match v {
        Value::Array(items) => items.into_iter().next()?,
        other => other,
    };
    let msg = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("error").filter(|e| e.is_string()))?;
    msg.as_str().map(str::to_owned)
}

fn unsupported(msg: impl Into<String>) -> ProviderError {
    ProviderError::Unsupported(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Request translation
// ---------------------------------------------------------------------------------------------

/// Builds the `generateContent` body.
fn chat_body(req: &ChatRequest) -> Result<Value, ProviderError> {
    let (system, contents) = contents(&req.messages)?;
    if contents.is_empty() {
        return Err(unsupported(
            "gemini needs at least one user or assistant message",
        ));
    }
    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) {
        let mut decls = Vec::with_capacity(tools.len());
        for tool in tools {
            if tool.kind != "function" {
                return Err(unsupported(format!(
                    "gemini does not support tools of type '{}'",
                    tool.kind
                )));
            }
            let f = &tool.function;
            let mut decl = Map::new();
            decl.insert("name".into(), json!(f.name));
            if let Some(d) = &f.description {
                decl.insert("description".into(), json!(d));
            }
            if let Some(params) = f
                .parameters
                .as_ref()
                .map(clean_schema)
                .filter(has_properties)
            {
                decl.insert("parameters".into(), params);
            }
            decls.push(Value::Object(decl));
        }
        body.insert("tools".into(), json!([{ "functionDeclarations": decls }]));
        if let Some(choice) = &req.tool_choice {
            body.insert(
                "toolConfig".into(),
                json!({ "functionCallingConfig": function_calling_config(choice)? }),
            );
        }
    }
    let config = generation_config(req)?;
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    // Gemini-native fields a client may add to an OpenAI-shaped request.
    for (key, gemini_key) in [
        ("safetySettings", "safetySettings"),
        ("safety_settings", "safetySettings"),
        ("cachedContent", "cachedContent"),
        ("cached_content", "cachedContent"),
    ] {
        if let Some(v) = req.rest.get(key) {
            body.insert(gemini_key.into(), v.clone());
        }
    }
    Ok(Value::Object(body))
}

/// Gemini rejects an `OBJECT` parameter schema without properties: such a function simply
/// takes no parameters.
fn has_properties(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) != Some("object")
        || schema
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| !p.is_empty())
}

/// Splits the conversation into system parts and `contents` turns.
fn contents(messages: &[ChatMessage]) -> Result<(Vec<Value>, Vec<Value>), ProviderError> {
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    // Tool-call id -> function name, from the assistant messages seen so far.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    // Whether the last turn holds tool results, so the next result joins it.
    let mut in_tool_turn = false;
    for msg in messages {
        let is_tool_result = matches!(msg.role.as_str(), "tool" | "function");
        match msg.role.as_str() {
            "system" | "developer" => {
                let text = msg.text();
                if !text.is_empty() {
                    system.push(json!({ "text": text }));
                }
            }
            "user" => {
                let parts = match &msg.content {
                    None => Vec::new(),
                    Some(MessageContent::Text(t)) => vec![json!({ "text": t })],
                    Some(MessageContent::Parts(parts)) => {
                        parts.iter().map(content_part).collect::<Result<_, _>>()?
                    }
                };
                if !parts.is_empty() {
                    turns.push(json!({ "role": "user", "parts": parts }));
                }
            }
            "assistant" => {
                let mut parts = Vec::new();
                let text = msg.text();
                if !text.is_empty() {
                    parts.push(json!({ "text": text }));
                }
                for (i, call) in msg.tool_calls.iter().flatten().enumerate() {
                    call_names.insert(&call.id, &call.function.name);
                    let args = call_arguments(&call.function.arguments).ok_or_else(|| {
                        unsupported(format!(
                            "arguments of tool call '{}' are not a JSON object",
                            call.id
                        ))
                    })?;
                    let mut part =
                        json!({ "functionCall": { "name": call.function.name, "args": args } });
                    // Gemini 3 rejects a replayed function call without the thought signature
                    // it came with, which the OpenAI shape cannot carry. Google documents this
                    // placeholder for history it did not produce; it belongs on the first call
                    // of a turn only.
                    if i == 0 {
                        part["thoughtSignature"] = json!(SKIP_THOUGHT_SIGNATURE);
                    }
                    parts.push(part);
                }
                if !parts.is_empty() {
                    turns.push(json!({ "role": "model", "parts": parts }));
                }
            }
            "tool" | "function" => {
                let name = msg
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| call_names.get(id).copied())
                    .or(msg.name.as_deref())
                    .ok_or_else(|| {
                        unsupported(format!(
                            "tool message answers unknown tool_call_id '{}'",
                            msg.tool_call_id.as_deref().unwrap_or_default()
                        ))
                    })?;
                let part = json!({ "functionResponse": { "name": name, "response": tool_response(&msg.text()) } });
                let last = turns
                    .last_mut()
                    .filter(|_| in_tool_turn)
                    .and_then(|t| t["parts"].as_array_mut());
                match last {
                    Some(parts) => parts.push(part),
                    None => turns.push(json!({ "role": "user", "parts": [part] })),
                }
            }
            other => {
                return Err(unsupported(format!(
                    "gemini does not support messages with role '{other}'"
                )));
            }
        }
        in_tool_turn = is_tool_result;
    }
    Ok((system, turns))
}

/// The `thoughtSignature` Google documents for function calls replayed without their real
/// signature (see <https://ai.google.dev/gemini-api/docs/thought-signatures>).
const SKIP_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";

/// Parses tool-call arguments: empty means no arguments; otherwise a JSON object.
fn call_arguments(arguments: &str) -> Option<Value> {
    if arguments.trim().is_empty() {
        return Some(json!({}));
    }
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
}

/// A tool result as a `functionResponse.response`: the JSON object the tool returned, or its
/// text under `content`.
fn tool_response(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "content": text }),
    }
}

/// One user content part.
fn content_part(part: &ContentPart) -> Result<Value, ProviderError> {
    match part.kind.as_str() {
        "text" => Ok(json!({ "text": part.text.as_deref().unwrap_or_default() })),
        "image_url" => {
            let url = part
                .image_url
                .as_ref()
                .map(|i| i.url.as_str())
                .unwrap_or_default();
            media_part(url)
        }
        "input_audio" => {
            let audio = part.rest.get("input_audio");
            let data = audio.and_then(|a| a.get("data")).and_then(Value::as_str);
            let format = audio.and_then(|a| a.get("format")).and_then(Value::as_str);
            match (data, format) {
                (Some(data), Some(format)) => Ok(
                    json!({ "inlineData": { "mimeType": format!("audio/{format}"), "data": data } }),
                ),
                _ => Err(unsupported("input_audio parts need data and format")),
            }
        }
        "file" => {
            let file_data = part
                .rest
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str);
            match file_data {
                Some(url) => media_part(url),
                None => Err(unsupported(
                    "gemini supports file parts only with inline file_data",
                )),
            }
        }
        other => Err(unsupported(format!(
            "gemini does not support content parts of type '{other}'"
        ))),
    }
}

/// A media URL as a part: `data:` URLs inline, `http(s):` URLs by reference.
fn media_part(url: &str) -> Result<Value, ProviderError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (mime, data) = rest.split_once(";base64,").ok_or_else(|| {
            unsupported("data: URLs must be base64-encoded (data:<type>;base64,<data>)")
        })?;
        return Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "fileData": { "mimeType": guess_mime(url), "fileUri": url } }));
    }
    Err(unsupported(
        "media URLs must be data:, http: or https: URLs",
    ))
}

/// Guesses a media type from a URL's extension; `image/jpeg` when unknown.
fn guess_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let file = path.rsplit('/').next().unwrap_or_default();
    let ext = file
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => "image/jpeg",
    }
}

/// `tool_choice` -> `toolConfig.functionCallingConfig`.
fn function_calling_config(choice: &Value) -> Result<Value, ProviderError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({ "mode": "AUTO" })),
            "none" => Ok(json!({ "mode": "NONE" })),
            "required" => Ok(json!({ "mode": "ANY" })),
            other => Err(unsupported(format!("unknown tool_choice '{other}'"))),
        },
        _ => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Ok(json!({ "mode": "ANY", "allowedFunctionNames": [name] })),
            None => Err(unsupported(
                "tool_choice must be auto, none, required or name a function",
            )),
        },
    }
}

/// Sampling fields and output format -> `generationConfig`.
fn generation_config(req: &ChatRequest) -> Result<Map<String, Value>, ProviderError> {
    let mut gc = Map::new();
    if let Some(t) = req.temperature {
        gc.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        gc.insert("topP".into(), json!(p));
    }
    if let Some(m) = req.max_output_tokens() {
        gc.insert("maxOutputTokens".into(), json!(m));
    }
    if let Some(stop) = &req.stop {
        gc.insert("stopSequences".into(), json!(stop.to_vec()));
    }
    if let Some(n) = req.n {
        gc.insert("candidateCount".into(), json!(n));
    }
    for (key, gemini_key) in [
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("top_k", "topK"),
    ] {
        if let Some(v) = req.rest.get(key).filter(|v| !v.is_null()) {
            gc.insert(gemini_key.into(), v.clone());
        }
    }
    if let Some(format) = &req.response_format {
        match format.get("type").and_then(Value::as_str) {
            Some("text") | None => {}
            Some("json_object") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    gc.insert("responseSchema".into(), clean_schema(schema));
                }
            }
            Some(other) => {
                return Err(unsupported(format!(
                    "unknown response_format type '{other}'"
                )));
            }
        }
    }
    Ok(gc)
}

/// Schema keys Gemini accepts that are copied as they are.
const SCHEMA_KEYS: &[&str] = &[
    "title",
    "description",
    "default",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "propertyOrdering",
];

/// `format` values the Gemini API accepts (others fail the request).
const SCHEMA_FORMATS: &[&str] = &["enum", "date-time", "float", "double", "int32", "int64"];

/// How deep schemas (and `$ref` chains) are followed; deeper parts become `{"type":"object"}`.
const MAX_SCHEMA_DEPTH: usize = 32;

/// How many bytes of definitions (as JSON) one schema may inline through `$ref`s in all; past
/// it, a `$ref` becomes `{"type":"object"}`. The depth limit alone lets a definition that
/// refers to itself several times grow exponentially.
const MAX_INLINED_BYTES: usize = 1 << 20;

/// Cleans a JSON Schema down to the OpenAPI 3.0 subset Gemini accepts.
///
/// Keeps `type`, `properties`, `required`, `items`, `enum`, `description`, `nullable`,
/// `format` and the other documented `Schema` fields; drops everything else (`$schema`,
/// `additionalProperties`, `strict`, `$defs`, ...). Local `$ref`s are inlined, `type: [T,
/// "null"]` and `anyOf: [.., {"type":"null"}]` become `nullable`, `const` becomes a one-value
/// `enum`, `oneOf` becomes `anyOf`, and enum values become strings.
pub fn clean_schema(schema: &Value) -> Value {
    let defs = schema
        .get("$defs")
        .or_else(|| schema.get("definitions"))
        .and_then(Value::as_object);
    SchemaCleaner {
        defs,
        inline_budget: std::cell::Cell::new(MAX_INLINED_BYTES),
    }
    .clean(schema, 0)
}

struct SchemaCleaner<'a> {
    defs: Option<&'a Map<String, Value>>,
    /// Bytes of definitions still allowed to be inlined ([`MAX_INLINED_BYTES`]).
    inline_budget: std::cell::Cell<usize>,
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SchemaCleaner<'_> {
    /// Charges inlining `def` to the budget; `false` when the budget cannot pay for it.
    fn take_inline_budget(&self, def: &Value) -> bool {
        let mut size = ByteCount(0);
        let cost = match serde_json::to_writer(&mut size, def) {
            Ok(()) => size.0,
            Err(_) => usize::MAX,
        };
        match self.inline_budget.get().checked_sub(cost) {
            Some(left) => {
                self.inline_budget.set(left);
                true
            }
            None => false,
        }
    }

    fn clean(&self, schema: &Value, depth: usize) -> Value {
        let Some(obj) = schema.as_object() else {
            return json!({});
        };
        if depth > MAX_SCHEMA_DEPTH {
            return json!({ "type": "object" });
        }
        if let Some(reference) = obj.get("$ref").and_then(Value::as_str) {
            let target = reference
                .strip_prefix("#/$defs/")
                .or_else(|| reference.strip_prefix("#/definitions/"))
                .and_then(|name| self.defs?.get(name));
            let mut out = match target {
                Some(t) if self.take_inline_budget(t) => self.clean(t, depth + 1),
                Some(_) => json!({ "type": "object" }),
                None => json!({}),
            };
            if let (Some(d), Some(o)) = (obj.get("description"), out.as_object_mut()) {
                o.insert("description".into(), d.clone());
            }
            return out;
        }
        let mut out = Map::new();
        let mut nullable = false;
        for (key, value) in obj {
            match key.as_str() {
                "type" => match value {
                    Value::String(t) if t == "null" => nullable = true,
                    Value::String(_) => {
                        out.insert("type".into(), value.clone());
                    }
                    Value::Array(types) => {
                        let named: Vec<&Value> = types
                            .iter()
                            .filter(|t| t.as_str() != Some("null"))
                            .collect();
                        nullable |= named.len() < types.len();
                        match named.as_slice() {
                            [] => {}
                            [one] => {
                                out.insert("type".into(), (*one).clone());
                            }
                            many => {
                                let any: Vec<Value> =
                                    many.iter().map(|t| json!({ "type": t })).collect();
                                out.insert("anyOf".into(), Value::Array(any));
                            }
                        }
                    }
                    _ => {}
                },
                "nullable" => nullable |= value.as_bool() == Some(true),
                "properties" => {
                    if let Some(props) = value.as_object() {
                        let cleaned: Map<String, Value> = props
                            .iter()
                            .map(|(k, v)| (k.clone(), self.clean(v, depth + 1)))
                            .collect();
                        out.insert("properties".into(), Value::Object(cleaned));
                    }
                }
                "items" if value.is_object() => {
                    out.insert("items".into(), self.clean(value, depth + 1));
                }
                "anyOf" | "oneOf" => {
                    let mut any = Vec::new();
                    for sub in value.as_array().into_iter().flatten() {
                        if sub.get("type").and_then(Value::as_str) == Some("null") {
                            nullable = true;
                        } else {
                            any.push(self.clean(sub, depth + 1));
                        }
                    }
                    out.insert("anyOf".into(), Value::Array(any));
                }
                "allOf" => {
                    if let Some([one]) = value.as_array().map(Vec::as_slice) {
                        out.insert("allOf".into(), self.clean(one, depth + 1));
                    }
                }
                "enum" => {
                    let mut values = Vec::new();
                    for v in value.as_array().into_iter().flatten() {
                        match v {
                            Value::Null => nullable = true,
                            Value::String(_) => values.push(v.clone()),
                            other => values.push(Value::String(other.to_string())),
                        }
                    }
                    out.insert("enum".into(), Value::Array(values));
                }
                "const" if !obj.contains_key("enum") => {
                    let v = match value {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out.insert("enum".into(), json!([v]));
                }
                "format" if value.as_str().is_some_and(|f| SCHEMA_FORMATS.contains(&f)) => {
                    out.insert("format".into(), value.clone());
                }
                "required" => {
                    let names: Vec<Value> = value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|v| v.is_string())
                        .cloned()
                        .collect();
                    out.insert("required".into(), Value::Array(names));
                }
                k if SCHEMA_KEYS.contains(&k) => {
                    out.insert(key.clone(), value.clone());
                }
                _ => {}
            }
        }
        // A single `anyOf` branch (what remains of `Optional[T]`) or `allOf` is the schema.
        let branches = out.get("anyOf").and_then(Value::as_array).map(Vec::len);
        if matches!(branches, Some(0 | 1))
            && let Some(Value::Array(mut any)) = out.remove("anyOf")
            && let Some(Value::Object(one)) = any.pop()
        {
            merge_missing(&mut out, one);
        }
        if let Some(Value::Object(all)) = out.remove("allOf") {
            merge_missing(&mut out, all);
        }
        // `required` may only name declared properties.
        if let Some(props) = out.get("properties").and_then(Value::as_object) {
            let declared: BTreeSet<&str> = props.keys().map(String::as_str).collect();
            let kept: Vec<Value> = out
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|r| r.as_str().is_some_and(|r| declared.contains(r)))
                .cloned()
                .collect();
            out.insert("required".into(), Value::Array(kept));
        }
        if out
            .get("required")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
        {
            out.remove("required");
        }
        if nullable {
            out.insert("nullable".into(), Value::Bool(true));
        }
        Value::Object(out)
    }
}

/// Adds the keys of `from` that `into` does not have.
fn merge_missing(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        into.entry(k).or_insert(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Response translation
// ---------------------------------------------------------------------------------------------

/// `GenerateContentResponse`, the fields Weir reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    index: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<GeminiFunctionCall>,
}

#[derive(Debug, Default, Deserialize)]
struct GeminiFunctionCall {
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
}

impl UsageMetadata {
    /// Canonical usage: thinking tokens count as output, tool-use prompt tokens as input.
    fn to_usage(&self) -> Usage {
        let mut usage = Usage::new(
            self.prompt_token_count
                .saturating_add(self.tool_use_prompt_token_count),
            self.candidates_token_count
                .saturating_add(self.thoughts_token_count),
        );
        usage.prompt_tokens_details = self
            .cached_content_token_count
            .map(|cached_tokens| PromptTokensDetails { cached_tokens });
        usage
    }
}

#[derive(Debug, Deserialize)]
struct BatchEmbedResponse {
    #[serde(default)]
    embeddings: Vec<ContentEmbedding>,
}

#[derive(Debug, Deserialize)]
struct ContentEmbedding {
    #[serde(default)]
    values: Vec<f64>,
}

/// What one candidate (or one streamed piece of it) says.
struct CandidateOutput {
    text: String,
    calls: Vec<GeminiFunctionCall>,
}

impl Candidate {
    /// Splits the candidate's parts into visible text and function calls (thoughts skipped).
    fn take_output(&mut self) -> CandidateOutput {
        let mut out = CandidateOutput {
            text: String::new(),
            calls: Vec::new(),
        };
        for part in self.content.take().map(|c| c.parts).unwrap_or_default() {
            if part.thought {
                continue;
            }
            if let Some(t) = part.text {
                out.text.push_str(&t);
            }
            if let Some(call) = part.function_call {
                out.calls.push(call);
            }
        }
        out
    }
}

/// Compact JSON of function-call arguments (`{}` when absent).
fn arguments_json(args: Option<&Value>) -> String {
    args.map_or_else(|| "{}".to_owned(), Value::to_string)
}

/// Maps a Gemini finish reason; `has_calls` turns a normal stop into `tool_calls`.
fn finish_reason(reason: Option<&str>, has_calls: bool) -> String {
    let reason = match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ if has_calls => "tool_calls",
        _ => "stop",
    };
    reason.to_owned()
}

fn generated_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

/// Translates a whole (non-streamed) response.
fn chat_response(resp: GenerateContentResponse, model: &str) -> ChatResponse {
    let mut choices = Vec::with_capacity(resp.candidates.len().max(1));
    let mut next_call = 0u32;
    for (position, mut candidate) in (0u32..).zip(resp.candidates) {
        let out = candidate.take_output();
        let tool_calls: Vec<ToolCall> = out
            .calls
            .iter()
            .map(|call| {
                let id = format!("call_{next_call}");
                next_call += 1;
                ToolCall {
                    id,
                    kind: "function".to_owned(),
                    function: FunctionCall {
                        name: call.name.clone(),
                        arguments: arguments_json(call.args.as_ref()),
                    },
                }
            })
            .collect();
        let has_calls = !tool_calls.is_empty();
        let content = match (out.text.is_empty(), has_calls) {
            (true, true) => None,
            _ => Some(MessageContent::Text(out.text)),
        };
        choices.push(Choice {
            index: candidate.index.unwrap_or(position),
            message: ChatMessage {
                role: "assistant".to_owned(),
                content,
                tool_calls: has_calls.then_some(tool_calls),
                ..ChatMessage::default()
            },
            finish_reason: Some(finish_reason(candidate.finish_reason.as_deref(), has_calls)),
            rest: Map::new(),
        });
    }
    // A blocked prompt has no candidates, only `promptFeedback.blockReason`.
    if choices.is_empty()
        && resp
            .prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
    {
        choices.push(Choice {
            index: 0,
            message: ChatMessage {
                role: "assistant".to_owned(),
                content: Some(MessageContent::Text(String::new())),
                ..ChatMessage::default()
            },
            finish_reason: Some("content_filter".to_owned()),
            rest: Map::new(),
        });
    }
    ChatResponse {
        id: resp.response_id.unwrap_or_else(generated_id),
        object: "chat.completion".to_owned(),
        created: super::unix_now(),
        model: resp.model_version.unwrap_or_else(|| model.to_owned()),
        choices,
        usage: resp.usage_metadata.as_ref().map(UsageMetadata::to_usage),
        rest: Map::new(),
    }
}

/// Decodes `streamGenerateContent?alt=sse` events into canonical chunks.
///
/// Every event is a whole `GenerateContentResponse` carrying the new text and whole function
/// calls. Usage arrives (cumulatively) on several events; the latest is held and sent once, as
/// a separate chunk with no choices, when every candidate has finished or when the body ends.
struct GeminiDecoder {
    /// The requested model, used until the upstream names its `modelVersion`.
    model: String,
    /// Response id, fixed by the first event.
    id: Option<String>,
    created: u64,
    /// Candidates that were sent their `role` delta.
    started: BTreeSet<u32>,
    /// Candidates that made at least one function call.
    with_calls: BTreeSet<u32>,
    /// Candidates that sent a finish reason.
    finished: BTreeSet<u32>,
    /// Tool-call counter across the whole stream (indexes and ids).
    next_call: u32,
    /// Latest usage, not yet sent.
    usage: Option<Usage>,
    usage_sent: bool,
}

impl GeminiDecoder {
    fn new(model: &str) -> Self {
        GeminiDecoder {
            model: model.to_owned(),
            id: None,
            created: super::unix_now(),
            started: BTreeSet::new(),
            with_calls: BTreeSet::new(),
            finished: BTreeSet::new(),
            next_call: 0,
            usage: None,
            usage_sent: false,
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone().unwrap_or_default(),
            object: "chat.completion.chunk".to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            rest: Map::new(),
        }
    }

    /// The delta of one candidate, or `None` when it adds nothing.
    fn candidate_choice(&mut self, index: u32, mut candidate: Candidate) -> Option<ChunkChoice> {
        let out = candidate.take_output();
        let mut delta = Delta::default();
        if self.started.insert(index) {
            delta.role = Some("assistant".to_owned());
        }
        if !out.text.is_empty() {
            delta.content = Some(out.text);
        }
        if !out.calls.is_empty() {
            self.with_calls.insert(index);
            let calls = out
                .calls
                .into_iter()
                .map(|call| {
                    let n = self.next_call;
                    self.next_call += 1;
                    ToolCallDelta {
                        index: n,
                        id: Some(format!("call_{n}")),
                        kind: Some("function".to_owned()),
                        function: Some(FunctionCallDelta {
                            name: Some(call.name),
                            arguments: Some(arguments_json(call.args.as_ref())),
                        }),
                    }
                })
                .collect();
            delta.tool_calls = Some(calls);
        }
        let finish = candidate.finish_reason.as_deref().map(|r| {
            self.finished.insert(index);
            finish_reason(Some(r), self.with_calls.contains(&index))
        });
        if delta == Delta::default() && finish.is_none() {
            return None;
        }
        Some(ChunkChoice {
            index,
            delta,
            finish_reason: finish,
            rest: Map::new(),
        })
    }

    /// The usage chunk, once.
    fn take_usage_chunk(&mut self) -> Option<ChatChunk> {
        if self.usage_sent {
            return None;
        }
        let usage = self.usage.take()?;
        self.usage_sent = true;
        Some(self.chunk(Vec::new(), Some(usage)))
    }
}

impl StreamDecoder for GeminiDecoder {
    fn decode(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let data = event.data.trim();
        let value: Value = serde_json::from_str(data)
            .map_err(|e| ProviderError::InvalidResponse(format!("bad stream chunk: {e}")))?;
        if value.get("error").is_some() {
            let msg = google_error_message(data.as_bytes()).unwrap_or_else(|| data.to_owned());
            return Err(ProviderError::StreamError(msg));
        }
        let resp: GenerateContentResponse = serde_json::from_value(value)
            .map_err(|e| ProviderError::InvalidResponse(format!("bad stream chunk: {e}")))?;
        if self.id.is_none() {
            self.id = Some(resp.response_id.clone().unwrap_or_else(generated_id));
        }
        if let Some(version) = resp.model_version {
            self.model = version;
        }
        if let Some(meta) = &resp.usage_metadata
            && !self.usage_sent
        {
            self.usage = Some(meta.to_usage());
        }
        let mut choices = Vec::new();
        let blocked = resp.candidates.is_empty()
            && resp
                .prompt_feedback
                .is_some_and(|f| f.block_reason.is_some());
        for (position, candidate) in (0u32..).zip(resp.candidates) {
            let index = candidate.index.unwrap_or(position);
            choices.extend(self.candidate_choice(index, candidate));
        }
        if blocked {
            let role = self.started.insert(0).then(|| "assistant".to_owned());
            self.finished.insert(0);
            choices.push(ChunkChoice {
                index: 0,
                delta: Delta {
                    role,
                    ..Delta::default()
                },
                finish_reason: Some("content_filter".to_owned()),
                rest: Map::new(),
            });
        }
        let mut chunks = Vec::new();
        if !choices.is_empty() {
            chunks.push(self.chunk(choices, None));
        }
        if !self.finished.is_empty() && self.started.is_subset(&self.finished) {
            chunks.extend(self.take_usage_chunk());
        }
        Ok(Decoded {
            chunks,
            done: false,
        })
    }

    fn finish(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        // Gemini has no end marker: a stream is whole when every candidate it started sent
        // its finish reason.
        if self.finished.is_empty() || !self.started.is_subset(&self.finished) {
            return Err(ProviderError::InvalidResponse(
                "stream ended before a finish reason".to_owned(),
            ));
        }
        Ok(self.take_usage_chunk().into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sse::SseParser;

    const MODEL: &str = "gemini-2.0-flash";

    fn provider() -> Gemini {
        let cfg: GeminiConfig = toml::from_str("api_key = \"AIza-test\"").expect("cfg");
        Gemini::new("gemini", &cfg).expect("provider")
    }

    fn read(name: &str) -> String {
        super::super::golden::read("gemini", name)
    }

    fn check_golden(name: &str, actual: &Value) {
        super::super::golden::check("gemini", name, actual);
    }

    use super::super::golden::upstream_json;

    fn golden_request(case: &str) {
        let req: ChatRequest =
            serde_json::from_str(&read(&format!("{case}.request.json"))).expect("request");
        let up = provider().chat_request(&req, MODEL).expect("translate");
        check_golden(&format!("{case}.upstream.json"), &upstream_json(&up));
    }

    fn golden_response(case: &str) {
        let body = read(&format!("{case}.response.json"));
        let mut resp = provider()
            .chat_response(body.as_bytes(), MODEL)
            .expect("parse");
        resp.created = 0;
        check_golden(
            &format!("{case}.canonical.json"),
            &serde_json::to_value(resp).expect("json"),
        );
    }

    fn decode_stream(text: &str) -> Result<Vec<ChatChunk>, ProviderError> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser.feed(text.as_bytes(), &mut events).expect("sse");
        let mut decoder = provider().stream_decoder(MODEL);
        let mut chunks = Vec::new();
        for event in &events {
            let decoded = decoder.decode(event)?;
            assert!(!decoded.done, "gemini streams have no end marker");
            chunks.extend(decoded.chunks);
        }
        chunks.extend(decoder.finish()?);
        Ok(chunks)
    }

    fn golden_stream(case: &str) {
        let mut chunks = decode_stream(&read(&format!("{case}.stream.txt"))).expect("decode");
        for c in &mut chunks {
            c.created = 0;
        }
        check_golden(
            &format!("{case}.chunks.json"),
            &serde_json::to_value(chunks).expect("json"),
        );
    }

    #[test]
    fn golden_basic() {
        golden_request("basic");
        golden_response("basic");
    }

    #[test]
    fn golden_multi_turn_stream_request() {
        golden_request("multi_turn");
    }

    #[test]
    fn golden_tools() {
        golden_request("tools");
    }

    #[test]
    fn golden_tool_results() {
        golden_request("tool_results");
    }

    #[test]
    fn golden_images() {
        golden_request("images");
    }

    #[test]
    fn golden_json_mode() {
        golden_request("json_object");
        golden_request("json_schema");
    }

    #[test]
    fn golden_function_call_response() {
        golden_response("function_calls");
    }

    #[test]
    fn golden_blocked_prompt() {
        golden_response("blocked");
        golden_stream("blocked");
    }

    #[test]
    fn golden_stream_text() {
        golden_stream("stream_text");
    }

    #[test]
    fn golden_stream_function_calls() {
        golden_stream("stream_function_calls");
    }

    #[test]
    fn golden_embeddings() {
        let p = provider();
        let req: EmbeddingsRequest =
            serde_json::from_str(&read("embeddings.request.json")).expect("request");
        let up = p
            .embeddings_request(&req, "text-embedding-004")
            .expect("translate");
        check_golden("embeddings.upstream.json", &upstream_json(&up));
        let body = read("embeddings.response.json");
        let resp = p
            .embeddings_response(body.as_bytes(), "text-embedding-004")
            .expect("parse");
        check_golden(
            "embeddings.canonical.json",
            &serde_json::to_value(resp).expect("json"),
        );
    }

    #[test]
    fn stream_without_finish_reason_is_an_error() {
        let text = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hel\"}]}}]}\n\n";
        let err = decode_stream(text).expect_err("truncated");
        assert!(matches!(err, ProviderError::InvalidResponse(m) if m.contains("finish reason")));
    }

    #[test]
    fn stream_error_event() {
        let text = "data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\n\n";
        let err = decode_stream(text).expect_err("error");
        assert!(matches!(err, ProviderError::StreamError(m) if m == "The model is overloaded."));
    }

    #[test]
    fn usage_waits_for_finish() {
        // Usage on a chunk without a finish reason is held until the body ends.
        let text = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]},\"finishReason\":\"STOP\"}]}\n\n\
                    data: {\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":1}}\n\n";
        let chunks = decode_stream(text).expect("decode");
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].usage, Some(Usage::new(3, 1)));
    }

    #[test]
    fn error_message_object_and_array() {
        let p = provider();
        let obj =
            br#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(p.error_message(obj).as_deref(), Some("API key not valid."));
        let arr = br#"[{"error":{"code":429,"message":"Resource exhausted.","status":"RESOURCE_EXHAUSTED"}}]"#;
        assert_eq!(p.error_message(arr).as_deref(), Some("Resource exhausted."));
        assert_eq!(p.error_message(b"<html>"), None);
    }

    #[test]
    fn generated_response_id_and_model_fallback() {
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hi"}]},"finishReason":"STOP"}]}"#;
        let resp = provider().chat_response(body, MODEL).expect("parse");
        assert!(resp.id.starts_with("chatcmpl-"));
        assert_eq!(resp.model, MODEL);
        assert_eq!(resp.choices[0].finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn schema_cleaning() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "strict": true,
            "properties": {
                "unit": { "type": ["string", "null"], "enum": ["c", "f", null] },
                "when": { "$ref": "#/$defs/When", "description": "date" },
                "tags": { "type": "array", "items": { "type": "string", "format": "uri", "examples": ["x"] } },
                "maybe": { "anyOf": [{ "type": "integer" }, { "type": "null" }], "title": "Maybe" },
                "kind": { "const": 3 }
            },
            "required": ["unit", "missing"],
            "$defs": { "When": { "type": "string", "format": "date-time", "additionalProperties": false } }
        });
        let expected = json!({
            "type": "object",
            "properties": {
                "unit": { "type": "string", "enum": ["c", "f"], "nullable": true },
                "when": { "type": "string", "format": "date-time", "description": "date" },
                "tags": { "type": "array", "items": { "type": "string" } },
                "maybe": { "type": "integer", "title": "Maybe", "nullable": true },
                "kind": { "enum": ["3"] }
            },
            "required": ["unit"]
        });
        assert_eq!(clean_schema(&schema), expected);
    }

    #[test]
    fn recursive_refs_terminate() {
        let schema = json!({
            "$ref": "#/$defs/Node",
            "$defs": { "Node": { "type": "object", "properties": { "next": { "$ref": "#/$defs/Node" } } } }
        });
        let cleaned = clean_schema(&schema);
        assert_eq!(cleaned["type"], "object");
    }

    #[test]
    fn fanned_out_refs_stay_bounded() {
        // A definition that refers to itself k times was inlined k^16 times before the depth
        // limit stopped it: 2 made this 100-byte schema 4 MB, 4 would take 200 GB.
        let schema = json!({
            "$ref": "#/$defs/N",
            "$defs": { "N": { "type": "object", "properties": {
                "a": { "$ref": "#/$defs/N" }, "b": { "$ref": "#/$defs/N" }
            } } }
        });
        let cleaned = serde_json::to_vec(&clean_schema(&schema)).expect("json");
        assert!(cleaned.len() <= 2 << 20, "{} bytes", cleaned.len());
        assert_eq!(clean_schema(&schema)["properties"]["a"]["type"], "object");
    }

    #[test]
    fn unknown_tool_call_id_is_rejected() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [{ "role": "user", "content": "hi" }, { "role": "tool", "tool_call_id": "nope", "content": "x" }]
        }))
        .expect("req");
        let err = provider()
            .chat_request(&req, MODEL)
            .expect_err("unknown id");
        assert!(matches!(err, ProviderError::Unsupported(m) if m.contains("nope")));
    }

    #[test]
    fn config_rejects_empty_key_and_bad_url() {
        let cfg: GeminiConfig = toml::from_str("api_key = \"\"").expect("cfg");
        assert!(Gemini::new("g", &cfg).is_err());
        let cfg: GeminiConfig =
            toml::from_str("api_key = \"k\"\nbase_url = \"ftp://x\"").expect("cfg");
        assert!(Gemini::new("g", &cfg).is_err());
        assert!(toml::from_str::<GeminiConfig>("api_key = \"k\"\nbogus = 1").is_err());
    }
}
