//! The `cache` policy (plugins/cache, Lua) through the real gateway: misses then hits
//! (JSON, replayed OpenAI and Anthropic streams), streamed answers stored and served as
//! JSON, opt-outs, errors never cached, the size bound, TTL, persistence across a restart
//! and a hot-reloaded config.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::policy_auth::{PolicyGateway, eventually, plugin_dir, plugin_entry};
use crate::support::client::{named_events, openai_stream, stream_finish_reason, stream_text};
use crate::support::dialect::openai;
use crate::support::{ConfigBuilder, MockUpstream, Reply, bounded, chat_body};

fn body(up: &MockUpstream, cache_config: &str) -> String {
    let base = ConfigBuilder::new()
        .openai("up", &up.url("/v1"), "sk-e2e-upstream", None)
        .model("m", &[("up", "upstream-model")])
        .build();
    format!("{base}{}", plugin_entry("cache", cache_config))
}

fn content(resp: &Value) -> String {
    resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn chat(gw: &PolicyGateway, body: &Value, headers: &[(&str, &str)]) -> crate::support::Resp {
    gw.client
        .post_json_with("/v1/chat/completions", body, headers)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_stored_and_served_as_json_and_as_replayed_streams() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = PolicyGateway::start(&body(&up, "")).await;
        let mut req = chat_body("m", "what is a weir?");
        req["temperature"] = json!(0.2);

        let first = chat(&gw, &req, &[]).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(first.header("x-weir-cache"), "miss");
        assert_eq!(content(&first.json()), "Echo: what is a weir?");

        // Same request, another `user`: a hit, the provider is not called again.
        req["user"] = json!("someone-else");
        let second = chat(&gw, &req, &[]).await;
        assert_eq!(second.status, 200, "{}", second.text);
        assert_eq!(second.header("x-weir-cache"), "hit");
        assert!(second.header("content-type").starts_with("application/json"));
        let v = second.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(content(&v), "Echo: what is a weir?");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], first.json()["usage"]["prompt_tokens"]);
        assert_eq!(up.hits(), 1);

        // The same request streamed: a replayed OpenAI stream.
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let streamed = chat(&gw, &req, &[]).await;
        assert_eq!(streamed.status, 200, "{}", streamed.text);
        assert_eq!(streamed.header("x-weir-cache"), "hit");
        assert!(streamed.header("content-type").starts_with("text/event-stream"));
        let chunks = openai_stream(&streamed.text);
        assert_eq!(stream_text(&chunks), "Echo: what is a weir?");
        assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("stop"));
        assert!(chunks.last().unwrap()["usage"]["completion_tokens"].is_u64());
        assert_eq!(up.hits(), 1);

        // A different sampling parameter is another entry.
        req["temperature"] = json!(0.9);
        req["stream"] = json!(false);
        let other = chat(&gw, &req, &[]).await;
        assert_eq!(other.header("x-weir-cache"), "miss");
        assert_eq!(up.hits(), 2);

        // Anthropic clients: a miss, then a replayed Messages stream.
        let msg = json!({"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hello claude"}]});
        let a = gw.client.post_json("/v1/messages", &msg).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.header("x-weir-cache"), "miss");
        let mut streamed = msg.clone();
        streamed["stream"] = json!(true);
        let b = gw.client.post_json("/v1/messages", &streamed).await;
        assert_eq!(b.header("x-weir-cache"), "hit", "{}", b.text);
        let events = named_events(&b.text);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        let text: String = events
            .iter()
            .filter_map(|(_, v)| v["delta"]["text"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, "Echo: hello claude");
        let c = gw.client.post_json("/v1/messages", &msg).await;
        assert_eq!(c.header("x-weir-cache"), "hit");
        assert_eq!(c.json()["content"][0]["text"], "Echo: hello claude");
        assert_eq!(c.json()["stop_reason"], "end_turn");
        assert_eq!(up.hits(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_stored_and_served_as_json() {
    bounded(async {
        let up = MockUpstream::start().await;
        let pieces: Vec<String> = ["The ", "answer ", "is ", "42."]
            .map(str::to_owned)
            .to_vec();
        up.set_default(openai::stream_text(&pieces, true));
        let gw = PolicyGateway::start(&body(&up, "")).await;
        let mut req = chat_body("m", "the answer?");
        req["stream"] = json!(true);
        let first = chat(&gw, &req, &[]).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.header("x-weir-cache"), "miss");
        assert_eq!(
            stream_text(&openai_stream(&first.text)),
            "The answer is 42."
        );

        // Stored by on_log, after the response: poll.
        req["stream"] = json!(false);
        let client = gw.client.clone();
        let r = req.clone();
        // A poll that comes before on_log stored the answer misses and goes upstream itself.
        let misses = Arc::new(AtomicUsize::new(0));
        eventually(
            Duration::from_secs(10),
            "the streamed answer is cached",
            || {
                let client = client.clone();
                let r = r.clone();
                let misses = misses.clone();
                async move {
                    let resp = client.post_json("/v1/chat/completions", &r).await;
                    if resp.header("x-weir-cache") == "miss" {
                        misses.fetch_add(1, Ordering::SeqCst);
                    }
                    resp.header("x-weir-cache") == "hit"
                        && content(&resp.json()) == "The answer is 42."
                }
            },
        )
        .await;
        assert_eq!(up.hits(), 1 + misses.load(Ordering::SeqCst));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_outs_and_errors_are_never_cached() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = PolicyGateway::start(&body(&up, "")).await;
        let req = chat_body("m", "do not keep this");
        for headers in [
            [("cache-control", "no-store")],
            [("x-weir-cache", "skip")],
            [("cache-control", "max-age=0, no-store")],
        ] {
            let resp = chat(&gw, &req, &headers).await;
            assert_eq!(resp.status, 200);
            assert_eq!(resp.header("x-weir-cache"), "skip");
        }
        assert_eq!(up.hits(), 3, "opted-out requests always reach the provider");
        // Nor were they stored.
        let resp = chat(&gw, &req, &[]).await;
        assert_eq!(resp.header("x-weir-cache"), "miss");

        // Errors: a 500 is answered, not stored; the next identical request goes upstream.
        let failing = chat_body("m", "this fails");
        up.push(Reply::error(500, "upstream exploded"));
        let resp = chat(&gw, &failing, &[]).await;
        assert!(resp.status >= 500, "{}", resp.text);
        let resp = chat(&gw, &failing, &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.header("x-weir-cache"), "miss");
        assert_eq!(up.hits(), 6);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_bound_evicts_the_oldest_and_entries_expire() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = PolicyGateway::start(&body(&up, "max_entries = 3\nttl_secs = 2")).await;
        for i in 0..5 {
            let resp = chat(&gw, &chat_body("m", &format!("question {i}")), &[]).await;
            assert_eq!(resp.header("x-weir-cache"), "miss");
        }
        // Entries 2, 3, 4 are kept; 0 and 1 were evicted.
        let recent = chat(&gw, &chat_body("m", "question 4"), &[]).await;
        assert_eq!(recent.header("x-weir-cache"), "hit");
        let evicted = chat(&gw, &chat_body("m", "question 0"), &[]).await;
        assert_eq!(evicted.header("x-weir-cache"), "miss");
        // TTL: after two seconds everything is gone.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let expired = chat(&gw, &chat_body("m", "question 4"), &[]).await;
        assert_eq!(expired.header("x-weir-cache"), "miss");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_a_restart() {
    bounded(async {
        let up = MockUpstream::start().await;
        let mut gw = PolicyGateway::start(&body(&up, "")).await;
        let req = chat_body("m", "remember me");
        assert_eq!(chat(&gw, &req, &[]).await.header("x-weir-cache"), "miss");
        gw.restart().await;
        let resp = chat(&gw, &req, &[]).await;
        assert_eq!(resp.header("x-weir-cache"), "hit");
        assert_eq!(content(&resp.json()), "Echo: remember me");
        assert_eq!(up.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_is_hot_reloaded() {
    bounded(async {
        let up = MockUpstream::start().await;
        let mut gw = PolicyGateway::start(&body(&up, "")).await;
        let mut req = chat_body("m", "temperature does not matter");
        req["temperature"] = json!(0.1);
        assert_eq!(chat(&gw, &req, &[]).await.header("x-weir-cache"), "miss");
        req["temperature"] = json!(0.2);
        assert_eq!(chat(&gw, &req, &[]).await.header("x-weir-cache"), "miss");

        // Now ignore `temperature` in the key.
        gw.rewrite(&body(
            &up,
            "ignore_fields = [\"stream\", \"stream_options\", \"user\", \"temperature\"]",
        ));
        let client = gw.client.clone();
        let mut t = 0.3;
        eventually(
            Duration::from_secs(10),
            "temperature ignored after reload",
            || {
                t += 0.01;
                let client = client.clone();
                let mut a = req.clone();
                a["temperature"] = json!(t);
                let mut b = req.clone();
                b["temperature"] = json!(t + 0.5);
                async move {
                    client.post_json("/v1/chat/completions", &a).await;
                    client
                        .post_json("/v1/chat/completions", &b)
                        .await
                        .header("x-weir-cache")
                        == "hit"
                }
            },
        )
        .await;
    })
    .await;
}

/// 1,000 concurrent requests over 100 prompts with room for 50 entries: evictions race with
/// hits and stores, and still every client gets the answer to its own question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_get_another_prompts_answer() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = PolicyGateway::start(&body(&up, "max_entries = 50")).await;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1000)
            .no_proxy()
            .build()
            .unwrap();
        let url = gw.client.url("/v1/chat/completions");
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let http = http.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let prompt = format!("prompt number {}", i % 100);
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(chat_body("m", &prompt).to_string())
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    let cache = resp
                        .headers()
                        .get("x-weir-cache")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                    (status, cache, prompt, content(&v))
                })
            })
            .collect();
        let mut hits = 0;
        for t in tasks {
            let (status, cache, prompt, answer) = t.await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(answer, format!("Echo: {prompt}"));
            if cache == "hit" {
                hits += 1;
            }
        }
        assert_eq!(hits + up.hits(), 1000);
    })
    .await;
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("cache"));
}
