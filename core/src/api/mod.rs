//! Inbound wire formats: the OpenAI dialect ([`openai`], also Weir's canonical form), the
//! Anthropic Messages dialect ([`anthropic`]), the OpenAI Responses API ([`responses`]), and
//! server-sent events ([`sse`]).

pub mod anthropic;
pub mod open;
pub mod openai;
pub mod responses;
pub mod sse;

/// A client request that is well-formed JSON but not a valid request: becomes a 400 that
/// names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    /// JSON path of the offending field (`messages[2].content`), when known.
    pub field: Option<String>,
    /// What is wrong, for the client.
    pub message: String,
}

impl BadRequest {
    /// A bad request about `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}
