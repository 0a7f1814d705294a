//! The copy path through a proxy on the runtime, between real peers on loopback: bytes intact both
//! ways, half-close carried each way, and a stalled reader held back without memory growth.

mod common;

use std::net::{Shutdown, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::*;
use shoal_runtime::{DriverChoice, PoolConfig};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

both_drivers!(
    one_gib_each_way_arrives_intact,
    client_half_close_then_server_keeps_sending,
    server_half_close_then_client_keeps_sending,
    a_stalled_reader_is_held_back_within_the_pool_cap,
);

fn one_gib_each_way_arrives_intact(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, reported) = mpsc::channel();
    let rt = start_proxy(
        config(driver, 1),
        upstream.local_addr().expect("addr"),
        reports,
    )
    .expect("proxy");
    let mut client = connect(listen_addr(&rt));
    let (mut server, _) = upstream.accept().expect("accept");

    // Both ends send 1 GiB and read 1 GiB at the same time, then each sends FIN.
    let mut server_tx = server.try_clone().expect("clone");
    let server_sender =
        thread::spawn(move || send_pattern(&mut server_tx, 2, GIB).expect("server sends"));
    let server_receiver = thread::spawn(move || receive_all(&mut server).expect("server receives"));
    let mut client_tx = client.try_clone().expect("clone");
    let client_sender =
        thread::spawn(move || send_pattern(&mut client_tx, 1, GIB).expect("client sends"));
    let (client_got, client_crc) = receive_all(&mut client).expect("client receives");

    let client_sent_crc = client_sender.join().expect("client sender");
    let server_sent_crc = server_sender.join().expect("server sender");
    let (server_got, server_crc) = server_receiver.join().expect("server receiver");
    assert_eq!(server_got, GIB);
    assert_eq!(client_got, GIB);
    assert_eq!(server_crc, client_sent_crc, "client → server bytes intact");
    assert_eq!(client_crc, server_sent_crc, "server → client bytes intact");
    let report = reported
        .recv_timeout(Duration::from_secs(10))
        .expect("report")
        .expect("copy ok");
    assert_eq!((report.a_to_b_bytes, report.b_to_a_bytes), (GIB, GIB));

    // A warm pool: this connection needed at most a small and a large buffer per direction.
    let stats = rt.stats().shards()[0].clone();
    assert!(
        stats.small_buffers.allocated.get() <= 2,
        "{:?}",
        stats.small_buffers
    );
    assert!(
        stats.large_buffers.allocated.get() <= 2,
        "{:?}",
        stats.large_buffers
    );
    assert_eq!(
        stats.small_buffers.in_use.get() + stats.large_buffers.in_use.get(),
        0,
        "all returned"
    );
    rt.begin_drain();
    rt.join();
}

/// The client sends and closes its side first; the server reads to EOF (which must arrive through
/// the proxy) and only then answers, over the half that is still open.
fn client_half_close_then_server_keeps_sending(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, reported) = mpsc::channel();
    let rt = start_proxy(
        config(driver, 1),
        upstream.local_addr().expect("addr"),
        reports,
    )
    .expect("proxy");
    let mut client = connect(listen_addr(&rt));
    let server = thread::spawn(move || {
        let (mut s, _) = upstream.accept().expect("accept");
        let got = receive_all(&mut s).expect("server reads to EOF");
        let sent = send_pattern(&mut s, 4, 64 * MIB).expect("server answers after EOF");
        (got, sent)
    });
    let sent = send_pattern(&mut client, 3, 64 * MIB).expect("client sends and shuts down");
    let (got, crc) = receive_all(&mut client).expect("client still reads");
    let ((server_got, server_crc), server_sent) = server.join().expect("server");
    assert_eq!((server_got, server_crc), (64 * MIB, sent));
    assert_eq!((got, crc), (64 * MIB, server_sent));
    let report = reported
        .recv_timeout(Duration::from_secs(10))
        .expect("report")
        .expect("copy ok");
    assert_eq!(
        (report.a_to_b_bytes, report.b_to_a_bytes),
        (64 * MIB, 64 * MIB)
    );
    rt.begin_drain();
    rt.join();
}

/// The mirror image: the server sends everything and closes its side first; the client reads to
/// EOF and then sends over its still-open half.
fn server_half_close_then_client_keeps_sending(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, _reported) = mpsc::channel();
    let rt = start_proxy(
        config(driver, 1),
        upstream.local_addr().expect("addr"),
        reports,
    )
    .expect("proxy");
    let mut client = connect(listen_addr(&rt));
    let server = thread::spawn(move || {
        let (mut s, _) = upstream.accept().expect("accept");
        let sent = send_pattern(&mut s, 5, 32 * MIB).expect("server sends and shuts down");
        let got = receive_all(&mut s).expect("server still reads");
        (sent, got)
    });
    let (got, crc) = receive_all(&mut client).expect("client reads to EOF");
    let sent = send_pattern(&mut client, 6, 32 * MIB).expect("client sends after EOF");
    let (server_sent, server_got) = server.join().expect("server");
    assert_eq!((got, crc), (32 * MIB, server_sent));
    assert_eq!(server_got, (32 * MIB, sent));
    rt.begin_drain();
    rt.join();
}

/// The server stops reading for a while. The proxy must stop reading from the client too
/// (backpressure), hold no more buffers than its cap, and deliver everything once the server reads.
fn a_stalled_reader_is_held_back_within_the_pool_cap(driver: DriverChoice) {
    let upstream = TcpListener::bind(loopback()).expect("upstream");
    let (reports, _reported) = mpsc::channel();
    let mut cfg = config(driver, 1);
    cfg.pool = PoolConfig {
        small_buffers_max: 4,
        large_buffers_max: 2,
    };
    let cap_bytes = cfg.pool.max_bytes() as u64;
    let rt = start_proxy(cfg, upstream.local_addr().expect("addr"), reports).expect("proxy");
    let client = connect(listen_addr(&rt));
    let (mut server, _) = upstream.accept().expect("accept");

    let total = 256 * MIB;
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let mut client_tx = client.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        use std::io::Write;
        let mut pattern = Pattern::new(7);
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            client_tx.write_all(&buf[..n]).expect("write");
            crc.update(&buf[..n]);
            left -= n as u64;
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        client_tx.shutdown(Shutdown::Write).expect("shutdown");
        crc.finalize()
    });

    thread::sleep(Duration::from_millis(1500));
    let stalled_at = written.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        written.load(Ordering::Relaxed),
        stalled_at,
        "the client is held back while the server stalls"
    );
    // What can be in flight: the kernel's socket buffers on both legs plus the proxy's buffers.
    assert!(
        stalled_at < 64 * MIB,
        "only socket buffers' worth got through: {} MiB",
        stalled_at / MIB
    );
    let stats = rt.stats().shards()[0].clone();
    let held =
        stats.small_buffers.high_water.get() * 4096 + stats.large_buffers.high_water.get() * 65536;
    assert!(
        held <= cap_bytes,
        "pool stayed under its cap: {held} > {cap_bytes}"
    );

    let (got, crc) = receive_all(&mut server).expect("server reads everything");
    assert_eq!(got, total);
    assert_eq!(crc, sender.join().expect("sender"));
    drop(client);
    rt.begin_drain();
    rt.join();
}
