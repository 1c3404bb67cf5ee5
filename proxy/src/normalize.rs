//! Request-path normalization, done before route matching and forwarded as is,
//! so that policy and upstream see the same path.
//!
//! Following Envoy's edge guidance (`normalize_path`, `merge_slashes`):
//! percent-encoded unreserved characters are decoded (so `%2e%2e` is a dot
//! segment), hex digits of the remaining escapes are upper-cased, dot segments
//! are removed (RFC 3986 §5.2.4) and repeated slashes merged. An escaped slash
//! (`%2F`) is kept escaped: it is data, not a separator.

/// Normalizes a path (without the query). Returns `None` when it is not a valid
/// origin-form path.
pub fn normalize_path(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !path.starts_with('/') {
        return None;
    }
    // Fast path: nothing to do for the common clean path.
    if !needs_work(path.as_bytes()) {
        return Some(std::borrow::Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Some(std::borrow::Cow::Owned(out))
}

fn needs_work(p: &[u8]) -> bool {
    p.windows(2).any(|w| w == b"//" || w == b"/.") || p.contains(&b'%')
}

fn decode_unreserved(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            let c = (hi << 4) | lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[hi as usize]));
                out.push(char::from(b"0123456789ABCDEF"[lo as usize]));
            }
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    Some(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_path;

    #[test]
    fn normalizes_like_envoy() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/../admin", "/admin"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a/%2E%2e/%2e/admin", "/admin"),
            ("//x", "/x"),
            ("/a//b///c/", "/a/b/c/"),
            ("/../../etc", "/etc"),
            ("/a/.", "/a/"),
            ("/a/%2Fb", "/a/%2Fb"),
            ("/a/%2fb", "/a/%2Fb"),
            ("/%7Euser", "/~user"),
            ("/a/b/..", "/a/"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input).as_deref(), Some(want), "{input}");
        }
    }

    #[test]
    fn rejects_invalid() {
        assert_eq!(normalize_path("a/b"), None);
        assert_eq!(normalize_path("/a%zz"), None);
        assert_eq!(normalize_path("/a%2"), None);
    }
}
