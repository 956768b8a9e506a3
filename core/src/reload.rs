//! Hot reload: watch -> debounce -> hash -> build the whole snapshot -> swap; generations and
//! rollback.
//!
//! ```text
//!  file events (config dir, plugin dirs) ─┐
//!  SIGHUP ────────────────────────────────┼─> Reloader::reload(trigger)   (one at a time)
//!  POST /admin/reload ────────────────────┘        │
//!                 blocking thread: read + sha256 every input; same as now? -> Unchanged
//!                                  Config::from_toml + Snapshot::build (plugins included)
//!                                                  │ error -> keep serving the old snapshot;
//!                                                  │          log, metric, admin status
//!                                  Gateway::swap(new) ── requests in flight keep the old Arc
//!                                  generation N+1 recorded in the state store
//! ```
//!
//! Every accepted snapshot gets a generation number: monotonic across restarts (the last one
//! is persisted), recorded with the content hash of every input, the trigger and the time.
//! The last few snapshots stay in memory, ready: a rollback swaps one back in and is itself a
//! new generation pointing at the old content. A snapshot that stops serving is *parked*: its
//! plugins give back their spare Lua VMs and idle WASM instances, which are built again
//! before a rollback swaps it back in (see [`crate::plugin::loads`]), so the kept
//! generations cost their config and compiled code, not several MiB of VMs each.
//!
//! Watching: editors save by writing a temporary file and renaming it over the original, and
//! Kubernetes ConfigMaps swap a `..data` symlink, so we watch *directories* (the config file's
//! and each plugin folder) and decide by content hash, never by event kind. Plugin key-value
//! state is namespaced by plugin name, not generation, so it survives every reload.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError};
use crate::pipeline::{Gateway, GatewayError, Services, Snapshot};
use crate::plugin::Loads;
use crate::requestlog::now_ms;
use crate::state::{StateError, StateStore};
use crate::telemetry::Metrics;

/// The state-store namespace of the generation history.
pub const NAMESPACE: &str = "weir/generations";

/// Generation records kept in the state store (the in-memory list is much shorter).
const HISTORY_RECORDS: u64 = 1_000;

/// Files larger than this in a plugin folder are not hashed (build outputs, data sets); a
/// plugin's code and manifest are far smaller.
const MAX_HASHED_FILE: u64 = 256 * 1024 * 1024;

/// Folders in a plugin folder that never hold what the gateway loads.
const SKIPPED_DIRS: &[&str] = &["target", "node_modules"];

/// What asked for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The process started.
    Startup,
    /// A watched file changed.
    Watch,
    /// `SIGHUP`.
    Sighup,
    /// `POST /admin/reload`.
    Admin,
    /// `POST /admin/rollback/{generation}`.
    Rollback,
}

impl Trigger {
    /// Lower-case name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Watch => "watch",
            Trigger::Sighup => "sighup",
            Trigger::Admin => "admin",
            Trigger::Rollback => "rollback",
        }
    }
}

/// One accepted snapshot, as recorded in the state store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// The generation number.
    pub generation: u64,
    /// When it was accepted, ms since the Unix epoch.
    pub time_ms: u64,
    /// What caused it.
    pub trigger: Trigger,
    /// SHA-256 over every input (path and content hash), hex.
    pub hash: String,
    /// SHA-256 of each input file, by path, hex.
    pub files: BTreeMap<String, String>,
    /// For a rollback: the generation whose snapshot was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

/// A failed reload, as shown in the admin status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadFailure {
    /// When, ms since the Unix epoch.
    pub time_ms: u64,
    /// What asked for the reload.
    pub trigger: Trigger,
    /// The whole error message.
    pub message: String,
    /// The file at fault, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The config key at fault, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The line at fault, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// The plugin at fault, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

/// The result of one reload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new snapshot serves, as this generation.
    Success(u64),
    /// The inputs are the same as the serving snapshot's: nothing was built.
    Unchanged(u64),
    /// The new inputs did not build; the old snapshot keeps serving.
    Failure(ReloadFailure),
}

impl Outcome {
    /// `success`, `unchanged` or `failure`: the `outcome` label of `weir_reload_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "success",
            Outcome::Unchanged(_) => "unchanged",
            Outcome::Failure(_) => "failure",
        }
    }
}

/// Why a reload or rollback failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file does not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config loads but the snapshot does not build (HTTP clients, plugins).
    #[error("{0}")]
    Build(String),
    /// The generation history could not be read or written.
    #[error("generation history: {0}")]
    State(#[from] StateError),
    /// A rollback asked for a generation that is not kept in memory.
    #[error("generation {generation} is not kept; rollback is possible to: {kept:?}")]
    NotKept {
        /// The generation asked for.
        generation: u64,
        /// The generations that are kept.
        kept: Vec<u64>,
    },
    /// The metrics could not be registered.
    #[error("reload metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The build thread panicked or was cancelled.
    #[error("reload build thread failed: {0}")]
    Join(String),
}

impl From<GatewayError> for ReloadError {
    fn from(e: GatewayError) -> Self {
        ReloadError::Build(e.to_string())
    }
}

impl ReloadError {
    fn failure(&self, trigger: Trigger) -> ReloadFailure {
        let (file, key, line) = match self {
            ReloadError::Config(ConfigError::Read { file, .. })
            | ReloadError::Read { file, .. } => (Some(file.display().to_string()), None, None),
            ReloadError::Config(ConfigError::Syntax { file, reason }) => {
                (Some(file.display().to_string()), None, line_of(reason))
            }
            ReloadError::Config(ConfigError::Invalid { file, key, .. }) => {
                (Some(file.display().to_string()), Some(key.clone()), None)
            }
            // Plugin errors are text: `plugin 'NAME': FILE: syntax error: LINE: ...`.
            _ => {
                let msg = self.to_string();
                (file_of(&msg), None, line_of(&msg))
            }
        };
        let message = self.to_string();
        let plugin = quoted_after(&message, "plugin '");
        ReloadFailure {
            time_ms: now_ms(),
            trigger,
            message,
            file,
            key,
            line,
            plugin,
        }
    }
}

/// The line number in a parser message: `at line 3, column 7` (TOML) or
/// `syntax error: 11: ...` (Luau).
fn line_of(message: &str) -> Option<u64> {
    let number = |rest: &str| {
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    if let Some(i) = message.find("line ") {
        return number(&message[i + 5..]);
    }
    let i = message.find("syntax error: ")?;
    number(&message[i + 14..])
}

/// The first path to a plugin file (`.lua`, `.toml`, `.wasm`) in an error message.
fn file_of(message: &str) -> Option<String> {
    message
        .split(|c: char| c.is_whitespace() || c == '\'')
        .map(|w| w.trim_end_matches(':'))
        .find(|w| {
            [".lua", ".toml", ".wasm"]
                .iter()
                .any(|ext| w.ends_with(ext))
        })
        .map(str::to_owned)
}

/// The text between `prefix` and the next `'`.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('\'')?].to_owned())
}

/// The hashed inputs of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Inputs {
    /// Hash of each file, by path.
    files: BTreeMap<String, String>,
    /// Hash over all of them.
    hash: String,
}

impl Inputs {
    fn add(&mut self, path: &Path, bytes: &[u8]) {
        self.files.insert(
            path.display().to_string(),
            hex::encode(Sha256::digest(bytes)),
        );
    }

    fn seal(mut self) -> Self {
        let mut all = Sha256::new();
        for (path, hash) in &self.files {
            all.update(path.as_bytes());
            all.update([0]);
            all.update(hash.as_bytes());
            all.update([0]);
        }
        self.hash = hex::encode(all.finalize());
        self
    }
}

/// The folders of the plugins a config loads (`[[plugins]]` and `[[models.plugins]]`,
/// resolved against the config file's folder): the one place that lists them, for hashing
/// and for watching.
pub fn plugin_dirs(config: &Config) -> Vec<PathBuf> {
    let base = config.path.parent().unwrap_or_else(|| Path::new("."));
    let mut dirs: Vec<PathBuf> = config
        .file
        .plugins
        .iter()
        .chain(config.file.models.iter().flat_map(|m| m.plugins.iter()))
        .map(|p| base.join(&p.path))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Reads and hashes every input, parsing the config on the way (it names the plugin folders).
/// What is hashed is exactly what is built. On an error, the inputs hashed so far come back
/// with it, so that the same broken content is recognised next time.
fn read_inputs(path: &Path) -> (Inputs, Result<Config, ReloadError>) {
    let mut inputs = Inputs::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => {
            return (
                inputs.seal(),
                Err(ConfigError::Read {
                    file: path.to_owned(),
                    source,
                }
                .into()),
            );
        }
    };
    inputs.add(path, text.as_bytes());
    let config = match Config::from_toml(path, &text) {
        Ok(c) => c,
        Err(e) => return (inputs.seal(), Err(e.into())),
    };
    for dir in plugin_dirs(&config) {
        if let Err(e) = hash_dir(&dir, &mut inputs, 0) {
            return (inputs.seal(), Err(e));
        }
    }
    (inputs.seal(), Ok(config))
}

/// Hashes the files of a plugin folder, recursively. Hidden entries are skipped (`.git`, and
/// the `..data` folder of a ConfigMap, whose files are reached through their top-level
/// symlinks), as are build-output folders.
fn hash_dir(dir: &Path, inputs: &mut Inputs, depth: usize) -> Result<(), ReloadError> {
    let read = |e| ReloadError::Read {
        file: dir.to_owned(),
        source: e,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks: a ConfigMap's files are links into `..data`.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < 4 && !SKIPPED_DIRS.contains(&name.as_ref()) {
                hash_dir(&path, inputs, depth + 1)?;
            }
        } else if meta.is_file() && meta.len() <= MAX_HASHED_FILE {
            let bytes = std::fs::read(&path).map_err(|source| ReloadError::Read {
                file: path.clone(),
                source,
            })?;
            inputs.add(&path, &bytes);
        }
    }
    Ok(())
}

/// Builds the snapshot for a loaded config: the one place a reload constructs the pipeline.
fn build(config: Config, services: &Services) -> Result<Snapshot, ReloadError> {
    Ok(Snapshot::build(config, services)?)
}

/// What the watcher should watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// The config file (absolute, symlinks not resolved).
    pub config: PathBuf,
    /// The config file with symlinks resolved, when that differs.
    pub config_target: Option<PathBuf>,
    /// Plugin folders (absolute).
    pub plugin_dirs: Vec<PathBuf>,
}

impl Watched {
    fn new(config_path: &Path, config: Option<&Config>) -> Watched {
        let config_abs =
            std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_owned());
        let target = std::fs::canonicalize(&config_abs)
            .ok()
            .filter(|t| *t != config_abs);
        let plugin_dirs = config
            .map(plugin_dirs)
            .unwrap_or_default()
            .into_iter()
            .map(|d| std::path::absolute(&d).unwrap_or(d))
            .collect();
        Watched {
            config: config_abs,
            config_target: target,
            plugin_dirs,
        }
    }

    /// Directories to watch and whether recursively.
    fn dirs(&self) -> HashSet<(PathBuf, bool)> {
        let mut out = HashSet::new();
        for file in std::iter::once(&self.config).chain(self.config_target.as_ref()) {
            if let Some(parent) = file.parent() {
                out.insert((parent.to_owned(), false));
            }
        }
        for d in &self.plugin_dirs {
            out.insert((d.clone(), true));
        }
        out
    }

    /// Whether an event on `path` may change an input. False positives only cost a hash.
    fn is_relevant(&self, path: &Path) -> bool {
        if path == self.config || self.config_target.as_deref() == Some(path) {
            return true;
        }
        // A ConfigMap update renames `..data` (and creates `..<timestamp>` folders).
        if path.parent() == self.config.parent()
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        {
            return true;
        }
        self.plugin_dirs.iter().any(|dir| {
            path.strip_prefix(dir).is_ok_and(|rel| {
                !rel.components().any(|c| {
                    let c = c.as_os_str().to_string_lossy();
                    (c.starts_with('.') && !c.starts_with(".."))
                        || SKIPPED_DIRS.contains(&c.as_ref())
                })
            })
        })
    }
}

/// A snapshot kept ready for rollback.
struct Kept {
    record: GenerationRecord,
    snapshot: Arc<Snapshot>,
    /// Its plugin runtimes: parked while it does not serve, unparked before a rollback to it.
    /// Empty for the startup snapshot (built before the reloader exists).
    loads: Loads,
}

/// Reload history, behind the lock that makes reloads one at a time.
struct History {
    /// Newest last; the serving one is the last.
    kept: VecDeque<Kept>,
    /// The hash last read from disk by a watch-triggered reload (built or not), so that
    /// spurious events do not rebuild, and do not undo a rollback.
    last_seen: String,
}

/// Counters and the last outcome, for the admin status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStats {
    /// Successful reloads since start.
    pub success: u64,
    /// Failed reloads since start.
    pub failure: u64,
    /// Reloads that found nothing changed.
    pub unchanged: u64,
    /// The last reload: trigger, outcome, when and how long it took.
    pub last: Option<LastReload>,
    /// The last failure, if any (it stays after later successes; compare times).
    pub last_error: Option<ReloadFailure>,
    /// Plugin VMs and instances alive now, every generation together: after old
    /// generations leave, these come back to what the kept ones hold.
    pub live: crate::plugin::Live,
}

/// The last reload attempt.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// What asked for it.
    pub trigger: Trigger,
    /// `success`, `unchanged` or `failure`.
    pub outcome: &'static str,
    /// When it finished, ms since the Unix epoch.
    pub time_ms: u64,
    /// Time spent reading, hashing and building, ms.
    pub duration_ms: f64,
    /// The generation serving afterwards.
    pub generation: u64,
}

/// Drives reloads and rollbacks of one gateway and keeps its generation history.
pub struct Reloader {
    gw: Arc<Gateway>,
    config_path: PathBuf,
    store: Arc<dyn StateStore>,
    started: Instant,
    history: tokio::sync::Mutex<History>,
    /// The serving generation's record (readable without waiting for a reload).
    current: RwLock<GenerationRecord>,
    stats: Mutex<ReloadStats>,
    watched: tokio::sync::watch::Sender<Watched>,
    reload_total: IntCounterVec,
    reload_duration: HistogramVec,
    generation_gauge: IntGauge,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

fn generation_key(n: u64) -> String {
    format!("g/{n:020}")
}

const LAST_GENERATION_KEY: &str = "meta/last";

impl Reloader {
    /// Numbers the startup snapshot (the next generation after the last persisted one),
    /// records it, and creates the gateway serving it. Blocking (reads the state store and
    /// the input files): call before serving.
    pub fn start(
        mut snapshot: Snapshot,
        metrics: Metrics,
        store: Arc<dyn StateStore>,
    ) -> Result<(Arc<Gateway>, Arc<Reloader>), ReloadError> {
        let config_path = snapshot.config.path.clone();
        let reload_total = IntCounterVec::new(
            Opts::new(
                "weir_reload_total",
                "Reload attempts, by outcome (success, failure, unchanged).",
            ),
            &["outcome"],
        )?;
        let reload_duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_reload_duration_seconds",
                "Time to read, hash, build and swap a snapshot.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["outcome"],
        )?;
        let generation_gauge =
            IntGauge::new("weir_config_generation", "The generation serving requests.")?;
        metrics.registry.register(Box::new(reload_total.clone()))?;
        metrics
            .registry
            .register(Box::new(reload_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(generation_gauge.clone()))?;
        for outcome in ["success", "failure", "unchanged"] {
            reload_total.with_label_values(&[outcome]);
        }

        let mut inputs = Inputs::default();
        match std::fs::read(&config_path) {
            Ok(bytes) => inputs.add(&config_path, &bytes),
            Err(source) => {
                return Err(ConfigError::Read {
                    file: config_path,
                    source,
                }
                .into());
            }
        }
        for dir in plugin_dirs(&snapshot.config) {
            hash_dir(&dir, &mut inputs, 0)?;
        }
        let inputs = inputs.seal();
        let generation = last_generation(&*store)? + 1;
        let record = GenerationRecord {
            generation,
            time_ms: now_ms(),
            trigger: Trigger::Startup,
            hash: inputs.hash.clone(),
            files: inputs.files,
            rollback_of: None,
        };
        persist(&*store, &record)?;
        snapshot.generation = generation;
        generation_gauge.set(i64::try_from(generation).unwrap_or(i64::MAX));
        let watched = Watched::new(&config_path, Some(&snapshot.config));
        let gw = Arc::new(Gateway::new(snapshot, metrics));
        let snapshot = gw.snapshot();
        let (watched, _) = tokio::sync::watch::channel(watched);
        let reloader = Arc::new(Reloader {
            gw: gw.clone(),
            config_path,
            store,
            started: Instant::now(),
            history: tokio::sync::Mutex::new(History {
                kept: VecDeque::from([Kept {
                    record: record.clone(),
                    snapshot,
                    loads: Loads::default(),
                }]),
                last_seen: inputs.hash,
            }),
            current: RwLock::new(record),
            stats: Mutex::new(ReloadStats::default()),
            watched,
            reload_total,
            reload_duration,
            generation_gauge,
        });
        Ok((gw, reloader))
    }

    /// The gateway this reloader swaps snapshots into.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// The state store the gateway shares (keys, spend, plugin kv): what
    /// `GET /admin/state/export` reads.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The record of the serving generation.
    pub fn current(&self) -> GenerationRecord {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reload counters, the last outcome and error, and what plugins hold alive.
    pub fn stats(&self) -> ReloadStats {
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        stats.live = crate::plugin::live();
        stats
    }

    /// The generations kept in memory for rollback, oldest first.
    pub async fn kept(&self) -> Vec<u64> {
        self.history
            .lock()
            .await
            .kept
            .iter()
            .map(|k| k.record.generation)
            .collect()
    }

    /// Up to `limit` recorded generations, newest first. Blocking (reads the state store).
    pub fn history(&self, limit: usize) -> Result<Vec<GenerationRecord>, ReloadError> {
        let last = last_generation(&*self.store)?;
        let mut out = Vec::new();
        let mut n = last;
        while n > 0 && out.len() < limit {
            if let Some(raw) = self.store.get(NAMESPACE, &generation_key(n))?
                && let Ok(record) = serde_json::from_slice(&raw)
            {
                out.push(record);
            } else if last - n >= HISTORY_RECORDS {
                break;
            }
            n -= 1;
        }
        Ok(out)
    }

    /// Reads the inputs again and, when they changed, builds and swaps in a new snapshot.
    /// A failure keeps the serving snapshot and is reported in the log, the metric and
    /// [`Reloader::stats`].
    pub async fn reload(self: &Arc<Self>, trigger: Trigger) -> Outcome {
        let started = Instant::now();
        let mut history = self.history.lock().await;
        let serving = self.current();
        let last_seen = history.last_seen.clone();
        let path = self.config_path.clone();
        // A new snapshot shares the process-wide services (state store, plugin metrics).
        let services = self.gateway().snapshot().services.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let (inputs, config) = read_inputs(&path);
            // A watch event that changed nothing since we last looked (or that leads back to
            // what serves) is not a reload. Explicit reloads compare with what serves only,
            // so they also undo a rollback when the files differ from it.
            if inputs.hash == serving.hash
                || (trigger == Trigger::Watch && inputs.hash == last_seen)
            {
                return Prepared::Unchanged;
            }
            // The plugin runtimes it loads are recorded, to park them when it stops serving.
            match Loads::record(|| config.and_then(|c| build(c, &services))) {
                (Ok(snapshot), loads) => Prepared::Built(Box::new(snapshot), inputs, loads),
                (Err(e), _) => Prepared::Failed(e, Some(inputs.hash)),
            }
        })
        .await
        .unwrap_or_else(|e| Prepared::Failed(ReloadError::Join(e.to_string()), None));
        let serving = self.current();
        let outcome = match prepared {
            Prepared::Unchanged => Outcome::Unchanged(serving.generation),
            Prepared::Built(snapshot, inputs, loads) => {
                history.last_seen.clone_from(&inputs.hash);
                let record = GenerationRecord {
                    generation: serving.generation + 1,
                    time_ms: now_ms(),
                    trigger,
                    hash: inputs.hash,
                    files: inputs.files,
                    rollback_of: None,
                };
                let generation = record.generation;
                self.accept(&mut history, record, *snapshot, loads).await;
                Outcome::Success(generation)
            }
            Prepared::Failed(e, hash) => {
                // Remember what failed so that identical events do not rebuild it again.
                if let Some(hash) = hash {
                    history.last_seen = hash;
                }
                Outcome::Failure(e.failure(trigger))
            }
        };
        drop(history);
        self.finish(trigger, &outcome, started.elapsed());
        outcome
    }

    /// Swaps in the snapshot of a kept generation; records a new generation pointing at it.
    pub async fn rollback(self: &Arc<Self>, to: u64) -> Result<Outcome, ReloadError> {
        let started = Instant::now();
        let mut history = self.history.lock().await;
        let Some(kept) = history.kept.iter().find(|k| k.record.generation == to) else {
            return Err(ReloadError::NotKept {
                generation: to,
                kept: history.kept.iter().map(|k| k.record.generation).collect(),
            });
        };
        let serving = self.current();
        if Arc::ptr_eq(&kept.snapshot, &self.gw.snapshot()) {
            return Ok(Outcome::Unchanged(serving.generation));
        }
        let snapshot = kept.snapshot.clone();
        let loads = kept.loads.clone();
        let record = GenerationRecord {
            generation: serving.generation + 1,
            time_ms: now_ms(),
            trigger: Trigger::Rollback,
            hash: kept.record.hash.clone(),
            files: kept.record.files.clone(),
            rollback_of: Some(to),
        };
        let generation = record.generation;
        // Its plugins were parked when it stopped serving: spares first, so that its first
        // requests do not build VMs. (Best effort; nothing here can fail the rollback.)
        let warm = loads.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || warm.unpark()).await {
            tracing::warn!(generation = to, error = %e, "Warming the plugins up again failed.");
        }
        self.install(&mut history, record, snapshot, loads).await;
        drop(history);
        let outcome = Outcome::Success(generation);
        self.finish(Trigger::Rollback, &outcome, started.elapsed());
        Ok(outcome)
    }

    /// Numbers a freshly built snapshot and installs it.
    async fn accept(
        &self,
        history: &mut History,
        record: GenerationRecord,
        mut snapshot: Snapshot,
        loads: Loads,
    ) {
        snapshot.generation = record.generation;
        self.install(history, record, Arc::new(snapshot), loads)
            .await;
    }

    /// Swaps `snapshot` in, parks the one it replaces, records the generation, trims the kept
    /// list.
    async fn install(
        &self,
        history: &mut History,
        record: GenerationRecord,
        snapshot: Arc<Snapshot>,
        loads: Loads,
    ) {
        let keep = snapshot.config.reload.keep_generations;
        let watched = Watched::new(&self.config_path, Some(&snapshot.config));
        self.gw.swap(snapshot.clone());
        // The one that served until now (the last kept) keeps only what a rollback needs:
        // its Lua VMs and WASM instances go (see `plugin::loads`). Closing VMs takes a
        // moment, so it happens off the async workers, with the write of the record.
        let parked = history
            .kept
            .back()
            .filter(|previous| !Arc::ptr_eq(&previous.snapshot, &snapshot))
            .map(|previous| previous.loads.clone());
        self.generation_gauge
            .set(i64::try_from(record.generation).unwrap_or(i64::MAX));
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = record.clone();
        let store = self.store.clone();
        let to_persist = record.clone();
        let persisted = tokio::task::spawn_blocking(move || {
            if let Some(loads) = parked {
                loads.park();
            }
            persist(&*store, &to_persist)
        })
        .await;
        match persisted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(generation = record.generation, error = %e, "Cannot record the generation.")
            }
            Err(e) => {
                tracing::warn!(generation = record.generation, error = %e, "Cannot record the generation.")
            }
        }
        history.kept.push_back(Kept {
            record,
            snapshot,
            loads,
        });
        // The serving one plus `keep` previous ones.
        while history.kept.len() > keep + 1 {
            history.kept.pop_front();
        }
        self.watched.send_if_modified(|w| {
            let changed = *w != watched;
            *w = watched;
            changed
        });
    }

    fn finish(&self, trigger: Trigger, outcome: &Outcome, took: Duration) {
        let label = outcome.as_str();
        self.reload_total.with_label_values(&[label]).inc();
        self.reload_duration
            .with_label_values(&[label])
            .observe(took.as_secs_f64());
        let duration_ms = took.as_secs_f64() * 1000.0;
        let generation = self.current().generation;
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Outcome::Success(g) => {
                stats.success += 1;
                tracing::info!(
                    generation = g,
                    trigger = trigger.as_str(),
                    duration_ms,
                    "Reloaded."
                );
            }
            Outcome::Unchanged(g) => {
                stats.unchanged += 1;
                tracing::debug!(
                    generation = g,
                    trigger = trigger.as_str(),
                    "Reload: nothing changed."
                );
            }
            Outcome::Failure(f) => {
                stats.failure += 1;
                tracing::error!(
                    trigger = trigger.as_str(),
                    file = f.file.as_deref().unwrap_or(""),
                    key = f.key.as_deref().unwrap_or(""),
                    plugin = f.plugin.as_deref().unwrap_or(""),
                    line = f.line.unwrap_or(0),
                    error = %f.message,
                    generation,
                    "Reload failed; the previous configuration keeps serving."
                );
                stats.last_error = Some(f.clone());
            }
        }
        stats.last = Some(LastReload {
            trigger,
            outcome: label,
            time_ms: now_ms(),
            duration_ms,
            generation,
        });
    }

    /// What the watcher should watch now.
    pub fn watched(&self) -> tokio::sync::watch::Receiver<Watched> {
        self.watched.subscribe()
    }
}

/// What the build thread found.
enum Prepared {
    /// Same inputs as before.
    Unchanged,
    /// A new snapshot, the inputs it was built from and the plugin runtimes it loaded.
    Built(Box<Snapshot>, Inputs, Loads),
    /// The error, and the hash of the inputs when they could be read.
    Failed(ReloadError, Option<String>),
}

fn last_generation(store: &dyn StateStore) -> Result<u64, StateError> {
    Ok(store
        .get(NAMESPACE, LAST_GENERATION_KEY)?
        .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(0))
}

fn persist(store: &dyn StateStore, record: &GenerationRecord) -> Result<(), ReloadError> {
    let json = serde_json::to_vec(record).map_err(|e| StateError::Backend(e.to_string()))?;
    store.set(NAMESPACE, &generation_key(record.generation), &json, None)?;
    store.set(
        NAMESPACE,
        LAST_GENERATION_KEY,
        record.generation.to_string().as_bytes(),
        None,
    )?;
    if record.generation > HISTORY_RECORDS {
        store.delete(
            NAMESPACE,
            &generation_key(record.generation - HISTORY_RECORDS),
        )?;
    }
    Ok(())
}

/// Watches the config file's folder and the plugin folders and reloads on change, after a
/// quiet period. Runs until the process ends.
///
/// Debounce: an editor's save is several events (write a temp file, rename it over the
/// original, touch metadata), `git checkout` and ConfigMap updates touch several files, and
/// reading between them would build a half-written state. We wait until no relevant event
/// has arrived for `debounce` (100 ms by default, `[reload] debounce_ms`), then read and hash
/// everything once. Events that arrive during a reload start a new quiet period, so the
/// last write always wins; the hash comparison turns redundant rounds into no-ops.
pub fn spawn_watcher(
    reloader: Arc<Reloader>,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    let mut watched_rx = reloader.watched();
    let relevance = Arc::new(RwLock::new(watched_rx.borrow().clone()));
    // Capacity 1 is enough: a pending signal already means "look again".
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let filter = relevance.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let w = filter
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if event.paths.is_empty() || event.paths.iter().any(|p| w.is_relevant(p)) {
            let _ = tx.try_send(());
        }
    })?;
    let mut current: HashSet<(PathBuf, bool)> = HashSet::new();
    apply_watches(
        &mut watcher,
        &mut current,
        &relevance
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                }
                changed = watched_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let w = watched_rx.borrow_and_update().clone();
                    apply_watches(&mut watcher, &mut current, &w);
                    *relevance.write().unwrap_or_else(std::sync::PoisonError::into_inner) = w;
                    continue;
                }
            }
            let debounce = reloader.gw.snapshot().config.reload.debounce;
            // Quiet period: every further event restarts it.
            while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
            reloader.reload(Trigger::Watch).await;
        }
    }))
}

fn apply_watches(
    watcher: &mut impl notify::Watcher,
    current: &mut HashSet<(PathBuf, bool)>,
    w: &Watched,
) {
    let wanted = w.dirs();
    for (dir, recursive) in current.difference(&wanted) {
        let _ = watcher.unwatch(dir);
        tracing::debug!(dir = %dir.display(), recursive, "Stopped watching.");
    }
    for (dir, recursive) in wanted.difference(current) {
        let mode = if *recursive {
            notify::RecursiveMode::Recursive
        } else {
            notify::RecursiveMode::NonRecursive
        };
        match watcher.watch(dir, mode) {
            Ok(()) => tracing::debug!(dir = %dir.display(), recursive, "Watching for changes."),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch; changes there need SIGHUP or POST /admin/reload.")
            }
        }
    }
    *current = wanted;
}

/// Reloads on every `SIGHUP` (Unix only; elsewhere this does nothing).
pub fn spawn_sighup(reloader: Arc<Reloader>) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading.");
                reloader.reload(Trigger::Sighup).await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = reloader;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    const GOOD: &str = "[providers.local]\nkind = \"mock\"\nreply = \"REPLY\"\n\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"local\" }]\n";

    fn reply(gw: &Gateway) -> String {
        match &gw.snapshot().config.file.providers["local"] {
            crate::provider::ProviderConfig::Mock(m) => m.reply.clone().unwrap_or_default(),
            _ => String::new(),
        }
    }

    fn start(dir: &Path, store: Arc<dyn StateStore>) -> (Arc<Gateway>, Arc<Reloader>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let path = dir.join("weir.toml");
        let config = Config::load(&path).unwrap();
        let metrics = Metrics::new().unwrap();
        let services = Services::new(store.clone(), &metrics).unwrap();
        Reloader::start(Snapshot::build(config, &services).unwrap(), metrics, store).unwrap()
    }

    #[tokio::test]
    async fn reload_rollback_and_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, GOOD.replace("REPLY", "v1")).unwrap();
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let (gw, r) = start(dir.path(), store.clone());
        assert_eq!(gw.snapshot().generation, 1);
        assert_eq!(r.reload(Trigger::Admin).await, Outcome::Unchanged(1));

        std::fs::write(&path, GOOD.replace("REPLY", "v2")).unwrap();
        assert_eq!(r.reload(Trigger::Admin).await, Outcome::Success(2));
        assert_eq!(reply(&gw), "v2");
        assert_eq!(gw.snapshot().generation, 2);

        // Broken: unknown key, with file and key named.
        std::fs::write(&path, GOOD.replace("REPLY", "v3") + "bogus = 1\n").unwrap();
        let Outcome::Failure(f) = r.reload(Trigger::Watch).await else {
            panic!("must fail")
        };
        assert_eq!(f.key.as_deref(), Some("models[0].bogus"), "{f:?}");
        assert!(f.file.as_deref().unwrap().ends_with("weir.toml"));
        assert_eq!(reply(&gw), "v2");
        // The same broken content again is not rebuilt on a watch event.
        assert_eq!(r.reload(Trigger::Watch).await, Outcome::Unchanged(2));
        // A syntax error names the line.
        std::fs::write(&path, "[providers.local\n").unwrap();
        let Outcome::Failure(f) = r.reload(Trigger::Sighup).await else {
            panic!("must fail")
        };
        assert_eq!(f.line, Some(1), "{f:?}");
        assert_eq!(r.stats().failure, 2);

        std::fs::write(&path, GOOD.replace("REPLY", "v4")).unwrap();
        assert_eq!(r.reload(Trigger::Watch).await, Outcome::Success(3));
        assert_eq!(reply(&gw), "v4");

        // Rollback to 2: a new generation pointing at 2's content.
        assert_eq!(r.rollback(2).await.unwrap(), Outcome::Success(4));
        assert_eq!(reply(&gw), "v2");
        let current = r.current();
        assert_eq!(
            (current.generation, current.rollback_of, current.trigger),
            (4, Some(2), Trigger::Rollback)
        );
        // A spurious watch event does not undo the rollback ...
        assert_eq!(r.reload(Trigger::Watch).await, Outcome::Unchanged(4));
        assert_eq!(reply(&gw), "v2");
        // ... an explicit reload does.
        assert_eq!(r.reload(Trigger::Admin).await, Outcome::Success(5));
        assert_eq!(reply(&gw), "v4");
        assert!(matches!(
            r.rollback(99).await,
            Err(ReloadError::NotKept { .. })
        ));

        let history = r.history(10).unwrap();
        assert_eq!(
            history.iter().map(|g| g.generation).collect::<Vec<_>>(),
            vec![5, 4, 3, 2, 1]
        );
        assert_eq!(history[4].trigger, Trigger::Startup);

        // Generations continue across restarts.
        drop((gw, r));
        let (gw, _r) = start(dir.path(), store);
        assert_eq!(gw.snapshot().generation, 6);
    }

    #[tokio::test]
    async fn a_config_without_models_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, GOOD.replace("REPLY", "v1")).unwrap();
        let (gw, r) = start(dir.path(), Arc::new(MemoryStore::new()));
        // A save cut short before `[[models]]`: valid TOML, nothing to serve.
        let half = &GOOD[..GOOD.find("[[models]]").unwrap()];
        std::fs::write(&path, half).unwrap();
        let Outcome::Failure(f) = r.reload(Trigger::Watch).await else {
            panic!("must fail")
        };
        assert_eq!(f.key.as_deref(), Some("models"), "{f:?}");
        assert!(f.message.contains("config defines no models"), "{f:?}");
        assert!(f.file.as_deref().unwrap().ends_with("weir.toml"));
        assert_eq!(reply(&gw), "v1");
        assert_eq!(r.stats().failure, 1);
        // Startup (and `weir check`) refuse it the same way.
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("config defines no models"), "{err}");
    }

    #[tokio::test]
    async fn keeps_only_the_configured_number_of_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        let cfg = |i: u32| {
            format!(
                "[reload]\nkeep_generations = 2\n\n{}",
                GOOD.replace("REPLY", &format!("v{i}"))
            )
        };
        std::fs::write(&path, cfg(0)).unwrap();
        let (_gw, r) = start(dir.path(), Arc::new(MemoryStore::new()));
        for i in 1..=5 {
            std::fs::write(&path, cfg(i)).unwrap();
            assert!(matches!(
                r.reload(Trigger::Admin).await,
                Outcome::Success(_)
            ));
        }
        assert_eq!(r.kept().await, vec![4, 5, 6]);
    }

    /// What each kept generation holds ready (spare VMs and the like), oldest first.
    async fn ready(r: &Reloader) -> Vec<(u64, usize)> {
        let history = r.history.lock().await;
        history
            .kept
            .iter()
            .map(|k| (k.record.generation, k.loads.ready()))
            .collect()
    }

    #[tokio::test]
    async fn generations_that_stop_serving_give_back_their_vms_until_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("p")).unwrap();
        std::fs::write(
            dir.path().join("p/plugin.toml"),
            "name = \"p\"\nversion = \"0.1.0\"\nkind = \"lua\"\nhooks = [\"on-request\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p/plugin.lua"),
            "function on_request(req) end\n",
        )
        .unwrap();
        let path = dir.path().join("weir.toml");
        let cfg = |i: u32| {
            format!(
                "[reload]\nkeep_generations = 2\n\n[[plugins]]\npath = \"p\"\n\n{}",
                GOOD.replace("REPLY", &format!("v{i}"))
            )
        };
        std::fs::write(&path, cfg(0)).unwrap();
        let (_gw, r) = start(dir.path(), Arc::new(MemoryStore::new()));
        for i in 1..=3 {
            std::fs::write(&path, cfg(i)).unwrap();
            assert!(matches!(
                r.reload(Trigger::Admin).await,
                Outcome::Success(_)
            ));
        }
        // The startup snapshot was built before the reloader (nothing recorded); of the
        // others, only the serving one holds VMs.
        let spares = crate::plugin::lua::default_spares();
        assert_eq!(ready(&r).await, vec![(2, 0), (3, 0), (4, spares)]);
        // A rollback builds the spares again before swapping in, and parks the one it
        // replaces.
        assert_eq!(r.rollback(3).await.unwrap(), Outcome::Success(5));
        assert_eq!(ready(&r).await, vec![(3, spares), (4, 0), (5, spares)]);
        std::fs::write(&path, cfg(9)).unwrap();
        assert_eq!(r.reload(Trigger::Admin).await, Outcome::Success(6));
        assert_eq!(ready(&r).await, vec![(4, 0), (5, 0), (6, spares)]);
    }

    #[test]
    fn watch_relevance() {
        let w = Watched {
            config: PathBuf::from("/etc/weir/weir.toml"),
            config_target: None,
            plugin_dirs: vec![PathBuf::from("/srv/plugins/guard")],
        };
        assert!(w.is_relevant(Path::new("/etc/weir/weir.toml")));
        assert!(w.is_relevant(Path::new("/etc/weir/..data")));
        assert!(!w.is_relevant(Path::new("/etc/weir/other.txt")));
        assert!(!w.is_relevant(Path::new("/etc/weir/weir.toml.swp")));
        assert!(w.is_relevant(Path::new("/srv/plugins/guard/plugin.lua")));
        assert!(!w.is_relevant(Path::new("/srv/plugins/guard/target/x.wasm")));
        assert!(!w.is_relevant(Path::new("/srv/plugins/guard/.git/index")));
        assert_eq!(line_of("TOML parse error at line 3, column 7"), Some(3));
        let msg = "plugin load failed: plugin 'guard': /p/guard/plugin.lua: syntax error: 11: Expected <eof>";
        assert_eq!(line_of(msg), Some(11));
        assert_eq!(file_of(msg).as_deref(), Some("/p/guard/plugin.lua"));
        assert_eq!(quoted_after(msg, "plugin '").as_deref(), Some("guard"));
    }
}
