//! [`RedisStore`]: state shared by several gateway instances, on Redis or Valkey (7.0 or
//! later, standalone or a sentinel-fronted primary; not Redis Cluster).
//!
//! # How operations map to Redis
//! Every operation is **one round trip**: a server-side Lua script (`EVALSHA`, see
//! [`scripts`]) that reads, decides and writes atomically, so two instances never interleave
//! on a key. `kv` values are stored as is with native expiry (`PX`); the limiter's TAT and the
//! ledger's `"<spent> <reserved>"` live under `lim/<key>` and `led/<account>` like on sled.
//! Nothing is batched: a limiter reservation, a ledger settle or a counter increment is on the
//! server when the call returns, so an instance that crashes loses nothing but its in-flight
//! reservations (they stay reserved; see docs/operations.md, "Running several instances").
//!
//! # The local read cache
//! `get` is served from a bounded in-process cache (`local_cache_entries`), so the hot path
//! (an auth key lookup, a cache lookup) costs no round trip once a key is warm. Coherence:
//! every writing script publishes the key on `<prefix>inv`; each instance subscribes and drops
//! the key from its cache (typically within a millisecond). A read that raced an
//! invalidation is not cached (an epoch counter guards the insert). While the subscription is
//! down the cache is bypassed, and when it comes back the cache is emptied (invalidations may
//! have been missed). As a safety net an entry is also never served when older than
//! `local_cache_ttl_ms` (default 1 s): a revoked key is refused everywhere within that bound
//! even if a message is lost. A `get` that fails on the server may be answered from the cache
//! (stale-if-error), since no instance can write while the server is unreachable.
//!
//! # Failures
//! Every call has a bounded timeout (`timeout_ms`); connections reconnect by themselves
//! (redis' `ConnectionManager`). What a failed call does depends on its primitive's
//! configured mode ([`FailureModes`]): `closed` returns [`StateError::Unavailable`] (plugins
//! fail, the request gets a 503 naming the store), `open` answers as if the store allowed it
//! (a read finds nothing, a write is dropped, a limiter or ledger reservation is admitted),
//! counts `weir_state_bypass_total{primitive}` and logs at most once per 10 s. A background
//! ping every `health_interval_ms` drives [`StateStore::health`] and so `/readyz`.
//!
//! # Blocking
//! [`StateStore`] is synchronous (plugins call it from inside a hook). Redis I/O runs on a
//! small runtime owned by the store; a call waits for its answer, inside
//! `tokio::task::block_in_place` when it is made from a gateway worker, so other requests
//! keep moving while it waits.

mod cache;
mod scripts;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Value};
use serde::Deserialize;

use self::cache::LocalCache;
use super::{Balance, LimitOutcome, Rate, StateError, StateStore, primitives};

/// `[state.redis]` in `weir.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, `rediss://` for TLS, or
    /// `valkey://` / `valkeys://`.
    pub url: String,
    /// A password (e.g. `"${REDIS_PASSWORD}"`); overrides one in the URL. Empty = none.
    #[serde(default)]
    pub password: Option<String>,
    /// Prefix of every key and channel, so several gateways (or environments) can share one
    /// server. Default `weir:`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Multiplexed connections per instance (calls are spread round-robin). Default 2.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Timeout to establish a connection, ms. Default 1000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Timeout of one call, ms; past it the call fails with its primitive's failure mode.
    /// Default 250.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Interval of the health ping behind `/readyz`, ms. Default 1000.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Entries of the local read cache (0 turns it off). Default 10000.
    #[serde(default = "default_cache_entries")]
    pub local_cache_entries: usize,
    /// Longest an entry of the local read cache is served, ms, even without an invalidation.
    /// Default 1000.
    #[serde(default = "default_cache_ttl_ms")]
    pub local_cache_ttl_ms: u64,
    /// Values larger than this are not cached locally. Default 65536.
    #[serde(default = "default_cache_max_value_bytes")]
    pub local_cache_max_value_bytes: usize,
    /// Limiter leases: when a reservation is admitted, this many thousandths of the units
    /// still free are reserved on top for this instance to admit locally (no round trip)
    /// for `limiter_lease_ms`; unused units go back. 0 turns leases off (one round trip per
    /// reservation). Default 100 (10%).
    #[serde(default = "default_lease_permille")]
    pub limiter_lease_permille: u32,
    /// How long a limiter lease is used before its unused units go back, ms. Default 250.
    #[serde(default = "default_lease_ms")]
    pub limiter_lease_ms: u64,
    /// What each primitive does when the server cannot be reached in time.
    #[serde(default)]
    pub on_error: FailureModes,
}

fn default_lease_permille() -> u32 {
    100
}
fn default_lease_ms() -> u64 {
    250
}

fn default_prefix() -> String {
    "weir:".to_owned()
}
fn default_connections() -> usize {
    2
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_timeout_ms() -> u64 {
    250
}
fn default_health_interval_ms() -> u64 {
    1_000
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_cache_ttl_ms() -> u64 {
    1_000
}
fn default_cache_max_value_bytes() -> usize {
    64 * 1024
}

/// Fail-closed or fail-open, per primitive (`[state.redis.on_error]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureModes {
    /// `kv` get / set / incr / cas / delete / scan (keys, the cache, plugin data). Default
    /// `closed`.
    #[serde(default = "closed")]
    pub kv: FailureMode,
    /// The rate limiter. Default `open`: an outage of the store lets traffic through
    /// (counted) rather than refusing everyone.
    #[serde(default = "open")]
    pub limiter: FailureMode,
    /// The spend ledger (budgets). Default `closed`: no spending the store cannot count.
    #[serde(default = "closed")]
    pub ledger: FailureMode,
}

impl Default for FailureModes {
    fn default() -> Self {
        FailureModes {
            kv: FailureMode::Closed,
            limiter: FailureMode::Open,
            ledger: FailureMode::Closed,
        }
    }
}

fn closed() -> FailureMode {
    FailureMode::Closed
}
fn open() -> FailureMode {
    FailureMode::Open
}

/// What a call does when the store is unreachable or slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Fail the call: the plugin fails and the request is refused (503).
    Closed,
    /// Answer as if the store allowed it, count the bypass, log once per interval.
    Open,
}

impl RedisConfig {
    /// Checks the settings (at config load).
    pub fn validate(&self) -> Result<(), String> {
        self.connection_info().map(|_| ())?;
        if !(1..=64).contains(&self.connections) {
            return Err(format!(
                "[state.redis] connections = {} must be between 1 and 64",
                self.connections
            ));
        }
        for (name, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("timeout_ms", self.timeout_ms),
            ("health_interval_ms", self.health_interval_ms),
        ] {
            if v == 0 || v > 600_000 {
                return Err(format!(
                    "[state.redis] {name} = {v} must be between 1 and 600000"
                ));
            }
        }
        if self.limiter_lease_permille > 500 {
            return Err(format!(
                "[state.redis] limiter_lease_permille = {} must be at most 500 (half of what is free)",
                self.limiter_lease_permille
            ));
        }
        if self.limiter_lease_ms == 0 || self.limiter_lease_ms > 60_000 {
            return Err(format!(
                "[state.redis] limiter_lease_ms = {} must be between 1 and 60000",
                self.limiter_lease_ms
            ));
        }
        if self.prefix.contains(char::is_whitespace) {
            return Err("[state.redis] prefix must not contain whitespace".into());
        }
        Ok(())
    }

    fn connection_info(&self) -> Result<redis::ConnectionInfo, String> {
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("[state.redis] url is not a Redis URL: {e}"))?;
        Ok(match self.password.as_deref() {
            Some(p) if !p.is_empty() => {
                let settings = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(settings)
            }
            _ => info,
        })
    }

    /// The URL without its password, for logs and errors.
    pub fn display_url(&self) -> String {
        match url_without_password(&self.url) {
            Some(u) => u,
            None => "<unparsable url>".into(),
        }
    }
}

fn url_without_password(raw: &str) -> Option<String> {
    let (scheme, rest) = raw.split_once("://")?;
    let rest = match rest.rsplit_once('@') {
        Some((_, host)) => host,
        None => rest,
    };
    Some(format!("{scheme}://{rest}"))
}

/// The key layout under the configured prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    namespaces: String,
    channel: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            namespaces: format!("{prefix}ns"),
            channel: format!("{prefix}inv"),
        }
    }

    /// Prefix of the data keys of `ns`.
    fn data_prefix(&self, ns: &str) -> String {
        format!("{}kv|{ns}|", self.prefix)
    }

    fn data(&self, ns: &str, key: &str) -> String {
        format!("{}kv|{ns}|{key}", self.prefix)
    }

    fn index(&self, ns: &str) -> String {
        format!("{}ix|{ns}", self.prefix)
    }
}

/// Which primitive a call belongs to (failure mode, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primitive {
    Kv,
    Limiter,
    Ledger,
}

impl Primitive {
    fn label(self) -> &'static str {
        match self {
            Primitive::Kv => "kv",
            Primitive::Limiter => "limiter",
            Primitive::Ledger => "ledger",
        }
    }
}

/// The store's own metrics, registered with the gateway's registry by [`StateStore::metrics`].
#[derive(Clone)]
struct Metrics {
    round_trips: IntCounter,
    errors: IntCounterVec,
    bypass: IntCounterVec,
    cache: IntCounterVec,
    healthy: IntGauge,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label])
        };
        Ok(Metrics {
            round_trips: IntCounter::new(
                "weir_state_redis_round_trips_total",
                "Round trips to the Redis state store (calls; health pings excluded).",
            )?,
            errors: vec(
                "weir_state_redis_errors_total",
                "Redis state calls that failed (unreachable, timeout).",
                "primitive",
            )?,
            bypass: vec(
                "weir_state_bypass_total",
                "State calls answered without the store because it failed and the primitive is fail-open.",
                "primitive",
            )?,
            cache: vec(
                "weir_state_redis_local_cache_total",
                "kv reads by the local read cache of the Redis store (hit, miss, stale).",
                "result",
            )?,
            healthy: IntGauge::new(
                "weir_state_redis_up",
                "1 while the Redis state store answers its health ping.",
            )?,
        })
    }
}

/// Logs a line at most once per interval (per primitive).
struct Throttle {
    last: Mutex<Option<Instant>>,
    every: Duration,
    skipped: AtomicU64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            last: Mutex::new(None),
            every,
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether to log now; returns how many were skipped since the last line.
    fn ready(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

/// The server's health as last seen.
struct Health {
    up: AtomicBool,
    reason: Mutex<String>,
}

/// Shared by the store and its background tasks.
struct Inner {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    keys: Keys,
    url: String,
    timeout: Duration,
    modes: FailureModes,
    cache: LocalCache,
    health: Health,
    metrics: Metrics,
    throttles: [Throttle; 3],
    leases: Leases,
}

/// Limiter units this instance holds (see `limiter_lease_permille`): admitted locally until
/// used up or `ttl` old, then given back.
struct Leases {
    permille: u32,
    ttl: Duration,
    map: Mutex<std::collections::HashMap<LeaseKey, Lease>>,
    /// Recent refusals: a call for at least `amount` before `until` is refused locally (a
    /// client hammering past its limit costs the server one call per lease TTL, not one per
    /// request).
    refused: Mutex<std::collections::HashMap<LeaseKey, Refusal>>,
}

#[derive(Debug, Clone, Copy)]
struct Refusal {
    amount: u64,
    until: Instant,
    outcome: LimitOutcome,
}

/// A lease per limiter: its namespace, key and rate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LeaseKey {
    ns: String,
    key: String,
    limit: u64,
    window: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Units left to admit locally.
    left: u64,
    /// What the server said was free after granting it (for `remaining`).
    remaining: u64,
    reset_after: Duration,
    granted: Instant,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<LeaseKey, Lease>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `amount` from a live lease, if one holds enough.
    fn admit(&self, k: &LeaseKey, amount: u64) -> Option<LimitOutcome> {
        let mut map = self.lock();
        let lease = map.get_mut(k)?;
        if lease.granted.elapsed() >= self.ttl || lease.left < amount {
            return None;
        }
        lease.left -= amount;
        Some(LimitOutcome {
            allowed: true,
            remaining: lease.remaining.saturating_add(lease.left),
            retry_after: Duration::ZERO,
            reset_after: lease.reset_after,
        })
    }

    /// A local refusal of `amount`, while a recent refusal of no more than it holds.
    fn refused(&self, k: &LeaseKey, amount: u64) -> Option<LimitOutcome> {
        let mut map = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let r = *map.get(k)?;
        let now = Instant::now();
        if now >= r.until {
            map.remove(k);
            return None;
        }
        if amount < r.amount {
            return None;
        }
        let left = r.until.duration_since(now);
        Some(LimitOutcome {
            retry_after: r
                .outcome
                .retry_after
                .min(left)
                .max(Duration::from_millis(1)),
            ..r.outcome
        })
    }

    /// Remembers a refusal of `amount` for up to the lease TTL (never past its retry-after).
    fn refuse(&self, k: LeaseKey, amount: u64, outcome: LimitOutcome) {
        let hold = outcome.retry_after.min(self.ttl);
        if hold.is_zero() {
            return;
        }
        let mut map = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(
            k,
            Refusal {
                amount,
                until: Instant::now() + hold,
                outcome,
            },
        );
    }

    /// Takes the lease of `k` out (its unused units are to go back).
    fn take(&self, k: &LeaseKey) -> u64 {
        self.lock().remove(k).map_or(0, |l| l.left)
    }

    /// Units a settle gives back join a live lease instead of costing a round trip; `false`
    /// when there is none.
    fn give(&self, k: &LeaseKey, units: u64) -> bool {
        let mut map = self.lock();
        match map.get_mut(k) {
            Some(l) if l.granted.elapsed() < self.ttl => {
                l.left = l.left.saturating_add(units);
                true
            }
            _ => false,
        }
    }

    /// An overrun a settle charges, taken from a live lease when it holds enough.
    fn charge(&self, k: &LeaseKey, units: u64) -> bool {
        let mut map = self.lock();
        match map.get_mut(k) {
            Some(l) if l.granted.elapsed() < self.ttl && l.left >= units => {
                l.left -= units;
                true
            }
            _ => false,
        }
    }

    /// Removes the leases older than the TTL (all with `all`); returns those with units to
    /// give back.
    fn expired(&self, all: bool) -> Vec<(LeaseKey, u64)> {
        let mut map = self.lock();
        let mut out = Vec::new();
        map.retain(|k, l| {
            if all || l.granted.elapsed() >= self.ttl {
                if l.left > 0 {
                    out.push((k.clone(), l.left));
                }
                false
            } else {
                true
            }
        });
        out
    }
}

/// A [`StateStore`] on a Redis (or Valkey) server shared by several gateways. See the module
/// docs.
pub struct RedisStore {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime: let it go instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl RedisStore {
    /// Connects to the configured server. Fails when the URL is bad or the server cannot be
    /// reached within `connect_timeout_ms` (a gateway does not start on a store it never
    /// saw); once running it survives outages and reconnects by itself.
    pub fn connect(cfg: &RedisConfig) -> Result<RedisStore, StateError> {
        cfg.validate().map_err(StateError::Backend)?;
        let url = cfg.display_url();
        let open_err = |reason: String| StateError::Open {
            path: url.clone(),
            reason,
        };
        let info = cfg.connection_info().map_err(&open_err)?;
        let client = redis::Client::open(info).map_err(|e| open_err(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weir-redis")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("cannot start the Redis runtime: {e}")))?;
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connections = cfg.connections;
        let connect_ms = cfg.connect_timeout_ms;
        let connecting = client.clone();
        let conns = wait_on(
            &runtime.handle().clone(),
            connect_timeout * 2 + Duration::from_secs(1),
            async move {
                let mut conns = Vec::with_capacity(connections);
                for _ in 0..connections {
                    let c = tokio::time::timeout(
                        connect_timeout * 2,
                        connecting.get_connection_manager_with_config(manager_cfg.clone()),
                    )
                    .await
                    .map_err(|_| format!("no answer within {connect_ms} ms"))?
                    .map_err(|e| e.to_string())?;
                    conns.push(c);
                }
                Ok::<_, String>(conns)
            },
        )
        .unwrap_or_else(|| Err(format!("no answer within {connect_ms} ms")));
        let conns = conns.map_err(&open_err)?;
        let metrics = Metrics::new().map_err(|e| open_err(e.to_string()))?;
        metrics.healthy.set(1);
        let throttle = || Throttle::new(Duration::from_secs(10));
        let inner = Arc::new(Inner {
            conns,
            next: AtomicUsize::new(0),
            keys: Keys::new(&cfg.prefix),
            url,
            timeout,
            modes: cfg.on_error,
            cache: LocalCache::new(
                cfg.local_cache_entries,
                Duration::from_millis(cfg.local_cache_ttl_ms),
                cfg.local_cache_max_value_bytes,
                &cfg.prefix,
            ),
            health: Health {
                up: AtomicBool::new(true),
                reason: Mutex::new(String::new()),
            },
            metrics,
            throttles: [throttle(), throttle(), throttle()],
            leases: Leases {
                permille: cfg.limiter_lease_permille,
                ttl: Duration::from_millis(cfg.limiter_lease_ms),
                map: Mutex::new(std::collections::HashMap::new()),
                refused: Mutex::new(std::collections::HashMap::new()),
            },
        });
        let handle = runtime.handle().clone();
        if cfg.local_cache_entries > 0 {
            runtime.spawn(subscriber(inner.clone(), client.clone(), connect_timeout));
        }
        runtime.spawn(health_loop(
            inner.clone(),
            Duration::from_millis(cfg.health_interval_ms),
        ));
        runtime.spawn(index_sweeper(inner.clone(), Duration::from_secs(60)));
        if cfg.limiter_lease_permille > 0 {
            runtime.spawn(lease_returner(
                inner.clone(),
                Duration::from_millis(cfg.limiter_lease_ms),
            ));
        }
        Ok(RedisStore {
            inner,
            runtime: Some(runtime),
            handle,
        })
    }

    /// Whether the local read cache is serving (its invalidation subscription is live).
    pub fn cache_live(&self) -> bool {
        self.inner.cache.live()
    }

    /// Runs `fut` on the store's runtime and waits for it, bounded by the call timeout.
    fn run<T, F>(&self, prim: Primitive, fut: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, RedisError>> + Send + 'static,
    {
        let inner = &self.inner;
        inner.metrics.round_trips.inc();
        let timeout = inner.timeout;
        let received = wait_on(
            &self.handle,
            timeout + Duration::from_millis(500),
            async move { tokio::time::timeout(timeout, fut).await },
        );
        let failure = match received {
            Some(Ok(Ok(v))) => return Ok(v),
            Some(Ok(Err(e))) => match script_error(&e) {
                Some(err) => return Err(err),
                None => e.to_string(),
            },
            Some(Err(_)) | None => format!("no answer within {} ms", timeout.as_millis()),
        };
        inner
            .metrics
            .errors
            .with_label_values(&[prim.label()])
            .inc();
        inner.mark_down(&failure);
        Err(StateError::Unavailable(format!(
            "redis at {}: {failure}",
            inner.url
        )))
    }

    /// A connection, round-robin.
    fn conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Applies the failure mode of `prim` to a failed call: the error when fail-closed, the
    /// `open` answer when fail-open (counted and logged once per interval).
    fn fail<T>(
        &self,
        prim: Primitive,
        what: &str,
        err: StateError,
        open: T,
    ) -> Result<T, StateError> {
        let StateError::Unavailable(reason) = &err else {
            return Err(err);
        };
        let mode = match prim {
            Primitive::Kv => self.inner.modes.kv,
            Primitive::Limiter => self.inner.modes.limiter,
            Primitive::Ledger => self.inner.modes.ledger,
        };
        let throttle = &self.inner.throttles[prim as usize];
        match mode {
            FailureMode::Closed => {
                if let Some(skipped) = throttle.ready() {
                    tracing::error!(primitive = prim.label(), op = what, skipped, error = %reason, "State store unavailable: failing closed.");
                }
                Err(err)
            }
            FailureMode::Open => {
                self.inner
                    .metrics
                    .bypass
                    .with_label_values(&[prim.label()])
                    .inc();
                if let Some(skipped) = throttle.ready() {
                    tracing::warn!(primitive = prim.label(), op = what, skipped, error = %reason, "State store unavailable: failing open (the call was answered without the store).");
                }
                Ok(open)
            }
        }
    }

    /// Invokes a writing script on `ns`/`key` with `args` (the key, namespace and channel are
    /// appended).
    fn write_script<T>(
        &self,
        prim: Primitive,
        script: &'static redis::Script,
        ns: &str,
        key: &str,
        args: Vec<Vec<u8>>,
    ) -> Result<T, StateError>
    where
        T: redis::FromRedisValue + Send + 'static,
    {
        check_ns(ns)?;
        let keys = &self.inner.keys;
        let data = keys.data(ns, key);
        // Our own write invalidates our cache now; others hear it on the channel. Limiter
        // and ledger keys are never cached.
        let cached = !is_primitive_key(key);
        if cached {
            self.inner.cache.invalidate(&data);
        }
        let k = [data, keys.index(ns), keys.namespaces.clone()];
        let tail = [
            key.as_bytes().to_vec(),
            ns.as_bytes().to_vec(),
            keys.channel.as_bytes().to_vec(),
        ];
        let mut con = self.conn();
        let out = self.run(prim, async move {
            let mut inv = script.prepare_invoke();
            for k in &k {
                inv.key(k);
            }
            for a in args.iter().chain(tail.iter()) {
                inv.arg(a.as_slice());
            }
            inv.invoke_async::<T>(&mut con).await
        });
        // Again once written: a read of ours that ran during the write may have cached the
        // old value (our own message on the channel would drop it too, a little later).
        if cached {
            self.inner.cache.invalidate(&self.inner.keys.data(ns, key));
        }
        if matches!(out, Err(StateError::Unavailable(_))) {
            super::write_errors().inc();
        }
        out
    }

    /// Gives `units` of an expired or dropped lease back to the shared limiter.
    fn return_lease(&self, k: &LeaseKey, units: u64) -> Result<(), StateError> {
        let rate = Rate {
            limit: k.limit,
            window: k.window,
        };
        let r: Result<i64, _> = self.write_script(
            Primitive::Limiter,
            &scripts::LIMIT_SETTLE,
            &k.ns,
            &k.key,
            settle_args(rate, units, 0, super::now_ms()),
        );
        r.map(|_| ())
    }

    /// `GET` and the absolute expiry of one data key, one round trip.
    fn fetch(&self, data: String) -> Result<(Option<Vec<u8>>, i64), StateError> {
        let mut con = self.conn();
        self.run(Primitive::Kv, async move {
            redis::pipe()
                .get(&data)
                .cmd("PEXPIRETIME")
                .arg(&data)
                .query_async::<(Option<Vec<u8>>, i64)>(&mut con)
                .await
        })
    }

    /// One page of live entries of `ns` in the lexical range `min..max` (Redis range syntax).
    fn range(
        &self,
        ns: &str,
        min: String,
        max: String,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>, i64)>, StateError> {
        check_ns(ns)?;
        let index = self.inner.keys.index(ns);
        let prefix = self.inner.keys.data_prefix(ns);
        let mut con = self.conn();
        let flat: Vec<Value> = self.run(Primitive::Kv, async move {
            scripts::RANGE
                .key(index)
                .arg(min)
                .arg(max)
                .arg(limit.min(1_000_000))
                .arg(prefix)
                .invoke_async(&mut con)
                .await
        })?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v), Some(e)) = (it.next(), it.next(), it.next()) {
            let key = bytes_of(k).map(|b| String::from_utf8_lossy(&b).into_owned());
            let value = bytes_of(v);
            let expires = bytes_of(e)
                .and_then(|b| String::from_utf8_lossy(&b).parse::<i64>().ok())
                .unwrap_or(-1);
            if let (Some(key), Some(value)) = (key, value) {
                out.push((key, value, expires));
            }
        }
        Ok(out)
    }
}

impl Inner {
    fn mark_down(&self, reason: &str) {
        if self.health.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(url = %self.url, error = %reason, "Redis state store unreachable.");
        }
        self.metrics.healthy.set(0);
        *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_owned();
    }

    fn mark_up(&self) {
        if !self.health.up.swap(true, Ordering::AcqRel) {
            tracing::info!(url = %self.url, "Redis state store reachable again.");
        }
        self.metrics.healthy.set(1);
    }
}

/// The arguments of the limiter's settle script.
fn settle_args(rate: Rate, reserved: u64, used: u64, now_ms: u64) -> Vec<Vec<u8>> {
    vec![
        rate.limit.to_string().into_bytes(),
        rate.window.as_nanos().to_string().into_bytes(),
        reserved.to_string().into_bytes(),
        used.to_string().into_bytes(),
        now_ms.to_string().into_bytes(),
    ]
}

/// Gives the unused units of expired limiter leases back, every lease TTL, off the request
/// path (a lease that expires unused costs one round trip here, none on a request).
async fn lease_returner(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (k, units) in inner.leases.expired(false) {
            let rate = Rate {
                limit: k.limit,
                window: k.window,
            };
            let mut con = inner.conns[0].clone();
            let mut call = scripts::LIMIT_SETTLE.prepare_invoke();
            call.key(inner.keys.data(&k.ns, &k.key))
                .key(inner.keys.index(&k.ns))
                .key(&inner.keys.namespaces);
            for a in settle_args(rate, units, 0, super::now_ms()) {
                call.arg(a);
            }
            call.arg(&k.key).arg(&k.ns).arg(&inner.keys.channel);
            inner.metrics.round_trips.inc();
            // A lease that cannot go back (the server is down) is forgotten: its units come
            // back by themselves as the limiter drains.
            let _ = tokio::time::timeout(inner.timeout, call.invoke_async::<Value>(&mut con)).await;
        }
    }
}

/// Runs `fut` on `handle`'s runtime and waits for its output, at most `bound` (`None` past
/// it). Waiting blocks the calling thread: inside `block_in_place` on a multi-thread runtime's
/// worker (so its other tasks move on), plainly elsewhere (other runtimes, plain threads).
fn wait_on<T, F>(handle: &tokio::runtime::Handle, bound: Duration, fut: F) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let wait = || rx.recv_timeout(bound).ok();
    let started = Instant::now();
    let out = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    super::note_blocked(started.elapsed());
    out
}

/// The bytes of a bulk or simple string reply.
fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Whether `key` is a limiter's or a ledger account's (written by scripts that do not publish).
fn is_primitive_key(key: &str) -> bool {
    key.starts_with("lim/") || key.starts_with("led/")
}

/// A namespace may not hold the key separator.
fn check_ns(ns: &str) -> Result<(), StateError> {
    if ns.contains('|') {
        return Err(StateError::Backend(format!(
            "namespace '{ns}' contains '|', which the Redis key layout reserves"
        )));
    }
    Ok(())
}

/// The errors our scripts raise on purpose (`NOTINT`, `OVERFLOW`), as state errors.
fn script_error(e: &RedisError) -> Option<StateError> {
    let text = format!(
        "{} {}",
        e.code().unwrap_or_default(),
        e.detail().unwrap_or_default()
    );
    let key = String::new();
    if text.contains("NOTINT") {
        Some(StateError::NotAnInteger { key })
    } else if text.contains("OVERFLOW") {
        Some(StateError::Overflow { key })
    } else if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        || e.code().is_some()
    {
        // Any other server error (a script bug, WRONGTYPE): not an outage.
        Some(StateError::Backend(e.to_string()))
    } else {
        None
    }
}

/// Fills in the key of a script's typed error.
fn with_key(r: Result<i64, StateError>, full: &str) -> Result<i64, StateError> {
    r.map_err(|e| match e {
        StateError::NotAnInteger { .. } => StateError::NotAnInteger {
            key: full.to_owned(),
        },
        StateError::Overflow { .. } => StateError::Overflow {
            key: full.to_owned(),
        },
        other => other,
    })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn ttl_arg(ttl: Option<Duration>) -> Vec<u8> {
    ttl.map_or(0, ms).to_string().into_bytes()
}

fn parse_num(v: &[u8]) -> f64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A float reply as a saturating u64 / i64.
fn as_u64(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x as u64
    }
}

fn as_i64(x: f64) -> i64 {
    if x.is_nan() {
        0
    } else {
        x.clamp(i64::MIN as f64, i64::MAX as f64) as i64
    }
}

fn balance_of(reply: &[Vec<u8>]) -> (bool, Balance) {
    let get = |i: usize| reply.get(i).map_or(0.0, |v| parse_num(v));
    (
        get(0) == 1.0,
        Balance {
            spent_micros: as_i64(get(1)),
            reserved_micros: as_i64(get(2)),
        },
    )
}

impl StateStore for RedisStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        check_ns(ns)?;
        let data = self.inner.keys.data(ns, key);
        // Limiter and ledger keys change on every request and are not published: never cached.
        let cacheable = self.inner.cache.enabled() && !is_primitive_key(key);
        let cache = &self.inner.cache;
        if cacheable && let Some(hit) = cache.lookup(&data) {
            self.inner.metrics.cache.with_label_values(&["hit"]).inc();
            return Ok(hit);
        }
        let ticket = cache.ticket(&data);
        match self.fetch(data.clone()) {
            Ok((value, expires)) => {
                if cacheable {
                    self.inner.metrics.cache.with_label_values(&["miss"]).inc();
                    cache.insert(ticket, data, value.clone(), expires);
                }
                Ok(value)
            }
            Err(e) => {
                if let Some(stale) = cacheable.then(|| cache.stale(&data)).flatten() {
                    self.inner.metrics.cache.with_label_values(&["stale"]).inc();
                    return Ok(stale);
                }
                self.fail(Primitive::Kv, "get", e, None)
            }
        }
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let r: Result<i64, _> = self.write_script(
            Primitive::Kv,
            &scripts::SET,
            ns,
            key,
            vec![value.to_vec(), ttl_arg(ttl)],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) => self.fail(Primitive::Kv, "set", e, ()),
        }
    }

    fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        let r = self.write_script(
            Primitive::Kv,
            &scripts::INCR,
            ns,
            key,
            vec![delta.to_string().into_bytes(), ttl_arg(ttl)],
        );
        match with_key(r, key) {
            Ok(n) => Ok(n),
            Err(e) => self.fail(Primitive::Kv, "incr", e, delta),
        }
    }

    fn cas(
        &self,
        ns: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        let flag = |b: bool| if b { b"1".to_vec() } else { b"0".to_vec() };
        let r: Result<i64, _> = self.write_script(
            Primitive::Kv,
            &scripts::CAS,
            ns,
            key,
            vec![
                flag(expected.is_some()),
                expected.unwrap_or_default().to_vec(),
                flag(new.is_some()),
                new.unwrap_or_default().to_vec(),
                ttl_arg(ttl),
            ],
        );
        match r {
            Ok(n) => Ok(n == 1),
            Err(e) => self.fail(Primitive::Kv, "cas", e, false),
        }
    }

    fn delete(&self, ns: &str, key: &str) -> Result<bool, StateError> {
        let r: Result<i64, _> =
            self.write_script(Primitive::Kv, &scripts::DELETE, ns, key, Vec::new());
        match r {
            Ok(n) => Ok(n > 0),
            Err(e) => self.fail(Primitive::Kv, "delete", e, false),
        }
    }

    fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Keys are UTF-8, which never holds the byte 0xFF: `prefix + 0xFF` bounds the range.
        let min = format!("[{prefix}");
        let max = format!("[{prefix}\u{10FFFF}");
        match self.range(ns, min, max, limit) {
            Ok(rows) => Ok(rows.into_iter().map(|(k, v, _)| (k, v)).collect()),
            Err(e) => self.fail(Primitive::Kv, "scan", e, Vec::new()),
        }
    }

    fn flush(&self) -> Result<(), StateError> {
        // Nothing is written behind; leased limiter units go back to the shared limiter.
        let leases = &self.inner.leases;
        leases
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for (k, units) in leases.expired(true) {
            self.return_lease(&k, units)?;
        }
        Ok(())
    }

    fn health(&self) -> Result<(), String> {
        if self.inner.health.up.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self
            .inner
            .health
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Err(format!("redis at {} unreachable: {reason}", self.inner.url))
    }

    fn metrics(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        let m = &self.inner.metrics;
        vec![
            Box::new(m.round_trips.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.bypass.clone()),
            Box::new(m.cache.clone()),
            Box::new(m.healthy.clone()),
        ]
    }

    fn update(
        &self,
        ns: &str,
        key: &str,
        step: &mut super::UpdateStep<'_>,
    ) -> Result<(), StateError> {
        // A generic step runs here, so it cannot run in a script: compare-and-swap against
        // the server's value (reads bypass the local cache for this).
        check_ns(ns)?;
        for _ in 0..primitives::CAS_TRIES {
            let (current, _) = match self.fetch(self.inner.keys.data(ns, key)) {
                Ok(v) => v,
                Err(e) => return self.fail(Primitive::Kv, "update", e, ()),
            };
            let Some((value, ttl)) = step(current.as_deref())? else {
                return Ok(());
            };
            if self.cas(ns, key, current.as_deref(), Some(&value), ttl)? {
                return Ok(());
            }
        }
        Err(StateError::Backend(format!(
            "contention: {} compare-and-swap attempts on '{key}' in '{ns}' lost",
            primitives::CAS_TRIES
        )))
    }

    fn limit_reserve(
        &self,
        ns: &str,
        key: &str,
        rate: Rate,
        amount: u64,
        now_ms: u64,
    ) -> Result<LimitOutcome, StateError> {
        if primitives::admits_nothing(rate) {
            return Ok(primitives::refuse_all(rate));
        }
        let full = primitives::limiter_key(key);
        let leases = &self.inner.leases;
        let lease_key = LeaseKey {
            ns: ns.to_owned(),
            key: full.clone(),
            limit: rate.limit,
            window: rate.window,
        };
        let leasing = leases.permille > 0 && amount > 0;
        if leasing {
            if let Some(out) = leases.admit(&lease_key, amount) {
                return Ok(out);
            }
            if let Some(out) = leases.refused(&lease_key, amount) {
                return Ok(out);
            }
        }
        // To the server: what is left of this instance's lease goes back in the same call.
        let give_back = if leasing { leases.take(&lease_key) } else { 0 };
        let permille = if leasing { leases.permille } else { 0 };
        let r: Result<Vec<Vec<u8>>, _> = self.write_script(
            Primitive::Limiter,
            &scripts::LIMIT_RESERVE,
            ns,
            &full,
            vec![
                rate.limit.to_string().into_bytes(),
                rate.window.as_nanos().to_string().into_bytes(),
                amount.to_string().into_bytes(),
                give_back.to_string().into_bytes(),
                permille.to_string().into_bytes(),
                now_ms.to_string().into_bytes(),
            ],
        );
        let reply = match r {
            Ok(reply) => reply,
            Err(StateError::NotAnInteger { .. }) => {
                return Err(StateError::NotAnInteger { key: full });
            }
            Err(e) => {
                let open = LimitOutcome {
                    allowed: true,
                    remaining: rate.limit.saturating_sub(amount),
                    retry_after: Duration::ZERO,
                    reset_after: Duration::ZERO,
                };
                return self.fail(Primitive::Limiter, "limit_reserve", e, open);
            }
        };
        let get = |i: usize| reply.get(i).map_or(0.0, |v| parse_num(v));
        let retry = get(2);
        let leased = as_u64(get(4));
        let outcome = LimitOutcome {
            allowed: get(0) == 1.0,
            remaining: as_u64(get(1)).saturating_add(leased),
            retry_after: if retry < 0.0 {
                rate.window
            } else {
                Duration::from_millis(as_u64(retry))
            },
            reset_after: Duration::from_millis(as_u64(get(3))),
        };
        if leasing && !outcome.allowed {
            leases.refuse(lease_key.clone(), amount, outcome);
        }
        if leased > 0 {
            leases.lock().insert(
                lease_key,
                Lease {
                    left: leased,
                    remaining: as_u64(get(1)),
                    reset_after: outcome.reset_after,
                    granted: Instant::now(),
                },
            );
        }
        Ok(outcome)
    }

    fn limit_settle(
        &self,
        ns: &str,
        key: &str,
        rate: Rate,
        reserved: u64,
        used: u64,
        now_ms: u64,
    ) -> Result<(), StateError> {
        if used == reserved || primitives::admits_nothing(rate) {
            return Ok(());
        }
        let full = primitives::limiter_key(key);
        let leases = &self.inner.leases;
        if leases.permille > 0 {
            let lease_key = LeaseKey {
                ns: ns.to_owned(),
                key: full.clone(),
                limit: rate.limit,
                window: rate.window,
            };
            let settled_locally = if used < reserved {
                leases.give(&lease_key, reserved - used)
            } else {
                leases.charge(&lease_key, used - reserved)
            };
            if settled_locally {
                return Ok(());
            }
        }
        let r: Result<i64, _> = self.write_script(
            Primitive::Limiter,
            &scripts::LIMIT_SETTLE,
            ns,
            &full,
            settle_args(rate, reserved, used, now_ms),
        );
        match r {
            Ok(_) => Ok(()),
            Err(StateError::NotAnInteger { .. }) => Err(StateError::NotAnInteger { key: full }),
            Err(e) => self.fail(Primitive::Limiter, "limit_settle", e, ()),
        }
    }

    fn ledger_reserve(
        &self,
        ns: &str,
        account: &str,
        limit_micros: i64,
        amount_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<(bool, Balance), StateError> {
        let full = primitives::ledger_key(account);
        let r: Result<Vec<Vec<u8>>, _> = self.write_script(
            Primitive::Ledger,
            &scripts::LEDGER_RESERVE,
            ns,
            &full,
            vec![
                limit_micros.to_string().into_bytes(),
                amount_micros.to_string().into_bytes(),
                ttl_arg(ttl),
            ],
        );
        match r {
            Ok(reply) => Ok(balance_of(&reply)),
            Err(StateError::NotAnInteger { .. }) => Err(StateError::NotAnInteger { key: full }),
            Err(e) => self.fail(
                Primitive::Ledger,
                "ledger_reserve",
                e,
                (true, Balance::default()),
            ),
        }
    }

    fn ledger_settle(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
        cost_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<Balance, StateError> {
        let full = primitives::ledger_key(account);
        let r: Result<Vec<Vec<u8>>, _> = self.write_script(
            Primitive::Ledger,
            &scripts::LEDGER_SETTLE,
            ns,
            &full,
            vec![
                reserved_micros.to_string().into_bytes(),
                cost_micros.to_string().into_bytes(),
                ttl_arg(ttl),
            ],
        );
        match r {
            Ok(reply) => Ok(balance_of(&reply).1),
            Err(StateError::NotAnInteger { .. }) => Err(StateError::NotAnInteger { key: full }),
            Err(e) => self.fail(Primitive::Ledger, "ledger_settle", e, Balance::default()),
        }
    }

    fn ledger_release(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
    ) -> Result<Balance, StateError> {
        let full = primitives::ledger_key(account);
        let r: Result<Vec<Vec<u8>>, _> = self.write_script(
            Primitive::Ledger,
            &scripts::LEDGER_RELEASE,
            ns,
            &full,
            vec![reserved_micros.to_string().into_bytes()],
        );
        match r {
            Ok(reply) => Ok(balance_of(&reply).1),
            Err(StateError::NotAnInteger { .. }) => Err(StateError::NotAnInteger { key: full }),
            Err(e) => self.fail(Primitive::Ledger, "ledger_release", e, Balance::default()),
        }
    }

    fn ledger_balance(&self, ns: &str, account: &str) -> Result<Balance, StateError> {
        let full = primitives::ledger_key(account);
        let r: Result<Vec<Vec<u8>>, _> = self.write_script(
            Primitive::Ledger,
            &scripts::LEDGER_READ,
            ns,
            &full,
            Vec::new(),
        );
        match r {
            Ok(reply) => Ok(balance_of(&reply).1),
            Err(StateError::NotAnInteger { .. }) => Err(StateError::NotAnInteger { key: full }),
            Err(e) => self.fail(Primitive::Ledger, "ledger_balance", e, Balance::default()),
        }
    }
}

/// Keeps the local cache coherent: subscribes to the invalidation channel, drops each key
/// it names; on any break, turns the cache off until subscribed again, then empties it.
async fn subscriber(inner: Arc<Inner>, client: redis::Client, connect_timeout: Duration) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::time::timeout(connect_timeout, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&inner.keys.channel).await?;
            Ok::<_, RedisError>(ps)
        })
        .await;
        let mut ps = match connected {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis invalidation subscription failed; retrying.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Anything cached before this point may have missed an invalidation.
        inner.cache.go_live();
        let kick = inner.cache.kicked();
        {
            let mut messages = ps.on_message();
            loop {
                tokio::select! {
                    msg = messages.next() => match msg {
                        Some(msg) => inner.cache.invalidate_message(msg.get_payload_bytes()),
                        None => break,
                    },
                    () = kick.notified() => break,
                }
            }
        }
        inner.cache.go_dark();
        tracing::debug!("Redis invalidation subscription ended; local cache off until it is back.");
    }
}

/// Pings the server every `every`: drives health and `/readyz`, and recovers the flag once
/// the server answers again. A failed ping also restarts the invalidation subscription
/// (its connection may be half-open).
async fn health_loop(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Every connection: a failed ping also makes a broken one reconnect, so once the
        // store is reported up again every call finds a working connection.
        let mut failure = None;
        for con in &inner.conns {
            let mut con = con.clone();
            let ping = tokio::time::timeout(
                inner.timeout.max(Duration::from_millis(500)),
                redis::cmd("PING").query_async::<String>(&mut con),
            )
            .await;
            match ping {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failure = Some(e.to_string()),
                Err(_) => failure = Some("health ping timed out".to_owned()),
            }
        }
        match failure {
            None => inner.mark_up(),
            Some(reason) => {
                inner.mark_down(&reason);
                inner.cache.kick();
            }
        }
    }
}

/// Drops index entries whose value expired (the index has no expiry of its own), a page at a
/// time for every namespace, so the index of a key space with TTLs does not grow forever.
async fn index_sweeper(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut con = inner.conns[0].clone();
        let Ok(Ok(namespaces)) = tokio::time::timeout(
            Duration::from_secs(5),
            redis::cmd("SMEMBERS")
                .arg(&inner.keys.namespaces)
                .query_async::<Vec<String>>(&mut con),
        )
        .await
        else {
            continue;
        };
        for ns in namespaces {
            // RANGE drops the dead members it walks past; a page of 10k live ones per pass.
            let mut call = scripts::RANGE.prepare_invoke();
            call.key(inner.keys.index(&ns))
                .arg("-")
                .arg("+")
                .arg(10_000)
                .arg(inner.keys.data_prefix(&ns));
            let _ =
                tokio::time::timeout(Duration::from_secs(5), call.invoke_async::<Value>(&mut con))
                    .await;
        }
    }
}

#[cfg(test)]
mod tests;
