//! The `redaction` policy (plugins/redaction, Rust/WASM) through the real gateway:
//! pseudonymize + restore (JSON and streams split mid-placeholder), masking and hashing,
//! blocking in both dialects, output scanning, no PII in logs, hash stability across a
//! restart, and a hot-reloaded config.
//!
//! The plugin's `plugin.wasm` is built on first use (`scripts/build-plugins.sh`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::policy_auth::{PolicyGateway, eventually, plugin_dir};
use crate::support::client::{named_events, openai_stream, stream_text};
use crate::support::dialect::openai;
use crate::support::{
    ConfigBuilder, MockUpstream, TestGateway, anthropic_error, bounded, chat_body, openai_error,
};

const SALT: &str = "e2e-salt-0123456789abcdef";

fn config(up: &MockUpstream, detectors: &str) -> String {
    let dir = plugin_dir("redaction");
    let base = ConfigBuilder::new()
        .openai("up", &up.url("/v1"), "sk-e2e-upstream", None)
        .model("m", &[("up", "upstream-model")])
        .build();
    format!(
        "{base}\n[[plugins]]\npath = \"{}\"\n[plugins.config]\nsalt = \"{SALT}\"\noutput = \"mask\"\n[plugins.config.detectors]\n{detectors}\n",
        dir.display()
    )
}

const DETECTORS: &str = r#"email = "pseudonymize"
phone = "pseudonymize"
credit_card = "block"
secrets = "block"
ssn = "hash"
"#;

fn user_text(sent: &Value) -> String {
    openai::last_user_text(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonymized_for_the_provider_restored_for_the_client() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&config(&up, DETECTORS)).await;
        let prompt = "Mail ann@corp.example or call +1 415 555 0132; SSN 123-45-6789.";
        let resp = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", prompt))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);

        let sent = user_text(&up.single_request().body);
        assert!(
            sent.starts_with("Mail <EMAIL_1> or call <PHONE_1>; SSN [SSN:"),
            "{sent}"
        );
        assert!(!sent.contains("ann@") && !sent.contains("415") && !sent.contains("6789"));

        // The mock echoes what it received; the client gets its own values back, and the
        // hashed SSN stays hashed.
        let answer = resp.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            answer.starts_with("Echo: Mail ann@corp.example or call +1 415 555 0132; SSN [SSN:"),
            "{answer}"
        );
        let logs = gw.logs();
        for secret in ["ann@corp.example", "555 0132", "123-45-6789"] {
            assert!(!logs.contains(secret), "PII {secret} in the gateway's logs");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_requests_get_a_400_in_the_callers_dialect() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&config(&up, DETECTORS)).await;

        let resp = gw
            .client
            .post_json(
                "/v1/chat/completions",
                &chat_body("m", "charge 4111 1111 1111 1111 please"),
            )
            .await;
        let err = openai_error(&resp, 400);
        assert_eq!(err["code"], "pii_detected");
        assert!(err["message"].as_str().unwrap().contains("credit_card"));
        assert!(!resp.text.contains("4111"), "the value is never echoed");
        assert_eq!(resp.header("x-weir-redaction"), "credit_card");

        let body = json!({
            "model": "m",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "my key is AKIAIOSFODNN7EXAMPLE"}],
        });
        let resp = gw.client.post_json("/v1/messages", &body).await;
        let err = anthropic_error(&resp, 400);
        assert!(
            err["message"].as_str().unwrap().contains("aws_access_key"),
            "{err}"
        );
        assert_eq!(up.hits(), 0, "blocked requests never reach the provider");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_restore_split_placeholders_and_mask_output() {
    bounded(async {
        let up = MockUpstream::start().await;
        let pieces: Vec<String> = [
            "Writing to <EMA",
            "IL_1",
            "> and calling <",
            "PHONE_1>. Spam came from eve@",
            "evil.example",
            ", ignore it.",
        ]
        .map(str::to_owned)
        .to_vec();
        up.set_default(openai::stream_text(&pieces, true));
        let gw = TestGateway::start(&config(&up, DETECTORS)).await;
        let mut body = chat_body("m", "Mail ann@corp.example and call +1 415 555 0132");
        body["stream"] = json!(true);
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let chunks = openai_stream(&resp.text);
        assert_eq!(
            stream_text(&chunks),
            "Writing to ann@corp.example and calling +1 415 555 0132. Spam came from [EMAIL], ignore it."
        );

        // Anthropic clients get the same, in their event shape.
        let body = json!({
            "model": "m", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "Mail ann@corp.example and call +1 415 555 0132"}],
        });
        let resp = gw.client.post_json("/v1/messages", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let text: String = named_events(&resp.text)
            .iter()
            .filter(|(name, _)| name == "content_block_delta")
            .filter_map(|(_, v)| v["delta"]["text"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            text,
            "Writing to ann@corp.example and calling +1 415 555 0132. Spam came from [EMAIL], ignore it."
        );
    })
    .await;
}

/// PII probe 1 (contract 0.2): an image next to PII survives redaction. The user message
/// has a text part with an e-mail and an `image_url` part; the provider gets the text
/// redacted and the image untouched, in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_next_to_pii_survives_redaction() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&config(&up, DETECTORS)).await;
        let image =
            "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk";
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture? Reply to ann@corp.example"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}}
            ]}]
        });
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let sent = &up.single_request().body;
        let parts = sent["messages"][0]["content"]
            .as_array()
            .expect("parts kept");
        assert_eq!(parts.len(), 2, "{sent}");
        assert_eq!(parts[0]["type"], "text");
        let text = parts[0]["text"].as_str().unwrap();
        assert!(
            text.contains("<EMAIL_1>") && !text.contains("ann@"),
            "{text}"
        );
        assert_eq!(parts[1]["type"], "image_url");
        assert_eq!(parts[1]["image_url"]["url"], image);
        assert_eq!(parts[1]["image_url"]["detail"], "low");
    })
    .await;
}

/// PII probe 2 (contract 0.2): PII in tool-call arguments never reaches the upstream, in
/// the OpenAI dialect (assistant `tool_calls[].function.arguments`) and the Anthropic one
/// (`tool_use.input`), and the tool's result is scanned like any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_in_tool_call_arguments_never_reaches_the_upstream() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&config(&up, DETECTORS)).await;
        let openai_body = json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Send the report"},
                {"role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "send_mail", "arguments": "{\"to\":\"bob@corp.example\",\"subject\":\"Q3\"}"}
                }]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sent to bob@corp.example"},
                {"role": "user", "content": "Thanks"}
            ]
        });
        let resp = gw.client.post_json("/v1/chat/completions", &openai_body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let anthropic_body = json!({
            "model": "m",
            "max_tokens": 64,
            "messages": [
                {"role": "user", "content": "Send the report"},
                {"role": "assistant", "content": [{
                    "type": "tool_use", "id": "toolu_1", "name": "send_mail",
                    "input": {"to": "carol@corp.example", "subject": "Q3"}
                }]},
                {"role": "user", "content": [{
                    "type": "tool_result", "tool_use_id": "toolu_1", "content": "sent to carol@corp.example"
                }]}
            ]
        });
        let resp = gw.client.post_json("/v1/messages", &anthropic_body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);

        let sent = up.requests();
        assert_eq!(sent.len(), 2);
        for r in &sent {
            let raw = r.body.to_string();
            assert!(
                !raw.contains("bob@") && !raw.contains("carol@"),
                "an e-mail reached the upstream: {raw}"
            );
        }
        let args = sent[0].body["messages"][1]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap()
            .to_owned();
        let args: Value = serde_json::from_str(&args).expect("arguments stay JSON");
        assert_eq!(args["subject"], "Q3");
        assert!(args["to"].as_str().unwrap().contains("<EMAIL_"), "{args}");
    })
    .await;
}

/// The plugin keeps no state; what must survive a restart is the hash: the same value
/// hashes to the same token, so downstream analytics can join on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_are_stable_across_a_restart() {
    bounded(async {
        let up = MockUpstream::start().await;
        let body = chat_body("m", "SSN 536-22-1475");
        let mut sent = Vec::new();
        for _ in 0..2 {
            let gw = TestGateway::start(&config(&up, DETECTORS)).await;
            let resp = gw.client.post_json("/v1/chat/completions", &body).await;
            assert_eq!(resp.status, 200, "{}", resp.text);
            drop(gw);
        }
        for r in up.requests() {
            sent.push(user_text(&r.body));
        }
        assert_eq!(sent.len(), 2);
        assert!(sent[0].starts_with("SSN [SSN:"), "{}", sent[0]);
        assert_eq!(sent[0], sent[1]);
    })
    .await;
}

/// A new config (here: e-mail masked instead of pseudonymized, cards allowed) is picked up
/// by the file watcher without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_is_hot_reloaded() {
    bounded(async {
        let up = MockUpstream::start().await;
        let mut gw = PolicyGateway::start(&config(&up, DETECTORS)).await;
        let body = chat_body("m", "ann@corp.example paid with 4111 1111 1111 1111");
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 400, "{}", resp.text);

        gw.rewrite(&config(&up, "email = \"mask\"\ncredit_card = \"mask\"\n"));
        let client = gw.client.clone();
        eventually(Duration::from_secs(10), "cards masked after reload", || {
            let client = client.clone();
            let body = body.clone();
            async move { client.post_json("/v1/chat/completions", &body).await.status == 200 }
        })
        .await;
        assert_eq!(
            user_text(&up.requests().last().unwrap().body),
            "[EMAIL] paid with [CREDIT_CARD]"
        );
    })
    .await;
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("redaction"));
}
