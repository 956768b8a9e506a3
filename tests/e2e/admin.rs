//! The admin API and the CLI that drives it: tokens, status, rollback, generations, the
//! request log (plain and followed).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::reload::{Managed, TOKEN, admin_call, content, mock_config};
use crate::support::gateway::{WEIR, free_addr};
use crate::support::{bounded, chat_body};

/// Waits until the gateway answers `reply`.
async fn wait_reply(gw: &Managed, reply: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        if content(&r) == reply {
            return;
        }
        assert!(Instant::now() < deadline, "never answered {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `weir` CLI against the gateway's admin API.
async fn cli(gw: &Managed, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(WEIR)
        .args(args)
        .arg("--admin")
        .arg(gw.admin_addr.to_string())
        .env("WEIR_ADMIN_TOKEN", TOKEN)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("CLI finished")
        .expect("run CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_rejects_missing_and_wrong_tokens() {
    bounded(async {
        let gw = Managed::start("hello").await;
        for path in ["/admin/status", "/admin/generations", "/admin/logs"] {
            let r = admin_call(&gw.admin, reqwest::Method::GET, path, None).await;
            assert_eq!(r.status, 401, "{path} without a token: {}", r.text);
            assert!(r.header("www-authenticate").starts_with("Bearer"));
            let r = admin_call(
                &gw.admin,
                reqwest::Method::GET,
                path,
                Some("wrong-token-wrong-token"),
            )
            .await;
            assert_eq!(r.status, 401, "{path} with a wrong token: {}", r.text);
            let r = admin_call(
                &gw.admin,
                reqwest::Method::GET,
                path,
                Some(&TOKEN[..TOKEN.len() - 1]),
            )
            .await;
            assert_eq!(r.status, 401, "{path} with a prefix of the token");
        }
        for path in ["/admin/reload", "/admin/rollback/1"] {
            let r = admin_call(&gw.admin, reqwest::Method::POST, path, None).await;
            assert_eq!(r.status, 401, "{path} without a token");
        }
        // Basic auth with the token as password is not a bearer token.
        let r = gw
            .admin
            .http()
            .get(gw.admin.url("/admin/status"))
            .basic_auth("admin", Some(TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);

        let status = gw.status().await;
        assert_eq!(status["generation"].as_u64(), Some(1), "{status}");
        assert_eq!(status["models"][0]["name"], "m");
        assert_eq!(status["providers"]["local"], "mock");
        assert!(
            status["config_path"]
                .as_str()
                .unwrap()
                .ends_with("weir.toml")
        );
        assert!(status["uptime_secs"].is_u64());
        // The admin API is not on the API listener.
        assert_eq!(gw.client.get("/admin/status").await.status, 404);
        let (ok, out) = cli(&gw, &["status"]).await;
        assert!(ok && out.contains("generation  1"), "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_stays_off_without_a_token() {
    bounded(async {
        let admin = free_addr();
        let config = mock_config(admin, "x", "").replace(&format!("token = \"{TOKEN}\"\n"), "");
        let gw = Managed::start_with(admin, &config, |_| {}).await;
        let refused = gw
            .admin
            .http()
            .get(gw.admin.url("/admin/status"))
            .send()
            .await;
        assert!(refused.is_err(), "nothing listens on the admin address");
        assert!(gw.logs().contains("Admin API off"), "{}", gw.logs());
        // A token that is too short is a config error.
        let short = mock_config(admin, "x", "").replace(TOKEN, "short");
        let run = crate::support::gateway::check(&short).await;
        assert!(!run.output.status.success());
        assert!(run.text().contains("admin.token"), "{}", run.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_behaviour() {
    bounded(async {
        let gw = Managed::start("first").await;
        let admin = gw.admin_addr;
        wait_reply(&gw, "first").await;
        gw.write_config(&mock_config(admin, "second", ""));
        wait_reply(&gw, "second").await;
        let status = gw.status().await;
        assert_eq!(status["generation"].as_u64(), Some(2), "{status}");

        let r = gw
            .admin_call(reqwest::Method::POST, "/admin/rollback/1")
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["generation"].as_u64(), Some(3));
        wait_reply(&gw, "first").await;
        let generations = gw
            .admin_call(reqwest::Method::GET, "/admin/generations")
            .await
            .json();
        let newest = &generations["generations"][0];
        assert_eq!(newest["generation"].as_u64(), Some(3), "{generations}");
        assert_eq!(newest["trigger"], "rollback");
        assert_eq!(newest["rollback_of"].as_u64(), Some(1));
        assert_eq!(
            newest["hash"], generations["generations"][2]["hash"],
            "a rollback points at the old content"
        );
        // The rollback sticks: the watcher does not put the file's content back by itself.
        tokio::time::sleep(Duration::from_millis(400)).await;
        wait_reply(&gw, "first").await;

        // The CLI: roll forward to 2 again, then list.
        let (ok, out) = cli(&gw, &["rollback", "2"]).await;
        assert!(ok, "{out}");
        assert!(out.contains("generation 4"), "{out}");
        wait_reply(&gw, "second").await;
        let (ok, out) = cli(&gw, &["generations"]).await;
        assert!(ok && out.contains("rollback to 2"), "{out}");
        // Not kept: 404 with the list of those that are.
        let r = gw
            .admin_call(reqwest::Method::POST, "/admin/rollback/999")
            .await;
        assert_eq!(r.status, 404, "{}", r.text);
        let (ok, out) = cli(&gw, &["rollback", "999"]).await;
        assert!(!ok && out.contains("not kept"), "{out}");
        // A reload from the CLI with nothing changed on disk since generation 2.
        let (ok, out) = cli(&gw, &["reload"]).await;
        assert!(ok && out.contains("unchanged"), "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_log_keeps_one_record_per_request_without_prompts() {
    bounded(async {
        let gw = Managed::start("logged").await;
        let secret = "SECRET-PROMPT-TEXT-4711";
        for i in 0..3 {
            let r = gw
                .client
                .post_json_with(
                    "/v1/chat/completions",
                    &chat_body("m", secret),
                    &[("x-request-id", &format!("log-e2e-{i}"))],
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("nope", secret),
                &[("x-request-id", "log-e2e-404")],
            )
            .await;
        assert_eq!(r.status, 404);

        let deadline = Instant::now() + Duration::from_secs(10);
        let records = loop {
            let r = gw
                .admin_call(reqwest::Method::GET, "/admin/logs?limit=10")
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert!(
                !r.text.contains(secret),
                "prompt text in the request log: {}",
                r.text
            );
            let records = r.json()["records"].as_array().unwrap().clone();
            if records.len() >= 4 {
                break records;
            }
            assert!(
                Instant::now() < deadline,
                "records did not arrive: {records:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let by_id = |id: &str| -> Value {
            records
                .iter()
                .find(|r| r["request_id"] == id)
                .unwrap_or_else(|| panic!("no record for {id}: {records:?}"))
                .clone()
        };
        let ok = by_id("log-e2e-1");
        assert_eq!(ok["status"], 200);
        assert_eq!(ok["model"], "m");
        assert_eq!(ok["provider"], "local");
        assert_eq!(ok["target_model"], "mock-1");
        assert_eq!(ok["outcome"], "served");
        assert_eq!(ok["generation"], 1);
        assert!(ok["tokens_in"].as_u64().unwrap() > 0 && ok["latency_ms"].is_f64());
        let missing = by_id("log-e2e-404");
        assert_eq!(missing["status"], 404);
        assert_eq!(missing["outcome"], "failed");
        // Sequence numbers are dense and `after` pages through them.
        let first = records[0]["seq"].as_u64().unwrap();
        let page = gw
            .admin_call(
                reqwest::Method::GET,
                &format!("/admin/logs?after={first}&limit=2"),
            )
            .await
            .json();
        let seqs: Vec<u64> = page["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![first + 1, first + 2]);

        // Follow: the SSE stream carries a request made after it opened.
        let mut follow = gw
            .admin
            .http()
            .get(gw.admin.url("/admin/logs?follow=true&limit=0"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(follow.status(), 200);
        let r = gw
            .client
            .post_json_with(
                "/v1/chat/completions",
                &chat_body("m", "x"),
                &[("x-request-id", "followed-1")],
            )
            .await;
        assert_eq!(r.status, 200);
        let mut buf = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !buf.contains("followed-1") {
            let chunk = tokio::time::timeout_at(deadline, follow.chunk())
                .await
                .expect("followed record within 10 s")
                .unwrap()
                .expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(
            buf.contains("\ndata: {") || buf.starts_with("id:") || buf.contains("data: {"),
            "{buf}"
        );

        // The CLI prints the same records.
        let out = tokio::process::Command::new(WEIR)
            .args([
                "logs",
                "-n",
                "3",
                "--admin",
                &gw.admin_addr.to_string(),
                "--token",
                TOKEN,
            ])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("followed-1"),
            "{text}"
        );
    })
    .await;
}
