//! OpenAI dialect: `/chat/completions` and `/embeddings` answers.

use serde_json::{Value, json};

use super::{COMPLETION_TOKENS, Call, PROMPT_TOKENS, halves};
use crate::support::upstream::{Frame, Reply};

/// The model name canned answers report.
pub const MODEL: &str = "upstream-gpt";

fn usage() -> Value {
    json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS})
}

fn completion(message: Value, finish: &str) -> Reply {
    Reply::json(json!({
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
        "usage": usage(),
        "system_fingerprint": "fp_mock",
    }))
}

/// A text answer.
pub fn chat(text: &str) -> Reply {
    completion(
        json!({"role": "assistant", "content": text, "refusal": null}),
        "stop",
    )
}

/// An answer that calls tools (in parallel when several).
pub fn chat_tool_calls(calls: &[Call<'_>]) -> Reply {
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.args}}))
        .collect();
    completion(
        json!({"role": "assistant", "content": null, "tool_calls": calls}),
        "tool_calls",
    )
}

/// One `chat.completion.chunk`.
pub fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
}

/// The usage chunk sent last when `stream_options.include_usage` is set.
pub fn usage_chunk() -> Value {
    json!({
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [],
        "usage": usage(),
    })
}

/// The frames of a streamed text answer, without `[DONE]`.
pub fn text_frames(pieces: &[String]) -> Vec<Frame> {
    let mut frames = vec![Frame::data(&chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    frames.extend(
        pieces
            .iter()
            .map(|p| Frame::data(&chunk(json!({"content": p}), None))),
    );
    frames.push(Frame::data(&chunk(json!({}), Some("stop"))));
    frames
}

/// A streamed text answer, with a usage chunk if asked, then `[DONE]`.
pub fn stream_text(pieces: &[String], include_usage: bool) -> Reply {
    let mut frames = text_frames(pieces);
    if include_usage {
        frames.push(Frame::data(&usage_chunk()));
    }
    frames.push(done());
    Reply::Sse(frames)
}

/// A streamed answer calling tools: each call's id and name first, its arguments in two
/// pieces, calls one after another as OpenAI sends parallel calls.
pub fn stream_tool_calls(calls: &[Call<'_>]) -> Reply {
    let mut frames = vec![Frame::data(&chunk(
        json!({"role": "assistant", "content": null}),
        None,
    ))];
    for (i, c) in calls.iter().enumerate() {
        let start = json!({"tool_calls": [{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}]});
        frames.push(Frame::data(&chunk(start, None)));
        for piece in halves(c.args) {
            let delta = json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]});
            frames.push(Frame::data(&chunk(delta, None)));
        }
    }
    frames.push(Frame::data(&chunk(json!({}), Some("tool_calls"))));
    frames.push(done());
    Reply::Sse(frames)
}

/// `data: [DONE]`.
pub fn done() -> Frame {
    Frame::text("data: [DONE]\n\n")
}

/// An embeddings answer with one 4-dimensional vector per input.
pub fn embeddings(req: &Value) -> Reply {
    let n = match req.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.75, i as f64]}))
        .collect();
    Reply::json(json!({
        "object": "list",
        "data": data,
        "model": "upstream-embed",
        "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
    }))
}

/// The text of the last `user` message of a chat request.
pub fn last_user_text(body: &Value) -> String {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default()
}

/// Text of a `content` that is a string or a list of parts.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}
