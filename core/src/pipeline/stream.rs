//! Upstream streams as a sequence of canonical items.
//!
//! [`ChunkStream`] reads an upstream body as it arrives, parses server-sent events, and turns
//! them into [`StreamItem`]s: decoded [`ChatChunk`]s, or, on the pass-through path (OpenAI
//! dialect in and out, no plugin watching chunks), the upstream event data untouched so the
//! gateway does not re-serialize what it does not change. Nothing is buffered beyond the
//! event being parsed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::timeout_at;

use super::error::GatewayError;
use super::upstream::stream_item_error;
use crate::api::openai::{ChatChunk, Usage};
use crate::api::sse::{SseEvent, SseParser};
use crate::provider::StreamDecoder;
use crate::provider::mock::TimedChunk;

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
        /// The chunk has no choices (the usage-only chunk).
        usage_only: bool,
    },
}

enum Source {
    Http {
        body: BoxStream<'static, Result<bytes::Bytes, super::client::HttpError>>,
        parser: SseParser,
        decoder: Box<dyn StreamDecoder>,
        passthrough: bool,
        provider: String,
        deadline: Instant,
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
    total: Duration,
}

impl ChunkStream {
    /// A stream over an HTTP response body.
    pub fn http(
        resp: http::Response<hyper::body::Incoming>,
        decoder: Box<dyn StreamDecoder>,
        passthrough: bool,
        provider: String,
        deadline: Instant,
        total: Duration,
    ) -> Self {
        ChunkStream {
            source: Source::Http {
                body: super::client::data_stream(resp.into_body()),
                parser: SseParser::new(),
                decoder,
                passthrough,
                provider,
                deadline,
                events: Vec::new(),
            },
            ready: VecDeque::new(),
            done: false,
            total,
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
            total: Duration::MAX,
        }
    }

    /// Whether items are forwarded as upstream JSON.
    pub fn is_passthrough(&self) -> bool {
        matches!(
            self.source,
            Source::Http {
                passthrough: true,
                ..
            }
        )
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
        Ok(())
    }

    fn provider_name(&self) -> String {
        match &self.source {
            Source::Http { provider, .. } => provider.clone(),
            Source::Mock { .. } => "mock".to_owned(),
        }
    }

    /// The next item; `None` at the clean end of the stream.
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
                deadline,
                events,
            } => {
                let read = match timeout_at((*deadline).into(), body.next()).await {
                    Err(_) => {
                        return Err(GatewayError::UpstreamTimeout {
                            provider: provider.clone(),
                            phase: "total",
                        });
                    }
                    Ok(r) => r,
                };
                match read {
                    None => {
                        parser.finish();
                        self.done = true;
                        let tail = decoder
                            .finish()
                            .map_err(|e| stream_item_error(provider, e))?;
                        self.ready.extend(tail.into_iter().map(StreamItem::Chunk));
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
                            if *passthrough {
                                match raw_item(event, decoder.as_mut()) {
                                    Ok(Some(item)) => self.ready.push_back(item),
                                    Ok(None) => self.done = true,
                                    Err(e) => return Err(stream_item_error(provider, e)),
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

/// Pass-through decoding: keep the data as is, look inside only where needed.
/// `Ok(None)` means the end marker.
fn raw_item(
    event: SseEvent,
    decoder: &mut dyn StreamDecoder,
) -> Result<Option<StreamItem>, crate::provider::ProviderError> {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Ok(None);
    }
    // Errors and usage chunks are rare: only they pay for a full decode.
    let needs_look = event.event == "error"
        || data.starts_with("{\"error\"")
        || memchr::memmem::find(data.as_bytes(), b"\"usage\":{").is_some();
    if !needs_look {
        // Validate without building a value: garbage must not reach the client as data.
        if serde_json::from_str::<serde::de::IgnoredAny>(data).is_err() {
            return Err(crate::provider::ProviderError::InvalidResponse(
                "stream event is not JSON".into(),
            ));
        }
        return Ok(Some(StreamItem::Raw {
            data: event.data,
            usage: None,
            usage_only: false,
        }));
    }
    let decoded = decoder.decode(&event)?;
    let chunk = decoded.chunks.into_iter().next();
    let usage = chunk.as_ref().and_then(|c| c.usage);
    let usage_only = chunk.as_ref().is_some_and(|c| c.choices.is_empty());
    Ok(Some(StreamItem::Raw {
        data: event.data,
        usage,
        usage_only,
    }))
}
