//! `weir state export` / `weir state import` between real gateways: a running sled gateway
//! refuses a second opener with advice, exports through its admin API while it serves, and
//! a second gateway started on the imported state authenticates the same key and carries
//! the same spend.
//!
//! Prices are 1000 USD per 1M tokens: 0.001 USD a token.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::policy_auth::{ADMIN_TOKEN, MOCK_MODELS, PolicyGateway, plugin_entry};
use crate::support::gateway::WEIR;
use crate::support::{bounded, openai_error};

fn config() -> String {
    format!(
        "{MOCK_MODELS}{}{}",
        plugin_entry("auth", ""),
        plugin_entry(
            "budget",
            "prices = { mock = { input = 1000, output = 1000 } }"
        )
    )
}

fn ask(max_tokens: u64) -> Value {
    json!({"model": "mock", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello"}]})
}

/// Runs `weir state ARGS` with the admin token in the environment.
fn weir_state(args: &[&str]) -> Output {
    Command::new(WEIR)
        .arg("state")
        .args(args)
        .env("WEIR_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("WEIR_CONFIG")
        .output()
        .expect("run weir state")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The settled total of key `id` once `requests` requests are settled.
async fn spend(gw: &PolicyGateway, id: &str, requests: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = gw
            .admin
            .call(
                "GET",
                &format!("/admin/plugins/budget/usage?scope=key&id={id}&period=total"),
                None,
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let line = resp.json()["usage"][0].clone();
        if line["requests"].as_u64() == Some(requests) {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{requests} requests of {id} never settled: {line}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_spend_move_to_a_new_store_through_the_admin_export() {
    bounded(async {
        let src = PolicyGateway::start(&config()).await;
        let (id, secret) = src
            .create_key(json!({"name": "mover", "budget_usd": 0.05, "budget_period": "total"}))
            .await;
        let first = src.chat(&secret, &ask(20)).await;
        assert_eq!(first.status, 200, "{}", first.text);
        let used = first.json()["usage"]["total_tokens"].as_u64().unwrap();
        let before = spend(&src, &id, 1).await;

        // sled is locked by the running gateway: the CLI says so and says what to do.
        let out = weir_state(&["export", "--config", path_str(&src.config_path())]);
        assert!(!out.status.success());
        let msg = text(&out);
        assert!(msg.contains("in use by another process"), "{msg}");
        assert!(msg.contains("stop the gateway"), "{msg}");
        assert!(
            msg.contains(&format!("--admin {}", src.admin.addr())),
            "{msg}"
        );

        // Through the admin API while it serves.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.jsonl");
        let out = weir_state(&[
            "export",
            "--admin",
            src.admin.addr(),
            "--out",
            path_str(&file),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let export = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<Value> = export
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["format"], "weir-state", "{export}");
        assert_eq!(lines[0]["source_backend"], "sled", "{export}");
        assert_eq!(lines[0]["reserved_kept"], false, "{export}");
        let entries = &lines[1..lines.len() - 1];
        assert_eq!(
            lines.last().unwrap()["end"]["entries"],
            entries.len(),
            "{export}"
        );
        let namespaces: Vec<&str> = entries.iter().filter_map(|e| e["ns"].as_str()).collect();
        assert!(namespaces.contains(&"plugin/auth"), "{namespaces:?}");
        assert!(namespaces.contains(&"plugin/budget"), "{namespaces:?}");
        // The request log (on: the admin API is) stays with its instance.
        assert!(!namespaces.contains(&"weir/request-log"), "{namespaces:?}");
        assert!(!file.with_file_name("state.jsonl.partial").exists());
        // A bad token is refused, and leaves no file behind.
        let refused = Command::new(WEIR)
            .args(["state", "export", "--admin", src.admin.addr(), "--out"])
            .arg(dir.path().join("refused.jsonl"))
            .env("WEIR_ADMIN_TOKEN", "not-the-token-0123456789")
            .output()
            .unwrap();
        assert!(!refused.status.success());
        assert!(text(&refused).contains("401"), "{}", text(&refused));
        assert!(!dir.path().join("refused.jsonl").exists());

        // Into a second config's fresh sled directory: a dry run writes nothing...
        let mut dst = PolicyGateway::unstarted(&config());
        let dst_config = dst.config_path();
        let import = |extra: &[&str]| {
            let mut args = vec![
                "import",
                "--config",
                path_str(&dst_config),
                "--in",
                path_str(&file),
            ];
            args.extend_from_slice(extra);
            weir_state(&args)
        };
        let out = import(&["--dry-run"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("dry run"), "{}", text(&out));
        let out = import(&[]);
        assert!(out.status.success(), "{}", text(&out));
        let report = text(&out);
        let total = report
            .lines()
            .find(|l| l.trim_start().starts_with("total"))
            .unwrap();
        let numbers: Vec<u64> = total
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(numbers[0], entries.len() as u64, "{report}");
        // ...and a second import skips every key the store now holds.
        let out = import(&[]);
        let again = text(&out);
        let total = again
            .lines()
            .find(|l| l.trim_start().starts_with("total"))
            .unwrap();
        let numbers: Vec<u64> = total
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(numbers[..3], [0, 0, entries.len() as u64], "{again}");

        // A gateway on the imported state: the key authenticates, and its spend came along.
        dst.launch().await;
        let after = spend(&dst, &id, 1).await;
        assert_eq!(after["spend_usd"], before["spend_usd"], "{after}");
        openai_error(&dst.chat("wk-not-a-key", &ask(1)).await, 401);
        // This worst case fits the whole budget but not what is left of it after the
        // carried-over spend: refused only because the spend moved.
        assert!(used >= 1);
        openai_error(&dst.chat(&secret, &ask(45 - used)).await, 402);
        let resp = dst.chat(&secret, &ask(1)).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
    })
    .await;
}

/// Counts from the `total` line of an import report: imported, overwritten, skipped.
fn totals(report: &str) -> Vec<u64> {
    report
        .lines()
        .find(|l| l.trim_start().starts_with("total"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_moves_to_redis_and_back() {
    bounded(async {
        let redis = crate::shared_state::RedisServer::start();
        let src = PolicyGateway::start(&config()).await;
        let (id, secret) = src
            .create_key(json!({"name": "mover", "budget_usd": 0.5, "budget_period": "total"}))
            .await;
        assert_eq!(src.chat(&secret, &ask(20)).await.status, 200);
        let before = spend(&src, &id, 1).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sled.jsonl");
        let out = weir_state(&[
            "export",
            "--admin",
            src.admin.addr(),
            "--out",
            path_str(&file),
        ]);
        assert!(out.status.success(), "{}", text(&out));

        // sled -> Redis, imported while nothing runs on it, then two gateways on Redis.
        let mut on_redis = PolicyGateway::unstarted_with_state(&config(), &redis.state(""));
        let out = weir_state(&[
            "import",
            "--config",
            path_str(&on_redis.config_path()),
            "--in",
            path_str(&file),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(totals(&text(&out))[0] > 0, "{}", text(&out));
        on_redis.launch().await;
        let second = PolicyGateway::start_with_state(&config(), &redis.state("")).await;
        for gw in [&on_redis, &second] {
            let line = spend(gw, &id, 1).await;
            assert_eq!(line["spend_usd"], before["spend_usd"], "{line}");
        }
        for gw in [&on_redis, &second] {
            assert_eq!(gw.chat(&secret, &ask(5)).await.status, 200);
        }
        let moved = spend(&second, &id, 3).await;

        // Redis is not locked: export straight from its config, back into a fresh sled.
        let back = dir.path().join("redis.jsonl");
        let out = weir_state(&[
            "export",
            "--config",
            path_str(&on_redis.config_path()),
            "--out",
            path_str(&back),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let header: Value = serde_json::from_str(
            std::fs::read_to_string(&back)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["source_backend"], "redis");
        let mut on_sled = PolicyGateway::unstarted(&config());
        let out = weir_state(&[
            "import",
            "--config",
            path_str(&on_sled.config_path()),
            "--in",
            path_str(&back),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        on_sled.launch().await;
        let line = spend(&on_sled, &id, 3).await;
        assert_eq!(line["spend_usd"], moved["spend_usd"], "{line}");
        assert_eq!(on_sled.chat(&secret, &ask(5)).await.status, 200);
    })
    .await;
}
