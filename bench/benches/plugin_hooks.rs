//! WASM plugin hook costs: one `on-request` call on a pooled instance with a typical chat
//! request (20 headers, 2 messages), and one `on-response-chunk` call with a text delta.
//!
//! scripts/build-plugins.sh examples/tenant-tagger tests/fixtures/wasm/probe
//! cargo bench -p weir-bench --bench plugin_hooks

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir::plugin::contract::{
    Dialect, Endpoint, HookCtx, MemoryHost, MessageView, PluginRuntime, RequestView, StreamEvent,
    TextDelta,
};
use weir::plugin::wasm::{EngineOptions, WasmEngine, WasmLimits, WasmPlugin};

fn load(dir: &str, config: &str) -> WasmPlugin {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(dir).join("plugin.wasm");
    assert!(
        path.exists(),
        "{} missing: run scripts/build-plugins.sh first",
        path.display()
    );
    let engine = WasmEngine::new(&EngineOptions {
        cache_dir: None,
        pool_instances: 16,
    })
    .expect("engine");
    WasmPlugin::load_file(
        &engine,
        dir,
        &path,
        config,
        WasmLimits::default(),
        Arc::new(MemoryHost::new()),
    )
    .expect("load")
}

/// A typical chat request: 20 headers as a client sends them.
fn request(all_headers: bool) -> RequestView {
    let mut headers: Vec<(String, String)> = (0..19)
        .map(|i| {
            (
                format!("x-header-{i:02}"),
                format!("value-{i}-abcdefghijklmnop"),
            )
        })
        .collect();
    headers.push(("x-tenant".into(), "acme".into()));
    if !all_headers {
        // What the gateway passes when the manifest declares `headers = ["x-tenant"]`.
        headers.retain(|(k, _)| k == "x-tenant");
    }
    RequestView {
        request_id: "0190b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b".into(),
        dialect: Dialect::OpenAi,
        endpoint: Endpoint::Chat,
        model: "gpt-4o-mini".into(),
        stream: true,
        headers,
        messages: vec![
            MessageView {
                role: "system".into(),
                content: "You are a helpful assistant.".into(),
                tool_calls: vec![],
            },
            MessageView {
                role: "user".into(),
                content: "Write a haiku about rivers and weirs.".into(),
                tool_calls: vec![],
            },
        ],
        body: None,
    }
}

fn hooks(c: &mut Criterion) {
    let tagger = load("examples/tenant-tagger", "{}");
    let probe = load("tests/fixtures/wasm/probe", "{}");
    let mut bag = BTreeMap::new();

    for (name, all) in [("declared_header", false), ("20_headers", true)] {
        let req = request(all);
        c.bench_function(&format!("wasm_on_request_tenant_tagger_{name}"), |b| {
            b.iter(|| {
                let mut ctx = HookCtx {
                    request_id: "r",
                    metadata: &mut bag,
                };
                black_box(tagger.on_request(&mut ctx, black_box(&req)).expect("call"))
            })
        });
    }

    let event = StreamEvent::TextDelta(TextDelta {
        choice: 0,
        text: "The river bends and".into(),
    });
    c.bench_function("wasm_on_response_chunk_text_delta", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
            };
            black_box(probe.on_chunk(&mut ctx, black_box(&event)).expect("call"))
        })
    });
}

criterion_group!(benches, hooks);
criterion_main!(benches);
