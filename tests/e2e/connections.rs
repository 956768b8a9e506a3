//! Connection limits (issue 15, item 2): clients that send nothing, stop halfway through a
//! head or a body, or sit idle on a kept-alive connection are disconnected after the
//! configured timeouts; at `max_connections` the gateway stops accepting, and the clients
//! waiting in the backlog are served once idle connections time out.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{ConfigBuilder, RawConn, TestGateway, bounded, chat_body};

/// A gateway on the offline mock with these `[server]` lines.
async fn gateway(server: &str) -> TestGateway {
    let cfg = ConfigBuilder::new()
        .server(server)
        .provider("local", "mock", "")
        .model("m", &[("local", "mock-1")]);
    TestGateway::start(&cfg.build()).await
}

/// Closed by the gateway, not by the test's wait, within `(min, max)` of the read's start.
fn assert_closed_within(ending: &crate::support::raw::Ending, min: Duration, max: Duration) {
    assert!(
        ending.closed,
        "the gateway kept the connection open for {:?}; it sent {:?}",
        ending.after,
        String::from_utf8_lossy(&ending.bytes)
    );
    assert!(
        ending.after >= min && ending.after <= max,
        "closed after {:?}, expected between {min:?} and {max:?}",
        ending.after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_disconnected_after_the_header_timeout() {
    bounded(async {
        let gw = gateway("header_read_timeout_secs = 1\nkeepalive_timeout_secs = 30").await;
        let mut conn = RawConn::connect(gw.addr()).await;
        let ending = conn.read_to_close(Duration::from_secs(6)).await;
        assert_closed_within(&ending, Duration::from_millis(800), Duration::from_secs(4));
        assert_eq!(gw.client.get("/healthz").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_halfway_through_its_headers_is_disconnected() {
    bounded(async {
        let gw = gateway("header_read_timeout_secs = 1\nkeepalive_timeout_secs = 30").await;
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\ncontent-type: appl")
            .await;
        let ending = conn.read_to_close(Duration::from_secs(6)).await;
        assert_closed_within(&ending, Duration::from_millis(800), Duration::from_secs(4));
        // Dripping bytes does not reset the head's clock.
        let mut conn = RawConn::connect(gw.addr()).await;
        let started = Instant::now();
        let drip = async {
            for b in b"GET /healthz HTTP/1.1\r\nhost: weir\r\nx-slow: abcdefghij" {
                if conn.try_send(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(8), drip).await;
        let ending = conn.read_to_close(Duration::from_secs(6)).await;
        assert!(ending.closed, "a dripping head was held open");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a dripping head was held for {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_halfway_through_its_body_gets_a_408_and_is_disconnected() {
    bounded(async {
        let gw = gateway("body_read_timeout_secs = 1").await;
        for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
            let mut conn = RawConn::connect(gw.addr()).await;
            let head = format!(
                "POST {path} HTTP/1.1\r\nhost: weir\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n"
            );
            conn.send(head.as_bytes()).await;
            conn.send(br#"{"model": "m", "messages": ["#).await;
            let ending = conn.read_to_close(Duration::from_secs(6)).await;
            assert_closed_within(&ending, Duration::from_millis(800), Duration::from_secs(4));
            assert_eq!(ending.status(), Some(408), "{path}: {ending:?}");
            let body = ending.json();
            if anthropic {
                assert_eq!(body["type"], "error", "{body}");
                assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            } else {
                assert_eq!(body["error"]["code"], "body_timeout", "{body}");
                assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            }
        }
        // A body that keeps coming, if slowly, is read to the end.
        let mut conn = RawConn::connect(gw.addr()).await;
        let body = chat_body("m", "slow but steady").to_string();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.send(head.as_bytes()).await;
        for part in body.as_bytes().chunks(body.len() / 3 + 1) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            conn.send(part).await;
        }
        let resp = conn.read_response(Duration::from_secs(5)).await;
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&resp)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() {
    bounded(async {
        // The head timeout is long, so only the keep-alive timeout can close it.
        let gw = gateway("header_read_timeout_secs = 20\nkeepalive_timeout_secs = 1").await;
        let mut conn = RawConn::connect(gw.addr()).await;
        conn.send(b"GET /healthz HTTP/1.1\r\nhost: weir\r\n\r\n")
            .await;
        let resp = conn.read_response(Duration::from_secs(5)).await;
        assert!(resp.starts_with(b"HTTP/1.1 200"));
        // Kept alive: a second request on the same connection is answered.
        conn.send(b"GET /healthz HTTP/1.1\r\nhost: weir\r\n\r\n")
            .await;
        let resp = conn.read_response(Duration::from_secs(5)).await;
        assert!(resp.starts_with(b"HTTP/1.1 200"));
        let ending = conn.read_to_close(Duration::from_secs(8)).await;
        assert!(ending.bytes.is_empty(), "{ending:?}");
        assert_closed_within(&ending, Duration::from_millis(800), Duration::from_secs(4));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_clients_wait_and_are_served_once_idle_ones_time_out() {
    bounded(async {
        let gw = gateway("max_connections = 2\nheader_read_timeout_secs = 1").await;
        // Four silent clients: two take the slots, two wait in the backlog behind them.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(RawConn::connect(gw.addr()).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let resp = gw.client.post_json("/v1/chat/completions", &chat_body("m", "hi")).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(700),
            "answered after {waited:?}: the cap of 2 did not hold the request back"
        );
        assert!(waited < Duration::from_secs(10), "answered after {waited:?}");
        let logs = gw.logs();
        assert!(
            logs.contains("Connection cap reached") && logs.contains("max_connections"),
            "no cap warning in the logs:\n{logs}"
        );
        // Rate-limited: one warning for the whole episode, not one per waiting client.
        assert_eq!(logs.matches("Connection cap reached").count(), 1, "{logs}");
        drop(idle);
        let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        let resp = gw
            .client
            .post_json_with("/v1/messages", &body, &[("anthropic-version", "2023-06-01")])
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
    })
    .await;
}
