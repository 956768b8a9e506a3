//! Client connections: the accept loop and its cap, one hyper connection per socket, and the
//! watchdog that closes a connection that is slow to send a request head or sits idle too
//! long between requests.
//!
//! Life of a connection:
//!
//! ```text
//! accept (waits while `max_connections` are open)
//!   -> Head   until a request head is complete     (header_read_timeout, else closed)
//!   -> Busy   while a request is served             (body pauses: body_read_timeout, in the handler)
//!   -> Idle   after the response, no byte yet       (keepalive_timeout, else closed)
//!   -> Head   from the first byte of the next request ...
//! ```
//!
//! hyper has a header read timeout of its own, but it starts counting as soon as a
//! kept-alive connection goes idle, so it cannot tell "slow head" from "idle between
//! requests" and one setting would cap both. The watchdog here keeps the two apart, the way
//! nginx's `client_header_timeout` and `keepalive_timeout` do.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::{Buf, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::Connections;
use crate::pipeline::GatewayError;
use crate::request::Dialect;

/// How often, at most, the "connection cap reached" and "accept failed" warnings are logged.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (out of file descriptors, usually) before the next one, so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The first bytes of a request head kept for an HTTP-layer error: enough for the request
/// line's path, which picks the error's dialect.
const HEAD_SAMPLE: usize = 512;

/// Accepts connections until `stop` turns true, then returns the connections still open
/// (already told to shut down gracefully) for the caller to drain. The listener is closed
/// on return.
pub(super) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Connections,
    mut stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog times request heads (see the module doc); hyper's own timer stays off.
    builder.http1().keep_alive(true).header_read_timeout(None);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut cap_warning = Throttle::new(WARN_INTERVAL);
    let mut accept_warning = Throttle::new(WARN_INTERVAL);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(suppressed) = cap_warning.ready() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        suppressed,
                        "Connection cap reached: not accepting until a connection closes (server.max_connections)."
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Streams are written as many small frames: without TCP_NODELAY, Nagle's
                    // algorithm and the client's delayed ACK hold frames back (~40 ms per
                    // stream, measured in bench/).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "Cannot set TCP_NODELAY.");
                    }
                    let conn = serve_connection(tcp, peer, app.clone(), builder.clone(), limits, stop.clone());
                    conns.spawn(async move {
                        conn.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    if let Some(suppressed) = accept_warning.ready() {
                        tracing::warn!(error = %e, suppressed, "Cannot accept a connection.");
                    }
                    drop(permit);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            _ = stop.changed() => break,
            Some(done) = conns.join_next() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "A connection task panicked.");
                }
            }
        }
    }
    conns
}

/// Serves one connection until it ends, times out, or is drained after `stop`.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Connections,
    mut stop: watch::Receiver<bool>,
) {
    let tracker = Arc::new(Tracker::new());
    let io = TokioIo::new(TrackedIo::new(tcp, tracker.clone()));
    let service = {
        let tracker = tracker.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let guard = InFlight::start(tracker.clone());
            let mut app = app.clone();
            async move {
                // The router is always ready and never fails.
                let resp = tower::Service::call(&mut app, req.map(Body::new))
                    .await
                    .unwrap_or_else(|never| match never {});
                Ok::<_, Infallible>(resp.map(|body| {
                    Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = tracker.deadline(limits);
        let expiry = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "Connection ended with an error.");
                }
                return;
            }
            () = tracker.changed.notified() => {}
            () = expiry => {
                if let Some((at, phase)) = tracker.deadline(limits)
                    && at <= Instant::now()
                {
                    tracing::debug!(%peer, phase, "Closing a connection that timed out.");
                    return;
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Where a connection is in its request cycle; the watchdog's deadline depends on it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a complete request head since `since` (the connection's start, or the
    /// first byte after an idle period).
    Head { since: Instant },
    /// At least one request is being served: its body read, the pipeline, the response.
    Busy,
    /// Between requests since `since`, no byte of the next one yet.
    Idle { since: Instant },
}

/// What the socket wrapper, the service and the watchdog of one connection share.
struct Tracker {
    state: Mutex<TrackerState>,
    /// Woken when the deadline may have moved earlier (a request finished, a head started).
    changed: Notify,
}

struct TrackerState {
    phase: Phase,
    /// Requests whose response has not finished (more than one on HTTP/2).
    in_flight: usize,
    /// The first bytes of the request head being read.
    head: Vec<u8>,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            state: Mutex::new(TrackerState {
                phase: Phase::Head {
                    since: Instant::now(),
                },
                in_flight: 0,
                head: Vec::new(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // The state is a few plain fields, valid after any panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watchdog's deadline and the phase it belongs to; `None` while busy.
    fn deadline(&self, limits: Connections) -> Option<(Instant, &'static str)> {
        match self.lock().phase {
            Phase::Head { since } => Some((since + limits.header_read_timeout, "header")),
            Phase::Idle { since } => Some((since + limits.keepalive_timeout, "keepalive")),
            Phase::Busy => None,
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut s = self.lock();
        match s.phase {
            Phase::Busy => {}
            Phase::Head { .. } => sample(&mut s.head, bytes),
            Phase::Idle { .. } => {
                s.phase = Phase::Head {
                    since: Instant::now(),
                };
                s.head.clear();
                sample(&mut s.head, bytes);
                drop(s);
                self.changed.notify_one();
            }
        }
    }

    fn request_started(&self) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.phase = Phase::Busy;
        s.head.clear();
    }

    fn request_finished(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.phase = Phase::Idle {
                since: Instant::now(),
            };
            drop(s);
            self.changed.notify_one();
        }
    }

    /// The error for an HTTP/1 response hyper writes on its own: one that starts while no
    /// request was handed to the router is hyper's answer to a head it could not parse
    /// (400, 414, 431), which has no body. `None` for any other write.
    fn automatic_error(&self, write: &[u8]) -> Option<(GatewayError, Dialect)> {
        let s = self.lock();
        if !matches!(s.phase, Phase::Head { .. }) {
            return None;
        }
        let error = match write.get(..12)? {
            b"HTTP/1.1 400" | b"HTTP/1.0 400" => GatewayError::MalformedRequest,
            b"HTTP/1.1 414" | b"HTTP/1.0 414" => GatewayError::UriTooLong,
            b"HTTP/1.1 431" | b"HTTP/1.0 431" => GatewayError::HeadersTooLarge,
            _ => return None,
        };
        // The request target is the second word of the request line, when it arrived.
        let line = s.head.split(|b| *b == b'\n').next().unwrap_or_default();
        let path = line
            .split(|b| *b == b' ')
            .nth(1)
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("/");
        Some((error, Dialect::for_path(path)))
    }
}

fn sample(head: &mut Vec<u8>, bytes: &[u8]) {
    let room = HEAD_SAMPLE.saturating_sub(head.len());
    head.extend_from_slice(&bytes[..room.min(bytes.len())]);
}

/// Counts a request in flight from the moment hyper hands it over until its response body
/// is dropped (fully written, or the connection gone).
struct InFlight(Arc<Tracker>);

impl InFlight {
    fn start(tracker: Arc<Tracker>) -> InFlight {
        tracker.request_started();
        InFlight(tracker)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that keeps its request counted in flight.
struct GuardedBody {
    body: Body,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, reporting reads to the [`Tracker`] and giving hyper's automatic error
/// responses a JSON body in the route's dialect.
struct TrackedIo {
    inner: TcpStream,
    tracker: Arc<Tracker>,
    /// Our error response, while it is being written in place of hyper's.
    replacement: Option<Bytes>,
    /// Set once our error response is out: hyper's own bytes are dropped from then on (the
    /// connection closes after an automatic error).
    replaced: bool,
}

impl TrackedIo {
    fn new(inner: TcpStream, tracker: Arc<Tracker>) -> TrackedIo {
        TrackedIo {
            inner,
            tracker,
            replacement: None,
            replaced: false,
        }
    }

    /// Starts replacing hyper's write if it is an automatic error response.
    fn intercept(&mut self, first: &[u8]) {
        if self.replaced || self.replacement.is_some() || !first.starts_with(b"HTTP/1.") {
            return;
        }
        if let Some((error, dialect)) = self.tracker.automatic_error(first) {
            tracing::info!(
                error = error.reason(),
                dialect = dialect.as_str(),
                "Request rejected by the HTTP layer."
            );
            self.replacement = Some(error_response(&error, dialect));
        }
    }

    /// Writes the rest of the replacement; `Ready(Ok(()))` once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.replacement.as_mut() {
            if rest.is_empty() {
                self.replacement = None;
                self.replaced = true;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => rest.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A complete HTTP/1.1 error response with a JSON body, closing the connection.
fn error_response(error: &GatewayError, dialect: Dialect) -> Bytes {
    let status = error.status();
    let body = error.body(dialect).to_string();
    Bytes::from(format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or_default(),
        body.len(),
    ))
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.tracker.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.intercept(buf);
        if self.replacement.is_some() || self.replaced {
            return self.poll_replacement(cx).map_ok(|()| buf.len());
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.intercept(first);
        }
        if self.replacement.is_some() || self.replaced {
            let len = bufs.iter().map(|b| b.len()).sum();
            return self.poll_replacement(cx).map_ok(|()| len);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.replacement.is_some() {
            std::task::ready!(self.poll_replacement(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.replacement.is_some() {
            std::task::ready!(self.poll_replacement(cx))?;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Lets a warning through at most once per interval, counting the ones held back.
struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last one)` when a warning may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> Connections {
        Connections {
            header_read_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            max_connections: 10,
        }
    }

    /// The phase of the deadline, and the deadline minus the phase's timeout (its start).
    fn phase(t: &Tracker) -> Option<(&'static str, Instant)> {
        let (at, phase) = t.deadline(limits())?;
        let timeout = match phase {
            "header" => limits().header_read_timeout,
            _ => limits().keepalive_timeout,
        };
        Some((phase, at - timeout))
    }

    #[test]
    fn phases_pick_the_deadline() {
        let before = Instant::now();
        let t = Arc::new(Tracker::new());
        let (p, since) = phase(&t).unwrap();
        assert_eq!(p, "header");
        assert!(since >= before && since <= Instant::now());
        let body = GuardedBody {
            body: Body::empty(),
            _guard: InFlight::start(t.clone()),
        };
        assert_eq!(t.deadline(limits()), None, "no deadline while busy");
        let second = InFlight::start(t.clone());
        drop(body);
        assert_eq!(
            t.deadline(limits()),
            None,
            "still busy with the second request"
        );
        let before = Instant::now();
        drop(second);
        let (p, since) = phase(&t).unwrap();
        assert_eq!(p, "keepalive");
        assert!(since >= before);
        t.on_read(b"");
        assert_eq!(phase(&t).unwrap().0, "keepalive", "no byte, still idle");
        let before = Instant::now();
        t.on_read(b"GET /v1/messages HTTP/1.1\r\n");
        let (p, since) = phase(&t).unwrap();
        assert_eq!(p, "header");
        assert!(since >= before);
    }

    #[test]
    fn automatic_errors_take_the_dialect_of_the_request_line() {
        let t = Tracker::new();
        t.on_read(b"POST /v1/messages?beta=true HTTP/1.1\r\nx: \x01\r\n");
        let (e, d) = t.automatic_error(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
        assert_eq!(e.reason(), "malformed_request");
        assert_eq!(d, Dialect::Anthropic);
        assert!(t.automatic_error(b"HTTP/1.1 200 OK\r\n").is_none());
        let t = Tracker::new();
        t.on_read(b"GET /v1/chat/completions");
        let (e, d) = t
            .automatic_error(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            .unwrap();
        assert_eq!((e.reason(), d), ("headers_too_large", Dialect::OpenAi));
        t.request_started();
        assert!(t.automatic_error(b"HTTP/1.1 400 Bad Request\r\n").is_none());
    }

    #[test]
    fn error_responses_are_complete_json() {
        let bytes = error_response(&GatewayError::UriTooLong, Dialect::OpenAi);
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "uri_too_long");
    }

    #[test]
    fn throttle_counts_what_it_holds_back() {
        let mut t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.ready(), Some(2));
        assert_eq!(t.ready(), None);
    }
}
