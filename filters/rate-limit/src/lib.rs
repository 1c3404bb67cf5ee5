//! Sluice's rate-limit filter: token buckets per key (a request header such as a
//! JWT claim header, the client IP from `source.address`, the route, or one global
//! bucket), shared by every VM of the proxy through shared data with
//! compare-and-swap. Over the limit, requests get a 429 with `Retry-After`; every
//! response carries `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset`.
//!
//! It is local to one proxy process (no global rate-limit service) and does not
//! expire idle buckets (see the README on key cardinality). The configuration is
//! documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bucket;

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use sluice_filter_common::{Dur, PathMatch, fnv1a64, hex, matching, query};
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext, shared};

use bucket::{Bucket, Limit};

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Limits; every rule that applies must allow the request.
    pub rules: Vec<Rule>,
    /// Status of the refusal (default 429).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Body of the refusal (default `rate limited\n`).
    #[serde(default = "default_body")]
    pub body: String,
    /// Add the `x-ratelimit-*` headers to allowed responses too (default true).
    #[serde(default = "yes")]
    pub response_headers: bool,
}

fn default_status() -> u16 {
    429
}

fn default_body() -> String {
    "rate limited\n".into()
}

fn yes() -> bool {
    true
}

/// What identifies a bucket.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Key {
    /// A request header's value (e.g. `x-api-client`, `x-jwt-sub`).
    Header(String),
    /// The client IP (`source.address` without the port).
    SourceIp,
    /// The route name (`xds.route_name`).
    Route,
    /// One bucket for every request the rule applies to.
    Global,
}

/// What to do when the key is absent.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// The rule does not apply (default).
    #[default]
    Skip,
    /// All such requests share one bucket.
    Shared,
}

/// One limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name: part of the shared-data key, logs and metrics.
    pub name: String,
    /// The bucket key.
    pub key: Key,
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The window of `requests` (the refill rate is `requests / per`).
    pub per: Dur,
    /// Bucket size (default `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Only these paths (default all).
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Only these routes (default all).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these methods (default all).
    #[serde(default)]
    pub methods: Vec<String>,
    /// When the key is absent.
    #[serde(default)]
    pub missing_key: MissingKey,
}

impl Rule {
    /// The bucket parameters.
    pub fn limit(&self) -> Limit {
        Limit {
            capacity: f64::from(self.burst.unwrap_or(self.requests)),
            rate_per_sec: f64::from(self.requests) / self.per.get().as_secs_f64(),
        }
    }
}

impl Config {
    fn validate(&self) -> Result<(), Error> {
        if self.rules.is_empty() {
            return Err(Error::msg("rules: at least one rule is required"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}] ({})", r.name);
            if r.name.is_empty() || self.rules.iter().filter(|x| x.name == r.name).count() > 1 {
                return Err(Error::msg(format!("{at}: names must be non-empty and unique")));
            }
            if r.requests == 0 || r.burst == Some(0) {
                return Err(Error::msg(format!("{at}: requests and burst must be positive")));
            }
            if r.per.get().is_zero() {
                return Err(Error::msg(format!("{at}: per must be positive")));
            }
        }
        if !(400..600).contains(&self.status) {
            return Err(Error::msg(format!("status: {} is not an error status", self.status)));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Metrics {
    allowed: Counter,
    limited: Counter,
    conflicts: Counter,
}

/// The plugin.
#[derive(Default)]
pub struct RateLimitRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
    plugin: Rc<str>,
}

impl RootContext for RateLimitRoot {
    type Config = Config;
    type Http = RateLimit;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        config.validate()?;
        self.metrics = Some(Metrics {
            allowed: Counter::new("rate_limit_allowed")?,
            limited: Counter::new("rate_limit_limited")?,
            conflicts: Counter::new("rate_limit_cas_gave_up")?,
        });
        self.plugin = sluice_sdk::properties::plugin_name()?.unwrap_or_default().into();
        sluice_sdk::info!("rate-limit configured: {} rules", config.rules.len());
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> RateLimit {
        RateLimit {
            config: self.config.clone(),
            metrics: self.metrics,
            plugin: self.plugin.clone(),
            headers: None,
        }
    }
}

/// The `x-ratelimit-*` values of the tightest rule.
#[derive(Debug, Clone, Copy)]
struct Report {
    limit: u32,
    remaining: u64,
    reset: u64,
}

/// One request.
pub struct RateLimit {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
    plugin: Rc<str>,
    headers: Option<Report>,
}

/// How often a bucket update is retried after a CAS conflict before the request is
/// let through.
const CAS_RETRIES: usize = 16;

fn ip_of(address: &str) -> &str {
    // `ip:port`, `[v6]:port`, or a bare address.
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match address.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => address,
    }
}

impl RateLimit {
    fn key(&self, http: &Http, rule: &Rule) -> Result<Option<String>, Error> {
        Ok(match &rule.key {
            Key::Header(h) => http.request().header(h)?,
            Key::SourceIp => sluice_sdk::properties::source_address()?.map(|a| ip_of(&a).to_string()),
            Key::Route => sluice_sdk::properties::route_name()?,
            Key::Global => Some(String::new()),
        })
    }

    /// Takes a token from the shared bucket; `None` when the CAS kept failing.
    fn take(&self, shared_key: &str, limit: Limit, now: u64) -> Result<Option<bucket::Take>, Error> {
        for _ in 0..CAS_RETRIES {
            let (state, cas) = match shared::get(shared_key)? {
                Some((bytes, cas)) => (Bucket::decode(&bytes), Some(cas)),
                None => (None, None),
            };
            let take = limit.take(state, now);
            if !take.allowed {
                return Ok(Some(take));
            }
            match shared::set(shared_key, &take.bucket.encode(), cas) {
                Ok(()) => return Ok(Some(take)),
                // Another VM updated the bucket since we read it: read again.
                Err(e) if e.status().name() == "CAS_MISMATCH" => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }
}

impl HttpContext for RateLimit {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let path = http.request().path()?.unwrap_or_default();
        let method = http.request().method()?.unwrap_or_default();
        let route = if config.rules.iter().any(|r| !r.routes.is_empty()) {
            sluice_sdk::properties::route_name()?
        } else {
            None
        };
        let now = sluice_sdk::host::now()?.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut tightest: Option<Report> = None;
        let mut refused: Option<(&Rule, u64)> = None;
        for rule in &config.rules {
            if !matching::any(&rule.paths, &path)
                || !(rule.routes.is_empty() || route.as_ref().is_some_and(|r| rule.routes.contains(r)))
                || !(rule.methods.is_empty() || rule.methods.iter().any(|m| m.eq_ignore_ascii_case(&method)))
            {
                continue;
            }
            let key = match self.key(http, rule)? {
                Some(k) => k,
                None if rule.missing_key == MissingKey::Shared => "-".to_string(),
                None => continue,
            };
            // Keys are hashed: fixed-size shared-data keys whatever the client sends.
            let shared_key = format!(
                "sluice.ratelimit:{}:{}:{}",
                self.plugin,
                rule.name,
                hex(&fnv1a64(&[key.as_bytes()]).to_be_bytes())
            );
            let Some(take) = self.take(&shared_key, rule.limit(), now)? else {
                if let Some(m) = self.metrics {
                    m.conflicts.inc()?;
                }
                sluice_sdk::warn!(
                    "rate-limit: rule {} gave up after {CAS_RETRIES} CAS conflicts; allowing",
                    rule.name
                );
                continue;
            };
            let report = Report { limit: rule.requests, remaining: take.remaining, reset: take.reset_secs };
            if tightest.is_none_or(|t| report.remaining < t.remaining) {
                tightest = Some(report);
            }
            if !take.allowed {
                refused = Some((rule, take.retry_after_secs));
                break;
            }
        }
        if let Some((rule, retry_after)) = refused {
            if let Some(m) = self.metrics {
                m.limited.inc()?;
            }
            let (p, _) = query::split(&path);
            sluice_sdk::info!("rate-limit: {p} limited by rule {}", rule.name);
            let r = tightest.unwrap_or(Report { limit: rule.requests, remaining: 0, reset: retry_after });
            let (limit, remaining, reset, retry) =
                (r.limit.to_string(), r.remaining.to_string(), r.reset.to_string(), retry_after.to_string());
            http.respond(
                config.status,
                &[
                    ("retry-after", &retry),
                    ("x-ratelimit-limit", &limit),
                    ("x-ratelimit-remaining", &remaining),
                    ("x-ratelimit-reset", &reset),
                ],
                &config.body,
            )?;
            return Ok(Action::Pause);
        }
        if let Some(m) = self.metrics {
            m.allowed.inc()?;
        }
        if config.response_headers {
            self.headers = tightest;
        }
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        if let Some(r) = self.headers.take() {
            let resp = http.response();
            resp.set_header("x-ratelimit-limit", &r.limit.to_string())?;
            resp.set_header("x-ratelimit-remaining", &r.remaining.to_string())?;
            resp.set_header("x-ratelimit-reset", &r.reset.to_string())?;
        }
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(RateLimitRoot);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ips_lose_their_ports() {
        assert_eq!(ip_of("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(ip_of("[::1]:80"), "::1");
        assert_eq!(ip_of("::1"), "::1");
        assert_eq!(ip_of("10.0.0.1"), "10.0.0.1");
        assert_eq!(ip_of("[::1"), "::1");
    }

    proptest! {
        #[test]
        fn ip_of_never_panics(s in ".{0,40}") {
            let _ = ip_of(&s);
        }
    }
}
