//! The admin API: status, reload, rollback, generations, plugin counters and the request
//! log, on a listener of its own (default `127.0.0.1:8081`), driven by the `weir` CLI
//! ([`cli`]).
//!
//! Every call needs `Authorization: Bearer <token>`, checked in constant time against
//! `[admin] token` of the serving config (so a reload rotates it). Without a token the admin
//! API does not start at all, on loopback or elsewhere: a local process is not necessarily a
//! trusted one.
//!
//! | call | does |
//! | --- | --- |
//! | `GET /admin/status` | generation, config path, models, plugins, last reload error, uptime |
//! | `POST /admin/reload` | reload now (same as a file change or `SIGHUP`) |
//! | `POST /admin/rollback/{generation}` | serve a kept generation again (a new generation) |
//! | `GET /admin/generations?limit=N` | recorded generations, newest first |
//! | `GET /admin/plugins` | plugin failure and shadow-decision counters |
//! | `GET /admin/logs?limit=N&after=SEQ` | request-log records; `&follow=true` streams them (SSE) |
//! | `* /admin/plugins/{instance}/{path}` | the plugin instance's own admin endpoint (hook `admin`) |

pub mod auth;
pub mod cli;
pub mod keys;
pub mod usage;

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub use auth::AdminToken;

use crate::reload::{Outcome, ReloadError, Reloader, Trigger};
use crate::requestlog::{Record, RequestLog};

/// Records returned by `GET /admin/logs` when no `limit` is given.
const DEFAULT_LOG_LIMIT: usize = 100;
/// Largest `limit` accepted by `GET /admin/logs`.
const MAX_LOG_LIMIT: usize = 10_000;

/// What the admin handlers share.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Reloads, rollbacks, generations; also reaches the gateway.
    pub reloader: Arc<Reloader>,
    /// The request log, when it is on.
    pub log: Option<Arc<RequestLog>>,
}

/// Builds the admin router. Tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/reload", post(reload))
        .route("/admin/rollback/{generation}", post(rollback))
        .route("/admin/generations", get(generations))
        .route("/admin/plugins", get(plugins))
        .route("/admin/logs", get(logs))
        .route(
            "/admin/plugins/{instance}/{*path}",
            axum::routing::any(plugin_admin),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Serves the admin API on `listener` until the process ends.
pub fn spawn(listener: tokio::net::TcpListener, state: AdminState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "Admin listener failed.");
        }
    })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message.into(), "code": status.as_u16()}})),
    )
        .into_response()
}

/// Rejects every call without the right bearer token (401), before any handler runs.
async fn authenticate(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let token = state
        .reloader
        .gateway()
        .snapshot()
        .config
        .admin
        .token
        .clone();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    let ok = match (&token, presented) {
        (Some(token), Some(presented)) => token.verify(presented),
        _ => false,
    };
    if ok {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), presented = presented.is_some(), "Admin call rejected: bad or missing token.");
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token (Authorization: Bearer <token>)",
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"weir-admin\""),
    );
    resp
}

async fn status(State(state): State<AdminState>) -> Response {
    let r = &state.reloader;
    let snap = r.gateway().snapshot();
    let current = r.current();
    let providers: BTreeMap<&str, &str> = snap
        .config
        .providers
        .iter()
        .map(|(name, p)| (name.as_str(), p.kind.as_str()))
        .collect();
    let models: Vec<Value> = snap
        .config
        .model_order
        .iter()
        .filter_map(|name| snap.config.models.get(name))
        .map(|m| {
            let targets: Vec<Value> = m
                .targets
                .iter()
                .map(|t| json!({"provider": t.provider.name, "model": t.model}))
                .collect();
            json!({"name": m.name, "targets": targets})
        })
        .collect();
    let request_log = match &state.log {
        Some(log) => json!({"enabled": true, "last_seq": log.last_seq(), "dropped": log.dropped()}),
        None => json!({"enabled": false}),
    };
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": current.generation,
        "generation_time_ms": current.time_ms,
        "trigger": current.trigger,
        "rollback_of": current.rollback_of,
        "serving_snapshot_of": snap.generation,
        "config_path": r.config_path().display().to_string(),
        "config_hash": current.hash,
        "uptime_secs": r.uptime().as_secs(),
        "models": models,
        "providers": providers,
        "plugins": plugin_counters(&r.gateway().metrics.registry),
        "reload": r.stats(),
        "kept_generations": r.kept().await,
        "request_log": request_log,
    }))
    .into_response()
}

async fn reload(State(state): State<AdminState>) -> Response {
    outcome_response(state.reloader.reload(Trigger::Admin).await)
}

fn outcome_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Success(g) => {
            axum::Json(json!({"outcome": "success", "generation": g})).into_response()
        }
        Outcome::Unchanged(g) => {
            axum::Json(json!({"outcome": "unchanged", "generation": g})).into_response()
        }
        Outcome::Failure(f) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"outcome": "failure", "error": f})),
        )
            .into_response(),
    }
}

async fn rollback(State(state): State<AdminState>, Path(generation): Path<String>) -> Response {
    let Ok(generation) = generation.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("'{generation}' is not a generation number"),
        );
    };
    match state.reloader.rollback(generation).await {
        Ok(Outcome::Success(g)) => {
            axum::Json(json!({"outcome": "success", "generation": g, "rollback_of": generation}))
                .into_response()
        }
        Ok(other) => outcome_response(other),
        Err(e @ ReloadError::NotKept { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `?limit=N`.
#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn generations(State(state): State<AdminState>, Query(q): Query<Limit>) -> Response {
    let limit = q.limit.unwrap_or(50).min(1_000);
    let r = state.reloader.clone();
    let kept = r.kept().await;
    let current = r.current().generation;
    match tokio::task::spawn_blocking(move || r.history(limit)).await {
        Ok(Ok(records)) => {
            axum::Json(json!({"current": current, "kept": kept, "generations": records}))
                .into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn plugins(State(state): State<AdminState>) -> Response {
    let snapshot = state.reloader.gateway().snapshot();
    let instances: Vec<Value> = snapshot
        .plugins
        .instances()
        .into_iter()
        .map(|i| {
            let m = i.manifest();
            json!({
                "name": i.name(),
                "plugin": m.name,
                "version": m.version,
                "hooks": m.hooks.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                "admin": m.hooks.admin,
            })
        })
        .collect();
    axum::Json(json!({
        "plugins": plugin_counters(&state.reloader.gateway().metrics.registry),
        "instances": instances,
    }))
    .into_response()
}

/// Per-plugin counters read from the Prometheus registry: failures by kind
/// (`weir_plugin_failures_total{plugin,kind}`) and shadow decisions
/// (`weir_shadow_decisions_total{plugin,decision}`). Empty until plugins register them.
pub fn plugin_counters(registry: &prometheus::Registry) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for family in registry.gather() {
        let (field, label) = match family.name() {
            "weir_plugin_failures_total" => ("failures", "kind"),
            "weir_shadow_decisions_total" => ("shadow_decisions", "decision"),
            _ => continue,
        };
        for metric in family.get_metric() {
            let labels: BTreeMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let Some(plugin) = labels.get("plugin") else {
                continue;
            };
            let what = labels.get(label).copied().unwrap_or("other");
            let entry = out
                .entry((*plugin).to_owned())
                .or_insert_with(|| json!({"failures": {}, "shadow_decisions": {}}));
            entry[field][what] = json!(metric.get_counter().get_value() as u64);
        }
    }
    out
}

/// `GET /admin/logs` parameters.
#[derive(Debug, Deserialize)]
struct LogsQuery {
    /// At most this many records (default 100, at most 10,000).
    limit: Option<usize>,
    /// Only records after this sequence number, oldest first; default: the newest `limit`.
    after: Option<u64>,
    /// Keep the response open and send new records as server-sent events.
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(state): State<AdminState>,
    Query(q): Query<LogsQuery>,
    headers: http::HeaderMap,
) -> Response {
    let Some(log) = state.log.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "the request log is off ([admin] request_log_max_records = 0)",
        );
    };
    let limit = q.limit.unwrap_or(DEFAULT_LOG_LIMIT).min(MAX_LOG_LIMIT);
    // An SSE client reconnecting sends the last id it saw.
    let after = q.after.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    });
    // Subscribe before reading the backlog, so nothing falls between the two.
    let live = q.follow.then(|| log.subscribe());
    let reader = log.clone();
    let backlog = match tokio::task::spawn_blocking(move || reader.query(after, limit)).await {
        Ok(Ok(records)) => records,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Some(live) = live else {
        return axum::Json(json!({"last_seq": log.last_seq(), "records": backlog})).into_response();
    };
    let last_sent = backlog
        .last()
        .map(|r| r.seq)
        .or(after)
        .unwrap_or_else(|| log.last_seq());
    let follow = Follow {
        log,
        live,
        pending: backlog.into(),
        last_sent,
    };
    let events = futures::stream::unfold(follow, |mut f| async move {
        let record = f.next().await?;
        let event = Event::default()
            .id(record.seq.to_string())
            .json_data(&*record)
            .unwrap_or_else(|_| Event::default());
        Some((Ok::<_, Infallible>(event), f))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A follower of the request log: the backlog first, then live records, catching up from
/// the store when it falls behind.
struct Follow {
    log: Arc<RequestLog>,
    live: broadcast::Receiver<Arc<Record>>,
    pending: VecDeque<Record>,
    last_sent: u64,
}

impl Follow {
    async fn next(&mut self) -> Option<Arc<Record>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                self.last_sent = r.seq;
                return Some(Arc::new(r));
            }
            match self.live.recv().await {
                // Records already sent with the backlog come again live: skip them.
                Ok(r) if r.seq <= self.last_sent => continue,
                Ok(r) => {
                    self.last_sent = r.seq;
                    return Some(r);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let log = self.log.clone();
                    let after = self.last_sent;
                    let caught =
                        tokio::task::spawn_blocking(move || log.query(Some(after), MAX_LOG_LIMIT))
                            .await;
                    if let Ok(Ok(records)) = caught {
                        self.pending.extend(records);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Largest body handed to a plugin's admin endpoint.
const MAX_PLUGIN_ADMIN_BODY: usize = 1 << 20;

/// `/admin/plugins/{instance}/{path}`: the call goes to the serving generation's instance
/// of that name (its `admin` export or Lua function), on a blocking thread; the plugin's
/// answer is sent as JSON.
async fn plugin_admin(
    State(state): State<AdminState>,
    Path((instance, path)): Path<(String, String)>,
    req: Request,
) -> Response {
    let snapshot = state.reloader.gateway().snapshot();
    let Some(inst) = snapshot.plugins.instance(&instance).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin instance named '{instance}' in the serving config"),
        );
    };
    if !inst.manifest().hooks.admin {
        return error(
            StatusCode::NOT_FOUND,
            format!("plugin '{instance}' has no admin endpoint"),
        );
    }
    let method = req.method().as_str().to_owned();
    let writes = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = match axum::body::to_bytes(req.into_body(), MAX_PLUGIN_ADMIN_BODY).await {
        Ok(b) => b.to_vec(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("admin request bodies are limited to {MAX_PLUGIN_ADMIN_BODY} bytes"),
            );
        }
    };
    let call = crate::plugin::contract::AdminRequest {
        method,
        path: format!("/{path}"),
        query,
        body,
    };
    let store = snapshot.services.state.clone();
    let answer = tokio::task::spawn_blocking(move || {
        inst.admin(&call).map(|r| {
            // A change is done once it is on disk: the state store writes behind, so a call
            // that may have written (not GET) and succeeded flushes it, and a flush that
            // fails (a full disk) turns the answer into an error, so `weir keys create`
            // never hands out a key a restart would forget.
            let saved = if writes && (200..300).contains(&r.status) {
                store.flush()
            } else {
                Ok(())
            };
            (r, saved)
        })
    })
    .await;
    match answer {
        Ok(Ok((_, Err(e)))) => {
            tracing::error!(plugin = %instance, error = %e, "Plugin admin change not saved.");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "plugin '{instance}': the change was not saved ({e}); it stays in memory and is saved once the state store recovers, but a restart before then loses it"
                ),
            )
        }
        Ok(Ok((r, Ok(())))) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                r.body,
            )
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(plugin = %instance, error = %e, "Plugin admin call failed.");
            error(
                StatusCode::BAD_GATEWAY,
                format!("plugin '{instance}' admin call failed: {e}"),
            )
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("plugin admin task failed: {e}"),
        ),
    }
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no admin route for {} {}", req.method(), req.uri().path()),
    )
}
