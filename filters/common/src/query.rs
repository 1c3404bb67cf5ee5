//! Query strings: splitting `:path`, reading parameters (percent-decoded, `+` as
//! space) and removing one.

/// Splits a `:path` into the path and the query (without `?`); the fragment, if a
/// client sent one, is dropped.
pub fn split(path: &str) -> (&str, Option<&str>) {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

/// The decoded value of the first parameter `name` in `:path`'s query.
pub fn param(path: &str, name: &str) -> Option<String> {
    let (_, query) = split(path);
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// `:path` without every parameter `name` (the path is unchanged when absent).
pub fn remove(path: &str, name: &str) -> String {
    let (p, Some(query)) = split(path) else { return path.to_string() };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            decode(k) != name
        })
        .collect();
    if kept.is_empty() { p.to_string() } else { format!("{p}?{}", kept.join("&")) }
}

/// Percent-decodes a query component (`+` is a space); invalid escapes stay as
/// they are and invalid UTF-8 is replaced.
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                b.get(i + 1).and_then(|c| crate::nibble(*c)),
                b.get(i + 2).and_then(|c| crate::nibble(*c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reads_params() {
        assert_eq!(param("/a?x=1&canary=yes%21&y", "canary").as_deref(), Some("yes!"));
        assert_eq!(param("/a?y&x=1", "y").as_deref(), Some(""));
        assert_eq!(param("/a?q=a+b", "q").as_deref(), Some("a b"));
        assert_eq!(param("/a?%6Bey=v", "key").as_deref(), Some("v"));
        assert_eq!(param("/a", "x"), None);
        assert_eq!(param("/a?x=1#frag", "x").as_deref(), Some("1"));
        assert_eq!(param("/a?x=%zz%4", "x").as_deref(), Some("%zz%4"));
        assert_eq!(param("/a?x=%", "x").as_deref(), Some("%"));
    }

    #[test]
    fn removes_params() {
        assert_eq!(remove("/a?k=1&b=2", "k"), "/a?b=2");
        assert_eq!(remove("/a?k=1", "k"), "/a");
        assert_eq!(remove("/a", "k"), "/a");
        assert_eq!(split("/p?q"), ("/p", Some("q")));
    }

    proptest! {
        #[test]
        fn never_panics(path in ".{0,80}", name in ".{0,5}") {
            let _ = param(&path, &name);
            let _ = remove(&path, &name);
            let _ = decode(&path);
        }

        #[test]
        fn decodes_what_was_encoded(value in ".{0,30}") {
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(param(&format!("/p?a=b&v={encoded}"), "v"), Some(value));
        }
    }
}
