//! The soak scenario (issue 15): a bounded run of mixed load through the default chain plus
//! budget, with upstream faults, hot reloads of the config and of a plugin, and one `kill -9`
//! of Weir and a restart mid-run.
//!
//! ```sh
//! target/release/soak --weir target/release/weir --duration 150   # or: bench/run.sh --soak
//! ```
//!
//! Every request is classified by what it asked for:
//! - `soak` and `soak-slow` (healthy upstream, JSON and streams): must answer 200 with a
//!   complete body (a stream ends with `[DONE]`), else it is an **unexpected failure**, except
//!   when the request was in flight while Weir was down (killed, not yet listening again):
//!   then it is **lost to the kill**;
//! - `soak-500` and `soak-429` (the upstream answers that status): expected to fail with a 5xx
//!   or a 429 (a 200 is unexpected);
//! - `soak-trunc` (the upstream cuts its answer short): expected, however it surfaces (a 502, an
//!   error event, or today a stream Weir closes itself), unless the client timed out.
//!
//! State: every request carries one virtual key; the budget plugin counts its requests. The
//! count is read through the admin API just before the kill and again after the restart; the
//! difference is state lost, compared with the documented window (`[state]
//! flush_interval_ms` plus sled's 500 ms fsync).

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use weir_bench::http::Client;
use weir_bench::{procfs, reload::replace_file};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "Weir under faults, reloads and a kill -9, for a bounded time"
)]
struct Args {
    /// The `weir` binary.
    #[arg(long, default_value = "target/release/weir")]
    weir: PathBuf,
    /// Directory holding `mock-upstream`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The repository's plugins folder.
    #[arg(long, default_value = "plugins")]
    plugins_dir: PathBuf,
    /// The default chain fragment (`@PLUGINS@` is replaced); budget is appended to it.
    #[arg(long, default_value = "bench/configs/default-chain.toml")]
    chain_config: PathBuf,
    /// Total seconds.
    #[arg(long, default_value_t = 150.0)]
    duration: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds between hot reloads (the config and a Lua plugin, rewritten in turn).
    #[arg(long, default_value_t = 5.0)]
    reload_every: f64,
    /// When to `kill -9` Weir, as a fraction of the run.
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// `[state] flush_interval_ms` of the gateway.
    #[arg(long, default_value_t = 100)]
    flush_ms: u64,
    /// Markdown file whose `<!-- soak:begin -->` section receives the report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The command recorded in the report.
    #[arg(long, default_value = "bench/run.sh --soak")]
    command: String,
}

const TOKEN: &str = "weir-soak-admin-token-not-a-secret";
const BEGIN: &str = "<!-- soak:begin -->";
const END: &str = "<!-- soak:end -->";

/// What one request asked for, with its share of the load (out of 20).
const MIX: &[(&str, bool, u32)] = &[
    ("soak", false, 5),
    ("soak", true, 5),
    ("soak-slow", true, 3),
    ("soak-500", false, 1),
    ("soak-500", true, 1),
    ("soak-429", false, 1),
    ("soak-trunc", false, 2),
    ("soak-trunc", true, 2),
];

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    expected_fault: u64,
    lost_to_kill: u64,
    unexpected: u64,
    first_unexpected: Vec<String>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, secs: u64) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {port} after {secs} s")
}

fn spawn(program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc(child))
}

fn config(
    args: &Args,
    port: u16,
    admin: u16,
    mock: u16,
    plugins: &Path,
    version: u64,
) -> anyhow::Result<String> {
    let mut c = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[log]\nlevel = \"warn\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\nrequest_log_max_records = 0\n\n[state]\nflush_interval_ms = {}\n\n",
        args.flush_ms
    );
    for (name, header) in [
        ("soak", ""),
        ("soak-slow", "\"x-mock-delay-ms\" = \"20\""),
        ("soak-500", "\"x-mock-fault\" = \"500\""),
        ("soak-429", "\"x-mock-fault\" = \"429\""),
        ("soak-trunc", "\"x-mock-fault\" = \"truncate\""),
    ] {
        writeln!(
            c,
            "[providers.{name}]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{mock}/v1\"\napi_key = \"sk\"\nheaders = {{ {header} }}\n\n[[models]]\nname = \"{name}\"\ntargets = [{{ provider = \"{name}\", model = \"mock-model\" }}]\n"
        )?;
    }
    let chain = fs::read_to_string(&args.chain_config)
        .with_context(|| format!("reading {}", args.chain_config.display()))?;
    // Version `v` of the config differs in the rate limit (both far above the load), so that
    // every rewrite is a real reload. The cache plugin is a copy the run rewrites.
    let chain = chain
        .replace(
            "rpm = 100000000,",
            &format!("rpm = {},", 100_000_000 + version),
        )
        .replace("@PLUGINS@/cache", &plugins.join("cache").to_string_lossy())
        .replace(
            "@PLUGINS@",
            &fs::canonicalize(&args.plugins_dir)?.to_string_lossy(),
        );
    c.push_str(&chain);
    let budget = fs::canonicalize(args.plugins_dir.join("budget"))?;
    writeln!(c, "\n[[plugins]]\npath = \"{}\"\n", budget.display())?;
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("weir-soak-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let result = run(&args, &dir);
    let _ = fs::remove_dir_all(&dir);
    let report = result?;
    println!("{report}");
    if let Some(out) = &args.out {
        write_section(out, &report)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

struct Weir {
    proc: Proc,
    pid: u32,
}

fn start_weir(args: &Args, conf: &Path, port: u16, log: &Path) -> anyhow::Result<Weir> {
    let c = conf.to_string_lossy();
    let proc = spawn(&args.weir, &["serve", "--config", &c], log)?;
    let pid = proc.0.id();
    wait_port(port, 60)?;
    Ok(Weir { proc, pid })
}

fn run(args: &Args, dir: &Path) -> anyhow::Result<String> {
    let (port, admin, mock_port) = (free_port()?, free_port()?, free_port()?);
    let _mock = spawn(
        &args.bin_dir.join("mock-upstream"),
        &[
            "--listen",
            &format!("127.0.0.1:{mock_port}"),
            "--chunks",
            "10",
        ],
        &dir.join("mock.log"),
    )?;
    wait_port(mock_port, 20)?;
    // The cache plugin (Lua) is copied so that the run can rewrite it.
    let plugins = dir.join("plugins");
    fs::create_dir_all(plugins.join("cache"))?;
    for f in ["plugin.toml", "plugin.lua"] {
        fs::copy(
            args.plugins_dir.join("cache").join(f),
            plugins.join("cache").join(f),
        )?;
    }
    let conf = dir.join("weir.toml");
    fs::write(&conf, config(args, port, admin, mock_port, &plugins, 0)?)?;
    let log = dir.join("weir.log");
    let mut weir = start_weir(args, &conf, port, &log)?;
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    wait_port(admin, 20)?;
    let auth = format!("Bearer {TOKEN}");
    let mut ac = Client::new(admin_addr, Duration::from_secs(10));
    let created = ac.request(
        "POST",
        "/admin/plugins/auth/keys",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        br#"{"name":"soak"}"#,
    )?;
    let key: serde_json::Value = created.json().context("key create answer")?;
    let secret = key["secret"]
        .as_str()
        .context("no secret in the key answer")?
        .to_owned();
    let key_id = key["id"].as_str().context("no key id")?.to_owned();

    let started = Instant::now();
    let total = Duration::from_secs_f64(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    // Weir is down from `down_from` until `down_until` (ms since start; 0 = not yet).
    let down_from = Arc::new(AtomicU64::new(u64::MAX));
    let down_until = Arc::new(AtomicU64::new(u64::MAX));
    let tallies: Arc<Mutex<Vec<(String, Tally)>>> = Arc::new(Mutex::new(Vec::new()));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut workers = Vec::new();
    for w in 0..args.clients {
        let (stop, down_from, down_until, tallies) = (
            stop.clone(),
            down_from.clone(),
            down_until.clone(),
            tallies.clone(),
        );
        let bearer = format!("Bearer {secret}");
        workers.push(std::thread::spawn(move || {
            let mut client = Client::new(addr, Duration::from_secs(30));
            let mut local: Vec<(String, Tally)> = Vec::new();
            let slots: Vec<usize> = MIX
                .iter()
                .enumerate()
                .flat_map(|(i, m)| std::iter::repeat_n(i, m.2 as usize))
                .collect();
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                let (model, stream, _) = MIX[slots[n % slots.len()]];
                n += 1;
                let body = format!(
                    r#"{{"model":"{model}","stream":{stream},"user":"soak-{w}-{n}","messages":[{{"role":"user","content":"soak request {n}"}}]}}"#
                );
                let t0 = started.elapsed().as_millis() as u64;
                let r = client.request(
                    "POST",
                    "/v1/chat/completions",
                    &[("content-type", "application/json"), ("authorization", &bearer)],
                    body.as_bytes(),
                );
                let t1 = started.elapsed().as_millis() as u64;
                if r.is_err() {
                    // Weir is down (or the connection broke): retry like a client would,
                    // not in a busy loop.
                    std::thread::sleep(Duration::from_millis(50));
                }
                let label = format!("{model}{}", if stream { " (stream)" } else { "" });
                let idx = local.iter().position(|(l, _)| *l == label).unwrap_or_else(|| {
                    local.push((label.clone(), Tally::default()));
                    local.len() - 1
                });
                let t = &mut local[idx].1;
                t.requests += 1;
                let in_outage = t1 >= down_from.load(Ordering::Relaxed)
                    && t0 <= down_until.load(Ordering::Relaxed);
                let verdict = match (&r, model) {
                    (Err(e), _) if in_outage => Err(format!("in outage: {e}")),
                    (Err(e), _) => Ok(Err(format!("{label}: {e}"))),
                    (Ok(resp), "soak" | "soak-slow") => {
                        let text = String::from_utf8_lossy(&resp.body);
                        let complete = if stream {
                            text.contains("data: [DONE]") && !text.contains("\"error\"")
                        } else {
                            resp.json().is_ok_and(|v| v["choices"][0]["message"].is_object())
                        };
                        if resp.status == 200 && complete {
                            Ok(Ok(false))
                        } else if in_outage {
                            Err("in outage".to_owned())
                        } else {
                            Ok(Err(format!("{label}: {} {}", resp.status, text.chars().take(200).collect::<String>())))
                        }
                    }
                    (Ok(resp), "soak-500") if resp.status >= 500 => Ok(Ok(true)),
                    (Ok(resp), "soak-429") if resp.status == 429 => Ok(Ok(true)),
                    (Ok(_), "soak-trunc") => Ok(Ok(true)),
                    (Ok(resp), _) => Ok(Err(format!("{label}: unexpected {}", resp.status))),
                };
                match verdict {
                    Err(_) => t.lost_to_kill += 1,
                    Ok(Ok(false)) => t.ok += 1,
                    Ok(Ok(true)) => t.expected_fault += 1,
                    Ok(Err(why)) => {
                        t.unexpected += 1;
                        if t.first_unexpected.len() < 3 {
                            t.first_unexpected.push(why);
                        }
                    }
                }
            }
            tallies.lock().unwrap_or_else(|e| e.into_inner()).extend(local);
        }));
    }

    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut reloads = 0u64;
    let mut next_reload = Duration::from_secs_f64(args.reload_every);
    let mut next_rss = Duration::ZERO;
    let kill_at = total.mul_f64(args.kill_at);
    let mut killed = None;
    let usage_of = |ac: &mut Client| -> anyhow::Result<u64> {
        let r = ac.request(
            "GET",
            &format!("/admin/plugins/budget/usage?scope=key&id={key_id}&period=total"),
            &[("authorization", &auth)],
            b"",
        )?;
        let v = r.json().context("usage answer")?;
        Ok(v["usage"][0]["requests"].as_u64().unwrap_or(0))
    };
    while started.elapsed() < total {
        let now = started.elapsed();
        if now >= next_rss {
            if let Ok(kib) = procfs::rss_kib(weir.pid) {
                rss.push((now.as_secs_f64(), kib));
            }
            next_rss += Duration::from_secs(5);
        }
        if now >= next_reload {
            reloads += 1;
            if reloads % 2 == 1 {
                fs::write(
                    &conf,
                    config(args, port, admin, mock_port, &plugins, reloads)?,
                )?;
            } else {
                let lua = plugins.join("cache").join("plugin.lua");
                let mut text = fs::read_to_string(&lua)?;
                writeln!(text, "-- soak rewrite {reloads}")?;
                replace_file(&lua, text.as_bytes())?;
            }
            next_reload += Duration::from_secs_f64(args.reload_every);
        }
        if killed.is_none() && now >= kill_at {
            let before = usage_of(&mut ac)?;
            let read_at = Instant::now();
            down_from.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            weir.proc.0.kill()?; // SIGKILL
            let _ = weir.proc.0.wait();
            let gap_ms = read_at.elapsed().as_secs_f64() * 1000.0;
            let t_kill = Instant::now();
            weir = start_weir(args, &conf, port, &log)?;
            let restart_ms = t_kill.elapsed().as_secs_f64() * 1000.0;
            down_until.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            wait_port(admin, 20)?;
            let mut ac2 = Client::new(admin_addr, Duration::from_secs(10));
            let after = usage_of(&mut ac2)?;
            ac = ac2;
            killed = Some((before, after, gap_ms, restart_ms, now.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    if let Ok(kib) = procfs::rss_kib(weir.pid) {
        rss.push((started.elapsed().as_secs_f64(), kib));
    }
    let final_usage = usage_of(&mut ac).unwrap_or(0);
    let generation = {
        let r = ac.request("GET", "/admin/status", &[("authorization", &auth)], b"")?;
        r.json().ok().and_then(|v| v["generation"].as_u64())
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut merged: Vec<(String, Tally)> = Vec::new();
    for (label, t) in tallies.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let m = match merged.iter_mut().find(|(l, _)| *l == label) {
            Some((_, m)) => m,
            None => {
                merged.push((label, Tally::default()));
                &mut merged.last_mut().context("just pushed")?.1
            }
        };
        m.requests += t.requests;
        m.ok += t.ok;
        m.expected_fault += t.expected_fault;
        m.lost_to_kill += t.lost_to_kill;
        m.unexpected += t.unexpected;
        m.first_unexpected.extend(t.first_unexpected);
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(render(
        args,
        elapsed,
        &merged,
        &rss,
        reloads,
        generation,
        killed,
        final_usage,
    ))
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    elapsed: f64,
    rows: &[(String, Tally)],
    rss: &[(f64, u64)],
    reloads: u64,
    generation: Option<u64>,
    killed: Option<(u64, u64, f64, f64, f64)>,
    final_usage: u64,
) -> String {
    let mut s = String::new();
    let total: u64 = rows.iter().map(|r| r.1.requests).sum();
    let unexpected: u64 = rows.iter().map(|r| r.1.unexpected).sum();
    let _ = writeln!(
        s,
        "Command: `{}` ({:.0} s, {} clients, a hot reload every {} s, `kill -9` at {:.0} %, \
         `[state] flush_interval_ms = {}`).\n",
        args.command,
        elapsed,
        args.clients,
        args.reload_every,
        args.kill_at * 100.0,
        args.flush_ms
    );
    let _ = writeln!(
        s,
        "**{total} requests, {unexpected} unexpected failures.** Expected failures are the \
         injected faults (`soak-500`: a 5xx, `soak-429`: a 429, `soak-trunc`: however a cut \
         answer surfaces) and requests in flight while Weir was down.\n"
    );
    let _ = writeln!(
        s,
        "| model | requests | ok | expected fault | lost to the kill | unexpected |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for (label, t) in rows {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} |",
            t.requests, t.ok, t.expected_fault, t.lost_to_kill, t.unexpected
        );
    }
    for (label, t) in rows {
        for why in t.first_unexpected.iter().take(3) {
            let _ = writeln!(s, "\n- unexpected ({label}): `{}`", why.replace('`', "'"));
        }
    }
    let _ = writeln!(
        s,
        "\nHot reloads: {reloads} rewrites (config and the cache plugin's Lua in turn); generation \
         at the end {} (it restarts from 0 with the process).\n",
        generation.map_or("unknown".to_owned(), |g| g.to_string())
    );
    if let Some((before, after, gap_ms, restart_ms, at)) = killed {
        let rate = total as f64 / elapsed;
        let lost = before.saturating_sub(after);
        let _ = writeln!(
            s,
            "`kill -9` at {at:.0} s: the key's request counter (budget plugin, spend ledger) read \
             {before} {gap_ms:.0} ms before the kill and {after} after the restart ({restart_ms:.0} ms \
             to listen again): **{lost} requests' counts lost**, {:.2} s of traffic at {rate:.0} \
             requests/s, against a documented window of about {:.1} s (flush interval + sled's \
             500 ms fsync). Counter at the end: {final_usage}.\n",
            lost as f64 / rate.max(1e-9),
            (args.flush_ms as f64 + 500.0) / 1000.0,
        );
    }
    let _ = writeln!(s, "RSS over time (the process restarts at the kill):\n");
    let _ = writeln!(s, "| t (s) | RSS (MiB) |\n|---:|---:|");
    for (t, kib) in rss {
        let _ = writeln!(s, "| {t:.0} | {:.1} |", *kib as f64 / 1024.0);
    }
    s
}

fn write_section(path: &Path, body: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN}\n{body}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{text}\n## Soak\n\n{section}\n"),
    };
    fs::write(path, new)?;
    Ok(())
}
