//! Tests of the WASM host against real components: the probe fixture
//! (`tests/fixtures/wasm/probe`) and the examples. They are built from source by
//! `scripts/build-plugins.sh`, which the first test that needs them runs if the
//! `plugin.wasm` files are missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::*;
use crate::plugin::contract::{
    Access, Dialect, Finish, HeaderSelection, MemoryHost, MessageView, Mutations, Target,
    TextDelta, Usage,
};
use crate::request::Body;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The component of the plugin folder `dir` (relative to the repository root), built
/// with `scripts/build-plugins.sh` if missing.
fn wasm(dir: &str) -> Vec<u8> {
    static BUILD: Mutex<()> = Mutex::new(());
    let folder = root().join(dir);
    let path = folder.join("plugin.wasm");
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let status = std::process::Command::new(root().join("scripts/build-plugins.sh"))
            .arg(&folder)
            .status()
            .expect("run scripts/build-plugins.sh");
        assert!(status.success(), "building {dir} failed");
    }
    std::fs::read(&path).expect("read plugin.wasm")
}

fn engine() -> WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            WasmEngine::new(&EngineOptions {
                cache_dir: None,
                pool_instances: 64,
            })
            .expect("engine")
        })
        .clone()
}

fn load(dir: &str, config: &str, limits: WasmLimits, host: Arc<MemoryHost>) -> WasmPlugin {
    WasmPlugin::load(&engine(), dir, &wasm(dir), config, limits, host).expect("load plugin")
}

const PROBE: &str = "tests/fixtures/wasm/probe";

/// Limits for tests that are not about time. Deadlines are wall-clock (epoch ticks) and
/// tests run in parallel on two cores, where a healthy call can be descheduled for
/// several milliseconds, so only the deadline tests use the real defaults.
fn relaxed() -> WasmLimits {
    WasmLimits {
        request_deadline: Duration::from_secs(1),
        chunk_deadline: Duration::from_secs(1),
        log_deadline: Duration::from_secs(1),
        ..WasmLimits::default()
    }
}

fn probe(limits: WasmLimits) -> (WasmPlugin, Arc<MemoryHost>) {
    let host = Arc::new(MemoryHost::new());
    let plugin = load(PROBE, r#"{"tag": "p1"}"#, limits, Arc::clone(&host));
    (plugin, host)
}

/// A chat request with these headers (all visible to the plugin, as `headers = ["*"]`).
fn request(headers: &[(&str, &str)]) -> RequestView {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    RequestView {
        request_id: "req-1".into(),
        dialect: Dialect::OpenAi,
        headers: map,
        body: Body::Chat(
            serde_json::from_value(serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello"}
                ]
            }))
            .expect("chat body"),
        ),
        body_json: None,
        access: Arc::new(Access {
            headers: HeaderSelection::All,
            body: false,
        }),
    }
}

fn on_request(
    plugin: &WasmPlugin,
    bag: &mut BTreeMap<String, String>,
    req: &mut RequestView,
) -> Result<Decision, HookError> {
    let mut scratch = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "req-1",
        metadata: bag,
        scratch: &mut scratch,
        deadline: None,
    };
    plugin.on_request(&mut ctx, req)
}

fn fault(plugin: &WasmPlugin, kind: &str) -> Result<Decision, HookError> {
    on_request(
        plugin,
        &mut BTreeMap::new(),
        &mut request(&[("x-fault", kind)]),
    )
}

#[test]
fn on_request_round_trips_through_a_component() {
    let (plugin, _host) = probe(relaxed());
    let mut bag = BTreeMap::from([("seen".to_owned(), "p0".to_owned())]);
    let decision =
        on_request(&plugin, &mut bag, &mut request(&[("authorization", "k")])).expect("on-request");
    let expected = Mutations {
        set_headers: vec![("x-probe".into(), "gpt-4o-mini".into())],
        remove_headers: vec!["authorization".into()],
        set_model: Some("probe-model".into()),
        set_messages: Some(vec![
            MessageView {
                role: "system".into(),
                content: "BE BRIEF".into(),
                tool_calls: vec![],
                other_parts: 0,
            },
            MessageView {
                role: "user".into(),
                content: "HELLO".into(),
                tool_calls: vec![],
                other_parts: 0,
            },
        ]),
        set_message_text: vec![],
        set_tool_call_arguments: vec![],
        set_body: None,
        set_targets: Some(vec![
            Target {
                provider: "mock".into(),
                model: "m1".into(),
            },
            Target {
                provider: "mock".into(),
                model: "m2".into(),
            },
        ]),
        set_metadata: vec![("headers".into(), "1".into())],
        set_response_headers: vec![("x-probe-tag".into(), "p1".into())],
    };
    assert_eq!(decision, Decision::Continue(expected));
    // ctx-get / ctx-set went to the request's bag.
    assert_eq!(bag.get("seen").map(String::as_str), Some("p0p1"));
}

#[test]
fn response_chunk_and_log_hooks_round_trip() {
    let (plugin, host) = probe(relaxed());
    let mut bag = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "req-9",
        metadata: &mut bag,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    let resp = ResponseView {
        request_id: "req-9".into(),
        model: "m".into(),
        status: 200,
        choices: vec![crate::plugin::contract::ChoiceView {
            index: 0,
            text: "hi there".into(),
            tool_calls: vec![],
            finish_reason: Some("stop".into()),
        }],
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 0,
            cache_write_tokens: 0,
        }),
    };
    let decision = plugin.on_response(&mut ctx, &resp).expect("on-response");
    let ResponseDecision::Continue(m) = decision else {
        panic!("expected continue");
    };
    assert_eq!(m.set_choice_text, vec![(0, "HI THERE".to_owned())]);
    assert_eq!(m.set_headers, vec![("x-probe".into(), "response".into())]);

    let delta = |text: &str| {
        StreamEvent::TextDelta(TextDelta {
            choice: 0,
            text: text.into(),
            last: false,
        })
    };
    assert_eq!(
        plugin.on_chunk(&mut ctx, &delta("plain")),
        Ok(ChunkAction::Pass)
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &delta("the sec")),
        Ok(ChunkAction::Hold)
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &delta("a secret!")),
        Ok(ChunkAction::Replace(vec![delta("a ******!")]))
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &delta("stop now")),
        Ok(ChunkAction::Abort("stopped by probe".into()))
    );
    let finish = StreamEvent::Finish(Finish {
        choice: 0,
        reason: "stop".into(),
    });
    assert_eq!(plugin.on_chunk(&mut ctx, &finish), Ok(ChunkAction::Pass));

    let entry = LogEntry {
        request_id: "req-9".into(),
        status: 201,
        ..LogEntry::default()
    };
    plugin.on_log(&mut ctx, &entry).expect("on-log");
    assert_eq!(host.get_string("log:req-9").as_deref(), Some("201"));
    let state = host.snapshot();
    assert_eq!(state.counters.get("logged"), Some(&1));
    assert_eq!(state.logs.len(), 1);
}

#[test]
fn instances_are_reused_and_host_state_persists() {
    let (plugin, _host) = probe(relaxed());
    for expected in 1..=3 {
        let decision = fault(&plugin, "kv").expect("kv call");
        let Decision::Continue(m) = decision else {
            panic!("expected continue");
        };
        assert_eq!(m.set_metadata, vec![("hits".into(), expected.to_string())]);
        assert_eq!(plugin.idle_instances(), 1, "the one instance is reused");
    }
}

#[test]
fn parking_drops_idle_instances_and_unparking_makes_one() {
    let (plugin, _host) = probe(relaxed());
    // Two calls at once leave two idle instances.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| fault(&plugin, "none").expect("call"));
        }
    });
    assert!(plugin.idle_instances() >= 1);
    plugin.inner.park();
    assert_eq!((plugin.idle_instances(), plugin.inner.ready()), (0, 0));
    // Calls while parked (requests still in flight on the old generation) work and share
    // at most one idle instance.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| fault(&plugin, "none").expect("call while parked"));
        }
    });
    assert_eq!(plugin.idle_instances(), 1);
    plugin.inner.park();
    plugin.inner.unpark();
    assert_eq!(
        plugin.idle_instances(),
        1,
        "a rollback finds an instance ready"
    );
}

#[test]
fn infinite_loop_is_cut_at_the_deadline() {
    let limits = WasmLimits {
        request_deadline: Duration::from_millis(5),
        ..WasmLimits::default()
    };
    let (plugin, _host) = probe(limits);
    let started = Instant::now();
    let err = fault(&plugin, "loop").expect_err("loop must be interrupted");
    let elapsed = started.elapsed();
    assert_eq!(err, HookError::Timeout { deadline_ms: 5 });
    // Cut at 5-6 ms; the margin covers descheduling when tests share two cores.
    assert!(elapsed < Duration::from_millis(250), "took {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(4), "took {elapsed:?}");
    // The instance was dropped; the next call gets a fresh one and succeeds.
    assert_eq!(plugin.idle_instances(), 0);
    fault(&plugin, "none").expect("next call succeeds");
    assert_eq!(plugin.idle_instances(), 1);
}

#[test]
fn memory_bomb_is_cut_at_the_memory_limit() {
    let limits = WasmLimits {
        memory_bytes: 8 << 20,
        ..relaxed()
    };
    let (plugin, _host) = probe(limits);
    assert_eq!(fault(&plugin, "bomb"), Err(HookError::OutOfMemory));
    fault(&plugin, "none").expect("next call succeeds");
}

#[test]
fn panic_and_stack_overflow_are_contained() {
    let (plugin, _host) = probe(relaxed());
    let err = fault(&plugin, "panic").expect_err("panic traps");
    assert_eq!(err.kind(), "trap", "{err}");
    let err = fault(&plugin, "recurse").expect_err("stack overflow traps");
    assert_eq!(err.kind(), "trap", "{err}");
    assert_eq!(
        plugin.idle_instances(),
        0,
        "faulted instances are discarded"
    );
    fault(&plugin, "none").expect("next call succeeds");
}

/// The sandbox: reading a file or opening a socket must fail (a trap from the stubbed
/// WASI import, or an error the plugin sees), never succeed.
#[test]
fn file_socket_and_env_access_fail() {
    let (plugin, _host) = probe(relaxed());
    for kind in ["file", "socket"] {
        match fault(&plugin, kind) {
            Err(err) => assert_eq!(err.kind(), "trap", "{kind}: {err}"),
            Ok(Decision::Reply(reply)) => assert_eq!(reply.status, 403, "{kind}"),
            Ok(other) => panic!("{kind}: unexpected {other:?}"),
        }
    }
    // The environment is empty.
    match fault(&plugin, "env") {
        Ok(Decision::Reply(reply)) => assert_eq!(reply.body, b"0"),
        other => panic!("env: unexpected {other:?}"),
    }
}

#[test]
fn init_errors_fail_the_load() {
    let host = Arc::new(MemoryHost::new());
    let err = WasmPlugin::load(
        &engine(),
        "probe",
        &wasm(PROBE),
        r#"{"reject_init": true}"#,
        WasmLimits::default(),
        host,
    )
    .expect_err("init rejects");
    assert!(
        matches!(&err, WasmError::Init(m) if m.contains("rejected by config")),
        "{err}"
    );
}

#[test]
fn garbage_is_not_a_component() {
    let err = WasmPlugin::load(
        &engine(),
        "junk",
        b"\0asm junk",
        "{}",
        WasmLimits::default(),
        Arc::new(MemoryHost::new()),
    )
    .expect_err("not wasm");
    assert!(matches!(err, WasmError::Compile(_)), "{err}");
}

#[test]
fn concurrent_calls_each_get_an_instance() {
    let (plugin, _host) = probe(relaxed());
    let plugin = Arc::new(plugin);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let plugin = Arc::clone(&plugin);
            std::thread::spawn(move || {
                for _ in 0..50 {
                    fault(&plugin, "none").expect("call");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert!((1..=4).contains(&plugin.idle_instances()));
}

#[test]
fn a_fault_does_not_disturb_concurrent_calls() {
    let limits = WasmLimits {
        request_deadline: Duration::from_millis(200),
        ..WasmLimits::default()
    };
    let (plugin, _host) = probe(limits);
    let plugin = Arc::new(plugin);
    let looping = {
        let plugin = Arc::clone(&plugin);
        std::thread::spawn(move || {
            for _ in 0..5 {
                assert_eq!(fault(&plugin, "loop").map_err(|e| e.kind()), Err("timeout"));
            }
        })
    };
    for _ in 0..200 {
        fault(&plugin, "none").expect("healthy call");
    }
    looping.join().expect("looping thread");
}

#[test]
fn tenant_tagger_tags_and_rejects() {
    let host = Arc::new(MemoryHost::new());
    let dir = "examples/tenant-tagger";
    let tagger = load(dir, r#"{"required": true}"#, relaxed(), Arc::clone(&host));
    let mut bag = BTreeMap::new();
    let decision =
        on_request(&tagger, &mut bag, &mut request(&[("x-tenant", "acme")])).expect("tag");
    let Decision::Continue(m) = decision else {
        panic!("expected continue");
    };
    assert_eq!(m.set_metadata, vec![("tenant".into(), "acme".into())]);
    assert_eq!(
        m.set_response_headers,
        vec![("x-weir-tenant".into(), "acme".into())]
    );
    let decision = on_request(&tagger, &mut bag, &mut request(&[])).expect("reject");
    let Decision::Reply(reply) = decision else {
        panic!("expected a reply");
    };
    assert_eq!(reply.status, 400);
    assert!(String::from_utf8_lossy(&reply.body).contains("missing x-tenant header"));

    let optional = load(dir, "{}", relaxed(), host);
    let decision = on_request(&optional, &mut bag, &mut request(&[])).expect("default");
    assert!(
        matches!(decision, Decision::Continue(m) if m.set_metadata == vec![("tenant".into(), "default".into())])
    );
}

#[test]
fn audit_logger_stores_a_summary_without_prompt_text() {
    let host = Arc::new(MemoryHost::new());
    let logger = load(
        "examples/audit-logger",
        r#"{"ttl_secs": 60}"#,
        relaxed(),
        Arc::clone(&host),
    );
    let mut bag = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r-1",
        metadata: &mut bag,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    let entry = LogEntry {
        request_id: "r-1".into(),
        model: "gpt-4o".into(),
        provider: "openai".into(),
        target_model: "gpt-4o-2024".into(),
        status: 200,
        stream: true,
        usage: Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 0,
            cache_write_tokens: 0,
        }),
        latency_ms: 120,
        ttft_ms: Some(30),
        metadata: vec![
            ("tenant".into(), "acme".into()),
            ("prompt".into(), "top secret prompt".into()),
        ],
        ..LogEntry::default()
    };
    logger.on_log(&mut ctx, &entry).expect("on-log");
    logger.on_log(&mut ctx, &entry).expect("on-log again");
    let summary = host.get_string("audit:req:r-1").expect("summary stored");
    assert!(summary.contains(r#""tenant":"acme""#), "{summary}");
    assert!(!summary.contains("secret"), "{summary}");
    let state = host.snapshot();
    let (_, expiry) = &state.kv["audit:req:r-1"];
    assert!(expiry.is_some(), "summary has a TTL");
    assert_eq!(
        host.get_string("audit:tenant:acme:requests").as_deref(),
        Some("2")
    );
    assert_eq!(
        host.get_string("audit:tenant:acme:tokens").as_deref(),
        Some("30")
    );
    assert_eq!(state.counters.get("audit_entries"), Some(&2));
}

#[test]
fn unchanged_bytes_are_compiled_once_and_freed_when_unused() {
    let bytes = wasm(PROBE);
    // An engine of its own: the shared one's cache is used by the other tests.
    let engine = WasmEngine::new(&EngineOptions {
        cache_dir: None,
        pool_instances: 4,
    })
    .expect("engine");
    let first = engine.compile(&bytes).expect("compile");
    let second = engine.compile(&bytes).expect("cached");
    // Same content hash, same compiled artifact.
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(engine.compiled_in_memory(), 1);
    // Once nothing holds it (every plugin of that version unloaded), its code is freed.
    drop((first, second));
    assert_eq!(engine.compiled_in_memory(), 0);
}

#[test]
fn deadline_ticks_round_up() {
    assert_eq!(ticks(Duration::from_millis(5)), 6);
    assert_eq!(ticks(Duration::from_micros(1500)), 3);
    assert_eq!(ticks(Duration::ZERO), 1);
}

/// The `request` resource (contract 0.2): every accessor through a component, what the
/// manifest does not declare reads as absent, and the scratch moves through the store.
#[test]
fn the_request_resource_reads_through_its_accessors() {
    let (plugin, _host) = probe(relaxed());
    let mut req = request(&[("x-fault", "host"), ("authorization", "k")]);
    req.body = Body::Chat(
        serde_json::from_value(serde_json::json!({
            "model": "gpt-4o-mini",
            "max_tokens": 64,
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "text", "text": "here"}
                ]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"}
            ]
        }))
        .expect("chat body"),
    );
    let mut bag = BTreeMap::new();
    let mut scratch = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "req-1",
        metadata: &mut bag,
        scratch: &mut scratch,
        deadline: None,
    };
    let decision = plugin.on_request(&mut ctx, &mut req).expect("on-request");
    let Decision::Continue(m) = decision else {
        panic!("expected continue");
    };
    let report: BTreeMap<String, String> = m.set_metadata.into_iter().collect();
    let get = |k: &str| report.get(k).map(String::as_str);
    assert_eq!(get("id"), Some("req-1"));
    assert_eq!(get("model"), Some("gpt-4o-mini"));
    assert_eq!(get("stream"), Some("false"));
    assert_eq!(get("message_count"), Some("3"));
    // Text parts joined with "\n"; the image counted, not dropped.
    assert_eq!(get("message_0"), Some("look\nhere"));
    assert_eq!(get("other_parts_0"), Some("1"));
    assert_eq!(get("max_tokens"), Some("Some(64)"));
    assert_eq!(get("body"), Some("false"), "no capability body");
    assert_eq!(get("last_user"), Some("and now?"));
    assert_eq!(get("scratch"), Some("kept"));
    // The scratch came back out of the store with the call.
    assert_eq!(
        ctx.scratch.get("probe").map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    // The request moved back too.
    assert_eq!(req.message_count(), 3);
    assert_eq!(req.header("x-fault").as_deref(), Some("host"));

    // With capability `body` the JSON is there.
    req.access = Arc::new(Access {
        headers: HeaderSelection::All,
        body: true,
    });
    let Decision::Continue(m) =
        on_request(&plugin, &mut BTreeMap::new(), &mut req).expect("on-request")
    else {
        panic!("expected continue");
    };
    assert!(m.set_metadata.contains(&("body".into(), "true".into())));

    // Only declared headers are visible: one of two.
    let mut req = request(&[("x-tenant", "acme"), ("authorization", "k")]);
    req.access = Arc::new(Access {
        headers: HeaderSelection::Only(vec!["x-tenant".into()]),
        body: false,
    });
    let Decision::Continue(m) =
        on_request(&plugin, &mut BTreeMap::new(), &mut req).expect("on-request")
    else {
        panic!("expected continue");
    };
    assert_eq!(m.set_metadata, vec![("headers".into(), "1".into())]);
}

#[test]
fn admin_calls_reach_the_component() {
    let (plugin, _host) = probe(relaxed());
    let mut bag = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "admin",
        metadata: &mut bag,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    let resp = plugin
        .admin(
            &mut ctx,
            &crate::plugin::contract::AdminRequest {
                method: "POST".into(),
                path: "/keys/abc".into(),
                query: "x=1".into(),
                body: br#"{"n":1}"#.to_vec(),
            },
        )
        .expect("admin");
    assert_eq!(resp.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"tag": "p1", "method": "POST", "path": "/keys/abc",
                           "query": "x=1", "body": "{\"n\":1}"})
    );
}

/// A component built against `weir:plugin@0.1.0` (tests/fixtures/wasm/contract-v01, from
/// a copy of the 0.1 WIT) is refused at load with a message naming both versions and how
/// to rebuild: the migration path chosen for 0.2 (docs/plugins.md, "Migrating from 0.1").
#[test]
fn a_component_built_against_0_1_is_refused_with_how_to_rebuild() {
    let dir = "tests/fixtures/wasm/contract-v01";
    let err = WasmPlugin::load(
        &engine(),
        "legacy",
        &wasm(dir),
        "{}",
        WasmLimits::default(),
        Arc::new(MemoryHost::new()),
    )
    .expect_err("a 0.1 component must not load");
    let message = err.to_string();
    assert!(message.contains("weir:plugin@0.1.0"), "{message}");
    assert!(message.contains("weir:plugin@0.2.0"), "{message}");
    assert!(
        message.contains("rebuild it with weir-sdk 0.2"),
        "{message}"
    );
    assert!(message.contains("Migrating from 0.1"), "{message}");
}
