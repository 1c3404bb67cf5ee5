//! The response side of a downstream HTTP/1.1 exchange: the head with its
//! framing (RFC 9112 §6) and the writer that streams the body behind it,
//! gathering the head and the frames that are ready into one vectored write.

use std::cell::RefCell;
use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, HeaderValue, TRANSFER_ENCODING};
use http::{StatusCode, response};
use http_body::Body;
use tokio::io::AsyncWrite;

use super::encode::{Framing, Pieces, content_length, put_field};
use super::request::Core;
use crate::body::ProxyBody;
use crate::error::{ErrorKind, ProxyError, Side};

/// Bytes gathered from the body before they are written.
const GATHER: usize = 64 * 1024;

/// What the request says about its response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub head: bool,
    pub http10: bool,
}

/// Encodes the response head into `out` (cleared first). Returns the body
/// framing and whether the connection stays open (`keep_alive` in, as far
/// as the request and the connection allow).
pub(crate) fn encode_head(
    parts: &response::Parts,
    body: &ProxyBody,
    asked: Asked,
    mut keep_alive: bool,
    out: &mut Vec<u8>,
) -> (Framing, bool) {
    let h = &parts.headers;
    let status = parts.status;
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    // The upstream's end-to-end fields, when they came through encoded.
    let verbatim = body.verbatim();
    // One pass over the (few) fields instead of a hash lookup per name.
    let (mut has_length, mut has_date) = (false, verbatim.is_some_and(|v| v.has_date));
    for (name, value) in h {
        if name == CONNECTION {
            keep_alive &= !super::decode::value_has_token(value, "close");
        } else if name == CONTENT_LENGTH {
            has_length = true;
        } else if name == DATE {
            has_date = true;
        }
    }
    let bodiless =
        status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let (framing, add_length) = if bodiless || asked.head {
        (Framing::None, None)
    } else if let Some(n) = has_length.then(|| content_length(h)).flatten() {
        (Framing::Length(n), None)
    } else if let Some(n) = verbatim.and_then(|v| v.length) {
        (Framing::Length(n), None)
    } else if let Some(n) = body.size_hint().exact() {
        (Framing::Length(n), Some(n))
    } else if asked.http10 {
        keep_alive = false;
        (Framing::Close, None)
    } else {
        (Framing::Chunked, None)
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // The upstream's fields first: a route's added fields follow them, as
    // they would in the map.
    if let Some(v) = verbatim {
        out.extend_from_slice(&v.lines);
    }
    for (name, value) in h {
        // Framing and persistence are ours to say (a 101 keeps its `connection: upgrade`).
        if name == TRANSFER_ENCODING
            || (name == CONNECTION && !upgrade)
            || (name == CONTENT_LENGTH
                && (add_length.is_some() || bodiless && status != StatusCode::NOT_MODIFIED))
        {
            continue;
        }
        put_field(out, name, value);
    }
    if !has_date {
        put_field(out, &DATE, &http_date());
    }
    match (framing, add_length) {
        (Framing::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (_, Some(n)) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ => {}
    }
    if !upgrade {
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if asked.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// `date`, formatted once per second per thread.
fn http_date() -> HeaderValue {
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> = const { RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let v =
                HeaderValue::from_str(&httpdate::fmt_http_date(now)).unwrap_or(HeaderValue::from_static(""));
            *c = (secs, v);
        }
        c.1.clone()
    })
}

fn write_failed(e: std::io::Error) -> ProxyError {
    ProxyError::new(Side::Downstream, ErrorKind::BadRequest, format!("writing the response: {e}"))
}

fn gone() -> ProxyError {
    ProxyError::new(Side::Internal, ErrorKind::BadRequest, "the connection was handed over")
}

/// Streams one response's head and body to the downstream.
pub(crate) struct ResponseWriter {
    body: Option<ProxyBody>,
    framing: Framing,
    trailers_ok: bool,
    head_pos: usize,
    pieces: Pieces,
    /// The body ended as its framing says (else the connection must close).
    pub complete: bool,
}

impl ResponseWriter {
    /// A writer whose buffers are reused by every response of a connection.
    pub(crate) fn new() -> Self {
        ResponseWriter {
            body: None,
            framing: Framing::None,
            trailers_ok: false,
            head_pos: 0,
            pieces: Pieces::default(),
            complete: true,
        }
    }

    /// Starts the next response.
    pub(crate) fn start(&mut self, body: ProxyBody, framing: Framing, trailers_ok: bool) {
        // A body the framing does not carry is dropped here (HEAD, 204, 304).
        self.body = (framing != Framing::None && !body.is_end_stream()).then_some(body);
        self.complete = self.body.is_none() && !matches!(framing, Framing::Length(n) if n > 0);
        self.framing = framing;
        self.trailers_ok = trailers_ok;
        self.head_pos = 0;
        self.pieces.clear();
        if self.body.is_none() && framing == Framing::Chunked {
            self.pieces.push_last_chunk(None);
        }
    }

    /// Whether the server answers a failed response with its error instead of
    /// closing: Sluice made the failure (a response filter, or the body it
    /// buffers past `max_buffered_body_bytes`) and no byte of the response was
    /// written yet (the head goes out with the first body bytes, or once the
    /// body has none ready). Envoy does the same before the headers are sent.
    pub(crate) fn answers(&self, e: &ProxyError) -> bool {
        e.side == Side::Internal && self.head_pos == 0
    }

    /// Writes the head and the body until the body ends (`Ready(Ok)`), or
    /// fails. Holds the connection's core only while writing, never while
    /// polling the body (which may read the request body from it).
    pub(crate) fn poll(
        &mut self,
        head: &[u8],
        core: &RefCell<Core>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ProxyError>> {
        loop {
            let mut body_pending = false;
            if self.pieces.queued() < GATHER
                && let Some(body) = self.body.as_mut()
            {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let end = body.is_end_stream();
                        match frame.into_data() {
                            Ok(data) => self.push_data(data)?,
                            Err(frame) => {
                                if let (Ok(t), Framing::Chunked, true) =
                                    (frame.into_trailers(), self.framing, self.trailers_ok)
                                {
                                    self.pieces.push_last_chunk(Some(&t));
                                    self.framing = Framing::None;
                                }
                            }
                        }
                        if end {
                            self.end();
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.end();
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let body = self.body.take();
                        // A proxy-made failure (a response filter's, or its
                        // buffer limit) keeps its side and kind.
                        let e = match e.downcast::<ProxyError>() {
                            Ok(e) => *e,
                            Err(e) => ProxyError::new(
                                Side::Upstream,
                                ErrorKind::UpstreamReset,
                                format!("response body: {e}"),
                            ),
                        };
                        // The server answers with the error instead: the
                        // request's metrics and access log say so.
                        if let (true, Some(body)) = (self.answers(&e), body) {
                            body.end_replaced(e.status().as_u16(), e.reason());
                        }
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => body_pending = true,
                }
            }
            let head_left = head.len() - self.head_pos;
            if head_left == 0 && self.pieces.queued() == 0 {
                if body_pending {
                    return Poll::Pending;
                }
                let mut c = core.try_borrow_mut().map_err(|_| gone())?;
                let io = c.io.as_mut().ok_or_else(gone)?;
                ready!(Pin::new(io).poll_flush(cx)).map_err(write_failed)?;
                return Poll::Ready(Ok(()));
            }
            let mut c = core.try_borrow_mut().map_err(|_| gone())?;
            let io = c.io.as_mut().ok_or_else(gone)?;
            let slices = self.pieces.slices(&head[self.head_pos..]);
            let n = match Pin::new(io).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(write_failed(std::io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_failed(e))),
                Poll::Pending => return Poll::Pending,
            };
            drop(slices);
            drop(c);
            let h = n.min(head_left);
            self.head_pos += h;
            self.pieces.advance(n - h);
        }
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), ProxyError> {
        if self.pieces.push_framed(&mut self.framing, data) {
            return Ok(());
        }
        Err(ProxyError::new(
            Side::Upstream,
            ErrorKind::UpstreamProtocol,
            "response body longer than its content-length",
        ))
    }

    fn end(&mut self) {
        self.body = None;
        match self.framing {
            Framing::Chunked => {
                self.pieces.push_last_chunk(None);
                self.complete = true;
            }
            Framing::Length(n) => self.complete = n == 0,
            Framing::None | Framing::Close => self.complete = true,
        }
    }
}
