//! `redaction`: Weir's PII and secret redaction policy, a WASM plugin built with
//! `weir-sdk`.
//!
//! Start with [`Redaction`], the [`Plugin`] implementation: `on-request` scans the
//! messages and masks, hashes, blocks or pseudonymizes what the detectors find;
//! `on-response` and `on-response-chunk` put pseudonymized values back and redact model
//! output. The pieces:
//! - [`detect`]: the detectors (regex candidates + validators) and the [`detect::Scanner`];
//! - [`config`]: the JSON config and the compiled [`config::Policy`];
//! - [`rewrite`]: the text transformations and the streaming hold rule;
//! - [`seal`]: salted hashes and the sealed pseudonym map.
//!
//! The README beside `plugin.toml` is the full config reference.

pub mod config;
pub mod detect;
pub mod rewrite;
pub mod seal;

use weir_sdk::{
    ChunkAction, Decision, Dialect, MessageView, Plugin, Reply, RequestView, ResponseDecision,
    ResponseView, StreamEvent, TextDelta, ToolCallDelta,
};

use config::{Policy, RedactionConfig};
use rewrite::{Pseudonyms, must_hold, redact_output, redact_request};
use seal::SealKey;

/// The metadata key holding the sealed pseudonym map of a request.
pub const PSEUDONYMS_KEY: &str = "redaction.pseudonyms";
/// Metadata key prefix (plus the choice index) recording how many bytes of streamed text
/// the plugin is holding: a length, never text.
pub const HELD_KEY_PREFIX: &str = "redaction.held.";
/// The metadata key with per-detector counts (`email=2,phone=1`): names only, no values.
pub const FINDINGS_KEY: &str = "redaction.findings";

/// The redaction plugin: a compiled policy and the key sealing pseudonym maps.
#[derive(Debug)]
pub struct Redaction {
    policy: Policy,
    key: SealKey,
}

impl Redaction {
    /// The compiled policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The pseudonym map of the current request, if `on-request` made one.
    fn pseudonyms(&self) -> Option<Pseudonyms> {
        let sealed = weir_sdk::ctx::get(PSEUDONYMS_KEY).filter(|s| !s.is_empty())?;
        let plain = self.key.open(&sealed)?;
        Pseudonyms::from_bytes(&plain)
    }

    /// Redacts model output, then restores placeholders (in that order, so values the
    /// client itself sent are not masked on their way back).
    fn finish_text(&self, text: &str, map: Option<&Pseudonyms>) -> Option<String> {
        let masked = redact_output(&self.policy, text);
        let restored = match map {
            Some(map) => map.restore(&masked).into_owned(),
            None => masked.into_owned(),
        };
        (restored != text).then_some(restored)
    }
}

/// A 400 in the caller's dialect naming the detector (never the value).
fn block_reply(dialect: Dialect, detector: &str) -> Reply {
    let message = format!(
        "Request blocked by the redaction policy: it contains {detector} data. Remove it and retry."
    );
    let body = match dialect {
        Dialect::Anthropic => serde_json::json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
        }),
        Dialect::Openai => serde_json::json!({
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": null,
                "code": "pii_detected",
            }
        }),
    };
    Reply::json(400, &body).header("x-weir-redaction", detector)
}

impl Plugin for Redaction {
    type Config = RedactionConfig;

    fn new(config: RedactionConfig) -> Result<Self, String> {
        let policy = Policy::try_from(config)?;
        let key = SealKey::derive(&policy.salt);
        Ok(Redaction { policy, key })
    }

    fn on_request(&self, req: &RequestView) -> Decision {
        let messages = req
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()));
        let redacted = match redact_request(&self.policy, messages) {
            Ok(r) => r,
            Err(blocked) => {
                weir_sdk::metrics::counter_add(&format!("blocked_{}", blocked.detector), 1);
                return Decision::Reply(block_reply(req.dialect, &blocked.detector));
            }
        };
        for (name, n) in &redacted.counts {
            weir_sdk::metrics::counter_add(&format!("found_{name}"), *n);
        }
        if redacted.contents.iter().all(Option::is_none) {
            return Decision::cont();
        }
        let messages: Vec<MessageView> = req
            .messages
            .iter()
            .zip(redacted.contents)
            .map(|(m, new)| MessageView {
                role: m.role.clone(),
                content: new.unwrap_or_else(|| m.content.clone()),
                tool_calls: m.tool_calls.clone(),
            })
            .collect();
        let findings = redacted
            .counts
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut decision = Decision::cont()
            .set_messages(messages)
            .set_metadata(FINDINGS_KEY, &findings);
        if !redacted.pseudonyms.is_empty() {
            let sealed = self
                .key
                .seal(&req.request_id, &redacted.pseudonyms.to_bytes());
            decision = decision.set_metadata(PSEUDONYMS_KEY, &sealed);
        }
        decision
    }

    fn on_response(&self, resp: &ResponseView) -> ResponseDecision {
        let map = if self.policy.pseudonymizes() {
            self.pseudonyms()
        } else {
            None
        };
        if map.is_none() && !self.policy.scans_output() {
            return ResponseDecision::cont();
        }
        let mut decision = ResponseDecision::cont();
        for choice in &resp.choices {
            if let Some(text) = self.finish_text(&choice.text, map.as_ref()) {
                decision = decision.set_choice_text(choice.index, &text);
            }
        }
        decision
    }

    fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        match event {
            StreamEvent::TextDelta(delta) => {
                let scanning = self.policy.scans_output();
                if !scanning && !self.policy.pseudonymizes() {
                    return ChunkAction::Pass;
                }
                // The map is only needed when a placeholder may be in the text.
                let map = if self.policy.pseudonymizes() && delta.text.contains('<') {
                    self.pseudonyms()
                } else {
                    None
                };
                // The gateway hands held text back once more, unchanged, at the choice's
                // finish, and releases it as is if we hold again: recognise that call (the
                // text has exactly the length we held) and never hold it.
                let held_key = format!("{HELD_KEY_PREFIX}{}", delta.choice);
                let held_len = weir_sdk::ctx::get(&held_key).and_then(|v| v.parse::<usize>().ok());
                let final_release = held_len == Some(delta.text.len());
                if !final_release
                    && delta.text.len() < self.policy.stream_window
                    && must_hold(&delta.text, map.is_some(), scanning)
                {
                    weir_sdk::ctx::set(&held_key, &delta.text.len().to_string());
                    return ChunkAction::Hold;
                }
                if held_len.is_some() {
                    weir_sdk::ctx::set(&held_key, "");
                }
                match self.finish_text(&delta.text, map.as_ref()) {
                    Some(text) => ChunkAction::Replace(vec![StreamEvent::TextDelta(TextDelta {
                        choice: delta.choice,
                        text,
                    })]),
                    None => ChunkAction::Pass,
                }
            }
            StreamEvent::ToolCallDelta(call) if call.arguments.contains('<') => {
                // Best effort: placeholders inside one argument fragment are restored;
                // tool-call deltas cannot be held.
                let Some(map) = self.pseudonyms() else {
                    return ChunkAction::Pass;
                };
                let restored = map.restore(&call.arguments);
                if restored == call.arguments {
                    return ChunkAction::Pass;
                }
                ChunkAction::Replace(vec![StreamEvent::ToolCallDelta(ToolCallDelta {
                    arguments: restored.into_owned(),
                    ..call.clone()
                })])
            }
            _ => ChunkAction::Pass,
        }
    }
}

weir_sdk::export!(Redaction);
