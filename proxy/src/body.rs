//! The body type the proxy sends both ways, without boxing on the fast path.
//!
//! A [`ProxyBody`] streams an `Incoming` body through untouched (trailers
//! included), or carries a small full body, or a boxed stream made by the
//! filter chain. An optional [`Finisher`] runs exactly once, when the body ends
//! or is dropped: it returns upstream connections to their pool and records
//! metrics and the access log at the real end of the exchange.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// All of it went through.
    Complete,
    /// It failed (reset, I/O error).
    Failed,
    /// It was dropped before its end (the peer went away).
    Dropped,
    /// Sluice failed it before any byte of it went out and answered the
    /// request with this error response instead (see
    /// [`ProxyBody::end_replaced`]).
    Replaced {
        /// The status sent downstream.
        status: u16,
        /// The error's reason (`x-sluice-reason`).
        reason: &'static str,
    },
}

/// Runs once when a body ends: `(how, bytes)`.
pub type Finisher = Box<dyn FnOnce(BodyEnd, u64)>;

enum Inner {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    H1(crate::h1::H1Body),
    Downstream(crate::h1::DownstreamBody),
    Boxed(Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>),
    /// Through a filter chain (a variant of its own: the response head is
    /// handed back to it once encoded, see [`ProxyBody::keep_head`]).
    Filter(Pin<Box<crate::chain::FilterBody>>),
}

/// A body going downstream or upstream.
pub struct ProxyBody {
    inner: Inner,
    bytes: u64,
    finisher: Option<Finisher>,
}

impl ProxyBody {
    /// No body.
    pub fn empty() -> Self {
        ProxyBody { inner: Inner::Empty, bytes: 0, finisher: None }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b = bytes.into();
        let inner = if b.is_empty() { Inner::Empty } else { Inner::Full(Some(b)) };
        ProxyBody { inner, bytes: 0, finisher: None }
    }

    /// A streamed body from hyper.
    pub fn incoming(body: Incoming) -> Self {
        ProxyBody { inner: Inner::Incoming(body), bytes: 0, finisher: None }
    }

    /// A response body from Sluice's HTTP/1.1 upstream client.
    pub fn h1(body: crate::h1::H1Body) -> Self {
        ProxyBody { inner: Inner::H1(body), bytes: 0, finisher: None }
    }

    /// A request body from Sluice's HTTP/1.1 server.
    pub fn downstream(body: crate::h1::DownstreamBody) -> Self {
        ProxyBody { inner: Inner::Downstream(body), bytes: 0, finisher: None }
    }

    /// Any other body.
    pub fn boxed<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        ProxyBody { inner: Inner::Boxed(Box::pin(body.map_err(Into::into))), bytes: 0, finisher: None }
    }

    /// The upstream response fields this body carries, kept encoded (see
    /// `h1::verbatim`): the downstream encoder writes them after the head's own.
    pub(crate) fn verbatim(&self) -> Option<&crate::h1::Verbatim> {
        match &self.inner {
            Inner::H1(b) => b.verbatim(),
            Inner::Filter(f) => f.inner().verbatim(),
            _ => None,
        }
    }

    /// [`ProxyBody::verbatim`], to edit.
    pub(crate) fn verbatim_mut(&mut self) -> Option<&mut crate::h1::Verbatim> {
        match &mut self.inner {
            Inner::H1(b) => b.verbatim_mut(),
            _ => None,
        }
    }

    /// Takes the encoded fields [`ProxyBody::verbatim`] gives, for a filter
    /// chain's `ResponseHead`.
    pub(crate) fn take_verbatim(&mut self) -> Option<Box<crate::h1::Verbatim>> {
        match &mut self.inner {
            Inner::H1(b) => b.take_verbatim(),
            _ => None,
        }
    }

    /// Gives back the fields a filter chain left encoded (taken from this body).
    pub(crate) fn set_verbatim(&mut self, v: Option<Box<crate::h1::Verbatim>>) {
        if let Inner::H1(b) = &mut self.inner {
            b.set_verbatim(v);
        }
    }

    /// A body through a filter chain.
    pub(crate) fn filter(body: crate::chain::FilterBody) -> Self {
        ProxyBody { inner: Inner::Filter(Box::pin(body)), bytes: 0, finisher: None }
    }

    /// Hands the encoded response head to a filter chain that reads it in
    /// `on_log`, instead of the chain keeping a copy; other bodies drop it.
    pub(crate) fn keep_head(&mut self, parts: http::response::Parts) {
        if let Inner::Filter(f) = &mut self.inner {
            f.as_mut().keep_response_head(parts);
        }
    }

    /// Whether [`ProxyBody::keep_head`] keeps the head (the body goes through a
    /// chain and has not ended).
    pub(crate) fn keeps_head(&self) -> bool {
        matches!(self.inner, Inner::Filter(_)) && !self.is_end_stream()
    }

    /// Adds a finisher, chained after any existing one.
    pub fn on_end(mut self, f: impl FnOnce(BodyEnd, u64) + 'static) -> Self {
        self.finisher = Some(match self.finisher.take() {
            None => Box::new(f),
            Some(prev) => Box::new(move |end, n| {
                prev(end, n);
                f(end, n);
            }),
        });
        if self.is_end_stream() {
            self.finish(BodyEnd::Complete);
        }
        self
    }

    /// Ends a body that failed with a Sluice-made error before any byte of it
    /// went out, when the server answered the request with that error instead:
    /// the finisher records the answer's status, not the abandoned one's.
    pub(crate) fn end_replaced(mut self, status: u16, reason: &'static str) {
        self.finish(BodyEnd::Replaced { status, reason });
    }

    fn finish(&mut self, end: BodyEnd) {
        if let Some(f) = self.finisher.take() {
            f(end, self.bytes);
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        self.finish(BodyEnd::Dropped);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.inner {
            Inner::Empty => Poll::Ready(None),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Incoming(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Inner::H1(body) => Pin::new(body).poll_frame(cx),
            Inner::Downstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Boxed(body) => body.as_mut().poll_frame(cx),
            Inner::Filter(body) => body.as_mut().poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.finisher.is_some() && this.is_end_stream() {
                    this.finish(BodyEnd::Complete);
                }
            }
            // A failure Sluice made may yet be answered with an error response
            // (HTTP/1.1, nothing written yet): whoever holds the body ends it,
            // with `end_replaced`, or drops it.
            Poll::Ready(Some(Err(e))) if crate::error::is_internal(&**e) => {}
            Poll::Ready(Some(Err(_))) => this.finish(BodyEnd::Failed),
            Poll::Ready(None) => this.finish(BodyEnd::Complete),
            Poll::Pending => {}
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Full(b) => b.is_none(),
            Inner::Incoming(b) => b.is_end_stream(),
            Inner::H1(b) => b.is_end_stream(),
            Inner::Downstream(b) => b.is_end_stream(),
            Inner::Boxed(b) => b.is_end_stream(),
            Inner::Filter(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Incoming(b) => b.size_hint(),
            Inner::H1(b) => b.size_hint(),
            Inner::Downstream(b) => b.size_hint(),
            Inner::Boxed(b) => b.size_hint(),
            Inner::Filter(b) => b.size_hint(),
        }
    }
}
