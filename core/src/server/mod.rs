//! HTTP surface: the axum router, body reading, request ids, and graceful shutdown. Nothing
//! here knows about providers or policies; handlers parse the body once and hand over to
//! [`crate::pipeline`]. Connections (accepting, the connection cap, header and keep-alive
//! timeouts) are in [`conn`]; the Responses API handlers in [`responses`]; token counting in [`count_tokens`].

mod conn;
mod count_tokens;
mod responses;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;

use crate::api::BadRequest;
use crate::api::openai::{ChatRequest, EmbeddingsRequest};
use crate::pipeline::{self, Dialect, Gateway, GatewayError, RequestCtx};
use crate::request::Body as CtxBody;

/// Header carrying the request id, accepted from clients and always returned.
pub const REQUEST_ID: &str = "x-request-id";

/// Builds the router. Tests call this and drive it with `tower::ServiceExt::oneshot`.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route(
            "/v1/messages/count_tokens",
            post(count_tokens::count_tokens),
        )
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(ensure_request_id))
        .with_state(gw)
}

/// Gives every response an `x-request-id` (GET routes, 404s and 405s included): the one a
/// handler already set, else the client's (when sane), else a fresh one.
async fn ensure_request_id(req: Request, next: axum::middleware::Next) -> Response {
    let fallback = request_id(req.headers());
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key(REQUEST_ID)
        && let Ok(v) = HeaderValue::from_str(&fallback)
    {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// A request id: the client's if it is sane, otherwise a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Checks that a POST body is declared as JSON: `application/json` or any `+json` type,
/// parameters allowed. Anything else (notably the `text/plain` a browser page may send
/// across origins without a preflight) is refused before the body is read.
fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    let value = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_json = value.as_deref().is_some_and(|v| {
        let essence = v.split(';').next().unwrap_or_default().trim();
        let (kind, subtype) = essence.split_once('/').unwrap_or_default();
        kind.eq_ignore_ascii_case("application")
            && (subtype.eq_ignore_ascii_case("json")
                || subtype.to_ascii_lowercase().ends_with("+json"))
    });
    if is_json {
        return Ok(());
    }
    Err(GatewayError::UnsupportedMediaType(match value {
        Some(v) => format!("'{}'", v.chars().take(100).collect::<String>()),
        None => "no content-type".to_owned(),
    }))
}

/// Reads the body up to `limit` bytes, allowing at most `pause` between two reads.
async fn read_body(
    body: Body,
    limit: usize,
    pause: Duration,
) -> Result<bytes::Bytes, GatewayError> {
    let mut body = Limited::new(body, limit);
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(pause, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => return Err(GatewayError::BodyTimeout(pause.as_secs())),
        };
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    chunks.push(data);
                }
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::PayloadTooLarge(limit));
            }
            Err(e) => {
                return Err(GatewayError::BadRequest(BadRequest {
                    field: None,
                    message: format!("cannot read body: {e}"),
                }));
            }
        }
    }
    Ok(match chunks.len() {
        0 => bytes::Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    })
}

/// Parses JSON into `T`, naming the offending field on type errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    // The fast path: plain serde. Only a body that fails is parsed again with the path
    // tracker, which costs ~8% of a request when always on.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => {
            de.end()
                .map_err(|e| GatewayError::MalformedJson(e.to_string()))?;
            Ok(v)
        }
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(GatewayError::MalformedJson(inner.to_string()));
            }
            let field = if path == "." { None } else { Some(path) };
            let message = match &field {
                Some(f) => format!("invalid field '{f}': {inner}"),
                None => format!("invalid request: {inner}"),
            };
            Err(GatewayError::BadRequest(BadRequest { field, message }))
        }
    }
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Checks what serde cannot: a non-empty conversation with known roles.
fn validate_chat(req: &ChatRequest) -> Result<(), GatewayError> {
    if req.messages.is_empty() {
        return Err(BadRequest::field("messages", "messages must not be empty").into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(BadRequest::field(
                format!("messages[{i}].role"),
                format!(
                    "unknown role '{}' (expected one of {})",
                    m.role,
                    ROLES.join(", ")
                ),
            )
            .into());
        }
        if m.role == "tool" && m.tool_call_id.is_none() {
            return Err(BadRequest::field(
                format!("messages[{i}].tool_call_id"),
                "a tool message needs tool_call_id",
            )
            .into());
        }
    }
    if req.n == Some(0) {
        return Err(BadRequest::field("n", "n must be at least 1").into());
    }
    Ok(())
}

/// Everything a handler needs before the pipeline: id, span, snapshot limits, body bytes.
async fn prologue(
    gw: &Gateway,
    req: Request,
    dialect: Dialect,
) -> Result<(String, HeaderMap, bytes::Bytes), (String, Response)> {
    let (parts, body) = req.into_parts();
    let id = request_id(&parts.headers);
    let (limit, pause) = {
        let snap = gw.snapshot();
        (snap.config.max_body_bytes, snap.config.body_read_timeout)
    };
    let read = match require_json(&parts.headers) {
        Ok(()) => read_body(body, limit, pause).await,
        Err(e) => Err(e),
    };
    match read {
        Ok(bytes) => Ok((id, parts.headers, bytes)),
        Err(e) => {
            tracing::info!(error = e.reason(), "Request rejected.");
            let resp = e.into_response_for(dialect);
            Err((id.clone(), with_request_id(resp, &id)))
        }
    }
}

fn span_for(id: &str, route: &'static str, dialect: Dialect) -> tracing::Span {
    tracing::info_span!(
        "request",
        id = %id,
        route,
        dialect = dialect.as_str(),
        model = tracing::field::Empty,
    )
}

async fn chat_completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let (id, headers, bytes) = match prologue(&gw, req, Dialect::OpenAi).await {
        Ok(v) => v,
        Err((_, resp)) => return resp,
    };
    let span = span_for(&id, "chat", Dialect::OpenAi);
    let resp = async {
        let parsed = parse_json::<ChatRequest>(&bytes).and_then(|r| validate_chat(&r).map(|()| r));
        let chat = match parsed {
            Ok(c) => c,
            Err(e) => return reject(&gw, e, Dialect::OpenAi, "unknown"),
        };
        let ctx = new_ctx(
            &id,
            Dialect::OpenAi,
            started,
            headers,
            CtxBody::Chat(chat),
            Some(bytes.clone()),
        );
        pipeline::chat(&gw, ctx).await
    }
    .instrument(span)
    .await;
    with_request_id(resp, &id)
}

async fn messages(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let (id, headers, bytes) = match prologue(&gw, req, Dialect::Anthropic).await {
        Ok(v) => v,
        Err((_, resp)) => return resp,
    };
    let span = span_for(&id, "messages", Dialect::Anthropic);
    let resp = async {
        let parsed = parse_json::<crate::api::anthropic::MessagesRequest>(&bytes).and_then(|m| {
            if m.max_tokens.is_none() {
                return Err(BadRequest::field("max_tokens", "max_tokens: Field required").into());
            }
            crate::api::anthropic::to_chat_request(m).map_err(GatewayError::from)
        });
        let chat = match parsed.and_then(|r| validate_chat(&r).map(|()| r)) {
            Ok(c) => c,
            Err(e) => return reject(&gw, e, Dialect::Anthropic, "unknown"),
        };
        let ctx = new_ctx(
            &id,
            Dialect::Anthropic,
            started,
            headers,
            CtxBody::Chat(chat),
            // The client's bytes, for an Anthropic upstream while no plugin changes the body.
            Some(bytes.clone()),
        );
        pipeline::chat(&gw, ctx).await
    }
    .instrument(span)
    .await;
    with_request_id(resp, &id)
}

async fn embeddings(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let (id, headers, bytes) = match prologue(&gw, req, Dialect::OpenAi).await {
        Ok(v) => v,
        Err((_, resp)) => return resp,
    };
    let span = span_for(&id, "embeddings", Dialect::OpenAi);
    let resp = async {
        let e = match parse_json::<EmbeddingsRequest>(&bytes) {
            Ok(e) => e,
            Err(err) => return reject(&gw, err, Dialect::OpenAi, "unknown"),
        };
        let ctx = new_ctx(
            &id,
            Dialect::OpenAi,
            started,
            headers,
            CtxBody::Embeddings(e),
            None,
        );
        pipeline::embeddings(&gw, ctx).await
    }
    .instrument(span)
    .await;
    with_request_id(resp, &id)
}

fn new_ctx(
    id: &str,
    dialect: Dialect,
    started: Instant,
    headers: HeaderMap,
    body: CtxBody,
    client_body: Option<bytes::Bytes>,
) -> RequestCtx {
    RequestCtx {
        request_id: id.to_owned(),
        dialect,
        started,
        headers,
        body,
        targets: None,
        client_body,
        metadata: BTreeMap::new(),
        scratch: Default::default(),
        decisions: Vec::new(),
    }
}

/// A request rejected before the pipeline: counted and logged like any other.
fn reject(gw: &Gateway, e: GatewayError, dialect: Dialect, model: &str) -> Response {
    gw.metrics
        .requests
        .with_label_values(&[model, "none", e.status().as_str()])
        .inc();
    tracing::info!(error = e.reason(), message = %e, "Request rejected.");
    e.into_response_for(dialect)
}

/// The model names the gateway serves: its `[[models]]`, then the names plugins declare they
/// serve (a routing plugin's aliases), without duplicates.
fn served_models(snap: &pipeline::Snapshot) -> Vec<&str> {
    let mut names: Vec<&str> = snap.config.model_order.iter().map(String::as_str).collect();
    for alias in snap.plugins.served_models() {
        if !names.contains(&alias.as_str()) {
            names.push(alias);
        }
    }
    names
}

fn model_object(name: &str) -> serde_json::Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "weir"})
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let snap = gw.snapshot();
    let data: Vec<_> = served_models(&snap).into_iter().map(model_object).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`: the model object, or an OpenAI-shaped 404.
async fn model(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let snap = gw.snapshot();
    if served_models(&snap).contains(&id.as_str()) {
        return axum::Json(model_object(&id)).into_response();
    }
    let body = json!({"error": {"message": format!("The model '{id}' does not exist"),
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready unless the state store is failing (a full disk): then 503 with its reason, so a
/// load balancer sends traffic elsewhere while state writes would be lost.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let snap = gw.snapshot();
    let health = snap.services.state.health();
    gw.metrics.state_healthy.set(i64::from(health.is_ok()));
    match health {
        Ok(()) => axum::Json(json!({"status": "ready", "models": snap.config.model_order.len()}))
            .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let healthy = gw.snapshot().services.state.health().is_ok();
    gw.metrics.state_healthy.set(i64::from(healthy));
    let mut resp = gw.metrics.render().into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let e = GatewayError::MethodNotAllowed {
        method: req.method().to_string(),
        path: path.to_owned(),
    };
    tracing::info!(error = e.reason(), path, "Request rejected.");
    e.into_response_for(Dialect::for_path(path))
}

async fn not_found(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let method = req.method();
    let label = match *method {
        http::Method::GET
        | http::Method::POST
        | http::Method::PUT
        | http::Method::DELETE
        | http::Method::PATCH
        | http::Method::HEAD
        | http::Method::OPTIONS => method.as_str(),
        _ => "other",
    };
    gw.metrics.unknown_routes.with_label_values(&[label]).inc();
    tracing::debug!(method = %method, path = req.uri().path(), "No route for the request.");
    let message = format!("no route for {} {}", req.method(), req.uri().path());
    let body = match Dialect::for_path(req.uri().path()) {
        Dialect::Anthropic => crate::api::anthropic::error_body(StatusCode::NOT_FOUND, &message),
        _ => json!({"error": {"message": message,
            "type": "invalid_request_error", "param": null, "code": "not_found"}}),
    };
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// Serves until SIGTERM or SIGINT, then stops accepting and gives in-flight requests (streams
/// included) up to `grace` to finish before returning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    limits: crate::config::Connections,
    grace: Duration,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let accepting = tokio::spawn(conn::accept_loop(listener, router(gw), limits, stop_rx));
    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "Shutdown signal received; draining in-flight requests."
    );
    let _ = stop_tx.send(true);
    // The accept loop returns (closing the listener) with the connections still open, each
    // already told to finish its requests and close.
    let mut open = accepting.await.map_err(std::io::Error::other)?;
    let drained =
        tokio::time::timeout(grace, async { while open.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = open.len(),
            "Grace period over; closing the remaining connections."
        );
        open.abort_all();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::config::Config;
    use crate::pipeline::{Services, Snapshot};
    use crate::state::{MemoryStore, StateError, StateStore};
    use crate::telemetry::Metrics;

    /// A memory store whose health is whatever the test sets.
    #[derive(Default)]
    struct Sick {
        inner: MemoryStore,
        failure: std::sync::Mutex<Option<String>>,
    }

    impl StateStore for Sick {
        fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
            self.inner.get(ns, key)
        }
        fn set(&self, ns: &str, k: &str, v: &[u8], t: Option<Duration>) -> Result<(), StateError> {
            self.inner.set(ns, k, v, t)
        }
        fn incr(&self, ns: &str, k: &str, d: i64, t: Option<Duration>) -> Result<i64, StateError> {
            self.inner.incr(ns, k, d, t)
        }
        fn cas(
            &self,
            ns: &str,
            k: &str,
            e: Option<&[u8]>,
            n: Option<&[u8]>,
            t: Option<Duration>,
        ) -> Result<bool, StateError> {
            self.inner.cas(ns, k, e, n, t)
        }
        fn delete(&self, ns: &str, k: &str) -> Result<bool, StateError> {
            self.inner.delete(ns, k)
        }
        fn scan_prefix(
            &self,
            ns: &str,
            p: &str,
            l: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
            self.inner.scan_prefix(ns, p, l)
        }
        fn namespaces(&self) -> Result<Vec<String>, StateError> {
            self.inner.namespaces()
        }
        fn entries(
            &self,
            ns: &str,
            after: Option<&str>,
            l: usize,
        ) -> Result<Vec<crate::state::Entry>, StateError> {
            self.inner.entries(ns, after, l)
        }
        fn put_entry(&self, ns: &str, entry: &crate::state::Entry) -> Result<(), StateError> {
            self.inner.put_entry(ns, entry)
        }
        fn health(&self) -> Result<(), String> {
            match self.failure.lock().unwrap().clone() {
                None => Ok(()),
                Some(why) => Err(why),
            }
        }
    }

    async fn get(gw: &Arc<Gateway>, path: &str) -> (StatusCode, String) {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let resp = router(gw.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_is_red_while_the_state_store_fails() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let toml = "[providers.local]\nkind = \"mock\"\n\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"local\" }]\n";
        let config = Config::from_toml(Path::new("weir.toml"), toml).unwrap();
        let store = Arc::new(Sick::default());
        let metrics = Metrics::new().unwrap();
        let services = Services::new(store.clone(), &metrics).unwrap();
        let gw = Arc::new(Gateway::new(
            Snapshot::build(config, &services).unwrap(),
            metrics,
        ));
        assert_eq!(get(&gw, "/readyz").await.0, StatusCode::OK);
        assert!(
            get(&gw, "/metrics")
                .await
                .1
                .contains("weir_state_healthy 1")
        );

        *store.failure.lock().unwrap() = Some("state store failing: disk full".into());
        let (status, body) = get(&gw, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"status": "not ready", "reason": "state store failing: disk full"})
        );
        let metrics = get(&gw, "/metrics").await.1;
        assert!(metrics.contains("weir_state_healthy 0"), "{metrics}");
        assert!(
            metrics.contains("weir_state_write_errors_total"),
            "{metrics}"
        );

        *store.failure.lock().unwrap() = None;
        assert_eq!(get(&gw, "/readyz").await.0, StatusCode::OK);
    }
}
