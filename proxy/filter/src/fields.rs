//! The fields the proxy sets on a request before its filters run
//! (`x-request-id`, `x-forwarded-for`, `x-forwarded-proto`), kept out of the
//! head's map until something writes the map.
//!
//! Envoy's connection manager sets them before its filters, so filters read
//! them in `on_request_headers`. Most filters only read request fields, and
//! a custom name costs a map insert that hashes it byte by byte: the proxy
//! therefore keeps them in [`StreamInfo`](crate::StreamInfo) while the
//! filters run. A filter that declares so
//! ([`HttpFilter::reads_proxy_fields`](crate::HttpFilter::reads_proxy_fields))
//! reads them beside the map and puts them in it
//! ([`StreamInfo::materialize_proxy_fields`](crate::StreamInfo::materialize_proxy_fields))
//! before an edit that touches a field the proxy manages
//! ([`is_proxy_managed`]); any other filter gets a map that has them. When
//! no filter put them in the map, the proxy writes them after the request's
//! own fields, as it does without filters: after any field a filter added,
//! which HTTP allows (the order of fields with different names carries no
//! meaning, RFC 9110 §5.3).

use http::{HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`, `x-forwarded-for` and `x-forwarded-proto` as the proxy set
/// them and the head's map does not have them (each `None` when the map has
/// the field itself: a well-formed incoming request id, a trusted incoming
/// `x-forwarded-for` the proxy extended, or a trusted `x-forwarded-proto`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyFields {
    /// A request id the proxy made: 32 lower-case hex digits.
    pub request_id: Option<[u8; 32]>,
    /// The downstream's address.
    pub forwarded_for: Option<HeaderValue>,
    /// `http` or `https`.
    pub forwarded_proto: Option<&'static str>,
}

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The fields the proxy manages on the way upstream, as bits: those it sets,
/// and `connection`, which says whether any field is hop-by-hop by name. The
/// proxy scans a request for them once ([`managed_field`] per name); an edit
/// to any other field leaves that scan valid.
pub mod managed {
    /// `x-request-id`.
    pub const REQUEST_ID: u8 = 1;
    /// `x-forwarded-for`.
    pub const FORWARDED_FOR: u8 = 2;
    /// `x-forwarded-proto`.
    pub const FORWARDED_PROTO: u8 = 4;
    /// `traceparent`.
    pub const TRACEPARENT: u8 = 8;
    /// `connection`.
    pub const CONNECTION: u8 = 16;
}

/// Which [`managed`] field `name` (in any case) is, as its bit; 0 for any other.
pub fn managed_field(name: &[u8]) -> u8 {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    match name.len() {
        10 if is("connection") => managed::CONNECTION,
        11 if is("traceparent") => managed::TRACEPARENT,
        12 if is("x-request-id") => managed::REQUEST_ID,
        15 if is("x-forwarded-for") => managed::FORWARDED_FOR,
        17 if is("x-forwarded-proto") => managed::FORWARDED_PROTO,
        _ => 0,
    }
}

/// Whether `name` (in any case) is a field the proxy manages ([`managed`]).
pub fn is_proxy_managed(name: &[u8]) -> bool {
    managed_field(name) != 0
}

impl ProxyFields {
    /// How many fields there are.
    pub fn len(&self) -> usize {
        usize::from(self.request_id.is_some())
            + usize::from(self.forwarded_for.is_some())
            + usize::from(self.forwarded_proto.is_some())
    }

    /// No field is kept aside.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each field's name and value, in the order the proxy writes them.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        let id = self.request_id.as_ref().map(|id| (X_REQUEST_ID.as_str(), &id[..]));
        let xff = self.forwarded_for.as_ref().map(|v| (X_FORWARDED_FOR.as_str(), v.as_bytes()));
        let xfp = self.forwarded_proto.map(|p| (X_FORWARDED_PROTO.as_str(), p.as_bytes()));
        id.into_iter().chain(xff).chain(xfp)
    }

    /// The value of the field named `name` (lower case), if kept aside.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| n.as_bytes() == name).map(|(_, v)| v)
    }

    /// Moves the fields into `map` (which has none of them: the proxy removed
    /// the downstream's own when it set these).
    pub fn move_into(&mut self, map: &mut HeaderMap) {
        if let Some(id) = self.request_id.take()
            && let Ok(v) = HeaderValue::from_bytes(&id)
        {
            map.insert(X_REQUEST_ID.clone(), v);
        }
        if let Some(v) = self.forwarded_for.take() {
            map.insert(X_FORWARDED_FOR.clone(), v);
        }
        if let Some(p) = self.forwarded_proto.take() {
            map.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_beside_the_map_then_move_into_it() {
        let mut f = ProxyFields {
            request_id: Some(*b"0af7651916cd43dd8448eb211c80319c"),
            forwarded_for: Some(HeaderValue::from_static("10.0.0.1")),
            forwarded_proto: Some("http"),
        };
        assert_eq!(f.len(), 3);
        assert_eq!(f.get(b"x-forwarded-for"), Some(&b"10.0.0.1"[..]));
        assert_eq!(f.get(b"x-other"), None);
        let names: Vec<_> = f.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["x-request-id", "x-forwarded-for", "x-forwarded-proto"]);
        let mut map = HeaderMap::new();
        f.move_into(&mut map);
        assert!(f.is_empty());
        assert_eq!(map["x-request-id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(map["x-forwarded-for"], "10.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
    }

    #[test]
    fn proxy_managed_names_in_any_case() {
        for n in ["x-request-id", "X-Forwarded-For", "x-forwarded-proto", "Traceparent", "CONNECTION"] {
            assert!(is_proxy_managed(n.as_bytes()), "{n}");
        }
        for n in ["x-request-ids", "x-forwarded-host", "x-wasm-filter", "host", "", "connectio"] {
            assert!(!is_proxy_managed(n.as_bytes()), "{n}");
        }
    }
}
