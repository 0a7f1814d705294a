//! The per-shard pool under load and under trouble: a thousand streams open at once spread over
//! exactly as many connections as the stream limit needs, with every byte accounted for; a GOAWAY
//! mid-traffic lets open streams finish while new ones go to a fresh connection; a reader that
//! stops holds its sender back instead of growing memory.

#[path = "../../runtime/tests/common/pattern.rs"]
mod pattern;
mod common;

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use pattern::*;
use shoal_hbone::connect::{Baggage, OutboundConnect};
use shoal_hbone::pool::{Pool, PoolKey};
use shoal_hbone::Identity;
use shoal_runtime::DriverChoice;

both_drivers!(
    a_thousand_concurrent_streams_every_byte_accounted,
    goaway_mid_traffic_lets_open_streams_finish,
    a_reader_that_stops_holds_the_sender_back,
    a_broken_connection_does_not_fail_the_next_stream,
);

/// An upstream that accepts `count` connections, holding them until all have arrived (so every
/// stream is open at once), then echoes each.
fn gathering_echo(driver: DriverChoice, count: usize) -> (SocketAddr, thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = thread::spawn(move || {
        run_on(driver, move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(listener.accept().await.expect("accept").0);
            }
            let tasks: Vec<_> = held.into_iter().map(|s| monoio::spawn(echo(s))).collect();
            for t in tasks {
                t.await;
            }
        })
    });
    (rx.recv().expect("upstream address"), t)
}

async fn echo(mut s: TcpStream) {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let (r, b) = s.read(buf).await;
        buf = b;
        if !matches!(r, Ok(n) if n > 0) {
            break;
        }
        // Writes what the read put in (its length); the next read refills from the start.
        let (w, b) = s.write_all(buf).await;
        buf = b;
        if w.is_err() {
            break;
        }
    }
    let _ = s.shutdown().await;
}

fn a_thousand_concurrent_streams_every_byte_accounted(driver: DriverChoice) {
    const STREAMS: usize = 1000;
    const BYTES_EACH: usize = 16 * 1024;
    let (upstream, echo_thread) = gathering_echo(driver, STREAMS);
    let n = nodes(driver, upstream, Options::default());
    let entry = n.entry;
    let ok = run_on(driver, move || async move {
        let ok = Rc::new(Cell::new(0usize));
        let tasks: Vec<_> = (0..STREAMS)
            .map(|i| {
                let ok = ok.clone();
                monoio::spawn(async move {
                    let mut payload = vec![0u8; BYTES_EACH];
                    Pattern::new(1000 + i as u64).fill(&mut payload);
                    let expected = crc32fast::hash(&payload);
                    let mut s = TcpStream::connect_addr(entry).await.expect("connect");
                    let (w, _) = s.write_all(payload).await;
                    w.expect("write");
                    s.shutdown().await.expect("fin");
                    let mut got = Vec::with_capacity(BYTES_EACH);
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let (r, b) = s.read(buf).await;
                        buf = b;
                        match r.expect("read") {
                            0 => break,
                            k => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    if got.len() == BYTES_EACH && crc32fast::hash(&got) == expected {
                        ok.set(ok.get() + 1);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        ok.get()
    });
    echo_thread.join().expect("echo");
    assert_eq!(ok, STREAMS, "every stream got every byte back intact");
    // All open at once, a connection taking 99: ceil(1000 / 99) = 11 connections, made one at a time.
    let accepted = n.server.stats().sum(|s| s.connections_accepted.get());
    assert_eq!(
        accepted, 11,
        "1000 concurrent streams need 11 pooled connections"
    );
    drop(n);
}

fn goaway_mid_traffic_lets_open_streams_finish(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    // Every HBONE connection gets GOAWAY 300 ms after it opens.
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options {
            goaway_after: Some(Duration::from_millis(300)),
            ..Options::default()
        },
    );
    let mut first = connect(n.entry);
    let (mut first_up, _) = upstream.accept().expect("first stream arrives");
    // Keep the first stream busy across the GOAWAY: 8 MiB in slow pieces over ~0.8 s.
    let sender = thread::spawn(move || {
        use std::io::Write;
        let mut pattern = Pattern::new(77);
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..8 {
            pattern.fill(&mut buf);
            first
                .write_all(&buf)
                .expect("the open stream keeps going after GOAWAY");
            crc.update(&buf);
            thread::sleep(Duration::from_millis(100));
        }
        first.shutdown(std::net::Shutdown::Write).expect("fin");
        crc.finalize()
    });
    thread::sleep(Duration::from_millis(500));
    // After the GOAWAY: a new stream must succeed, on a fresh connection.
    let mut second = connect(n.entry);
    let (mut second_up, _) = upstream
        .accept()
        .expect("a new stream after GOAWAY reaches the upstream");
    let sent = send_pattern(&mut second, 78, MIB).expect("second stream");
    assert_eq!(receive_all(&mut second_up).expect("second"), (MIB, sent));
    assert_eq!(
        receive_all(&mut first_up).expect("first"),
        (8 * MIB, sender.join().expect("sender"))
    );
    let accepted = n.server.stats().sum(|s| s.connections_accepted.get());
    assert_eq!(
        accepted, 2,
        "the stream after GOAWAY went to a new connection"
    );
    drop(n);
}

fn a_reader_that_stops_holds_the_sender_back(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let client = connect(n.entry);
    let (mut server, _) = upstream.accept().expect("accept");
    let total = 256 * MIB;
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let sender = thread::spawn(move || {
        use std::io::Write;
        let mut client = client;
        let mut pattern = Pattern::new(9);
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..k]);
            client.write_all(&buf[..k]).expect("write");
            crc.update(&buf[..k]);
            left -= k as u64;
            progress.fetch_add(k as u64, Ordering::Relaxed);
        }
        client.shutdown(std::net::Shutdown::Write).expect("fin");
        crc.finalize()
    });
    thread::sleep(Duration::from_millis(1500));
    let stalled_at = written.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        written.load(Ordering::Relaxed),
        stalled_at,
        "the sender is held back while the reader stops"
    );
    // In flight at most: socket buffers on three TCP legs plus one 4 MiB stream window.
    assert!(
        stalled_at < 48 * MIB,
        "{} MiB got in while the reader stopped",
        stalled_at / MIB
    );
    assert_eq!(
        receive_all(&mut server).expect("reader resumes"),
        (total, sender.join().expect("sender"))
    );
    drop(n);
}

/// The path under a pooled connection dies (both directions cut, as a dead network would). The
/// next stream must not fail: it goes on a fresh connection.
fn a_broken_connection_does_not_fail_the_next_stream(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let relay = Relay::new();
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options {
            relay: Some(relay.clone()),
            ..Options::default()
        },
    );
    for round in 0..3u64 {
        let mut client = connect(n.entry);
        let (mut up, _) = upstream
            .accept()
            .expect("every stream reaches the upstream");
        let sent = send_pattern(&mut client, 500 + round, MIB).expect("send");
        assert_eq!(
            receive_all(&mut up).expect("receive"),
            (MIB, sent),
            "round {round}"
        );
        drop(client);
        relay.cut();
    }
    let accepted = n.server.stats().sum(|s| s.connections_accepted.get());
    assert_eq!(
        accepted, 3,
        "each round after a cut used a fresh HBONE connection"
    );
    drop(n);
}

/// `open`'s future is part of its caller's for as long as the caller lives: in ztunnel, every
/// connection's task. With the handshakes inline it was 5,632 bytes in the test profile (the
/// handshakes' own 5,120).
#[test]
fn opening_a_pooled_tunnel_is_a_small_future() {
    let bytes = run_on(DriverChoice::Auto, || async {
        let pool = Pool::new(|_| Err(rustls::Error::General("not dialled".into())));
        let id = |sa: &str| Identity::new("cluster.local", "default", sa).expect("identity");
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let key = PoolKey::new(id("a"), vec![id("b")], peer, None);
        let request = OutboundConnect {
            authority: peer,
            client: peer,
            service_host: None,
            baggage: Baggage::default(),
            trace: ([0; 16], [0; 8]),
        };
        let open = pool.open(&key, &request);
        std::mem::size_of_val(&open)
    });
    assert!(bytes <= 1024, "open's future is {bytes} bytes");
}
