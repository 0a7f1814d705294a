//! The DATA frames a tunnelled TCP stream becomes, with a real h2 peer on loopback: when the
//! receiver falls behind and hands window back a little at a time, the sender still sends whole
//! 64 KiB chunks rather than a frame per window update (which, through two ztunnels, settled at
//! 16 KiB frames: a TLS write and a wake-up per 16 KiB on both sides).

mod common;
mod slow_receiver;

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::thread;

use common::*;
use monoio::io::Splitable;
use monoio::net::TcpStream;
use shoal_hbone::tunnel::{self, tcp_to_h2};
use shoal_runtime::{DriverChoice, ReadEnded};
use slow_receiver::*;

both_drivers!(
    a_receiver_that_falls_behind_still_gets_whole_chunks,
    a_bulk_stream_is_read_and_sent_in_chunks_larger_than_64_kib
);

/// What the sender's TCP side carries.
const TOTAL_BYTES: usize = 64 << 20;

/// A TCP side that always has more to read, into a receiver that keeps up: the reads, and so the
/// DATA frames, grow past 64 KiB (to `TCP_READ_CHUNK_BYTES`), since a bulk stream pays per
/// operation as well as per byte. At 64 KiB, no byte came in a larger chunk.
fn a_bulk_stream_is_read_and_sent_in_chunks_larger_than_64_kib(driver: DriverChoice) {
    let chunks = carry_source_to(driver, Receiver::Prompt);
    assert_most_bytes_in_chunks_over(&chunks, TOTAL_BYTES, 64 * 1024);
}

fn a_receiver_that_falls_behind_still_gets_whole_chunks(driver: DriverChoice) {
    let chunks = carry_source_to(driver, Receiver::Slow);
    // The first window's worth goes before the receiver falls behind.
    assert_whole_chunks(
        &chunks,
        TOTAL_BYTES,
        2 * tunnel::STREAM_WINDOW_BYTES as usize,
    );
}

enum Receiver {
    Slow,
    Prompt,
}

/// `TOTAL_BYTES` from a plain socket whose writer fills it as fast as it can, through `tcp_to_h2`
/// into `receiver`: the sizes of the chunks it got.
fn carry_source_to(driver: DriverChoice, receiver: Receiver) -> Vec<usize> {
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
        let (send, _recv, receiver) = match receiver {
            Receiver::Slow => stream_to_slow_receiver().await,
            Receiver::Prompt => stream_to_prompt_receiver().await,
        };
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
    chunks
}
