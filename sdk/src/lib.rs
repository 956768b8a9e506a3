//! `weir-sdk`: write plugins for the Weir AI gateway in Rust.
//!
//! A plugin is a `wasm32-wasip2` component built against `sdk/wit/weir.wit`
//! (`weir:plugin@0.2.0`), the one contract the gateway also reads. With this crate it is a
//! plain Rust type:
//!
//! 1. implement [`Plugin`] (every hook has a no-op default; declare in `plugin.toml`
//!    which hooks the gateway should call),
//! 2. call [`export!`] once,
//! 3. build with `cargo build --release --target wasm32-wasip2` (or
//!    `scripts/build-plugins.sh`), and copy the `.wasm` to `plugin.wasm` beside the
//!    manifest.
//!
//! ```
//! use weir_sdk::{Decision, Plugin, Request};
//!
//! /// Rejects requests without an `x-team` header.
//! struct RequireTeam;
//!
//! impl Plugin for RequireTeam {
//!     type Config = weir_sdk::NoConfig;
//!
//!     fn new(_config: Self::Config) -> Result<Self, String> {
//!         Ok(RequireTeam)
//!     }
//!
//!     fn on_request(&self, req: &Request) -> Decision {
//!         match req.header("x-team") {
//!             Some(team) => Decision::cont().set_metadata("team", &team),
//!             None => Decision::error(400, "missing x-team header"),
//!         }
//!     }
//! }
//!
//! weir_sdk::export!(RequireTeam);
//! # fn main() {}
//! ```
//!
//! The request is a lazy view ([`Request`]): every accessor (`header`, `messages`,
//! `body`...) asks the gateway for just that piece, so read what you need once and keep
//! it in a local.
//!
//! Where to look next: [`Decision`], [`ResponseDecision`] and [`ChunkAction`] for what
//! hooks return; the host modules ([`kv`], [`ctx`], [`scratch`], [`limit`], [`ledger`],
//! [`log`], [`metrics`], [`http`]) and functions ([`now_ms`], [`count_tokens`],
//! [`target_stats`], [`price`], [`sha256`], [`random_bytes`]) for what a plugin may call; [`Plugin::admin`]
//! for a plugin's own admin endpoint; and [`testing`] to run a plugin's hooks natively in
//! `cargo test` against fixture requests, with an in-memory fake host.
//!
//! The sandbox: a plugin has no filesystem, network, environment, stdio or clocks. Use
//! the host API instead ([`now_ms`], [`http::fetch`] with an allow-listed host); any other
//! WASI call traps, which the gateway treats as a plugin failure.

extern crate self as weir_sdk;

mod admin;
mod decision;
mod host;
mod request;
pub mod testing;

pub use host::{
    count_tokens, ctx, http, kv, ledger, limit, log, metrics, now_ms, price, random_bytes, scratch,
    sha256, sha256_hex, target_stats,
};
pub use request::Request;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Guest bindings generated from `sdk/wit/weir.wit`.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        additional_derives: [PartialEq],
        additional_type_attributes: {
            "weir:plugin/types@0.2.0/mutations": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/response-mutations": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/usage": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/message-view": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/tool-call-view": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/choice-view": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/response-view": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/log-entry": [#[derive(Default)]],
            "weir:plugin/types@0.2.0/admin-request": [#[derive(Default)]],
        },
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "weir_sdk::__bindings",
        runtime_path: "weir_sdk::__wit_bindgen::rt",
    });
}

pub use __bindings::weir::plugin::host::{
    LedgerBalance, LedgerResult, LimitResult, ModelPrice, TargetSnapshot,
};
pub use __bindings::weir::plugin::types::{
    AdminRequest, AdminResponse, Attempt, ChoiceView, ChunkAction, Decision, Dialect, Endpoint,
    Finish, LogEntry, MessageView, Mutations, Pairs, PluginDecision, Reply, ResponseDecision,
    ResponseMutations, ResponseView, StreamEvent, Target, TextDelta, ToolCallDelta, ToolCallEdit,
    ToolCallView, Usage,
};

/// A Weir plugin. Implement it on your type and call [`export!`] once.
///
/// The gateway creates several instances of a plugin (one per concurrent call, reused
/// across requests) and calls [`Plugin::new`] once in each with the plugin's config, so
/// keep no state in `self` that must be shared between requests: use [`kv`] (or
/// [`limit`], [`ledger`]) for that, [`ctx`] for data shared with the other plugins of one
/// request and [`scratch`] for data private to this plugin across the hooks of one
/// request.
///
/// Every hook has a default that changes nothing; the manifest's `hooks = [..]` says
/// which ones the gateway calls.
///
/// ```
/// use weir_sdk::{ChunkAction, Plugin, StreamEvent};
///
/// /// Counts streamed text characters.
/// struct CountChars;
///
/// impl Plugin for CountChars {
///     type Config = weir_sdk::NoConfig;
///
///     fn new(_: Self::Config) -> Result<Self, String> {
///         Ok(CountChars)
///     }
///
///     fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
///         if let StreamEvent::TextDelta(delta) = event {
///             weir_sdk::metrics::counter_add("chars", delta.text.chars().count() as u64);
///         }
///         ChunkAction::Pass
///     }
/// }
/// ```
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The plugin's configuration, deserialized from the `config` table of the gateway
    /// config (passed as JSON). Use [`NoConfig`] when there is none.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin from its config; an `Err` fails the plugin's load with that
    /// message (the gateway keeps its previous configuration).
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Runs for every request before it is sent upstream. Return [`Decision::cont`]
    /// (optionally with changes) to go on, or a reply to answer now.
    ///
    /// `req` reads the request lazily (see [`Request`]); it sees the changes of the
    /// plugins before this one.
    fn on_request(&self, req: &Request) -> Decision {
        let _ = req;
        Decision::cont()
    }

    /// Runs on a complete, non-streaming response.
    fn on_response(&self, resp: &ResponseView) -> ResponseDecision {
        let _ = resp;
        ResponseDecision::cont()
    }

    /// Runs on every normalized stream event.
    ///
    /// A [`TextDelta`] with `last` set cannot be held: answer [`ChunkAction::Pass`] or
    /// [`ChunkAction::Replace`] (the gateway treats [`ChunkAction::Hold`] then as a plugin
    /// failure).
    fn on_response_chunk(&self, event: &StreamEvent) -> ChunkAction {
        let _ = event;
        ChunkAction::Pass
    }

    /// Runs after the response was sent, off the hot path: usage, latency, status,
    /// attempts, decisions, cost.
    fn on_log(&self, entry: &LogEntry) {
        let _ = entry;
    }

    /// Serves `/admin/plugins/<instance>/<path>` on the gateway's admin listener (behind
    /// the admin token), when the manifest lists hook `admin`. The default answers 404.
    ///
    /// ```
    /// use weir_sdk::{AdminRequest, AdminResponse, Plugin};
    ///
    /// struct Hello;
    /// impl Plugin for Hello {
    ///     type Config = weir_sdk::NoConfig;
    ///     fn new(_: Self::Config) -> Result<Self, String> { Ok(Hello) }
    ///     fn admin(&self, req: &AdminRequest) -> AdminResponse {
    ///         match (req.method.as_str(), req.path.as_str()) {
    ///             ("GET", "/hello") => AdminResponse::json(200, &serde_json::json!({"hello": "world"})),
    ///             _ => AdminResponse::not_found(),
    ///         }
    ///     }
    /// }
    ///
    /// let h = weir_sdk::testing::Harness::<Hello>::new("{}").unwrap();
    /// assert_eq!(h.admin(&weir_sdk::testing::admin_request("GET", "/hello")).status, 200);
    /// assert_eq!(h.admin(&weir_sdk::testing::admin_request("GET", "/nope")).status, 404);
    /// ```
    fn admin(&self, req: &AdminRequest) -> AdminResponse {
        let _ = req;
        AdminResponse::not_found()
    }
}

/// A [`Plugin::Config`] for plugins without configuration: accepts any JSON.
///
/// ```
/// let _: weir_sdk::NoConfig = serde_json::from_str(r#"{"ignored": 1}"#).unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoConfig;

impl<'de> serde::Deserialize<'de> for NoConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(NoConfig)
    }
}

/// Parses a plugin's JSON config and builds it; the empty string counts as `{}`.
/// Used by [`export!`] and [`testing::Harness`].
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Config { limit: u32 }
/// struct Limiter(u32);
/// impl weir_sdk::Plugin for Limiter {
///     type Config = Config;
///     fn new(c: Config) -> Result<Self, String> { Ok(Limiter(c.limit)) }
/// }
/// let plugin: Limiter = weir_sdk::build_plugin(r#"{"limit": 3}"#).unwrap();
/// assert_eq!(plugin.0, 3);
/// assert!(weir_sdk::build_plugin::<Limiter>(r#"{"limit": "x"}"#).is_err());
/// ```
pub fn build_plugin<P: Plugin>(config_json: &str) -> Result<P, String> {
    let text = if config_json.trim().is_empty() {
        "{}"
    } else {
        config_json
    };
    let config: P::Config =
        serde_json::from_str(text).map_err(|e| format!("invalid plugin config: {e}"))?;
    P::new(config)
}

/// Exports a [`Plugin`] implementation as the component's hooks.
///
/// Call it once, at the crate root, with the plugin type. On `wasm32` targets it
/// generates the component exports; on other targets (for `cargo test`) it expands to
/// nothing, so the same crate can be tested natively with [`testing::Harness`].
///
/// ```
/// struct Noop;
/// impl weir_sdk::Plugin for Noop {
///     type Config = weir_sdk::NoConfig;
///     fn new(_: Self::Config) -> Result<Self, String> { Ok(Noop) }
/// }
/// weir_sdk::export!(Noop);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static PLUGIN: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();

            struct Exports;

            impl $crate::__bindings::Guest for Exports {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    let plugin = $crate::build_plugin::<$plugin>(&config)?;
                    PLUGIN
                        .set(plugin)
                        .map_err(|_| ::std::string::String::from("plugin already initialized"))
                }

                fn on_request(
                    request: &$crate::__bindings::weir::plugin::views::Request,
                ) -> $crate::Decision {
                    match PLUGIN.get() {
                        Some(plugin) => {
                            let request = $crate::Request::__from_wit(request);
                            $crate::Plugin::on_request(plugin, &request)
                        }
                        None => $crate::Decision::error(500, "plugin not initialized"),
                    }
                }

                fn on_response(response: $crate::ResponseView) -> $crate::ResponseDecision {
                    match PLUGIN.get() {
                        Some(plugin) => $crate::Plugin::on_response(plugin, &response),
                        None => $crate::ResponseDecision::cont(),
                    }
                }

                fn on_response_chunk(event: $crate::StreamEvent) -> $crate::ChunkAction {
                    match PLUGIN.get() {
                        Some(plugin) => $crate::Plugin::on_response_chunk(plugin, &event),
                        None => $crate::ChunkAction::Pass,
                    }
                }

                fn on_log(entry: $crate::LogEntry) {
                    if let Some(plugin) = PLUGIN.get() {
                        $crate::Plugin::on_log(plugin, &entry);
                    }
                }

                fn admin(request: $crate::AdminRequest) -> $crate::AdminResponse {
                    match PLUGIN.get() {
                        Some(plugin) => $crate::Plugin::admin(plugin, &request),
                        None => $crate::AdminResponse::error(503, "plugin not initialized"),
                    }
                }
            }

    $crate::__bindings::__export_plugin_world!(Exports with_types_in $crate::__bindings);
        };
    };
}
