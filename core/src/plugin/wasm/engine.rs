//! The one shared wasmtime [`Engine`]: epoch interruption driven by a ticker thread, the
//! pooling instance allocator, a 512 KiB wasm stack, and compiled components cached by
//! content hash (in memory for reloads, on disk across restarts via wasmtime's cache).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, OptLevel,
    PoolingAllocationConfig,
};

use super::WasmError;

/// How often the ticker thread advances the epoch; deadlines are counted in ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Largest linear memory any plugin may ask for in its manifest (the pooling allocator
/// reserves slots of this size).
pub const MAX_MEMORY_BYTES: usize = 256 << 20;

/// Wasm stack limit for every plugin (engine-wide in wasmtime).
pub const MAX_WASM_STACK: usize = 512 << 10;

/// Options for [`WasmEngine::new`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Directory for compiled artifacts keyed by content hash; `None` keeps them in
    /// memory only (still reused across reloads of this process).
    pub cache_dir: Option<PathBuf>,
    /// Component instances the pooling allocator pre-reserves (all plugins together).
    pub pool_instances: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            pool_instances: 512,
        }
    }
}

/// `$WEIR_WASM_CACHE`, else `$XDG_CACHE_HOME/weir/wasm`, else `$HOME/.cache/weir/wasm`.
fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WEIR_WASM_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&dir).join("weir/wasm"));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/weir/wasm"))
}

/// A shared engine handle (cheap to clone). Use [`WasmEngine::global`] in the gateway so
/// every generation of plugins shares one engine, ticker and compile cache.
#[derive(Clone)]
pub struct WasmEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    /// Compiled components by sha256 of their bytes, while some loaded plugin uses them: a
    /// reload of an unchanged plugin does not compile again. Held weakly, so that the code
    /// of a version no generation uses any more is freed (memory would otherwise grow with
    /// every new version of a plugin); the on-disk cache still spares a recompile.
    compiled: Mutex<HashMap<[u8; 32], Weak<Component>>>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine").finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// The process-wide engine with default options, built on first use.
    pub fn global() -> Result<WasmEngine, WasmError> {
        static GLOBAL: OnceLock<Result<WasmEngine, String>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| WasmEngine::new(&EngineOptions::default()).map_err(|e| e.to_string()))
            .clone()
            .map_err(WasmError::Engine)
    }

    /// Builds an engine and starts its epoch ticker thread (which stops when the last
    /// handle is dropped). Falls back to on-demand allocation if the pooling allocator
    /// cannot reserve its address space.
    pub fn new(options: &EngineOptions) -> Result<WasmEngine, WasmError> {
        let mut config = base_config(options)?;
        let mut pooling = PoolingAllocationConfig::default();
        let instances = options.pool_instances.max(1);
        pooling
            .total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(4))
            .total_memories(instances)
            .total_tables(instances.saturating_mul(4))
            .max_memory_size(MAX_MEMORY_BYTES);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(err) => {
                tracing::warn!(error = %err, "Pooling allocator unavailable; using on-demand allocation.");
                Engine::new(&base_config(options)?).map_err(|e| WasmError::Engine(e.to_string()))?
            }
        };
        spawn_ticker(&engine)?;
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                engine,
                compiled: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Compiles a component, or returns the one with the same content hash that a loaded
    /// plugin still holds. The caller keeps the `Arc` for as long as it uses the component.
    pub fn compile(&self, wasm: &[u8]) -> Result<Arc<Component>, WasmError> {
        let hash: [u8; 32] = Sha256::digest(wasm).into();
        let memo = || {
            self.inner
                .compiled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if let Some(component) = memo().get(&hash).and_then(Weak::upgrade) {
            return Ok(component);
        }
        let component = Arc::new(
            Component::new(&self.inner.engine, wasm)
                .map_err(|e| WasmError::Compile(format!("{e:#}")))?,
        );
        let mut compiled = memo();
        compiled.retain(|_, c| c.strong_count() > 0);
        compiled.insert(hash, Arc::downgrade(&component));
        Ok(component)
    }

    /// Compiled components held in memory (tests).
    pub fn compiled_in_memory(&self) -> usize {
        self.inner
            .compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|c| c.strong_count() > 0)
            .count()
    }
}

fn base_config(options: &EngineOptions) -> Result<Config, WasmError> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .cranelift_opt_level(OptLevel::Speed)
        // Compile on the calling (blocking) thread only: a reload must not take every
        // core away from requests in flight, whose plugin deadlines are wall-clock.
        .parallel_compilation(false);
    if let Some(dir) = &options.cache_dir {
        // wasmtime's cache keys artifacts by a hash of the wasm bytes, the compiler
        // version and its settings, and loads them without `unsafe` on our side.
        let mut cache_config = CacheConfig::new();
        cache_config.with_directory(dir);
        match Cache::new(cache_config) {
            Ok(cache) => {
                config.cache(Some(cache));
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "WASM compile cache disabled.");
            }
        }
    }
    Ok(config)
}

/// Advances the epoch every [`EPOCH_TICK`] until the engine is gone.
fn spawn_ticker(engine: &Engine) -> Result<(), WasmError> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("weir-wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(|_| ())
        .map_err(|e| WasmError::Engine(format!("spawn epoch ticker: {e}")))
}
