//! The admin subcommands of the `weir` CLI (`status`, `reload`, `rollback`, `generations`,
//! `logs`): thin HTTP clients of the admin API.
//!
//! ```text
//! export WEIR_ADMIN_TOKEN=...            # the token in [admin] token
//! weir status                            # --admin 127.0.0.1:8081 by default
//! weir reload
//! weir rollback 41
//! weir generations
//! weir logs --follow
//! ```

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::requestlog::{Record, now_ms};

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin API address: `host:port` or a URL.
    #[arg(long, env = "WEIR_ADMIN", default_value = "127.0.0.1:8081")]
    pub admin: String,
    /// Admin token (the value of `[admin] token` in the gateway's config).
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Admin subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Show the running gateway: generation, models, plugins, last reload and its error.
    Status {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reload the config and plugins now (as a file change or SIGHUP would).
    Reload {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Serve a previous generation again (see `weir generations` for those kept).
    Rollback {
        /// The generation to restore.
        generation: u64,
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List recorded generations, newest first.
    Generations {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the request log (never prompt text).
    Logs {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
        /// Keep printing new records as they come (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        /// How many of the newest records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Only records after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// Error talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No token given.
    #[error("no admin token: pass --token or set WEIR_ADMIN_TOKEN")]
    NoToken,
    /// The request failed.
    #[error("cannot reach the admin API at {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The API answered with an error.
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The answer was not what was expected.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(args: &AdminArgs, timeout: Option<Duration>) -> Result<Client, CliError> {
        let token = args
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or(CliError::NoToken)?;
        let base = if args.admin.contains("://") {
            args.admin.clone()
        } else {
            format!("http://{}", args.admin)
        };
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5));
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        let http = builder.build().map_err(|source| CliError::Http {
            url: base.clone(),
            source,
        })?;
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| CliError::Http {
                url: url.clone(),
                source,
            })?;
        Ok(resp)
    }

    async fn json(&self, method: reqwest::Method, path: &str) -> Result<Value, CliError> {
        let resp = self.send(method, path).await?;
        let status = resp.status().as_u16();
        let url = format!("{}{path}", self.base);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| CliError::Http { url, source })?;
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|e| CliError::Decode(e.to_string()))?;
        if status >= 400 && body.get("outcome").is_none() {
            let message = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_owned();
            return Err(CliError::Status { status, message });
        }
        Ok(body)
    }
}

/// Runs an admin subcommand; prints to stdout, errors to stderr.
pub fn run(cmd: AdminCommand) -> ExitCode {
    // rustls needs one process-wide crypto provider, even for plain-HTTP clients.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cmd: AdminCommand) -> Result<ExitCode, CliError> {
    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));
    match cmd {
        AdminCommand::Status { admin, json } => {
            let v = Client::new(&admin, TIMEOUT)?
                .json(reqwest::Method::GET, "/admin/status")
                .await?;
            if json {
                println!("{}", pretty(&v));
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Reload { admin } => {
            let v = Client::new(&admin, TIMEOUT)?
                .json(reqwest::Method::POST, "/admin/reload")
                .await?;
            Ok(print_outcome(&v))
        }
        AdminCommand::Rollback { generation, admin } => {
            let path = format!("/admin/rollback/{generation}");
            let v = Client::new(&admin, TIMEOUT)?
                .json(reqwest::Method::POST, &path)
                .await?;
            Ok(print_outcome(&v))
        }
        AdminCommand::Generations { admin, limit, json } => {
            let path = format!("/admin/generations?limit={limit}");
            let v = Client::new(&admin, TIMEOUT)?
                .json(reqwest::Method::GET, &path)
                .await?;
            if json {
                println!("{}", pretty(&v));
            } else {
                print_generations(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Logs {
            admin,
            follow,
            limit,
            after,
            json,
        } => {
            let mut path = format!("/admin/logs?limit={limit}");
            if let Some(after) = after {
                path.push_str(&format!("&after={after}"));
            }
            if !follow {
                let v = Client::new(&admin, TIMEOUT)?
                    .json(reqwest::Method::GET, &path)
                    .await?;
                let records: Vec<Record> = serde_json::from_value(v["records"].clone())
                    .map_err(|e| CliError::Decode(e.to_string()))?;
                for r in &records {
                    print_record(r, json);
                }
                return Ok(ExitCode::SUCCESS);
            }
            path.push_str("&follow=true");
            let client = Client::new(&admin, None)?;
            let mut resp = client.send(reqwest::Method::GET, &path).await?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let bytes = resp.bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let message = body
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned();
                return Err(CliError::Status { status, message });
            }
            let mut buf = String::new();
            loop {
                let chunk = resp.chunk().await.map_err(|source| CliError::Http {
                    url: path.clone(),
                    source,
                })?;
                let Some(chunk) = chunk else {
                    return Ok(ExitCode::SUCCESS);
                };
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    for line in event.lines() {
                        if let Some(data) = line.strip_prefix("data:")
                            && let Ok(r) = serde_json::from_str::<Record>(data.trim_start())
                        {
                            print_record(&r, json);
                        }
                    }
                }
            }
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn print_outcome(v: &Value) -> ExitCode {
    let generation = v["generation"].as_u64().unwrap_or(0);
    match v["outcome"].as_str() {
        Some("success") => {
            match v["rollback_of"].as_u64() {
                Some(of) => println!(
                    "rolled back: generation {generation} serves the content of generation {of}"
                ),
                None => println!("reloaded: generation {generation} is serving"),
            }
            ExitCode::SUCCESS
        }
        Some("unchanged") => {
            println!(
                "unchanged: generation {generation} keeps serving (the inputs did not change)"
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("reload failed; the previous generation keeps serving:");
            eprintln!(
                "  {}",
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            );
            ExitCode::FAILURE
        }
    }
}

fn ago(time_ms: u64) -> String {
    let secs = now_ms().saturating_sub(time_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h {}m ago", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn print_status(v: &Value) {
    let g = v["generation"].as_u64().unwrap_or(0);
    let trigger = v["trigger"].as_str().unwrap_or("?");
    let since = ago(v["generation_time_ms"].as_u64().unwrap_or(0));
    match v["rollback_of"].as_u64() {
        Some(of) => println!("generation  {g} (rollback to {of}, {since})"),
        None => println!("generation  {g} ({trigger}, {since})"),
    }
    println!("config      {}", v["config_path"].as_str().unwrap_or("?"));
    println!("uptime      {}s", v["uptime_secs"].as_u64().unwrap_or(0));
    if let Some(models) = v["models"].as_array() {
        for m in models {
            let targets: Vec<String> = m["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    format!(
                        "{}/{}",
                        t["provider"].as_str().unwrap_or("?"),
                        t["model"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            println!(
                "model       {} -> {}",
                m["name"].as_str().unwrap_or("?"),
                targets.join(", ")
            );
        }
    }
    if let Some(plugins) = v["plugins"].as_object() {
        for (name, p) in plugins {
            println!(
                "plugin      {name}: failures {} shadow {}",
                p["failures"], p["shadow_decisions"]
            );
        }
    }
    let r = &v["reload"];
    println!(
        "reloads     {} ok, {} failed, {} unchanged; kept for rollback: {}",
        r["success"], r["failure"], r["unchanged"], v["kept_generations"]
    );
    if let Some(last) = r["last"].as_object() {
        println!(
            "last reload {} ({}, {}, {:.0} ms)",
            last.get("outcome").and_then(Value::as_str).unwrap_or("?"),
            last.get("trigger").and_then(Value::as_str).unwrap_or("?"),
            ago(last.get("time_ms").and_then(Value::as_u64).unwrap_or(0)),
            last.get("duration_ms")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
        );
    }
    if let Some(err) = r["last_error"].as_object() {
        println!(
            "last error  {} ({}): {}",
            ago(err.get("time_ms").and_then(Value::as_u64).unwrap_or(0)),
            err.get("trigger").and_then(Value::as_str).unwrap_or("?"),
            err.get("message").and_then(Value::as_str).unwrap_or("?")
        );
    }
}

fn print_generations(v: &Value) {
    let kept: Vec<u64> = v["kept"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let current = v["current"].as_u64().unwrap_or(0);
    println!(
        "{:>6}  {:<9} {:<12} {:<14} note",
        "gen", "trigger", "when", "hash"
    );
    for g in v["generations"].as_array().into_iter().flatten() {
        let n = g["generation"].as_u64().unwrap_or(0);
        let mut note = Vec::new();
        if n == current {
            note.push("serving".to_owned());
        }
        if kept.contains(&n) {
            note.push("kept".to_owned());
        }
        if let Some(of) = g["rollback_of"].as_u64() {
            note.push(format!("rollback to {of}"));
        }
        let hash = g["hash"].as_str().unwrap_or("");
        println!(
            "{n:>6}  {:<9} {:<12} {:<14} {}",
            g["trigger"].as_str().unwrap_or("?"),
            ago(g["time_ms"].as_u64().unwrap_or(0)),
            hash.get(..12).unwrap_or(hash),
            note.join(", ")
        );
    }
}

fn print_record(r: &Record, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let target = match (&r.provider, &r.target_model) {
        (Some(p), Some(m)) => format!("{p}/{m}"),
        (Some(p), None) => p.clone(),
        _ => "-".to_owned(),
    };
    println!(
        "#{:<7} {} {} {:<20} {:<28} {:>8.1}ms in={:<6} out={:<6} gen={} {}{}",
        r.seq,
        utc(r.time_ms),
        r.status,
        r.model,
        target,
        r.latency_ms,
        r.tokens_in,
        r.tokens_out,
        r.generation,
        r.request_id,
        r.key
            .as_deref()
            .map(|k| format!(" key={k}"))
            .unwrap_or_default(),
    );
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for ms since the Unix epoch (civil-from-days, proleptic
/// Gregorian calendar).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
