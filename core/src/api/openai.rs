//! The OpenAI wire format: Weir's canonical request and response shapes.
//!
//! Every inbound dialect is translated into these types and every provider translates out of
//! them. They are lenient on purpose: each struct keeps the fields Weir does not interpret in
//! `rest` (`#[serde(flatten)]`), so a field added by OpenAI tomorrow passes through unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fields a struct does not model, kept verbatim.
pub type Rest = Map<String, Value>;

fn is_false(b: &bool) -> bool {
    !*b
}

/// `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatRequest {
    /// The model name the client asked for (a name from Weir's config).
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Answer as a server-sent event stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Tool (function) definitions the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `"auto" | "none" | "required" | {"type":"function","function":{"name":..}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether the model may emit several tool calls in one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Legacy output-token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Output-token limit (newer name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Number of choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stop sequence(s): a string or an array of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// `{"type":"json_object"}` or `{"type":"json_schema", ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// End-user identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

impl ChatRequest {
    /// The output-token limit, whichever field carried it.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the client asked for a usage chunk at the end of the stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text or content parts; `null` for an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the call this result answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On an assistant message: the model's reasoning before it answered, in order (Anthropic
    /// `thinking`/`redacted_thinking` blocks, Responses `reasoning` items, the
    /// `reasoning_content` of OpenAI-compatible servers). Weir's canonical form; the wire name
    /// `reasoning_details` follows OpenRouter. Providers that cannot take it back drop it
    /// (with a debug log) before sending upstream.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "reasoning_details"
    )]
    pub reasoning: Option<Vec<Reasoning>>,
    /// Everything else (`refusal`, `audio`, ...), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// One block of model reasoning, the canonical form of Anthropic thinking and Responses
/// reasoning items.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Reasoning {
    /// `thinking` (readable text, possibly a summary) or `redacted` (opaque `data` only).
    #[serde(rename = "type")]
    pub kind: String,
    /// The reasoning text (Anthropic `thinking`, Responses summary text joined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Proof the text came from the model: Anthropic `signature`, Responses
    /// `encrypted_content`. Only the provider that issued it can verify it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Opaque redacted reasoning (Anthropic `redacted_thinking.data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The provider's id for the block (Responses `rs_...`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

impl Reasoning {
    /// `kind` of readable reasoning.
    pub const THINKING: &'static str = "thinking";
    /// `kind` of opaque reasoning.
    pub const REDACTED: &'static str = "redacted";
}

impl ChatMessage {
    /// The message's text: the string content, or its text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(c) => c.text(),
        }
    }
}

/// Message content: a plain string or a list of parts (text, images, audio, files).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Multimodal parts.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text of the content, text parts joined with nothing between them.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// One content part (`{"type":"text","text":..}`, `{"type":"image_url","image_url":{..}}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContentPart {
    /// `text`, `image_url`, `input_audio`, `file`...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The image of an `image_url` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<ImageUrl>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// `image_url` of a content part: an `https:` URL or a `data:` URL.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ImageUrl {
    /// The URL.
    pub url: String,
    /// `low`, `high` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Tool {
    /// Always `function` today.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function definition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionDef {
    /// Function name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Everything else (`strict`), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ToolCall {
    /// Call id, echoed by the tool result.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// Name and JSON-encoded arguments.
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments, a JSON document encoded as a string.
    #[serde(default)]
    pub arguments: String,
}

/// `POST /v1/chat/completions` response body (non-streaming).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatResponse {
    /// Response id.
    pub id: String,
    /// `chat.completion`.
    #[serde(default = "chat_completion_object")]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// The choices (one unless `n` > 1).
    pub choices: Vec<Choice>,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Everything else (`system_fingerprint`, `service_tier`), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

fn chat_completion_object() -> String {
    "chat.completion".to_owned()
}

/// One choice of a non-streaming response.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Choice {
    /// Choice index.
    #[serde(default)]
    pub index: u32,
    /// The assistant message.
    pub message: ChatMessage,
    /// `stop`, `length`, `tool_calls`, `content_filter`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Everything else (`logprobs`), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// Token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Sum of both.
    #[serde(default)]
    pub total_tokens: u64,
    /// Input tokens served from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Input tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`); part of `prompt_tokens`. OpenAI has no such count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    /// Input tokens read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
}

impl Usage {
    /// Usage from input and output counts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            // Saturating: the counts come from upstreams.
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
            cache_creation_input_tokens: None,
        }
    }

    /// Prompt tokens read from the provider's cache (`prompt_tokens_details.cached_tokens`).
    pub fn cache_read_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    /// Prompt tokens written to the provider's cache.
    pub fn cache_write_tokens(&self) -> u64 {
        self.cache_creation_input_tokens.unwrap_or(0)
    }
}

/// One `chat.completion.chunk` of a stream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatChunk {
    /// Response id, the same on every chunk.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default = "chunk_object")]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answers.
    #[serde(default)]
    pub model: String,
    /// Deltas, one per choice that changed (empty on the usage chunk).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Usage, on the last chunk when `include_usage` was set; `null` before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

fn chunk_object() -> String {
    "chat.completion.chunk".to_owned()
}

/// One choice's delta in a chunk.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChunkChoice {
    /// Choice index.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the chunk that ends the choice.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Everything else (`logprobs`), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// The delta of a streamed choice.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct Delta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool-call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Reasoning text to append, as OpenAI-compatible servers (DeepSeek, vLLM) stream it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Reasoning fragments with their block boundaries and signatures (Weir's canonical form,
    /// used between dialects that keep them: Anthropic thinking, Responses reasoning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_details: Option<Vec<ReasoningDelta>>,
    /// Everything else (`refusal`), passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// A fragment of a streamed reasoning block. Fragments with the same `index` belong to one
/// block; `text` appends, `signature` and `data` arrive whole (usually last).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct ReasoningDelta {
    /// Which block of this message the fragment belongs to, from 0.
    pub index: u32,
    /// `thinking` or `redacted`, on a block's first fragment.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Reasoning text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The block's signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Opaque redacted reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

/// A fragment of a streamed tool call. The first fragment of a call carries `id` and the
/// function name; later ones append to `arguments`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct ToolCallDelta {
    /// Which tool call of the choice this fragment belongs to.
    pub index: u32,
    /// Call id (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first fragment only).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and argument fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// The function part of a tool-call fragment.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct FunctionCallDelta {
    /// Function name (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the JSON-encoded arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// `POST /v1/embeddings` request body.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct EmbeddingsRequest {
    /// Model name from Weir's config.
    pub model: String,
    /// A string, an array of strings, or token arrays.
    pub input: Value,
    /// `float` or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// Output dimensions, where the model supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

impl EmbeddingsRequest {
    /// The inputs as strings (token-array inputs are not text and yield nothing).
    pub fn input_texts(&self) -> Vec<String> {
        match &self.input {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// `POST /v1/embeddings` response body.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct EmbeddingsResponse {
    /// `list`.
    #[serde(default = "list_object")]
    pub object: String,
    /// One embedding per input.
    pub data: Vec<Embedding>,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// Token usage (`prompt_tokens`, `total_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<EmbeddingsUsage>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Rest,
}

fn list_object() -> String {
    "list".to_owned()
}

/// One embedding.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Embedding {
    /// `embedding`.
    #[serde(default = "embedding_object")]
    pub object: String,
    /// Input index.
    #[serde(default)]
    pub index: u32,
    /// The vector (or a base64 string when `encoding_format` was `base64`).
    pub embedding: Value,
}

fn embedding_object() -> String {
    "embedding".to_owned()
}

/// Usage of an embeddings call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct EmbeddingsUsage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Same as `prompt_tokens`.
    #[serde(default)]
    pub total_tokens: u64,
}

// Request-path types parse without `#[serde(flatten)]`'s buffering (see `api::open`).
crate::open_object!(ChatRequest, "a chat completion request object", {
    model: "model" => required,
    messages: "messages" => required,
    stream: "stream" => defaulted,
    stream_options: "stream_options" => optional,
    tools: "tools" => optional,
    tool_choice: "tool_choice" => optional,
    parallel_tool_calls: "parallel_tool_calls" => optional,
    max_tokens: "max_tokens" => optional,
    max_completion_tokens: "max_completion_tokens" => optional,
    temperature: "temperature" => optional,
    top_p: "top_p" => optional,
    n: "n" => optional,
    stop: "stop" => optional,
    response_format: "response_format" => optional,
    user: "user" => optional,
});

crate::open_object!(StreamOptions, "a stream_options object", {
    include_usage: "include_usage" => optional,
});

crate::open_object!(ChatMessage, "a message object", {
    role: "role" => required,
    content: "content" => optional,
    name: "name" => optional,
    tool_calls: "tool_calls" => optional,
    tool_call_id: "tool_call_id" => optional,
    reasoning: "reasoning_details" => optional,
});

crate::open_object!(ContentPart, "a content part object", {
    kind: "type" => required,
    text: "text" => optional,
    image_url: "image_url" => optional,
});

/// `content` is a string or an array of parts; decided by the JSON type, without the
/// buffering `#[serde(untagged)]` needs.
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> serde::de::Visitor<'de> for ContentVisitor {
            type Value = MessageContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<MessageContent, A::Error> {
                Vec::<ContentPart>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(MessageContent::Parts)
            }
        }
        d.deserialize_any(ContentVisitor)
    }
}
