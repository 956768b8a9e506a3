//! The request log is complete: every upstream attempt (retries and fallbacks) with its
//! status, `cost_usd` from the gateway's `[prices]` table, and the `key` and `tenant` a
//! plugin put in the request metadata.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::reload::{Managed, admin_section};
use crate::support::dialect::{COMPLETION_TOKENS, PROMPT_TOKENS, openai};
use crate::support::gateway::free_addr;
use crate::support::{ConfigBuilder, Frame, MockUpstream, Reply, Timeouts, bounded, chat_body};

/// Waits until the request log holds the record of `request_id` and returns it.
async fn record(gw: &Managed, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw
            .admin_call(reqwest::Method::GET, "/admin/logs?limit=100")
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

/// A gateway with the admin API on: `builder`'s config plus `extra` (tables appended).
async fn start(builder: ConfigBuilder, extra: &str, prepare: impl FnOnce(&Path)) -> Managed {
    let admin = free_addr();
    let config = format!("{}{}\n{extra}", admin_section(admin, 100), builder.build());
    Managed::start_with(admin, &config, prepare).await
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_logs_both_attempts_and_the_cost_from_prices() {
    bounded(async {
        let primary = MockUpstream::always(Reply::error(503, "primary is down")).await;
        let secondary = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .openai("primary", &primary.url("/v1"), "sk-primary", None)
            .openai("secondary", &secondary.url("/v1"), "sk-secondary", None)
            .model("m", &[("primary", "p-model"), ("secondary", "s-model")])
            .model("priced", &[("primary", "p-model"), ("secondary", "s-model")]);
        // `m` is priced through its upstream model, `priced` by its own name (which wins).
        let prices = "[prices.\"s-model\"]\ninput = 1.5\noutput = 6\n\n[prices.priced]\ninput = 3\noutput = 12\ncached_input = 1\n";
        let gw = start(cfg, prices, |_| {}).await;

        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("m", "fail over"),
                &[("x-request-id", "failover-1")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(primary.hits(), 1);
        assert_eq!(secondary.hits(), 1);

        let rec = record(&gw, "failover-1").await;
        assert_eq!(rec["outcome"], "served");
        assert_eq!(rec["provider"], "secondary");
        assert_eq!(rec["target_model"], "s-model");
        let attempts = rec["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{rec}");
        assert_eq!(attempts[0]["provider"], "primary");
        assert_eq!(attempts[0]["target_model"], "p-model");
        assert_eq!(attempts[0]["status"], 503);
        assert_eq!(attempts[0]["error"], "status");
        assert!(attempts[0]["latency_ms"].is_u64(), "{rec}");
        assert_eq!(attempts[1]["provider"], "secondary");
        assert_eq!(attempts[1]["target_model"], "s-model");
        assert_eq!(attempts[1]["status"], 200);
        assert!(attempts[1].get("error").is_none(), "{rec}");
        assert!(
            !rec.to_string().contains("primary is down"),
            "upstream messages stay out of the log: {rec}"
        );
        assert_eq!(rec["tokens_in"], PROMPT_TOKENS);
        assert_eq!(rec["tokens_out"], COMPLETION_TOKENS);
        let expected = (PROMPT_TOKENS as f64 * 1.5 + COMPLETION_TOKENS as f64 * 6.0) / 1e6;
        let cost = rec["cost_usd"].as_f64().expect("cost_usd");
        assert!(approx(cost, expected), "cost {cost}, expected {expected}");

        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("priced", "fail over"),
                &[("x-request-id", "failover-2")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rec = record(&gw, "failover-2").await;
        assert_eq!(rec["attempts"].as_array().unwrap().len(), 2, "{rec}");
        let expected = (PROMPT_TOKENS as f64 * 3.0 + COMPLETION_TOKENS as f64 * 12.0) / 1e6;
        let cost = rec["cost_usd"].as_f64().expect("cost_usd");
        assert!(approx(cost, expected), "cost {cost}, expected {expected}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_connect_failures_and_unpriced_models_are_logged() {
    bounded(async {
        let (_refusing, addr) = crate::support::gateway::refusing_port();
        let secondary = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .retry(2, 5)
            .openai(
                "primary",
                &format!("http://{addr}/v1"),
                "sk-primary",
                Some(Timeouts::first_byte(2_000)),
            )
            .openai("secondary", &secondary.url("/v1"), "sk-secondary", None)
            .model("m", &[("primary", "p-model"), ("secondary", "s-model")]);
        let gw = start(cfg, "", |_| {}).await;
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("m", "x"),
                &[("x-request-id", "connect-1")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rec = record(&gw, "connect-1").await;
        let attempts = rec["attempts"].as_array().expect("attempts");
        let summary: Vec<(String, u64, Option<String>)> = attempts
            .iter()
            .map(|a| {
                (
                    a["provider"].as_str().unwrap().to_owned(),
                    a["status"].as_u64().unwrap(),
                    a["error"].as_str().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("primary".to_owned(), 0, Some("connect".to_owned())),
                ("primary".to_owned(), 0, Some("connect".to_owned())),
                ("secondary".to_owned(), 200, None),
            ],
            "{rec}"
        );
        assert!(rec.get("cost_usd").is_none(), "no [prices]: no cost: {rec}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_after_its_first_byte_is_the_served_attempt_with_error_stream() {
    bounded(async {
        let up = MockUpstream::always(Reply::Sse(vec![
            Frame::data(&openai::chunk(
                json!({"role": "assistant", "content": "ok"}),
                None,
            )),
            Frame::Bytes(Duration::from_millis(50), String::new()),
            Frame::Abort,
        ]))
        .await;
        let cfg = ConfigBuilder::new()
            .openai("up", &up.url("/v1"), "sk", None)
            .model("m", &[("up", "u-model")]);
        let gw = start(cfg, "", |_| {}).await;
        let mut body = chat_body("m", "x");
        body["stream"] = json!(true);
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &body,
                &[("x-request-id", "broken-1")],
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(r.text.contains("\"error\""), "{}", r.text);
        let rec = record(&gw, "broken-1").await;
        assert_eq!(rec["stream"], true);
        let attempts = rec["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "{rec}");
        assert_eq!(attempts[0]["provider"], "up");
        assert_eq!(attempts[0]["status"], 200);
        assert_eq!(attempts[0]["error"], "stream");
    })
    .await;
}

/// A Lua plugin standing in for auth: it sets the metadata the auth plugin sets.
const TAGGER_LUA: &str = r#"
function on_request(req)
  return { set_metadata = { key = "key_e2e", tenant = "acme" } }
end
"#;

const TAGGER_MANIFEST: &str = r#"name = "tagger"
version = "0.1.0"
kind = "lua"
entry = "plugin.lua"
hooks = ["on-request"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_tenant_come_from_the_request_metadata() {
    bounded(async {
        let cfg = ConfigBuilder::new()
            .provider("local", "mock", "")
            .model("m", &[("local", "mock-1")]);
        let plugins = "[[plugins]]\npath = \"tagger\"\n";
        let gw = start(cfg, plugins, |dir| {
            let d = dir.join("tagger");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("plugin.toml"), TAGGER_MANIFEST).unwrap();
            std::fs::write(d.join("plugin.lua"), TAGGER_LUA).unwrap();
        })
        .await;
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("m", "x"),
                &[("x-request-id", "tagged-1")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rec = record(&gw, "tagged-1").await;
        assert_eq!(rec["key"], "key_e2e");
        assert_eq!(rec["tenant"], "acme");
        let attempts = rec["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "{rec}");
        assert_eq!(attempts[0]["provider"], "local");
        assert_eq!(attempts[0]["target_model"], "mock-1");
        assert_eq!(attempts[0]["status"], 200);
    })
    .await;
}
