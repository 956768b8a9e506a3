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

    /// Up to `limit` live keys starting with `prefix`, in key order, with their values.
    /// Meant for admin endpoints and `init`, not for every request.
    ///
    /// ```
    /// weir_sdk::testing::reset();
    /// weir_sdk::kv::set("id/b", b"2", None).unwrap();
    /// weir_sdk::kv::set("id/a", b"1", None).unwrap();
    /// weir_sdk::kv::set("other", b"x", None).unwrap();
    /// let found = weir_sdk::kv::scan("id/", 10).unwrap();
    /// assert_eq!(found, vec![("id/a".to_string(), b"1".to_vec()), ("id/b".to_string(), b"2".to_vec())]);
    /// ```
    pub fn scan(prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>, String> {
        imp::kv_scan(prefix, limit)
    }
}

/// The plugin's request scratch: bytes private to this plugin (never logged, never seen by
/// other plugins), shared by its hooks of one request and dropped with the request. The
/// place for a pseudonym map, a streamed answer or a reservation to settle in `on-log`.
pub mod scratch {
    use super::imp;

    /// Reads a value.
    ///
    /// ```
    /// weir_sdk::scratch::set("reserved", b"42");
    /// assert_eq!(weir_sdk::scratch::get("reserved"), Some(b"42".to_vec()));
    /// ```
    pub fn get(key: &str) -> Option<Vec<u8>> {
        imp::scratch_get(key)
    }

    /// Reads a value as UTF-8 text (invalid UTF-8 is replaced).
    ///
    /// ```
    /// weir_sdk::scratch::set_string("model", "gpt-4o");
    /// assert_eq!(weir_sdk::scratch::get_string("model").as_deref(), Some("gpt-4o"));
    /// ```
    pub fn get_string(key: &str) -> Option<String> {
        get(key).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Writes a value.
    ///
    /// ```
    /// weir_sdk::scratch::set("k", b"v");
    /// ```
    pub fn set(key: &str, value: &[u8]) {
        imp::scratch_set(key, Some(value))
    }

    /// Writes UTF-8 text.
    ///
    /// ```
    /// weir_sdk::scratch::set_string("k", "v");
    /// ```
    pub fn set_string(key: &str, value: &str) {
        set(key, value.as_bytes())
    }

    /// Deletes a value.
    ///
    /// ```
    /// weir_sdk::scratch::set("k", b"v");
    /// weir_sdk::scratch::delete("k");
    /// assert_eq!(weir_sdk::scratch::get("k"), None);
    /// ```
    pub fn delete(key: &str) {
        imp::scratch_set(key, None)
    }
}

/// A keyed rate limiter (GCRA): `limit` units per `window_ms`, bursts up to `limit`.
/// Reserve at admission (a request, or estimated tokens), settle with the real use. One
/// atomic state operation per call, so a shared state backend enforces one limit across
/// gateway instances. Needs capability `kv`; keys are in the plugin's namespace.
///
/// ```
/// use weir_sdk::limit;
/// weir_sdk::testing::reset();
/// weir_sdk::testing::set_now_ms(0);
/// // 2 requests per second.
/// assert!(limit::reserve("key_1:rpm", 2, 1_000, 1).unwrap().allowed);
/// assert!(limit::reserve("key_1:rpm", 2, 1_000, 1).unwrap().allowed);
/// let third = limit::reserve("key_1:rpm", 2, 1_000, 1).unwrap();
/// assert!(!third.allowed);
/// assert_eq!(third.retry_after_ms, 500);
/// weir_sdk::testing::set_now_ms(500);
/// assert!(limit::reserve("key_1:rpm", 2, 1_000, 1).unwrap().allowed);
/// ```
pub mod limit {
    use super::imp;
    pub use crate::LimitResult;

    /// Admits and reserves `amount` units, or refuses without reserving.
    ///
    /// ```
    /// weir_sdk::testing::reset();
    /// let r = weir_sdk::limit::reserve("tpm", 1_000, 60_000, 300).unwrap();
    /// assert!(r.allowed);
    /// assert_eq!((r.limit, r.remaining), (1_000, 700));
    /// ```
    pub fn reserve(
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String> {
        imp::limit_reserve(key, limit, window_ms, amount)
    }

    /// Settles an admitted reservation: `reserved` units become `used` (units not used
    /// are given back, units beyond the reservation are charged). Pass the same limit and
    /// window as the reservation.
    ///
    /// ```
    /// use weir_sdk::limit;
    /// weir_sdk::testing::reset();
    /// weir_sdk::testing::set_now_ms(0);
    /// limit::reserve("tpm", 1_000, 60_000, 500).unwrap();
    /// limit::settle("tpm", 1_000, 60_000, 500, 100).unwrap();
    /// assert_eq!(limit::reserve("tpm", 1_000, 60_000, 0).unwrap().remaining, 900);
    /// ```
    pub fn settle(
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        imp::limit_settle(key, limit, window_ms, reserved, used)
    }
}

/// A spend ledger in USD: reserve the worst case if spent + reserved + amount stays within
/// the limit, settle the real cost (it may exceed the reservation: spend is never lost),
/// release on failure. Needs capability `kv`; accounts are in the plugin's namespace.
///
/// ```
/// use weir_sdk::ledger;
/// weir_sdk::testing::reset();
/// let r = ledger::reserve("tenant:acme", 10.0, 4.0, None).unwrap();
/// assert!(r.allowed);
/// assert!(!ledger::reserve("tenant:acme", 10.0, 7.0, None).unwrap().allowed);
/// let b = ledger::settle("tenant:acme", 4.0, 1.5, None).unwrap();
/// assert_eq!((b.spent, b.reserved), (1.5, 0.0));
/// ```
pub mod ledger {
    use super::imp;
    pub use crate::{LedgerBalance, LedgerResult};

    /// Reserves `amount` on `account` if spent + reserved + amount <= `limit`; `ttl_ms`
    /// applies when the account is created (a budget period).
    ///
    /// ```
    /// let r = weir_sdk::ledger::reserve("a", 1.0, 0.25, Some(86_400_000)).unwrap();
    /// assert_eq!(r.balance.reserved, 0.25);
    /// ```
    pub fn reserve(
        account: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String> {
        imp::ledger_reserve(account, limit, amount, ttl_ms)
    }

    /// Settles a reservation: `reserved` is released and `cost` added to the spend.
    ///
    /// ```
    /// let b = weir_sdk::ledger::settle("fresh", 0.0, 0.5, None).unwrap();
    /// assert_eq!(b.spent, 0.5);
    /// ```
    pub fn settle(
        account: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String> {
        imp::ledger_settle(account, reserved, cost, ttl_ms)
    }

    /// Releases a reservation without spending (the request failed).
    ///
    /// ```
    /// use weir_sdk::ledger;
    /// ledger::reserve("r", 1.0, 0.5, None).unwrap();
    /// assert_eq!(ledger::release("r", 0.5).unwrap().reserved, 0.0);
    /// ```
    pub fn release(account: &str, reserved: f64) -> Result<LedgerBalance, String> {
        imp::ledger_release(account, reserved)
    }

    /// The balance of an account (zeros when absent).
    ///
    /// ```
    /// let b = weir_sdk::ledger::balance("nobody").unwrap();
    /// assert_eq!((b.spent, b.reserved), (0.0, 0.0));
    /// ```
    pub fn balance(account: &str) -> Result<LedgerBalance, String> {
        imp::ledger_read(account)
    }
}

/// What the gateway measured for a target (provider, model): latency and error-rate
/// EWMAs, attempts in flight and in total. `None` when it was never tried.
///
/// ```
/// assert!(weir_sdk::target_stats("openai", "gpt-4o").is_none());
/// ```
pub fn target_stats(provider: &str, model: &str) -> Option<crate::TargetSnapshot> {
    imp::target_stats(provider, model)
}

/// A model's price from the gateway's `[prices]` (USD per 1M tokens), by client-facing or
/// upstream model name.
///
/// ```
/// assert!(weir_sdk::price("gpt-4o").is_none()); // the test host has no prices by default
/// ```
pub fn price(model: &str) -> Option<crate::ModelPrice> {
    imp::price(model)
}

/// SHA-256 of `data`, computed by the host.
///
/// ```
/// let digest = weir_sdk::sha256(b"abc");
/// assert_eq!(digest[..4], [0xba, 0x78, 0x16, 0xbf]);
/// ```
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = imp::sha256(data);
    let mut out = [0u8; 32];
    for (o, d) in out.iter_mut().zip(digest) {
        *o = d;
    }
    out
}

/// `len` bytes (at most 4096) from the operating system's secure random source, through
/// the host: for secrets and ids. (The fake host of [`crate::testing`] answers a
/// deterministic sequence, see [`crate::testing::reset`].)
///
/// ```
/// let a = weir_sdk::random_bytes(16);
/// assert_eq!(a.len(), 16);
/// assert_ne!(a, weir_sdk::random_bytes(16));
/// ```
pub fn random_bytes(len: u32) -> Vec<u8> {
    imp::random_bytes(len)
}

/// SHA-256 of `data` as lower-case hex.
///
/// ```
/// assert_eq!(
///     weir_sdk::sha256_hex(b"abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn sha256_hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in sha256(data) {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
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
