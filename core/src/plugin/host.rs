//! The gateway's [`HostApi`]: what `weir.kv`, `weir.log`, `weir.counter`... (Lua) and the
//! WIT `host` imports (WASM) do for one plugin instance.
//!
//! Capabilities are enforced here, once for both runtimes: key-value calls need
//! `capabilities.kv`, `http-fetch` needs the URL's host in `capabilities.fetch`. Keys live in
//! the namespace `plugin/<instance name>` of the [`StateStore`], so state follows the name
//! across reloads and restarts.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::contract::{
    FetchRequest, FetchResponse, HostApi, LedgerBalance, LedgerResult, LimitResult, LogLevel,
    Price, TargetStatsView,
};
use super::manifest::Capabilities;
use crate::state::{Balance, Rate, StateStore, plugin_namespace};

/// What the gateway shares with plugins beyond their state: the upstream layer's target
/// statistics and the `[prices]` table. Lookups by closure, so the plugin host depends on
/// neither the pipeline nor the config.
#[allow(clippy::type_complexity)]
pub struct HostLookups {
    /// Statistics of a target (provider name, upstream model).
    pub target_stats: Box<dyn Fn(&str, &str) -> Option<TargetStatsView> + Send + Sync>,
    /// The price of a model.
    pub price: Box<dyn Fn(&str) -> Option<Price> + Send + Sync>,
    /// The clock of `now-ms` and the limiter, ms since the Unix epoch; `None` is the wall
    /// clock (the offline harness fixes it).
    pub now: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
}

impl Default for HostLookups {
    /// Nothing known (tests, the offline harness).
    fn default() -> Self {
        HostLookups {
            target_stats: Box::new(|_, _| None),
            price: Box::new(|_| None),
            now: None,
        }
    }
}

impl std::fmt::Debug for HostLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLookups").finish_non_exhaustive()
    }
}

/// USD to the ledger's integer micro-USD (rounded; negative and non-finite amounts are
/// refused).
pub fn to_micros(usd: f64, what: &str) -> Result<i64, String> {
    if !usd.is_finite() || usd < 0.0 {
        return Err(format!("{what} must be a finite amount >= 0, not {usd}"));
    }
    let micros = (usd * 1_000_000.0).round();
    if micros > 9.0e18 {
        return Err(format!("{what} is too large"));
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(micros as i64)
}

/// A ledger balance in USD.
pub fn balance_usd(b: Balance) -> LedgerBalance {
    #[allow(clippy::cast_precision_loss)]
    LedgerBalance {
        spent: b.spent_micros as f64 / 1_000_000.0,
        reserved: b.reserved_micros as f64 / 1_000_000.0,
    }
}

/// The limiter and ledger host calls over a [`StateStore`] namespace, in the contract's
/// units (USD, ms): one implementation for the gateway's host and the in-memory test host.
pub struct Primitives<'a> {
    /// The store.
    pub store: &'a dyn StateStore,
    /// The plugin's namespace.
    pub ns: &'a str,
    /// Now, ms since the Unix epoch (the host's clock, fixable in fixtures).
    pub now_ms: u64,
}

thread_local! {
    /// Set when a state call of the running hook failed because the store is unavailable
    /// (fail-closed): the chain then names the failure `state_unavailable`.
    static STATE_UNAVAILABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a state call on this thread failed as unavailable since the last call; clears it.
pub(crate) fn take_state_unavailable() -> bool {
    STATE_UNAVAILABLE.with(|f| f.replace(false))
}

/// A state error as the contract's string, noting an unavailable store for the chain.
fn state_error(e: crate::state::StateError) -> String {
    if matches!(e, crate::state::StateError::Unavailable(_)) {
        STATE_UNAVAILABLE.with(|f| f.set(true));
    }
    e.to_string()
}

impl Primitives<'_> {
    /// `limit-reserve`.
    pub fn limit_reserve(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String> {
        let out = self
            .store
            .limit_reserve(self.ns, key, rate(limit, window_ms)?, amount, self.now_ms)
            .map_err(state_error)?;
        Ok(limit_result(limit, out))
    }

    /// `limit-settle`.
    pub fn limit_settle(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        self.store
            .limit_settle(
                self.ns,
                key,
                rate(limit, window_ms)?,
                reserved,
                used,
                self.now_ms,
            )
            .map_err(state_error)
    }

    /// `ledger-reserve`.
    pub fn ledger_reserve(
        &self,
        account: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String> {
        let (allowed, balance) = self
            .store
            .ledger_reserve(
                self.ns,
                account,
                to_micros(limit, "limit")?,
                to_micros(amount, "amount")?,
                ttl(ttl_ms),
            )
            .map_err(state_error)?;
        Ok(LedgerResult {
            allowed,
            balance: balance_usd(balance),
        })
    }

    /// `ledger-settle`.
    pub fn ledger_settle(
        &self,
        account: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String> {
        self.store
            .ledger_settle(
                self.ns,
                account,
                to_micros(reserved, "reserved")?,
                to_micros(cost, "cost")?,
                ttl(ttl_ms),
            )
            .map(balance_usd)
            .map_err(state_error)
    }

    /// `ledger-release`.
    pub fn ledger_release(&self, account: &str, reserved: f64) -> Result<LedgerBalance, String> {
        self.store
            .ledger_release(self.ns, account, to_micros(reserved, "reserved")?)
            .map(balance_usd)
            .map_err(state_error)
    }

    /// `ledger-read`.
    pub fn ledger_balance(&self, account: &str) -> Result<LedgerBalance, String> {
        self.store
            .ledger_balance(self.ns, account)
            .map(balance_usd)
            .map_err(state_error)
    }
}

/// Checks a limiter's arguments.
fn rate(limit: u64, window_ms: u64) -> Result<Rate, String> {
    if window_ms == 0 {
        return Err("limit window must be at least 1 ms".into());
    }
    Ok(Rate {
        limit,
        window: Duration::from_millis(window_ms),
    })
}

/// Longest `http-fetch` timeout a plugin may ask for.
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `http-fetch` response body handed to a plugin.
pub const MAX_FETCH_BODY: usize = 1 << 20;

/// The plugin metrics, registered once per process (reloads reuse them).
#[derive(Debug, Clone)]
pub struct PluginMetrics {
    /// `weir_plugin_failures_total{plugin,kind}`: failed hook calls by kind (`trap`,
    /// `timeout`, `oom`, `error`, `unavailable`, `circuit_open`).
    pub failures: IntCounterVec,
    /// `weir_plugin_counter_total{plugin,name}`: counters plugins add to (`weir.counter`).
    pub counters: IntCounterVec,
    /// `weir_plugin_histogram{plugin,name}`: values plugins observe (`weir.histogram`).
    pub histograms: HistogramVec,
    /// `weir_shadow_decisions_total{plugin,decision}`: what shadow-mode instances decided
    /// (`continue`, `reply_<status>`, `pass`, `replace`, `hold`, `abort`, `failure`), never
    /// enforced.
    pub shadow: IntCounterVec,
}

impl PluginMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<PluginMetrics, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.counters.clone()))?;
        registry.register(Box::new(m.histograms.clone()))?;
        registry.register(Box::new(m.shadow.clone()))?;
        Ok(m)
    }

    /// Metrics that no registry exports (tests, `weir plugin test`).
    pub fn unregistered() -> Result<PluginMetrics, prometheus::Error> {
        Ok(PluginMetrics {
            failures: IntCounterVec::new(
                Opts::new(
                    "weir_plugin_failures_total",
                    "Failed plugin hook calls, by plugin and kind.",
                ),
                &["plugin", "kind"],
            )?,
            counters: IntCounterVec::new(
                Opts::new(
                    "weir_plugin_counter_total",
                    "Counters incremented by plugins (weir.counter / counter-add).",
                ),
                &["plugin", "name"],
            )?,
            histograms: HistogramVec::new(
                HistogramOpts::new(
                    "weir_plugin_histogram",
                    "Values observed by plugins (weir.histogram / histogram-observe).",
                ),
                &["plugin", "name"],
            )?,
            shadow: IntCounterVec::new(
                Opts::new(
                    "weir_shadow_decisions_total",
                    "Decisions of shadow-mode plugin instances (logged and counted, never enforced).",
                ),
                &["plugin", "decision"],
            )?,
        })
    }
}

/// The [`HostApi`] of one plugin instance.
pub struct GatewayHost {
    plugin: String,
    namespace: String,
    state: Arc<dyn StateStore>,
    capabilities: Capabilities,
    metrics: PluginMetrics,
    lookups: Arc<HostLookups>,
    http: OnceLock<Result<reqwest::Client, String>>,
}

impl std::fmt::Debug for GatewayHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHost")
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

impl GatewayHost {
    /// The host of the instance named `plugin`.
    pub fn new(
        plugin: &str,
        state: Arc<dyn StateStore>,
        capabilities: Capabilities,
        metrics: PluginMetrics,
        lookups: Arc<HostLookups>,
    ) -> Self {
        GatewayHost {
            plugin: plugin.to_owned(),
            namespace: plugin_namespace(plugin),
            state,
            capabilities,
            metrics,
            lookups,
            http: OnceLock::new(),
        }
    }

    fn kv(&self) -> Result<&dyn StateStore, String> {
        if self.capabilities.kv {
            Ok(self.state.as_ref())
        } else {
            Err("key-value state needs `kv = true` under [capabilities] in plugin.toml".into())
        }
    }

    /// The limiter and ledger over this plugin's namespace (capability `kv`).
    fn primitives(&self) -> Result<Primitives<'_>, String> {
        Ok(Primitives {
            store: self.kv()?,
            ns: &self.namespace,
            now_ms: self.now_ms(),
        })
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    // A redirect could leave the allow-list.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))
            })
            .clone()
    }
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl HostApi for GatewayHost {
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.kv()?.get(&self.namespace, key).map_err(state_error)
    }

    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        self.kv()?
            .set(&self.namespace, key, value, ttl(ttl_ms))
            .map_err(state_error)
    }

    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        self.kv()?
            .incr(&self.namespace, key, delta, ttl(ttl_ms))
            .map_err(state_error)
    }

    fn kv_cas(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String> {
        self.kv()?
            .cas(&self.namespace, key, expected, value, ttl(ttl_ms))
            .map_err(state_error)
    }

    fn kv_delete(&self, key: &str) -> Result<bool, String> {
        self.kv()?.delete(&self.namespace, key).map_err(state_error)
    }

    fn kv_scan(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.kv()?
            .scan_prefix(&self.namespace, prefix, limit)
            .map_err(state_error)
    }

    fn log(&self, level: LogLevel, message: &str) {
        let plugin = self.plugin.as_str();
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn counter_add(&self, name: &str, value: u64) {
        self.metrics
            .counters
            .with_label_values(&[self.plugin.as_str(), name])
            .inc_by(value);
    }

    fn histogram_observe(&self, name: &str, value: f64) {
        self.metrics
            .histograms
            .with_label_values(&[self.plugin.as_str(), name])
            .observe(value);
    }

    fn limit_reserve(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<LimitResult, String> {
        self.primitives()?
            .limit_reserve(key, limit, window_ms, amount)
    }

    fn limit_settle(
        &self,
        key: &str,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        self.primitives()?
            .limit_settle(key, limit, window_ms, reserved, used)
    }

    fn ledger_reserve(
        &self,
        account: &str,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerResult, String> {
        self.primitives()?
            .ledger_reserve(account, limit, amount, ttl_ms)
    }

    fn ledger_settle(
        &self,
        account: &str,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<LedgerBalance, String> {
        self.primitives()?
            .ledger_settle(account, reserved, cost, ttl_ms)
    }

    fn ledger_release(&self, account: &str, reserved: f64) -> Result<LedgerBalance, String> {
        self.primitives()?.ledger_release(account, reserved)
    }

    fn ledger_balance(&self, account: &str) -> Result<LedgerBalance, String> {
        self.primitives()?.ledger_balance(account)
    }

    fn now_ms(&self) -> u64 {
        match &self.lookups.now {
            Some(now) => now(),
            None => super::contract::now_ms(),
        }
    }

    fn target_stats(&self, provider: &str, model: &str) -> Option<TargetStatsView> {
        (self.lookups.target_stats)(provider, model)
    }

    fn price(&self, model: &str) -> Option<Price> {
        (self.lookups.price)(model)
    }

    /// Blocks the calling thread until the response arrives or the timeout (at most
    /// [`MAX_FETCH_TIMEOUT`]) passes. On a tokio multi-thread worker it uses
    /// `block_in_place` so other tasks move to other workers; elsewhere (the offline
    /// harness) it runs a one-off runtime. Redirects are not followed.
    fn http_fetch(&self, req: &FetchRequest) -> Result<FetchResponse, String> {
        let url = reqwest::Url::parse(&req.url).map_err(|e| format!("bad url {}: {e}", req.url))?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if !matches!(url.scheme(), "http" | "https")
            || !self.capabilities.fetch.iter().any(|h| h == &host)
        {
            return Err(format!(
                "fetch of {} is not allowed: add its host to capabilities.fetch in plugin.toml",
                req.url
            ));
        }
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("bad method {}", req.method))?;
        let timeout = if req.timeout_ms == 0 {
            MAX_FETCH_TIMEOUT
        } else {
            Duration::from_millis(u64::from(req.timeout_ms)).min(MAX_FETCH_TIMEOUT)
        };
        let mut builder = self
            .client()?
            .request(method, url)
            .timeout(timeout)
            .body(req.body.clone());
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        let fut = async move {
            let mut resp = builder.send().await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
                if body.len() + chunk.len() > MAX_FETCH_BODY {
                    return Err(format!("response body larger than {MAX_FETCH_BODY} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(FetchResponse {
                status,
                headers,
                body,
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(fut))
            }
            Ok(_) => Err("fetch is not available on a single-threaded runtime".into()),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(fut),
        }
    }
}

/// The contract's limiter answer from the state's.
pub fn limit_result(limit: u64, out: crate::state::LimitOutcome) -> LimitResult {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    LimitResult {
        allowed: out.allowed,
        limit,
        remaining: out.remaining,
        retry_after_ms: ms(out.retry_after),
        reset_ms: ms(out.reset_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn host(kv: bool) -> GatewayHost {
        GatewayHost::new(
            "p",
            Arc::new(MemoryStore::new()),
            Capabilities {
                kv,
                body: false,
                fetch: vec!["allowed.example".into()],
            },
            PluginMetrics::unregistered().unwrap(),
            Arc::new(HostLookups::default()),
        )
    }

    #[test]
    fn kv_needs_the_capability() {
        assert!(host(false).kv_get("k").unwrap_err().contains("kv = true"));
        let h = host(true);
        assert_eq!(h.kv_incr("n", 2, None), Ok(2));
        assert_eq!(h.kv_get("n"), Ok(Some(b"2".to_vec())));
    }

    #[test]
    fn fetch_outside_the_allow_list_is_refused() {
        let h = host(false);
        let req = |url: &str| FetchRequest {
            method: "GET".into(),
            url: url.into(),
            ..FetchRequest::default()
        };
        assert!(
            h.http_fetch(&req("https://evil.example/x"))
                .unwrap_err()
                .contains("not allowed")
        );
        assert!(
            h.http_fetch(&req("file:///etc/passwd"))
                .unwrap_err()
                .contains("not allowed")
        );
        assert!(h.http_fetch(&req("not a url")).is_err());
    }

    #[test]
    fn metrics_carry_the_plugin_label() {
        let h = host(false);
        h.counter_add("blocked", 2);
        h.histogram_observe("score", 0.5);
        assert_eq!(
            h.metrics
                .counters
                .with_label_values(&["p", "blocked"])
                .get(),
            2
        );
    }
}
