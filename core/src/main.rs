//! The `weir` command: `serve`, `check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use weir::config::Config;
use weir::pipeline::{Gateway, Snapshot};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                println!(
                    "{}: ok ({} models, {} providers enabled)",
                    config.display(),
                    cfg.model_order.len(),
                    cfg.providers.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, listen } => match serve(config, listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
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
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let addr = config.listen;
        let grace = config.shutdown_grace;
        let metrics = Metrics::new()?;
        let models = config.model_order.len();
        let snapshot = Snapshot::build(config)?;
        let gw = Arc::new(Gateway::new(snapshot, metrics));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, models, config = %path.display(), "Weir is serving.");
        weir::server::serve(listener, gw, grace).await?;
        tracing::info!("Weir stopped.");
        Ok(())
    })
}
