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
//! which writes through [`SledStore::write_batch`] (one transaction, fsynced, per flush).
//!
//! A full disk: see [`SledStore`] (failures, recovery by reopening).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use ::sled::transaction::{TransactionError, Transactional};
use ::sled::{Db, IVec, Tree};

use super::primitives::{AccountForm, import_account};
use super::{
    Entry, StateError, StateStore, add_to_counter, decode_live, encode, encode_at, now_ms,
};

/// One write of [`SledStore::write_batch`]: `value` is the stored form ([`encode_at`]:
/// expiry, then bytes), `None` removes.
#[derive(Debug, Clone)]
pub(crate) struct SledWrite {
    pub ns: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// How often a failing store tries to recover ([`SledStore::recover`]).
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// The key recovery writes (and fsyncs) to learn whether the disk takes writes again. It
/// lives in sled's default tree, which no namespace uses; the value is a stored empty value
/// that never expires, so sweeps leave it alone.
const PROBE_KEY: &[u8] = b"weir/probe";

/// Whether a failed call read or wrote (only writes count in
/// `weir_state_write_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// Why the store is not serving, and when recovery last tried.
#[derive(Debug, Default)]
struct Health {
    /// The first error since the store last served; `None` while it serves.
    failure: Option<String>,
    /// When [`SledStore::recover`] last tried.
    last_attempt: Option<Instant>,
}

/// A [`StateStore`] on a sled database directory.
///
/// # Failures (a full disk)
/// After an I/O error sled fails every later write, even once the disk has room again. The
/// first error marks the store failing ([`StateStore::health`] answers why, `/readyz` goes
/// red) and counts in `weir_state_write_errors_total`; [`SledStore::recover`] (run by the
/// sweeper and the write-behind flusher, at most once a second) probes the disk with a
/// small write and fsync, and when that fails closes and reopens the database. Writes sled
/// had accepted but not yet made durable when the disk filled are lost with the old
/// instance: the write-behind front keeps its changes until a flush is durable, so behind
/// it nothing is; sled alone (`flush_interval_ms = 0`) loses them. Dropping a failing
/// store leaks the database instead of closing it (sled's close writes, and panics when
/// the disk refuses).
pub struct SledStore {
    path: PathBuf,
    /// The open database; `None` only while a reopen has failed (every call fails then).
    db: RwLock<Option<Db>>,
    /// Open trees by namespace; sled's own `open_tree` takes a lock and allocates, so cache.
    /// Emptied when the database is reopened (a tree keeps its database open).
    trees: RwLock<HashMap<String, Tree>>,
    health: Mutex<Health>,
    #[cfg(test)]
    pub(crate) faults: Mutex<Faults>,
}

/// How long the write-behind tests wait for the next recovery try.
#[cfg(test)]
pub(crate) fn tests_recover_every() -> Duration {
    RECOVER_EVERY
}

/// Failures injected at the sled boundary (tests): what a full disk does, on demand.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Key writes (of [`SledStore::write_batch`], and the recovery probe) that still succeed
    /// before every later one fails; `None`: no fault.
    pub writes_left: Option<usize>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_db(path: &Path) -> Result<Db, StateError> {
    ::sled::Config::new()
        .path(path)
        .open()
        .map_err(|e| open_error(path, &e))
}

/// Closes `db`, or leaks it when closing panics (sled's close fsyncs with `unwrap`).
fn close(db: Db) {
    if std::panic::catch_unwind(AssertUnwindSafe(move || drop(db))).is_err() {
        tracing::warn!("Closing the failed state database panicked; its memory is leaked.");
    }
}

impl SledStore {
    /// Opens (or creates) the database in directory `path`.
    pub fn open(path: &Path) -> Result<SledStore, StateError> {
        // A store just dropped (a restart in this process) releases its lock when sled's own
        // threads end: wait a little for it before reporting the directory as in use.
        let deadline = Instant::now() + Duration::from_secs(1);
        let db = loop {
            match open_db(path) {
                Err(StateError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Ok(SledStore {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
            trees: RwLock::new(HashMap::new()),
            health: Mutex::new(Health::default()),
            #[cfg(test)]
            faults: Mutex::new(Faults::default()),
        })
    }

    /// Starts a background thread that calls [`SledStore::sweep`] every `every` and, while
    /// the store is failing, [`SledStore::recover`] every second. The thread holds only a
    /// weak reference and ends once the store is dropped.
    pub fn spawn_sweeper(store: &Arc<SledStore>, every: Duration) -> std::io::Result<()> {
        let weak: Weak<SledStore> = Arc::downgrade(store);
        let tick = every.min(RECOVER_EVERY);
        std::thread::Builder::new()
            .name("weir-state-sweep".to_owned())
            .spawn(move || {
                let mut last_sweep = Instant::now();
                loop {
                    std::thread::sleep(tick);
                    let Some(store) = weak.upgrade() else {
                        return;
                    };
                    if !store.recover() || last_sweep.elapsed() < every {
                        continue;
                    }
                    last_sweep = Instant::now();
                    match store.sweep() {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(removed = n, "State sweep removed expired keys."),
                        Err(e) => tracing::warn!(error = %e, "State sweep failed."),
                    }
                }
            })
            .map(|_| ())
    }

    /// Records a sled error: the store is failing until [`SledStore::recover`] succeeds.
    fn failed(&self, e: ::sled::Error, op: Op) -> StateError {
        self.mark_failed(e.to_string(), op)
    }

    fn mark_failed(&self, reason: String, op: Op) -> StateError {
        if op == Op::Write {
            super::write_errors().inc();
        }
        let mut health = lock(&self.health);
        if health.failure.is_none() {
            tracing::error!(
                error = %reason,
                path = %self.path.display(),
                "State store failed; /readyz is red until a write succeeds again."
            );
            health.failure = Some(reason.clone());
        }
        StateError::Backend(reason)
    }

    /// Runs `f` on the open database (read-locked, so no reopen happens meanwhile).
    fn with_db<R>(
        &self,
        op: Op,
        f: impl FnOnce(&Db) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let db = read(&self.db);
        let Some(db) = db.as_ref() else {
            let why = lock(&self.health)
                .failure
                .clone()
                .unwrap_or_else(|| "not open".to_owned());
            return Err(self.mark_failed(format!("the state database is closed: {why}"), op));
        };
        f(db)
    }

    /// Runs `f` on the tree of namespace `ns`.
    fn with_tree<R>(
        &self,
        ns: &str,
        op: Op,
        f: impl FnOnce(&Tree) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        self.with_db(op, |db| {
            let cached = read(&self.trees).get(ns).cloned();
            let tree = match cached {
                Some(t) => t,
                None => {
                    let tree = db.open_tree(ns).map_err(|e| self.failed(e, op))?;
                    write(&self.trees).insert(ns.to_owned(), tree.clone());
                    tree
                }
            };
            f(&tree)
        })
    }

    /// Deletes every expired value in every namespace; returns how many it removed.
    ///
    /// A full scan: fine for the key counts plugins keep (tens of thousands); a value that
    /// changed since it was read is left alone (`compare_and_swap` against the expired bytes).
    pub fn sweep(&self) -> Result<usize, StateError> {
        let now = now_ms();
        self.with_db(Op::Write, |db| {
            let mut removed = 0;
            for name in db.tree_names() {
                let tree = db.open_tree(&name).map_err(|e| self.failed(e, Op::Read))?;
                for item in tree.iter() {
                    let (key, raw) = item.map_err(|e| self.failed(e, Op::Read))?;
                    if decode_live(&raw, now).is_none()
                        && tree
                            .compare_and_swap(&key, Some(&raw), None as Option<&[u8]>)
                            .map_err(|e| self.failed(e, Op::Write))?
                            .is_ok()
                    {
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
    }

    /// Writes everything to disk now.
    pub fn flush(&self) -> Result<(), StateError> {
        self.with_db(Op::Write, |db| {
            db.flush().map_err(|e| self.failed(e, Op::Write))?;
            Ok(())
        })
    }

    /// Serves again after a failure if the disk takes writes: returns whether the store is
    /// serving. Does nothing while it serves, and tries at most once a second.
    ///
    /// A try writes and fsyncs a probe; if the database refuses (sled keeps failing after an
    /// I/O error), it is closed and opened again, and probed again.
    pub fn recover(&self) -> bool {
        {
            let mut health = lock(&self.health);
            if health.failure.is_none() {
                return true;
            }
            if health
                .last_attempt
                .is_some_and(|t| t.elapsed() < RECOVER_EVERY)
            {
                return false;
            }
            health.last_attempt = Some(Instant::now());
        }
        match self.reopen_unless_writable() {
            Ok(()) => {
                let mut health = lock(&self.health);
                health.failure = None;
                health.last_attempt = None;
                tracing::info!(path = %self.path.display(), "State store recovered.");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "State store still failing.");
                false
            }
        }
    }

    fn reopen_unless_writable(&self) -> Result<(), StateError> {
        let mut db = write(&self.db);
        if let Some(current) = db.as_ref()
            && self.probe(current).is_ok()
        {
            return Ok(());
        }
        // No tree may outlive its database: a tree holds the directory's lock.
        write(&self.trees).clear();
        if let Some(old) = db.take() {
            close(old);
        }
        let fresh = open_db(&self.path)?;
        self.probe(&fresh)?;
        *db = Some(fresh);
        Ok(())
    }

    /// Writes and fsyncs [`PROBE_KEY`].
    fn probe(&self, db: &Db) -> Result<(), StateError> {
        #[cfg(test)]
        self.injected_fault()?;
        db.insert(PROBE_KEY, encode_at(b"", 0))
            .map_err(|e| StateError::Backend(e.to_string()))?;
        db.flush().map_err(|e| StateError::Backend(e.to_string()))?;
        Ok(())
    }

    /// Fails when the injected fault says this key write is refused.
    #[cfg(test)]
    fn injected_fault(&self) -> Result<(), StateError> {
        let mut faults = lock(&self.faults);
        match &mut faults.writes_left {
            None => Ok(()),
            Some(0) => Err(StateError::Backend(
                "No space left on device (os error 28) [injected]".to_owned(),
            )),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
        }
    }

    /// The live value of `key` and its expiry (ms since the epoch, 0 = never).
    pub(crate) fn get_entry(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        let now = now_ms();
        self.with_tree(ns, Op::Read, |tree| {
            Ok(self
                .get_live(tree, key, now)?
                .and_then(|raw| decode_live(&raw, now).map(|(exp, v)| (exp, v.to_vec()))))
        })
    }

    /// Applies `writes` all or nothing, across namespaces (one sled transaction, which sled
    /// also recovers all or nothing after a crash), then makes them durable (fsync). So
    /// after a crash sled holds each flush of the write-behind front whole or not at all,
    /// and counters that move together (a key's tokens and requests) never come from
    /// different flushes. The transaction holds sled's global write lock while it applies:
    /// sled reads (the front's misses) wait for it. A removal of a key sled does not hold
    /// writes nothing.
    pub(crate) fn write_batch(&self, writes: &[SledWrite]) -> Result<(), StateError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.with_db(Op::Write, |db| {
            // One tree per namespace, and for each write the index of its tree.
            let mut names: Vec<&str> = Vec::new();
            let mut trees: Vec<Tree> = Vec::new();
            let mut plan: Vec<(usize, &SledWrite)> = Vec::with_capacity(writes.len());
            for w in writes {
                let i = match names.iter().position(|ns| *ns == w.ns) {
                    Some(i) => i,
                    None => {
                        names.push(&w.ns);
                        let tree = db.open_tree(&w.ns).map_err(|e| self.failed(e, Op::Write))?;
                        trees.push(tree);
                        trees.len() - 1
                    }
                };
                if w.value.is_none()
                    && !trees[i]
                        .contains_key(&w.key)
                        .map_err(|e| self.failed(e, Op::Read))?
                {
                    continue;
                }
                plan.push((i, w));
            }
            let applied = trees.as_slice().transaction(|view| {
                for &(i, w) in &plan {
                    #[cfg(test)]
                    if self.injected_fault().is_err() {
                        return Err(::sled::transaction::ConflictableTransactionError::Abort(()));
                    }
                    match &w.value {
                        Some(stored) => view[i].insert(w.key.as_bytes(), stored.as_slice())?,
                        None => view[i].remove(w.key.as_bytes())?,
                    };
                }
                Ok(())
            });
            match applied {
                Ok(()) => {}
                Err(TransactionError::Storage(e)) => return Err(self.failed(e, Op::Write)),
                Err(TransactionError::Abort(())) => {
                    return Err(self.mark_failed(
                        "No space left on device (os error 28) [injected]".to_owned(),
                        Op::Write,
                    ));
                }
            }
            db.flush().map_err(|e| self.failed(e, Op::Write))?;
            Ok(())
        })
    }

    /// The raw stored bytes of `key` if live; removes it if expired.
    fn get_live(&self, tree: &Tree, key: &str, now: u64) -> Result<Option<IVec>, StateError> {
        let Some(raw) = tree.get(key).map_err(|e| self.failed(e, Op::Read))? else {
            return Ok(None);
        };
        if decode_live(&raw, now).is_some() {
            return Ok(Some(raw));
        }
        // Lazy expiry; losing the race to a concurrent write is fine.
        let _ = tree
            .compare_and_swap(key, Some(&raw), None as Option<&[u8]>)
            .map_err(|e| self.failed(e, Op::Write))?;
        Ok(None)
    }
}

/// sled's name for the tree every database has; it holds none of our namespaces.
const DEFAULT_TREE: &[u8] = b"__sled__default";

/// The error of opening `path`: [`StateError::Locked`] when another process holds the lock
/// (sled 0.34 reports that only as an I/O error with this message).
fn open_error(path: &Path, e: &::sled::Error) -> StateError {
    let path = path.display().to_string();
    match e {
        ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StateError::Locked { path }
        }
        _ => StateError::Open {
            path,
            reason: e.to_string(),
        },
    }
}

impl SledStore {
    /// The names of the trees that may hold namespaces (some may be empty).
    pub(crate) fn tree_namespaces(&self) -> Result<Vec<String>, StateError> {
        self.with_db(Op::Read, |db| {
            Ok(db
                .tree_names()
                .into_iter()
                .filter(|name| &name[..] != DEFAULT_TREE)
                .map(|name| String::from_utf8_lossy(&name).into_owned())
                .collect())
        })
    }

    /// The live entries of `ns` with keys after `after` (exclusive), in key order, read
    /// lazily.
    pub(crate) fn entries_after(
        &self,
        ns: &str,
        after: Option<&str>,
    ) -> Result<impl Iterator<Item = Result<Entry, StateError>> + use<>, StateError> {
        let tree = self.with_tree(ns, Op::Read, |tree| Ok(tree.clone()))?;
        let now = now_ms();
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(IVec::from(a.as_bytes())),
            None => std::ops::Bound::Unbounded,
        };
        let iter = tree.range::<IVec, _>((start, std::ops::Bound::Unbounded));
        Ok(iter.filter_map(move |item| match item {
            Err(e) => Some(Err(StateError::Backend(e.to_string()))),
            Ok((key, raw)) => decode_live(&raw, now).map(|(expires, value)| {
                Ok(Entry {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    value: value.to_vec(),
                    expires_ms: (expires != 0).then_some(expires),
                })
            }),
        }))
    }

    /// The stored form of an imported entry: its value (a ledger account in the form with
    /// its expiry, see [`StateStore::put_entry`]) behind its absolute expiry; `None` when it
    /// has already expired.
    pub(crate) fn stored_entry(entry: &Entry) -> Option<(u64, Vec<u8>)> {
        let (value, expires) = import_account(
            &entry.key,
            &entry.value,
            entry.expires_ms,
            AccountForm::ExpiryInValue,
        )
        .unwrap_or_else(|| (entry.value.clone(), entry.expires_ms));
        if expires.is_some_and(|e| e <= now_ms()) {
            return None;
        }
        Some((expires.unwrap_or(0), value))
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        let Some(db) = self
            .db
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut failing = lock(&self.health).failure.is_some();
        if !failing && let Err(e) = db.flush() {
            tracing::warn!(error = %e, "State flush on close failed.");
            failing = true;
        }
        if failing {
            // sled's close writes again and panics (`unwrap`) when the disk refuses, which
            // aborts a process already unwinding: leak it, the OS closes the files.
            tracing::warn!(
                path = %self.path.display(),
                "State store is failing: leaving it unclosed; changes not yet on disk are lost."
            );
            self.trees
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            std::mem::forget(db);
        }
    }
}

impl StateStore for SledStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let now = now_ms();
        self.with_tree(ns, Op::Read, |tree| {
            Ok(self
                .get_live(tree, key, now)?
                .and_then(|raw| decode_live(&raw, now).map(|(_, v)| v.to_vec())))
        })
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        self.with_tree(ns, Op::Write, |tree| {
            tree.insert(key, encode(value, ttl, now_ms()))
                .map_err(|e| self.failed(e, Op::Write))?;
            Ok(())
        })
    }

    fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        self.with_tree(ns, Op::Write, |tree| {
            loop {
                let now = now_ms();
                let raw = tree.get(key).map_err(|e| self.failed(e, Op::Read))?;
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
                    .map_err(|e| self.failed(e, Op::Write))?
                    .is_ok()
                {
                    return Ok(next);
                }
            }
        })
    }

    fn cas(
        &self,
        ns: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        self.with_tree(ns, Op::Write, |tree| {
            loop {
                let now = now_ms();
                let raw = tree.get(key).map_err(|e| self.failed(e, Op::Read))?;
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
                    .map_err(|e| self.failed(e, Op::Write))?
                {
                    Ok(()) => return Ok(true),
                    // The raw bytes changed under us (maybe only an expired value replaced):
                    // re-read and compare again.
                    Err(_) => continue,
                }
            }
        })
    }

    fn delete(&self, ns: &str, key: &str) -> Result<bool, StateError> {
        self.with_tree(ns, Op::Write, |tree| {
            let old = tree.remove(key).map_err(|e| self.failed(e, Op::Write))?;
            Ok(old.is_some_and(|raw| decode_live(&raw, now_ms()).is_some()))
        })
    }

    fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let now = now_ms();
        self.with_tree(ns, Op::Read, |tree| {
            let mut out = Vec::new();
            for item in tree.scan_prefix(prefix) {
                if out.len() >= limit {
                    break;
                }
                let (key, raw) = item.map_err(|e| self.failed(e, Op::Read))?;
                if let Some((_, value)) = decode_live(&raw, now) {
                    out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
                }
            }
            Ok(out)
        })
    }

    fn flush(&self) -> Result<(), StateError> {
        SledStore::flush(self)
    }

    fn health(&self) -> Result<(), String> {
        match &lock(&self.health).failure {
            None => Ok(()),
            Some(why) => Err(format!("state store failing: {why}")),
        }
    }

    fn namespaces(&self) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        for ns in self.tree_namespaces()? {
            if self.entries_after(&ns, None)?.next().transpose()?.is_some() {
                out.push(ns);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn entries(
        &self,
        ns: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StateError> {
        self.entries_after(ns, after)?.take(limit).collect()
    }

    fn put_entry(&self, ns: &str, entry: &Entry) -> Result<(), StateError> {
        let Some((expires, value)) = SledStore::stored_entry(entry) else {
            return Ok(());
        };
        self.with_tree(ns, Op::Write, |tree| {
            tree.insert(entry.key.as_bytes(), encode_at(&value, expires))
                .map_err(|e| self.failed(e, Op::Write))?;
            Ok(())
        })
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
    fn export_entries() {
        shared::export_entries(&store().1);
    }

    #[test]
    fn a_second_open_reports_the_lock() {
        let (dir, _held) = store();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
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
        let db = store.db.read().unwrap();
        assert_eq!(db.as_ref().unwrap().open_tree("s").unwrap().len(), 1);
    }

    #[test]
    fn a_full_disk_turns_health_red_and_a_reopen_recovers() {
        let Some(disk) = shared::SmallDisk::mount("4m") else {
            return;
        };
        let dir = disk.path().join("state");
        let store = SledStore::open(&dir).unwrap();
        store.set("d", "before", b"kept", None).unwrap();
        store.flush().unwrap();
        assert_eq!(store.health(), Ok(()));
        let errors = crate::state::write_errors().get();
        let filler = disk.fill();
        // sled takes writes in memory; they fail at the latest when flushed.
        let big = vec![7u8; 64 * 1024];
        let failed = (0..64).any(|i| {
            store.set("d", &format!("big{i}"), &big, None).is_err() || store.flush().is_err()
        });
        assert!(failed, "a full disk must fail a write or a flush");
        let reason = store.health().unwrap_err();
        assert!(reason.contains("state store failing"), "{reason}");
        assert!(crate::state::write_errors().get() > errors);
        // Still full: recovery fails and the store stays red.
        assert!(!store.recover());
        assert!(store.health().is_err());
        // Room again: the next try (a second later) reopens, and writes work.
        std::fs::remove_file(filler).unwrap();
        std::thread::sleep(RECOVER_EVERY);
        assert!(store.recover());
        assert_eq!(store.health(), Ok(()));
        store.set("d", "after", b"new", None).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = SledStore::open(&dir).unwrap();
        assert_eq!(
            store.get("d", "before").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(
            store.get("d", "after").unwrap().as_deref(),
            Some(&b"new"[..])
        );
    }

    #[test]
    fn dropping_a_store_on_a_full_disk_does_not_panic() {
        let Some(disk) = shared::SmallDisk::mount("4m") else {
            return;
        };
        let store = SledStore::open(&disk.path().join("state")).unwrap();
        let _filler = disk.fill();
        let big = vec![7u8; 64 * 1024];
        for i in 0..64 {
            let _ = store.set("d", &format!("big{i}"), &big, None);
        }
        let _ = store.flush();
        // The drop would panic inside sled on a full disk; it must not.
        drop(store);
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
