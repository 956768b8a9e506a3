//! [`ChunkFilter`]: a stream's events through the chunk hooks, with hold buffers.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Instance, StreamStop};
use crate::api::openai::{ChatChunk, ChunkChoice, Delta, FunctionCallDelta, PromptTokensDetails};
use crate::plugin::breaker::caller_of;
use crate::plugin::config::Mode;
use crate::plugin::contract::{
    ChunkAction, Finish, Hook, HookCtx, HookError, StreamEvent, TextDelta, ToolCallDelta, Usage,
};
use crate::plugin::manifest::event_bytes;
use crate::request::Scratch;

/// One plugin's place in a stream: its hold buffers (per choice) and whether a fail-open
/// failure took it out of this stream.
pub(super) struct Stage {
    pub(super) inst: Arc<Instance>,
    /// The instance's position in its chain (its scratch slot).
    pub(super) position: usize,
    pub(super) held: BTreeMap<u32, String>,
    pub(super) skipped: bool,
}

/// Runs a stream's chunks through the chain's chunk hooks.
///
/// Each chunk is split into normalized events (text delta, tool-call delta, usage, finish),
/// each event goes through the plugins (reverse order), and the surviving events are put
/// back into chunks. When every plugin passes, the original chunk is forwarded untouched.
///
/// Hold: a plugin that answers `hold` to a text delta gets that text back, with the next
/// delta of the same choice appended, on its next call, so a pattern split across chunks
/// can be caught. Held text is never released unprocessed: at the choice's finish, at the
/// end of the stream, and when it would grow past `limits.hold_bytes`, the holder is called
/// once more with `last = true` and must answer `pass` or `replace` (a `hold` then is a
/// plugin failure, handled by its failure policy).
pub struct ChunkFilter {
    stages: Vec<Stage>,
    request_id: String,
    metadata: BTreeMap<String, String>,
    /// The plugins' request scratch, taken from the request for the stream.
    scratch: Scratch,
    /// The first chunk, emptied: id, model and pass-through fields for rebuilt chunks.
    template: Option<ChatChunk>,
}

impl std::fmt::Debug for ChunkFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFilter")
            .field("stages", &self.stages.len())
            .finish_non_exhaustive()
    }
}

/// What one stage did to one event.
enum Step {
    /// Forwarded unchanged.
    Same,
    /// Changed, dropped, held or released held text.
    Changed,
}

impl ChunkFilter {
    pub(super) fn new(
        stages: Vec<Stage>,
        request_id: String,
        metadata: BTreeMap<String, String>,
        scratch: Scratch,
    ) -> ChunkFilter {
        ChunkFilter {
            stages,
            request_id,
            metadata,
            scratch,
            template: None,
        }
    }

    /// The plugins' scratch, for `on_log` once the stream is over.
    pub fn take_scratch(&mut self) -> Scratch {
        std::mem::take(&mut self.scratch)
    }

    /// Whether the filter has no plugin (every chunk passes untouched).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The request metadata, including changes made by chunk hooks (for `on_log`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Filters one chunk; pushes the chunks to send (none while text is held) onto `out`.
    pub fn on_chunk(
        &mut self,
        chunk: ChatChunk,
        out: &mut Vec<ChatChunk>,
    ) -> Result<(), StreamStop> {
        if self.stages.is_empty() {
            out.push(chunk);
            return Ok(());
        }
        if self.template.is_none() {
            let mut t = chunk.clone();
            t.choices.clear();
            t.usage = None;
            self.template = Some(t);
        }
        let events = events_of(&chunk);
        let held_before = self.stages.iter().any(|s| !s.held.is_empty());
        if events.is_empty() {
            out.push(chunk);
            return Ok(());
        }
        let (events, changed) = self.run(0, events)?;
        if !changed && !held_before {
            out.push(chunk);
            return Ok(());
        }
        // Keep the role of a first delta, which events do not carry.
        for c in &chunk.choices {
            if let Some(role) = &c.delta.role {
                out.push(self.chunk_with(ChunkChoice {
                    index: c.index,
                    delta: Delta {
                        role: Some(role.clone()),
                        ..Delta::default()
                    },
                    finish_reason: None,
                    rest: Default::default(),
                }));
            }
        }
        for e in events {
            out.push(self.chunk_of(e));
        }
        Ok(())
    }

    /// The stream ended: releases held text.
    ///
    /// The holder sees its held text once more, with `last = true` (it answers pass or
    /// replace; another `hold` is a plugin failure, handled by its failure policy), then the
    /// plugins after it do.
    pub fn finish(&mut self, out: &mut Vec<ChatChunk>) -> Result<(), StreamStop> {
        for i in 0..self.stages.len() {
            let held = std::mem::take(&mut self.stages[i].held);
            if held.is_empty() {
                continue;
            }
            let mut events = Vec::new();
            for (choice, text) in held {
                let ev = StreamEvent::TextDelta(TextDelta {
                    choice,
                    text,
                    last: true,
                });
                self.call(i, ev, &mut events, true)?;
            }
            let (events, _) = self.run(i + 1, events)?;
            for e in events {
                out.push(self.chunk_of(e));
            }
        }
        Ok(())
    }

    /// Runs `events` through the stages from `first` on.
    fn run(
        &mut self,
        first: usize,
        mut events: Vec<StreamEvent>,
    ) -> Result<(Vec<StreamEvent>, bool), StreamStop> {
        let mut changed = false;
        for i in first..self.stages.len() {
            let mut next = Vec::with_capacity(events.len());
            for e in events {
                if let Step::Changed = self.step(i, e, &mut next)? {
                    changed = true;
                }
            }
            events = next;
        }
        Ok((events, changed))
    }

    /// One event through stage `i`.
    fn step(
        &mut self,
        i: usize,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
    ) -> Result<Step, StreamStop> {
        // At a choice's finish, its held text goes first (the plugin sees it once more).
        let mut released = false;
        if let StreamEvent::Finish(Finish { choice, .. }) = &event
            && let Some(text) = self.stages[i].held.remove(choice)
        {
            let ev = StreamEvent::TextDelta(TextDelta {
                choice: *choice,
                text,
                last: true,
            });
            self.call(i, ev, out, true)?;
            released = true;
        }
        let step = self.call(i, event, out, false)?;
        Ok(if released { Step::Changed } else { step })
    }

    /// Calls stage `i`'s hook on `event` (text merged with what it held) and acts on the
    /// answer. `final_text`: the text cannot be held again (finish).
    fn call(
        &mut self,
        i: usize,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
        final_text: bool,
    ) -> Result<Step, StreamStop> {
        let stage = &mut self.stages[i];
        let (event, merged) = match event {
            StreamEvent::TextDelta(mut d) => {
                d.last = final_text;
                match stage.held.remove(&d.choice) {
                    Some(mut held) => {
                        held.push_str(&d.text);
                        d.text = held;
                        (StreamEvent::TextDelta(d), true)
                    }
                    None => (StreamEvent::TextDelta(d), false),
                }
            }
            other => (other, false),
        };
        if stage.skipped {
            out.push(event);
            return Ok(if merged { Step::Changed } else { Step::Same });
        }
        let inst = stage.inst.clone();
        let position = stage.position;
        let caller = caller_of(&self.metadata).map(str::to_owned);
        let Some(admission) = inst.admit(caller.as_deref()) else {
            return self.failed(i, &inst, "circuit_open", event, out, merged);
        };
        let input = event_bytes(&event);
        let mut hctx = HookCtx {
            request_id: &self.request_id,
            metadata: &mut self.metadata,
            scratch: self.scratch.slot(position),
            deadline: inst.deadline(Hook::OnResponseChunk, input),
        };
        let result =
            inst.runtime
                .on_chunk(&mut hctx, &event)
                .and_then(|action| match (&action, &event) {
                    (ChunkAction::Hold, StreamEvent::TextDelta(d)) if d.last => {
                        Err(HookError::Plugin(
                            "answered `hold` to a text marked `last` (answer pass or replace)"
                                .into(),
                        ))
                    }
                    _ => Ok(action),
                });
        inst.record(admission, result.as_ref().map(|_| ()), caller.as_deref());
        let action = match result {
            Ok(a) => a,
            Err(e) => return self.failed(i, &inst, e.kind(), event, out, merged),
        };
        if inst.mode == Mode::Shadow {
            inst.shadow(match &action {
                ChunkAction::Pass => "pass",
                ChunkAction::Replace(_) => "replace",
                ChunkAction::Hold => "hold",
                ChunkAction::Abort(_) => "abort",
            });
            tracing::debug!(plugin = %inst.name, ?action, "Shadow plugin chunk action (not applied).");
            out.push(event);
            return Ok(if merged { Step::Changed } else { Step::Same });
        }
        match action {
            ChunkAction::Pass => {
                out.push(event);
                Ok(if merged { Step::Changed } else { Step::Same })
            }
            ChunkAction::Replace(events) => {
                out.extend(events);
                Ok(Step::Changed)
            }
            ChunkAction::Abort(message) => Err(StreamStop {
                plugin: inst.name.clone(),
                message,
            }),
            ChunkAction::Hold => match event {
                StreamEvent::TextDelta(d) if d.text.len() <= inst.manifest.limits.hold_bytes => {
                    self.stages[i].held.insert(d.choice, d.text);
                    Ok(Step::Changed)
                }
                StreamEvent::TextDelta(d) => {
                    // The buffer is full: the holder gets the text once more, as its last
                    // chance to process it (never released raw).
                    tracing::debug!(plugin = %inst.name, bytes = d.text.len(), "Hold buffer full; handing the held text back as last.");
                    self.call(i, StreamEvent::TextDelta(d), out, true)?;
                    Ok(Step::Changed)
                }
                // Only text can be held; anything else passes.
                other => {
                    out.push(other);
                    Ok(if merged { Step::Changed } else { Step::Same })
                }
            },
        }
    }

    /// A stage failed on `event`: stop the stream (closed) or take the stage out of this
    /// stream and pass the event on (open).
    fn failed(
        &mut self,
        i: usize,
        inst: &Instance,
        kind: &'static str,
        event: StreamEvent,
        out: &mut Vec<StreamEvent>,
        merged: bool,
    ) -> Result<Step, StreamStop> {
        if let Err(f) = inst.on_failure(kind) {
            return Err(StreamStop {
                plugin: f.plugin,
                message: format!("plugin '{}' failed ({kind})", inst.name),
            });
        }
        let stage = &mut self.stages[i];
        stage.skipped = true;
        out.push(event);
        let held = std::mem::take(&mut stage.held);
        for (choice, text) in held {
            out.push(StreamEvent::TextDelta(TextDelta {
                choice,
                text,
                last: false,
            }));
        }
        Ok(if merged { Step::Changed } else { Step::Same })
    }

    fn chunk_with(&self, choice: ChunkChoice) -> ChatChunk {
        let mut c = self.template.clone().unwrap_or_else(empty_chunk);
        c.choices.push(choice);
        c
    }

    fn chunk_of(&self, event: StreamEvent) -> ChatChunk {
        let choice = |index: u32, delta: Delta, finish_reason: Option<String>| ChunkChoice {
            index,
            delta,
            finish_reason,
            rest: Default::default(),
        };
        match event {
            StreamEvent::TextDelta(d) => self.chunk_with(choice(
                d.choice,
                Delta {
                    content: Some(d.text),
                    ..Delta::default()
                },
                None,
            )),
            StreamEvent::ToolCallDelta(d) => self.chunk_with(choice(
                d.choice,
                Delta {
                    tool_calls: Some(vec![crate::api::openai::ToolCallDelta {
                        index: d.index,
                        kind: d.id.as_ref().map(|_| "function".to_owned()),
                        id: d.id,
                        function: Some(FunctionCallDelta {
                            name: d.name,
                            arguments: Some(d.arguments),
                        }),
                    }]),
                    ..Delta::default()
                },
                None,
            )),
            StreamEvent::Finish(f) => {
                self.chunk_with(choice(f.choice, Delta::default(), Some(f.reason)))
            }
            StreamEvent::Usage(u) => {
                let mut c = self.template.clone().unwrap_or_else(empty_chunk);
                let mut usage =
                    crate::api::openai::Usage::new(u.prompt_tokens, u.completion_tokens);
                if u.cached_tokens > 0 {
                    usage.prompt_tokens_details = Some(PromptTokensDetails {
                        cached_tokens: u.cached_tokens,
                    });
                }
                c.usage = Some(usage);
                c
            }
        }
    }
}

fn empty_chunk() -> ChatChunk {
    ChatChunk {
        id: String::new(),
        object: "chat.completion.chunk".into(),
        created: 0,
        model: String::new(),
        choices: Vec::new(),
        usage: None,
        rest: Default::default(),
    }
}

/// The normalized events of a chunk, in order: per choice text, tool calls, finish; then
/// usage. Empty text deltas (a role-only first chunk) carry no event.
fn events_of(chunk: &ChatChunk) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    for c in &chunk.choices {
        if let Some(text) = &c.delta.content
            && !text.is_empty()
        {
            events.push(StreamEvent::TextDelta(TextDelta {
                choice: c.index,
                text: text.clone(),
                last: false,
            }));
        }
        for t in c.delta.tool_calls.iter().flatten() {
            let f = t.function.as_ref();
            events.push(StreamEvent::ToolCallDelta(ToolCallDelta {
                choice: c.index,
                index: t.index,
                id: t.id.clone(),
                name: f.and_then(|f| f.name.clone()),
                arguments: f.and_then(|f| f.arguments.clone()).unwrap_or_default(),
            }));
        }
        if let Some(reason) = &c.finish_reason {
            events.push(StreamEvent::Finish(Finish {
                choice: c.index,
                reason: reason.clone(),
            }));
        }
    }
    if let Some(u) = &chunk.usage {
        events.push(StreamEvent::Usage(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            cache_write_tokens: 0,
        }));
    }
    events
}
