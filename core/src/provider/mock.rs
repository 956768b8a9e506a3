//! `mock`: an in-process provider for working offline.
//!
//! It exists so the quickstart runs with no API keys and so plugin authors can test policies
//! without spending tokens. It is **not** a model: it echoes the last user message (or answers
//! with a configured reply), can be told to call a tool, and can simulate latency and a
//! stream of a chosen number of chunks. Token counts are estimates (about four characters per
//! token), good enough for exercising rate limits and budgets.

use serde::Deserialize;
use std::time::Duration;

use crate::api::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, Choice, ChunkChoice, Delta, Embedding,
    EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, FunctionCall, FunctionCallDelta,
    MessageContent, Rest, ToolCall, ToolCallDelta, Usage,
};
use crate::config::{ConfigError, TimeoutsConfig};

/// `[providers.NAME]` with `kind = "mock"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed reply text. Default: echo the last user message as `Echo: <text>`.
    #[serde(default)]
    pub reply: Option<String>,
    /// When the request offers tools, call the first one with these JSON arguments instead of
    /// answering with text. Default: never call tools.
    #[serde(default)]
    pub tool_arguments: Option<String>,
    /// Delay before the answer (or the first chunk), ms. Default 0.
    #[serde(default)]
    pub latency_ms: u64,
    /// Delay between stream chunks, ms. Default 0.
    #[serde(default)]
    pub chunk_delay_ms: u64,
    /// Number of content chunks a stream is split into. Default 5.
    #[serde(default = "default_chunks")]
    pub stream_chunks: u32,
    /// Embedding dimensions. Default 8.
    #[serde(default = "default_dims")]
    pub embedding_dims: u32,
    /// Accepted for symmetry with other providers; the mock does no I/O.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
}

fn default_chunks() -> u32 {
    5
}
fn default_dims() -> u32 {
    8
}

/// The live mock provider.
#[derive(Debug, Clone)]
pub struct Mock {
    cfg: MockConfig,
}

/// A chunk of a mock stream and the delay before it.
pub type TimedChunk = (Duration, ChatChunk);

impl Mock {
    /// Builds the mock, validating its config.
    pub fn new(name: &str, cfg: &MockConfig) -> Result<Self, ConfigError> {
        if cfg.stream_chunks == 0 {
            return Err(ConfigError::invalid(
                format!("providers.{name}.stream_chunks"),
                "must be at least 1",
            ));
        }
        if let Some(args) = &cfg.tool_arguments
            && serde_json::from_str::<serde_json::Value>(args).is_err()
        {
            return Err(ConfigError::invalid(
                format!("providers.{name}.tool_arguments"),
                "must be a JSON document",
            ));
        }
        Ok(Mock { cfg: cfg.clone() })
    }

    /// Delay before the first byte.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.cfg.latency_ms)
    }

    fn answer_text(&self, req: &ChatRequest) -> String {
        if let Some(r) = &self.cfg.reply {
            return r.clone();
        }
        let last = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(ChatMessage::text)
            .unwrap_or_default();
        format!("Echo: {last}")
    }

    fn tool_call(&self, req: &ChatRequest) -> Option<ToolCall> {
        let args = self.cfg.tool_arguments.as_ref()?;
        let tool = req.tools.as_ref()?.first()?;
        if req.tool_choice.as_ref().and_then(|c| c.as_str()) == Some("none") {
            return None;
        }
        Some(ToolCall {
            id: "call_mock_0".to_owned(),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: tool.function.name.clone(),
                arguments: args.clone(),
            },
        })
    }

    fn usage(req: &ChatRequest, output: &str) -> Usage {
        let prompt: usize = req.messages.iter().map(|m| m.text().len()).sum();
        Usage::new(estimate_tokens(prompt), estimate_tokens(output.len()))
    }

    /// A non-streaming answer.
    pub fn chat(&self, req: &ChatRequest, model: &str) -> ChatResponse {
        let n = req.n.unwrap_or(1).max(1);
        let call = self.tool_call(req);
        let text = self.answer_text(req);
        let choices = (0..n)
            .map(|i| {
                let (content, tool_calls, finish) = match &call {
                    Some(c) => (None, Some(vec![c.clone()]), "tool_calls"),
                    None => (Some(MessageContent::Text(text.clone())), None, "stop"),
                };
                Choice {
                    index: i,
                    message: ChatMessage {
                        role: "assistant".to_owned(),
                        content,
                        tool_calls,
                        ..ChatMessage::default()
                    },
                    finish_reason: Some(finish.to_owned()),
                    rest: Rest::new(),
                }
            })
            .collect();
        let out_len = call
            .as_ref()
            .map(|c| c.function.arguments.len())
            .unwrap_or(text.len())
            * n as usize;
        ChatResponse {
            id: format!("chatcmpl-mock-{}", uuid::Uuid::new_v4().simple()),
            object: "chat.completion".to_owned(),
            created: super::unix_now(),
            model: model.to_owned(),
            choices,
            usage: Some(Self::usage(req, &"x".repeat(out_len))),
            rest: Rest::new(),
        }
    }

    /// A streamed answer: the chunks and the delay before each. The text is split into
    /// `stream_chunks` pieces (on char boundaries); a final usage chunk is always produced
    /// and the pipeline drops it unless the client asked for `include_usage`.
    pub fn stream(&self, req: &ChatRequest, model: &str) -> Vec<TimedChunk> {
        let id = format!("chatcmpl-mock-{}", uuid::Uuid::new_v4().simple());
        let created = super::unix_now();
        let gap = Duration::from_millis(self.cfg.chunk_delay_ms);
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created,
            model: model.to_owned(),
            choices,
            usage,
            rest: Rest::new(),
        };
        let choice = |delta: Delta, finish: Option<&str>| ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish.map(str::to_owned),
            rest: Rest::new(),
        };
        let mut out = Vec::new();
        let first = Delta {
            role: Some("assistant".to_owned()),
            content: Some(String::new()),
            ..Delta::default()
        };
        out.push((Duration::ZERO, chunk(vec![choice(first, None)], None)));
        let (finish, produced) = if let Some(call) = self.tool_call(req) {
            let pieces = split_even(&call.function.arguments, self.cfg.stream_chunks as usize);
            for (i, piece) in pieces.into_iter().enumerate() {
                let delta = ToolCallDelta {
                    index: 0,
                    id: (i == 0).then(|| call.id.clone()),
                    kind: (i == 0).then(|| "function".to_owned()),
                    function: Some(FunctionCallDelta {
                        name: (i == 0).then(|| call.function.name.clone()),
                        arguments: Some(piece),
                    }),
                };
                let d = Delta {
                    tool_calls: Some(vec![delta]),
                    ..Delta::default()
                };
                out.push((gap, chunk(vec![choice(d, None)], None)));
            }
            ("tool_calls", call.function.arguments)
        } else {
            let text = self.answer_text(req);
            for piece in split_even(&text, self.cfg.stream_chunks as usize) {
                let d = Delta {
                    content: Some(piece),
                    ..Delta::default()
                };
                out.push((gap, chunk(vec![choice(d, None)], None)));
            }
            ("stop", text)
        };
        out.push((
            Duration::ZERO,
            chunk(vec![choice(Delta::default(), Some(finish))], None),
        ));
        out.push((
            Duration::ZERO,
            chunk(Vec::new(), Some(Self::usage(req, &produced))),
        ));
        out
    }

    /// Deterministic embeddings: a vector derived from each input's bytes.
    pub fn embeddings(&self, req: &EmbeddingsRequest, model: &str) -> EmbeddingsResponse {
        let inputs = req.input_texts();
        let dims = req.dimensions.unwrap_or(self.cfg.embedding_dims) as usize;
        let data = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| Embedding {
                object: "embedding".to_owned(),
                index: i as u32,
                embedding: serde_json::Value::from(pseudo_vector(text, dims)),
            })
            .collect();
        let tokens = estimate_tokens(inputs.iter().map(String::len).sum());
        EmbeddingsResponse {
            object: "list".to_owned(),
            data,
            model: model.to_owned(),
            usage: Some(EmbeddingsUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            }),
            rest: Rest::new(),
        }
    }
}

/// About four bytes per token, at least one token for non-empty text.
pub fn estimate_tokens(bytes: usize) -> u64 {
    bytes.div_ceil(4) as u64
}

/// Splits `s` into `n` pieces of near-equal length on char boundaries (fewer if `s` is short).
fn split_even(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = n.clamp(1, chars.len());
    let size = chars.len().div_ceil(n);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn pseudo_vector(text: &str, dims: usize) -> Vec<f64> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f64 / 1000.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> ChatRequest {
        serde_json::from_str(json).expect("request")
    }

    fn mock(toml_text: &str) -> Mock {
        Mock::new("m", &toml::from_str(toml_text).expect("cfg")).expect("mock")
    }

    #[test]
    fn echoes_last_user_message() {
        let r = mock("").chat(
            &req(r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#),
            "m",
        );
        assert_eq!(r.choices[0].message.text(), "Echo: hello");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn stream_joins_to_the_full_answer() {
        let chunks = mock("stream_chunks = 3\nreply = \"abcdefg\"").stream(
            &req(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#),
            "m",
        );
        let text: String = chunks
            .iter()
            .flat_map(|(_, c)| c.choices.iter().filter_map(|ch| ch.delta.content.clone()))
            .collect();
        assert_eq!(text, "abcdefg");
        assert_eq!(chunks.len(), 1 + 3 + 2);
    }

    #[test]
    fn calls_tool_when_configured() {
        let m = mock("tool_arguments = '{\"city\":\"Paris\"}'");
        let r = m.chat(
            &req(r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "tools":[{"type":"function","function":{"name":"weather","parameters":{}}}]}"#),
            "m",
        );
        let calls = r.choices[0].message.tool_calls.clone().expect("calls");
        assert_eq!(calls[0].function.name, "weather");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("tool_calls"));
    }
}
