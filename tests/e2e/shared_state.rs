//! Two real `weir` processes sharing one real `redis-server` (`[state] backend = "redis"`),
//! with requests spread across both: one rate limit, one budget (mid-stream included), keys
//! created on one and revoked on one seen by the other, a cache entry stored by one served by
//! the other; then Redis killed under load (each failure mode as configured, no hangs,
//! `/readyz` red) and restarted empty (both recover without a restart, as documented).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::policy_auth::{MOCK_MODELS, PolicyGateway, eventually, plugin_dir};
use crate::support::{bounded, openai_error};

/// A `redis-server` child on 127.0.0.1 and a free port, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut s = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = std::env::var_os("WEIR_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): scripts/test.sh installs it")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `[state]` lines for a gateway on this server, plus `extra` lines of `[state.redis]`.
    pub fn state(&self, extra: &str) -> String {
        format!(
            "backend = \"redis\"\n\n[state.redis]\nurl = \"redis://127.0.0.1:{}/0\"\nhealth_interval_ms = 200\ntimeout_ms = 300\n{extra}\n",
            self.port
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[[plugins]]` entry with generous deadlines: these tests are about shared state, and
/// run two debug gateways and a Redis on a machine that may be busy.
fn plugin_entry(name: &str, config: &str) -> String {
    format!(
        "\n[[plugins]]\npath = \"{}\"\ndeadline_ms = 2000\nchunk_deadline_ms = 1000\n[plugins.config]\n{config}\n",
        plugin_dir(name).display()
    )
}

const PRICES: &str = "prices = { mock = { input = 1000, output = 1000 } }";

fn ask(max_tokens: u64) -> Value {
    json!({"model": "mock", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}]})
}

/// Two gateways with `plugins` on one Redis.
async fn pair(redis: &RedisServer, models: &str, plugins: &str) -> (PolicyGateway, PolicyGateway) {
    let body = format!("{models}{plugins}");
    let a = PolicyGateway::start_with_state(&body, &redis.state("")).await;
    let b = PolicyGateway::start_with_state(&body, &redis.state("")).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_across_two_instances() {
    bounded(async {
        let redis = RedisServer::start();
        let plugins = format!(
            "{}{}",
            plugin_entry("auth", ""),
            plugin_entry("rate-limit", "key = { rpm = 60 }")
        );
        let (a, b) = pair(&redis, MOCK_MODELS, &plugins).await;
        let (_, secret) = a.create_key(json!({"name": "rl"})).await;
        let started = Instant::now();
        let (mut ok, mut limited) = (0u32, 0u32);
        for i in 0..160 {
            let gw = if i % 2 == 0 { &a } else { &b };
            match gw.chat(&secret, &ask(5)).await.status {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        // GCRA: a burst of 60, then one more per second of the run.
        let refill = started.elapsed().as_secs() as u32;
        assert!(
            (60..=61 + refill).contains(&ok),
            "{ok} admitted, {limited} limited in {:?}: one limit of 60 across both instances",
            started.elapsed()
        );
        assert_eq!(ok + limited, 160);
    })
    .await;
}

/// Spend settled for a key, read through `gw`'s budget admin endpoint.
async fn spend(gw: &PolicyGateway, id: &str) -> (f64, u64) {
    let resp = gw
        .admin
        .call(
            "GET",
            &format!("/admin/plugins/budget/usage?scope=key&id={id}&period=total"),
            None,
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text);
    let line = resp.json()["usage"]
        .as_array()
        .and_then(|l| l.first().cloned())
        .unwrap_or(Value::Null);
    (
        line["spend_usd"].as_f64().unwrap_or(0.0),
        line["requests"].as_u64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_budget_across_two_instances_mid_stream_included() {
    bounded(async {
        let redis = RedisServer::start();
        let reply = "lorem ipsum dolor sit amet ".repeat(16);
        let models = MOCK_MODELS.replace(
            "stream_chunks = 5",
            &format!("stream_chunks = 40\nreply = \"{reply}\""),
        );
        let plugins = format!(
            "{}{}",
            plugin_entry("auth", ""),
            plugin_entry(
                "budget",
                &format!("{PRICES}\ndefault_max_tokens = 1\nstream_step_tokens = 4")
            )
        );
        let (a, b) = pair(&redis, &models, &plugins).await;

        // Non-streamed requests spread over both until the budget refuses: each instance
        // alone would admit the whole budget again; together they admit it once.
        let (id, secret) = a
            .create_key(json!({"name": "b", "budget_usd": 1.0, "budget_period": "total"}))
            .await;
        // The mock's reply is 108 tokens: a max_tokens of 120 makes the worst case cover it.
        let mut ok = 0;
        for i in 0..60 {
            let gw = if i % 2 == 0 { &a } else { &b };
            let resp = gw.chat(&secret, &ask(120)).await;
            match resp.status {
                200 => ok += 1,
                402 => break,
                other => panic!("unexpected {other}: {}", resp.text),
            }
        }
        assert!(ok > 0 && ok < 60, "{ok} requests admitted");
        // Every settled request counted once, by whichever instance served it.
        eventually(Duration::from_secs(10), "spend settled", || async {
            spend(&b, &id).await.1 == ok
        })
        .await;
        let (spent, _) = spend(&a, &id).await;
        assert!(
            spent <= 1.0 + 1e-9,
            "spent {spent} of a 1.0 budget in {ok} requests"
        );
        // The refusal was right: one more worst case (1 + 120 tokens) does not fit.
        assert!(spent + 0.121 > 1.0, "refused at {spent} with room left");
        // Both instances refuse now.
        openai_error(&a.chat(&secret, &ask(120)).await, 402);
        openai_error(&b.chat(&secret, &ask(120)).await, 402);

        // Mid-stream: spend on A, then a stream on B is cut when the shared total crosses.
        let (sid, secret) = a
            .create_key(json!({"name": "s", "budget_usd": 0.16, "budget_period": "total"}))
            .await;
        // The mock honours max_tokens: 120 lets it give its whole 108-token reply.
        assert_eq!(a.chat(&secret, &ask(120)).await.status, 200);
        eventually(Duration::from_secs(10), "first spend settled", || async {
            spend(&b, &sid).await.1 == 1
        })
        .await;
        // No max_tokens: admitted on the plugin's default_max_tokens (1), and the mock
        // streams its whole reply, so only the mid-stream check can stop it.
        let body = json!({"model": "mock", "stream": true,
            "messages": [{"role": "user", "content": "hello"}]});
        let resp = b.chat(&secret, &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(
            resp.text.contains("Budget exceeded for key"),
            "{}",
            resp.text
        );
        eventually(Duration::from_secs(10), "stream spend settled", || async {
            spend(&a, &sid).await.1 == 2
        })
        .await;
        // The first request cost 0.109: the stream had 0.051 left and was cut within it.
        let (spent, _) = spend(&a, &sid).await;
        assert!(spent <= 0.165, "spent {spent} of 0.16");
        openai_error(&a.chat(&secret, &ask(5)).await, 402);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_cache_are_shared_and_revocation_reaches_every_instance_within_a_second() {
    bounded(async {
        let redis = RedisServer::start();
        let plugins = format!(
            "{}{}",
            plugin_entry("auth", ""),
            plugin_entry("cache", "ttl_secs = 60")
        );
        let (a, b) = pair(&redis, MOCK_MODELS, &plugins).await;

        // Created on A, works on B at once.
        let (id, secret) = a.create_key(json!({"name": "k"})).await;
        let body = json!({"model": "mock", "messages": [{"role": "user", "content": "cached?"}]});
        let first = b.chat(&secret, &body).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(first.header("x-weir-cache"), "miss");
        // Stored by B, a hit on A.
        let mut hit = false;
        for _ in 0..40 {
            let resp = a.chat(&secret, &body).await;
            assert_eq!(resp.status, 200, "{}", resp.text);
            if resp.header("x-weir-cache") == "hit" {
                assert_eq!(resp.json()["choices"], first.json()["choices"]);
                hit = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(hit, "the entry B stored was never a hit on A");

        // B has the key in its local cache now; revoked on A, B refuses it within 1 s.
        for _ in 0..5 {
            assert_eq!(b.chat(&secret, &body).await.status, 200);
        }
        let resp = a
            .admin
            .call(
                "POST",
                &format!("/admin/plugins/auth/keys/{id}/revoke"),
                None,
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let revoked = Instant::now();
        loop {
            let status = b.chat(&secret, &body).await.status;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "B still accepts a key revoked on A after {:?}",
                revoked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn readyz(gw: &PolicyGateway) -> u16 {
    gw.client.get("/readyz").await.status
}

async fn metric(gw: &PolicyGateway, name: &str) -> f64 {
    let text = gw.client.get("/metrics").await.text;
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted_empty() {
    bounded(async {
        let mut redis = RedisServer::start();
        let plugins = format!(
            "{}{}{}",
            plugin_entry("auth", ""),
            plugin_entry("rate-limit", "key = { rpm = 100000 }"),
            plugin_entry("budget", PRICES)
        );
        let body = format!("{MOCK_MODELS}{plugins}");
        // A: the defaults (kv closed, limiter open, ledger closed). B: the ledger fail-open.
        let a = PolicyGateway::start_with_state(&body, &redis.state("")).await;
        let b = PolicyGateway::start_with_state(
            &body,
            &redis.state("[state.redis.on_error]\nledger = \"open\""),
        )
        .await;
        let (_, secret) = a
            .create_key(json!({"name": "load", "budget_usd": 100.0, "budget_period": "total"}))
            .await;
        for gw in [&a, &b] {
            assert_eq!(gw.chat(&secret, &ask(5)).await.status, 200);
            assert_eq!(readyz(gw).await, 200);
        }

        redis.kill();
        // Every request is answered, none hangs: A refuses (the ledger fails closed) with a
        // 503 naming the store; B serves (its ledger fails open, counted).
        let outage = Instant::now();
        let (mut a_503, mut b_200) = (0, 0);
        for _ in 0..10 {
            let started = Instant::now();
            let resp = a.chat(&secret, &ask(5)).await;
            assert!(started.elapsed() < Duration::from_secs(3), "a request hung");
            if resp.status == 503 {
                assert!(
                    resp.text.contains("state_unavailable"),
                    "the 503 names the store: {}",
                    resp.text
                );
                a_503 += 1;
            } else {
                assert_eq!(resp.status, 200, "{}", resp.text);
            }
            let started = Instant::now();
            let resp = b.chat(&secret, &ask(5)).await;
            assert!(started.elapsed() < Duration::from_secs(3), "a request hung");
            if resp.status == 200 {
                b_200 += 1;
            } else {
                eprintln!("B answered {}: {}", resp.status, resp.text);
            }
        }
        assert_eq!(a_503, 10, "A's ledger is fail-closed");
        assert_eq!(b_200, 10, "B's ledger is fail-open and its keys are cached");
        assert!(metric(&b, "weir_state_bypass_total{primitive=\"ledger\"}").await >= 10.0);
        assert!(metric(&a, "weir_state_bypass_total{primitive=\"limiter\"}").await >= 1.0);
        for gw in [&a, &b] {
            eventually(Duration::from_secs(3), "readyz red", || async {
                readyz(gw).await == 503
            })
            .await;
        }
        assert!(outage.elapsed() < Duration::from_secs(30));

        // Back, but empty (no persistence): both recover on their own; the old key is gone
        // everywhere (documented: persist Redis, or re-import an export), and a new key
        // created on A works on B.
        redis.restart();
        for gw in [&a, &b] {
            eventually(Duration::from_secs(10), "readyz green", || async {
                readyz(gw).await == 200
            })
            .await;
        }
        for gw in [&a, &b] {
            eventually(Duration::from_secs(3), "old key refused", || async {
                gw.chat(&secret, &ask(5)).await.status == 401
            })
            .await;
        }
        let (_, fresh) = a
            .create_key(json!({"name": "after", "budget_usd": 1.0, "budget_period": "total"}))
            .await;
        assert_eq!(b.chat(&fresh, &ask(5)).await.status, 200);
        assert_eq!(a.chat(&fresh, &ask(5)).await.status, 200);
    })
    .await;
}
