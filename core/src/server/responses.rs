//! Handlers of the OpenAI Responses API: `POST /v1/responses` (served by the chat pipeline,
//! see [`crate::api::responses`]), `GET` and `DELETE /v1/responses/{id}` (stored responses,
//! see [`crate::pipeline::responses`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use serde_json::json;
use tracing::Instrument;

use super::{new_ctx, parse_json, prologue, reject, span_for, validate_chat, with_request_id};
use crate::api::responses::{ResponsesRequest, new_id, to_chat_request};
use crate::pipeline::responses::{self as stored, ResponsesCall};
use crate::pipeline::{self, Dialect, Gateway, GatewayError};
use crate::request::Body as CtxBody;

/// `POST /v1/responses`.
pub(super) async fn create(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let (id, headers, bytes) = match prologue(&gw, req, Dialect::Responses).await {
        Ok(v) => v,
        Err((_, resp)) => return resp,
    };
    let span = span_for(&id, "responses", Dialect::Responses);
    let resp = async {
        let call = match translate(&gw, &headers, &bytes) {
            Ok(v) => v,
            Err(e) => return reject(&gw, e, Dialect::Responses, "unknown"),
        };
        let (chat, call) = call;
        tracing::debug!(response_id = %call.id, stored = call.store_for.is_some(), "Responses request translated.");
        let ctx = new_ctx(
            &id,
            Dialect::Responses,
            started,
            headers,
            CtxBody::Chat(chat),
            None,
        );
        pipeline::responses(&gw, ctx, call).await
    }
    .instrument(span)
    .await;
    with_request_id(resp, &id)
}

/// Parses the body, loads the `previous_response_id` conversation, and translates.
fn translate(
    gw: &Gateway,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<(crate::api::openai::ChatRequest, ResponsesCall), GatewayError> {
    let req = parse_json::<ResponsesRequest>(bytes)?;
    let snap = gw.snapshot();
    let state = snap.services.state.as_ref();
    let scope = stored::scope(headers);
    let history = match &req.previous_response_id {
        Some(prev) => stored::load(state, prev, &scope, true)?.conversation,
        None => Vec::new(),
    };
    let store_for = req.store().then_some(snap.config.responses_ttl);
    let t = to_chat_request(req, history)?;
    validate_chat(&t.chat)?;
    let call = ResponsesCall {
        id: new_id("resp"),
        echo: t.echo,
        conversation: t.conversation,
        scope,
        store_for,
    };
    Ok((t.chat, call))
}

/// `GET /v1/responses/{id}`: a stored response of this credential.
pub(super) async fn get(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let snap = gw.snapshot();
    let scope = stored::scope(&headers);
    match stored::load(snap.services.state.as_ref(), &id, &scope, false) {
        Ok(s) => pipeline::json_response(StatusCode::OK, s.response.to_string()),
        Err(e) => e.into_response_for(Dialect::Responses),
    }
}

/// `DELETE /v1/responses/{id}`: forgets a stored response of this credential.
pub(super) async fn delete(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let snap = gw.snapshot();
    let scope = stored::scope(&headers);
    match stored::delete(snap.services.state.as_ref(), &id, &scope) {
        Ok(()) => {
            let body = json!({"id": id, "object": "response.deleted", "deleted": true});
            pipeline::json_response(StatusCode::OK, body.to_string())
        }
        Err(e) => e.into_response_for(Dialect::Responses),
    }
}
