//! Test helpers, all in one place: [`TestGateway`] runs the real binary, [`MockUpstream`]
//! plays the providers, [`ConfigBuilder`] writes configs, [`Client`] talks to the gateway.

pub mod client;
pub mod config;
pub mod dialect;
pub mod gateway;
pub mod raw;
pub mod upstream;

use std::future::Future;
use std::time::Duration;

pub use client::Resp;
pub use config::{ConfigBuilder, Timeouts};
pub use gateway::TestGateway;
pub use raw::RawConn;
pub use upstream::{Frame, MockUpstream, Recorded, Reply};

/// The bound on one whole test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs a test body, failing it if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

/// A chat request body with one user message.
pub fn chat_body(model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// The OpenAI tool definitions matching [`dialect::TWO_CALLS`].
pub fn openai_tools() -> serde_json::Value {
    serde_json::json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Current time in a timezone.",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
        }}
    ])
}

/// The Anthropic tool definitions matching [`dialect::TWO_CALLS`].
pub fn anthropic_tools() -> serde_json::Value {
    serde_json::json!([
        {"name": "get_weather", "description": "Current weather for a city.",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}},
        {"name": "get_time", "description": "Current time in a timezone.",
         "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}
    ])
}

/// Asserts an OpenAI-shaped error body and returns its `error` object.
pub fn openai_error(resp: &Resp, status: u16) -> serde_json::Value {
    assert_eq!(
        resp.status, status,
        "expected status {status}; body: {}",
        resp.text
    );
    let v = resp.json();
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object in {v}"))
        .clone();
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message must be a non-empty string: {v}"
    );
    assert!(err["type"].is_string(), "error.type must be a string: {v}");
    assert!(
        err.get("param").is_some(),
        "error.param must be present (may be null): {v}"
    );
    assert!(
        err.get("code").is_some(),
        "error.code must be present (may be null): {v}"
    );
    err
}

/// Asserts an Anthropic-shaped error body and returns its `error` object.
pub fn anthropic_error(resp: &Resp, status: u16) -> serde_json::Value {
    assert_eq!(
        resp.status, status,
        "expected status {status}; body: {}",
        resp.text
    );
    let v = resp.json();
    assert_eq!(
        v["type"], "error",
        "Anthropic errors have type \"error\": {v}"
    );
    let err = v["error"].clone();
    assert!(
        err["type"].as_str().is_some_and(|t| !t.is_empty()),
        "error.type must be a string: {v}"
    );
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message must be a string: {v}"
    );
    err
}
