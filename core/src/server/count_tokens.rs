//! `POST /v1/messages/count_tokens`: the Anthropic token-counting endpoint (see
//! [`crate::pipeline::count`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::Response;
use tracing::Instrument;

use super::{new_ctx, parse_json, prologue, reject, span_for, validate_chat, with_request_id};
use crate::pipeline::{self, Dialect, Gateway, GatewayError};
use crate::request::Body as CtxBody;

/// Parses an Anthropic Messages body (`max_tokens` not needed) and counts its input tokens.
pub(super) async fn count_tokens(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let (id, headers, bytes) = match prologue(&gw, req, Dialect::Anthropic).await {
        Ok(v) => v,
        Err((_, resp)) => return resp,
    };
    let span = span_for(&id, "count_tokens", Dialect::Anthropic);
    let resp = async {
        let parsed = parse_json::<crate::api::anthropic::MessagesRequest>(&bytes)
            .and_then(|m| crate::api::anthropic::to_chat_request(m).map_err(GatewayError::from));
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
            Some(bytes.clone()),
        );
        pipeline::count_tokens(&gw, ctx).await
    }
    .instrument(span)
    .await;
    with_request_id(resp, &id)
}
