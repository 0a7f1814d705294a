//! Our TLS stream (rustls' handshake, our own record protection) against stock rustls on the
//! other end, each way: bytes echoed intact across many key updates sent by either side, and
//! close_notify each way. If a record we seal or a key update we send were not what TLS 1.3
//! says, rustls would refuse it; if we misread one of its, our opener would.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};

use common::tls_configs;
use monoio::net::{TcpListener, TcpStream};
use shoal_hbone::stream::{self, TlsStream};
use shoal_hbone::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL_BYTES: usize = 8 * 1024 * 1024;
const CHUNK_BYTES: usize = 64 * 1024;
/// Our side updates its key every few records; the stock side asks for an update this often.
const OUR_RECORDS_PER_KEY: u64 = 5;
const THEIR_KEY_UPDATE_EVERY_BYTES: usize = 512 * 1024;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 9)) as u8
}

/// The stock side: echoes what it reads, asking for a key update every so often, until the
/// peer's close_notify; then sends its own. Returns the bytes echoed.
fn stock_echo<C, S>(mut tls: rustls::StreamOwned<C, StdStream>) -> usize
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let mut buf = vec![0u8; CHUNK_BYTES];
    let (mut echoed, mut next_update) = (0, THEIR_KEY_UPDATE_EVERY_BYTES);
    loop {
        // A clean end (close_notify) reads as 0; an end without one is an error in rustls.
        let n = tls.read(&mut buf).expect("stock side reads");
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n]).expect("stock side writes");
        echoed += n;
        if echoed >= next_update {
            tls.conn.refresh_traffic_keys().expect("key update");
            next_update += THEIR_KEY_UPDATE_EVERY_BYTES;
        }
    }
    tls.conn.send_close_notify();
    tls.flush().expect("close_notify sent");
    echoed
}

/// Our side: sends the pattern a chunk at a time and reads each chunk's echo, then closes.
async fn our_exchange(tls: &mut TlsStream) {
    tls.set_records_per_key(OUR_RECORDS_PER_KEY);
    let mut sent = 0;
    let mut back = vec![0u8; CHUNK_BYTES];
    while sent < TOTAL_BYTES {
        let chunk: Vec<u8> = (sent..sent + CHUNK_BYTES).map(pattern).collect();
        tls.write_all(&chunk).await.expect("our side writes");
        tls.flush().await.expect("our side flushes");
        tls.read_exact(&mut back)
            .await
            .expect("our side reads the echo");
        assert!(back == chunk, "echo differs in the chunk at {sent}");
        sent += CHUNK_BYTES;
    }
    tls.shutdown().await.expect("close_notify");
    let mut rest = Vec::new();
    let n = tls
        .read_to_end(&mut rest)
        .await
        .expect("the stock side's close_notify ends the stream cleanly");
    assert_eq!(n, 0, "nothing after the echo");
}

fn io_uring() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring")
}

#[test]
fn our_client_and_a_stock_rustls_server_agree_across_key_updates_and_close() {
    let (server_config, client_config) = tls_configs();
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let stock = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let conn = rustls::ServerConnection::new(server_config).expect("server connection");
        stock_echo(rustls::StreamOwned::new(conn, tcp))
    });
    io_uring().block_on(async move {
        let tcp = TcpStream::connect_addr(addr).await.expect("connect");
        let mut tls = stream::connect(tcp, addr, client_config)
            .await
            .expect("handshake with stock rustls");
        our_exchange(&mut tls).await;
    });
    assert_eq!(stock.join().expect("stock side"), TOTAL_BYTES);
}

#[test]
fn a_stock_rustls_client_and_our_server_agree_across_key_updates_and_close() {
    let (server_config, client_config) = tls_configs();
    let std_listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = std_listener.local_addr().expect("addr");
    let stock = std::thread::spawn(move || {
        let tcp = StdStream::connect(addr).expect("connect");
        let conn = rustls::ClientConnection::new(client_config, tls::server_name(addr.ip()))
            .expect("client connection");
        // The stock client speaks first here, so it drives the exchange: it sends and reads back,
        // and our server echoes.
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut back = vec![0u8; CHUNK_BYTES];
        let mut sent = 0;
        let mut next_update = THEIR_KEY_UPDATE_EVERY_BYTES;
        while sent < TOTAL_BYTES {
            let chunk: Vec<u8> = (sent..sent + CHUNK_BYTES).map(pattern).collect();
            tls.write_all(&chunk).expect("stock client writes");
            tls.read_exact(&mut back)
                .expect("stock client reads the echo");
            assert!(back == chunk, "echo differs in the chunk at {sent}");
            sent += CHUNK_BYTES;
            if sent >= next_update {
                tls.conn.refresh_traffic_keys().expect("key update");
                next_update += THEIR_KEY_UPDATE_EVERY_BYTES;
            }
        }
        tls.conn.send_close_notify();
        tls.flush().expect("close_notify sent");
        let mut rest = Vec::new();
        // Our close_notify ends it cleanly (rustls calls an end without one an error).
        tls.read_to_end(&mut rest).expect("our close_notify");
        rest.len()
    });
    io_uring().block_on(async move {
        let listener = TcpListener::from_std(std_listener).expect("listener");
        let (tcp, _) = listener.accept().await.expect("accept");
        let (mut tls, peer) = stream::accept(tcp, server_config)
            .await
            .expect("handshake with stock rustls");
        assert_eq!(peer.to_string(), "spiffe://cluster.local/ns/ns/sa/client");
        tls.set_records_per_key(OUR_RECORDS_PER_KEY);
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut echoed = 0;
        loop {
            let n = tls.read(&mut buf).await.expect("our server reads");
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await.expect("our server writes");
            tls.flush().await.expect("our server flushes");
            echoed += n;
        }
        assert_eq!(echoed, TOTAL_BYTES);
        tls.shutdown().await.expect("close_notify");
    });
    assert_eq!(stock.join().expect("stock side"), 0);
}

#[test]
fn a_tampered_record_ends_the_stream_with_an_error_not_bytes() {
    let (server_config, client_config) = tls_configs();
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    // The stock server sends one good record, then the same bytes again: a replay, which the
    // next sequence number does not open.
    let stock = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().expect("accept");
        let mut conn = rustls::ServerConnection::new(server_config).expect("server connection");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("handshake");
        }
        conn.writer().write_all(b"hello").expect("plaintext");
        let mut record = Vec::new();
        conn.write_tls(&mut record).expect("record");
        tcp.write_all(&record).expect("send");
        tcp.write_all(&record).expect("replay");
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
    });
    io_uring().block_on(async move {
        let tcp = TcpStream::connect_addr(addr).await.expect("connect");
        let mut tls = stream::connect(tcp, addr, client_config)
            .await
            .expect("handshake");
        let mut hello = [0u8; 5];
        tls.read_exact(&mut hello).await.expect("the good record");
        assert_eq!(&hello, b"hello");
        let mut more = [0u8; 16];
        let e = tls
            .read(&mut more)
            .await
            .expect_err("the replay is refused");
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
        drop(tls);
    });
    stock.join().expect("stock side");
}
