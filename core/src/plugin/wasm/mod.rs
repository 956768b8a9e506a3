//! The WASM plugin host: wasmtime's component model running `wasm32-wasip2` components
//! built against `sdk/wit/weir.wit`, implementing [`PluginRuntime`].
//!
//! Start with [`WasmPlugin::load`]. The pieces:
//! - [`WasmEngine`] (`engine.rs`): one engine for all plugins, with epoch interruption (a
//!   ticker thread advances the epoch every millisecond), the pooling allocator, a 512 KiB
//!   wasm stack and compiled components cached by content hash.
//! - `store.rs`: per-instance data: the memory limiter, the `weir:plugin/host` imports
//!   backed by the plugin's [`HostApi`], and a WASI context that grants nothing but
//!   randomness (no preopened directories, environment, network, stdio or clocks; calls to
//!   any other WASI function trap).
//! - [`WasmPlugin`] (here): an `InstancePre` plus a pool of ready instances. Each call takes
//!   an instance from the pool (or instantiates one and runs `init(config)`), arms the
//!   epoch deadline for the hook, runs it, and returns the instance to the pool. An
//!   instance whose call failed (trap, panic, timeout, out of memory) is dropped, never
//!   reused.

mod engine;
mod store;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Store, Trap};

pub use engine::{EPOCH_TICK, EngineOptions, MAX_MEMORY_BYTES, MAX_WASM_STACK, WasmEngine};

use crate::plugin::contract::{
    AdminRequest, AdminResponse, ChunkAction, Decision, Hook, HookCtx, HookError, HostApi,
    LogEntry, PluginRuntime, RequestView, ResponseDecision, ResponseView, StreamEvent,
};
use crate::plugin::loads::{self, Warm};
use store::StoreState;

/// Host bindings generated from the contract; the hook types are the ones in
/// [`crate::plugin::contract`], so the WIT and the Rust types are checked against each
/// other at compile time.
#[allow(missing_docs, clippy::all)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "plugin",
        with: {
            "weir:plugin/types": super::types,
            "weir:plugin/views.request": super::RequestHandle,
        },
    });
}

/// The host side of the WIT `request` resource. Only one request is under a hook at a
/// time, so a handle carries no data: its methods read the [`RequestView`] moved into the
/// store for the call, and the guest only ever holds it as a borrow for that call.
#[doc(hidden)]
#[derive(Debug)]
pub struct RequestHandle;

/// The contract this host speaks; components built against another version are refused
/// at load with a message saying how to rebuild.
pub const CONTRACT: &str = "weir:plugin@0.2.0";

/// The `weir:plugin/types` interface as `bindgen!` expects a remapped interface to look:
/// the contract types, plus the (empty) host trait and linker function of an interface
/// that has no functions.
#[doc(hidden)]
pub mod types {
    pub use crate::plugin::contract::*;

    /// Host side of `weir:plugin/types`: nothing to implement.
    pub trait Host {}

    impl<T: ?Sized> Host for T {}

    /// Host side of `weir:plugin/types` with store access: nothing to implement.
    pub trait HostWithStore<T>: wasmtime::component::HasData {}

    impl<T, D: wasmtime::component::HasData> HostWithStore<T> for D {}

    /// `weir:plugin/types` has no functions, so there is nothing to link.
    pub fn add_to_linker<T, D>(
        _linker: &mut wasmtime::component::Linker<T>,
        _host_getter: fn(&mut T) -> D::Data<'_>,
    ) -> wasmtime::Result<()>
    where
        D: HostWithStore<T>,
    {
        Ok(())
    }
}

use bindings::{Plugin, PluginPre};

/// Errors loading a WASM plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WasmError {
    /// The engine could not be built.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The plugin file could not be read.
    #[error("read {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The bytes are not a valid component.
    #[error("compile: {0}")]
    Compile(String),
    /// The component does not match the `weir:plugin/plugin` world.
    #[error("link: {0}")]
    Link(String),
    /// `init(config)` failed or trapped.
    #[error("init: {0}")]
    Init(String),
}

/// Resource limits for one WASM plugin (from its manifest's `[limits]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmLimits {
    /// Linear memory cap per instance (default 32 MiB, at most [`MAX_MEMORY_BYTES`]).
    pub memory_bytes: usize,
    /// CPU deadline of `on-request` and `on-response` (default 5 ms).
    pub request_deadline: Duration,
    /// CPU deadline of `on-response-chunk` (default 2 ms).
    pub chunk_deadline: Duration,
    /// CPU deadline of `on-log`, which runs off the hot path (default 50 ms).
    pub log_deadline: Duration,
    /// Deadline for instantiating and running `init` (default 200 ms).
    pub init_deadline: Duration,
    /// Extra deadline per MiB of a hook's input (manifest `deadline_per_mib_ms`); the chain
    /// passes the scaled deadline of each call in `HookCtx::deadline`.
    pub deadline_per_mib: Duration,
    /// Ceiling of a scaled deadline (manifest `max_deadline_ms`).
    pub max_deadline: Duration,
    /// Ready instances kept for reuse (default: twice the CPU count). More may exist
    /// briefly under load; extras are dropped when returned.
    pub max_idle_instances: usize,
}

impl Default for WasmLimits {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            memory_bytes: 32 << 20,
            request_deadline: Duration::from_millis(5),
            chunk_deadline: Duration::from_millis(2),
            log_deadline: Duration::from_millis(50),
            init_deadline: Duration::from_millis(200),
            deadline_per_mib: crate::plugin::manifest::Limits::default().deadline_per_mib,
            max_deadline: crate::plugin::manifest::Limits::default().max_deadline,
            max_idle_instances: cpus * 2,
        }
    }
}

impl WasmLimits {
    /// The deadline of `hook`.
    pub fn deadline(&self, hook: Hook) -> Duration {
        match hook {
            Hook::Init => self.init_deadline,
            Hook::OnRequest | Hook::OnResponse => self.request_deadline,
            Hook::OnResponseChunk => self.chunk_deadline,
            Hook::OnLog => self.log_deadline,
            Hook::Admin => self
                .log_deadline
                .max(crate::plugin::manifest::ADMIN_DEADLINE),
        }
    }
}

/// Epoch ticks for a deadline: rounded up, plus one because the current tick has already
/// partly elapsed.
fn ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_micros().max(1);
    let n = deadline.as_micros().div_ceil(tick);
    u64::try_from(n).unwrap_or(u64::MAX).saturating_add(1)
}

/// Instances (stores) and WASM plugin loads alive in the process: what a reload must give
/// back (see [`live`]).
static LIVE_INSTANCES: AtomicUsize = AtomicUsize::new(0);
static LIVE_PLUGINS: AtomicUsize = AtomicUsize::new(0);

/// WASM instances and WASM plugin loads alive in this process, all generations together.
pub fn live() -> (usize, usize) {
    (
        LIVE_INSTANCES.load(Ordering::Relaxed),
        LIVE_PLUGINS.load(Ordering::Relaxed),
    )
}

/// An instance ready to run a hook.
struct Ready {
    store: Store<StoreState>,
    plugin: Plugin,
}

impl Ready {
    fn new(store: Store<StoreState>, plugin: Plugin) -> Ready {
        LIVE_INSTANCES.fetch_add(1, Ordering::Relaxed);
        Ready { store, plugin }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        LIVE_INSTANCES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A loaded WASM plugin: a pre-linked component and a pool of initialized instances.
pub struct WasmPlugin {
    inner: Arc<Inner>,
}

/// The plugin itself, shared with the generation's [`Loads`](crate::plugin::Loads).
struct Inner {
    name: String,
    engine: WasmEngine,
    /// Keeps the engine's in-memory compile cache entry alive while this plugin is loaded.
    _component: Arc<Component>,
    pre: PluginPre<StoreState>,
    config_json: String,
    limits: WasmLimits,
    host: Arc<dyn HostApi>,
    idle: Mutex<Vec<Ready>>,
    /// Set while the generation holding this load is not serving ([`Warm::park`]): at most
    /// one instance stays idle.
    parked: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        LIVE_PLUGINS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("name", &self.inner.name)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Warm for Inner {
    fn park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        let idle = std::mem::take(&mut *self.lock_idle());
        drop(idle);
    }

    fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
        if !self.lock_idle().is_empty() {
            return;
        }
        match self.instantiate() {
            Ok(ready) => self.release(ready),
            Err(err) => {
                tracing::warn!(plugin = %self.name, error = %err, "WASM plugin instantiation failed; the first call will try again.");
            }
        }
    }
    fn ready(&self) -> usize {
        self.lock_idle().len()
    }
}

impl WasmPlugin {
    /// Compiles (or reuses the cached compilation of) `wasm`, links it against the host
    /// API, and creates a first instance with `init(config_json)`, so a bad component or
    /// a config the plugin rejects fails here, at load, not on the first request.
    ///
    /// `host` backs the plugin's host imports (key-value namespaced by plugin name,
    /// metrics, logs, fetch); `name` labels logs and errors.
    pub fn load(
        engine: &WasmEngine,
        name: &str,
        wasm: &[u8],
        config_json: &str,
        limits: WasmLimits,
        host: Arc<dyn HostApi>,
    ) -> Result<WasmPlugin, WasmError> {
        let component = engine.compile(wasm)?;
        check_contract(&component, engine.engine())?;
        let mut linker = Linker::new(engine.engine());
        store::add_to_linker(&mut linker).map_err(|e| WasmError::Link(format!("{e:#}")))?;
        // Every import not granted above (filesystem, sockets, stdio, clocks...) traps
        // when called: the sandbox is "nothing but the host API".
        store::stub_denied_imports(&mut linker, &component, engine.engine())
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        // A component that imports nothing of the host (so `check_contract` saw no version)
        // but was built against another contract fails here, on its exports' types.
        let pre = PluginPre::new(instance_pre).map_err(|e| {
            WasmError::Link(format!(
                "{e:#} (is the component built against {CONTRACT}? see docs/plugins.md, \
                 \"Migrating from 0.1\")"
            ))
        })?;
        let limits = WasmLimits {
            memory_bytes: limits.memory_bytes.min(MAX_MEMORY_BYTES),
            ..limits
        };
        LIVE_PLUGINS.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            engine: engine.clone(),
            _component: component,
            pre,
            config_json: config_json.to_owned(),
            limits,
            host,
            idle: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
        });
        let first = inner
            .instantiate()
            .map_err(|e| WasmError::Init(e.to_string()))?;
        inner.release(first);
        let load: Weak<dyn Warm> = Arc::downgrade(&inner) as Weak<Inner>;
        loads::loaded(load);
        Ok(WasmPlugin { inner })
    }

    /// [`WasmPlugin::load`] from a file (a plugin folder's `plugin.wasm`).
    pub fn load_file(
        engine: &WasmEngine,
        name: &str,
        path: &Path,
        config_json: &str,
        limits: WasmLimits,
        host: Arc<dyn HostApi>,
    ) -> Result<WasmPlugin, WasmError> {
        let wasm = std::fs::read(path).map_err(|e| WasmError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::load(engine, name, &wasm, config_json, limits, host)
    }

    /// The limits this plugin runs under.
    pub fn limits(&self) -> &WasmLimits {
        &self.inner.limits
    }

    /// Ready instances currently pooled (for tests and metrics).
    pub fn idle_instances(&self) -> usize {
        self.inner.lock_idle().len()
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Ready>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh instance with `init(config)` done.
    fn instantiate(&self) -> Result<Ready, HookError> {
        let mut store = Store::new(
            self.engine.engine(),
            StoreState::new(Arc::clone(&self.host), self.limits.memory_bytes),
        );
        store.limiter(|state| state);
        // At the deadline: time the hook spent blocked on a shared state store (Redis) is
        // not CPU time, so it moves the deadline; otherwise the hook is interrupted.
        store.epoch_deadline_callback(|_| {
            let blocked = crate::state::take_blocked();
            if blocked.is_zero() {
                Err(Trap::Interrupt.into())
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(ticks(blocked)))
            }
        });
        let deadline = self.limits.init_deadline;
        store.set_epoch_deadline(ticks(deadline));
        let plugin = self.pre.instantiate(&mut store).map_err(|e| {
            let err = classify(e, store.data().out_of_memory, deadline);
            HookError::Unavailable(err.to_string())
        })?;
        match plugin.call_init(&mut store, &self.config_json) {
            Ok(Ok(())) => Ok(Ready::new(store, plugin)),
            Ok(Err(message)) => Err(HookError::Plugin(format!("init: {message}"))),
            Err(e) => Err(classify(e, store.data().out_of_memory, deadline)),
        }
    }

    /// Pools a healthy instance, up to `max_idle_instances` (1 while parked).
    fn release(&self, ready: Ready) {
        let keep = if self.parked.load(Ordering::Relaxed) {
            1
        } else {
            self.limits.max_idle_instances
        };
        let mut idle = self.lock_idle();
        let extra = if idle.len() < keep {
            idle.push(ready);
            None
        } else {
            Some(ready)
        };
        drop(idle);
        drop(extra);
    }

    /// Runs one hook on a pooled instance; a failed instance is dropped.
    fn call<R>(
        &self,
        hook: Hook,
        ctx: &mut HookCtx<'_>,
        run: impl FnOnce(&Plugin, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, HookError> {
        let pooled = self.lock_idle().pop();
        let mut ready = match pooled {
            Some(ready) => ready,
            None => self.instantiate().inspect_err(|err| {
                tracing::warn!(plugin = %self.name, error = %err, "WASM plugin instantiation failed.");
            })?,
        };
        let deadline = ctx.deadline.unwrap_or_else(|| self.limits.deadline(hook));
        ready.store.set_epoch_deadline(ticks(deadline));
        // The request's bag and the plugin's scratch move into the store for the call
        // (ctx-get / ctx-set, scratch-get / scratch-set) and back.
        let data = ready.store.data_mut();
        std::mem::swap(&mut data.metadata, ctx.metadata);
        std::mem::swap(&mut data.scratch, ctx.scratch);
        let result = run(&ready.plugin, &mut ready.store);
        let data = ready.store.data_mut();
        std::mem::swap(&mut data.metadata, ctx.metadata);
        std::mem::swap(&mut data.scratch, ctx.scratch);
        match result {
            Ok(value) => {
                self.release(ready);
                Ok(value)
            }
            Err(e) => {
                let err = classify(e, ready.store.data().out_of_memory, deadline);
                tracing::warn!(
                    plugin = %self.name,
                    request_id = %ctx.request_id,
                    hook = hook.as_str(),
                    kind = err.kind(),
                    error = %err,
                    "WASM plugin call failed; instance discarded."
                );
                Err(err)
            }
        }
    }
}

/// Maps a wasmtime error to the failure kinds the chain counts.
fn classify(err: wasmtime::Error, out_of_memory: bool, deadline: Duration) -> HookError {
    if out_of_memory {
        return HookError::OutOfMemory;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => HookError::Timeout {
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
        },
        Some(trap) => HookError::Trap(trap.to_string()),
        None => HookError::Trap(format!("{err:#}")),
    }
}

impl PluginRuntime for WasmPlugin {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn on_request(
        &self,
        ctx: &mut HookCtx<'_>,
        req: &mut RequestView,
    ) -> Result<Decision, HookError> {
        self.inner.call(Hook::OnRequest, ctx, |plugin, store| {
            // The view moves into the store for the call; the guest reads it through a
            // borrowed `request` handle.
            std::mem::swap(&mut store.data_mut().request, req);
            let handle = wasmtime::component::Resource::<RequestHandle>::new_borrow(0);
            let result = plugin.call_on_request(&mut *store, handle);
            std::mem::swap(&mut store.data_mut().request, req);
            result
        })
    }

    fn on_response(
        &self,
        ctx: &mut HookCtx<'_>,
        resp: &ResponseView,
    ) -> Result<ResponseDecision, HookError> {
        self.inner.call(Hook::OnResponse, ctx, |plugin, store| {
            plugin.call_on_response(store, resp)
        })
    }

    fn on_chunk(
        &self,
        ctx: &mut HookCtx<'_>,
        event: &StreamEvent,
    ) -> Result<ChunkAction, HookError> {
        self.inner
            .call(Hook::OnResponseChunk, ctx, |plugin, store| {
                plugin.call_on_response_chunk(store, event)
            })
    }

    fn on_log(&self, ctx: &mut HookCtx<'_>, entry: &LogEntry) -> Result<(), HookError> {
        self.inner.call(Hook::OnLog, ctx, |plugin, store| {
            plugin.call_on_log(store, entry)
        })
    }

    fn admin(&self, ctx: &mut HookCtx<'_>, req: &AdminRequest) -> Result<AdminResponse, HookError> {
        self.inner.call(Hook::Admin, ctx, |plugin, store| {
            plugin.call_admin(store, req)
        })
    }
}

/// Refuses a component built against another version of the contract, with a message
/// that says what to do (its imports name the package version it was built with).
fn check_contract(component: &Component, engine: &wasmtime::Engine) -> Result<(), WasmError> {
    for (name, _) in component.component_type().imports(engine) {
        let Some(rest) = name.strip_prefix("weir:plugin/") else {
            continue;
        };
        let version = rest.split_once('@').map_or("", |(_, v)| v);
        if !version.starts_with("0.2.") {
            return Err(WasmError::Link(format!(
                "the component was built against weir:plugin@{version}, but this gateway \
                 speaks {CONTRACT}: rebuild it with weir-sdk 0.2 (see docs/plugins.md, \
                 \"Migrating from 0.1\")"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
