//! Header maps as proxy-wasm sees them: request heads carry `:method`,
//! `:scheme`, `:authority` and `:path` as pseudo-headers (mapped to and from the
//! normalized URI, and the `host` field of an origin-form head; `host` is an
//! alias of `:authority`), response heads carry `:status`.

use http::header::{HOST, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, StatusCode, Uri, request, response};
use sluice_abi::Status;
use sluice_filter::{EncodedFields, ProxyFields, ResponseHead};

/// A readable header map.
#[derive(Clone, Copy)]
pub(crate) enum MapView<'a> {
    Request(&'a request::Parts),
    /// A request as sent upstream: its head, then the fields the proxy wrote
    /// after the map's (`on_log`).
    Sent(&'a request::Parts, &'a EncodedFields),
    /// A request in its headers phase: its head, then the fields the proxy
    /// set before the filters and kept beside the map.
    Kept(&'a request::Parts, &'a ProxyFields),
    /// A callout's response.
    Response(&'a response::Parts),
    /// The stream's response: its fields may still be encoded.
    Head(&'a ResponseHead),
    Plain(&'a HeaderMap),
    Empty,
}

impl<'a> MapView<'a> {
    /// Calls `f` for each entry, pseudo-headers first.
    pub fn for_each(self, mut f: impl FnMut(&[u8], &[u8])) {
        match self {
            MapView::Request(p) => request_for_each(p, f),
            MapView::Sent(p, added) => {
                request_for_each(p, &mut f);
                for (k, v) in added.iter() {
                    f(k, v);
                }
            }
            MapView::Kept(p, kept) => {
                request_for_each(p, &mut f);
                for (k, v) in kept.iter() {
                    f(k.as_bytes(), v);
                }
            }
            MapView::Response(p) => {
                f(b":status", p.status.as_str().as_bytes());
                each(&p.headers, f);
            }
            MapView::Head(h) => {
                f(b":status", h.status().as_str().as_bytes());
                h.for_each(f);
            }
            MapView::Plain(h) => each(h, f),
            MapView::Empty => {}
        }
    }

    /// Number of entries (what `for_each` visits), without walking the map.
    pub fn count(self) -> usize {
        match self {
            MapView::Request(p) => 4 + p.headers.len() - hidden_hosts(p),
            MapView::Sent(p, added) => MapView::Request(p).count() + added.count,
            MapView::Kept(p, kept) => MapView::Request(p).count() + kept.len(),
            MapView::Response(p) => 1 + p.headers.len(),
            MapView::Head(h) => 1 + h.len(),
            MapView::Plain(h) => h.len(),
            MapView::Empty => 0,
        }
    }

    /// Number of entries and serialized size (pairs format).
    pub fn count_and_size(self) -> (usize, usize) {
        let (mut n, mut size) = (0usize, 4usize);
        self.for_each(|k, v| {
            n += 1;
            size += 8 + k.len() + v.len() + 2;
        });
        (n, size)
    }

    /// Sum of key and value lengths (Envoy's `byteSize`).
    pub fn byte_size(self) -> usize {
        let mut size = 0;
        self.for_each(|k, v| size += k.len() + v.len());
        size
    }

    /// Serializes into `out`, which must have exactly `count_and_size().1` bytes
    /// (otherwise nothing is written).
    pub fn encode_into(self, out: &mut [u8]) {
        let (n, size) = self.count_and_size();
        if out.len() != size {
            return;
        }
        let mut sizes = 4usize;
        let mut data = 4 + 8 * n;
        out[..4].copy_from_slice(&(n as u32).to_le_bytes());
        self.for_each(|k, v| {
            out[sizes..sizes + 4].copy_from_slice(&(k.len() as u32).to_le_bytes());
            out[sizes + 4..sizes + 8].copy_from_slice(&(v.len() as u32).to_le_bytes());
            sizes += 8;
            out[data..data + k.len()].copy_from_slice(k);
            data += k.len();
            out[data] = 0;
            data += 1;
            out[data..data + v.len()].copy_from_slice(v);
            data += v.len();
            out[data] = 0;
            data += 1;
        });
    }

    /// The first value of `key` (lowercase lookup).
    pub fn get(self, key: &[u8]) -> Option<&'a [u8]> {
        match self {
            MapView::Request(p) => match key {
                b":authority" | b"host" => Some(request_authority(p)),
                b":path" => Some(p.uri.path_and_query().map_or("/", PathAndQuery::as_str).as_bytes()),
                b":method" => Some(p.method.as_str().as_bytes()),
                b":scheme" => Some(request_scheme(p).as_bytes()),
                _ => lookup(&p.headers, key),
            },
            MapView::Sent(p, added) => MapView::Request(p)
                .get(key)
                .or_else(|| added.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)),
            MapView::Kept(p, kept) => MapView::Request(p).get(key).or_else(|| kept.get(key)),
            MapView::Response(p) => match key {
                b":status" => Some(p.status.as_str().as_bytes()),
                _ => lookup(&p.headers, key),
            },
            MapView::Head(h) => match key {
                b":status" => Some(h.status().as_str().as_bytes()),
                [b':', ..] => None,
                _ => h.get(key),
            },
            MapView::Plain(h) => lookup(h, key),
            MapView::Empty => None,
        }
    }
}

/// [`MapView::for_each`] of a request head.
fn request_for_each(p: &request::Parts, mut f: impl FnMut(&[u8], &[u8])) {
    f(b":authority", request_authority(p));
    f(b":path", p.uri.path_and_query().map_or("/", PathAndQuery::as_str).as_bytes());
    f(b":method", p.method.as_str().as_bytes());
    f(b":scheme", request_scheme(p).as_bytes());
    if p.uri.authority().is_some() {
        each(&p.headers, f);
    } else {
        for (k, v) in &p.headers {
            if k != HOST {
                f(k.as_str().as_bytes(), v.as_bytes());
            }
        }
    }
}

/// A request's `:authority`: its URI's, else its `host` field. An HTTP/1.1
/// head keeps its origin-form URI and carries the authority in `host`, in the
/// filter phases and in `on_log` (the head sent upstream); `host` is then
/// shown as `:authority` only, as in Envoy.
pub(crate) fn request_authority(p: &request::Parts) -> &[u8] {
    match p.uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => p.headers.get(HOST).map_or(&[][..], HeaderValue::as_bytes),
    }
}

/// A request's `:scheme`: its URI's, else the downstream's.
pub(crate) fn request_scheme(p: &request::Parts) -> &str {
    match p.uri.scheme_str() {
        Some(s) => s,
        None if crate::properties::downstream_tls() => "https",
        None => "http",
    }
}

/// `host` fields shown as `:authority` rather than as fields: an origin-form
/// head has exactly one (the seam's contract: the HTTP/1.1 server refuses a
/// request with more, and one without gets the absolute form), so counting
/// costs no look-up.
fn hidden_hosts(p: &request::Parts) -> usize {
    usize::from(p.uri.authority().is_none() && !p.headers.is_empty())
}

fn each(h: &HeaderMap, mut f: impl FnMut(&[u8], &[u8])) {
    for (k, v) in h {
        f(k.as_str().as_bytes(), v.as_bytes());
    }
}

/// Up to this many values, a look-up scans the map.
const SCAN_MAX: usize = 12;

/// A look-up by the guest's bytes, in any case. A small map (most heads) is
/// scanned, a length check per field mostly, where a hashed look-up checks
/// the key against the standard names and hashes a custom one byte by byte.
/// A larger map is looked up by hash: `http` parses a `&str` key on the
/// stack, so no name is allocated (a name that is not UTF-8 is not a header
/// name).
fn lookup<'a>(h: &'a HeaderMap, key: &[u8]) -> Option<&'a [u8]> {
    if key.first() == Some(&b':') || h.is_empty() {
        return None;
    }
    if h.len() <= SCAN_MAX {
        return h
            .iter()
            .find(|(k, _)| k.as_str().len() == key.len() && k.as_str().as_bytes().eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_bytes());
    }
    h.get(std::str::from_utf8(key).ok()?).map(HeaderValue::as_bytes)
}

/// Header names the guest writes, parsed once per worker thread. A filter writes
/// the same few names on every request, and parsing one (each byte checked, a
/// custom name copied into an allocation of its own) costs several times a
/// look-up here and a reference count. Direct-mapped on the length and the end
/// bytes; a miss parses the name and takes the slot.
struct NameCache {
    slots: [Option<(Box<[u8]>, HeaderName)>; 64],
}

thread_local! {
    static NAMES: std::cell::RefCell<NameCache> =
        const { std::cell::RefCell::new(NameCache { slots: [const { None }; 64] }) };
}

fn cached_name(key: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    let (Some(&first), Some(&last)) = (key.first(), key.last()) else {
        return HeaderName::from_bytes(key);
    };
    let slot = (key.len().wrapping_mul(31) ^ (usize::from(first) << 2) ^ usize::from(last)) & 63;
    NAMES.with_borrow_mut(|cache| {
        if let Some((bytes, name)) = &cache.slots[slot]
            && **bytes == *key
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(key)?;
        cache.slots[slot] = Some((key.into(), name.clone()));
        Ok(name)
    })
}

/// Most fields a map written by a guest may hold, and most pairs a guest may hand
/// over in one call: far above any real head (Envoy's codecs default to 100),
/// well below the `http` crate's own limit (~24k fields), past which its maps panic.
pub(crate) const MAX_GUEST_FIELDS: usize = 8192;

/// A writable header map.
pub(crate) enum MapMut<'a> {
    Request(&'a mut request::Parts),
    Response(&'a mut ResponseHead),
    Plain(&'a mut HeaderMap),
}

/// How a value is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Add,
    Replace,
}

fn name(key: &[u8]) -> Result<HeaderName, Status> {
    cached_name(key).map_err(|_| Status::BadArgument)
}

fn value(v: &[u8]) -> Result<HeaderValue, Status> {
    HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)
}

fn write_plain(h: &mut HeaderMap, key: &[u8], v: &[u8], how: Write) -> Result<(), Status> {
    if key.first() == Some(&b':') {
        return Err(Status::BadArgument);
    }
    let (k, v) = (name(key)?, value(v)?);
    match how {
        Write::Add => {
            h.append(k, v);
        }
        Write::Replace => match h.entry(k) {
            http::header::Entry::Vacant(e) => {
                e.insert(v);
            }
            // Envoy moves a replaced header to the end of the map.
            http::header::Entry::Occupied(e) => {
                let (k, _) = e.remove_entry();
                h.append(k, v);
            }
        },
    }
    Ok(())
}

fn set_uri(uri: &mut Uri, f: impl FnOnce(&mut http::uri::Parts)) -> Result<(), Status> {
    let mut parts = uri.clone().into_parts();
    f(&mut parts);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *uri = Uri::from_parts(parts).map_err(|_| Status::BadArgument)?;
    Ok(())
}

fn set_request_pseudo(p: &mut request::Parts, key: &[u8], v: &[u8]) -> Result<(), Status> {
    match key {
        b":method" => p.method = Method::from_bytes(v).map_err(|_| Status::BadArgument)?,
        b":path" => {
            let pq = PathAndQuery::try_from(v).map_err(|_| Status::BadArgument)?;
            if !pq.as_str().starts_with('/') && pq.as_str() != "*" {
                return Err(Status::BadArgument);
            }
            set_uri(&mut p.uri, |u| u.path_and_query = Some(pq))?;
        }
        b":authority" | b"host" => {
            let a = Authority::try_from(v).map_err(|_| Status::BadArgument)?;
            if p.uri.authority().is_none() {
                // An origin-form head keeps its authority in `host`.
                p.headers.insert(HOST, value(v)?);
                return Ok(());
            }
            set_uri(&mut p.uri, |u| {
                if u.scheme.is_none() {
                    u.scheme = Some(Scheme::HTTP);
                }
                u.authority = Some(a);
            })?;
        }
        b":scheme" => {
            let s = Scheme::try_from(v).map_err(|_| Status::BadArgument)?;
            if p.uri.authority().is_some() {
                set_uri(&mut p.uri, |u| u.scheme = Some(s))?;
                return Ok(());
            }
            // An origin-form head becomes absolute: its authority moves from `host` into the URI.
            let host = p.headers.get(HOST).map(HeaderValue::as_bytes).ok_or(Status::BadArgument)?;
            let a = Authority::try_from(host).map_err(|_| Status::BadArgument)?;
            set_uri(&mut p.uri, |u| {
                u.scheme = Some(s);
                u.authority = Some(a);
            })?;
            p.headers.remove(HOST);
        }
        _ => return Err(Status::BadArgument),
    }
    Ok(())
}

impl MapMut<'_> {
    /// Fields in the map (a repeated name counts once per value).
    pub fn len(&self) -> usize {
        match self {
            MapMut::Request(p) => p.headers.len(),
            MapMut::Response(h) => h.len(),
            MapMut::Plain(h) => h.len(),
        }
    }

    /// Adds or replaces a value. Pseudo-headers are always replaced.
    pub fn write(&mut self, key: &[u8], v: &[u8], how: Write) -> Result<(), Status> {
        match self {
            MapMut::Request(p) if key.first() == Some(&b':') || key.eq_ignore_ascii_case(b"host") => {
                set_request_pseudo(p, &key.to_ascii_lowercase(), v)
            }
            MapMut::Request(p) => write_plain(&mut p.headers, key, v, how),
            MapMut::Response(h) if key == b":status" => {
                h.set_status(StatusCode::from_bytes(v).map_err(|_| Status::BadArgument)?);
                Ok(())
            }
            // An append leaves the upstream's encoded fields as they are.
            MapMut::Response(h) if how == Write::Add && key.first() != Some(&b':') => {
                h.append(name(key)?, value(v)?);
                Ok(())
            }
            MapMut::Response(h) => write_plain(h.headers_mut(), key, v, how),
            MapMut::Plain(h) => write_plain(h, key, v, how),
        }
    }

    /// Removes every value of `key`; pseudo-headers cannot be removed (ignored).
    pub fn remove(&mut self, key: &[u8]) {
        if key.first() == Some(&b':') {
            return;
        }
        // As in `lookup`: parsed on the stack, no name allocated.
        let Ok(k) = std::str::from_utf8(key) else { return };
        match self {
            // `host` is the authority: it cannot be removed either.
            MapMut::Request(_) if k.eq_ignore_ascii_case("host") => {}
            MapMut::Request(p) => {
                p.headers.remove(k);
            }
            MapMut::Response(h) => {
                h.headers_mut().remove(k);
            }
            MapMut::Plain(h) => {
                h.remove(k);
            }
        }
    }

    /// Replaces the whole map. Pseudo-headers present in `pairs` are set; absent
    /// ones keep their value (a request always has a method and a URI).
    pub fn replace_all(&mut self, pairs: &[(&[u8], &[u8])]) -> Result<(), Status> {
        let is_request = matches!(self, MapMut::Request(_));
        let special = |k: &[u8]| k.first() == Some(&b':') || (is_request && k.eq_ignore_ascii_case(b"host"));
        let mut fresh = HeaderMap::try_with_capacity(pairs.len()).map_err(|_| Status::BadArgument)?;
        for (k, v) in pairs {
            if !special(k) {
                fresh.append(name(k)?, value(v)?);
            }
        }
        match self {
            MapMut::Request(p) => {
                // An origin-form head's authority is its `host` field: it stays.
                if p.uri.authority().is_none()
                    && let Some(host) = p.headers.get(HOST)
                {
                    fresh.insert(HOST, host.clone());
                }
                p.headers = fresh;
            }
            // Nothing to decode: the encoded fields go too.
            MapMut::Response(h) => h.set_headers(fresh),
            MapMut::Plain(h) => **h = fresh,
        }
        for (k, v) in pairs {
            if special(k) {
                self.write(k, v, Write::Replace)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_names_are_the_names_the_bytes_parse_to() {
        // "x-ab" and "x-ba" share a slot (same length and end bytes): each takes it
        // in turn and a hit never returns the other's name.
        for key in [&b"x-ab"[..], b"x-ba", b"X-AB", b"x-ab", b"content-type", b"x-ba", b"Content-Type"] {
            let want = HeaderName::from_bytes(key).ok();
            assert_eq!(cached_name(key).ok(), want, "{}", String::from_utf8_lossy(key));
            assert_eq!(cached_name(key).ok(), want, "{} (again)", String::from_utf8_lossy(key));
        }
        assert!(cached_name(b"bad name").is_err());
        assert!(cached_name(b"bad name").is_err(), "a bad name is never cached");
        assert!(cached_name(b"").is_err());
    }

    #[test]
    fn lookups_and_removals_by_bytes_ignore_case_and_bad_names() -> Result<(), Status> {
        let mut h = HeaderMap::new();
        h.append("x-tenant", HeaderValue::from_static("a"));
        assert_eq!(lookup(&h, b"X-Tenant"), Some(&b"a"[..]));
        assert_eq!(lookup(&h, b"x-tenant\xff"), None);
        assert_eq!(lookup(&h, &[0xff, 0xfe]), None);
        MapMut::Plain(&mut h).remove(&[0xff]);
        MapMut::Plain(&mut h).remove(b"X-TENANT");
        assert!(h.is_empty());
        // Past SCAN_MAX values the look-up hashes: the same answers.
        for i in 0..=SCAN_MAX {
            MapMut::Plain(&mut h).write(
                format!("x-f{i}").as_bytes(),
                i.to_string().as_bytes(),
                Write::Add,
            )?;
        }
        h.append("x-f0", HeaderValue::from_static("second"));
        assert!(h.len() > SCAN_MAX);
        assert_eq!(lookup(&h, b"X-F0"), Some(&b"0"[..]), "the first value");
        assert_eq!(lookup(&h, b"x-f12"), Some(&b"12"[..]));
        assert_eq!(lookup(&h, b"x-f13"), None);
        assert_eq!(lookup(&h, b"x-f0\xff"), None);
        Ok(())
    }

    #[test]
    fn a_replaced_field_moves_to_the_end_with_one_value() -> Result<(), Status> {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("x-b", HeaderValue::from_static("3"));
        MapMut::Plain(&mut h).write(b"X-A", b"4", Write::Replace)?;
        MapMut::Plain(&mut h).write(b"x-c", b"5", Write::Replace)?;
        let got: Vec<_> = pairs(MapView::Plain(&h)).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(got, ["x-b=3", "x-a=4", "x-c=5"]);
        Ok(())
    }

    #[test]
    fn count_matches_the_entries_visited() {
        let (mut req, _) = http::Request::get("http://example.com/a?b")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("y", "3")
            .body(())
            .unwrap_or_default()
            .into_parts();
        req.headers.append("z", HeaderValue::from_static("4"));
        let view = MapView::Request(&req);
        assert_eq!(view.count(), view.count_and_size().0);
        assert_eq!(view.count(), 8);
        let (resp, _) = http::Response::builder().header("a", "b").body(()).unwrap_or_default().into_parts();
        let view = MapView::Response(&resp);
        assert_eq!(view.count(), view.count_and_size().0);
        let plain = req.headers.clone();
        assert_eq!(MapView::Plain(&plain).count(), MapView::Plain(&plain).count_and_size().0);
    }

    fn pairs(view: MapView<'_>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        view.for_each(|k, v| {
            out.push((String::from_utf8_lossy(k).into(), String::from_utf8_lossy(v).into()))
        });
        out
    }

    #[test]
    fn an_origin_form_head_shows_its_host_field_as_the_authority() {
        let (mut req, _) = http::Request::get("/a?b")
            .header("host", "example.com:8080")
            .header("x-a", "1")
            .body(())
            .unwrap_or_default()
            .into_parts();
        let view = MapView::Request(&req);
        let want =
            [(":authority", "example.com:8080"), (":path", "/a?b"), (":method", "GET"), (":scheme", "http")];
        let want: Vec<(String, String)> = want.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        assert_eq!(pairs(view)[..4], want[..]);
        assert_eq!(pairs(view)[4..], [("x-a".to_owned(), "1".to_owned())], "host is not a header of its own");
        assert_eq!(view.count(), 5);
        assert_eq!(view.count(), view.count_and_size().0);
        assert_eq!(view.get(b"host"), Some(&b"example.com:8080"[..]));

        // Writing the authority writes `host`; removing `host` does nothing.
        let mut map = MapMut::Request(&mut req);
        assert!(map.write(b":authority", b"other.test", Write::Replace).is_ok());
        assert!(map.write(b":authority", b"bad authority", Write::Replace).is_err());
        map.remove(b"host");
        assert_eq!(req.uri, "/a?b");
        assert_eq!(req.headers.get(HOST).map(HeaderValue::as_bytes), Some(&b"other.test"[..]));

        // Replacing every pair keeps the authority.
        let all: [(&[u8], &[u8]); 1] = [(b"x-b", b"2")];
        assert!(MapMut::Request(&mut req).replace_all(&all).is_ok());
        assert_eq!(MapView::Request(&req).get(b":authority"), Some(&b"other.test"[..]));
        assert_eq!(MapView::Request(&req).count(), 5);

        // Setting the scheme makes the head absolute: the authority moves into the URI.
        assert!(MapMut::Request(&mut req).write(b":scheme", b"https", Write::Replace).is_ok());
        assert_eq!(req.uri, "https://other.test/a?b");
        assert!(req.headers.get(HOST).is_none());
        assert_eq!(pairs(MapView::Request(&req)).len(), 5);
    }

    #[test]
    fn a_sent_request_shows_the_fields_written_after_its_map() {
        let (req, _) =
            http::Request::get("/a").header("host", "h.test").body(()).unwrap_or_default().into_parts();
        let lines = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n".to_vec();
        let added = sluice_filter::EncodedFields { lines, count: 1, length: None, has_date: false };
        let view = MapView::Sent(&req, &added);
        assert_eq!(view.count(), 5);
        assert_eq!(view.count(), view.count_and_size().0);
        let all = pairs(view);
        assert_eq!(all[4].0, "traceparent");
        assert_eq!(
            view.get(b"traceparent"),
            Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..])
        );
        assert_eq!(view.get(b":authority"), Some(&b"h.test"[..]));
        assert_eq!(view.get(b"x-none"), None);
    }

    #[test]
    fn setting_a_responses_pairs_replaces_its_encoded_fields_too() {
        let lines = b"Server: up\r\nX-Old: 1\r\n".to_vec();
        let encoded = sluice_filter::EncodedFields { lines, count: 2, length: None, has_date: false };
        let parts = http::Response::new(()).into_parts().0;
        let mut head = ResponseHead::with_encoded(parts, Some(Box::new(encoded)));
        let pairs: [(&[u8], &[u8]); 2] = [(b":status", b"201"), (b"x-new", b"2")];
        assert!(MapMut::Response(&mut head).replace_all(&pairs).is_ok());
        let mut fields = Vec::new();
        MapView::Head(&head).for_each(|k, v| fields.push((k.to_vec(), v.to_vec())));
        assert_eq!(fields, [(b":status".to_vec(), b"201".to_vec()), (b"x-new".to_vec(), b"2".to_vec())]);
        assert!(head.encoded().is_none());
    }
}
