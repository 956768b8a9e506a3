//! Runs `on_log` natively against `tests/log_entry.json` with the SDK's fake host.
//!
//! cargo test --manifest-path examples/audit-logger/Cargo.toml

use audit_logger::{AuditLogger, Summary};
use serde_json::Value;
use weir_sdk::testing::{self, Harness};
use weir_sdk::{Attempt, LogEntry, Usage};

fn entry() -> LogEntry {
    let path = format!("{}/tests/log_entry.json", env!("CARGO_MANIFEST_DIR"));
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let usage = &v["usage"];
    LogEntry {
        request_id: text("request_id"),
        model: text("model"),
        provider: text("provider"),
        target_model: text("target_model"),
        status: v["status"].as_u64().unwrap_or(0) as u16,
        stream: v["stream"].as_bool().unwrap_or(false),
        usage: Some(Usage {
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
            cached_tokens: usage["cached_tokens"].as_u64().unwrap_or(0),
            cache_write_tokens: usage["cache_write_tokens"].as_u64().unwrap_or(0),
        }),
        latency_ms: v["latency_ms"].as_u64().unwrap_or(0),
        ttft_ms: v["ttft_ms"].as_u64(),
        metadata: v["metadata"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        attempts: v["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Attempt {
                provider: a["provider"].as_str().unwrap_or_default().to_owned(),
                target_model: a["target_model"].as_str().unwrap_or_default().to_owned(),
                status: a["status"].as_u64().unwrap_or(0) as u16,
                latency_ms: a["latency_ms"].as_u64().unwrap_or(0),
                error: a["error"].as_str().map(str::to_owned),
            })
            .collect(),
        decisions: Vec::new(),
        cost_usd: v["cost_usd"].as_f64(),
    }
}

#[test]
fn stores_summary_with_ttl_and_counts_per_tenant() {
    let harness = Harness::<AuditLogger>::new(r#"{"ttl_secs": 3600}"#).expect("config");
    testing::set_now_ms(1_000_000);
    harness.on_log(&entry());
    harness.on_log(&entry());

    let stored = testing::kv_get_string("audit:req:req-42").expect("summary stored");
    let summary: Summary = serde_json::from_str(&stored).expect("summary JSON");
    assert_eq!(summary.tenant, "acme");
    assert_eq!(summary.status, 200);
    assert_eq!(summary.prompt_tokens, 12);
    assert_eq!(summary.ttft_ms, Some(210));
    assert_eq!(summary.at_ms, 1_000_000);
    assert_eq!(summary.cache_write_tokens, 2);
    assert_eq!(summary.attempts, 2);
    assert_eq!(summary.cost_usd, Some(0.00042));
    assert_eq!(testing::kv_ttl_ms("audit:req:req-42"), Some(3_600_000));

    assert_eq!(
        testing::kv_get_string("audit:tenant:acme:requests").as_deref(),
        Some("2")
    );
    assert_eq!(
        testing::kv_get_string("audit:tenant:acme:tokens").as_deref(),
        Some("84")
    );
    assert_eq!(testing::counter("audit_entries"), 2);
}

#[test]
fn never_stores_prompt_text() {
    let harness = Harness::<AuditLogger>::new("{}").expect("config");
    harness.on_log(&entry());
    for key in testing::kv_keys() {
        let value = testing::kv_get_string(&key).unwrap_or_default();
        assert!(!value.contains("secret"), "{key} = {value}");
    }
}

#[test]
fn unknown_tenant_and_custom_prefix() {
    let harness = Harness::<AuditLogger>::new(r#"{"key_prefix": "a/", "tenant_key": "org"}"#)
        .expect("config");
    harness.on_log(&entry());
    assert_eq!(
        testing::kv_get_string("a/tenant:unknown:requests").as_deref(),
        Some("1")
    );
}

#[test]
fn zero_ttl_is_refused() {
    assert!(Harness::<AuditLogger>::new(r#"{"ttl_secs": 0}"#).is_err());
}
