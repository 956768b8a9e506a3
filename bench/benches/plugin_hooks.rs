//! Plugin hook costs. WASM: one `on-request` call on a pooled instance with a typical chat
//! request (20 headers, 2 messages), and one `on-response-chunk` call with a text delta.
//! Lua: the fixed cost of each hook (a script that does nothing, so what is measured is the
//! host: building the argument table, calling, reading the decision) with the suite's ~1 KB
//! chat body, and the cost of host calls from Lua (`weir.ctx_get`, `weir.kv.incr`).
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
    Access, ChoiceView, Dialect, HeaderSelection, HookCtx, LogEntry, MemoryHost, PluginRuntime,
    RequestView, ResponseView, StreamEvent, TextDelta, Usage,
};
use weir::plugin::lua::LuaPlugin;
use weir::plugin::manifest::Manifest;
use weir::plugin::wasm::{EngineOptions, WasmEngine, WasmLimits, WasmPlugin};
use weir::request::Body;

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

/// A typical chat request: 20 headers as a client sends them; the plugin reads all of them
/// (`headers = ["*"]`) or only `x-tenant` (`headers = ["x-tenant"]`). `user` is the user
/// message.
fn request(all_headers: bool, user: &str) -> RequestView {
    let mut headers = http::HeaderMap::new();
    for i in 0..19 {
        headers.insert(
            http::HeaderName::from_bytes(format!("x-header-{i:02}").as_bytes()).expect("name"),
            format!("value-{i}-abcdefghijklmnop")
                .parse()
                .expect("value"),
        );
    }
    headers.insert("x-tenant", http::HeaderValue::from_static("acme"));
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user}
        ]
    });
    RequestView {
        request_id: "0190b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b".into(),
        dialect: Dialect::OpenAi,
        headers,
        body: Body::Chat(serde_json::from_value(body).expect("chat body")),
        body_json: None,
        access: Arc::new(Access {
            headers: if all_headers {
                HeaderSelection::All
            } else {
                HeaderSelection::Only(vec!["x-tenant".into()])
            },
            body: true,
        }),
    }
}

const HAIKU: &str = "Write a haiku about rivers and weirs.";

fn hooks(c: &mut Criterion) {
    let tagger = load("examples/tenant-tagger", "{}");
    let probe = load("tests/fixtures/wasm/probe", "{}");
    let mut bag = BTreeMap::new();
    let mut scratch = BTreeMap::new();

    for (name, all) in [("declared_header", false), ("20_headers", true)] {
        let mut req = request(all, HAIKU);
        c.bench_function(&format!("wasm_on_request_tenant_tagger_{name}"), |b| {
            b.iter(|| {
                let mut ctx = HookCtx {
                    request_id: "r",
                    metadata: &mut bag,
                    scratch: &mut scratch,
                    deadline: None,
                };
                black_box(
                    tagger
                        .on_request(&mut ctx, black_box(&mut req))
                        .expect("call"),
                )
            })
        });
    }

    // The issue's target row: one hook that reads one declared header, on the suite's ~1 KB
    // chat request (tenant-tagger reads `x-tenant` and sets metadata `tenant`).
    let mut req = request(false, &weir_bench::bodies::prompt());
    c.bench_function("wasm_on_request_one_header_1kb", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                tagger
                    .on_request(&mut ctx, black_box(&mut req))
                    .expect("call"),
            )
        })
    });

    // The bare fixed cost: a hook that reads one declared header and continues without
    // changes (the probe's `x-fault: read`).
    let mut read_one = request(false, &weir_bench::bodies::prompt());
    read_one.access = Arc::new(Access {
        headers: HeaderSelection::Only(vec!["x-fault".into()]),
        body: false,
    });
    read_one
        .headers
        .insert("x-fault", http::HeaderValue::from_static("read"));
    c.bench_function("wasm_on_request_reads_one_header_continues_1kb", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                probe
                    .on_request(&mut ctx, black_box(&mut read_one))
                    .expect("call"),
            )
        })
    });

    let event = StreamEvent::TextDelta(TextDelta {
        choice: 0,
        text: "The river bends and".into(),
        last: false,
    });
    c.bench_function("wasm_on_response_chunk_text_delta", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(probe.on_chunk(&mut ctx, black_box(&event)).expect("call"))
        })
    });
}

/// A Lua plugin from inline source: every hook but chunks declared, capabilities `kv` and
/// `body`, a generous deadline.
fn lua(source: &str) -> (tempfile::TempDir, LuaPlugin) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = "name = \"bench\"\nversion = \"1\"\nkind = \"lua\"\n\
        hooks = [\"on-request\", \"on-response\", \"on-log\"]\nheaders = [\"*\"]\n\
        [capabilities]\nkv = true\nbody = true\n\
        # A busy machine must not fail the bench with a missed deadline.\n\
        [limits]\ndeadline_ms = 1000\n";
    std::fs::write(dir.path().join("plugin.toml"), manifest).expect("write");
    std::fs::write(dir.path().join("plugin.lua"), source).expect("write");
    let manifest = Manifest::load(dir.path()).expect("manifest");
    let plugin = LuaPlugin::load(
        &manifest,
        "bench",
        serde_json::json!({}),
        Arc::new(MemoryHost::new()),
    )
    .expect("load");
    (dir, plugin)
}

fn lua_hooks(c: &mut Criterion) {
    let (_dir, noop) = lua("function on_request(req) return nil end\n\
         function on_response(resp) return nil end\n\
         function on_log(entry) end\n");
    let mut bag: BTreeMap<String, String> = [
        ("tenant", "acme"),
        ("key", "key_0123456789abcdef"),
        (
            "cache.key",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ),
        ("cache.rid", "0190b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b"),
        ("weir.response-header.x-weir-cache", "miss"),
        ("weir.response-header.x-ratelimit-limit-requests", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut scratch = BTreeMap::new();

    // The suite's ~1 KB prompt. The request is lazy (contract 0.2): a plugin that reads
    // nothing pays for none of it.
    let mut req = request(false, &weir_bench::bodies::prompt());
    c.bench_function("lua_on_request_noop_1kb_body", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                noop.on_request(&mut ctx, black_box(&mut req))
                    .expect("call"),
            )
        })
    });

    // The bare fixed cost: read one declared header, continue without changes.
    let (_dir3, reader) = lua("function on_request(req)\n\
         \x20 local _ = req.header(\"x-tenant\")\n\
         \x20 return nil\n\
         end\n\
         function on_response(resp) return nil end\n\
         function on_log(entry) end\n");
    c.bench_function("lua_on_request_reads_one_header_continues_1kb", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                reader
                    .on_request(&mut ctx, black_box(&mut req))
                    .expect("call"),
            )
        })
    });

    // The same work as the WASM row: read one declared header, set one metadata entry.
    let (_dir2, tagger) = lua("function on_request(req)\n\
         \x20 return { set_metadata = { tenant = req.header(\"x-tenant\") } }\n\
         end\n\
         function on_response(resp) return nil end\n\
         function on_log(entry) end\n");
    c.bench_function("lua_on_request_one_header_1kb", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                tagger
                    .on_request(&mut ctx, black_box(&mut req))
                    .expect("call"),
            )
        })
    });

    let resp = ResponseView {
        request_id: "0190b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b".into(),
        model: "gpt-4o-mini".into(),
        status: 200,
        choices: vec![ChoiceView {
            index: 0,
            text: "The paragraph asks for a short summary that keeps every number.".into(),
            tool_calls: vec![],
            finish_reason: Some("stop".into()),
        }],
        usage: Some(Usage {
            prompt_tokens: 250,
            completion_tokens: 40,
            cached_tokens: 0,
            cache_write_tokens: 0,
        }),
    };
    c.bench_function("lua_on_response_noop", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(noop.on_response(&mut ctx, black_box(&resp)).expect("call"))
        })
    });

    let entry = LogEntry {
        request_id: "0190b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b".into(),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        target_model: "gpt-4o-mini-2024-07-18".into(),
        status: 200,
        stream: false,
        usage: resp.usage,
        latency_ms: 412,
        ttft_ms: None,
        metadata: bag.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ..LogEntry::default()
    };
    c.bench_function("lua_on_log_noop_6_metadata", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            noop.on_log(&mut ctx, black_box(&entry)).expect("call");
        })
    });

    // Ten host calls per hook: the cost of crossing from Lua to Rust and back.
    let (_dir, calls) = lua("function on_request(req)\n\
           for i = 1, 10 do local _ = weir.ctx_get(\"tenant\") end\n\
           return nil\n\
         end\n\
         function on_response(resp)\n\
           for i = 1, 10 do weir.kv.incr(\"n\", 1, 60000) end\n\
           return nil\n\
         end\n\
         function on_log(entry) end\n");
    let mut small = request(false, HAIKU);
    c.bench_function("lua_on_request_10_ctx_get", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(
                calls
                    .on_request(&mut ctx, black_box(&mut small))
                    .expect("call"),
            )
        })
    });
    c.bench_function("lua_on_response_10_kv_incr_memory_host", |b| {
        b.iter(|| {
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut bag,
                scratch: &mut scratch,
                deadline: None,
            };
            black_box(calls.on_response(&mut ctx, black_box(&resp)).expect("call"))
        })
    });
}

criterion_group!(benches, hooks, lua_hooks);
criterion_main!(benches);
