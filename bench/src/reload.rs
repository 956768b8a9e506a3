//! The hot-reload scenarios the suite runs against a live Weir: resident memory over many
//! reloads (are old generations freed?), and the time from a file write to the new
//! generation and to the first answer served by it.
//!
//! Every reload here really builds a new snapshot: Weir skips reloads whose inputs (the
//! config file and every file of the plugin folders) hash the same, so each write changes
//! the config's content. Files are replaced as editors save them: a temporary file beside
//! the original, renamed over it. Every wait is bounded and fails with what the gateway
//! last reported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::bodies;
use crate::http::{Client, Response};
use crate::procfs;
use crate::report::{ReloadLatency, ReloadRss};

/// How long any single wait (a generation, an answer, an admin call) may take.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running Weir with its admin API on.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The API listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The admin bearer token.
    pub token: String,
    /// The process, for `/proc`.
    pub pid: u32,
    /// The config file the gateway watches.
    pub config: PathBuf,
    /// The model the traffic asks for.
    pub model: String,
}

impl Gateway {
    /// An admin API client.
    pub fn admin(&self) -> Admin {
        Admin {
            client: Client::new(self.admin, WAIT),
            auth: format!("Bearer {}", self.token),
        }
    }
}

/// Calls the admin API.
#[derive(Debug)]
pub struct Admin {
    client: Client,
    auth: String,
}

impl Admin {
    fn call(&mut self, method: &str, path: &str) -> anyhow::Result<Response> {
        let headers = [("authorization", self.auth.as_str())];
        // One retry on a fresh connection: a kept-alive one may have been closed.
        let resp = match self.client.request(method, path, &headers, b"") {
            Ok(r) => r,
            Err(_) => self
                .client
                .request(method, path, &headers, b"")
                .with_context(|| format!("admin {method} {path}"))?,
        };
        Ok(resp)
    }

    /// `GET /admin/status`.
    pub fn status(&mut self) -> anyhow::Result<Value> {
        let r = self.call("GET", "/admin/status")?;
        if r.status != 200 {
            bail!(
                "GET /admin/status: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        r.json()
    }

    /// The generation serving now.
    pub fn generation(&mut self) -> anyhow::Result<u64> {
        let s = self.status()?;
        s["generation"]
            .as_u64()
            .with_context(|| format!("no generation in the admin status: {s}"))
    }

    /// `POST /admin/reload`: `{"outcome": ..., "generation": ...}` (or the failure).
    pub fn reload(&mut self) -> anyhow::Result<Value> {
        let r = self.call("POST", "/admin/reload")?;
        let v = r
            .json()
            .with_context(|| format!("POST /admin/reload: {}", r.status))?;
        if r.status != 200 {
            bail!("POST /admin/reload: {} {v}", r.status);
        }
        Ok(v)
    }

    /// Polls the status every `poll` until the generation is at least `generation`; returns
    /// when that was seen and the status then.
    pub fn wait_generation(
        &mut self,
        generation: u64,
        poll: Duration,
    ) -> anyhow::Result<(Instant, Value)> {
        let until = Instant::now() + WAIT;
        loop {
            let s = self.status()?;
            let now = Instant::now();
            if s["generation"].as_u64().unwrap_or(0) >= generation {
                return Ok((now, s));
            }
            if now > until {
                bail!(
                    "generation {generation} not reported within {WAIT:?}; serving {}, last reload {}, last error {}",
                    s["generation"],
                    s["reload"]["last"],
                    s["reload"]["last_error"]
                );
            }
            std::thread::sleep(poll);
        }
    }

    /// The gateway's own duration of the reload that produced `generation`, ms (the status
    /// records it just after the swap, so it may lag the generation by a moment).
    pub fn build_ms(&mut self, generation: u64) -> anyhow::Result<f64> {
        let until = Instant::now() + WAIT;
        loop {
            let s = self.status()?;
            let last = &s["reload"]["last"];
            if last["generation"].as_u64().unwrap_or(0) >= generation {
                if last["outcome"] != "success" {
                    bail!("reload to generation {generation}: {last}");
                }
                return last["duration_ms"]
                    .as_f64()
                    .with_context(|| format!("no duration_ms in {last}"));
            }
            if Instant::now() > until {
                bail!("no reload record for generation {generation}: {last}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Replaces `path` as editors save: writes a temporary file beside it and renames it over.
pub fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))
}

/// A chat request body whose counter is replaced per request (every request distinct, so a
/// cache plugin always misses).
#[derive(Debug, Clone)]
pub struct ChatBody {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl ChatBody {
    /// The suite's ~1 KB non-streaming chat body for `model`.
    pub fn new(model: &str) -> Self {
        let body = bodies::chat(model, false);
        let at = memchr::memmem::find(&body, bodies::COUNTER.as_bytes()).unwrap_or(body.len());
        let rest = (at + bodies::COUNTER.len()).min(body.len());
        ChatBody {
            head: body[..at].to_vec(),
            tail: body[rest..].to_vec(),
        }
    }

    /// The body with counter `n`.
    pub fn with(&self, n: u64) -> Vec<u8> {
        let mut b = self.head.clone();
        b.extend_from_slice(n.to_string().as_bytes());
        b.extend_from_slice(&self.tail);
        b
    }
}

/// Sends one chat request; `Err` with a short reason unless it is a 200.
fn chat(client: &mut Client, body: &ChatBody, n: u64) -> Result<Response, String> {
    chat_with(client, body, n, &[])
}

/// [`chat`] with more request headers.
fn chat_with(
    client: &mut Client,
    body: &ChatBody,
    n: u64,
    extra: &[(&str, &str)],
) -> Result<Response, String> {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    match client.request("POST", "/v1/chat/completions", &headers, &body.with(n)) {
        Ok(r) if r.status == 200 => Ok(r),
        Ok(r) => Err(format!(
            "status {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Unique request numbers across every client of the suite.
static COUNTER: AtomicU64 = AtomicU64::new(1 << 40);

/// Failures seen by a load, with the first one kept.
#[derive(Debug, Default)]
struct Tally {
    requests: AtomicU64,
    failures: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, result: &Result<Response, String>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.first_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(|| e.clone());
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    fn first_failure(&self) -> Option<String> {
        self.first_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Reloads the gateway `reloads` times through `POST /admin/reload`, each time after
/// writing `render(i)` to its config (content that differs every time), sends
/// `requests_between` chat requests after each, and reads its RSS after the reloads listed
/// in `checkpoints`.
///
/// The requests ask not to be cached (`cache-control: no-store`; every plugin's hooks still
/// run). Otherwise a cache plugin would store each of them, all distinct, and the memory of
/// its entries (up to its `max_entries`, tens of MiB) would be counted as reload growth:
/// with the default chain, the same requests without any reload grew RSS by ~11 MiB per
/// 2,000 requests.
pub fn rss_over_reloads(
    label: &str,
    gw: &Gateway,
    idle_kib: u64,
    render: &dyn Fn(u32) -> String,
    reloads: u32,
    checkpoints: &[u32],
    requests_between: u32,
) -> anyhow::Result<ReloadRss> {
    let mut admin = gw.admin();
    let first = admin.generation()?;
    let mut api = Client::new(gw.addr, WAIT);
    let body = ChatBody::new(&gw.model);
    let tally = Tally::default();
    let mut out = ReloadRss {
        target: label.to_owned(),
        idle_kib,
        ..ReloadRss::default()
    };
    for i in 1..=reloads {
        let expected = first + u64::from(i);
        replace_file(&gw.config, render(i).as_bytes())?;
        let v = admin.reload()?;
        let generation = v["generation"].as_u64().unwrap_or(0);
        // `unchanged` is fine only when the file watcher got there first.
        match v["outcome"].as_str() {
            Some("success" | "unchanged") if generation >= expected => {}
            _ => bail!("{label}: reload {i} built nothing (expected generation {expected}): {v}"),
        }
        for _ in 0..requests_between {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            tally.record(&chat_with(
                &mut api,
                &body,
                n,
                &[("cache-control", "no-store")],
            ));
        }
        if checkpoints.contains(&i) {
            out.checkpoints.push((i, procfs::rss_kib(gw.pid)?));
        }
    }
    out.generations = admin.generation()? - first;
    (out.requests, out.failures) = tally.counts();
    out.first_failure = tally.first_failure();
    Ok(out)
}

/// Steady light load on a few keep-alive connections, recording when each value of one
/// response header was first seen.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    first_seen: Arc<Mutex<HashMap<String, Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    /// Starts `connections` clients, each sending one chat request after another with
    /// `pause` between them, watching header `marker`.
    pub fn start(gw: &Gateway, marker: &'static str, connections: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let first_seen = Arc::new(Mutex::new(HashMap::new()));
        let body = ChatBody::new(&gw.model);
        let threads = (0..connections)
            .map(|_| {
                let (stop, tally, seen, body) = (
                    stop.clone(),
                    tally.clone(),
                    first_seen.clone(),
                    body.clone(),
                );
                let mut client = Client::new(gw.addr, WAIT);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                        let result = chat(&mut client, &body, n);
                        let now = Instant::now();
                        if let Ok(r) = &result
                            && let Some(v) = r.header(marker)
                        {
                            seen.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .entry(v.to_owned())
                                .or_insert(now);
                        }
                        tally.record(&result);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            tally,
            first_seen,
            threads,
        }
    }

    /// When a response first carried `value`, waiting for it up to [`WAIT`].
    pub fn wait_seen(&self, value: &str) -> Option<Instant> {
        let until = Instant::now() + WAIT;
        while Instant::now() < until {
            if let Some(t) = self
                .first_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(value)
            {
                return Some(*t);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Requests and failures so far.
    pub fn counts(&self) -> (u64, u64) {
        self.tally.counts()
    }

    /// The first failure so far.
    pub fn first_failure(&self) -> Option<String> {
        self.tally.first_failure()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How a series of reloads is triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The gateway's file watcher, after its quiet period of this many ms.
    Watch {
        /// `[reload] debounce_ms` in force.
        debounce_ms: u64,
    },
    /// `POST /admin/reload` right after the write.
    Admin,
}

/// Writes `render(v)` to the gateway's config for each version `v` in `versions`, each
/// changing what header `marker(v)` the answers carry, and measures, per write, the time
/// until the admin status reports the new generation and until `traffic` first sees the new
/// marker, and reads the gateway's own build time. `settle` passes between writes, so each
/// reload stands alone and some traffic runs on every version.
#[allow(clippy::too_many_arguments)]
pub fn reload_latency(
    label: &str,
    gw: &Gateway,
    traffic: &Traffic,
    render: &dyn Fn(u32) -> String,
    marker: &dyn Fn(u32) -> String,
    versions: std::ops::RangeInclusive<u32>,
    trigger: Trigger,
    settle: Duration,
) -> anyhow::Result<ReloadLatency> {
    let mut admin = gw.admin();
    let (requests0, failures0) = traffic.counts();
    let started = Instant::now();
    let mut out = ReloadLatency {
        trigger: label.to_owned(),
        debounce_ms: match trigger {
            Trigger::Watch { debounce_ms } => Some(debounce_ms),
            Trigger::Admin => None,
        },
        ..ReloadLatency::default()
    };
    for v in versions {
        std::thread::sleep(settle);
        let expected = admin.generation()? + 1;
        let text = render(v);
        let written = Instant::now();
        replace_file(&gw.config, text.as_bytes())?;
        let generation_seen = match trigger {
            Trigger::Watch { .. } => admin.wait_generation(expected, Duration::from_millis(2))?.0,
            Trigger::Admin => {
                let r = admin.reload()?;
                let now = Instant::now();
                if r["generation"].as_u64().unwrap_or(0) < expected {
                    bail!("{label}: version {v} built nothing: {r}");
                }
                now
            }
        };
        let want = marker(v);
        let answered = traffic.wait_seen(&want).with_context(|| {
            format!(
                "{label}: no answer carried version {v} ({want}) within {WAIT:?} of the write; \
                 first failure: {:?}",
                traffic.first_failure()
            )
        })?;
        let ms = |t: Instant| t.saturating_duration_since(written).as_secs_f64() * 1000.0;
        out.to_generation_ms.push(ms(generation_seen));
        out.to_answer_ms.push(ms(answered));
        out.build_ms.push(admin.build_ms(expected)?);
    }
    let (requests, failures) = traffic.counts();
    out.seconds = started.elapsed().as_secs_f64();
    out.requests = requests - requests0;
    out.failures = failures - failures0;
    if out.failures > 0 {
        out.first_failure = traffic.first_failure();
    }
    Ok(out)
}
