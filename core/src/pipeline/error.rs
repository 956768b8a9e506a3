//! [`GatewayError`]: every way a request can fail, and the one place errors become HTTP.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::api::BadRequest;
use crate::request::Dialect;

/// A request failure. Client-facing messages never contain credentials or internals; the
/// details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but not a valid request.
    #[error("{0}")]
    BadRequest(#[from] BadRequest),
    /// The body exceeds `server.max_body_bytes`.
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The request's `content-type` is not JSON.
    #[error("content-type must be application/json (got {0})")]
    UnsupportedMediaType(String),
    /// The route exists but not for this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The client paused longer than `server.body_read_timeout_secs` while sending the body.
    #[error("timed out reading the request body (no data for {0} s)")]
    BodyTimeout(u64),
    /// The HTTP layer could not parse the request (request line or headers).
    #[error("malformed HTTP request")]
    MalformedRequest,
    /// The request target is longer than the HTTP layer accepts.
    #[error("request URI is too long")]
    UriTooLong,
    /// The request head (headers) is larger than the HTTP layer accepts.
    #[error("request headers are too large")]
    HeadersTooLarge,
    /// No such model in config.
    #[error("model '{0}' does not exist or is not served by this gateway")]
    ModelNotFound(String),
    /// A stored Responses API response that does not exist, expired, or belongs to another
    /// credential: 404 for `GET`/`DELETE /v1/responses/{id}`, 400 (param
    /// `previous_response_id`) when a request continues it.
    #[error("{} with id '{id}' not found", if *previous { "Previous response" } else { "Response" })]
    ResponseNotFound {
        /// The id asked for.
        id: String,
        /// Whether it was named by `previous_response_id`.
        previous: bool,
    },
    /// The chosen provider cannot serve this kind of request.
    #[error("{0}")]
    Unsupported(String),
    /// The upstream answered with an error status that is not retried (or retries ran out).
    #[error("upstream {provider} answered {status}: {message}")]
    UpstreamStatus {
        /// Provider name.
        provider: String,
        /// The upstream's status, passed on to the client.
        status: StatusCode,
        /// The upstream's message.
        message: String,
        /// The upstream's `Retry-After`, passed on to the client.
        retry_after: Option<std::time::Duration>,
    },
    /// The upstream could not be reached or sent something unusable.
    #[error("upstream {provider} failed: {reason}")]
    UpstreamFailed {
        /// Provider name.
        provider: String,
        /// What went wrong.
        reason: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream {provider} timed out ({phase})")]
    UpstreamTimeout {
        /// Provider name.
        provider: String,
        /// `connect`, `first byte` or `total`.
        phase: &'static str,
    },
    /// A plugin with `failure = "closed"` failed.
    #[error("plugin '{plugin}' failed ({kind}) and is configured to fail closed")]
    PluginFailed {
        /// Plugin instance name.
        plugin: String,
        /// Why: `trap`, `timeout`, `oom`, `error`, `unavailable`, `circuit_open`, or
        /// `state_unavailable` (the state store could not be reached).
        kind: &'static str,
    },
    /// A plugin ended a stream (budget exhausted, policy violation).
    #[error("{message}")]
    PluginStopped {
        /// Plugin instance name.
        plugin: String,
        /// The plugin's message for the client.
        message: String,
    },
    /// A plugin of the config could not be loaded (startup and reload only).
    #[error("plugin load failed: {0}")]
    PluginLoad(String),
    /// A bug or resource failure inside the gateway.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The HTTP status for the client.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MalformedJson(_)
            | GatewayError::BadRequest(_)
            | GatewayError::Unsupported(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::MalformedRequest => StatusCode::BAD_REQUEST,
            GatewayError::UriTooLong => StatusCode::URI_TOO_LONG,
            GatewayError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::ResponseNotFound { previous: true, .. } => StatusCode::BAD_REQUEST,
            GatewayError::ResponseNotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::UpstreamStatus { status, .. } => *status,
            GatewayError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::PluginFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::PluginStopped { .. } => StatusCode::FORBIDDEN,
            GatewayError::Internal(_) | GatewayError::PluginLoad(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A short, stable reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::MalformedJson(_) => "malformed_json",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::PayloadTooLarge(_) => "payload_too_large",
            GatewayError::UnsupportedMediaType(_) => "unsupported_media_type",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::BodyTimeout(_) => "body_timeout",
            GatewayError::MalformedRequest => "malformed_request",
            GatewayError::UriTooLong => "uri_too_long",
            GatewayError::HeadersTooLarge => "headers_too_large",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::ResponseNotFound { previous: true, .. } => "previous_response_not_found",
            GatewayError::ResponseNotFound { .. } => "response_not_found",
            GatewayError::Unsupported(_) => "unsupported",
            GatewayError::UpstreamStatus { .. } => "upstream_status",
            GatewayError::UpstreamFailed { .. } => "upstream_failed",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::PluginFailed { .. } => "plugin_failed",
            GatewayError::PluginStopped { .. } => "plugin_stopped",
            GatewayError::PluginLoad(_) => "plugin_load",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// The OpenAI `error.type` for this error.
    fn openai_type(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The client-facing message. Upstream messages are passed on (they describe the
    /// client's request); internal details are not.
    pub fn client_message(&self) -> String {
        match self {
            GatewayError::Internal(_) | GatewayError::PluginLoad(_) => {
                "internal error; see the gateway log for the request id".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The error body in the client's dialect.
    pub fn body(&self, dialect: Dialect) -> serde_json::Value {
        let message = self.client_message();
        match dialect {
            Dialect::OpenAi | Dialect::Responses => {
                let param = match self {
                    GatewayError::BadRequest(b) => b.field.clone(),
                    GatewayError::ResponseNotFound { previous: true, .. } => {
                        Some("previous_response_id".to_owned())
                    }
                    _ => None,
                };
                let code = match self {
                    GatewayError::ModelNotFound(_) => Some("model_not_found"),
                    GatewayError::ResponseNotFound { previous: true, .. } => {
                        Some("previous_response_not_found")
                    }
                    GatewayError::PayloadTooLarge(_) => Some("payload_too_large"),
                    GatewayError::UnsupportedMediaType(_)
                    | GatewayError::MethodNotAllowed { .. }
                    | GatewayError::BodyTimeout(_)
                    | GatewayError::MalformedRequest
                    | GatewayError::UriTooLong
                    | GatewayError::HeadersTooLarge => Some(self.reason()),
                    GatewayError::UpstreamTimeout { .. } => Some("upstream_timeout"),
                    GatewayError::PluginFailed { .. } => Some("plugin_failed"),
                    GatewayError::PluginStopped { .. } => Some("stopped_by_policy"),
                    _ => None,
                };
                json!({"error": {"message": message, "type": self.openai_type(), "param": param, "code": code}})
            }
            Dialect::Anthropic => crate::api::anthropic::error_body(self.status(), &message),
        }
    }

    /// The `retry-after` for the client: the upstream's, else 1 s on a 429.
    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            GatewayError::UpstreamStatus {
                retry_after: Some(d),
                ..
            } => Some(*d),
            _ if self.status() == StatusCode::TOO_MANY_REQUESTS => {
                Some(std::time::Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// The full HTTP response in the client's dialect.
    pub fn into_response_for(self, dialect: Dialect) -> Response {
        let status = self.status();
        let body = self.body(dialect);
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(d) = self.retry_after() {
            // Whole seconds, rounded up: a client must not come back early.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.closes_connection() {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Whether the connection cannot carry another request after this error: the rest of
    /// the request was never read, so the next bytes on the wire are not a request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::BodyTimeout(_)
                | GatewayError::MalformedRequest
                | GatewayError::UriTooLong
                | GatewayError::HeadersTooLarge
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_request_names_the_field() {
        let e = GatewayError::BadRequest(BadRequest::field(
            "messages[0].role",
            "missing field `role`",
        ));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = e.body(Dialect::OpenAi);
        assert_eq!(body["error"]["param"], "messages[0].role");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn retry_after_is_the_upstreams_rounded_up_else_one_second_on_a_429() {
        let limited = |retry_after| GatewayError::UpstreamStatus {
            provider: "p".into(),
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "slow down".into(),
            retry_after,
        };
        let header = |e: GatewayError| {
            e.into_response_for(Dialect::OpenAi)
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap_or_default().to_owned())
        };
        assert_eq!(
            header(limited(Some(std::time::Duration::from_millis(2_100)))).as_deref(),
            Some("3")
        );
        assert_eq!(
            header(limited(Some(std::time::Duration::from_secs(30)))).as_deref(),
            Some("30")
        );
        assert_eq!(header(limited(None)).as_deref(), Some("1"));
        assert_eq!(header(GatewayError::Internal("x".into())), None);
    }

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let e = GatewayError::Internal("secret path /etc/x".into());
        assert!(!e.body(Dialect::OpenAi).to_string().contains("/etc/x"));
    }
}
