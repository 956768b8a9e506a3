//! [`MemoryStore`]: a process-local [`StateStore`] for tests and the offline plugin harness.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::primitives::{AccountForm, import_account};
use super::{Entry, StateError, StateStore, add_to_counter, now_ms};

/// Entries of one namespace: key -> (expiry ms since the epoch, 0 = never; value).
type Entries = BTreeMap<String, (u64, Vec<u8>)>;

/// A [`StateStore`] kept in memory behind one mutex; lost when the process exits.
#[derive(Debug, Default)]
pub struct MemoryStore {
    namespaces: Mutex<HashMap<String, Entries>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entries>> {
        // A panic while holding the lock cannot leave an entry half-written (every update is
        // one insert or remove), so a poisoned lock is still consistent.
        self.namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn live<'a>(entries: Option<&'a Entries>, key: &str, now: u64) -> Option<&'a (u64, Vec<u8>)> {
    entries
        .and_then(|e| e.get(key))
        .filter(|(exp, _)| *exp == 0 || *exp > now)
}

fn expiry(ttl: Option<Duration>, now: u64) -> u64 {
    match ttl {
        None => 0,
        Some(ttl) => now
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .max(1),
    }
}

impl StateStore for MemoryStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let map = self.lock();
        Ok(live(map.get(ns), key, now_ms()).map(|(_, v)| v.clone()))
    }

    fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let now = now_ms();
        self.lock()
            .entry(ns.to_owned())
            .or_default()
            .insert(key.to_owned(), (expiry(ttl, now), value.to_vec()));
        Ok(())
    }

    fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StateError> {
        let now = now_ms();
        let mut map = self.lock();
        let (exp, next) = match live(map.get(ns), key, now) {
            Some((exp, v)) => (*exp, add_to_counter(key, Some(v), delta)?),
            None => (expiry(ttl, now), add_to_counter(key, None, delta)?),
        };
        map.entry(ns.to_owned())
            .or_default()
            .insert(key.to_owned(), (exp, next.to_string().into_bytes()));
        Ok(next)
    }

    fn cas(
        &self,
        ns: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        let now = now_ms();
        let mut map = self.lock();
        let current = live(map.get(ns), key, now).map(|(_, v)| v.as_slice());
        if current != expected {
            return Ok(false);
        }
        let entries = map.entry(ns.to_owned()).or_default();
        match new {
            Some(v) => entries.insert(key.to_owned(), (expiry(ttl, now), v.to_vec())),
            None => entries.remove(key),
        };
        Ok(true)
    }

    fn delete(&self, ns: &str, key: &str) -> Result<bool, StateError> {
        let now = now_ms();
        let mut map = self.lock();
        let was_live = live(map.get(ns), key, now).is_some();
        if let Some(entries) = map.get_mut(ns) {
            entries.remove(key);
        }
        Ok(was_live)
    }

    fn scan_prefix(
        &self,
        ns: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let now = now_ms();
        let map = self.lock();
        let Some(entries) = map.get(ns) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, (exp, _))| *exp == 0 || *exp > now)
            .take(limit)
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect())
    }

    fn namespaces(&self) -> Result<Vec<String>, StateError> {
        let now = now_ms();
        let mut out: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, entries)| entries.values().any(|(exp, _)| *exp == 0 || *exp > now))
            .map(|(ns, _)| ns.clone())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn entries(
        &self,
        ns: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StateError> {
        let now = now_ms();
        let map = self.lock();
        let Some(entries) = map.get(ns) else {
            return Ok(Vec::new());
        };
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_owned()));
        Ok(entries
            .range((start, Bound::Unbounded))
            .filter(|(_, (exp, _))| *exp == 0 || *exp > now)
            .take(limit)
            .map(|(k, (exp, v))| Entry {
                key: k.clone(),
                value: v.clone(),
                expires_ms: (*exp != 0).then_some(*exp),
            })
            .collect())
    }

    fn put_entry(&self, ns: &str, entry: &Entry) -> Result<(), StateError> {
        let (value, expires) = import_account(
            &entry.key,
            &entry.value,
            entry.expires_ms,
            AccountForm::ExpiryInValue,
        )
        .unwrap_or_else(|| (entry.value.clone(), entry.expires_ms));
        if expires.is_some_and(|e| e <= now_ms()) {
            return Ok(());
        }
        self.lock()
            .entry(ns.to_owned())
            .or_default()
            .insert(entry.key.clone(), (expires.unwrap_or(0), value));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests as shared;
    use std::sync::Arc;

    #[test]
    fn basic() {
        shared::basic(&MemoryStore::new());
    }

    #[test]
    fn cas() {
        shared::cas(&MemoryStore::new());
    }

    #[test]
    fn incr() {
        shared::incr(&MemoryStore::new());
    }

    #[test]
    fn ttl() {
        shared::ttl(&MemoryStore::new());
    }

    #[test]
    fn scan_10k() {
        shared::scan(&MemoryStore::new());
    }

    #[test]
    fn concurrent_incr_is_exact() {
        shared::concurrent_incr(Arc::new(MemoryStore::new()));
    }

    #[test]
    fn limiter() {
        shared::limiter(&MemoryStore::new());
    }

    #[test]
    fn limiter_settle() {
        shared::limiter_settle(&MemoryStore::new());
    }

    #[test]
    fn limiter_edges() {
        shared::limiter_edges(&MemoryStore::new());
    }

    #[test]
    fn limiter_expires() {
        shared::limiter_expires(&MemoryStore::new());
    }

    #[test]
    fn ledger() {
        shared::ledger(&MemoryStore::new());
    }

    #[test]
    fn ledger_ttl() {
        shared::ledger_ttl(&MemoryStore::new());
    }

    #[test]
    fn concurrent_limiter_never_admits_more_than_the_limit() {
        shared::concurrent_limiter(Arc::new(MemoryStore::new()));
    }

    #[test]
    fn concurrent_ledger_never_reserves_more_than_the_limit() {
        shared::concurrent_ledger(Arc::new(MemoryStore::new()));
    }

    #[test]
    fn export_entries() {
        shared::export_entries(&MemoryStore::new());
    }
}
