//! HBONE → TCP with a real h2 peer and a real socket on loopback: DATA chunks the connection has
//! already received for a stream leave in one `writev`, not one write (and one turn of the
//! reactor) each, and every byte still arrives in order, then the FIN.

mod common;

use std::cell::Cell;
use std::future::poll_fn;
use std::io::Read;
use std::net::TcpListener as StdListener;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::{TcpListener, TcpStream};
use monoio::BufResult;
use shoal_hbone::tunnel::{self, h2_to_tcp, WRITE_GATHER_MAX_BYTES};
use shoal_runtime::stream::CompletionStream;
use shoal_runtime::{DriverChoice, ReadEnded};

both_drivers!(chunks_received_together_leave_in_one_write);

const CHUNK_BYTES: usize = 64 * 1024;
const CHUNKS: usize = 16;

/// A socket's write half that counts the writes made on it.
struct Counted<W> {
    inner: W,
    writes: usize,
}

impl<W: AsyncWriteRent> AsyncWriteRent for Counted<W> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.writes += 1;
        self.inner.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf_vec: T) -> BufResult<usize, T> {
        self.writes += 1;
        self.inner.writev(buf_vec).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown().await
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn chunks_received_together_leave_in_one_write(driver: DriverChoice) {
    // The TCP side's peer: reads everything until the FIN.
    let sink = StdListener::bind(loopback()).expect("sink");
    let sink_addr = sink.local_addr().expect("addr");
    let reader = thread::spawn(move || {
        let (mut app, _) = sink.accept().expect("accept");
        let mut got = Vec::new();
        app.read_to_end(&mut got).expect("read to the FIN");
        got
    });

    let writes = run_on(driver, || async move {
        let listener = TcpListener::bind(loopback()).expect("h2 listener");
        let addr = listener.local_addr().expect("addr");
        // The sender: 16 chunks of 64 KiB and END_STREAM, within the stream's window.
        monoio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect h2");
            let (mut client, conn) = h2::client::Builder::new()
                .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
                .max_frame_size(tunnel::MAX_FRAME_BYTES)
                .handshake::<_, Bytes>(CompletionStream::new(tcp))
                .await
                .expect("h2 client handshake");
            monoio::spawn(async move {
                let _ = conn.await;
            });
            poll_fn(|cx| client.poll_ready(cx)).await.expect("ready");
            let request = http::Request::post("http://sink/")
                .body(())
                .expect("request");
            let (_response, mut send) = client.send_request(request, false).expect("send");
            for c in 0..CHUNKS {
                let chunk: Vec<u8> = (c * CHUNK_BYTES..(c + 1) * CHUNK_BYTES)
                    .map(pattern)
                    .collect();
                send.send_data(Bytes::from(chunk), c + 1 == CHUNKS)
                    .expect("send data");
            }
            // Keeps the connection open until the receiver is done.
            monoio::time::sleep(Duration::from_secs(30)).await;
            drop(client);
        });

        let (tcp, _) = listener.accept().await.expect("accept h2");
        let mut conn = h2::server::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW_BYTES)
            .max_frame_size(tunnel::MAX_FRAME_BYTES)
            .handshake::<_, Bytes>(CompletionStream::new(tcp))
            .await
            .expect("h2 server handshake");
        let (request, _respond) = conn.accept().await.expect("a stream").expect("no error");
        monoio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = request.into_body();
        // Everything is in before the copy starts, as when one TLS read brings several chunks.
        let deadline = Instant::now() + Duration::from_secs(10);
        while body.flow_control().used_capacity() < CHUNK_BYTES * CHUNKS {
            assert!(Instant::now() < deadline, "the stream's data never arrived");
            monoio::time::sleep(Duration::from_millis(5)).await;
        }

        let tcp = TcpStream::connect(sink_addr).await.expect("connect sink");
        let (_read, write) = tcp.into_split();
        let mut counted = Counted {
            inner: write,
            writes: 0,
        };
        let delivered = Cell::new(0u64);
        h2_to_tcp(body, &mut counted, &delivered, &ReadEnded::default())
            .await
            .expect("h2 → tcp");
        assert_eq!(delivered.get(), (CHUNK_BYTES * CHUNKS) as u64);
        let writes = counted.writes;
        drop(counted);
        writes
    });

    let got = reader.join().expect("reader");
    assert_eq!(got.len(), CHUNK_BYTES * CHUNKS, "every byte, then the FIN");
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "bytes in order"
    );
    let gathered_writes = CHUNK_BYTES * CHUNKS / WRITE_GATHER_MAX_BYTES;
    assert!(
        writes <= gathered_writes,
        "{writes} writes for {CHUNKS} chunks received together (at most {gathered_writes})"
    );
}
