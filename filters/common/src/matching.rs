//! Path matching for per-path rules: `{exact: /a}`, `{prefix: /api/}`,
//! `{suffix: .json}` (the query string is ignored).

use serde::Deserialize;

/// How a rule selects request paths.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The path (without query) equals this.
    Exact(String),
    /// The path starts with this.
    Prefix(String),
    /// The path ends with this.
    Suffix(String),
}

impl PathMatch {
    /// True when `path` (a `:path`, query allowed) matches.
    pub fn matches(&self, path: &str) -> bool {
        let (path, _) = crate::query::split(path);
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Suffix(s) => path.ends_with(s.as_str()),
        }
    }
}

/// True when `matches` is empty or any of them matches `path`.
pub fn any(matches: &[PathMatch], path: &str) -> bool {
    matches.is_empty() || matches.iter().any(|m| m.matches(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_ignore_the_query() {
        let m: PathMatch = serde_json::from_str(r#"{"prefix": "/api/"}"#).unwrap();
        assert!(m.matches("/api/x?y=1"));
        assert!(!m.matches("/apix"));
        assert!(PathMatch::Exact("/a".into()).matches("/a?b"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
        assert!(PathMatch::Suffix(".json".into()).matches("/x.json?z"));
        assert!(any(&[], "/"));
        assert!(serde_json::from_str::<PathMatch>(r#"{"regex": "x"}"#).is_err());
    }
}
