//! Response heads whose fields may still be encoded as the upstream sent them.
//!
//! Decoding a response's fields into a `HeaderMap` and encoding them again for
//! the downstream is a tenth of what an HTTP/1.1 request costs the proxy. When
//! the upstream spoke HTTP/1.1 to an HTTP/1.x downstream, the proxy keeps them
//! as [`EncodedFields`] (the end-to-end ones: hop-by-hop fields are already
//! gone) and hands the filters a [`ResponseHead`], which reads them where they
//! are and decodes them into its map only when a filter edits them in a way an
//! append cannot express. A filter that never touches response fields (auth,
//! routing, rate limits) so costs no map at all.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, response};

/// A response's end-to-end fields as the upstream encoded them: `name: value`
/// lines, each ended by CRLF, in the upstream's order and name case. Made by
/// the proxy's HTTP/1.1 parser, which checked every name and value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedFields {
    /// `name: value\r\n` lines.
    pub lines: Vec<u8>,
    /// How many lines there are.
    pub count: usize,
    /// The value of the `content-length` field among them.
    pub length: Option<u64>,
    /// A `date` field is among them.
    pub has_date: bool,
}

impl EncodedFields {
    /// Each field's name (as sent) and value (without surrounding whitespace).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.split_inclusive(|&b| b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r\n").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
    }

    /// Appends the fields to `map` (names lower-cased, as a map holds them).
    pub fn decode_into(&self, map: &mut HeaderMap) {
        map.reserve(self.count);
        for (name, value) in self.iter() {
            // Checked by the parser that made the lines: neither fails.
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
    }
}

/// A response head in the response phases: a status, a version and fields.
/// The fields are the encoded ones, if any, followed by the map's. Reads
/// ([`ResponseHead::for_each`], [`ResponseHead::get`], [`ResponseHead::len`])
/// and appends see all of them without decoding anything;
/// [`ResponseHead::headers_mut`] decodes the encoded ones into the map first.
#[derive(Debug)]
pub struct ResponseHead {
    parts: response::Parts,
    encoded: Option<Box<EncodedFields>>,
}

impl ResponseHead {
    /// A head whose fields are all in `parts`' map.
    pub fn new(parts: response::Parts) -> Self {
        ResponseHead { parts, encoded: None }
    }

    /// A head whose fields are `encoded`, then `parts`' map.
    pub fn with_encoded(parts: response::Parts, encoded: Option<Box<EncodedFields>>) -> Self {
        ResponseHead { parts, encoded }
    }

    /// The parts and the fields still encoded (which come before the map's).
    pub fn into_parts(self) -> (response::Parts, Option<Box<EncodedFields>>) {
        (self.parts, self.encoded)
    }

    /// The fields still encoded, if any.
    pub fn encoded(&self) -> Option<&EncodedFields> {
        self.encoded.as_deref()
    }

    /// The status code.
    pub fn status(&self) -> &StatusCode {
        &self.parts.status
    }

    /// Sets the status code.
    pub fn set_status(&mut self, status: StatusCode) {
        self.parts.status = status;
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.parts.version
    }

    /// Number of fields (a repeated name counts once per value).
    pub fn len(&self) -> usize {
        self.encoded.as_ref().map_or(0, |e| e.count) + self.parts.headers.len()
    }

    /// Whether there is no field.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with each field, names lower-cased, in order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        if let Some(e) = &self.encoded {
            let mut lower = Vec::new();
            for (name, value) in e.iter() {
                if name.iter().any(u8::is_ascii_uppercase) {
                    lower.clear();
                    lower.extend(name.iter().map(u8::to_ascii_lowercase));
                    f(&lower, value);
                } else {
                    f(name, value);
                }
            }
        }
        for (name, value) in &self.parts.headers {
            f(name.as_str().as_bytes(), value.as_bytes());
        }
    }

    /// The first value of field `name` (compared case-insensitively).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        if let Some(e) = &self.encoded
            && let Some((_, v)) = e.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            return Some(v);
        }
        if self.parts.headers.is_empty() {
            return None;
        }
        // A `&str` key is parsed on the stack: no name is allocated.
        self.parts.headers.get(std::str::from_utf8(name).ok()?).map(HeaderValue::as_bytes)
    }

    /// Appends a field after all others; encoded fields stay encoded.
    pub fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.parts.headers.append(name, value);
    }

    /// Every field, in a map: decodes the encoded ones into it first (once),
    /// ahead of the fields the map already held.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        if let Some(e) = self.encoded.take() {
            let mut map = HeaderMap::with_capacity(e.count + self.parts.headers.len());
            e.decode_into(&mut map);
            let later = std::mem::replace(&mut self.parts.headers, map);
            let mut name = None;
            for (n, v) in later {
                // A name comes with its first value only.
                if n.is_some() {
                    name = n;
                }
                if let Some(n) = &name {
                    self.parts.headers.append(n.clone(), v);
                }
            }
        }
        &mut self.parts.headers
    }

    /// Replaces every field, the encoded ones too, with `map`'s.
    pub fn set_headers(&mut self, map: HeaderMap) {
        self.encoded = None;
        self.parts.headers = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> ResponseHead {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.headers.append("x-added", HeaderValue::from_static("1"));
        let lines = b"Server: up\r\nContent-Length: 5\r\nset-cookie: a=1\r\nSet-Cookie:  b=2 \r\n".to_vec();
        let encoded = EncodedFields { lines, count: 4, length: Some(5), has_date: false };
        ResponseHead::with_encoded(parts, Some(Box::new(encoded)))
    }

    fn fields(h: &ResponseHead) -> Vec<(String, String)> {
        let mut v = Vec::new();
        h.for_each(|n, x| v.push((String::from_utf8_lossy(n).into(), String::from_utf8_lossy(x).into())));
        v
    }

    #[test]
    fn reads_see_encoded_fields_first_lower_cased_then_the_map() {
        let h = head();
        assert_eq!(h.len(), 5);
        let want = [("server", "up"), ("content-length", "5"), ("set-cookie", "a=1"), ("set-cookie", "b=2")];
        let mut want: Vec<(String, String)> =
            want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        want.push(("x-added".into(), "1".into()));
        assert_eq!(fields(&h), want);
        assert_eq!(h.get(b"SERVER"), Some(&b"up"[..]));
        assert_eq!(h.get(b"x-added"), Some(&b"1"[..]));
        assert_eq!(h.get(b"set-cookie"), Some(&b"a=1"[..]));
        assert_eq!(h.get(b"absent"), None);
    }

    #[test]
    fn decoding_keeps_the_order_and_every_value() {
        let mut h = head();
        let before = fields(&h);
        h.append(HeaderName::from_static("x-added"), HeaderValue::from_static("2"));
        assert!(h.encoded().is_some(), "an append decodes nothing");
        let mut want = before;
        want.push(("x-added".into(), "2".into()));
        let map = h.headers_mut();
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert!(h.encoded().is_none());
        assert_eq!(h.len(), 6);
        // A map groups a name's values; these names are already grouped.
        assert_eq!(fields(&h), want);
    }
}
