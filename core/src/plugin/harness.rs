//! The offline test harness: runs a plugin against the fixtures in its folder, without a
//! gateway, a provider or a network. `weir plugin test PATH` prints its table; Rust tests
//! call [`assert_fixtures_pass`].
//!
//! A fixture is `PATH/fixtures/*.json`:
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
//! The request goes through the real [`Chain`] (the plugin as its only instance, in-memory
//! state), so a fixture exercises exactly what the gateway would run. Its outcome is a JSON
//! document (see [`Outcome`]); `expect` must be a *subset* of it: objects match key by key,
//! anything else must be equal. `config` defaults to `fixtures/config.json` when that file
//! exists, else `{}`. `response` (`{"text": ".."}`) runs `on_response` on a one-choice
//! response; `stream` runs the text deltas through the chunk hooks and reports the text that
//! comes out.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

use super::PluginError;
use super::breaker::BreakerConfigFile;
use super::chain::{Chain, Flow, Instance, PluginFailure, response_headers};
use super::config::PluginInstanceConfig;
use super::host::PluginMetrics;
use crate::api::openai::{
    ChatChunk, ChatMessage, ChatResponse, Choice, ChunkChoice, Delta, MessageContent,
};
use crate::request::{Body, Dialect, RequestCtx};
use crate::state::MemoryStore;

/// The folder of fixtures inside a plugin folder.
pub const FIXTURES_DIR: &str = "fixtures";

/// One fixture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// Display name; default: the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// What the fixture checks (free text).
    #[serde(default)]
    pub description: Option<String>,
    /// The instance config; default: `fixtures/config.json`, else `{}`.
    #[serde(default)]
    pub config: Option<Value>,
    /// The incoming request.
    pub request: FixtureRequest,
    /// A response to run `on_response` on.
    #[serde(default)]
    pub response: Option<FixtureResponse>,
    /// Text deltas of a streamed answer, for the chunk hooks.
    #[serde(default)]
    pub stream: Option<Vec<String>>,
    /// The expected outcome (a subset of it).
    pub expect: Value,
}

/// The request of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureRequest {
    /// `openai` (default) or `anthropic`: the dialect the client spoke.
    #[serde(default)]
    pub dialect: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Metadata set by earlier plugins.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The canonical (OpenAI-shaped) body: a chat request, or an embeddings request when it
    /// has `input` instead of `messages`.
    pub body: Value,
}

/// A non-streaming response for `on_response`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureResponse {
    /// The assistant's text.
    pub text: String,
}

/// The outcome of one fixture, as JSON:
///
/// - `decision`: `continue`, `reply` or `failure`;
/// - on reply: `status`, `headers`, `body` (parsed JSON, or a string);
/// - on failure: `plugin`, `kind` (`timeout`, `trap`...);
/// - on continue: `model`, `headers` (all request headers after the plugin), `messages`
///   (`[{role, content}]`), `metadata`, `targets` (or `null`), `response_headers`;
/// - `response` (with `response`): `{decision, text, headers}`;
/// - `stream` (with `stream`): `{text, stopped}` (`stopped` is the abort message or `null`).
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
    /// Time the hooks took, microseconds.
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
        let name = fixture.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let started = Instant::now();
        let outcome = runner.outcome(&file, &fixture)?;
        let micros = started.elapsed().as_micros();
        let mismatch = subset_mismatch(&fixture.expect, &outcome, "expect");
        report.cases.push(CaseResult {
            name,
            file,
            outcome,
            mismatch,
            micros,
        });
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

/// Runs fixtures against one plugin folder, loading one instance per distinct config.
pub struct Runner {
    dir: PathBuf,
    default_config: Value,
    chains: HashMap<String, Chain>,
    metrics: PluginMetrics,
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
        Ok(Runner {
            dir: dir.to_owned(),
            default_config,
            chains: HashMap::new(),
            metrics: PluginMetrics::unregistered().map_err(PluginError::from)?,
        })
    }

    fn chain(&mut self, config: &Value) -> Result<Chain, HarnessError> {
        let key = config.to_string();
        if let Some(c) = self.chains.get(&key) {
            return Ok(c.clone());
        }
        let cfg = PluginInstanceConfig {
            path: ".".into(),
            name: None,
            config: Some(config.clone()),
            failure: None,
            mode: Default::default(),
            // Fixtures are independent: a failing one must not open the breaker for the next.
            breaker: BreakerConfigFile {
                failures: Some(u32::MAX),
                ..BreakerConfigFile::default()
            },
        };
        let instance = Instance::load(
            &self.dir,
            &cfg,
            "plugin",
            Arc::new(MemoryStore::new()),
            &self.metrics,
            Arc::new(crate::plugin::host::HostLookups::default()),
        )?;
        let chain = Chain::new(vec![instance]).map_err(|reason| PluginError::Config {
            key: "plugin".into(),
            reason,
        })?;
        self.chains.insert(key, chain.clone());
        Ok(chain)
    }

    /// Runs one fixture and returns its outcome.
    pub fn outcome(&mut self, file: &Path, fixture: &Fixture) -> Result<Outcome, HarnessError> {
        let config = fixture
            .config
            .clone()
            .unwrap_or_else(|| self.default_config.clone());
        let chain = self.chain(&config)?;
        let mut ctx = request_ctx(file, &fixture.request)?;
        let mut outcome = match chain.on_request(&mut ctx) {
            Err(f) => failure(&f),
            Ok(Flow::Reply(r)) => {
                let body = serde_json::from_slice::<Value>(&r.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into()));
                json!({
                    "decision": "reply",
                    "status": r.status,
                    "headers": pairs(&r.headers),
                    "body": body,
                })
            }
            Ok(Flow::Continue) => continued(&ctx),
        };
        let continued = outcome["decision"] == "continue";
        if let (true, Some(resp)) = (continued, &fixture.response) {
            outcome["response"] = run_response(&chain, &mut ctx, &resp.text);
        }
        if let (true, Some(deltas)) = (continued, &fixture.stream) {
            outcome["stream"] = run_stream(&chain, &mut ctx, deltas);
        }
        Ok(outcome)
    }
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
        Body::Chat(c) => c
            .messages
            .iter()
            .map(|m| json!({ "role": m.role, "content": m.text() }))
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
    json!({ "text": text, "stopped": stopped })
}

/// `None` when every part of `expected` is in `actual`; otherwise a description of the
/// first difference.
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
        _ if expected == actual => None,
        _ => Some(format!("{path}: expected {expected}, got {actual}")),
    }
}

#[cfg(test)]
mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_guard_example_passes_its_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prompt-guard");
        assert_fixtures_pass(&dir);
        assert!(run_fixtures(&dir).unwrap().cases.len() >= 6);
    }

    #[test]
    fn failing_fixtures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        crate::plugin::scaffold::new_plugin(crate::plugin::scaffold::Lang::Lua, "p", dir.path())
            .unwrap();
        let p = dir.path().join("p");
        std::fs::write(
            p.join("fixtures/wrong.json"),
            r#"{"request": {"body": {"model": "m", "messages": []}}, "expect": {"status": 418}}"#,
        )
        .unwrap();
        let report = run_fixtures(&p).unwrap();
        assert!(!report.passed());
        let mut table = Vec::new();
        report.print(&mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("FAIL"), "{table}");
        assert!(table.contains("3 passed, 1 failed"), "{table}");
    }

    #[test]
    fn subset_matching() {
        let actual = json!({"decision": "reply", "status": 400, "body": {"error": {"message": "x", "code": 400}}});
        assert_eq!(
            subset_mismatch(&json!({"status": 400}), &actual, "expect"),
            None
        );
        assert_eq!(
            subset_mismatch(
                &json!({"body": {"error": {"message": "x"}}}),
                &actual,
                "expect"
            ),
            None
        );
        assert_eq!(
            subset_mismatch(&json!({"status": 401}), &actual, "expect").unwrap(),
            "expect.status: expected 401, got 400"
        );
        assert!(subset_mismatch(&json!({"targets": 1}), &actual, "expect").is_some());
    }
}
