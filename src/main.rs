//! The `app` binary: parse, set up tracing, run, map the outcome to an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person: MCP clients and CI logs keep stderr as plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = app::cli::Cli::parse();
    match app::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("app: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
