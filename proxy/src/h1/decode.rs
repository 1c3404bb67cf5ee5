//! The response side of an HTTP/1.1 exchange: the head (httparse, header
//! values shared with the read buffer, not copied) and the body decoder
//! (content-length, chunked with trailers, or until close), per RFC 9112 §6.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Version, response};
use smallvec::SmallVec;

use super::verbatim::{RawFields, Verbatim};
use crate::error::{ErrorKind, ProxyError};

/// The largest response head (and trailer section) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most response header fields accepted.
pub(crate) const MAX_HEADERS: usize = 128;
/// The longest chunk-size line accepted (extensions included).
const MAX_CHUNK_LINE: usize = 4096;

fn protocol(detail: impl Into<String>) -> ProxyError {
    ProxyError::upstream(ErrorKind::UpstreamProtocol, detail)
}

/// A parsed response head.
pub(crate) struct Head {
    /// Without fields when they are `verbatim`.
    pub parts: response::Parts,
    pub decoder: Decoder,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    /// The end-to-end fields, encoded (see [`super::verbatim`]).
    pub verbatim: Option<Box<Verbatim>>,
    /// The map (if any) holds only end-to-end fields: hop-by-hop ones were
    /// left out (all but a `101`'s).
    pub stripped: bool,
}

/// Parses a response head from the front of `buf`, consuming it;
/// `Ok(None)` means more bytes are needed. With `verbatim`, the fields of a
/// final response other than `204` are kept encoded, not as a map; a map
/// holds the end-to-end fields (all of a `101`'s).
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    verbatim: bool,
) -> Result<Option<Head>, ProxyError> {
    // Uninitialized slots: no 4 KiB of zeroing per response.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
            Ok(_) => return Err(protocol(format!("response head larger than {MAX_HEAD} bytes"))),
            Err(e) => return Err(protocol(format!("invalid response head: {e}"))),
        };
    let status = StatusCode::from_u16(r.code.unwrap_or(0)).map_err(|_| protocol("invalid status code"))?;
    let version = if r.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    let raw = RawFields::new(&buf[..len], r.headers);
    let framed = framing(method, status, version, &raw, raw.present())?;
    let Framed { decoder, keep_alive, drop_length, length } = framed;
    if verbatim && !status.is_informational() && status != StatusCode::NO_CONTENT {
        let kept = Box::new(raw.keep(drop_length, length));
        buf.advance(len);
        return Ok(Some(Head { parts, decoder, keep_alive, verbatim: Some(kept), stripped: true }));
    }
    // The map gets the end-to-end fields only (a `101` keeps its `upgrade`
    // and `connection`, which the upgrade passes on).
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let keep = if upgrade { u128::MAX } else { raw.end_to_end(drop_length) };
    let mut spans = Spans::new();
    field_spans(r.headers, buf.as_ptr() as usize, &mut spans);
    let head = buf.split_to(len).freeze();
    (parts.headers, _) = header_map(&head, &spans, keep, 0).map_err(protocol)?;
    Ok(Some(Head { parts, decoder, keep_alive, verbatim: None, stripped: !upgrade }))
}

/// Where each field's name and value are in the parsed buffer (offsets from
/// `base`, its start), so the values can share its memory once it is frozen.
pub(crate) type Spans = SmallVec<[(usize, usize, usize, usize); 24]>;

/// Fills `spans` in place: it is large, and a returned one would be copied.
pub(crate) fn field_spans(fields: &[httparse::Header<'_>], base: usize, spans: &mut Spans) {
    spans.extend(fields.iter().map(|h| {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        (n, n + h.name.len(), v, v + h.value.len())
    }));
}

/// The header map of a head's fields whose bit is set in `keep` (all:
/// `u128::MAX`), its values slices of `head`, with room for `spare` more
/// fields; and which framing fields it has.
pub(crate) fn header_map(
    head: &Bytes,
    spans: &Spans,
    keep: u128,
    spare: usize,
) -> Result<(HeaderMap, Present), &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len() + spare);
    let mut present = Present::default();
    for (i, &(ns, ne, vs, ve)) in spans.iter().enumerate() {
        if keep != u128::MAX && !kept(keep, i) {
            continue;
        }
        let name = field_name(&head[ns..ne]).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| "invalid header value")?;
        present.note(&name);
        headers.append(name, value);
    }
    Ok((headers, present))
}

/// A field's name: the commonest request fields by a length check and one
/// comparison, any other through `HeaderName`'s table (which lower-cases and
/// looks up every name, ~130 instructions each).
fn field_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    use http::header::{ACCEPT, ACCEPT_ENCODING, CONTENT_TYPE, HOST, USER_AGENT};
    let known = match raw.len() {
        4 if raw.eq_ignore_ascii_case(b"host") => Some(HOST),
        6 if raw.eq_ignore_ascii_case(b"accept") => Some(ACCEPT),
        10 if raw.eq_ignore_ascii_case(b"user-agent") => Some(USER_AGENT),
        12 if raw.eq_ignore_ascii_case(b"content-type") => Some(CONTENT_TYPE),
        14 if raw.eq_ignore_ascii_case(b"content-length") => Some(CONTENT_LENGTH),
        15 if raw.eq_ignore_ascii_case(b"accept-encoding") => Some(ACCEPT_ENCODING),
        _ => None,
    };
    match known {
        Some(name) => Ok(name),
        None => HeaderName::from_bytes(raw),
    }
}

/// Whether field `i`'s bit is set in a `keep` mask (fields past the 128th
/// always are: only request heads have that many, and they keep all).
#[inline]
pub(crate) fn kept(keep: u128, i: usize) -> bool {
    i >= 128 || (keep >> i) & 1 == 1
}

/// Which of the fields that decide framing and persistence a parsed head
/// has, noted while its map is built: a message without them (most) then
/// costs no hash lookup for each.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Present(u8);

impl Present {
    pub(crate) const CONNECTION: u8 = 1;
    pub(crate) const TRANSFER_ENCODING: u8 = 2;
    pub(crate) const CONTENT_LENGTH: u8 = 4;
    pub(crate) const EXPECT: u8 = 8;
    pub(crate) const UPGRADE: u8 = 16;
    pub(crate) const TE: u8 = 32;
    pub(crate) const HOST: u8 = 64;
    /// More than one `host` field (a request with it is refused).
    pub(crate) const HOSTS: u8 = 128;

    fn note(&mut self, name: &HeaderName) {
        use http::header::{EXPECT, HOST, TE, UPGRADE};
        if *name == HOST {
            self.0 |= if self.has(Self::HOST) { Self::HOSTS } else { Self::HOST };
            return;
        }
        self.0 |= if *name == CONNECTION {
            Self::CONNECTION
        } else if *name == TRANSFER_ENCODING {
            Self::TRANSFER_ENCODING
        } else if *name == CONTENT_LENGTH {
            Self::CONTENT_LENGTH
        } else if *name == EXPECT {
            Self::EXPECT
        } else if *name == UPGRADE {
            Self::UPGRADE
        } else if *name == TE {
            Self::TE
        } else {
            0
        };
    }

    /// Whether the head has a field of this kind (one of the constants).
    pub(crate) fn has(self, field: u8) -> bool {
        self.0 & field != 0
    }

    /// Notes a field of this kind (one of the constants).
    pub(crate) fn add(&mut self, field: u8) {
        self.0 |= field;
    }
}

/// A head's field values by name, for the framing rules: a header map, or
/// the parsed fields of a verbatim head.
pub(crate) trait Fields {
    /// The values of every `name` field, in order.
    fn values(&self, name: &HeaderName) -> SmallVec<[&[u8]; 2]>;
}

impl Fields for HeaderMap {
    fn values(&self, name: &HeaderName) -> SmallVec<[&[u8]; 2]> {
        self.get_all(name).iter().map(HeaderValue::as_bytes).collect()
    }
}

/// Whether a comma-separated field has `token` (case-insensitive).
pub(crate) fn has_token(headers: &impl Fields, name: &HeaderName, token: &str) -> bool {
    headers.values(name).iter().any(|v| bytes_have_token(v, token))
}

/// Whether a comma-separated value has `token` (case-insensitive).
pub(crate) fn value_has_token(value: &HeaderValue, token: &str) -> bool {
    bytes_have_token(value.as_bytes(), token)
}

fn bytes_have_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// What the framing rules decided.
struct Framed {
    decoder: Decoder,
    keep_alive: bool,
    /// `content-length` came with `transfer-encoding`: it must go.
    drop_length: bool,
    /// The `content-length` value, when it was read.
    length: Option<u64>,
}

/// The body framing of a response (RFC 9112 §6.3) and whether the
/// connection stays open after it.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &impl Fields,
    present: Present,
) -> Result<Framed, ProxyError> {
    let mut keep_alive = if present.has(Present::CONNECTION) {
        if version == Version::HTTP_11 {
            !has_token(headers, &CONNECTION, "close")
        } else {
            has_token(headers, &CONNECTION, "keep-alive")
        }
    } else {
        version == Version::HTTP_11
    };
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framed { decoder: Decoder::Done, keep_alive, drop_length: false, length: None });
    }
    if present.has(Present::TRANSFER_ENCODING)
        && let Some(te) = headers.values(&TRANSFER_ENCODING).last()
    {
        let chunked =
            te.rsplit(|&b| b == b',').next().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // Both: transfer-encoding wins and the connection is not reused.
        let drop_length = present.has(Present::CONTENT_LENGTH);
        keep_alive &= !drop_length;
        let (decoder, keep_alive) =
            if chunked { (Decoder::Chunked(Chunk::Size), keep_alive) } else { (Decoder::Eof, false) };
        return Ok(Framed { decoder, keep_alive, drop_length, length: None });
    }
    let mut length: Option<u64> = None;
    if present.has(Present::CONTENT_LENGTH) {
        for v in headers.values(&CONTENT_LENGTH) {
            let v = std::str::from_utf8(v).map_err(|_| protocol("invalid content-length"))?;
            for part in v.split(',') {
                let n: u64 = part.trim().parse().map_err(|_| protocol("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(protocol("conflicting content-length values"));
                }
                length = Some(n);
            }
        }
    }
    let (decoder, keep_alive) = match length {
        Some(0) => (Decoder::Done, keep_alive),
        Some(n) => (Decoder::Length(n), keep_alive),
        None => (Decoder::Eof, false),
    };
    Ok(Framed { decoder, keep_alive, drop_length: false, length })
}

/// Where the body decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the upstream closes.
    Eof,
    /// The body is complete.
    Done,
}

/// The state of the chunked decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    Crlf,
    Trailers,
}

/// What one decode step produced.
#[derive(Debug)]
pub(crate) enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// Whether the body is complete.
    pub(crate) fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Decodes from the front of `buf`. Data frames share `buf`'s memory.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, ProxyError> {
        loop {
            match self {
                Decoder::Done => return Ok(Step::End),
                Decoder::Eof => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Step::Data(buf.split_to(take as usize).freeze()));
                }
                Decoder::Chunked(Chunk::Size) => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = Decoder::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => return Ok(Step::More),
                    _ => return Err(protocol("invalid chunk size line")),
                },
                Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    if *left == 0 {
                        *self = Decoder::Chunked(Chunk::Crlf);
                    }
                    return Ok(Step::Data(buf.split_to(take as usize).freeze()));
                }
                Decoder::Chunked(Chunk::Crlf) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(protocol("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => return self.trailers(buf),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Step, ProxyError> {
        if buf.len() < 2 {
            return Ok(Step::More);
        }
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            *self = Decoder::Done;
            return Ok(Step::End);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (used, map) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((used, fields))) => {
                let mut map = HeaderMap::with_capacity(fields.len());
                for f in fields.iter() {
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| protocol("invalid trailer name"))?;
                    let value =
                        HeaderValue::from_bytes(f.value).map_err(|_| protocol("invalid trailer value"))?;
                    map.append(name, value);
                }
                (used, map)
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(Step::More),
            _ => return Err(protocol("invalid trailer section")),
        };
        buf.advance(used);
        *self = Decoder::Done;
        Ok(Step::Trailers(map))
    }
}

#[cfg(test)]
mod field_name_tests {
    use super::*;

    #[test]
    fn known_names_match_the_table_in_any_case() {
        for raw in [
            "Host",
            "host",
            "HOST",
            "Accept",
            "user-agent",
            "User-Agent",
            "Content-Type",
            "content-length",
            "Accept-Encoding",
            "x-custom",
            "Hos",
            "hosts",
            "Accept-Language",
        ] {
            let fast = field_name(raw.as_bytes()).unwrap();
            assert_eq!(fast, HeaderName::from_bytes(raw.as_bytes()).unwrap(), "{raw}");
        }
        assert!(field_name(b"bad name").is_err());
        assert!(field_name(b"").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str, method: &Method) -> (Head, BytesMut) {
        let mut b = BytesMut::from(s);
        let h = parse_head(&mut b, method, false).unwrap().unwrap();
        (h, b)
    }

    fn drain(d: &mut Decoder, buf: &mut BytesMut) -> (Vec<u8>, Option<HeaderMap>, bool) {
        let mut data = Vec::new();
        let mut trailers = None;
        loop {
            match d.decode(buf).unwrap() {
                Step::Data(b) => data.extend_from_slice(&b),
                Step::Trailers(t) => trailers = Some(t),
                Step::End => return (data, trailers, true),
                Step::More => return (data, trailers, false),
            }
        }
    }

    #[test]
    fn content_length_body_and_leftover() {
        let (h, mut rest) = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\n\r\nabcX", &Method::GET);
        assert_eq!(h.parts.status, 200);
        assert_eq!(h.parts.headers["x-a"], "b");
        assert!(h.keep_alive);
        let mut d = h.decoder;
        assert_eq!(d.decode(&mut rest).unwrap().data(), Some(&b"abc"[..]));
        assert!(d.is_done());
        assert_eq!(&rest[..], b"X");
    }

    #[test]
    fn partial_head_needs_more() {
        let partial = "HTTP/1.1 200 OK\r\ncontent-le";
        let mut b = BytesMut::from(partial);
        assert!(parse_head(&mut b, &Method::GET, false).unwrap().is_none());
        assert_eq!(&b[..], partial.as_bytes());
    }

    #[test]
    fn chunked_split_at_every_byte_with_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n";
        for cut in 0..wire.len() {
            let mut d = Decoder::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(&wire[..cut]);
            let (mut data, t1, end1) = drain(&mut d, &mut buf);
            assert!(!end1 || cut == wire.len());
            buf.extend_from_slice(&wire[cut..]);
            let (more, t2, end2) = drain(&mut d, &mut buf);
            data.extend_from_slice(&more);
            assert!(end2, "cut {cut}");
            assert_eq!(data, b"hello world");
            let t = t1.or(t2).unwrap();
            assert_eq!(t["grpc-status"], "0");
        }
    }

    #[test]
    fn framing_rules() {
        let (h, _) = head("HTTP/1.1 204 No Content\r\n\r\n", &Method::GET);
        assert!(h.decoder.is_done());
        let (h, _) = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", &Method::HEAD);
        assert!(h.decoder.is_done());
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert_eq!(h.decoder, Decoder::Eof);
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", &Method::GET);
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n", &Method::GET);
        assert!(!h.keep_alive);
        let (h, _) =
            head("HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n", &Method::GET);
        assert_eq!(h.decoder, Decoder::Chunked(Chunk::Size));
        assert!(!h.keep_alive);
        assert!(!h.parts.headers.contains_key(CONTENT_LENGTH));
        let mut b = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert!(parse_head(&mut b, &Method::GET, false).is_err());
    }

    #[test]
    fn bad_chunks_are_protocol_errors() {
        for wire in [&b"zz\r\n"[..], b"3\r\nabcXY", b"ffffffffffffffffff\r\n"] {
            let mut d = Decoder::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(wire);
            let mut failed = false;
            for _ in 0..4 {
                match d.decode(&mut buf) {
                    Err(_) => failed = true,
                    Ok(Step::More) => break,
                    Ok(_) => continue,
                }
                break;
            }
            assert!(failed, "{wire:?}");
        }
    }

    impl Step {
        fn data(&self) -> Option<&[u8]> {
            match self {
                Step::Data(b) => Some(b),
                _ => None,
            }
        }
    }
}
