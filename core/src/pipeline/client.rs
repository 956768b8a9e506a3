//! The upstream HTTP client: hyper's pooled connection client with rustls, and nothing else.
//!
//! Weir used reqwest here first. Profiles of the request path showed its layers (redirect
//! policy, retry policy, URL parsing into `url::Url` and back into `http::Uri`, response
//! wrapping) at about a tenth of the gateway's CPU per request, for features the gateway
//! does not want: it retries and falls back itself, and must never follow a redirect with a
//! provider's key. So provider traffic goes straight to `hyper_util`'s client, one pool per
//! provider. (Plugins' `fetch` and the admin CLI still use reqwest: they are not hot.)
//!
//! Errors never include the URL, which may carry a key in its query.

use std::error::Error as _;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::header::USER_AGENT;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request could not be built (a provider produced a URL hyper cannot use).
    #[error("request failed: invalid upstream URL")]
    InvalidUrl,
    /// The TCP or TLS connection did not come up within the connect timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The connection could not be established (refused, DNS, TLS).
    #[error("connection failed: {0}")]
    Connect(String),
    /// The request was sent but the exchange failed before a response head arrived.
    #[error("request failed: {0}")]
    Request(String),
    /// The response body broke while it was being read.
    #[error("response body broken: {0}")]
    Body(String),
    /// The response body is larger than the limit it was read with (and was not read past it).
    #[error("response body exceeds {0} bytes")]
    TooLarge(usize),
}

impl HttpError {
    /// Whether this is a timeout (connect phase).
    pub fn is_timeout(&self) -> bool {
        matches!(self, HttpError::ConnectTimeout)
    }
}

/// An error and its sources, joined: `tcp connect error: Connection refused (os error 111)`.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Whether an I/O timeout is somewhere in the error's sources.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// One provider's pooled client (cheap to clone: the pool is shared).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    user_agent: HeaderValue,
}

impl HttpClient {
    /// A client with TLS (rustls, platform verifier; HTTP/2 by ALPN) and plain HTTP, TCP
    /// no-delay, and `connect_timeout` for the TCP connect.
    pub fn new(connect_timeout: Duration) -> Result<HttpClient, String> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| format!("TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(HttpClient {
            inner,
            user_agent: HeaderValue::from_static(concat!("weir/", env!("CARGO_PKG_VERSION"))),
        })
    }

    /// POSTs `body` to `url` and waits for the response head (the caller bounds the wait).
    pub async fn post(
        &self,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, HttpError> {
        let uri: Uri = url.parse().map_err(|_| HttpError::InvalidUrl)?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.headers_mut()
            .entry(USER_AGENT)
            .or_insert_with(|| self.user_agent.clone());
        self.inner.request(req).await.map_err(|e| {
            if e.is_connect() {
                if timed_out(&e) {
                    HttpError::ConnectTimeout
                } else {
                    HttpError::Connect(e.source().map_or_else(|| e.to_string(), describe))
                }
            } else {
                HttpError::Request(describe(&e))
            }
        })
    }
}

/// Reads a whole response body of at most `limit` bytes. A larger body is refused by its
/// `content-length` before reading, or as soon as what arrived passes the limit: never more
/// than `limit` bytes (plus one read) are held.
pub async fn read_limited(resp: Response<Incoming>, limit: usize) -> Result<Bytes, HttpError> {
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(HttpError::TooLarge(limit));
    }
    let mut body = resp.into_body();
    // Most answers arrive in one frame: that frame is returned as is, without a copy.
    let mut first: Option<Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    let mut len = 0usize;
    while let Some(chunk) = next_chunk(&mut body).await {
        let chunk = chunk?;
        len = len.saturating_add(chunk.len());
        if len > limit {
            return Err(HttpError::TooLarge(limit));
        }
        match first.take() {
            None if joined.is_empty() => first = Some(chunk),
            None => joined.extend_from_slice(&chunk),
            Some(f) => {
                joined.reserve(len);
                joined.extend_from_slice(&f);
                joined.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// Reads the next data frame of a body (`None` at its end), skipping trailers.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, HttpError>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(HttpError::Body(describe(&e)))),
        }
    }
}

/// A response body as a stream of data chunks.
pub fn data_stream(body: Incoming) -> BoxStream<'static, Result<Bytes, HttpError>> {
    BodyDataStream::new(body)
        .map(|r| r.map_err(|e| HttpError::Body(describe(&e))))
        .boxed()
}
