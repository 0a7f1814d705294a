//! `waypoint`: shoal's L7 proxy (ambient mode's waypoint).

use std::process::ExitCode;

use clap::Parser;
use shoal_waypoint::node::{self, WaypointArgs};

#[derive(Parser)]
#[command(
    name = "waypoint",
    version,
    about = "shoal's L7 proxy (ambient mode's waypoint)"
)]
struct Cli {
    #[command(flatten)]
    args: WaypointArgs,
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
            eprintln!("waypoint: {e}");
            ExitCode::FAILURE
        }
    }
}
