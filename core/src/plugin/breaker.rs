//! A per-plugin circuit breaker: stop calling a plugin that keeps failing, then retry it with
//! exponential backoff.
//!
//! ```text
//!   closed --(N consecutive failures)--> open --(cooldown elapsed)--> half-open
//!     ^                                   ^                              |
//!     |                                   +---(trial fails: cooldown x2)-+
//!     +----------------------(trial succeeds)----------------------------+
//! ```
//!
//! While open, calls are refused without running the plugin and the chain applies the
//! plugin's failure policy, exactly as for a failed call. In half-open, one call at a time is
//! let through as a trial. The state is a few atomics: the hot path (closed, no failures) is
//! two relaxed loads per call and never takes a lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `breaker` of a plugin instance in `weir.toml`; every field has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfigFile {
    /// Consecutive failures that open the breaker. Default 5.
    #[serde(default)]
    pub failures: Option<u32>,
    /// How long the breaker stays open the first time, ms. Default 1000.
    #[serde(default)]
    pub cooldown_ms: Option<u64>,
    /// Ceiling of the doubling cooldown, ms. Default 60000.
    #[serde(default)]
    pub max_cooldown_ms: Option<u64>,
}

/// Breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (at least 1).
    pub failures: u32,
    /// First open period.
    pub cooldown: Duration,
    /// Longest open period.
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

impl From<&BreakerConfigFile> for BreakerConfig {
    fn from(f: &BreakerConfigFile) -> Self {
        let d = BreakerConfig::default();
        let cooldown = f.cooldown_ms.map_or(d.cooldown, Duration::from_millis);
        BreakerConfig {
            failures: f.failures.unwrap_or(d.failures).max(1),
            cooldown,
            max_cooldown: f
                .max_cooldown_ms
                .map_or(d.max_cooldown, Duration::from_millis)
                .max(cooldown),
        }
    }
}

/// What the breaker says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the plugin.
    Allow,
    /// Call the plugin as the half-open trial; its outcome closes or re-opens the breaker.
    Trial,
    /// Do not call; treat as a failure of kind `circuit_open`.
    Reject,
}

/// One plugin instance's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Time origin of the millisecond timestamps below.
    origin: Instant,
    consecutive: AtomicU32,
    /// 0 = closed; otherwise ms since `origin` (+1) until which the breaker is open.
    open_until: AtomicU64,
    /// How many times in a row it has opened; sets the backoff.
    trips: AtomicU32,
    /// Whether the half-open trial call is in flight.
    trial: AtomicBool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            origin: Instant::now(),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            trial: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 stays free to mean "closed".
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Whether a call may run now.
    pub fn admit(&self) -> Admission {
        self.admit_at(self.now_ms())
    }

    /// Records the outcome of a call that [`Breaker::admit`] allowed. Returns `true` when
    /// this outcome changed the state (opened or closed the breaker), for logging.
    pub fn record(&self, admission: Admission, ok: bool) -> bool {
        self.record_at(admission, ok, self.now_ms())
    }

    /// Whether the breaker is currently open (or half-open).
    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    fn admit_at(&self, now: u64) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Allow;
        }
        if now < until {
            return Admission::Reject;
        }
        if self
            .trial
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            Admission::Trial
        } else {
            Admission::Reject
        }
    }

    fn record_at(&self, admission: Admission, ok: bool, now: u64) -> bool {
        match (admission, ok) {
            (Admission::Reject, _) => false,
            (Admission::Allow, true) => {
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                false
            }
            (Admission::Allow, false) => {
                let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= self.config.failures && self.open_until.load(Ordering::Acquire) == 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.trips.store(1, Ordering::Relaxed);
                    self.open_until
                        .store(now.saturating_add(self.cooldown_ms(1)), Ordering::Release);
                    true
                } else {
                    false
                }
            }
            (Admission::Trial, true) => {
                self.consecutive.store(0, Ordering::Relaxed);
                self.trips.store(0, Ordering::Relaxed);
                self.open_until.store(0, Ordering::Release);
                self.trial.store(false, Ordering::Release);
                true
            }
            (Admission::Trial, false) => {
                let trips = self.trips.fetch_add(1, Ordering::AcqRel).saturating_add(1);
                self.open_until.store(
                    now.saturating_add(self.cooldown_ms(trips)),
                    Ordering::Release,
                );
                self.trial.store(false, Ordering::Release);
                true
            }
        }
    }

    /// Cooldown after the `trips`-th opening in a row: doubling, capped.
    fn cooldown_ms(&self, trips: u32) -> u64 {
        let base = u64::try_from(self.config.cooldown.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.config.max_cooldown.as_millis()).unwrap_or(u64::MAX);
        let factor = 1u64 << trips.saturating_sub(1).min(20);
        base.saturating_mul(factor).min(max).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures: 3,
            cooldown: Duration::from_millis(100),
            max_cooldown: Duration::from_millis(250),
        })
    }

    fn fail(b: &Breaker, now: u64) -> bool {
        let a = b.admit_at(now);
        assert_ne!(a, Admission::Reject);
        b.record_at(a, false, now)
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers() {
        let b = breaker();
        assert!(!fail(&b, 1));
        assert!(!fail(&b, 2));
        // A success in between resets the count.
        b.record_at(b.admit_at(3), true, 3);
        assert!(!fail(&b, 4));
        assert!(!fail(&b, 5));
        assert!(fail(&b, 6), "third consecutive failure opens");
        assert_eq!(b.admit_at(50), Admission::Reject);
        assert_eq!(b.admit_at(105), Admission::Reject);
        // Cooldown over: one trial at a time.
        assert_eq!(b.admit_at(106), Admission::Trial);
        assert_eq!(b.admit_at(107), Admission::Reject);
        assert!(
            b.record_at(Admission::Trial, true, 108),
            "trial success closes"
        );
        assert_eq!(b.admit_at(109), Admission::Allow);
        assert!(!b.is_open());
    }

    #[test]
    fn failed_trials_back_off_exponentially_up_to_the_cap() {
        let b = breaker();
        for t in 0..3 {
            fail(&b, t);
        }
        // Open until 2 + 100.
        assert_eq!(b.admit_at(101), Admission::Reject);
        assert_eq!(b.admit_at(102), Admission::Trial);
        b.record_at(Admission::Trial, false, 102);
        // Second opening: 200 ms.
        assert_eq!(b.admit_at(301), Admission::Reject);
        assert_eq!(b.admit_at(302), Admission::Trial);
        b.record_at(Admission::Trial, false, 302);
        // Third: 400 ms capped at 250.
        assert_eq!(b.admit_at(551), Admission::Reject);
        assert_eq!(b.admit_at(552), Admission::Trial);
        b.record_at(Admission::Trial, true, 552);
        assert_eq!(b.admit_at(553), Admission::Allow);
        // Fully reset: it takes three failures again.
        assert!(!fail(&b, 554));
        assert!(!fail(&b, 555));
        assert!(fail(&b, 556));
    }

    #[test]
    fn config_file_defaults() {
        let c = BreakerConfig::from(&BreakerConfigFile::default());
        assert_eq!(c, BreakerConfig::default());
        let c = BreakerConfig::from(&BreakerConfigFile {
            failures: Some(0),
            cooldown_ms: Some(5000),
            max_cooldown_ms: Some(10),
        });
        assert_eq!(c.failures, 1);
        assert_eq!(c.max_cooldown, Duration::from_secs(5));
    }
}
