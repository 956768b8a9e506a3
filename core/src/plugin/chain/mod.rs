//! The plugin chain: what the pipeline calls.
//!
//! [`Plugins::load`] builds every instance configured in `weir.toml` (global `[[plugins]]`
//! first, then each model's `[[models.plugins]]`), and [`Plugins::chain`] hands out the
//! ordered [`Chain`] of a model. A chain runs one hook over its instances and turns their
//! answers into what the pipeline needs:
//!
//! - [`Chain::on_request`], in configured order: each plugin may continue with mutations
//!   (applied to the [`RequestCtx`] before the next plugin runs) or reply, which ends the
//!   chain with [`Flow::Reply`].
//! - [`Chain::on_response`] and [`Chain::chunk_filter`], in reverse order (the plugin
//!   closest to the provider sees the response first, like nested middleware).
//! - [`Chain::on_log`], in configured order, after the response was sent; the pipeline
//!   runs it on a blocking thread.
//!
//! Failures: a hook that errors, traps, times out or runs out of memory, and a call refused
//! by the plugin's open circuit breaker, count in `weir_plugin_failures_total{plugin,kind}`
//! and then follow the instance's policy: `closed` returns a [`PluginFailure`] (the pipeline
//! answers 503 naming the plugin), `open` skips the plugin. Instances in `shadow` mode never
//! change or fail a request.
//!
//! Response headers: plugins set them (`set_response_headers` on request, `set_headers` on
//! response); the chain stores them in `RequestCtx::metadata` under
//! [`RESPONSE_HEADER_PREFIX`] and the pipeline reads them with [`response_headers`].

use std::collections::BTreeMap;
use std::sync::Arc;

use super::breaker::caller_of;
use super::config::Mode;
use super::contract::{
    Decision, Dialect as ViewDialect, Hook, HookCtx, HookError, LogEntry, PluginDecision, Reply,
    RequestView, ResponseDecision,
};
use super::manifest::{Manifest, response_bytes};
use crate::api::openai::ChatResponse;
use crate::request::{Dialect, RequestCtx, Scratch};

use instance::Guarded;
pub use instance::Instance;
pub use load::Plugins;
pub use stream::ChunkFilter;

use apply::{apply_request, apply_response};
use stream::Stage;
use views::response_view;

/// Metadata keys under this prefix are response headers set by plugins.
pub const RESPONSE_HEADER_PREFIX: &str = "weir.response-header.";

/// The response headers plugins set for this request, from the metadata bag.
pub fn response_headers(
    metadata: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&str, &str)> + '_ {
    metadata
        .range(RESPONSE_HEADER_PREFIX.to_owned()..)
        .take_while(|(k, _)| k.starts_with(RESPONSE_HEADER_PREFIX))
        .map(|(k, v)| (&k[RESPONSE_HEADER_PREFIX.len()..], v.as_str()))
}

/// What the pipeline does after a hook phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on (the request or response may have been changed in place).
    Continue,
    /// Answer the client with this reply now; the provider (or the rest of the chain) is
    /// skipped. `body` is sent as is (plugins usually send JSON).
    Reply(Reply),
}

/// A plugin with `failure = "closed"` failed: the pipeline answers 503 naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin '{plugin}' failed ({kind})")]
pub struct PluginFailure {
    /// Instance name.
    pub plugin: String,
    /// The `kind` label: `trap`, `timeout`, `oom`, `error`, `unavailable`, `circuit_open`.
    pub kind: &'static str,
}

/// Why a stream must end early: a plugin aborted it (budget exhausted, policy violation) or a
/// fail-closed chunk hook failed. The pipeline ends the stream with an error event carrying
/// `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream stopped by plugin '{plugin}': {message}")]
pub struct StreamStop {
    /// Instance name.
    pub plugin: String,
    /// Message for the client's error event.
    pub message: String,
}

/// An ordered list of plugin instances. Cheap to clone (one reference count), so the
/// pipeline can move it into the task that runs `on_log`.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    instances: Arc<[Arc<Instance>]>,
    any_request: bool,
    any_response: bool,
    any_chunk: bool,
    any_log: bool,
}

impl Chain {
    /// A chain of `instances` in this order; instance names must be unique.
    pub fn new(instances: Vec<Arc<Instance>>) -> Result<Chain, String> {
        for (i, a) in instances.iter().enumerate() {
            if instances[..i].iter().any(|b| b.name == a.name) {
                return Err(format!(
                    "two instances are named '{}'; give one a different `name`",
                    a.name
                ));
            }
        }
        let any = |f: fn(&Manifest) -> bool| instances.iter().any(|i| f(&i.manifest));
        Ok(Chain {
            any_request: any(|m| m.hooks.on_request),
            any_response: any(|m| m.hooks.on_response),
            any_chunk: any(|m| m.hooks.on_response_chunk),
            any_log: any(|m| m.hooks.on_log),
            instances: instances.into(),
        })
    }

    /// Whether the chain has no instances at all.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Whether any instance has a chunk hook (otherwise streams need no filtering).
    pub fn wants_chunks(&self) -> bool {
        self.any_chunk
    }

    /// Whether any instance has a response hook.
    pub fn wants_response(&self) -> bool {
        self.any_response
    }

    /// Whether any instance has a log hook.
    pub fn wants_log(&self) -> bool {
        self.any_log
    }

    /// Runs `on_request` in configured order, applying each plugin's mutations to `ctx`
    /// before the next runs. Stops at the first reply. Every decision is recorded in
    /// `ctx.decisions` for the request log.
    pub fn on_request(&self, ctx: &mut RequestCtx) -> Result<Flow, PluginFailure> {
        if !self.any_request {
            return Ok(Flow::Continue);
        }
        // The view owns the request's headers and body only while a plugin runs (moved in
        // and back, never copied); the body JSON is serialized for the first plugin with
        // capability `body` that asks, and kept for the next ones until the body changes.
        let mut view = RequestView {
            request_id: ctx.request_id.clone(),
            dialect: match ctx.dialect {
                // The Responses API reaches plugins as the chat request it was translated to.
                Dialect::OpenAi | Dialect::Responses => ViewDialect::OpenAi,
                Dialect::Anthropic => ViewDialect::Anthropic,
            },
            ..RequestView::default()
        };
        let input = request_bytes(ctx);
        for (position, inst) in self.instances.iter().enumerate() {
            if !inst.manifest.hooks.on_request {
                continue;
            }
            let caller = caller_of(&ctx.metadata).map(str::to_owned);
            let outcome = inst.guard(Hook::OnRequest, caller.as_deref(), || {
                view.access = inst.access.clone();
                view.headers = std::mem::take(&mut ctx.headers);
                view.body = std::mem::take(&mut ctx.body);
                let mut hctx = HookCtx {
                    request_id: &ctx.request_id,
                    metadata: &mut ctx.metadata,
                    scratch: ctx.scratch.slot(position),
                    deadline: inst.deadline(Hook::OnRequest, input),
                };
                let result = inst.runtime.on_request(&mut hctx, &mut view);
                ctx.headers = std::mem::take(&mut view.headers);
                ctx.body = std::mem::take(&mut view.body);
                match result? {
                    decision if inst.mode == Mode::Shadow => {
                        let label = decision_label(&decision);
                        inst.shadow(&label);
                        tracing::info!(plugin = %inst.name, decision = %label, "Shadow plugin decision (not applied).");
                        Ok(Applied::Shadow(label))
                    }
                    Decision::Reply(reply) => Ok(Applied::Reply(reply)),
                    Decision::Continue(m) => {
                        let body_changed = m.changes_body();
                        apply_request(ctx, m).map_err(HookError::Plugin)?;
                        if body_changed {
                            view.body_json = None;
                        }
                        Ok(Applied::Continue)
                    }
                }
            });
            let decision = match &outcome {
                Ok(Guarded::Done(Applied::Continue)) => "continue".to_owned(),
                Ok(Guarded::Done(Applied::Reply(r))) => format!("reply_{}", r.status),
                Ok(Guarded::Done(Applied::Shadow(label))) => format!("shadow_{label}"),
                Ok(Guarded::Skipped(kind)) => format!("skipped_{kind}"),
                Err(f) => format!("failure_{}", f.kind),
            };
            ctx.decisions.push(PluginDecision {
                plugin: inst.name.clone(),
                decision,
            });
            if let Guarded::Done(Applied::Reply(reply)) = outcome? {
                return Ok(Flow::Reply(reply));
            }
        }
        Ok(Flow::Continue)
    }

    /// Runs `on_response` on a complete (non-streaming) response, in reverse order.
    pub fn on_response(
        &self,
        ctx: &mut RequestCtx,
        resp: &mut ChatResponse,
    ) -> Result<Flow, PluginFailure> {
        if !self.any_response {
            return Ok(Flow::Continue);
        }
        let mut view = response_view(&ctx.request_id, resp);
        let input = response_bytes(&view);
        for (position, inst) in self.instances.iter().enumerate().rev() {
            if !inst.manifest.hooks.on_response {
                continue;
            }
            let caller = caller_of(&ctx.metadata).map(str::to_owned);
            let outcome = inst.guard(Hook::OnResponse, caller.as_deref(), || {
                let mut hctx = HookCtx {
                    request_id: &ctx.request_id,
                    metadata: &mut ctx.metadata,
                    scratch: ctx.scratch.slot(position),
                    deadline: inst.deadline(Hook::OnResponse, input),
                };
                match inst.runtime.on_response(&mut hctx, &view)? {
                    decision if inst.mode == Mode::Shadow => {
                        let label = match &decision {
                            ResponseDecision::Continue(_) => "continue".to_owned(),
                            ResponseDecision::Reply(r) => format!("reply_{}", r.status),
                        };
                        inst.shadow(&label);
                        tracing::debug!(plugin = %inst.name, "Shadow plugin response decision (not applied).");
                        Ok(None)
                    }
                    ResponseDecision::Reply(reply) => Ok(Some(reply)),
                    ResponseDecision::Continue(m) => {
                        apply_response(ctx, resp, &mut view, m)?;
                        Ok(None)
                    }
                }
            })?;
            if let Guarded::Done(Some(reply)) = outcome {
                return Ok(Flow::Reply(reply));
            }
        }
        Ok(Flow::Continue)
    }

    /// A filter for one stream's chunks, running the chunk hooks in reverse order. It keeps
    /// a copy of the request's metadata and takes the plugins' scratch for the stream; read
    /// them back with [`ChunkFilter::metadata`] and [`ChunkFilter::take_scratch`].
    pub fn chunk_filter(&self, ctx: &mut RequestCtx) -> ChunkFilter {
        let stages = self
            .instances
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, i)| i.manifest.hooks.on_response_chunk)
            .map(|(position, i)| Stage {
                inst: i.clone(),
                position,
                held: BTreeMap::new(),
                skipped: false,
            })
            .collect();
        ChunkFilter::new(
            stages,
            ctx.request_id.clone(),
            ctx.metadata.clone(),
            std::mem::take(&mut ctx.scratch),
        )
    }

    /// Runs `on_log` in configured order, with each plugin's scratch of the request.
    /// Failures are counted and logged; they cannot change a response that was already
    /// sent. Meant for a blocking thread.
    pub fn on_log(&self, entry: &LogEntry, scratch: &mut Scratch) {
        if !self.any_log {
            return;
        }
        let mut metadata: BTreeMap<String, String> = entry.metadata.iter().cloned().collect();
        for (position, inst) in self.instances.iter().enumerate() {
            if !inst.manifest.hooks.on_log {
                continue;
            }
            let caller = caller_of(&metadata).map(str::to_owned);
            let mut hctx = HookCtx {
                request_id: &entry.request_id,
                metadata: &mut metadata,
                scratch: scratch.slot(position),
                deadline: inst.deadline(Hook::OnLog, 0),
            };
            inst.run_log(caller.as_deref(), || inst.runtime.on_log(&mut hctx, entry));
        }
    }

    /// The instance named `name`, for its admin endpoint.
    pub fn instance(&self, name: &str) -> Option<&Arc<Instance>> {
        self.instances.iter().find(|i| i.name == name)
    }

    /// Every instance, in configured order.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }
}

/// What a request hook's decision came to, once applied.
enum Applied {
    Continue,
    Reply(Reply),
    /// A shadow instance decided this (not applied).
    Shadow(String),
}

/// About how many bytes of text a request hands a plugin (deadlines scale with it).
fn request_bytes(ctx: &RequestCtx) -> usize {
    match &ctx.body {
        crate::request::Body::Chat(c) => c
            .messages
            .iter()
            .map(|m| {
                m.content.as_ref().map_or(0, |c| match c {
                    crate::api::openai::MessageContent::Text(t) => t.len(),
                    crate::api::openai::MessageContent::Parts(p) => p
                        .iter()
                        .filter_map(|p| p.text.as_ref())
                        .map(String::len)
                        .sum(),
                }) + m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|t| t.function.arguments.len())
                    .sum::<usize>()
            })
            .sum(),
        crate::request::Body::Embeddings(e) => e.input.to_string().len(),
    }
}

/// A short label for a request decision, for logs (never the reply body: it may echo input).
fn decision_label(d: &Decision) -> String {
    match d {
        Decision::Continue(_) => "continue".to_owned(),
        Decision::Reply(r) => format!("reply_{}", r.status),
    }
}

mod apply;
#[cfg(test)]
mod contract_tests;
mod instance;
mod load;
mod stream;
mod views;

#[cfg(test)]
mod tests;
