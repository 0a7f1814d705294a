//! A TCP connection driven by the shard's completion driver, behind tokio's `AsyncRead` and
//! `AsyncWrite`, for poll-style code (hyper serving a sidecar's app, or talking to an app or a
//! server outside the mesh) that would otherwise take monoio's poll-io conversion.
//!
//! Why not poll-io for short connections: converting costs an `fcntl` and an epoll registration,
//! closing an epoll removal and a `close`, and every read and write is a system call of its own,
//! often an `EAGAIN` first. Here a read or a write is an io_uring operation submitted with the
//! tick's batch, and the close is one too. On this project's guests a system call is the dearest
//! part of a short connection (see ARCHITECTURE.md), so the copy between our buffer and the
//! caller's is the cheaper side of the trade.
//!
//! At most one read and one write are in flight. A write is accepted into the stream's own buffer
//! and submitted at once; the next write or a flush waits for it, so a caller that flushes knows its
//! bytes reached the kernel, and a failed write is reported by the call after it.

use std::cell::UnsafeCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Room a read asks the kernel to fill at first, and the least it shrinks back to: as much as
/// hyper's own first read buffer, and a size jemalloc serves from its per-thread cache (16 KiB
/// would be a large allocation there, which takes its slower extent path for every connection).
pub const READ_BUFFER_BYTES: usize = 8 * 1024;

/// The most room one read asks for (see `ReadRoom`). At a fixed 8 KiB, a 1 MiB response through
/// the sidecar pair cost 128 reads, 128 TLS records sent one per write, and as many wake-ups of
/// every hop behind them.
pub const MAX_READ_ROOM_BYTES: usize = 256 * 1024;

/// Most bytes one write takes from its caller; larger writes are taken in turns.
pub const MAX_WRITE_BYTES: usize = 64 * 1024;

/// A read in flight: the buffer comes back with the result.
pub type ReadOp = Pin<Box<dyn Future<Output = BufResult<usize, SliceMut<Vec<u8>>>>>>;
/// A write of a whole buffer in flight: the buffer comes back with the result.
pub type WriteOp = Pin<Box<dyn Future<Output = BufResult<usize, Vec<u8>>>>>;

/// The socket, shared by the read and the write in flight. monoio's own split shares it the same
/// way (its `Split` marker on `TcpStream` is its promise that one read and one write may proceed
/// at once), but its write half, dropped while the read half is still in an operation, shuts the
/// socket down once more: a second `shutdown` for every connection hyper ends with a read pending.
/// The socket closes (an io_uring operation) when the last clone and operation are gone.
#[derive(Clone)]
pub struct SharedSocket(Rc<UnsafeCell<TcpStream>>);

impl SharedSocket {
    pub fn new(tcp: TcpStream) -> Self {
        SharedSocket(Rc::new(UnsafeCell::new(tcp)))
    }

    /// A read into `room`'s spare part.
    ///
    /// # Safety
    /// At most one read of this socket in flight at a time (a write may be in flight too).
    pub unsafe fn read(&self, room: SliceMut<Vec<u8>>) -> ReadOp {
        let socket = self.clone();
        Box::pin(async move {
            // SAFETY: the caller's one read; see `direction`.
            unsafe { socket.direction() }.read(room).await
        })
    }

    /// A write of all of `buffer`.
    ///
    /// # Safety
    /// At most one write of this socket in flight at a time (a read may be in flight too).
    pub unsafe fn write_all(&self, buffer: Vec<u8>) -> WriteOp {
        let socket = self.clone();
        Box::pin(async move {
            // SAFETY: the caller's one write; see `direction`.
            unsafe { socket.direction() }.write_all(buffer).await
        })
    }

    /// # Safety
    /// Only for one direction's operation: the read side's reads, the write side's writes, one of
    /// each at a time, as monoio's split halves use it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn direction(&self) -> &mut TcpStream {
        // SAFETY: as monoio's `OwnedReadHalf`/`OwnedWriteHalf` do: a read or write uses the stream
        // only to submit its operation (which then holds its own handle on the descriptor), and
        // both directions run on the shard's one thread.
        unsafe { &mut *self.0.get() }
    }
}

enum ReadSide {
    Idle,
    Busy(ReadOp),
}

enum WriteSide {
    Idle(Vec<u8>),
    Busy(WriteOp),
}

/// See the module's comment.
pub struct CompletionStream {
    fd: RawFd,
    socket: SharedSocket,
    read: ReadSide,
    /// Bytes read and not yet taken are `buffer[taken..]`. Empty while a read is in flight (the
    /// operation owns it).
    buffer: Vec<u8>,
    taken: usize,
    read_room: ReadRoom,
    /// The peer's FIN was read.
    read_eof: bool,
    write: WriteSide,
    /// This side's FIN has been sent, or will be by the close.
    shut: bool,
}

impl CompletionStream {
    pub fn new(tcp: TcpStream) -> Self {
        CompletionStream {
            fd: tcp.as_raw_fd(),
            socket: SharedSocket::new(tcp),
            read: ReadSide::Idle,
            buffer: Vec::new(),
            taken: 0,
            read_room: ReadRoom::default(),
            read_eof: false,
            write: WriteSide::Idle(Vec::new()),
            shut: false,
        }
    }

    /// Reads until `enough` says the bytes so far (not consumed) decide what they are, the peer
    /// ends, or `READ_BUFFER_BYTES` are buffered; the bytes are then still there for the next read.
    pub async fn peek(&mut self, enough: impl Fn(&[u8]) -> bool) -> io::Result<&[u8]> {
        while !self.read_eof
            && self.buffer.len() - self.taken < READ_BUFFER_BYTES
            && !enough(&self.buffer[self.taken..])
        {
            std::future::poll_fn(|cx| self.poll_fill(cx)).await?;
        }
        Ok(&self.buffer[self.taken..])
    }

    /// One read, appended to the buffer; at its end `read_eof` is set if the peer has ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let ReadSide::Idle = self.read {
            if self.taken == self.buffer.len() {
                self.buffer.clear();
                self.taken = 0;
                // A read in flight holds its buffer, an idle connection's included: a small read
                // gives a bulk buffer back.
                if self.buffer.capacity() > 2 * self.read_room.next {
                    self.buffer = Vec::new();
                }
            }
            if self.buffer.capacity() - self.buffer.len() < self.read_room.next {
                self.buffer.reserve_exact(self.read_room.next);
            }
            let buffer = std::mem::take(&mut self.buffer);
            let (start, end) = (buffer.len(), buffer.capacity());
            let room = SliceMut::new(buffer, start, end);
            // SAFETY: the read side's only operation.
            self.read = ReadSide::Busy(unsafe { self.socket.read(room) });
        }
        let ReadSide::Busy(op) = &mut self.read else {
            unreachable!("a read was started above");
        };
        let (result, room) = ready!(op.as_mut().poll(cx));
        self.read = ReadSide::Idle;
        self.buffer = room.into_inner();
        match result {
            Ok(0) => self.read_eof = true,
            Ok(n) => self.read_room = self.read_room.after_read(n),
            Err(e) => return Poll::Ready(Err(e)),
        }
        Poll::Ready(Ok(()))
    }

    /// Waits for the write in flight, if any; its error, if it failed.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let WriteSide::Busy(op) = &mut self.write else {
            return Poll::Ready(Ok(()));
        };
        let (result, mut buffer) = ready!(op.as_mut().poll(cx));
        buffer.clear();
        self.write = WriteSide::Idle(buffer);
        Poll::Ready(result.map(|_| ()))
    }

    /// Takes up to `MAX_WRITE_BYTES` of `parts` into the write buffer and submits them.
    fn poll_submit<'a>(
        &mut self,
        cx: &mut Context<'_>,
        parts: impl Iterator<Item = &'a [u8]>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_written(cx))?;
        let WriteSide::Idle(buffer) = &mut self.write else {
            unreachable!("the write in flight has finished");
        };
        for part in parts {
            let room = MAX_WRITE_BYTES - buffer.len();
            if room == 0 {
                break;
            }
            buffer.extend_from_slice(&part[..part.len().min(room)]);
        }
        let taken = buffer.len();
        if taken == 0 {
            return Poll::Ready(Ok(0));
        }
        let buffer = std::mem::take(buffer);
        // SAFETY: the write side's only operation.
        self.write = WriteSide::Busy(unsafe { self.socket.write_all(buffer) });
        // Polled once now, so the operation is submitted with this tick's batch even if the
        // caller writes nothing more and never flushes; an error surfaces at the next call.
        if let Poll::Ready(Err(e)) = self.poll_written(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }
}

/// What a read asks the kernel for. While reads fill their room the sender is ahead, and the
/// room doubles up to the bounds' most (plain TCP's: `MAX_READ_ROOM_BYTES`). A read that falls
/// short has emptied the socket, which may now stay idle with the next read in flight holding its
/// buffer, so that read asks for the bounds' idle room (plain TCP's: `READ_BUFFER_BYTES`); the bulk
/// size is remembered (twice the short read), and if the small read fills, the one after it asks
/// for that size again at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRoom {
    /// Bytes the next read asks for.
    pub next: usize,
    /// Bytes a read asks for once the sender is found ahead again.
    pub bulk: usize,
}

/// What a `ReadRoom` moves between: the room of a read that may wait on an idle socket, and the
/// most any read asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomBounds {
    pub idle_bytes: usize,
    pub max_bytes: usize,
}

/// Plain TCP's (`CompletionStream`): an idle read holds `READ_BUFFER_BYTES`.
pub const PLAIN_TCP_ROOM: RoomBounds = RoomBounds {
    idle_bytes: READ_BUFFER_BYTES,
    max_bytes: MAX_READ_ROOM_BYTES,
};

impl Default for ReadRoom {
    fn default() -> Self {
        ReadRoom::idle(PLAIN_TCP_ROOM)
    }
}

impl ReadRoom {
    /// A first read's room, or one after the socket was emptied.
    pub fn idle(bounds: RoomBounds) -> ReadRoom {
        ReadRoom {
            next: bounds.idle_bytes,
            bulk: bounds.idle_bytes,
        }
    }

    /// The room after a read of `read_bytes` into `self.next`, within plain TCP's bounds.
    pub fn after_read(self, read_bytes: usize) -> ReadRoom {
        self.after_read_within(read_bytes, PLAIN_TCP_ROOM)
    }

    /// The room after a read of `read_bytes` into `self.next`, within `bounds`.
    pub fn after_read_within(self, read_bytes: usize, bounds: RoomBounds) -> ReadRoom {
        let twice = read_bytes
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(bounds.max_bytes)
            .clamp(bounds.idle_bytes, bounds.max_bytes);
        if read_bytes >= self.next {
            let next = twice.max(self.bulk);
            ReadRoom { next, bulk: next }
        } else {
            ReadRoom {
                next: bounds.idle_bytes,
                bulk: twice,
            }
        }
    }
}

impl AsRawFd for CompletionStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl AsyncRead for CompletionStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let buffered = &this.buffer[this.taken..];
            if !buffered.is_empty() {
                let n = buffered.len().min(out.remaining());
                out.put_slice(&buffered[..n]);
                this.taken += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for CompletionStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_submit(cx, std::iter::once(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_submit(cx, parts.iter().map(|p| &**p))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_written(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_written(cx))?;
        if !this.shut {
            this.shut = true;
            // Once the peer's FIN is in, nothing more will be read, and the close that follows
            // (an io_uring operation when this stream is dropped) sends our FIN after every byte
            // written: a shutdown now would be a system call for the same packet.
            if !this.read_eof {
                // SAFETY: the descriptor is owned by the halves this stream holds.
                if unsafe { libc::shutdown(this.fd, libc::SHUT_WR) } == -1 {
                    return Poll::Ready(Err(io::Error::last_os_error()));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}
