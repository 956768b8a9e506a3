//! Lua host tests: decisions, host API, sandbox escapes, deadlines, memory, VM replacement,
//! spare VMs built at load.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::plugin::contract::{
    Access, Dialect, HeaderSelection, LogEntry, MemoryHost, Reply, TextDelta, Usage,
};
use crate::request::Body;

#[derive(Debug)]
struct Fixture {
    _dir: tempfile::TempDir,
    plugin: LuaPlugin,
    host: Arc<MemoryHost>,
}

fn load_with(
    manifest_extra: &str,
    source: &str,
    config: serde_json::Value,
) -> Result<Fixture, PluginError> {
    load_hooks("on-request", manifest_extra, source, config)
}

fn load_hooks(
    hooks: &str,
    manifest_extra: &str,
    source: &str,
    config: serde_json::Value,
) -> Result<Fixture, PluginError> {
    let dir = tempfile::tempdir().unwrap();
    write_plugin(dir.path(), hooks, manifest_extra, source);
    let manifest = Manifest::load(dir.path())?;
    let host = Arc::new(MemoryHost::new());
    let plugin = LuaPlugin::load(&manifest, "t", config, host.clone())?;
    Ok(Fixture {
        _dir: dir,
        plugin,
        host,
    })
}

fn write_plugin(dir: &Path, hooks: &str, manifest_extra: &str, source: &str) {
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = \"t\"\nversion = \"0.1.0\"\nkind = \"lua\"\n\
             hooks = [\"{hooks}\"]\n{manifest_extra}"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("plugin.lua"), source).unwrap();
}

fn load(source: &str) -> Fixture {
    load_with("", source, serde_json::json!({})).unwrap()
}

fn request() -> RequestView {
    view(
        &[("x-tenant", "acme")],
        access(&["x-tenant"], false),
        serde_json::json!({
            "model": "gpt",
            "messages": [{"role": "user", "content": "hello there"}]
        }),
    )
}

/// What a plugin declaring `headers` (and capability `body`) may read.
fn access(headers: &[&str], body: bool) -> Access {
    Access {
        headers: HeaderSelection::Only(headers.iter().map(|h| (*h).to_owned()).collect()),
        body,
    }
}

/// A chat request with these headers and body, read with `access`.
fn view(headers: &[(&str, &str)], access: Access, body: serde_json::Value) -> RequestView {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    RequestView {
        request_id: "req-1".into(),
        dialect: Dialect::OpenAi,
        headers: map,
        body: Body::Chat(serde_json::from_value(body).unwrap()),
        body_json: None,
        access: Arc::new(access),
    }
}

/// VMs taken into use so far: built at load and claimed, or built on a call.
fn handed_out(plugin: &LuaPlugin) -> u64 {
    plugin.vms_created() - plugin.spare_vms() as u64
}

fn run(f: &Fixture) -> (Result<Decision, HookError>, BTreeMap<String, String>) {
    run_with(f, &mut request())
}

/// Runs `on_request` on `req`; returns the decision and the metadata bag.
fn run_with(
    f: &Fixture,
    req: &mut RequestView,
) -> (Result<Decision, HookError>, BTreeMap<String, String>) {
    let mut metadata = BTreeMap::new();
    let mut scratch = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "req-1",
        metadata: &mut metadata,
        scratch: &mut scratch,
        deadline: None,
    };
    let r = f.plugin.on_request(&mut ctx, req);
    (r, metadata)
}

#[test]
fn continue_with_mutations() {
    let f = load(
        r#"
        function on_request(req)
            weir.ctx_set("tenant", req.headers["x-tenant"])
            return weir.continue({
                set_headers = { ["x-b"] = "2", ["x-a"] = "1" },
                remove_headers = { "authorization" },
                set_model = req.model .. "-mini",
                set_metadata = { seen = req.messages[1].content },
                set_targets = { { provider = "p", model = "m" } },
            })
        end
        "#,
    );
    let (r, md) = run(&f);
    let Decision::Continue(m) = r.unwrap() else {
        panic!("expected continue")
    };
    assert_eq!(
        m.set_headers,
        vec![("x-a".into(), "1".into()), ("x-b".into(), "2".into())]
    );
    assert_eq!(m.remove_headers, vec!["authorization"]);
    assert_eq!(m.set_model.as_deref(), Some("gpt-mini"));
    assert_eq!(m.set_metadata, vec![("seen".into(), "hello there".into())]);
    assert_eq!(m.set_targets.unwrap()[0].provider, "p");
    assert_eq!(md.get("tenant").map(String::as_str), Some("acme"));
}

#[test]
fn nil_means_continue_and_reply_ends() {
    let f = load("function on_request(req) end");
    assert_eq!(run(&f).0.unwrap(), Decision::Continue(Mutations::default()));

    let f = load(
        r#"function on_request(req)
             return weir.error_reply(req.dialect, 400, "no", "invalid_request_error")
           end"#,
    );
    let Decision::Reply(Reply {
        status,
        headers,
        body,
    }) = run(&f).0.unwrap()
    else {
        panic!("expected reply")
    };
    assert_eq!(status, 400);
    assert!(headers.contains(&("content-type".into(), "application/json".into())));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["message"], "no");
    assert_eq!(body["error"]["code"], 400);
}

#[test]
fn module_table_style_and_init_config() {
    let f = load_with(
        "",
        r#"
        local M = {}
        local greeting
        function M.init(config) greeting = config.greeting end
        function M.on_request(req) return { set_metadata = { greeting = greeting } } end
        return M
        "#,
        serde_json::json!({"greeting": "hi"}),
    )
    .unwrap();
    let Decision::Continue(m) = run(&f).0.unwrap() else {
        panic!()
    };
    assert_eq!(m.set_metadata, vec![("greeting".into(), "hi".into())]);
}

#[test]
fn init_error_fails_the_load() {
    let err = load_with(
        "",
        "function init(c) error('bad config') end function on_request() end",
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad config"), "{err}");
}

#[test]
fn declared_but_missing_hook_fails_the_load() {
    let err = load_with("", "function on_response() end", serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("on_request"), "{err}");
}

#[test]
fn syntax_error_fails_the_load() {
    let err = load_with("", "function on_request(", serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plugin.lua"), "{err}");
}

#[test]
fn malformed_decisions_are_plugin_errors() {
    for body in [
        "return { set_header = {} }",
        "return 42",
        "return { reply = { status = 99 } }",
        "return { set_targets = { 'x' } }",
    ] {
        let f = load(&format!("function on_request(req) {body} end"));
        assert!(
            matches!(run(&f).0, Err(HookError::Plugin(_))),
            "{body}: {:?}",
            run(&f).0
        );
    }
}

#[test]
fn kv_and_metrics_reach_the_host() {
    let f = load(
        r#"function on_request(req)
             local n = weir.kv.incr("hits", 1, 60000)
             weir.kv.set("last", req.request_id)
             weir.kv.delete("lock")
             assert(weir.kv.cas("lock", nil, "1"))
             assert(not weir.kv.cas("lock", nil, "2"))
             weir.counter("seen")
             weir.histogram("size", #req.messages)
             weir.log("info", "hit " .. n)
             return { set_metadata = { n = n, tokens = weir.count_tokens("abcdefgh"),
                                        last = weir.kv.get("last") } }
           end"#,
    );
    run(&f).0.unwrap();
    let Decision::Continue(m) = run(&f).0.unwrap() else {
        panic!()
    };
    assert_eq!(
        m.set_metadata,
        vec![
            ("last".into(), "req-1".into()),
            ("n".into(), "2".into()),
            ("tokens".into(), "2".into())
        ]
    );
    let state = f.host.snapshot();
    assert_eq!(state.counters.get("seen"), Some(&2));
    assert_eq!(state.logs.len(), 2);
}

#[test]
fn json_helpers_round_trip() {
    let f = load(
        r#"function on_request(req)
             local v = weir.json.decode('{"a":[1,2,{"b":null}]}')
             assert(weir.sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
             return { set_metadata = { n = #v.a, s = weir.json.encode({ x = "y" }) } }
           end"#,
    );
    let Decision::Continue(m) = run(&f).0.unwrap() else {
        panic!()
    };
    assert_eq!(
        m.set_metadata,
        vec![
            ("n".into(), "3".into()),
            ("s".into(), r#"{"x":"y"}"#.into())
        ]
    );
}

/// Every escape is a runtime error (trap), never a side effect.
#[test]
fn sandbox_escapes_fail() {
    let marker = std::env::temp_dir().join(format!("weir-escape-{}", std::process::id()));
    let marker = marker.display().to_string();
    let attempts = [
        format!("os.execute('touch {marker}')"),
        format!("io.open('{marker}', 'w')"),
        "require('os')".to_owned(),
        "loadstring('return 1')()".to_owned(),
        "load('return 1')()".to_owned(),
        // Precompiled bytecode (the header byte of a Luau chunk) through any loader.
        "local f = (loadstring or load)('\\27Lua') f()".to_owned(),
        "dofile('/etc/passwd')".to_owned(),
        "debug.getinfo(1)".to_owned(),
        "getfenv(1).x = 1".to_owned(),
        "weir.kv = nil".to_owned(),
        "string.len = nil".to_owned(),
        "setmetatable(\"\", {})".to_owned(),
        "getmetatable('').__index = {}".to_owned(),
        "print('hello')".to_owned(),
    ];
    for attempt in &attempts {
        let f = load(&format!("function on_request(req) {attempt} end"));
        let r = run(&f).0;
        assert!(matches!(r, Err(HookError::Trap(_))), "{attempt}: {r:?}");
    }
    assert!(!Path::new(&marker).exists());
}

#[test]
fn memory_bomb_is_cut() {
    let f = load_with(
        "[limits]\nmemory_mb = 8\n",
        "function on_request(req) local s = string.rep('x', 1e9) return { set_model = s } end",
        serde_json::json!({}),
    )
    .unwrap();
    assert_eq!(run(&f).0, Err(HookError::OutOfMemory));

    // Growing until the cap, keeping every piece alive, and catching the error.
    let f = load_with(
        "[limits]\nmemory_mb = 8\ndeadline_ms = 2000\n",
        "function on_request(req) local t = {} local s = 'y' pcall(function() for i = 1, 64 do s = s .. s t[i] = s end end) return { set_model = #t } end",
        serde_json::json!({}),
    )
    .unwrap();
    assert_eq!(run(&f).0, Err(HookError::OutOfMemory));
    // The plugin still answers afterwards, from a fresh VM.
    let before = handed_out(&f.plugin);
    let _ = run(&f);
    assert_eq!(handed_out(&f.plugin), before + 1);
}

#[test]
fn infinite_loop_is_cut_at_the_deadline_even_under_pcall() {
    let sources = [
        "function on_request(req) while true do end end",
        // Catching the deadline error and looping again.
        "function on_request(req) while true do pcall(function() while true do end end) end end",
        // Catching it and returning normally still counts as a timeout.
        "function on_request(req) pcall(function() while true do end end) return nil end",
        // An error handler that loops.
        "function on_request(req) xpcall(function() while true do end end, function() while true do end end) end",
        // Recursion instead of a loop.
        "local function f(n) return f(n + 1) + 1 end function on_request(req) pcall(f, 1) while true do pcall(f, 1) end end",
    ];
    for source in sources {
        let f = load_with(
            "[limits]\ndeadline_ms = 20\n",
            source,
            serde_json::json!({}),
        )
        .unwrap();
        let started = Instant::now();
        let r = run(&f).0;
        let took = started.elapsed();
        assert_eq!(r, Err(HookError::Timeout { deadline_ms: 20 }), "{source}");
        assert!(took < Duration::from_millis(500), "{source}: took {took:?}");
    }
}

#[test]
fn errors_are_contained_and_the_vm_replaced() {
    let f = load(
        r#"
        local calls = 0
        function on_request(req)
            calls = calls + 1
            if req.headers["x-tenant"] == "acme" and calls == 2 then error("boom") end
            return { set_metadata = { calls = calls } }
        end
        "#,
    );
    let calls = |f: &Fixture| match run(f).0 {
        Ok(Decision::Continue(m)) => m.set_metadata[0].1.clone(),
        other => format!("{other:?}"),
    };
    assert_eq!(calls(&f), "1");
    let r = run(&f).0;
    assert!(
        matches!(&r, Err(HookError::Trap(m)) if m.contains("boom")),
        "{r:?}"
    );
    // A fresh VM: its local state starts over.
    assert_eq!(calls(&f), "1");
    assert_eq!(handed_out(&f.plugin), 2);
}

/// Loads `source` (an `on_request` plugin) with `spares` VMs built ahead.
fn load_spares(source: &str, spares: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    write_plugin(dir.path(), "on-request", "", source);
    let manifest = Manifest::load(dir.path()).unwrap();
    let host = Arc::new(MemoryHost::new());
    let plugin =
        LuaPlugin::load_with_spares(&manifest, "t", serde_json::json!({}), host.clone(), spares)
            .unwrap();
    Fixture {
        _dir: dir,
        plugin,
        host,
    }
}

/// Calls `on_request` `n` times from a new thread, which exits afterwards.
fn call_from_new_thread(plugin: &Arc<LuaPlugin>, n: usize) {
    let p = plugin.clone();
    std::thread::spawn(move || {
        for _ in 0..n {
            let mut md = BTreeMap::new();
            let mut ctx = HookCtx {
                request_id: "r",
                metadata: &mut md,
                scratch: &mut BTreeMap::new(),
                deadline: None,
            };
            p.on_request(&mut ctx, &mut request()).unwrap();
        }
    })
    .join()
    .unwrap();
}

#[test]
fn one_vm_per_thread() {
    let f = load_spares("function on_request(req) end", 1);
    let plugin = Arc::new(f.plugin);
    for _ in 0..3 {
        call_from_new_thread(&plugin, 10);
    }
    // The load built one (taken by the first thread), then one per further thread.
    assert_eq!(plugin.vms_created(), 3);
}

#[test]
fn load_builds_one_spare_per_worker_and_threads_take_them() {
    let n = 4;
    // `init` runs once per VM: the count shows where VMs were built.
    let source = "local inits = 0\nfunction init(c) inits = inits + 1 end\n\
                  function on_request(req) return { set_metadata = { inits = inits } } end";
    let f = load_spares(source, n);
    assert_eq!(f.plugin.vms_created(), n as u64);
    assert_eq!(f.plugin.spare_vms(), n);
    let plugin = Arc::new(f.plugin);
    // N threads, all alive at once (as a runtime's workers are), none builds a VM.
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (p, barrier) = (plugin.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..20 {
                    let mut md = BTreeMap::new();
                    let mut ctx = HookCtx {
                        request_id: "r",
                        metadata: &mut md,
                        scratch: &mut BTreeMap::new(),
                        deadline: None,
                    };
                    let Decision::Continue(m) = p.on_request(&mut ctx, &mut request()).unwrap()
                    else {
                        panic!("expected continue")
                    };
                    // Each VM ran `init` exactly once, at load.
                    assert_eq!(m.set_metadata, vec![("inits".into(), "1".into())]);
                }
                barrier.wait();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(plugin.vms_created(), n as u64, "no thread built a VM");
    assert_eq!(plugin.spare_vms(), 0, "every thread took a spare");
    // A thread beyond the spares builds its own.
    call_from_new_thread(&plugin, 1);
    assert_eq!(plugin.vms_created(), n as u64 + 1);
}

#[test]
fn default_spares_follow_the_worker_count() {
    let f = load("function on_request(req) end");
    let expected = default_spares();
    assert!((1..=MAX_SPARE_VMS).contains(&expected));
    assert_eq!(f.plugin.vms_created(), expected as u64);
    assert_eq!(f.plugin.spare_vms(), expected);
}

/// Every VM holds clones of the host handle (in its `weir.*` functions), so the handle's
/// reference count tells how many VMs are alive.
#[test]
fn vms_are_freed_with_the_plugin() {
    let Fixture { _dir, plugin, host } = load_spares("function on_request(req) end", 4);
    // Handles besides the VMs': the fixture's, and the plugin's own while it is loaded.
    let per_vm = (Arc::strong_count(&host) - 2) / 4;
    assert!(per_vm > 0);
    let alive = |others: usize| {
        let vms = Arc::strong_count(&host) - others;
        assert_eq!(vms % per_vm, 0, "{vms}");
        vms / per_vm
    };
    assert_eq!(alive(2), 4);
    let plugin = Arc::new(plugin);
    // Two threads take a spare each; their VMs go when the threads exit.
    call_from_new_thread(&plugin, 3);
    call_from_new_thread(&plugin, 3);
    assert_eq!(plugin.spare_vms(), 2);
    assert_eq!(alive(2), 2);
    // This thread takes one and keeps it in its pool.
    run_on(&plugin);
    assert_eq!(plugin.spare_vms(), 1);
    assert_eq!(alive(2), 2);
    // Unloading frees the unclaimed spare at once...
    drop(plugin);
    assert_eq!(alive(1), 1, "only this thread's pooled VM is left");
    // ...and this thread's pooled VM the next time its pool changes.
    let other = load_spares("function on_request(req) end", 1);
    run_on(&other.plugin);
    assert_eq!(alive(1), 0, "every VM of the plugin was freed");
}

/// Loads `source` (`on_request` and `on_log`) with `spares` VMs built ahead; counts its
/// VMs alive by the host handles they hold, as [`vms_are_freed_with_the_plugin`] does.
fn load_logging(spares: usize) -> (Fixture, impl Fn(&Fixture) -> usize) {
    let dir = tempfile::tempdir().unwrap();
    write_plugin(
        dir.path(),
        "on-request\", \"on-log",
        "",
        "function on_request(req) end\nfunction on_log(entry) end",
    );
    let manifest = Manifest::load(dir.path()).unwrap();
    let host = Arc::new(MemoryHost::new());
    let plugin =
        LuaPlugin::load_with_spares(&manifest, "t", serde_json::json!({}), host.clone(), spares)
            .unwrap();
    // Handles besides the VMs': the fixture's and the plugin's own.
    let per_vm = (Arc::strong_count(&host) - 2) / spares;
    let f = Fixture {
        _dir: dir,
        plugin,
        host,
    };
    let alive = move |f: &Fixture| {
        let vms = Arc::strong_count(&f.host) - 2;
        assert_eq!(vms % per_vm, 0, "{vms}");
        vms / per_vm
    };
    (f, alive)
}

fn log_on(plugin: &LuaPlugin) {
    let mut md = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r",
        metadata: &mut md,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    plugin.on_log(&mut ctx, &LogEntry::default()).unwrap();
}

#[test]
fn on_log_vms_stay_with_the_plugin_not_the_thread() {
    let (f, alive) = load_logging(2);
    assert_eq!(alive(&f), 2);
    // Five `on_log` threads, one after another, share one VM, built by the first (the
    // spares are for the request path) and kept by the plugin, not by the threads.
    for _ in 0..5 {
        std::thread::scope(|s| {
            s.spawn(|| log_on(&f.plugin));
        });
    }
    assert_eq!(f.plugin.vms_created(), 3);
    assert_eq!((f.plugin.spare_vms(), alive(&f)), (2, 3));
    drop(f.plugin);
    assert_eq!(
        Arc::strong_count(&f.host),
        1,
        "every VM was freed with the plugin"
    );
}

#[test]
fn parking_frees_what_is_kept_warm_and_unparking_builds_spares_again() {
    let (f, alive) = load_logging(2);
    run_on(&f.plugin); // this thread claims a spare into its pool
    log_on(&f.plugin); // one VM in the plugin's shared pool
    assert_eq!((f.plugin.spare_vms(), alive(&f)), (1, 3));
    assert_eq!(f.plugin.shared.ready(), 2);

    f.plugin.shared.park();
    assert_eq!(f.plugin.shared.ready(), 0);
    assert_eq!(alive(&f), 1, "only this thread's pooled VM is left");
    // A call while parked (a stream that started before the reload) still works: it moves
    // this thread's VM to the shared pool, and later calls share that one.
    run_on(&f.plugin);
    log_on(&f.plugin);
    assert_eq!((f.plugin.shared.ready(), alive(&f)), (1, 1));
    // The thread's pool no longer holds it.
    let other = load_spares("function on_request(req) end", 1);
    run_on(&other.plugin);
    assert_eq!(alive(&f), 1);
    assert_eq!(f.plugin.vms_created(), 3, "nothing was built while parked");

    // A rollback: spares again, so that no thread builds a VM on its first call.
    f.plugin.shared.unpark();
    assert_eq!((f.plugin.spare_vms(), f.plugin.shared.ready()), (2, 3));
    assert_eq!(alive(&f), 3);
    run_on(&f.plugin);
    assert_eq!(f.plugin.vms_created(), 5);
}

#[test]
fn a_thread_drops_vms_of_parked_plugins_when_it_returns_one() {
    let old = load_spares("function on_request(req) end", 1);
    let new = load_spares("function on_request(req) end", 1);
    let vms = |f: &Fixture| Arc::strong_count(&f.host) - 2;
    let per_vm = vms(&old);
    run_on(&old.plugin);
    old.plugin.shared.park();
    assert_eq!(vms(&old), per_vm, "still in this thread's pool");
    run_on(&new.plugin);
    assert_eq!(
        vms(&old),
        0,
        "dropped when this thread returned a VM of the new one"
    );
}

fn run_on(plugin: &LuaPlugin) {
    let mut md = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r",
        metadata: &mut md,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    plugin.on_request(&mut ctx, &mut request()).unwrap();
}

#[test]
fn chunk_actions() {
    let f = load_hooks(
        "on-response-chunk",
        "",
        r#"
        function on_response_chunk(ev)
            if ev.type ~= "text_delta" then return nil end
            if ev.text == "hold" then return weir.hold() end
            if ev.text == "stop" then return weir.abort("budget") end
            if ev.text == "swap" then
                return weir.replace({ { type = "text_delta", choice = ev.choice, text = "[x]" },
                                      { type = "usage", prompt_tokens = 1, completion_tokens = 2 } })
            end
        end
        "#,
        serde_json::json!({}),
    )
    .unwrap();
    let plugin = &f.plugin;
    let mut md = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r",
        metadata: &mut md,
        scratch: &mut BTreeMap::new(),
        deadline: None,
    };
    let text = |t: &str| {
        StreamEvent::TextDelta(TextDelta {
            choice: 0,
            text: t.into(),
            last: false,
        })
    };
    assert_eq!(plugin.on_chunk(&mut ctx, &text("a")), Ok(ChunkAction::Pass));
    assert_eq!(
        plugin.on_chunk(&mut ctx, &text("hold")),
        Ok(ChunkAction::Hold)
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &text("stop")),
        Ok(ChunkAction::Abort("budget".into()))
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &text("swap")),
        Ok(ChunkAction::Replace(vec![
            text("[x]"),
            StreamEvent::Usage(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cached_tokens: 0,
                cache_write_tokens: 0,
            })
        ]))
    );
    assert_eq!(
        plugin.on_chunk(&mut ctx, &StreamEvent::Usage(Usage::default())),
        Ok(ChunkAction::Pass)
    );
}

/// Per-call p50 of a typical `on_request` (20 headers, 2 declared) and of a chunk hook, and
/// the time to build one VM.
/// Run in release for meaningful numbers:
/// `cargo test --release -p weir --lib plugin::lua::tests::hook_call_cost -- --nocapture`.
#[test]
fn hook_call_cost() {
    let f = load_hooks(
        "on-request\", \"on-response-chunk",
        // Generous deadlines: a loaded test machine must not turn this into a timeout.
        "[limits]\ndeadline_ms = 1000\nchunk_deadline_ms = 1000\n",
        r#"function on_request(req)
             if req.headers["x-tenant"] == nil then return weir.reply(401, "no tenant") end
             return { set_metadata = { tenant = req.headers["x-tenant"] } }
           end
           function on_response_chunk(ev)
             if ev.type == "text_delta" and string.find(ev.text, "secret", 1, true) then
               return weir.hold()
             end
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    // Twenty headers, two declared (the chain hands a plugin only its declared headers).
    let mut headers: Vec<(String, String)> = (0..18)
        .map(|i| (format!("x-extra-{i}"), format!("value-{i}")))
        .collect();
    headers.push(("x-tenant".into(), "acme".into()));
    headers.push(("x-team".into(), "red".into()));
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut req = view(
        &headers,
        access(&["x-tenant", "x-team"], false),
        serde_json::json!({
            "model": "gpt",
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "hello there"}]
        }),
    );
    let mut md = BTreeMap::new();
    let p50 = |mut samples: Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2]
    };
    let n = 5000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ctx = HookCtx {
            request_id: "r",
            metadata: &mut md,
            scratch: &mut BTreeMap::new(),
            deadline: None,
        };
        let t = Instant::now();
        f.plugin.on_request(&mut ctx, &mut req).unwrap();
        samples.push(t.elapsed());
    }
    let request_p50 = p50(samples);
    let event = StreamEvent::TextDelta(TextDelta {
        choice: 0,
        text: "Hello there, how".into(),
        last: false,
    });
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ctx = HookCtx {
            request_id: "r",
            metadata: &mut md,
            scratch: &mut BTreeMap::new(),
            deadline: None,
        };
        let t = Instant::now();
        f.plugin.on_chunk(&mut ctx, &event).unwrap();
        samples.push(t.elapsed());
    }
    let chunk_p50 = p50(samples);
    // What a thread's first call would pay without spares: one VM (bytecode load + init).
    let spares = 8;
    let started = Instant::now();
    let f = load_spares("function init(c) end function on_request(req) end", spares);
    let per_vm = started.elapsed() / u32::try_from(spares).unwrap();
    assert_eq!(f.plugin.vms_created(), spares as u64);
    eprintln!(
        "lua on_request p50 {request_p50:?}, on_response_chunk p50 {chunk_p50:?}, \
         building a VM (at load, {spares} spares) {per_vm:?} each"
    );
}

// ---- contract 0.2 ----

/// The request the lazy-table tests read: a declared and an undeclared header, a
/// `max_tokens`, one message.
fn team_request(body: bool) -> RequestView {
    view(
        &[("x-team", "red"), ("authorization", "Bearer sk-1")],
        access(&["x-team"], body),
        serde_json::json!({
            "model": "gpt",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "hello there"}]
        }),
    )
}

fn continued(r: Result<Decision, HookError>) -> Mutations {
    match r {
        Ok(Decision::Continue(m)) => m,
        other => panic!("expected continue, got {other:?}"),
    }
}

#[test]
fn a_plugin_reading_one_declared_header_sees_it() {
    let f = load_with(
        "headers = [\"x-team\"]\n",
        r#"function on_request(req)
             return { set_metadata = { team = req.header("x-team") } }
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    let m = continued(run_with(&f, &mut team_request(false)).0);
    assert_eq!(m.set_metadata, vec![("team".into(), "red".into())]);
}

#[test]
fn the_lazy_request_reads_only_what_the_manifest_allows() {
    let f = load_with(
        "headers = [\"x-team\"]\n",
        r#"function on_request(req)
             local all = 0
             for _ in pairs(req.headers) do all = all + 1 end
             return { set_metadata = {
                 method_style = req:header("X-Team") or "nil",
                 undeclared = req.header("authorization") or "nil",
                 in_headers = req.headers["authorization"] or "nil",
                 header_count = all,
                 body = req.body == nil and "nil" or "some",
                 max_tokens = req.max_tokens or "nil",
                 count = req.message_count,
                 first = req.message(1).content,
                 zeroth = req.message(0) == nil and "nil" or "some",
                 listed = req.messages[1].content,
                 model = req.model,
             } }
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    let m = continued(run_with(&f, &mut team_request(false)).0);
    let md: BTreeMap<String, String> = m.set_metadata.into_iter().collect();
    let get = |k: &str| md[k].as_str();
    assert_eq!(get("method_style"), "red");
    assert_eq!(get("undeclared"), "nil");
    assert_eq!(get("in_headers"), "nil");
    assert_eq!(get("header_count"), "1");
    assert_eq!(get("body"), "nil", "no capability body");
    assert_eq!(get("max_tokens"), "256");
    assert_eq!(get("count"), "1");
    assert_eq!(get("first"), "hello there");
    assert_eq!(get("zeroth"), "nil", "message(i) is 1-based");
    assert_eq!(get("listed"), "hello there");
    assert_eq!(get("model"), "gpt");
}

#[test]
fn the_body_is_readable_with_capability_body() {
    let f = load_with(
        "headers = [\"x-team\"]\n[capabilities]\nbody = true\n",
        r#"function on_request(req)
             local body = weir.json.decode(req.body)
             return { set_metadata = { max_tokens = body.max_tokens, model = body.model } }
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    let mut req = team_request(true);
    let m = continued(run_with(&f, &mut req).0);
    assert_eq!(
        m.set_metadata,
        vec![
            ("max_tokens".into(), "256".into()),
            ("model".into(), "gpt".into())
        ]
    );
    // The request came back from the VM, with the JSON kept for the next plugin.
    assert_eq!(req.model(), "gpt");
    assert_eq!(req.header("x-team").as_deref(), Some("red"));
    assert!(
        req.body_json
            .as_deref()
            .unwrap()
            .contains("\"max_tokens\":256")
    );
}

#[test]
fn text_deltas_carry_last() {
    let f = load_hooks(
        "on-response-chunk",
        "",
        r#"function on_response_chunk(ev)
             weir.ctx_set("last", tostring(ev.last))
             if not ev.last then return weir.hold() end
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    let mut md = BTreeMap::new();
    let mut scratch = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r",
        metadata: &mut md,
        scratch: &mut scratch,
        deadline: None,
    };
    let delta = |last: bool| {
        StreamEvent::TextDelta(TextDelta {
            choice: 0,
            text: "abc".into(),
            last,
        })
    };
    assert_eq!(
        f.plugin.on_chunk(&mut ctx, &delta(false)),
        Ok(ChunkAction::Hold)
    );
    assert_eq!(ctx.metadata["last"], "false");
    assert_eq!(
        f.plugin.on_chunk(&mut ctx, &delta(true)),
        Ok(ChunkAction::Pass)
    );
    assert_eq!(ctx.metadata["last"], "true");
}

#[test]
fn scratch_lives_in_the_hook_context() {
    let f = load_hooks(
        "on-request\", \"on-log",
        "",
        r#"function on_request(req)
             weir.scratch_set("started", "42")
             weir.scratch_set("gone", "x")
             weir.scratch_set("gone", nil)
           end
           function on_log(entry)
             weir.ctx_set("started", weir.scratch_get("started") or "nil")
             weir.ctx_set("gone", weir.scratch_get("gone") or "nil")
           end"#,
        serde_json::json!({}),
    )
    .unwrap();
    let mut md = BTreeMap::new();
    let mut scratch = BTreeMap::new();
    let mut ctx = HookCtx {
        request_id: "r",
        metadata: &mut md,
        scratch: &mut scratch,
        deadline: None,
    };
    continued(f.plugin.on_request(&mut ctx, &mut request()));
    assert!(ctx.metadata.is_empty(), "the scratch is not the shared bag");
    assert_eq!(
        ctx.scratch.clone().into_iter().collect::<Vec<_>>(),
        vec![("started".to_owned(), b"42".to_vec())]
    );
    // `on_log` runs on another VM (the plugin's pool): the scratch travels with the call.
    f.plugin.on_log(&mut ctx, &LogEntry::default()).unwrap();
    assert_eq!(ctx.metadata["started"], "42");
    assert_eq!(ctx.metadata["gone"], "nil");
}
