//! Target statistics: how each upstream target (a provider and an upstream model) has been
//! doing, kept by the upstream layer and read by routing.
//!
//! ```text
//!  upstream attempt ──start──> InFlight (in_flight += 1)
//!                                 │ finish(latency, ok) ──> EWMAs updated, attempts += 1
//!                                 └ drop                ──> in_flight -= 1
//! ```
//!
//! One [`TargetStats`] lives in [`crate::pipeline::Services`], so it is shared by every
//! generation: a reload keeps what was learned. The hot path takes a read lock and clones an
//! `Arc`: it allocates only the first time a target is seen. This module imports nothing
//! from the pipeline or the plugins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// Weight of a new latency sample.
const LATENCY_ALPHA: f64 = 0.2;

/// Weight of a new error sample (0 or 1).
const ERROR_ALPHA: f64 = 0.1;

/// Targets tracked at most. A routing plugin can name upstream models freely; past this
/// many distinct targets new ones are not tracked, so memory stays bounded.
const MAX_TARGETS: usize = 4096;

/// What [`TargetStats::get`] reports about one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetSnapshot {
    /// EWMA (alpha 0.2) of the latency to first byte of successful attempts, ms; the first
    /// success seeds it. 0 until an attempt succeeded.
    pub latency_ewma_ms: f64,
    /// EWMA (alpha 0.1) of failures (1) and successes (0), starting at 0: between 0 and 1.
    pub error_rate: f64,
    /// Attempts running now.
    pub in_flight: u32,
    /// Attempts finished (successes and failures) since the process started.
    pub attempts: u64,
}

#[derive(Debug, Default)]
struct Averages {
    latency_ms: Option<f64>,
    error_rate: f64,
    attempts: u64,
}

#[derive(Debug, Default)]
struct Entry {
    in_flight: AtomicU32,
    averages: Mutex<Averages>,
}

impl Entry {
    fn record(&self, latency: Duration, ok: bool) {
        let mut a = self.averages.lock().unwrap_or_else(PoisonError::into_inner);
        a.attempts = a.attempts.saturating_add(1);
        let failure = if ok { 0.0 } else { 1.0 };
        a.error_rate += ERROR_ALPHA * (failure - a.error_rate);
        if ok {
            let ms = latency.as_secs_f64() * 1000.0;
            a.latency_ms = Some(match a.latency_ms {
                None => ms,
                Some(prev) => prev + LATENCY_ALPHA * (ms - prev),
            });
        }
    }

    fn snapshot(&self) -> TargetSnapshot {
        let a = self.averages.lock().unwrap_or_else(PoisonError::into_inner);
        TargetSnapshot {
            latency_ewma_ms: a.latency_ms.unwrap_or(0.0),
            error_rate: a.error_rate,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            attempts: a.attempts,
        }
    }
}

/// Statistics per (provider name, upstream model). Create one per process.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// provider -> upstream model -> entry (nested so lookups by `&str` need no key).
    map: RwLock<HashMap<String, HashMap<String, Arc<Entry>>>>,
}

/// One attempt in progress: counted in `in_flight` until dropped. Call
/// [`InFlight::finish`] to record its outcome; dropping it without that (the request was
/// cancelled, or the attempt says nothing about the target) records nothing.
#[derive(Debug)]
#[must_use = "dropping an InFlight ends the attempt without recording it"]
pub struct InFlight {
    entry: Option<Arc<Entry>>,
}

impl InFlight {
    /// Ends the attempt: `latency` is to the first byte (successes) or to the failure;
    /// only successes feed the latency average.
    pub fn finish(self, latency: Duration, ok: bool) {
        if let Some(entry) = &self.entry {
            entry.record(latency, ok);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(entry) = &self.entry {
            entry.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl TargetStats {
    /// Starts an attempt on a target.
    pub fn start(&self, provider: &str, model: &str) -> InFlight {
        let entry = self.entry(provider, model);
        if let Some(e) = &entry {
            e.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight { entry }
    }

    /// What is known about a target; `None` if no attempt was ever started on it.
    pub fn get(&self, provider: &str, model: &str) -> Option<TargetSnapshot> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(provider)
            .and_then(|models| models.get(model))
            .map(|e| e.snapshot())
    }

    fn entry(&self, provider: &str, model: &str) -> Option<Arc<Entry>> {
        {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = map.get(provider).and_then(|models| models.get(model)) {
                return Some(e.clone());
            }
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        // Another attempt may have inserted it between the two locks.
        if let Some(e) = map.get(provider).and_then(|models| models.get(model)) {
            return Some(e.clone());
        }
        let tracked: usize = map.values().map(HashMap::len).sum();
        if tracked >= MAX_TARGETS {
            tracing::debug!(
                provider,
                upstream_model = model,
                "Target statistics are full; this target is not tracked."
            );
            return None;
        }
        let entry = Arc::new(Entry::default());
        map.entry(provider.to_owned())
            .or_default()
            .insert(model.to_owned(), entry.clone());
        Some(entry)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unknown_target_has_no_stats() {
        let stats = TargetStats::default();
        assert_eq!(stats.get("openai", "gpt-4o"), None);
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let stats = TargetStats::default();
        let a = stats.start("openai", "gpt-4o");
        let b = stats.start("openai", "gpt-4o");
        let other = stats.start("openai", "gpt-4o-mini");
        assert_eq!(stats.get("openai", "gpt-4o").unwrap().in_flight, 2);
        assert_eq!(stats.get("openai", "gpt-4o-mini").unwrap().in_flight, 1);
        a.finish(ms(10), true);
        assert_eq!(stats.get("openai", "gpt-4o").unwrap().in_flight, 1);
        drop(b);
        let s = stats.get("openai", "gpt-4o").unwrap();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.attempts, 1, "a dropped attempt records nothing");
        drop(other);
        assert_eq!(stats.get("openai", "gpt-4o-mini").unwrap().in_flight, 0);
    }

    #[test]
    fn first_latency_seeds_then_ewma_with_alpha_0_2() {
        let stats = TargetStats::default();
        stats.start("p", "m").finish(ms(100), true);
        assert!((stats.get("p", "m").unwrap().latency_ewma_ms - 100.0).abs() < 1e-9);
        stats.start("p", "m").finish(ms(200), true);
        // 100 + 0.2 * (200 - 100)
        assert!((stats.get("p", "m").unwrap().latency_ewma_ms - 120.0).abs() < 1e-9);
        // Failures do not move the latency.
        stats.start("p", "m").finish(ms(5000), false);
        assert!((stats.get("p", "m").unwrap().latency_ewma_ms - 120.0).abs() < 1e-9);
    }

    #[test]
    fn latency_is_zero_until_a_success() {
        let stats = TargetStats::default();
        stats.start("p", "m").finish(ms(30), false);
        let s = stats.get("p", "m").unwrap();
        assert_eq!(s.latency_ewma_ms, 0.0);
        assert_eq!(s.attempts, 1);
    }

    #[test]
    fn error_rate_is_an_ewma_with_alpha_0_1() {
        let stats = TargetStats::default();
        stats.start("p", "m").finish(ms(1), false);
        assert!((stats.get("p", "m").unwrap().error_rate - 0.1).abs() < 1e-9);
        stats.start("p", "m").finish(ms(1), false);
        // 0.1 + 0.1 * (1 - 0.1)
        assert!((stats.get("p", "m").unwrap().error_rate - 0.19).abs() < 1e-9);
        stats.start("p", "m").finish(ms(1), true);
        // 0.19 + 0.1 * (0 - 0.19)
        assert!((stats.get("p", "m").unwrap().error_rate - 0.171).abs() < 1e-9);
        for _ in 0..200 {
            stats.start("p", "m").finish(ms(1), false);
        }
        let s = stats.get("p", "m").unwrap();
        assert!(
            s.error_rate > 0.99 && s.error_rate <= 1.0,
            "{}",
            s.error_rate
        );
        assert_eq!(s.attempts, 203);
    }

    #[test]
    fn stops_tracking_new_targets_when_full() {
        let stats = TargetStats::default();
        for i in 0..MAX_TARGETS {
            stats.start("p", &format!("m{i}")).finish(ms(1), true);
        }
        let untracked = stats.start("p", "one-too-many");
        assert_eq!(stats.get("p", "one-too-many"), None);
        untracked.finish(ms(1), true);
        // Known targets keep working.
        stats.start("p", "m0").finish(ms(1), true);
        assert_eq!(stats.get("p", "m0").unwrap().attempts, 2);
    }

    #[test]
    fn shared_across_threads() {
        let stats = Arc::new(TargetStats::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        stats.start("p", "m").finish(ms(10), true);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = stats.get("p", "m").unwrap();
        assert_eq!(s.attempts, 1000);
        assert_eq!(s.in_flight, 0);
        assert!((s.latency_ewma_ms - 10.0).abs() < 1e-9);
    }
}
