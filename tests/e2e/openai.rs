//! OpenAI inbound to an OpenAI-compatible upstream: plain chat, tools, embeddings, models,
//! and the built-in `mock` provider.

use serde_json::{Value, json};

use crate::support::dialect::{TWO_CALLS, openai};
use crate::support::{ConfigBuilder, MockUpstream, TestGateway, bounded, chat_body, openai_tools};

const KEY: &str = "sk-e2e-openai-key";

pub async fn gateway_for(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .openai("up", &up.url("/v1"), KEY, None)
        .model("m", &[("up", "upstream-model")])
        .model("embed", &[("up", "upstream-embed")]);
    TestGateway::start(&cfg.build()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_non_streaming_round_trip() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let mut body = chat_body("m", "hello there");
        body["seed"] = json!(7);
        body["x_vendor_field"] = json!({"keep": [1, 2]});
        body["messages"] = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
        ]);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(resp.header("content-type").starts_with("application/json"));
        let v = resp.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: hello there");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 11);
        assert_eq!(v["usage"]["completion_tokens"], 7);

        let sent = up.single_request();
        assert_eq!(sent.method, "POST");
        assert_eq!(sent.path, "/v1/chat/completions");
        assert_eq!(sent.header("authorization"), format!("Bearer {KEY}"));
        assert_eq!(sent.body["model"], "upstream-model", "the target's model name goes upstream");
        assert_eq!(sent.body["seed"], 7, "known fields pass through");
        assert_eq!(sent.body["x_vendor_field"], json!({"keep": [1, 2]}), "unknown fields pass through");
        assert_eq!(sent.body["messages"], body["messages"], "messages pass through unchanged");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_non_streaming_parallel() {
    bounded(async {
        let up = MockUpstream::always(openai::chat_tool_calls(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let mut body = chat_body("m", "weather and time in Paris?");
        body["tools"] = openai_tools();
        body["tool_choice"] = json!("auto");
        body["parallel_tool_calls"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        let calls = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .expect("tool_calls")
            .clone();
        assert_eq!(calls.len(), 2, "{v}");
        for (got, want) in calls.iter().zip(TWO_CALLS) {
            assert_eq!(got["id"], want.id);
            assert_eq!(got["type"], "function");
            assert_eq!(got["function"]["name"], want.name);
            let args: Value = serde_json::from_str(
                got["function"]["arguments"]
                    .as_str()
                    .expect("arguments string"),
            )
            .unwrap();
            assert_eq!(args, serde_json::from_str::<Value>(want.args).unwrap());
        }
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

        let sent = up.single_request();
        assert_eq!(sent.body["tools"], openai_tools());
        assert_eq!(sent.body["tool_choice"], "auto");
        assert_eq!(sent.body["parallel_tool_calls"], true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_are_forwarded() {
    bounded(async {
        let up = MockUpstream::always(openai::chat("It is 18C in Paris.")).await;
        let gw = gateway_for(&up).await;
        let messages = json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_weather_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_weather_1", "content": "{\"temp_c\":18}"},
        ]);
        let body = json!({"model": "m", "messages": messages, "tools": openai_tools()});
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.json()["choices"][0]["message"]["content"], "It is 18C in Paris.");
        let sent = up.single_request();
        assert_eq!(sent.body["messages"][1]["tool_calls"], messages[1]["tool_calls"]);
        assert_eq!(sent.body["messages"][2]["tool_call_id"], "call_weather_1");
        assert_eq!(sent.body["messages"][2]["content"], "{\"temp_c\":18}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_round_trip() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let body =
            json!({"model": "embed", "input": ["first", "second"], "encoding_format": "float"});
        let resp = gw.client.post_json("/v1/embeddings", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(data[1]["embedding"], json!([0.25, -0.5, 0.75, 1.0]));
        let sent = up.single_request();
        assert_eq!(sent.path, "/v1/embeddings");
        assert_eq!(sent.body["model"], "upstream-embed");
        assert_eq!(sent.body["input"], json!(["first", "second"]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_configured_models() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw.client.get("/v1/models").await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(ids, ["m", "embed"], "models in config order: {v}");
        assert!(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["object"] == "model"),
            "{v}"
        );
        assert_eq!(up.hits(), 0, "listing models must not call upstream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_provider_serves_offline() {
    bounded(async {
        let cfg = ConfigBuilder::new()
            .provider(
                "local",
                "mock",
                "stream_chunks = 3\ntool_arguments = '{\"city\":\"Oslo\"}'",
            )
            .model("mock", &[("local", "mock-1")]);
        let gw = TestGateway::start(&cfg.build()).await;

        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("mock", "offline"))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            resp.json()["choices"][0]["message"]["content"],
            "Echo: offline"
        );

        let mut body = chat_body("mock", "offline");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = crate::support::client::openai_stream(&resp.text);
        assert_eq!(
            crate::support::client::stream_text(&chunks),
            "Echo: offline"
        );

        body["tools"] = openai_tools();
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        let calls = crate::support::client::stream_tool_calls(
            &crate::support::client::openai_stream(&resp.text),
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].args, "{\"city\":\"Oslo\"}");

        let resp = gw
            .client
            .post_json("/v1/embeddings", &json!({"model": "mock", "input": "x"}))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            resp.json()["data"][0]["embedding"].as_array().map(Vec::len),
            Some(8)
        );
    })
    .await;
}
