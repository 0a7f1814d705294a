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
    let _log = shoal_runtime::logging::init("info");
    match node::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shoal_runtime::logging::flush();
            eprintln!("ztunnel: {e}");
            ExitCode::FAILURE
        }
    }
}
