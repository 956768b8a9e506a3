//! The `budget` policy (plugins/budget, Lua) through the real gateway, behind `auth`: the
//! worst case reserved at admission (402 in both dialects), spend settled from real usage
//! and visible in `GET /admin/plugins/budget/usage` and `weir usage`, a stream cut with an error event when
//! it overruns, tenant budgets shared by keys, persistence across a restart, hot reload, and
//! the plugin's offline fixtures.
//!
//! Prices in these tests are 1000 USD per 1M tokens: 0.001 USD a token.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::policy_auth::{
    ADMIN_TOKEN, MOCK_MODELS, PolicyGateway, eventually, plugin_dir, plugin_entry,
};
use crate::support::gateway::WEIR;
use crate::support::{anthropic_error, bounded, openai_error};

const PRICES: &str = "prices = { mock = { input = 1000, output = 1000 } }";

fn config(models: &str, budget: &str) -> String {
    format!(
        "{models}{}{}",
        plugin_entry("auth", ""),
        plugin_entry("budget", &format!("{PRICES}\n{budget}"))
    )
}

fn ask(max_tokens: Option<u64>) -> Value {
    let mut body = json!({"model": "mock", "messages": [{"role": "user", "content": "hello"}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

/// The settled usage line of a key or tenant for a period.
async fn usage(gw: &PolicyGateway, scope: &str, id: &str, period: &str) -> Option<Value> {
    let resp = gw
        .admin
        .call(
            "GET",
            &format!("/admin/plugins/budget/usage?scope={scope}&id={id}&period={period}"),
            None,
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    resp.json()["usage"]
        .as_array()
        .and_then(|l| l.first().cloned())
}

/// Waits until `requests` requests of `scope/id` are settled; returns the line.
async fn settled(gw: &PolicyGateway, scope: &str, id: &str, period: &str, requests: u64) -> Value {
    let mut line = Value::Null;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Some(l) = usage(gw, scope, id, period).await
            && l["requests"].as_u64() == Some(requests)
        {
            line = l;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !line.is_null(),
        "{scope} {id}: {requests} requests never settled"
    );
    line
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("budget"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reserves_the_worst_case_and_usage_reports_spend() {
    bounded(async {
        let gw = PolicyGateway::start(&config(MOCK_MODELS, "")).await;
        let (id, secret) = gw
            .create_key(json!({"name": "b", "budget_usd": 0.05, "budget_period": "day"}))
            .await;

        // (6 prompt + 20) tokens = 0.026 USD reserved of 0.05.
        let first = gw.chat(&secret, &ask(Some(20))).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(first.header("x-weir-budget-remaining-usd"), "0.024000");
        let used = first.json()["usage"]["total_tokens"].as_u64().unwrap();
        let line = settled(&gw, "key", &id, "day", 1).await;
        let spent = used as f64 * 0.001;
        assert!((line["spend_usd"].as_f64().unwrap() - spent).abs() < 1e-9, "{line}");
        assert_eq!(line["tokens"], used);
        // The budget plugin knows spend, not keys: names and budgets are the auth plugin's,
        // joined by `weir usage` (below).
        assert!(line.get("name").is_none(), "{line}");

        // 0.051 worst case on top of what was spent passes the budget: 402, in both dialects.
        let resp = gw.chat(&secret, &ask(Some(45))).await;
        let err = openai_error(&resp, 402);
        assert_eq!(err["code"], "budget_exceeded");
        assert_eq!(err["type"], "insufficient_quota");
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages",
                &json!({"model": "mock", "max_tokens": 45, "messages": [{"role": "user", "content": "hello"}]}),
                &[("x-api-key", &secret)],
            )
            .await;
        assert_eq!(anthropic_error(&resp, 402)["type"], "billing_error");

        // A cheaper request still fits.
        assert_eq!(gw.chat(&secret, &ask(Some(10))).await.status, 200);
        settled(&gw, "key", &id, "day", 2).await;

        // `weir usage` shows the same numbers.
        let out = Command::new(WEIR)
            .args(["usage", "--key", &id])
            .env("WEIR_ADMIN", gw.admin.addr())
            .env("WEIR_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("run weir usage");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&id) && text.contains("total") && text.contains("0.05/day"), "{text}");
        let out = gw.weir(&["usage", "--key", &id, "--period", "day", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let line = &v["usage"][0];
        assert_eq!(line["name"], "b", "{v}");
        assert_eq!(line["budget_usd"], 0.05, "{v}");
        assert_eq!(line["budget_period"], "day", "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_cut_with_an_error_event_when_spend_crosses_the_budget() {
    bounded(async {
        let reply = "lorem ipsum dolor sit amet ".repeat(16);
        let models = MOCK_MODELS.replace(
            "stream_chunks = 5",
            &format!("stream_chunks = 40\nreply = \"{reply}\""),
        );
        let gw = PolicyGateway::start(&config(
            &models,
            "default_max_tokens = 1\nstream_step_tokens = 4",
        ))
        .await;
        let (id, secret) = gw
            .create_key(json!({"name": "s", "budget_usd": 0.03, "budget_period": "total"}))
            .await;
        let mut body = ask(None);
        body["stream"] = json!(true);
        let resp = gw.chat(&secret, &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(
            resp.text.contains("Budget exceeded for key"),
            "{}",
            resp.text
        );
        let text: String = resp
            .text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(
            !text.is_empty() && text.len() < reply.len() / 2,
            "streamed {} of {} chars",
            text.len(),
            reply.len()
        );

        // What was streamed is charged (estimated from the text), and the key is now spent.
        let line = settled(&gw, "key", &id, "total", 1).await;
        let spend = line["spend_usd"].as_f64().unwrap();
        assert!(spend > 0.01 && spend <= 0.035, "{line}");
        openai_error(&gw.chat(&secret, &ask(Some(5))).await, 402);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_budget_is_shared_by_its_keys() {
    bounded(async {
        let gw = PolicyGateway::start(&config(
            MOCK_MODELS,
            "tenants = { acme = { usd = 0.03, period = \"month\" } }",
        ))
        .await;
        let (_, a) = gw.create_key(json!({"name": "a", "tenant": "acme"})).await;
        let (_, b) = gw.create_key(json!({"name": "b", "tenant": "acme"})).await;
        assert_eq!(gw.chat(&a, &ask(Some(5))).await.status, 200);
        settled(&gw, "tenant", "acme", "month", 1).await;
        assert_eq!(gw.chat(&b, &ask(Some(5))).await.status, 200);
        settled(&gw, "tenant", "acme", "month", 2).await;
        let resp = gw.chat(&a, &ask(Some(15))).await;
        let err = openai_error(&resp, 402);
        assert!(
            err["message"].as_str().unwrap().contains("tenant acme"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_a_restart_and_budgets_hot_reload() {
    bounded(async {
        // One answer of max_tokens 1 costs 0.003 USD (2 prompt + 1 output tokens) and admission
        // reserves ~0.007 (estimated prompt + max_tokens): the second request cannot fit.
        let tight = "key_default = { usd = 0.008, period = \"total\" }";
        let mut gw = PolicyGateway::start(&config(MOCK_MODELS, tight)).await;
        let (id, secret) = gw.create_key(json!({"name": "k"})).await;
        assert_eq!(gw.chat(&secret, &ask(Some(1))).await.status, 200);
        let before = settled(&gw, "key", &id, "total", 1).await;
        openai_error(&gw.chat(&secret, &ask(Some(1))).await, 402);

        gw.restart().await;
        let after = usage(&gw, "key", &id, "total")
            .await
            .expect("usage after restart");
        assert_eq!(before["spend_usd"], after["spend_usd"]);
        openai_error(&gw.chat(&secret, &ask(Some(1))).await, 402);

        gw.rewrite(&config(
            MOCK_MODELS,
            "key_default = { usd = 1, period = \"total\" }",
        ));
        let client = gw.client.clone();
        eventually(Duration::from_secs(10), "the larger budget is live", || {
            let client = client.clone();
            let secret = secret.clone();
            async move {
                client
                    .post_json_with(
                        "/v1/chat/completions",
                        &ask(Some(1)),
                        &[("authorization", &format!("Bearer {secret}"))],
                    )
                    .await
                    .status
                    == 200
            }
        })
        .await;
    })
    .await;
}

/// `weir usage` (and `weir keys`) find the budget and auth instances by manifest name:
/// both renamed, the spend and the key's name and budget still show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_usage_works_with_the_instances_renamed() {
    bounded(async {
        let rename = |entry: String, name: &str| {
            entry.replacen(
                "[[plugins]]\n",
                &format!("[[plugins]]\nname = \"{name}\"\n"),
                1,
            )
        };
        let body = format!(
            "{MOCK_MODELS}{}{}",
            rename(plugin_entry("auth", ""), "gatekeeper"),
            rename(plugin_entry("budget", PRICES), "spend"),
        );
        let gw = PolicyGateway::start(&body).await;
        let run = |args: &[&str]| gw.weir(args);
        let created = run(&[
            "keys",
            "create",
            "--name",
            "renamed",
            "--budget-usd",
            "5",
            "--budget-period",
            "month",
            "--json",
        ]);
        let key: Value = serde_json::from_str(&created).expect("JSON");
        let id = key["id"].as_str().unwrap().to_owned();
        let secret = key["secret"].as_str().unwrap().to_owned();
        assert_eq!(gw.chat(&secret, &ask(Some(10))).await.status, 200);
        eventually(Duration::from_secs(10), "the spend is settled", || {
            let out = run(&["usage", "--key", &id, "--period", "month", "--json"]);
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            let line = &v["usage"][0];
            let settled = line["requests"] == 1
                && line["spend_usd"].as_f64().is_some_and(|s| s > 0.0)
                && line["name"] == "renamed"
                && line["budget_usd"] == 5.0;
            async move { settled }
        })
        .await;
    })
    .await;
}
