//! The `rate-limit` policy (plugins/rate-limit, Lua) through the real gateway, behind the
//! `auth` plugin: RPM per key (the key's own limit from auth), per tenant and per model, TPM
//! reserved at admission and settled with the real usage, 429 with Retry-After and the
//! x-ratelimit-* headers on every response, streams, persistence across a restart, hot
//! reload, and the plugin's offline fixtures.

use std::time::Duration;

use serde_json::json;

use crate::policy_auth::{MOCK_MODELS, PolicyGateway, eventually, plugin_dir, plugin_entry};
use crate::support::{anthropic_error, bounded, chat_body, openai_error};

/// Long windows so a test never straddles two of them.
fn config(limits: &str) -> String {
    config_with(MOCK_MODELS, limits)
}

fn config_with(models: &str, limits: &str) -> String {
    format!(
        "{models}{}{}",
        plugin_entry("auth", ""),
        plugin_entry("rate-limit", &format!("window_secs = 3600\n{limits}"))
    )
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("rate-limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_per_key_answers_429_with_retry_after_and_headers() {
    bounded(async {
        let gw = PolicyGateway::start(&config("key = { rpm = 3 }")).await;
        let (_, limited) = gw.create_key(json!({"name": "two", "rpm": 2})).await;
        let (_, default) = gw.create_key(json!({"name": "default"})).await;
        let body = chat_body("mock", "hello");

        let first = gw.chat(&limited, &body).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(first.header("x-ratelimit-limit-requests"), "2");
        assert_eq!(first.header("x-ratelimit-remaining-requests"), "1");
        assert!(first.header("x-ratelimit-reset-requests").ends_with('s'));
        let second = gw.chat(&limited, &body).await;
        assert_eq!(second.header("x-ratelimit-remaining-requests"), "0");

        let third = gw.chat(&limited, &body).await;
        let err = openai_error(&third, 429);
        assert_eq!(err["code"], "rate_limit_exceeded");
        assert_eq!(err["type"], "rate_limit_error");
        let retry: u64 = third.header("retry-after").parse().expect("Retry-After");
        assert!((1..=3600).contains(&retry));
        assert_eq!(third.header("x-ratelimit-limit-requests"), "2");
        assert_eq!(third.header("x-ratelimit-remaining-requests"), "0");

        // The Anthropic dialect gets its own error shape.
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages",
                &json!({"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
                &[("x-api-key", &limited)],
            )
            .await;
        assert_eq!(anthropic_error(&resp, 429)["type"], "rate_limit_error");
        assert!(!resp.header("retry-after").is_empty());

        // Another key has its own counter and the configured default.
        let other = gw.chat(&default, &body).await;
        assert_eq!(other.status, 200);
        assert_eq!(other.header("x-ratelimit-limit-requests"), "3");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reserved_at_admission_and_settled_with_real_usage() {
    bounded(async {
        // A slow mock keeps the first request in flight while the second arrives.
        let models = MOCK_MODELS.replace("stream_chunks = 5", "stream_chunks = 5\nlatency_ms = 400");
        let gw = PolicyGateway::start(&config_with(&models, "")).await;
        let (_, secret) = gw.create_key(json!({"name": "tpm", "tpm": 1000})).await;
        let big = json!({"model": "mock", "max_tokens": 600, "messages": [{"role": "user", "content": "hello"}]});

        // Too large for the limit at all.
        let huge = json!({"model": "mock", "max_tokens": 5000, "messages": [{"role": "user", "content": "hello"}]});
        let resp = gw.chat(&secret, &huge).await;
        assert!(openai_error(&resp, 429)["message"].as_str().unwrap().contains("too large"));
        assert_eq!(resp.header("x-ratelimit-limit-tokens"), "1000");

        // Two 606-token reservations do not fit in 1000 at once.
        let (a, b) = tokio::join!(gw.chat(&secret, &big), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            gw.chat(&secret, &big).await
        });
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.header("x-ratelimit-remaining-tokens"), "394");
        openai_error(&b, 429);
        assert_eq!(b.header("x-ratelimit-remaining-tokens"), "394");

        // Once the first is settled with its real usage (a handful of tokens), the same
        // request fits again.
        let used = a.json()["usage"]["total_tokens"].as_u64().unwrap();
        assert!(used < 50, "mock usage {used}");
        let client = gw.client.clone();
        let secret2 = secret.clone();
        let expected = (1000 - used - 606).to_string();
        eventually(Duration::from_secs(5), "reservation settled", || {
            let client = client.clone();
            let big = big.clone();
            let secret = secret2.clone();
            let expected = expected.clone();
            async move {
                let r = client
                    .post_json_with("/v1/chat/completions", &big, &[("authorization", &format!("Bearer {secret}"))])
                    .await;
                r.status == 200 && r.header("x-ratelimit-remaining-tokens") == expected
            }
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_model_limits_apply_across_keys() {
    bounded(async {
        let limits = "tenants = { acme = { rpm = 2 } }\nmodels = { \"gpt-4o\" = { rpm = 1 } }";
        let gw = PolicyGateway::start(&config(limits)).await;
        let (_, a) = gw.create_key(json!({"name": "a", "tenant": "acme"})).await;
        let (_, b) = gw.create_key(json!({"name": "b", "tenant": "acme"})).await;
        let (_, c) = gw.create_key(json!({"name": "c", "tenant": "other"})).await;
        let body = chat_body("mock", "hi");
        assert_eq!(gw.chat(&a, &body).await.status, 200);
        assert_eq!(gw.chat(&b, &body).await.status, 200);
        let resp = gw.chat(&b, &body).await;
        let err = openai_error(&resp, 429);
        assert!(
            err["message"].as_str().unwrap().contains("tenant acme"),
            "{err}"
        );
        assert_eq!(gw.chat(&c, &body).await.status, 200);

        // Per model: one request per window for everyone.
        assert_eq!(gw.chat(&c, &chat_body("gpt-4o", "hi")).await.status, 200);
        let resp = gw.chat(&c, &chat_body("gpt-4o", "hi")).await;
        assert!(
            openai_error(&resp, 429)["message"]
                .as_str()
                .unwrap()
                .contains("model gpt-4o")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_the_headers_and_refusals_are_plain_json() {
    bounded(async {
        let gw = PolicyGateway::start(&config("")).await;
        let (_, secret) = gw.create_key(json!({"name": "s", "rpm": 1})).await;
        let body = json!({"model": "mock", "stream": true, "messages": [{"role": "user", "content": "stream me"}]});
        let resp = gw.chat(&secret, &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(resp.header("content-type").starts_with("text/event-stream"));
        assert_eq!(resp.header("x-ratelimit-limit-requests"), "1");
        assert_eq!(resp.header("x-ratelimit-remaining-requests"), "0");
        assert!(resp.text.contains("data: [DONE]"));
        let resp = gw.chat(&secret, &body).await;
        assert!(resp.header("content-type").starts_with("application/json"));
        openai_error(&resp, 429);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_restart_and_limits_hot_reload() {
    bounded(async {
        let mut gw = PolicyGateway::start(&config("key = { rpm = 2 }")).await;
        let (_, secret) = gw.create_key(json!({"name": "k"})).await;
        let body = chat_body("mock", "hi");
        assert_eq!(gw.chat(&secret, &body).await.status, 200);
        assert_eq!(gw.chat(&secret, &body).await.status, 200);
        gw.restart().await;
        openai_error(&gw.chat(&secret, &body).await, 429);

        gw.rewrite(&config("key = { rpm = 10 }"));
        let client = gw.client.clone();
        eventually(Duration::from_secs(10), "the new limit is live", || {
            let client = client.clone();
            let body = body.clone();
            let secret = secret.clone();
            async move {
                let r = client
                    .post_json_with(
                        "/v1/chat/completions",
                        &body,
                        &[("authorization", &format!("Bearer {secret}"))],
                    )
                    .await;
                r.status == 200 && r.header("x-ratelimit-limit-requests") == "10"
            }
        })
        .await;
    })
    .await;
}
