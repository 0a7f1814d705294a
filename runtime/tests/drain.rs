//! Drain: once it starts, new connections are refused on every shard, an in-flight transfer
//! finishes, and a connection that will not end is closed at the deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use shoal_runtime::{DriverChoice, ListenerSpec, Runtime};

both_drivers!(
    in_flight_transfer_completes_and_new_connections_are_refused,
    connections_queued_when_the_drain_starts_are_served,
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

/// Connections whose handshake the kernel completed before the drain, but which the shard had not
/// accepted yet (it was busy), are served like any other: their clients may already have sent a
/// request. Here the shard's one thread is held by the first connection while the others queue.
fn connections_queued_when_the_drain_starts_are_served(driver: DriverChoice) {
    const QUEUED: usize = 8;
    let (blocked_tx, blocked) = mpsc::channel::<()>();
    let blocked_tx = std::sync::Mutex::new(Some(blocked_tx));
    let rt = Runtime::builder(config(driver, 1))
        .listener(ListenerSpec::new("echo", loopback()))
        .start(move |shard| {
            // The first connection holds the shard's thread (a blocking sleep) until the drain
            // has begun; every later one is echoed.
            let first = blocked_tx.lock().ok().and_then(|mut t| t.take());
            async move {
                let mut first = first;
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |stream, _peer| {
                            let pool = shard.pool().clone();
                            let hold = first.take();
                            async move {
                                if let Some(hold) = hold {
                                    let _ = hold.send(());
                                    thread::sleep(Duration::from_millis(500));
                                }
                                use monoio::io::Splitable;
                                let (r, w) = stream.into_split();
                                let bytes = std::cell::Cell::new(0);
                                let _ = shoal_runtime::copy_one_way(r, w, &pool, &bytes).await;
                            }
                        })
                        .await;
                }
            }
        })
        .expect("echo runtime");
    let addr = listen_addr(&rt);
    let mut holder = connect(addr);
    holder.write_all(b"first").expect("first");
    blocked
        .recv_timeout(Duration::from_secs(5))
        .expect("the shard took the first connection");
    // The shard is held: these complete their handshakes in the kernel and wait in its queue.
    let mut queued: Vec<TcpStream> = (0..QUEUED).map(|_| connect(addr)).collect();
    for (i, conn) in queued.iter_mut().enumerate() {
        conn.write_all(format!("queued {i}").as_bytes())
            .expect("request sent while queued");
        conn.shutdown(Shutdown::Write).expect("half-close");
    }
    rt.begin_drain();
    for (i, conn) in queued.iter_mut().enumerate() {
        let mut back = Vec::new();
        let answer = conn.read_to_end(&mut back).map(|_| back);
        assert_eq!(
            answer.ok().as_deref(),
            Some(format!("queued {i}").as_bytes()),
            "queued connection {i} was served after the drain began"
        );
    }
    holder.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    holder.read_to_end(&mut back).expect("first echoed");
    assert_eq!(back, b"first");
    rt.join();
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("the drained runtime must refuse new connections: {other:?}"),
    }
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
