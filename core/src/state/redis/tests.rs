//! The state conformance suite against a real `redis-server` (started per test on a free
//! port; `scripts/test.sh` installs it), plus what only a shared store has: two stores on one
//! server, the local cache's invalidation, failure modes and recovery.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::state::tests as suite;

/// A `redis-server` child on 127.0.0.1, killed on drop.
pub(crate) struct Server {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn redis_server_bin() -> PathBuf {
    std::env::var_os("WEIR_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

impl Server {
    pub fn start() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Server {
            child: None,
            port,
            dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(redis_server_bin())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (`apt-get install redis-server`; \
                     scripts/test.sh does) or point WEIR_REDIS_SERVER at one"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn config(url: &str, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        password: None,
        prefix: prefix.to_owned(),
        connections: 2,
        connect_timeout_ms: 500,
        timeout_ms: 250,
        health_interval_ms: 100,
        local_cache_entries: 1_000,
        local_cache_ttl_ms: 1_000,
        local_cache_max_value_bytes: 64 * 1024,
        // The conformance suite checks exact answers; leases have their own tests.
        limiter_lease_permille: 0,
        limiter_lease_ms: 250,
        on_error: FailureModes::default(),
    }
}

fn store(server: &Server) -> RedisStore {
    RedisStore::connect(&config(&server.url(), "t:")).expect("connect")
}

/// Waits until the store's invalidation subscription is live (the cache serves).
fn wait_live(s: &RedisStore) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.cache_live() {
        assert!(Instant::now() < deadline, "subscription never went live");
        std::thread::sleep(Duration::from_millis(5));
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let server = Server::start();
            let s = store(&server);
            suite::$name(&s);
        }
    )*};
}

conformance!(
    basic,
    cas,
    incr,
    ttl,
    scan,
    limiter,
    limiter_settle,
    limiter_edges,
    limiter_expires,
    ledger,
    ledger_ttl
);

macro_rules! conformance_arc {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let server = Server::start();
            let s: Arc<dyn StateStore> = Arc::new(store(&server));
            suite::$name(s);
        }
    )*};
}

conformance_arc!(concurrent_incr, concurrent_limiter, concurrent_ledger);

#[test]
fn two_stores_on_one_server_share_every_primitive() {
    let server = Server::start();
    let a = store(&server);
    let b = store(&server);
    a.set("ns", "k", b"v", None).unwrap();
    assert_eq!(b.get("ns", "k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(a.incr("ns", "n", 2, None).unwrap(), 2);
    assert_eq!(b.incr("ns", "n", 3, None).unwrap(), 5);
    // One limiter across both: a burst of 10 is 10 in all.
    let rate = Rate {
        limit: 10,
        window: Duration::from_secs(60),
    };
    let now = crate::state::now_ms();
    let admitted = (0..20)
        .filter(|i| {
            let s: &RedisStore = if i % 2 == 0 { &a } else { &b };
            s.limit_reserve("ns", "rl", rate, 1, now).unwrap().allowed
        })
        .count();
    assert_eq!(admitted, 10);
    // One ledger across both.
    assert!(a.ledger_reserve("ns", "acct", 100, 60, None).unwrap().0);
    assert!(!b.ledger_reserve("ns", "acct", 100, 60, None).unwrap().0);
    b.ledger_settle("ns", "acct", 60, 30, None).unwrap();
    assert_eq!(
        a.ledger_balance("ns", "acct").unwrap(),
        Balance {
            spent_micros: 30,
            reserved_micros: 0
        }
    );
}

#[test]
fn a_write_on_one_instance_invalidates_the_others_cache() {
    let server = Server::start();
    let a = store(&server);
    let b = store(&server);
    wait_live(&b);
    a.set("auth", "key", b"valid", None).unwrap();
    // Let A's own invalidation reach B first (a read racing it is not cached, by design).
    std::thread::sleep(Duration::from_millis(50));
    // B caches the value (a miss, then hits).
    assert_eq!(
        b.get("auth", "key").unwrap().as_deref(),
        Some(&b"valid"[..])
    );
    let trips = b.inner.metrics.round_trips.get();
    for _ in 0..100 {
        assert_eq!(
            b.get("auth", "key").unwrap().as_deref(),
            Some(&b"valid"[..])
        );
    }
    assert_eq!(
        b.inner.metrics.round_trips.get(),
        trips,
        "hits cost no round trip"
    );
    // A revokes: B sees it within milliseconds, long before the cache's own 1 s bound.
    let revoked = Instant::now();
    a.delete("auth", "key").unwrap();
    while b.get("auth", "key").unwrap().is_some() {
        assert!(
            revoked.elapsed() < Duration::from_millis(500),
            "B still serves the revoked key"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A known-absent key is cached too, and a write elsewhere makes it present.
    assert_eq!(b.get("auth", "new").unwrap(), None);
    a.set("auth", "new", b"x", None).unwrap();
    let written = Instant::now();
    while b.get("auth", "new").unwrap().is_none() {
        assert!(written.elapsed() < Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_unreachable_server_fails_each_primitive_as_configured_and_recovers() {
    let mut server = Server::start();
    let s = store(&server); // kv closed, limiter open, ledger closed
    s.set("ns", "warm", b"v", None).unwrap();
    wait_live(&s);
    // Read until it is cached (a read racing the set's own invalidation is not).
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.inner.metrics.cache.with_label_values(&["hit"]).get() == 0 {
        assert!(Instant::now() < deadline, "never cached");
        assert_eq!(s.get("ns", "warm").unwrap().as_deref(), Some(&b"v"[..]));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.health().is_ok());
    server.kill();
    let rate = Rate {
        limit: 1,
        window: Duration::from_secs(60),
    };
    let started = Instant::now();
    // kv is fail-closed: an error, never a hang.
    assert!(matches!(
        s.set("ns", "k", b"v", None),
        Err(StateError::Unavailable(_))
    ));
    assert!(matches!(
        s.get("ns", "cold"),
        Err(StateError::Unavailable(_))
    ));
    // ...but a key read before the outage is still answered (stale-if-error).
    assert_eq!(s.get("ns", "warm").unwrap().as_deref(), Some(&b"v"[..]));
    // The limiter is fail-open: admitted, and counted.
    for _ in 0..3 {
        assert!(s.limit_reserve("ns", "rl", rate, 1, 0).unwrap().allowed);
    }
    assert_eq!(
        s.inner.metrics.bypass.with_label_values(&["limiter"]).get(),
        3
    );
    // The ledger is fail-closed.
    assert!(matches!(
        s.ledger_reserve("ns", "a", 100, 1, None),
        Err(StateError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls must not hang"
    );
    // Health goes red within a few pings.
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.health().is_ok() {
        assert!(Instant::now() < deadline, "health stayed green");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.inner.metrics.healthy.get(), 0);
    // Back (empty, as a restarted server without persistence is): the store recovers alone.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if s.set("ns", "k", b"again", None).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the store never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.get("ns", "k").unwrap().as_deref(), Some(&b"again"[..]));
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.health().is_err() {
        assert!(Instant::now() < deadline, "health stayed red");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The restarted server is empty: the cache came back live and does not serve the old
    // value of `warm`.
    wait_live(&s);
    assert_eq!(s.get("ns", "warm").unwrap(), None);
}

#[test]
fn fail_open_kv_and_fail_closed_limiter() {
    let mut server = Server::start();
    let mut cfg = config(&server.url(), "t:");
    cfg.on_error = FailureModes {
        kv: FailureMode::Open,
        limiter: FailureMode::Closed,
        ledger: FailureMode::Open,
    };
    let s = RedisStore::connect(&cfg).unwrap();
    server.kill();
    assert_eq!(s.get("ns", "k").unwrap(), None);
    s.set("ns", "k", b"v", None).unwrap();
    let rate = Rate {
        limit: 5,
        window: Duration::from_secs(1),
    };
    assert!(matches!(
        s.limit_reserve("ns", "rl", rate, 1, 0),
        Err(StateError::Unavailable(_))
    ));
    assert!(s.ledger_reserve("ns", "a", 1, 100, None).unwrap().0);
    assert_eq!(s.inner.metrics.bypass.with_label_values(&["kv"]).get(), 2);
    assert_eq!(
        s.inner.metrics.bypass.with_label_values(&["ledger"]).get(),
        1
    );
}

#[test]
fn a_server_that_does_not_answer_times_out() {
    // A listener that accepts and never answers: every call ends at the timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", silent.local_addr().unwrap());
    let started = Instant::now();
    let err = RedisStore::connect(&config(&url, "t:")).unwrap_err();
    assert!(matches!(err, StateError::Open { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn prefixes_keep_gateways_apart() {
    let server = Server::start();
    let a = RedisStore::connect(&config(&server.url(), "one:")).unwrap();
    let b = RedisStore::connect(&config(&server.url(), "two:")).unwrap();
    a.set("ns", "k", b"a", None).unwrap();
    assert_eq!(b.get("ns", "k").unwrap(), None);
    assert_eq!(b.scan_prefix("ns", "", 10).unwrap(), vec![]);
    assert_eq!(a.scan_prefix("ns", "", 10).unwrap().len(), 1);
}

#[test]
fn config_validation_names_the_problem() {
    let mut c = config("http://x", "p:");
    assert!(c.validate().unwrap_err().contains("url"));
    c.url = "redis://127.0.0.1:1/0".into();
    c.connections = 0;
    assert!(c.validate().unwrap_err().contains("connections"));
    c.connections = 2;
    c.timeout_ms = 0;
    assert!(c.validate().unwrap_err().contains("timeout_ms"));
    let c = config("redis://user:secret@127.0.0.1:6379/0", "p:");
    assert_eq!(c.display_url(), "redis://127.0.0.1:6379/0");
}

fn leasing(server: &Server) -> RedisStore {
    let mut cfg = config(&server.url(), "t:");
    cfg.limiter_lease_permille = 100;
    cfg.limiter_lease_ms = 60_000;
    RedisStore::connect(&cfg).expect("connect")
}

#[test]
fn limiter_leases_admit_locally_and_never_exceed_the_shared_limit() {
    let server = Server::start();
    let (a, b) = (leasing(&server), leasing(&server));
    let rate = Rate {
        limit: 1_000,
        window: Duration::from_secs(3_600),
    };
    let now = crate::state::now_ms();
    let trips = a.inner.metrics.round_trips.get() + b.inner.metrics.round_trips.get();
    // Two instances, alternating, far past the limit: never more than 1000 in all.
    let mut admitted = 0;
    for i in 0..1_500 {
        let s = if i % 2 == 0 { &a } else { &b };
        if s.limit_reserve("ns", "rl", rate, 1, now).unwrap().allowed {
            admitted += 1;
        }
    }
    assert!(
        admitted <= 1_000,
        "{admitted} admitted past a limit of 1000"
    );
    let used = a.inner.metrics.round_trips.get() + b.inner.metrics.round_trips.get() - trips;
    assert!(
        used < 1_500 / 4,
        "{used} round trips for 1500 reservations: leases should serve most locally"
    );
    // Leased units still held go back (at shutdown, or when a lease expires); then the
    // rest of the limit is there to take, and the total is exactly the limit.
    a.flush().unwrap();
    b.flush().unwrap();
    while a.limit_reserve("ns", "rl", rate, 1, now).unwrap().allowed {
        admitted += 1;
        assert!(admitted <= 1_000);
    }
    a.flush().unwrap();
    while b.limit_reserve("ns", "rl", rate, 1, now).unwrap().allowed {
        admitted += 1;
        assert!(admitted <= 1_000);
    }
    b.flush().unwrap();
    assert_eq!(admitted + a_left(&a, rate, now), 1_000);
}

/// What the shared limiter still admits, read without leasing.
fn a_left(s: &RedisStore, rate: Rate, now: u64) -> u64 {
    s.limit_reserve("ns", "rl", rate, 0, now).unwrap().remaining
}

#[test]
fn settles_go_into_the_lease_and_expired_leases_go_back() {
    let server = Server::start();
    let mut cfg = config(&server.url(), "t:");
    cfg.limiter_lease_permille = 100;
    cfg.limiter_lease_ms = 50;
    let s = RedisStore::connect(&cfg).unwrap();
    let plain = store(&server);
    let rate = Rate {
        limit: 10_000,
        window: Duration::from_secs(3_600),
    };
    let now = crate::state::now_ms();
    // Reserve 100 (+ a lease of 10% of the 9900 left = 990), settle using 40: the 60 join
    // the lease without a round trip.
    assert!(
        s.limit_reserve("ns", "tpm", rate, 100, now)
            .unwrap()
            .allowed
    );
    let trips = s.inner.metrics.round_trips.get();
    s.limit_settle("ns", "tpm", rate, 100, 40, now).unwrap();
    assert_eq!(s.inner.metrics.round_trips.get(), trips);
    let held = 10_000
        - plain
            .limit_reserve("ns", "tpm", rate, 0, now)
            .unwrap()
            .remaining;
    assert_eq!(held, 100 + 990);
    // Once the lease expires its 1050 unused units go back by themselves.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = plain
            .limit_reserve("ns", "tpm", rate, 0, now)
            .unwrap()
            .remaining;
        if left == 10_000 - 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leased units never came back: {left} left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
