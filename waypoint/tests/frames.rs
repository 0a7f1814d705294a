//! The DATA frames hyper's writes become through `TunnelIo` (request and response bodies on every
//! L7 path), with a real h2 peer on loopback that falls behind and hands window back 16 KiB at a
//! time: the frames stay whole 64 KiB chunks rather than one per window update; and with one that
//! keeps up, they grow past 64 KiB.

#[path = "../../hbone/tests/slow_receiver/mod.rs"]
mod slow_receiver;

use std::future::poll_fn;
use std::pin::Pin;

use hyper::rt::Write;
use shoal_hbone::tunnel::{self, Tunnel};
use shoal_waypoint::io::TunnelIo;
use slow_receiver::*;

/// What hyper writes, in 1 MiB writes.
const TOTAL_BYTES: usize = 64 << 20;

/// One test per driver: hyper's writes through `TunnelIo` to the slow receiver.
macro_rules! on_drivers {
    ($($name:ident: $driver:ty),* $(,)?) => {$(
        #[test]
        fn $name() {
            let chunks = monoio::RuntimeBuilder::<$driver>::new()
                .enable_timer()
                .build()
                .expect("runtime")
                .block_on(write_to_slow_receiver());
            assert_whole_chunks(&chunks, TOTAL_BYTES, 2 * tunnel::STREAM_WINDOW_BYTES as usize);
        }
    )*};
}

on_drivers!(
    on_io_uring_a_receiver_that_falls_behind_still_gets_whole_chunks: monoio::IoUringDriver,
    on_epoll_a_receiver_that_falls_behind_still_gets_whole_chunks: monoio::LegacyDriver,
);

/// hyper's 1 MiB writes to a receiver that keeps up leave in DATA frames over 64 KiB: a bulk body
/// costs per frame, record and write as well as per byte (at 64 KiB, none was larger).
#[test]
fn a_bulk_body_to_a_prompt_receiver_leaves_in_frames_larger_than_64_kib() {
    let chunks = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(async {
            let (send, recv, receiver) = stream_to_prompt_receiver().await;
            write_to(send, recv, receiver).await
        });
    assert_most_bytes_in_chunks_over(&chunks, TOTAL_BYTES, 64 * 1024);
}

async fn write_to_slow_receiver() -> Vec<usize> {
    let (send, recv, receiver) = stream_to_slow_receiver().await;
    write_to(send, recv, receiver).await
}

/// `TOTAL_BYTES` written through `TunnelIo` as hyper writes a body, then the end of the stream:
/// the sizes of the chunks the receiver got.
async fn write_to(
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    receiver: monoio::task::JoinHandle<Vec<usize>>,
) -> Vec<usize> {
    let mut io = TunnelIo::new(Tunnel { send, recv });
    let block = vec![7u8; 1 << 20];
    for _ in 0..TOTAL_BYTES / block.len() {
        let mut written = 0;
        while written < block.len() {
            written += poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &block[written..]))
                .await
                .expect("write");
        }
    }
    poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx))
        .await
        .expect("end of stream");
    receiver.await
}
