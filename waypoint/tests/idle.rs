//! A waypoint that goes quiet after a burst of traffic gives back what the burst left in its
//! allocator, and says so on `/memory` (jemalloc on its own purges only while the arena
//! allocates, so an idle proxy would keep its busiest moment's pages for good); then it sleeps,
//! its kept-alive upstream connections included (their sweep used to wake the shard every second).

mod common;

use std::time::{Duration, Instant};

use common::*;
use shoal_perf::process::tree_context_switches;

const NET: u8 = 53;
/// Four callers at once, each fetching this much twice, through the waypoint.
const BODY_BYTES: usize = 8 << 20;
/// What jemalloc may still hold in freed pages once the waypoint has been quiet a while.
const DIRTY_AFTER_IDLE_MAX_BYTES: u64 = 512 << 10;
/// How long the quiet waypoint's wake-ups are counted.
const QUIET_S: u64 = 3;

#[test]
fn an_idle_waypoint_gives_freed_pages_back_and_sleeps() {
    let mesh = WaypointProcessMesh::start(NET, "warn", &[]);
    let admin = mesh.waypoint().admin.expect("the waypoint's admin address");

    let url = format!("http://{}/bytes/{BODY_BYTES}", on(NET, "10.40.0.1:9080"));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (socks, url) = (mesh.a.socks5_addr(), url.clone());
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let (code, response) = curl(
                        NET,
                        "127.40.0.1",
                        socks,
                        &url,
                        &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
                    );
                    assert_eq!(
                        (code, response.as_str()),
                        (0, format!("200 {BODY_BYTES}").as_str())
                    );
                }
            })
        })
        .collect();
    for caller in callers {
        caller.join().expect("a caller");
    }

    let dirty_bytes = || {
        let answer = admin_get(admin, "/memory");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let report: serde_json::Value = serde_json::from_str(body).expect("/memory is JSON");
        assert_eq!(report["allocator"]["name"], "jemalloc", "{report}");
        assert!(report["rss_bytes"].as_u64() > Some(0), "{report}");
        report["allocator"]["dirty_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no dirty_bytes in {report}"))
    };
    // Purged a second after they were freed: well within five.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut dirty = dirty_bytes();
    while dirty > DIRTY_AFTER_IDLE_MAX_BYTES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        dirty = dirty_bytes();
    }
    assert!(
        dirty <= DIRTY_AFTER_IDLE_MAX_BYTES,
        "the idle waypoint still holds {dirty} bytes of freed pages"
    );
    // The purge done, nothing is left to wake for: not the allocator's thread, not the sweep of
    // the upstream connections the transfers left kept alive (for an hour, by default).
    std::thread::sleep(Duration::from_millis(1500));
    let before = tree_context_switches(mesh.waypoint().pid());
    std::thread::sleep(Duration::from_secs(QUIET_S));
    let per_second = (tree_context_switches(mesh.waypoint().pid()) - before) / QUIET_S;
    assert!(
        per_second <= 1,
        "{per_second} context switches a second in an idle waypoint"
    );

    mesh.stop();
}
