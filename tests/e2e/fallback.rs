//! Retries and fallback: a model's targets are tried in order on connect errors, timeouts,
//! 429 and 5xx, before the first byte reaches the client; never after, never on other 4xx.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::client::{openai_stream, stream_text};
use crate::support::dialect::openai;
use crate::support::gateway::refusing_port;
use crate::support::{
    ConfigBuilder, Frame, MockUpstream, Reply, TestGateway, Timeouts, bounded, chat_body,
    openai_error,
};

/// A model `m` with targets `primary` then `secondary`, both OpenAI.
async fn two_targets(
    primary_url: &str,
    secondary: &MockUpstream,
    attempts: u32,
    timeouts: Option<Timeouts>,
) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .retry(attempts, 5)
        .openai("primary", primary_url, "sk-primary", timeouts)
        .openai("secondary", &secondary.url("/v1"), "sk-secondary", None)
        .model("m", &[("primary", "p-model"), ("secondary", "s-model")]);
    TestGateway::start(&cfg.build()).await
}

async fn assert_served_by_secondary(gw: &TestGateway, secondary: &MockUpstream) {
    let resp = gw
        .client
        .post_json("/v1/chat/completions", &chat_body("m", "fall back"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    assert_eq!(
        resp.json()["choices"][0]["message"]["content"],
        "Echo: fall back"
    );
    let sent = secondary.single_request();
    assert_eq!(sent.body["model"], "s-model");
    assert_eq!(sent.header("authorization"), "Bearer sk-secondary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_500() {
    bounded(async {
        let primary = MockUpstream::always(Reply::error(500, "primary is down")).await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 1, None).await;
        assert_served_by_secondary(&gw, &secondary).await;
        assert_eq!(primary.hits(), 1);
        assert_eq!(primary.single_request().body["model"], "p-model");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_429() {
    bounded(async {
        let primary = MockUpstream::always(Reply::error(429, "slow down")).await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 1, None).await;
        assert_served_by_secondary(&gw, &secondary).await;
        assert_eq!(primary.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_each_target_then_falls_back() {
    bounded(async {
        let primary = MockUpstream::always(Reply::error(503, "unavailable")).await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 3, None).await;
        assert_served_by_secondary(&gw, &secondary).await;
        assert_eq!(primary.hits(), 3, "attempts_per_target = 3 on the primary");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_the_same_target_succeeds() {
    bounded(async {
        let primary = MockUpstream::start().await;
        primary.push(Reply::error(502, "blip"));
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 2, None).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "retry"))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(primary.hits(), 2, "one failure, one retry");
        assert_eq!(secondary.hits(), 0, "no fallback when the retry succeeds");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_first_byte_timeout() {
    bounded(async {
        let primary =
            MockUpstream::always(openai::chat("too late").after(Duration::from_secs(20))).await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(
            &primary.url("/v1"),
            &secondary,
            1,
            Some(Timeouts::first_byte(300)),
        )
        .await;
        let started = Instant::now();
        assert_served_by_secondary(&gw, &secondary).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}: the first-byte timeout did not fire",
            started.elapsed()
        );
        assert_eq!(primary.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_connection_refused() {
    bounded(async {
        let (_socket, refused) = refusing_port();
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&format!("http://{refused}/v1"), &secondary, 2, None).await;
        assert_served_by_secondary(&gw, &secondary).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_stream_fails_before_first_event() {
    bounded(async {
        // 200 and event-stream headers, then the connection breaks before any event.
        let primary = MockUpstream::always(Reply::Sse(vec![
            Frame::text(": keep-alive\n\n"),
            Frame::Abort,
        ]))
        .await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 1, None).await;
        let mut body = chat_body("m", "stream fallback");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(
            stream_text(&openai_stream(&resp.text)),
            "Echo: stream fallback"
        );
        assert_eq!(primary.hits(), 1);
        assert_eq!(secondary.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_stream_first_byte_times_out() {
    bounded(async {
        // Headers at once, but no event within the first-byte timeout.
        let primary = MockUpstream::always(Reply::Sse(vec![Frame::Bytes(
            Duration::from_secs(20),
            "data: {}\n\n".into(),
        )]))
        .await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(
            &primary.url("/v1"),
            &secondary,
            1,
            Some(Timeouts::first_byte(300)),
        )
        .await;
        let mut body = chat_body("m", "slow start");
        body["stream"] = json!(true);
        let started = Instant::now();
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(stream_text(&openai_stream(&resp.text)), "Echo: slow start");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fallback_on_client_error_4xx() {
    bounded(async {
        let primary = MockUpstream::always(Reply::error(400, "bad temperature")).await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 3, None).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        let err = openai_error(&resp, 400);
        assert!(
            err["message"].as_str().unwrap().contains("bad temperature"),
            "upstream message kept: {err}"
        );
        assert_eq!(primary.hits(), 1, "a 400 is not retried");
        assert_eq!(secondary.hits(), 0, "a 400 does not fall back");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fallback_after_the_first_byte() {
    bounded(async {
        // The primary streams one event, then breaks: the client already has bytes, so the
        // gateway must not start over on the secondary.
        let primary = MockUpstream::always(Reply::Sse(vec![
            Frame::data(&openai::chunk(
                json!({"role": "assistant", "content": "partial"}),
                None,
            )),
            Frame::Bytes(Duration::from_millis(100), String::new()),
            Frame::Abort,
        ]))
        .await;
        let secondary = MockUpstream::start().await;
        let gw = two_targets(&primary.url("/v1"), &secondary, 1, None).await;
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let mut events = gw.client.open_stream("/v1/chat/completions", &body).await;
        assert_eq!(events.resp.status(), 200);
        let first = events.next_json(Duration::from_secs(10)).await;
        assert_eq!(first["choices"][0]["delta"]["content"], "partial");
        // Drain whatever follows (an error event and/or the end of the body).
        while let Ok(Some(_)) = events.next_event(Duration::from_secs(10)).await {}
        assert_eq!(
            secondary.hits(),
            0,
            "no fallback once bytes reached the client"
        );
    })
    .await;
}
