//! CORS (the Fetch standard's CORS protocol): origin patterns, preflight answers
//! and response headers.

use serde::Deserialize;
use sluice_filter_common::Dur;

/// The CORS policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Allowed origins: exact (`https://app.example.com`), a subdomain pattern
    /// (`https://*.example.com`, or `*.example.com` for any scheme), or `*`.
    pub allow_origins: Vec<String>,
    /// Allowed methods (default GET, HEAD, POST).
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Allowed request headers; `*` reflects what the preflight asks for.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// How long browsers may cache a preflight answer: a number of **seconds**
    /// (as in the header), or a string with a unit (`"10m"`).
    #[serde(default)]
    pub max_age: Option<MaxAge>,
    /// Allow cookies and credentials (default false).
    #[serde(default)]
    pub allow_credentials: bool,
    /// Answer preflights from origins not allowed with 403 (default false: they go
    /// upstream untouched, as Envoy does).
    #[serde(default)]
    pub reject_disallowed_preflight: bool,
}

/// `max_age`: seconds, or a duration string.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum MaxAge {
    /// Seconds.
    Seconds(u64),
    /// A duration with a unit.
    Duration(Dur),
}

impl MaxAge {
    /// In whole seconds.
    pub fn secs(self) -> u64 {
        match self {
            MaxAge::Seconds(s) => s,
            MaxAge::Duration(d) => d.get().as_secs(),
        }
    }
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len()).is_some_and(|h| h.eq_ignore_ascii_case(prefix))
}

fn ends_with_ci(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len() && s.get(s.len() - suffix.len()..).is_some_and(|t| t.eq_ignore_ascii_case(suffix))
}

/// True when `origin` (an `Origin` header value) matches `pattern`.
pub fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some((pre, suf)) = pattern.split_once('*') else {
        return pattern.eq_ignore_ascii_case(origin);
    };
    let subject =
        if pre.contains("://") { origin } else { origin.split_once("://").map_or(origin, |(_, h)| h) };
    if subject.len() <= pre.len() + suf.len() || !starts_with_ci(subject, pre) || !ends_with_ci(subject, suf)
    {
        return false;
    }
    let Some(middle) = subject.get(pre.len()..subject.len() - suf.len()) else { return false };
    !middle.is_empty() && !middle.contains(['/', '?', '#', '@', ':', ' ']) && !middle.starts_with('.')
}

impl Cors {
    /// Checks the policy.
    pub fn validate(&self) -> Result<(), String> {
        if self.allow_origins.is_empty() {
            return Err("cors.allow_origins: at least one origin".into());
        }
        for o in &self.allow_origins {
            if o != "*" && (o.matches('*').count() > 1 || (o.contains('*') && !o.contains("*."))) {
                return Err(format!(
                    "cors.allow_origins: {o:?} is not an origin, `*`, or a `*.suffix` pattern"
                ));
            }
        }
        let all = self
            .allow_origins
            .iter()
            .chain(&self.allow_methods)
            .chain(&self.allow_headers)
            .chain(&self.expose_headers);
        if let Some(bad) = all.into_iter().find(|v| v.chars().any(|c| c.is_control() || c == ',')) {
            return Err(format!("cors: {bad:?} holds a comma or a control character"));
        }
        Ok(())
    }

    /// The `access-control-allow-origin` value for `origin`, if allowed.
    pub fn allow_origin(&self, origin: &str) -> Option<String> {
        if !self.allow_origins.iter().any(|p| origin_matches(p, origin)) {
            return None;
        }
        // `*` cannot be combined with credentials: echo the origin then.
        if self.allow_origins.iter().any(|p| p == "*") && !self.allow_credentials {
            Some("*".into())
        } else {
            Some(origin.to_string())
        }
    }

    /// Headers of a preflight answer for an allowed origin.
    pub fn preflight_headers(
        &self,
        allow_origin: &str,
        requested_headers: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut h = vec![
            ("access-control-allow-origin".to_string(), allow_origin.to_string()),
            ("access-control-allow-methods".to_string(), self.allow_methods.join(", ")),
        ];
        let headers = if self.allow_headers.iter().any(|x| x == "*") {
            requested_headers
                .map(|r| r.chars().filter(|c| !c.is_control()).collect::<String>())
                .unwrap_or_default()
        } else {
            self.allow_headers.join(", ")
        };
        if !headers.is_empty() {
            h.push(("access-control-allow-headers".into(), headers));
        }
        if let Some(age) = self.max_age {
            h.push(("access-control-max-age".into(), age.secs().to_string()));
        }
        if self.allow_credentials {
            h.push(("access-control-allow-credentials".into(), "true".into()));
        }
        h.push(("vary".into(), "origin".into()));
        h
    }

    /// Headers added to the response of an actual request from an allowed origin.
    pub fn response_headers(&self, allow_origin: &str) -> Vec<(String, String)> {
        let mut h = vec![("access-control-allow-origin".to_string(), allow_origin.to_string())];
        if self.allow_credentials {
            h.push(("access-control-allow-credentials".into(), "true".into()));
        }
        if !self.expose_headers.is_empty() {
            h.push(("access-control-expose-headers".into(), self.expose_headers.join(", ")));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn origin_patterns() {
        assert!(origin_matches("https://app.example.com", "https://APP.example.com"));
        assert!(!origin_matches("https://app.example.com", "https://app.example.com.evil"));
        assert!(origin_matches("https://*.example.com", "https://a.b.example.com"));
        assert!(!origin_matches("https://*.example.com", "http://a.example.com"));
        assert!(!origin_matches("https://*.example.com", "https://example.com"));
        assert!(!origin_matches("https://*.example.com", "https://evil-example.com"));
        assert!(!origin_matches("https://*.example.com", "https://x/.example.com"));
        assert!(!origin_matches("https://*.example.com", "https://.example.com"));
        assert!(origin_matches("*.example.com", "http://a.example.com"));
        assert!(origin_matches("*.example.com", "https://a.example.com"));
        assert!(!origin_matches("*.example.com", "https://a.example.com:8443"));
        assert!(origin_matches("*.example.com:8443", "https://a.example.com:8443"));
        assert!(origin_matches("*", "null"));
        assert!(!origin_matches("https://a", "null"));
    }

    proptest! {
        #[test]
        fn never_panics(p in ".{0,30}", o in ".{0,30}") {
            let _ = origin_matches(&p, &o);
        }

        #[test]
        fn suffix_patterns_only_match_subdomains(label in "[a-z0-9-]{1,12}", evil in "[a-z0-9-]{0,12}") {
            let pattern = "https://*.example.com";
            let good = format!("https://{label}.example.com");
            let bad = format!("https://{evil}example.com");
            prop_assert!(origin_matches(pattern, &good));
            prop_assert!(!origin_matches(pattern, &bad));
        }

        #[test]
        fn exact_patterns_match_only_themselves(a in "https://[a-z]{1,10}\\.com", b in "https://[a-z]{1,10}\\.com") {
            prop_assert_eq!(origin_matches(&a, &b), a == b);
        }
    }
}
