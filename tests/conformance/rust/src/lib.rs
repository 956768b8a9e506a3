//! keyword-guard (Rust side of the conformance suite; the Lua side is `../lua/plugin.lua`).
//! Every choice here mirrors the Lua code, including its ASCII-only lower-casing: the
//! suite asserts the two decide alike, byte for byte.

use serde::Deserialize;
use serde_json::json;
use weir_sdk::{
    AdminRequest, AdminResponse, ChunkAction, Decision, Dialect, LogEntry, Mutations, Plugin,
    Reply, Request, StreamEvent, TextDelta,
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
    /// The highest `max_tokens` a request may ask for.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Requests per window and team (the host limiter).
    #[serde(default)]
    pub requests_per_window: Option<u64>,
    /// The limiter's window.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
}

fn default_header() -> String {
    "x-team".into()
}

fn default_window_ms() -> u64 {
    60_000
}

/// The plugin.
pub struct KeywordGuard {
    config: Config,
}

/// An error reply in the client's dialect, as `weir.error_reply` builds it in Lua.
fn error_reply(dialect: Dialect, status: u16, message: &str) -> Reply {
    let kind = match status {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "api_error",
    };
    let body = match dialect {
        Dialect::Anthropic => {
            json!({ "type": "error", "error": { "type": kind, "message": message } })
        }
        Dialect::Openai => json!({ "error": { "message": message, "type": kind, "code": status } }),
    };
    Reply::json(status, &body)
}

/// Replaces every occurrence of `word` in `text` with asterisks; returns how many.
fn mask(text: &str, word: &str) -> (String, usize) {
    let n = text.matches(word).count();
    (text.replace(word, &"*".repeat(word.len())), n)
}

/// A counter kept as decimal text in kv (missing or unreadable: 0).
fn count(key: &str) -> i64 {
    weir_sdk::kv::get_string(key)
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Plugin for KeywordGuard {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(KeywordGuard { config })
    }

    fn on_request(&self, req: &Request) -> Decision {
        let header = self.config.header.as_str();
        let dialect = req.dialect();
        let Some(team) = req.header(header) else {
            return Decision::Reply(error_reply(
                dialect,
                401,
                &format!("missing {header} header"),
            ));
        };
        // Every request with a team is counted by on_log, through this plugin's scratch.
        weir_sdk::scratch::set_string("team", &team);
        let blocked = weir_sdk::kv::get_string(&format!("team:{team}"))
            .ok()
            .flatten();
        if blocked.as_deref() == Some("blocked") {
            return Decision::Reply(error_reply(
                dialect,
                403,
                &format!("team {team} is blocked"),
            ));
        }
        if let Some(max) = self.config.max_tokens
            && req.max_tokens().is_some_and(|asked| asked > max)
        {
            return Decision::Reply(error_reply(dialect, 400, &format!("max_tokens over {max}")));
        }
        let mut users = 0;
        for m in req.messages().iter().filter(|m| m.role == "user") {
            users += 1;
            let text = m.content.to_ascii_lowercase();
            for k in &self.config.keywords {
                if text.contains(&k.to_ascii_lowercase()) {
                    return Decision::Reply(error_reply(
                        dialect,
                        400,
                        &format!("blocked keyword: {k}"),
                    ));
                }
            }
        }
        let mut response_headers = vec![("x-weir-team".to_owned(), team.clone())];
        if let Some(per_window) = self.config.requests_per_window {
            match weir_sdk::limit::reserve(
                &format!("team:{team}"),
                per_window,
                self.config.window_ms,
                1,
            ) {
                Ok(r) if !r.allowed => {
                    let reply = error_reply(
                        dialect,
                        429,
                        &format!("team {team} is over its request limit"),
                    )
                    .header("retry-after-ms", &r.retry_after_ms.to_string());
                    return Decision::Reply(reply);
                }
                Ok(r) => {
                    response_headers.push(("x-weir-remaining".into(), r.remaining.to_string()))
                }
                Err(e) => return Decision::Reply(error_reply(dialect, 500, &e)),
            }
        }
        Decision::Continue(Mutations {
            set_metadata: vec![
                ("team".into(), team.clone()),
                ("user_messages".into(), users.to_string()),
                ("message_count".into(), req.message_count().to_string()),
            ],
            set_headers: vec![("x-weir-team".into(), team)],
            remove_headers: vec![header.into()],
            set_response_headers: response_headers,
            ..Mutations::default()
        })
    }

    fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        let StreamEvent::TextDelta(delta) = event else {
            return ChunkAction::Pass;
        };
        let mut text = delta.text.clone();
        let mut masked = 0;
        for k in &self.config.keywords {
            let (out, n) = mask(&text, k);
            text = out;
            masked += n;
        }
        // A held tail comes back with `last` set (at the end of the stream): it can no
        // longer grow into a keyword, so it goes out as it is.
        let holds = !delta.last
            && self
                .config
                .keywords
                .iter()
                .any(|k| (1..k.len()).any(|n| text.as_bytes().ends_with(&k.as_bytes()[..n])));
        if holds {
            return ChunkAction::Hold;
        }
        // Counted once the text goes out (held text comes back, unmasked, with the next
        // delta).
        if masked > 0 {
            let before: usize = weir_sdk::scratch::get_string("masked")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            weir_sdk::scratch::set_string("masked", &(before + masked).to_string());
        }
        if text != delta.text {
            ChunkAction::Replace(vec![StreamEvent::TextDelta(TextDelta {
                choice: delta.choice,
                text,
                last: false,
            })])
        } else {
            ChunkAction::Pass
        }
    }

    fn on_log(&self, entry: &LogEntry) {
        let Some(team) = weir_sdk::scratch::get_string("team") else {
            return;
        };
        if entry.status < 400 {
            weir_sdk::kv::incr(&format!("served:{team}"), 1, None).ok();
            weir_sdk::kv::set_string(
                &format!("seen:{team}"),
                &weir_sdk::now_ms().to_string(),
                None,
            )
            .ok();
        } else {
            weir_sdk::kv::incr(&format!("refused:{team}"), 1, None).ok();
        }
        if !entry.attempts.is_empty() {
            let n = i64::try_from(entry.attempts.len()).unwrap_or(i64::MAX);
            weir_sdk::kv::incr(&format!("attempts:{team}"), n, None).ok();
        }
        let masked = weir_sdk::scratch::get_string("masked").and_then(|v| v.parse::<i64>().ok());
        if let Some(masked) = masked {
            weir_sdk::kv::incr(&format!("masked:{team}"), masked, None).ok();
        }
    }

    /// `GET /teams/<team>`: what on_log counted; `POST` and `DELETE /teams/<team>/block`.
    fn admin(&self, req: &AdminRequest) -> AdminResponse {
        let Some((team, action)) = req
            .path
            .strip_prefix("/teams/")
            .map(|rest| rest.split_at(rest.find('/').unwrap_or(rest.len())))
            .filter(|(team, _)| !team.is_empty())
        else {
            return AdminResponse::json(404, &json!({ "error": "not found" }));
        };
        match (action, req.method.as_str()) {
            ("", "GET") => {
                let seen = weir_sdk::kv::get_string(&format!("seen:{team}"))
                    .ok()
                    .flatten()
                    .and_then(|v| v.trim().parse::<i64>().ok());
                let blocked = weir_sdk::kv::get_string(&format!("team:{team}"))
                    .ok()
                    .flatten();
                AdminResponse::json(
                    200,
                    &json!({
                        "team": team,
                        "served": count(&format!("served:{team}")),
                        "refused": count(&format!("refused:{team}")),
                        "masked": count(&format!("masked:{team}")),
                        "attempts": count(&format!("attempts:{team}")),
                        "blocked": blocked.as_deref() == Some("blocked"),
                        "seen_ms": seen,
                    }),
                )
            }
            ("/block", "POST") => {
                weir_sdk::kv::set_string(&format!("team:{team}"), "blocked", None).ok();
                AdminResponse::json(200, &json!({ "team": team, "blocked": true }))
            }
            ("/block", "DELETE") => {
                weir_sdk::kv::delete(&format!("team:{team}")).ok();
                AdminResponse::json(200, &json!({ "team": team, "blocked": false }))
            }
            _ => AdminResponse::json(405, &json!({ "error": "method not allowed" })),
        }
    }
}

weir_sdk::export!(KeywordGuard);
