//! Durable key-value state: the [`StateStore`] trait and its backends.
//!
//! Plugins reach state through the host API (`kv get / set / incr / cas / delete`); the gateway
//! itself will keep keys, usage and caches here too. Every call names a *namespace*: one per
//! plugin (`plugin/<name>`, see [`plugin_namespace`]), so two plugins never see each other's
//! keys, and because the namespace is the plugin's *name* (not a load generation) its state
//! survives reloads and restarts.
//!
//! Backends:
//! - [`SledStore`]: embedded, on disk, one sled tree per namespace.
//! - [`WriteBehindStore`] (what [`open`] returns): an in-memory front for sled that writes
//!   behind every `[state] flush_interval_ms` (100 ms), so counters and short-lived keys
//!   cost no sled work on the request path; a crash loses at most that interval more than
//!   sled alone would (see its module docs).
//! - [`RedisStore`] (`[state] backend = "redis"`): a Redis or Valkey server shared by several
//!   gateway instances; one server-side script per operation, a local read cache kept
//!   coherent by pub/sub, limiter leases (see its module docs and docs/operations.md).
//! - [`MemoryStore`]: a process-local map, for tests and `weir plugin test`.
//!
//! TTL: neither backend has native expiry, so each value is stored with its expiry time
//! (milliseconds since the Unix epoch, wall clock so it survives restarts). A read treats an
//! expired value as absent (lazy expiry) and a periodic sweep deletes them
//! ([`SledStore::spawn_sweeper`]).
//!
//! # Limiter and spend ledger
//! Two policy primitives sit in the trait itself, so plugins and the gateway stop rebuilding
//! them on raw `incr` / `cas`, and a shared backend can make each call one atomic operation.
//! Both have default implementations on top of [`StateStore::get`] and [`StateStore::cas`]: a
//! read, a pure computation, then a compare-and-swap against what was read, retried up to 64
//! times (then [`StateError::Backend`] `"contention ..."`). That makes every call atomic per
//! key on one instance for every backend here (sled, the write-behind front, memory), whose
//! `cas` is atomic per key. A shared backend (Redis) must override each method with **one
//! server-side script per call** (read, decide and write in the script, e.g. `EVALSHA`), so
//! instances sharing a key never interleave; the defaults would be correct there too, but
//! cost two round trips per attempt and retry under contention.
//!
//! **Limiter** ([`StateStore::limit_reserve`], [`StateStore::limit_settle`]): GCRA, keyed,
//! `limit` units per `window` with bursts up to `limit`. The emission interval is
//! `T = window / limit`; the key `lim/<key>` holds the *theoretical arrival time* (TAT, in
//! nanoseconds since the Unix epoch, decimal). Reserving `amount` computes
//! `new_tat = max(tat, now) + amount * T` and admits iff `new_tat - now <= window` (the whole
//! amount fits), storing `new_tat` only then; a refusal stores nothing. Tokens are
//! reserve-then-settle: reserve the estimate, then settle with what was really used, which
//! moves the TAT back (unused units return, never below now) or forward (the overrun is
//! charged, even past the window, so later calls wait it out). The clock is the caller's
//! `now_ms` (wall-clock ms), so tests and fixtures can fix it; the stored value expires about
//! a window after the limiter is full again. Math is integer nanoseconds (u128).
//!
//! **Spend ledger** ([`StateStore::ledger_reserve`], [`StateStore::ledger_settle`],
//! [`StateStore::ledger_release`], [`StateStore::ledger_balance`]): an account `led/<account>`
//! holds what was spent and what is reserved, in integer micro-USD (decimal,
//! `"<spent> <reserved>"`, plus ` <expires_ms>` when it has a TTL). A request reserves its
//! worst case against a limit (admitted iff `spent + reserved + amount <= limit`), then
//! settles its real cost (the reservation is returned and the cost added in full, even when
//! it exceeds the reservation: spend is never lost) or releases the reservation on failure.
//! A budget period is part of the account name; the TTL given when the account is created
//! makes it expire, and later updates keep that expiry.

pub mod cli;
pub mod memory;
pub mod migrate;
mod primitives;
pub mod redis;
pub mod sled;
pub mod write_behind;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

pub use self::memory::MemoryStore;
pub use self::redis::{FailureMode, FailureModes, RedisConfig, RedisStore};
pub use self::sled::SledStore;
pub use self::write_behind::WriteBehindStore;

/// Error from a state backend.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend failed (I/O, corruption).
    #[error("state backend: {0}")]
    Backend(String),
    /// `incr` on a key whose value is not a decimal integer.
    #[error("state: key '{key}' does not hold an integer")]
    NotAnInteger {
        /// The key.
        key: String,
    },
    /// `incr` would overflow an `i64`.
    #[error("state: key '{key}' would overflow")]
    Overflow {
        /// The key.
        key: String,
    },
    /// The shared store could not be reached in time, and the primitive is fail-closed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The sled directory is locked by another process: a gateway is running on it.
    #[error("state: {path} is in use by another process (a running gateway holds its lock)")]
    Locked {
        /// The directory.
        path: String,
    },
    /// The state directory could not be opened.
    #[error("state: cannot open {path}: {reason}")]
    Open {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A limiter rate: `limit` units per `window` (GCRA; bursts up to `limit`).
///
/// A limit of 0 or a zero window admits nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units admitted per window, and the largest burst.
    pub limit: u64,
    /// The window.
    pub window: Duration,
}

/// What the limiter answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOutcome {
    /// Whether the whole amount was admitted (and reserved).
    pub allowed: bool,
    /// Units that would still be admitted after this call.
    pub remaining: u64,
    /// When refused: the wait until the amount fits (rounded up to whole ms, so a call at
    /// `now_ms + retry_after` fits unless others reserve first). `window` when it never fits
    /// (amount above the limit, limit 0). Zero when allowed.
    pub retry_after: Duration,
    /// The wait until the limiter is full again (rounded up to whole ms).
    pub reset_after: Duration,
}

/// A spend-ledger account, in micro-USD (integers, so backends add them atomically).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Settled spend.
    pub spent_micros: i64,
    /// Reserved by requests in flight.
    pub reserved_micros: i64,
}

/// What a [`StateStore::update`] step decides: the value to store and its time-to-live, or
/// `None` to leave the key as it is.
pub type Update = Option<(Vec<u8>, Option<Duration>)>;

/// One stored entry with its absolute expiry, for export and import
/// ([`StateStore::entries`], [`StateStore::put_entry`], [`migrate`]).
///
/// A ledger account (`led/...`) may come in either of its two stored forms (see
/// [`StateStore::put_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, as [`StateStore::get`] returns it.
    pub value: Vec<u8>,
    /// ms since the Unix epoch; None = never
    pub expires_ms: Option<u64>,
}

/// A step of [`StateStore::update`]: given the live value of the key (or `None`), what to
/// store.
pub type UpdateStep<'a> = dyn FnMut(Option<&[u8]>) -> Result<Update, StateError> + 'a;

/// A namespaced key-value store with TTL, shared by all plugins and the gateway.
///
/// All operations are atomic per key. Values are opaque bytes; `incr` keeps its counter as a
/// decimal ASCII integer so that `get` on a counter returns a readable number.
pub trait StateStore: Send + Sync {
    /// The value of `key`, or `None` if it is absent or expired.
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError>;

    /// Stores `value` under `key`, expiring after `ttl` (never when `None`).
    fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError>;

    /// Adds `delta` to the integer at `key` (absent counts as 0) and returns the new value.
    ///
    /// `ttl` applies only when the key is created (absent or expired): an existing counter
    /// keeps its expiry, which gives fixed-window rate limits their natural shape.
    fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError>;

    /// Replaces the value of `key` with `new` (or deletes it when `new` is `None`) only if its
    /// current value is `expected` (`None` = absent or expired). Returns whether it swapped.
    fn cas(
        &self,
        ns: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError>;

    /// Deletes `key`; returns whether a live value was there.
    fn delete(&self, ns: &str, key: &str) -> Result<bool, StateError>;

    /// Up to `limit` live entries whose key starts with `prefix`, in key order.
    fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError>;

    /// Every namespace that holds at least one entry, sorted.
    fn namespaces(&self) -> Result<Vec<String>, StateError>;

    /// Up to `limit` live entries of `ns` with keys after `after` (exclusive; None = from the start), in key order.
    ///
    /// A ledger account (`led/<account>`) comes as its backend stores it: `"<spent>
    /// <reserved>"`, plus ` <expires_ms>` on sled and memory when it has a TTL (Redis keeps
    /// the TTL natively and the value in two fields). `expires_ms` is set either way.
    fn entries(
        &self,
        ns: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StateError>;

    /// Stores an entry with an absolute expiry (an already expired one is skipped).
    ///
    /// Replaces what `entry.key` holds. A ledger account (`led/...` whose value is an
    /// account, in either form) is stored in this backend's own form: sled and memory write
    /// `"<spent> <reserved> <expires_ms>"` when it expires (their primitives keep the expiry
    /// only through the value), Redis writes `"<spent> <reserved>"` with a native expiry. The
    /// earlier of the value's expiry and `entry.expires_ms` applies.
    fn put_entry(&self, ns: &str, entry: &Entry) -> Result<(), StateError>;

    /// Makes every write so far durable (on disk), e.g. at shutdown. Default: nothing to do.
    fn flush(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// Whether the store is serving: `Err(reason)` while it is not (e.g. the disk is full,
    /// the shared store is unreachable). `/readyz` answers 503 with the reason meanwhile.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// The store's own metrics, for the gateway to register. Default: none.
    fn metrics(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }

    /// Reads `key` and stores what `step` decides, atomically per key: `step` gets the live
    /// value (or `None`) and returns the value to store with its time-to-live, or `None` to
    /// leave the key as it is. The limiter and the ledger are steps run through this.
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (at most 64 tries, then
    /// `StateError::Backend("contention ...")`). A backend with a lock per key overrides it
    /// with one locked step (the write-behind front does), a shared backend with a script.
    fn update(&self, ns: &str, key: &str, step: &mut UpdateStep<'_>) -> Result<(), StateError> {
        primitives::cas_loop(self, ns, key, step)
    }

    /// Reserves `amount` units of the GCRA limiter `key` (stored as `lim/<key>` in `ns`) at
    /// `now_ms` (ms since the Unix epoch): admitted iff the whole amount fits in the burst,
    /// and then reserved; a refusal changes nothing. `amount` 0 only reads. An amount above
    /// `rate.limit`, or a rate with limit 0, is always refused (`retry_after` = window).
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (see the module docs).
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
        primitives::read_modify_write(self, ns, &primitives::limiter_key(key), |stored| {
            primitives::limit_reserve_step(key, stored, rate, amount, now_ms)
        })
    }

    /// Settles a reservation of `reserved` units on limiter `key` with the `used` units it
    /// really took: unused units go back (never past a full limiter), an overrun is charged
    /// (even past the window). `rate` must be the one the reservation used.
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (see the module docs).
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
        primitives::read_modify_write(self, ns, &primitives::limiter_key(key), |stored| {
            primitives::limit_settle_step(key, stored, rate, reserved, used, now_ms)
        })
    }

    /// Reserves `amount_micros` on ledger `account` (stored as `led/<account>` in `ns`) iff
    /// `spent + reserved + amount <= limit_micros`; returns whether it did and the balance
    /// after. A refusal changes nothing. `ttl` applies only when this creates the account.
    /// A negative amount counts as 0.
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (see the module docs).
    fn ledger_reserve(
        &self,
        ns: &str,
        account: &str,
        limit_micros: i64,
        amount_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<(bool, Balance), StateError> {
        primitives::read_modify_write(self, ns, &primitives::ledger_key(account), |stored| {
            primitives::ledger_reserve_step(account, stored, limit_micros, amount_micros, ttl)
        })
    }

    /// Settles a reservation: returns `reserved_micros` (the reserved total never goes below
    /// 0) and adds `cost_micros` to the spend in full, even beyond the reservation. `ttl`
    /// applies only when this creates the account. Negative amounts count as 0.
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (see the module docs).
    fn ledger_settle(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
        cost_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<Balance, StateError> {
        primitives::read_modify_write(self, ns, &primitives::ledger_key(account), |stored| {
            primitives::ledger_settle_step(account, stored, reserved_micros, cost_micros, ttl)
        })
    }

    /// Returns a reservation unspent (a request that failed): the reserved total drops by
    /// `reserved_micros`, never below 0. An absent account stays absent.
    ///
    /// Default: a compare-and-swap loop over `get` / `cas` (see the module docs).
    fn ledger_release(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
    ) -> Result<Balance, StateError> {
        primitives::read_modify_write(self, ns, &primitives::ledger_key(account), |stored| {
            primitives::ledger_release_step(account, stored, reserved_micros)
        })
    }

    /// The balance of ledger `account`: zeros when it is absent or expired.
    fn ledger_balance(&self, ns: &str, account: &str) -> Result<Balance, StateError> {
        let stored = self.get(ns, &primitives::ledger_key(account))?;
        primitives::ledger_balance_of(account, stored.as_deref())
    }
}

/// Which store holds the shared state (`[state] backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded sled in `path`: one gateway process.
    #[default]
    Sled,
    /// A Redis or Valkey server (`[state.redis]`), shared by several gateways.
    Redis,
}

impl Backend {
    /// The name in the config (`sled`, `redis`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Redis => "redis",
        }
    }
}

/// `[state]` in `weir.toml`: where durable state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `sled` (default) or `redis`.
    #[serde(default)]
    pub backend: Backend,
    /// The Redis server, for `backend = "redis"`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Directory of the sled database, relative to the config file. Default `weir-state`.
    /// With `backend = "redis"` it still holds what stays local to one instance (the request
    /// log).
    #[serde(default = "default_state_path")]
    pub path: String,
    /// Seconds between sweeps that delete expired values. Default 60.
    #[serde(default = "default_sweep_secs")]
    pub sweep_interval_secs: u64,
    /// Milliseconds between writes of in-memory state to disk (the write-behind front, see
    /// [`WriteBehindStore`]); a crash loses at most this much more than sled's own 500 ms.
    /// 0 writes every change to sled as it happens. Default 100.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: Backend::Sled,
            redis: None,
            path: default_state_path(),
            sweep_interval_secs: default_sweep_secs(),
            flush_interval_ms: default_flush_interval_ms(),
        }
    }
}

fn default_flush_interval_ms() -> u64 {
    100
}

fn default_state_path() -> String {
    "weir-state".to_owned()
}

fn default_sweep_secs() -> u64 {
    60
}

impl StateConfig {
    /// Checks the section (at config load): `backend = "redis"` needs `[state.redis]`.
    pub fn validate(&self) -> Result<(), String> {
        match (self.backend, &self.redis) {
            (Backend::Redis, None) => {
                Err("[state] backend = \"redis\" needs a [state.redis] section with url".into())
            }
            (Backend::Redis, Some(r)) => r.validate(),
            (Backend::Sled, Some(_)) => Err(
                "[state.redis] is set but [state] backend is \"sled\": set backend = \"redis\" or remove the section"
                    .into(),
            ),
            (Backend::Sled, None) => Ok(()),
        }
    }

    /// The database directory: `path`, relative to the directory of `config_file`.
    pub fn resolve(&self, config_file: &Path) -> PathBuf {
        let base = config_file.parent().unwrap_or_else(|| Path::new("."));
        base.join(&self.path)
    }
}

/// The stores a gateway process uses.
#[derive(Clone)]
pub struct Stores {
    /// Keys, usage, spend, limits, the cache, plugin kv: shared by every instance when the
    /// backend is Redis.
    pub shared: Arc<dyn StateStore>,
    /// What stays with one instance (the request log): the sled store of `path`, the same
    /// store as `shared` when the backend is sled.
    pub local: Arc<dyn StateStore>,
}

/// Opens the configured store: sled (behind the write-behind front unless
/// `flush_interval_ms` is 0, with its expiry sweeper and flusher) or Redis.
pub fn open(cfg: &StateConfig, config_file: &Path) -> Result<Arc<dyn StateStore>, StateError> {
    match cfg.backend {
        Backend::Sled => open_sled(cfg, config_file),
        Backend::Redis => open_redis(cfg),
    }
}

/// Opens the shared store and the local one (see [`Stores`]).
pub fn open_stores(cfg: &StateConfig, config_file: &Path) -> Result<Stores, StateError> {
    match cfg.backend {
        Backend::Sled => {
            let store = open_sled(cfg, config_file)?;
            Ok(Stores {
                shared: store.clone(),
                local: store,
            })
        }
        Backend::Redis => Ok(Stores {
            shared: open_redis(cfg)?,
            local: open_sled(cfg, config_file)?,
        }),
    }
}

fn open_redis(cfg: &StateConfig) -> Result<Arc<dyn StateStore>, StateError> {
    let redis = cfg.redis.as_ref().ok_or_else(|| StateError::Open {
        path: "[state.redis]".into(),
        reason: "backend = \"redis\" needs a [state.redis] section".into(),
    })?;
    Ok(Arc::new(RedisStore::connect(redis)?))
}

fn open_sled(cfg: &StateConfig, config_file: &Path) -> Result<Arc<dyn StateStore>, StateError> {
    let dir = cfg.resolve(config_file);
    let thread_err = |what: &str, e: std::io::Error| StateError::Open {
        path: dir.display().to_string(),
        reason: format!("cannot start the {what}: {e}"),
    };
    let sweep = Duration::from_secs(cfg.sweep_interval_secs.max(1));
    let sled = SledStore::open(&dir)?;
    if cfg.flush_interval_ms == 0 {
        let store = Arc::new(sled);
        SledStore::spawn_sweeper(&store, sweep).map_err(|e| thread_err("sweeper", e))?;
        return Ok(store);
    }
    let store = Arc::new(WriteBehindStore::new(sled));
    WriteBehindStore::spawn_flusher(&store, Duration::from_millis(cfg.flush_interval_ms))
        .map_err(|e| thread_err("flusher", e))?;
    WriteBehindStore::spawn_sweeper(&store, sweep).map_err(|e| thread_err("sweeper", e))?;
    Ok(store)
}

thread_local! {
    /// Time this thread spent blocked waiting on a networked store since the last
    /// [`take_blocked`], in ns.
    static BLOCKED_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Records that this thread waited `d` on a networked store (the Redis backend calls it).
pub(crate) fn note_blocked(d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    BLOCKED_NS.with(|b| b.set(b.get().saturating_add(ns)));
}

/// Time this thread spent blocked on a networked store since the last call, and resets it.
/// Plugin deadlines are CPU budgets: the hosts move a hook's deadline by this wait.
pub fn take_blocked() -> Duration {
    Duration::from_nanos(BLOCKED_NS.with(|b| b.replace(0)))
}

/// `weir_state_write_errors_total`: writes (and flushes) a backend failed, in this process.
///
/// Process-wide because the store is (one per process: sled locks its directory) and it is
/// opened before the gateway's metrics exist; [`crate::telemetry::Metrics`] registers it.
pub fn write_errors() -> &'static prometheus::IntCounter {
    static COUNTER: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
        prometheus::IntCounter::new(
            "weir_state_write_errors_total",
            "State writes and flushes the backend failed (a full disk, an unreachable store).",
        )
        // Only an invalid name or empty help text can fail, and both are constants.
        .expect("a valid metric name")
    });
    &COUNTER
}

/// The namespace that holds the state of the plugin called `name`.
pub fn plugin_namespace(name: &str) -> String {
    format!("plugin/{name}")
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A value as stored: an 8-byte big-endian expiry (ms since the epoch, 0 = never) then the
/// value's bytes.
pub(crate) fn encode(value: &[u8], ttl: Option<Duration>, now: u64) -> Vec<u8> {
    let expires = match ttl {
        None => 0,
        Some(ttl) => now
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .max(1),
    };
    encode_at(value, expires)
}

/// Encodes `value` with an absolute expiry (0 = never).
pub(crate) fn encode_at(value: &[u8], expires: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Splits a stored value into its expiry and bytes; `None` when expired at `now` or malformed.
pub(crate) fn decode_live(raw: &[u8], now: u64) -> Option<(u64, &[u8])> {
    let (head, value) = raw.split_at_checked(8)?;
    let expires = u64::from_be_bytes(head.try_into().ok()?);
    if expires != 0 && expires <= now {
        return None;
    }
    Some((expires, value))
}

/// Parses a counter value and adds `delta`.
pub(crate) fn add_to_counter(
    key: &str,
    current: Option<&[u8]>,
    delta: i64,
) -> Result<i64, StateError> {
    let base = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| StateError::NotAnInteger {
                key: key.to_owned(),
            })?,
    };
    base.checked_add(delta).ok_or_else(|| StateError::Overflow {
        key: key.to_owned(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Behaviour every backend must have; each backend's tests call these.

    use super::*;
    use std::sync::Arc;

    /// A small tmpfs mounted on a temporary directory, to fill a disk for real (ENOSPC).
    /// Unmounted when dropped.
    pub struct SmallDisk {
        dir: tempfile::TempDir,
    }

    impl SmallDisk {
        /// Mounts `size` (e.g. `"4m"`). `None` only when not running as root (a developer's
        /// machine): as root (CI) a mount that fails is a test failure, not a skip.
        pub fn mount(size: &str) -> Option<SmallDisk> {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let root = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("0");
            if !root {
                eprintln!(
                    "not root: the real-ENOSPC part needs a tmpfs mount; seam tests cover it"
                );
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(SmallDisk { dir })
        }

        pub fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes a file until the disk is full; returns its path (remove it for room).
        pub fn fill(&self) -> PathBuf {
            use std::io::Write;
            let path = self.path().join("filler");
            let mut f = std::fs::File::create(&path).unwrap();
            let chunk = vec![0u8; 4096];
            while f.write_all(&chunk).is_ok() {}
            path
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    pub fn basic(store: &dyn StateStore) {
        assert_eq!(store.get("a", "k").unwrap(), None);
        store.set("a", "k", b"v1", None).unwrap();
        assert_eq!(store.get("a", "k").unwrap().as_deref(), Some(&b"v1"[..]));
        // Namespaces are separate.
        assert_eq!(store.get("b", "k").unwrap(), None);
        assert!(store.delete("a", "k").unwrap());
        assert!(!store.delete("a", "k").unwrap());
        assert_eq!(store.get("a", "k").unwrap(), None);
    }

    pub fn cas(store: &dyn StateStore) {
        assert!(store.cas("c", "k", None, Some(b"1"), None).unwrap());
        assert!(!store.cas("c", "k", None, Some(b"2"), None).unwrap());
        assert!(!store.cas("c", "k", Some(b"0"), Some(b"2"), None).unwrap());
        assert!(store.cas("c", "k", Some(b"1"), Some(b"2"), None).unwrap());
        assert_eq!(store.get("c", "k").unwrap().as_deref(), Some(&b"2"[..]));
        assert!(store.cas("c", "k", Some(b"2"), None, None).unwrap());
        assert_eq!(store.get("c", "k").unwrap(), None);
    }

    pub fn incr(store: &dyn StateStore) {
        assert_eq!(store.incr("i", "n", 5, None).unwrap(), 5);
        assert_eq!(store.incr("i", "n", -2, None).unwrap(), 3);
        assert_eq!(store.get("i", "n").unwrap().as_deref(), Some(&b"3"[..]));
        store.set("i", "s", b"text", None).unwrap();
        assert!(matches!(
            store.incr("i", "s", 1, None),
            Err(StateError::NotAnInteger { .. })
        ));
        store
            .set("i", "max", i64::MAX.to_string().as_bytes(), None)
            .unwrap();
        assert!(matches!(
            store.incr("i", "max", 1, None),
            Err(StateError::Overflow { .. })
        ));
    }

    pub fn ttl(store: &dyn StateStore) {
        store
            .set("t", "short", b"x", Some(Duration::from_millis(30)))
            .unwrap();
        store
            .set("t", "long", b"y", Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(
            store
                .incr("t", "ctr", 1, Some(Duration::from_millis(30)))
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .incr("t", "ctr", 1, Some(Duration::from_secs(60)))
                .unwrap(),
            2
        );
        assert!(store.get("t", "short").unwrap().is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.get("t", "short").unwrap(), None);
        assert!(store.get("t", "long").unwrap().is_some());
        // The counter kept its first expiry, so it is gone and restarts at 1.
        assert_eq!(store.incr("t", "ctr", 1, None).unwrap(), 1);
        // An expired key counts as absent for cas.
        store
            .set("t", "gone", b"x", Some(Duration::from_millis(1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.cas("t", "gone", None, Some(b"new"), None).unwrap());
    }

    pub fn scan(store: &dyn StateStore) {
        for i in 0..10_000u32 {
            store
                .set(
                    "scan",
                    &format!("user:{i:05}"),
                    i.to_string().as_bytes(),
                    None,
                )
                .unwrap();
        }
        store.set("scan", "other", b"x", None).unwrap();
        for i in (0..10_000u32).step_by(997) {
            let v = store.get("scan", &format!("user:{i:05}")).unwrap().unwrap();
            assert_eq!(v, i.to_string().as_bytes());
        }
        let all = store.scan_prefix("scan", "user:", usize::MAX).unwrap();
        assert_eq!(all.len(), 10_000);
        assert_eq!(all[0].0, "user:00000");
        let some = store.scan_prefix("scan", "user:0999", 5).unwrap();
        assert_eq!(some.len(), 5);
        assert_eq!(some[0].0, "user:09990");
    }

    pub fn concurrent_incr(store: Arc<dyn StateStore>) {
        let threads = 8;
        let per_thread = 500;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        store.incr("ctr", "hits", 1, None).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            store.get("ctr", "hits").unwrap().as_deref(),
            Some((threads * per_thread).to_string().as_bytes())
        );
    }

    /// A fixed clock for the limiter tests (ms since the epoch).
    const T0: u64 = 1_700_000_000_000;

    fn per_sec(limit: u64) -> Rate {
        Rate {
            limit,
            window: Duration::from_secs(1),
        }
    }

    pub fn limiter(store: &dyn StateStore) {
        let rate = per_sec(5); // one unit per 200 ms
        // A full burst is admitted at once, one unit at a time.
        for left in (0..5).rev() {
            let out = store.limit_reserve("l", "k", rate, 1, T0).unwrap();
            assert!(out.allowed);
            assert_eq!(out.remaining, left);
            assert_eq!(out.retry_after, Duration::ZERO);
        }
        assert!(store.get("l", "lim/k").unwrap().is_some());
        // The next unit is refused and told to wait one emission interval.
        let out = store.limit_reserve("l", "k", rate, 1, T0).unwrap();
        assert_eq!(
            out,
            LimitOutcome {
                allowed: false,
                remaining: 0,
                retry_after: Duration::from_millis(200),
                reset_after: Duration::from_secs(1),
            }
        );
        // A refusal stored nothing: 199 ms later it still does not fit, at 200 ms it does.
        assert!(
            !store
                .limit_reserve("l", "k", rate, 1, T0 + 199)
                .unwrap()
                .allowed
        );
        let out = store.limit_reserve("l", "k", rate, 1, T0 + 200).unwrap();
        assert!(out.allowed);
        assert_eq!(out.remaining, 0);
        // Three units need 600 ms of room: refused with the wait for all three.
        let out = store.limit_reserve("l", "k", rate, 3, T0 + 300).unwrap();
        assert!(!out.allowed);
        assert_eq!(out.retry_after, Duration::from_millis(500));
        assert_eq!(out.reset_after, Duration::from_millis(900));
        assert!(
            store
                .limit_reserve("l", "k", rate, 3, T0 + 800)
                .unwrap()
                .allowed
        );
        // A full window after the last reservation, the limiter is full again.
        let out = store.limit_reserve("l", "k", rate, 0, T0 + 2_000).unwrap();
        assert_eq!(
            out,
            LimitOutcome {
                allowed: true,
                remaining: 5,
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
            }
        );
        // Amount 0 is a pure read: it moves nothing.
        let out = store.limit_reserve("l", "k", rate, 0, T0 + 2_000).unwrap();
        assert_eq!(out.remaining, 5);
        assert!(
            store
                .limit_reserve("l", "k", rate, 5, T0 + 2_000)
                .unwrap()
                .allowed
        );
        // Keys are separate.
        assert_eq!(
            store
                .limit_reserve("l", "other", rate, 0, T0)
                .unwrap()
                .remaining,
            5
        );
    }

    pub fn limiter_settle(store: &dyn StateStore) {
        let rate = per_sec(100); // 10 ms per unit
        // Reserve the estimate (80), use 30: 50 go back.
        let out = store.limit_reserve("s", "tok", rate, 80, T0).unwrap();
        assert_eq!(out.remaining, 20);
        store.limit_settle("s", "tok", rate, 80, 30, T0).unwrap();
        let out = store.limit_reserve("s", "tok", rate, 0, T0).unwrap();
        assert_eq!(out.remaining, 70);
        // Giving back more than was taken stops at a full limiter.
        store.limit_settle("s", "tok", rate, 1_000, 0, T0).unwrap();
        assert_eq!(
            store
                .limit_reserve("s", "tok", rate, 0, T0)
                .unwrap()
                .remaining,
            100
        );
        // Settling on an absent key with nothing used writes nothing.
        store.limit_settle("s", "absent", rate, 10, 0, T0).unwrap();
        assert_eq!(store.get("s", "lim/absent").unwrap(), None);
        // Reserve 10, use 250: the overrun is charged past the window.
        assert!(
            store
                .limit_reserve("s", "tok", rate, 10, T0)
                .unwrap()
                .allowed
        );
        store.limit_settle("s", "tok", rate, 10, 250, T0).unwrap();
        let out = store.limit_reserve("s", "tok", rate, 1, T0).unwrap();
        assert!(!out.allowed);
        assert_eq!(out.remaining, 0);
        // TAT is 2.5 s ahead: one unit fits once it is within 1 s - 10 ms of the clock.
        assert_eq!(out.retry_after, Duration::from_millis(1_510));
        assert_eq!(out.reset_after, Duration::from_millis(2_500));
        assert!(
            !store
                .limit_reserve("s", "tok", rate, 1, T0 + 1_509)
                .unwrap()
                .allowed
        );
        assert!(
            store
                .limit_reserve("s", "tok", rate, 1, T0 + 1_510)
                .unwrap()
                .allowed
        );
        // used == reserved changes nothing.
        let before = store.get("s", "lim/tok").unwrap();
        store.limit_settle("s", "tok", rate, 7, 7, T0).unwrap();
        assert_eq!(store.get("s", "lim/tok").unwrap(), before);
    }

    pub fn limiter_edges(store: &dyn StateStore) {
        let rate = per_sec(10);
        // More than a whole burst never fits, even on a full limiter.
        let out = store.limit_reserve("e", "k", rate, 11, T0).unwrap();
        assert!(!out.allowed);
        assert_eq!(out.remaining, 10);
        assert_eq!(out.retry_after, Duration::from_secs(1));
        assert_eq!(store.get("e", "lim/k").unwrap(), None);
        // Exactly a whole burst fits.
        assert!(store.limit_reserve("e", "k", rate, 10, T0).unwrap().allowed);
        // Limit 0 (and a zero window) refuses everything, amount 0 included, and stores nothing.
        for zero in [
            Rate {
                limit: 0,
                window: Duration::from_secs(1),
            },
            Rate {
                limit: 10,
                window: Duration::ZERO,
            },
        ] {
            for amount in [0, 1] {
                let out = store.limit_reserve("e", "zero", zero, amount, T0).unwrap();
                assert!(!out.allowed);
                assert_eq!(out.remaining, 0);
                assert_eq!(out.retry_after, zero.window);
            }
            store.limit_settle("e", "zero", zero, 0, 5, T0).unwrap();
        }
        assert_eq!(store.get("e", "lim/zero").unwrap(), None);
        // Huge numbers saturate instead of overflowing.
        let huge = Rate {
            limit: u64::MAX,
            window: Duration::from_secs(u64::MAX),
        };
        assert!(
            store
                .limit_reserve("e", "huge", huge, u64::MAX, T0)
                .unwrap()
                .allowed
        );
        store
            .limit_settle("e", "huge", huge, 0, u64::MAX, u64::MAX)
            .unwrap();
        // A value that is not a TAT is an error, not a silent reset.
        store.set("e", "lim/bad", b"soon", None).unwrap();
        assert!(matches!(
            store.limit_reserve("e", "bad", rate, 1, T0),
            Err(StateError::NotAnInteger { .. })
        ));
    }

    pub fn limiter_expires(store: &dyn StateStore) {
        // The stored TAT expires about a window after the limiter is full again.
        let rate = Rate {
            limit: 2,
            window: Duration::from_millis(20),
        };
        let now = now_ms();
        assert!(store.limit_reserve("x", "k", rate, 2, now).unwrap().allowed);
        assert!(store.get("x", "lim/k").unwrap().is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(store.get("x", "lim/k").unwrap(), None);
    }

    pub fn concurrent_limiter(store: Arc<dyn StateStore>) {
        // 8 threads x 40 attempts against a burst of 100 at one instant: exactly 100 admitted.
        let rate = Rate {
            limit: 100,
            window: Duration::from_secs(60),
        };
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .filter(|_| store.limit_reserve("cl", "k", rate, 1, T0).unwrap().allowed)
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
        assert_eq!(
            store
                .limit_reserve("cl", "k", rate, 0, T0)
                .unwrap()
                .remaining,
            0
        );
    }

    fn bal(spent_micros: i64, reserved_micros: i64) -> Balance {
        Balance {
            spent_micros,
            reserved_micros,
        }
    }

    pub fn ledger(store: &dyn StateStore) {
        let l = 1_000_000; // a $1 budget
        assert_eq!(store.ledger_balance("b", "acct").unwrap(), bal(0, 0));
        // Reservations up to the limit are admitted...
        assert_eq!(
            store.ledger_reserve("b", "acct", l, 600_000, None).unwrap(),
            (true, bal(0, 600_000))
        );
        assert_eq!(
            store.ledger_reserve("b", "acct", l, 400_000, None).unwrap(),
            (true, bal(0, 1_000_000))
        );
        // ...and one past it is refused, changing nothing.
        assert_eq!(
            store.ledger_reserve("b", "acct", l, 1, None).unwrap(),
            (false, bal(0, 1_000_000))
        );
        // Settle the first for less than reserved, release the second (its request failed).
        assert_eq!(
            store
                .ledger_settle("b", "acct", 600_000, 250_000, None)
                .unwrap(),
            bal(250_000, 400_000)
        );
        assert_eq!(
            store.ledger_release("b", "acct", 400_000).unwrap(),
            bal(250_000, 0)
        );
        assert_eq!(store.ledger_balance("b", "acct").unwrap(), bal(250_000, 0));
        assert_eq!(
            store.get("b", "led/acct").unwrap().as_deref(),
            Some(&b"250000 0"[..])
        );
        // A settle beyond its reservation keeps the whole cost, even past the limit.
        assert!(
            store
                .ledger_reserve("b", "acct", l, 100_000, None)
                .unwrap()
                .0
        );
        assert_eq!(
            store
                .ledger_settle("b", "acct", 100_000, 900_000, None)
                .unwrap(),
            bal(1_150_000, 0)
        );
        let (ok, b) = store.ledger_reserve("b", "acct", l, 0, None).unwrap();
        assert!(!ok);
        assert_eq!(b, bal(1_150_000, 0));
        // Returns never take the reserved total below 0.
        assert_eq!(
            store.ledger_release("b", "acct", 5).unwrap(),
            bal(1_150_000, 0)
        );
        assert_eq!(
            store.ledger_settle("b", "acct", 5, 0, None).unwrap(),
            bal(1_150_000, 0)
        );
        // Releasing on an absent account creates nothing.
        assert_eq!(store.ledger_release("b", "none", 5).unwrap(), bal(0, 0));
        assert_eq!(store.get("b", "led/none").unwrap(), None);
        // A settle with no reservation (it expired, or none was made) still records the cost.
        assert_eq!(
            store.ledger_settle("b", "late", 100, 70, None).unwrap(),
            bal(70, 0)
        );
        // An amount above the limit on a new account is refused and creates nothing.
        assert_eq!(
            store.ledger_reserve("b", "new", 10, 11, None).unwrap(),
            (false, bal(0, 0))
        );
        assert_eq!(store.get("b", "led/new").unwrap(), None);
        // A value that is not an account is an error.
        store.set("b", "led/bad", b"lots", None).unwrap();
        assert!(matches!(
            store.ledger_balance("b", "bad"),
            Err(StateError::NotAnInteger { .. })
        ));
    }

    pub fn ledger_ttl(store: &dyn StateStore) {
        let short = Some(Duration::from_millis(40));
        let long = Some(Duration::from_secs(3_600));
        // The TTL of the call that creates the account applies; later ones keep it.
        assert!(
            store
                .ledger_reserve("p", "2025-01", 100, 10, short)
                .unwrap()
                .0
        );
        assert_eq!(
            store.ledger_settle("p", "2025-01", 10, 7, long).unwrap(),
            bal(7, 0)
        );
        assert!(
            store
                .ledger_reserve("p", "2025-01", 100, 5, long)
                .unwrap()
                .0
        );
        assert_eq!(store.ledger_release("p", "2025-01", 5).unwrap(), bal(7, 0));
        assert!(
            store
                .ledger_reserve("p", "forever", 100, 10, None)
                .unwrap()
                .0
        );
        std::thread::sleep(Duration::from_millis(70));
        // The period is over: the account is gone and a new one starts from zero.
        assert_eq!(store.ledger_balance("p", "2025-01").unwrap(), bal(0, 0));
        assert_eq!(
            store
                .ledger_reserve("p", "2025-01", 100, 100, long)
                .unwrap(),
            (true, bal(0, 100))
        );
        assert_eq!(store.ledger_balance("p", "forever").unwrap(), bal(0, 10));
    }

    pub fn concurrent_ledger(store: Arc<dyn StateStore>) {
        // 8 threads x 40 reservations of 10 against a limit of 1000: exactly 100 admitted.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .filter(|_| store.ledger_reserve("cb", "a", 1_000, 10, None).unwrap().0)
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
        assert_eq!(store.ledger_balance("cb", "a").unwrap(), bal(0, 1_000));
    }

    /// Export and import: `namespaces`, `entries` (paging, expiry, live entries only) and
    /// `put_entry` (absolute expiry, expired entries skipped, ledger accounts in the
    /// backend's own form). Expects a store with nothing in it.
    pub fn export_entries(store: &dyn StateStore) {
        let hour = Some(Duration::from_secs(3_600));
        assert_eq!(store.namespaces().unwrap(), Vec::<String>::new());
        let before = now_ms();
        store.set("x/a", "k1", b"v1", None).unwrap();
        store.set("x/a", "k2", b"v2", hour).unwrap();
        store.set("x/a", "k3", b"", None).unwrap();
        store.incr("x/c", "n", 7, None).unwrap();
        store.set("x/b", "gone", b"x", None).unwrap();
        assert!(store.delete("x/b", "gone").unwrap());
        store
            .set("x/d", "short", b"x", Some(Duration::from_millis(1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Only namespaces with a live entry, sorted.
        assert_eq!(store.namespaces().unwrap(), ["x/a", "x/c"]);

        // Pages in key order, `after` exclusive.
        let page = store.entries("x/a", None, 2).unwrap();
        let keys: Vec<&str> = page.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert_eq!(page[0].value, b"v1");
        assert_eq!(page[0].expires_ms, None);
        let exp = page[1].expires_ms.expect("k2 expires");
        assert!(
            (before + 3_599_000..=now_ms() + 3_600_000).contains(&exp),
            "k2 expires at {exp}, about an hour after {before}"
        );
        let rest = store.entries("x/a", Some("k2"), 10).unwrap();
        assert_eq!(
            rest,
            [Entry {
                key: "k3".into(),
                value: Vec::new(),
                expires_ms: None
            }]
        );
        assert!(store.entries("x/a", Some("k3"), 10).unwrap().is_empty());
        assert!(store.entries("x/a", None, 0).unwrap().is_empty());
        assert!(store.entries("x/none", None, 10).unwrap().is_empty());
        assert!(store.entries("x/d", None, 10).unwrap().is_empty());
        assert_eq!(store.entries("x/c", None, 10).unwrap()[0].value, b"7");

        // Round trip into another namespace: the same entries, expiry included.
        for e in store.entries("x/a", None, usize::MAX).unwrap() {
            store.put_entry("y/a", &e).unwrap();
        }
        assert_eq!(
            store.entries("y/a", None, usize::MAX).unwrap(),
            store.entries("x/a", None, usize::MAX).unwrap()
        );
        assert_eq!(store.get("y/a", "k2").unwrap().as_deref(), Some(&b"v2"[..]));
        // put_entry replaces; an expired entry is skipped and changes nothing.
        let at = now_ms() + 60_000;
        let entry = |key: &str, value: &[u8], expires_ms| Entry {
            key: key.into(),
            value: value.to_vec(),
            expires_ms,
        };
        store
            .put_entry("y/a", &entry("k1", b"new", Some(at)))
            .unwrap();
        assert_eq!(
            store.entries("y/a", None, 1).unwrap(),
            [entry("k1", b"new", Some(at))]
        );
        store
            .put_entry("y/a", &entry("k1", b"old", Some(now_ms() - 1)))
            .unwrap();
        store
            .put_entry("y/a", &entry("dead", b"x", Some(1)))
            .unwrap();
        assert_eq!(
            store.get("y/a", "k1").unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(store.get("y/a", "dead").unwrap(), None);
        // An entry's expiry applies.
        store
            .put_entry("y/e", &entry("soon", b"x", Some(now_ms() + 40)))
            .unwrap();
        assert!(store.get("y/e", "soon").unwrap().is_some());

        // Ledger accounts, in either form, become accounts of this backend that keep their
        // expiry through later updates.
        let soon = now_ms() + 150;
        store
            .put_entry("y/l", &entry("led/two", b"500 0", Some(soon)))
            .unwrap();
        store
            .put_entry(
                "y/l",
                &entry("led/three", format!("40 3 {soon}").as_bytes(), Some(soon)),
            )
            .unwrap();
        store
            .put_entry("y/l", &entry("led/forever", b"9 0", None))
            .unwrap();
        assert_eq!(store.ledger_balance("y/l", "two").unwrap(), bal(500, 0));
        assert_eq!(store.ledger_balance("y/l", "three").unwrap(), bal(40, 3));
        assert_eq!(
            store.ledger_settle("y/l", "two", 0, 5, None).unwrap(),
            bal(505, 0)
        );
        assert_eq!(store.ledger_release("y/l", "three", 3).unwrap(), bal(40, 0));
        for e in store.entries("y/l", None, 10).unwrap() {
            if e.key == "led/forever" {
                assert_eq!(e.expires_ms, None);
                assert_eq!(e.value, b"9 0");
                continue;
            }
            let exp = e.expires_ms.expect("the account keeps its expiry");
            // (A millisecond may pass between the clock reads of one update.)
            assert!(
                exp.abs_diff(soon) <= 2,
                "{} expires at {exp}, not {soon}",
                e.key
            );
            let text = String::from_utf8(e.value).unwrap();
            let fields: Vec<&str> = text.split(' ').collect();
            let in_value = fields.get(2).map(|f| f.parse::<u64>().unwrap());
            assert!(
                fields.len() == 2 || (fields.len() == 3 && in_value == Some(soon)),
                "{}: '{text}'",
                e.key
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(store.get("y/e", "soon").unwrap(), None);
        assert_eq!(store.ledger_balance("y/l", "two").unwrap(), bal(0, 0));
        assert_eq!(store.ledger_balance("y/l", "three").unwrap(), bal(0, 0));
        assert_eq!(store.ledger_balance("y/l", "forever").unwrap(), bal(9, 0));
        assert_eq!(store.namespaces().unwrap(), ["x/a", "x/c", "y/a", "y/l"]);
    }

    #[test]
    fn encoding_round_trips() {
        let raw = encode(b"hello", Some(Duration::from_secs(1)), 1_000);
        assert_eq!(decode_live(&raw, 1_500), Some((2_000, &b"hello"[..])));
        assert_eq!(decode_live(&raw, 2_000), None);
        let raw = encode(b"", None, 1_000);
        assert_eq!(decode_live(&raw, u64::MAX), Some((0, &b""[..])));
        assert_eq!(decode_live(b"short", 0), None);
    }
}
