//! Weir's benchmark suite.
//!
//! Three binaries and one criterion bench live here:
//! - `mock-upstream`: a fast local upstream speaking the OpenAI and Anthropic dialects, JSON
//!   and server-sent events, with a configurable chunk count and per-chunk delay;
//! - `load`: a small load generator for streams (time to first byte and total time), which
//!   `wrk` cannot see;
//! - `suite`: the harness `bench/run.sh` runs: it starts the mock, nginx and Weir pinned to
//!   their CPUs, drives every scenario (hot reloads included), reads CPU time and RSS from
//!   `/proc`, and writes the table into `BENCHMARKS.md`;
//! - `benches/hot_path.rs`: criterion micro-benchmarks of request parsing, provider
//!   translation and SSE parsing and encoding.
//!
//! This library holds what the binaries share: the request bodies, the result shapes and
//! their tables, `/proc` readers, a small blocking HTTP client, and the hot-reload scenarios
//! (`reload`).

pub mod bodies;
pub mod http;
pub mod procfs;
pub mod reload;
pub mod report;
