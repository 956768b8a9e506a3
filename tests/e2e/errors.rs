//! Every error surface: bad input (400 naming the field), unknown model (404), oversized
//! body (413), upstream failure (502), upstream timeout (504), upstream garbage, broken
//! streams, upstream 4xx passed through, Anthropic-shaped errors on `/v1/messages`, and no
//! input that takes the process down.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::dialect::openai;
use crate::support::{
    ConfigBuilder, Frame, MockUpstream, Reply, TestGateway, Timeouts, anthropic_error, bounded,
    chat_body, openai_error,
};

async fn gateway_for(up: &MockUpstream, timeouts: Option<Timeouts>) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .server("max_body_bytes = 4096")
        .openai("up", &up.url("/v1"), "sk-e2e", timeouts)
        .model("m", &[("up", "gpt-up")]);
    TestGateway::start(&cfg.build()).await
}

/// The error mentions `field` in its `param` or its `message`.
fn names_field(err: &Value, field: &str) -> bool {
    err["param"].as_str().is_some_and(|p| p.contains(field))
        || err["message"].as_str().is_some_and(|m| m.contains(field))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let resp = gw
            .client
            .post_raw("/v1/chat/completions", "{\"model\": \"m\", \"messages\": [")
            .await;
        openai_error(&resp, 400);
        let resp = gw
            .client
            .post_raw("/v1/embeddings", "not json at all")
            .await;
        openai_error(&resp, 400);
        assert_eq!(up.hits(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_400_naming_the_field() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let user = json!([{"role": "user", "content": "x"}]);
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": "hello"}),
                "messages",
            ),
            ("/v1/chat/completions", json!({"messages": user}), "model"),
            (
                "/v1/chat/completions",
                json!({"model": 42, "messages": user}),
                "model",
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": user, "temperature": "hot"}),
                "temperature",
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": user, "stream": "yes"}),
                "stream",
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": user, "max_tokens": -5}),
                "max_tokens",
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": [{"content": "no role"}]}),
                "role",
            ),
            ("/v1/embeddings", json!({"model": "m"}), "input"),
        ];
        for (path, body, field) in cases {
            let resp = gw.client.post_json(path, &body).await;
            let err = openai_error(&resp, 400);
            assert!(
                names_field(&err, field),
                "{path} {body}: the error must name `{field}`: {err}"
            );
        }
        assert_eq!(up.hits(), 0, "invalid requests never reach the upstream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("no-such-model", "x"))
            .await;
        let err = openai_error(&resp, 404);
        assert!(
            err["message"].as_str().unwrap().contains("no-such-model"),
            "{err}"
        );
        let resp = gw
            .client
            .post_json("/v1/embeddings", &json!({"model": "nope", "input": "x"}))
            .await;
        openai_error(&resp, 404);
        assert_eq!(up.hits(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let small = chat_body("m", &"a".repeat(1000));
        assert_eq!(
            gw.client
                .post_json("/v1/chat/completions", &small)
                .await
                .status,
            200
        );
        let big = chat_body("m", &"a".repeat(20_000));
        let resp = gw.client.post_json("/v1/chat/completions", &big).await;
        openai_error(&resp, 413);
        let resp = gw
            .client
            .post_json_with("/v1/messages", &big, &[("anthropic-version", "2023-06-01")])
            .await;
        anthropic_error(&resp, 413);
        assert_eq!(up.hits(), 1, "only the small request went upstream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failure_is_502() {
    bounded(async {
        let up = MockUpstream::always(Reply::error(500, "internal upstream failure")).await;
        let gw = gateway_for(&up, None).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        openai_error(&resp, 502);
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        openai_error(&resp, 502);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504() {
    bounded(async {
        let up = MockUpstream::always(Reply::Hang).await;
        let gw = gateway_for(&up, Some(Timeouts::first_byte(300))).await;
        let started = Instant::now();
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        openai_error(&resp, 504);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_total_timeout_ends_a_stream() {
    bounded(async {
        let pieces: Vec<String> = (0..100).map(|i| format!("{i} ")).collect();
        let up = MockUpstream::always(
            openai::stream_text(&pieces, false).paced(Duration::from_millis(100)),
        )
        .await;
        let timeouts = Timeouts {
            connect_ms: 1_000,
            first_byte_ms: 2_000,
            total_ms: 1_000,
        };
        let gw = gateway_for(&up, Some(timeouts)).await;
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let started = Instant::now();
        let mut events = gw.client.open_stream("/v1/chat/completions", &body).await;
        assert_eq!(events.resp.status(), 200);
        let mut saw_done = false;
        while let Ok(Some(e)) = events.next_event(Duration::from_secs(10)).await {
            saw_done |= e == "data: [DONE]";
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "the total timeout did not end the stream"
        );
        assert!(
            !saw_done,
            "a stream cut by the total timeout must not look complete"
        );
        up.wait_until(Duration::from_secs(5), "upstream stream dropped", |m| {
            m.streams_dropped() == 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_garbage_json_is_502() {
    bounded(async {
        let garbage = Reply::Raw {
            status: 200,
            content_type: "application/json",
            body: b"<html>oops {\"choices\":".to_vec(),
        };
        let up = MockUpstream::always(garbage).await;
        let gw = gateway_for(&up, None).await;
        let started = Instant::now();
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        openai_error(&resp, 502);
        let resp = gw
            .client
            .post_json("/v1/embeddings", &json!({"model": "m", "input": "x"}))
            .await;
        openai_error(&resp, 502);
        assert!(started.elapsed() < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_garbage_before_first_event_is_502() {
    bounded(async {
        let up = MockUpstream::always(Reply::Sse(vec![
            Frame::text("data: {this is not json\n\n"),
            Frame::text("data: [DONE]\n\n"),
        ]))
        .await;
        let gw = gateway_for(&up, None).await;
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        openai_error(&resp, 502);
    })
    .await;
}

/// After a good first chunk the upstream breaks: the client's stream must end promptly,
/// well-framed, with an error event and never a `[DONE]` that claims success.
async fn assert_broken_stream_terminates(tail: Vec<Frame>) {
    let mut frames = vec![
        Frame::data(&openai::chunk(
            json!({"role": "assistant", "content": "ok"}),
            None,
        )),
        Frame::Bytes(Duration::from_millis(50), String::new()),
    ];
    frames.extend(tail);
    let up = MockUpstream::always(Reply::Sse(frames)).await;
    let gw = gateway_for(
        &up,
        Some(Timeouts {
            connect_ms: 1_000,
            first_byte_ms: 2_000,
            total_ms: 30_000,
        }),
    )
    .await;
    let mut body = chat_body("m", "x");
    body["stream"] = json!(true);
    let mut events = gw.client.open_stream("/v1/chat/completions", &body).await;
    assert_eq!(events.resp.status(), 200);
    let first = events.next_json(Duration::from_secs(10)).await;
    assert_eq!(first["choices"][0]["delta"]["content"], "ok");
    let mut rest = Vec::new();
    // Read to the end, clean (`Ok(None)`) or broken (`Err`): either is a termination.
    while let Ok(Some(e)) = events.next_event(Duration::from_secs(10)).await {
        rest.push(e);
    }
    for e in &rest {
        assert!(
            e.starts_with("data: "),
            "malformed event after a broken upstream: {e:?}"
        );
    }
    let error = rest.iter().find(|e| e.starts_with("data: {\"error\""));
    assert!(
        error.is_some(),
        "the client must be told the stream broke (an error event); got {rest:?}"
    );
    assert!(
        !rest.iter().any(|e| e == "data: [DONE]") || error.is_some(),
        "{rest:?}"
    );
    let resp = gw.client.get("/healthz").await;
    assert_eq!(
        resp.status, 200,
        "the gateway survives a broken upstream stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_sse_mid_stream_terminates_cleanly() {
    bounded(assert_broken_stream_terminates(vec![
        Frame::text("data: {broken json\n\n"),
        Frame::Bytes(Duration::from_secs(60), "data: [DONE]\n\n".into()),
    ]))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_stream_terminates_cleanly() {
    bounded(assert_broken_stream_terminates(vec![Frame::Abort])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_4xx_passes_through_with_its_status() {
    bounded(async {
        let up = MockUpstream::start().await;
        up.push(Reply::error(422, "unprocessable thing"))
            .push(Reply::error(404, "model gpt-up does not exist"));
        let gw = gateway_for(&up, None).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        let err = openai_error(&resp, 422);
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("unprocessable thing"),
            "{err}"
        );
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        openai_error(&resp, 404);
        assert_eq!(up.hits(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_errors_are_anthropic_shaped() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let h = [("anthropic-version", "2023-06-01")];
        let body = json!({"model": "nope", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        let err = anthropic_error(&gw.client.post_json_with("/v1/messages", &body, &h).await, 404);
        assert!(err["message"].as_str().unwrap().contains("nope"), "{err}");
        let resp = gw.client.post_raw("/v1/messages", "{not json").await;
        anthropic_error(&resp, 400);
        let body = json!({"model": "m", "max_tokens": 10, "messages": "x"});
        let err = anthropic_error(&gw.client.post_json_with("/v1/messages", &body, &h).await, 400);
        assert!(err["message"].as_str().unwrap().contains("messages"), "{err}");
        up.set_default(Reply::error(500, "down"));
        let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        anthropic_error(&gw.client.post_json_with("/v1/messages", &body, &h).await, 502);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_input_takes_the_process_down() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let deep = format!("{}{}", "[".repeat(3000), "]".repeat(3000));
        let bodies: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"null".to_vec(),
            b"[]".to_vec(),
            b"{}".to_vec(),
            b"\"just a string\"".to_vec(),
            b"{\"model\":null,\"messages\":null}".to_vec(),
            b"{\"model\":\"m\",\"messages\":[null]}".to_vec(),
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":7}]}]}"
                .to_vec(),
            vec![0xff, 0xfe, 0x00, 0x7b],
            deep.into_bytes(),
        ];
        for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/messages"] {
            for b in &bodies {
                let resp = gw.client.post_raw(path, b.clone()).await;
                assert!(
                    (400..500).contains(&resp.status),
                    "{path} with {:?}: expected a 4xx, got {} {}",
                    String::from_utf8_lossy(&b[..b.len().min(60)]),
                    resp.status,
                    resp.text
                );
            }
        }
        assert_eq!(gw.client.get("/healthz").await.status, 200);
        assert!(
            !gw.logs().contains("panicked"),
            "a handler panicked:\n{}",
            gw.logs()
        );
    })
    .await;
}
