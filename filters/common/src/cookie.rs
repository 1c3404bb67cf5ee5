//! `Cookie` request headers (RFC 6265 §5.4: `name=value; name2=value2`).

/// The value of cookie `name` in one or more `cookie` header values; the first
/// match wins. Surrounding double quotes are removed. Malformed pairs (no `=`)
/// are skipped.
pub fn get<'a, I>(headers: I, name: &str) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    headers.into_iter().flat_map(pairs).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The `name=value` pairs of one `cookie` header value, trimmed.
pub fn pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').filter_map(|part| {
        let (k, v) = part.split_once('=')?;
        let k = k.trim();
        if k.is_empty() {
            return None;
        }
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        Some((k, v))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn finds_cookies_across_headers() {
        let h = ["a=1; session=abc ; b=\"q\"", "c=3"];
        assert_eq!(get(h, "session"), Some("abc"));
        assert_eq!(get(h, "b"), Some("q"));
        assert_eq!(get(h, "c"), Some("3"));
        assert_eq!(get(h, "d"), None);
        assert_eq!(get(["novalue; =x; a=="], "a"), Some("="));
        assert_eq!(get([""], ""), None);
    }

    proptest! {
        #[test]
        fn never_panics(h in ".{0,80}", name in "[a-z]{0,4}") {
            let _ = get([h.as_str()], &name);
        }

        #[test]
        fn finds_what_was_written(name in "[a-zA-Z0-9_-]{1,10}", value in "[a-zA-Z0-9_./-]{0,20}", junk in "[a-z]{1,5}=[a-z]{0,5}") {
            let header = format!("{junk}; {name}={value}");
            // The junk pair may use the same name; then it wins.
            let expect = if junk.split_once('=').map(|(k, _)| k) == Some(name.as_str()) {
                junk.split_once('=').map(|(_, v)| v.to_string())
            } else {
                Some(value.clone())
            };
            prop_assert_eq!(get([header.as_str()], &name).map(str::to_string), expect);
        }
    }
}
