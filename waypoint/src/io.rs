//! What hyper needs to run on a shard: an HBONE stream as its byte stream (`TunnelIo`), an
//! executor that spawns on the shard (`ShardExec`), and timers from the shard's reactor
//! (`ShardTimer`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use hyper::rt::{Read, ReadBufCursor, Sleep, Timer, Write};
use shoal_hbone::tunnel::Tunnel;

/// Largest DATA frame one write hands to h2: a full TLS record's worth four times over, as the L4
/// copy path does, so bodies are encrypted in whole records.
const MAX_WRITE_CHUNK_BYTES: usize = 64 * 1024;

/// An HBONE stream as a byte stream. Received bytes release their flow-control window only once
/// hyper has read them, so a slow reader throttles the peer instead of growing memory; writes wait
/// for the peer's window instead of queueing in h2 without bound.
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
}

impl TunnelIo {
    pub fn new(tunnel: Tunnel) -> Self {
        TunnelIo {
            send: tunnel.send,
            recv: tunnel.recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
        }
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE_CHUNK_BYTES);
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(want);
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
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
