//! The downstream side of HTTP/1.1: request heads (httparse; header values
//! share the connection's read buffer) with their body framing (RFC 9112
//! §6.1–6.3), strict about every smuggling vector, and the request body read
//! straight from the connection.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Uri, Version, request};
use http_body::{Body, Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

use super::decode::{Chunk, Decoder, Present, Spans, Step, field_spans, has_token, header_map};
use super::io::Io;
use crate::body::BoxError;
use crate::error::{ErrorKind, ProxyError, Side};

/// Header slots on the stack; a limit above this parses into a heap vector.
const STACK_HEADERS: usize = 128;
/// Room for header fields added to a request on its way upstream: the
/// proxy's four (request id, forwarding, tracing) and a few a filter chain
/// adds. A map at capacity doubles on the next insert (~700 instructions:
/// `bench/instructions.sh`, one header-rewrite filter).
const ADDED_FIELDS: usize = 8;
/// Bytes a read asks for while streaming a request body.
const READ_BODY: usize = 32 * 1024;

fn bad(detail: impl Into<String>) -> ProxyError {
    ProxyError::bad_request(detail)
}

fn too_large(detail: impl Into<String>) -> ProxyError {
    ProxyError::new(Side::Downstream, ErrorKind::HeadersTooLarge, detail)
}

/// A parsed request head.
pub(crate) struct RequestHead {
    pub parts: request::Parts,
    pub decoder: Decoder,
    /// The client allows another request on this connection after this one.
    pub keep_alive: bool,
    /// `expect: 100-continue` (HTTP/1.1).
    pub expect_continue: bool,
    /// `connection: upgrade` with an `upgrade` header.
    pub upgrade: bool,
    /// `te: trailers`: the client takes trailer fields in a chunked response.
    pub trailers_ok: bool,
}

/// Parses a request head from the front of `buf`, consuming it; `Ok(None)`
/// means more bytes are needed. Over `max_bytes` or `max_headers` is a 431.
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_headers: usize,
    max_bytes: usize,
) -> Result<Option<RequestHead>, ProxyError> {
    let mut spans = Spans::new();
    let scanned = if max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        scan(buf, &mut slots[..max_headers], max_bytes, &mut spans)?
    } else {
        let mut slots = Vec::with_capacity(max_headers);
        slots.resize_with(max_headers, MaybeUninit::uninit);
        scan(buf, &mut slots, max_bytes, &mut spans)?
    };
    let Some(Scan { len, method, version, target }) = scanned else { return Ok(None) };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|e| bad(format!("invalid request target: {e}")))?;
    // Room for the fields the proxy adds (request id, forwarding, tracing),
    // so adding them does not grow the map.
    let (headers, present) = header_map(&head, &spans, u128::MAX, ADDED_FIELDS).map_err(bad)?;
    // RFC 9112 §3.2: more than one `host` is refused (two authorities are a
    // way to make the proxy and the upstream disagree about the target).
    if present.has(Present::HOSTS) {
        return Err(bad("more than one host field"));
    }
    let decoder = framing(version, &headers, present)?;
    let connection = present.has(Present::CONNECTION);
    let keep_alive = match version {
        Version::HTTP_11 => !connection || !has_token(&headers, &CONNECTION, "close"),
        _ => connection && has_token(&headers, &CONNECTION, "keep-alive"),
    };
    let expect_continue = version == Version::HTTP_11
        && present.has(Present::EXPECT)
        && headers.get(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = present.has(Present::UPGRADE) && connection && crate::headers::is_upgrade(&headers);
    let trailers_ok = present.has(Present::TE) && has_token(&headers, &TE, "trailers");
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead { parts, decoder, keep_alive, expect_continue, upgrade, trailers_ok }))
}

/// A head found by [`scan`]: its length and where its parts are in the buffer.
struct Scan {
    len: usize,
    method: Method,
    version: Version,
    target: (usize, usize),
}

fn scan<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    max_bytes: usize,
    spans: &mut Spans,
) -> Result<Option<Scan>, ProxyError> {
    let mut r = httparse::Request::new(&mut []);
    let max_headers = slots.len();
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut r, buf, slots) {
        Ok(httparse::Status::Complete(n)) if n <= max_bytes => n,
        Ok(httparse::Status::Partial) if buf.len() <= max_bytes => return Ok(None),
        Ok(_) => return Err(too_large(format!("request head larger than {max_bytes} bytes"))),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(too_large(format!("more than {max_headers} request header fields")));
        }
        Err(e) => return Err(bad(format!("invalid request head: {e}"))),
    };
    let method = Method::from_bytes(r.method.unwrap_or("").as_bytes()).map_err(|_| bad("invalid method"))?;
    let version = if r.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Offsets into `buf`, so the target and the values can share its memory.
    let base = buf.as_ptr() as usize;
    let t = r.path.unwrap_or("");
    let t0 = t.as_ptr() as usize - base;
    field_spans(r.headers, base, spans);
    Ok(Some(Scan { len, method, version, target: (t0, t0 + t.len()) }))
}

/// The request body framing (RFC 9112 §6.3), refusing what an intermediary
/// could read differently from the upstream: `transfer-encoding` with
/// `content-length`, in HTTP/1.0, or not ending in a single `chunked`;
/// `content-length` lists, signs or conflicting duplicates. Identical
/// duplicate `content-length` fields are one length.
fn framing(version: Version, headers: &HeaderMap, present: Present) -> Result<Decoder, ProxyError> {
    if present.has(Present::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(bad("transfer-encoding in an HTTP/1.0 request"));
        }
        if present.has(Present::CONTENT_LENGTH) {
            return Err(bad("both content-length and transfer-encoding"));
        }
        let mut codings = SmallVec::<[&str; 2]>::new();
        for v in headers.get_all(TRANSFER_ENCODING) {
            let s = v.to_str().map_err(|_| bad("invalid transfer-encoding"))?;
            codings.extend(s.split(',').map(str::trim).filter(|t| !t.is_empty()));
        }
        let chunked = |t: &&str| t.eq_ignore_ascii_case("chunked");
        if codings.last().is_none_or(|t| !chunked(t)) || codings.iter().filter(|t| chunked(t)).count() != 1 {
            return Err(bad("transfer-encoding must end in a single chunked"));
        }
        return Ok(Decoder::Chunked(Chunk::Size));
    }
    let mut length: Option<u64> = None;
    let lengths = present.has(Present::CONTENT_LENGTH).then(|| headers.get_all(CONTENT_LENGTH));
    for v in lengths.iter().flatten() {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
            return Err(bad("invalid content-length"));
        }
        let n = b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(bad("conflicting content-length values"));
        }
        length = Some(n);
    }
    Ok(match length {
        None | Some(0) => Decoder::Done,
        Some(n) => Decoder::Length(n),
    })
}

/// What a downstream HTTP/1.1 connection's request bodies share with it.
pub(crate) struct Core {
    /// `None` once the connection was handed over (upgrade).
    pub io: Option<Io>,
    pub rbuf: BytesMut,
    /// The current request's body decoder.
    pub decoder: Decoder,
    /// Counts requests, so a body outliving its request reads nothing more.
    pub generation: u64,
    /// A `100 Continue` to send before reading the body: bytes written so far.
    pub continue_at: Option<usize>,
    /// The body failed (bad framing, the client went away): the connection
    /// cannot carry another request.
    pub broken: bool,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Core {
    pub(crate) fn new(io: Io, rbuf: BytesMut) -> Self {
        Core { io: Some(io), rbuf, decoder: Decoder::Done, generation: 0, continue_at: None, broken: false }
    }

    fn fail(&mut self, e: ProxyError) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        self.broken = true;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    /// Starts the next request on the connection: its body's framing and
    /// whether a `100 Continue` is owed. Returns the request's generation.
    pub(crate) fn next_request(&mut self, decoder: Decoder, expect_continue: bool) -> u64 {
        self.generation += 1;
        self.decoder = decoder;
        self.continue_at = (expect_continue && !decoder.is_done()).then_some(0);
        self.generation
    }

    /// Reads more into the buffer (at least `want / 4` bytes of room, else
    /// `want` more); `Ok(0)` at EOF or once the connection was handed over.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        let Some(io) = self.io.as_mut() else { return Poll::Ready(Ok(0)) };
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rbuf)
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        let Some(io) = self.io.as_mut() else { return Poll::Ready(None) };
        while let Some(at) = self.continue_at {
            if !self.rbuf.is_empty() {
                // The client did not wait for the interim response.
                self.continue_at = None;
                break;
            }
            match Pin::new(&mut *io).poll_write(cx, &CONTINUE[at..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    let at = at + n;
                    self.continue_at = (at < CONTINUE.len()).then_some(at);
                }
                Poll::Ready(_) => return self.fail(bad("the client went away before its body")),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            let step = match self.decoder.decode(&mut self.rbuf) {
                Ok(s) => s,
                Err(e) => return self.fail(bad(format!("request body: {}", e.detail))),
            };
            match step {
                Step::Data(b) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Step::Trailers(t) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Step::End => return Poll::Ready(None),
                Step::More => {}
            }
            match self.poll_fill(cx, READ_BODY) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return self.fail(bad("the client closed the connection mid-body")),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(bad(format!("reading the request body: {e}"))),
            }
        }
    }
}

/// A request body read from its downstream HTTP/1.1 connection.
pub struct DownstreamBody {
    core: Rc<RefCell<Core>>,
    generation: u64,
    /// The `content-length`, for the size hint.
    length: Option<u64>,
}

impl DownstreamBody {
    /// The body of request `generation` (see [`Core::next_request`]), framed by `decoder`.
    pub(crate) fn new(core: Rc<RefCell<Core>>, generation: u64, decoder: Decoder) -> Self {
        let length = match decoder {
            Decoder::Length(n) => Some(n),
            _ => None,
        };
        DownstreamBody { core, generation, length }
    }
}

impl Body for DownstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        let Ok(mut core) = self.core.try_borrow_mut() else {
            let e =
                ProxyError::new(Side::Internal, ErrorKind::BadRequest, "request body polled re-entrantly");
            return Poll::Ready(Some(Err(Box::new(e))));
        };
        if core.generation != self.generation {
            return Poll::Ready(None);
        }
        core.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.core.try_borrow().is_ok_and(|c| c.generation != self.generation || c.decoder.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, ProxyError> {
        parse_request(&mut BytesMut::from(s), 100, 64 * 1024)
    }

    #[test]
    fn a_simple_get_with_leftover() {
        let mut b = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\nGET /next");
        let h = parse_request(&mut b, 100, 64 * 1024).unwrap().unwrap();
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.headers["host"], "x");
        assert!(h.keep_alive && h.trailers_ok && !h.upgrade && !h.expect_continue);
        assert!(h.decoder.is_done());
        assert_eq!(&b[..], b"GET /next");
    }

    #[test]
    fn partial_heads_wait_and_limits_are_431() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "v".repeat(2000));
        let e = parse_request(&mut BytesMut::from(big.as_str()), 100, 1024).err().unwrap();
        assert_eq!(e.kind, ErrorKind::HeadersTooLarge);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(5));
        let e = parse_request(&mut BytesMut::from(many.as_str()), 4, 1024).err().unwrap();
        assert_eq!(e.kind, ErrorKind::HeadersTooLarge);
        assert!(parse_request(&mut BytesMut::from(many.as_str()), 5, 1024).unwrap().is_some());
    }

    #[test]
    fn framing_and_smuggling_vectors() {
        let ok = |s: &str| parse(s).unwrap().unwrap();
        assert_eq!(ok("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n").decoder, Decoder::Length(5));
        assert_eq!(
            ok("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n").decoder,
            Decoder::Length(5)
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\ntransfer-encoding: gzip, Chunked\r\n\r\n").decoder,
            Decoder::Chunked(Chunk::Size)
        );
        for vector in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\rHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\ntransfer-encoding : chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
        ] {
            let e = parse(vector).err().unwrap_or_else(|| panic!("accepted: {vector:?}"));
            assert_eq!(e.kind, ErrorKind::BadRequest, "{vector:?}");
        }
    }

    #[test]
    fn keep_alive_expect_and_upgrade() {
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive);
        let h = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h =
            parse("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 1\r\n\r\n").unwrap().unwrap();
        assert!(h.expect_continue);
        let h =
            parse("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(h.upgrade);
    }
}
