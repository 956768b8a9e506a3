//! # Weir
//!
//! A plugin-first AI gateway: one OpenAI- and Anthropic-compatible endpoint in front of
//! OpenAI, Anthropic, Gemini, Azure OpenAI and any OpenAI-compatible server.
//!
//! Where to start reading:
//! - [`pipeline`]: the life of a request, phase by phase (start with its module docs);
//! - [`server`]: the HTTP surface (routes, body limits, request ids, shutdown);
//! - [`provider`]: one file per upstream dialect behind the [`provider::Provider`] trait;
//! - [`api`]: the inbound wire formats (OpenAI is the canonical form; Anthropic is
//!   translated into it) and server-sent events;
//! - [`config`]: the TOML file and its validation;
//! - [`telemetry`]: logs and Prometheus metrics.

pub mod admin;
pub mod api;
pub mod config;
pub mod pipeline;
pub mod plugin;
pub mod prices;
pub mod provider;
pub mod reload;
pub mod request;
pub mod requestlog;
pub mod server;
pub mod state;
pub mod targets;
pub mod telemetry;
pub mod tokens;
