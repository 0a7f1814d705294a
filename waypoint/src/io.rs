//! What hyper needs to run on a shard: an HBONE stream as its byte stream (`TunnelIo`), an
//! executor that spawns on the shard (`ShardExec`), and timers from the shard's reactor
//! (`ShardTimer`).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use hyper::rt::{Read, ReadBufCursor, Sleep, Timer, Write};
use shoal_hbone::tunnel::{SendPacing, Tunnel, SEND_COALESCE_WAIT};
use shoal_runtime::Tally;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest DATA frame one write hands to h2: sixteen full TLS records, as the L4 copy path reads
/// (`hbone::tunnel::TCP_READ_CHUNK_BYTES`), so bodies are encrypted in whole records. At 64 KiB,
/// 1 MiB responses through ambient L7 ran at 0.85–0.92× HAProxy's pair at 1.03–1.11× its CPU per
/// response; at 256 KiB, 0.98–1.07× at 0.89–0.99× (`bench compare --only ambient-l7,sidecar,haproxy
/// --phases bulk --repeats 1`, three interleaved pairs; the sidecar pair within its noise).
const MAX_WRITE_CHUNK_BYTES: usize = shoal_hbone::tunnel::TCP_READ_CHUNK_BYTES;

/// An HBONE stream as a byte stream. Received bytes release their flow-control window only once
/// hyper has read them, so a slow reader throttles the peer instead of growing memory; writes wait
/// for the peer's window instead of queueing in h2 without bound.
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// How much of a write to send at once, and the short wait for a whole chunk's window
    /// (`hbone::tunnel::SEND_COALESCE_BYTES`).
    pacing: SendPacing,
    coalesce_wait: Option<Pin<Box<dyn Sleep>>>,
    /// Received but not yet read.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
}

impl TunnelIo {
    /// (`Send`, as hyper's upgrades require, so a pool's stream guard is kept by whoever drives
    /// the connection rather than in here.)
    pub fn new(tunnel: Tunnel) -> Self {
        TunnelIo {
            send: tunnel.send,
            recv: tunnel.recv,
            pacing: SendPacing::default(),
            coalesce_wait: None,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
        }
    }

    /// Sends the first `n` bytes of `parts` as one DATA frame.
    fn send_frame(&mut self, parts: &[io::IoSlice<'_>], n: usize) -> io::Result<usize> {
        self.coalesce_wait = None;
        let mut frame = BytesMut::with_capacity(n);
        for part in parts {
            let take = part.len().min(n - frame.len());
            frame.extend_from_slice(&part[..take]);
            if frame.len() == n {
                break;
            }
        }
        self.send
            .send_data(frame.freeze(), false)
            .map_err(h2_error)?;
        Ok(n)
    }

    /// Waits for the first bytes without consuming them (to tell HTTP/2's preface from HTTP/1.1).
    pub async fn peek(&mut self) -> io::Result<&[u8]> {
        while self.pending.is_empty() && !self.recv_done {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(chunk)) => self.pending = chunk,
                Some(Err(e)) => return Err(h2_error(e)),
                None => self.recv_done = true,
            }
        }
        Ok(&self.pending)
    }
}

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

impl Read for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // The window opens as hyper consumes, not as h2 receives.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => this.recv_done = true,
            }
        }
    }
}

impl Write for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// Vectored, so hyper queues a body's chunks as they came instead of first copying them into
    /// its own write buffer: gathered here into one DATA frame, each byte is copied once.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = total.min(MAX_WRITE_CHUNK_BYTES);
        self.send.reserve_capacity(want);
        loop {
            // Capacity already assigned is used first: h2's `poll_capacity` is ready only when
            // capacity *grows*, so a stream holding enough from before would wait on it forever.
            let capacity = self.send.capacity();
            let now = self.pacing.take(want, capacity);
            if now > 0 {
                return Poll::Ready(self.send_frame(parts, now));
            }
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_error(e))),
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Pending if capacity == 0 => {
                    self.coalesce_wait = None;
                    return Poll::Pending;
                }
                // Some window but not a whole chunk's: wait a little for the rest, then send
                // what there is (`SEND_COALESCE_WAIT`).
                Poll::Pending => {
                    let wait = self
                        .coalesce_wait
                        .get_or_insert_with(|| ShardTimer.sleep(SEND_COALESCE_WAIT));
                    ready!(wait.as_mut().poll(cx));
                    return Poll::Ready(self.send_frame(parts, capacity.min(want)));
                }
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.send_done {
            self.send_done = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelIo {
    fn drop(&mut self) {
        // A stream dropped before it ended (a connection cut mid-request) is reset, so the peer
        // sees an abort rather than a clean end.
        if !self.send_done {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}

/// Spawns hyper's background tasks (HTTP/2 streams, connection drivers) on the current shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardExec;

impl<F> hyper::rt::Executor<F> for ShardExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        monoio::spawn(fut);
    }
}

/// hyper's timers (header read timeout, HTTP/2 keepalive) on the shard's reactor.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardTimer;

impl Timer for ShardTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        Box::pin(ShardSleep(monoio::time::sleep(duration)))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(ShardSleep(monoio::time::sleep_until(deadline.into())))
    }
}

struct ShardSleep(monoio::time::Sleep);

// SAFETY: hyper asks timers to be `Send + Sync` because some runtimes move connections between
// threads. Ours never do: a connection, and every timer hyper makes for it, is created, polled and
// dropped on the one shard thread that accepted it (monoio tasks are not `Send`, so nothing can move
// them). The `Sleep` is never touched from another thread, which is what these impls would allow.
unsafe impl Send for ShardSleep {}
unsafe impl Sync for ShardSleep {}

impl Future for ShardSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: structural pinning of the only field; it is never moved out.
        unsafe { self.map_unchecked_mut(|s| &mut s.0) }.poll(cx)
    }
}

impl Sleep for ShardSleep {}

/// A tokio byte stream (a plain TCP connection in poll mode) as hyper's.
pub struct TokioIo<T>(pub T);

impl<T: AsyncRead + Unpin> Read for TokioIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: tokio's ReadBuf only writes initialised bytes into the unfilled part and reports
        // how many it filled; hyper's cursor is advanced by exactly that.
        let filled = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut tbuf))?;
            tbuf.filled().len()
        };
        unsafe { buf.advance(filled) };
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> Write for TokioIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Bytes moved one way by `copy_bidirectional`, per `BUFFER_BYTES` read.
const COPY_BUFFER_BYTES: usize = 16 * 1024;

/// One direction of a copy: read, write it all, flush; at EOF, shut the writer's side.
struct OneWay {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_done: bool,
    finished: bool,
}

impl OneWay {
    fn new() -> Self {
        OneWay {
            buf: vec![0u8; COPY_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            read_done: false,
            finished: false,
        }
    }

    fn poll<R: Read + Unpin, W: Write + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        tally: &impl Tally,
    ) -> Poll<io::Result<()>> {
        while !self.finished {
            if self.start == self.end && !self.read_done {
                let mut rb = hyper::rt::ReadBuf::new(&mut self.buf);
                ready!(Pin::new(&mut *r).poll_read(cx, rb.unfilled()))?;
                let n = rb.filled().len();
                if n == 0 {
                    self.read_done = true;
                } else {
                    (self.start, self.end) = (0, n);
                }
            }
            while self.start < self.end {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                tally.add(n as u64);
            }
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.finished = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies `a` ⇄ `b` until both directions end (each EOF is passed on as a shutdown of the other
/// side's write half); returns the bytes moved a → b and b → a. An error either way ends both.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: Read + Write + Unpin,
    B: Read + Write + Unpin,
{
    let (a_to_b, b_to_a) = (Cell::new(0u64), Cell::new(0u64));
    copy_bidirectional_tallied(a, b, &a_to_b, &b_to_a).await?;
    Ok((a_to_b.get(), b_to_a.get()))
}

/// As `copy_bidirectional`, counting each direction into a tally of the caller's as each write
/// completes (a metric that moves while the connection is open).
pub async fn copy_bidirectional_tallied<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &impl Tally,
    b_to_a: &impl Tally,
) -> io::Result<()>
where
    A: Read + Write + Unpin,
    B: Read + Write + Unpin,
{
    let (mut ab, mut ba) = (OneWay::new(), OneWay::new());
    std::future::poll_fn(|cx| {
        let left = ab.poll(cx, a, b, a_to_b)?;
        let right = ba.poll(cx, b, a, b_to_a)?;
        if left.is_ready() && right.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A byte stream that belongs to the shard that accepted it (a monoio socket from the sidecar's
/// app), marked `Send` because hyper's upgrades ask for it.
pub struct ShardLocal<T>(pub T);

// SAFETY: as for `ShardSleep`: hyper asks an upgradeable stream to be `Send` for runtimes that move
// connections between threads. This one is created, polled, upgraded, spliced and dropped on the
// shard thread that accepted it — the connection task and the splice task are monoio tasks, which
// are not `Send`, so neither can carry the stream to another thread.
unsafe impl<T> Send for ShardLocal<T> {}

impl<T: Read + Unpin> Read for ShardLocal<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for ShardLocal<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
