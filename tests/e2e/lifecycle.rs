//! The gateway as a process: health, request ids, metrics, graceful shutdown, and secrets
//! staying out of logs and responses.

use std::time::Duration;

use serde_json::json;

use crate::support::dialect::{anthropic, openai};
use crate::support::{
    ConfigBuilder, MockUpstream, Reply, TestGateway, Timeouts, bounded, chat_body,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    bounded(async {
        let cfg = ConfigBuilder::new()
            .provider("local", "mock", "")
            .model("mock", &[("local", "mock-1")]);
        let gw = TestGateway::start(&cfg.build()).await;
        assert_eq!(gw.client.get("/healthz").await.status, 200);
        assert_eq!(gw.client.get("/readyz").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_echoed_or_generated() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = crate::openai::gateway_for(&up).await;
        let body = chat_body("m", "x");
        let resp = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &body,
                &[("x-request-id", "e2e-req-42")],
            )
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-request-id"), "e2e-req-42");

        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        let generated = resp.header("x-request-id");
        assert!(
            !generated.is_empty(),
            "a request id is generated when the client sends none"
        );
        let again = gw
            .client
            .post_json("/v1/chat/completions", &body)
            .await
            .header("x-request-id");
        assert_ne!(generated, again, "generated ids are unique");

        let missing = chat_body("nope", "x");
        let resp = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &missing,
                &[("x-request-id", "e2e-err-7")],
            )
            .await;
        assert_eq!(resp.status, 404);
        assert_eq!(
            resp.header("x-request-id"),
            "e2e-err-7",
            "errors carry the id too"
        );

        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let resp = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &stream,
                &[("x-request-id", "e2e-stream-9")],
            )
            .await;
        assert_eq!(
            resp.header("x-request-id"),
            "e2e-stream-9",
            "streams carry the id too"
        );
    })
    .await;
}

/// Value of the first sample line of `name` whose labels contain all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_latency_and_tokens() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = crate::openai::gateway_for(&up).await;
        for _ in 0..2 {
            assert_eq!(
                gw.client
                    .post_json("/v1/chat/completions", &chat_body("m", "count"))
                    .await
                    .status,
                200
            );
        }
        let mut body = chat_body("m", "count");
        body["stream"] = json!(true);
        assert_eq!(
            gw.client
                .post_json("/v1/chat/completions", &body)
                .await
                .status,
            200
        );
        // A stream is counted when it ends, which may be a moment after the client saw its
        // last byte: poll until all three requests show up.
        let labels = ["model=\"m\"", "provider=\"up\"", "status=\"200\""];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let m = loop {
            let resp = gw.client.get("/metrics").await;
            assert_eq!(resp.status, 200);
            assert!(
                resp.header("content-type").starts_with("text/plain"),
                "{:?}",
                resp.headers
            );
            let count = sample(&resp.text, "weir_requests_total", &labels);
            if count == Some(3.0) || tokio::time::Instant::now() >= deadline {
                assert_eq!(
                    count,
                    Some(3.0),
                    "weir_requests_total for m/up/200:\n{}",
                    resp.text
                );
                break resp.text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for name in [
            "weir_request_duration_seconds",
            "weir_upstream_duration_seconds",
            "weir_gateway_overhead_seconds",
            "weir_time_to_first_token_seconds",
        ] {
            let n = sample(&m, &format!("{name}_count"), &[])
                .unwrap_or_else(|| panic!("histogram {name} missing:\n{m}"));
            assert!(n >= 1.0, "{name}_count is {n}");
        }
        let tokens_in = sample(
            &m,
            "weir_tokens_total",
            &["model=\"m\"", "direction=\"in\""],
        )
        .or_else(|| {
            sample(
                &m,
                "weir_tokens_total",
                &["model=\"m\"", "direction=\"input\""],
            )
        })
        .unwrap_or_else(|| panic!("no input weir_tokens_total for m:\n{m}"));
        assert!(
            tokens_in >= 22.0,
            "two non-streamed answers report 11 prompt tokens each: {tokens_in}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_inflight_stream_finish_then_exits() {
    bounded(async {
        let pieces: Vec<String> = (0..10).map(|i| format!("w{i} ")).collect();
        let expected: String = pieces.concat();
        let up = MockUpstream::always(
            openai::stream_text(&pieces, false).paced(Duration::from_millis(150)),
        )
        .await;
        let cfg = ConfigBuilder::new()
            .server("shutdown_grace_secs = 20")
            .openai("up", &up.url("/v1"), "sk-e2e", None)
            .model("m", &[("up", "gpt-up")]);
        let mut gw = TestGateway::start(&cfg.build()).await;
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let mut events = gw.client.open_stream("/v1/chat/completions", &body).await;
        assert_eq!(events.resp.status(), 200);
        let mut text = String::new();
        let first = events.next_json(Duration::from_secs(10)).await;
        text.push_str(
            first["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );

        assert!(
            gw.is_listening(),
            "the gateway holds its listening socket before SIGTERM"
        );
        gw.sigterm();
        // The listener closes (new connections are refused) while the stream drains.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gw.is_listening() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still listening 5 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            up.streams_completed() == 0,
            "the stream must still be running when the listener closes"
        );

        let mut done = false;
        while let Some(e) = events
            .next_event(Duration::from_secs(10))
            .await
            .expect("stream cut by shutdown")
        {
            if e == "data: [DONE]" {
                done = true;
                break;
            }
            let v: serde_json::Value =
                serde_json::from_str(e.strip_prefix("data: ").expect("data event")).unwrap();
            text.push_str(
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default(),
            );
        }
        assert!(done, "the in-flight stream ends with [DONE]");
        assert_eq!(text, expected, "the in-flight stream is complete");
        drop(events);
        let status = gw
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("weir did not exit after SIGTERM");
        assert!(
            status.success(),
            "exit status {status:?}; output:\n{}",
            gw.logs()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_when_idle_exits_promptly() {
    bounded(async {
        let cfg = ConfigBuilder::new()
            .provider("local", "mock", "")
            .model("mock", &[("local", "mock-1")]);
        let mut gw = TestGateway::start(&cfg.build()).await;
        assert_eq!(
            gw.client
                .post_json("/v1/chat/completions", &chat_body("mock", "x"))
                .await
                .status,
            200
        );
        gw.sigterm();
        let status = gw
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("idle weir did not exit within 5 s of SIGTERM");
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_keys_never_reach_logs_or_clients() {
    bounded(async {
        const OPENAI_SECRET: &str = "sk-SECRET-openai-9f8e7d6c5b4a";
        const ANTHROPIC_SECRET: &str = "sk-ant-SECRET-1a2b3c4d5e6f";
        let openai_up = MockUpstream::start().await;
        let anthropic_up = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .log_level("trace")
            .openai("oa", &openai_up.url("/v1"), "${E2E_OPENAI_KEY}", Some(Timeouts::first_byte(300)))
            .anthropic("an", &anthropic_up.url(""), "${E2E_ANTHROPIC_KEY}", Some(Timeouts::first_byte(300)))
            .model("o", &[("oa", "gpt-up")])
            .model("a", &[("an", "claude-up")]);
        let gw = TestGateway::start_with_env(
            &cfg.build(),
            &[("E2E_OPENAI_KEY", OPENAI_SECRET), ("E2E_ANTHROPIC_KEY", ANTHROPIC_SECRET)],
        )
        .await;
        let mut bodies = Vec::new();
        let mut stream = chat_body("o", "x");
        stream["stream"] = json!(true);
        for (model, reply) in [
            ("o", Reply::Auto),
            ("o", Reply::error(401, "invalid api key")),
            ("o", Reply::error(500, "boom")),
            ("o", Reply::Hang),
            ("o", Reply::Raw { status: 200, content_type: "application/json", body: b"{garbage".to_vec() }),
            ("a", Reply::Auto),
            ("a", anthropic::error(401, "authentication_error", "invalid x-api-key")),
            ("a", Reply::Hang),
        ] {
            let up = if model == "o" { &openai_up } else { &anthropic_up };
            up.push(reply);
            bodies.push(gw.client.post_json("/v1/chat/completions", &chat_body(model, "x")).await.text);
        }
        openai_up.push(Reply::error(503, "down"));
        bodies.push(gw.client.post_json("/v1/chat/completions", &stream).await.text);
        bodies.push(gw.client.post_json_with("/v1/messages", &json!({"model": "a", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}), &[("anthropic-version", "2023-06-01")]).await.text);
        bodies.push(gw.client.get("/metrics").await.text);
        bodies.push(gw.client.get("/v1/models").await.text);

        // The keys did go upstream (so the test would catch a leak)...
        assert!(openai_up.requests().iter().any(|r| r.header("authorization") == format!("Bearer {OPENAI_SECRET}")));
        assert!(anthropic_up.requests().iter().any(|r| r.header("x-api-key") == ANTHROPIC_SECRET));
        // ...and nowhere else.
        for secret in [OPENAI_SECRET, ANTHROPIC_SECRET] {
            for b in &bodies {
                assert!(!b.contains(secret), "a response contains a provider key: {b}");
            }
            let logs = gw.logs();
            assert!(!logs.contains(secret), "the logs contain a provider key:\n{logs}");
            assert!(!logs.contains(&secret[8..]), "the logs contain part of a provider key:\n{logs}");
        }
    })
    .await;
}
