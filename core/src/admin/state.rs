//! `GET /admin/state/export`: the gateway's live state store as an export
//! ([`crate::state::migrate`]), streamed as JSON Lines. `weir state export --admin` calls it;
//! it is how to export a sled store while its gateway runs (sled admits one process).
//!
//! Query: `namespaces=a,b` (only these; default every namespace but the request log) and
//! `keep_reserved=true` (keep ledger reservations; default 0). Entries are read a page at a
//! time on a blocking thread while the response streams; a failure after the first byte
//! ends the stream with an `{"error":...}` line instead of the closing line, which
//! `weir state import` refuses.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AdminState, error};
use crate::state::migrate::{self, Export, ExportOptions, MigrateError};

/// Chunks (pages of entries) buffered between the reading thread and the response.
const BUFFERED_CHUNKS: usize = 4;

/// `GET /admin/state/export` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportQuery {
    /// Comma-separated namespaces; default: all but the request log.
    namespaces: Option<String>,
    /// Keep ledger reservations instead of exporting them as 0.
    #[serde(default)]
    keep_reserved: bool,
}

pub(super) async fn export(
    State(state): State<AdminState>,
    Query(q): Query<ExportQuery>,
) -> Response {
    let opts = ExportOptions {
        namespaces: q
            .namespaces
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        keep_reserved: q.keep_reserved,
    };
    let store = state.reloader.store().clone();
    let backend = state
        .reloader
        .gateway()
        .snapshot()
        .config
        .file
        .state
        .backend;
    // Listing the namespaces reads the store: a store that cannot be read fails here, with
    // a status, before the stream starts.
    let started = tokio::task::spawn_blocking(move || Export::new(store, backend, &opts)).await;
    let export = match started {
        Ok(Ok(export)) => export,
        Ok(Err(e)) => return store_error(&e),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("export task failed: {e}"),
            );
        }
    };
    tracing::info!(
        namespaces = export.namespaces().count(),
        "State export started."
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BUFFERED_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut export = export;
        for chunk in export.by_ref() {
            let (bytes, failed) = match chunk {
                Ok(chunk) => (Bytes::from(chunk), false),
                Err(e) => {
                    tracing::warn!(error = %e, "State export failed.");
                    (Bytes::from(migrate::error_line(&e)), true)
                }
            };
            // The client hung up: stop reading the store.
            if tx.blocking_send(bytes).is_err() || failed {
                return;
            }
        }
        tracing::info!(entries = export.entries(), "State export done.");
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

fn store_error(e: &MigrateError) -> Response {
    let status = match e {
        MigrateError::State(crate::state::StateError::Unavailable(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}
