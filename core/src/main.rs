//! The `weir` command: `serve`, `check`, and the admin clients (`status`, `reload`,
//! `rollback`, `generations`, `logs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use weir::config::Config;
use weir::pipeline::{Services, Snapshot};
use weir::telemetry::{self, Metrics};

/// Weir: a plugin-first AI gateway.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Path to the TOML config file.
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: PathBuf,
        /// Listen address; overrides `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file without serving. Exit code 0 when valid.
    Check {
        /// Path to the TOML config file.
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: PathBuf,
    },
    /// Admin API clients.
    #[command(flatten)]
    Admin(weir::admin::cli::AdminCommand),
    /// Create, list and revoke virtual API keys (through the admin API).
    Keys(weir::admin::keys::KeysArgs),
    /// Spend, tokens and requests per key and tenant (through the admin API).
    Usage(weir::admin::usage::UsageArgs),
    /// Plugin tools: `test PATH` runs a plugin against its fixtures, `new` scaffolds one.
    Plugin(weir::plugin::cli::PluginArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Admin(cmd) => weir::admin::cli::run(cmd),
        Command::Keys(args) => weir::admin::keys::run(args),
        Command::Usage(args) => weir::admin::usage::run(args),
        Command::Plugin(args) => weir::plugin::cli::run(args),
        Command::Serve { config, listen } => match serve(config, listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `weir check`: everything `serve` would load, without serving: the config, every plugin
/// (manifest, config schema, compiled WASM or Lua, `init`). Plugin state is kept in memory so
/// a check never touches the gateway's sled directory.
fn check(path: &std::path::Path) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    let (models, providers) = (cfg.model_order.len(), cfg.providers.len());
    let plugins = cfg.file.plugins.len()
        + cfg
            .file
            .models
            .iter()
            .map(|m| m.plugins.len())
            .sum::<usize>();
    let services = match Services::unregistered(Arc::new(weir::state::MemoryStore::new())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Snapshot::build(cfg, &services) {
        Ok(_) => {
            println!(
                "{}: ok ({models} models, {providers} providers enabled, {plugins} plugin instances)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn serve(path: PathBuf, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    // rustls needs one process-wide crypto provider; ring is built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = Config::load(&path)?;
    telemetry::init_logging(config.log_format, &config.log_level);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if let Some(addr) = listen {
        config.listen = addr;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = config.listen;
        let grace = config.shutdown_grace;
        let limits = config.connections;
        let metrics = Metrics::new()?;
        let models = config.model_order.len();
        let admin = config.admin.clone();
        // One state store per process (sled locks its directory); with Redis, the request
        // log still stays in a local sled store.
        let stores = weir::state::open_stores(&config.file.state, &path)?;
        let state = stores.shared.clone();
        for collector in state.metrics() {
            metrics.registry.register(collector)?;
        }
        let services = Services::new(state.clone(), &metrics)?;
        // Loading plugins compiles WASM and runs `init`: keep it off the async workers.
        let snapshot =
            tokio::task::spawn_blocking(move || Snapshot::build(config, &services)).await??;
        let (gw, reloader) = weir::reload::Reloader::start(snapshot, metrics, state.clone())?;
        start_lifecycle(&reloader, &admin, stores.local.clone()).await?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, models, config = %path.display(), "Weir is serving.");
        weir::server::serve(listener, gw.clone(), limits, grace).await?;
        // Plugins' on_log settles reservations and usage: let the queue empty first.
        let left = tokio::task::spawn_blocking(move || gw.on_log.drain(Duration::from_secs(5)))
            .await
            .unwrap_or(0);
        if left > 0 {
            tracing::warn!(left, "Stopped with on_log hooks still queued.");
        }
        // State changes live in memory until written behind: write the last ones to disk.
        // A store that cannot (a full disk) is left unclosed rather than panicking in its
        // destructor, and the exit status says the last changes are lost.
        let local = stores.local;
        if let Err(e) = tokio::task::spawn_blocking(move || {
            state.flush()?;
            local.flush()
        })
        .await?
        {
            tracing::error!(error = %e, "State flush at shutdown failed; unsaved changes are lost.");
            anyhow::bail!("stopped without saving state: {e}");
        }
        tracing::info!("Weir stopped.");
        Ok(())
    })
}

/// Hot reload (file watcher, SIGHUP), the request log and the admin listener.
async fn start_lifecycle(
    reloader: &Arc<weir::reload::Reloader>,
    admin: &weir::config::Admin,
    state: Arc<dyn weir::state::StateStore>,
) -> anyhow::Result<()> {
    weir::reload::spawn_watcher(reloader.clone())?;
    weir::reload::spawn_sighup(reloader.clone())?;
    if admin.token.is_none() {
        tracing::info!(
            "Admin API off: set `[admin] token = \"${{WEIR_ADMIN_TOKEN}}\"` and export WEIR_ADMIN_TOKEN (16+ characters) to enable it."
        );
        return Ok(());
    }
    let gw = reloader.gateway();
    let log = if admin.request_log_max_records > 0 {
        let (log, tx) = weir::requestlog::RequestLog::start(
            state,
            admin.request_log_max_records,
            &gw.metrics.registry,
        )?;
        gw.request_log.install(&log, tx);
        Some(log)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", admin.listen))?;
    tracing::info!(addr = %admin.listen, "Admin API listening.");
    weir::admin::spawn(
        listener,
        weir::admin::AdminState {
            reloader: reloader.clone(),
            log,
        },
    );
    Ok(())
}
