//! The verbatim response head. Towards an HTTP/1.x downstream, the upstream
//! client builds no `HeaderMap` for a response's fields: it applies the
//! framing rules to the parsed fields, drops the hop-by-hop ones (those
//! `headers::strip_hop_by_hop` drops) and keeps the rest as encoded field
//! lines, which the downstream encoder copies behind its status line. A
//! route's header edits drop the fields they remove or set ([`drop_named`])
//! and put theirs in the head's map, written after these. A filter chain reads
//! the lines in place through `sluice_filter::ResponseHead`, which decodes
//! them into the map only when a filter replaces or removes a field. As with
//! HAProxy and nginx, the fields keep the upstream's order and name case.
//! When a map is built after all, the same classification leaves the
//! hop-by-hop fields out of it ([`RawFields::end_to_end`]).
//!
//! Building and dropping the map, stripping it and encoding it again was a
//! seventh of the user-space instructions of a proxied HTTP/1.1 request
//! (`bench/instructions.sh`: 28,100 → 24,700).

use http::HeaderName;
use smallvec::SmallVec;

use super::decode::{Fields, MAX_HEADERS, Present};
use crate::headers::hop::{CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};

/// A response's end-to-end fields, encoded for the downstream. The type is
/// the filter seam's, so that a filter chain reads them where they are
/// (`sluice_filter::ResponseHead`).
pub(crate) type Verbatim = sluice_filter::EncodedFields;

/// Kinds of fields beyond the hop-by-hop ones.
const CONTENT_LENGTH: u8 = 64;
const DATE: u8 = 128;

/// The kind of a field name (case-insensitive), 0 for any other. The length
/// and first letter rule out most names before a comparison.
fn kind(name: &[u8]) -> u8 {
    let Some(&first) = name.first() else { return 0 };
    // `| 0x20` lower-cases a letter and keeps `-`; no other byte of a token
    // (or of a field value) turns into a letter or `-` by it.
    let is = |s: &str| name.iter().zip(s.as_bytes()).all(|(a, b)| a | 0x20 == *b);
    match (name.len(), first | 0x20) {
        (2, b't') if is("te") => TE,
        (4, b'd') if is("date") => DATE,
        (7, b'u') if is("upgrade") => UPGRADE,
        (10, b'c') if is("connection") => CONNECTION,
        (10, b'k') if is("keep-alive") => KEEP_ALIVE,
        (14, b'c') if is("content-length") => CONTENT_LENGTH,
        (16, b'p') if is("proxy-connection") => PROXY_CONNECTION,
        (17, b't') if is("transfer-encoding") => TRANSFER_ENCODING,
        _ => 0,
    }
}

/// The parsed fields of a head, each with its kind.
pub(crate) struct RawFields<'h, 'b> {
    /// The head's bytes, which the fields borrow.
    head: &'b [u8],
    fields: &'h [httparse::Header<'b>],
    /// The kind of each field (a head has at most `MAX_HEADERS`).
    kinds: [u8; MAX_HEADERS],
    /// The kinds found, or-ed.
    found: u8,
}

impl<'h, 'b> RawFields<'h, 'b> {
    pub(crate) fn new(head: &'b [u8], fields: &'h [httparse::Header<'b>]) -> Self {
        let mut kinds = [0u8; MAX_HEADERS];
        let mut found = 0;
        for (k, f) in kinds.iter_mut().zip(fields) {
            *k = kind(f.name.as_bytes());
            found |= *k;
        }
        RawFields { head, fields, kinds, found }
    }

    /// Which framing fields the head has (as `decode::header_map` notes them).
    pub(crate) fn present(&self) -> Present {
        let mut p = Present::default();
        for (kind, bit) in [
            (CONNECTION, Present::CONNECTION),
            (TRANSFER_ENCODING, Present::TRANSFER_ENCODING),
            (CONTENT_LENGTH, Present::CONTENT_LENGTH),
            (UPGRADE, Present::UPGRADE),
            (TE, Present::TE),
        ] {
            if self.found & kind != 0 {
                p.add(bit);
            }
        }
        p
    }

    /// Where `s` (a slice of the head) starts in it.
    fn offset(&self, s: &[u8]) -> usize {
        s.as_ptr() as usize - self.head.as_ptr() as usize
    }

    /// Which fields are end to end, as a bit per field (a head has at most
    /// `MAX_HEADERS`, 128): all but the hop-by-hop ones, those the
    /// `connection` field names, and `content-length` when `drop_length`
    /// (the framing rules discarded it: it came with `transfer-encoding`).
    pub(crate) fn end_to_end(&self, drop_length: bool) -> u128 {
        let named = self.named();
        let mut mask = 0u128;
        for (i, (f, &k)) in self.fields.iter().zip(&self.kinds).enumerate() {
            mask |= u128::from(!self.hop(f, k, drop_length, &named)) << i;
        }
        mask
    }

    /// The names the `connection` fields list. Tokens that name fields
    /// dropped anyway (or kept on purpose: `te: trailers`) are left out, so
    /// the common `keep-alive` / `close` costs nothing later.
    fn named(&self) -> SmallVec<[&'b [u8]; 2]> {
        let mut named = SmallVec::new();
        if self.found & CONNECTION == 0 {
            return named;
        }
        for (f, _) in self.fields.iter().zip(&self.kinds).filter(|(_, k)| **k == CONNECTION) {
            // The usual value, one implied token, without the split.
            let whole = f.value.trim_ascii();
            if whole.eq_ignore_ascii_case(b"keep-alive") || whole.eq_ignore_ascii_case(b"close") {
                continue;
            }
            for t in f.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                let implied = t.is_empty()
                    || matches!(kind(t), KEEP_ALIVE | UPGRADE | TE)
                    || t.eq_ignore_ascii_case(b"close");
                if !implied {
                    named.push(t);
                }
            }
        }
        named
    }

    /// Whether field `f` (of kind `k`) is hop-by-hop.
    #[inline]
    fn hop(&self, f: &httparse::Header<'_>, k: u8, drop_length: bool, named: &[&[u8]]) -> bool {
        let by_kind = match k {
            0 | DATE => false,
            TE => !f.value.eq_ignore_ascii_case(b"trailers"),
            CONTENT_LENGTH => drop_length,
            _ => true,
        };
        by_kind || (!named.is_empty() && named.iter().any(|t| t.eq_ignore_ascii_case(f.name.as_bytes())))
    }

    /// Encodes the end-to-end fields (see [`RawFields::end_to_end`]); `length`
    /// is the `content-length` value the framing rules read.
    pub(crate) fn keep(&self, drop_length: bool, length: Option<u64>) -> Verbatim {
        let named = self.named();
        let head = self.head;
        let mut out = Vec::with_capacity(head.len());
        let (mut has_date, mut kept_length, mut count) = (false, false, 0);
        // Kept fields that follow each other with plain CRLFs are copied as one run.
        let mut run: Option<(usize, usize)> = None;
        for (f, &k) in self.fields.iter().zip(&self.kinds) {
            if self.hop(f, k, drop_length, &named) {
                continue;
            }
            has_date |= k == DATE;
            kept_length |= k == CONTENT_LENGTH;
            count += 1;
            let start = self.offset(f.name.as_bytes());
            let end = self.offset(f.value) + f.value.len();
            run = match run {
                Some((s, e)) if head.get(e..start) == Some(b"\r\n") => Some((s, end)),
                Some((s, e)) => {
                    out.extend_from_slice(&head[s..e]);
                    out.extend_from_slice(b"\r\n");
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((s, e)) = run {
            out.extend_from_slice(&head[s..e]);
            out.extend_from_slice(b"\r\n");
        }
        Verbatim { lines: out, count, length: length.filter(|_| kept_length), has_date }
    }
}

/// Drops the fields named in `names` (case-insensitive), as a route's
/// `response_headers` edits do before they set and add theirs (in the
/// head's map, which the encoder writes after these fields).
pub(crate) fn drop_named<'n>(v: &mut Verbatim, names: impl Iterator<Item = &'n HeaderName> + Clone) {
    if names.clone().next().is_none() {
        return;
    }
    let mut out = Vec::with_capacity(v.lines.len());
    let (mut has_date, mut kept_length, mut count) = (false, false, 0);
    // Each line ends with CRLF, and no value holds an LF.
    for line in v.lines.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if names.clone().any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name)) {
            continue;
        }
        has_date |= kind(name) == DATE;
        kept_length |= kind(name) == CONTENT_LENGTH;
        count += 1;
        out.extend_from_slice(line);
    }
    v.lines = out;
    v.count = count;
    v.has_date = has_date;
    v.length = v.length.filter(|_| kept_length);
}

impl Fields for RawFields<'_, '_> {
    fn values(&self, name: &HeaderName) -> SmallVec<[&[u8]; 2]> {
        // The framing fields were classified when the head was parsed: no
        // name comparisons for them.
        let k = if *name == http::header::CONTENT_LENGTH {
            CONTENT_LENGTH
        } else if *name == http::header::CONNECTION {
            CONNECTION
        } else if *name == http::header::TRANSFER_ENCODING {
            TRANSFER_ENCODING
        } else {
            let name = name.as_str().as_bytes();
            return self
                .fields
                .iter()
                .filter(|f| f.name.as_bytes().eq_ignore_ascii_case(name))
                .map(|f| f.value)
                .collect();
        };
        if self.found & k == 0 {
            return SmallVec::new();
        }
        self.fields.iter().zip(&self.kinds).filter(|(_, kind)| **kind == k).map(|(f, _)| f.value).collect()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use http::{HeaderMap, Method};

    use super::super::decode::{Head, parse_head};

    fn parse(wire: &str, verbatim: bool) -> Head {
        let mut b = BytesMut::from(wire);
        parse_head(&mut b, &Method::GET, verbatim).unwrap().unwrap()
    }

    /// The kept fields, parsed back, lowercased: comparable with a map.
    fn fields_of(h: &Head) -> Vec<(String, String)> {
        let v = h.verbatim.as_ref().expect("verbatim head");
        let text = std::str::from_utf8(&v.lines).unwrap();
        let fields: Vec<(String, String)> = text
            .split_terminator("\r\n")
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        assert_eq!(fields.len(), v.count);
        // What a filter reads from them is what the lines hold.
        let read: Vec<(String, String)> = v
            .iter()
            .map(|(n, x)| {
                (String::from_utf8_lossy(n).to_ascii_lowercase(), String::from_utf8_lossy(x).into())
            })
            .collect();
        assert_eq!(read, fields);
        fields
    }

    fn map_fields(h: &HeaderMap) -> Vec<(String, String)> {
        h.iter().map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned())).collect()
    }

    /// Sorted by name, stable: a map groups a name's values, the wire interleaves them.
    fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn keeps_what_the_map_path_keeps_and_frames_alike() {
        let heads = [
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: 5\r\nConnection: keep-alive\r\nETag: \"x\"\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: X-Private, close\r\nX-Private: s\r\nx-public: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTE: trailers\r\nx-a: 1\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nte: deflate\r\nconnection: content-length\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nETag: \"y\"\r\nContent-Length: 40\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
        ];
        for wire in heads {
            let mut map = parse(wire, false);
            crate::headers::strip_hop_by_hop(&mut map.parts.headers, false);
            let raw = parse(wire, true);
            assert!(raw.parts.headers.is_empty(), "{wire}");
            assert_eq!(sorted(fields_of(&raw)), sorted(map_fields(&map.parts.headers)), "{wire}");
            assert_eq!(raw.decoder, map.decoder, "{wire}");
            assert_eq!(raw.keep_alive, map.keep_alive, "{wire}");
            assert_eq!((raw.parts.status, raw.parts.version), (map.parts.status, map.parts.version));
        }
    }

    #[test]
    fn order_case_and_repeats_are_the_upstreams() {
        let raw = parse(
            "HTTP/1.1 200 OK\r\nX-B: 1\r\nSet-Cookie: a=1\r\nX-A: 2\r\nSet-Cookie: b=2\r\nDate: d\r\nContent-Length: 7\r\n\r\n",
            true,
        );
        let v = raw.verbatim.as_ref().unwrap();
        assert_eq!(
            std::str::from_utf8(&v.lines).unwrap(),
            "X-B: 1\r\nSet-Cookie: a=1\r\nX-A: 2\r\nSet-Cookie: b=2\r\nDate: d\r\nContent-Length: 7\r\n"
        );
        assert_eq!(v.length, Some(7));
        assert!(v.has_date);
    }

    #[test]
    fn lines_leave_as_crlf_lines_whatever_ended_them() {
        let raw = parse("HTTP/1.1 200 OK\r\nA:1\nB: 2  \r\nC: 3\r\nD:\t4\r\n\r\n", true);
        let v = raw.verbatim.as_ref().unwrap();
        assert_eq!(std::str::from_utf8(&v.lines).unwrap(), "A:1\r\nB: 2\r\nC: 3\r\nD:\t4\r\n");
    }

    #[test]
    fn dropping_named_fields_keeps_the_rest_and_the_flags_true() {
        let mut raw =
            parse("HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n", true);
        let v = raw.verbatim.as_mut().unwrap();
        let names = [http::HeaderName::from_static("server"), http::HeaderName::from_static("date")];
        super::drop_named(v, names.iter());
        assert_eq!(std::str::from_utf8(&v.lines).unwrap(), "X-A: 1\r\nContent-Length: 3\r\n");
        assert_eq!((v.has_date, v.length, v.count), (false, Some(3), 2));
        let names = [http::HeaderName::from_static("content-length")];
        super::drop_named(v, names.iter());
        assert_eq!((std::str::from_utf8(&v.lines).unwrap(), v.length, v.count), ("X-A: 1\r\n", None, 1));
    }

    #[test]
    fn a_discarded_or_named_length_is_not_reported() {
        let raw = parse("HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n", true);
        assert_eq!(raw.verbatim.as_ref().unwrap().length, None);
        let raw = parse("HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 4\r\n\r\n", true);
        let v = raw.verbatim.as_ref().unwrap();
        assert_eq!((v.length, v.lines.is_empty()), (None, true));
    }

    #[test]
    fn the_map_holds_end_to_end_fields_but_a_101_keeps_its_upgrade() {
        let h =
            parse("HTTP/1.1 200 OK\r\nConnection: x-a\r\nx-a: 1\r\nKeep-Alive: 5\r\nx-b: 2\r\n\r\n", false);
        assert!(h.stripped);
        assert_eq!(map_fields(&h.parts.headers), [("x-b".to_owned(), "2".to_owned())]);
        let h = parse(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            false,
        );
        assert!(!h.stripped);
        assert_eq!(h.parts.headers["upgrade"], "websocket");
        assert_eq!(h.parts.headers["connection"], "upgrade");
    }

    #[test]
    fn informational_and_no_content_heads_use_the_map() {
        for wire in [
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            let h = parse(wire, true);
            assert!(h.verbatim.is_none(), "{wire}");
        }
    }

    #[test]
    fn bad_framing_is_still_an_error() {
        let mut b = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert!(parse_head(&mut b, &Method::GET, true).is_err());
        let mut b = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n");
        assert!(parse_head(&mut b, &Method::GET, true).is_err());
    }
}
