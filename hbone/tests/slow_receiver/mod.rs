//! An HTTP/2 stream on loopback, with HBONE's settings, whose receiver falls behind: it hands
//! window back 16 KiB at a time with a turn of its reactor between, so every release leaves as its
//! own WINDOW_UPDATE. It records the size of each DATA chunk it gets, to see whether the sender
//! keeps its frames whole (shared with the waypoint's tests). A prompt receiver, which hands each
//! chunk's window back at once, shows how large the sender's chunks are when nothing holds it back.
#![allow(dead_code)]

use std::future::{poll_fn, Future};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use monoio::net::{TcpListener, TcpStream};
use monoio::task::JoinHandle;
use shoal_hbone::tunnel::{self, SEND_COALESCE_BYTES};
use shoal_runtime::stream::CompletionStream;

/// Window the receiver hands back at a time.
pub const RELEASE_STEP_BYTES: usize = 16 * 1024;

/// An open stream to a receiver that falls behind: the sender's halves, and the receiver's task,
/// which ends with the size of every chunk it got once the sender ends the stream.
pub async fn stream_to_slow_receiver() -> (SendStream<Bytes>, RecvStream, JoinHandle<Vec<usize>>) {
    stream_to_receiver(RELEASE_STEP_BYTES).await
}

/// As `stream_to_slow_receiver`, with a receiver that hands back each chunk's window whole, at once:
/// one that keeps up.
pub async fn stream_to_prompt_receiver() -> (SendStream<Bytes>, RecvStream, JoinHandle<Vec<usize>>)
{
    stream_to_receiver(usize::MAX).await
}

/// A receiver that hands window back `release_step_bytes` at a time, a turn of its reactor between.
async fn stream_to_receiver(
    release_step_bytes: usize,
) -> (SendStream<Bytes>, RecvStream, JoinHandle<Vec<usize>>) {
    let listener =
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("h2 listener");
    let addr = listener.local_addr().expect("addr");
    let receiver = monoio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW_BYTES)
            .max_frame_size(tunnel::MAX_FRAME_BYTES)
            .handshake::<_, Bytes>(CompletionStream::new(tcp))
            .await
            .expect("h2 server handshake");
        let (request, mut respond) = conn.accept().await.expect("a stream").expect("no error");
        monoio::spawn(async move { while conn.accept().await.is_some() {} });
        let response = http::Response::new(());
        let _answer = respond.send_response(response, false).expect("respond");
        let mut body = request.into_body();
        let mut chunks = Vec::new();
        while let Some(chunk) = body.data().await {
            let n = chunk.expect("data").len();
            chunks.push(n);
            let mut left = n;
            while left > 0 {
                let step = left.min(release_step_bytes);
                body.flow_control().release_capacity(step).expect("release");
                left -= step;
                yield_once().await;
            }
        }
        chunks
    });

    let tcp = TcpStream::connect(addr).await.expect("connect h2");
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
    let (response, send) = client.send_request(request, false).expect("send request");
    let recv = response.await.expect("response").into_body();
    (send, recv, receiver)
}

/// Past the first `skipped_bytes` (sent before the receiver fell behind), at least half of the
/// bytes must have come in chunks of `SEND_COALESCE_BYTES` or more. A sender that sends whatever
/// window it is given settles below that and stays there (0.4% of the bytes under io_uring). Not
/// nearly all: when the receiver's releases take longer than `tunnel::SEND_COALESCE_WAIT` to come
/// back, as on a loaded machine, the sender rightly sends the window it has (89% under a parallel
/// test run).
pub fn assert_whole_chunks(chunks: &[usize], total_bytes: usize, skipped_bytes: usize) {
    assert_eq!(
        chunks.iter().sum::<usize>(),
        total_bytes,
        "every byte arrives"
    );
    let mut seen = 0;
    let (mut later, mut whole) = (0, 0);
    for &n in chunks {
        seen += n;
        if seen > skipped_bytes {
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
        whole * 2 >= later,
        "{whole} of {later} bytes came in whole chunks; {} of {} chunks were smaller, the first: {:?}",
        small.len(),
        chunks.len(),
        &small[..small.len().min(20)]
    );
}

/// Every byte arrived, and at least half of them in chunks of more than `over_bytes`.
pub fn assert_most_bytes_in_chunks_over(chunks: &[usize], total_bytes: usize, over_bytes: usize) {
    assert_eq!(
        chunks.iter().sum::<usize>(),
        total_bytes,
        "every byte arrives"
    );
    let large: usize = chunks.iter().filter(|&&n| n > over_bytes).sum();
    assert!(
        large * 2 >= total_bytes,
        "{large} of {total_bytes} bytes came in chunks over {over_bytes} bytes; the largest: {:?}",
        chunks.iter().max()
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
