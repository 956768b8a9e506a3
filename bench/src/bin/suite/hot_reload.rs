//! The suite's hot-reload scenarios (issue 4's aims, issue 6's "RSS after 100 hot reloads"):
//! Weir gateways of their own with the admin API on, started after the side-by-side runs on
//! the same proxy CPU, so that their memory starts fresh. The measuring itself is in
//! `weir_bench::reload`; this file starts the gateways, writes their configs and describes
//! the setup for the report.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use weir_bench::reload::{self, Gateway, Traffic, Trigger};
use weir_bench::report::{ReloadLatency, ReloadRss};

use super::{Args, Env, Proc, first_line, free_port, launch_weir, wait_port, weir_config};

/// The admin token of every gateway started here (loopback only; 16+ characters).
const TOKEN: &str = "weir-bench-admin-token-not-a-secret";

/// `[reload] debounce_ms` of the measured watcher reloads.
pub const DEBOUNCE_MS: u64 = 50;

/// Weir's default `[reload] debounce_ms` (core/src/config/file.rs).
pub const DEFAULT_DEBOUNCE_MS: u64 = 100;

/// Chat requests sent after each reload of the memory scenario.
pub const REQUESTS_BETWEEN: u32 = 20;

/// Background load of the latency scenario: keep-alive connections ...
pub const CONNECTIONS: usize = 2;
/// ... each sending its next request this long after an answer.
pub const PAUSE: Duration = Duration::from_millis(2);

/// Time between one reload being live and the next write: some traffic on every version,
/// and the watcher's quiet period long over.
const SETTLE: Duration = Duration::from_millis(300);

/// The per-model request limit of version 0 of `six-plugins.toml`; version `v` has
/// `RPM_BASE + v`, and answers carry it in [`MARKER`].
const RPM_BASE: u64 = 1_000_000_000;
/// The answer header carrying the per-model request limit (the rate-limit plugin's).
const MARKER: &str = "x-ratelimit-limit-requests";

/// The `[admin]` and `[reload]` sections of a gateway started here. The request log stays
/// off: it would add a state-store write per request that the other rows do not pay.
fn admin_section(admin_port: u16, debounce_ms: &str) -> String {
    format!(
        "\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\nrequest_log_max_records = 0\n\n[reload]\ndebounce_ms = {debounce_ms}\n"
    )
}

/// A gateway started for one scenario; stopped when dropped.
struct Started {
    proc: Proc,
    gw: Gateway,
    idle_kib: u64,
}

/// Two distinct free ports: the API and the admin listener.
fn two_ports() -> anyhow::Result<(u16, u16)> {
    let api = free_port()?;
    loop {
        let admin = free_port()?;
        if admin != api {
            return Ok((api, admin));
        }
    }
}

/// Starts Weir with `conf` (which must contain [`admin_section`] for `admin_port`) and waits
/// for both listeners.
fn start(
    env: &Env,
    name: &str,
    (port, admin_port): (u16, u16),
    conf: &str,
    model: &str,
) -> anyhow::Result<Started> {
    let (mut proc, config, idle) = launch_weir(env, name, port, conf)?;
    wait_port(&mut proc, admin_port)?;
    let gw = Gateway {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        token: TOKEN.to_owned(),
        pid: proc.pid(),
        config,
        model: model.to_owned(),
    };
    Ok(Started {
        proc,
        gw,
        idle_kib: idle.unwrap_or(0),
    })
}

/// Runs `f` against `s`; when it fails, says so with the gateway's log if it has exited.
fn guarded<T>(s: &mut Started, f: impl FnOnce(&Started) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let result = f(s);
    if result.is_err() {
        s.proc.check_alive()?;
    }
    result
}

/// RSS after start and over `--reloads` hot reloads, for Weir with no plugins and with the
/// default chain. Failures are added to `failed` and the other target still runs.
pub fn memory(env: &Env, mock_port: u16, failed: &mut Vec<(String, String)>) -> Vec<ReloadRss> {
    let mut out = Vec::new();
    let targets = [
        ("weir-reload", "Weir, no plugins", None, "bench"),
        (
            "weir-chain-reload",
            "Weir, default chain",
            env.args.chain_config.as_deref(),
            "bench-chain",
        ),
    ];
    for (name, label, chain, model) in targets {
        if label.contains("chain") && chain.is_none() {
            continue;
        }
        eprintln!("{label:<36} {} hot reloads ...", env.args.reloads);
        match memory_of(env, mock_port, name, label, chain, model) {
            Ok(r) => {
                eprintln!(
                    "{label:<36} RSS start {} KiB, after {:?} (reloads, KiB); {} generations; {} requests, {} failed",
                    r.idle_kib, r.checkpoints, r.generations, r.requests, r.failures
                );
                out.push(r);
            }
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!("{label}: hot reloads failed: {why}");
                failed.push((format!("{label}, RSS over hot reloads"), first_line(&why)));
            }
        }
    }
    out
}

fn memory_of(
    env: &Env,
    mock_port: u16,
    name: &str,
    label: &str,
    chain: Option<&Path>,
    model: &str,
) -> anyhow::Result<ReloadRss> {
    let ports = two_ports()?;
    let admin = admin_section(ports.1, &DEFAULT_DEBOUNCE_MS.to_string());
    let conf = weir_config(env, ports.0, mock_port, "info", chain, &admin)?;
    let mut s = start(env, name, ports, &conf, model)?;
    // A comment with a counter: new content, so every reload builds a new snapshot.
    let render = |i: u32| format!("{conf}\n# bench: hot reload {i}\n");
    let n = env.args.reloads.max(1);
    let mut points: Vec<u32> = [10, 50, 100].into_iter().filter(|&p| p < n).collect();
    points.push(n);
    guarded(&mut s, |s| {
        reload::rss_over_reloads(
            label,
            &s.gw,
            s.idle_kib,
            &render,
            n,
            &points,
            REQUESTS_BETWEEN,
        )
    })
}

/// The six-plugin reload series: the watcher at [`DEBOUNCE_MS`] (`--reload-writes`
/// writes), the watcher at Weir's default debounce, and `POST /admin/reload` (a quarter as
/// many, at least 3, each). A failure is added to `failed`.
pub fn latency(
    env: &Env,
    mock_port: u16,
    failed: &mut Vec<(String, String)>,
) -> Vec<ReloadLatency> {
    let label = "Weir, six plugins";
    eprintln!(
        "{label:<36} {} config rewrites under load ...",
        env.args.reload_writes
    );
    match latency_series(env, mock_port) {
        Ok(v) => {
            for x in &v {
                eprintln!(
                    "{label:<36} {}: write -> generation {:?} ms; -> first new answer {:?} ms; build {:?} ms; {} requests, {} failed",
                    x.trigger,
                    x.to_generation_ms
                        .iter()
                        .map(|v| v.round())
                        .collect::<Vec<_>>(),
                    x.to_answer_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
                    x.build_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
                    x.requests,
                    x.failures
                );
            }
            v
        }
        Err(e) => {
            let why = format!("{e:#}");
            eprintln!("{label}: reload latency failed: {why}");
            failed.push((format!("{label}, reload latency"), first_line(&why)));
            Vec::new()
        }
    }
}

fn latency_series(env: &Env, mock_port: u16) -> anyhow::Result<Vec<ReloadLatency>> {
    let ports = two_ports()?;
    let admin = admin_section(ports.1, "@DEBOUNCE@");
    let conf = weir_config(
        env,
        ports.0,
        mock_port,
        "info",
        Some(&env.args.six_plugins_config),
        &admin,
    )?;
    let render = |v: u32, debounce_ms: u64| {
        conf.replace("@RPM@", &(RPM_BASE + u64::from(v)).to_string())
            .replace("@DEBOUNCE@", &debounce_ms.to_string())
    };
    let marker = |v: u32| (RPM_BASE + u64::from(v)).to_string();
    let mut s = start(
        env,
        "weir-six-reload",
        ports,
        &render(0, DEBOUNCE_MS),
        "bench-chain",
    )?;
    let writes = env.args.reload_writes.max(1);
    let few = (writes / 4).max(3);
    guarded(&mut s, |s| {
        let traffic = Traffic::start(&s.gw, MARKER, CONNECTIONS, PAUSE);
        traffic.wait_seen(&marker(0)).with_context(|| {
            format!(
                "no answer from version 0 within {:?}: {:?}",
                reload::WAIT,
                traffic.first_failure()
            )
        })?;
        let mut version = 0;
        let mut next = |n: u32| {
            let r = version + 1..=version + n;
            version += n;
            r
        };
        let mut out = vec![reload::reload_latency(
            &format!("file watcher, debounce {DEBOUNCE_MS} ms"),
            &s.gw,
            &traffic,
            &|v| render(v, DEBOUNCE_MS),
            &marker,
            next(writes),
            Trigger::Watch {
                debounce_ms: DEBOUNCE_MS,
            },
            SETTLE,
        )?];
        // Switch to the default debounce (itself a reload, not measured).
        let switch = *next(1).start();
        let mut admin = s.gw.admin();
        let expected = admin.generation()? + 1;
        reload::replace_file(&s.gw.config, render(switch, DEFAULT_DEBOUNCE_MS).as_bytes())?;
        admin.wait_generation(expected, Duration::from_millis(5))?;
        out.push(reload::reload_latency(
            &format!("file watcher, debounce {DEFAULT_DEBOUNCE_MS} ms (Weir's default)"),
            &s.gw,
            &traffic,
            &|v| render(v, DEFAULT_DEBOUNCE_MS),
            &marker,
            next(few),
            Trigger::Watch {
                debounce_ms: DEFAULT_DEBOUNCE_MS,
            },
            SETTLE,
        )?);
        out.push(reload::reload_latency(
            "write, then `POST /admin/reload`",
            &s.gw,
            &traffic,
            &|v| render(v, DEFAULT_DEBOUNCE_MS),
            &marker,
            next(few),
            Trigger::Admin,
            SETTLE,
        )?);
        Ok(out)
    })
}

/// What the "Hot reload" table measured, for the paragraph above it.
pub fn latency_note(args: &Args, series: &[ReloadLatency]) -> String {
    let (requests, seconds) = series
        .iter()
        .fold((0, 0.0), |(r, s), x| (r + x.requests, s + x.seconds));
    let rate = if seconds > 0.0 {
        requests as f64 / seconds
    } else {
        0.0
    };
    format!(
        "Weir with six plugins (`bench/configs/six-plugins.toml`: auth and redaction in WASM; \
         rate-limit, cache, routing and budget in Lua), alone on CPU {cpu}, admin API on \
         (request log off). Steady light load from the suite itself (not pinned): \
         {CONNECTIONS} keep-alive connections, each sending its next ~1 KB chat request \
         {pause} ms after an answer, about {rate:.0} requests/s, every one a cache miss. Each \
         write replaces `weir.toml` as editors save (a temporary file renamed over it) with a \
         new per-model rate limit, which every answer carries in `{MARKER}`; any change \
         rebuilds the whole pipeline, all six plugins. *Write -> generation*: until \
         `GET /admin/status` (polled every 2 ms) reports the new generation. *Write -> first \
         new answer*: until the first response carrying the new limit (resolution about one \
         request). *Gateway build*: Weir's own `reload.last.duration_ms` (read and hash every \
         input, parse, build the snapshot with its plugins, swap, record the generation). \
         Compiled artifacts cached: `weir check` fills wasmtime's on-disk cache \
         (`WEIR_WASM_CACHE={cache}`) before the gateway starts, and Weir keeps compiled \
         components in memory by content hash, so no reload compiles WASM; the Lua plugins \
         are loaded again on every reload. The measured watcher runs with \
         `[reload] debounce_ms = {DEBOUNCE_MS}`: the quiet period after the last file event is \
         part of write-to-live time, so Weir's default of {DEFAULT_DEBOUNCE_MS} ms adds \
         {extra} ms to every watcher-triggered reload (second row). The last row skips the \
         watcher: the write, then `POST /admin/reload`, which answers after the swap.",
        cpu = args.proxy_cpu,
        pause = PAUSE.as_millis(),
        cache = args.wasm_cache.display(),
        extra = DEFAULT_DEBOUNCE_MS - DEBOUNCE_MS,
    )
}

/// What the "Memory over hot reloads" table measured.
pub fn memory_note(args: &Args) -> String {
    format!(
        "Fresh gateways (not the long-lived ones above), alone on CPU {cpu}, admin API on \
         (request log off). Each reload: `weir.toml` rewritten with a new comment line (new \
         content, so a new snapshot is built: Weir skips reloads whose inputs hash the same), \
         then `POST /admin/reload`, checked to have produced the next generation, then \
         {REQUESTS_BETWEEN} chat requests (cache misses); RSS (`VmRSS`) is read after them. \
         Weir keeps the serving generation and the 5 before it (`[reload] keep_generations`), \
         so RSS should stop growing after a handful of reloads: *flat* means at most 5 MiB of \
         growth between reload 10 and reload {n}.",
        cpu = args.proxy_cpu,
        n = args.reloads,
    )
}

/// Most RSS growth from the first checkpoint to the last that still counts as flat, KiB.
pub const FLAT_KIB: i64 = 5 * 1024;
