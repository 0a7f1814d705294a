//! Drain: once it starts, new connections are refused on every shard, an in-flight transfer
//! finishes, and a connection that will not end is closed at the deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use shoal_runtime::DriverChoice;

both_drivers!(
    in_flight_transfer_completes_and_new_connections_are_refused,
    connections_left_at_the_deadline_are_closed
);

fn in_flight_transfer_completes_and_new_connections_are_refused(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, reported) = mpsc::channel();
    let rt = start_proxy(
        config(driver, 2),
        upstream.local_addr().expect("addr"),
        reports,
    )
    .expect("proxy");
    let addr = listen_addr(&rt);
    let mut client = connect(addr);
    let server = thread::spawn(move || {
        let (mut s, _) = upstream.accept().expect("accept");
        receive_all(&mut s).expect("server reads to EOF")
    });

    // Send part of the transfer, drain, then send the rest: it must all arrive.
    let total = 16 * 1024 * 1024u64;
    let mut pattern = Pattern::new(9);
    let mut buf = vec![0u8; total as usize];
    pattern.fill(&mut buf);
    let half = buf.len() / 2;
    client.write_all(&buf[..half]).expect("first half");
    rt.begin_drain();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Queued on a listener as it closed: reset, not served. Keep trying.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error while draining: {e}"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "new connections must be refused once draining"
            ),
        }
        thread::sleep(Duration::from_millis(10));
    }

    client
        .write_all(&buf[half..])
        .expect("second half, after the drain began");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let (got, crc) = server.join().expect("server");
    assert_eq!(got, total);
    assert_eq!(crc, crc32fast::hash(&buf));
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .expect("proxy closes cleanly after the server's FIN");
    rt.join();
    // Connections that raced the drain may have reported too (reset: nobody serves them upstream).
    let delivered: Vec<u64> = reported
        .try_iter()
        .filter_map(|r| r.ok())
        .map(|r| r.a_to_b_bytes)
        .collect();
    assert!(
        delivered.contains(&total),
        "the in-flight copy finished cleanly: {delivered:?}"
    );
}

fn connections_left_at_the_deadline_are_closed(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, _reported) = mpsc::channel();
    let mut cfg = config(driver, 1);
    cfg.drain_timeout = Duration::from_millis(300);
    let rt = start_proxy(cfg, upstream.local_addr().expect("addr"), reports).expect("proxy");
    let mut idle = connect(listen_addr(&rt));
    let (_server, _) = upstream.accept().expect("accept");
    assert_eq!(echo_like_wait(&rt), 1);
    let started = Instant::now();
    rt.begin_drain();
    rt.join();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "waited for the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "did not wait past the deadline: {took:?}"
    );
    idle.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    match idle.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the idle connection must be closed by the proxy, got {other:?}"),
    }
}

/// Waits until the runtime counts the connection as open.
fn echo_like_wait(rt: &shoal_runtime::Runtime) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = rt.stats().sum(|s| s.connections_active.get());
        if open > 0 || Instant::now() > deadline {
            return open;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
