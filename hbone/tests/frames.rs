//! The DATA frames a tunnelled TCP stream becomes, with a real h2 peer on loopback: when the
//! receiver falls behind and hands window back a little at a time, the sender still sends whole
//! 64 KiB chunks rather than a frame per window update (which, through two ztunnels, settled at
//! 16 KiB frames: a TLS write and a wake-up per 16 KiB on both sides).

mod common;

use std::future::{poll_fn, Future};
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread;

use bytes::Bytes;
use common::*;
use monoio::io::Splitable;
use monoio::net::{TcpListener, TcpStream};
use shoal_hbone::tunnel::{self, tcp_to_h2, SEND_COALESCE_BYTES};
use shoal_runtime::stream::CompletionStream;
use shoal_runtime::{DriverChoice, ReadEnded};

both_drivers!(a_receiver_that_falls_behind_still_gets_whole_chunks);

/// What the sender's TCP side carries.
const TOTAL_BYTES: usize = 64 << 20;
/// Window the receiver hands back at a time, with a turn of its reactor between.
const RELEASE_STEP_BYTES: usize = 16 * 1024;
/// Chunks in the first window's worth are left out: they go before the receiver falls behind.
const SKIPPED_BYTES: usize = 2 * tunnel::STREAM_WINDOW_BYTES as usize;

fn a_receiver_that_falls_behind_still_gets_whole_chunks(driver: DriverChoice) {
    // The TCP side: a plain socket the writer fills as fast as it can.
    let source = StdListener::bind(loopback()).expect("source");
    let source_addr = source.local_addr().expect("addr");
    let writer = thread::spawn(move || {
        let (mut app, _) = source.accept().expect("accept");
        let block = vec![7u8; 1 << 20];
        for _ in 0..TOTAL_BYTES / block.len() {
            app.write_all(&block).expect("write");
        }
    });

    let chunks = run_on(driver, || async move {
        let listener = TcpListener::bind(loopback()).expect("h2 listener");
        let h2_addr = listener.local_addr().expect("addr");
        let receiver = monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
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
            let mut chunks = Vec::new();
            while let Some(chunk) = body.data().await {
                let n = chunk.expect("data").len();
                chunks.push(n);
                let mut left = n;
                while left > 0 {
                    let step = left.min(RELEASE_STEP_BYTES);
                    body.flow_control().release_capacity(step).expect("release");
                    left -= step;
                    yield_once().await;
                }
            }
            chunks
        });

        let tcp = TcpStream::connect(h2_addr).await.expect("connect h2");
        let (mut client, conn) = h2::client::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW_BYTES)
            .max_frame_size(tunnel::MAX_FRAME_BYTES)
            .handshake::<_, Bytes>(CompletionStream::new(tcp))
            .await
            .expect("h2 client handshake");
        monoio::spawn(async move {
            let _ = conn.await;
        });
        poll_fn(|cx| client.poll_ready(cx)).await.expect("ready");
        let request = http::Request::post("http://receiver/")
            .body(())
            .expect("request");
        let (_response, send) = client.send_request(request, false).expect("send request");

        let app = TcpStream::connect(source_addr)
            .await
            .expect("connect source");
        let (mut app_read, _app_write) = app.into_split();
        let sent = std::cell::Cell::new(0u64);
        tcp_to_h2(&mut app_read, send, &sent, &ReadEnded::default())
            .await
            .expect("tcp → h2");
        assert_eq!(sent.get(), TOTAL_BYTES as u64);
        receiver.await
    });
    writer.join().expect("writer");

    assert_eq!(
        chunks.iter().sum::<usize>(),
        TOTAL_BYTES,
        "every byte arrives"
    );
    let mut seen = 0;
    let (mut later, mut whole) = (0, 0);
    for &n in &chunks {
        seen += n;
        if seen > SKIPPED_BYTES {
            later += n;
            if n >= SEND_COALESCE_BYTES {
                whole += n;
            }
        }
    }
    let small: Vec<_> = chunks
        .iter()
        .filter(|&&n| n < SEND_COALESCE_BYTES)
        .collect();
    assert!(
        whole * 10 >= later * 9,
        "{whole} of {later} bytes came in whole chunks; {} of {} chunks were smaller, the first: {:?}",
        small.len(),
        chunks.len(),
        &small[..small.len().min(20)]
    );
}

/// Lets every other ready task run once (the h2 connections, so each release leaves as its own
/// WINDOW_UPDATE).
async fn yield_once() {
    struct YieldOnce(bool);
    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldOnce(false).await
}
