//! The limiter and spend-ledger primitives of [`StateStore`], written once on top of `get` and
//! `cas` (see the module docs of [`super`] for what they mean).
//!
//! Each primitive is a *step*: a pure function from the current stored value of one key to an
//! answer and, if the value changes, the value to store. [`read_modify_write`] runs a step in
//! a bounded compare-and-swap loop, which makes it atomic per key on any backend whose `cas`
//! is. A backend that can do better (one lock, one server-side script) runs the same step, or
//! its own equivalent, its own way.

use std::time::Duration;

use super::{Balance, LimitOutcome, Rate, StateError, StateStore, now_ms};

/// Compare-and-swap attempts before a primitive gives up with `Backend("contention ...")`.
pub(crate) const CAS_TRIES: usize = 64;

const NANOS_PER_MS: u128 = 1_000_000;

/// The value a step stores, and its TTL.
pub(crate) struct Write {
    pub value: Vec<u8>,
    pub ttl: Option<Duration>,
}

/// What a step decided: the answer for the caller, and the value to store (`None`: nothing
/// changes, nothing is written).
pub(crate) type Step<T> = (T, Option<Write>);

/// Runs `step` on the value of `key` atomically through [`StateStore::update`]
/// (super::StateStore::update) and returns its answer.
pub(crate) fn read_modify_write<S, T>(
    store: &S,
    ns: &str,
    key: &str,
    mut step: impl FnMut(Option<&[u8]>) -> Result<Step<T>, StateError>,
) -> Result<T, StateError>
where
    S: StateStore + ?Sized,
{
    let mut answer = None;
    store.update(ns, key, &mut |current| {
        let (a, write) = step(current)?;
        answer = Some(a);
        Ok(write.map(|w| (w.value, w.ttl)))
    })?;
    answer.ok_or_else(|| StateError::Backend(format!("update of '{key}' ran no step")))
}

/// The default [`StateStore::update`](super::StateStore::update): runs `step` on the value
/// of `key` until its write lands (compare-and-swap against the value it read) or it decides
/// to write nothing. Fails after [`CAS_TRIES`] lost races.
pub(crate) fn cas_loop<S>(
    store: &S,
    ns: &str,
    key: &str,
    step: &mut super::UpdateStep<'_>,
) -> Result<(), StateError>
where
    S: StateStore + ?Sized,
{
    for _ in 0..CAS_TRIES {
        let current = store.get(ns, key)?;
        let Some((value, ttl)) = step(current.as_deref())? else {
            return Ok(());
        };
        if store.cas(ns, key, current.as_deref(), Some(&value), ttl)? {
            return Ok(());
        }
        // Someone else wrote the key between our read and our swap: let them run, read again.
        std::thread::yield_now();
    }
    Err(StateError::Backend(format!(
        "contention: {CAS_TRIES} compare-and-swap attempts on '{key}' in '{ns}' lost"
    )))
}

/// The key of the limiter called `key`.
pub(crate) fn limiter_key(key: &str) -> String {
    format!("lim/{key}")
}

/// The key of the ledger account `account`.
pub(crate) fn ledger_key(account: &str) -> String {
    format!("led/{account}")
}

// ---------------------------------------------------------------------------------------------
// Limiter (GCRA)
// ---------------------------------------------------------------------------------------------

/// A [`Rate`] in nanoseconds; `None` for a rate that admits nothing (limit or window 0).
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Units per window.
    limit: u128,
    /// The window, in ns.
    window: u128,
}

impl Gcra {
    fn new(rate: Rate) -> Option<Gcra> {
        let window = rate.window.as_nanos();
        if rate.limit == 0 || window == 0 {
            return None;
        }
        Some(Gcra {
            limit: u128::from(rate.limit),
            window,
        })
    }

    /// The time `units` occupy: `units * window / limit` ns, rounded down (so `limit` units
    /// always fit in one window).
    fn cost(&self, units: u64) -> u128 {
        u128::from(units).saturating_mul(self.window) / self.limit
    }

    /// Units that still fit when the TAT is `busy` ns after now.
    fn remaining(&self, busy: u128) -> u64 {
        let free = self.window.saturating_sub(busy);
        // `free <= window`, so the quotient is at most `limit`, which fits a u64.
        u64::try_from(free.saturating_mul(self.limit) / self.window).unwrap_or(u64::MAX)
    }
}

/// `ns` nanoseconds as a [`Duration`] (saturating).
fn nanos(ns: u128) -> Duration {
    let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 10^9.
    let sub = u32::try_from(ns % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

/// `ns` nanoseconds rounded up to whole milliseconds (the unit of the caller's clock).
fn ceil_ms(ns: u128) -> Duration {
    Duration::from_millis(u64::try_from(ns.div_ceil(NANOS_PER_MS)).unwrap_or(u64::MAX))
}

/// The stored TAT (ns since the epoch), or `None` when absent.
fn parse_tat(key: &str, stored: Option<&[u8]>) -> Result<Option<u128>, StateError> {
    let Some(bytes) = stored else {
        return Ok(None);
    };
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u128>().ok())
        .map(Some)
        .ok_or_else(|| StateError::NotAnInteger {
            key: limiter_key(key),
        })
}

/// Stores `tat`: it expires a window after the limiter is full again (absent = full).
fn write_tat(gcra: Gcra, tat: u128, now: u128) -> Write {
    Write {
        value: tat.to_string().into_bytes(),
        ttl: Some(nanos(tat.saturating_sub(now).saturating_add(gcra.window))),
    }
}

/// Whether `rate` admits nothing (limit or window 0): no need to read or write its key.
pub(crate) fn admits_nothing(rate: Rate) -> bool {
    Gcra::new(rate).is_none()
}

/// The answer for a rate that admits nothing.
pub(crate) fn refuse_all(rate: Rate) -> LimitOutcome {
    LimitOutcome {
        allowed: false,
        remaining: 0,
        retry_after: rate.window,
        reset_after: Duration::ZERO,
    }
}

/// [`StateStore::limit_reserve`] as a step over the stored TAT.
pub(crate) fn limit_reserve_step(
    key: &str,
    stored: Option<&[u8]>,
    rate: Rate,
    amount: u64,
    now_ms: u64,
) -> Result<Step<LimitOutcome>, StateError> {
    let Some(gcra) = Gcra::new(rate) else {
        return Ok((refuse_all(rate), None));
    };
    let now = u128::from(now_ms) * NANOS_PER_MS;
    // An absent (or drained) limiter is full: its TAT is now.
    let tat = parse_tat(key, stored)?.unwrap_or(now).max(now);
    let busy = tat - now;
    let refused = |retry_after: Duration| LimitOutcome {
        allowed: false,
        remaining: gcra.remaining(busy),
        retry_after,
        reset_after: ceil_ms(busy),
    };
    if amount > rate.limit {
        // More than a whole burst never fits.
        return Ok((refused(rate.window), None));
    }
    let new_busy = busy.saturating_add(gcra.cost(amount));
    if new_busy > gcra.window {
        // It fits once the TAT has drained to `window - cost` ahead of the clock.
        return Ok((refused(ceil_ms(new_busy - gcra.window)), None));
    }
    let outcome = LimitOutcome {
        allowed: true,
        remaining: gcra.remaining(new_busy),
        retry_after: Duration::ZERO,
        reset_after: ceil_ms(new_busy),
    };
    // Amount 0 is a pure read.
    let write = (amount > 0).then(|| write_tat(gcra, now + new_busy, now));
    Ok((outcome, write))
}

/// [`StateStore::limit_settle`] as a step over the stored TAT.
pub(crate) fn limit_settle_step(
    key: &str,
    stored: Option<&[u8]>,
    rate: Rate,
    reserved: u64,
    used: u64,
    now_ms: u64,
) -> Result<Step<()>, StateError> {
    let Some(gcra) = Gcra::new(rate) else {
        return Ok(((), None));
    };
    let now = u128::from(now_ms) * NANOS_PER_MS;
    let tat = parse_tat(key, stored)?;
    let new_tat = if used > reserved {
        // The overrun is charged, even past the window: later calls wait it out.
        let base = tat.unwrap_or(now).max(now);
        base.saturating_add(gcra.cost(used - reserved))
    } else {
        // Unused units go back, but a limiter never holds more than a full burst.
        match tat {
            Some(tat) if tat > now => tat.saturating_sub(gcra.cost(reserved - used)).max(now),
            _ => return Ok(((), None)),
        }
    };
    if Some(new_tat) == tat {
        return Ok(((), None));
    }
    Ok(((), Some(write_tat(gcra, new_tat, now))))
}

// ---------------------------------------------------------------------------------------------
// Spend ledger
// ---------------------------------------------------------------------------------------------

/// A ledger account as stored: `"<spent> <reserved>"`, then ` <expires>` (ms since the epoch)
/// when the account was created with a TTL. The expiry is kept in the value because `get`
/// does not return a key's TTL, and every update must keep the expiry the account was
/// created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Account {
    balance: Balance,
    /// ms since the epoch, 0 = never.
    expires: u64,
}

impl Account {
    /// A new, empty account that expires after `ttl`.
    fn new(ttl: Option<Duration>, now: u64) -> Account {
        let expires = match ttl {
            None => 0,
            Some(ttl) => now
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                .max(1),
        };
        Account {
            balance: Balance::default(),
            expires,
        }
    }

    /// The stored account, or `None` when absent or expired at `now`.
    fn decode(
        account: &str,
        stored: Option<&[u8]>,
        now: u64,
    ) -> Result<Option<Account>, StateError> {
        let Some(bytes) = stored else {
            return Ok(None);
        };
        let malformed = || StateError::NotAnInteger {
            key: ledger_key(account),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
        let mut fields = text.split_ascii_whitespace();
        let mut next = || fields.next().map(str::parse::<i64>);
        let (Some(Ok(spent)), Some(Ok(reserved))) = (next(), next()) else {
            return Err(malformed());
        };
        let expires = match next() {
            None => 0,
            Some(Ok(e)) => u64::try_from(e).map_err(|_| malformed())?,
            Some(Err(_)) => return Err(malformed()),
        };
        if next().is_some() {
            return Err(malformed());
        }
        if expires != 0 && expires <= now {
            return Ok(None);
        }
        Ok(Some(Account {
            balance: Balance {
                spent_micros: spent,
                reserved_micros: reserved,
            },
            expires,
        }))
    }

    /// The write that stores this account, keeping its expiry.
    fn write(&self, now: u64) -> Write {
        let Balance {
            spent_micros,
            reserved_micros,
        } = self.balance;
        let (value, ttl) = if self.expires == 0 {
            (format!("{spent_micros} {reserved_micros}"), None)
        } else {
            let left = Duration::from_millis(self.expires.saturating_sub(now));
            let value = format!("{spent_micros} {reserved_micros} {}", self.expires);
            (value, Some(left))
        };
        Write {
            value: value.into_bytes(),
            ttl,
        }
    }
}

/// The step answer for `next`, written only if it differs from `before`.
fn account_step<T>(answer: T, before: Option<Account>, next: Account, now: u64) -> Step<T> {
    let unchanged = match before {
        Some(before) => before == next,
        // Absent reads as zeros: writing an empty account would change nothing.
        None => next.balance == Balance::default(),
    };
    (answer, (!unchanged).then(|| next.write(now)))
}

/// [`StateStore::ledger_reserve`] as a step over the stored account.
pub(crate) fn ledger_reserve_step(
    account: &str,
    stored: Option<&[u8]>,
    limit_micros: i64,
    amount_micros: i64,
    ttl: Option<Duration>,
) -> Result<Step<(bool, Balance)>, StateError> {
    let now = now_ms();
    let before = Account::decode(account, stored, now)?;
    let mut next = before.unwrap_or_else(|| Account::new(ttl, now));
    let amount = amount_micros.max(0);
    let b = next.balance;
    // i128: the sum of three i64s cannot overflow it.
    let committed = i128::from(b.spent_micros) + i128::from(b.reserved_micros);
    if committed + i128::from(amount) > i128::from(limit_micros) {
        return Ok(((false, b), None));
    }
    next.balance.reserved_micros = b.reserved_micros.saturating_add(amount);
    Ok(account_step((true, next.balance), before, next, now))
}

/// [`StateStore::ledger_settle`] as a step over the stored account.
pub(crate) fn ledger_settle_step(
    account: &str,
    stored: Option<&[u8]>,
    reserved_micros: i64,
    cost_micros: i64,
    ttl: Option<Duration>,
) -> Result<Step<Balance>, StateError> {
    let now = now_ms();
    let before = Account::decode(account, stored, now)?;
    let mut next = before.unwrap_or_else(|| Account::new(ttl, now));
    next.balance.reserved_micros = release(next.balance.reserved_micros, reserved_micros);
    // Spend is never lost: the real cost is added in full, even beyond the reservation.
    next.balance.spent_micros = next.balance.spent_micros.saturating_add(cost_micros.max(0));
    Ok(account_step(next.balance, before, next, now))
}

/// [`StateStore::ledger_release`] as a step over the stored account.
pub(crate) fn ledger_release_step(
    account: &str,
    stored: Option<&[u8]>,
    reserved_micros: i64,
) -> Result<Step<Balance>, StateError> {
    let now = now_ms();
    let Some(before) = Account::decode(account, stored, now)? else {
        return Ok((Balance::default(), None));
    };
    let mut next = before;
    next.balance.reserved_micros = release(before.balance.reserved_micros, reserved_micros);
    Ok(account_step(next.balance, Some(before), next, now))
}

/// The balance stored in `stored` (zeros when absent or expired).
pub(crate) fn ledger_balance_of(
    account: &str,
    stored: Option<&[u8]>,
) -> Result<Balance, StateError> {
    Ok(Account::decode(account, stored, now_ms())?
        .map(|a| a.balance)
        .unwrap_or_default())
}

/// `reserved` less `amount` (a negative amount counts as 0), never below 0.
fn release(reserved: i64, amount: i64) -> i64 {
    reserved.saturating_sub(amount.max(0)).max(0)
}

// ---------------------------------------------------------------------------------------------
// Export and import of ledger accounts
// ---------------------------------------------------------------------------------------------

/// Where a backend keeps a ledger account's expiry, for [`import_account`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccountForm {
    /// In the value too (`"<spent> <reserved> <expires_ms>"`): sled and memory, whose
    /// primitives read it back on every update (a value without it would lose its expiry at
    /// the next update).
    ExpiryInValue,
    /// Only as the key's native expiry (`"<spent> <reserved>"`): Redis.
    NativeExpiry,
}

/// The fields of an account value: spent, reserved, and the expiry of the 3-field form
/// (0 = none). `None` when the value is not an account.
fn account_fields(value: &[u8]) -> Option<(i64, i64, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let spent = fields.next()?.parse::<i64>().ok()?;
    let reserved = fields.next()?.parse::<i64>().ok()?;
    let expires = match fields.next() {
        None => 0,
        Some(e) => e.parse::<u64>().ok()?,
    };
    fields
        .next()
        .is_none()
        .then_some((spent, reserved, expires))
}

/// Whether `key` names a ledger account (`led/<account>`).
pub(crate) fn is_ledger_key(key: &str) -> bool {
    key.starts_with("led/")
}

/// An exported ledger entry (`key` is `led/...`) in the form `form` stores, and its effective
/// expiry. An export may carry either form whatever its source: `"<spent> <reserved>"` with
/// the expiry only in `expires_ms` (from Redis), or `"<spent> <reserved> <expires_ms>"` (from
/// sled and memory). The earlier of the two expiries wins (they differ by a millisecond or
/// so when both are set). `None` when the key is not a ledger account's or the value is not
/// an account: the caller stores it as it is.
pub(crate) fn import_account(
    key: &str,
    value: &[u8],
    expires_ms: Option<u64>,
    form: AccountForm,
) -> Option<(Vec<u8>, Option<u64>)> {
    if !is_ledger_key(key) {
        return None;
    }
    let (spent, reserved, in_value) = account_fields(value)?;
    let expires = [expires_ms.unwrap_or(0), in_value]
        .into_iter()
        .filter(|&e| e != 0)
        .min();
    let value = match (form, expires) {
        (AccountForm::ExpiryInValue, Some(e)) => format!("{spent} {reserved} {e}"),
        _ => format!("{spent} {reserved}"),
    };
    Some((value.into_bytes(), expires))
}

/// An account value with its reserved amount set to 0 (the rest, the form included, kept),
/// for an export: reservations belong to requests in flight on the source, which will never
/// settle them on the target. `None` when the value is not an account.
pub(crate) fn account_without_reserved(value: &[u8]) -> Option<Vec<u8>> {
    let (spent, _, expires) = account_fields(value)?;
    let out = if expires == 0 {
        format!("{spent} 0")
    } else {
        format!("{spent} 0 {expires}")
    };
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    //! The arithmetic alone; the behaviour through each backend is in `super::super::tests`.

    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn rate(limit: u64, window_ms: u64) -> Rate {
        Rate {
            limit,
            window: Duration::from_millis(window_ms),
        }
    }

    #[test]
    fn a_limit_that_does_not_divide_the_window_still_admits_a_full_burst() {
        // 1 s / 3 = 333_333_333.3 ns per unit: rounding down keeps the third unit inside.
        let r = rate(3, 1_000);
        let mut stored: Option<Vec<u8>> = None;
        for left in [2, 1, 0] {
            let (out, write) = limit_reserve_step("k", stored.as_deref(), r, 1, NOW).unwrap();
            assert!(out.allowed);
            assert_eq!(out.remaining, left);
            stored = write.map(|w| w.value);
        }
        let (out, write) = limit_reserve_step("k", stored.as_deref(), r, 1, NOW).unwrap();
        assert!(!out.allowed);
        assert!(write.is_none());
        assert_eq!(out.retry_after, Duration::from_millis(334));
    }

    #[test]
    fn limiter_ttl_covers_reset_plus_a_window() {
        let (_, write) = limit_reserve_step("k", None, rate(10, 1_000), 5, NOW).unwrap();
        let write = write.unwrap();
        assert_eq!(write.ttl, Some(Duration::from_millis(1_500)));
        let tat = u128::from(NOW) * NANOS_PER_MS + 500_000_000;
        assert_eq!(write.value, tat.to_string().into_bytes());
    }

    #[test]
    fn malformed_values_are_errors() {
        assert!(matches!(
            limit_reserve_step("k", Some(b"soon"), rate(1, 1), 1, NOW),
            Err(StateError::NotAnInteger { key }) if key == "lim/k"
        ));
        for bad in [&b"1"[..], b"1 x", b"1 2 3 4", b"1 2 -5", b""] {
            assert!(matches!(
                ledger_reserve_step("a", Some(bad), 10, 1, None),
                Err(StateError::NotAnInteger { key }) if key == "led/a"
            ));
        }
    }

    #[test]
    fn accounts_round_trip() {
        let now = 1_000;
        let acct = Account {
            balance: Balance {
                spent_micros: 7,
                reserved_micros: 3,
            },
            expires: 5_000,
        };
        let w = acct.write(now);
        assert_eq!(w.value, b"7 3 5000");
        assert_eq!(w.ttl, Some(Duration::from_millis(4_000)));
        assert_eq!(
            Account::decode("a", Some(&w.value), now).unwrap(),
            Some(acct)
        );
        // Expired by its own clock: absent.
        assert_eq!(Account::decode("a", Some(&w.value), 5_000).unwrap(), None);
        let forever = Account { expires: 0, ..acct };
        assert_eq!(forever.write(now).value, b"7 3");
        assert_eq!(forever.write(now).ttl, None);
    }

    #[test]
    fn negative_amounts_count_as_zero() {
        let (answer, write) = ledger_reserve_step("a", Some(b"0 5"), 10, -100, None).unwrap();
        assert_eq!(
            answer,
            (
                true,
                Balance {
                    spent_micros: 0,
                    reserved_micros: 5
                }
            )
        );
        assert!(write.is_none());
        let (b, _) = ledger_settle_step("a", Some(b"0 5"), -1, -7, None).unwrap();
        assert_eq!(b.spent_micros, 0);
        assert_eq!(b.reserved_micros, 5);
    }

    #[test]
    fn imported_accounts_take_the_form_of_their_backend() {
        use AccountForm::{ExpiryInValue, NativeExpiry};
        // From Redis (expiry beside the value) into sled: the expiry goes into the value.
        assert_eq!(
            import_account("led/a", b"5 2", Some(9_000), ExpiryInValue),
            Some((b"5 2 9000".to_vec(), Some(9_000)))
        );
        // From sled into Redis: the value loses its third field, the expiry stays native.
        assert_eq!(
            import_account("led/a", b"5 2 9000", Some(9_001), NativeExpiry),
            Some((b"5 2".to_vec(), Some(9_000)))
        );
        // The earlier expiry wins; one carried only in the value still counts.
        assert_eq!(
            import_account("led/a", b"5 2 9000", None, ExpiryInValue),
            Some((b"5 2 9000".to_vec(), Some(9_000)))
        );
        assert_eq!(
            import_account("led/a", b"5 2", None, ExpiryInValue),
            Some((b"5 2".to_vec(), None))
        );
        // Not an account, or not a ledger key: stored as it is.
        assert_eq!(import_account("led/a", b"lots", None, ExpiryInValue), None);
        assert_eq!(import_account("k", b"5 2", Some(1), ExpiryInValue), None);
        assert_eq!(
            account_without_reserved(b"5 2 9000"),
            Some(b"5 0 9000".to_vec())
        );
        assert_eq!(account_without_reserved(b"5 2"), Some(b"5 0".to_vec()));
        assert_eq!(account_without_reserved(b"5 2 x"), None);
    }
}
