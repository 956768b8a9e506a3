//! The suite's shared-state scenario (issue 11's performance section): the default chain at
//! c16 with its state on sled (the embedded default), then on Redis, one gateway at a time
//! alone on the proxy CPU, and the bare mock at c16 as the floor the added latency is taken
//! from. `redis-server` is started here on a free port, without persistence, pinned with
//! the mock and the load generator.
//!
//! Besides the figures every run has (requests/s, latency, the gateway's CPU per request),
//! a leg reads the gateway's own state counters (`weir_state_*_total` on `/metrics`: Redis
//! round trips, local read cache results, errors, bypasses) before and after the measured
//! run, and on Redis the server's `INFO commandstats` (reset when the run starts) and its CPU
//! time, all divided by the requests completed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use weir_bench::http::Client;
use weir_bench::procfs;

use super::{
    Args, Env, Plan, Proc, Run, Target, Tool, first_line, free_port, launch_weir, measure,
    measured, opt_us, spawn_pinned, us, wait_port, weir_config,
};

/// Concurrency of every leg.
pub const CONCURRENCY: usize = 16;

/// Pause after a load run before the counters are read: the last requests' `on_log` hooks
/// run after their answers, on other threads.
const SETTLE: Duration = Duration::from_millis(300);

/// The gateway's round-trip counter (`core/src/state/redis/mod.rs`).
const ROUND_TRIPS: &str = "weir_state_redis_round_trips_total";

/// What the scenario measured.
#[derive(Debug, Serialize)]
pub struct SharedState {
    /// `/proc/loadavg` when the scenario started and when it ended.
    pub load_before: String,
    pub load_after: String,
    /// `redis_version` of the server, if it started.
    pub redis_version: Option<String>,
    /// The bare mock at the same concurrency.
    pub direct: Option<Run>,
    /// sled, then Redis.
    pub legs: Vec<Leg>,
    /// What could not be measured, with the reason.
    pub failed: Vec<(String, String)>,
}

/// One gateway: the default chain on one state backend.
#[derive(Debug, Serialize)]
pub struct Leg {
    /// `sled` or `Redis`.
    pub backend: &'static str,
    pub run: Run,
    /// Change of each `weir_state_*_total` series of the gateway's `/metrics` over the
    /// measured run, per completed request.
    pub store_per_req: BTreeMap<String, f64>,
    /// The server's side, on Redis.
    pub redis: Option<ServerSide>,
}

impl Leg {
    /// Redis round trips per request, by the gateway's counter.
    fn round_trips(&self) -> Option<f64> {
        self.store_per_req.get(ROUND_TRIPS).copied()
    }
}

/// What `redis-server` did for a leg, per completed request.
#[derive(Debug, Serialize)]
pub struct ServerSide {
    /// CPU time (user + system) of the server process, µs.
    pub cpu_us: f64,
    /// Calls by command (`INFO commandstats`; the suite's own `INFO` left out).
    pub calls: BTreeMap<String, f64>,
}

impl ServerSide {
    /// Scripts run (`EVALSHA`, `EVAL`, read-only variants): one per round trip that runs an
    /// operation. `commandstats` also counts the commands a script calls, under their names.
    fn scripts(&self) -> f64 {
        self.calls
            .iter()
            .filter(|(k, _)| k.starts_with("eval"))
            .map(|(_, v)| v)
            .sum()
    }
}

/// A `redis-server` started for the scenario; stopped when dropped.
struct RedisServer {
    proc: Proc,
    port: u16,
}

impl RedisServer {
    fn start(env: &Env) -> anyhow::Result<RedisServer> {
        let port = free_port()?;
        let dir = env.dir.join("redis");
        fs::create_dir_all(&dir)?;
        let dir = dir.to_string_lossy().into_owned();
        let port_arg = port.to_string();
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &dir,
        ];
        let mut proc = spawn_pinned(
            "redis-server",
            env.args.load_cpu,
            &env.args.redis_server,
            &args,
            &[],
            &env.dir,
        )
        .context("starting redis-server (bench/run.sh installs it from Debian)")?;
        wait_port(&mut proc, port)?;
        Ok(RedisServer { proc, port })
    }

    /// Sends one command (inline protocol) and returns the reply's text.
    fn command(&self, cmd: &str) -> anyhow::Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(format!("{cmd}\r\n").as_bytes())?;
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let rest = rest.trim_end();
        match kind {
            "+" => Ok(rest.to_owned()),
            "$" => {
                let n: usize = rest.parse().context("bulk reply length")?;
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n);
                Ok(String::from_utf8(buf)?)
            }
            "-" => bail!("redis {cmd}: {rest}"),
            _ => bail!("redis {cmd}: unexpected reply {line:?}"),
        }
    }

    fn version(&self) -> Option<String> {
        let info = self.command("INFO server").ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
    }

    /// Calls by command since the last `CONFIG RESETSTAT`.
    fn commandstats(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let info = self.command("INFO commandstats")?;
        Ok(parse_commandstats(&info))
    }
}

/// `cmdstat_<name>:calls=N,usec=N,...` lines: calls by command, the suite's own `INFO` and
/// `CONFIG RESETSTAT` left out.
fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, fields) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            if matches!(name, "info" | "config|resetstat") {
                return None;
            }
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The `weir_state_*_total` series of a gateway's `/metrics` (`name{labels}` -> value).
fn store_counters(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut client = Client::new(addr, Duration::from_secs(5));
    let resp = client.request("GET", "/metrics", &[], b"")?;
    if resp.status != 200 {
        bail!("GET /metrics answered {}", resp.status);
    }
    Ok(parse_counters(&String::from_utf8_lossy(&resp.body)))
}

fn parse_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("weir_state_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            if !name.ends_with("_total") {
                return None;
            }
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Runs the scenario. Failures are recorded in the result, never returned: the other legs
/// still run.
pub fn run(env: &Env, mock_port: u16) -> SharedState {
    let loadavg = || {
        fs::read_to_string("/proc/loadavg")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut out = SharedState {
        load_before: loadavg(),
        load_after: String::new(),
        redis_version: None,
        direct: None,
        legs: Vec::new(),
        failed: Vec::new(),
    };
    let Some(chain) = env.args.chain_config.as_deref() else {
        out.failed.push((
            "Shared state".into(),
            "no chain config given (--chain-config)".into(),
        ));
        out.load_after = loadavg();
        return out;
    };
    let secs = env.args.state_duration;
    let direct = Target {
        label: "direct (mock)".into(),
        base: format!("http://127.0.0.1:{mock_port}"),
        model: "bench",
        slow_model: "bench-slow",
        slow_headers: Vec::new(),
        proc: None,
        idle_rss_kib: None,
    };
    match measure(env, &direct, "chat", CONCURRENCY, Tool::Wrk, secs) {
        Ok(r) => out.direct = Some(r),
        Err(e) => out
            .failed
            .push(("direct (mock)".into(), first_line(&format!("{e:#}")))),
    }
    match leg(env, mock_port, chain, None) {
        Ok(l) => out.legs.push(l),
        Err(e) => out
            .failed
            .push(("state on sled".into(), first_line(&format!("{e:#}")))),
    }
    let redis = RedisServer::start(env).and_then(|r| {
        out.redis_version = r.version();
        leg(env, mock_port, chain, Some(&r))
    });
    match redis {
        Ok(l) => out.legs.push(l),
        Err(e) => out
            .failed
            .push(("state on Redis".into(), first_line(&format!("{e:#}")))),
    }
    out.load_after = loadavg();
    out
}

/// The default chain on sled (`redis` = `None`) or on `redis`: start the gateway, warm up,
/// read the counters, measure, read them again.
fn leg(
    env: &Env,
    mock_port: u16,
    chain: &Path,
    redis: Option<&RedisServer>,
) -> anyhow::Result<Leg> {
    let backend = if redis.is_some() { "Redis" } else { "sled" };
    let port = free_port()?;
    // The defaults of `[state]` and `[state.redis]` otherwise: a leg measures what an
    // operator gets by switching the backend.
    let extra = redis.map_or_else(String::new, |r| {
        format!(
            "\n[state]\nbackend = \"redis\"\n\n[state.redis]\nurl = \"redis://127.0.0.1:{}/0\"\n",
            r.port
        )
    });
    let conf = weir_config(env, port, mock_port, "info", Some(chain), &extra)?;
    let name = format!("weir-state-{}", backend.to_lowercase());
    let (proc, _, idle) = launch_weir(env, &name, port, &conf)?;
    let mut t = Target {
        label: format!("Weir, default chain, state on {backend}"),
        base: format!("http://127.0.0.1:{port}"),
        model: "bench-chain",
        slow_model: "bench-chain-slow",
        slow_headers: Vec::new(),
        proc: Some(proc),
        idle_rss_kib: idle,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let plan = Plan::new(env, &t, "chat", CONCURRENCY, Tool::Wrk);
    eprintln!("{:<36} chat   c={CONCURRENCY:<5} ...", t.label);
    plan.warm_up()?;
    std::thread::sleep(SETTLE);
    let server_cpu0 = match redis {
        Some(r) => {
            r.command("CONFIG RESETSTAT")?;
            Some(procfs::cpu_micros(r.proc.pid())?)
        }
        None => None,
    };
    let before = store_counters(addr)?;
    let run = measured(&plan, &t, "chat", env.args.state_duration)?;
    std::thread::sleep(SETTLE);
    let after = store_counters(addr)?;
    let n = run.result.completed.max(1) as f64;
    let redis = match (redis, server_cpu0) {
        (Some(r), Some(cpu0)) => {
            let cpu = procfs::cpu_micros(r.proc.pid())?.saturating_sub(cpu0);
            let calls = r.commandstats()?;
            Some(ServerSide {
                cpu_us: cpu as f64 / n,
                calls: calls
                    .into_iter()
                    .map(|(k, calls)| (k, calls as f64 / n))
                    .collect(),
            })
        }
        _ => None,
    };
    let store_per_req = after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).unwrap_or(&0.0)) / n))
        .collect();
    if let Some(p) = &mut t.proc {
        p.check_alive()?;
    }
    let leg = Leg {
        backend,
        run,
        store_per_req,
        redis,
    };
    eprintln!(
        "{:<36} round trips/req={} scripts/req={} redis cpu/req={}us",
        t.label,
        opt_us(leg.round_trips()),
        opt_us(leg.redis.as_ref().map(ServerSide::scripts)),
        opt_us(leg.redis.as_ref().map(|r| r.cpu_us)),
    );
    Ok(leg)
}

/// The scenario's markdown: how it ran, one row per leg (and the floor), Redis against
/// sled, and the Redis leg's commands and store counters.
pub fn render(s: &SharedState, args: &Args, date: &str, commit: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Generated by `{}` on {date} at commit `{commit}`; redis-server {}. Load average before \
         `{}`, after `{}`.\n",
        args.command,
        s.redis_version.as_deref().unwrap_or("-"),
        s.load_before,
        s.load_after
    );
    let _ = writeln!(
        o,
        "The default chain (`bench/configs/default-chain.toml`, the \"Weir, default chain\" \
         rows above) at c{CONCURRENCY} (wrk, unique requests: every one a cache miss), {:.0} s \
         warm-up then {:.0} s measured per leg, one gateway at a time alone on CPU {}. sled: \
         the default `[state]` (sled behind the write-behind front). Redis: `[state] backend = \
         \"redis\"` with the defaults of `[state.redis]`, against a `redis-server --save \"\" \
         --appendonly no` started by the suite on CPU {} beside the mock and wrk. Weir CPU and \
         redis-server CPU: utime+stime from `/proc`, per request completed. Round trips: the \
         gateway's `{ROUND_TRIPS}` (its `/metrics`) after - before the measured run, per \
         request; scripts and commands: the server's `INFO commandstats` since a `CONFIG \
         RESETSTAT` at the start of the run (scripts = `evalsha` calls; the commands a script \
         runs are counted under their own names as well). Added latency: the leg's minus the bare \
         mock's at the same concurrency. {}\n",
        args.warmup, args.state_duration, args.proxy_cpu, args.load_cpu, args.note
    );
    let _ = writeln!(
        o,
        "| State | RPS | p50 | p99 | Added p50 | Added p99 | Weir CPU / req | redis-server CPU / req | Redis round trips / req | Scripts run / req | Errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let floor = s.direct.as_ref().map(|d| &d.result);
    if let Some(d) = floor {
        let _ = writeln!(
            o,
            "| direct (mock), no gateway | {:.0} | {} | {} | - | - | - | - | - | - | {} |",
            d.rps,
            us(d.total_p50_us),
            us(d.total_p99_us),
            d.errors
        );
    }
    let added = |v: f64, f: fn(&weir_bench::report::LoadResult) -> f64| {
        floor.map_or_else(|| "-".to_owned(), |d| us(v - f(d)))
    };
    for l in &s.legs {
        let r = &l.run.result;
        let server = l.redis.as_ref();
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} | {} | {} | {} | {} µs | {} | {} | {} | {} |",
            l.backend,
            r.rps,
            us(r.total_p50_us),
            us(r.total_p99_us),
            added(r.total_p50_us, |d| d.total_p50_us),
            added(r.total_p99_us, |d| d.total_p99_us),
            opt_us(l.run.proxy_cpu_us),
            server.map_or_else(|| "-".into(), |x| format!("{:.1} µs", x.cpu_us)),
            l.round_trips()
                .map_or_else(|| "-".into(), |v| format!("{v:.2}")),
            server.map_or_else(|| "-".into(), |x| format!("{:.2}", x.scripts())),
            r.errors
        );
    }
    if let [sled, redis] = &s.legs[..] {
        let cpu = |l: &Leg| l.run.proxy_cpu_us.unwrap_or(f64::NAN);
        let both = cpu(redis) + redis.redis.as_ref().map_or(0.0, |x| x.cpu_us);
        let (a, b) = (&sled.run.result, &redis.run.result);
        let _ = writeln!(
            o,
            "\nRedis against sled: {:.2}x the requests/s; Weir CPU {:+.1} µs per request \
             ({:+.0}%), Weir and redis-server together {:+.1} µs; p50 {}, p99 {}.",
            b.rps / a.rps,
            cpu(redis) - cpu(sled),
            (cpu(redis) / cpu(sled) - 1.0) * 100.0,
            both - cpu(sled),
            signed_us(b.total_p50_us - a.total_p50_us),
            signed_us(b.total_p99_us - a.total_p99_us),
        );
    }
    for l in &s.legs {
        if let Some(x) = &l.redis {
            let mut calls: Vec<(&String, &f64)> = x.calls.iter().collect();
            calls.sort_by(|a, b| b.1.total_cmp(a.1));
            let calls: Vec<String> = calls
                .into_iter()
                .map(|(k, v)| format!("`{k}` {v:.2}"))
                .collect();
            let _ = writeln!(
                o,
                "\nRedis commands per request ({}): {}.",
                l.backend,
                calls.join(", ")
            );
        }
        let counters: Vec<String> = l
            .store_per_req
            .iter()
            .filter(|&(_, v)| *v != 0.0)
            .map(|(k, v)| format!("`{k}` {v:.2}"))
            .collect();
        if !counters.is_empty() {
            let _ = writeln!(
                o,
                "\nGateway state counters per request ({}): {}.",
                l.backend,
                counters.join(", ")
            );
        }
    }
    for (what, why) in &s.failed {
        let _ = writeln!(o, "\n**{what}: not measured** ({why}).");
    }
    let errors: Vec<String> = s
        .direct
        .iter()
        .chain(s.legs.iter().map(|l| &l.run))
        .filter_map(|r| {
            Some(format!(
                "- {}: {}",
                r.target,
                r.result.first_error.as_ref()?
            ))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(o, "\nFirst errors seen:\n\n{}", errors.join("\n"));
    }
    o
}

fn signed_us(v: f64) -> String {
    if v < 0.0 {
        format!("-{}", us(-v))
    } else {
        format!("+{}", us(v))
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_commandstats, parse_counters};

    #[test]
    fn reads_commandstats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=48,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=1,usec=20,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\ncmdstat_config|resetstat:calls=1,usec=5\r\ncmdstat_ping:calls=3,usec=1\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats["evalsha"], 12);
        assert_eq!(stats["ping"], 3);
    }

    #[test]
    fn reads_state_counters() {
        let text = "# HELP weir_state_redis_round_trips_total Round trips\n# TYPE weir_state_redis_round_trips_total counter\nweir_state_redis_round_trips_total 42\nweir_state_redis_local_cache_total{result=\"miss\"} 7\nweir_state_redis_up 1\nweir_requests_total 9\n";
        let c = parse_counters(text);
        assert_eq!(c.len(), 2);
        assert_eq!(c["weir_state_redis_round_trips_total"], 42.0);
        assert_eq!(
            c["weir_state_redis_local_cache_total{result=\"miss\"}"],
            7.0
        );
    }
}
