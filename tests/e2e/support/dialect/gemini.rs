//! Gemini dialect: `:generateContent` and `:streamGenerateContent?alt=sse` answers.

use serde_json::{Value, json};

use super::{COMPLETION_TOKENS, PROMPT_TOKENS};
use crate::support::upstream::{Frame, Reply};

fn usage() -> Value {
    json!({"promptTokenCount": PROMPT_TOKENS, "candidatesTokenCount": COMPLETION_TOKENS, "totalTokenCount": PROMPT_TOKENS + COMPLETION_TOKENS})
}

fn response(parts: Vec<Value>, finish: Option<&str>, with_usage: bool) -> Value {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(f) = finish {
        candidate["finishReason"] = json!(f);
    }
    let mut v = json!({"candidates": [candidate], "modelVersion": "upstream-gemini"});
    if with_usage {
        v["usageMetadata"] = usage();
    }
    v
}

/// A text answer.
pub fn generate(text: &str) -> Reply {
    Reply::json(response(vec![json!({"text": text})], Some("STOP"), true))
}

/// An answer calling one function.
pub fn generate_function_call(name: &str, args: Value) -> Reply {
    Reply::json(response(
        vec![json!({"functionCall": {"name": name, "args": args}})],
        Some("STOP"),
        true,
    ))
}

/// A streamed text answer: one `data:` event per piece, the last with the finish reason and
/// usage. Gemini sends no `[DONE]`.
pub fn stream_text(pieces: &[String]) -> Reply {
    let last = pieces.len().saturating_sub(1);
    Reply::Sse(
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let done = i == last;
                Frame::data(&response(
                    vec![json!({"text": p})],
                    done.then_some("STOP"),
                    done,
                ))
            })
            .collect(),
    )
}

/// The text of the last `user` turn of a generateContent request.
pub fn last_user_text(body: &Value) -> String {
    let Some(contents) = body.get("contents").and_then(Value::as_array) else {
        return String::new();
    };
    contents
        .iter()
        .rev()
        .find(|c| c["role"] == "user" || c.get("role").is_none())
        .and_then(|c| c["parts"].as_array())
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}
