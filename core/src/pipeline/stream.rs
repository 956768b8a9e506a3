//! Upstream streams as a sequence of canonical items.
//!
//! [`ChunkStream`] reads an upstream body as it arrives, parses server-sent events, and turns
//! them into [`StreamItem`]s: decoded [`ChatChunk`]s, or, on the pass-through path (OpenAI
//! dialect in and out, no plugin watching chunks), the upstream event data untouched so the
//! gateway does not re-serialize what it does not change. Nothing is buffered beyond the
//! event being parsed.
//!
//! A stream ends cleanly only when the upstream said it is complete (`[DONE]` or every
//! choice's finish reason for OpenAI, `message_stop` for Anthropic, every candidate's finish
//! reason for Gemini). A body that just stops is truncated: [`ChunkStream::next`] returns an
//! error, never a clean end. Once the first event has arrived, a read that waits longer than
//! the provider's `stream_idle_ms` is a timeout.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::timeout_at;

use super::error::GatewayError;
use super::upstream::stream_item_error;
use crate::api::openai::{ChatChunk, Usage};
use crate::api::sse::{SseEvent, SseParser};
use crate::provider::mock::TimedChunk;
use crate::provider::openai::{StreamEnd, peek_chunk};
use crate::provider::{ProviderError, StreamDecoder};

/// One item of a stream.
#[derive(Debug)]
pub enum StreamItem {
    /// A canonical chunk.
    Chunk(ChatChunk),
    /// Pass-through: an OpenAI chunk's JSON exactly as the upstream sent it, with what the
    /// gateway needs to know about it.
    Raw {
        /// The event data (a `chat.completion.chunk` JSON document).
        data: String,
        /// Usage, if this chunk carries it.
        usage: Option<Usage>,
        /// The chunk has no choices and carries usage (the usage-only chunk).
        usage_only: bool,
    },
    /// Pass-through: an Anthropic named event exactly as the upstream sent it (Anthropic
    /// client and upstream), with what the gateway read from it.
    Named {
        /// The `event:` name (`message_start`, `content_block_delta`...).
        event: String,
        /// The event data, untouched.
        data: String,
        /// Usage so far, if this event carries it.
        usage: Option<Usage>,
        /// The event carries content (text, thinking, tool input).
        content: bool,
    },
}

/// Whether, and in which dialect, upstream events are forwarded untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Events are decoded into canonical chunks.
    Off,
    /// OpenAI chunks forwarded as [`StreamItem::Raw`].
    OpenAi,
    /// Anthropic named events forwarded as [`StreamItem::Named`]; the decoder still reads
    /// each one for usage and for the end of the stream.
    Anthropic,
}

/// The time limits of one streamed upstream exchange.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// End of the whole exchange (`total_ms` after the request went out).
    pub deadline: Instant,
    /// The configured total timeout (for logs).
    pub total: Duration,
    /// Longest wait for the next read once the stream is committed (`stream_idle_ms`).
    pub idle: Duration,
}

enum Source {
    Http {
        body: BoxStream<'static, Result<bytes::Bytes, super::client::HttpError>>,
        parser: SseParser,
        decoder: Box<dyn StreamDecoder>,
        passthrough: Passthrough,
        provider: String,
        limits: StreamLimits,
        events: Vec<SseEvent>,
    },
    Mock {
        chunks: VecDeque<TimedChunk>,
        latency: Duration,
    },
}

/// A committed or about-to-be-committed upstream stream.
pub struct ChunkStream {
    source: Source,
    ready: VecDeque<StreamItem>,
    done: bool,
    /// How a pass-through stream has ended so far (decoded streams: the decoder knows).
    end: StreamEnd,
    /// The first item has arrived ([`ChunkStream::prefetch`] succeeded): from here on the
    /// idle timeout bounds each read (before, the caller's first-byte timeout does).
    committed: bool,
    total: Duration,
}

impl ChunkStream {
    /// A stream over an HTTP response body.
    pub fn http(
        resp: http::Response<hyper::body::Incoming>,
        decoder: Box<dyn StreamDecoder>,
        passthrough: Passthrough,
        provider: String,
        limits: StreamLimits,
    ) -> Self {
        ChunkStream {
            source: Source::Http {
                body: super::client::data_stream(resp.into_body()),
                parser: SseParser::new(),
                decoder,
                passthrough,
                provider,
                limits,
                events: Vec::new(),
            },
            ready: VecDeque::new(),
            done: false,
            end: StreamEnd::default(),
            committed: false,
            total: limits.total,
        }
    }

    /// A stream of the mock provider's chunks.
    pub fn mock(chunks: Vec<TimedChunk>, latency: Duration) -> Self {
        ChunkStream {
            source: Source::Mock {
                chunks: chunks.into(),
                latency,
            },
            ready: VecDeque::new(),
            done: false,
            end: StreamEnd::default(),
            committed: false,
            total: Duration::MAX,
        }
    }

    /// Whether, and how, items are forwarded as upstream JSON.
    pub fn passthrough(&self) -> Passthrough {
        match self.source {
            Source::Http { passthrough, .. } => passthrough,
            Source::Mock { .. } => Passthrough::Off,
        }
    }

    /// Reads until at least one item is ready or the stream ends cleanly. Errors here happen
    /// before anything reached the client, so the caller may still fall back.
    pub async fn prefetch(&mut self) -> Result<(), GatewayError> {
        while self.ready.is_empty() && !self.done {
            self.fill().await?;
        }
        if self.ready.is_empty() {
            return Err(GatewayError::UpstreamFailed {
                provider: self.provider_name(),
                reason: "stream ended before its first event".to_owned(),
            });
        }
        self.committed = true;
        Ok(())
    }

    fn provider_name(&self) -> String {
        match &self.source {
            Source::Http { provider, .. } => provider.clone(),
            Source::Mock { .. } => "mock".to_owned(),
        }
    }

    /// The next item; `None` at the clean end of the stream (the upstream said it is
    /// complete). A truncated, broken, stalled or garbled stream ends with `Some(Err)`.
    pub async fn next(&mut self) -> Option<Result<StreamItem, GatewayError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill().await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    /// Reads one upstream read's worth of items into `ready`.
    async fn fill(&mut self) -> Result<(), GatewayError> {
        match &mut self.source {
            Source::Mock { chunks, latency } => {
                let Some((delay, chunk)) = chunks.pop_front() else {
                    self.done = true;
                    return Ok(());
                };
                let delay = delay + std::mem::take(latency);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                self.ready.push_back(StreamItem::Chunk(chunk));
                Ok(())
            }
            Source::Http {
                body,
                parser,
                decoder,
                passthrough,
                provider,
                limits,
                events,
            } => {
                let idle_deadline = Instant::now() + limits.idle;
                let (wait_until, phase) = if self.committed && idle_deadline < limits.deadline {
                    (idle_deadline, "stream idle")
                } else {
                    (limits.deadline, "total")
                };
                let read = match timeout_at(wait_until.into(), body.next()).await {
                    Err(_) => {
                        return Err(GatewayError::UpstreamTimeout {
                            provider: provider.clone(),
                            phase,
                        });
                    }
                    Ok(r) => r,
                };
                match read {
                    None => {
                        parser.finish();
                        self.done = true;
                        if *passthrough == Passthrough::OpenAi {
                            // Pass-through runs no decoder: its own record says how it ended.
                            return self.end.check().map_err(|e| stream_item_error(provider, e));
                        }
                        let tail = decoder
                            .finish()
                            .map_err(|e| stream_item_error(provider, e))?;
                        if *passthrough == Passthrough::Off {
                            self.ready.extend(tail.into_iter().map(StreamItem::Chunk));
                        }
                        Ok(())
                    }
                    Some(Err(e)) => Err(GatewayError::UpstreamFailed {
                        provider: provider.clone(),
                        reason: format!("stream broken: {e}"),
                    }),
                    Some(Ok(bytes)) => {
                        parser
                            .feed(&bytes, events)
                            .map_err(|e| GatewayError::UpstreamFailed {
                                provider: provider.clone(),
                                reason: e.to_string(),
                            })?;
                        for event in events.drain(..) {
                            if *passthrough == Passthrough::OpenAi {
                                match raw_item(event, &mut self.end) {
                                    Ok(Some(item)) => self.ready.push_back(item),
                                    Ok(None) => self.done = true,
                                    Err(e) => return Err(stream_item_error(provider, e)),
                                }
                            } else if *passthrough == Passthrough::Anthropic {
                                let decoded = decoder
                                    .decode(&event)
                                    .map_err(|e| stream_item_error(provider, e))?;
                                let usage = decoded.chunks.iter().rev().find_map(|c| c.usage);
                                let content = decoded.chunks.iter().any(chunk_has_content);
                                self.ready.push_back(StreamItem::Named {
                                    event: event.event,
                                    data: event.data,
                                    usage,
                                    content,
                                });
                                if decoded.done {
                                    self.done = true;
                                }
                            } else {
                                let decoded = decoder
                                    .decode(&event)
                                    .map_err(|e| stream_item_error(provider, e))?;
                                self.ready
                                    .extend(decoded.chunks.into_iter().map(StreamItem::Chunk));
                                if decoded.done {
                                    self.done = true;
                                }
                            }
                            if self.done {
                                break;
                            }
                        }
                        Ok(())
                    }
                }
            }
        }
    }

    /// The configured total timeout (for logs).
    pub fn total_timeout(&self) -> Duration {
        self.total
    }
}

/// Whether a decoded chunk carries content (for the time to first token).
fn chunk_has_content(chunk: &ChatChunk) -> bool {
    chunk.choices.iter().any(|c| {
        c.delta.content.as_deref().is_some_and(|t| !t.is_empty())
            || c.delta.tool_calls.is_some()
            || c.delta.reasoning_content.is_some()
    })
}

/// Pass-through decoding: keep the data as is and read only what the gateway needs (usage,
/// the end of each choice, errors) in one parse that builds nothing. `Ok(None)` is `[DONE]`.
fn raw_item(event: SseEvent, end: &mut StreamEnd) -> Result<Option<StreamItem>, ProviderError> {
    let data = event.data.trim();
    if data == "[DONE]" {
        end.done();
        return Ok(None);
    }
    if event.event == "error" {
        let message = crate::provider::openai_error_message(data.as_bytes())
            .unwrap_or_else(|| data.to_owned());
        return Err(ProviderError::StreamError(message));
    }
    // The parse is also the check that garbage never reaches the client as data.
    let peek = peek_chunk(data, end)?;
    Ok(Some(StreamItem::Raw {
        data: event.data,
        usage: peek.usage,
        usage_only: peek.usage_only,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(data: &str) -> SseEvent {
        SseEvent {
            event: String::new(),
            data: data.to_owned(),
        }
    }

    fn raw(data: &str, end: &mut StreamEnd) -> (Option<Usage>, bool) {
        match raw_item(event(data), end) {
            Ok(Some(StreamItem::Raw {
                usage, usage_only, ..
            })) => (usage, usage_only),
            other => panic!("{data}: {other:?}"),
        }
    }

    #[test]
    fn pass_through_reads_usage_whatever_the_spacing() {
        let mut end = StreamEnd::default();
        for data in [
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
            r#"{"id":"c", "choices": [ ], "usage": { "prompt_tokens": 3, "completion_tokens": 5 }}"#,
            "{\n  \"id\": \"c\",\n  \"choices\": [],\n  \"usage\" :\t{\"prompt_tokens\":3,\"completion_tokens\":5}\n}",
        ] {
            let (usage, usage_only) = raw(data, &mut end);
            let usage = usage.unwrap_or_else(|| panic!("{data}: usage not read"));
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (3, 5),
                "{data}"
            );
            assert!(usage_only, "{data}");
        }
    }

    #[test]
    fn pass_through_content_that_quotes_usage_is_content() {
        let mut end = StreamEnd::default();
        let data = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"\"usage\":{"},"finish_reason":null}],"usage":null}"#;
        assert_eq!(raw(data, &mut end), (None, false));
        assert!(!end.is_complete(), "a choice is still open");
    }

    #[test]
    fn pass_through_errors_and_garbage_are_errors() {
        let mut end = StreamEnd::default();
        for data in [
            r#"{"error":{"message":"boom"}}"#,
            r#"{ "error" : { "message": "boom" } }"#,
        ] {
            match raw_item(event(data), &mut end) {
                Err(ProviderError::StreamError(m)) => assert_eq!(m, "boom", "{data}"),
                other => panic!("{data}: {other:?}"),
            }
        }
        assert!(matches!(
            raw_item(event("{broken"), &mut end),
            Err(ProviderError::InvalidResponse(_))
        ));
    }

    #[test]
    fn pass_through_end_needs_done_or_every_finish_reason() {
        let open = r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#;
        let mut end = StreamEnd::default();
        raw(open, &mut end);
        assert!(end.check().is_err(), "truncated");
        raw(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            &mut end,
        );
        assert!(end.check().is_err(), "choice 1 is still open");
        raw(
            r#"{"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}"#,
            &mut end,
        );
        assert!(end.check().is_ok(), "every choice finished");

        let mut end = StreamEnd::default();
        raw(open, &mut end);
        assert!(raw_item(event("[DONE]"), &mut end).unwrap().is_none());
        assert!(end.check().is_ok(), "[DONE] ends the stream");
    }
}
