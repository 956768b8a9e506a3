//! Chain tests for plugin contract 0.2: the breaker and `on-log`, per-caller breakers,
//! deadlines scaled by input size and set per instance, and declared metadata dependencies
//! checked when a config loads.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::api::openai::MessageContent;
use crate::config::Config;
use crate::plugin::PluginError;
use crate::plugin::config::PluginInstanceConfig;
use crate::plugin::contract::{
    AdminRequest, AdminResponse, ChunkAction, Mutations, PluginRuntime, ResponseMutations,
    ResponseView, StreamEvent,
};
use crate::plugin::host::{HostLookups, PluginMetrics};
use crate::request::Body;
use crate::state::MemoryStore;

fn metrics() -> PluginMetrics {
    PluginMetrics::unregistered().unwrap()
}

fn cfg() -> PluginInstanceConfig {
    toml::from_str("path = \".\"\nbreaker = { failures = 3, cooldown_ms = 60000 }").unwrap()
}

type Answer = Box<dyn Fn(Option<&str>) -> Result<(), HookError> + Send + Sync>;

/// A runtime whose request hooks answer from a closure given the caller (metadata `key`),
/// and whose `on_log` always succeeds.
struct ByCaller {
    calls: AtomicU32,
    answer: Answer,
}

impl PluginRuntime for ByCaller {
    fn name(&self) -> &str {
        "by-caller"
    }
    fn on_request(
        &self,
        ctx: &mut HookCtx<'_>,
        _: &mut RequestView,
    ) -> Result<Decision, HookError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.answer)(ctx.metadata.get("key").map(String::as_str))
            .map(|()| Decision::Continue(Mutations::default()))
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
        Ok(AdminResponse::default())
    }
}

/// A fail-closed instance (breaker: 3 failures, 60 s cooldown) with `on-request` and
/// `on-log`.
fn by_caller(
    answer: impl Fn(Option<&str>) -> Result<(), HookError> + Send + Sync + 'static,
) -> (Chain, Arc<ByCaller>) {
    let manifest = Manifest::parse(
        Path::new("/fake"),
        "name = \"redaction\"\nversion = \"1\"\nkind = \"wasm\"\n\
         hooks = [\"on-request\", \"on-log\"]\nfailure = \"closed\"\n",
    )
    .unwrap();
    let runtime = Arc::new(ByCaller {
        calls: AtomicU32::new(0),
        answer: Box::new(answer),
    });
    let inst = Instance::new(
        "redaction".into(),
        Arc::new(manifest),
        runtime.clone(),
        &cfg(),
        metrics(),
    );
    (Chain::new(vec![Arc::new(inst)]).unwrap(), runtime)
}

fn ctx(key: Option<&str>) -> RequestCtx {
    let mut metadata = BTreeMap::new();
    if let Some(k) = key {
        metadata.insert("key".to_owned(), k.to_owned());
    }
    RequestCtx {
        request_id: "r1".into(),
        dialect: Dialect::OpenAi,
        started: Instant::now(),
        headers: http::HeaderMap::new(),
        body: Body::Chat(
            serde_json::from_value(serde_json::json!({
                "model": "gpt", "messages": [{"role": "user", "content": "hi"}]
            }))
            .unwrap(),
        ),
        targets: None,
        client_body: None,
        metadata,
        scratch: Default::default(),
        decisions: Vec::new(),
    }
}

fn kind(c: &Chain, key: Option<&str>) -> &'static str {
    match c.on_request(&mut ctx(key)) {
        Ok(_) => "ok",
        Err(f) => f.kind,
    }
}

fn timeout() -> HookError {
    HookError::Timeout { deadline_ms: 25 }
}

#[test]
fn a_successful_on_log_does_not_heal_a_failing_on_request() {
    let (c, rt) = by_caller(|_| Err(timeout()));
    let entry = LogEntry {
        request_id: "r1".into(),
        ..LogEntry::default()
    };
    for _ in 0..3 {
        assert_eq!(kind(&c, None), "timeout");
        // The same plugin's on-log succeeds after every failed request.
        c.on_log(&entry, &mut Scratch::default());
    }
    assert_eq!(
        kind(&c, None),
        "circuit_open",
        "three request failures open it"
    );
    assert_eq!(rt.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn one_keys_failures_refuse_that_key_only() {
    // Five 2 MB prompts from one key miss the deadline; everyone else's requests are fine.
    let (c, rt) = by_caller(|key| match key {
        Some("heavy") => Err(timeout()),
        _ => Ok(()),
    });
    for _ in 0..3 {
        assert_eq!(kind(&c, Some("heavy")), "timeout");
    }
    assert_eq!(kind(&c, Some("heavy")), "circuit_open");
    assert_eq!(kind(&c, Some("heavy")), "circuit_open");
    assert_eq!(rt.calls.load(Ordering::SeqCst), 3, "refused without a call");
    for key in [Some("light"), Some("other"), None] {
        assert_eq!(kind(&c, key), "ok", "{key:?} is still served");
    }
}

#[test]
fn failures_from_two_keys_open_the_breaker_for_everyone() {
    let (c, _) = by_caller(|_| Err(timeout()));
    for key in ["a", "b", "a", "b"] {
        assert_eq!(kind(&c, Some(key)), "timeout");
    }
    assert_eq!(kind(&c, Some("c")), "circuit_open");
    assert_eq!(kind(&c, None), "circuit_open");
}

#[test]
fn requests_without_a_key_open_it_as_before() {
    let (c, _) = by_caller(|_| Err(timeout()));
    for _ in 0..3 {
        assert_eq!(kind(&c, None), "timeout");
    }
    assert_eq!(kind(&c, Some("k")), "circuit_open");
}

/// A Lua plugin whose `on-request` never returns, with `limits` text and instance `extra`.
fn spinner(limits: &str, extra: &str) -> Result<Arc<Instance>, PluginError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugin.toml"),
        format!(
            "name = \"spin\"\nversion = \"1\"\nkind = \"lua\"\nhooks = [\"on-request\"]\n\
             [limits]\n{limits}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("plugin.lua"),
        "function on_request(req) while true do end end",
    )
    .unwrap();
    let cfg: PluginInstanceConfig = toml::from_str(&format!("path = \".\"\n{extra}")).unwrap();
    Instance::load(
        dir.path(),
        &cfg,
        "plugins[2]",
        Arc::new(MemoryStore::new()),
        &metrics(),
        Arc::new(HostLookups::default()),
    )
}

fn deadline_hit(inst: &Instance, prompt_bytes: usize) -> (u64, Duration) {
    let mut c = ctx(None);
    if let Body::Chat(chat) = &mut c.body {
        chat.messages[0].content = Some(MessageContent::Text("x".repeat(prompt_bytes)));
    }
    let deadline = inst.deadline(Hook::OnRequest, prompt_bytes);
    let mut view = RequestView {
        request_id: c.request_id.clone(),
        body: std::mem::take(&mut c.body),
        access: inst.access.clone(),
        ..RequestView::default()
    };
    let mut scratch = BTreeMap::new();
    let mut hctx = HookCtx {
        request_id: &c.request_id,
        metadata: &mut c.metadata,
        scratch: &mut scratch,
        deadline,
    };
    let started = Instant::now();
    let err = inst.runtime.on_request(&mut hctx, &mut view).unwrap_err();
    let elapsed = started.elapsed();
    match err {
        HookError::Timeout { deadline_ms } => (deadline_ms, elapsed),
        other => panic!("expected a timeout, got {other}"),
    }
}

#[test]
fn the_deadline_grows_with_the_input_up_to_the_cap() {
    let inst = spinner(
        "deadline_ms = 5\ndeadline_per_mib_ms = 10\nmax_deadline_ms = 60",
        "",
    )
    .unwrap();
    let (small, _) = deadline_hit(&inst, 100);
    assert_eq!(small, 5);
    let (big, elapsed) = deadline_hit(&inst, 4 << 20);
    assert_eq!(big, 45, "5 ms + 4 MiB x 10 ms");
    assert!(elapsed >= Duration::from_millis(45), "{elapsed:?}");
    let (huge, _) = deadline_hit(&inst, 16 << 20);
    assert_eq!(huge, 60, "capped");
}

#[test]
fn an_instance_deadline_overrides_the_manifest() {
    let inst = spinner(
        "deadline_ms = 1000\ndeadline_per_mib_ms = 0",
        "deadline_ms = 15",
    )
    .unwrap();
    assert_eq!(deadline_hit(&inst, 100).0, 15);
    assert_eq!(
        inst.manifest.limits.chunk_deadline,
        Duration::from_millis(2),
        "not overridden: the manifest's default"
    );

    let err = spinner("", "chunk_deadline_ms = 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("plugins[2].chunk_deadline_ms"), "{err}");
    assert!(err.contains("1 to 10000 ms"), "{err}");
    let err = spinner("", "deadline_ms = 20000").unwrap_err().to_string();
    assert!(err.contains("plugins[2].deadline_ms"), "{err}");
}

/// A config folder with Lua plugins `name -> [metadata] text`, each a no-op.
fn plugin_dir(plugins: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, metadata) in plugins {
        let p = dir.path().join("plugins").join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("plugin.toml"),
            format!(
                "name = \"{name}\"\nversion = \"1\"\nkind = \"lua\"\nhooks = [\"on-request\"]\n\
                 [metadata]\n{metadata}\n"
            ),
        )
        .unwrap();
        std::fs::write(p.join("plugin.lua"), "function on_request(req) end").unwrap();
    }
    dir
}

fn load(dir: &Path, toml: &str) -> Result<Plugins, PluginError> {
    let cfg = Config::from_toml(&dir.join("weir.toml"), toml).unwrap();
    Plugins::load(&cfg, Arc::new(MemoryStore::new()), &metrics())
}

const DEPS: &[(&str, &str)] = &[
    ("keys", "provides = [\"key\", \"tenant\"]"),
    ("limits", "requires = [\"key\"]"),
];

#[test]
fn a_chain_that_reads_metadata_before_it_is_set_is_refused_at_load() {
    let dir = plugin_dir(DEPS);
    let config = |first: &str, second: &str| {
        format!(
            "[providers.mock]\nkind = \"mock\"\n[[models]]\nname = \"m\"\n\
             targets = [{{ provider = \"mock\" }}]\n\
             [[plugins]]\npath = \"plugins/{first}\"\n[[plugins]]\npath = \"plugins/{second}\"\n"
        )
    };
    assert!(load(dir.path(), &config("keys", "limits")).is_ok());
    let err = load(dir.path(), &config("limits", "keys"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "plugins: plugin 'limits' requires metadata 'key', which 'keys' provides, but 'keys' \
         runs after it: put 'keys' first"
    );
}

#[test]
fn a_models_chain_is_checked_with_the_global_plugins_before_it() {
    let dir = plugin_dir(DEPS);
    let config = |global: &str, model: &str| {
        format!(
            "[providers.mock]\nkind = \"mock\"\n{global}\
             [[models]]\nname = \"m\"\ntargets = [{{ provider = \"mock\" }}]\n{model}"
        )
    };
    let global_keys = "[[plugins]]\npath = \"plugins/keys\"\n";
    let model_limits = "[[models.plugins]]\npath = \"plugins/limits\"\n";
    assert!(load(dir.path(), &config(global_keys, model_limits)).is_ok());
    let err = load(dir.path(), &config("", model_limits))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("models[0].plugins: plugin 'limits' requires metadata 'key', which no plugin in this chain provides"), "{err}");
    // A provider after the reader, in the model's own list.
    let both = format!("{model_limits}[[models.plugins]]\npath = \"plugins/keys\"\n");
    let err = load(dir.path(), &config("", &both))
        .unwrap_err()
        .to_string();
    assert!(err.contains("put 'keys' first"), "{err}");
}

#[test]
fn the_first_party_manifests_declare_a_valid_order() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let load = |dir: &str| Manifest::load(&root.join(dir)).unwrap();
    let chain = [
        ("auth", load("plugins/auth")),
        ("rate-limit", load("plugins/rate-limit")),
        ("redaction", load("plugins/redaction")),
        ("cache", load("plugins/cache")),
        ("routing", load("plugins/routing")),
        ("budget", load("plugins/budget")),
    ];
    let order = |names: &[&str]| {
        let list: Vec<(&str, &Manifest)> = names
            .iter()
            .map(|n| {
                let (name, m) = chain.iter().find(|(c, _)| c == n).unwrap();
                (*name, m)
            })
            .collect();
        crate::plugin::deps::check_order(list)
    };
    // The documented orders (quickstart-policies, bench's six-plugin chain).
    assert_eq!(
        order(&["auth", "rate-limit", "redaction", "routing", "budget"]),
        Ok(())
    );
    assert_eq!(
        order(&[
            "auth",
            "rate-limit",
            "redaction",
            "cache",
            "routing",
            "budget"
        ]),
        Ok(())
    );
    // Each policy alone still loads: what it reads from auth is optional.
    for (name, _) in &chain {
        assert_eq!(order(&[name]), Ok(()), "{name} alone");
    }
    let err = order(&["rate-limit", "auth"]).unwrap_err().to_string();
    assert!(
        err.contains("'rate-limit'") && err.contains("put 'auth' first"),
        "{err}"
    );
    let err = order(&["auth", "budget", "routing"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'budget' reads metadata 'route.model'"),
        "{err}"
    );
    let tagger = load("examples/tenant-tagger");
    let guard = load("examples/prompt-guard");
    let audit = load("examples/audit-logger");
    assert_eq!(
        crate::plugin::deps::check_order([
            ("tenant-tagger", &tagger),
            ("prompt-guard", &guard),
            ("audit-logger", &audit),
            ("budget", &chain[5].1),
        ]),
        Ok(())
    );
}
