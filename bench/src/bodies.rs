//! Request bodies used by the scenarios and the micro-benchmarks, so every tool sends the
//! same bytes.

use serde_json::json;

/// The prompt text: about 900 bytes of plain English, so a whole chat body is about 1 KB.
pub fn prompt() -> String {
    let sentence = "Summarise the following paragraph for a busy reader and keep every number. ";
    let mut s = String::with_capacity(1024);
    while s.len() < 900 {
        s.push_str(sentence);
    }
    s
}

/// Placeholder in [`chat`] bodies that the load generators replace with a per-request
/// counter, so every request is distinct and a cache plugin always misses.
pub const COUNTER: &str = "@N@";

/// An OpenAI chat completion request of about 1 KB: a system and a user message and the
/// usual sampling fields. The system message carries [`COUNTER`] (a cache keys on messages,
/// not on `user`).
pub fn chat(model: &str, stream: bool) -> Vec<u8> {
    let mut v = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": format!("You are a concise assistant (request {COUNTER}).")},
            {"role": "user", "content": prompt()}
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "user": "bench-user-42"
    });
    if stream {
        v["stream"] = json!(true);
    }
    v.to_string().into_bytes()
}

/// An Anthropic Messages request with the same prompt.
pub fn messages(model: &str, stream: bool) -> Vec<u8> {
    json!({
        "model": model,
        "system": "You are a concise assistant.",
        "messages": [{"role": "user", "content": prompt()}],
        "max_tokens": 256,
        "temperature": 0.2,
        "stream": stream
    })
    .to_string()
    .into_bytes()
}

/// An OpenAI embeddings request.
pub fn embeddings(model: &str) -> Vec<u8> {
    json!({"model": model, "input": prompt()})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn chat_body_is_about_one_kilobyte() {
        let n = super::chat("m", false).len();
        assert!((900..1300).contains(&n), "{n}");
    }
}
