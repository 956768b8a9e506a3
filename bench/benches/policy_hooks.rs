//! Per-policy cost of `on-request` (auth, rate-limit, routing, budget, and the four together),
//! in process on sled, the way the gateway calls the chain. Prints p50/p99 per policy.
//!
//!     scripts/build-plugins.sh && cargo bench -p weir-bench --bench policy_hooks

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn plugin_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name)
}

fn main() {
    use std::sync::Arc;
    use weir::pipeline::ctx::{Body, Dialect, RequestCtx};
    use weir::plugin::chain::{Chain, Instance};
    use weir::plugin::config::PluginInstanceConfig;
    use weir::plugin::host::PluginMetrics;
    use weir::state::{SledStore, StateStore};

    const N: usize = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let keys = weir::admin::keys::Keys::new(store.clone());
    let mut secrets = Vec::new();
    for i in 0..1_000 {
        let new: weir::admin::keys::NewKey = serde_json::from_value(
            json!({"name": format!("k{i}"), "tenant": format!("t{}", i % 10)}),
        )
        .expect("new key");
        secrets.push(keys.create(new).expect("create").1);
    }
    let metrics = PluginMetrics::unregistered().expect("metrics");
    let instance = |name: &str, config: Value| {
        let cfg: PluginInstanceConfig = serde_json::from_value(json!({
            "path": plugin_dir(name).display().to_string(),
            "config": config,
        }))
        .expect("instance config");
        Instance::load(Path::new("/"), &cfg, name, store.clone(), &metrics).expect("load plugin")
    };
    let auth = instance("auth", json!({}));
    let rate = instance(
        "rate-limit",
        json!({"key": {"rpm": 1_000_000, "tpm": 1_000_000_000}, "tenant": {"rpm": 1_000_000}}),
    );
    let routing = instance(
        "routing",
        json!({"aliases": {"fast": {"strategy": "weighted", "targets": [
            {"provider": "mock", "model": "m1", "weight": 3}, {"provider": "mock", "model": "m2", "weight": 1}]}}}),
    );
    let budget = instance(
        "budget",
        json!({"prices": {"m1": {"input": 1, "output": 2}, "*": {"input": 1, "output": 2}}, "key_default": {"usd": 1_000_000, "period": "month"}}),
    );
    let body: weir::api::openai::ChatRequest = serde_json::from_value(json!({
        "model": "fast", "max_tokens": 256,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarize the plot of Hamlet in two sentences."}]
    }))
    .expect("body");
    let ctx_for = |i: usize, with_key_metadata: bool| {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {}", secrets[i % secrets.len()])
                .parse()
                .expect("header"),
        );
        for h in 0..18 {
            headers.insert(
                http::HeaderName::from_bytes(format!("x-extra-{h}").as_bytes()).expect("name"),
                http::HeaderValue::from_static("some-value"),
            );
        }
        let mut metadata = std::collections::BTreeMap::new();
        if with_key_metadata {
            metadata.insert("key".to_owned(), format!("key_{}", i % 1000));
            metadata.insert("tenant".to_owned(), format!("t{}", i % 10));
        }
        RequestCtx {
            request_id: format!("req-{i}"),
            dialect: Dialect::OpenAi,
            started: std::time::Instant::now(),
            headers,
            body: Body::Chat(body.clone()),
            targets: None,
            client_body: None,
            metadata,
        }
    };
    let measure = |label: &str, chain: Chain, with_key_metadata: bool| {
        let mut samples = Vec::with_capacity(N);
        let mut failed = 0;
        for i in 0..N + 500 {
            let mut ctx = ctx_for(i, with_key_metadata);
            let t = std::time::Instant::now();
            let flow = chain.on_request(&mut ctx);
            let us = t.elapsed().as_secs_f64() * 1e6;
            if !matches!(flow, Ok(weir::plugin::chain::Flow::Continue)) {
                failed += 1;
            }
            if i >= 500 {
                samples.push(us);
            }
        }
        let (p50, p99) = percentiles(&mut samples);
        eprintln!(
            "{label:<34} on-request p50 {p50:>7.1} us   p99 {p99:>7.1} us   not continued: {failed}"
        );
        // A debug build can miss a deadline now and then; a release build must not.
        assert!(
            cfg!(debug_assertions) || failed == 0,
            "{label}: {failed} calls failed"
        );
    };
    measure(
        "auth (wasm)",
        Chain::new(vec![auth.clone()]).expect("chain"),
        false,
    );
    measure(
        "rate-limit (lua)",
        Chain::new(vec![rate.clone()]).expect("chain"),
        true,
    );
    measure(
        "routing (lua, weighted)",
        Chain::new(vec![routing.clone()]).expect("chain"),
        true,
    );
    measure(
        "budget (lua)",
        Chain::new(vec![budget.clone()]).expect("chain"),
        true,
    );
    measure(
        "auth+rate-limit+routing+budget",
        Chain::new(vec![auth, rate, routing, budget]).expect("chain"),
        false,
    );
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}
