//! Every error surface: bad input (400 naming the field), unknown model (404), oversized
//! body (413), upstream failure (502), upstream timeout (504), upstream garbage, broken
//! streams, upstream 4xx passed through, Anthropic-shaped errors on `/v1/messages`, errors of
//! the HTTP layer itself (405, 414, 431, malformed requests) and non-JSON content types
//! (415) in the route's dialect, and no input that takes the process down.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::dialect::openai;
use crate::support::{
    ConfigBuilder, Frame, MockUpstream, RawConn, Reply, Resp, TestGateway, Timeouts,
    anthropic_error, bounded, chat_body, openai_error,
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

/// Sends raw bytes and reads the gateway's answer up to the close, as a [`Resp`].
async fn raw_exchange(gw: &TestGateway, request: &[u8]) -> Resp {
    let mut conn = RawConn::connect(gw.addr()).await;
    // The gateway may answer (and close) before it has read everything: ignore send errors.
    let _ = conn.try_send(request).await;
    let ending = conn.read_to_close(Duration::from_secs(10)).await;
    assert!(ending.closed, "the connection stayed open: {ending:?}");
    let status = ending
        .status()
        .unwrap_or_else(|| panic!("no HTTP response: {ending:?}"));
    let text = String::from_utf8_lossy(&ending.bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "not JSON: {head}"
    );
    Resp {
        status,
        headers: Default::default(),
        text: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_layer_errors_carry_a_json_body_in_the_routes_dialect() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;

        // 405: a known path with the wrong method.
        let err = openai_error(&gw.client.get("/v1/chat/completions").await, 405);
        assert_eq!(err["code"], "method_not_allowed");
        anthropic_error(&gw.client.get("/v1/messages").await, 405);
        let resp = gw
            .client
            .http()
            .delete(gw.client.url("/v1/embeddings"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        assert!(resp.text().await.unwrap().contains("method_not_allowed"));

        // 400: a head hyper cannot parse.
        let bad_header =
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\nno colon here\r\n\r\n";
        let err = openai_error(&raw_exchange(&gw, bad_header).await, 400);
        assert_eq!(err["code"], "malformed_request");
        let bad_header = b"POST /v1/messages HTTP/1.1\r\nhost: weir\r\nno colon here\r\n\r\n";
        anthropic_error(&raw_exchange(&gw, bad_header).await, 400);
        let garbage = b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n";
        openai_error(&raw_exchange(&gw, garbage).await, 400);

        // 414: a request target past hyper's limit.
        let long = format!(
            "GET /v1/messages?q={} HTTP/1.1\r\nhost: weir\r\n\r\n",
            "a".repeat(70_000)
        );
        let err = anthropic_error(&raw_exchange(&gw, long.as_bytes()).await, 414);
        assert_eq!(err["type"], "invalid_request_error");
        let long = long.replace("/v1/messages", "/v1/chat/completions");
        let err = openai_error(&raw_exchange(&gw, long.as_bytes()).await, 414);
        assert_eq!(err["code"], "uri_too_long");

        // 431: more headers than hyper accepts.
        let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\n{many}\r\n");
        let err = openai_error(&raw_exchange(&gw, req.as_bytes()).await, 431);
        assert_eq!(err["code"], "headers_too_large");
        let req = req.replace("/v1/chat/completions", "/v1/messages");
        anthropic_error(&raw_exchange(&gw, req.as_bytes()).await, 431);

        assert_eq!(up.hits(), 0);
        assert_eq!(gw.client.get("/healthz").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_posts_need_a_json_content_type() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up, None).await;
        let body = chat_body("m", "hi").to_string();
        let post = |path: &str, content_type: Option<&str>| {
            let mut req = gw
                .client
                .http()
                .post(gw.client.url(path))
                .body(body.clone());
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let text = resp.text().await.unwrap();
                Resp {
                    status,
                    headers,
                    text,
                }
            }
        };
        // What a page in a browser can send across origins without a preflight.
        let err = openai_error(&post("/v1/chat/completions", Some("text/plain")).await, 415);
        assert_eq!(err["code"], "unsupported_media_type");
        openai_error(
            &post("/v1/embeddings", Some("application/x-www-form-urlencoded")).await,
            415,
        );
        anthropic_error(
            &post("/v1/messages", Some("multipart/form-data; boundary=x")).await,
            415,
        );
        anthropic_error(&post("/v1/messages", None).await, 415);
        openai_error(
            &post("/v1/chat/completions", Some("application/jsonx")).await,
            415,
        );
        assert_eq!(up.hits(), 0, "a refused request reached the upstream");

        // JSON with parameters, in any case, and `+json` types are accepted.
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.api+json",
        ] {
            let resp = post("/v1/chat/completions", Some(ct)).await;
            assert_eq!(resp.status, 200, "{ct}: {}", resp.text);
        }
    })
    .await;
}
