//! OpenAI inbound to an Anthropic upstream: the request, the answer and the stream are
//! translated both ways, tools included.

use serde_json::{Value, json};

use crate::support::client::{openai_stream, stream_finish_reason, stream_text, stream_tool_calls};
use crate::support::dialect::{TWO_CALLS, anthropic};
use crate::support::{ConfigBuilder, MockUpstream, TestGateway, bounded, openai_tools};

const KEY: &str = "sk-ant-e2e-key";

async fn gateway_for(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .anthropic("claude", &up.url(""), KEY, None)
        .model("c", &[("claude", "claude-up")]);
    TestGateway::start(&cfg.build()).await
}

fn request(stream: bool) -> Value {
    json!({
        "model": "c",
        "stream": stream,
        "max_tokens": 256,
        "temperature": 0.5,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi claude"},
        ],
    })
}

/// Checks the translated request: endpoint, auth headers, system prompt lifted out of the
/// messages, model and limits.
fn assert_anthropic_request(sent: &crate::support::Recorded, stream: bool) {
    assert!(sent.path.ends_with("/v1/messages"), "path {}", sent.path);
    assert_eq!(sent.header("x-api-key"), KEY);
    assert!(
        !sent.header("anthropic-version").is_empty(),
        "anthropic-version header is required"
    );
    assert!(
        sent.header("authorization").is_empty(),
        "Anthropic takes x-api-key, not a bearer token"
    );
    let b = &sent.body;
    assert_eq!(b["model"], "claude-up");
    assert_eq!(b["max_tokens"], 256);
    assert_eq!(b["temperature"], 0.5);
    let system = match &b["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|x| x["text"].as_str()).collect(),
        other => panic!("system prompt must be top-level `system`, got {other}"),
    };
    assert_eq!(system, "You are terse.");
    let msgs = b["messages"].as_array().expect("messages");
    assert!(
        msgs.iter().all(|m| m["role"] != "system"),
        "no system role in Anthropic messages: {b}"
    );
    assert_eq!(anthropic::last_user_text(b), "hi claude");
    assert_eq!(b["stream"].as_bool().unwrap_or(false), stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_anthropic_non_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &request(false))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: hi claude");
        assert_eq!(
            v["choices"][0]["finish_reason"], "stop",
            "end_turn maps to stop"
        );
        assert_eq!(v["usage"]["prompt_tokens"], 11);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 18);
        assert_anthropic_request(&up.single_request(), false);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_anthropic_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let mut body = request(true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(resp.header("content-type").starts_with("text/event-stream"));
        let chunks = openai_stream(&resp.text);
        assert_eq!(stream_text(&chunks), "Echo: hi claude");
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("stop"));
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk"),
            "{chunks:#?}"
        );
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["prompt_tokens"], 11, "usage chunk last: {chunks:#?}");
        assert_eq!(usage["completion_tokens"], 7);
        assert_anthropic_request(&up.single_request(), true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_anthropic_tools_non_streaming() {
    bounded(async {
        let up = MockUpstream::always(anthropic::message_tool_use(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let mut body = request(false);
        body["tools"] = openai_tools();
        body["messages"] = json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_prev", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_prev", "content": "18C"},
            {"role": "user", "content": "and the time?"},
        ]);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().expect("tool_calls").clone();
        assert_eq!(calls.len(), 2, "{v}");
        for (got, want) in calls.iter().zip(TWO_CALLS) {
            assert_eq!(got["id"], want.id);
            assert_eq!(got["type"], "function");
            assert_eq!(got["function"]["name"], want.name);
            let args: Value = serde_json::from_str(got["function"]["arguments"].as_str().expect("arguments")).unwrap();
            assert_eq!(args, serde_json::from_str::<Value>(want.args).unwrap());
        }
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "tool_use maps to tool_calls");

        let sent = up.single_request();
        let tools = sent.body["tools"].as_array().expect("tools");
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0]["name"], "get_weather");
        assert_eq!(tools[0]["description"], "Current weather for a city.");
        assert_eq!(tools[0]["input_schema"], openai_tools()[0]["function"]["parameters"]);
        // The assistant's call and the tool result become tool_use / tool_result blocks.
        let msgs = sent.body["messages"].as_array().expect("messages");
        let blocks: Vec<&Value> = msgs.iter().filter_map(|m| m["content"].as_array()).flatten().collect();
        let tool_use = blocks.iter().find(|b| b["type"] == "tool_use").unwrap_or_else(|| panic!("no tool_use in {msgs:?}"));
        assert_eq!(tool_use["id"], "call_prev");
        assert_eq!(tool_use["name"], "get_weather");
        assert_eq!(tool_use["input"], json!({"city": "Paris"}));
        let result = blocks.iter().find(|b| b["type"] == "tool_result").unwrap_or_else(|| panic!("no tool_result in {msgs:?}"));
        assert_eq!(result["tool_use_id"], "call_prev");
        let roles: Vec<&str> = msgs.iter().filter_map(|m| m["role"].as_str()).collect();
        assert!(roles.iter().all(|r| *r == "user" || *r == "assistant"), "roles {roles:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_anthropic_tools_streaming() {
    bounded(async {
        let up = MockUpstream::always(anthropic::stream_tool_use(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let mut body = request(true);
        body["tools"] = openai_tools();
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = openai_stream(&resp.text);
        let calls = stream_tool_calls(&chunks);
        assert_eq!(stream_text(&chunks), "Let me check.");
        assert_eq!(
            calls.len(),
            2,
            "tool call indexes count tool calls from 0, not content blocks: {chunks:#?}"
        );
        for (got, want) in calls.iter().zip(TWO_CALLS) {
            assert_eq!(got.id, want.id);
            assert_eq!(got.name, want.name);
            assert_eq!(got.args, want.args);
        }
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("tool_calls"));
    })
    .await;
}
