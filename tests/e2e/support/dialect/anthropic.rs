//! Anthropic dialect: `/v1/messages` answers, plain and streamed.

use serde_json::{Value, json};

use super::{COMPLETION_TOKENS, Call, PROMPT_TOKENS, halves};
use crate::support::upstream::{Frame, Reply};

/// The model name canned answers report.
pub const MODEL: &str = "upstream-claude";

fn message_with(content: Vec<Value>, stop: &str) -> Value {
    json!({
        "id": "msg_upstream_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS},
    })
}

/// A text answer.
pub fn message(text: &str) -> Reply {
    Reply::json(message_with(
        vec![json!({"type": "text", "text": text})],
        "end_turn",
    ))
}

/// An answer with a short text then `tool_use` blocks.
pub fn message_tool_use(calls: &[Call<'_>]) -> Reply {
    let mut content = vec![json!({"type": "text", "text": "Let me check."})];
    content.extend(calls.iter().map(|c| {
        let input: Value = serde_json::from_str(c.args).expect("call args are JSON");
        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
    }));
    Reply::json(message_with(content, "tool_use"))
}

fn message_start() -> Frame {
    let mut msg = message_with(vec![], "end_turn");
    msg["stop_reason"] = Value::Null;
    msg["usage"] = json!({"input_tokens": PROMPT_TOKENS, "output_tokens": 1});
    Frame::event(
        "message_start",
        &json!({"type": "message_start", "message": msg}),
    )
}

fn message_end(stop: &str) -> [Frame; 2] {
    [
        Frame::event(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": COMPLETION_TOKENS}}),
        ),
        Frame::event("message_stop", &json!({"type": "message_stop"})),
    ]
}

/// The frames of a streamed text answer up to (not including) the message end.
pub fn text_frames(pieces: &[String]) -> Vec<Frame> {
    let mut frames = vec![
        message_start(),
        Frame::event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        Frame::event("ping", &json!({"type": "ping"})),
    ];
    frames.extend(pieces.iter().map(|p| {
        Frame::event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
        )
    }));
    frames.push(Frame::event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames
}

/// A streamed text answer.
pub fn stream_text(pieces: &[String]) -> Reply {
    let mut frames = text_frames(pieces);
    frames.extend(message_end("end_turn"));
    Reply::Sse(frames)
}

/// A streamed answer: a text block (`Let me check.`), then one `tool_use` block per call,
/// arguments as `input_json_delta`s. Tool blocks start at content index 1.
pub fn stream_tool_use(calls: &[Call<'_>]) -> Reply {
    let mut frames = text_frames(&["Let me check.".to_owned()]);
    frames.retain(|f| !matches!(f, Frame::Bytes(_, b) if b.starts_with("event: ping")));
    for (i, c) in calls.iter().enumerate() {
        let i = i + 1;
        frames.push(Frame::event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}),
        ));
        for piece in halves(c.args) {
            frames.push(Frame::event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        frames.push(Frame::event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": i}),
        ));
    }
    frames.extend(message_end("tool_use"));
    Reply::Sse(frames)
}

/// An Anthropic-shaped error.
pub fn error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::Json {
        status,
        body: json!({"type": "error", "error": {"type": kind, "message": message}}),
    }
}

/// The text of the last `user` message of a Messages request.
pub fn last_user_text(body: &Value) -> String {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect(),
            _ => String::new(),
        })
        .unwrap_or_default()
}
