//! The bodies the proxy passes on: a peer's streamed body with its bytes counted, or one the
//! waypoint wrote itself; and the response wrapper that records the request once its last byte has
//! gone (or the client went away first).

use std::cell::Cell;
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
            ProxyBody::Full(_) => f(),
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream { inner, .. } => inner.size_hint(),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
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
