//! The bodies the proxy passes on: a peer's streamed body with its bytes counted, or one the
//! waypoint wrote itself; and the response wrapper that records the request once its last byte has
//! gone (or the client went away first).

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Called once when a streamed body has been read to its end.
pub type AtEnd = Box<dyn FnOnce()>;

/// A body in flight through the proxy.
pub enum ProxyBody {
    /// A peer's body, streamed; its data bytes are added to `counted`; `at_end` runs once it has
    /// been read to its end (an upstream connection goes back to its pool then).
    Stream {
        inner: Incoming,
        counted: Rc<Cell<u64>>,
        at_end: Option<AtEnd>,
    },
    /// One the waypoint wrote (a local reply), or none.
    Full(Option<Bytes>),
    /// A request body one try of several reads (kept so a retry can send it again).
    Replay(Box<Replay>),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub fn text(s: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(s.into()))
    }

    pub fn counted(inner: Incoming, counted: Rc<Cell<u64>>) -> Self {
        ProxyBody::Stream {
            inner,
            counted,
            at_end: None,
        }
    }

    /// Runs `at_end` once the body has been read to its end (at once if it is already empty).
    pub fn with_at_end(mut self, f: AtEnd) -> Self {
        match &mut self {
            ProxyBody::Stream { inner, at_end, .. } => {
                if inner.is_end_stream() {
                    f();
                } else {
                    *at_end = Some(f);
                }
            }
            ProxyBody::Full(_) | ProxyBody::Replay(_) => f(),
        }
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Stream {
                inner,
                counted,
                at_end,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            counted.set(counted.get() + data.len() as u64);
                        }
                        if inner.is_end_stream() {
                            if let Some(f) = at_end.take() {
                                f();
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(f) = at_end.take() {
                            f();
                        }
                    }
                    _ => {}
                }
                polled
            }
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Replay(r) => Pin::new(&mut **r).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Replay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream { inner, .. } => inner.size_hint(),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Replay(r) => r.size_hint(),
        }
    }
}

/// A request body up to this size is kept while its request is in flight, so that a retry sends
/// it again byte for byte; a larger one is streamed once and its request is not retried (so a
/// retry never holds more than this per request).
pub const RETRY_BUFFER_LIMIT_BYTES: usize = 64 * 1024;

/// What the tries of one request share: the downstream body, read once, and what was read.
struct ReplayState {
    source: ProxyBody,
    chunks: Vec<Bytes>,
    buffered_bytes: usize,
    /// More than `RETRY_BUFFER_LIMIT_BYTES` came: nothing is kept, no try follows.
    overflowed: bool,
    ended: bool,
    trailers: Option<http::HeaderMap>,
    /// The try whose body is read now; an earlier try's body (its exchange abandoned) ends.
    current: u32,
}

/// One try's request body: what earlier tries read, then the rest of the downstream body.
pub struct Replay {
    state: Rc<RefCell<ReplayState>>,
    generation: u32,
    next_chunk: usize,
    trailers_sent: bool,
    exact: Option<u64>,
}

impl Replay {
    pub fn new(source: ProxyBody) -> Replay {
        let exact = source.size_hint().exact();
        Replay {
            state: Rc::new(RefCell::new(ReplayState {
                source,
                chunks: Vec::new(),
                buffered_bytes: 0,
                overflowed: false,
                ended: false,
                trailers: None,
                current: 0,
            })),
            generation: 0,
            next_chunk: 0,
            trailers_sent: false,
            exact,
        }
    }

    /// Can a next try still send the body again?
    pub fn replayable(&self) -> bool {
        !self.state.borrow().overflowed
    }

    /// The whole body, once it has been read to its end and kept (not over the limit): what a
    /// mirrored copy of the request carries.
    pub fn buffered(&self) -> Option<Bytes> {
        let s = self.state.borrow();
        if s.overflowed || !s.ended {
            return None;
        }
        if let [only] = s.chunks.as_slice() {
            return Some(only.clone());
        }
        let mut all = bytes::BytesMut::with_capacity(s.buffered_bytes);
        for chunk in &s.chunks {
            all.extend_from_slice(chunk);
        }
        Some(all.freeze())
    }

    /// The body for the next try; `None` once the body is too large to replay.
    pub fn again(&self) -> Option<Replay> {
        let mut s = self.state.borrow_mut();
        if s.overflowed {
            return None;
        }
        s.current += 1;
        Some(Replay {
            state: self.state.clone(),
            generation: s.current,
            next_chunk: 0,
            trailers_sent: false,
            exact: self.exact,
        })
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut s = self.state.borrow_mut();
        if self.generation != s.current {
            return Poll::Ready(None);
        }
        if let Some(chunk) = s.chunks.get(self.next_chunk) {
            self.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.source).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        if s.buffered_bytes + data.len() > RETRY_BUFFER_LIMIT_BYTES {
                            s.overflowed = true;
                            s.chunks = Vec::new();
                        } else {
                            s.buffered_bytes += data.len();
                            s.chunks.push(data.clone());
                            self.next_chunk = s.chunks.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    self.trailers_sent = true;
                }
                if s.source.is_end_stream() {
                    s.ended = true;
                }
            }
            Poll::Ready(None) => {
                s.ended = true;
                self.trailers_sent = true;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.exact == Some(0) {
            return true;
        }
        let s = self.state.borrow();
        self.generation == s.current
            && s.ended
            && self.next_chunk >= s.chunks.len()
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Called once with the response body's byte count and whether it was sent to its end.
pub type OnDone = Box<dyn FnOnce(u64, bool)>;

/// A response body that calls its `OnDone` when its last frame has been taken, or when hyper drops
/// it early (the client disconnected: `complete` is false).
pub struct Recorded {
    inner: ProxyBody,
    bytes: u64,
    done: Option<OnDone>,
}

impl Recorded {
    pub fn new(inner: ProxyBody, done: OnDone) -> Self {
        Recorded {
            inner,
            bytes: 0,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.bytes, complete);
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // hyper drops an empty body without polling it: that is a complete response.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
