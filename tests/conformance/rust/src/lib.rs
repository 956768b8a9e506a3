//! keyword-guard (Rust side of the conformance suite; the Lua side is `../lua/plugin.lua`).
//! Every choice here mirrors the Lua code, including its ASCII-only lower-casing.

use serde::Deserialize;
use serde_json::json;
use weir_sdk::{
    ChunkAction, Decision, Dialect, Mutations, Plugin, Reply, RequestView, StreamEvent, TextDelta,
};

/// The instance config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The header carrying the team.
    #[serde(default = "default_header")]
    pub header: String,
    /// Blocked (request) and masked (stream) keywords.
    pub keywords: Vec<String>,
}

fn default_header() -> String {
    "x-team".into()
}

/// The plugin.
pub struct KeywordGuard {
    config: Config,
}

/// An error reply in the client's dialect, as `weir.error_reply` builds it in Lua.
fn error_reply(dialect: Dialect, status: u16, message: &str) -> Decision {
    let kind = match status {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "api_error",
    };
    let body = match dialect {
        Dialect::Anthropic => json!({ "type": "error", "error": { "type": kind, "message": message } }),
        Dialect::Openai => json!({ "error": { "message": message, "type": kind, "code": status } }),
    };
    Decision::Reply(Reply::json(status, &body))
}

impl Plugin for KeywordGuard {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(KeywordGuard { config })
    }

    fn on_request(&self, req: &RequestView) -> Decision {
        let header = self.config.header.as_str();
        let Some(team) = req.header(header) else {
            return error_reply(req.dialect, 401, &format!("missing {header} header"));
        };
        let mut users = 0;
        for m in req.messages.iter().filter(|m| m.role == "user") {
            users += 1;
            let text = m.content.to_ascii_lowercase();
            for k in &self.config.keywords {
                if text.contains(&k.to_ascii_lowercase()) {
                    return error_reply(req.dialect, 400, &format!("blocked keyword: {k}"));
                }
            }
        }
        Decision::Continue(Mutations {
            set_metadata: vec![
                ("team".into(), team.into()),
                ("user_messages".into(), users.to_string()),
            ],
            set_headers: vec![("x-weir-team".into(), team.into())],
            remove_headers: vec![header.into()],
            set_response_headers: vec![("x-weir-team".into(), team.into())],
            ..Mutations::default()
        })
    }

    fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        let StreamEvent::TextDelta(delta) = event else {
            return ChunkAction::Pass;
        };
        let mut text = delta.text.clone();
        for k in &self.config.keywords {
            text = text.replace(k.as_str(), &"*".repeat(k.len()));
        }
        let holds = self.config.keywords.iter().any(|k| {
            (1..k.len()).any(|n| text.as_bytes().ends_with(&k.as_bytes()[..n]))
        });
        if holds {
            ChunkAction::Hold
        } else if text != delta.text {
            ChunkAction::Replace(vec![StreamEvent::TextDelta(TextDelta {
                choice: delta.choice,
                text,
            })])
        } else {
            ChunkAction::Pass
        }
    }
}

weir_sdk::export!(KeywordGuard);
