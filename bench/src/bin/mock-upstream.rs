//! A fast mock LLM upstream for benchmarks, speaking two dialects:
//!
//! - OpenAI: `POST …/chat/completions` (JSON, or SSE when the body has `"stream":true`; a
//!   usage chunk is added when it asks for `"include_usage":true`) and `POST …/embeddings`;
//! - Anthropic: `POST …/messages` (JSON or SSE).
//!
//! Any path prefix is accepted, so a base URL of `http://127.0.0.1:9100/v1` works. Streams
//! send `chunks` content chunks, the first at once and each next one `delay_ms` later. Both are
//! set per request by the query (`?chunks=20&delay_ms=50`), by headers (`x-mock-chunks`,
//! `x-mock-delay-ms`), or else by the command line defaults. `x-mock-fault` injects a fault
//! (the soak scenario's): `500` and `429` answer with that status (429 with `retry-after: 1`),
//! `truncate` cuts the answer short (a JSON body halfway, a stream after half its content
//! chunks, without usage or `[DONE]`). JSON answers are built once at
//! start: the mock should cost as little CPU as possible, since it shares a core with the load
//! generator.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "mock-upstream",
    about = "Fast mock OpenAI/Anthropic upstream for benchmarks"
)]
struct Args {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Runtime worker threads; 1 runs a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Default number of content chunks in a stream.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Default delay between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Embedding dimensions.
    #[arg(long, default_value_t = 64)]
    dims: usize,
}

type Body = Either<Full<Bytes>, StreamBody<FrameStream>>;
type FrameStream = futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

/// Everything built once at start.
struct Mock {
    defaults: StreamShape,
    chat_json: Bytes,
    messages_json: Bytes,
    embeddings_json: Bytes,
    /// OpenAI stream frames by (chunks, include_usage).
    openai_frames: Mutex<HashMap<(usize, bool), Arc<Frames>>>,
    /// Anthropic stream frames by chunks.
    anthropic_frames: Mutex<HashMap<usize, Arc<Frames>>>,
}

/// The frames of one stream: `frames[..content]` carry content and are paced; the rest close
/// the stream.
struct Frames {
    frames: Vec<Bytes>,
    content: usize,
}

#[derive(Debug, Clone, Copy)]
struct StreamShape {
    chunks: usize,
    delay: Duration,
}

const CREATED: u64 = 1_700_000_000;
const ANSWER: &str = "The paragraph asks for a short summary that keeps every number; here it is, \
    in two sentences, with nothing added and nothing left out, as a busy reader would want.";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let mock = Arc::new(Mock::new(&args));
    runtime.block_on(serve(args.listen, mock))
}

async fn serve(addr: SocketAddr, mock: Arc<Mock>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("mock-upstream listening on {addr}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mock = mock.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let mock = mock.clone();
                async move { Ok::<_, Infallible>(mock.handle(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Mock {
    fn new(args: &Args) -> Self {
        let chat = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": CREATED,
            "model": "mock-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 250, "completion_tokens": 40, "total_tokens": 290}
        });
        let messages = json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": "mock-model",
            "content": [{"type": "text", "text": ANSWER}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 250, "output_tokens": 40}
        });
        let embedding: Vec<f64> = (0..args.dims)
            .map(|i| ((i % 17) as f64 - 8.0) / 17.0)
            .collect();
        let embeddings = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
            "model": "mock-embedding",
            "usage": {"prompt_tokens": 250, "total_tokens": 250}
        });
        Mock {
            defaults: StreamShape {
                chunks: args.chunks,
                delay: Duration::from_millis(args.delay_ms),
            },
            chat_json: Bytes::from(chat.to_string()),
            messages_json: Bytes::from(messages.to_string()),
            embeddings_json: Bytes::from(embeddings.to_string()),
            openai_frames: Mutex::new(HashMap::new()),
            anthropic_frames: Mutex::new(HashMap::new()),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let shape = self.shape(parts.uri.query(), &parts.headers);
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return plain(StatusCode::BAD_REQUEST, "cannot read body"),
        };
        if parts.method != http::Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        }
        let path = parts.uri.path();
        let stream = has(&body, b"\"stream\":true") || has(&body, b"\"stream\": true");
        match parts.headers.get("x-mock-fault").map(HeaderValue::as_bytes) {
            Some(b"500") => return plain(StatusCode::INTERNAL_SERVER_ERROR, "injected fault"),
            Some(b"429") => {
                let mut resp = plain(StatusCode::TOO_MANY_REQUESTS, "injected fault");
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return resp;
            }
            Some(b"truncate") if path.ends_with("/chat/completions") => {
                if !stream {
                    let whole = self.chat_json.clone();
                    return json_response(whole.slice(..whole.len() / 2));
                }
                let whole = self.openai_stream(shape.chunks, true);
                let keep = whole.content.div_ceil(2);
                let cut = Frames {
                    frames: whole.frames[..keep].to_vec(),
                    content: keep,
                };
                return sse(Arc::new(cut), shape.delay);
            }
            _ => {}
        }
        if path.ends_with("/chat/completions") {
            if stream {
                let usage =
                    has(&body, b"\"include_usage\":true") || has(&body, b"\"include_usage\": true");
                let frames = self.openai_stream(shape.chunks, usage);
                sse(frames, shape.delay)
            } else {
                json_response(self.chat_json.clone())
            }
        } else if path.ends_with("/messages") {
            if stream {
                sse(self.anthropic_stream(shape.chunks), shape.delay)
            } else {
                json_response(self.messages_json.clone())
            }
        } else if path.ends_with("/embeddings") {
            json_response(self.embeddings_json.clone())
        } else {
            plain(StatusCode::NOT_FOUND, "no such route")
        }
    }

    /// Stream shape from the query, then headers, then the defaults.
    fn shape(&self, query: Option<&str>, headers: &HeaderMap) -> StreamShape {
        let from_query = |key: &str| {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
        };
        let from_header = |key: &str| headers.get(key)?.to_str().ok()?.trim().parse::<u64>().ok();
        let chunks = from_query("chunks").or_else(|| from_header("x-mock-chunks"));
        let delay = from_query("delay_ms").or_else(|| from_header("x-mock-delay-ms"));
        StreamShape {
            chunks: chunks.map_or(self.defaults.chunks, |c| c.clamp(1, 100_000) as usize),
            delay: delay.map_or(self.defaults.delay, Duration::from_millis),
        }
    }

    fn openai_stream(&self, chunks: usize, usage: bool) -> Arc<Frames> {
        let mut cache = self.openai_frames.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((chunks, usage))
            .or_insert_with(|| openai_frames(chunks, usage))
            .clone()
    }

    fn anthropic_stream(&self, chunks: usize) -> Arc<Frames> {
        let mut cache = self
            .anthropic_frames
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cache
            .entry(chunks)
            .or_insert_with(|| anthropic_frames(chunks))
            .clone()
    }
}

fn has(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

fn data_frame(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn named_frame(event: &str, v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {v}\n\n"))
}

/// `chunks` content chunks (the last one carries `finish_reason`), an optional usage chunk,
/// and `[DONE]`.
fn openai_frames(chunks: usize, usage: bool) -> Arc<Frames> {
    let mut out = Vec::with_capacity(chunks + 2);
    for i in 0..chunks {
        let mut delta = json!({"content": format!("tok{i} ")});
        if i == 0 {
            delta["role"] = json!("assistant");
        }
        let finish = if i + 1 == chunks {
            json!("stop")
        } else {
            json!(null)
        };
        out.push(data_frame(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": "mock-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        })));
    }
    if usage {
        out.push(data_frame(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": "mock-model",
            "choices": [],
            "usage": {"prompt_tokens": 250, "completion_tokens": chunks, "total_tokens": 250 + chunks}
        })));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Arc::new(Frames {
        frames: out,
        content: chunks,
    })
}

/// The Anthropic event sequence with `chunks` text deltas. The first content delta is sent
/// with the preamble, so "first byte" means the first token as for OpenAI.
fn anthropic_frames(chunks: usize) -> Arc<Frames> {
    let mut out = Vec::with_capacity(chunks + 5);
    let start = json!({"type": "message_start", "message": {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": "mock-model",
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 250, "output_tokens": 1}}});
    let block = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
    let mut preamble = Vec::new();
    preamble.extend_from_slice(&named_frame("message_start", &start));
    preamble.extend_from_slice(&named_frame("content_block_start", &block));
    for i in 0..chunks {
        let delta = named_frame(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}}),
        );
        if i == 0 {
            preamble.extend_from_slice(&delta);
            out.push(Bytes::from(std::mem::take(&mut preamble)));
        } else {
            out.push(delta);
        }
    }
    let mut tail = Vec::new();
    tail.extend_from_slice(&named_frame(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    tail.extend_from_slice(&named_frame(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": chunks}}),
    ));
    tail.extend_from_slice(&named_frame(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    out.push(Bytes::from(tail));
    Arc::new(Frames {
        frames: out,
        content: chunks,
    })
}

/// An SSE response: frame 0 at once, then every content frame `delay` after the previous one.
fn sse(frames: Arc<Frames>, delay: Duration) -> Response<Body> {
    let stream = futures::stream::unfold(0usize, move |i| {
        let frames = frames.clone();
        async move {
            let frame = frames.frames.get(i)?.clone();
            // Delay content frames only: the usage chunk, `[DONE]` and the Anthropic tail
            // follow the last content frame at once, as real upstreams send them.
            if i > 0 && i < frames.content && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(Frame::data(frame)), i + 1))
        }
    });
    let boxed: FrameStream = Box::pin(stream);
    let mut resp = Response::new(Either::Right(StreamBody::new(boxed)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn json_response(body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from_static(msg.as_bytes()))));
    *resp.status_mut() = status;
    resp
}
