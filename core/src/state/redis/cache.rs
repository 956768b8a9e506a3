//! The local read cache of [`super::RedisStore`]: bounded, sharded LRU maps of data key to
//! value (or to "absent"), kept coherent by the invalidation channel (see the parent's module
//! docs for the protocol).

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::Notify;

const SHARDS: usize = 32;

/// How long past its fetch an entry may still answer a read the server failed (stale-if-
/// error), so a blip of the server does not refuse every known key.
const STALE_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Entry {
    value: Option<Vec<u8>>,
    /// Absolute expiry of the value, ms since the epoch; `None` = never.
    expires_ms: Option<u64>,
    fetched: Instant,
}

struct Shard {
    map: Mutex<LruCache<String, Entry>>,
    /// Bumped by every invalidation of a key of this shard: a read that started before an
    /// invalidation does not insert what it read.
    epoch: AtomicU64,
}

/// See the module docs.
pub(super) struct LocalCache {
    shards: Vec<Shard>,
    enabled: bool,
    live: AtomicBool,
    max_age: Duration,
    max_value: usize,
    data_prefix: String,
    kick: Arc<Notify>,
    hasher: std::collections::hash_map::RandomState,
}

/// What [`LocalCache::epoch`] hands a reader: the shard and its epoch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    shard: usize,
    epoch: u64,
}

impl LocalCache {
    /// A cache of about `entries` entries (0: off) for data keys under `prefix`.
    pub(super) fn new(entries: usize, max_age: Duration, max_value: usize, prefix: &str) -> Self {
        let per_shard =
            NonZeroUsize::new(entries.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        LocalCache {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(LruCache::new(per_shard)),
                    epoch: AtomicU64::new(0),
                })
                .collect(),
            enabled: entries > 0,
            live: AtomicBool::new(false),
            max_age,
            max_value,
            data_prefix: format!("{prefix}kv|"),
            kick: Arc::new(Notify::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether reads may be served from the cache (the invalidation subscription is live).
    pub(super) fn live(&self) -> bool {
        self.enabled && self.live.load(Ordering::Acquire)
    }

    fn shard_of(&self, key: &str) -> usize {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        (h.finish() as usize) % SHARDS
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, LruCache<String, Entry>> {
        self.shards[i].map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh cached answer for `key`: `Some(None)` when it is known absent.
    pub(super) fn lookup(&self, key: &str) -> Option<Option<Vec<u8>>> {
        if !self.live() {
            return None;
        }
        let now = super::super::now_ms();
        let mut map = self.lock(self.shard_of(key));
        let e = map.get(key)?;
        if e.fetched.elapsed() > self.max_age || e.expires_ms.is_some_and(|at| at <= now) {
            map.pop(key);
            return None;
        }
        Some(e.value.clone())
    }

    /// A cached answer of any age within [`STALE_MAX`], for when the server failed.
    pub(super) fn stale(&self, key: &str) -> Option<Option<Vec<u8>>> {
        if !self.enabled {
            return None;
        }
        let now = super::super::now_ms();
        let map = self.lock(self.shard_of(key));
        let e = map.peek(key)?;
        if e.fetched.elapsed() > STALE_MAX || e.expires_ms.is_some_and(|at| at <= now) {
            return None;
        }
        Some(e.value.clone())
    }

    /// Taken before a read from the server, handed to [`LocalCache::insert`].
    pub(super) fn ticket(&self, key: &str) -> Ticket {
        let shard = self.shard_of(key);
        Ticket {
            shard,
            epoch: self.shards[shard].epoch.load(Ordering::Acquire),
        }
    }

    /// Caches what a read found (`expires`: `PEXPIRETIME`, -1 = never, -2 = absent), unless an
    /// invalidation of its shard arrived since `ticket` or the cache is not live.
    pub(super) fn insert(&self, ticket: Ticket, key: String, value: Option<Vec<u8>>, expires: i64) {
        if !self.live() || value.as_ref().is_some_and(|v| v.len() > self.max_value) {
            return;
        }
        let expires_ms = u64::try_from(expires).ok();
        let mut map = self.lock(ticket.shard);
        if self.shards[ticket.shard].epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        map.put(
            key,
            Entry {
                value,
                expires_ms,
                fetched: Instant::now(),
            },
        );
    }

    /// Drops `key` (a write of ours, or a message from the channel).
    pub(super) fn invalidate(&self, key: &str) {
        if !self.enabled {
            return;
        }
        let i = self.shard_of(key);
        let mut map = self.lock(i);
        self.shards[i].epoch.fetch_add(1, Ordering::AcqRel);
        map.pop(key);
    }

    /// Handles a message of the invalidation channel (`<ns>|<key>`).
    pub(super) fn invalidate_message(&self, payload: &[u8]) {
        let mut key = String::with_capacity(self.data_prefix.len() + payload.len());
        key.push_str(&self.data_prefix);
        key.push_str(&String::from_utf8_lossy(payload));
        self.invalidate(&key);
    }

    /// The subscription is (again) live: forget everything, since invalidations may have been
    /// missed, and serve from the cache again.
    pub(super) fn go_live(&self) {
        for (i, s) in self.shards.iter().enumerate() {
            let mut map = self.lock(i);
            s.epoch.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
        self.live.store(true, Ordering::Release);
    }

    /// The subscription broke: stop serving reads from the cache (entries stay for
    /// stale-if-error) and make in-flight reads skip their insert.
    pub(super) fn go_dark(&self) {
        self.live.store(false, Ordering::Release);
        for s in &self.shards {
            s.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// What the subscriber waits on besides messages: a request to reconnect.
    pub(super) fn kicked(&self) -> Arc<Notify> {
        self.kick.clone()
    }

    /// Asks the subscriber to reconnect (its connection may be half-open), and stops
    /// serving from the cache until it has.
    pub(super) fn kick(&self) {
        if self.live.load(Ordering::Acquire) {
            self.go_dark();
        }
        self.kick.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> LocalCache {
        let c = LocalCache::new(100, Duration::from_secs(10), 8, "p:");
        c.go_live();
        c
    }

    #[test]
    fn serves_what_it_cached_until_invalidated() {
        let c = cache();
        let t = c.ticket("p:kv|ns|k");
        c.insert(t, "p:kv|ns|k".into(), Some(b"v".to_vec()), -1);
        assert_eq!(c.lookup("p:kv|ns|k"), Some(Some(b"v".to_vec())));
        c.invalidate_message(b"ns|k");
        assert_eq!(c.lookup("p:kv|ns|k"), None);
        // Absent keys are cached too.
        let t = c.ticket("p:kv|ns|gone");
        c.insert(t, "p:kv|ns|gone".into(), None, -2);
        assert_eq!(c.lookup("p:kv|ns|gone"), Some(None));
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_cached() {
        let c = cache();
        let t = c.ticket("p:kv|ns|k");
        c.invalidate("p:kv|ns|k");
        c.insert(t, "p:kv|ns|k".into(), Some(b"old".to_vec()), -1);
        assert_eq!(c.lookup("p:kv|ns|k"), None);
    }

    #[test]
    fn dark_cache_serves_nothing_fresh_but_keeps_stale_entries() {
        let c = cache();
        let t = c.ticket("p:kv|ns|k");
        c.insert(t, "p:kv|ns|k".into(), Some(b"v".to_vec()), -1);
        c.go_dark();
        assert_eq!(c.lookup("p:kv|ns|k"), None);
        assert_eq!(c.stale("p:kv|ns|k"), Some(Some(b"v".to_vec())));
        // Back live: emptied, since messages may have been missed.
        c.go_live();
        assert_eq!(c.stale("p:kv|ns|k"), None);
    }

    #[test]
    fn entries_age_out_and_respect_their_expiry_and_size() {
        let c = LocalCache::new(100, Duration::from_millis(20), 8, "p:");
        c.go_live();
        let t = c.ticket("a");
        c.insert(t, "a".into(), Some(b"v".to_vec()), -1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.lookup("a"), None);
        let t = c.ticket("b");
        let past = i64::try_from(super::super::super::now_ms()).unwrap_or(0) - 1;
        c.insert(t, "b".into(), Some(b"v".to_vec()), past);
        assert_eq!(c.lookup("b"), None);
        let t = c.ticket("big");
        c.insert(t, "big".into(), Some(vec![0; 9]), -1);
        assert_eq!(c.lookup("big"), None);
    }
}
