//! `weir state export` and `weir state import`: copy keys, spend and plugin kv between
//! stores ([`super::migrate`]), e.g. from a single node's sled directory to Redis.
//!
//! ```text
//! weir state export --config weir.toml --out state.jsonl          # the gateway is stopped
//! weir state export --admin 127.0.0.1:8081 --out state.jsonl      # from a running gateway
//! weir state import --config weir-redis.toml --in state.jsonl --dry-run
//! weir state import --config weir-redis.toml --in state.jsonl
//! ```
//!
//! `--config` opens the store that config names (`[state]`), exactly as `weir serve` would.
//! A sled directory can be opened by one process at a time: while a gateway runs on it, an
//! export goes through that gateway's admin API instead (`GET /admin/state/export`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::migrate::{self, Export, ExportOptions, ImportOptions, ImportReport};
use super::{StateError, StateStore};
use crate::config::Config;

/// `weir state ...`.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: StateCommand,
}

/// The `weir state` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Write every key, spend ledger and plugin value as JSON Lines (the request log stays
    /// out unless named with --namespace).
    Export {
        /// Open the store this config names (the gateway on it must be stopped, for sled).
        #[arg(long, short, required_unless_present = "admin")]
        config: Option<PathBuf>,
        /// Export from a running gateway through its admin API (`host:port` or a URL)
        /// instead of opening the store.
        #[arg(long, conflicts_with = "config")]
        admin: Option<String>,
        /// Admin token, with --admin (the value of `[admin] token`).
        #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Write here (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Only this namespace (repeatable), e.g. `plugin/auth`.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Keep ledger reservations of requests in flight (default: exported as 0).
        #[arg(long)]
        keep_reserved: bool,
    },
    /// Read an export into the store a config names; keys it already holds are skipped.
    Import {
        /// Open the store this config names (no gateway may run on it, for sled).
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: PathBuf,
        /// Read from here (default: standard input).
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// Check the file and count what would be imported; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace keys the store already holds.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Runs `weir state ...`; errors go to stderr.
pub fn run(args: StateArgs) -> ExitCode {
    let result = match args.command {
        StateCommand::Export {
            config,
            admin,
            token,
            out,
            namespaces,
            keep_reserved,
        } => {
            let opts = ExportOptions {
                namespaces,
                keep_reserved,
            };
            match (admin, config) {
                (Some(admin), _) => export_admin(&admin, token, &opts, out.as_deref()),
                (None, Some(config)) => export_local(&config, &opts, out.as_deref()),
                (None, None) => Err("pass --config FILE or --admin HOST:PORT".to_owned()),
            }
        }
        StateCommand::Import {
            config,
            input,
            dry_run,
            overwrite,
        } => import(
            &config,
            input.as_deref(),
            ImportOptions { dry_run, overwrite },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the operator was about to do, for the message when sled is locked.
#[derive(Debug, Clone, Copy)]
enum Intent {
    Export,
    Import,
}

/// Loads the config and opens its store; a locked sled directory gets advice.
fn open(config: &Path, intent: Intent) -> Result<(Config, Arc<dyn StateStore>), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    match super::open(&cfg.file.state, config) {
        Ok(store) => Ok((cfg, store)),
        Err(e @ StateError::Locked { .. }) => {
            let advice = match intent {
                Intent::Export => format!(
                    "either stop the gateway first, or export through the running gateway's admin API:\n  \
                     weir state export --admin {} --token \"$WEIR_ADMIN_TOKEN\" --out state.jsonl",
                    cfg.admin.listen
                ),
                Intent::Import => "stop the gateway that runs on it first: an import writes into a \
                                   store no gateway is using (there is no import through the admin API)"
                    .to_owned(),
            };
            Err(format!("{e}\n{advice}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Where the export goes: a file written beside its final name and renamed into place once
/// complete (so a failed export never leaves a file that looks whole), or standard output.
enum Sink {
    File {
        tmp: PathBuf,
        path: PathBuf,
        out: BufWriter<File>,
    },
    Stdout(std::io::StdoutLock<'static>),
}

impl Sink {
    fn open(path: Option<&Path>) -> Result<Sink, String> {
        let Some(path) = path else {
            return Ok(Sink::Stdout(std::io::stdout().lock()));
        };
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let tmp = path.with_file_name(name);
        let file =
            File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(Sink::File {
            tmp,
            path: path.to_owned(),
            out: BufWriter::new(file),
        })
    }

    fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        let r = match self {
            Sink::File { out, .. } => out.write_all(chunk),
            Sink::Stdout(out) => out.write_all(chunk),
        };
        r.map_err(|e| format!("cannot write the export: {e}"))
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Sink::Stdout(mut out) => out.flush().map_err(|e| e.to_string()),
            Sink::File { tmp, path, out } => {
                let file = out.into_inner().map_err(|e| e.error().to_string())?;
                file.sync_all().map_err(|e| e.to_string())?;
                std::fs::rename(&tmp, &path).map_err(|e| {
                    format!("cannot rename {} to {}: {e}", tmp.display(), path.display())
                })
            }
        }
    }

    fn abandon(self) {
        if let Sink::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn export_local(config: &Path, opts: &ExportOptions, out: Option<&Path>) -> Result<(), String> {
    let (cfg, store) = open(config, Intent::Export)?;
    let mut export = Export::new(store, cfg.file.state.backend, opts).map_err(|e| e.to_string())?;
    let mut sink = Sink::open(out)?;
    for chunk in export.by_ref() {
        let written = chunk
            .map_err(|e| e.to_string())
            .and_then(|c| sink.write(c.as_bytes()));
        if let Err(e) = written {
            sink.abandon();
            return Err(e);
        }
    }
    sink.finish()?;
    report_export(out, export.entries());
    Ok(())
}

fn report_export(out: Option<&Path>, entries: u64) {
    if let Some(path) = out {
        eprintln!("exported {entries} entries to {}", path.display());
    }
}

fn export_admin(
    admin: &str,
    token: Option<String>,
    opts: &ExportOptions,
    out: Option<&Path>,
) -> Result<(), String> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or("no admin token: pass --token or set WEIR_ADMIN_TOKEN")?;
    if let Some(ns) = opts.namespaces.iter().find(|ns| ns.contains(',')) {
        return Err(format!(
            "namespace '{ns}' contains ',', which the admin API cannot take"
        ));
    }
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_owned()
    } else {
        format!("http://{admin}")
    };
    let mut url = format!(
        "{base}/admin/state/export?keep_reserved={}",
        opts.keep_reserved
    );
    if !opts.namespaces.is_empty() {
        url.push_str("&namespaces=");
        url.push_str(&crate::admin::keys::urlencode(&opts.namespaces.join(",")));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = admin_client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut sink = Sink::open(out)?;
    let result = runtime.block_on(download(&http, &url, &token, &mut sink));
    match result {
        Ok(tail) => {
            // The stream is whole only if it ends with its closing line.
            match check_tail(&tail) {
                Ok(entries) => {
                    sink.finish()?;
                    report_export(out, entries);
                    Ok(())
                }
                Err(e) => {
                    sink.abandon();
                    Err(e)
                }
            }
        }
        Err(e) => {
            sink.abandon();
            Err(e)
        }
    }
}

/// The HTTP client of `--admin`: a connect timeout and a timeout between reads (an export
/// may take a while as a whole, but never stalls).
fn admin_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())
}

/// Streams the export at `url` into `sink`; returns the last line it wrote.
async fn download(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    sink: &mut Sink,
) -> Result<String, String> {
    use futures::StreamExt;
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("cannot reach the admin API at {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned))
            .unwrap_or(body);
        return Err(format!("{}: {message}", status.as_u16()));
    }
    let mut stream = resp.bytes_stream();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("the export from {url} broke off: {e}"))?;
        sink.write(&chunk)?;
        // Keep only the last line (and its newline).
        tail.extend_from_slice(&chunk);
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let cut = body.iter().rposition(|&b| b == b'\n');
        if let Some(i) = cut {
            tail.drain(..=i);
        }
    }
    Ok(String::from_utf8_lossy(&tail).trim().to_owned())
}

/// The entry count of a closing line; an error line or anything else is a failed export.
fn check_tail(last: &str) -> Result<u64, String> {
    let value: serde_json::Value = serde_json::from_str(last.lines().last().unwrap_or(""))
        .map_err(|_| "the export ended without its closing line: it was cut short".to_owned())?;
    if let Some(e) = value.get("error") {
        return Err(format!("the gateway failed while exporting: {e}"));
    }
    value
        .pointer("/end/entries")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| "the export ended without its closing line: it was cut short".to_owned())
}

fn import(config: &Path, input: Option<&Path>, opts: ImportOptions) -> Result<(), String> {
    // Read and check the whole file before opening (and locking) the store.
    let reader: Box<dyn Read> = match input {
        Some(path) => {
            Box::new(File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?)
        }
        None => Box::new(std::io::stdin().lock()),
    };
    let parsed = migrate::parse(BufReader::new(reader)).map_err(|e| match input {
        Some(path) => format!("{}: {e}", path.display()),
        None => e.to_string(),
    })?;
    let (cfg, store) = open(config, Intent::Import)?;
    let report = migrate::import(&*store, &parsed, opts).map_err(|e| e.to_string())?;
    print_report(
        &parsed.header,
        cfg.file.state.backend.as_str(),
        &report,
        opts,
    );
    Ok(())
}

fn print_report(
    header: &migrate::Header,
    target: &str,
    report: &ImportReport,
    opts: ImportOptions,
) {
    let reserved = if header.reserved_kept {
        "reservations kept"
    } else {
        "reservations zeroed"
    };
    println!(
        "{} export ({reserved}) into {target}{}:",
        header.source_backend,
        if opts.dry_run {
            ", dry run: nothing written"
        } else {
            ""
        }
    );
    let line = |name: &str, c: &migrate::Counts| {
        println!(
            "  {name:<28} {:>7} imported {:>7} replaced {:>7} skipped (already there) {:>7} skipped (expired)",
            c.imported, c.replaced, c.skipped_existing, c.skipped_expired
        );
    };
    for (ns, counts) in &report.namespaces {
        line(ns, counts);
    }
    line("total", &report.total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_must_be_the_closing_line() {
        assert_eq!(check_tail("{\"end\":{\"entries\":3}}"), Ok(3));
        assert!(
            check_tail("{\"error\":\"disk\"}")
                .unwrap_err()
                .contains("disk")
        );
        assert!(
            check_tail("{\"ns\":\"a\"")
                .unwrap_err()
                .contains("cut short")
        );
        assert!(check_tail("").is_err());
    }
}
