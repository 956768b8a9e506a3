//! Plugins: the contract, the two runtimes that host plugins, and the chain the pipeline calls.
//!
//! Where to start:
//! - [`contract`]: the hooks and decisions (plain Rust mirrors of `sdk/wit/weir.wit`) and the
//!   [`PluginRuntime`](contract::PluginRuntime) trait both runtimes implement;
//! - [`chain`]: what the pipeline calls: [`Plugins::load`] builds every configured instance,
//!   [`Plugins::chain`] picks the ordered chain of a model, and [`Chain`] runs its hooks,
//!   applying decisions, failure policies and circuit breakers;
//! - [`manifest`]: `plugin.toml`; [`config`]: the `[[plugins]]` entries of `weir.toml`;
//!   [`deps`]: the metadata keys plugins declare they provide and need, checked per chain;
//! - [`lua`] and [`wasm`]: the runtimes; [`host`]: the host API they share (state, metrics,
//!   logs, fetch);
//! - [`loads`]: what a generation keeps warm, given back when it stops serving;
//! - [`harness`] and [`scaffold`]: `weir plugin test` and `weir plugin new` ([`cli`]).
//!
//! ```text
//!  request --> on_request: plugin 1 -> plugin 2 -> ... (a reply ends the chain)
//!                     provider
//!  response <-- on_response / on_response_chunk: ... -> plugin 2 -> plugin 1 (reverse order)
//!  after the response: on_log (configured order, off the hot path)
//! ```

pub mod breaker;
pub mod chain;
pub mod cli;
pub mod config;
pub mod contract;
pub mod deps;
pub mod harness;
pub mod host;
pub mod loads;
pub mod lua;
pub mod manifest;
pub mod scaffold;
pub mod schema;
pub mod wasm;

use std::path::PathBuf;

pub use chain::{
    Chain, ChunkFilter, Flow, PluginFailure, Plugins, RESPONSE_HEADER_PREFIX, StreamStop,
    response_headers,
};
pub use config::PluginInstanceConfig;
pub use contract::{LogEntry, Reply};
pub use host::PluginMetrics;
pub use loads::Loads;

/// What plugins hold alive in this process, over every generation and thread: the numbers
/// that must come back to their level after old generations are dropped (admin status,
/// `reload.live`; tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Live {
    /// Lua plugin loads (one per instance per generation) not yet freed.
    pub lua_plugins: usize,
    /// Lua VMs: spares, thread pools and calls in progress.
    pub lua_vms: usize,
    /// WASM plugin loads not yet freed.
    pub wasm_plugins: usize,
    /// WASM instances (stores): idle in pools and calls in progress.
    pub wasm_instances: usize,
}

/// The current [`Live`] counts.
pub fn live() -> Live {
    let (lua_vms, lua_plugins) = lua::live();
    let (wasm_instances, wasm_plugins) = wasm::live();
    Live {
        lua_plugins,
        lua_vms,
        wasm_plugins,
        wasm_instances,
    }
}

/// Error loading plugins. Every variant names the plugin or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `plugin.toml` is invalid.
    #[error("{}: {key}: {reason}", file.display())]
    Manifest {
        /// The manifest file.
        file: PathBuf,
        /// Dotted key (`limits.memory_mb`); empty for a syntax error.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A plugin instance entry in `weir.toml` is invalid (bad name, config that fails the
    /// plugin's schema, duplicate instance).
    #[error("{key}: {reason}")]
    Config {
        /// Dotted key in `weir.toml` (`models[0].plugins[1].config.phrases`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The plugin's code could not be loaded (syntax error, bad component) or its `init`
    /// rejected the config.
    #[error("plugin '{plugin}': {reason}")]
    Load {
        /// Instance name.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
    /// The metrics could not be registered.
    #[error("plugin metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
