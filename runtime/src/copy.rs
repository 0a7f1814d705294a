//! Bidirectional copy between two connections: half-close is carried across in each direction,
//! backpressure is inherent (one buffer per direction, and the next read waits for the previous
//! write), bytes are counted each way even when the copy fails, and an error on either side aborts
//! both so nothing waits forever on a peer that is gone.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::buffer::{BufferPool, PooledBuf, Tier};
use crate::counters::Counter;

/// Bytes moved each way by a finished copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub a_to_b_bytes: u64,
    pub b_to_a_bytes: u64,
}

/// Where a copy counts the bytes it has delivered, as each write completes.
pub trait Tally {
    fn add(&self, bytes: u64);
}

impl Tally for Cell<u64> {
    fn add(&self, bytes: u64) {
        self.set(self.get() + bytes);
    }
}

/// A connection's own count of one direction, mirrored as it grows into a counter its shard alone
/// writes: a metric that a scrape reads while a long-lived connection is still open, as Istio's
/// byte counters are, instead of all at once when it closes.
pub struct Mirrored<'a> {
    count: Cell<u64>,
    into: &'a Counter,
}

impl<'a> Mirrored<'a> {
    pub fn new(into: &'a Counter) -> Self {
        Mirrored {
            count: Cell::new(0),
            into,
        }
    }

    /// This connection's bytes so far.
    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

impl Tally for Mirrored<'_> {
    fn add(&self, bytes: u64) {
        self.count.add(bytes);
        self.into.add(bytes);
    }
}

/// Connects to `addr` within `timeout`, with TCP_NODELAY (a proxy forwards each write as it comes).
/// Running out of time is an error of kind `TimedOut`.
pub async fn connect_within(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {} ms", timeout.as_millis()),
        )),
    }
}

/// Copies `a` ⇄ `b` until both directions have ended. A FIN from one side becomes a write shutdown
/// on the other; the copy ends when both sides have sent FIN, or at the first error, which shuts
/// both sockets down and resets them. The report counts what was delivered either way.
pub async fn copy_bidirectional(
    a: TcpStream,
    b: TcpStream,
    pool: &BufferPool,
) -> (CopyReport, io::Result<()>) {
    let a_to_b = Cell::new(0u64);
    let b_to_a = Cell::new(0u64);
    let result = copy_bidirectional_tallied(a, b, pool, &a_to_b, &b_to_a).await;
    let report = CopyReport {
        a_to_b_bytes: a_to_b.get(),
        b_to_a_bytes: b_to_a.get(),
    };
    (report, result)
}

/// As `copy_bidirectional`, counting each direction into a tally of the caller's as it goes.
pub async fn copy_bidirectional_tallied(
    a: TcpStream,
    b: TcpStream,
    pool: &BufferPool,
    a_to_b: &impl Tally,
    b_to_a: &impl Tally,
) -> io::Result<()> {
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    let (mut a_read, mut a_write) = a.into_split();
    let (mut b_read, mut b_write) = b.into_split();
    let (a_ended, b_ended) = (ReadEnded::default(), ReadEnded::default());
    let (ab, ba) = monoio::join!(
        abort_on_error(
            copy_until_eof(&mut a_read, &mut b_write, pool, a_to_b, &a_ended, &b_ended),
            &fds
        ),
        abort_on_error(
            copy_until_eof(&mut b_read, &mut a_write, pool, b_to_a, &b_ended, &a_ended),
            &fds
        ),
    );
    close_split(a_read, a_write);
    close_split(b_read, b_write);
    ab.and(ba)
}

/// Closes a socket whose halves a finished copy used. Reunited first: monoio's write half shuts
/// its sending side again when dropped, a system call per socket that the copy's own shutdown (or
/// abort) has already made.
pub fn close_split(read: OwnedReadHalf<TcpStream>, write: OwnedWriteHalf<TcpStream>) {
    drop(read.reunite(write));
}

/// Awaits one direction of a copy; if it fails, aborts every socket in `fds` so the other
/// direction, parked on a peer that may never speak again, returns too.
pub async fn abort_on_error(
    copy: impl std::future::Future<Output = io::Result<()>>,
    fds: &[RawFd],
) -> io::Result<()> {
    let result = copy.await;
    if result.is_err() {
        for &fd in fds {
            abort(fd);
        }
    }
    result
}

/// Ends a connection the hard way: the pending read and write of the other direction return at
/// once, and the close that follows sends RST (SO_LINGER 0), as a peer that reset would expect.
/// `fd` must belong to a socket that stays open for the duration of the call.
pub fn abort(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` belongs to a stream that outlives this call (both halves are still held by the
    // joined copy); setsockopt and shutdown only change its state.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Copies `reader` → `writer` until EOF, then shuts the writer's sending side. Counts delivered
/// bytes into `delivered_bytes` as it goes. Starts on a small buffer and moves to a large one while
/// reads fill the buffer; falls back to small when reads come back short, so an idle connection
/// holds only a small buffer. When the large tier is at its cap the copy keeps its small buffer.
pub async fn copy_one_way<R, W>(
    reader: R,
    writer: W,
    pool: &BufferPool,
    delivered_bytes: &(impl Tally + ?Sized),
) -> io::Result<()>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    // Alone, it cannot know whether the writer's socket has ended: it always shuts it down.
    let (reader_ended, writer_ended) = (ReadEnded::default(), ReadEnded::default());
    copy_until_eof(
        reader,
        writer,
        pool,
        delivered_bytes,
        &reader_ended,
        &writer_ended,
    )
    .await
}

/// Whether a socket's peer has sent its FIN, as the direction of a copy that reads it saw it. The
/// other direction, ending later, then leaves its own FIN to the close that follows at once (which
/// sends it after every byte written): a `shutdown` fewer per connection.
#[derive(Default)]
pub struct ReadEnded(Cell<bool>);

impl ReadEnded {
    pub fn set(&self) {
        self.0.set(true);
    }

    /// Shuts `writer`'s sending side, unless its socket's reading has ended: then the copy is
    /// over and the close sends the FIN.
    pub async fn finish<W: AsyncWriteRent>(&self, writer: &mut W) -> io::Result<()> {
        if self.0.get() {
            return Ok(());
        }
        writer.shutdown().await
    }
}

/// `copy_one_way` between two sockets copied both ways: `reader_ended` is set at the reader's
/// EOF, and `writer_ended` says whether the writer's socket has reached its own.
async fn copy_until_eof<R, W>(
    mut reader: R,
    mut writer: W,
    pool: &BufferPool,
    delivered_bytes: &(impl Tally + ?Sized),
    reader_ended: &ReadEnded,
    writer_ended: &ReadEnded,
) -> io::Result<()>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let mut buf: PooledBuf = pool.get(Tier::Small).await;
    loop {
        let (read, returned) = reader.read(buf).await;
        buf = returned;
        let n = read?;
        if n == 0 {
            reader_ended.set();
            return writer_ended.finish(&mut writer).await;
        }
        let filled = n == buf.capacity();
        let (written, returned) = writer.write_all(buf).await;
        buf = returned;
        written?;
        delivered_bytes.add(n as u64);
        buf = match (buf.tier(), filled) {
            (Tier::Small, true) => pool.try_get(Tier::Large).unwrap_or(buf),
            (Tier::Large, false) => pool.try_get(Tier::Small).unwrap_or(buf),
            _ => buf,
        };
    }
}
