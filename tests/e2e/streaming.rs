//! Streaming through an OpenAI upstream: exact SSE framing, the usage chunk, tool-call
//! deltas, chunks forwarded as they arrive, and client disconnects.

use std::time::Duration;

use serde_json::{Value, json};

use crate::openai::gateway_for;
use crate::support::client::{openai_stream, stream_finish_reason, stream_text, stream_tool_calls};
use crate::support::dialect::{TWO_CALLS, openai};
use crate::support::{MockUpstream, bounded, chat_body, openai_tools};

fn stream_body(text: &str, include_usage: Option<bool>) -> Value {
    let mut body = chat_body("m", text);
    body["stream"] = json!(true);
    if let Some(u) = include_usage {
        body["stream_options"] = json!({"include_usage": u});
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_has_exact_framing_and_no_usage_unless_asked() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &stream_body("stream me", None))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(
            resp.header("content-type").starts_with("text/event-stream"),
            "{:?}",
            resp.headers
        );
        let chunks = openai_stream(&resp.text);
        assert_eq!(stream_text(&chunks), "Echo: stream me");
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("stop"));
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk", "{c}");
            assert!(
                c.get("usage").is_none_or(Value::is_null),
                "no usage chunk was asked for: {c}"
            );
            assert_eq!(
                c["choices"].as_array().map(Vec::len),
                Some(1),
                "every chunk has its choice: {c}"
            );
        }
        assert_eq!(up.single_request().body["stream"], true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ends_with_usage_chunk_when_asked() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &stream_body("count me", Some(true)))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = openai_stream(&resp.text);
        assert_eq!(stream_text(&chunks), "Echo: count me");
        let with_usage: Vec<&Value> = chunks
            .iter()
            .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
            .collect();
        assert_eq!(with_usage.len(), 1, "exactly one usage chunk: {chunks:#?}");
        let last = chunks.last().unwrap();
        assert_eq!(
            last["usage"]["prompt_tokens"], 11,
            "the usage chunk is last: {last}"
        );
        assert_eq!(last["usage"]["completion_tokens"], 7);
        assert_eq!(
            last["choices"],
            json!([]),
            "the usage chunk has no choices: {last}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_include_usage_false_has_no_usage_chunk() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = gateway_for(&up).await;
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &stream_body("x", Some(false)))
            .await;
        let chunks = openai_stream(&resp.text);
        assert!(
            chunks
                .iter()
                .all(|c| c.get("usage").is_none_or(Value::is_null)),
            "{chunks:#?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_streamed_in_parallel() {
    bounded(async {
        let up = MockUpstream::always(openai::stream_tool_calls(&TWO_CALLS)).await;
        let gw = gateway_for(&up).await;
        let mut body = stream_body("weather and time?", None);
        body["tools"] = openai_tools();
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = openai_stream(&resp.text);
        let calls = stream_tool_calls(&chunks);
        assert_eq!(calls.len(), 2, "{chunks:#?}");
        for (got, want) in calls.iter().zip(TWO_CALLS) {
            assert_eq!(got.id, want.id);
            assert_eq!(got.name, want.name);
            assert_eq!(got.args, want.args);
        }
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("tool_calls"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_are_forwarded_as_they_arrive() {
    bounded(async {
        let pieces: Vec<String> = (0..6).map(|i| format!("p{i} ")).collect();
        let up = MockUpstream::always(openai::stream_text(&pieces, false).paced(Duration::from_millis(300))).await;
        let gw = gateway_for(&up).await;
        let mut events = gw.client.open_stream("/v1/chat/completions", &stream_body("slow", None)).await;
        assert_eq!(events.resp.status(), 200);
        let first = events.next_json(Duration::from_secs(10)).await;
        assert!(first["choices"].is_array(), "{first}");
        let total_frames = pieces.len() + 3;
        assert!(
            up.frames_sent() < total_frames,
            "the first chunk reached the client only after the upstream sent all {total_frames} frames: the stream was buffered"
        );
        while let Some(e) = events.next_event(Duration::from_secs(10)).await.expect("stream") {
            if e == "data: [DONE]" {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_stream() {
    bounded(async {
        let pieces: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
        let up = MockUpstream::always(
            openai::stream_text(&pieces, false).paced(Duration::from_millis(50)),
        )
        .await;
        let gw = gateway_for(&up).await;
        let mut events = gw
            .client
            .open_stream("/v1/chat/completions", &stream_body("long", None))
            .await;
        assert_eq!(events.resp.status(), 200);
        for _ in 0..3 {
            events.next_json(Duration::from_secs(10)).await;
        }
        drop(events);
        up.wait_until(
            Duration::from_secs(10),
            "the upstream stream to be dropped after the client left",
            |m| m.streams_dropped() == 1,
        )
        .await;
        assert_eq!(up.streams_completed(), 0);
        assert!(
            up.frames_sent() < 100,
            "upstream kept streaming: {} frames",
            up.frames_sent()
        );
        // The gateway survives and serves the next request.
        up.set_default(openai::chat("still here"));
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "again"))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
    })
    .await;
}
