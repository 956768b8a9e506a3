//! Token-count estimates for `POST /v1/messages/count_tokens` when the target provider has
//! no counting API of its own: a real BPE tokenizer (`tiktoken-rs`) over the request's text.
//!
//! `o200k_base` (GPT-4o, GPT-4.1, GPT-5, o-series) or `cl100k_base` (every other model),
//! plus a small per-message overhead as OpenAI's chat format adds. The result is an
//! estimate, marked as such to the client (`x-weir-token-estimate: true`).

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::api::openai::{ChatRequest, MessageContent};

/// Tokens the chat format adds per message (role and delimiters).
const PER_MESSAGE: u64 = 3;

/// Tokens that prime the answer.
const PER_REQUEST: u64 = 3;

/// Which BPE encoding a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o and later OpenAI models.
    O200kBase,
    /// Everything else (GPT-4, GPT-3.5, and an approximation for other vendors).
    Cl100kBase,
}

impl Encoding {
    /// The encoding for an upstream model name.
    pub fn for_model(model: &str) -> Encoding {
        let m = model.rsplit('/').next().unwrap_or(model);
        let o200k = [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "chatgpt-4o",
            "o1",
            "o3",
            "o4",
        ];
        if o200k.iter().any(|p| m.starts_with(p)) {
            Encoding::O200kBase
        } else {
            Encoding::Cl100kBase
        }
    }

    /// Its name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200kBase => O200K.get_or_init(|| tiktoken_rs::o200k_base().ok()),
            Encoding::Cl100kBase => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()),
        }
        .as_ref()
    }
}

/// Counts the tokens of `text`; without a tokenizer (it failed to load), ~4 bytes a token.
pub fn count_text(encoding: Encoding, text: &str) -> u64 {
    match encoding.bpe() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => (text.len() as u64).div_ceil(4),
    }
}

/// Estimates the input tokens of a chat request for `model`: message text, tool calls,
/// tool definitions, plus the chat format's overhead.
pub fn estimate(req: &ChatRequest, model: &str) -> u64 {
    let enc = Encoding::for_model(model);
    let mut total = PER_REQUEST;
    for m in &req.messages {
        total += PER_MESSAGE + count_text(enc, &m.role);
        match &m.content {
            Some(MessageContent::Text(t)) => total += count_text(enc, t),
            Some(MessageContent::Parts(parts)) => {
                for p in parts {
                    if let Some(t) = &p.text {
                        total += count_text(enc, t);
                    }
                }
            }
            None => {}
        }
        for call in m.tool_calls.iter().flatten() {
            total += count_text(enc, &call.function.name);
            total += count_text(enc, &call.function.arguments);
        }
        for r in m.reasoning.iter().flatten() {
            if let Some(t) = &r.text {
                total += count_text(enc, t);
            }
        }
    }
    for t in req.tools.iter().flatten() {
        total += count_text(enc, &t.function.name);
        if let Some(d) = &t.function.description {
            total += count_text(enc, d);
        }
        if let Some(p) = &t.function.parameters {
            total += count_text(enc, &p.to_string());
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_pick_their_encoding() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("openai/gpt-5"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("claude-sonnet-4"), Encoding::Cl100kBase);
    }

    #[test]
    fn text_is_counted_by_the_real_tokenizer() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        let req: ChatRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#,
        )
        .expect("request");
        // 3 (request) + 3 (message) + 1 ("user") + 2.
        assert_eq!(estimate(&req, "gpt-4o"), 9);
    }
}
