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

// jemalloc, as Istio's ztunnel uses: the L7 path makes about a hundred small allocations per
// request (hyper's heads, header maps, bodies' channels), and jemalloc serves them in 6% fewer
// instructions per request than glibc's allocator (callgrind, the client sidecar at rr-50). With
// 10,000 idle connections it also held less per connection (19.6 against 24.7 KiB) when tried in
// ztunnel; ztunnel keeps glibc's, as it allocates per connection, not per request.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let _log = shoal_runtime::logging::init("info");
    match node::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shoal_runtime::logging::flush();
            eprintln!("waypoint: {e}");
            ExitCode::FAILURE
        }
    }
}
