//! Anthropic inbound (`POST /v1/messages`) to an OpenAI upstream: the Messages API request,
//! answer and event stream translated both ways, tools included.

use serde_json::{Value, json};

use crate::support::client::named_events;
use crate::support::dialect::{TWO_CALLS, openai};
use crate::support::{ConfigBuilder, MockUpstream, TestGateway, anthropic_tools, bounded};

async fn gateway_for(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .openai("up", &up.url("/v1"), "sk-e2e", None)
        .model("m", &[("up", "gpt-up")]);
    TestGateway::start(&cfg.build()).await
}

const HEADERS: [(&str, &str); 2] = [
    ("anthropic-version", "2023-06-01"),
    ("x-api-key", "client-key"),
];

fn request(stream: bool) -> Value {
    json!({
        "model": "m",
        "max_tokens": 128,
        "stream": stream,
        "system": "Be kind.",
        "messages": [{"role": "user", "content": "hello anthropic"}],
    })
}

fn assert_openai_request(sent: &crate::support::Recorded, stream: bool) {
    assert_eq!(sent.path, "/v1/chat/completions");
    let b = &sent.body;
    assert_eq!(b["model"], "gpt-up");
    let msgs = b["messages"].as_array().expect("messages");
    assert_eq!(
        msgs[0]["role"], "system",
        "the system prompt becomes the first message: {b}"
    );
    assert_eq!(openai::content_text(&msgs[0]["content"]), "Be kind.");
    assert_eq!(openai::last_user_text(b), "hello anthropic");
    let limit = b
        .get("max_tokens")
        .or_else(|| b.get("max_completion_tokens"));
    assert_eq!(limit, Some(&json!(128)), "max_tokens carried over: {b}");
    assert_eq!(b["stream"].as_bool().unwrap_or(false), stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_openai_non_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json_with("/v1/messages", &request(false), &HEADERS)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "Echo: hello anthropic"}])
        );
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["input_tokens"], 11);
        assert_eq!(v["usage"]["output_tokens"], 7);
        assert_openai_request(&up.single_request(), false);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_openai_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json_with("/v1/messages", &request(true), &HEADERS)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(resp.header("content-type").starts_with("text/event-stream"));
        let events = named_events(&resp.text);
        let names: Vec<&str> = events
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| *n != "ping")
            .collect();
        assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
        assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");
        assert_eq!(names[names.len() - 2], "message_delta", "{names:?}");
        assert_eq!(events[0].1["message"]["role"], "assistant");
        assert_eq!(events[0].1["message"]["type"], "message");
        let start = events
            .iter()
            .find(|(n, _)| n == "content_block_start")
            .expect("content_block_start");
        assert_eq!(start.1["index"], 0);
        assert_eq!(start.1["content_block"]["type"], "text");
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| {
                assert_eq!(v["delta"]["type"], "text_delta", "{v}");
                v["delta"]["text"].as_str().expect("text").to_owned()
            })
            .collect();
        assert_eq!(text, "Echo: hello anthropic");
        assert_block_order(&events);
        let delta = &events
            .iter()
            .rev()
            .find(|(n, _)| n == "message_delta")
            .unwrap()
            .1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert!(
            delta["usage"]["output_tokens"].is_u64(),
            "message_delta carries usage.output_tokens: {delta}"
        );
        assert_openai_request(&up.single_request(), true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_openai_tools_non_streaming() {
    bounded(async {
        let up = MockUpstream::always(openai::chat_tool_calls(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let body = json!({
            "model": "m",
            "max_tokens": 128,
            "tools": anthropic_tools(),
            "tool_choice": {"type": "auto"},
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_prev", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_prev", "content": "18C"},
                    {"type": "text", "text": "and the time?"}
                ]},
            ],
        });
        let resp = gw.client.post_json_with("/v1/messages", &body, &HEADERS).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        let uses: Vec<&Value> = v["content"].as_array().expect("content").iter().filter(|b| b["type"] == "tool_use").collect();
        assert_eq!(uses.len(), 2, "{v}");
        for (got, want) in uses.iter().zip(TWO_CALLS) {
            assert_eq!(got["id"], want.id);
            assert_eq!(got["name"], want.name);
            assert_eq!(got["input"], serde_json::from_str::<Value>(want.args).unwrap(), "input is an object");
        }

        let sent = up.single_request();
        let tools = sent.body["tools"].as_array().expect("tools");
        assert_eq!(tools[0]["type"], "function");
        assert_eq!(tools[0]["function"]["name"], "get_weather");
        assert_eq!(tools[0]["function"]["parameters"], anthropic_tools()[0]["input_schema"]);
        let msgs = sent.body["messages"].as_array().expect("messages");
        let assistant = msgs.iter().find(|m| m["role"] == "assistant").expect("assistant message");
        let call = &assistant["tool_calls"][0];
        assert_eq!(call["id"], "toolu_prev");
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments string")).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        let tool = msgs.iter().find(|m| m["role"] == "tool").expect("tool message");
        assert_eq!(tool["tool_call_id"], "toolu_prev");
        assert_eq!(openai::content_text(&tool["content"]), "18C");
        assert_eq!(openai::last_user_text(&sent.body), "and the time?");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_openai_tools_streaming() {
    bounded(async {
        let up = MockUpstream::always(openai::stream_tool_calls(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let mut body = request(true);
        body["tools"] = anthropic_tools();
        let resp = gw
            .client
            .post_json_with("/v1/messages", &body, &HEADERS)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let events = named_events(&resp.text);
        assert_block_order(&events);
        let starts: Vec<&Value> = events
            .iter()
            .filter(|(n, v)| n == "content_block_start" && v["content_block"]["type"] == "tool_use")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(starts.len(), 2, "{events:#?}");
        for (start, want) in starts.iter().zip(TWO_CALLS) {
            assert_eq!(start["content_block"]["id"], want.id);
            assert_eq!(start["content_block"]["name"], want.name);
            let json: String = events
                .iter()
                .filter(|(n, v)| n == "content_block_delta" && v["index"] == start["index"])
                .map(|(_, v)| {
                    assert_eq!(v["delta"]["type"], "input_json_delta", "{v}");
                    v["delta"]["partial_json"]
                        .as_str()
                        .expect("partial_json")
                        .to_owned()
                })
                .collect();
            assert_eq!(
                serde_json::from_str::<Value>(&json)
                    .unwrap_or_else(|e| panic!("arguments {json:?}: {e}")),
                serde_json::from_str::<Value>(want.args).unwrap()
            );
        }
        let delta = &events
            .iter()
            .rev()
            .find(|(n, _)| n == "message_delta")
            .expect("message_delta")
            .1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    })
    .await;
}

/// Content blocks come one at a time: `content_block_start` (index i), its deltas,
/// `content_block_stop` (index i), with indexes 0, 1, 2... in order.
fn assert_block_order(events: &[(String, Value)]) {
    let mut open: Option<u64> = None;
    let mut next = 0u64;
    for (name, v) in events {
        match name.as_str() {
            "content_block_start" => {
                assert!(
                    open.is_none(),
                    "block started while block {open:?} is open: {events:#?}"
                );
                assert_eq!(
                    v["index"].as_u64(),
                    Some(next),
                    "block indexes go 0, 1, 2...: {events:#?}"
                );
                open = Some(next);
                next += 1;
            }
            "content_block_delta" => assert_eq!(
                v["index"].as_u64(),
                open,
                "delta outside its block: {events:#?}"
            ),
            "content_block_stop" => {
                assert_eq!(
                    v["index"].as_u64(),
                    open,
                    "stop of a block that is not open: {events:#?}"
                );
                open = None;
            }
            _ => {}
        }
    }
    assert!(open.is_none(), "block {open:?} never stopped");
    assert!(next > 0, "no content blocks at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_anthropic_upstream_stream_and_not() {
    bounded(async {
        let up = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .anthropic("an", &up.url(""), "sk-ant-e2e", None)
            .model("c", &[("an", "claude-up")]);
        let gw = TestGateway::start(&cfg.build()).await;
        let mut body = request(false);
        body["model"] = json!("c");
        body["metadata"] = json!({"user_id": "u-1"});
        let resp = gw
            .client
            .post_json_with("/v1/messages", &body, &HEADERS)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "Echo: hello anthropic"}])
        );
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["input_tokens"], 11);
        let sent = up.single_request();
        assert!(sent.path.ends_with("/v1/messages"), "{}", sent.path);
        assert_eq!(sent.body["model"], "claude-up");
        assert_eq!(
            sent.header("x-api-key"),
            "sk-ant-e2e",
            "the provider's key, not the client's"
        );
        let system = match &sent.body["system"] {
            Value::String(s) => s.clone(),
            Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
            other => panic!("system: {other}"),
        };
        assert_eq!(system, "Be kind.");

        body["stream"] = json!(true);
        let resp = gw
            .client
            .post_json_with("/v1/messages", &body, &HEADERS)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let events = named_events(&resp.text);
        assert_block_order(&events);
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .filter_map(|(_, v)| v["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "Echo: hello anthropic");
        assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("message_stop"));
    })
    .await;
}
