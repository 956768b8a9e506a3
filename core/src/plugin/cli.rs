//! `weir plugin test PATH` and `weir plugin new --lang rust|lua NAME`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::harness::run_fixtures;
use super::scaffold::{Lang, new_plugin};

/// `weir plugin ...`.
#[derive(Debug, clap::Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PluginCommand {
    /// Run a plugin offline against the fixtures in its folder (`fixtures/*.json`); prints a
    /// pass/fail table. Exit code 0 when every fixture passes.
    Test {
        /// The plugin folder (holding plugin.toml).
        path: PathBuf,
    },
    /// Create a working plugin (manifest, code, README, fixtures) to start from.
    New {
        /// `rust` (a WASM component with weir-sdk) or `lua` (a Luau script).
        #[arg(long)]
        lang: Lang,
        /// Plugin name; also the folder created.
        name: String,
        /// Where to create the folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// Runs a `weir plugin` subcommand.
pub fn run(args: PluginArgs) -> ExitCode {
    match args.command {
        PluginCommand::Test { path } => match run_fixtures(&path) {
            Ok(report) => {
                let mut out = std::io::stdout().lock();
                if let Err(e) = report.print(&mut out) {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        PluginCommand::New { lang, name, dir } => match new_plugin(lang, &name, &dir) {
            Ok(path) => {
                println!("created {}", path.display());
                match lang {
                    Lang::Lua => println!("next: weir plugin test {}", path.display()),
                    Lang::Rust => println!(
                        "next: build it (see {}/README.md), then weir plugin test {}",
                        path.display(),
                        path.display()
                    ),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
