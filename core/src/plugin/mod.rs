//! Plugins: the contract and the runtimes that host plugins.
pub mod contract;
pub mod wasm;
