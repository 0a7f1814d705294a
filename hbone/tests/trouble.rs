//! Peers that misbehave: one stalled stream must not stall the others on its connection, a TCP
//! reset ends the stream as ztunnel ends it, and a peer that says nothing during the TLS handshake is
//! given up on, on either side.

#[path = "../../runtime/tests/common/pattern.rs"]
mod pattern;
mod common;

use std::io::Read;
use std::net::TcpListener as StdListener;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use monoio::net::{TcpListener, TcpStream};
use pattern::*;
use shoal_hbone::client::{Connection, Keepalive};
use shoal_hbone::connect::{Baggage, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::stream::{self, HandshakeError};
use shoal_hbone::Identity;
use shoal_runtime::DriverChoice;

both_drivers!(
    a_stalled_stream_does_not_stall_its_connection,
    a_client_reset_ends_the_stream_as_ztunnel_does,
    silent_peers_time_out_during_the_handshake,
    a_peer_that_stops_answering_pings_is_dropped,
    idle_pooled_connections_are_closed,
);

fn a_stalled_stream_does_not_stall_its_connection(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    // Stream A: its upstream never reads, so its 4 MiB stream window fills and stays full.
    let mut stalled = connect(n.entry);
    let (_stalled_up, _) = upstream.accept().expect("accept A");
    let stuffer = thread::spawn(move || {
        let _ = send_pattern(&mut stalled, 1, 64 * MIB);
    });
    thread::sleep(Duration::from_millis(300));
    // Stream B on the same connection must still move 32 MiB.
    let mut flowing = connect(n.entry);
    let (mut flowing_up, _) = upstream.accept().expect("accept B");
    let started = Instant::now();
    let sender = thread::spawn(move || send_pattern(&mut flowing, 2, 32 * MIB).expect("B sends"));
    let got = receive_all(&mut flowing_up).expect("B arrives");
    assert_eq!(
        got,
        (32 * MIB, sender.join().expect("sender")),
        "B's bytes all arrived"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "B was not held up by A"
    );
    let accepted = n.server.stats().sum(|s| s.connections_accepted.get());
    assert_eq!(accepted, 1, "both streams were on one connection");
    drop(n);
    drop(stuffer);
}

/// The client app resets its connection: the outbound side cancels the stream (RST_STREAM CANCEL,
/// as ztunnel does), and the far side, reading CANCEL as the end of the stream as ztunnel does,
/// ends the upstream connection cleanly; nothing hangs.
fn a_client_reset_ends_the_stream_as_ztunnel_does(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let client = connect(n.entry);
    let (mut up, _) = upstream.accept().expect("accept");
    up.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Closing with SO_LINGER 0 sends RST instead of FIN.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(client);
    let mut buf = [0u8; 64];
    match up.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the upstream should see the stream end, got {other:?}"),
    }
    drop(n);
}

fn silent_peers_time_out_during_the_handshake(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let (client_tls, server_tls) = (n.client_tls.clone(), n.server_tls.clone());
    let (client_side, server_side) = run_on(driver, move || async move {
        // A server that accepts TCP and says nothing.
        let mute_server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mute_addr = mute_server.local_addr().expect("addr");
        let held = monoio::spawn(async move { mute_server.accept().await.map(|(s, _)| s) });
        let tcp = TcpStream::connect_addr(mute_addr).await.expect("tcp");
        let client_side =
            stream::connect_within(tcp, mute_addr, client_tls, Duration::from_millis(300)).await;
        drop(held.await);

        // A client that connects and says nothing.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _mute_client = TcpStream::connect_addr(addr).await.expect("tcp");
        let (tcp, _) = listener.accept().await.expect("accept");
        let server_side = stream::accept_within(tcp, server_tls, Duration::from_millis(300))
            .await
            .map(|_| ());
        (client_side.map(|_| ()), server_side)
    });
    assert!(
        matches!(client_side, Err(HandshakeError::Timeout(_))),
        "{client_side:?}"
    );
    assert!(
        matches!(server_side, Err(HandshakeError::Timeout(_))),
        "{server_side:?}"
    );
    drop(n);
}

/// The server finishes the HTTP/2 handshake and then never reads again: no PONG comes back, and
/// the client drops the connection once its PING times out.
fn a_peer_that_stops_answering_pings_is_dropped(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let (client_tls, server_tls) = (n.client_tls.clone(), n.server_tls.clone());
    let dropped_after = run_on(driver, move || async move {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _frozen = monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (tls, _) = stream::accept(tcp, server_tls).await.expect("tls");
            let conn = h2::server::handshake(tls).await.expect("h2");
            // Hold the connection without ever polling it again.
            monoio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let keepalive = Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        };
        let conn = Connection::connect_with(addr, client_tls, keepalive)
            .await
            .expect("connect");
        let started = Instant::now();
        while !conn.is_closed() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a dead peer must be noticed"
            );
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    });
    assert!(
        dropped_after >= Duration::from_millis(300),
        "not before the PING timeout: {dropped_after:?}"
    );
    drop(n);
}

/// A pooled connection with no streams left is closed once idle long enough, and the server sees
/// it go.
fn idle_pooled_connections_are_closed(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let upstream_addr = upstream.local_addr().expect("addr");
    let n = nodes(driver, upstream_addr, Options::default());
    let (hbone, client_tls) = (n.hbone, n.client_tls.clone());
    let acceptor = thread::spawn(move || upstream.accept().map(|(s, _)| s));
    let (before, after) = run_on(driver, move || async move {
        let pool = Pool::new(move |_| Ok(client_tls.clone()));
        let id = |sa: &str| Identity::new("cluster.local", "default", sa).expect("id");
        let key = PoolKey::new(id("productpage"), vec![id("reviews")], hbone, None);
        let request = OutboundConnect {
            authority: upstream_addr,
            client: "127.0.0.1:40000".parse().expect("addr"),
            service_host: None,
            baggage: Baggage::default(),
            trace: ([3; 16], [4; 8]),
        };
        let pooled = pool.open(&key, &request).await.expect("stream");
        drop(pooled);
        let before = pool.open_connections();
        pool.close_idle(Duration::ZERO);
        let after = pool.open_connections();
        // Let the connection's own task see its last handle go, send GOAWAY and close.
        monoio::time::sleep(Duration::from_millis(200)).await;
        (before, after)
    });
    drop(acceptor.join());
    assert_eq!((before, after), (1, 0), "the idle connection left the pool");
    let deadline = Instant::now() + Duration::from_secs(5);
    while n.server.stats().sum(|s| s.connections_active.get()) > 0 {
        assert!(
            Instant::now() < deadline,
            "the server sees the idle connection closed"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(n);
}
