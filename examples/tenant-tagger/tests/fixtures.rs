//! Runs the plugin natively against `fixtures/*.json` (the same files
//! `weir plugin test examples/tenant-tagger` runs through the gateway's chain).
//!
//! cargo test --manifest-path examples/tenant-tagger/Cargo.toml

use serde_json::Value;
use tenant_tagger::TenantTagger;
use weir_sdk::testing::{Harness, request_from_fixture};
use weir_sdk::{Decision, testing};

fn run(file: &str) -> (Decision, Value) {
    let path = format!("{}/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("read fixture");
    let fixture: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let config = fixture.get("config").cloned().unwrap_or(Value::Null);
    let harness = Harness::<TenantTagger>::new(&config.to_string()).expect("config accepted");
    let request = request_from_fixture(&fixture["request"].to_string(), false).expect("request");
    (harness.on_request(&request), fixture["expect"].clone())
}

fn reply_status(decision: &Decision) -> Option<u16> {
    match decision {
        Decision::Reply(reply) => Some(reply.status),
        Decision::Continue(_) => None,
    }
}

#[test]
fn tags_tenant() {
    let (decision, expect) = run("01_tags_tenant.json");
    assert_eq!(expect["decision"], "continue");
    let Decision::Continue(m) = decision else {
        panic!("expected continue");
    };
    assert_eq!(
        m.set_metadata,
        vec![("tenant".to_owned(), "acme".to_owned())]
    );
    assert_eq!(
        m.set_response_headers,
        vec![("x-weir-tenant".to_owned(), "acme".to_owned())]
    );
    assert_eq!(weir_sdk::ctx::get("tenant").as_deref(), Some("acme"));
}

#[test]
fn missing_required_header_is_a_400() {
    let (decision, expect) = run("02_missing_required.json");
    assert_eq!(
        reply_status(&decision),
        expect["status"].as_u64().map(|s| s as u16)
    );
    let Decision::Reply(reply) = decision else {
        unreachable!()
    };
    let body: Value = serde_json::from_slice(&reply.body).expect("JSON body");
    assert_eq!(body["error"]["message"], expect["body"]["error"]["message"]);
}

#[test]
fn default_tenant_when_optional() {
    let (decision, _) = run("03_default_tenant.json");
    assert!(!decision.is_reply());
    assert_eq!(
        testing::metadata().get("tenant").map(String::as_str),
        Some("shared")
    );
}

#[test]
fn unsafe_tenant_is_rejected() {
    let (decision, _) = run("04_invalid_tenant.json");
    assert_eq!(reply_status(&decision), Some(400));
}

#[test]
fn bad_config_is_refused() {
    assert!(Harness::<TenantTagger>::new(r#"{"header": ""}"#).is_err());
    assert!(Harness::<TenantTagger>::new(r#"{"unknown": 1}"#).is_err());
}
