//! OpenAI inbound to an Azure OpenAI upstream: deployment URLs, `api-version`, `api-key`.

use serde_json::json;

use crate::support::client::{openai_stream, stream_text};
use crate::support::dialect::openai;
use crate::support::{
    ConfigBuilder, Frame, MockUpstream, Recorded, Reply, TestGateway, bounded, chat_body,
};

const KEY: &str = "azure-e2e-key";

async fn gateway_for(up: &MockUpstream) -> TestGateway {
    let lines = format!(
        "endpoint = \"{}\"\napi_key = \"{KEY}\"\napi_version = \"2024-10-21\"\ndeployments = {{ \"gpt-4o\" = \"my-deploy\" }}",
        up.url("")
    );
    let cfg = ConfigBuilder::new()
        .provider("az", "azure", &lines)
        .model("az", &[("az", "gpt-4o")])
        .model("az-embed", &[("az", "embed-deploy")]);
    TestGateway::start(&cfg.build()).await
}

fn assert_azure_request(sent: &Recorded, deployment: &str, op: &str) {
    assert_eq!(sent.path, format!("/openai/deployments/{deployment}/{op}"));
    let query = sent.query.clone().unwrap_or_default();
    assert!(
        query.split('&').any(|kv| kv == "api-version=2024-10-21"),
        "query {query:?}"
    );
    assert_eq!(sent.header("api-key"), KEY);
    assert!(
        sent.header("authorization").is_empty(),
        "Azure takes api-key, not a bearer token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_azure_non_streaming() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("az", "hi azure"))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            resp.json()["choices"][0]["message"]["content"],
            "Echo: hi azure"
        );
        assert_azure_request(&up.single_request(), "my-deploy", "chat/completions");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_azure_streaming_with_filter_results_chunk() {
    bounded(async {
        // Azure opens a stream with a chunk that has no choices, only prompt_filter_results.
        let mut frames = vec![Frame::data(&json!({
            "id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        }))];
        frames.extend(openai::text_frames(&[
            "Hello ".to_owned(),
            "Azure".to_owned(),
        ]));
        frames.push(openai::done());
        let up = MockUpstream::always(Reply::Sse(frames)).await;
        let gw = gateway_for(&up).await;
        let mut body = chat_body("az", "x");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(stream_text(&openai_stream(&resp.text)), "Hello Azure");
        assert_azure_request(&up.single_request(), "my-deploy", "chat/completions");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_to_azure_embeddings() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json(
                "/v1/embeddings",
                &json!({"model": "az-embed", "input": "x"}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            resp.json()["data"][0]["embedding"],
            json!([0.25, -0.5, 0.75, 0.0])
        );
        assert_azure_request(&up.single_request(), "embed-deploy", "embeddings");
    })
    .await;
}
