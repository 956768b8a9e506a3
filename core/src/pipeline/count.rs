//! `POST /v1/messages/count_tokens`: how many input tokens a Messages request would use.
//!
//! The request is admitted like a chat request (the plugins' `on-request` hooks run, so
//! authentication applies) and its model resolves through the same targets. The first
//! target answers: an Anthropic upstream's own `/v1/messages/count_tokens` (the client's
//! body and `anthropic-*` headers passed through), Gemini's `models/{m}:countTokens`, and
//! for every other provider an estimate from a real tokenizer ([`crate::tokens`]) marked by
//! the response header [`ESTIMATE_HEADER`]. A count has no usage, so it is never billed.

use std::sync::Arc;

use axum::response::Response;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use super::upstream::{ClientRequest, Upstream};
use super::{
    Accounting, Gateway, GatewayError, RequestCtx, admit, fail, json_response, with_plugin_headers,
};

/// Response header set to `true` when the count is Weir's estimate, not the provider's.
pub const ESTIMATE_HEADER: &str = "x-weir-token-estimate";

/// Serves a token count (Anthropic dialect: `{"input_tokens": N}`).
pub async fn count_tokens(gw: &Arc<Gateway>, mut ctx: RequestCtx) -> Response {
    let snap = gw.snapshot();
    let dialect = ctx.dialect;
    let client_model = ctx.body.model().to_owned();
    tracing::Span::current().record("model", client_model.as_str());
    let mut acct = Accounting::new(gw, ctx.started, &client_model);
    acct.log.request_id.clone_from(&ctx.request_id);
    acct.log.generation = snap.generation;
    // No price table: a count costs nothing.
    let (_chain, targets) = match admit(&snap, &mut ctx, &mut acct, None) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let crate::request::Body::Chat(req) = &ctx.body else {
        return fail(
            acct,
            GatewayError::Internal("a plugin replaced a chat body with another kind".into()),
            dialect,
        );
    };
    let Some(target) = targets.first() else {
        return fail(
            acct,
            GatewayError::Internal("the model has no targets".into()),
            dialect,
        );
    };
    let up = Upstream {
        clients: &snap.clients,
        retry: snap.config.retry,
        metrics: &gw.metrics,
        stats: &snap.services.target_stats,
    };
    let client = ClientRequest {
        dialect,
        raw: ctx.client_body.as_deref(),
        headers: &ctx.headers,
    };
    let counted = up.count_tokens(req, client, target).await;
    acct.log.target_model = Some(target.model.clone());
    let (tokens, estimate) = match counted {
        Ok(Some(n)) => (n, false),
        Ok(None) => {
            let n = crate::tokens::estimate(req, &target.model);
            tracing::debug!(
                provider = %target.provider.name,
                model = %target.model,
                encoding = crate::tokens::Encoding::for_model(&target.model).as_str(),
                tokens = n,
                "No token counting API; estimated."
            );
            (n, true)
        }
        Err(e) => {
            acct.capture(&mut ctx);
            return with_plugin_headers(fail(acct, e, dialect), &ctx.metadata);
        }
    };
    acct.complete = true;
    acct.capture(&mut ctx);
    let mut resp = json_response(
        StatusCode::OK,
        json!({ "input_tokens": tokens }).to_string(),
    );
    if estimate {
        resp.headers_mut()
            .insert(ESTIMATE_HEADER, HeaderValue::from_static("true"));
    }
    with_plugin_headers(resp, &ctx.metadata)
}
