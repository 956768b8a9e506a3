//! Per-policy hook cost, in process on the gateway's state store, the way the gateway calls
//! the chain. Prints
//! p50/p99 per policy and hook.
//!
//!     scripts/build-plugins.sh && cargo bench -p weir-bench --bench policy_hooks
//!
//! Two parts:
//! - `on-request` of auth, rate-limit, routing and budget with a virtual key (every limit
//!   checked, every counter touched), alone and together;
//! - the default chain of `bench/configs/default-chain.toml` (auth with anonymous callers,
//!   rate-limit, redaction, cache that always misses, routing) over a whole request:
//!   `on-request`, `on-response` and `on-log`, per plugin and for the chain, with the
//!   suite's ~1 KB chat body (a unique counter per request). That is the per-request plugin
//!   CPU the side-by-side suite's "default chain" rows pay on top of "no plugins".
//!
//! `WEIR_BENCH_N` sets the measured requests per row (default 5000); `WEIR_BENCH_ONLY=cache`
//! runs only the rows whose label contains `cache` (for a profiler). The default-chain rows
//! also print the process CPU time per request (all threads, so the state store's
//! background writes count), which includes building each request (a JSON parse of the
//! body) but is the figure to compare with the side-by-side suite's CPU per request.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use weir::plugin::chain::{Chain, Flow, Instance};
use weir::plugin::config::PluginInstanceConfig;
use weir::plugin::contract::{LogEntry, Usage};
use weir::plugin::host::{HostLookups, PluginMetrics};
use weir::request::{Body, Dialect, RequestCtx};
use weir::state::{StateConfig, StateStore};

fn plugin_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name)
}

const WARMUP: usize = 500;

fn main() {
    let n: usize = std::env::var("WEIR_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // The store as `weir serve` opens it.
    let state = StateConfig {
        path: dir.path().join("state").display().to_string(),
        ..StateConfig::default()
    };
    let store: Arc<dyn StateStore> =
        weir::state::open(&state, &dir.path().join("weir.toml")).expect("state");
    let metrics = PluginMetrics::unregistered().expect("metrics");
    let instance = |name: &str, config: Value| {
        let cfg: PluginInstanceConfig = serde_json::from_value(json!({
            "path": plugin_dir(name).display().to_string(),
            "config": config,
        }))
        .expect("instance config");
        Instance::load(
            Path::new("/"),
            &cfg,
            name,
            store.clone(),
            &metrics,
            Arc::new(HostLookups::default()),
        )
        .expect("load plugin")
    };
    keyed_policies(n, &instance);
    default_chain(n, &instance);
}

/// `on-request` of the key-aware policies, each alone and the four together.
fn keyed_policies(n: usize, instance: &dyn Fn(&str, Value) -> Arc<Instance>) {
    // Keys are the auth plugin's: created through its admin endpoint, as `weir keys` does.
    let auth = instance("auth", json!({}));
    let mut secrets = Vec::new();
    for i in 0..1_000 {
        let req = weir::plugin::contract::AdminRequest {
            method: "POST".into(),
            path: "/keys".into(),
            query: String::new(),
            body: json!({"name": format!("k{i}"), "tenant": format!("t{}", i % 10)})
                .to_string()
                .into_bytes(),
        };
        let resp = auth.admin(&req).expect("admin call");
        assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
        let created: Value = serde_json::from_slice(&resp.body).expect("JSON");
        secrets.push(created["secret"].as_str().expect("secret").to_owned());
    }
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
            started: Instant::now(),
            headers,
            body: Body::Chat(body.clone()),
            targets: None,
            client_body: None,
            metadata,
            scratch: Default::default(),
            decisions: Vec::new(),
        }
    };
    let measure = |label: &str, chain: Chain, with_key_metadata: bool| {
        if !selected(label) {
            return;
        }
        let mut samples = Vec::with_capacity(n);
        let mut failed = 0;
        for i in 0..n + WARMUP {
            let mut ctx = ctx_for(i, with_key_metadata);
            let t = Instant::now();
            let flow = chain.on_request(&mut ctx);
            let us = t.elapsed().as_secs_f64() * 1e6;
            if !matches!(flow, Ok(Flow::Continue)) {
                failed += 1;
            }
            if i >= WARMUP {
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

/// The default chain over whole requests: per plugin, then all five.
fn default_chain(n: usize, instance: &dyn Fn(&str, Value) -> Arc<Instance>) {
    // As in bench/configs/default-chain.toml.
    let plugins = [
        instance("auth", json!({"allow_anonymous": true})),
        instance(
            "rate-limit",
            json!({"key": {"rpm": 100_000_000u64, "tpm": 100_000_000_000u64},
                   "tenant": {"rpm": 100_000_000u64, "tpm": 100_000_000_000u64}}),
        ),
        instance("redaction", json!({})),
        instance("cache", json!({"ttl_secs": 60, "max_entries": 10_000})),
        instance("routing", json!({})),
    ];
    let labels = [
        "auth (wasm)",
        "rate-limit (lua)",
        "redaction (wasm)",
        "cache (lua, miss)",
        "routing (lua)",
    ];
    let body = String::from_utf8(weir_bench::bodies::chat("bench-chain", false)).expect("utf-8");
    let response: weir::api::openai::ChatResponse = serde_json::from_value(json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000,
        "model": "mock-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
            "content": "The paragraph asks for a short summary that keeps every number; here it is, \
                in two sentences, with nothing added and nothing left out, as a busy reader would want."}}],
        "usage": {"prompt_tokens": 250, "completion_tokens": 40, "total_tokens": 290}
    }))
    .expect("response");
    let mut counter = 0u64;
    let mut ctx_for = || {
        counter += 1;
        let text = body.replace(weir_bench::bodies::COUNTER, &counter.to_string());
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("host", "127.0.0.1:8080"),
            ("content-type", "application/json"),
            ("content-length", "1042"),
            ("user-agent", "wrk"),
        ] {
            headers.insert(k, http::HeaderValue::from_static(v));
        }
        RequestCtx {
            request_id: format!("0190b2c4-5d6e-7f80-9a1b-{counter:012}"),
            dialect: Dialect::OpenAi,
            started: Instant::now(),
            headers,
            body: Body::Chat(serde_json::from_str(&text).expect("chat body")),
            targets: None,
            client_body: None,
            metadata: Default::default(),
            scratch: Default::default(),
            decisions: Vec::new(),
        }
    };
    let mut run = |label: &str, chain: Chain| {
        if !selected(label) {
            return;
        }
        let mut req = Vec::with_capacity(n);
        let mut resp = Vec::with_capacity(n);
        let mut log = Vec::with_capacity(n);
        let mut total = Vec::with_capacity(n);
        let mut cpu_from = 0.0;
        for i in 0..n + WARMUP {
            if i == WARMUP {
                cpu_from = process_cpu_us();
            }
            let mut ctx = ctx_for();
            let mut r = response.clone();
            let t0 = Instant::now();
            let flow = chain.on_request(&mut ctx).expect("on-request");
            let t1 = Instant::now();
            assert!(matches!(flow, Flow::Continue), "{label}: {flow:?}");
            let flow = chain.on_response(&mut ctx, &mut r).expect("on-response");
            let t2 = Instant::now();
            assert!(matches!(flow, Flow::Continue), "{label}: {flow:?}");
            let entry = LogEntry {
                request_id: ctx.request_id.clone(),
                model: "bench-chain".into(),
                provider: "mock".into(),
                target_model: "mock-model".into(),
                status: 200,
                stream: false,
                usage: Some(Usage {
                    prompt_tokens: 250,
                    completion_tokens: 40,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                }),
                latency_ms: 1,
                ttft_ms: None,
                metadata: std::mem::take(&mut ctx.metadata).into_iter().collect(),
                decisions: std::mem::take(&mut ctx.decisions),
                ..LogEntry::default()
            };
            let t3 = Instant::now();
            chain.on_log(&entry, &mut ctx.scratch);
            let t4 = Instant::now();
            if i >= WARMUP {
                let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
                req.push(us(t0, t1));
                resp.push(us(t1, t2));
                log.push(us(t3, t4));
                total.push(us(t0, t2) + us(t3, t4));
            }
        }
        // Everything the process spent per request, request building and background state
        // writes included (10 ms resolution).
        let cpu = (process_cpu_us() - cpu_from) / n as f64;
        let p50 = |v: &mut Vec<f64>| percentiles(v).0;
        let (tp50, tp99) = percentiles(&mut total);
        eprintln!(
            "{label:<26} p50: on-request {:>6.1}  on-response {:>6.1}  on-log {:>6.1}  all {tp50:>6.1} us (p99 {tp99:>6.1})  process CPU/req {cpu:>6.1} us",
            p50(&mut req),
            p50(&mut resp),
            p50(&mut log),
        );
    };
    eprintln!("default chain, whole request (bench/configs/default-chain.toml):");
    for (label, plugin) in labels.iter().zip(&plugins) {
        run(label, Chain::new(vec![plugin.clone()]).expect("chain"));
    }
    run(
        "default chain (all five)",
        Chain::new(plugins.to_vec()).expect("chain"),
    );
}

/// Whether the row `label` runs: all of them, or those containing `WEIR_BENCH_ONLY`.
fn selected(label: &str) -> bool {
    std::env::var("WEIR_BENCH_ONLY").map_or(true, |only| label.contains(&only))
}

/// CPU time of the whole process so far (every thread: the state store's background writes
/// count too), in microseconds, from `/proc/self/stat` (10 ms ticks); 0 where unavailable.
fn process_cpu_us() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th, in clock ticks (100 per second on Linux).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10_000.0
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}
