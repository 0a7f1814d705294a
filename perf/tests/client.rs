//! The echo clients count what happened: requests and bytes against a live server, errors against
//! a port where nobody listens.

use std::time::Duration;

use shoal_perf::client::{self, Load};
use shoal_perf::echo::EchoServer;
use shoal_runtime::{DriverChoice, RuntimeConfig};

fn load(target: std::net::SocketAddr, connections: usize) -> Load {
    Load {
        target,
        connections,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(400),
        shards: 2,
        driver: DriverChoice::Auto,
        pin: false,
    }
}

#[test]
fn request_response_and_bulk_count_against_a_live_echo_server() {
    let config = RuntimeConfig {
        shards: 1,
        pin: false,
        ..RuntimeConfig::default()
    };
    let server =
        EchoServer::start(config, "127.0.0.1:0".parse().expect("addr"), None).expect("echo");
    let rr = client::request_response(&load(server.listen_addr(), 4), 64).expect("rr");
    assert_eq!(rr.errors, 0);
    assert!(rr.requests > 100, "requests {}", rr.requests);
    assert_eq!(
        rr.rtt_ns.len(),
        rr.requests,
        "every counted request has a latency"
    );
    assert!(rr.percentile_us(0.5) > 0.0 && rr.percentile_us(0.5) <= rr.percentile_us(0.99));
    let bulk = client::bulk(&load(server.listen_addr(), 2)).expect("bulk");
    assert_eq!(bulk.errors, 0);
    assert!(bulk.bytes > 1 << 20, "bytes {}", bulk.bytes);
    server.runtime.begin_drain();
    server.runtime.join();
}

#[test]
fn connection_failures_are_counted_as_errors() {
    // Bind and drop: the port is free and refuses connections.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let rr = client::request_response(&load(addr, 3), 64).expect("rr");
    assert_eq!((rr.requests, rr.errors), (0, 3));
}
