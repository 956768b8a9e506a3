//! Anthropic clients through Weir without losing anything (issue 12): to an Anthropic
//! upstream the client's body and `anthropic-*` headers go through as sent (only the model
//! replaced, `system` messages folded into `system`), and the upstream's answer and events
//! come back as sent, thinking, citations and cache usage included. Also: `system` messages
//! inside `messages` to an OpenAI upstream, the required `max_tokens`, Anthropic-shaped 404s
//! under `/v1/messages/`, and `POST /v1/messages/count_tokens` (passed through, or a
//! tokenizer estimate).

use serde_json::{Value, json};

use crate::support::client::named_events;
use crate::support::dialect::openai;
use crate::support::upstream::{Frame, Reply};
use crate::support::{ConfigBuilder, MockUpstream, TestGateway, bounded};

const KEY: &str = "sk-ant-e2e";

const BETAS: [&str; 2] = [
    "context-management-2025-06-27",
    "interleaved-thinking-2025-05-14",
];

async fn anthropic_gateway(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .anthropic("claude", &up.url(""), KEY, None)
        .model("c", &[("claude", "claude-up")]);
    TestGateway::start(&cfg.build()).await
}

async fn openai_gateway(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .openai("oai", &up.url("/v1"), "sk-e2e", None)
        .model("c", &[("oai", "gpt-4o")]);
    TestGateway::start(&cfg.build()).await
}

fn headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", BETAS[0]),
        ("anthropic-beta", BETAS[1]),
        ("x-api-key", "client-key"),
    ]
}

/// What Claude Code sends, trimmed: thinking, context management, output config, cache
/// control, metadata, a server tool, earlier thinking and server tool blocks, citations,
/// and a system message last inside `messages`.
fn claude_code_request(stream: bool) -> Value {
    json!({
        "model": "c",
        "max_tokens": 32000,
        "stream": stream,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc"},
        "system": [{"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
            {"name": "Read", "description": "Reads a file",
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
             "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "search the news",
                                           "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Let me search.", "signature": "sig-1"},
                {"type": "redacted_thinking", "data": "opaque-bytes"},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                 "input": {"query": "news"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                 "content": [{"type": "web_search_result", "url": "https://example.com",
                              "title": "Example", "encrypted_content": "enc"}]},
                {"type": "text", "text": "Found it.",
                 "citations": [{"type": "web_search_result_location",
                                "url": "https://example.com", "cited_text": "x"}]}
            ]},
            {"role": "user", "content": "and now?"},
            {"role": "system", "content": "Answer briefly."}
        ],
    })
}

/// The upstream's answer: thinking, text with citations, cache usage.
fn thinking_message() -> Value {
    json!({
        "id": "msg_up_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [
            {"type": "thinking", "thinking": "The user wants more.", "signature": "sig-2"},
            {"type": "text", "text": "Nothing new.",
             "citations": [{"type": "web_search_result_location",
                            "url": "https://example.com", "cited_text": "y"}]}
        ],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "context_management": {"applied_edits": []},
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 100,
                  "cache_read_input_tokens": 200, "output_tokens": 7},
    })
}

fn thinking_stream() -> Reply {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_up_2", "type": "message",
            "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": 10,
            "cache_creation_input_tokens": 100, "cache_read_input_tokens": 200,
            "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Hmm, "}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "let me think."}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "signature_delta", "signature": "sig-3"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "text_delta", "text": "Done."}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn",
            "stop_sequence": null}, "usage": {"output_tokens": 9}}),
        json!({"type": "message_stop"}),
    ];
    let mut frames: Vec<Frame> = Vec::new();
    for e in &events {
        let name = e["type"].as_str().unwrap().to_owned();
        frames.push(Frame::event(&name, e));
        if name == "message_start" {
            frames.push(Frame::event("ping", &json!({"type": "ping"})));
        }
    }
    Reply::Sse(frames)
}

/// The client body as the upstream must see it: the model replaced and the system message
/// from `messages` appended to `system`, everything else as sent.
fn expected_upstream_body(stream: bool) -> Value {
    let mut b = claude_code_request(stream);
    b["model"] = json!("claude-up");
    let msgs = b["messages"].as_array_mut().unwrap();
    msgs.pop();
    b["system"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "text", "text": "Answer briefly."}));
    b
}

fn assert_forwarded(sent: &crate::support::Recorded, stream: bool) {
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(
        sent.header("x-api-key"),
        KEY,
        "the provider's key, not the client's"
    );
    assert_eq!(sent.header("anthropic-version"), "2023-06-01");
    let betas: Vec<&str> = sent
        .headers
        .get_all("anthropic-beta")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(betas, BETAS, "every anthropic-beta value forwarded");
    assert_eq!(sent.body, expected_upstream_body(stream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_to_anthropic_keeps_every_field_and_block() {
    bounded(async {
        let up = MockUpstream::always(Reply::json(thinking_message())).await;
        let gw = anthropic_gateway(&up).await;
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages?beta=true",
                &claude_code_request(false),
                &headers(),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            resp.json(),
            thinking_message(),
            "the answer comes back as sent"
        );
        assert_forwarded(&up.single_request(), false);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_to_anthropic_stream_keeps_thinking_deltas() {
    bounded(async {
        let up = MockUpstream::always(thinking_stream()).await;
        let gw = anthropic_gateway(&up).await;
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages?beta=true",
                &claude_code_request(true),
                &headers(),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let events = named_events(&resp.text);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        let deltas: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| &v["delta"])
            .collect();
        assert_eq!(deltas[0]["type"], "thinking_delta");
        assert_eq!(
            deltas[2],
            &json!({"type": "signature_delta", "signature": "sig-3"})
        );
        let usage = &events[0].1["message"]["usage"];
        assert_eq!(usage["cache_creation_input_tokens"], 100);
        assert_eq!(usage["cache_read_input_tokens"], 200);
        assert_eq!(names.iter().filter(|n| **n == "ping").count(), 1);
        assert_forwarded(&up.single_request(), true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_request_reaches_an_openai_upstream_with_system_in_place() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = openai_gateway(&up).await;
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages?beta=true",
                &claude_code_request(true),
                &headers(),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let events = named_events(&resp.text);
        assert_eq!(events.last().unwrap().0, "message_stop");
        let text: String = events
            .iter()
            .filter_map(|(_, v)| v["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "Echo: and now?");

        let sent = up.single_request();
        assert_eq!(sent.path, "/v1/chat/completions");
        let b = &sent.body;
        let msgs = b["messages"].as_array().unwrap();
        let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "user", "system"],
            "{b}"
        );
        assert_eq!(openai::content_text(&msgs[4]["content"]), "Answer briefly.");
        for field in ["context_management", "output_config", "thinking"] {
            assert!(b.get(field).is_none(), "{field} is Anthropic-only: {b}");
        }
        let tools = b["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 1, "the server tool is dropped: {b}");
        assert_eq!(tools[0]["function"]["name"], "Read");
        assert!(sent.header("anthropic-beta").is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_budget_maps_to_reasoning_effort() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = openai_gateway(&up).await;
        let body = json!({"model": "c", "max_tokens": 64,
            "thinking": {"type": "enabled", "budget_tokens": 20000},
            "messages": [{"role": "user", "content": "think hard"}]});
        let resp = gw.client.post_json("/v1/messages", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(up.single_request().body["reasoning_effort"], "high");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_max_tokens_is_an_anthropic_400() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = anthropic_gateway(&up).await;
        let body = json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]});
        let resp = gw.client.post_json("/v1/messages", &body).await;
        assert_eq!(resp.status, 400, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_tokens"),
            "{v}"
        );
        assert_eq!(up.hits(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_under_messages_are_anthropic_404s() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = anthropic_gateway(&up).await;
        let resp = gw.client.post_json("/v1/messages/nope", &json!({})).await;
        assert_eq!(resp.status, 404, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        let resp = gw.client.get("/v1/messages/count_tokens").await;
        assert_eq!(resp.status, 405, "{}", resp.text);
        assert_eq!(resp.json()["type"], "error");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_passes_through_to_anthropic() {
    bounded(async {
        let up = MockUpstream::always(Reply::json(json!({"input_tokens": 42}))).await;
        let gw = anthropic_gateway(&up).await;
        let body = json!({"model": "c", "thinking": {"type": "enabled", "budget_tokens": 2048},
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "count me"}]});
        let resp = gw
            .client
            .post_json_with("/v1/messages/count_tokens", &body, &headers())
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.json(), json!({"input_tokens": 42}));
        assert!(resp.header("x-weir-token-estimate").is_empty());
        let sent = up.single_request();
        assert_eq!(sent.path, "/v1/messages/count_tokens");
        assert_eq!(sent.header("x-api-key"), KEY);
        assert_eq!(sent.header("anthropic-version"), "2023-06-01");
        let mut expected = body.clone();
        expected["model"] = json!("claude-up");
        assert_eq!(sent.body, expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_is_estimated_for_openai_upstreams() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = openai_gateway(&up).await;
        let body = json!({"model": "c", "messages": [{"role": "user", "content": "hello world"}]});
        let resp = gw
            .client
            .post_json("/v1/messages/count_tokens", &body)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.header("x-weir-token-estimate"), "true");
        // o200k_base: 3 (request) + 3 (message) + 1 ("user") + 2 ("hello world").
        assert_eq!(resp.json(), json!({"input_tokens": 9}));
        assert_eq!(up.hits(), 0, "an estimate never reaches the upstream");

        let unknown = json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]});
        let resp = gw
            .client
            .post_json("/v1/messages/count_tokens", &unknown)
            .await;
        assert_eq!(resp.status, 404, "{}", resp.text);
        assert_eq!(resp.json()["type"], "error");
    })
    .await;
}
