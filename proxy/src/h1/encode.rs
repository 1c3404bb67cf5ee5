//! The request side of an HTTP/1.1 exchange: the head, the body framing and
//! the writer that streams the body (vectored writes, no copy of body data).

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, request};
use http_body::Body;
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

use super::io::Io;
use crate::body::ProxyBody;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::Added;

/// How a body is framed on the wire (requests and responses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `content-length`: this many bytes still to send.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses to HTTP/1.0 clients only).
    Close,
}

/// Encodes the request head into `out` (cleared first) and picks the body
/// framing, with hyper's client rules: no body → no framing; a
/// `content-length` the sender set is kept; a body of known size gets one;
/// otherwise chunked, except GET/HEAD/CONNECT, which send no body.
pub(crate) fn encode_head(
    parts: &request::Parts,
    added: &Added<'_>,
    body: &ProxyBody,
    out: &mut Vec<u8>,
) -> Framing {
    let h = &parts.headers;
    let (framing, add_length) = if body.is_end_stream() {
        (Framing::None, None)
    } else if let Some(n) = content_length(h) {
        (Framing::Length(n), None)
    } else if let Some(n) = body.size_hint().exact() {
        (Framing::Length(n), Some(n))
    } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        (Framing::None, None)
    } else {
        (Framing::Chunked, None)
    };
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in h {
        // Framing is ours to set; a stale `content-length` goes with it.
        if name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH && (add_length.is_some() || framing == Framing::Chunked))
        {
            continue;
        }
        put_field(out, name, value);
    }
    added.encode(out);
    match (framing, add_length) {
        (Framing::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (_, Some(n)) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes one `name: value` line (head or trailer section).
pub(crate) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The single valid `content-length` of a head, if it has one.
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut all = h.get_all(CONTENT_LENGTH).iter();
    let first = all.next()?;
    let n = std::str::from_utf8(first.as_bytes()).ok()?.trim().parse().ok()?;
    all.all(|v| v == first).then_some(n)
}

/// A piece of output waiting for the socket.
enum Piece {
    Data(Bytes),
    Static(&'static [u8]),
    /// A chunk-size line.
    Size([u8; 18], u8),
    /// The last chunk with its trailers.
    Owned(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Data(b) => b,
            Piece::Static(s) => s,
            Piece::Size(b, n) => &b[..*n as usize],
            Piece::Owned(v) => v,
        }
    }

    fn size_line(len: usize) -> Piece {
        let mut b = [0u8; 18];
        let n = {
            let mut cur = io::Cursor::new(&mut b[..]);
            let _ = write!(cur, "{len:x}\r\n");
            cur.position() as u8
        };
        Piece::Size(b, n)
    }
}

/// Output waiting for the socket, behind a head: the pieces, and how far the
/// first unwritten one got.
#[derive(Default)]
pub(crate) struct Pieces {
    list: Vec<Piece>,
    next: usize,
    offset: usize,
    /// Bytes not yet written.
    queued: usize,
}

impl Pieces {
    fn push(&mut self, p: Piece) {
        self.queued += p.bytes().len();
        self.list.push(p);
    }

    /// Bytes not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a body chunk as `framing` says; `false` if it overruns the
    /// `content-length` (nothing is queued then).
    pub(crate) fn push_framed(&mut self, framing: &mut Framing, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        match framing {
            Framing::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return false;
                }
                *left -= n;
                self.push(Piece::Data(data));
            }
            Framing::Chunked => {
                self.push(Piece::size_line(data.len()));
                self.push(Piece::Data(data));
                self.push(Piece::Static(b"\r\n"));
            }
            Framing::Close => self.push(Piece::Data(data)),
            Framing::None => {}
        }
        true
    }

    /// Queues the last chunk of a chunked body, with its trailer section.
    pub(crate) fn push_last_chunk(&mut self, trailers: Option<&HeaderMap>) {
        match trailers {
            None => self.push(Piece::Static(b"0\r\n\r\n")),
            Some(t) => {
                let mut v = b"0\r\n".to_vec();
                for (name, value) in t {
                    put_field(&mut v, name, value);
                }
                v.extend_from_slice(b"\r\n");
                self.push(Piece::Owned(v));
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.next >= self.list.len()
    }

    /// Forgets everything (keeping the allocation).
    pub(crate) fn clear(&mut self) {
        self.list.clear();
        self.next = 0;
        self.offset = 0;
        self.queued = 0;
    }

    /// The unwritten bytes: what is left of `head`, then the pieces.
    pub(crate) fn slices<'a>(&'a self, head: &'a [u8]) -> SmallVec<[IoSlice<'a>; 8]> {
        let mut slices = SmallVec::new();
        if !head.is_empty() {
            slices.push(IoSlice::new(head));
        }
        for (i, p) in self.list.iter().enumerate().skip(self.next) {
            let b = p.bytes();
            slices.push(IoSlice::new(if i == self.next { &b[self.offset..] } else { b }));
        }
        slices
    }

    /// Marks `n` bytes of pieces written.
    pub(crate) fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let left = self.list[self.next].bytes().len() - self.offset;
            if n >= left {
                n -= left;
                self.next += 1;
                self.offset = 0;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        if self.is_empty() {
            self.clear();
        }
    }
}

/// Streams the request head and body to the upstream.
pub(crate) struct Writer {
    head_pos: usize,
    body: Option<ProxyBody>,
    framing: Framing,
    /// Allocated only for requests with a body.
    pieces: Pieces,
    /// A body frame was taken: the request can no longer be sent again.
    pub(crate) touched: bool,
    /// Everything, head and body, went out.
    pub(crate) done: bool,
}

fn write_err(e: io::Error) -> ProxyError {
    ProxyError::upstream(ErrorKind::UpstreamReset, format!("writing request: {e}"))
}

impl Writer {
    pub(crate) fn new(body: ProxyBody, framing: Framing) -> Self {
        let body = if framing == Framing::None { None } else { Some(body) };
        Writer { head_pos: 0, body, framing, pieces: Pieces::default(), touched: false, done: false }
    }

    /// How the body is framed.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// Takes the untouched body back (to send the request on another connection).
    pub(crate) fn take_body(&mut self) -> Option<ProxyBody> {
        if self.touched { None } else { self.body.take() }
    }

    /// Writes what is pending and pulls body frames until the body ends
    /// (`Ready(Ok)`), the socket or the body is not ready (`Pending`), or
    /// something fails.
    pub(crate) fn poll(
        &mut self,
        io: &mut Io,
        head: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ProxyError>> {
        loop {
            ready!(self.poll_write_pending(io, head, cx)).map_err(write_err)?;
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else {
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(write_err)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            };
            let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(ProxyError::new(
                        Side::Downstream,
                        ErrorKind::BadRequest,
                        format!("request body: {e}"),
                    )));
                }
            };
            self.touched = true;
            let mut end = frame.is_none();
            match frame.map(|f| f.into_data()) {
                None => {}
                Some(Ok(data)) => {
                    end = body.is_end_stream();
                    self.push_data(data)?;
                }
                Some(Err(frame)) => {
                    end = true;
                    if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), self.framing) {
                        self.pieces.push_last_chunk(Some(&trailers));
                        self.framing = Framing::None;
                    }
                }
            }
            if end {
                self.body = None;
                match self.framing {
                    Framing::Chunked => self.pieces.push_last_chunk(None),
                    Framing::Length(n) if n > 0 => {
                        return Poll::Ready(Err(ProxyError::new(
                            Side::Internal,
                            ErrorKind::UpstreamReset,
                            format!("request body ended {n} bytes short of its content-length"),
                        )));
                    }
                    _ => {}
                }
            }
        }
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), ProxyError> {
        if self.pieces.push_framed(&mut self.framing, data) {
            return Ok(());
        }
        Err(ProxyError::new(
            Side::Internal,
            ErrorKind::UpstreamReset,
            "request body longer than its content-length",
        ))
    }

    fn poll_write_pending(&mut self, io: &mut Io, head: &[u8], cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let head_left = &head[self.head_pos.min(head.len())..];
            if head_left.is_empty() && self.pieces.is_empty() {
                self.pieces.clear();
                return Poll::Ready(Ok(()));
            }
            let h = head_left.len();
            let slices = self.pieces.slices(head_left);
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            drop(slices);
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.head_pos += h.min(n);
            self.pieces.advance(n - h.min(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn head_of(req: Request<ProxyBody>) -> (String, Framing) {
        let (parts, body) = req.into_parts();
        let mut out = Vec::new();
        let f = encode_head(&parts, &Added::default(), &body, &mut out);
        (String::from_utf8(out).unwrap(), f)
    }

    #[test]
    fn bodyless_get() {
        let req = Request::get("/a?b=1").header("host", "x").body(ProxyBody::empty()).unwrap();
        let (h, f) = head_of(req);
        assert_eq!(h, "GET /a?b=1 HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(f, Framing::None);
    }

    #[test]
    fn known_length_gets_content_length() {
        let req = Request::post("/").body(ProxyBody::full("hello")).unwrap();
        let (h, f) = head_of(req);
        assert_eq!(h, "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(f, Framing::Length(5));
    }

    #[test]
    fn sender_content_length_is_kept_and_transfer_encoding_dropped() {
        let req = Request::post("/")
            .header("content-length", "5")
            .header("transfer-encoding", "gzip")
            .body(ProxyBody::full("hello"))
            .unwrap();
        let (h, f) = head_of(req);
        assert_eq!(h, "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(f, Framing::Length(5));
    }

    #[test]
    fn size_line() {
        assert_eq!(Piece::size_line(0x1a2b).bytes(), b"1a2b\r\n");
        assert_eq!(Piece::size_line(usize::MAX).bytes().len(), 18);
    }
}
