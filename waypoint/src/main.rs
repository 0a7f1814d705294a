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

// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment still overrides
// them). Each thread caches at least 64 freed objects of every small size class, not 20: with
// fewer, a connection's 8 KiB buffers (hyper's reads) went back to the arena between
// connections and came out of a fresh slab for the next one, about 5,000 instructions a new
// connection (callgrind, the client sidecar in compare's new-conn phase: 85.9k instructions per
// connection, 80.7k with this). The cache's periodic trimming still gives back what goes unused.
// The 8 KiB class's slabs are 64 KiB (8 buffers) instead of one buffer each: hyper's read and write
// buffers are 8 KiB, a new connection takes three, and refilling the cache took a slab apiece
// from the page allocator (77.5k instructions per connection in the same count, 71.7–74.6k with
// this).
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 51] = b"tcache_nslots_small_min:64,slab_sizes:8192-8192:16\0";

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
