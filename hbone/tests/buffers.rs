//! A pooled HBONE connection may carry a bulk transfer and then idle, or go back to requests and
//! responses, for hours. Its TLS stream's buffers grow for the bulk (a 1 MiB write buffer and its
//! spare, a 256 KiB read room); once the traffic is small again they must be given back.

#[path = "../../runtime/tests/common/pattern.rs"]
mod pattern;
mod common;

use common::*;
use monoio::net::{TcpListener, TcpStream};
use pattern::*;
use shoal_hbone::stream::{self, TlsStream};
use shoal_runtime::DriverChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

both_drivers!(a_stream_gives_its_bulk_buffers_back_once_traffic_is_small);

const BULK_BYTES: usize = 16 << 20;
const BULK_WRITE_BYTES: usize = 1 << 20;
const SMALL_MESSAGE_BYTES: usize = 100;
/// Round trips of small messages after the bulk: the first may still use the bulk buffers (a read
/// already in flight holds one), the second gives them back.
const SMALL_ROUND_TRIPS: usize = 3;
/// What a stream carrying small messages may hold: an 8 KiB read room, a record or two of write
/// buffer, and a kept spare of up to 64 KiB. A stream that kept its bulk buffers holds megabytes.
const SMALL_TRAFFIC_BUFFER_BYTES: usize = 128 * 1024;

/// Sends `BULK_BYTES` of a pattern in large writes; returns their CRC32.
async fn send_bulk(tls: &mut TlsStream, seed: u64) -> u32 {
    let (mut pattern, mut crc) = (Pattern::new(seed), crc32fast::Hasher::new());
    let mut chunk = vec![0u8; BULK_WRITE_BYTES];
    for _ in 0..BULK_BYTES / BULK_WRITE_BYTES {
        pattern.fill(&mut chunk);
        crc.update(&chunk);
        tls.write_all(&chunk).await.expect("bulk write");
    }
    tls.flush().await.expect("bulk flush");
    crc.finalize()
}

/// Reads `BULK_BYTES`; returns their CRC32.
async fn receive_bulk(tls: &mut TlsStream) -> u32 {
    let (mut buf, mut crc) = (vec![0u8; 64 * 1024], crc32fast::Hasher::new());
    let mut received = 0;
    while received < BULK_BYTES {
        let want = buf.len().min(BULK_BYTES - received);
        let n = tls.read(&mut buf[..want]).await.expect("bulk read");
        assert!(n > 0, "the stream ended after {received} bulk bytes");
        crc.update(&buf[..n]);
        received += n;
    }
    crc.finalize()
}

/// Bulk one way then the other, then small round trips: each side's buffers are then small (the
/// server's measured after its last answer, the client's after reading it).
fn a_stream_gives_its_bulk_buffers_back_once_traffic_is_small(driver: DriverChoice) {
    let (server_config, client_config) = tls_configs();
    let (server_bytes, client_bytes) = run_on(driver, || async move {
        let listener = TcpListener::bind(loopback()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (mut tls, _) = stream::accept(tcp, server_config).await.expect("handshake");
            let received = receive_bulk(&mut tls).await;
            let sent = send_bulk(&mut tls, 2).await;
            let mut message = [0u8; SMALL_MESSAGE_BYTES];
            for _ in 0..SMALL_ROUND_TRIPS {
                tls.read_exact(&mut message).await.expect("small read");
                tls.write_all(&message).await.expect("small answer");
                tls.flush().await.expect("small flush");
            }
            let held = tls.buffer_capacity_bytes();
            // Hold the stream until the client has read the last answer.
            let _ = tls.read(&mut message).await;
            (held, received, sent)
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut tls = stream::connect(tcp, addr, client_config)
            .await
            .expect("handshake");
        let sent = send_bulk(&mut tls, 1).await;
        let received = receive_bulk(&mut tls).await;
        let mut answer = [0u8; SMALL_MESSAGE_BYTES];
        for round in 0..SMALL_ROUND_TRIPS {
            let message = [round as u8; SMALL_MESSAGE_BYTES];
            tls.write_all(&message).await.expect("small write");
            tls.flush().await.expect("small flush");
            tls.read_exact(&mut answer).await.expect("small answer");
            assert_eq!(answer, message, "round {round} echoed");
        }
        let client_bytes = tls.buffer_capacity_bytes();
        drop(tls);
        let (server_bytes, server_received, server_sent) = server.await;
        assert_eq!(server_received, sent, "the client's bulk arrived intact");
        assert_eq!(received, server_sent, "the server's bulk arrived intact");
        (server_bytes, client_bytes)
    });
    for (side, bytes) in [("server", server_bytes), ("client", client_bytes)] {
        assert!(
            bytes <= SMALL_TRAFFIC_BUFFER_BYTES,
            "the {side} holds {bytes} bytes of buffers after going back to small messages"
        );
    }
}
