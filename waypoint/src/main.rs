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
// Freed pages go back to the kernel after a second unused (jemalloc's default is ten), purged by
// jemalloc's own background thread: jemalloc otherwise purges only while the arena allocates, so
// a proxy that went idle after a burst kept the burst's pages for good. After `bench compare`'s
// bulk phase the server sidecar held 22.9 MiB, of which ~7 were freed pages; 16.5 with this.
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 94] =
    b"tcache_nslots_small_min:64,slab_sizes:8192-8192:16,background_thread:true,dirty_decay_ms:1000\0";

fn main() -> ExitCode {
    let _log = shoal_runtime::logging::init("info");
    shoal_runtime::memory::set_allocator_report(jemalloc_report);
    match node::run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shoal_runtime::logging::flush();
            eprintln!("waypoint: {e}");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc's account for `/memory`: what the program holds, what jemalloc has in pages for it,
/// and the freed pages it has not given back yet (`dirty_bytes`; purged after a second).
fn jemalloc_report() -> serde_json::Value {
    use tikv_jemalloc_ctl::{epoch, raw, stats};
    // The statistics are a snapshot taken at each epoch.
    if let Err(e) = epoch::advance() {
        return serde_json::json!({ "name": "jemalloc", "error": e.to_string() });
    }
    // SAFETY: both names are size_t statistics (`arenas.page`, and the summed arenas' dirty page
    // count under MALLCTL_ARENAS_ALL, 4096).
    let (page, dirty_pages) = unsafe {
        (
            raw::read::<usize>(b"arenas.page\0").ok(),
            raw::read::<usize>(b"stats.arenas.4096.pdirty\0").ok(),
        )
    };
    serde_json::json!({
        "name": "jemalloc",
        "in_use_bytes": stats::allocated::read().ok(),
        "active_bytes": stats::active::read().ok(),
        "resident_bytes": stats::resident::read().ok(),
        "mapped_bytes": stats::mapped::read().ok(),
        "retained_bytes": stats::retained::read().ok(),
        "dirty_bytes": page.zip(dirty_pages).map(|(p, n)| p * n),
    })
}
