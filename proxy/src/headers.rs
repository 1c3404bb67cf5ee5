//! Header hygiene: hop-by-hop stripping, framing checks (request smuggling),
//! forwarding headers, request ids and W3C trace context.

use std::net::IpAddr;

use http::header::{
    CONNECTION, CONTENT_LENGTH, Entry, HOST, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Version};
use smallvec::SmallVec;

use crate::accesslog::RequestId;
use crate::error::ProxyError;
use sluice_filter::{EncodedFields, ProxyFields};

/// `x-request-id`, `x-forwarded-for`, `x-forwarded-proto`: named where the
/// filter seam keeps them aside ([`ProxyFields`]).
pub use sluice_filter::{X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID};
/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Rejects the request-smuggling vectors hyper lets through: both
/// `content-length` and `transfer-encoding`, several `content-length`s, or a
/// `transfer-encoding` other than a single `chunked`.
pub fn check_framing(headers: &HeaderMap, version: Version) -> Result<(), ProxyError> {
    // One pass over the fields instead of a lookup per name.
    let (mut cl, mut te): (Option<&HeaderValue>, Option<&HeaderValue>) = (None, None);
    let (mut cls, mut tes, mut connection, mut hosts) = (0usize, 0usize, false, 0usize);
    for (name, value) in headers {
        if name == HOST {
            hosts += 1;
        } else if name == CONTENT_LENGTH {
            cls += 1;
            cl = Some(value);
        } else if name == TRANSFER_ENCODING {
            tes += 1;
            te = Some(value);
        } else if name == CONNECTION {
            connection = true;
        }
    }
    if cls > 1 {
        return Err(ProxyError::bad_request("several content-length headers"));
    }
    // RFC 9110 §7.2: any request with more than one `host` field is a 400 (the
    // HTTP/1.1 parser refuses it before this; HTTP/2 requests are checked here).
    if hosts > 1 {
        return Err(ProxyError::bad_request("several host headers"));
    }
    if let Some(v) = cl
        && (v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Err(ProxyError::bad_request("invalid content-length"));
    }
    if let Some(v) = te {
        if version == Version::HTTP_2 {
            return Err(ProxyError::bad_request("transfer-encoding in an HTTP/2 request"));
        }
        if cl.is_some() {
            return Err(ProxyError::bad_request("both content-length and transfer-encoding"));
        }
        if tes > 1 || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::bad_request("transfer-encoding other than chunked"));
        }
    }
    if version == Version::HTTP_2 && connection {
        return Err(ProxyError::bad_request("connection header in an HTTP/2 request"));
    }
    Ok(())
}

/// Whether the request asks for a protocol upgrade (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Which hop-by-hop fields a message carries, as bits (shared with the
/// HTTP/1.1 codec's verbatim heads, which add their own above these).
pub(crate) mod hop {
    pub(crate) const CONNECTION: u8 = 1;
    pub(crate) const KEEP_ALIVE: u8 = 2;
    pub(crate) const PROXY_CONNECTION: u8 = 4;
    pub(crate) const TRANSFER_ENCODING: u8 = 8;
    pub(crate) const UPGRADE: u8 = 16;
    pub(crate) const TE: u8 = 32;
}

fn hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => hop::CONNECTION,
        "keep-alive" => hop::KEEP_ALIVE,
        "proxy-connection" => hop::PROXY_CONNECTION,
        "transfer-encoding" => hop::TRANSFER_ENCODING,
        "upgrade" => hop::UPGRADE,
        "te" => hop::TE,
        _ => 0,
    }
}

/// Removes hop-by-hop headers (and those named by `connection`). With
/// `keep_upgrade`, `connection: upgrade` and `upgrade` stay. `te: trailers`
/// stays (gRPC needs it).
///
/// One pass over the names finds which are present, so a message without
/// hop-by-hop headers (most HTTP/2 ones) costs no hash lookup.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found = headers.keys().fold(0u8, |acc, n| acc | hop_bit(n));
    if found == 0 {
        return;
    }
    if found & hop::CONNECTION != 0 {
        // Tokens that name headers removed below anyway (or kept on purpose)
        // need no lookup: the common `keep-alive` / `close` costs nothing.
        let implied = |t: &str| {
            t.is_empty()
                || t.eq_ignore_ascii_case("keep-alive")
                || t.eq_ignore_ascii_case("close")
                || t.eq_ignore_ascii_case("upgrade")
                || t.eq_ignore_ascii_case("te")
        };
        let mut named: SmallVec<[HeaderName; 2]> = SmallVec::new();
        // One lookup to read the tokens and remove the field.
        if let Entry::Occupied(connection) = headers.entry(CONNECTION) {
            for t in connection.iter().filter_map(|v| v.to_str().ok()).flat_map(|s| s.split(',')) {
                let t = t.trim();
                if !implied(t)
                    && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
                {
                    named.push(n);
                }
            }
            connection.remove();
        }
        for n in &named {
            headers.remove(n);
        }
        if keep_upgrade {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    if found & hop::KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if found & hop::PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if found & hop::TRANSFER_ENCODING != 0 {
        headers.remove(TRANSFER_ENCODING);
    }
    if found & hop::UPGRADE != 0 && !keep_upgrade {
        headers.remove(UPGRADE);
    }
    if found & hop::TE != 0
        && let Some(te) = headers.get(TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(TE);
    }
}

/// The downstream address as a header value (made once per connection).
pub fn ip_value(client: IpAddr) -> HeaderValue {
    use std::io::Write as _;
    let mut ipbuf = [0u8; 48];
    let n = {
        let mut cur = std::io::Cursor::new(&mut ipbuf[..]);
        let _ = write!(cur, "{client}");
        cur.position() as usize
    };
    HeaderValue::from_bytes(&ipbuf[..n]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets `x-forwarded-for` (appending when downstream is trusted) and
/// `x-forwarded-proto`. `ip` is [`ip_value`] of the downstream address.
pub fn set_forwarded(headers: &mut HeaderMap, ip: &HeaderValue, https: bool, trusted: bool) {
    forwarded_for(headers, ip, trusted);
    let xfp = headers.entry(&X_FORWARDED_PROTO);
    if !trusted || matches!(xfp, Entry::Vacant(_)) {
        set(xfp, HeaderValue::from_static(proto(https)));
    }
}

/// Sets `x-forwarded-for`, appending to a trusted one.
fn forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue, trusted: bool) {
    // An entry: one hash lookup, whether the field is there or not.
    let xff = headers.entry(&X_FORWARDED_FOR);
    let value = match &xff {
        Entry::Occupied(prev) if trusted => {
            let prev = prev.get();
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(ip.clone()),
    };
    if let Some(v) = value {
        set(xff, v);
    }
}

fn proto(https: bool) -> &'static str {
    if https { "https" } else { "http" }
}

/// Sets an entry's value, replacing every value it had.
fn set(entry: Entry<'_, HeaderValue>, value: HeaderValue) {
    match entry {
        Entry::Occupied(mut e) => {
            e.insert(value);
        }
        Entry::Vacant(e) => {
            e.insert(value);
        }
    }
}

/// The fields the forwarding path looks for in a request, as bits (see
/// [`scan_fields`]): the ones the proxy manages, defined with the filters'
/// view of them so that an edit a filter reports as not touching them
/// leaves the scan valid.
pub(crate) use sluice_filter::managed as scanned;

/// Which of the [`scanned`] fields a request has: one pass over the names (a
/// length check each, mostly), where a lookup per field hashes its name (a
/// custom one byte by byte).
pub(crate) fn scan_fields(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0u8, |acc, n| acc | sluice_filter::managed_field(n.as_str().as_bytes()))
}

/// The request's id: a well-formed incoming `x-request-id` (`present` says
/// whether there is one to look at, see [`scan_fields`]), or a new one of 32
/// hex digits, which is not in the map yet (see [`set_request_id`] and [`Added`]).
pub fn request_id(headers: &HeaderMap, present: u8) -> RequestId {
    if present & scanned::REQUEST_ID != 0
        && let Some(v) = headers.get(&X_REQUEST_ID)
        && let Ok(s) = v.to_str()
        && !s.is_empty()
        && s.len() <= 128
    {
        return RequestId::Given(s.to_owned());
    }
    // Never zero, so that it can start a trace as it is (W3C: an all-zero id is invalid).
    RequestId::Made(hex32(nonzero_u128()))
}

/// Puts a new request id (from [`request_id`]) in the map, replacing an
/// ill-formed incoming one.
pub fn set_request_id(headers: &mut HeaderMap, id: &[u8; 32]) {
    if let Ok(v) = HeaderValue::from_bytes(id) {
        headers.insert(&X_REQUEST_ID, v);
    }
}

/// Which of the fields [`set_forwarded`] and [`set_request_id`] set are to
/// be written beside the map (the rest are in it).
pub(crate) struct Taken {
    request_id: Option<[u8; 32]>,
    forwarded_for: bool,
    forwarded_proto: Option<&'static str>,
}

impl Taken {
    /// With a filter chain: the fields kept beside the map while the filters
    /// run (they read them there; the first edit of the map moves them in).
    /// `ip` is the downstream's, the `x-forwarded-for` value.
    pub(crate) fn into_proxy_fields(self, ip: &HeaderValue) -> ProxyFields {
        ProxyFields {
            request_id: self.request_id,
            forwarded_for: self.forwarded_for.then(|| ip.clone()),
            forwarded_proto: self.forwarded_proto,
        }
    }
}

/// [`set_forwarded`] and (with `new_id`) [`set_request_id`], keeping aside
/// what they would insert: the request's own fields these replace are
/// removed; a trusted `x-forwarded-for` is extended in place, a trusted
/// `x-forwarded-proto` stays. `present`: [`scan_fields`] of the request.
pub(crate) fn take_fields(
    headers: &mut HeaderMap,
    present: u8,
    new_id: Option<[u8; 32]>,
    ip: &HeaderValue,
    https: bool,
    trusted: bool,
) -> Taken {
    use scanned as bit;
    let has = |b: u8| present & b != 0;
    let mut taken = Taken { request_id: None, forwarded_for: false, forwarded_proto: None };
    if let Some(id) = new_id {
        if has(bit::REQUEST_ID) {
            headers.remove(&X_REQUEST_ID);
        }
        taken.request_id = Some(id);
    }
    match (has(bit::FORWARDED_FOR), trusted) {
        (true, true) => forwarded_for(headers, ip, true),
        (had, _) => {
            if had {
                headers.remove(&X_FORWARDED_FOR);
            }
            taken.forwarded_for = true;
        }
    }
    if !(trusted && has(bit::FORWARDED_PROTO) && headers.contains_key(&X_FORWARDED_PROTO)) {
        if has(bit::FORWARDED_PROTO) {
            headers.remove(&X_FORWARDED_PROTO);
        }
        taken.forwarded_proto = Some(proto(https));
    }
    taken
}

/// The fields the proxy adds to a request, kept out of its header map when
/// nothing reads the map before the HTTP/1.1 encoder (no filter chain, no
/// route header edits, an HTTP/1.1 upstream) and written after the request's
/// own fields. That saves a map insert each (custom names are hashed byte by
/// byte) and the allocation of two values. The map keeps a field the proxy
/// extends (a trusted `x-forwarded-for`) or keeps (a trusted
/// `x-forwarded-proto`, a well-formed `x-request-id`).
#[derive(Clone, Default)]
pub(crate) struct Added<'a> {
    request_id: Option<[u8; 32]>,
    forwarded_for: Option<&'a HeaderValue>,
    forwarded_proto: Option<&'static str>,
    traceparent: Option<[u8; 55]>,
}

impl<'a> Added<'a> {
    /// What [`set_forwarded`], [`propagate_traceparent`] and (with `new_id`)
    /// [`set_request_id`] would set, kept aside; the request's own fields
    /// these replace are removed. `present`: [`scan_fields`] of the
    /// request as it came (a field it names may have gone since: the
    /// removals then find nothing).
    pub(crate) fn take_over(
        headers: &mut HeaderMap,
        present: u8,
        new_id: Option<[u8; 32]>,
        request_id: &[u8],
        ip: &'a HeaderValue,
        https: bool,
        trusted: bool,
    ) -> Added<'a> {
        let taken = take_fields(headers, present, new_id, ip, https, trusted);
        let incoming = if present & scanned::TRACEPARENT != 0 { headers.remove(&TRACEPARENT) } else { None };
        Added {
            request_id: taken.request_id,
            forwarded_for: taken.forwarded_for.then_some(ip),
            forwarded_proto: taken.forwarded_proto,
            traceparent: Some(traceparent(incoming.as_ref(), request_id)),
        }
    }

    /// Adds the fields the proxy kept beside the map while the filters ran
    /// (see [`Taken::into_proxy_fields`]); `ip` is the downstream's, their
    /// `x-forwarded-for`.
    pub(crate) fn keep(&mut self, kept: &ProxyFields, ip: &'a HeaderValue) {
        self.request_id = kept.request_id;
        self.forwarded_for = kept.forwarded_for.is_some().then_some(ip);
        self.forwarded_proto = kept.forwarded_proto;
    }

    /// Only `traceparent`, as [`propagate_traceparent`] would set it, kept
    /// aside; the request's own is removed. `present`: [`scan_fields`] of the
    /// request as it came, when its fields are as it came (no lookup then).
    pub(crate) fn traceparent(headers: &mut HeaderMap, present: Option<u8>, request_id: &[u8]) -> Added<'a> {
        let incoming = match present {
            Some(p) if p & scanned::TRACEPARENT == 0 => None,
            _ => headers.remove(&TRACEPARENT),
        };
        Added { traceparent: Some(traceparent(incoming.as_ref(), request_id)), ..Added::default() }
    }

    /// The fields as the lines of an [`EncodedFields`] (`None` when there
    /// are none): how `on_log` sees them after the request's own.
    pub(crate) fn encoded(&self) -> Option<EncodedFields> {
        let count = usize::from(self.request_id.is_some())
            + usize::from(self.forwarded_for.is_some())
            + usize::from(self.forwarded_proto.is_some())
            + usize::from(self.traceparent.is_some());
        if count == 0 {
            return None;
        }
        let mut lines = Vec::with_capacity(80 * count);
        self.encode(&mut lines);
        Some(EncodedFields { lines, count, length: None, has_date: false })
    }

    /// Writes the fields as HTTP/1.1 field lines.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        if let Some(id) = &self.request_id {
            line(b"x-request-id: ", id);
        }
        if let Some(ip) = self.forwarded_for {
            line(b"x-forwarded-for: ", ip.as_bytes());
        }
        if let Some(p) = self.forwarded_proto {
            line(b"x-forwarded-proto: ", p.as_bytes());
        }
        if let Some(tp) = &self.traceparent {
            line(b"traceparent: ", tp);
        }
    }
}

/// Lowercase hex of `x`, 16 digits: each nibble spread into a byte of its
/// own, then all eight bytes of a half turned into ASCII at once (SWAR).
fn hex16(x: u64) -> [u8; 16] {
    fn spread(x: u32) -> u64 {
        let mut v = u64::from(x);
        v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
        v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
        v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
        // Per byte: n + '0', and 'a' - '0' - 10 more where n > 9. No byte carries.
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        v + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&spread((x >> 32) as u32).to_be_bytes());
    out[8..].copy_from_slice(&spread(x as u32).to_be_bytes());
    out
}

/// Lowercase hex of `x`, 32 digits.
fn hex32(x: u128) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&hex16((x >> 64) as u64));
    out[16..].copy_from_slice(&hex16(x as u64));
    out
}

/// A random id, never zero (W3C: an all-zero trace or span id is invalid).
/// Not a range draw: that costs a 128-bit division.
fn nonzero_u128() -> u128 {
    fastrand::u128(..).max(1)
}

/// Whether `s` is `n` lowercase hex digits, not all zero (a valid W3C id).
/// One pass without early exit, which the compiler vectorizes.
fn is_trace_id(s: &[u8], n: usize) -> bool {
    let (hex, nonzero) = s.iter().fold((true, false), |(h, z), &b| (h & is_lower_hex(b), z | (b != b'0')));
    s.len() == n && hex && nonzero
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() | (b'a'..=b'f').contains(&b)
}

/// Propagates W3C trace context: keeps the trace id and flags of a valid
/// `traceparent`, with a new parent (span) id for this hop; starts a trace
/// (using the request id when it is 32 hex digits) when there is none.
pub fn propagate_traceparent(headers: &mut HeaderMap, request_id: &[u8]) {
    let entry = headers.entry(&TRACEPARENT);
    let incoming = match &entry {
        Entry::Occupied(e) => Some(e.get()),
        Entry::Vacant(_) => None,
    };
    let buf = traceparent(incoming, request_id);
    if let Ok(v) = HeaderValue::from_bytes(&buf) {
        set(entry, v);
    }
}

/// This hop's `traceparent`, continuing a valid `incoming` one.
fn traceparent(incoming: Option<&HeaderValue>, request_id: &[u8]) -> [u8; 55] {
    // 00-<32 hex trace>-<16 hex span>-<2 hex flags>
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming.and_then(|v| v.to_str().ok()).and_then(parse_traceparent) {
        Some((trace, flags)) => {
            buf[3..35].copy_from_slice(trace.as_bytes());
            buf[53..55].copy_from_slice(flags.as_bytes());
        }
        None => {
            if is_trace_id(request_id, 32) {
                buf[3..35].copy_from_slice(request_id);
            } else {
                buf[3..35].copy_from_slice(&hex32(nonzero_u128()));
            }
        }
    }
    buf[36..52].copy_from_slice(&hex16(fastrand::u64(..).max(1)));
    buf
}

fn parse_traceparent(s: &str) -> Option<(&str, &str)> {
    let mut it = s.trim().split('-');
    let (version, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex = |x: &str, n: usize| x.len() == n && x.bytes().all(is_lower_hex);
    let ok = hex(version, 2)
        && version != "ff"
        && is_trace_id(trace.as_bytes(), 32)
        && is_trace_id(parent.as_bytes(), 16)
        && hex(flags, 2);
    ok.then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_zero_padded_lowercase() {
        assert_eq!(&super::hex16(0x1f), b"000000000000001f");
        assert_eq!(&super::hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&super::hex32(u128::MAX - 1), b"fffffffffffffffffffffffffffffffe");
        assert_eq!(&super::hex32(0xa << 64 | 0x9), b"000000000000000a0000000000000009");
        for _ in 0..1000 {
            let x = fastrand::u128(..);
            assert_eq!(super::hex32(x).as_slice(), format!("{x:032x}").as_bytes());
        }
    }

    use super::*;

    #[test]
    fn framing_rejects_smuggling_vectors() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(check_framing(&h, Version::HTTP_11).is_err());
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(check_framing(&h, Version::HTTP_11).is_err());
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked, identity"));
        assert!(check_framing(&h, Version::HTTP_11).is_err());
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(check_framing(&h, Version::HTTP_11).is_ok());
        let mut h = HeaderMap::new();
        h.append(HOST, HeaderValue::from_static("a.test"));
        assert!(check_framing(&h, Version::HTTP_2).is_ok());
        h.append(HOST, HeaderValue::from_static("b.test"));
        assert!(check_framing(&h, Version::HTTP_2).is_err());
    }

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-authz-user"));
        h.insert("x-authz-user", HeaderValue::from_static("admin"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-authz-user"));
        assert!(!h.contains_key(CONNECTION));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h.get(TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn strip_keeps_upgrade_only_when_asked_and_drops_te_other_than_trailers() {
        let mk = || {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(TE, HeaderValue::from_static("gzip"));
            h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            h
        };
        let mut h = mk();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(CONNECTION).map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
        assert!(h.contains_key(UPGRADE));
        let mut h = mk();
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
        // Nothing hop-by-hop: untouched.
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn framing_rejects_connection_in_http2_and_bad_lengths() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close"));
        assert!(check_framing(&h, Version::HTTP_2).is_err());
        assert!(check_framing(&h, Version::HTTP_11).is_ok());
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert!(check_framing(&h, Version::HTTP_11).is_err());
        let mut h = HeaderMap::new();
        h.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(check_framing(&h, Version::HTTP_11).is_err());
    }

    #[test]
    fn traceparent_keeps_trace_and_changes_span() {
        let mut h = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(&TRACEPARENT, HeaderValue::from_static(incoming));
        propagate_traceparent(&mut h, b"x");
        let out = h.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming);
    }
}
