//! A per-plugin circuit breaker: stop calling a plugin that keeps failing, then retry it with
//! exponential backoff; and, inside it, one small breaker per caller, so that one caller
//! whose requests make a plugin fail cannot open the breaker for everyone.
//!
//! ```text
//!   closed --(N failures in a row, from several callers)--> open --(cooldown)--> half-open
//!     ^                                                      ^                      |
//!     |                                                      +--(trial fails: x2)---+
//!     +-----------------------------(trial succeeds)------------------------------+
//! ```
//!
//! While open, calls are refused without running the plugin and the chain applies the
//! plugin's failure policy, exactly as for a failed call. In half-open, one call at a time is
//! let through as a trial.
//!
//! # Callers
//!
//! A caller is the request's metadata `key` (set by the auth plugin; [`caller_of`]). A plugin
//! can fail because of what one caller sends (five 2 MB prompts that miss a scanning plugin's
//! deadline) rather than because it is broken. So:
//!
//! - the shared breaker opens only when the failures in its window (the failures in a row
//!   since the last success) are `failures` or more, **and** at least two of them (one when
//!   `failures` is below 3) come from callers other than the one that failed most. Failures
//!   of requests without a caller count as coming from distinct callers, so a gateway without
//!   keys behaves as a plain breaker;
//! - each caller's failures are also counted on their own, in a window of
//!   [`CALLER_WINDOW`]; a caller with `failures` of them gets its own open state (the same
//!   doubling cooldown): only that caller's requests are refused. After its cooldown its next
//!   call is a trial: a success forgets the caller, a failure re-opens it for twice as long.
//!
//! At most [`MAX_CALLERS`] callers are tracked; a new one evicts the one whose failures are
//! oldest (callers not refused first). Callers that stay quiet are forgotten after
//! [`CALLER_WINDOW`].
//!
//! # Cost
//!
//! The hot path (closed, no recent failure, no caller refused) is two relaxed loads at
//! admission and two at record, with no lock: the per-caller map is only locked on a
//! failure, on the first success after one, and while some caller is refused.
//!
//! # `on-log`
//!
//! [`Breaker::record_log`] records an `on-log` call, which runs after the response: its
//! failures count like any other, but its success never closes the breaker nor clears its
//! failures. A plugin that fails every `on-request` and logs fine is still a failing plugin.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The metadata key that names the caller (the auth plugin's key id).
pub const CALLER_KEY: &str = "key";

/// Most callers one breaker tracks.
pub const MAX_CALLERS: usize = 256;

/// How long a caller's failures count towards its own breaker.
pub const CALLER_WINDOW: Duration = Duration::from_secs(10);

/// The caller of a request: its metadata `key`, if any.
pub fn caller_of(metadata: &BTreeMap<String, String>) -> Option<&str> {
    metadata
        .get(CALLER_KEY)
        .map(String::as_str)
        .filter(|k| !k.is_empty())
}

/// `breaker` of a plugin instance in `weir.toml`; every field has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfigFile {
    /// Failures in a row that open the breaker (and failures of one caller within 10 s that
    /// refuse that caller). Default 5.
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
    /// Failures that open the breaker (at least 1).
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

/// What an outcome changed, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing worth a log line.
    None,
    /// The shared breaker opened (or re-opened after a failed trial): every call is refused.
    Opened,
    /// The shared breaker closed after a successful trial.
    Closed,
    /// One caller's breaker opened: only its calls are refused.
    CallerOpened,
    /// One caller's breaker closed after a successful trial.
    CallerClosed,
}

impl Transition {
    /// Logs the change for instance `plugin`; `caller` is the metadata key of the call.
    pub fn log(self, plugin: &str, caller: Option<&str>) {
        let caller = caller.unwrap_or("");
        match self {
            Transition::None => {}
            Transition::Opened => {
                tracing::warn!(plugin, "Plugin circuit breaker opened.");
            }
            Transition::Closed => {
                tracing::info!(plugin, "Plugin circuit breaker closed.");
            }
            Transition::CallerOpened => tracing::warn!(
                plugin,
                caller,
                "Plugin circuit breaker opened for one caller; only its requests are refused."
            ),
            Transition::CallerClosed => {
                tracing::info!(
                    plugin,
                    caller,
                    "Plugin circuit breaker closed for one caller."
                );
            }
        }
    }
}

/// One plugin instance's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Time origin of the millisecond timestamps below.
    origin: Instant,
    /// 0 = closed; otherwise ms since `origin` (+1) until which the breaker is open.
    open_until: AtomicU64,
    /// How many times in a row it has opened; sets the backoff.
    trips: AtomicU32,
    /// Whether the half-open trial call is in flight.
    trial: AtomicBool,
    /// Whether the shared window holds failures (a success then resets it).
    dirty: AtomicBool,
    /// Callers with their own open (or half-open) state; admission looks them up only then.
    refused: AtomicU32,
    hasher: RandomState,
    state: Mutex<State>,
}

/// What only failures and refused callers touch.
#[derive(Debug, Default)]
struct State {
    /// Failures in a row since the last success.
    failures: u32,
    /// Of those, the most from one caller.
    top: u32,
    /// Bumped when the window resets: a caller's `in_window` from an older one is stale.
    epoch: u64,
    /// Per caller (by hash of its key), at most [`MAX_CALLERS`].
    callers: HashMap<u64, Caller>,
    /// When stale callers were last dropped (ms since origin).
    swept: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Caller {
    /// Failures since `since`, for the caller's own breaker.
    failures: u32,
    /// Start of the counting window (ms).
    since: u64,
    /// Failures in the shared window of `epoch`.
    in_window: u32,
    epoch: u64,
    /// Times in a row this caller's breaker opened; 0: not open.
    trips: u32,
    /// Until when the caller is refused (ms), when `trips > 0`.
    open_until: u64,
    /// Last failure (ms), for eviction.
    last: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            origin: Instant::now(),
            open_until: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            trial: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            refused: AtomicU32::new(0),
            hasher: RandomState::new(),
            state: Mutex::new(State::default()),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 stays free to mean "closed".
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Whether a call from `caller` (see [`caller_of`]) may run now.
    pub fn admit(&self, caller: Option<&str>) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 && (caller.is_none() || self.refused.load(Ordering::Relaxed) == 0) {
            return Admission::Allow;
        }
        self.admit_at(caller, self.now_ms())
    }

    /// Records the outcome of a request, response or chunk hook call that
    /// [`Breaker::admit`] allowed. `caller` is the call's caller (the same as at admission,
    /// or the one a plugin just set).
    pub fn record(&self, admission: Admission, ok: bool, caller: Option<&str>) -> Transition {
        if ok && admission == Admission::Allow && !self.needs_lock_on_success(caller) {
            return Transition::None;
        }
        self.record_at(admission, ok, caller, self.now_ms())
    }

    /// Records the outcome of an `on-log` call: a failure counts like any other; a success
    /// changes nothing (a trial slot it held is given back, so the next request hook call is
    /// the trial).
    pub fn record_log(&self, admission: Admission, ok: bool, caller: Option<&str>) -> Transition {
        self.record_log_at(admission, ok, caller, self.now_ms())
    }

    /// Whether the shared breaker is currently open (or half-open).
    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    /// Whether `caller`'s own breaker is open (or half-open).
    pub fn is_caller_open(&self, caller: &str) -> bool {
        let h = self.hash(caller);
        self.lock().callers.get(&h).is_some_and(|c| c.trips > 0)
    }

    fn needs_lock_on_success(&self, caller: Option<&str>) -> bool {
        self.dirty.load(Ordering::Relaxed)
            || (caller.is_some() && self.refused.load(Ordering::Relaxed) != 0)
    }

    fn hash(&self, caller: &str) -> u64 {
        self.hasher.hash_one(caller)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is counters only: a panic elsewhere cannot leave it unusable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit_at(&self, caller: Option<&str>, now: u64) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 && now < until {
            return Admission::Reject;
        }
        if let Some(caller) = caller
            && self.refused.load(Ordering::Relaxed) != 0
        {
            let h = self.hash(caller);
            let mut state = self.lock();
            self.sweep(&mut state, now);
            if state
                .callers
                .get(&h)
                .is_some_and(|c| c.trips > 0 && now < c.open_until)
            {
                return Admission::Reject;
            }
        }
        if until == 0 {
            return Admission::Allow;
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

    fn record_log_at(
        &self,
        admission: Admission,
        ok: bool,
        caller: Option<&str>,
        now: u64,
    ) -> Transition {
        if ok {
            if admission == Admission::Trial {
                self.trial.store(false, Ordering::Release);
            }
            return Transition::None;
        }
        self.record_at(admission, false, caller, now)
    }

    fn record_at(
        &self,
        admission: Admission,
        ok: bool,
        caller: Option<&str>,
        now: u64,
    ) -> Transition {
        if admission == Admission::Reject {
            return Transition::None;
        }
        let h = caller.map(|c| self.hash(c));
        let mut state = self.lock();
        self.sweep(&mut state, now);
        if ok {
            self.on_success(&mut state, admission, h, now)
        } else {
            self.on_failure(&mut state, admission, h, now)
        }
    }

    fn on_success(
        &self,
        state: &mut State,
        admission: Admission,
        caller: Option<u64>,
        now: u64,
    ) -> Transition {
        reset_window(state);
        self.dirty.store(false, Ordering::Relaxed);
        let mut change = Transition::None;
        if let Some(h) = caller
            && let Some(c) = state.callers.get(&h)
            && c.trips > 0
            && now >= c.open_until
        {
            state.callers.remove(&h);
            self.refused.fetch_sub(1, Ordering::Relaxed);
            change = Transition::CallerClosed;
        }
        if admission == Admission::Trial {
            self.trips.store(0, Ordering::Relaxed);
            self.open_until.store(0, Ordering::Release);
            self.trial.store(false, Ordering::Release);
            change = Transition::Closed;
        }
        change
    }

    fn on_failure(
        &self,
        state: &mut State,
        admission: Admission,
        caller: Option<u64>,
        now: u64,
    ) -> Transition {
        let n = self.config.failures;
        state.failures = state.failures.saturating_add(1);
        let mut change = Transition::None;
        if let Some(h) = caller {
            let epoch = state.epoch;
            let c = self.caller_entry(state, h, now);
            c.last = now;
            if now.saturating_sub(c.since) > window_ms() {
                c.since = now;
                c.failures = 0;
            }
            c.failures = c.failures.saturating_add(1);
            if c.epoch != epoch {
                c.epoch = epoch;
                c.in_window = 0;
            }
            c.in_window = c.in_window.saturating_add(1);
            let in_window = c.in_window;
            let opened = if c.trips > 0 {
                // Half-open: a failure re-opens it for longer; while open, calls admitted
                // before it opened only count.
                if now >= c.open_until {
                    c.trips = c.trips.saturating_add(1);
                    c.open_until = now.saturating_add(self.cooldown_ms(c.trips));
                    true
                } else {
                    false
                }
            } else if c.failures >= n {
                c.trips = 1;
                c.open_until = now.saturating_add(self.cooldown_ms(1));
                self.refused.fetch_add(1, Ordering::Relaxed);
                true
            } else {
                false
            };
            state.top = state.top.max(in_window);
            if opened {
                change = Transition::CallerOpened;
            }
        }
        match admission {
            Admission::Trial => {
                let trips = self.trips.fetch_add(1, Ordering::AcqRel).saturating_add(1);
                self.open_until.store(
                    now.saturating_add(self.cooldown_ms(trips)),
                    Ordering::Release,
                );
                self.trial.store(false, Ordering::Release);
                reset_window(state);
                change = Transition::Opened;
            }
            Admission::Allow => {
                let others = state.failures.saturating_sub(state.top);
                let need = if n >= 3 { 2 } else { 1 };
                if state.failures >= n
                    && others >= need
                    && self.open_until.load(Ordering::Acquire) == 0
                {
                    self.trips.store(1, Ordering::Relaxed);
                    self.open_until
                        .store(now.saturating_add(self.cooldown_ms(1)), Ordering::Release);
                    reset_window(state);
                    change = Transition::Opened;
                }
            }
            Admission::Reject => {}
        }
        self.dirty.store(state.failures > 0, Ordering::Relaxed);
        change
    }

    /// The entry of caller `h`, made room for if new.
    fn caller_entry<'s>(&self, state: &'s mut State, h: u64, now: u64) -> &'s mut Caller {
        if !state.callers.contains_key(&h) && state.callers.len() >= MAX_CALLERS {
            // Evict the caller whose failures are oldest, preferring one not refused.
            let victim = state
                .callers
                .iter()
                .min_by_key(|(_, c)| (c.trips > 0, c.last))
                .map(|(k, c)| (*k, c.trips > 0));
            if let Some((k, refused)) = victim {
                state.callers.remove(&k);
                if refused {
                    self.refused.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        state.callers.entry(h).or_insert(Caller {
            since: now,
            ..Caller::default()
        })
    }

    /// Drops callers quiet for a whole window (at most once a second).
    fn sweep(&self, state: &mut State, now: u64) {
        if now.saturating_sub(state.swept) < 1000 || state.callers.is_empty() {
            return;
        }
        state.swept = now;
        let window = window_ms();
        let mut dropped_refused = 0;
        state.callers.retain(|_, c| {
            let quiet_since = if c.trips > 0 { c.open_until } else { c.last };
            let keep = now.saturating_sub(quiet_since) <= window;
            if !keep && c.trips > 0 {
                dropped_refused += 1;
            }
            keep
        });
        if dropped_refused > 0 {
            self.refused.fetch_sub(dropped_refused, Ordering::Relaxed);
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

fn reset_window(state: &mut State) {
    if state.failures != 0 || state.top != 0 {
        state.failures = 0;
        state.top = 0;
        state.epoch = state.epoch.wrapping_add(1);
    }
}

fn window_ms() -> u64 {
    u64::try_from(CALLER_WINDOW.as_millis()).unwrap_or(u64::MAX)
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

    fn call(b: &Breaker, caller: Option<&str>, ok: bool, now: u64) -> (Admission, Transition) {
        let a = b.admit_at(caller, now);
        (a, b.record_at(a, ok, caller, now))
    }

    /// An anonymous failing call that must be admitted; whether it changed the state.
    fn fail(b: &Breaker, now: u64) -> bool {
        let (a, t) = call(b, None, false, now);
        assert_ne!(a, Admission::Reject);
        t != Transition::None
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers() {
        let b = breaker();
        assert!(!fail(&b, 1));
        assert!(!fail(&b, 2));
        // A success in between resets the count.
        call(&b, None, true, 3);
        assert!(!fail(&b, 4));
        assert!(!fail(&b, 5));
        assert!(fail(&b, 6), "third consecutive failure opens");
        assert_eq!(b.admit_at(None, 50), Admission::Reject);
        assert_eq!(b.admit_at(Some("k"), 105), Admission::Reject);
        // Cooldown over: one trial at a time.
        assert_eq!(b.admit_at(None, 106), Admission::Trial);
        assert_eq!(b.admit_at(None, 107), Admission::Reject);
        assert_eq!(
            b.record_at(Admission::Trial, true, None, 108),
            Transition::Closed,
            "trial success closes"
        );
        assert_eq!(b.admit_at(None, 109), Admission::Allow);
        assert!(!b.is_open());
    }

    #[test]
    fn failed_trials_back_off_exponentially_up_to_the_cap() {
        let b = breaker();
        for t in 0..3 {
            fail(&b, t);
        }
        // Open until 2 + 100.
        assert_eq!(b.admit_at(None, 101), Admission::Reject);
        assert_eq!(b.admit_at(None, 102), Admission::Trial);
        assert_eq!(
            b.record_at(Admission::Trial, false, None, 102),
            Transition::Opened
        );
        // Second opening: 200 ms.
        assert_eq!(b.admit_at(None, 301), Admission::Reject);
        assert_eq!(b.admit_at(None, 302), Admission::Trial);
        b.record_at(Admission::Trial, false, None, 302);
        // Third: 400 ms capped at 250.
        assert_eq!(b.admit_at(None, 551), Admission::Reject);
        assert_eq!(b.admit_at(None, 552), Admission::Trial);
        b.record_at(Admission::Trial, true, None, 552);
        assert_eq!(b.admit_at(None, 553), Admission::Allow);
        // Fully reset: it takes three failures again.
        assert!(!fail(&b, 554));
        assert!(!fail(&b, 555));
        assert!(fail(&b, 556));
    }

    #[test]
    fn a_successful_log_call_never_resets_the_failures() {
        let b = breaker();
        for t in 0..3 {
            let a = b.admit_at(None, t);
            assert_eq!(a, Admission::Allow);
            // The request hook fails ...
            let changed = b.record_at(a, false, None, t);
            // ... and the same plugin's on-log succeeds in between.
            let log = b.admit_at(None, t);
            if t < 2 {
                assert_eq!(changed, Transition::None);
                assert_eq!(b.record_log_at(log, true, None, t), Transition::None);
            } else {
                assert_eq!(changed, Transition::Opened);
            }
        }
        assert!(
            b.is_open(),
            "on-log successes did not heal the request hook"
        );
        // A log call that takes the trial slot and succeeds neither closes the breaker nor
        // keeps the slot: the next request hook call is the trial.
        assert_eq!(b.admit_at(None, 200), Admission::Trial);
        assert_eq!(
            b.record_log_at(Admission::Trial, true, None, 200),
            Transition::None
        );
        assert!(b.is_open());
        assert_eq!(b.admit_at(None, 201), Admission::Trial);
        // A failing log call is a failed trial.
        assert_eq!(
            b.record_log_at(Admission::Trial, false, None, 201),
            Transition::Opened
        );
        assert_eq!(b.admit_at(None, 202), Admission::Reject);
    }

    #[test]
    fn one_callers_failures_open_its_own_breaker_only() {
        let b = breaker();
        for t in 1..=3 {
            let (a, change) = call(&b, Some("heavy"), false, t);
            assert_eq!(a, Admission::Allow);
            let want = if t == 3 {
                Transition::CallerOpened
            } else {
                Transition::None
            };
            assert_eq!(change, want, "failure {t}");
        }
        assert!(!b.is_open(), "one caller does not open the shared breaker");
        assert!(b.is_caller_open("heavy"));
        assert_eq!(b.admit_at(Some("heavy"), 10), Admission::Reject);
        assert_eq!(b.admit_at(Some("light"), 10), Admission::Allow);
        assert_eq!(b.admit_at(None, 10), Admission::Allow);
        // More failures of the same caller, admitted before it was refused, do not open the
        // shared one either.
        for t in 11..20 {
            b.record_at(Admission::Allow, false, Some("heavy"), t);
        }
        assert!(!b.is_open());
        // Its cooldown over, its next call is a trial: failing doubles its cooldown ...
        assert_eq!(b.admit_at(Some("heavy"), 103), Admission::Allow);
        assert_eq!(
            b.record_at(Admission::Allow, false, Some("heavy"), 103),
            Transition::CallerOpened
        );
        assert_eq!(b.admit_at(Some("heavy"), 302), Admission::Reject);
        // ... and a success forgets it.
        assert_eq!(b.admit_at(Some("heavy"), 303), Admission::Allow);
        assert_eq!(
            b.record_at(Admission::Allow, true, Some("heavy"), 303),
            Transition::CallerClosed
        );
        assert!(!b.is_caller_open("heavy"));
        assert_eq!(b.refused.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn failures_from_two_callers_open_the_shared_breaker() {
        let b = breaker();
        call(&b, Some("a"), false, 1);
        call(&b, Some("b"), false, 2);
        let (_, change) = call(&b, Some("a"), false, 3);
        assert_eq!(change, Transition::None, "one failure of 'b' is not enough");
        let (_, change) = call(&b, Some("b"), false, 4);
        assert_eq!(change, Transition::Opened);
        assert!(b.is_open());
        assert_eq!(b.admit_at(Some("c"), 5), Admission::Reject);
    }

    #[test]
    fn one_caller_plus_one_stray_failure_does_not_open_it() {
        let b = Breaker::new(BreakerConfig {
            failures: 5,
            ..BreakerConfig::default()
        });
        for t in 1..=4 {
            call(&b, Some("heavy"), false, t);
        }
        call(&b, Some("other"), false, 5);
        assert!(!b.is_open(), "4 + 1: the failures are one caller's");
        call(&b, None, false, 6);
        assert!(b.is_open(), "4 + 1 + 1 anonymous: two others failed too");
    }

    #[test]
    fn anonymous_failures_behave_as_a_plain_breaker() {
        let b = Breaker::new(BreakerConfig {
            failures: 1,
            ..BreakerConfig::default()
        });
        assert!(fail(&b, 1));
        let b = Breaker::new(BreakerConfig {
            failures: 1,
            ..BreakerConfig::default()
        });
        let (_, change) = call(&b, Some("k"), false, 1);
        assert_eq!(change, Transition::CallerOpened);
        assert!(!b.is_open());
    }

    #[test]
    fn successes_of_others_reset_the_shared_window_not_a_callers_count() {
        let b = breaker();
        call(&b, Some("heavy"), false, 1);
        call(&b, Some("light"), true, 2);
        call(&b, Some("heavy"), false, 3);
        call(&b, Some("light"), true, 4);
        let (_, change) = call(&b, Some("heavy"), false, 5);
        assert_eq!(change, Transition::CallerOpened);
        assert!(!b.is_open());
        // Outside the caller window its count starts again.
        let b = breaker();
        let w = window_ms();
        call(&b, Some("k"), false, 1);
        call(&b, Some("k"), false, 2);
        let (_, change) = call(&b, Some("k"), false, w + 10);
        assert_eq!(change, Transition::None);
    }

    #[test]
    fn the_caller_map_stays_bounded() {
        let b = breaker();
        // Every caller fails enough to be refused.
        for i in 0..MAX_CALLERS + 50 {
            let who = format!("k{i}");
            for t in 0..3 {
                let now = 1 + u64::try_from(i).unwrap();
                b.record_at(Admission::Allow, false, Some(&who), now + t);
            }
        }
        let state = b.lock();
        assert_eq!(state.callers.len(), MAX_CALLERS);
        assert_eq!(
            usize::try_from(b.refused.load(Ordering::Relaxed)).unwrap(),
            state.callers.values().filter(|c| c.trips > 0).count()
        );
        drop(state);
        // The most recent callers are the ones kept.
        assert!(b.is_caller_open(&format!("k{}", MAX_CALLERS + 49)));
        assert!(!b.is_caller_open("k0"));
    }

    #[test]
    fn quiet_callers_are_forgotten() {
        let b = breaker();
        for t in 1..=3 {
            call(&b, Some("k"), false, t);
        }
        assert_eq!(b.refused.load(Ordering::Relaxed), 1);
        // Long after its cooldown, the next locked call drops it.
        let later = 3 + 100 + window_ms() + 1000;
        assert_eq!(b.admit_at(Some("other"), later), Admission::Allow);
        assert_eq!(b.refused.load(Ordering::Relaxed), 0);
        assert!(b.lock().callers.is_empty());
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

    #[test]
    fn caller_is_the_metadata_key() {
        let mut m = BTreeMap::new();
        assert_eq!(caller_of(&m), None);
        m.insert("key".to_owned(), String::new());
        assert_eq!(caller_of(&m), None);
        m.insert("key".to_owned(), "key_1".to_owned());
        assert_eq!(caller_of(&m), Some("key_1"));
    }
}
