//! The WASM plugin host (wasmtime component model), implementing
//! [`PluginRuntime`](super::contract::PluginRuntime).
