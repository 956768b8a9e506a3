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
//! - [`MemoryStore`]: a process-local map, for tests and `weir plugin test`.
//!
//! TTL: neither backend has native expiry, so each value is stored with its expiry time
//! (milliseconds since the Unix epoch, wall clock so it survives restarts). A read treats an
//! expired value as absent (lazy expiry) and a periodic sweep deletes them
//! ([`SledStore::spawn_sweeper`]).

pub mod memory;
pub mod sled;
pub mod write_behind;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

pub use self::memory::MemoryStore;
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
    /// The state directory could not be opened.
    #[error("state: cannot open {path}: {reason}")]
    Open {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
}

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

    /// Makes every write so far durable (on disk), e.g. at shutdown. Default: nothing to do.
    fn flush(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// PLACEHOLDER (merge h-state).
    fn limit_reserve(
        &self,
        ns: &str,
        key: &str,
        rate: Rate,
        amount: u64,
        now_ms: u64,
    ) -> Result<LimitOutcome, StateError> {
        let _ = (ns, key, rate, amount, now_ms);
        Err(StateError::Backend("limiter: merge pending".into()))
    }
    /// PLACEHOLDER (merge h-state).
    fn limit_settle(
        &self,
        ns: &str,
        key: &str,
        rate: Rate,
        reserved: u64,
        used: u64,
        now_ms: u64,
    ) -> Result<(), StateError> {
        let _ = (ns, key, rate, reserved, used, now_ms);
        Err(StateError::Backend("limiter: merge pending".into()))
    }
    /// PLACEHOLDER (merge h-state).
    fn ledger_reserve(
        &self,
        ns: &str,
        account: &str,
        limit_micros: i64,
        amount_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<(bool, Balance), StateError> {
        let _ = (ns, account, limit_micros, amount_micros, ttl);
        Err(StateError::Backend("ledger: merge pending".into()))
    }
    /// PLACEHOLDER (merge h-state).
    fn ledger_settle(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
        cost_micros: i64,
        ttl: Option<Duration>,
    ) -> Result<Balance, StateError> {
        let _ = (ns, account, reserved_micros, cost_micros, ttl);
        Err(StateError::Backend("ledger: merge pending".into()))
    }
    /// PLACEHOLDER (merge h-state).
    fn ledger_release(
        &self,
        ns: &str,
        account: &str,
        reserved_micros: i64,
    ) -> Result<Balance, StateError> {
        let _ = (ns, account, reserved_micros);
        Err(StateError::Backend("ledger: merge pending".into()))
    }
    /// PLACEHOLDER (merge h-state).
    fn ledger_balance(&self, ns: &str, account: &str) -> Result<Balance, StateError> {
        let _ = (ns, account);
        Err(StateError::Backend("ledger: merge pending".into()))
    }
}

/// PLACEHOLDER (merge h-state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub window: Duration,
}
/// PLACEHOLDER (merge h-state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOutcome {
    pub allowed: bool,
    pub remaining: u64,
    pub retry_after: Duration,
    pub reset_after: Duration,
}
/// PLACEHOLDER (merge h-state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    pub spent_micros: i64,
    pub reserved_micros: i64,
}

/// `[state]` in `weir.toml`: where durable state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the sled database, relative to the config file. Default `weir-state`.
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
    /// The database directory: `path`, relative to the directory of `config_file`.
    pub fn resolve(&self, config_file: &Path) -> PathBuf {
        let base = config_file.parent().unwrap_or_else(|| Path::new("."));
        base.join(&self.path)
    }
}

/// Opens the configured store (sled, behind the write-behind front unless
/// `flush_interval_ms` is 0) and starts its expiry sweeper and flusher.
pub fn open(cfg: &StateConfig, config_file: &Path) -> Result<Arc<dyn StateStore>, StateError> {
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
