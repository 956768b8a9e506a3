//! The Lua plugin host: Luau scripts through mlua, implementing [`PluginRuntime`].
//!
//! # Why Luau
//! Luau (Roblox's Lua) is built to run untrusted scripts, which is exactly a gateway's
//! situation, and every safety property we need is a feature of the VM rather than something
//! we strip out by hand:
//! - `sandbox()`: libraries, built-in metatables and globals become read-only, each script
//!   writes into its own environment; no `io`, no `os.execute`, no `debug` introspection of
//!   the host, no file-system `require` (we also remove mlua's `require` and `loadstring`).
//! - No bytecode loading from scripts: the only loader left (`loadstring`, which we remove
//!   anyway) compiles *source*, so malformed bytecode can never reach the interpreter.
//! - An interrupt callback that the VM calls at every loop back-edge and function call, so a
//!   CPU deadline can be enforced without a debug hook's per-instruction cost, and an error
//!   raised there is re-raised at the very next check (we make it *sticky*), so a script cannot
//!   `pcall` its way past its deadline.
//! - An allocator with a hard limit (`set_memory_limit`): a `string.rep` bomb fails with a
//!   memory error instead of taking the process down.
//! - It is fast (a call with a prepared table is ~0.2 us) and gradual typing gives plugin
//!   authors checks and completion (see `sdk/lua/weir.d.lua`).
//!
//! Lua 5.4 could be locked down too, but by deleting globals one by one and with
//! `load(..., "t")` discipline everywhere; getting one of those wrong is a sandbox escape.
//!
//! # Instances
//! One VM per plugin per worker thread: a thread-local pool keyed by the plugin's load id, so
//! a hook call never takes a lock and never waits for another thread.
//!
//! Building a VM (loading the bytecode compiled once at load, running `init(config)`) costs
//! about 0.5 ms on an idle machine (plus whatever `init` does), and tens of ms on a thread
//! that competes with request traffic: too much to spend inside a hook's deadline. So it
//! happens at load, off the request path: [`LuaPlugin::load`] builds one spare VM per
//! async worker thread (`TOKIO_WORKER_THREADS`, else the CPU count, at most
//! [`MAX_SPARE_VMS`]; the VM that validates the script is the first of them). A thread's
//! first call takes a spare (one short lock per thread per load) and keeps it in its pool;
//! only a thread beyond the spares builds one inside its first call. Any failure (Lua error, timeout, out of memory, malformed
//! decision) drops that VM; the thread's next call takes another spare or builds one. The
//! deadline is armed per call, so a VM built ahead of time runs under the same budget.
//!
//! `on_log` runs off the request path, on threads that are not the async workers (the
//! pipeline's `on_log` threads, or tokio's blocking pool when their queue is full): its VMs
//! are kept in a small pool of the plugin instead (built there on demand, at most one idle
//! per spare), so that those threads do not each keep a VM of every plugin of every
//! generation.
//!
//! Spares nobody claimed are freed with the plugin (the last snapshot holding it). When the
//! generation holding the plugin stops serving (a reload; see [`super::loads`]), it is
//! *parked*: its spares and pooled VMs are freed at once, and threads drop its VMs from their
//! pools the next time they return a VM. Calls still made on it (a stream that started
//! before the reload) share one pooled VM. A rollback unparks it, building its spares again.
//! VMs of a plugin that was unloaded are dropped the next time a thread returns a VM, or when
//! the thread exits.
//!
//! Plugins must not rely on VM-local globals across requests: each worker thread has its
//! own VM. Shared state goes through `weir.kv`.
//!
//! # Known limit
//! The deadline interrupts Lua code, not a single long C call: a pathological
//! `string.find` pattern on a large string runs to completion. The memory cap bounds the
//! strings such a call can see.

mod convert;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use mlua::chunk::{ChunkMode, Compiler};
use mlua::{Function, Lua, LuaOptions, LuaSerdeExt, LuaString, StdLib, Table, Value, VmState};

use super::PluginError;
use super::contract::{
    AdminRequest, AdminResponse, ChunkAction, Decision, FetchRequest, Hook, HookCtx, HookError,
    HostApi, LogEntry, LogLevel, Mutations, PluginRuntime, RequestView, ResponseDecision,
    ResponseMutations, ResponseView, StreamEvent,
};
use super::loads::{self, Warm};
use super::manifest::{Hooks, Limits, Manifest};

/// The Lua half of the `weir` global.
const PRELUDE: &str = include_str!("prelude.luau");

/// Message of the error raised at the deadline (and at every interrupt after it).
const DEADLINE_MESSAGE: &str = "weir: plugin deadline exceeded";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Lua VMs alive in the process (built and not yet dropped), and Lua plugin loads alive:
/// what a reload must give back (see [`live`]).
static LIVE_VMS: AtomicUsize = AtomicUsize::new(0);
static LIVE_PLUGINS: AtomicUsize = AtomicUsize::new(0);

/// Lua VMs and Lua plugin loads alive in this process, all generations and threads together.
pub fn live() -> (usize, usize) {
    (
        LIVE_VMS.load(Ordering::Relaxed),
        LIVE_PLUGINS.load(Ordering::Relaxed),
    )
}

/// Most spare VMs a load builds. Each holds about 0.5 MiB (mostly the prelude and the
/// `weir` API) and takes about 0.5 ms to build.
pub const MAX_SPARE_VMS: usize = 16;

/// Spare VMs to build at load: one per async worker thread, as tokio counts them
/// (`TOKIO_WORKER_THREADS`, else the CPU count), at least 1, at most [`MAX_SPARE_VMS`].
pub(crate) fn default_spares() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .clamp(1, MAX_SPARE_VMS)
}

/// A loaded Lua plugin.
pub struct LuaPlugin {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LuaPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaPlugin")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// Everything a thread needs to build a VM of this plugin.
struct Shared {
    /// Unique per load: a reload gets fresh VMs.
    id: u64,
    name: String,
    bytecode: Vec<u8>,
    config: serde_json::Value,
    hooks: Hooks,
    limits: Limits,
    host: Arc<dyn HostApi>,
    /// How many VMs were built (tests and diagnostics).
    vms_created: AtomicU64,
    /// Spare VMs kept ready while serving: built at load, and again by `unpark`.
    spare_target: usize,
    /// VMs built at load that no thread has claimed yet (`Vm` is `Send`: mlua's `send`
    /// feature). Freed with the plugin, or when it is parked.
    spares: Mutex<Vec<Vm>>,
    /// VMs of calls that do not keep one in a thread's pool: `on_log` (it runs on threads
    /// other than the async workers) and every call while parked. At most `spare_target`
    /// idle (1 while parked).
    shared_pool: Mutex<Vec<Vm>>,
    /// Set while the generation holding this load is not serving ([`Warm::park`]). Thread
    /// pool slots hold a clone, so that they drop this load's VMs.
    parked: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        LIVE_PLUGINS.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock(vms: &Mutex<Vec<Vm>>) -> std::sync::MutexGuard<'_, Vec<Vm>> {
    vms.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }

    /// Builds spares until there are `spare_target`; stops at the first failure (the script
    /// validated once: a later `init` failing, e.g. a deadline missed on a busy machine, is
    /// not worth failing for: threads without a spare build their VM on first call).
    fn fill_spares(&self) {
        let mut have = lock(&self.spares).len();
        while have < self.spare_target {
            match Vm::new(self) {
                Ok(vm) => {
                    let mut spares = lock(&self.spares);
                    spares.push(vm);
                    have = spares.len();
                }
                Err(e) => {
                    tracing::warn!(
                        plugin = %self.name,
                        built = have,
                        error = %e,
                        "Building a spare Lua VM failed; the rest are built on first use."
                    );
                    break;
                }
            }
        }
    }
}

impl Warm for Shared {
    fn park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        // Dropped outside the locks.
        let spares = std::mem::take(&mut *lock(&self.spares));
        let pooled = std::mem::take(&mut *lock(&self.shared_pool));
        drop((spares, pooled));
    }

    fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
        self.fill_spares();
    }

    fn ready(&self) -> usize {
        lock(&self.spares).len() + lock(&self.shared_pool).len()
    }
}

/// The per-VM deadline, shared between the hook caller and the interrupt callback.
struct Deadline {
    origin: Instant,
    /// Nanoseconds since `origin` at which the running hook must stop; `u64::MAX` = none.
    at: AtomicU64,
    /// Set once the deadline passed; every interrupt errors until the hook returns.
    expired: AtomicBool,
}

impl Deadline {
    fn new() -> Self {
        Deadline {
            origin: Instant::now(),
            at: AtomicU64::new(u64::MAX),
            expired: AtomicBool::new(false),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn arm(&self, budget: Duration) {
        self.expired.store(false, Ordering::Relaxed);
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        self.at
            .store(self.now_ns().saturating_add(budget), Ordering::Relaxed);
    }

    fn disarm(&self) -> bool {
        self.at.store(u64::MAX, Ordering::Relaxed);
        self.expired.load(Ordering::Relaxed)
    }

    /// Moves the deadline later, e.g. by the time a host call (fetch) spent waiting.
    fn extend(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let at = self.at.load(Ordering::Relaxed);
        if at != u64::MAX {
            self.at.store(at.saturating_add(by), Ordering::Relaxed);
        }
    }

    fn check(&self) -> bool {
        if self.expired.load(Ordering::Relaxed) {
            return true;
        }
        // Time this thread spent blocked on a shared state store is not CPU time either.
        let blocked = crate::state::take_blocked();
        if !blocked.is_zero() {
            self.extend(blocked);
        }
        if self.now_ns() >= self.at.load(Ordering::Relaxed) {
            self.expired.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }
}

use convert::CallState;

/// One Lua state with its hook functions resolved.
struct Vm {
    lua: Lua,
    deadline: Arc<Deadline>,
    on_request: Option<Function>,
    on_response: Option<Function>,
    on_response_chunk: Option<Function>,
    on_log: Option<Function>,
    admin: Option<Function>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        LIVE_VMS.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Slot {
    id: u64,
    owner: Weak<Shared>,
    parked: Arc<AtomicBool>,
    vm: Vm,
}

impl Slot {
    /// Whether its plugin is loaded and serving; other slots are dropped.
    fn is_serving(&self) -> bool {
        self.owner.strong_count() > 0 && !self.parked.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// This thread's VMs, one per loaded Lua plugin.
    static POOL: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// The Luau compiler settings for plugin code (optimization level 2: inlining and the like;
/// debug info kept for line numbers in error messages).
fn compiler() -> Compiler {
    Compiler::new().set_optimization_level(2).set_debug_level(1)
}

fn prelude_bytecode() -> Result<&'static [u8], String> {
    static PRELUDE_BC: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    PRELUDE_BC
        .get_or_init(|| compiler().compile(PRELUDE).map_err(|e| e.to_string()))
        .as_deref()
        .map_err(Clone::clone)
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        mlua::Error::RuntimeError(m) => m.contains("not enough memory"),
        _ => false,
    }
}

/// Maps a Lua error to the contract's failure kinds.
fn classify(e: &mlua::Error, expired: bool, budget: Duration) -> HookError {
    if expired {
        HookError::Timeout {
            deadline_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        }
    } else if is_memory_error(e) {
        HookError::OutOfMemory
    } else {
        HookError::Trap(e.to_string())
    }
}

fn lua_level(level: &str) -> LogLevel {
    match level {
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "warn" | "warning" => LogLevel::Warn,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    }
}

fn bytes_arg(v: &Value, what: &str) -> mlua::Result<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(i) => Ok(i.to_string().into_bytes()),
        Value::Number(n) => Ok(n.to_string().into_bytes()),
        other => Err(mlua::Error::runtime(format!(
            "{what} must be a string, not {}",
            other.type_name()
        ))),
    }
}

fn opt_bytes(v: &Value, what: &str) -> mlua::Result<Option<Vec<u8>>> {
    match v {
        Value::Nil => Ok(None),
        v => bytes_arg(v, what).map(Some),
    }
}

fn host_err(e: String) -> mlua::Error {
    mlua::Error::runtime(e)
}

/// Installs the Rust half of the `weir` global (see `sdk/lua/weir.d.lua`).
fn install_weir(lua: &Lua, shared: &Shared, deadline: &Arc<Deadline>) -> mlua::Result<Table> {
    let weir = lua.create_table()?;
    weir.raw_set("plugin", shared.name.as_str())?;

    let kv = lua.create_table()?;
    let host = shared.host.clone();
    kv.raw_set(
        "get",
        lua.create_function(move |lua, key: String| match host.kv_get(&key) {
            Ok(Some(v)) => Ok(Value::String(convert::unmetered(lua, || {
                lua.create_string(v)
            })?)),
            Ok(None) => Ok(Value::Nil),
            Err(e) => Err(host_err(e)),
        })?,
    )?;
    let host = shared.host.clone();
    kv.raw_set(
        "set",
        lua.create_function(move |_, (key, value, ttl): (String, Value, Option<u64>)| {
            host.kv_set(&key, &bytes_arg(&value, "value")?, ttl)
                .map_err(host_err)
        })?,
    )?;
    let host = shared.host.clone();
    kv.raw_set(
        "incr",
        lua.create_function(
            move |_, (key, delta, ttl): (String, Option<i64>, Option<u64>)| {
                host.kv_incr(&key, delta.unwrap_or(1), ttl)
                    .map_err(host_err)
            },
        )?,
    )?;
    let host = shared.host.clone();
    kv.raw_set(
        "cas",
        lua.create_function(
            move |_, (key, expected, value, ttl): (String, Value, Value, Option<u64>)| {
                let expected = opt_bytes(&expected, "expected")?;
                let value = opt_bytes(&value, "value")?;
                host.kv_cas(&key, expected.as_deref(), value.as_deref(), ttl)
                    .map_err(host_err)
            },
        )?,
    )?;
    let host = shared.host.clone();
    kv.raw_set(
        "delete",
        lua.create_function(move |_, key: String| host.kv_delete(&key).map_err(host_err))?,
    )?;
    let host = shared.host.clone();
    kv.raw_set(
        "scan",
        lua.create_function(move |lua, (prefix, limit): (String, Option<usize>)| {
            let entries = host
                .kv_scan(&prefix, limit.unwrap_or(1000))
                .map_err(host_err)?;
            let out = lua.create_table_with_capacity(entries.len(), 0)?;
            for (k, v) in entries {
                let pair = lua.create_table_with_capacity(0, 2)?;
                pair.raw_set("key", k)?;
                pair.raw_set("value", lua.create_string(v)?)?;
                out.raw_push(pair)?;
            }
            Ok(out)
        })?,
    )?;
    weir.raw_set("kv", kv)?;

    let host = shared.host.clone();
    weir.raw_set(
        "log",
        lua.create_function(move |_, (level, message): (String, LuaString)| {
            host.log(lua_level(&level), &message.to_string_lossy());
            Ok(())
        })?,
    )?;
    let host = shared.host.clone();
    weir.raw_set(
        "counter",
        lua.create_function(move |_, (name, value): (String, Option<u64>)| {
            host.counter_add(&name, value.unwrap_or(1));
            Ok(())
        })?,
    )?;
    let host = shared.host.clone();
    weir.raw_set(
        "histogram",
        lua.create_function(move |_, (name, value): (String, f64)| {
            host.histogram_observe(&name, value);
            Ok(())
        })?,
    )?;
    let host = shared.host.clone();
    weir.raw_set(
        "now_ms",
        lua.create_function(move |_, ()| Ok(host.now_ms()))?,
    )?;
    let host = shared.host.clone();
    weir.raw_set(
        "count_tokens",
        lua.create_function(move |_, text: LuaString| {
            Ok(host.count_tokens(&text.to_string_lossy()))
        })?,
    )?;
    weir.raw_set(
        "ctx_get",
        lua.create_function(|lua, key: String| {
            let state = lua
                .app_data_ref::<CallState>()
                .ok_or_else(|| mlua::Error::runtime("no request context"))?;
            match state.bag.get(&key) {
                Some(v) => convert::unmetered(lua, || lua.create_string(v)).map(Some),
                None => Ok(None),
            }
        })?,
    )?;
    weir.raw_set(
        "ctx_set",
        lua.create_function(|lua, (key, value): (String, Value)| {
            let value = String::from_utf8_lossy(&bytes_arg(&value, "value")?).into_owned();
            let mut state = lua
                .app_data_mut::<CallState>()
                .ok_or_else(|| mlua::Error::runtime("no request context"))?;
            state.bag.insert(key, value);
            Ok(())
        })?,
    )?;
    weir.raw_set(
        "scratch_get",
        lua.create_function(|lua, key: String| {
            let state = lua
                .app_data_ref::<CallState>()
                .ok_or_else(|| mlua::Error::runtime("no request context"))?;
            match state.scratch.get(&key) {
                Some(v) => convert::unmetered(lua, || lua.create_string(v)).map(Some),
                None => Ok(None),
            }
        })?,
    )?;
    weir.raw_set(
        "scratch_set",
        lua.create_function(|lua, (key, value): (String, Value)| {
            let value = opt_bytes(&value, "value")?;
            let mut state = lua
                .app_data_mut::<CallState>()
                .ok_or_else(|| mlua::Error::runtime("no request context"))?;
            match value {
                Some(v) => state.scratch.insert(key, v),
                None => state.scratch.remove(&key),
            };
            Ok(())
        })?,
    )?;

    let limit = lua.create_table()?;
    let host = shared.host.clone();
    limit.raw_set(
        "reserve",
        lua.create_function(
            move |lua, (key, max, window_ms, amount): (String, u64, u64, Option<u64>)| {
                let r = host
                    .limit_reserve(&key, max, window_ms, amount.unwrap_or(1))
                    .map_err(host_err)?;
                let t = lua.create_table_with_capacity(0, 5)?;
                t.raw_set("allowed", r.allowed)?;
                t.raw_set("limit", r.limit)?;
                t.raw_set("remaining", r.remaining)?;
                t.raw_set("retry_after_ms", r.retry_after_ms)?;
                t.raw_set("reset_ms", r.reset_ms)?;
                Ok(t)
            },
        )?,
    )?;
    let host = shared.host.clone();
    limit.raw_set(
        "settle",
        lua.create_function(
            move |_, (key, max, window_ms, reserved, used): (String, u64, u64, u64, u64)| {
                host.limit_settle(&key, max, window_ms, reserved, used)
                    .map_err(host_err)
            },
        )?,
    )?;
    weir.raw_set("limit", limit)?;

    let ledger = lua.create_table()?;
    fn balance_table(lua: &Lua, b: super::contract::LedgerBalance) -> mlua::Result<Table> {
        let t = lua.create_table_with_capacity(0, 2)?;
        t.raw_set("spent", b.spent)?;
        t.raw_set("reserved", b.reserved)?;
        Ok(t)
    }
    let host = shared.host.clone();
    ledger.raw_set(
        "reserve",
        lua.create_function(
            move |lua, (account, max, amount, ttl): (String, f64, f64, Option<u64>)| {
                let r = host
                    .ledger_reserve(&account, max, amount, ttl)
                    .map_err(host_err)?;
                let t = balance_table(lua, r.balance)?;
                t.raw_set("allowed", r.allowed)?;
                Ok(t)
            },
        )?,
    )?;
    let host = shared.host.clone();
    ledger.raw_set(
        "settle",
        lua.create_function(
            move |lua, (account, reserved, cost, ttl): (String, f64, f64, Option<u64>)| {
                let b = host
                    .ledger_settle(&account, reserved, cost, ttl)
                    .map_err(host_err)?;
                balance_table(lua, b)
            },
        )?,
    )?;
    let host = shared.host.clone();
    ledger.raw_set(
        "release",
        lua.create_function(move |lua, (account, reserved): (String, f64)| {
            let b = host.ledger_release(&account, reserved).map_err(host_err)?;
            balance_table(lua, b)
        })?,
    )?;
    let host = shared.host.clone();
    ledger.raw_set(
        "balance",
        lua.create_function(move |lua, account: String| {
            let b = host.ledger_balance(&account).map_err(host_err)?;
            balance_table(lua, b)
        })?,
    )?;
    weir.raw_set("ledger", ledger)?;

    let host = shared.host.clone();
    weir.raw_set(
        "target_stats",
        lua.create_function(move |lua, (provider, model): (String, String)| {
            let Some(s) = host.target_stats(&provider, &model) else {
                return Ok(None);
            };
            let t = lua.create_table_with_capacity(0, 4)?;
            t.raw_set("latency_ewma_ms", s.latency_ewma_ms)?;
            t.raw_set("error_rate", s.error_rate)?;
            t.raw_set("in_flight", s.in_flight)?;
            t.raw_set("attempts", s.attempts)?;
            Ok(Some(t))
        })?,
    )?;
    let host = shared.host.clone();
    weir.raw_set(
        "price",
        lua.create_function(move |lua, model: String| {
            let Some(p) = host.price(&model) else {
                return Ok(None);
            };
            let t = lua.create_table_with_capacity(0, 4)?;
            t.raw_set("input", p.input)?;
            t.raw_set("output", p.output)?;
            t.raw_set("cached_input", p.cached_input)?;
            t.raw_set("cache_write", p.cache_write)?;
            Ok(Some(t))
        })?,
    )?;

    let host = shared.host.clone();
    let dl = deadline.clone();
    weir.raw_set(
        "fetch",
        lua.create_function(move |lua, req: Table| {
            let headers = match req.raw_get::<Option<Table>>("headers")? {
                None => Vec::new(),
                Some(h) => h
                    .pairs::<String, String>()
                    .collect::<mlua::Result<Vec<_>>>()?,
            };
            let fetch = FetchRequest {
                method: req
                    .raw_get::<Option<String>>("method")?
                    .unwrap_or_else(|| "GET".to_owned()),
                url: req.raw_get("url")?,
                headers,
                body: opt_bytes(&req.raw_get::<Value>("body")?, "body")?.unwrap_or_default(),
                timeout_ms: req.raw_get::<Option<u32>>("timeout_ms")?.unwrap_or(0),
            };
            // Waiting on the network is not CPU time: the deadline moves by the wait.
            let started = Instant::now();
            let result = host.http_fetch(&fetch);
            dl.extend(started.elapsed());
            let resp = result.map_err(host_err)?;
            let out = lua.create_table()?;
            out.raw_set("status", resp.status)?;
            let h = lua.create_table()?;
            for (k, v) in resp.headers {
                h.raw_set(k, v)?;
            }
            out.raw_set("headers", h)?;
            out.raw_set("body", lua.create_string(resp.body)?)?;
            Ok(out)
        })?,
    )?;

    let host = shared.host.clone();
    weir.raw_set(
        "random_bytes",
        lua.create_function(move |lua, len: usize| {
            let bytes = host.random_bytes(len).map_err(host_err)?;
            lua.create_string(bytes)
        })?,
    )?;
    weir.raw_set(
        "sha256",
        lua.create_function(|lua, data: LuaString| {
            use sha2::Digest;
            let hex = hex::encode(sha2::Sha256::digest(&*data.as_bytes()));
            convert::unmetered(lua, || lua.create_string(hex))
        })?,
    )?;

    let json = lua.create_table()?;
    json.raw_set(
        "encode",
        lua.create_function(|lua, v: Value| {
            let json: serde_json::Value = lua.from_value(v)?;
            // As long as the table it encodes, which the script already holds.
            convert::unmetered(lua, || lua.create_string(json.to_string()))
        })?,
    )?;
    json.raw_set(
        "decode",
        lua.create_function(|lua, s: LuaString| {
            let json: serde_json::Value = serde_json::from_slice(&s.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("invalid JSON: {e}")))?;
            lua.to_value(&json)
        })?,
    )?;
    json.raw_set("canonical", lua.create_function(convert::canonical_json)?)?;
    json.raw_set("null", lua.null())?;
    weir.raw_set("json", json)?;
    Ok(weir)
}

impl Vm {
    /// Builds a VM: sandboxed standard library, `weir` global, the plugin's code, `init`.
    fn new(shared: &Shared) -> Result<Vm, HookError> {
        let deadline = Arc::new(Deadline::new());
        let budget = shared.limits.init_deadline;
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::UTF8 | StdLib::BIT | StdLib::MATH,
            LuaOptions::new(),
        )
        .map_err(|e| HookError::Unavailable(e.to_string()))?;
        let setup = (|| -> mlua::Result<()> {
            let globals = lua.globals();
            // mlua adds a file-system `require` and a source `loadstring`; `getfenv`/`setfenv`
            // reach other functions' environments; `print` would write to our stdout.
            for name in [
                "require",
                "loadstring",
                "getfenv",
                "setfenv",
                "gcinfo",
                "print",
            ] {
                globals.raw_set(name, Value::Nil)?;
            }
            let weir = install_weir(&lua, shared, &deadline)?;
            let prelude = prelude_bytecode().map_err(mlua::Error::runtime)?;
            lua.load(prelude)
                .set_mode(ChunkMode::Binary)
                .set_name("=weir-prelude")
                .call::<()>(&weir)?;
            globals.raw_set("weir", weir)?;
            lua.set_app_data(CallState::default());
            lua.sandbox(true)?;
            lua.set_memory_limit(shared.limits.memory_bytes)?;
            Ok(())
        })();
        setup.map_err(|e| HookError::Unavailable(e.to_string()))?;

        let dl = deadline.clone();
        let ticks = Cell::new(0u32);
        lua.set_interrupt(move |_| {
            // Reading the clock costs ~20 ns; loops interrupt every iteration, so look at it
            // every 16th time. Once expired, fail every time (sticky).
            if dl.expired.load(Ordering::Relaxed) {
                return Err(mlua::Error::runtime(DEADLINE_MESSAGE));
            }
            let n = ticks.get().wrapping_add(1);
            ticks.set(n);
            if n.is_multiple_of(16) && dl.check() {
                return Err(mlua::Error::runtime(DEADLINE_MESSAGE));
            }
            Ok(VmState::Continue)
        });

        deadline.arm(budget);
        let loaded = (|| -> mlua::Result<Vm> {
            let exports: Value = lua
                .load(&shared.bytecode)
                .set_mode(ChunkMode::Binary)
                .set_name(format!("={}", shared.name))
                .eval()?;
            // A script may `return { on_request = ..., init = ... }` or define globals.
            let scope = match exports {
                Value::Table(t) => t,
                _ => lua.globals(),
            };
            let get = |name: &str| scope.get::<Option<Function>>(name);
            if let Some(init) = get("init")? {
                let config = lua.to_value(&shared.config)?;
                init.call::<()>(config)?;
            }
            let (on_request, on_response, on_response_chunk, on_log, admin) = (
                get("on_request")?,
                get("on_response")?,
                get("on_response_chunk")?,
                get("on_log")?,
                get("admin")?,
            );
            // Counted here, where every VM is made; `Drop for Vm` uncounts it.
            LIVE_VMS.fetch_add(1, Ordering::Relaxed);
            Ok(Vm {
                on_request,
                on_response,
                on_response_chunk,
                on_log,
                admin,
                lua: lua.clone(),
                deadline: deadline.clone(),
            })
        })();
        let expired = deadline.disarm();
        let vm = loaded.map_err(|e| match classify(&e, expired, budget) {
            HookError::Trap(m) => HookError::Plugin(m),
            other => other,
        })?;
        if expired {
            return Err(classify(&mlua::Error::runtime(""), true, budget));
        }
        shared.vms_created.fetch_add(1, Ordering::Relaxed);
        Ok(vm)
    }

    fn function(&self, hook: Hook) -> Option<&Function> {
        match hook {
            Hook::Init => None,
            Hook::OnRequest => self.on_request.as_ref(),
            Hook::OnResponse => self.on_response.as_ref(),
            Hook::OnResponseChunk => self.on_response_chunk.as_ref(),
            Hook::OnLog => self.on_log.as_ref(),
            Hook::Admin => self.admin.as_ref(),
        }
    }
}

impl LuaPlugin {
    /// Compiles the plugin's script, builds a first VM (running `init(config)`), checks that
    /// every hook the manifest declares is defined, then builds the rest of the spare VMs
    /// (see the module docs, `# Instances`).
    pub fn load(
        manifest: &Manifest,
        instance: &str,
        config: serde_json::Value,
        host: Arc<dyn HostApi>,
    ) -> Result<LuaPlugin, PluginError> {
        Self::load_with_spares(manifest, instance, config, host, default_spares())
    }

    /// [`LuaPlugin::load`] with `spares` VMs built ahead (at least the validating one).
    fn load_with_spares(
        manifest: &Manifest,
        instance: &str,
        config: serde_json::Value,
        host: Arc<dyn HostApi>,
        spares: usize,
    ) -> Result<LuaPlugin, PluginError> {
        let load_err = |reason: String| PluginError::Load {
            plugin: instance.to_owned(),
            reason,
        };
        let source =
            std::fs::read_to_string(&manifest.entry).map_err(|source| PluginError::Io {
                path: manifest.entry.clone(),
                source,
            })?;
        let bytecode = compiler()
            .compile(&source)
            .map_err(|e| load_err(format!("{}: {e}", manifest.entry.display())))?;
        LIVE_PLUGINS.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: instance.to_owned(),
            bytecode,
            config,
            hooks: manifest.hooks,
            limits: manifest.limits,
            host,
            vms_created: AtomicU64::new(0),
            spare_target: spares.max(1),
            spares: Mutex::new(Vec::new()),
            shared_pool: Mutex::new(Vec::new()),
            parked: Arc::new(AtomicBool::new(false)),
        });
        let vm = Vm::new(&shared).map_err(|e| load_err(e.to_string()))?;
        for hook in [
            Hook::OnRequest,
            Hook::OnResponse,
            Hook::OnResponseChunk,
            Hook::OnLog,
            Hook::Admin,
        ] {
            let snake = hook.as_str().replace('-', "_");
            match (shared.hooks.has(hook), vm.function(hook).is_some()) {
                (true, false) => {
                    return Err(load_err(format!(
                        "plugin.toml declares {} but {} defines no function {snake}",
                        hook.as_str(),
                        manifest.entry.display()
                    )));
                }
                (false, true) => tracing::warn!(
                    plugin = instance,
                    hook = hook.as_str(),
                    "Hook defined but not declared in plugin.toml; it will not be called."
                ),
                _ => {}
            }
        }
        lock(&shared.spares).push(vm);
        shared.fill_spares();
        let load: Weak<dyn Warm> = Arc::downgrade(&shared) as Weak<Shared>;
        loads::loaded(load);
        Ok(LuaPlugin { shared })
    }

    /// How many VMs this plugin has built so far: the spares built at load, plus one per
    /// thread beyond them, plus one per failure.
    pub fn vms_created(&self) -> u64 {
        self.shared.vms_created.load(Ordering::Relaxed)
    }

    /// Spare VMs built at load and not yet claimed by a thread.
    pub fn spare_vms(&self) -> usize {
        self.shared
            .spares
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// This thread's pooled VM of this plugin, if it has one.
    fn take_local(&self) -> Option<Vm> {
        let id = self.shared.id;
        POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let i = pool.iter().position(|s| s.id == id)?;
            Some(pool.swap_remove(i).vm)
        })
        .ok()
        .flatten()
    }

    /// A VM for one call. `local` (a request-path hook of a serving plugin): this thread's
    /// pooled VM, else a spare built at load. Otherwise (`on_log`, or parked): one from the
    /// shared pool, else (parked) the one this thread kept from before. Else builds one.
    fn acquire(&self, local: bool) -> Result<Vm, HookError> {
        let found = if local {
            self.take_local()
                .or_else(|| lock(&self.shared.spares).pop())
        } else {
            let pooled = lock(&self.shared.shared_pool).pop();
            pooled.or_else(|| self.shared.is_parked().then(|| self.take_local()).flatten())
        };
        match found {
            Some(vm) => Ok(vm),
            None => Vm::new(&self.shared),
        }
    }

    /// Returns a healthy VM: to this thread's pool (`local`, and still serving), dropping
    /// VMs of plugins unloaded or parked since; else to the shared pool, up to its size.
    fn release(&self, vm: Vm, local: bool) {
        let parked = self.shared.is_parked();
        if local && !parked {
            let slot = Slot {
                id: self.shared.id,
                owner: Arc::downgrade(&self.shared),
                parked: self.shared.parked.clone(),
                vm,
            };
            let _ = POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                pool.retain(Slot::is_serving);
                pool.push(slot);
            });
            return;
        }
        let keep = if parked { 1 } else { self.shared.spare_target };
        let mut pooled = lock(&self.shared.shared_pool);
        let extra = if pooled.len() < keep {
            pooled.push(vm);
            None
        } else {
            Some(vm)
        };
        drop(pooled);
        drop(extra);
    }

    /// Runs one hook: VM from the pool, argument built, metadata bag swapped in, deadline
    /// armed, result parsed. Any error drops the VM.
    fn call<R>(
        &self,
        hook: Hook,
        ctx: &mut HookCtx<'_>,
        request: Option<&mut RequestView>,
        arg: impl FnOnce(&Lua) -> mlua::Result<Table>,
        parse: impl FnOnce(&Lua, Value) -> Result<R, String>,
    ) -> Result<R, HookError> {
        // `on_log` and `admin` run off the async workers: their VMs stay with the plugin,
        // not the thread.
        let local = !matches!(hook, Hook::OnLog | Hook::Admin) && !self.shared.is_parked();
        let vm = self.acquire(local)?;
        let budget = ctx
            .deadline
            .unwrap_or_else(|| self.shared.limits.deadline_of(hook));
        let Some(func) = vm.function(hook) else {
            return Err(HookError::Plugin(format!(
                "no function for {}",
                hook.as_str()
            )));
        };
        // The bag, the scratch and (for `on_request`) the request move into the VM for the
        // call and back: swaps, never copies, and one app-data lookup each way.
        let mut request = request;
        let swap = |vm: &Vm,
                    ctx: &mut HookCtx<'_>,
                    request: &mut Option<&mut RequestView>,
                    entering: bool| {
            if let Some(mut state) = vm.lua.app_data_mut::<CallState>() {
                std::mem::swap(&mut state.bag, ctx.metadata);
                std::mem::swap(&mut state.scratch, ctx.scratch);
                if let Some(req) = request.as_deref_mut() {
                    std::mem::swap(&mut state.request, req);
                    state.in_request = entering;
                }
            }
        };
        swap(&vm, ctx, &mut request, true);
        vm.deadline.arm(budget);
        let out = arg(&vm.lua).and_then(|t| func.call::<Value>(t));
        let expired = vm.deadline.disarm();
        swap(&vm, ctx, &mut request, false);
        let result = match out {
            Err(e) => Err(classify(&e, expired, budget)),
            Ok(_) if expired => Err(classify(&mlua::Error::runtime(""), true, budget)),
            Ok(v) => parse(&vm.lua, v).map_err(HookError::Plugin),
        };
        if result.is_ok() {
            self.release(vm, local);
        }
        result
    }
}

impl PluginRuntime for LuaPlugin {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn on_request(
        &self,
        ctx: &mut HookCtx<'_>,
        req: &mut RequestView,
    ) -> Result<Decision, HookError> {
        if !self.shared.hooks.on_request {
            return Ok(Decision::Continue(Mutations::default()));
        }
        self.call(
            Hook::OnRequest,
            ctx,
            Some(req),
            convert::request_table,
            convert::decision,
        )
    }

    fn on_response(
        &self,
        ctx: &mut HookCtx<'_>,
        resp: &ResponseView,
    ) -> Result<ResponseDecision, HookError> {
        if !self.shared.hooks.on_response {
            return Ok(ResponseDecision::Continue(ResponseMutations::default()));
        }
        self.call(
            Hook::OnResponse,
            ctx,
            None,
            |lua| convert::response_table(lua, resp),
            convert::response_decision,
        )
    }

    fn on_chunk(
        &self,
        ctx: &mut HookCtx<'_>,
        event: &StreamEvent,
    ) -> Result<ChunkAction, HookError> {
        if !self.shared.hooks.on_response_chunk {
            return Ok(ChunkAction::Pass);
        }
        self.call(
            Hook::OnResponseChunk,
            ctx,
            None,
            |lua| convert::event_table(lua, event),
            |_, v| convert::chunk_action(v),
        )
    }

    fn on_log(&self, ctx: &mut HookCtx<'_>, entry: &LogEntry) -> Result<(), HookError> {
        if !self.shared.hooks.on_log {
            return Ok(());
        }
        self.call(
            Hook::OnLog,
            ctx,
            None,
            |lua| convert::log_table(lua, entry),
            |_, _| Ok(()),
        )
    }

    fn admin(&self, ctx: &mut HookCtx<'_>, req: &AdminRequest) -> Result<AdminResponse, HookError> {
        if !self.shared.hooks.admin {
            return Err(HookError::Plugin("no admin hook".into()));
        }
        self.call(
            Hook::Admin,
            ctx,
            None,
            |lua| convert::admin_table(lua, req),
            convert::admin_response,
        )
    }
}

#[cfg(test)]
mod tests;
