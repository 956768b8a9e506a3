//! Hot reload through the real binary: config, Lua policy and WASM plugin rewritten under
//! steady load (some versions broken), a long stream across a reload, memory after 100
//! reloads.
//!
//! These tests need the config file's path, so they start `weir` with [`Managed`] (same
//! shape as [`crate::support::TestGateway`], plus the path, the admin API and the pid).
//!
//! The WASM case uses the fixture plugin in `tests/fixtures/wasm/versioned`, built by
//! `scripts/build-plugins.sh` (which `scripts/test.sh` runs first).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::client::Client;
use crate::support::gateway::{WEIR, free_addr};
use crate::support::{Resp, bounded, chat_body};

/// The admin token every managed gateway uses.
pub const TOKEN: &str = "e2e-admin-token-0123456789abcdef";

/// A `weir serve` process whose config file the test rewrites.
pub struct Managed {
    child: Child,
    logs: Arc<Mutex<String>>,
    /// The temporary folder holding the config (and plugins, state).
    pub dir: TempDir,
    /// The config file.
    pub config: PathBuf,
    /// Client of the API listener.
    pub client: Client,
    /// Client of the admin listener.
    pub admin: Client,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
}

/// The admin section for `addr` with [`TOKEN`] (debounce `ms`).
pub fn admin_section(addr: SocketAddr, debounce_ms: u64) -> String {
    format!(
        "[admin]\nlisten = \"{addr}\"\ntoken = \"{TOKEN}\"\n\n[reload]\ndebounce_ms = {debounce_ms}\n\n"
    )
}

/// A config with the in-process mock answering `reply`, one model `m`, an admin section.
pub fn mock_config(admin: SocketAddr, reply: &str, extra_provider_lines: &str) -> String {
    format!(
        "{}[log]\nlevel = \"info\"\n\n[providers.local]\nkind = \"mock\"\nreply = \"{reply}\"\n{extra_provider_lines}\n\n[[models]]\nname = \"m\"\ntargets = [{{ provider = \"local\", model = \"mock-1\" }}]\n",
        admin_section(admin, 100)
    )
}

impl Managed {
    /// Starts `weir serve` on `config_text` (which should hold an `[admin]` section built
    /// with [`admin_section`] for `admin_addr`), after `prepare` has put files in the folder.
    pub async fn start_with(
        admin_addr: SocketAddr,
        config_text: &str,
        prepare: impl FnOnce(&Path),
    ) -> Managed {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let config = dir.path().join("weir.toml");
        std::fs::write(&config, config_text).expect("write config");
        let addr = free_addr();
        let logs = Arc::new(Mutex::new(String::new()));
        let mut child = Command::new(WEIR)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            // Compiled WASM is cached per test, not in the user's cache: every component a
            // test writes is compiled (and timed) as an operator's first deploy of it would be.
            .env("WEIR_WASM_CACHE", dir.path().join(".wasm-cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weir");
        collect(child.stdout.take().expect("stdout"), logs.clone());
        collect(child.stderr.take().expect("stderr"), logs.clone());
        let client = Client::new(format!("http://{addr}"));
        let admin = Client::new(format!("http://{admin_addr}"));
        let managed = Managed {
            child,
            logs,
            dir,
            config,
            client,
            admin,
            admin_addr,
        };
        managed.wait_ready().await;
        managed
    }

    /// Starts on a mock config answering `reply`.
    pub async fn start(reply: &str) -> Managed {
        let admin = free_addr();
        Managed::start_with(admin, &mock_config(admin, reply, ""), |_| {}).await
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                self.client.http().get(self.client.url("/readyz")).send(),
            )
            .await;
            if let Ok(Ok(r)) = ready
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("weir did not become ready. Output:\n{}", self.logs());
    }

    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Replaces the config the way editors do: write a temporary file, rename it over.
    pub fn write_config(&self, text: &str) {
        replace_file(&self.config, text.as_bytes());
    }

    /// An admin call with the right token.
    pub async fn admin_call(&self, method: reqwest::Method, path: &str) -> Resp {
        admin_call(&self.admin, method, path, Some(TOKEN)).await
    }

    /// `GET /admin/status`.
    pub async fn status(&self) -> Value {
        let r = self.admin_call(reqwest::Method::GET, "/admin/status").await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- weir output ----\n{}", self.logs());
        }
    }
}

/// An admin call with an optional bearer token.
pub async fn admin_call(
    admin: &Client,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> Resp {
    let mut req = admin.http().request(method, admin.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("admin call");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("admin body");
    Resp {
        status,
        headers,
        text,
    }
}

/// Writes `path` atomically: a temporary file in the same folder, renamed over it.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename over");
}

fn collect(pipe: impl Read + Send + 'static, logs: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            logs.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
}

/// The text of a chat completion.
pub fn content(resp: &Resp) -> String {
    resp.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Steady load: `workers` loops sending chat requests until stopped, recording failures and
/// when each distinct observed version (as `observe` reads it) was first seen.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests answered.
    pub done: Arc<AtomicUsize>,
    /// Failed requests (status and body).
    pub failures: Arc<Mutex<Vec<String>>>,
    /// First time each version was seen.
    pub seen: Arc<Mutex<HashMap<String, Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the load.
    pub fn start(client: &Client, workers: usize, observe: fn(&Resp) -> String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let tasks = (0..workers)
            .map(|w| {
                let (client, stop, done, failures, seen) = (
                    client.clone(),
                    stop.clone(),
                    done.clone(),
                    failures.clone(),
                    seen.clone(),
                );
                tokio::spawn(async move {
                    let body = chat_body("m", &format!("worker {w}"));
                    while !stop.load(Ordering::Relaxed) {
                        let resp = client.post_json("/v1/chat/completions", &body).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        if resp.status != 200 {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{}: {}", resp.status, resp.text));
                            continue;
                        }
                        let version = observe(&resp);
                        seen.lock()
                            .unwrap()
                            .entry(version)
                            .or_insert_with(Instant::now);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failures,
            seen,
            tasks,
        }
    }

    /// When `version` was first seen, waiting up to `timeout` for it.
    pub async fn wait_seen(&self, version: &str, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.seen.lock().unwrap().get(version) {
                return Some(*t);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops and waits for the workers.
    pub async fn stop(self) -> (usize, Vec<String>, HashMap<String, Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap().clone();
        (self.done.load(Ordering::Relaxed), failures, seen)
    }
}

/// Reload failures counted by the admin status.
pub async fn failures_counted(gw: &Managed) -> u64 {
    gw.status().await["reload"]["failure"].as_u64().unwrap()
}

/// Waits until the admin status counts more than `before` failed reloads; returns the
/// last error.
pub async fn wait_failure(gw: &Managed, before: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.status().await;
        if status["reload"]["failure"].as_u64().unwrap() > before {
            return status["reload"]["last_error"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "broken version was not reported as a failed reload: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// p50 and max of durations, ms.
pub fn summary(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(*v.last().unwrap()))
}

/// The four kinds of broken config, in turn.
fn broken_config(admin: SocketAddr, i: usize) -> (String, &'static str) {
    let reply = format!("BROKEN-{i}");
    match (i / 4) % 4 {
        0 => (
            mock_config(admin, &reply, "").replace("[[models]]", "[[models]"),
            "syntax error",
        ),
        1 => (mock_config(admin, &reply, "no_such_key = 1"), "unknown key"),
        // A save cut short before the models: valid TOML, nothing to serve.
        2 => {
            let whole = mock_config(admin, &reply, "");
            (
                whole[..whole.find("[[models]]").unwrap()].to_owned(),
                "no models",
            )
        }
        _ => (
            mock_config(admin, &reply, "").replace("provider = \"local\"", "provider = \"nope\""),
            "unknown provider",
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_rewritten_under_load_never_fails_a_request() {
    bounded(async {
        let gw = Managed::start("v0").await;
        let admin = gw.admin_addr;
        let load = Load::start(&gw.client, 6, content);
        assert!(load.wait_seen("v0", Duration::from_secs(5)).await.is_some());
        let mut latencies = Vec::new();
        let mut valid = Vec::new();
        let mut broken = 0;
        for i in 1..=24 {
            if i % 4 == 3 {
                let (text, kind) = broken_config(admin, i);
                let before = failures_counted(&gw).await;
                gw.write_config(&text);
                let err = wait_failure(&gw, before).await;
                assert!(
                    err["file"].as_str().unwrap().ends_with("weir.toml"),
                    "{kind}: the error names the file: {err}"
                );
                if kind == "no models" {
                    assert_eq!(err["key"], "models", "{kind}: {err}");
                    let message = err["message"].as_str().unwrap();
                    assert!(message.contains("config defines no models"), "{err}");
                } else if kind != "syntax error" {
                    assert!(err["key"].is_string(), "{kind}: the error names the key: {err}");
                } else {
                    assert!(err["line"].is_u64(), "{kind}: the error names the line: {err}");
                }
                broken += 1;
                continue;
            }
            let version = format!("v{i}");
            let text = mock_config(admin, &version, "");
            let written = Instant::now();
            if i % 2 == 0 {
                gw.write_config(&text);
            } else {
                // In place, as `echo > file` or some editors do.
                std::fs::write(&gw.config, &text).unwrap();
            }
            let seen = load
                .wait_seen(&version, Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("{version} never took effect"));
            latencies.push(seen.saturating_duration_since(written));
            valid.push(version);
        }
        let (requests, failures, seen) = load.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {requests} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        for v in &valid {
            assert!(seen.contains_key(v), "{v} never answered");
        }
        let leaked: Vec<_> = seen.keys().filter(|k| k.starts_with("BROKEN")).collect();
        assert!(leaked.is_empty(), "broken versions answered: {leaked:?}");
        let metrics = gw.client.get("/metrics").await.text;
        assert!(
            metrics.contains(&format!("weir_reload_total{{outcome=\"failure\"}} {broken}")),
            "{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("weir_reload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let (p50, max) = summary(latencies);
        println!(
            "config reload under load: {} valid + {broken} broken versions, {requests} requests, 0 failed; write -> first response on the new version: p50 {p50:.0} ms, max {max:.0} ms (debounce 100 ms)",
            valid.len()
        );
        assert!(max < 2_000.0, "a reload took {max} ms to show");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_stream_finishes_on_the_old_snapshot() {
    bounded(async {
        let admin = free_addr();
        let stream_lines = "stream_chunks = 20\nchunk_delay_ms = 100";
        let old = "the old snapshot streams this whole sentence, word after word, to its end";
        let gw = Managed::start_with(admin, &mock_config(admin, old, stream_lines), |_| {}).await;
        let mut body = chat_body("m", "stream please");
        body["stream"] = json!(true);
        let mut stream = gw.client.open_stream("/v1/chat/completions", &body).await;
        assert_eq!(stream.resp.status(), 200);
        let first = stream.next_json(Duration::from_secs(5)).await;
        let mut text = first["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();

        gw.write_config(&mock_config(admin, "new", stream_lines));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = gw
                .client
                .post_json("/v1/chat/completions", &chat_body("m", "x"))
                .await;
            if content(&r) == "new" {
                break;
            }
            assert!(Instant::now() < deadline, "the reload did not take effect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut done = false;
        while let Some(event) = stream
            .next_event(Duration::from_secs(10))
            .await
            .expect("stream broke")
        {
            let data = event.strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        assert!(done, "the stream ended with [DONE]");
        assert_eq!(text, old, "the stream kept its snapshot to the end");
    })
    .await;
}

/// What the gateway's plugins hold alive (admin status, `reload.live`), once the generations
/// that left the kept list are gone: requests finished on them a moment before.
async fn live_settled(gw: &Managed, kept: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = gw.status().await["reload"]["live"].clone();
        if live["lua_plugins"] == kept && live["wasm_plugins"] == kept {
            return live;
        }
        assert!(
            Instant::now() < deadline,
            "old generations' plugins were never freed: {live}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_over_100_reloads() {
    let (wasm, _) = versioned_wasm();
    let wasm_manifest = std::fs::read(versioned_fixture().join("plugin.toml")).unwrap();
    bounded(async {
        let admin = free_addr();
        // One Lua and one WASM plugin: every reload loads both again.
        let config = |reply: &str, pad: &str| {
            format!(
                "{}\n[[plugins]]\npath = \"policy\"\nname = \"policy\"\n\n[[plugins]]\npath = \"versioned\"\n",
                mock_config(admin, reply, pad)
            )
        };
        let gw = Managed::start_with(admin, &config("r0", ""), |dir| {
            std::fs::create_dir(dir.join("policy")).unwrap();
            std::fs::write(dir.join("policy/plugin.toml"), LUA_MANIFEST).unwrap();
            std::fs::write(dir.join("policy/plugin.lua"), lua_policy("L0")).unwrap();
            std::fs::create_dir(dir.join("versioned")).unwrap();
            std::fs::write(dir.join("versioned/plugin.toml"), &wasm_manifest).unwrap();
            std::fs::write(dir.join("versioned/plugin.wasm"), &wasm).unwrap();
        })
        .await;
        let reload = |i: usize| {
            // A few hundred bytes of distinct content per generation.
            let pad = format!("latency_ms = {}", i % 3);
            gw.write_config(&config(&format!("r{i}-{}", "x".repeat(200)), &pad));
        };
        let mut rss = Vec::new();
        for i in 1..=100 {
            reload(i);
            let r = gw.admin_call(reqwest::Method::POST, "/admin/reload").await;
            assert_eq!(r.status, 200, "{}", r.text);
            let outcome = r.json()["outcome"].as_str().unwrap().to_owned();
            assert!(
                outcome == "success" || outcome == "unchanged",
                "reload {i}: {}",
                r.text
            );
            let resp = gw
                .client
                .post_json("/v1/chat/completions", &chat_body("m", "x"))
                .await;
            assert_eq!(resp.status, 200);
            assert_eq!(policy_header(&resp), "L0");
            if i == 10 || i == 50 || i == 100 {
                rss.push(gw.rss_kib());
            }
        }
        let generation = gw.status().await["generation"].as_u64().unwrap();
        assert!(
            generation >= 100,
            "every reload made a generation: {generation}"
        );
        // Old generations are freed: only the kept ones (the serving one and the default 5
        // before it) hold plugin loads ...
        let live = live_settled(&gw, 6).await;
        // ... and of those, only the serving one holds instances and VMs: its one WASM
        // instance (requests came one at a time), its spare Lua VMs (one per worker thread,
        // at most 16), and at most one VM per other worker thread that has not returned a
        // VM since the last reload (it drops parked generations' VMs when it does).
        assert_eq!(live["wasm_instances"], 1, "{live}");
        let workers = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        let lua_vms = live["lua_vms"].as_u64().unwrap();
        assert!(
            lua_vms <= u64::try_from(workers.min(16) + workers).unwrap(),
            "{workers} workers: {live}"
        );
        println!(
            "RSS after 10 / 50 / 100 reloads (one Lua and one WASM plugin): {} / {} / {} KiB; live {live}",
            rss[0], rss[1], rss[2]
        );
        assert!(
            rss[2] < rss[0] + 32 * 1024,
            "RSS grew by more than 32 MiB between reload 10 and 100: {rss:?}"
        );
    })
    .await;
}

/// A Lua policy tagging every response with its version and a key-value counter.
fn lua_policy(version: &str) -> String {
    format!(
        "local M = {{}}\n\nfunction M.on_request(req)\n\tlocal n = weir.kv.incr(\"hits\", 1)\n\treturn weir.continue({{ set_metadata = {{\n\t\t[\"weir.response-header.x-policy\"] = \"{version}\",\n\t\t[\"weir.response-header.x-hits\"] = tostring(n),\n\t}} }})\nend\n\nreturn M\n"
    )
}

/// The manifest of the versioned policy. Its deadline is generous because deadlines are
/// wall-clock: on a busy 2-core test machine (debug build, other tests in parallel) a worker
/// thread is sometimes descheduled for more than the default 10 ms in the middle of a hook,
/// and this policy fails closed. (The Lua host builds its VMs at load, not inside the first
/// hook call after a reload: see `plugin::lua`, `# Instances`. Before that, with the default
/// deadline, this test failed one request per run right after a reload, 4 runs out of 4.)
const LUA_MANIFEST: &str = "name = \"versioned\"\nversion = \"0.1.0\"\nkind = \"lua\"\nhooks = [\"on-request\"]\nfailure = \"closed\"\n\n[capabilities]\nkv = true\n\n[limits]\ndeadline_ms = 250\n";

fn policy_header(resp: &Resp) -> String {
    resp.header("x-policy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lua_policy_rewritten_under_load_never_fails_a_request() {
    bounded(async {
        let admin = free_addr();
        let config = format!(
            "{}\n[[plugins]]\npath = \"policy\"\n",
            mock_config(admin, "ok", "")
        );
        let gw = Managed::start_with(admin, &config, |dir| {
            std::fs::create_dir(dir.join("policy")).unwrap();
            std::fs::write(dir.join("policy/plugin.toml"), LUA_MANIFEST).unwrap();
            std::fs::write(dir.join("policy/plugin.lua"), lua_policy("L0")).unwrap();
        })
        .await;
        let policy = gw.dir.path().join("policy");
        let load = Load::start(&gw.client, 6, policy_header);
        assert!(load.wait_seen("L0", Duration::from_secs(5)).await.is_some());
        let mut latencies = Vec::new();
        let mut broken = 0;
        let mut valid = Vec::new();
        for i in 1..=24 {
            if i % 4 == 3 {
                let before = failures_counted(&gw).await;
                let kind = match (i / 4) % 2 {
                    0 => {
                        // A Lua syntax error.
                        let text = lua_policy(&format!("BROKEN-{i}")).replace("return M", "return M end");
                        replace_file(&policy.join("plugin.lua"), text.as_bytes());
                        "lua syntax"
                    }
                    _ => {
                        // A manifest with an unknown key (the script itself is fine).
                        replace_file(&policy.join("plugin.lua"), lua_policy(&format!("BROKEN-{i}")).as_bytes());
                        replace_file(&policy.join("plugin.toml"), format!("{LUA_MANIFEST}colour = \"red\"\n").as_bytes());
                        "manifest"
                    }
                };
                let err = wait_failure(&gw, before).await;
                assert!(err["message"].as_str().unwrap().contains("plugin"), "{kind}: {err}");
                let file = err["file"].as_str().unwrap_or_default();
                assert!(file.ends_with(".lua") || file.ends_with(".toml"), "{kind}: names the file: {err}");
                assert!(err["line"].is_u64(), "{kind}: names the line: {err}");
                broken += 1;
                continue;
            }
            let version = format!("L{i}");
            let written = Instant::now();
            replace_file(&policy.join("plugin.toml"), LUA_MANIFEST.as_bytes());
            replace_file(&policy.join("plugin.lua"), lua_policy(&version).as_bytes());
            let seen = load
                .wait_seen(&version, Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("{version} never took effect"));
            latencies.push(seen.saturating_duration_since(written));
            valid.push(version);
        }
        let (requests, failures, seen) = load.stop().await;
        // Key-value state belongs to the plugin name: the counter kept counting through
        // every reload (it would restart at 1 if it belonged to a generation).
        let r = gw
            .client
            .post_json("/v1/chat/completions", &chat_body("m", "x"))
            .await;
        let hits: u64 = r.header("x-hits").parse().unwrap();
        assert!(
            failures.is_empty(),
            "{} of {requests} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        for v in &valid {
            assert!(seen.contains_key(v), "{v} never answered");
        }
        let leaked: Vec<_> = seen.keys().filter(|k| k.starts_with("BROKEN")).collect();
        assert!(leaked.is_empty(), "broken versions answered: {leaked:?}");
        assert!(
            hits as usize > requests,
            "the plugin's counter survived {} reloads: {hits} >= {requests}",
            valid.len()
        );
        let (p50, max) = summary(latencies);
        println!(
            "Lua policy reload under load: {} valid + {broken} broken versions, {requests} requests, 0 failed; write -> first response on the new version: p50 {p50:.0} ms, max {max:.0} ms; kv counter {hits} after all reloads",
            valid.len()
        );
    })
    .await;
}

/// Where the version sits in the versioned fixture: after this prefix, [`WASM_VERSION_LEN`]
/// characters (see `tests/fixtures/wasm/versioned/src/lib.rs`).
const WASM_MARKER: &[u8] = b"weir-version:";

/// Length of a version of the versioned fixture (`v0000`).
const WASM_VERSION_LEN: usize = 5;

/// The versioned fixture's folder.
fn versioned_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wasm/versioned")
}

/// The versioned fixture's component (built from source, never committed) and the offset
/// of its version.
fn versioned_wasm() -> (Vec<u8>, usize) {
    let path = versioned_fixture().join("plugin.wasm");
    let wasm = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/build-plugins.sh tests/fixtures/wasm/versioned \
             (scripts/test.sh builds every fixture) before the e2e tests",
            path.display()
        )
    });
    let found: Vec<usize> = wasm
        .windows(WASM_MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == WASM_MARKER)
        .map(|(i, _)| i + WASM_MARKER.len())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: the version marker must appear exactly once",
        path.display()
    );
    (wasm, found[0])
}

/// The component with its version set to `version` (same length: nothing else moves).
fn wasm_version(wasm: &[u8], at: usize, version: &str) -> Vec<u8> {
    assert_eq!(version.len(), WASM_VERSION_LEN, "{version}");
    let mut out = wasm.to_vec();
    out[at..at + WASM_VERSION_LEN].copy_from_slice(version.as_bytes());
    out
}

/// The three kinds of broken component, in turn: truncated, garbage, `init` fails.
fn broken_wasm(wasm: &[u8], at: usize, i: usize) -> (Vec<u8>, &'static str) {
    match (i / 4) % 3 {
        // A new build cut short (a copy that has not finished).
        0 => {
            let whole = wasm_version(wasm, at, &format!("T{i:04}"));
            (whole[..whole.len() / 2 + i].to_vec(), "compile")
        }
        // Not WASM at all (deterministic noise, a different length each time).
        1 => {
            let mut x = 0x9e37_79b9_u32.wrapping_mul(u32::try_from(i).unwrap());
            let noise = (0..4096 + i)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            (noise, "compile")
        }
        // A valid component whose `init` refuses to start.
        _ => (wasm_version(wasm, at, &format!("FAIL{}", i % 10)), "init"),
    }
}

/// How long the reload that made `generation` serve took (read, hash, compile, instantiate,
/// `init`, swap), from the admin status's last reload. The swap comes before that
/// bookkeeping, so responses show a new version a moment before the status does; `None` if
/// a later reload (an extra file event finding nothing new) already took its place.
async fn reload_duration_of(gw: &Managed, generation: u64) -> Option<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = gw.status().await["reload"]["last"].clone();
        if last["generation"].as_u64() >= Some(generation) {
            return (last["generation"].as_u64() == Some(generation)
                && last["outcome"] == "success")
                .then(|| Duration::from_secs_f64(last["duration_ms"].as_f64().unwrap() / 1000.0));
        }
        assert!(
            Instant::now() < deadline,
            "the status never showed generation {generation}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn version_header(resp: &Resp) -> String {
    resp.header("x-version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wasm_plugin_rewritten_under_load_never_fails_a_request() {
    let (wasm, at) = versioned_wasm();
    let manifest = std::fs::read(versioned_fixture().join("plugin.toml")).unwrap();
    bounded(async {
        let admin = free_addr();
        let config = format!(
            "{}\n[[plugins]]\npath = \"versioned\"\n",
            mock_config(admin, "ok", "")
        );
        let gw = Managed::start_with(admin, &config, |dir| {
            std::fs::create_dir(dir.join("versioned")).unwrap();
            std::fs::write(dir.join("versioned/plugin.toml"), &manifest).unwrap();
            std::fs::write(dir.join("versioned/plugin.wasm"), &wasm).unwrap();
        })
        .await;
        let file = gw.dir.path().join("versioned/plugin.wasm");
        let load = Load::start(&gw.client, 6, version_header);
        assert!(load.wait_seen("v0000", Duration::from_secs(5)).await.is_some());
        let mut latencies = Vec::new();
        let mut builds = Vec::new();
        let mut broken = 0;
        let mut valid = vec!["v0000".to_owned()];
        let mut generation = gw.status().await["generation"].as_u64().unwrap();
        for i in 1..=24 {
            if i % 4 == 3 {
                let (bytes, kind) = broken_wasm(&wasm, at, i);
                let before = failures_counted(&gw).await;
                replace_file(&file, &bytes);
                let err = wait_failure(&gw, before).await;
                assert_eq!(err["plugin"], "versioned", "{kind}: names the plugin: {err}");
                let message = err["message"].as_str().unwrap();
                assert!(message.contains(kind), "{kind}: {err}");
                broken += 1;
                continue;
            }
            let version = format!("v{i:04}");
            let bytes = wasm_version(&wasm, at, &version);
            let written = Instant::now();
            if i % 2 == 0 {
                replace_file(&file, &bytes);
            } else {
                // In place, as `cp new.wasm plugin.wasm` does: the debounce waits it out.
                std::fs::write(&file, &bytes).unwrap();
            }
            let seen = load
                .wait_seen(&version, Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("{version} never took effect"));
            latencies.push(seen.saturating_duration_since(written));
            generation += 1;
            builds.extend(reload_duration_of(&gw, generation).await);
            valid.push(version);
        }
        let (requests, failures, seen) = load.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {requests} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        for v in &valid {
            assert!(seen.contains_key(v), "{v} never answered");
        }
        let leaked: Vec<_> = seen.keys().filter(|k| !valid.contains(k)).collect();
        assert!(leaked.is_empty(), "unexpected versions answered: {leaked:?}");
        let counted = failures_counted(&gw).await;
        assert!(counted >= broken, "{counted} failed reloads counted, {broken} broken versions written");
        let (p50, max) = summary(latencies);
        let builds_n = builds.len();
        let (build_p50, build_max) = summary(builds);
        println!(
            "WASM plugin reload under load: {} valid + {broken} broken versions, {requests} requests, 0 failed; write -> first response on the new version: p50 {p50:.0} ms, max {max:.0} ms (debounce 100 ms; the reload itself, compile included: p50 {build_p50:.0} ms, max {build_max:.0} ms, of {} reloads)",
            valid.len() - 1,
            builds_n,
        );
    })
    .await;
}

/// A Lua plugin folder `name` with an `on-request` of `source` and a `[metadata]` table.
fn lua_plugin(dir: &Path, name: &str, metadata: &str, source: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(
        p.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"lua\"\nhooks = [\"on-request\"]\n\
             failure = \"closed\"\n\n[limits]\ndeadline_ms = 250\n\n[metadata]\n{metadata}\n"
        ),
    )
    .unwrap();
    std::fs::write(p.join("plugin.lua"), source).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reordered_chain_is_refused_and_the_old_one_keeps_serving() {
    bounded(async {
        let admin = free_addr();
        let config = |first: &str, second: &str| {
            format!(
                "{}\n[[plugins]]\npath = \"{first}\"\n\n[[plugins]]\npath = \"{second}\"\n",
                mock_config(admin, "ok", "")
            )
        };
        let gw = Managed::start_with(admin, &config("keys", "limits"), |dir| {
            lua_plugin(
                dir,
                "keys",
                "provides = [\"key\"]",
                "function on_request(req) return { set_metadata = { key = \"key_1\" } } end",
            );
            lua_plugin(
                dir,
                "limits",
                "requires = [\"key\"]",
                "function on_request(req)\n\treturn { set_response_headers = { [\"x-seen-key\"] = weir.ctx_get(\"key\") or \"none\" } }\nend",
            );
        })
        .await;
        let ask = || async {
            gw.client
                .post_json("/v1/chat/completions", &chat_body("m", "x"))
                .await
        };
        let r = ask().await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("x-seen-key"), "key_1");
        let generation = gw.status().await["generation"].as_u64().unwrap();

        let before = failures_counted(&gw).await;
        gw.write_config(&config("limits", "keys"));
        let err = wait_failure(&gw, before).await;
        let message = err["message"].as_str().unwrap();
        assert!(
            message.contains(
                "plugin 'limits' requires metadata 'key', which 'keys' provides, but 'keys' runs after it: put 'keys' first"
            ),
            "{err}"
        );
        assert_eq!(err["plugin"], "limits", "{err}");

        // The old chain still serves, in its order.
        for _ in 0..5 {
            let r = ask().await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(r.header("x-seen-key"), "key_1");
        }
        assert_eq!(gw.status().await["generation"].as_u64().unwrap(), generation);

        // Put back in order, the next reload succeeds.
        gw.write_config(&format!("{}\n# fixed\n", config("keys", "limits")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.status().await["generation"].as_u64().unwrap() == generation {
            assert!(Instant::now() < deadline, "the fixed config never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ask().await.header("x-seen-key"), "key_1");
    })
    .await;
}
