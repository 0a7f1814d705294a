//! The completion stream between real peers on loopback: bytes intact both ways through every kind
//! of write, peeked bytes still read, FIN sent by shutdown or by the close, and a stream dropped
//! while its read is in flight closed, not leaked.

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use shoal_runtime::stream::{
    CompletionStream, ReadRoom, RoomBounds, MAX_READ_ROOM_BYTES, PLAIN_TCP_ROOM, READ_BUFFER_BYTES,
};
use shoal_runtime::{DriverChoice, ListenerSpec, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

both_drivers!(
    echoed_bytes_arrive_intact_through_every_kind_of_write,
    a_half_closed_peer_gets_the_reply_then_eof,
    shutdown_sends_fin_while_the_stream_is_still_open,
    a_stream_dropped_while_reading_closes_its_socket,
    a_bulk_sender_is_read_in_more_than_the_first_room,
);

/// A runtime whose one listener hands each connection, as a completion stream, to `handler`; what
/// the handler returns is sent on the channel.
fn serve<H, F>(driver: DriverChoice, handler: H) -> (Runtime, SocketAddr, mpsc::Receiver<String>)
where
    H: Fn(CompletionStream) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + 'static,
{
    let (tx, rx) = mpsc::channel();
    let rt = Runtime::builder(config(driver, 1))
        .listener(ListenerSpec::new("stream", loopback()))
        .start(move |shard| {
            let (tx, handler) = (tx.clone(), handler.clone());
            async move {
                for listener in shard.take_listeners() {
                    shard
                        .serve(listener, |tcp, _peer| {
                            let (tx, handler) = (tx.clone(), handler.clone());
                            async move {
                                let outcome = handler(CompletionStream::new(tcp)).await;
                                let _ = tx.send(outcome);
                            }
                        })
                        .await;
                }
            }
        })
        .expect("runtime");
    let addr = listen_addr(&rt);
    (rt, addr, rx)
}

fn outcome(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the handler finished")
}

fn echoed_bytes_arrive_intact_through_every_kind_of_write(driver: DriverChoice) {
    let (_rt, addr, rx) = serve(driver, |mut stream| async move {
        // The first bytes are looked at, then read like any others.
        let first = match stream.peek(|b| b.len() >= 4).await {
            Ok(b) => b.to_vec(),
            Err(e) => return format!("peek: {e}"),
        };
        let mut buf = vec![0u8; 70_000];
        let (mut total, mut turn) = (0u64, 0usize);
        loop {
            // Reads of every size, and writes plain, vectored and larger than one write takes.
            let want = [1, 7, 4096, 16_384, 70_000][turn % 5];
            let n = match stream.read(&mut buf[..want]).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return format!("read: {e}"),
            };
            let written = if turn % 2 == 0 {
                stream.write_all(&buf[..n]).await
            } else {
                let (a, b) = buf[..n].split_at(n / 2);
                write_all_vectored(&mut stream, a, b).await
            };
            if let Err(e) = written {
                return format!("write: {e}");
            }
            total += n as u64;
            turn += 1;
        }
        if let Err(e) = stream.shutdown().await {
            return format!("shutdown: {e}");
        }
        format!(
            "echoed {total} bytes, first {:?}",
            &first[..4.min(first.len())]
        )
    });
    let mut client = connect(addr);
    let mut sender = client.try_clone().expect("clone");
    let sent =
        thread::spawn(move || send_pattern(&mut sender, 7, 64 * MIB).expect("send, then FIN"));
    let (got, crc) = receive_all(&mut client).expect("receive until EOF");
    assert_eq!(got, 64 * MIB);
    assert_eq!(crc, sent.join().expect("sender"), "bytes intact");
    let mut first = [0u8; 4];
    Pattern::new(7).fill(&mut first);
    assert_eq!(
        outcome(&rx),
        format!("echoed {} bytes, first {first:?}", 64 * MIB)
    );
}

/// The room after each read of a sequence, within plain TCP's bounds (8–256 KiB) and within an
/// HBONE tunnel's TCP side's (2–64 KiB): doubling while reads fill it, the idle room after a short
/// read (the socket emptied), and straight back to the bulk size when that small read fills.
#[test]
fn the_read_room_follows_the_reads() {
    const KIB: usize = 1024;
    // Rooms in KiB.
    let room = |next: usize, bulk: usize| ReadRoom {
        next: next * KIB,
        bulk: bulk * KIB,
    };
    let (plain, min, max) = (
        PLAIN_TCP_ROOM,
        READ_BUFFER_BYTES / KIB,
        MAX_READ_ROOM_BYTES / KIB,
    );
    let tunnel = RoomBounds {
        idle_bytes: 2 * KIB,
        max_bytes: 64 * KIB,
    };
    assert_eq!(ReadRoom::default(), room(min, min));
    assert_eq!(ReadRoom::idle(tunnel), room(2, 2));
    let cases = [
        (plain, room(8, 8), 100, room(8, 8)),
        (plain, room(8, 8), 8 * KIB, room(16, 16)),
        (plain, room(16, 16), 16 * KIB, room(32, 32)),
        (plain, room(128, 128), 128 * KIB, room(256, 256)),
        (plain, room(256, 256), 256 * KIB, room(256, 256)),
        (plain, room(256, 256), 100 * KIB, room(8, 256)),
        (plain, room(8, 256), 8 * KIB, room(256, 256)),
        (plain, room(256, 256), 20 * KIB, room(8, 64)),
        (plain, room(8, 64), 3 * KIB, room(8, min)),
        (plain, room(8, 8), usize::MAX, room(max, max)),
        (tunnel, room(2, 2), 100, room(2, 2)),
        (tunnel, room(2, 2), 2 * KIB, room(4, 4)),
        (tunnel, room(32, 32), 32 * KIB, room(64, 64)),
        (tunnel, room(64, 64), 64 * KIB, room(64, 64)),
        (tunnel, room(64, 64), 20 * KIB, room(2, 64)),
        (tunnel, room(2, 64), 2 * KIB, room(64, 64)),
        (tunnel, room(64, 64), 3 * KIB, room(2, 8)),
        (tunnel, room(2, 2), usize::MAX, room(64, 64)),
    ];
    for (bounds, before, read, after) in cases {
        assert_eq!(
            before.after_read_within(read, bounds),
            after,
            "{before:?} after a read of {read} bytes within {bounds:?}"
        );
        if bounds == plain {
            assert_eq!(before.after_read(read), after, "plain TCP's own rule");
        }
    }
}

/// A sender that keeps the socket full is read in growing rooms, not 8 KiB at a time; every byte
/// still arrives.
fn a_bulk_sender_is_read_in_more_than_the_first_room(driver: DriverChoice) {
    let (_rt, addr, rx) = serve(driver, |mut stream| async move {
        let mut buf = vec![0u8; 4 << 20];
        let (mut total, mut largest) = (0usize, 0usize);
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    largest = largest.max(n);
                }
                Err(e) => return format!("read: {e}"),
            }
        }
        format!("{total} {}", largest > READ_BUFFER_BYTES)
    });
    let mut client = connect(addr);
    send_pattern(&mut client, 3, 64 * MIB).expect("send, then FIN");
    assert_eq!(outcome(&rx), format!("{} true", 64 * MIB));
}

async fn write_all_vectored(
    stream: &mut CompletionStream,
    mut a: &[u8],
    mut b: &[u8],
) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let parts = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
        let n = stream.write_vectored(&parts).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    stream.flush().await
}

fn a_half_closed_peer_gets_the_reply_then_eof(driver: DriverChoice) {
    let (_rt, addr, rx) = serve(driver, |mut stream| async move {
        let mut request = Vec::new();
        if let Err(e) = stream.read_to_end(&mut request).await {
            return format!("read: {e}");
        }
        // The peer's FIN is in: this shutdown leaves the FIN to the close.
        let reply = [b"re: ".as_slice(), &request].concat();
        if let Err(e) = stream.write_all(&reply).await {
            return format!("write: {e}");
        }
        match stream.shutdown().await {
            Ok(()) => "replied".to_string(),
            Err(e) => format!("shutdown: {e}"),
        }
    });
    let mut client = connect(addr);
    client.write_all(b"ping").expect("write");
    client.shutdown(Shutdown::Write).expect("FIN");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("reply then EOF");
    assert_eq!(reply, b"re: ping");
    assert_eq!(outcome(&rx), "replied");
}

fn shutdown_sends_fin_while_the_stream_is_still_open(driver: DriverChoice) {
    let (_rt, addr, rx) = serve(driver, |mut stream| async move {
        if let Err(e) = stream.write_all(b"bye").await {
            return format!("write: {e}");
        }
        if let Err(e) = stream.shutdown().await {
            return format!("shutdown: {e}");
        }
        // The peer answers only once it has seen our FIN, so this read proves the FIN went out
        // before the stream was closed.
        let mut ack = [0u8; 3];
        match stream.read_exact(&mut ack).await {
            Ok(_) => String::from_utf8_lossy(&ack).into_owned(),
            Err(e) => format!("read: {e}"),
        }
    });
    let mut client = connect(addr);
    let mut got = Vec::new();
    client.read_to_end(&mut got).expect("bytes then EOF");
    assert_eq!(got, b"bye");
    client.write_all(b"ack").expect("ack");
    assert_eq!(outcome(&rx), "ack");
}

fn a_stream_dropped_while_reading_closes_its_socket(driver: DriverChoice) {
    let (_rt, addr, rx) = serve(driver, |mut stream| async move {
        let mut buf = [0u8; 16];
        let read = monoio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
        drop(stream);
        match read {
            Err(_) => "timed out, dropped".to_string(),
            Ok(r) => format!("read returned {r:?}"),
        }
    });
    let mut client = connect(addr);
    assert_eq!(outcome(&rx), "timed out, dropped");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    // EOF, not a timeout: the cancelled read did not keep the socket open.
    assert_eq!(client.read(&mut buf).expect("EOF"), 0);
}

#[test]
fn accepted_connections_have_nodelay_from_their_listener() {
    let (_rt, addr, rx) = serve(DriverChoice::Auto, |stream| async move {
        use std::os::fd::AsRawFd;
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the length given, on the stream's open descriptor.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut on as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        format!("rc {rc}, TCP_NODELAY {}", on != 0)
    });
    let _client = connect(addr);
    assert_eq!(outcome(&rx), "rc 0, TCP_NODELAY true");
}
