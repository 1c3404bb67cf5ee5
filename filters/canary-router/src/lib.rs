//! Sluice's canary router: picks a target (`v1`, `v2`, ...) for each request by
//! header, cookie or query parameter, or by weighted percentages that stay sticky
//! per user (a hash of a header or cookie), then steers the request by setting a
//! request header (`x-sluice-canary: v2`) that routes match on, and optionally
//! rewriting `:authority` and the path prefix. The host re-evaluates the route
//! when a filter changes request headers, so a route matching the header picks the
//! canary cluster.
//!
//! It does not pick clusters itself (routes do) and keeps no state. The
//! configuration is documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;
use sluice_filter_common::{PathMatch, cookie, fnv1a64, matching, query, random};
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext};

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The request header carrying the choice (default `x-sluice-canary`).
    #[serde(default = "default_header")]
    pub header: String,
    /// Rewrites per target.
    #[serde(default)]
    pub targets: BTreeMap<String, Target>,
    /// Rules, first one that picks a target wins.
    pub rules: Vec<Rule>,
    /// Target when no rule picks one (default: none, the header is removed).
    #[serde(default)]
    pub default: Option<String>,
    /// Echo the choice in this response header (default: none).
    #[serde(default)]
    pub response_header: Option<String>,
}

fn default_header() -> String {
    "x-sluice-canary".into()
}

/// Rewrites applied when a target is chosen.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// New `:authority`.
    #[serde(default)]
    pub authority: Option<String>,
    /// Replace a path prefix.
    #[serde(default)]
    pub prefix_rewrite: Option<PrefixRewrite>,
}

/// `from` → `to` at the start of the path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRewrite {
    /// The prefix to replace.
    pub from: String,
    /// Its replacement.
    pub to: String,
}

/// A name and an optional exact value (absent = present with any value).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// Header, cookie or parameter name.
    pub name: String,
    /// Required value.
    #[serde(default)]
    pub value: Option<String>,
}

impl ValueMatch {
    fn accepts(&self, got: Option<&str>) -> bool {
        match (got, &self.value) {
            (Some(g), Some(want)) => g == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// Where the sticky key comes from.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Sticky {
    /// A request header (e.g. `x-user-id`, or a JWT claim header).
    Header(String),
    /// A cookie.
    Cookie(String),
}

/// One rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Only on these paths (default: all).
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Match a request header.
    #[serde(default)]
    pub header: Option<ValueMatch>,
    /// Match a cookie.
    #[serde(default)]
    pub cookie: Option<ValueMatch>,
    /// Match a query parameter.
    #[serde(default)]
    pub query: Option<ValueMatch>,
    /// The target of a header/cookie/query rule.
    #[serde(default)]
    pub target: Option<String>,
    /// Weighted split: target → weight.
    #[serde(default)]
    pub weights: Option<BTreeMap<String, u32>>,
    /// Keep a user on one target (weighted rules).
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// Changes the sticky buckets (default empty).
    #[serde(default)]
    pub salt: String,
}

impl Config {
    fn validate(&self) -> Result<(), Error> {
        if self.header.is_empty() || self.header.starts_with(':') {
            return Err(Error::msg("header must be a regular header name"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let kinds = [r.header.is_some(), r.cookie.is_some(), r.query.is_some(), r.weights.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(Error::msg(format!(
                    "rules[{i}]: set exactly one of header, cookie, query, weights"
                )));
            }
            match &r.weights {
                Some(w) => {
                    if r.target.is_some() {
                        return Err(Error::msg(format!("rules[{i}]: a weighted rule has no target")));
                    }
                    if w.values().map(|v| u64::from(*v)).sum::<u64>() == 0 {
                        return Err(Error::msg(format!("rules[{i}].weights: the weights add up to 0")));
                    }
                }
                None => {
                    if r.target.as_deref().is_none_or(str::is_empty) {
                        return Err(Error::msg(format!("rules[{i}]: target is required")));
                    }
                    if r.sticky.is_some() {
                        return Err(Error::msg(format!("rules[{i}]: sticky only applies to weighted rules")));
                    }
                }
            }
        }
        for (name, t) in &self.targets {
            if let Some(p) = &t.prefix_rewrite
                && (!p.from.starts_with('/') || !p.to.starts_with('/'))
            {
                return Err(Error::msg(format!(
                    "targets.{name}.prefix_rewrite: from and to must start with /"
                )));
            }
        }
        Ok(())
    }

    fn target_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.targets.keys().cloned().collect();
        for r in &self.rules {
            names.extend(r.target.iter().cloned());
            names.extend(r.weights.iter().flat_map(|w| w.keys().cloned()));
        }
        names.extend(self.default.iter().cloned());
        names.sort();
        names.dedup();
        names
    }
}

/// Picks a weighted target for `bucket_key` (or at random without one): targets in
/// name order, each owning a range of `[0, total)` as wide as its weight.
pub fn pick_weighted<'a>(
    weights: &'a BTreeMap<String, u32>,
    salt: &str,
    key: Option<&str>,
) -> Option<&'a str> {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let point = match key {
        Some(k) => fnv1a64(&[salt.as_bytes(), k.as_bytes()]) % total,
        None => random::below(total),
    };
    let mut acc = 0u64;
    for (name, w) in weights {
        acc += u64::from(*w);
        if point < acc {
            return Some(name);
        }
    }
    None
}

fn metric_name(target: &str) -> String {
    let clean: String = target
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    format!("canary_router_selected_{clean}")
}

/// The plugin.
#[derive(Default)]
pub struct CanaryRoot {
    config: Option<Rc<Config>>,
    counters: Rc<BTreeMap<String, Counter>>,
}

impl RootContext for CanaryRoot {
    type Config = Config;
    type Http = Canary;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        config.validate()?;
        let mut counters = BTreeMap::new();
        for name in config.target_names() {
            counters.insert(name.clone(), Counter::new(&metric_name(&name))?);
        }
        counters.insert(String::new(), Counter::new("canary_router_unrouted")?);
        let now = sluice_sdk::host::now()?;
        random::seed(now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        sluice_sdk::info!("canary-router configured: {} rules, header {}", config.rules.len(), config.header);
        self.counters = Rc::new(counters);
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> Canary {
        Canary { config: self.config.clone(), counters: self.counters.clone(), chosen: None }
    }
}

/// One request.
pub struct Canary {
    config: Option<Rc<Config>>,
    counters: Rc<BTreeMap<String, Counter>>,
    chosen: Option<String>,
}

impl Canary {
    fn choose(&self, http: &Http, config: &Config, path: &str) -> Result<Option<String>, Error> {
        let req = http.request();
        let cookies = req.headers().get_all("cookie")?;
        let cookie = |name: &str| cookie::get(cookies.iter().map(String::as_str), name).map(str::to_owned);
        for rule in &config.rules {
            if !matching::any(&rule.paths, path) {
                continue;
            }
            let picked = if let Some(m) = &rule.header {
                m.accepts(req.header(&m.name)?.as_deref()).then(|| rule.target.clone()).flatten()
            } else if let Some(m) = &rule.cookie {
                m.accepts(cookie(&m.name).as_deref()).then(|| rule.target.clone()).flatten()
            } else if let Some(m) = &rule.query {
                m.accepts(query::param(path, &m.name).as_deref()).then(|| rule.target.clone()).flatten()
            } else if let Some(w) = &rule.weights {
                let key = match &rule.sticky {
                    Some(Sticky::Header(h)) => req.header(h)?.filter(|v| !v.is_empty()),
                    Some(Sticky::Cookie(c)) => cookie(c).filter(|v| !v.is_empty()),
                    None => None,
                };
                pick_weighted(w, &rule.salt, key.as_deref()).map(str::to_owned)
            } else {
                None
            };
            if picked.is_some() {
                return Ok(picked);
            }
        }
        Ok(config.default.clone())
    }
}

impl HttpContext for Canary {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let path = http.request().path()?.unwrap_or_default();
        let chosen = self.choose(http, &config, &path)?;
        let req = http.request();
        // The client never steers directly: its own value is always replaced.
        req.remove_header(&config.header)?;
        let counter = self.counters.get(chosen.as_deref().unwrap_or_default()).copied();
        if let Some(c) = counter {
            c.inc()?;
        }
        let Some(target) = chosen else { return Ok(Action::Continue) };
        req.set_header(&config.header, &target)?;
        if let Some(t) = config.targets.get(&target) {
            if let Some(a) = &t.authority {
                req.set_header(":authority", a)?;
            }
            if let Some(p) = &t.prefix_rewrite
                && let Some(rest) = path.strip_prefix(p.from.as_str())
            {
                req.set_path(&format!("{}{rest}", p.to))?;
            }
        }
        sluice_sdk::debug!("canary-router: {path} -> {target}");
        self.chosen = Some(target);
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        if let (Some(config), Some(target)) = (&self.config, &self.chosen)
            && let Some(h) = &config.response_header
        {
            http.response().set_header(h, target)?;
        }
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(CanaryRoot);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn weighted_split_follows_the_weights() {
        let w = weights(&[("v1", 90), ("v2", 10)]);
        let v2 =
            (0..10_000).filter(|i| pick_weighted(&w, "", Some(&format!("user-{i}"))) == Some("v2")).count();
        assert!((800..1200).contains(&v2), "{v2}");
        assert_eq!(pick_weighted(&weights(&[("a", 0), ("b", 5)]), "", Some("x")), Some("b"));
        assert_eq!(pick_weighted(&weights(&[("a", 0)]), "", None), None);
    }

    #[test]
    fn metric_names_are_sanitised() {
        assert_eq!(metric_name("V2-beta.1"), "canary_router_selected_v2_beta_1");
    }

    proptest! {
        #[test]
        fn sticky_keys_always_get_the_same_target(key in ".{0,40}", salt in "[a-z]{0,8}", a in 0u32..100, b in 1u32..100) {
            let w = weights(&[("v1", a), ("v2", b)]);
            let first = pick_weighted(&w, &salt, Some(&key));
            prop_assert!(first.is_some());
            prop_assert_eq!(first, pick_weighted(&w, &salt, Some(&key)));
        }

        #[test]
        fn never_picks_a_zero_weight(key in ".{0,20}", b in 1u32..1000) {
            let w = weights(&[("never", 0), ("v2", b), ("z", 0)]);
            prop_assert_eq!(pick_weighted(&w, "", Some(&key)), Some("v2"));
            prop_assert_eq!(pick_weighted(&w, "", None), Some("v2"));
        }
    }
}
