//! The side-by-side harness behind `bench/run.sh`.
//!
//! Starts the mock upstream and the load generators pinned to one CPU and each proxy under
//! test (nginx, Weir) pinned to the other, runs every scenario against every target in turn
//! (targets interleaved per scenario, so drift on a shared machine hits them alike), reads
//! each proxy's CPU time and memory from `/proc`, and writes the tables between the
//! `<!-- suite:begin -->` / `<!-- suite:end -->` markers of `BENCHMARKS.md` (the text around
//! them is kept). Raw results go to `--json` as well.
//!
//! Everything listens on 127.0.0.1 and every process started here is killed when the suite
//! ends, on error too. `--only` picks scenarios (`--only reload` runs just the hot-reload
//! ones, in `suite/hot_reload.rs`; `--only redis` the default chain on sled and on Redis, in
//! `suite/shared_state.rs`, whose tables go between `<!-- redis:begin -->` /
//! `<!-- redis:end -->`).

#[path = "suite/hot_reload.rs"]
mod hot_reload;
#[path = "suite/shared_state.rs"]
mod shared_state;

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;
use weir_bench::report::{
    LoadResult, RELOAD_AIM_MS, ReloadLatency, ReloadRss, max, percentile, render_reload_latency,
    render_reload_rss,
};
use weir_bench::{bodies, procfs};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "suite",
    about = "Weir side by side with nginx and the bare mock, one run"
)]
struct Args {
    /// The `weir` binary (a release build).
    #[arg(long, default_value = "target/release/weir")]
    weir: PathBuf,
    /// Directory holding the `mock-upstream` and `load` binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// wrk binary.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// CPU for the mock upstream and the load generator.
    #[arg(long, default_value_t = 0)]
    load_cpu: u32,
    /// CPU for the proxy under test.
    #[arg(long, default_value_t = 1)]
    proxy_cpu: u32,
    /// Concurrent slow streams.
    #[arg(long, default_value_t = 1000)]
    slow_streams: usize,
    /// Delay between chunks of a slow stream, ms.
    #[arg(long, default_value_t = 50)]
    slow_delay_ms: u64,
    /// Chunks per stream.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// A TOML fragment (`[[plugins]]` ...) enabling the default policy chain; appended to
    /// Weir's config. The chain rows are skipped, with the reason, if `weir check` rejects it.
    #[arg(long)]
    chain_config: Option<PathBuf>,
    /// The repository's plugins folder, substituted for `@PLUGINS@` in the chain config.
    #[arg(long, default_value = "plugins")]
    plugins_dir: PathBuf,
    /// Markdown file whose marked section receives the tables.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Raw results as JSON.
    #[arg(long, default_value = "target/weir-bench/results.json")]
    json: PathBuf,
    /// Criterion's output directory; its estimates go into the micro-benchmark section.
    #[arg(long, default_value = "target/criterion")]
    criterion: PathBuf,
    /// A sentence added to the report's method paragraph (how the run was prioritised, ...).
    #[arg(long, default_value = "")]
    note: String,
    /// Only copy criterion's estimates into the micro-benchmark section; run nothing.
    #[arg(long)]
    micro_only: bool,
    /// The command line recorded in the report.
    #[arg(long, default_value = "bench/run.sh")]
    command: String,
    /// Scenarios to run, comma-separated; all when absent. `reload` means both hot-reload
    /// scenarios. The report then holds only the tables of those that ran.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// Hot reloads per Weir target in the memory-over-reloads scenario (RSS is read after
    /// 10, 50 and 100 of them, as far as they go, and after the last).
    #[arg(long, default_value_t = 100)]
    reloads: u32,
    /// Config rewrites timed in the reload-latency scenario with the file watcher at a 50 ms
    /// debounce; a quarter as many (at least 3) at the default debounce and through the admin
    /// API.
    #[arg(long, default_value_t = 20)]
    reload_writes: u32,
    /// The six-plugin fragment of the reload-latency scenario (`@PLUGINS@`, `@RPM@`).
    #[arg(long, default_value = "bench/configs/six-plugins.toml")]
    six_plugins_config: PathBuf,
    /// wasmtime's on-disk cache of compiled plugins (`WEIR_WASM_CACHE`) for every Weir the
    /// suite starts; kept between runs.
    #[arg(long, default_value = "target/weir-bench/wasm-cache")]
    wasm_cache: PathBuf,
    /// `redis-server` binary for the shared-state scenario.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Measured seconds per leg of the shared-state scenario (the default chain at c16 on
    /// sled, then on Redis, and the bare mock).
    #[arg(long, default_value_t = 15.0)]
    state_duration: f64,
}

/// What `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Non-streaming chat at c1, c16, c64.
    Chat,
    /// Streams without delay at c1 and c16.
    Stream,
    /// Many concurrent slow streams.
    Slow,
    /// RSS after start and over 100 hot reloads.
    ReloadRss,
    /// Six-plugin reload: write -> generation -> first answer.
    ReloadLatency,
    /// Both hot-reload scenarios.
    Reload,
    /// The default chain at c16 with state on sled, then on Redis (a `redis-server` the
    /// suite starts).
    Redis,
}

impl Args {
    /// Whether `--only` lets `s` run.
    fn wants(&self, s: Scenario) -> bool {
        self.only.is_empty()
            || self.only.contains(&s)
            || (matches!(s, Scenario::ReloadRss | Scenario::ReloadLatency)
                && self.only.contains(&Scenario::Reload))
    }

    /// Whether any scenario reported between the `suite` markers runs (`--only redis` leaves
    /// those tables as they are).
    fn wants_suite_tables(&self) -> bool {
        [
            Scenario::Chat,
            Scenario::Stream,
            Scenario::Slow,
            Scenario::ReloadRss,
            Scenario::ReloadLatency,
        ]
        .into_iter()
        .any(|s| self.wants(s))
    }

    /// Whether any scenario needs nginx and the long-lived Weir targets.
    fn wants_side_by_side(&self) -> bool {
        [Scenario::Chat, Scenario::Stream, Scenario::Slow]
            .into_iter()
            .any(|s| self.wants(s))
    }
}

const BEGIN: &str = "<!-- suite:begin -->";
const END: &str = "<!-- suite:end -->";
const MICRO_BEGIN: &str = "<!-- micro:begin -->";
const MICRO_END: &str = "<!-- micro:end -->";
const REDIS_BEGIN: &str = "<!-- redis:begin -->";
const REDIS_END: &str = "<!-- redis:end -->";

/// A process started by the suite; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, quoting its log.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited ({status}):\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` pinned to `cpu` with `taskset` (which execs it: the pid is the program's).
fn spawn_pinned(
    name: &str,
    cpu: u32,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &Path)],
    dir: &Path,
) -> anyhow::Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let out = fs::File::create(&log)?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        log,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(p: &mut Proc, port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        p.check_alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not listen on {port} within 20 s", p.name)
}

/// What the scenarios are run against.
struct Target {
    /// Row label.
    label: String,
    /// Base URL without a trailing slash (`http://127.0.0.1:PORT`).
    base: String,
    /// Model for normal requests and for slow streams (Weir routes them to a provider that
    /// asks the mock for slow streams; the others pass the mock's headers through).
    model: &'static str,
    slow_model: &'static str,
    /// Headers the load generator sends for slow streams.
    slow_headers: Vec<String>,
    /// The proxy process, `None` for the bare mock.
    proc: Option<Proc>,
    /// RSS right after start, KiB.
    idle_rss_kib: Option<u64>,
}

impl Target {
    fn pids(&self) -> Vec<u32> {
        self.proc
            .as_ref()
            .map(|p| vec![p.pid()])
            .unwrap_or_default()
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    target: String,
    scenario: &'static str,
    concurrency: usize,
    tool: &'static str,
    result: LoadResult,
    /// Proxy CPU time per completed request, µs.
    proxy_cpu_us: Option<f64>,
    /// Mock CPU time per completed request, µs.
    mock_cpu_us: f64,
    /// Proxy CPU use during the run, percent of one core.
    proxy_cpu_pct: Option<f64>,
    /// Peak proxy RSS sampled during the run, KiB.
    peak_rss_kib: Option<u64>,
}

/// Everything the report needs.
#[derive(Debug, Serialize)]
struct Report {
    date: String,
    commit: String,
    machine: Machine,
    runs: Vec<Run>,
    idle_rss_kib: Vec<(String, u64)>,
    end_rss_kib: Vec<(String, u64)>,
    skipped: Vec<(String, String)>,
    /// RSS over hot reloads, per Weir target.
    reload_rss: Vec<ReloadRss>,
    /// Six-plugin reload series.
    reload_latency: Vec<ReloadLatency>,
    /// Hot-reload scenarios that could not run or failed, with the reason.
    reload_failed: Vec<(String, String)>,
    /// The default chain on sled and on Redis.
    shared_state: Option<shared_state::SharedState>,
}

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    model: String,
    kernel: String,
    load_before: String,
    load_after: String,
}

struct Env {
    args: Args,
    dir: PathBuf,
    mock_pid: u32,
    bodies: PathBuf,
    /// `--wasm-cache`, absolute.
    wasm_cache: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.micro_only {
        let micro = render_micro(&args.criterion).context("no criterion results found")?;
        return write_section(&args.out, MICRO_BEGIN, MICRO_END, &micro);
    }
    let dir = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let result = run(args, &dir);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn run(args: Args, dir: &Path) -> anyhow::Result<()> {
    let load_before = fs::read_to_string("/proc/loadavg")?.trim().to_owned();
    let bodies_dir = dir.join("bodies");
    fs::create_dir_all(&bodies_dir)?;
    for model in ["bench", "bench-slow", "bench-chain", "bench-chain-slow"] {
        fs::write(
            bodies_dir.join(format!("chat-{model}.json")),
            bodies::chat(model, false),
        )?;
        fs::write(
            bodies_dir.join(format!("stream-{model}.json")),
            bodies::chat(model, true),
        )?;
    }

    let mock_port = free_port()?;
    let mock_bin = args.bin_dir.join("mock-upstream");
    let mut mock = spawn_pinned(
        "mock-upstream",
        args.load_cpu,
        &mock_bin,
        &[
            "--listen",
            &format!("127.0.0.1:{mock_port}"),
            "--chunks",
            &args.chunks.to_string(),
        ],
        &[],
        dir,
    )?;
    wait_port(&mut mock, mock_port)?;
    fs::create_dir_all(&args.wasm_cache)?;
    let env = Env {
        mock_pid: mock.pid(),
        bodies: bodies_dir,
        dir: dir.to_owned(),
        wasm_cache: fs::canonicalize(&args.wasm_cache)?,
        args,
    };
    let slow_headers = vec![format!("x-mock-delay-ms: {}", env.args.slow_delay_ms)];

    let mut targets = vec![Target {
        label: "direct (mock)".into(),
        base: format!("http://127.0.0.1:{mock_port}"),
        model: "bench",
        slow_model: "bench-slow",
        slow_headers: slow_headers.clone(),
        proc: None,
        idle_rss_kib: None,
    }];
    let mut skipped = Vec::new();
    if env.args.wants_side_by_side() {
        start_side_by_side(&env, mock_port, &slow_headers, &mut targets, &mut skipped)?;
    }

    let mut runs = Vec::new();
    let d = env.args.duration;
    // Each scenario's runs, or none when `--only` leaves it out.
    let args = &env.args;
    let runs_of = |s| targets.iter().filter(move |_| args.wants(s));
    for c in [1, 16, 64] {
        for t in runs_of(Scenario::Chat) {
            runs.push(measure(&env, t, "chat", c, Tool::Wrk, d)?);
        }
    }
    // Streams: the log-level variant only matters for the plain request path.
    let streamed = |s| runs_of(s).filter(|t| !t.label.contains("log level warn"));
    for c in [1, 16] {
        for t in streamed(Scenario::Stream) {
            runs.push(measure(&env, t, "stream", c, Tool::Load, d)?);
        }
    }
    for t in streamed(Scenario::Slow) {
        // Each slow stream takes about chunks x delay; measure a few generations of them.
        let secs = (env.args.chunks as f64 * env.args.slow_delay_ms as f64 / 1000.0 * 4.0).max(d);
        runs.push(measure(
            &env,
            t,
            "slow",
            env.args.slow_streams,
            Tool::Load,
            secs,
        )?);
    }
    for t in &mut targets {
        if let Some(p) = &mut t.proc {
            p.check_alive()?;
        }
    }
    let end_rss_kib = targets
        .iter()
        .filter_map(|t| {
            Some((
                t.label.clone(),
                procfs::rss_kib(t.proc.as_ref()?.pid()).ok()?,
            ))
        })
        .collect();
    let idle_rss_kib = targets
        .iter()
        .filter_map(|t| Some((t.label.clone(), t.idle_rss_kib?)))
        .collect();
    // The long-lived targets are done: stop them before the hot-reload scenarios start
    // their own gateways on the same CPU.
    targets.retain(|t| t.proc.is_none());

    let mut reload_failed = Vec::new();
    let reload_rss = if env.args.wants(Scenario::ReloadRss) {
        hot_reload::memory(&env, mock_port, &mut reload_failed)
    } else {
        Vec::new()
    };
    let reload_latency = if env.args.wants(Scenario::ReloadLatency) {
        hot_reload::latency(&env, mock_port, &mut reload_failed)
    } else {
        Vec::new()
    };
    let shared_state = env
        .args
        .wants(Scenario::Redis)
        .then(|| shared_state::run(&env, mock_port));

    let report = Report {
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: commit(),
        machine: Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model: cpu_model(),
            kernel: command_output("uname", &["-sr"]),
            load_before,
            load_after: fs::read_to_string("/proc/loadavg")?.trim().to_owned(),
        },
        runs,
        idle_rss_kib,
        end_rss_kib,
        skipped,
        reload_rss,
        reload_latency,
        reload_failed,
        shared_state,
    };
    drop(targets);
    drop(mock);

    if let Some(parent) = env.args.json.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&env.args.json, serde_json::to_string_pretty(&report)?)?;
    if env.args.wants_suite_tables() {
        let tables = render(&report, &env.args);
        write_section(&env.args.out, BEGIN, END, &tables)?;
        println!("{tables}");
    }
    if let Some(micro) = render_micro(&env.args.criterion) {
        write_section(&env.args.out, MICRO_BEGIN, MICRO_END, &micro)?;
    }
    if let Some(state) = &report.shared_state {
        let tables = shared_state::render(state, &env.args, &report.date, &report.commit);
        write_section(&env.args.out, REDIS_BEGIN, REDIS_END, &tables)?;
        println!("{tables}");
    }
    eprintln!(
        "wrote {} and {}",
        env.args.out.display(),
        env.args.json.display()
    );
    let state_failed = report.shared_state.iter().flat_map(|s| &s.failed);
    if let Some((what, why)) = report.reload_failed.iter().chain(state_failed).next() {
        bail!("{what}: {why}");
    }
    Ok(())
}

/// nginx and the long-lived Weir targets of the side-by-side scenarios.
fn start_side_by_side(
    env: &Env,
    mock_port: u16,
    slow_headers: &[String],
    targets: &mut Vec<Target>,
    skipped: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    targets.push(start_nginx(env, mock_port, slow_headers.to_vec())?);
    targets.push(start_weir(
        env,
        mock_port,
        "weir",
        "Weir, no plugins",
        "info",
        None,
    )?);
    targets.push(start_weir(
        env,
        mock_port,
        "weir-quiet",
        "Weir, no plugins, log level warn",
        "warn",
        None,
    )?);
    match &env.args.chain_config {
        Some(path) => match start_weir(
            env,
            mock_port,
            "weir-chain",
            "Weir, default chain",
            "info",
            Some(path),
        ) {
            Ok(t) => targets.push(t),
            Err(e) => skipped.push((
                "Weir, default chain".to_owned(),
                first_line(&format!("{e:#}")),
            )),
        },
        None => skipped.push((
            "Weir, default chain".to_owned(),
            "no chain config given".to_owned(),
        )),
    }

    Ok(())
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

fn start_nginx(env: &Env, mock_port: u16, slow_headers: Vec<String>) -> anyhow::Result<Target> {
    let port = free_port()?;
    let ndir = env.dir.join("nginx");
    fs::create_dir_all(&ndir)?;
    let d = ndir.display();
    // A plain reverse proxy with upstream keep-alive, one worker, no access log, unbuffered
    // (as LLM deployments run it, so streams flow), as the current user.
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let conf_path = ndir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let conf_arg = conf_path.to_string_lossy().into_owned();
    let prefix = format!("{}/", ndir.display());
    let mut p = spawn_pinned(
        "nginx",
        env.args.proxy_cpu,
        &env.args.nginx,
        &["-p", &prefix, "-c", &conf_arg],
        &[],
        &env.dir,
    )?;
    wait_port(&mut p, port)?;
    std::thread::sleep(Duration::from_millis(500));
    let idle = procfs::rss_kib(p.pid()).ok();
    Ok(Target {
        label: "nginx".into(),
        base: format!("http://127.0.0.1:{port}"),
        model: "bench",
        slow_model: "bench-slow",
        slow_headers,
        proc: Some(p),
        idle_rss_kib: idle,
    })
}

fn start_weir(
    env: &Env,
    mock_port: u16,
    name: &str,
    label: &str,
    level: &str,
    chain: Option<&PathBuf>,
) -> anyhow::Result<Target> {
    let port = free_port()?;
    let (model, slow_model) = weir_models(chain.is_some());
    let conf = weir_config(env, port, mock_port, level, chain.map(PathBuf::as_path), "")?;
    let (p, _, idle) = launch_weir(env, name, port, &conf)?;
    Ok(Target {
        label: label.to_owned(),
        base: format!("http://127.0.0.1:{port}"),
        model,
        slow_model,
        slow_headers: Vec::new(),
        proc: Some(p),
        idle_rss_kib: idle,
    })
}

/// The models of a Weir config: normal and slow streams, with or without the chain.
fn weir_models(chain: bool) -> (&'static str, &'static str) {
    if chain {
        ("bench-chain", "bench-chain-slow")
    } else {
        ("bench", "bench-slow")
    }
}

/// A Weir config listening on `port`: log level, the mock providers and the models
/// (`bench`, `bench-slow`, or `bench-chain`, `bench-chain-slow` with a chain), then `extra`
/// (more sections), then the chain fragment with `@PLUGINS@` replaced.
fn weir_config(
    env: &Env,
    port: u16,
    mock_port: u16,
    level: &str,
    chain: Option<&Path>,
    extra: &str,
) -> anyhow::Result<String> {
    let (model, slow_model) = weir_models(chain.is_some());
    let mut conf = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[log]
format = "pretty"
level = "{level}"

[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key = "sk-bench"

[providers.mock-slow]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key = "sk-bench"
headers = {{ "x-mock-delay-ms" = "{delay}" }}

[[models]]
name = "{model}"
targets = [{{ provider = "mock", model = "mock-model" }}]

[[models]]
name = "{slow_model}"
targets = [{{ provider = "mock-slow", model = "mock-model" }}]
"#,
        delay = env.args.slow_delay_ms,
    );
    conf.push_str(extra);
    if let Some(path) = chain {
        conf.push('\n');
        let plugins = fs::canonicalize(&env.args.plugins_dir)
            .unwrap_or_else(|_| env.args.plugins_dir.clone());
        let fragment =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        conf.push_str(&fragment.replace("@PLUGINS@", &plugins.to_string_lossy()));
    }
    Ok(conf)
}

/// Writes `conf` to `<dir>/<name>/weir.toml`, has `weir check` accept it (which also
/// compiles the WASM plugins into the on-disk cache), starts `weir serve` on the proxy CPU
/// and waits for `port`. Returns the process, the config path and the RSS 500 ms after the
/// port opened.
fn launch_weir(
    env: &Env,
    name: &str,
    port: u16,
    conf: &str,
) -> anyhow::Result<(Proc, PathBuf, Option<u64>)> {
    // Each instance in its own folder: state (sled) is kept beside the config by default.
    let conf_dir = env.dir.join(name);
    fs::create_dir_all(&conf_dir)?;
    let conf_path = conf_dir.join("weir.toml");
    fs::write(&conf_path, conf)?;
    let conf_arg = conf_path.to_string_lossy().into_owned();
    let check = Command::new(&env.args.weir)
        .args(["check", "--config", &conf_arg])
        .env("WEIR_WASM_CACHE", &env.wasm_cache)
        .output()?;
    if !check.status.success() {
        bail!(
            "weir check rejected the config: {}{}",
            String::from_utf8_lossy(&check.stderr),
            String::from_utf8_lossy(&check.stdout)
        );
    }
    let listen = format!("127.0.0.1:{port}");
    let mut p = spawn_pinned(
        name,
        env.args.proxy_cpu,
        &env.args.weir,
        &["serve", "--config", &conf_arg, "--listen", &listen],
        &[("WEIR_WASM_CACHE", &env.wasm_cache)],
        &env.dir,
    )?;
    wait_port(&mut p, port)?;
    std::thread::sleep(Duration::from_millis(500));
    let idle = procfs::rss_kib(p.pid()).ok();
    Ok((p, conf_path, idle))
}

#[derive(Debug, Clone, Copy)]
enum Tool {
    Wrk,
    Load,
}

/// What one scenario sends to one target, and with which tool.
struct Plan<'a> {
    env: &'a Env,
    url: String,
    body: PathBuf,
    headers: Vec<String>,
    c: usize,
    tool: Tool,
}

impl<'a> Plan<'a> {
    fn new(env: &'a Env, t: &Target, scenario: &str, c: usize, tool: Tool) -> Self {
        let (body, headers) = match scenario {
            "chat" => (format!("chat-{}.json", t.model), Vec::new()),
            "stream" => (format!("stream-{}.json", t.model), Vec::new()),
            _ => (
                format!("stream-{}.json", t.slow_model),
                t.slow_headers.clone(),
            ),
        };
        Plan {
            env,
            url: format!("{}/v1/chat/completions", t.base),
            body: env.bodies.join(body),
            headers,
            c,
            tool,
        }
    }

    /// Sends load for `secs`.
    fn send(&self, secs: f64) -> anyhow::Result<LoadResult> {
        match self.tool {
            Tool::Wrk => wrk(self.env, &self.url, &self.body, self.c, secs),
            Tool::Load => load(self.env, &self.url, &self.body, &self.headers, self.c, secs),
        }
    }

    /// The unmeasured warm-up (`--warmup` seconds), if any.
    fn warm_up(&self) -> anyhow::Result<()> {
        if self.env.args.warmup > 0.0 {
            self.send(self.env.args.warmup)?;
        }
        Ok(())
    }
}

/// Runs one scenario against one target: an unmeasured warm-up, then [`measured`].
fn measure(
    env: &Env,
    t: &Target,
    scenario: &'static str,
    c: usize,
    tool: Tool,
    secs: f64,
) -> anyhow::Result<Run> {
    let plan = Plan::new(env, t, scenario, c, tool);
    eprintln!("{:<36} {scenario:<6} c={c:<5} ...", t.label);
    plan.warm_up()?;
    measured(&plan, t, scenario, secs)
}

/// The measured run of `plan` against `t`, with CPU time read from `/proc` before and after,
/// and RSS sampled during it.
fn measured(plan: &Plan<'_>, t: &Target, scenario: &'static str, secs: f64) -> anyhow::Result<Run> {
    let (env, c) = (plan.env, plan.c);
    let pids = t.pids();
    let cpu0 = procfs::cpu_micros_all(&pids)?;
    let mock0 = procfs::cpu_micros(env.mock_pid)?;
    let sampler = RssSampler::start(pids.first().copied());
    let started = Instant::now();
    let result = plan.send(secs)?;
    let wall = started.elapsed().as_secs_f64();
    let peak = sampler.stop();
    let cpu = procfs::cpu_micros_all(&pids)?.saturating_sub(cpu0);
    let mock_cpu = procfs::cpu_micros(env.mock_pid)?.saturating_sub(mock0);
    let per = |us: u64| {
        if result.completed == 0 {
            0.0
        } else {
            us as f64 / result.completed as f64
        }
    };
    let run = Run {
        target: t.label.clone(),
        scenario,
        concurrency: c,
        tool: match plan.tool {
            Tool::Wrk => "wrk",
            Tool::Load => "load",
        },
        proxy_cpu_us: (!pids.is_empty()).then(|| per(cpu)),
        mock_cpu_us: per(mock_cpu),
        proxy_cpu_pct: (!pids.is_empty()).then(|| cpu as f64 / 1e6 / wall * 100.0),
        peak_rss_kib: peak,
        result,
    };
    eprintln!(
        "{:<36} {scenario:<6} c={c:<5} rps={:>9.0} p50={:>8.0}us p99={:>8.0}us ttfb50={:>8.0}us cpu/req={:>6.1}us errors={}",
        t.label,
        run.result.rps,
        run.result.total_p50_us,
        run.result.total_p99_us,
        run.result.ttfb_p50_us.unwrap_or(f64::NAN),
        run.proxy_cpu_us.unwrap_or(f64::NAN),
        run.result.errors
    );
    Ok(run)
}

/// Polls a process's RSS every 20 ms on a thread and keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let handle = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(kib) = procfs::rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        RssSampler { stop, peak, handle }
    }

    fn stop(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take()?;
        let _ = handle.join();
        Some(self.peak.load(Ordering::Relaxed))
    }
}

/// wrk with a Lua script that POSTs the body and prints its figures as JSON.
fn wrk(env: &Env, url: &str, body: &Path, c: usize, secs: f64) -> anyhow::Result<LoadResult> {
    let script = env.dir.join("post.lua");
    if !script.exists() {
        // The body file is the script's argument, so one script serves every run.
        let lua = r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local head, tail
local n = 0
function init(args)
  local body = assert(io.open(args[1], "rb")):read("*a")
  head, tail = body:match("^(.-)@N@(.*)$")
  if not head then head, tail = body, "" end
end
-- A per-request counter in the body: every request is distinct (a cache plugin misses).
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. n .. tail)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\n{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%.1f,"p99":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;
        fs::write(&script, lua)?;
    }
    let secs_arg = format!("{}s", secs.ceil().max(1.0) as u64);
    let out = Command::new("taskset")
        .arg("-c")
        .arg(env.args.load_cpu.to_string())
        .arg(&env.args.wrk)
        .args([
            "-t1",
            &format!("-c{c}"),
            &format!("-d{secs_arg}"),
            "--timeout",
            "10s",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .arg("--")
        .arg(body)
        .output()
        .context("running wrk (is it installed? bench/run.sh installs it)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON line from wrk")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let seconds = n("duration_us") / 1e6;
    let errors = (n("connect") + n("read") + n("write") + n("status") + n("timeout")) as u64;
    Ok(LoadResult {
        requests: n("requests") as u64,
        completed: n("requests") as u64,
        errors,
        first_error: (errors > 0).then(|| format!("wrk errors: {line}")),
        seconds,
        rps: if seconds > 0.0 {
            n("requests") / seconds
        } else {
            0.0
        },
        total_p50_us: n("p50"),
        total_p99_us: n("p99"),
        ttfb_p50_us: None,
        ttfb_p99_us: None,
        frames_per_response: None,
    })
}

/// This crate's `load` generator.
fn load(
    env: &Env,
    url: &str,
    body: &Path,
    headers: &[String],
    c: usize,
    secs: f64,
) -> anyhow::Result<LoadResult> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(env.args.load_cpu.to_string())
        .arg(env.args.bin_dir.join("load"))
        .args([
            "--url",
            url,
            "--concurrency",
            &c.to_string(),
            "--duration",
            &secs.to_string(),
        ])
        .arg("--body")
        .arg(body);
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().context("running load")?;
    if !out.status.success() {
        bail!("load failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn commit() -> String {
    let head = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{head} (working tree has uncommitted changes)")
    } else {
        head
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Replaces the text between `begin` and `end` in `path` (appending both if absent).
fn write_section(path: &Path, begin: &str, end: &str, body: &str) -> anyhow::Result<()> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => format!("{}{begin}\n{body}\n{}", &old[..b], &old[e..]),
        _ => format!("{old}\n{begin}\n{body}\n{end}\n"),
    };
    fs::write(path, new)?;
    Ok(())
}

fn find<'a>(r: &'a Report, target: &str, scenario: &str, c: usize) -> Option<&'a Run> {
    r.runs
        .iter()
        .find(|x| x.target == target && x.scenario == scenario && x.concurrency == c)
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn opt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The markdown tables.
fn render(r: &Report, args: &Args) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Generated by `{}` on {} at commit `{}`.\n",
        args.command, r.date, r.commit
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {}, {}; load average before `{}`, after `{}`.\n",
        m.nproc, m.model, m.kernel, m.load_before, m.load_after
    );
    let _ = writeln!(
        s,
        "Pinning: the mock upstream and the load generator (wrk for plain requests, `weir-bench`'s \
         `load` for streams) share CPU {}; the proxy under test (nginx or Weir) runs alone on CPU {} \
         (`taskset`). Each run: {:.0} s warm-up, then {:.0} s measured. CPU time per request = \
         (utime+stime from `/proc/<pid>/stat`, after - before) / requests completed; 10 ms tick \
         resolution. Every request carries a unique counter in its system message (a cache plugin always misses). \
         All traffic on 127.0.0.1. {}\n",
        args.load_cpu, args.proxy_cpu, args.warmup, args.duration, args.note
    );

    // Headline ratios against the issue's targets.
    let weir = "Weir, no plugins";
    let direct = "direct (mock)";
    let _ = writeln!(s, "### Against the targets\n");
    let _ = writeln!(s, "| Figure | Measured | Target | Met |\n|---|---|---|---|");
    let mut row = |name: &str, measured: String, target: String, met: Option<bool>| {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(s, "| {name} | {measured} | {target} | {met} |");
    };
    let get = |t: &str, sc: &str, c: usize| find(r, t, sc, c);
    if let (Some(w), Some(n)) = (get(weir, "chat", 16), get("nginx", "chat", 16)) {
        let ratio = w.result.rps / n.result.rps;
        row(
            "Weir RPS / nginx RPS, c16",
            format!("{:.2}x ({:.0} / {:.0})", ratio, w.result.rps, n.result.rps),
            ">= 0.70x".into(),
            Some(ratio >= 0.7),
        );
        let cpu = w.proxy_cpu_us.unwrap_or(f64::NAN);
        row(
            "Weir CPU per request, c16",
            format!(
                "{cpu:.1} µs (nginx {:.1} µs)",
                n.proxy_cpu_us.unwrap_or(f64::NAN)
            ),
            "<= 25 µs".into(),
            Some(cpu <= 25.0),
        );
    }
    if let (Some(w), Some(n), Some(d)) = (
        get(weir, "chat", 1),
        get("nginx", "chat", 1),
        get(direct, "chat", 1),
    ) {
        let wa = w.result.total_p50_us - d.result.total_p50_us;
        let na = n.result.total_p50_us - d.result.total_p50_us;
        row(
            "Added p50 latency, c1 (p50 - direct p50)",
            format!("Weir {wa:.0} µs, nginx {na:.0} µs"),
            format!("<= nginx + 50 = {:.0} µs", na + 50.0),
            Some(wa <= na + 50.0),
        );
    }
    for c in [1, 16] {
        if let (Some(w), Some(n), Some(d)) = (
            get(weir, "stream", c),
            get("nginx", "stream", c),
            get(direct, "stream", c),
        ) {
            let f = |x: &Run| x.result.ttfb_p50_us.unwrap_or(f64::NAN);
            let (wa, na) = (f(w) - f(d), f(n) - f(d));
            row(
                &format!("Added stream first byte p50, c{c}"),
                format!("Weir {wa:.0} µs, nginx {na:.0} µs"),
                format!("<= nginx + 100 = {:.0} µs", na + 100.0),
                Some(wa <= na + 100.0),
            );
        }
    }
    if let Some((_, kib)) = r.idle_rss_kib.iter().find(|(t, _)| t == weir) {
        row(
            "Weir idle RSS after start",
            mib(*kib),
            "<= 30 MiB".into(),
            Some(*kib <= 30 * 1024),
        );
    }
    if let Some(w) = r
        .runs
        .iter()
        .find(|x| x.target == weir && x.scenario == "slow")
    {
        let peak = w.peak_rss_kib.unwrap_or(0);
        row(
            &format!("Weir peak RSS, {} concurrent slow streams", w.concurrency),
            format!("{} ({} errors)", mib(peak), w.result.errors),
            "<= 150 MiB, no errors".into(),
            Some(peak <= 150 * 1024 && w.result.errors == 0),
        );
        let expected =
            (args.chunks.saturating_sub(1) * args.slow_delay_ms as usize) as f64 * 1000.0;
        row(
            "Slow streams not batched or delayed (body frames per stream; total p99 vs paced time)",
            format!(
                "{:.1} frames for {} chunks; total p99 {} vs {}",
                w.result.frames_per_response.unwrap_or(0.0),
                args.chunks,
                us(w.result.total_p99_us),
                us(expected)
            ),
            "one frame per chunk; no added delay".into(),
            None,
        );
    }
    if let Some((t, why)) = r.skipped.first() {
        row(
            &format!("{t}: CPU per request, RPS ratio, added p50"),
            format!("not yet measured: {why}"),
            "<= 50 µs; >= 0.5x nginx; <= nginx + 100 µs".into(),
            None,
        );
    } else if let (Some(ch), Some(w)) = (
        get("Weir, default chain", "chat", 16),
        get(weir, "chat", 16),
    ) {
        row(
            "Default chain vs no plugins, CPU per request c16",
            format!(
                "{:.1} µs vs {:.1} µs",
                ch.proxy_cpu_us.unwrap_or(f64::NAN),
                w.proxy_cpu_us.unwrap_or(f64::NAN)
            ),
            "<= 50 µs".into(),
            Some(ch.proxy_cpu_us.unwrap_or(f64::MAX) <= 50.0),
        );
    }
    for x in &r.reload_rss {
        let growth = x.growth_after_first_kib().unwrap_or(i64::MAX);
        let first = x.checkpoints.first().map_or(0, |&(n, _)| n);
        let last = x.checkpoints.last().map_or(0, |&(n, _)| n);
        row(
            &format!("{}: RSS flat over {last} hot reloads", x.target),
            format!(
                "{:+.1} MiB from reload {first} to {last} ({} after start, {} after {last})",
                growth as f64 / 1024.0,
                mib(x.idle_kib),
                x.last_kib().map_or_else(|| "-".into(), mib),
            ),
            format!(
                "flat: <= +{} MiB from reload {first} to {last}",
                hot_reload::FLAT_KIB / 1024
            ),
            Some(growth <= hot_reload::FLAT_KIB && x.failures == 0),
        );
    }
    if let Some(x) = r.reload_latency.first() {
        let p50 = percentile(&x.to_answer_ms, 50.0);
        let worst = max(&x.to_answer_ms);
        row(
            &format!(
                "Six-plugin reload, write -> first answer of the new version ({})",
                x.trigger
            ),
            format!(
                "p50 {p50:.0} ms, max {worst:.0} ms ({} reloads, {} of {} requests failed)",
                x.to_answer_ms.len(),
                x.failures,
                x.requests
            ),
            format!("<= {RELOAD_AIM_MS:.0} ms, no failed request"),
            Some(worst <= RELOAD_AIM_MS && x.failures == 0),
        );
    }
    for (what, why) in &r.reload_failed {
        row(what, format!("failed: {why}"), "-".into(), None);
    }

    let ran = |sc: &str| r.runs.iter().any(|x| x.scenario == sc);
    if ran("chat") {
        let _ = writeln!(s, "\n### Non-streaming chat, ~1 KB prompt (wrk)\n");
        let _ = writeln!(
            s,
            "| Target | Concurrency | RPS | p50 | p99 | Proxy CPU / req (µs) | Mock CPU / req (µs) | Errors |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
    }
    for x in r.runs.iter().filter(|x| x.scenario == "chat") {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {:.1} | {} |",
            x.target,
            x.concurrency,
            x.result.rps,
            us(x.result.total_p50_us),
            us(x.result.total_p99_us),
            opt_us(x.proxy_cpu_us),
            x.mock_cpu_us,
            x.result.errors
        );
    }
    for (label, sc) in [
        (
            format!("Streaming chat, {} chunks, no delay (`load`)", args.chunks),
            "stream",
        ),
        (
            format!(
                "{} concurrent slow streams, {} chunks {} ms apart (`load`)",
                args.slow_streams, args.chunks, args.slow_delay_ms
            ),
            "slow",
        ),
    ] {
        if !ran(sc) {
            continue;
        }
        let _ = writeln!(s, "\n### {label}\n");
        let _ = writeln!(
            s,
            "| Target | Concurrency | Streams/s | First byte p50 | First byte p99 | Total p50 | Total p99 | Body frames / stream | Proxy CPU / stream (µs) | Proxy CPU % | Peak RSS | Errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for x in r.runs.iter().filter(|x| x.scenario == sc) {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
                x.target,
                x.concurrency,
                x.result.rps,
                us(x.result.ttfb_p50_us.unwrap_or(f64::NAN)),
                us(x.result.ttfb_p99_us.unwrap_or(f64::NAN)),
                us(x.result.total_p50_us),
                us(x.result.total_p99_us),
                x.result.frames_per_response.unwrap_or(0.0),
                opt_us(x.proxy_cpu_us),
                x.proxy_cpu_pct
                    .map_or_else(|| "-".into(), |p| format!("{p:.0}%")),
                x.peak_rss_kib.map_or_else(|| "-".into(), mib),
                x.result.errors
            );
        }
    }
    if !r.idle_rss_kib.is_empty() {
        let _ = writeln!(s, "\n### Memory\n");
        let _ = writeln!(
            s,
            "| Target | RSS after start | RSS at the end of the run |\n|---|---:|---:|"
        );
    }
    for (t, idle) in &r.idle_rss_kib {
        let end = r
            .end_rss_kib
            .iter()
            .find(|(x, _)| x == t)
            .map_or_else(|| "-".into(), |(_, k)| mib(*k));
        let _ = writeln!(s, "| {t} | {} | {end} |", mib(*idle));
    }
    for (t, why) in &r.skipped {
        let _ = writeln!(s, "\n**{t}: not yet measured** ({why}).");
    }
    if !r.reload_rss.is_empty() {
        let _ = writeln!(s, "\n### Memory over hot reloads\n");
        s.push_str(&render_reload_rss(
            &r.reload_rss,
            &hot_reload::memory_note(args),
        ));
    }
    if !r.reload_latency.is_empty() {
        let _ = writeln!(s, "\n### Hot reload: six plugins, write to live\n");
        s.push_str(&render_reload_latency(
            &r.reload_latency,
            &hot_reload::latency_note(args, &r.reload_latency),
        ));
    }
    for (what, why) in &r.reload_failed {
        let _ = writeln!(s, "\n**{what}: failed** ({why}).");
    }
    let errors: Vec<_> = r
        .runs
        .iter()
        .filter_map(|x| Some((x, x.result.first_error.as_ref()?)))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\nFirst errors seen:\n");
        for (x, e) in errors {
            let _ = writeln!(
                s,
                "- {} {} c{}: {}",
                x.target,
                x.scenario,
                x.concurrency,
                first_line(e)
            );
        }
    }
    s
}

/// Criterion's mean estimates, one row per benchmark, if criterion has run.
fn render_micro(dir: &Path) -> Option<String> {
    let mut rows = Vec::new();
    collect_estimates(dir, dir, &mut rows);
    if rows.is_empty() {
        return None;
    }
    rows.sort();
    let mut s = String::from(
        "Criterion (`cargo bench -p weir-bench`, pinned to CPU 1), mean and 95% confidence \
         interval; throughput where the input size is fixed.\n\n| Benchmark | Time |\n|---|---:|\n",
    );
    for (name, text) in rows {
        let _ = writeln!(s, "| {name} | {text} |");
    }
    Some(s)
}

fn collect_estimates(root: &Path, dir: &Path, rows: &mut Vec<(String, String)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if p.file_name().is_some_and(|n| n == "new") {
            let est = p.join("estimates.json");
            let bench = p.join("benchmark.json");
            let (Ok(est), Ok(bench)) = (fs::read_to_string(est), fs::read_to_string(bench)) else {
                continue;
            };
            let (Ok(est), Ok(bench)) = (
                serde_json::from_str::<serde_json::Value>(&est),
                serde_json::from_str::<serde_json::Value>(&bench),
            ) else {
                continue;
            };
            let name = bench["full_id"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    p.parent()
                        .and_then(|q| q.strip_prefix(root).ok())
                        .map(|q| q.display().to_string())
                        .unwrap_or_default()
                });
            let mean = &est["mean"];
            let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
            let text = format!(
                "{} [{} .. {}]",
                ns(f(&mean["point_estimate"])),
                ns(f(&mean["confidence_interval"]["lower_bound"])),
                ns(f(&mean["confidence_interval"]["upper_bound"]))
            );
            let thr = bench["throughput"]["Bytes"].as_f64().map(|b| {
                let gbs = b / f(&mean["point_estimate"]);
                format!(" ({gbs:.2} GB/s)")
            });
            rows.push((name, text + &thr.unwrap_or_default()));
        } else {
            collect_estimates(root, &p, rows);
        }
    }
}

fn ns(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.2} ms", v / 1e6)
    } else if v >= 1_000.0 {
        format!("{:.2} µs", v / 1e3)
    } else {
        format!("{v:.1} ns")
    }
}
