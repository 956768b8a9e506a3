//! Safe wrappers over the host API. On `wasm32` they call the gateway; elsewhere (in
//! `cargo test`) they call the in-memory fake host of [`crate::testing`].

#[cfg(target_arch = "wasm32")]
use crate::__bindings::weir::plugin::host as imp;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::fake as imp;

/// Wall-clock milliseconds since the Unix epoch (plugins have no other clock).
///
/// ```
/// assert!(weir_sdk::now_ms() > 0);
/// ```
pub fn now_ms() -> u64 {
    imp::now_ms()
}

/// The gateway's estimate of the number of tokens in `text`.
///
/// ```
/// assert!(weir_sdk::count_tokens("hello world") >= 1);
/// ```
pub fn count_tokens(text: &str) -> u32 {
    imp::count_tokens(text)
}

/// Key-value state, namespaced per plugin and kept across requests, reloads and
/// restarts. Values are bytes; `*_string` helpers handle UTF-8 text.
pub mod kv {
    use super::imp;

    /// Reads a key.
    ///
    /// ```
    /// weir_sdk::kv::set("k", b"v", None).unwrap();
    /// assert_eq!(weir_sdk::kv::get("k").unwrap(), Some(b"v".to_vec()));
    /// ```
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, String> {
        imp::kv_get(key)
    }

    /// Reads a key as UTF-8 text (invalid UTF-8 is replaced).
    ///
    /// ```
    /// weir_sdk::kv::set_string("greeting", "hi", None).unwrap();
    /// assert_eq!(weir_sdk::kv::get_string("greeting").unwrap().as_deref(), Some("hi"));
    /// ```
    pub fn get_string(key: &str) -> Result<Option<String>, String> {
        Ok(get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Writes a key; `ttl_ms` makes it expire.
    ///
    /// ```
    /// weir_sdk::kv::set("session", b"1", Some(60_000)).unwrap();
    /// ```
    pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        imp::kv_set(key, value, ttl_ms)
    }

    /// Writes UTF-8 text.
    ///
    /// ```
    /// weir_sdk::kv::set_string("k", "v", None).unwrap();
    /// ```
    pub fn set_string(key: &str, value: &str, ttl_ms: Option<u64>) -> Result<(), String> {
        set(key, value.as_bytes(), ttl_ms)
    }

    /// Adds `delta` to an integer key (missing counts as 0) and returns the new value;
    /// `ttl_ms` applies when the key is created (a fixed window).
    ///
    /// ```
    /// assert_eq!(weir_sdk::kv::incr("hits", 1, None).unwrap(), 1);
    /// assert_eq!(weir_sdk::kv::incr("hits", 2, None).unwrap(), 3);
    /// ```
    pub fn incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        imp::kv_incr(key, delta, ttl_ms)
    }

    /// Compare-and-swap: sets `key` to `value` (`None` deletes) only if it currently
    /// holds `expected` (`None` = absent). Returns whether it swapped.
    ///
    /// ```
    /// assert!(weir_sdk::kv::cas("lock", None, Some(b"me"), Some(5_000)).unwrap());
    /// assert!(!weir_sdk::kv::cas("lock", None, Some(b"you"), None).unwrap());
    /// ```
    pub fn cas(
        key: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String> {
        imp::kv_cas(key, expected, value, ttl_ms)
    }

    /// Deletes a key; returns whether it existed.
    ///
    /// ```
    /// assert!(!weir_sdk::kv::delete("nothing-here").unwrap());
    /// ```
    pub fn delete(key: &str) -> Result<bool, String> {
        imp::kv_delete(key)
    }
}

/// The request-scoped metadata bag, shared by all plugins of one request and included
/// in the log entry (`tenant`, `key id`...).
pub mod ctx {
    use super::imp;

    /// Reads an entry.
    ///
    /// ```
    /// weir_sdk::ctx::set("tenant", "acme");
    /// assert_eq!(weir_sdk::ctx::get("tenant").as_deref(), Some("acme"));
    /// ```
    pub fn get(key: &str) -> Option<String> {
        imp::ctx_get(key)
    }

    /// Writes an entry.
    ///
    /// ```
    /// weir_sdk::ctx::set("route", "cheap");
    /// ```
    pub fn set(key: &str, value: &str) {
        imp::ctx_set(key, value)
    }
}

/// Logging through the gateway's `tracing`, with the plugin name attached.
pub mod log {
    use super::imp::log;
    use crate::__bindings::weir::plugin::host::Level;

    /// Logs at trace level.
    ///
    /// ```
    /// weir_sdk::log::trace("detail");
    /// ```
    pub fn trace(message: &str) {
        log(Level::Trace, message)
    }

    /// Logs at debug level.
    ///
    /// ```
    /// weir_sdk::log::debug("checked key");
    /// ```
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }

    /// Logs at info level.
    ///
    /// ```
    /// weir_sdk::log::info("tenant tagged");
    /// ```
    pub fn info(message: &str) {
        log(Level::Info, message)
    }

    /// Logs at warn level.
    ///
    /// ```
    /// weir_sdk::log::warn("unknown tenant");
    /// ```
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }

    /// Logs at error level.
    ///
    /// ```
    /// weir_sdk::log::error("state unavailable");
    /// ```
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// Prometheus metrics, labelled with the plugin name by the gateway.
pub mod metrics {
    use super::imp;

    /// Adds to a counter.
    ///
    /// ```
    /// weir_sdk::metrics::counter_add("rejected", 1);
    /// ```
    pub fn counter_add(name: &str, value: u64) {
        imp::counter_add(name, value)
    }

    /// Observes a value in a histogram.
    ///
    /// ```
    /// weir_sdk::metrics::histogram_observe("prompt_chars", 120.0);
    /// ```
    pub fn histogram_observe(name: &str, value: f64) {
        imp::histogram_observe(name, value)
    }
}

/// Outbound HTTP, only to hosts listed in the manifest's `capabilities.fetch`.
pub mod http {
    pub use crate::__bindings::weir::plugin::host::{FetchRequest, FetchResponse};

    /// Sends a request and waits for the answer (bounded by `timeout_ms`).
    ///
    /// ```
    /// use weir_sdk::http::{fetch, FetchRequest};
    /// let req = FetchRequest {
    ///     method: "GET".into(),
    ///     url: "https://policy.example.com/allow".into(),
    ///     headers: vec![],
    ///     body: vec![],
    ///     timeout_ms: 500,
    /// };
    /// // The fake host in tests refuses unless a handler is installed.
    /// assert!(fetch(&req).is_err());
    /// ```
    pub fn fetch(request: &FetchRequest) -> Result<FetchResponse, String> {
        super::imp::http_fetch(request)
    }
}
