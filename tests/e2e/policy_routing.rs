//! The `routing` policy (plugins/routing, Lua) through the real gateway: aliases with
//! weighted load balancing, fallback chains and per-target circuit breakers (kept across a
//! restart), latency-aware and cost-aware choice, conditional routes on headers and on the
//! tenant of an `auth` key, streams, hot reload, and the plugin's offline fixtures.

use std::time::Duration;

use serde_json::json;

use crate::policy_auth::{PolicyGateway, plugin_dir, plugin_entry};
use crate::support::{MockUpstream, Reply, bounded, chat_body};

/// Two OpenAI-compatible upstreams `a` and `b`, one attempt per target.
fn providers(a: &MockUpstream, b: &MockUpstream) -> String {
    format!(
        "[retry]\nattempts_per_target = 1\nbackoff_ms = 10\nmax_backoff_ms = 20\n\n\
         [providers.a]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"sk-a\"\n\n\
         [providers.b]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"sk-b\"\n\n\
         [[models]]\nname = \"plain\"\ntargets = [{{ provider = \"a\", model = \"plain\" }}]\n",
        a.url("/v1"),
        b.url("/v1")
    )
}

fn routing(a: &MockUpstream, b: &MockUpstream, config: &str) -> String {
    format!("{}{}", providers(a, b), plugin_entry("routing", config))
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("routing"));
}

const WEIGHTED: &str = r#"aliases.fast = { strategy = "weighted", targets = [
  { provider = "a", model = "a-small", weight = 3 },
  { provider = "b", model = "b-small", weight = 1 },
] }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_alias_splits_traffic_by_weight_and_hot_reloads() {
    bounded(async {
        let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
        let mut gw = PolicyGateway::start(&routing(&a, &b, WEIGHTED)).await;
        for _ in 0..40 {
            let resp = gw
                .client
                .post_json("/v1/chat/completions", &chat_body("fast", "hi"))
                .await;
            assert_eq!(resp.status, 200, "{}", resp.text);
        }
        assert_eq!((a.hits(), b.hits()), (30, 10));
        assert_eq!(a.requests()[0].body["model"], "a-small");
        assert_eq!(b.requests()[0].body["model"], "b-small");
        // A model that is not an alias keeps its configured targets.
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("plain", "hi"))
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(a.hits(), 31);

        // Weights changed in the config file: only b from now on.
        gw.rewrite(&routing(
            &a,
            &b,
            &WEIGHTED.replace("weight = 3", "weight = 0"),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let before = a.hits();
            for _ in 0..8 {
                gw.client
                    .post_json("/v1/chat/completions", &chat_body("fast", "hi"))
                    .await;
            }
            if a.hits() == before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "weight 0 still served after the reload"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_falls_back_then_its_breaker_opens_and_stays_open_across_restart() {
    bounded(async {
        let bad = MockUpstream::always(Reply::error(500, "down")).await;
        let good = MockUpstream::start().await;
        let config = r#"failure_threshold = 2
cooldown_ms = 600000
aliases.chain = { targets = [{ provider = "a", model = "primary" }, { provider = "b", model = "backup" }] }"#;
        let mut gw = PolicyGateway::start(&routing(&bad, &good, config)).await;
        for i in 0..6 {
            let resp = gw.client.post_json("/v1/chat/completions", &chat_body("chain", "hi")).await;
            assert_eq!(resp.status, 200, "request {i}: {}", resp.text);
            // on_log runs after the response: let it record the failure.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(bad.hits(), 2, "the breaker opens after 2 failures");
        assert_eq!(good.hits(), 6);

        gw.restart().await;
        let resp = gw.client.post_json("/v1/chat/completions", &chat_body("chain", "hi")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(bad.hits(), 2, "the open breaker survived the restart");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_aware_alias_prefers_the_faster_target() {
    bounded(async {
        let slow = MockUpstream::always(Reply::Auto.after(Duration::from_millis(250))).await;
        let fast = MockUpstream::start().await;
        let config = r#"aliases.quick = { strategy = "latency", targets = [{ provider = "a", model = "slow" }, { provider = "b", model = "fast" }] }"#;
        let gw = PolicyGateway::start(&routing(&slow, &fast, config)).await;
        for _ in 0..10 {
            let resp = gw.client.post_json("/v1/chat/completions", &chat_body("quick", "hi")).await;
            assert_eq!(resp.status, 200, "{}", resp.text);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert!(slow.hits() <= 2, "slow target got {} of 10", slow.hits());
        assert!(fast.hits() >= 8);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_aware_choice_and_conditional_routes_on_headers_and_tenant() {
    bounded(async {
        let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
        let config = r#"prices = { pricey = { input = 5, output = 15 }, thrifty = { input = 0.1, output = 0.4 } }
aliases.cheap = { strategy = "cost", targets = [{ provider = "a", model = "pricey" }, { provider = "b", model = "thrifty" }] }
aliases.premium = { targets = [{ provider = "a", model = "large" }], fallback = false }
rules = [
  { when = { headers = { "x-tier" = "premium" } }, alias = "premium" },
  { when = { tenant = "vip" }, alias = "premium" },
]"#;
        let body = format!(
            "{}{}{}",
            providers(&a, &b),
            plugin_entry("auth", "allow_anonymous = true"),
            plugin_entry("routing", config)
        );
        let gw = PolicyGateway::start(&body).await;
        for _ in 0..3 {
            gw.client.post_json("/v1/chat/completions", &chat_body("cheap", "hi")).await;
        }
        assert_eq!((a.hits(), b.hits()), (0, 3), "the cheapest target serves");

        let resp = gw
            .client
            .post_json_with("/v1/chat/completions", &chat_body("cheap", "hi"), &[("x-tier", "premium")])
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(a.requests().last().unwrap().body["model"], "large");

        let (_, vip) = gw.create_key(json!({"name": "vip", "tenant": "vip"})).await;
        let resp = gw.chat(&vip, &chat_body("cheap", "hi")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(a.hits(), 2);
        assert_eq!(a.requests().last().unwrap().body["model"], "large");

        // Streams follow the route too.
        let mut stream = chat_body("cheap", "stream");
        stream["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &stream).await;
        assert_eq!(resp.status, 200);
        assert!(resp.text.contains("data: [DONE]"));
        assert_eq!(b.requests().last().unwrap().body["model"], "thrifty");
    })
    .await;
}
