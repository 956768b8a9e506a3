//! The client surface around the main routes: `/v1/models/{id}` and plugin-served aliases,
//! base64 embeddings, `x-request-id` on every response, unknown routes counted, and the mock
//! provider driving a two-turn agent loop in both dialects.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::policy_auth::{PolicyGateway, plugin_entry};
use crate::support::{TestGateway, bounded, client::named_events};

const MOCK: &str = r#"
[providers.mock]
kind = "mock"
stream_chunks = 3
tool_arguments_by_name = { Bash = '{"command":"echo weir-ok"}' }

[[models]]
name = "mock"
targets = [{ provider = "mock", model = "mock-1" }]
"#;

const ALIAS: &str = r#"aliases.fast = { targets = [{ provider = "mock", model = "mock-1" }] }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_and_retrieve_include_plugin_aliases() {
    bounded(async {
        let gw = PolicyGateway::start(&format!("{MOCK}{}", plugin_entry("routing", ALIAS))).await;
        let list = gw.client.get("/v1/models").await;
        assert_eq!(list.status, 200, "{}", list.text);
        let ids: Vec<String> = list.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            ids,
            ["mock", "fast"],
            "configured models, then the routing plugin's aliases"
        );

        for id in ["mock", "fast"] {
            let one = gw.client.get(&format!("/v1/models/{id}")).await;
            assert_eq!(one.status, 200, "{}", one.text);
            assert_eq!(
                one.json(),
                json!({"id": id, "object": "model", "created": 0, "owned_by": "weir"})
            );
            assert!(!one.header("x-request-id").is_empty());
        }
        let missing = gw.client.get("/v1/models/nope").await;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.json()["error"]["code"], "model_not_found");
        assert_eq!(missing.json()["error"]["type"], "invalid_request_error");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_request_id_and_unknown_routes_are_counted() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/models",
            "/v1/nothing-here",
        ] {
            let resp = gw.client.get(path).await;
            let id = resp.header("x-request-id");
            assert!(!id.is_empty(), "{path} answered without x-request-id");
        }
        // The client's id is kept, not replaced.
        let resp = gw
            .client
            .http()
            .get(gw.client.url("/v1/does-not-exist"))
            .header("x-request-id", "client-id-42")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()["x-request-id"], "client-id-42");
        // 405 too.
        let resp = gw.client.get("/v1/chat/completions").await;
        assert_eq!(resp.status, 405);
        assert!(!resp.header("x-request-id").is_empty());
        // A pipeline response keeps exactly one id, the client's.
        let resp = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}),
                &[("x-request-id", "pipeline-id-7")],
            )
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-request-id"), "pipeline-id-7");

        let metrics = gw.client.get("/metrics").await.text;
        assert!(
            metrics.contains(r#"weir_unknown_route_total{method="GET"} 2"#),
            "{metrics}"
        );
        assert!(
            !metrics.contains("nothing-here"),
            "paths never become labels"
        );
    })
    .await;
}

fn decode_f32(b64: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_honour_base64_encoding() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        let floats = gw
            .client
            .post_json(
                "/v1/embeddings",
                &json!({"model": "mock", "input": ["a", "b"]}),
            )
            .await;
        assert_eq!(floats.status, 200, "{}", floats.text);
        let b64 = gw
            .client
            .post_json(
                "/v1/embeddings",
                &json!({"model": "mock", "input": ["a", "b"], "encoding_format": "base64"}),
            )
            .await;
        assert_eq!(b64.status, 200, "{}", b64.text);
        for i in 0..2 {
            let want: Vec<f32> = floats.json()["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = decode_f32(
                b64.json()["data"][i]["embedding"]
                    .as_str()
                    .expect("a base64 string"),
            );
            assert_eq!(got, want);
        }
        let bad = gw
            .client
            .post_json(
                "/v1/embeddings",
                &json!({"model": "mock", "input": "a", "encoding_format": "hex"}),
            )
            .await;
        assert_eq!(bad.status, 400, "{}", bad.text);
        assert_eq!(bad.json()["error"]["param"], "encoding_format");
    })
    .await;
}

fn bash_tool_openai() -> Value {
    json!([{"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_drives_a_tool_loop_in_the_openai_dialect() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        let mut messages = vec![json!({"role": "user", "content": "run it"})];
        let first = gw
            .client
            .post_json(
                "/v1/chat/completions",
                &json!({"model": "mock", "messages": messages, "tools": bash_tool_openai()}),
            )
            .await;
        assert_eq!(first.status, 200, "{}", first.text);
        let msg = first.json()["choices"][0]["message"].clone();
        assert_eq!(first.json()["choices"][0]["finish_reason"], "tool_calls");
        let call = msg["tool_calls"][0].clone();
        assert_eq!(call["function"]["name"], "Bash");
        assert_eq!(
            call["function"]["arguments"],
            r#"{"command":"echo weir-ok"}"#
        );
        let id = call["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("call_") && id.len() > 10, "{id}");

        messages.push(msg);
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": "weir-ok"}));
        let body = json!({"model": "mock", "messages": messages, "tools": bash_tool_openai(),
            "stream": true});
        let second = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(second.status, 200, "{}", second.text);
        let chunks = crate::support::client::openai_stream(&second.text);
        assert_eq!(
            crate::support::client::stream_text(&chunks),
            "Done: weir-ok"
        );
        assert!(crate::support::client::stream_tool_calls(&chunks).is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_drives_a_tool_loop_in_the_anthropic_dialect() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        let tools = json!([{"name": "Bash", "input_schema": {"type": "object"}}]);
        let mut messages = vec![json!({"role": "user", "content": "run it"})];
        let first = gw
            .client
            .post_json(
                "/v1/messages",
                &json!({"model": "mock", "max_tokens": 256, "messages": messages, "tools": tools}),
            )
            .await;
        assert_eq!(first.status, 200, "{}", first.text);
        let v = first.json();
        assert_eq!(v["stop_reason"], "tool_use");
        let block = v["content"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "tool_use")
            .expect("a tool_use block")
            .clone();
        assert_eq!(block["name"], "Bash");
        assert_eq!(block["input"], json!({"command": "echo weir-ok"}));
        let id = block["id"].as_str().unwrap().to_owned();

        messages.push(json!({"role": "assistant", "content": v["content"]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": id, "content": "weir-ok"},
            {"type": "text", "text": "(a reminder beside the result)"}]}));
        let body = json!({"model": "mock", "max_tokens": 256, "messages": messages,
            "tools": tools, "stream": true});
        let second = gw.client.post_json("/v1/messages", &body).await;
        assert_eq!(second.status, 200, "{}", second.text);
        let events = named_events(&second.text);
        let text: String = events
            .iter()
            .filter(|(name, _)| name == "content_block_delta")
            .filter_map(|(_, e)| e["delta"]["text"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, "Done: weir-ok");
        assert!(
            !events
                .iter()
                .any(|(_, e)| e["content_block"]["type"] == "tool_use")
        );
        let stop = events
            .iter()
            .find(|(name, _)| name == "message_delta")
            .map(|(_, e)| e["delta"]["stop_reason"].clone());
        assert_eq!(stop, Some(json!("end_turn")));
    })
    .await;
}
