//! `redaction`: Weir's PII and secret redaction policy, a WASM plugin built with
//! `weir-sdk`.
//!
//! Start with [`Redaction`], the [`Plugin`] implementation: `on-request` scans the
//! messages' text and their tool-call arguments (OpenAI `tool_calls`, Anthropic
//! `tool_use.input`) and masks, hashes, blocks or pseudonymizes what the detectors find,
//! rewriting text per message (`set-message-text`, so images and other parts stay) and
//! arguments per call (`set-tool-call-arguments`); `on-response` and `on-response-chunk`
//! put pseudonymized values back and redact model output, in text and tool-call
//! arguments. The pseudonym map of a request lives in the plugin's request scratch. The
//! pieces:
//! - [`detect`]: the detectors (regex candidates + validators) and the [`detect::Scanner`];
//! - [`config`]: the JSON config and the compiled [`config::Policy`];
//! - [`rewrite`]: the text transformations, JSON values of arguments, and the streaming
//!   hold rule;
//! - [`hash`]: the salted hash of `hash` mode.
//!
//! The README beside `plugin.toml` is the full config reference.

pub mod config;
pub mod detect;
pub mod hash;
pub mod rewrite;

use weir_sdk::{
    ChunkAction, Decision, Dialect, MessageView, Plugin, Reply, Request, ResponseDecision,
    ResponseView, StreamEvent, TextDelta, ToolCallDelta,
};

use config::{Policy, RedactionConfig};
use rewrite::{JsonValues, Pseudonyms, map_arguments, must_hold, redact_output, redact_request};

/// The scratch key holding the pseudonym map of a request (the plugin's request scratch
/// is private to it and never logged, so the map is kept in clear there).
pub const PSEUDONYMS_KEY: &str = "pseudonyms";
/// The metadata key with per-detector counts (`email=2,phone=1`): names only, no values.
pub const FINDINGS_KEY: &str = "redaction.findings";

/// The redaction plugin: a compiled policy.
#[derive(Debug)]
pub struct Redaction {
    policy: Policy,
}

/// Where a scanned text of a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The text of message `.0`.
    Text(u32),
    /// Value `.2` of the arguments of tool call `.1` of message `.0`.
    Argument(u32, u32, usize),
}

/// The tool-call arguments of one call, lexed: its message, its index, and the values.
struct Arguments<'t> {
    message: u32,
    index: u32,
    /// The lexed document, or `None` when it is not JSON-shaped (scanned whole).
    values: Option<JsonValues<'t>>,
    raw: &'t str,
}

impl Redaction {
    /// The compiled policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The pseudonym map of the current request, if `on-request` made one.
    fn pseudonyms(&self) -> Option<Pseudonyms> {
        let bytes = weir_sdk::scratch::get(PSEUDONYMS_KEY)?;
        Pseudonyms::from_bytes(&bytes).filter(|p| !p.is_empty())
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

    /// The texts of a request to scan, with where each comes from: every message's text,
    /// then the values of its tool calls' arguments.
    fn request_texts<'m>(
        messages: &'m [MessageView],
        calls: &'m [Arguments<'m>],
    ) -> Vec<(Source, &'m str, &'m str)> {
        let mut texts = Vec::new();
        for (i, m) in (0u32..).zip(messages) {
            texts.push((Source::Text(i), m.role.as_str(), m.content.as_str()));
        }
        for call in calls {
            let role = usize::try_from(call.message)
                .ok()
                .and_then(|i| messages.get(i))
                .map_or("assistant", |m| m.role.as_str());
            match &call.values {
                Some(values) => {
                    for (k, v) in values.values().enumerate() {
                        texts.push((Source::Argument(call.message, call.index, k), role, v));
                    }
                }
                None => texts.push((
                    Source::Argument(call.message, call.index, 0),
                    role,
                    call.raw,
                )),
            }
        }
        texts
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
        Ok(Redaction { policy })
    }

    fn on_request(&self, req: &Request) -> Decision {
        let messages = req.messages();
        let calls: Vec<Arguments<'_>> = (0u32..)
            .zip(&messages)
            .flat_map(|(i, m)| {
                (0u32..).zip(&m.tool_calls).map(move |(j, call)| Arguments {
                    message: i,
                    index: j,
                    values: JsonValues::parse(&call.arguments),
                    raw: &call.arguments,
                })
            })
            .collect();
        let texts = Redaction::request_texts(&messages, &calls);
        let redacted = match redact_request(&self.policy, texts.iter().map(|(_, r, t)| (*r, *t))) {
            Ok(r) => r,
            Err(blocked) => {
                weir_sdk::metrics::counter_add(&format!("blocked_{}", blocked.detector), 1);
                return Decision::Reply(block_reply(req.dialect(), &blocked.detector));
            }
        };
        for (name, n) in &redacted.counts {
            weir_sdk::metrics::counter_add(&format!("found_{name}"), *n);
        }
        if redacted.contents.iter().all(Option::is_none) {
            return Decision::cont();
        }
        let mut decision = Decision::cont();
        // Message text: one edit per changed message, so images and other parts stay.
        for ((source, _, _), new) in texts.iter().zip(&redacted.contents) {
            if let (Source::Text(i), Some(new)) = (source, new) {
                decision = decision.set_message_text(*i, new);
            }
        }
        // Tool-call arguments: the changed values spliced back into each document.
        for call in &calls {
            let new: Vec<Option<String>> = texts
                .iter()
                .zip(&redacted.contents)
                .filter(|((source, _, _), _)| {
                    matches!(source, Source::Argument(m, c, _) if *m == call.message && *c == call.index)
                })
                .map(|(_, new)| new.clone())
                .collect();
            let arguments = match &call.values {
                Some(values) => values.rebuild(&new),
                None => new.into_iter().next().flatten(),
            };
            if let Some(arguments) = arguments {
                decision = decision.set_tool_call_arguments(call.message, call.index, &arguments);
            }
        }
        let findings = redacted
            .counts
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        if !redacted.pseudonyms.is_empty() {
            weir_sdk::scratch::set(PSEUDONYMS_KEY, &redacted.pseudonyms.to_bytes());
        }
        decision.set_metadata(FINDINGS_KEY, &findings)
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
            for (j, call) in (0u32..).zip(&choice.tool_calls) {
                let new = map_arguments(&call.arguments, |v| self.finish_text(v, map.as_ref()));
                if let Some(arguments) = new {
                    decision = decision.set_tool_call_arguments(choice.index, j, &arguments);
                }
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
                // Hold while a match may still be incomplete, unless the gateway hands the
                // text back for the last time (finish, end of stream, full buffer): then
                // process what there is.
                if !delta.last
                    && delta.text.len() < self.policy.stream_window
                    && must_hold(&delta.text, map.is_some(), scanning)
                {
                    return ChunkAction::Hold;
                }
                match self.finish_text(&delta.text, map.as_ref()) {
                    Some(text) => ChunkAction::Replace(vec![StreamEvent::TextDelta(TextDelta {
                        choice: delta.choice,
                        text,
                        last: false,
                    })]),
                    None => ChunkAction::Pass,
                }
            }
            StreamEvent::ToolCallDelta(call) if call.arguments.contains('<') => {
                // Best effort: placeholders inside one argument fragment are restored
                // (JSON-escaped); tool-call deltas cannot be held.
                let Some(map) = self.pseudonyms() else {
                    return ChunkAction::Pass;
                };
                let restored = map.restore_json_fragment(&call.arguments);
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
