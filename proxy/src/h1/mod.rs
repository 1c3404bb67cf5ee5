//! Sluice's own HTTP/1.1 codec: the upstream client (this file), and the
//! downstream server's request and response halves ([`request`],
//! [`response`]; the connection driver is `server::h1`).
//!
//! The client is driven on the request's task.
//!
//! hyper's client runs each connection as a separate task and talks to it
//! over channels (a request mpsc, a response oneshot, a body channel). Here
//! the exchange is a plain state machine polled by whoever needs it: the
//! request task until the response head arrives, then the downstream
//! connection as it pulls the response body. No task, no channel, one read
//! buffer per connection; header values and body frames share that buffer's
//! memory. Like pingora's and Envoy's codecs.
//!
//! The exchange is full duplex: while the response body streams, polling it
//! also keeps sending the request body. A connection goes back to its pool
//! the moment the last byte of a complete, keep-alive response is decoded.

mod decode;
mod encode;
mod io;
pub(crate) mod request;
pub(crate) mod response;
mod verbatim;

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};

pub use io::Io;
pub use request::DownstreamBody;
pub(crate) use verbatim::{Verbatim, drop_named};

use self::decode::{Decoder, Head, Step};
use self::encode::Writer;
use crate::body::{BoxError, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::pool::{ConnCounter, ConnFacts, EndpointPool};

/// Bytes a read asks for while waiting for a head.
const READ_HEAD: usize = 8 * 1024;
/// Bytes a read asks for while streaming a body.
const READ_BODY: usize = 32 * 1024;

/// An upstream HTTP/1.1 connection, idle or carrying one exchange. Lives in
/// one heap allocation for the connection's life ([`H1Conn::new`] boxes it),
/// so exchanges and bodies that carry it stay small to move.
pub struct H1Conn {
    io: Io,
    rbuf: BytesMut,
    /// The encoded head of the current request (kept to resend it).
    head: Vec<u8>,
    addr: SocketAddr,
    /// Responses completed on this connection.
    uses: u32,
    /// What filters may read of it.
    pub(crate) facts: ConnFacts,
    _counter: ConnCounter,
}

impl H1Conn {
    pub(crate) fn new(io: Io, addr: SocketAddr, counter: ConnCounter, facts: ConnFacts) -> Box<Self> {
        Box::new(H1Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_HEAD),
            head: Vec::new(),
            addr,
            uses: 0,
            facts,
            _counter: counter,
        })
    }

    /// An idle connection that must not carry another request.
    pub(crate) fn idle_unusable(&self) -> bool {
        !self.rbuf.is_empty() || self.io.idle_unusable()
    }

    fn read_error(&self, e: std::io::Error) -> ProxyError {
        ProxyError::upstream(ErrorKind::UpstreamReset, format!("reading from {}: {e}", self.addr))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, ProxyError>> {
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(self.read_error(e))),
        }
    }
}

/// What came back: the response, and for a `101` the upgraded connection
/// with any bytes the upstream sent after the head.
pub(crate) struct Answer {
    pub response: Response<ProxyBody>,
    pub upgraded: Option<(Io, BytesMut)>,
    /// The response has no hop-by-hop fields left to strip.
    pub stripped: bool,
}

/// One request on a connection, until its response head.
pub(crate) struct Exchange {
    conn: Box<H1Conn>,
    writer: Writer,
    method: Method,
    /// A write failed; the upstream may still have answered before closing.
    write_error: Option<ProxyError>,
    /// Bytes of a response arrived.
    received: bool,
    /// Keep the response's fields encoded, not as a map (see [`verbatim`]).
    verbatim: bool,
}

impl Exchange {
    /// Encodes the request head and sets up the body writer. With
    /// `verbatim`, the response's fields stay encoded (nothing reads them).
    pub(crate) fn start(
        mut conn: Box<H1Conn>,
        parts: &http::request::Parts,
        added: &crate::headers::Added<'_>,
        body: ProxyBody,
        verbatim: bool,
    ) -> Self {
        let framing = encode::encode_head(parts, added, &body, &mut conn.head);
        Exchange {
            conn,
            writer: Writer::new(body, framing),
            method: parts.method.clone(),
            write_error: None,
            received: false,
            verbatim,
        }
    }

    /// Whether the request can go out again on a fresh connection: this one
    /// was reused (it may have been closed by the upstream while idle), no
    /// byte of a response came back and the body was not consumed.
    pub(crate) fn can_resend(&self) -> bool {
        self.conn.uses > 0 && !self.received && !self.writer.touched
    }

    /// Moves the request to `fresh`, from its first byte.
    pub(crate) fn resend_on(&mut self, mut fresh: Box<H1Conn>) {
        std::mem::swap(&mut fresh.head, &mut self.conn.head);
        self.conn = fresh;
        let body = self.writer.take_body();
        let framing = self.writer.framing();
        self.writer = Writer::new(body.unwrap_or_else(ProxyBody::empty), framing);
        self.write_error = None;
    }

    /// Sends the request and reads until the final response head (skipping
    /// `1xx` other than `101`).
    pub(crate) fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, ProxyError>> {
        let conn = &mut self.conn;
        if !self.writer.done && self.write_error.is_none() {
            match self.writer.poll(&mut conn.io, &conn.head, cx) {
                Poll::Ready(Err(e)) if e.side == Side::Upstream => self.write_error = Some(e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        loop {
            if !conn.rbuf.is_empty() {
                self.received = true;
                if let Some(head) = decode::parse_head(&mut conn.rbuf, &self.method, self.verbatim)? {
                    let s = head.parts.status;
                    if s.is_informational() && s != http::StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            if ready!(conn.poll_read(cx, READ_HEAD))? == 0 {
                let e = self.write_error.take().unwrap_or_else(|| {
                    ProxyError::upstream(
                        ErrorKind::UpstreamReset,
                        format!("{} closed the connection before a response", conn.addr),
                    )
                });
                return Poll::Ready(Err(e));
            }
        }
    }

    /// Turns the exchange into the response; the body returns the connection
    /// to `home` when it completes.
    pub(crate) fn into_answer(self, head: Head, home: Option<(Rc<EndpointPool>, usize)>) -> Answer {
        let Head { parts, decoder, keep_alive, verbatim, stripped } = head;
        if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let H1Conn { io, rbuf, .. } = *self.conn;
            return Answer {
                response: Response::from_parts(parts, ProxyBody::empty()),
                upgraded: Some((io, rbuf)),
                stripped,
            };
        }
        let keep_alive = keep_alive && self.write_error.is_none();
        let mut body = H1Body {
            conn: Some(self.conn),
            writer: (!self.writer.done).then(|| Box::new(self.writer)),
            decoder,
            keep_alive,
            home,
            failed: None,
            verbatim,
        };
        if body.decoder.is_done() {
            body.release();
        }
        Answer { response: Response::from_parts(parts, ProxyBody::h1(body)), upgraded: None, stripped }
    }
}

/// A response body read straight from the upstream connection.
pub struct H1Body {
    /// `None` once the body ended (the connection went home or was closed).
    conn: Option<Box<H1Conn>>,
    /// The request body still being sent (full duplex; boxed: rare, and a
    /// `Writer` holds a `ProxyBody`, which may hold an `H1Body`).
    writer: Option<Box<Writer>>,
    decoder: Decoder,
    keep_alive: bool,
    home: Option<(Rc<EndpointPool>, usize)>,
    /// An upstream failure, reported on the next poll.
    failed: Option<Box<ProxyError>>,
    /// The response's fields, when they were kept encoded.
    verbatim: Option<Box<Verbatim>>,
}

impl H1Body {
    /// The response's fields, when they were kept encoded (its head then has none).
    pub(crate) fn verbatim(&self) -> Option<&Verbatim> {
        self.verbatim.as_deref()
    }

    pub(crate) fn verbatim_mut(&mut self) -> Option<&mut Verbatim> {
        self.verbatim.as_deref_mut()
    }

    /// Takes the encoded fields (a filter chain reads them from a `ResponseHead`).
    pub(crate) fn take_verbatim(&mut self) -> Option<Box<Verbatim>> {
        self.verbatim.take()
    }

    /// Gives the fields back (those a filter chain left encoded).
    pub(crate) fn set_verbatim(&mut self, v: Option<Box<Verbatim>>) {
        self.verbatim = v;
    }

    /// The body ended: the connection goes back to its pool if it can carry
    /// another request, else it is closed.
    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        let request_sent = self.writer.as_ref().is_none_or(|w| w.done);
        if self.keep_alive && request_sent && self.decoder.is_done() && conn.rbuf.is_empty() {
            conn.uses += 1;
            if let Some((pool, max_idle)) = self.home.take() {
                pool.put_back(conn, max_idle);
            }
        }
    }

    /// Closes the connection and reports `e` on the next poll. The one
    /// `Pending` in between lets the downstream codec flush what it already
    /// has (hyper's HTTP/1.1 server buffers the head with the first frame and
    /// drops its buffer on a body error): the client then sees the status and
    /// the bytes that made it before the reset, as with Envoy.
    fn fail(
        &mut self,
        e: ProxyError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        self.conn = None;
        self.writer = None;
        self.failed = Some(Box::new(e));
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for H1Body {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if let Some(w) = this.writer.as_mut()
                && !w.done
            {
                match w.poll(&mut conn.io, &conn.head, cx) {
                    Poll::Ready(Err(e)) if e.side != Side::Upstream => return this.fail(e, cx),
                    // The upstream stopped reading the request; its response goes on.
                    Poll::Ready(Err(_)) => {
                        this.keep_alive = false;
                        this.writer = None;
                    }
                    _ => {}
                }
            }
            let step = match this.decoder.decode(&mut conn.rbuf) {
                Ok(s) => s,
                Err(e) => return this.fail(e, cx),
            };
            let frame = match step {
                Step::Data(b) => Frame::data(b),
                Step::Trailers(t) => Frame::trailers(t),
                Step::End => {
                    this.release();
                    return Poll::Ready(None);
                }
                Step::More => {
                    match conn.poll_read(cx, READ_BODY) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return this.fail(e, cx),
                        Poll::Ready(Ok(0)) if this.decoder == Decoder::Eof => {
                            this.decoder = Decoder::Done;
                            this.keep_alive = false;
                        }
                        Poll::Ready(Ok(0)) => {
                            let e = ProxyError::upstream(
                                ErrorKind::UpstreamReset,
                                format!("{} closed the connection mid-body", conn.addr),
                            );
                            return this.fail(e, cx);
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                    continue;
                }
            };
            if this.decoder.is_done() {
                this.release();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && (self.conn.is_none() || self.decoder.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
