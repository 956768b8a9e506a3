//! Tests of the WASM host.
