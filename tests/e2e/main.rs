//! End-to-end tests: the real `weir` binary against mock upstreams on loopback.
//!
//! Every test starts its own gateway ([`support::TestGateway`]) on a port from the OS and its
//! own upstreams ([`support::MockUpstream`]), so tests run in parallel and share nothing.
//! Every test is bounded in time ([`support::bounded`]).
//!
//! Run: `cargo test -p weir --test e2e` (the binary is built first by cargo).

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

mod admin;
mod anthropic_inbound;
mod anthropic_lossless;
mod anthropic_upstream;
mod azure_upstream;
mod check;
mod connections;
mod errors;
mod fallback;
mod gemini_upstream;
mod lifecycle;
mod openai;
mod plugins;
mod policy_auth;
mod policy_budget;
mod policy_cache;
mod policy_rate_limit;
mod policy_redaction;
mod policy_routing;
mod reload;
mod request_log;
mod responses;
mod shared_state;
mod state_export;
mod streaming;
mod surface;
mod upstream_faults;
