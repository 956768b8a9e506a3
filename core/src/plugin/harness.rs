//! The offline test harness: runs a plugin against the fixtures in its folder, without a
//! gateway, a provider or a network. `weir plugin test PATH` prints its table; Rust tests
//! call [`assert_fixtures_pass`].
//!
//! A fixture is `PATH/fixtures/*.json`, one request and what must come of it:
//!
//! ```json
//! {
//!   "name": "blocks a jailbreak",
//!   "config": { "phrases": ["ignore previous instructions"] },
//!   "request": {
//!     "dialect": "openai",
//!     "headers": { "x-tenant": "acme" },
//!     "body": { "model": "gpt-4o", "messages": [{ "role": "user", "content": "..." }] }
//!   },
//!   "stream": ["Hello, ", "wor", "ld"],
//!   "expect": { "decision": "reply", "status": 400 }
//! }
//! ```
//!
//! or a sequence of steps run in order against one instance and its state, from seeded
//! state, with a fixed clock:
//!
//! ```json
//! {
//!   "state": { "kv": { "team:ops": "blocked" } },
//!   "clock_ms": 1700000000000,
//!   "requests": [
//!     { "request": { "body": {} }, "log": { "status": 200 }, "expect": { "kv": { "served": "1" } } },
//!     { "advance_ms": 60000, "request": { "body": {} }, "expect": { "status": 429 } },
//!     { "admin": { "method": "GET", "path": "/stats" }, "expect": { "status": 200 } }
//!   ]
//! }
//! ```
//!
//! Each request goes through the real [`Chain`] (the plugin as its only instance, in-memory
//! state), so a fixture exercises exactly what the gateway would run: `on_request`, then
//! `response` (`{"text": ".."}`) runs `on_response` on a one-choice response, `stream` runs
//! text deltas through the chunk hooks, and `log` runs `on_log` with an entry built from
//! the request (the fixture's fields override it) and the request's scratch. An `admin`
//! step calls the plugin's admin endpoint instead of sending a request.
//!
//! A step's outcome is a JSON document (see [`Outcome`]); its `expect` must be a *subset*
//! of it (objects match key by key, anything else must be equal; `null` also matches a
//! missing key), and the top-level keys of `expect` are a closed set ([`EXPECT_KEYS`]): an
//! unknown one fails the fixture. `expect.kv` matches the plugin's key-value namespace after
//! the step; `expect_log` matches what `on_log` was given and whether it failed (an `on_log`
//! failure fails the step unless `expect_log.failure` names it).
//!
//! State: a fixture with `state` runs on a fresh instance whose namespace holds exactly that
//! state. Fixtures without it share one instance and its state with the other fixtures of
//! the same config, in file-name order (so consecutive files can also form a sequence).
//! `config` defaults to `fixtures/config.json` when that file exists, else `{}`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{Map, Value, json};

use super::PluginError;
use super::breaker::BreakerConfigFile;
use super::chain::{Chain, Flow, Instance, PluginFailure, response_headers};
use super::config::PluginInstanceConfig;
use super::contract::{AdminRequest, Attempt, LogEntry, Price, TargetStatsView, Usage};
use super::host::{HostLookups, PluginMetrics};
use super::manifest::Manifest;
use crate::api::openai::{
    ChatChunk, ChatMessage, ChatResponse, Choice, ChunkChoice, Delta, MessageContent,
};
use crate::request::{Body, Dialect, RequestCtx};
use crate::state::{MemoryStore, StateStore, plugin_namespace};

mod fixture;

pub use fixture::{
    EXPECT_KEYS, EXPECT_LOG_KEYS, Fixture, FixtureAdmin, FixtureAttempt, FixtureLog, FixturePrice,
    FixtureRequest, FixtureResponse, FixtureState, FixtureTargetStats, FixtureUsage, Step,
};

/// The folder of fixtures inside a plugin folder.
pub const FIXTURES_DIR: &str = "fixtures";

/// Most keys of a namespace an outcome's `kv` lists.
const KV_SNAPSHOT_LIMIT: usize = 10_000;

/// The failure kinds a hook can count (see `HookError::kind`).
const FAILURE_KINDS: &[&str] = &["trap", "timeout", "oom", "error", "unavailable"];

/// The outcome of one step, as JSON:
///
/// - `decision`: `continue`, `reply` or `failure`;
/// - on reply: `status`, `headers`, `body` (parsed JSON, or a string);
/// - on failure: `plugin`, `kind` (`timeout`, `trap`...), and for admin calls `error`;
/// - on continue: `model`, `headers` (all request headers after the plugin), `messages`
///   (`[{role, content}]`), `metadata`, `targets` (or `null`), `response_headers`;
/// - `decisions`: what each plugin decided (`[{plugin, decision}]`, as in the log entry);
/// - `response` (with `response`): `{decision, text}` (or a reply's `status`, `body`);
/// - `stream` (with `stream`): `{text, stopped}` (`stopped` is the abort message or `null`);
/// - `log` (with `log`): the entry `on_log` was given and `failure` (checked by
///   `expect_log`);
/// - an admin step: `status` and `body` of its answer;
/// - `kv`: the plugin's key-value namespace after the step (values as text).
///
/// A fixture's outcome is its step's, or the array of its steps' outcomes.
pub type Outcome = Value;

/// The result of one fixture.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Fixture name.
    pub name: String,
    /// The file.
    pub file: PathBuf,
    /// What happened.
    pub outcome: Outcome,
    /// `None` when the outcome matches `expect`; otherwise where and how it differs.
    pub mismatch: Option<String>,
    /// Time the hooks took, microseconds (loading the plugin excluded).
    pub micros: u128,
}

/// The results of a plugin's fixtures.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One per fixture, in file-name order.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Whether every fixture passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.mismatch.is_none())
    }

    /// Prints a pass/fail table and a summary line.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let width = self
            .cases
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(4)
            .max(7);
        writeln!(
            out,
            "{:<width$}  {:<6}  {:>8}  detail",
            "fixture", "result", "time"
        )?;
        for c in &self.cases {
            let (result, detail) = match &c.mismatch {
                None => ("pass", String::new()),
                Some(m) => ("FAIL", m.clone()),
            };
            let line = format!(
                "{:<width$}  {:<6}  {:>6}us  {detail}",
                c.name, result, c.micros
            );
            writeln!(out, "{}", line.trim_end())?;
        }
        let failed = self.cases.iter().filter(|c| c.mismatch.is_some()).count();
        if self.cases.is_empty() {
            writeln!(out, "no fixtures found (add {FIXTURES_DIR}/*.json)")?;
        } else {
            writeln!(out, "{} passed, {failed} failed", self.cases.len() - failed)?;
        }
        Ok(())
    }
}

/// Error of the harness itself (not of a fixture's expectation).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The plugin did not load.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A fixture file is unreadable or malformed.
    #[error("{}: {reason}", file.display())]
    Fixture {
        /// The fixture file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Runs every fixture of the plugin in `dir`.
pub fn run_fixtures(dir: &Path) -> Result<Report, HarnessError> {
    let files = fixture_files(dir)?;
    let mut runner = Runner::new(dir)?;
    let mut report = Report::default();
    for file in files {
        let fixture = read_fixture(&file)?;
        report.cases.push(runner.run(&file, &fixture)?);
    }
    Ok(report)
}

/// For `cargo test`: runs the plugin's fixtures and panics with the table if any fails.
///
/// ```no_run
/// weir::plugin::harness::assert_fixtures_pass(std::path::Path::new("examples/prompt-guard"));
/// ```
pub fn assert_fixtures_pass(dir: &Path) {
    let report = match run_fixtures(dir) {
        Ok(r) => r,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    if !report.passed() {
        let mut table = Vec::new();
        let _ = report.print(&mut table);
        panic!(
            "{}: fixtures failed\n{}",
            dir.display(),
            String::from_utf8_lossy(&table)
        );
    }
}

/// The fixture files of a plugin folder, sorted; `config.json` is not a fixture.
pub fn fixture_files(dir: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let fixtures = dir.join(FIXTURES_DIR);
    let entries = match std::fs::read_dir(&fixtures) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(HarnessError::Fixture {
                file: fixtures,
                reason: e.to_string(),
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name().is_some_and(|n| n != "config.json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads one fixture file.
pub fn read_fixture(file: &Path) -> Result<Fixture, HarnessError> {
    let err = |reason: String| HarnessError::Fixture {
        file: file.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| err(format!("{}: {}", e.path(), e.inner())))
}

/// What the host answers besides state, for the fixture running now: the clock, target
/// statistics and prices (shared by every instance a [`Runner`] loads; fixtures run one at
/// a time).
#[derive(Debug, Default)]
struct Env {
    clock: Option<u64>,
    stats: HashMap<(String, String), TargetStatsView>,
    prices: HashMap<String, Price>,
}

fn lock(env: &Mutex<Env>) -> MutexGuard<'_, Env> {
    env.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The lookups of every instance a runner loads: answered from its [`Env`].
fn env_lookups(env: &Arc<Mutex<Env>>) -> HostLookups {
    let (stats, prices, clock) = (env.clone(), env.clone(), env.clone());
    HostLookups {
        target_stats: Box::new(move |provider: &str, model: &str| {
            lock(&stats)
                .stats
                .get(&(provider.to_owned(), model.to_owned()))
                .copied()
        }),
        price: Box::new(move |model: &str| lock(&prices).prices.get(model).copied()),
        now: Some(Arc::new(move || {
            lock(&clock).clock.unwrap_or_else(super::contract::now_ms)
        })),
    }
}

/// A loaded plugin: its one-instance chain and its state.
#[derive(Clone)]
struct Loaded {
    chain: Chain,
    store: Arc<MemoryStore>,
    name: String,
    namespace: String,
}

/// Runs fixtures against one plugin folder.
pub struct Runner {
    dir: PathBuf,
    default_config: Value,
    /// The instances of fixtures without `state`, one per distinct config.
    shared: HashMap<String, Loaded>,
    /// The last fresh instance (it keeps a WASM component's compilation cached for the next).
    fresh: Option<Loaded>,
    metrics: PluginMetrics,
    env: Arc<Mutex<Env>>,
    lookups: Arc<HostLookups>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner for the plugin in `dir`.
    pub fn new(dir: &Path) -> Result<Runner, HarnessError> {
        let config_file = dir.join(FIXTURES_DIR).join("config.json");
        let default_config = match std::fs::read_to_string(&config_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| HarnessError::Fixture {
                file: config_file.clone(),
                reason: e.to_string(),
            })?,
            Err(_) => json!({}),
        };
        let env = Arc::new(Mutex::new(Env::default()));
        Ok(Runner {
            dir: dir.to_owned(),
            default_config,
            shared: HashMap::new(),
            fresh: None,
            metrics: PluginMetrics::unregistered().map_err(PluginError::from)?,
            lookups: Arc::new(env_lookups(&env)),
            env,
        })
    }

    /// Loads the plugin with `config` on a new store holding `seed`.
    fn load(
        &self,
        file: &Path,
        config: &Value,
        seed: Option<&FixtureState>,
    ) -> Result<Loaded, HarnessError> {
        let name = Manifest::load(&self.dir)?.name;
        let namespace = plugin_namespace(&name);
        let store = Arc::new(MemoryStore::new());
        for (key, value) in seed.map(|s| &s.kv).into_iter().flatten() {
            let text = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            store
                .set(&namespace, key, text.as_bytes(), None)
                .map_err(|e| fixture_err(file, format!("state.kv.{key}: {e}")))?;
        }
        let cfg = PluginInstanceConfig {
            path: ".".into(),
            name: None,
            config: Some(config.clone()),
            failure: None,
            mode: Default::default(),
            // Fixtures are independent: a failing one must not open the breaker for the next.
            deadline_ms: None,
            chunk_deadline_ms: None,
            breaker: BreakerConfigFile {
                failures: Some(u32::MAX),
                ..BreakerConfigFile::default()
            },
        };
        let instance = Instance::load(
            &self.dir,
            &cfg,
            "plugin",
            store.clone(),
            &self.metrics,
            self.lookups.clone(),
        )?;
        let chain = Chain::new(vec![instance]).map_err(|reason| PluginError::Config {
            key: "plugin".into(),
            reason,
        })?;
        Ok(Loaded {
            chain,
            store,
            name,
            namespace,
        })
    }

    /// Runs one fixture: its steps in order, each checked against its expectations.
    pub fn run(&mut self, file: &Path, fixture: &Fixture) -> Result<CaseResult, HarnessError> {
        let name = fixture.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let steps = fixture.steps().map_err(|e| fixture_err(file, e))?;
        let config = fixture
            .config
            .clone()
            .unwrap_or_else(|| self.default_config.clone());
        let loaded = match &fixture.state {
            Some(seed) => {
                let loaded = self.load(file, &config, Some(seed))?;
                self.fresh = Some(loaded.clone());
                loaded
            }
            None => {
                let key = config.to_string();
                match self.shared.get(&key) {
                    Some(l) => l.clone(),
                    None => {
                        let loaded = self.load(file, &config, None)?;
                        self.shared.insert(key, loaded.clone());
                        loaded
                    }
                }
            }
        };
        {
            let mut env = lock(&self.env);
            env.clock = fixture.clock_ms;
            env.stats = fixture
                .target_stats
                .iter()
                .flat_map(|(provider, models)| {
                    models.iter().map(move |(model, s)| {
                        (
                            (provider.clone(), model.clone()),
                            TargetStatsView {
                                latency_ewma_ms: s.latency_ewma_ms,
                                error_rate: s.error_rate,
                                in_flight: s.in_flight,
                                attempts: s.attempts,
                            },
                        )
                    })
                })
                .collect();
            env.prices = fixture
                .prices
                .iter()
                .map(|(model, p)| {
                    let price = Price {
                        input: p.input,
                        output: p.output,
                        cached_input: p.cached_input,
                        cache_write: p.cache_write,
                    };
                    (model.clone(), price)
                })
                .collect();
        }
        let sequence = fixture.requests.is_some();
        let mut outcomes = Vec::with_capacity(steps.len());
        let mut mismatch = None;
        let mut micros = 0;
        for (i, step) in steps.iter().enumerate() {
            if let Some(ms) = step.advance_ms {
                let mut env = lock(&self.env);
                let now = env.clock.unwrap_or_else(super::contract::now_ms);
                env.clock = Some(now.saturating_add(ms));
            }
            let started = Instant::now();
            let outcome = self.run_step(&loaded, file, step)?;
            micros += started.elapsed().as_micros();
            if mismatch.is_none() {
                let at = if sequence {
                    format!("requests[{i}].")
                } else {
                    String::new()
                };
                mismatch = step_mismatch(step, &outcome, &at);
            }
            outcomes.push(outcome);
        }
        let outcome = if sequence {
            Value::Array(outcomes)
        } else {
            outcomes.pop().unwrap_or_default()
        };
        Ok(CaseResult {
            name,
            file: file.to_owned(),
            outcome,
            mismatch,
            micros,
        })
    }

    /// Runs one step and returns its outcome.
    fn run_step(&self, loaded: &Loaded, file: &Path, step: &Step) -> Result<Outcome, HarnessError> {
        let mut outcome = match (&step.request, &step.admin) {
            (_, Some(admin)) => run_admin(loaded, admin),
            (Some(request), None) => self.run_request(loaded, file, request, step)?,
            (None, None) => {
                return Err(fixture_err(
                    file,
                    "a step needs `request` or `admin`".into(),
                ));
            }
        };
        outcome["kv"] = kv_snapshot(loaded);
        Ok(outcome)
    }

    fn run_request(
        &self,
        loaded: &Loaded,
        file: &Path,
        request: &FixtureRequest,
        step: &Step,
    ) -> Result<Outcome, HarnessError> {
        let chain = &loaded.chain;
        let mut ctx = request_ctx(file, request)?;
        let mut status = 200;
        let mut outcome = match chain.on_request(&mut ctx) {
            Err(f) => {
                status = 503;
                failure(&f)
            }
            Ok(Flow::Reply(r)) => {
                status = r.status;
                json!({
                    "decision": "reply",
                    "status": r.status,
                    "headers": pairs(&r.headers),
                    "body": body_value(&r.body),
                })
            }
            Ok(Flow::Continue) => continued(&ctx),
        };
        outcome["decisions"] = serde_json::to_value(&ctx.decisions).unwrap_or_default();
        let continued = outcome["decision"] == "continue";
        if let (true, Some(resp)) = (continued, &step.response) {
            let response = run_response(chain, &mut ctx, &resp.text);
            if let Some(s) = response.get("status").and_then(Value::as_u64) {
                status = u16::try_from(s).unwrap_or(status);
            }
            outcome["response"] = response;
        }
        if let (true, Some(deltas)) = (continued, &step.stream) {
            outcome["stream"] = run_stream(chain, &mut ctx, deltas);
        }
        if let Some(log) = &step.log {
            outcome["log"] = self.run_log(loaded, &mut ctx, status, step.stream.is_some(), log);
        }
        Ok(outcome)
    }

    /// Runs `on_log` with the entry `log` describes, on the request's scratch.
    fn run_log(
        &self,
        loaded: &Loaded,
        ctx: &mut RequestCtx,
        status: u16,
        streamed: bool,
        log: &FixtureLog,
    ) -> Value {
        let last = log.attempts.last();
        let model = ctx.body.model().to_owned();
        let target_model = log
            .target_model
            .clone()
            .or_else(|| last.map(|a| a.target_model.clone()))
            .unwrap_or_default();
        let usage = log.usage.map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
            cache_write_tokens: u.cache_write_tokens,
        });
        let cost_usd = log.cost_usd.or_else(|| {
            let env = lock(&self.env);
            let priced = if target_model.is_empty() {
                &model
            } else {
                &target_model
            };
            Some(env.prices.get(priced)?.cost(usage.as_ref()?))
        });
        let mut metadata = ctx.metadata.clone();
        metadata.extend(log.metadata.clone());
        let entry = LogEntry {
            request_id: ctx.request_id.clone(),
            model,
            provider: log
                .provider
                .clone()
                .or_else(|| last.map(|a| a.provider.clone()))
                .unwrap_or_default(),
            target_model,
            status: log.status.unwrap_or(status),
            stream: log.stream.unwrap_or(streamed || ctx.body.stream()),
            usage,
            latency_ms: log.latency_ms,
            ttft_ms: log.ttft_ms,
            metadata: metadata.into_iter().collect(),
            attempts: log
                .attempts
                .iter()
                .map(|a| Attempt {
                    provider: a.provider.clone(),
                    target_model: a.target_model.clone(),
                    status: a.status,
                    latency_ms: a.latency_ms,
                    error: a.error.clone(),
                })
                .collect(),
            decisions: ctx.decisions.clone(),
            cost_usd,
        };
        let before = self.failures(&loaded.name);
        loaded.chain.on_log(&entry, &mut ctx.scratch);
        let after = self.failures(&loaded.name);
        let failed = FAILURE_KINDS
            .iter()
            .zip(before.iter().zip(&after))
            .find(|(_, (b, a))| a > b)
            .map(|(kind, _)| *kind);
        let mut out = log_entry_json(&entry);
        out["failure"] = json!(failed);
        out
    }

    /// The failure counts of instance `name`, by [`FAILURE_KINDS`].
    fn failures(&self, name: &str) -> Vec<u64> {
        FAILURE_KINDS
            .iter()
            .map(|kind| self.metrics.failures.with_label_values(&[name, kind]).get())
            .collect()
    }
}

fn fixture_err(file: &Path, reason: String) -> HarnessError {
    HarnessError::Fixture {
        file: file.to_owned(),
        reason,
    }
}

/// Calls the instance's admin endpoint.
fn run_admin(loaded: &Loaded, admin: &FixtureAdmin) -> Outcome {
    let req = AdminRequest {
        method: admin.method.to_ascii_uppercase(),
        path: admin.path.clone(),
        query: admin.query.clone(),
        body: match &admin.body {
            None => Vec::new(),
            Some(Value::String(s)) => s.clone().into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        },
    };
    let Some(instance) = loaded.chain.instances().first() else {
        return json!({ "decision": "failure", "kind": "unavailable" });
    };
    match instance.admin(&req) {
        Ok(resp) => json!({ "status": resp.status, "body": body_value(&resp.body) }),
        Err(e) => json!({
            "decision": "failure",
            "plugin": loaded.name,
            "kind": e.kind(),
            "error": e.to_string(),
        }),
    }
}

/// Every live key of the plugin's namespace, values as text.
fn kv_snapshot(loaded: &Loaded) -> Value {
    let entries = loaded
        .store
        .scan_prefix(&loaded.namespace, "", KV_SNAPSHOT_LIMIT)
        .unwrap_or_default();
    Value::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(String::from_utf8_lossy(&v).into_owned())))
            .collect(),
    )
}

fn log_entry_json(e: &LogEntry) -> Value {
    json!({
        "request_id": e.request_id,
        "model": e.model,
        "provider": e.provider,
        "target_model": e.target_model,
        "status": e.status,
        "stream": e.stream,
        "usage": e.usage.map(|u| json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens,
            "cache_write_tokens": u.cache_write_tokens,
        })),
        "latency_ms": e.latency_ms,
        "ttft_ms": e.ttft_ms,
        "metadata": Value::Object(e.metadata.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        "attempts": e.attempts,
        "decisions": e.decisions,
        "cost_usd": e.cost_usd,
    })
}

/// A reply or admin body: parsed JSON, or the text.
fn body_value(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()))
}

/// Where `outcome` differs from the step's expectations (`at` prefixes the paths).
fn step_mismatch(step: &Step, outcome: &Value, at: &str) -> Option<String> {
    let Value::Object(expect) = &step.expect else {
        return Some(format!("{at}expect: must be an object"));
    };
    if let Some(m) = unknown_key(expect, EXPECT_KEYS, &format!("{at}expect")) {
        return Some(m);
    }
    let expect_log = match &step.expect_log {
        None => None,
        Some(Value::Object(e)) => Some(e),
        Some(_) => return Some(format!("{at}expect_log: must be an object")),
    };
    if let Some(m) =
        expect_log.and_then(|e| unknown_key(e, EXPECT_LOG_KEYS, &format!("{at}expect_log")))
    {
        return Some(m);
    }
    let plain: Map<String, Value> = expect
        .iter()
        .filter(|(k, _)| *k != "kv")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(m) = subset_mismatch(&Value::Object(plain), outcome, &format!("{at}expect")) {
        return Some(m);
    }
    if let Some(kind) = outcome.pointer("/log/failure").and_then(Value::as_str)
        && !expect_log.is_some_and(|e| e.contains_key("failure"))
    {
        return Some(format!(
            "{at}log: on_log failed ({kind}); expect it with expect_log.failure"
        ));
    }
    if let Some(kv) = expect.get("kv")
        && let Some(m) = kv_mismatch(kv, &outcome["kv"], &format!("{at}expect.kv"))
    {
        return Some(m);
    }
    let log = outcome.get("log").unwrap_or(&Value::Null);
    expect_log
        .and_then(|e| subset_mismatch(&Value::Object(e.clone()), log, &format!("{at}expect_log")))
}

/// An error naming the first key of `map` not in `known`.
fn unknown_key(map: &Map<String, Value>, known: &[&str], path: &str) -> Option<String> {
    let key = map.keys().find(|k| !known.contains(&k.as_str()))?;
    let hint = match key.as_str() {
        "log" => " (on-log expectations go in `expect_log`)".to_owned(),
        _ => format!(" (one of: {})", known.join(", ")),
    };
    Some(format!("{path}: unknown key '{key}'{hint}"))
}

/// Compares `expect.kv` with the namespace after a step: `null` means absent; a string
/// must equal the value; anything else is matched (as by [`subset_mismatch`]) against the
/// value parsed as JSON, so `3` matches `"3"` and `{"a": 1}` a JSON record with `a` 1.
fn kv_mismatch(expected: &Value, actual: &Value, path: &str) -> Option<String> {
    let Value::Object(expected) = expected else {
        return Some(format!("{path}: must be an object of keys"));
    };
    expected.iter().find_map(|(key, want)| {
        let p = format!("{path}.{key}");
        let got = actual.get(key).and_then(Value::as_str);
        match (want, got) {
            (Value::Null, None) => None,
            (Value::Null, Some(v)) => Some(format!("{p}: expected absent, got {v:?}")),
            (_, None) => Some(format!("{p}: absent (expected {want})")),
            (Value::String(w), Some(v)) => {
                (w != v).then(|| format!("{p}: expected {want}, got {v:?}"))
            }
            (_, Some(v)) => match serde_json::from_str::<Value>(v) {
                Ok(parsed) => subset_mismatch(want, &parsed, &p),
                Err(_) => Some(format!("{p}: expected {want}, got {v:?}")),
            },
        }
    })
}

fn failure(f: &PluginFailure) -> Value {
    json!({ "decision": "failure", "plugin": f.plugin, "kind": f.kind })
}

fn pairs(p: &[(String, String)]) -> Value {
    Value::Object(
        p.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn request_ctx(file: &Path, req: &FixtureRequest) -> Result<RequestCtx, HarnessError> {
    let err = |reason: String| HarnessError::Fixture {
        file: file.to_owned(),
        reason,
    };
    let dialect = match req.dialect.as_deref() {
        None | Some("openai") => Dialect::OpenAi,
        Some("anthropic") => Dialect::Anthropic,
        Some(other) => return Err(err(format!("request.dialect: unknown dialect '{other}'"))),
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in &req.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| err(format!("request.headers: bad name '{k}'")))?;
        let value = http::HeaderValue::from_str(v)
            .map_err(|_| err(format!("request.headers.{k}: bad value")))?;
        headers.append(name, value);
    }
    let body = if req.body.get("input").is_some() {
        Body::Embeddings(
            serde_json::from_value(req.body.clone())
                .map_err(|e| err(format!("request.body: {e}")))?,
        )
    } else {
        Body::Chat(
            serde_json::from_value(req.body.clone())
                .map_err(|e| err(format!("request.body: {e}")))?,
        )
    };
    Ok(RequestCtx {
        request_id: "fixture".into(),
        dialect,
        started: Instant::now(),
        headers,
        body,
        targets: None,
        client_body: None,
        metadata: req.metadata.clone(),
        scratch: Default::default(),
        decisions: Vec::new(),
    })
}

fn continued(ctx: &RequestCtx) -> Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in &ctx.headers {
        if let Ok(v) = v.to_str() {
            headers.insert(k.as_str().to_owned(), Value::String(v.to_owned()));
        }
    }
    let messages: Vec<Value> = match &ctx.body {
        // As the views show them (text parts joined with "\n"), with the tool calls and the
        // count of non-text parts when there are any, so fixtures can check that edits keep
        // images and rewrite arguments.
        Body::Chat(c) => c
            .messages
            .iter()
            .map(|m| {
                let v = crate::plugin::contract::message_view(m);
                let mut out = json!({ "role": v.role, "content": v.content });
                if !v.tool_calls.is_empty() {
                    out["tool_calls"] = v
                        .tool_calls
                        .iter()
                        .map(|t| json!({ "id": t.id, "name": t.name, "arguments": t.arguments }))
                        .collect();
                }
                if v.other_parts > 0 {
                    out["other_parts"] = json!(v.other_parts);
                }
                out
            })
            .collect(),
        Body::Embeddings(e) => e
            .input_texts()
            .into_iter()
            .map(|t| json!({ "role": "user", "content": t }))
            .collect(),
    };
    let metadata: serde_json::Map<String, Value> = ctx
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with(super::RESPONSE_HEADER_PREFIX))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let response_headers: serde_json::Map<String, Value> = response_headers(&ctx.metadata)
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    json!({
        "decision": "continue",
        "model": ctx.body.model(),
        "headers": headers,
        "messages": messages,
        "metadata": metadata,
        "targets": ctx.targets.as_ref().map(|ts| ts
            .iter()
            .map(|t| json!({ "provider": t.provider, "model": t.model }))
            .collect::<Vec<_>>()),
        "response_headers": response_headers,
    })
}

fn run_response(chain: &Chain, ctx: &mut RequestCtx, text: &str) -> Value {
    let mut resp = ChatResponse {
        id: "fixture".into(),
        object: "chat.completion".into(),
        created: 0,
        model: ctx.body.model().to_owned(),
        choices: vec![Choice {
            index: 0,
            message: ChatMessage {
                role: "assistant".into(),
                content: Some(MessageContent::Text(text.to_owned())),
                ..ChatMessage::default()
            },
            finish_reason: Some("stop".into()),
            rest: Default::default(),
        }],
        usage: None,
        rest: Default::default(),
    };
    match chain.on_response(ctx, &mut resp) {
        Err(f) => failure(&f),
        Ok(Flow::Reply(r)) => json!({
            "decision": "reply",
            "status": r.status,
            "body": String::from_utf8_lossy(&r.body),
        }),
        Ok(Flow::Continue) => json!({
            "decision": "continue",
            "text": resp.choices.first().map(|c| c.message.text()).unwrap_or_default(),
        }),
    }
}

fn run_stream(chain: &Chain, ctx: &mut RequestCtx, deltas: &[String]) -> Value {
    let mut filter = chain.chunk_filter(ctx);
    let chunk = |delta: Delta, finish: Option<&str>| ChatChunk {
        id: "fixture".into(),
        object: "chat.completion.chunk".into(),
        created: 0,
        model: ctx.body.model().to_owned(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish.map(str::to_owned),
            rest: Default::default(),
        }],
        usage: None,
        rest: Default::default(),
    };
    let mut input = vec![chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            ..Delta::default()
        },
        None,
    )];
    for d in deltas {
        input.push(chunk(
            Delta {
                content: Some(d.clone()),
                ..Delta::default()
            },
            None,
        ));
    }
    input.push(chunk(Delta::default(), Some("stop")));
    let mut out = Vec::new();
    let mut stopped = Value::Null;
    for c in input {
        if let Err(stop) = filter.on_chunk(c, &mut out) {
            stopped = Value::String(stop.message);
            break;
        }
    }
    if stopped.is_null()
        && let Err(stop) = filter.finish(&mut out)
    {
        stopped = Value::String(stop.message);
    }
    let text: String = out
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    // What the chunk hooks changed goes on to on_log, as in the pipeline.
    ctx.metadata = filter.metadata().clone();
    ctx.scratch = filter.take_scratch();
    json!({ "text": text, "stopped": stopped })
}

/// `None` when every part of `expected` is in `actual`; otherwise a description of the
/// first difference. Objects match key by key (`null` also matches a missing key), arrays
/// element by element (of the same length), numbers by value (`2` matches `2.0`), anything
/// else must be equal.
pub fn subset_mismatch(expected: &Value, actual: &Value, path: &str) -> Option<String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e.iter().find_map(|(k, ev)| {
            let p = format!("{path}.{k}");
            match a.get(k) {
                Some(av) => subset_mismatch(ev, av, &p),
                None if ev.is_null() => None,
                None => Some(format!("{p}: missing (expected {ev})")),
            }
        }),
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => e
            .iter()
            .zip(a)
            .enumerate()
            .find_map(|(i, (ev, av))| subset_mismatch(ev, av, &format!("{path}[{i}]"))),
        _ if expected == actual => None,
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => None,
        _ => Some(format!("{path}: expected {expected}, got {actual}")),
    }
}

#[cfg(test)]
mod conformance;

#[cfg(test)]
mod tests;
