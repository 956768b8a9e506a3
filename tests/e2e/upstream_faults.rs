//! Upstream faults the gateway must report as failures, not as success: streams that stop
//! without their end marker or go quiet, usage chunks written with other spacing, an
//! upstream's `Retry-After`, and non-streamed answers over `max_response_bytes`.
//!
//! Each fault is checked where it shows: the client's body (an error event in its dialect),
//! the request log (status, outcome, attempts), `/metrics` and a plugin's `on_log`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::reload::{Managed, admin_section};
use crate::support::client::named_events;
use crate::support::dialect::{COMPLETION_TOKENS, PROMPT_TOKENS, anthropic, openai};
use crate::support::gateway::free_addr;
use crate::support::{
    ConfigBuilder, Frame, MockUpstream, Reply, anthropic_error, bounded, chat_body, openai_error,
};

const ANTHROPIC_VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

/// A Lua plugin that counts the status and the last attempt's error of every request it
/// sees in `on_log`, as `weir_plugin_counter_total{plugin="probe",name=...}`.
const PROBE_LUA: &str = r#"
function on_log(entry)
  weir.counter("status_" .. entry.status, 1)
  local attempts = entry.attempts
  if attempts ~= nil and #attempts > 0 then
    local last = attempts[#attempts]
    if last.error ~= nil then
      weir.counter("attempt_" .. last.error, 1)
    end
  end
end
"#;

const PROBE_MANIFEST: &str = r#"name = "probe"
version = "0.1.0"
kind = "lua"
entry = "plugin.lua"
hooks = ["on-log"]
"#;

/// A gateway with the admin API (for the request log) and the `probe` plugin.
async fn start(builder: ConfigBuilder) -> Managed {
    let admin = free_addr();
    let config = format!(
        "{}{}\n[[plugins]]\npath = \"probe\"\n",
        admin_section(admin, 100),
        builder.build()
    );
    Managed::start_with(admin, &config, |dir: &Path| {
        let d = dir.join("probe");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("plugin.toml"), PROBE_MANIFEST).unwrap();
        std::fs::write(d.join("plugin.lua"), PROBE_LUA).unwrap();
    })
    .await
}

/// Waits until the request log holds the record of `request_id` and returns it.
async fn record(gw: &Managed, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw
            .admin_call(reqwest::Method::GET, "/admin/logs?limit=200")
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let found = r.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|rec| rec["request_id"] == request_id)
            .cloned();
        if let Some(rec) = found {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "no record for {request_id}: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample of `metric` whose labels include every `labels` pair (0 if none).
async fn metric(gw: &Managed, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = gw.client.get("/metrics").await.text;
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the probe's `on_log` counter `name` reaches `at_least`.
async fn probe_count(gw: &Managed, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = metric(
            gw,
            "weir_plugin_counter_total",
            &[("plugin", "probe"), ("name", name)],
        )
        .await;
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "on_log counter {name} is {n}, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stream_body(model: &str) -> Value {
    let mut body = chat_body(model, "x");
    body["stream"] = json!(true);
    body
}

fn messages_stream_body(model: &str) -> Value {
    json!({"model": model, "max_tokens": 50, "stream": true,
           "messages": [{"role": "user", "content": "x"}]})
}

/// An OpenAI client's stream that broke: content arrived, then one final `data:
/// {"error":...}` event and no `[DONE]`. Returns the error object.
fn assert_openai_stream_failed(body: &str, what: &str) -> Value {
    let events: Vec<&str> = body
        .strip_suffix("\n\n")
        .unwrap_or(body)
        .split("\n\n")
        .collect();
    assert!(
        !events.contains(&"data: [DONE]"),
        "{what}: a broken stream must not claim success with [DONE]:\n{body}"
    );
    let (last, before) = events.split_last().expect("events");
    assert!(
        before.iter().any(|e| e.contains("par")),
        "{what}: the content that arrived is forwarded:\n{body}"
    );
    let data = last
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("{what}: last event is not data: {last:?}"));
    let v: Value = serde_json::from_str(data).expect("error event is JSON");
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("{what}: the stream must end with an error event:\n{body}"))
        .clone();
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    err
}

/// An Anthropic client's stream that broke: an `error` event last, with an `api_error`,
/// and no `message_stop` nor `end_turn`. Returns the error object.
fn assert_anthropic_stream_failed(body: &str, what: &str) -> Value {
    let events = named_events(body);
    let (name, last) = events.last().expect("events");
    assert_eq!(
        name, "error",
        "{what}: the stream must end with an error event:\n{body}"
    );
    assert_eq!(last["error"]["type"], "api_error", "{what}: {last}");
    assert!(
        !events.iter().any(|(n, _)| n == "message_stop"),
        "{what}: a broken stream must not send message_stop:\n{body}"
    );
    assert!(
        !body.contains("end_turn"),
        "{what}: a broken stream must not claim stop_reason end_turn:\n{body}"
    );
    last["error"].clone()
}

/// What a truncated stream of each upstream dialect looks like: content, then the body ends
/// without the dialect's end (no finish reason nor `[DONE]`, no `message_stop`, no
/// `finishReason`).
fn truncated(kind: &str) -> Reply {
    let pieces = ["par".to_owned(), "tial".to_owned()];
    match kind {
        "openai" | "azure" => {
            let mut frames = openai::text_frames(&pieces);
            let finish = frames.pop();
            assert!(finish.is_some(), "the last frame is the finish reason");
            Reply::Sse(frames)
        }
        "anthropic" => Reply::Sse(anthropic::text_frames(&pieces)),
        "gemini" => Reply::Sse(
            pieces
                .iter()
                .map(|p| {
                    Frame::data(&json!({
                        "candidates": [{"content": {"role": "model", "parts": [{"text": p}]}, "index": 0}],
                        "modelVersion": "upstream-gemini",
                    }))
                })
                .collect(),
        ),
        other => panic!("no truncated stream for {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_streams_end_with_an_error_event_and_are_logged_as_upstream_failures() {
    bounded(async {
        let kinds = ["openai", "azure", "anthropic", "gemini"];
        let mut ups = Vec::new();
        let mut cfg = ConfigBuilder::new();
        for kind in kinds {
            let up = MockUpstream::always(truncated(kind)).await;
            let lines = match kind {
                "openai" => format!("base_url = \"{}\"\napi_key = \"sk\"", up.url("/v1")),
                "azure" => format!(
                    "endpoint = \"{}\"\napi_key = \"k\"\napi_version = \"2024-10-21\"\ndeployments = {{ \"u\" = \"dep\" }}",
                    up.url("")
                ),
                _ => format!("base_url = \"{}\"\napi_key = \"k\"", up.url("")),
            };
            cfg = cfg
                .provider(kind, kind, &lines)
                .model(&format!("m-{kind}"), &[(kind, "u")]);
            ups.push(up);
        }
        let gw = start(cfg).await;
        for kind in kinds {
            let model = format!("m-{kind}");
            // OpenAI in: from an OpenAI-dialect upstream this is the pass-through path.
            let id = format!("trunc-openai-{kind}");
            let r = gw
                .client
                .post_json_with(
                    "/v1/chat/completions",
                    &stream_body(&model),
                    &[("x-request-id", &id)],
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            let err = assert_openai_stream_failed(&r.text, &id);
            assert_eq!(err["type"], "api_error", "{id}: {err}");
            // Anthropic in.
            let id = format!("trunc-anthropic-{kind}");
            let r = gw
                .client
                .post_json_with(
                    "/v1/messages",
                    &messages_stream_body(&model),
                    &[("x-request-id", &id), ANTHROPIC_VERSION],
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_anthropic_stream_failed(&r.text, &id);

            for dialect in ["openai", "anthropic"] {
                let id = format!("trunc-{dialect}-{kind}");
                let rec = record(&gw, &id).await;
                assert_eq!(rec["status"], 502, "{id}: {rec}");
                assert_eq!(rec["outcome"], "failed", "{id}: {rec}");
                assert_eq!(rec["error"], "upstream_failed", "{id}: {rec}");
                assert_eq!(rec["attempts"][0]["error"], "stream", "{id}: {rec}");
            }
            let failed = metric(
                &gw,
                "weir_requests_total",
                &[("model", &model), ("status", "502")],
            )
            .await;
            assert_eq!(failed, 2.0, "{model}: both requests count as 502s");
            let served = metric(
                &gw,
                "weir_requests_total",
                &[("model", &model), ("status", "200")],
            )
            .await;
            assert_eq!(served, 0.0, "{model}: nothing counts as served");
        }
        // on_log saw every one of them as a failure.
        probe_count(&gw, "status_502", 8.0).await;
        probe_count(&gw, "attempt_stream", 8.0).await;
        assert_eq!(
            metric(
                &gw,
                "weir_plugin_counter_total",
                &[("plugin", "probe"), ("name", "status_200")]
            )
            .await,
            0.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_stream_ended_by_every_finish_reason_but_no_done_is_complete() {
    bounded(async {
        // Some OpenAI-compatible servers never send [DONE]: the finish reason ends the answer.
        let up = MockUpstream::always(Reply::Sse(openai::text_frames(&["whole".to_owned()]))).await;
        let cfg = ConfigBuilder::new()
            .openai("up", &up.url("/v1"), "sk", None)
            .model("m", &[("up", "u")]);
        let gw = start(cfg).await;
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &stream_body("m"),
                &[("x-request-id", "no-done")],
            )
            .await;
        assert!(r.text.ends_with("data: [DONE]\n\n"), "{}", r.text);
        assert!(!r.text.contains("\"error\""), "{}", r.text);
        let rec = record(&gw, "no-done").await;
        assert_eq!(
            (rec["status"].clone(), rec["outcome"].clone()),
            (json!(200), json!("served"))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_ends_at_the_idle_timeout_with_an_error_event() {
    bounded(async {
        let stall = |gap: Duration| {
            let mut frames = openai::text_frames(&["par".to_owned(), "tial".to_owned()]);
            let tail = frames.split_off(2);
            frames.push(Frame::Bytes(gap, String::new()));
            frames.extend(tail);
            frames.push(openai::done());
            Reply::Sse(frames)
        };
        let stalled = MockUpstream::always(stall(Duration::from_secs(20))).await;
        // Slow but steady: reads 150 ms apart over well more than the idle timeout.
        let steady = MockUpstream::always(
            Reply::Sse({
                let pieces: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
                let mut frames = openai::text_frames(&pieces);
                frames.push(openai::done());
                frames
            })
            .paced(Duration::from_millis(150)),
        )
        .await;
        let timeouts = "timeouts = { connect_ms = 1000, first_byte_ms = 5000, total_ms = 60000, stream_idle_ms = 600 }";
        let cfg = ConfigBuilder::new()
            .provider(
                "stalled",
                "openai",
                &format!("base_url = \"{}\"\n{timeouts}", stalled.url("/v1")),
            )
            .provider(
                "steady",
                "openai",
                &format!("base_url = \"{}\"\n{timeouts}", steady.url("/v1")),
            )
            .model("m", &[("stalled", "u")])
            .model("slow", &[("steady", "u")]);
        let gw = start(cfg).await;

        let started = Instant::now();
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &stream_body("m"),
                &[("x-request-id", "stall-openai")],
            )
            .await;
        let err = assert_openai_stream_failed(&r.text, "stall-openai");
        assert_eq!(err["code"], "upstream_timeout", "{err}");
        let r = gw
            .client
            .post_json_with(
                "/v1/messages",
                &messages_stream_body("m"),
                &[("x-request-id", "stall-anthropic"), ANTHROPIC_VERSION],
            )
            .await;
        assert_anthropic_stream_failed(&r.text, "stall-anthropic");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "two stalls took {:?}: the idle timeout did not end them",
            started.elapsed()
        );
        for id in ["stall-openai", "stall-anthropic"] {
            let rec = record(&gw, id).await;
            assert_eq!(rec["status"], 504, "{id}: {rec}");
            assert_eq!(rec["error"], "upstream_timeout", "{id}: {rec}");
            assert_eq!(rec["attempts"][0]["error"], "stream", "{id}: {rec}");
        }
        probe_count(&gw, "status_504", 2.0).await;

        let r = gw
            .client
            .post_json("/v1/chat/completions", &stream_body("slow"))
            .await;
        assert!(r.text.ends_with("data: [DONE]\n\n"), "{}", r.text);
        assert!(r.text.contains("p7"), "{}", r.text);
        assert!(!r.text.contains("\"error\""), "{}", r.text);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_usage_is_parsed_whatever_its_spacing() {
    bounded(async {
        let mut frames = openai::text_frames(&["spaced".to_owned()]);
        frames.push(Frame::text(&format!(
            "data: {{\"id\": \"chatcmpl-upstream-1\", \"object\": \"chat.completion.chunk\", \"created\": 1700000000, \"model\": \"upstream-gpt\", \"choices\": [], \"usage\": {{ \"prompt_tokens\": {PROMPT_TOKENS}, \"completion_tokens\": {COMPLETION_TOKENS}, \"total_tokens\": {} }}}}\n\n",
            PROMPT_TOKENS + COMPLETION_TOKENS
        )));
        frames.push(openai::done());
        let up = MockUpstream::always(Reply::Sse(frames)).await;
        let cfg = ConfigBuilder::new()
            .openai("up", &up.url("/v1"), "sk", None)
            .model("m", &[("up", "u")]);
        let gw = start(cfg).await;
        for (id, include_usage) in [("usage-no", None), ("usage-false", Some(false)), ("usage-yes", Some(true))] {
            let mut body = stream_body("m");
            if let Some(u) = include_usage {
                body["stream_options"] = json!({"include_usage": u});
            }
            let r = gw
                .client
                .post_json_with("/v1/chat/completions", &body, &[("x-request-id", id)])
                .await;
            let chunks = crate::support::client::openai_stream(&r.text);
            let usage_chunks: Vec<&Value> = chunks
                .iter()
                .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
                .collect();
            if include_usage == Some(true) {
                assert_eq!(usage_chunks.len(), 1, "{id}: {}", r.text);
                assert_eq!(usage_chunks[0]["usage"]["prompt_tokens"], PROMPT_TOKENS);
            } else {
                assert!(
                    usage_chunks.is_empty(),
                    "{id}: the client did not ask for usage: {}",
                    r.text
                );
            }
            let rec = record(&gw, id).await;
            assert_eq!(rec["tokens_in"], PROMPT_TOKENS, "{id}: {rec}");
            assert_eq!(rec["tokens_out"], COMPLETION_TOKENS, "{id}: {rec}");
        }
        assert_eq!(
            metric(&gw, "weir_tokens_total", &[("model", "m"), ("direction", "input")]).await,
            (3 * PROMPT_TOKENS) as f64
        );
    })
    .await;
}

fn rate_limited(retry_after: &str) -> Reply {
    Reply::error(429, "slow down").with_header("retry-after", retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_wait_before_the_retry() {
    bounded(async {
        let up = MockUpstream::start().await;
        up.push(rate_limited("1"));
        let cfg = ConfigBuilder::new()
            .retry(2, 10)
            .openai("up", &up.url("/v1"), "sk", None)
            .model("m", &[("up", "u")]);
        let gw = start(cfg).await;
        let started = Instant::now();
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(up.hits(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "the retry went out after {:?}, before the upstream's Retry-After: 1",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_past_the_cap_skips_the_retry_and_reaches_the_client() {
    bounded(async {
        let up = MockUpstream::always(rate_limited("30")).await;
        let backup = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .retry_lines("attempts_per_target = 3\nbackoff_ms = 10\nmax_retry_after_ms = 2000")
            .openai("up", &up.url("/v1"), "sk", None)
            .openai("backup", &backup.url("/v1"), "sk", None)
            .model("m", &[("up", "u")])
            .model("fallback", &[("up", "u"), ("backup", "b")]);
        let gw = start(cfg).await;
        let started = Instant::now();
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        openai_error(&r, 429);
        assert_eq!(
            r.header("retry-after"),
            "30",
            "the upstream's value: {:?}",
            r.headers
        );
        assert_eq!(
            up.hits(),
            1,
            "30 s is past the 2 s cap: no retry on that target"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        let h = [ANTHROPIC_VERSION];
        let body =
            json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        let r = gw.client.post_json_with("/v1/messages", &body, &h).await;
        anthropic_error(&r, 429);
        assert_eq!(r.header("retry-after"), "30", "{:?}", r.headers);

        // With a fallback, the next target answers at once.
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("fallback", "x"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!((up.hits(), backup.hits()), (3, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_date_retry_after_is_honoured() {
    bounded(async {
        let up = MockUpstream::start().await;
        // Two seconds ahead, in whole seconds: at least one second of wait.
        let at = std::time::SystemTime::now() + Duration::from_secs(2);
        up.push(rate_limited(&httpdate::fmt_http_date(at)));
        let cfg = ConfigBuilder::new()
            .retry(2, 10)
            .openai("up", &up.url("/v1"), "sk", None)
            .model("m", &[("up", "u")]);
        let gw = start(cfg).await;
        let started = Instant::now();
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(up.hits(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "retried after {:?}",
            started.elapsed()
        );
    })
    .await;
}

/// A chat completion whose content is `len` bytes.
fn huge_completion(len: usize) -> Reply {
    openai::chat(&"x".repeat(len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_a_502_in_the_clients_dialect() {
    bounded(async {
        let up = MockUpstream::always(huge_completion(256 * 1024)).await;
        // No content-length: the limit must hold while reading, and stop the reading.
        let endless = MockUpstream::always(Reply::Sse(
            (0..4096)
                .map(|_| Frame::Bytes(Duration::from_millis(1), "x".repeat(16 * 1024)))
                .collect(),
        ))
        .await;
        let small = MockUpstream::always(huge_completion(8 * 1024)).await;
        let limit = "max_response_bytes = 65536";
        let cfg = ConfigBuilder::new()
            .provider(
                "up",
                "openai",
                &format!("base_url = \"{}\"\n{limit}", up.url("/v1")),
            )
            .provider(
                "endless",
                "openai",
                &format!("base_url = \"{}\"\n{limit}", endless.url("/v1")),
            )
            .provider(
                "small",
                "openai",
                &format!("base_url = \"{}\"\n{limit}", small.url("/v1")),
            )
            .model("m", &[("up", "u")])
            .model("endless", &[("endless", "u")])
            .model("small", &[("small", "u")]);
        let gw = start(cfg).await;

        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("m", "x"),
                &[("x-request-id", "big-openai")],
            )
            .await;
        let err = openai_error(&r, 502);
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("max_response_bytes"),
            "{err}"
        );
        let body =
            json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        let r = gw
            .client
            .post_json_with(
                "/v1/messages",
                &body,
                &[("x-request-id", "big-anthropic"), ANTHROPIC_VERSION],
            )
            .await;
        anthropic_error(&r, 502);

        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("endless", "x"),
                &[("x-request-id", "big-endless")],
            )
            .await;
        openai_error(&r, 502);
        endless
            .wait_until(Duration::from_secs(10), "the gateway stops reading", |m| {
                m.streams_dropped() == 1
            })
            .await;
        assert!(
            endless.frames_sent() < 64,
            "the gateway read {} frames of 16 KiB past a 64 KiB limit",
            endless.frames_sent()
        );

        for id in ["big-openai", "big-anthropic", "big-endless"] {
            let rec = record(&gw, id).await;
            assert_eq!(rec["status"], 502, "{id}: {rec}");
            assert_eq!(rec["error"], "upstream_failed", "{id}: {rec}");
            assert_eq!(rec["attempts"][0]["error"], "too_large", "{id}: {rec}");
        }
        probe_count(&gw, "attempt_too_large", 3.0).await;

        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("small", "x"))
            .await;
        assert_eq!(r.status, 200, "under the limit is served: {}", r.text);
    })
    .await;
}
