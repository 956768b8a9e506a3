//! Golden-file helpers shared by the provider tests: fixtures live in
//! `tests/golden/<provider>/`, and `WEIR_BLESS=1` rewrites the expected files.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use super::UpstreamRequest;

/// The golden folder of one provider.
pub fn dir(provider: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(provider)
}

/// Reads a fixture.
pub fn read(provider: &str, name: &str) -> String {
    std::fs::read_to_string(dir(provider).join(name))
        .unwrap_or_else(|e| panic!("read {provider}/{name}: {e}"))
}

/// Compares `actual` with the golden file `name`, or rewrites it when `WEIR_BLESS=1`.
pub fn check(provider: &str, name: &str, actual: &Value) {
    let path = dir(provider).join(name);
    let pretty = serde_json::to_string_pretty(actual).expect("json") + "\n";
    if std::env::var("WEIR_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, pretty).expect("write golden");
        return;
    }
    let expected: Value = serde_json::from_str(&read(provider, name)).expect("golden is JSON");
    assert!(
        expected == *actual,
        "{provider}/{name} differs from golden; actual:\n{pretty}"
    );
}

/// The upstream request as JSON: URL, headers (sensitive values hidden) and body.
pub fn upstream_json(up: &UpstreamRequest) -> Value {
    let headers: Map<String, Value> = up
        .headers
        .iter()
        .map(|(k, v)| {
            let v = if v.is_sensitive() {
                "<sensitive>"
            } else {
                v.to_str().expect("ascii header")
            };
            (k.as_str().to_owned(), json!(v))
        })
        .collect();
    let body: Value = serde_json::from_slice(&up.body).expect("body is JSON");
    json!({ "url": up.url, "headers": headers, "body": body })
}
