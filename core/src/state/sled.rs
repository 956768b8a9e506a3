//! [`SledStore`]: the default, embedded [`StateStore`], on disk with sled 0.34.
//!
//! One sled tree per namespace (`plugin/<name>`), so scans and sweeps of one plugin never
//! touch another's keys. Values carry their expiry (see [`super`]); `incr` and `cas` are
//! optimistic read / `compare_and_swap` loops, which sled makes atomic per key without locks.
//!
//! Durability: sled writes to its log immediately and fsyncs every 500 ms (its default), and
//! [`SledStore`] flushes when dropped; a crash can lose the last half-second of writes. That
//! is the documented loss window for plugin state (rate-limit counters, caches); nothing in
//! it needs stronger guarantees. The gateway puts a [`super::WriteBehindStore`] in front,
//! which adds its flush interval (100 ms) to that window.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use ::sled::{Db, IVec, Tree};

use super::{StateError, StateStore, add_to_counter, decode_live, encode, encode_at, now_ms};

fn backend(e: ::sled::Error) -> StateError {
    StateError::Backend(e.to_string())
}

/// One write of [`SledStore::write_entries`]: `value` is the stored form ([`encode_at`]:
/// expiry, then bytes), `None` removes.
#[derive(Debug, Clone)]
pub(crate) struct SledWrite {
    pub ns: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A [`StateStore`] on a sled database directory.
pub struct SledStore {
    db: Db,
    /// Open trees by namespace; sled's own `open_tree` takes a lock and allocates, so cache.
    trees: RwLock<HashMap<String, Tree>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (or creates) the database in directory `path`.
    pub fn open(path: &Path) -> Result<SledStore, StateError> {
        let db = ::sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| StateError::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(SledStore {
            db,
            trees: RwLock::new(HashMap::new()),
        })
    }

    /// Starts a background thread that calls [`SledStore::sweep`] every `every`. The thread
    /// holds only a weak reference and ends once the store is dropped.
    pub fn spawn_sweeper(store: &Arc<SledStore>, every: Duration) -> std::io::Result<()> {
        let weak: Weak<SledStore> = Arc::downgrade(store);
        std::thread::Builder::new()
            .name("weir-state-sweep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(store) = weak.upgrade() else {
                        return;
                    };
                    match store.sweep() {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(removed = n, "State sweep removed expired keys."),
                        Err(e) => tracing::warn!(error = %e, "State sweep failed."),
                    }
                }
            })
            .map(|_| ())
    }

    /// Deletes every expired value in every namespace; returns how many it removed.
    ///
    /// A full scan: fine for the key counts plugins keep (tens of thousands); a value that
    /// changed since it was read is left alone (`compare_and_swap` against the expired bytes).
    pub fn sweep(&self) -> Result<usize, StateError> {
        let now = now_ms();
        let mut removed = 0;
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name).map_err(backend)?;
            for item in tree.iter() {
                let (key, raw) = item.map_err(backend)?;
                if decode_live(&raw, now).is_none()
                    && tree
                        .compare_and_swap(&key, Some(&raw), None as Option<&[u8]>)
                        .map_err(backend)?
                        .is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Writes everything to disk now.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    /// The live value of `key` and its expiry (ms since the epoch, 0 = never).
    pub(crate) fn get_entry(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        let tree = self.tree(ns)?;
        let now = now_ms();
        Ok(self
            .get_live(&tree, key, now)?
            .and_then(|raw| decode_live(&raw, now).map(|(exp, v)| (exp, v.to_vec()))))
    }

    /// Applies `writes` one by one (a sled batch would take sled's global write lock and
    /// stall every reader meanwhile). A removal of a key sled does not hold writes nothing.
    /// Takes the values out of `writes` (they move into sled without a copy of ours).
    pub(crate) fn write_entries(&self, writes: &mut [SledWrite]) -> Result<(), StateError> {
        let mut current: Option<(String, Tree)> = None;
        for w in writes {
            let tree = match &current {
                Some((ns, tree)) if *ns == w.ns => tree,
                _ => &current.insert((w.ns.clone(), self.tree(&w.ns)?)).1,
            };
            match w.value.take() {
                Some(stored) => {
                    tree.insert(w.key.as_bytes(), stored).map_err(backend)?;
                }
                None => {
                    if tree.contains_key(&w.key).map_err(backend)? {
                        tree.remove(&w.key).map_err(backend)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn tree(&self, ns: &str) -> Result<Tree, StateError> {
        if let Some(t) = self
            .trees
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(ns)
        {
            return Ok(t.clone());
        }
        let tree = self.db.open_tree(ns).map_err(backend)?;
        self.trees
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(ns.to_owned(), tree.clone());
        Ok(tree)
    }

    /// The raw stored bytes of `key` if live; removes it if expired.
    fn get_live(&self, tree: &Tree, key: &str, now: u64) -> Result<Option<IVec>, StateError> {
        let Some(raw) = tree.get(key).map_err(backend)? else {
            return Ok(None);
        };
        if decode_live(&raw, now).is_some() {
            return Ok(Some(raw));
        }
        // Lazy expiry; losing the race to a concurrent write is fine.
        let _ = tree
            .compare_and_swap(key, Some(&raw), None as Option<&[u8]>)
            .map_err(backend)?;
        Ok(None)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "State flush on close failed.");
        }
    }
}

impl StateStore for SledStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let tree = self.tree(ns)?;
        let now = now_ms();
        Ok(self
            .get_live(&tree, key, now)?
            .and_then(|raw| decode_live(&raw, now).map(|(_, v)| v.to_vec())))
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let tree = self.tree(ns)?;
        tree.insert(key, encode(value, ttl, now_ms()))
            .map_err(backend)?;
        Ok(())
    }

    fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        let tree = self.tree(ns)?;
        loop {
            let now = now_ms();
            let raw = tree.get(key).map_err(backend)?;
            let live = raw.as_deref().and_then(|r| decode_live(r, now));
            let (next, stored) = match live {
                Some((expires, value)) => {
                    let next = add_to_counter(key, Some(value), delta)?;
                    (next, encode_at(next.to_string().as_bytes(), expires))
                }
                None => {
                    let next = add_to_counter(key, None, delta)?;
                    (next, encode(next.to_string().as_bytes(), ttl, now))
                }
            };
            if tree
                .compare_and_swap(key, raw.as_deref(), Some(stored))
                .map_err(backend)?
                .is_ok()
            {
                return Ok(next);
            }
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
        let tree = self.tree(ns)?;
        loop {
            let now = now_ms();
            let raw = tree.get(key).map_err(backend)?;
            let current = raw
                .as_deref()
                .and_then(|r| decode_live(r, now))
                .map(|(_, v)| v);
            if current != expected {
                return Ok(false);
            }
            let stored = new.map(|v| encode(v, ttl, now));
            match tree
                .compare_and_swap(key, raw.as_deref(), stored)
                .map_err(backend)?
            {
                Ok(()) => return Ok(true),
                // The raw bytes changed under us (maybe only an expired value replaced):
                // re-read and compare again.
                Err(_) => continue,
            }
        }
    }

    fn delete(&self, ns: &str, key: &str) -> Result<bool, StateError> {
        let tree = self.tree(ns)?;
        let old = tree.remove(key).map_err(backend)?;
        Ok(old.is_some_and(|raw| decode_live(&raw, now_ms()).is_some()))
    }

    fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let tree = self.tree(ns)?;
        let now = now_ms();
        let mut out = Vec::new();
        for item in tree.scan_prefix(prefix) {
            if out.len() >= limit {
                break;
            }
            let (key, raw) = item.map_err(backend)?;
            if let Some((_, value)) = decode_live(&raw, now) {
                out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StateError> {
        SledStore::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests as shared;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn basic() {
        shared::basic(&store().1);
    }

    #[test]
    fn cas() {
        shared::cas(&store().1);
    }

    #[test]
    fn incr() {
        shared::incr(&store().1);
    }

    #[test]
    fn ttl() {
        shared::ttl(&store().1);
    }

    #[test]
    fn scan_10k() {
        shared::scan(&store().1);
    }

    #[test]
    fn concurrent_incr_is_exact() {
        let (_dir, store) = store();
        shared::concurrent_incr(Arc::new(store));
    }

    #[test]
    fn limiter() {
        shared::limiter(&store().1);
    }

    #[test]
    fn limiter_settle() {
        shared::limiter_settle(&store().1);
    }

    #[test]
    fn limiter_edges() {
        shared::limiter_edges(&store().1);
    }

    #[test]
    fn limiter_expires() {
        shared::limiter_expires(&store().1);
    }

    #[test]
    fn ledger() {
        shared::ledger(&store().1);
    }

    #[test]
    fn ledger_ttl() {
        shared::ledger_ttl(&store().1);
    }

    #[test]
    fn concurrent_limiter_never_admits_more_than_the_limit() {
        let (_dir, store) = store();
        shared::concurrent_limiter(Arc::new(store));
    }

    #[test]
    fn concurrent_ledger_never_reserves_more_than_the_limit() {
        let (_dir, store) = store();
        shared::concurrent_ledger(Arc::new(store));
    }

    #[test]
    fn sweep_removes_expired() {
        let (_dir, store) = store();
        store
            .set("s", "a", b"x", Some(Duration::from_millis(1)))
            .unwrap();
        store.set("s", "b", b"y", None).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.sweep().unwrap(), 1);
        assert_eq!(store.db.open_tree("s").unwrap().len(), 1);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(SledStore::open(dir.path()).unwrap());
            SledStore::spawn_sweeper(&store, Duration::from_secs(3600)).unwrap();
            store.set("plugin/p", "k", b"kept", None).unwrap();
            store.incr("plugin/p", "n", 41, None).unwrap();
            store
                .set("plugin/p", "tmp", b"x", Some(Duration::from_secs(3600)))
                .unwrap();
        }
        // The sweeper holds only a weak reference, so the database is closed now.
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get("plugin/p", "k").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(store.incr("plugin/p", "n", 1, None).unwrap(), 42);
        assert!(store.get("plugin/p", "tmp").unwrap().is_some());
    }
}
