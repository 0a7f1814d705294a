//! One HBONE stream carrying a TCP connection's bytes, both ways, with HTTP/2 flow control done
//! right: received bytes are written out before their window is released (so a slow reader
//! throttles the sender instead of growing memory), the sender waits for window instead of
//! queueing without bound, FIN maps to END_STREAM and back, and a reset on either side closes the
//! other abruptly.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use shoal_runtime::copy::{abort_on_error, close_split};
use shoal_runtime::stream::{ReadRoom, RoomBounds};
use shoal_runtime::{CopyReport, ReadEnded, Tally};

/// Per-stream receive window (HBONE.md, as Istio's ztunnel sets it).
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// Per-connection receive window.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side accepts.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// Header list limits: the client's is smaller, as ztunnel's.
pub const CLIENT_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
pub const SERVER_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Streams a server allows at once on one connection.
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;

/// Most bytes read from TCP per DATA chunk handed to h2: sixteen full TLS records, so each chunk
/// encrypts into whole records. Why this many: a bulk stream costs per operation as well as per
/// byte, and with 64 KiB chunks one stream through the two `bench hbone` nodes moved 486–581 MB/s
/// at 0.92–1.09 s of the outbound node's CPU per GiB; with 256 KiB, 593–676 MB/s at 0.80–0.91
/// (and the server node's CPU fell alike, its writes to the app being as large). Istio's ztunnel
/// grows its copy buffers to the same size (its "jumbo" 256 KiB) on connections that carry much.
/// The room only grows while reads fill it, so connections that do not stream stay small.
pub const TCP_READ_CHUNK_BYTES: usize = 256 * 1024;
/// A read that may wait on an idle TCP side has this much room: a stream's first, and each after
/// one that emptied the socket. An idle tunnelled connection holds this, not a bulk chunk (with
/// 8 KiB, a ztunnel held 11–12 KiB per idle connection, two thirds of it this buffer). The room
/// doubles while reads fill it, up to `TCP_READ_CHUNK_BYTES`, and a small read that fills goes
/// straight back to the bulk size (`runtime::stream::ReadRoom`). Why small chunks come cheap: h2
/// still holds the last chunk when the next read is armed, so each read takes a fresh buffer, and
/// a small one is what an allocator serves cheapest (glibc: ztunnel 1–2% fewer instructions per
/// request and per connection than with 64 KiB; jemalloc took its large-extent path for every
/// 64 KiB one, 3,000 instructions a request).
pub const IDLE_TCP_READ_CHUNK_BYTES: usize = 2 * 1024;

/// A sender whose stream has some window but less than this (or than the chunk it holds, or than
/// the most it was ever granted at once) waits up to `SEND_COALESCE_WAIT` for more before it hands
/// h2 a DATA frame. Why: once h2's send buffer for a stream is full (the connection's writes are
/// the bottleneck), window comes back one popped frame at a time, and a sender that sends whatever
/// it is granted makes its next frame that size, so frames never grow back. A bulk stream through
/// two ztunnels settled at 16 KiB frames from 64 KiB reads: a TLS write and a wake-up of the peer
/// per 16 KiB on each side.
pub const SEND_COALESCE_BYTES: usize = 64 * 1024;
/// The longest a sender holding some window waits for the rest (see `SEND_COALESCE_BYTES`): a
/// bound, so that window shared with other streams, or a peer that shrank its window, cannot stall
/// it. When h2's buffer is what limits it, the rest comes far sooner (64 KiB leaves in about
/// 0.1 ms at the rates this machine reaches).
pub const SEND_COALESCE_WAIT: Duration = Duration::from_millis(1);

/// How much of a chunk to hand h2 at once (see `SEND_COALESCE_BYTES`).
#[derive(Debug, Default)]
pub struct SendPacing {
    largest_granted_bytes: usize,
}

impl SendPacing {
    /// Of `want` bytes, with `capacity` granted: how many to send now; 0 means wait for more
    /// window. Never more than the most this stream has been granted at once, so a peer whose
    /// window is small is not waited on for more than it gives.
    pub fn take(&mut self, want: usize, capacity: usize) -> usize {
        self.largest_granted_bytes = self.largest_granted_bytes.max(capacity);
        let enough = want
            .min(SEND_COALESCE_BYTES)
            .min(self.largest_granted_bytes);
        if capacity > 0 && capacity >= enough {
            capacity.min(want)
        } else {
            0
        }
    }
}

/// The bounds of a TCP side's read room.
const TCP_READ_ROOM: RoomBounds = RoomBounds {
    idle_bytes: IDLE_TCP_READ_CHUNK_BYTES,
    max_bytes: TCP_READ_CHUNK_BYTES,
};

/// The two halves of an open HBONE stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// Copies `tcp` ⇄ `tunnel` until both directions end. The report's `a_to_b_bytes` is TCP →
/// tunnel, `b_to_a_bytes` tunnel → TCP.
pub async fn copy_tcp_tunnel(tcp: TcpStream, tunnel: Tunnel) -> (CopyReport, io::Result<()>) {
    let up = Cell::new(0u64);
    let down = Cell::new(0u64);
    let result = copy_tcp_tunnel_tallied(tcp, tunnel, &up, &down).await;
    (
        CopyReport {
            a_to_b_bytes: up.get(),
            b_to_a_bytes: down.get(),
        },
        result,
    )
}

/// As `copy_tcp_tunnel`, counting TCP → tunnel into `up` and tunnel → TCP into `down` as it goes.
pub async fn copy_tcp_tunnel_tallied(
    tcp: TcpStream,
    tunnel: Tunnel,
    up: &impl Tally,
    down: &impl Tally,
) -> io::Result<()> {
    let fds = [tcp.as_raw_fd()];
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let Tunnel { send, recv } = tunnel;
    let tcp_ended = ReadEnded::default();
    let (a, b) = monoio::join!(
        abort_on_error(tcp_to_h2(&mut tcp_read, send, up, &tcp_ended), &fds),
        abort_on_error(h2_to_tcp(recv, &mut tcp_write, down, &tcp_ended), &fds),
    );
    close_split(tcp_read, tcp_write);
    a.and(b)
}

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match e.reason() {
        // Istio reads RST_STREAM NO_ERROR or CANCEL as the end of the stream; the caller treats
        // these as a reset of the TCP side too, since the peer did not send END_STREAM.
        Some(reason) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset: {reason:?}"),
        ),
        None => io::Error::other(e),
    }
}

/// TCP → HBONE: reads chunks and sends them as DATA once the peer's window allows; EOF becomes an
/// empty DATA frame with END_STREAM, and is noted in `tcp_ended`.
pub async fn tcp_to_h2<R: AsyncReadRent>(
    mut tcp: R,
    mut send: SendStream<Bytes>,
    delivered: &(impl Tally + ?Sized),
    tcp_ended: &ReadEnded,
) -> io::Result<()> {
    let mut room = ReadRoom::idle(TCP_READ_ROOM);
    let mut pacing = SendPacing::default();
    let mut buf = BytesMut::with_capacity(room.next);
    loop {
        // What is left of a bulk chunk's allocation would keep all of it while the read waits;
        // a read with an idle room takes a fresh small one instead.
        if buf.capacity() > 2 * room.next {
            buf = BytesMut::new();
        }
        // Reuses the allocation once h2 has written the previous chunk out and dropped it.
        buf.reserve(room.next);
        let (read, returned) = tcp.read(buf).await;
        buf = returned;
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        room = room.after_read_within(n, TCP_READ_ROOM);
        if n == 0 {
            tcp_ended.set();
            return send.send_data(Bytes::new(), true).map_err(h2_error);
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = loop {
                // Capacity already assigned is used first: `poll_capacity` is ready only when the
                // stream's capacity grows, so a stream holding enough from before would wait on it.
                let capacity = send.capacity();
                let now = pacing.take(data.len(), capacity);
                if now > 0 {
                    break now;
                }
                let grown = if capacity == 0 {
                    Some(poll_fn(|cx| send.poll_capacity(cx)).await)
                } else {
                    capacity_within(&mut send, SEND_COALESCE_WAIT).await
                };
                match grown {
                    // Waited long enough: what there is.
                    None => break capacity.min(data.len()),
                    Some(Some(Ok(_))) => {}
                    Some(Some(Err(e))) => return Err(h2_error(e)),
                    Some(None) => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "stream closed while sending",
                        ))
                    }
                }
            };
            let chunk = data.split_to(granted);
            let len = chunk.len() as u64;
            send.send_data(chunk, false).map_err(h2_error)?;
            delivered.add(len);
        }
    }
}

/// What `SendStream::poll_capacity` gives, or `None` when the wait ran out.
type CapacityWithin<'a> =
    Pin<Box<dyn Future<Output = Option<Option<Result<usize, h2::Error>>>> + 'a>>;

/// More capacity for `send`, or `None` once `wait` has passed. Boxed: the timer is on the bulk path
/// only, and inline it would enlarge the copy future every tunnelled connection holds, idle or not.
fn capacity_within(send: &mut SendStream<Bytes>, wait: Duration) -> CapacityWithin<'_> {
    Box::pin(async move {
        monoio::time::timeout(wait, poll_fn(|cx| send.poll_capacity(cx)))
            .await
            .ok()
    })
}

/// HBONE → TCP: writes each DATA chunk out, then releases its window; END_STREAM becomes a write
/// shutdown. So does RST_STREAM with NO_ERROR or CANCEL, which Istio's ztunnel reads as the end of
/// the stream (it is what ztunnel sends when its TCP side resets); other resets abort the TCP side.
/// A TCP side whose own reading has ended (`tcp_ended`) gets its FIN from the close instead.
pub async fn h2_to_tcp<W: AsyncWriteRent>(
    mut recv: RecvStream,
    mut tcp: W,
    delivered: &(impl Tally + ?Sized),
    tcp_ended: &ReadEnded,
) -> io::Result<()> {
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let (written, _) = tcp.write_all(chunk).await;
                written?;
                delivered.add(n as u64);
                recv.flow_control().release_capacity(n).map_err(h2_error)?;
            }
            Some(Err(e))
                if matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL)) =>
            {
                return tcp_ended.finish(&mut tcp).await;
            }
            Some(Err(e)) => return Err(h2_error(e)),
            None => return tcp_ended.finish(&mut tcp).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_waits_for_enough_window_to_send_whole_chunks() {
        const K: usize = 1024;
        // (largest granted before, want, capacity now, sent now)
        let cases = [
            // Nothing granted: wait.
            (0, 64 * K, 0, 0),
            // A fresh stream with the whole chunk's window sends it.
            (0, 64 * K, 4096 * K, 64 * K),
            // h2's buffer is full and gives back one 16 KiB frame at a time: wait for 64 KiB.
            (400 * K, 64 * K, 16 * K, 0),
            (400 * K, 64 * K, 48 * K, 0),
            (400 * K, 64 * K, 64 * K, 64 * K),
            // More than wanted: only what is wanted.
            (400 * K, 10 * K, 400 * K, 10 * K),
            // A small chunk goes as soon as it fits.
            (400 * K, 100, 100, 100),
            (400 * K, 100, 99, 0),
            // A peer that never grants more than 16 KiB is not waited on for more.
            (16 * K, 64 * K, 16 * K, 16 * K),
            (16 * K, 64 * K, 8 * K, 0),
            // Asked for more than the coalescing size: 64 KiB is enough to go.
            (400 * K, 1024 * K, 64 * K, 64 * K),
            (400 * K, 1024 * K, 63 * K, 0),
        ];
        for (largest, want, capacity, sent) in cases {
            let mut pacing = SendPacing {
                largest_granted_bytes: largest,
            };
            assert_eq!(
                pacing.take(want, capacity),
                sent,
                "largest {largest}, want {want}, capacity {capacity}"
            );
        }
        let mut pacing = SendPacing::default();
        pacing.take(64 * K, 32 * K);
        assert_eq!(
            pacing.largest_granted_bytes,
            32 * K,
            "remembers the most granted"
        );
    }
}
