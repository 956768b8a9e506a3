//! OpenAI inbound to a Gemini upstream (`generateContent` / `streamGenerateContent`).

use serde_json::{Value, json};

use crate::support::client::{openai_stream, stream_finish_reason, stream_text};
use crate::support::dialect::gemini;
use crate::support::{ConfigBuilder, MockUpstream, Recorded, TestGateway, bounded, openai_tools};

const KEY: &str = "gemini-e2e-key";

async fn gateway_for(up: &MockUpstream) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .gemini("gem", &up.url(""), KEY, None)
        .model("g", &[("gem", "gem-up")]);
    TestGateway::start(&cfg.build()).await
}

fn request(stream: bool) -> Value {
    json!({
        "model": "g",
        "stream": stream,
        "max_tokens": 64,
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "hi gemini"},
        ],
    })
}

fn assert_gemini_request(sent: &Recorded, method: &str) {
    assert!(
        sent.path.ends_with(&format!("/models/gem-up:{method}")),
        "path {}",
        sent.path
    );
    let query = sent.query.clone().unwrap_or_default();
    let key_in_header = sent.header("x-goog-api-key") == KEY;
    let key_in_query = query.split('&').any(|kv| kv == format!("key={KEY}"));
    assert!(
        key_in_header || key_in_query,
        "the API key goes in x-goog-api-key (or ?key=)"
    );
    let b = &sent.body;
    assert_eq!(gemini::last_user_text(b), "hi gemini");
    let system: String = b["systemInstruction"]["parts"]
        .as_array()
        .unwrap_or_else(|| panic!("systemInstruction.parts expected: {b}"))
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(system, "Answer in French.");
    assert!(
        b["contents"]
            .as_array()
            .expect("contents")
            .iter()
            .all(|c| c["role"] != "system"),
        "{b}"
    );
    assert_eq!(b["generationConfig"]["maxOutputTokens"], 64);
    assert_eq!(b["generationConfig"]["temperature"], 0.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_gemini_non_streaming() {
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
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: hi gemini");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 11);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_gemini_request(&up.single_request(), "generateContent");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_gemini_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let mut body = request(true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = openai_stream(&resp.text);
        assert_eq!(stream_text(&chunks), "Echo: hi gemini");
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("stop"));
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["prompt_tokens"], 11, "usage chunk last: {chunks:#?}");
        let sent = up.single_request();
        assert_gemini_request(&sent, "streamGenerateContent");
        assert!(
            sent.query
                .unwrap_or_default()
                .split('&')
                .any(|kv| kv == "alt=sse"),
            "streams ask for alt=sse"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_gemini_function_call() {
    bounded(async {
        let up = MockUpstream::always(gemini::generate_function_call(
            "get_weather",
            json!({"city": "Lyon"}),
        ))
        .await;
        let gw = gateway_for(&up).await;
        let mut body = request(false);
        body["tools"] = openai_tools();
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let v = resp.json();
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function", "{v}");
        assert!(
            call["id"].as_str().is_some_and(|s| !s.is_empty()),
            "tool calls need an id: {v}"
        );
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments"))
                .unwrap();
        assert_eq!(args, json!({"city": "Lyon"}));
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let sent = up.single_request();
        let tools = sent.body["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("tools expected: {}", sent.body));
        let names: Vec<&str> = tools
            .iter()
            .filter_map(|t| t["functionDeclarations"].as_array())
            .flatten()
            .filter_map(|d| d["name"].as_str())
            .collect();
        assert_eq!(names, ["get_weather", "get_time"]);
    })
    .await;
}
