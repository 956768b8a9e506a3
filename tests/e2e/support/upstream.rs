//! [`MockUpstream`]: an HTTP server in the test process that plays a provider.
//!
//! It speaks the OpenAI (`/chat/completions`, `/embeddings`), Anthropic (`/messages`) and
//! Gemini (`:generateContent`, `:streamGenerateContent`) dialects. Each request takes the next
//! scripted [`Reply`] (or the default one, [`Reply::Auto`] unless changed), and every request
//! is recorded so a test can assert what the gateway sent and how often.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::dialect::{anthropic, gemini, openai};

/// What the mock does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer in the dialect of the path, echoing the last user message as `Echo: <text>`
    /// (streamed when the request asks for a stream).
    Auto,
    /// A JSON body with this status.
    Json {
        /// HTTP status.
        status: u16,
        /// Body.
        body: Value,
    },
    /// A `200 text/event-stream` body sent frame by frame.
    Sse(Vec<Frame>),
    /// Any bytes with any status and content type (garbage bodies).
    Raw {
        /// HTTP status.
        status: u16,
        /// `content-type` header.
        content_type: &'static str,
        /// Body.
        body: Vec<u8>,
    },
    /// Wait before sending anything (not even headers), then reply.
    Delayed(Duration, Box<Reply>),
    /// The reply with these extra response headers (`retry-after`, ...).
    Headers(Vec<(&'static str, String)>, Box<Reply>),
    /// Never answer.
    Hang,
}

/// One piece of a streamed body.
#[derive(Debug, Clone)]
pub enum Frame {
    /// Wait, then send these bytes verbatim (`data: {...}\n\n`).
    Bytes(Duration, String),
    /// Break the connection: the body ends with an error, not a clean end.
    Abort,
}

impl Reply {
    /// `200` with a JSON body.
    pub fn json(body: Value) -> Reply {
        Reply::Json { status: 200, body }
    }

    /// An OpenAI-shaped error with `status`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::Json {
            status,
            body: json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}}),
        }
    }

    /// The same reply after `delay` (nothing, not even headers, is sent before).
    pub fn after(self, delay: Duration) -> Reply {
        Reply::Delayed(delay, Box::new(self))
    }

    /// The same reply with the response header `name: value` added.
    pub fn with_header(self, name: &'static str, value: &str) -> Reply {
        match self {
            Reply::Headers(mut headers, inner) => {
                headers.push((name, value.to_owned()));
                Reply::Headers(headers, inner)
            }
            other => Reply::Headers(vec![(name, value.to_owned())], Box::new(other)),
        }
    }

    /// For an [`Reply::Sse`]: waits `gap` before every frame.
    pub fn paced(self, gap: Duration) -> Reply {
        match self {
            Reply::Sse(frames) => Reply::Sse(
                frames
                    .into_iter()
                    .map(|f| match f {
                        Frame::Bytes(_, b) => Frame::Bytes(gap, b),
                        Frame::Abort => Frame::Abort,
                    })
                    .collect(),
            ),
            other => other,
        }
    }
}

impl Frame {
    /// `data: <json>\n\n`, sent at once.
    pub fn data(v: &Value) -> Frame {
        Frame::Bytes(Duration::ZERO, format!("data: {v}\n\n"))
    }

    /// `event: <name>\ndata: <json>\n\n`, sent at once.
    pub fn event(name: &str, v: &Value) -> Frame {
        Frame::Bytes(Duration::ZERO, format!("event: {name}\ndata: {v}\n\n"))
    }

    /// Verbatim text, sent at once.
    pub fn text(s: &str) -> Frame {
        Frame::Bytes(Duration::ZERO, s.to_owned())
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Recorded {
    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    streams_completed: AtomicUsize,
    streams_dropped: AtomicUsize,
    frames_sent: AtomicUsize,
    changed: Notify,
}

/// A scripted upstream on `127.0.0.1:<port from the OS>`; stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock that answers every request with [`Reply::Auto`].
    pub async fn start() -> MockUpstream {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockUpstream { addr, shared, task }
    }

    /// Starts a mock whose every request gets `reply`.
    pub async fn always(reply: Reply) -> MockUpstream {
        let m = MockUpstream::start().await;
        m.set_default(reply);
        m
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Queues replies for the next requests, in order; after them the default applies.
    pub fn push(&self, reply: Reply) -> &Self {
        self.shared.script.lock().unwrap().push_back(reply);
        self
    }

    /// The reply for requests once the script is used up.
    pub fn set_default(&self, reply: Reply) {
        *self.shared.default.lock().unwrap() = Some(reply);
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The only request received; panics if there were none or several.
    pub fn single_request(&self) -> Recorded {
        let reqs = self.requests();
        assert_eq!(
            reqs.len(),
            1,
            "expected exactly one upstream request, got {reqs:#?}"
        );
        reqs.into_iter().next().unwrap()
    }

    /// Number of requests received.
    pub fn hits(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Streamed bodies the receiver dropped before their last frame.
    pub fn streams_dropped(&self) -> usize {
        self.shared.streams_dropped.load(Ordering::SeqCst)
    }

    /// Streamed bodies sent to their end.
    pub fn streams_completed(&self) -> usize {
        self.shared.streams_completed.load(Ordering::SeqCst)
    }

    /// Stream frames handed to the connection so far (all streams).
    pub fn frames_sent(&self) -> usize {
        self.shared.frames_sent.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds for this mock, or panics after `timeout` with `what`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&MockUpstream) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            if cond(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                assert!(
                    cond(self),
                    "timed out after {timeout:?} waiting for: {what}"
                );
                return;
            }
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let recorded = Recorded {
        method,
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers,
        body: json,
    };
    shared.requests.lock().unwrap().push(recorded.clone());
    shared.changed.notify_waiters();
    let reply = {
        let next = shared.script.lock().unwrap().pop_front();
        next.or_else(|| shared.default.lock().unwrap().clone())
            .unwrap_or(Reply::Auto)
    };
    respond(shared, &recorded, reply).await
}

async fn respond(shared: Arc<Shared>, req: &Recorded, mut reply: Reply) -> Response {
    let mut extra_headers = Vec::new();
    let mut resp = loop {
        match reply {
            Reply::Delayed(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
            }
            Reply::Headers(headers, inner) => {
                extra_headers.extend(headers);
                reply = *inner;
            }
            Reply::Hang => std::future::pending::<()>().await,
            Reply::Auto => reply = auto(req),
            Reply::Json { status, body } => {
                let status = StatusCode::from_u16(status).expect("status");
                break (
                    status,
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response();
            }
            Reply::Raw {
                status,
                content_type,
                body,
            } => {
                let status = StatusCode::from_u16(status).expect("status");
                break (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
            }
            Reply::Sse(frames) => break sse(shared, frames),
        }
    };
    for (name, value) in extra_headers {
        resp.headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    resp
}

/// Streams `frames` through a channel: when the receiver (hyper, and behind it the gateway)
/// goes away, the send fails and the stream counts as dropped.
fn sse(shared: Arc<Shared>, frames: Vec<Frame>) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        for frame in frames {
            let item = match frame {
                Frame::Bytes(delay, text) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = tx.closed() => {
                            shared.streams_dropped.fetch_add(1, Ordering::SeqCst);
                            shared.changed.notify_waiters();
                            return;
                        }
                    }
                    Ok(Bytes::from(text))
                }
                Frame::Abort => Err(std::io::Error::other("mock upstream aborts the stream")),
            };
            let abort = item.is_err();
            if tx.send(item).await.is_err() {
                shared.streams_dropped.fetch_add(1, Ordering::SeqCst);
                shared.changed.notify_waiters();
                return;
            }
            shared.frames_sent.fetch_add(1, Ordering::SeqCst);
            shared.changed.notify_waiters();
            if abort {
                return;
            }
        }
        // Wait for hyper to take the last frame before declaring the stream complete.
        let _ = tx.reserve().await;
        shared.streams_completed.fetch_add(1, Ordering::SeqCst);
        shared.changed.notify_waiters();
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("sse response")
}

/// The default dialect-aware answer.
fn auto(req: &Recorded) -> Reply {
    let path = req.path.as_str();
    let stream = req
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if path.ends_with("/chat/completions") {
        let text = format!("Echo: {}", openai::last_user_text(&req.body));
        let usage = req
            .body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if stream {
            openai::stream_text(&split3(&text), usage)
        } else {
            openai::chat(&text)
        }
    } else if path.ends_with("/embeddings") {
        openai::embeddings(&req.body)
    } else if path.ends_with("/messages") {
        let text = format!("Echo: {}", anthropic::last_user_text(&req.body));
        if stream {
            anthropic::stream_text(&split3(&text))
        } else {
            anthropic::message(&text)
        }
    } else if path.contains(":streamGenerateContent") {
        gemini::stream_text(&split3(&format!(
            "Echo: {}",
            gemini::last_user_text(&req.body)
        )))
    } else if path.contains(":generateContent") {
        gemini::generate(&format!("Echo: {}", gemini::last_user_text(&req.body)))
    } else {
        Reply::error(404, &format!("mock upstream: no route for {path}"))
    }
}

/// Splits text into three pieces on char boundaries (for streamed echoes).
fn split3(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(3).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}
