//! `mock`: an in-process provider for working offline.
//!
//! It exists so the quickstart runs with no API keys and so plugin authors can test policies
//! without spending tokens. It is **not** a model: it echoes the last user message (or answers
//! with a configured reply), can simulate latency and a stream of a chosen number of chunks,
//! and can drive an agent loop: offered tools, it calls one once (a fresh `call_...` id each
//! time), and after the tool's result it answers in text. It honours `max_tokens` and can emit
//! a thinking block first. Token counts are estimates (about four characters per token), good
//! enough for exercising rate limits and budgets.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::openai::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, Choice, ChunkChoice, Delta, Embedding,
    EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, FunctionCall, FunctionCallDelta,
    MessageContent, Reasoning, ReasoningDelta, Rest, ToolCall, ToolCallDelta, Usage,
};
use crate::config::{ConfigError, TimeoutsConfig};

/// `[providers.NAME]` with `kind = "mock"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed reply text. Default: echo the last user message as `Echo: <text>`.
    #[serde(default)]
    pub reply: Option<String>,
    /// When the request offers tools and no tool result follows the last user message, call
    /// a tool with these JSON arguments instead of answering with text (the tool
    /// `tool_name` names, else the first offered). Default: never call tools.
    #[serde(default)]
    pub tool_arguments: Option<String>,
    /// JSON arguments per tool name, so one mock serves clients offering different tools
    /// (`Bash = '{"command":"echo hi"}'`, `exec_command = '{"cmd":"echo hi"}'`). The first
    /// offered tool found here is called (the one `tool_name` names, when offered, wins).
    #[serde(default)]
    pub tool_arguments_by_name: BTreeMap<String, String>,
    /// Which offered tool to call. Default: the first offered tool with arguments configured.
    #[serde(default)]
    pub tool_name: Option<String>,
    /// The text answered after a tool result. Default: `Done: <the result>` (the result cut
    /// to 200 characters).
    #[serde(default)]
    pub reply_after_tool: Option<String>,
    /// Emit a thinking block (canonical reasoning, with a fake signature) before the answer.
    /// Default false: only when the request enables thinking (`thinking`, `reasoning_effort`
    /// or `reasoning`).
    #[serde(default)]
    pub thinking: bool,
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
        let args = cfg
            .tool_arguments
            .iter()
            .map(|a| ("tool_arguments".to_owned(), a));
        let by_name = cfg
            .tool_arguments_by_name
            .iter()
            .map(|(tool, a)| (format!("tool_arguments_by_name.{tool}"), a));
        for (key, text) in args.chain(by_name) {
            if serde_json::from_str::<serde_json::Value>(text).is_err() {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.{key}"),
                    "must be a JSON document",
                ));
            }
        }
        Ok(Mock { cfg: cfg.clone() })
    }

    /// Delay before the first byte.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.cfg.latency_ms)
    }

    /// The text answer: after a tool result, `reply_after_tool`; else the configured reply or
    /// an echo of the last user message.
    fn answer_text(&self, req: &ChatRequest) -> String {
        if let Some(result) = tool_result_after_last_user(req) {
            return match &self.cfg.reply_after_tool {
                Some(r) => r.clone(),
                None => format!("Done: {}", truncate_chars(&result, 200)),
            };
        }
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

    /// The tool call to make, if any: only when tools are offered, `tool_choice` is not
    /// `none`, arguments are configured for an offered tool, and the conversation has no tool
    /// result after its last user message (so an agent loop ends after one call).
    fn tool_call(&self, req: &ChatRequest) -> Option<ToolCall> {
        let tools = req.tools.as_ref()?;
        if req.tool_choice.as_ref().and_then(|c| c.as_str()) == Some("none")
            || tool_result_after_last_user(req).is_some()
        {
            return None;
        }
        let args_for = |name: &str| {
            self.cfg
                .tool_arguments_by_name
                .get(name)
                .or(self.cfg.tool_arguments.as_ref())
        };
        let offered = |name: &str| tools.iter().any(|t| t.function.name == name);
        let chosen = match &self.cfg.tool_name {
            Some(name) if offered(name) => Some(name.as_str()),
            _ => None,
        };
        let chosen = chosen.or_else(|| {
            tools
                .iter()
                .map(|t| t.function.name.as_str())
                .find(|n| self.cfg.tool_arguments_by_name.contains_key(*n))
        });
        let (name, args) = match chosen {
            Some(name) => (name, args_for(name)?),
            None => (
                tools.first()?.function.name.as_str(),
                self.cfg.tool_arguments.as_ref()?,
            ),
        };
        Some(ToolCall {
            id: format!("call_{}", uuid::Uuid::new_v4().simple()),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: name.to_owned(),
                arguments: args.clone(),
            },
        })
    }

    /// The text answer cut to the request's `max_tokens` (estimated), and whether it was cut.
    fn limited_text(&self, req: &ChatRequest) -> (String, bool) {
        let text = self.answer_text(req);
        match req.max_completion_tokens.or(req.max_tokens) {
            Some(max) => {
                let limit = (max as usize).saturating_mul(4);
                let cut = truncate_chars(&text, limit);
                let truncated = cut.len() < text.len();
                (cut, truncated)
            }
            None => (text, false),
        }
    }

    /// A thinking block, when configured or when the request enables thinking.
    fn reasoning(&self, req: &ChatRequest) -> Option<Reasoning> {
        let asked = req
            .rest
            .get("thinking")
            .is_some_and(|t| t.get("type").and_then(|v| v.as_str()) != Some("disabled"))
            || req.rest.contains_key("reasoning_effort")
            || req.rest.contains_key("reasoning");
        if !(self.cfg.thinking || asked) {
            return None;
        }
        Some(Reasoning {
            kind: Reasoning::THINKING.to_owned(),
            text: Some("The mock considers the request before it answers.".to_owned()),
            signature: Some(format!("mock-signature-{}", uuid::Uuid::new_v4().simple())),
            ..Reasoning::default()
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
        let (text, truncated) = self.limited_text(req);
        let reasoning = self.reasoning(req);
        let choices = (0..n)
            .map(|i| {
                let (content, tool_calls, finish) = match &call {
                    Some(c) => (None, Some(vec![c.clone()]), "tool_calls"),
                    None if truncated => (Some(MessageContent::Text(text.clone())), None, "length"),
                    None => (Some(MessageContent::Text(text.clone())), None, "stop"),
                };
                Choice {
                    index: i,
                    message: ChatMessage {
                        role: "assistant".to_owned(),
                        content,
                        tool_calls,
                        reasoning: reasoning.clone().map(|r| vec![r]),
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
        if let Some(r) = self.reasoning(req) {
            let text = r.text.clone().unwrap_or_default();
            for (i, piece) in split_even(&text, 2).into_iter().enumerate() {
                let d = Delta {
                    reasoning_details: Some(vec![ReasoningDelta {
                        index: 0,
                        kind: (i == 0).then(|| r.kind.clone()),
                        text: Some(piece),
                        ..ReasoningDelta::default()
                    }]),
                    ..Delta::default()
                };
                out.push((gap, chunk(vec![choice(d, None)], None)));
            }
            let d = Delta {
                reasoning_details: Some(vec![ReasoningDelta {
                    index: 0,
                    signature: r.signature.clone(),
                    ..ReasoningDelta::default()
                }]),
                ..Delta::default()
            };
            out.push((gap, chunk(vec![choice(d, None)], None)));
        }
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
            let (text, truncated) = self.limited_text(req);
            for piece in split_even(&text, self.cfg.stream_chunks as usize) {
                let d = Delta {
                    content: Some(piece),
                    ..Delta::default()
                };
                out.push((gap, chunk(vec![choice(d, None)], None)));
            }
            (if truncated { "length" } else { "stop" }, text)
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

/// The text of the tool results of the current turn, joined; `None` when there are none (the
/// mock has not called its tool yet in this turn). The turn starts at the last user message
/// that does not directly follow tool results: a client may send text along with its tool
/// results (Anthropic `tool_result` blocks beside text become `tool` messages, then a `user`
/// message), and that still answers the call.
fn tool_result_after_last_user(req: &ChatRequest) -> Option<String> {
    let msgs = &req.messages;
    let start = (0..msgs.len())
        .rev()
        .find(|&i| msgs[i].role == "user" && (i == 0 || msgs[i - 1].role != "tool"))
        .map_or(0, |i| i + 1);
    let results: Vec<String> = req.messages[start..]
        .iter()
        .filter(|m| m.role == "tool")
        .map(ChatMessage::text)
        .collect();
    (!results.is_empty()).then(|| results.join("\n"))
}

/// The first `max` characters of `s`.
fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
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

    const TOOLS: &str = r#""tools":[
        {"type":"function","function":{"name":"Read","parameters":{}}},
        {"type":"function","function":{"name":"Bash","parameters":{}}}]"#;

    #[test]
    fn agent_loop_calls_once_then_answers_from_the_result() {
        let m = mock("tool_arguments_by_name = { Bash = '{\"command\":\"echo hi\"}' }");
        let first = req(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"run it"}}],{TOOLS}}}"#
        ));
        let a = m.chat(&first, "m");
        let b = m.chat(&first, "m");
        let call = &a.choices[0].message.tool_calls.as_ref().expect("a call")[0];
        assert_eq!(
            call.function.name, "Bash",
            "the tool with arguments, not the first"
        );
        assert_eq!(call.function.arguments, r#"{"command":"echo hi"}"#);
        let other = &b.choices[0].message.tool_calls.as_ref().expect("a call")[0];
        assert_ne!(call.id, other.id, "every call gets its own id");
        assert_ne!(a.id, b.id);

        // The result comes back, with text beside it (as Claude Code sends it).
        let second = req(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"run it"}},
              {{"role":"assistant","content":null,"tool_calls":[{{"id":"{id}","type":"function",
                "function":{{"name":"Bash","arguments":"{{}}"}}}}]}},
              {{"role":"tool","tool_call_id":"{id}","content":"hi"}},
              {{"role":"user","content":"(reminder)"}}],{TOOLS}}}"#,
            id = call.id
        ));
        let r = m.chat(&second, "m");
        assert!(
            r.choices[0].message.tool_calls.is_none(),
            "one call per turn"
        );
        assert_eq!(r.choices[0].message.text(), "Done: hi");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));

        // A new user turn calls again.
        let third = req(&format!(
            r#"{{"model":"m","messages":[{{"role":"tool","tool_call_id":"x","content":"hi"}},
              {{"role":"assistant","content":"Done: hi"}},
              {{"role":"user","content":"again"}}],{TOOLS}}}"#
        ));
        assert!(m.chat(&third, "m").choices[0].message.tool_calls.is_some());
    }

    #[test]
    fn tool_name_picks_the_tool_and_tool_choice_none_disables() {
        let m = mock("tool_name = \"Read\"\ntool_arguments = '{}'");
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{TOOLS}}}"#);
        let r = m.chat(&req(&body), "m");
        assert_eq!(
            r.choices[0].message.tool_calls.as_ref().expect("call")[0]
                .function
                .name,
            "Read"
        );
        let none = body.replacen(r#"{"model""#, r##"{"tool_choice":"none","model""##, 1);
        assert!(
            m.chat(&req(&none), "m").choices[0]
                .message
                .tool_calls
                .is_none()
        );
        // No arguments configured: never a call.
        assert!(
            mock("").chat(&req(&body), "m").choices[0]
                .message
                .tool_calls
                .is_none()
        );
    }

    #[test]
    fn max_tokens_cuts_the_answer() {
        let m = mock("reply = \"abcdefghijklmnopqrstuvwxyz\"");
        let r = m.chat(
            &req(r#"{"model":"m","max_tokens":2,"messages":[{"role":"user","content":"x"}]}"#),
            "m",
        );
        assert_eq!(r.choices[0].message.text(), "abcdefgh");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("length"));
        let chunks = m.stream(
            &req(r#"{"model":"m","max_completion_tokens":2,"messages":[{"role":"user","content":"x"}]}"#),
            "m",
        );
        let text: String = chunks
            .iter()
            .flat_map(|(_, c)| c.choices.iter().filter_map(|ch| ch.delta.content.clone()))
            .collect();
        assert_eq!(text, "abcdefgh");
        let finish = chunks
            .iter()
            .find_map(|(_, c)| c.choices.first()?.finish_reason.clone());
        assert_eq!(finish.as_deref(), Some("length"));
    }

    #[test]
    fn thinking_comes_first_streamed_or_not() {
        let body = r#"{"model":"m","thinking":{"type":"enabled","budget_tokens":1024},
            "messages":[{"role":"user","content":"x"}]}"#;
        let m = mock("");
        let r = m.chat(&req(body), "m");
        let blocks = r.choices[0].message.reasoning.clone().expect("reasoning");
        assert_eq!(blocks[0].kind, Reasoning::THINKING);
        assert!(blocks[0].signature.is_some());
        let chunks = m.stream(&req(body), "m");
        let kinds: Vec<&str> = chunks
            .iter()
            .filter_map(|(_, c)| c.choices.first())
            .filter_map(|ch| {
                if ch.delta.reasoning_details.is_some() {
                    Some("reasoning")
                } else if ch.delta.content.as_deref().is_some_and(|t| !t.is_empty()) {
                    Some("text")
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(kinds.first(), Some(&"reasoning"));
        assert_eq!(kinds.last(), Some(&"text"));
        let plain = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        assert!(
            m.chat(&req(plain), "m").choices[0]
                .message
                .reasoning
                .is_none()
        );
        assert!(
            mock("thinking = true").chat(&req(plain), "m").choices[0]
                .message
                .reasoning
                .is_some()
        );
    }

    #[test]
    fn rejects_arguments_that_are_not_json() {
        let cfg = toml::from_str("tool_arguments_by_name = { Bash = 'nope' }").expect("cfg");
        let err = Mock::new("m", &cfg).expect_err("invalid");
        assert!(
            err.to_string().contains("tool_arguments_by_name.Bash"),
            "{err}"
        );
    }
}
