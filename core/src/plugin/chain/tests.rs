//! Chain tests: order, mutations, replies, failure policies, breaker, shadow mode, hold
//! buffering and stream rebuilding.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::api::openai::{
    ChatChunk, ChatMessage, Choice, ChunkChoice, ContentPart, Delta, FunctionCall, MessageContent,
    ToolCall,
};
use crate::config::Config;
use crate::plugin::breaker::BreakerConfigFile;
use crate::plugin::config::PluginInstanceConfig;
use crate::plugin::contract::{
    AdminRequest, AdminResponse, ChunkAction, HookError, Mutations, PluginRuntime,
    ResponseMutations, ResponseView, StreamEvent,
};
use crate::plugin::host::{HostLookups, PluginMetrics};
use crate::plugin::manifest::FailurePolicy;
use crate::request::{Body, TargetOverride};
use crate::state::MemoryStore;

fn metrics() -> PluginMetrics {
    PluginMetrics::unregistered().unwrap()
}

fn instance_cfg(failure: Option<FailurePolicy>, mode: Mode) -> PluginInstanceConfig {
    PluginInstanceConfig {
        path: ".".into(),
        name: None,
        config: None,
        failure,
        mode,
        deadline_ms: None,
        chunk_deadline_ms: None,
        breaker: BreakerConfigFile {
            failures: Some(3),
            cooldown_ms: Some(50),
            max_cooldown_ms: Some(1000),
        },
    }
}

type Answer = Box<dyn Fn(u32, &mut RequestView) -> Result<Decision, HookError> + Send + Sync>;

/// A runtime whose `on_request` answers from a closure and counts its calls.
struct Fake {
    name: String,
    calls: AtomicU32,
    answer: Answer,
}

impl PluginRuntime for Fake {
    fn name(&self) -> &str {
        &self.name
    }
    fn on_request(
        &self,
        _: &mut HookCtx<'_>,
        req: &mut RequestView,
    ) -> Result<Decision, HookError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        (self.answer)(n, req)
    }
    fn on_response(
        &self,
        _: &mut HookCtx<'_>,
        _: &ResponseView,
    ) -> Result<ResponseDecision, HookError> {
        Ok(ResponseDecision::Continue(ResponseMutations::default()))
    }
    fn on_chunk(&self, _: &mut HookCtx<'_>, _: &StreamEvent) -> Result<ChunkAction, HookError> {
        Ok(ChunkAction::Pass)
    }
    fn on_log(&self, _: &mut HookCtx<'_>, _: &LogEntry) -> Result<(), HookError> {
        Ok(())
    }
    fn admin(&self, _: &mut HookCtx<'_>, _: &AdminRequest) -> Result<AdminResponse, HookError> {
        Err(HookError::Plugin("no admin hook".into()))
    }
}

fn fake(
    name: &str,
    failure: Option<FailurePolicy>,
    mode: Mode,
    answer: impl Fn(u32, &mut RequestView) -> Result<Decision, HookError> + Send + Sync + 'static,
) -> (Arc<Instance>, Arc<Fake>) {
    fake_with(name, "", failure, mode, answer)
}

/// [`fake`] with more manifest text (e.g. `[capabilities]`).
fn fake_with(
    name: &str,
    manifest_extra: &str,
    failure: Option<FailurePolicy>,
    mode: Mode,
    answer: impl Fn(u32, &mut RequestView) -> Result<Decision, HookError> + Send + Sync + 'static,
) -> (Arc<Instance>, Arc<Fake>) {
    let manifest = Manifest::parse(
        Path::new("/fake"),
        &format!(
            "name = \"{name}\"\nversion = \"1\"\nkind = \"wasm\"\nhooks = [\"on-request\"]\n\
             headers = [\"x-tenant\"]\n{manifest_extra}"
        ),
    )
    .unwrap();
    let runtime = Arc::new(Fake {
        name: name.into(),
        calls: AtomicU32::new(0),
        answer: Box::new(answer),
    });
    let inst = Instance::new(
        name.into(),
        Arc::new(manifest),
        runtime.clone(),
        &instance_cfg(failure, mode),
        metrics(),
    );
    (Arc::new(inst), runtime)
}

/// A Lua plugin instance from inline source (declares header `x-tenant`, capability kv).
fn lua(name: &str, hooks: &str, source: &str, cfg: PluginInstanceConfig) -> Arc<Instance> {
    lua_with(
        name,
        hooks,
        "headers = [\"x-tenant\"]\n[capabilities]\nkv = true\n",
        source,
        cfg,
    )
}

/// A Lua plugin instance from inline source, with `manifest_extra` after the hooks line.
fn lua_with(
    name: &str,
    hooks: &str,
    manifest_extra: &str,
    source: &str,
    cfg: PluginInstanceConfig,
) -> Arc<Instance> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1\"\nkind = \"lua\"\nhooks = [{hooks}]\n\
             {manifest_extra}"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("plugin.lua"), source).unwrap();
    Instance::load(
        dir.path(),
        &cfg,
        "plugins[0]",
        Arc::new(MemoryStore::new()),
        &metrics(),
        Arc::new(HostLookups::default()),
    )
    .unwrap()
}

fn enforce() -> PluginInstanceConfig {
    instance_cfg(None, Mode::Enforce)
}

fn ctx() -> RequestCtx {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    headers.insert("authorization", "Bearer k".parse().unwrap());
    RequestCtx {
        request_id: "r1".into(),
        dialect: Dialect::OpenAi,
        started: Instant::now(),
        headers,
        body: Body::Chat(
            serde_json::from_value(serde_json::json!({
                "model": "gpt",
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ]
            }))
            .unwrap(),
        ),
        targets: None,
        client_body: None,
        metadata: BTreeMap::new(),
        scratch: Default::default(),
        decisions: Vec::new(),
    }
}

fn chain(instances: Vec<Arc<Instance>>) -> Chain {
    Chain::new(instances).unwrap()
}

fn cont() -> Result<Decision, HookError> {
    Ok(Decision::Continue(Mutations::default()))
}

#[test]
fn mutations_apply_in_order_and_later_plugins_see_them() {
    let first = lua(
        "first",
        "\"on-request\"",
        r#"function on_request(req)
             return { set_model = "gpt-mini", remove_headers = { "authorization" },
                      set_headers = { ["x-tenant"] = "beta" },
                      set_response_headers = { ["x-weir-tenant"] = req.headers["x-tenant"] },
                      set_metadata = { tenant = req.headers["x-tenant"] } }
           end"#,
        enforce(),
    );
    let second = lua(
        "second",
        "\"on-request\"",
        r#"function on_request(req)
             return { set_metadata = { seen_model = req.model, seen_tenant = req.headers["x-tenant"],
                                       prior = weir.ctx_get("tenant") },
                      set_messages = { { role = "system", content = "be nicer" },
                                       { role = "user", content = "hi" } },
                      set_targets = { { provider = "mock", model = "m1" } } }
           end"#,
        enforce(),
    );
    let mut ctx = ctx();
    assert_eq!(
        chain(vec![first, second]).on_request(&mut ctx),
        Ok(Flow::Continue)
    );
    assert_eq!(ctx.body.model(), "gpt-mini");
    assert!(ctx.headers.get("authorization").is_none());
    assert_eq!(ctx.headers["x-tenant"], "beta");
    assert_eq!(ctx.metadata["seen_model"], "gpt-mini");
    assert_eq!(ctx.metadata["seen_tenant"], "beta");
    assert_eq!(ctx.metadata["prior"], "acme");
    assert_eq!(
        response_headers(&ctx.metadata).collect::<Vec<_>>(),
        vec![("x-weir-tenant", "acme")]
    );
    assert_eq!(
        ctx.targets,
        Some(vec![TargetOverride {
            provider: "mock".into(),
            model: "m1".into()
        }])
    );
    let Body::Chat(c) = &ctx.body else { panic!() };
    assert_eq!(c.messages[0].text(), "be nicer");
    // The unchanged user message keeps its image part.
    assert!(matches!(&c.messages[1].content, Some(MessageContent::Parts(p)) if p.len() == 2));
}

#[test]
fn the_body_is_serialized_once_and_again_after_a_change() {
    // (plugin, whether the view already held the body JSON before it asked, the JSON)
    let seen = Arc::new(Mutex::new(Vec::new()));
    let body_plugin = |name: &str, answer: fn() -> Mutations| {
        let seen = seen.clone();
        let name_owned = name.to_owned();
        fake_with(
            name,
            "[capabilities]\nbody = true\n",
            None,
            Mode::Enforce,
            move |_, req| {
                let cached = req.body_json.is_some();
                let json = req.body_json();
                seen.lock()
                    .unwrap()
                    .push((name_owned.clone(), cached, json));
                Ok(Decision::Continue(answer()))
            },
        )
        .0
    };
    let renames = body_plugin("renames", || Mutations {
        set_model: Some("gpt-mini".into()),
        ..Mutations::default()
    });
    let reads = body_plugin("reads", Mutations::default);
    let tag = || Mutations {
        set_metadata: vec![("t".into(), "1".into())],
        ..Mutations::default()
    };
    let tags = body_plugin("tags", tag);
    let tags_again = body_plugin("tags-again", tag);
    let (no_body, _) = fake("no-body", None, Mode::Enforce, |_, req| {
        // Without capability `body` the body reads as none.
        assert_eq!(req.body_json(), None);
        cont()
    });
    let mut ctx = ctx();
    assert_eq!(
        chain(vec![renames, no_body, reads, tags, tags_again]).on_request(&mut ctx),
        Ok(Flow::Continue)
    );
    let seen = seen.lock().unwrap();
    let model_of = |i: usize| {
        let body: serde_json::Value = serde_json::from_str(seen[i].2.as_deref().unwrap()).unwrap();
        body["model"].as_str().unwrap().to_owned()
    };
    assert_eq!(seen.len(), 4);
    assert_eq!(model_of(0), "gpt");
    // Serialized by the first reader, again by the first reader after the change (the
    // rename), and then kept for the plugins that follow.
    let cached: Vec<bool> = seen.iter().map(|s| s.1).collect();
    assert_eq!(cached, vec![false, false, true, true]);
    // Every plugin after the rename sees the renamed body, and the same text.
    for i in 1..4 {
        assert_eq!(model_of(i), "gpt-mini");
        assert_eq!(seen[i].2, seen[1].2);
    }
    let Body::Chat(c) = &ctx.body else { panic!() };
    assert_eq!(seen[1].2, serde_json::to_string(c).ok());
}

#[test]
fn reply_ends_the_chain() {
    let (a, _) = fake("a", None, Mode::Enforce, |_, req| {
        assert_eq!(req.header("x-tenant").as_deref(), Some("acme"));
        // Undeclared headers are not visible.
        assert_eq!(req.header("authorization"), None);
        Ok(Decision::Reply(Reply {
            status: 429,
            headers: vec![],
            body: b"slow".to_vec(),
        }))
    });
    let (b, b_rt) = fake("b", None, Mode::Enforce, |_, _| cont());
    let flow = chain(vec![a, b]).on_request(&mut ctx()).unwrap();
    assert!(matches!(flow, Flow::Reply(r) if r.status == 429));
    assert_eq!(b_rt.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn fail_closed_fails_the_request_and_fail_open_skips() {
    let timeout = |_, _: &mut RequestView| Err(HookError::Timeout { deadline_ms: 5 });
    let (closed, _) = fake(
        "closed",
        Some(FailurePolicy::Closed),
        Mode::Enforce,
        timeout,
    );
    let (after, after_rt) = fake("after", None, Mode::Enforce, |_, _| cont());
    assert_eq!(
        chain(vec![closed, after]).on_request(&mut ctx()),
        Err(PluginFailure {
            plugin: "closed".into(),
            kind: "timeout"
        })
    );
    assert_eq!(after_rt.calls.load(Ordering::SeqCst), 0);

    let (open, _) = fake("open", Some(FailurePolicy::Open), Mode::Enforce, timeout);
    let (after, after_rt) = fake("after", None, Mode::Enforce, |_, _| cont());
    let m = metrics();
    let open = Arc::new(Instance::new(
        "open".into(),
        open.manifest.clone(),
        open.runtime.clone(),
        &instance_cfg(Some(FailurePolicy::Open), Mode::Enforce),
        m.clone(),
    ));
    assert_eq!(
        chain(vec![open, after]).on_request(&mut ctx()),
        Ok(Flow::Continue)
    );
    assert_eq!(after_rt.calls.load(Ordering::SeqCst), 1);
    assert_eq!(m.failures.with_label_values(&["open", "timeout"]).get(), 1);
}

#[test]
fn shadow_mode_never_changes_or_fails_a_request() {
    let (replies, _) = fake("replies", None, Mode::Shadow, |_, _| {
        Ok(Decision::Reply(Reply {
            status: 401,
            headers: vec![],
            body: vec![],
        }))
    });
    let (traps, _) = fake(
        "traps",
        Some(FailurePolicy::Closed),
        Mode::Shadow,
        |_, _| Err(HookError::Trap("boom".into())),
    );
    assert_eq!(
        chain(vec![replies, traps]).on_request(&mut ctx()),
        Ok(Flow::Continue)
    );
}

#[test]
fn breaker_opens_after_failures_and_recovers_after_cooldown() {
    let healthy = Arc::new(Mutex::new(false));
    let h = healthy.clone();
    let (inst, rt) = fake(
        "flaky",
        Some(FailurePolicy::Open),
        Mode::Enforce,
        move |_, _| {
            if *h.lock().unwrap() {
                cont()
            } else {
                Err(HookError::Trap("down".into()))
            }
        },
    );
    let m = inst.metrics.clone();
    let c = chain(vec![inst]);
    for _ in 0..10 {
        assert_eq!(c.on_request(&mut ctx()), Ok(Flow::Continue));
    }
    // Three failures opened the breaker; the other seven calls never reached the plugin.
    assert_eq!(rt.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        m.failures
            .with_label_values(&["flaky", "circuit_open"])
            .get(),
        7
    );
    // After the cooldown a trial call goes through; it fails, so the cooldown doubles.
    std::thread::sleep(Duration::from_millis(60));
    c.on_request(&mut ctx()).unwrap();
    assert_eq!(rt.calls.load(Ordering::SeqCst), 4);
    std::thread::sleep(Duration::from_millis(60));
    c.on_request(&mut ctx()).unwrap();
    assert_eq!(
        rt.calls.load(Ordering::SeqCst),
        4,
        "still open: backoff is 100 ms now"
    );
    // The plugin recovers; the next trial closes the breaker.
    *healthy.lock().unwrap() = true;
    std::thread::sleep(Duration::from_millis(60));
    for _ in 0..5 {
        c.on_request(&mut ctx()).unwrap();
    }
    assert_eq!(rt.calls.load(Ordering::SeqCst), 9);
}

#[test]
fn breaker_open_with_fail_closed_answers_503() {
    let (inst, _) = fake(
        "down",
        Some(FailurePolicy::Closed),
        Mode::Enforce,
        |_, _| Err(HookError::OutOfMemory),
    );
    let c = chain(vec![inst]);
    for _ in 0..3 {
        assert_eq!(c.on_request(&mut ctx()).unwrap_err().kind, "oom");
    }
    assert_eq!(c.on_request(&mut ctx()).unwrap_err().kind, "circuit_open");
}

#[test]
fn malformed_mutation_is_a_plugin_error_and_changes_nothing() {
    let (inst, _) = fake("bad", Some(FailurePolicy::Open), Mode::Enforce, |_, _| {
        Ok(Decision::Continue(Mutations {
            set_model: Some("other".into()),
            set_headers: vec![("bad header".into(), "x".into())],
            ..Mutations::default()
        }))
    });
    let mut ctx = ctx();
    assert_eq!(
        chain(vec![inst.clone()]).on_request(&mut ctx),
        Ok(Flow::Continue)
    );
    assert_eq!(ctx.body.model(), "gpt");
    assert_eq!(
        inst.metrics
            .failures
            .with_label_values(&["bad", "error"])
            .get(),
        1
    );
}

#[test]
fn duplicate_instance_names_are_rejected() {
    let (a, _) = fake("same", None, Mode::Enforce, |_, _| cont());
    let (b, _) = fake("same", None, Mode::Enforce, |_, _| cont());
    assert!(Chain::new(vec![a, b]).unwrap_err().contains("same"));
}

#[test]
fn on_response_rewrites_text_in_reverse_order() {
    let outer = lua(
        "outer",
        "\"on-response\"",
        r#"function on_response(resp)
             return { set_choice_text = { [0] = resp.choices[1].text .. "!" },
                      set_headers = { ["x-outer"] = "1" } }
           end"#,
        enforce(),
    );
    let inner = lua(
        "inner",
        "\"on-response\"",
        r#"function on_response(resp)
             return { set_choice_text = { [0] = string.upper(resp.choices[1].text) } }
           end"#,
        enforce(),
    );
    let mut ctx = ctx();
    let mut resp = ChatResponse {
        id: "x".into(),
        object: "chat.completion".into(),
        created: 0,
        model: "gpt".into(),
        choices: vec![Choice {
            index: 0,
            message: ChatMessage {
                role: "assistant".into(),
                content: Some(MessageContent::Text("hello".into())),
                ..ChatMessage::default()
            },
            finish_reason: Some("stop".into()),
            rest: Default::default(),
        }],
        usage: None,
        rest: Default::default(),
    };
    // Configured order outer, inner: inner (closest to the provider) runs first.
    let flow = chain(vec![outer, inner]).on_response(&mut ctx, &mut resp);
    assert_eq!(flow, Ok(Flow::Continue));
    assert_eq!(resp.choices[0].message.text(), "HELLO!");
    assert_eq!(
        response_headers(&ctx.metadata).collect::<Vec<_>>(),
        vec![("x-outer", "1")]
    );
}

fn text_chunk(text: &str) -> ChatChunk {
    let mut c = ChatChunk {
        id: "chatcmpl-1".into(),
        object: "chat.completion.chunk".into(),
        created: 0,
        model: "gpt".into(),
        choices: Vec::new(),
        usage: None,
        rest: Default::default(),
    };
    c.choices.push(ChunkChoice {
        index: 0,
        delta: Delta {
            content: Some(text.into()),
            ..Delta::default()
        },
        finish_reason: None,
        rest: Default::default(),
    });
    c
}

fn finish_chunk() -> ChatChunk {
    let mut c = text_chunk("");
    c.choices[0].delta.content = None;
    c.choices[0].finish_reason = Some("stop".into());
    c
}

fn stream_text(filter: &mut ChunkFilter, parts: &[&str]) -> Result<(String, usize), StreamStop> {
    let mut out = Vec::new();
    for p in parts {
        filter.on_chunk(text_chunk(p), &mut out)?;
    }
    filter.on_chunk(finish_chunk(), &mut out)?;
    filter.finish(&mut out)?;
    let text = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    let finishes = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter(|c| c.finish_reason.is_some())
        .count();
    Ok((text, finishes))
}

/// Redacts "secret", holding text while it could be the start of the word.
const REDACTOR: &str = r#"
local WORD = "secret"
function on_response_chunk(ev)
    if ev.type ~= "text_delta" then return nil end
    local text = string.gsub(ev.text, WORD, "******")
    -- A tail that could still become WORD: hold it back (unless nothing can follow).
    if not ev.last then
        for n = math.min(#WORD - 1, #text), 1, -1 do
            if string.sub(text, -n) == string.sub(WORD, 1, n) then
                return weir.hold()
            end
        end
    end
    if text ~= ev.text then
        return weir.replace({ { type = "text_delta", choice = ev.choice, text = text } })
    end
    return nil
end
"#;

#[test]
fn hold_buffering_catches_a_pattern_split_across_chunks() {
    let inst = lua("redactor", "\"on-response-chunk\"", REDACTOR, enforce());
    let c = chain(vec![inst]);
    assert!(c.wants_chunks());
    let mut f = c.chunk_filter(&mut ctx());
    let (text, finishes) =
        stream_text(&mut f, &["the se", "cr", "et is ", "out; a secret"]).unwrap();
    assert_eq!(text, "the ****** is out; a ******");
    assert_eq!(finishes, 1);
    // Held text that never completes the word is released at the finish.
    let mut f = c.chunk_filter(&mut ctx());
    let (text, _) = stream_text(&mut f, &["a sec"]).unwrap();
    assert_eq!(text, "a sec");
}

#[test]
fn hold_is_bounded() {
    let inst = lua(
        "holder",
        "\"on-response-chunk\"",
        r#"function on_response_chunk(ev)
             if ev.type == "text_delta" and not ev.last then return weir.hold() end
             weir.ctx_set("last_bytes", #ev.text)
           end"#,
        enforce(),
    );
    let c = chain(vec![inst]);
    let mut f = c.chunk_filter(&mut ctx());
    let big = "x".repeat(10_000);
    let mut out = Vec::new();
    f.on_chunk(text_chunk(&big), &mut out).unwrap();
    assert!(out.is_empty(), "held");
    f.on_chunk(text_chunk(&big), &mut out).unwrap();
    // 20,000 bytes > the 16 KiB default: handed back as `last`, and released.
    let released: usize = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.as_ref())
        .map(String::len)
        .sum();
    assert_eq!(released, 20_000);
    assert_eq!(f.metadata()["last_bytes"], "20000");
}

#[test]
fn unchanged_chunks_pass_untouched() {
    let inst = lua(
        "observer",
        "\"on-response-chunk\"",
        "function on_response_chunk(ev) weir.counter('events') end",
        enforce(),
    );
    let c = chain(vec![inst]);
    let mut f = c.chunk_filter(&mut ctx());
    let mut first = text_chunk("");
    first.choices[0].delta.role = Some("assistant".into());
    first.rest.insert("system_fingerprint".into(), "fp".into());
    let mut out = Vec::new();
    for chunk in [first, text_chunk("a"), text_chunk("b"), finish_chunk()] {
        let expected = chunk.clone();
        f.on_chunk(chunk, &mut out).unwrap();
        assert_eq!(out.pop(), Some(expected));
    }
}

#[test]
fn abort_and_fail_closed_stop_the_stream() {
    let inst = lua(
        "budget",
        "\"on-response-chunk\"",
        "function on_response_chunk(ev) if ev.type == 'text_delta' and ev.text == 'b' then return weir.abort('budget exhausted') end end",
        enforce(),
    );
    let c = chain(vec![inst]);
    let mut f = c.chunk_filter(&mut ctx());
    assert_eq!(
        stream_text(&mut f, &["a", "b", "c"]),
        Err(StreamStop {
            plugin: "budget".into(),
            message: "budget exhausted".into()
        })
    );

    let looping = |failure| {
        let mut cfg = enforce();
        cfg.failure = Some(failure);
        lua(
            "looping",
            "\"on-response-chunk\"",
            "function on_response_chunk(ev) if ev.text == 'b' then while true do end end end",
            cfg,
        )
    };
    let mut f = chain(vec![looping(FailurePolicy::Closed)]).chunk_filter(&mut ctx());
    let err = stream_text(&mut f, &["a", "b", "c"]).unwrap_err();
    assert!(err.message.contains("timeout"), "{err:?}");
    // Fail open: the plugin is skipped for the rest of this stream, text flows.
    let mut f = chain(vec![looping(FailurePolicy::Open)]).chunk_filter(&mut ctx());
    assert_eq!(stream_text(&mut f, &["a", "b", "c"]).unwrap().0, "abc");
}

#[test]
fn chunk_stages_run_in_reverse_order() {
    let outer = lua(
        "outer",
        "\"on-response-chunk\"",
        "function on_response_chunk(ev) if ev.type == 'text_delta' then return weir.replace({{type='text_delta', choice=ev.choice, text=ev.text .. '>'}}) end end",
        enforce(),
    );
    let inner = lua(
        "inner",
        "\"on-response-chunk\"",
        "function on_response_chunk(ev) if ev.type == 'text_delta' then return weir.replace({{type='text_delta', choice=ev.choice, text='<' .. ev.text}}) end end",
        enforce(),
    );
    let mut f = chain(vec![outer, inner]).chunk_filter(&mut ctx());
    assert_eq!(stream_text(&mut f, &["a"]).unwrap().0, "<a>");
}

#[test]
fn plugins_load_from_config_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tagger", "guard"] {
        let p = dir.path().join("plugins").join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("plugin.toml"),
            format!(
                "name = \"{name}\"\nversion = \"1\"\nkind = \"lua\"\nhooks = [\"on-request\"]\n\
                 [config_schema]\ntype = \"object\"\nproperties.mark = {{ type = \"string\" }}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("plugin.lua"),
            "local mark function init(c) mark = c.mark or '?' end \
             function on_request(req) weir.ctx_set('trail', (weir.ctx_get('trail') or '') .. mark) end",
        )
        .unwrap();
    }
    let toml = r#"
        [providers.mock]
        kind = "mock"
        [[plugins]]
        path = "plugins/tagger"
        config = { mark = "g" }
        [[models]]
        name = "m1"
        targets = [{ provider = "mock" }]
        [[models.plugins]]
        path = "plugins/guard"
        config = { mark = "1" }
        [[models]]
        name = "m2"
        targets = [{ provider = "mock" }]
    "#;
    let path = dir.path().join("weir.toml");
    let cfg = Config::from_toml(&path, toml).unwrap();
    let plugins = Plugins::load(&cfg, Arc::new(MemoryStore::new()), &metrics()).unwrap();
    let trail = |model: &str| {
        let mut c = ctx();
        plugins.chain(model).on_request(&mut c).unwrap();
        c.metadata.get("trail").cloned()
    };
    assert_eq!(trail("m1").as_deref(), Some("g1"));
    assert_eq!(trail("m2").as_deref(), Some("g"));
    assert_eq!(trail("unknown").as_deref(), Some("g"));

    // A config that fails the plugin's schema fails the load, naming the key.
    let bad = toml.replace("mark = \"1\"", "mark = 1");
    let cfg = Config::from_toml(&path, &bad).unwrap();
    let err = Plugins::load(&cfg, Arc::new(MemoryStore::new()), &metrics())
        .unwrap_err()
        .to_string();
    assert!(err.contains("models[0].plugins[0].config.mark"), "{err}");
}

#[test]
fn end_of_stream_gives_the_holder_its_text_once_more() {
    let inst = lua(
        "counter",
        "\"on-response-chunk\"",
        r#"function on_response_chunk(ev)
             weir.ctx_set("calls", (tonumber(weir.ctx_get("calls")) or 0) + 1)
             if ev.type == "text_delta" and not ev.last then return weir.hold() end
           end"#,
        enforce(),
    );
    let mut f = chain(vec![inst]).chunk_filter(&mut ctx());
    let mut out = Vec::new();
    f.on_chunk(text_chunk("a"), &mut out).unwrap();
    f.on_chunk(text_chunk("b"), &mut out).unwrap();
    assert!(out.is_empty());
    // No finish chunk: the stream just ends.
    f.finish(&mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].choices[0].delta.content.as_deref(), Some("ab"));
    assert_eq!(f.metadata()["calls"], "3");
}

// ---- contract 0.2 ----

/// [`ctx`] with another chat body.
fn ctx_with(body: serde_json::Value) -> RequestCtx {
    let mut c = ctx();
    c.body = Body::Chat(serde_json::from_value(body).unwrap());
    c
}

/// The content parts of message `i` (panics when the content is not parts).
fn parts(ctx: &RequestCtx, i: usize) -> Vec<ContentPart> {
    let Body::Chat(c) = &ctx.body else { panic!() };
    match &c.messages[i].content {
        Some(MessageContent::Parts(p)) => p.clone(),
        other => panic!("message {i} has no parts: {other:?}"),
    }
}

fn assert_image_kept(parts: &[ContentPart]) {
    let images: Vec<&ContentPart> = parts.iter().filter(|p| p.kind == "image_url").collect();
    assert_eq!(images.len(), 1, "{parts:?}");
    assert_eq!(images[0].image_url.as_ref().unwrap().url, "https://x/y.png");
}

/// A one-choice response whose message is `message`.
fn response_with(message: ChatMessage) -> ChatResponse {
    ChatResponse {
        id: "x".into(),
        object: "chat.completion".into(),
        created: 0,
        model: "gpt".into(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some("stop".into()),
            rest: Default::default(),
        }],
        usage: None,
        rest: Default::default(),
    }
}

#[test]
fn replacing_a_message_text_keeps_its_other_parts() {
    // Through `set_messages`: every message's text upper-cased.
    let via_messages = lua(
        "upper",
        "\"on-request\"",
        r#"function on_request(req)
             local out = {}
             for i, m in ipairs(req.messages) do
               out[i] = { role = m.role, content = string.upper(m.content) }
             end
             return { set_messages = out }
           end"#,
        enforce(),
    );
    let mut c = ctx();
    assert_eq!(
        chain(vec![via_messages]).on_request(&mut c),
        Ok(Flow::Continue)
    );
    let Body::Chat(body) = &c.body else { panic!() };
    assert_eq!(body.messages[0].text(), "BE NICE");
    let p = parts(&c, 1);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].text.as_deref(), Some("HI"));
    assert_image_kept(&p);

    // Through `set_message_text` (0-based index): the user message only.
    let via_text = lua(
        "prefix",
        "\"on-request\"",
        r#"function on_request(req)
             return { set_message_text = { [1] = "[redacted] " .. req.message(2).content } }
           end"#,
        enforce(),
    );
    let mut c = ctx();
    assert_eq!(chain(vec![via_text]).on_request(&mut c), Ok(Flow::Continue));
    let Body::Chat(body) = &c.body else { panic!() };
    assert_eq!(body.messages[0].text(), "be nice");
    let p = parts(&c, 1);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].text.as_deref(), Some("[redacted] hi"));
    assert_image_kept(&p);
    assert_eq!(c.client_body, None);
}

#[test]
fn text_parts_are_joined_with_a_newline_in_the_view() {
    let body = serde_json::json!({
        "model": "gpt",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            {"type": "text", "text": "there"}
        ]}]
    });
    let reader = lua(
        "reader",
        "\"on-request\", \"on-response\"",
        r#"function on_request(req)
             local m = req.messages[1]
             return { set_metadata = { seen = m.content, others = m.other_parts,
                                       one = req.message(1).content },
                      -- Same number of pieces: each goes back to its part.
                      set_message_text = { [0] = string.upper(m.content) } }
           end
           function on_response(resp)
             return { set_metadata = { answer = resp.choices[1].text } }
           end"#,
        enforce(),
    );
    let c = chain(vec![reader]);
    let mut ctx = ctx_with(body);
    assert_eq!(c.on_request(&mut ctx), Ok(Flow::Continue));
    assert_eq!(ctx.metadata["seen"], "hi\nthere");
    assert_eq!(ctx.metadata["one"], "hi\nthere");
    assert_eq!(ctx.metadata["others"], "1");
    let p = parts(&ctx, 0);
    let texts: Vec<Option<&str>> = p.iter().map(|p| p.text.as_deref()).collect();
    assert_eq!(texts, vec![Some("HI"), None, Some("THERE")]);
    assert_image_kept(&p);

    // The response view joins the same way.
    let mut resp = response_with(ChatMessage {
        role: "assistant".into(),
        content: Some(MessageContent::Parts(vec![
            serde_json::from_value(serde_json::json!({"type": "text", "text": "a"})).unwrap(),
            serde_json::from_value(serde_json::json!({"type": "text", "text": "b"})).unwrap(),
        ])),
        ..ChatMessage::default()
    });
    assert_eq!(c.on_response(&mut ctx, &mut resp), Ok(Flow::Continue));
    assert_eq!(ctx.metadata["answer"], "a\nb");
}

#[test]
fn tool_call_arguments_are_readable_and_rewritable() {
    // Requests: the assistant history's tool calls, an API key dropped from the arguments.
    let body = serde_json::json!({
        "model": "gpt",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather",
                             "arguments": "{\"city\":\"Paris\",\"api_key\":\"sk-123\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
        ]
    });
    let scrubber = lua(
        "scrubber",
        "\"on-request\"",
        r#"function on_request(req)
             local edits = {}
             for i, m in ipairs(req.messages) do
               for j, call in ipairs(m.tool_calls or {}) do
                 local args = weir.json.decode(call.arguments)
                 args.api_key = nil
                 table.insert(edits, { message = i - 1, index = j - 1,
                                       arguments = weir.json.encode(args) })
               end
             end
             local call = req.messages[2].tool_calls[1]
             return { set_tool_call_arguments = edits,
                      set_metadata = { call = call.id .. " " .. call.name } }
           end"#,
        enforce(),
    );
    let mut ctx = ctx_with(body);
    assert_eq!(
        chain(vec![scrubber]).on_request(&mut ctx),
        Ok(Flow::Continue)
    );
    assert_eq!(ctx.metadata["call"], "call_1 get_weather");
    let Body::Chat(c) = &ctx.body else { panic!() };
    assert_eq!(c.messages.len(), 3);
    let call = &c.messages[1].tool_calls.as_ref().unwrap()[0];
    assert_eq!(
        (call.id.as_str(), call.function.name.as_str()),
        ("call_1", "get_weather")
    );
    let args: serde_json::Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(args, serde_json::json!({"city": "Paris"}));
    assert_eq!(c.messages[2].text(), "sunny");
    assert_eq!(ctx.client_body, None);

    // Non-streaming responses: the inner plugin adds a field, the outer one sees it.
    let inner = lua(
        "units",
        "\"on-response\"",
        r#"function on_response(resp)
             local call = resp.choices[1].tool_calls[1]
             local args = weir.json.decode(call.arguments)
             args.units = "celsius"
             return { set_tool_call_arguments = {
                        { choice = resp.choices[1].index, index = 0, arguments = args } } }
           end"#,
        enforce(),
    );
    let outer = lua(
        "watcher",
        "\"on-response\"",
        r#"function on_response(resp)
             return { set_metadata = { args = resp.choices[1].tool_calls[1].arguments } }
           end"#,
        enforce(),
    );
    let mut resp = response_with(ChatMessage {
        role: "assistant".into(),
        tool_calls: Some(vec![ToolCall {
            id: "call_9".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into(),
            },
        }]),
        ..ChatMessage::default()
    });
    let mut ctx = self::ctx();
    assert_eq!(
        chain(vec![outer, inner]).on_response(&mut ctx, &mut resp),
        Ok(Flow::Continue)
    );
    let want = serde_json::json!({"city": "Oslo", "units": "celsius"});
    let call = &resp.choices[0].message.tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.id, "call_9");
    let got: serde_json::Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(got, want);
    let seen: serde_json::Value = serde_json::from_str(&ctx.metadata["args"]).unwrap();
    assert_eq!(seen, want, "the next plugin sees the rewritten arguments");
}

/// Holds every text delta until it is told nothing more can follow, then upper-cases it.
const TAIL_HOLDER: &str = r#"
function on_response_chunk(ev)
    if ev.type ~= "text_delta" then return nil end
    if not ev.last then return weir.hold() end
    return weir.replace({ { type = "text_delta", choice = ev.choice, text = string.upper(ev.text) } })
end
"#;

#[test]
fn a_held_tail_goes_back_to_its_holder_with_last() {
    let c = chain(vec![lua(
        "tail",
        "\"on-response-chunk\"",
        TAIL_HOLDER,
        enforce(),
    )]);
    // At the choice's finish: the text comes out processed, before the finish.
    let mut f = c.chunk_filter(&mut ctx());
    let mut out = Vec::new();
    for p in ["hello ", "wor", "ld"] {
        f.on_chunk(text_chunk(p), &mut out).unwrap();
    }
    assert!(out.is_empty(), "everything held");
    f.on_chunk(finish_chunk(), &mut out).unwrap();
    f.finish(&mut out).unwrap();
    let events: Vec<(Option<&str>, Option<&str>)> = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .map(|c| (c.delta.content.as_deref(), c.finish_reason.as_deref()))
        .collect();
    assert_eq!(
        events,
        vec![(Some("HELLO WORLD"), None), (None, Some("stop"))]
    );

    // At the end of a stream without a finish.
    let mut f = c.chunk_filter(&mut ctx());
    let mut out = Vec::new();
    f.on_chunk(text_chunk("a"), &mut out).unwrap();
    f.on_chunk(text_chunk("b"), &mut out).unwrap();
    assert!(out.is_empty());
    f.finish(&mut out).unwrap();
    let text: String = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    assert_eq!(text, "AB");
}

#[test]
fn holding_a_last_delta_is_a_plugin_failure() {
    let always =
        "function on_response_chunk(ev) if ev.type == 'text_delta' then return weir.hold() end end";
    // Fail closed: the stream stops, naming the plugin.
    let closed = lua(
        "greedy",
        "\"on-response-chunk\"",
        always,
        instance_cfg(Some(FailurePolicy::Closed), Mode::Enforce),
    );
    let mut f = chain(vec![closed.clone()]).chunk_filter(&mut ctx());
    let err = stream_text(&mut f, &["a", "b"]).unwrap_err();
    assert_eq!(err.plugin, "greedy");
    assert!(err.message.contains("error"), "{err:?}");
    assert_eq!(
        closed
            .metrics
            .failures
            .with_label_values(&["greedy", "error"])
            .get(),
        1
    );
    // Fail open: counted, and the stream goes on without the plugin.
    let open = lua(
        "greedy",
        "\"on-response-chunk\"",
        always,
        instance_cfg(Some(FailurePolicy::Open), Mode::Enforce),
    );
    let mut f = chain(vec![open.clone()]).chunk_filter(&mut ctx());
    assert_eq!(stream_text(&mut f, &["a", "b"]).unwrap(), ("ab".into(), 1));
    assert_eq!(
        open.metrics
            .failures
            .with_label_values(&["greedy", "error"])
            .get(),
        1
    );
}

#[test]
fn a_successful_on_log_does_not_reset_the_breaker() {
    // Breaker: 3 consecutive failures (instance_cfg).
    let inst = lua(
        "flaky",
        "\"on-request\", \"on-log\"",
        r#"function on_request(req) error("down") end
           function on_log(entry) weir.counter("logged") end"#,
        instance_cfg(Some(FailurePolicy::Open), Mode::Enforce),
    );
    let c = chain(vec![inst.clone()]);
    for _ in 0..3 {
        let mut ctx = ctx();
        assert_eq!(c.on_request(&mut ctx), Ok(Flow::Continue));
        assert_eq!(ctx.decisions[0].decision, "skipped_trap");
        let entry = LogEntry {
            request_id: ctx.request_id.clone(),
            ..LogEntry::default()
        };
        c.on_log(&entry, &mut ctx.scratch);
    }
    let m = &inst.metrics;
    assert_eq!(m.counters.with_label_values(&["flaky", "logged"]).get(), 3);
    assert_eq!(m.failures.with_label_values(&["flaky", "trap"]).get(), 3);
    // Three request failures in a row, whatever the logs in between: open.
    assert!(inst.breaker.is_open());
    let mut ctx = ctx();
    assert_eq!(c.on_request(&mut ctx), Ok(Flow::Continue));
    assert_eq!(ctx.decisions[0].decision, "skipped_circuit_open");
    assert_eq!(m.failures.with_label_values(&["flaky", "trap"]).get(), 3);
    assert_eq!(
        m.failures
            .with_label_values(&["flaky", "circuit_open"])
            .get(),
        1
    );
}

/// Keeps a private value in its scratch at `on_request` and reports, from every later hook,
/// what its scratch holds, upper-cased (`NONE` when empty), so that the value itself
/// (lower case) showing up in the metadata would be a leak.
const SCRATCH_KEEPER: &str = r#"
local function seen() return string.upper(weir.scratch_get("k") or "none") end
function on_request(req)
    -- A new request starts with an empty scratch.
    weir.ctx_set(weir.plugin .. ".before", seen())
    if weir.plugin == "keeper" then weir.scratch_set("k", "private-1") end
end
function on_response(resp)
    return { set_metadata = { [weir.plugin .. ".response"] = seen() } }
end
function on_response_chunk(ev)
    if ev.type ~= "text_delta" then return nil end
    return weir.replace({ { type = "text_delta", choice = ev.choice,
                            text = ev.text .. "[" .. weir.plugin .. ":" .. seen() .. "]" } })
end
function on_log(entry)
    weir.counter("log_" .. seen())
    for k, v in pairs(entry.metadata) do
        if k == "k" or string.find(v, "private", 1, true) then weir.counter("leak") end
    end
end
"#;

#[test]
fn scratch_is_private_to_its_plugin_and_request() {
    let hooks = "\"on-request\", \"on-response\", \"on-response-chunk\", \"on-log\"";
    let keeper = lua("keeper", hooks, SCRATCH_KEEPER, enforce());
    let peer = lua("peer", hooks, SCRATCH_KEEPER, enforce());
    let c = chain(vec![keeper.clone(), peer.clone()]);
    let no_leak = |metadata: &BTreeMap<String, String>| {
        assert!(
            metadata.iter().all(|(_, v)| !v.contains("private")),
            "{metadata:?}"
        );
    };
    let counter = |inst: &Instance, name: &str| {
        inst.metrics
            .counters
            .with_label_values(&[inst.name(), name])
            .get()
    };

    // A non-streaming request: on_request, on_response, on_log.
    let mut ctx = ctx();
    assert_eq!(c.on_request(&mut ctx), Ok(Flow::Continue));
    assert_eq!(ctx.metadata["keeper.before"], "NONE");
    assert_eq!(ctx.metadata["peer.before"], "NONE");
    no_leak(&ctx.metadata);
    let mut resp = response_with(ChatMessage {
        role: "assistant".into(),
        content: Some(MessageContent::Text("hi".into())),
        ..ChatMessage::default()
    });
    assert_eq!(c.on_response(&mut ctx, &mut resp), Ok(Flow::Continue));
    assert_eq!(ctx.metadata["keeper.response"], "PRIVATE-1");
    assert_eq!(ctx.metadata["peer.response"], "NONE");
    let entry = LogEntry {
        request_id: ctx.request_id.clone(),
        metadata: ctx.metadata.clone().into_iter().collect(),
        ..LogEntry::default()
    };
    no_leak(&ctx.metadata);
    c.on_log(&entry, &mut ctx.scratch);
    assert_eq!(counter(&keeper, "log_PRIVATE-1"), 1);
    assert_eq!(counter(&peer, "log_NONE"), 1);

    // A streaming request: on_request, on_response_chunk (reverse order), on_log.
    let mut ctx = self::ctx();
    assert_eq!(c.on_request(&mut ctx), Ok(Flow::Continue));
    assert_eq!(
        ctx.metadata["keeper.before"], "NONE",
        "not the last request's"
    );
    let mut f = c.chunk_filter(&mut ctx);
    let (text, _) = stream_text(&mut f, &["hi"]).unwrap();
    assert_eq!(text, "hi[peer:NONE][keeper:PRIVATE-1]");
    no_leak(f.metadata());
    let mut scratch = f.take_scratch();
    let entry = LogEntry {
        request_id: ctx.request_id.clone(),
        metadata: f.metadata().clone().into_iter().collect(),
        stream: true,
        ..LogEntry::default()
    };
    c.on_log(&entry, &mut scratch);
    assert_eq!(counter(&keeper, "log_PRIVATE-1"), 2);
    assert_eq!(counter(&peer, "log_NONE"), 2);
    // Never in what on_log sees as metadata.
    assert_eq!(counter(&keeper, "leak") + counter(&peer, "leak"), 0);
    // Every hook succeeded.
    for inst in [&keeper, &peer] {
        let failures: u64 = ["trap", "error", "timeout"]
            .iter()
            .map(|k| {
                inst.metrics
                    .failures
                    .with_label_values(&[inst.name(), k])
                    .get()
            })
            .sum();
        assert_eq!(failures, 0, "{}", inst.name());
    }
}

#[test]
fn every_plugin_decision_is_recorded_in_the_context() {
    let reply =
        |status: u16| format!("function on_request(req) return weir.reply({status}, \"no\") end");
    let tags = lua(
        "tags",
        "\"on-request\"",
        "function on_request(req) return { set_metadata = { t = '1' } } end",
        enforce(),
    );
    let shadow = lua(
        "shadow",
        "\"on-request\"",
        &reply(401),
        instance_cfg(None, Mode::Shadow),
    );
    let flaky = lua(
        "flaky",
        "\"on-request\"",
        "function on_request(req) error('down') end",
        instance_cfg(Some(FailurePolicy::Open), Mode::Enforce),
    );
    let gate = lua("gate", "\"on-request\"", &reply(429), enforce());
    let never = lua(
        "never",
        "\"on-request\"",
        "function on_request(req) end",
        enforce(),
    );
    let decisions = |ctx: &RequestCtx| {
        ctx.decisions
            .iter()
            .map(|d| (d.plugin.clone(), d.decision.clone()))
            .collect::<Vec<_>>()
    };
    let pair = |p: &str, d: &str| (p.to_owned(), d.to_owned());

    let mut ctx = ctx();
    let flow = chain(vec![tags.clone(), shadow, flaky, gate, never]).on_request(&mut ctx);
    assert!(matches!(flow, Ok(Flow::Reply(r)) if r.status == 429));
    assert_eq!(
        decisions(&ctx),
        vec![
            pair("tags", "continue"),
            pair("shadow", "shadow_reply_401"),
            pair("flaky", "skipped_trap"),
            pair("gate", "reply_429"),
        ]
    );

    // A fail-closed failure is recorded before the request fails.
    let closed = lua(
        "closed",
        "\"on-request\"",
        "function on_request(req) error('down') end",
        instance_cfg(Some(FailurePolicy::Closed), Mode::Enforce),
    );
    let mut ctx = self::ctx();
    assert!(chain(vec![tags, closed]).on_request(&mut ctx).is_err());
    assert_eq!(
        decisions(&ctx),
        vec![pair("tags", "continue"), pair("closed", "failure_trap")]
    );
}
