//! The Responses API around the chat pipeline: what a `/v1/responses` request carries
//! through [`super::chat`] ([`ResponsesCall`]) and the stored responses behind
//! `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`.
//!
//! Stored responses live in the state store (namespace [`NAMESPACE`], so on Redis they are
//! shared by every instance), keyed by response id, with a TTL
//! (`[server] responses_ttl_secs`, 30 days by default as OpenAI keeps them). Each records
//! the credential scope that created it: a request with another credential gets 404, as if
//! the id did not exist.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::GatewayError;
use crate::api::openai::ChatMessage;
use crate::api::responses::{Echo, Stored};
use crate::state::StateStore;

/// State-store namespace of stored responses.
pub const NAMESPACE: &str = "weir.responses";

/// What a Responses request needs beyond the chat pipeline: its id, the fields it echoes,
/// and the conversation to store with the answer.
#[derive(Debug, Clone)]
pub struct ResponsesCall {
    /// `resp_...`, chosen before the upstream call (streams announce it first).
    pub id: String,
    /// Echoed request fields.
    pub echo: Echo,
    /// History plus this request's input, without `instructions`.
    pub conversation: Vec<ChatMessage>,
    /// Credential scope (see [`scope`]).
    pub scope: String,
    /// How long a stored response lives; `None` when `store` is false.
    pub store_for: Option<Duration>,
}

impl ResponsesCall {
    /// Stores the finished response with the answer appended to the conversation. A store
    /// failure is logged and costs only the later `previous_response_id`: the client already
    /// has its answer.
    pub fn store(&self, state: &dyn StateStore, response: Value, answer: ChatMessage) {
        let Some(ttl) = self.store_for else {
            return;
        };
        let mut conversation = self.conversation.clone();
        conversation.push(answer);
        let stored = Stored {
            scope: self.scope.clone(),
            response,
            conversation,
        };
        let bytes = match serde_json::to_vec(&stored) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Cannot encode a stored response.");
                return;
            }
        };
        if let Err(e) = state.set(NAMESPACE, &self.id, &bytes, Some(ttl)) {
            tracing::warn!(error = %e, response_id = %self.id, "Could not store the response; previous_response_id will not find it.");
        }
    }
}

/// The credential scope of a request: a hash of its `authorization` or `x-api-key` header
/// (never the secret itself), `anonymous` without one.
pub fn scope(headers: &http::HeaderMap) -> String {
    let credential = headers
        .get(http::header::AUTHORIZATION)
        .or_else(|| headers.get("x-api-key"))
        .map(|v| v.as_bytes());
    match credential {
        None => "anonymous".to_owned(),
        Some(c) => {
            let digest = Sha256::digest(c);
            digest[..16].iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// The stored response `id` if it exists and belongs to `scope`.
pub fn load(
    state: &dyn StateStore,
    id: &str,
    scope: &str,
    previous: bool,
) -> Result<Stored, GatewayError> {
    let not_found = || GatewayError::ResponseNotFound {
        id: id.to_owned(),
        previous,
    };
    let bytes = state
        .get(NAMESPACE, id)
        .map_err(|e| GatewayError::Internal(format!("reading stored response: {e}")))?
        .ok_or_else(not_found)?;
    let stored: Stored = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::Internal(format!("decoding stored response {id}: {e}")))?;
    if stored.scope != scope {
        return Err(not_found());
    }
    Ok(stored)
}

/// Deletes the stored response `id` of `scope`.
pub fn delete(state: &dyn StateStore, id: &str, scope: &str) -> Result<(), GatewayError> {
    load(state, id, scope, false)?;
    state
        .delete(NAMESPACE, id)
        .map_err(|e| GatewayError::Internal(format!("deleting stored response: {e}")))?;
    Ok(())
}
