//! `ztunnel`: shoal's per-node L4 proxy.

use std::process::ExitCode;

use clap::Parser;
use shoal_ztunnel::node::{self, ZtunnelArgs};

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "shoal's per-node L4 proxy (ambient mode)"
)]
struct Cli {
    #[command(flatten)]
    args: ZtunnelArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match node::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            ExitCode::FAILURE
        }
    }
}
