//! Sluice's external authorization filter: asks an HTTP authorization service
//! (a cluster, a path prefix, a timeout) about each request, sending selected
//! request headers. A 2xx answer lets the request through (optionally copying
//! headers from the answer into the upstream request); a 1xx, 3xx or 4xx answer
//! denies it (passing the service's status and body through, or a configured
//! reply); a 5xx answer, a timeout or a failure follows the failure policy (deny or
//! allow).
//!
//! It does not send request bodies and has no gRPC (`envoy.service.auth.v3`)
//! client. The configuration is documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::rc::Rc;
use std::time::SystemTime;

use serde::Deserialize;
use sluice_filter_common::{Dur, PathMatch, matching, query};
use sluice_sdk::metrics::{Counter, Histogram};
use sluice_sdk::{Action, CalloutResponse, Error, Http, HttpCall, HttpContext, Root, RootContext, Token};

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The authorization service's cluster.
    pub cluster: String,
    /// Prepended to the request's `:path` for the check (default empty).
    #[serde(default)]
    pub path_prefix: String,
    /// `:authority` of the check (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Method of the check (default: the request's own).
    #[serde(default)]
    pub method: Option<String>,
    /// Check timeout (default 500ms).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Request headers copied into the check (names; `x-user-*` matches a prefix).
    #[serde(default = "default_allowed_headers")]
    pub allowed_headers: Vec<String>,
    /// Headers of a 2xx answer copied into the upstream request.
    #[serde(default)]
    pub allowed_upstream_headers: Vec<String>,
    /// Headers of a denial copied to the client.
    #[serde(default = "default_client_headers")]
    pub allowed_client_headers: Vec<String>,
    /// How denials are answered.
    #[serde(default)]
    pub deny: Deny,
    /// What a timeout or failed check does.
    #[serde(default)]
    pub failure: Failure,
    /// Paths not checked.
    #[serde(default)]
    pub skip: Vec<PathMatch>,
}

fn default_timeout() -> Dur {
    Dur::from_millis(500)
}

fn default_allowed_headers() -> Vec<String> {
    vec!["authorization".into(), "cookie".into(), "x-request-id".into()]
}

fn default_client_headers() -> Vec<String> {
    vec!["www-authenticate".into(), "location".into(), "set-cookie".into()]
}

/// The reply to a denied request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deny {
    /// Use the service's status and body (default true).
    pub pass_through: bool,
    /// Status when not passing through (default 403).
    pub status: u16,
    /// Body when not passing through (default `forbidden\n`).
    pub body: String,
}

impl Default for Deny {
    fn default() -> Self {
        Deny { pass_through: true, status: 403, body: "forbidden\n".into() }
    }
}

/// The failure policy (5xx answer, timeout, reset, unknown cluster).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failure {
    /// Let the request through (default false: deny).
    pub allow: bool,
    /// Status of the denial (default 503).
    pub status: u16,
}

impl Default for Failure {
    fn default() -> Self {
        Failure { allow: false, status: 503 }
    }
}

/// True when `name` matches `pattern` (case-insensitive; a trailing `*` matches
/// any rest).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

fn any_match(patterns: &[String], name: &str) -> bool {
    !name.starts_with(':') && patterns.iter().any(|p| name_matches(p, name))
}

impl Config {
    fn validate(&self) -> Result<(), Error> {
        if self.cluster.is_empty() {
            return Err(Error::msg("cluster must not be empty"));
        }
        if !self.path_prefix.is_empty() && !self.path_prefix.starts_with('/') {
            return Err(Error::msg("path_prefix must start with /"));
        }
        if self.timeout.get().is_zero() {
            return Err(Error::msg("timeout must be positive"));
        }
        for (field, s) in [("deny.status", self.deny.status), ("failure.status", self.failure.status)] {
            if !(200..600).contains(&s) {
                return Err(Error::msg(format!("{field}: {s} is not an HTTP status")));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Metrics {
    allowed: Counter,
    denied: Counter,
    failed: Counter,
    failed_open: Counter,
    latency: Histogram,
}

/// The plugin.
#[derive(Default)]
pub struct ExtAuthzRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl RootContext for ExtAuthzRoot {
    type Config = Config;
    type Http = ExtAuthz;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        config.validate()?;
        self.metrics = Some(Metrics {
            allowed: Counter::new("ext_authz_allowed")?,
            denied: Counter::new("ext_authz_denied")?,
            failed: Counter::new("ext_authz_failed")?,
            failed_open: Counter::new("ext_authz_failed_open")?,
            latency: Histogram::new("ext_authz_latency_ms")?,
        });
        sluice_sdk::info!(
            "ext-authz configured: cluster {}, timeout {:?}",
            config.cluster,
            config.timeout.get()
        );
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> ExtAuthz {
        ExtAuthz { config: self.config.clone(), metrics: self.metrics, pending: None }
    }
}

/// One request.
pub struct ExtAuthz {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
    pending: Option<(Token, SystemTime)>,
}

impl ExtAuthz {
    fn check_call(&self, http: &Http, config: &Config) -> Result<HttpCall, Error> {
        let req = http.request();
        let headers = req.headers().all()?;
        let get =
            |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
        let path = get(":path");
        let method = config.method.clone().unwrap_or_else(|| get(":method"));
        let mut call =
            HttpCall::new(config.cluster.as_str(), &method, &format!("{}{}", config.path_prefix, path))
                .timeout(config.timeout.get())
                .header("x-forwarded-host", &get(":authority"))
                .header("x-forwarded-method", &get(":method"))
                .header("x-forwarded-uri", &path)
                .header("x-forwarded-proto", &get(":scheme"));
        if let Some(a) = &config.authority {
            call = call.authority(a);
        }
        if let Ok(Some(addr)) = sluice_sdk::properties::source_address() {
            let ip = addr.rsplit_once(':').map_or(addr.as_str(), |(ip, _)| ip);
            call = call.header("x-forwarded-for", ip.trim_start_matches('[').trim_end_matches(']'));
        }
        for (k, v) in &headers {
            if any_match(&config.allowed_headers, k) {
                call = call.header(k, v);
            }
        }
        Ok(call)
    }
}

impl HttpContext for ExtAuthz {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let path = http.request().path()?.unwrap_or_default();
        if !config.skip.is_empty() && matching::any(&config.skip, &path) {
            return Ok(Action::Continue);
        }
        let call = self.check_call(http, &config)?;
        // Headers the service vouches for are never taken from the client.
        if !config.allowed_upstream_headers.is_empty() {
            for (k, _) in http.request().headers().all()? {
                if any_match(&config.allowed_upstream_headers, &k) {
                    http.request().remove_header(&k)?;
                }
            }
        }
        match http.http_call(&call) {
            Ok(token) => {
                self.pending = Some((token, sluice_sdk::host::now()?));
                Ok(Action::Pause)
            }
            Err(e) => {
                sluice_sdk::warn!("ext-authz: cannot call {}: {e}", config.cluster);
                self.fail(http, &config)
            }
        }
    }

    fn on_http_call_response(
        &mut self,
        http: &mut Http,
        token: Token,
        response: CalloutResponse,
    ) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let Some((_, started)) = self.pending.take_if(|(t, _)| *t == token) else { return Ok(Action::Pause) };
        if let (Some(m), Ok(now)) = (self.metrics, sluice_sdk::host::now()) {
            let ms = now.duration_since(started).map_or(0, |d| d.as_millis() as u64);
            m.latency.record(ms)?;
        }
        let path = http.request().path()?.unwrap_or_default();
        let (path, _) = query::split(&path);
        match response.status() {
            Some(s) if (200..300).contains(&s) => {
                for (k, v) in &response.headers {
                    if any_match(&config.allowed_upstream_headers, k) {
                        http.request().set_header(k, v)?;
                    }
                }
                if let Some(m) = self.metrics {
                    m.allowed.inc()?;
                }
                Ok(Action::Continue)
            }
            // Hosts report a callout timeout or connect failure as their own 5xx
            // reply (Sluice: 504/503 with `x-sluice-callout-error`; Envoy: 504
            // `upstream request timeout`, 503 `no healthy upstream`), and a service
            // answering 5xx cannot decide either: all follow the failure policy, as
            // in Envoy's ext_authz.
            Some(s) if s >= 500 => {
                let why = response.header("x-sluice-callout-error").unwrap_or("service error");
                sluice_sdk::warn!("ext-authz: check of {path} failed: status {s} ({why})");
                self.fail(http, &config)
            }
            Some(s) => {
                if let Some(m) = self.metrics {
                    m.denied.inc()?;
                }
                sluice_sdk::info!("ext-authz: denied {path}: service answered {s}");
                let headers: Vec<(&str, &str)> = response
                    .headers
                    .iter()
                    .filter(|(k, _)| any_match(&config.allowed_client_headers, k))
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                // A 1xx or unparsable status cannot be passed through.
                if config.deny.pass_through && (200..600).contains(&s) {
                    http.respond(s, &headers, &response.body)?;
                } else {
                    http.respond(config.deny.status, &headers, &config.deny.body)?;
                }
                Ok(Action::Pause)
            }
            None => {
                let why = response.failure.as_ref().map_or("no response".into(), |f| f.message.clone());
                sluice_sdk::warn!("ext-authz: check of {path} failed: {why}");
                self.fail(http, &config)
            }
        }
    }
}

impl ExtAuthz {
    fn fail(&self, http: &mut Http, config: &Config) -> Result<Action, Error> {
        if let Some(m) = self.metrics {
            m.failed.inc()?;
            if config.failure.allow {
                m.failed_open.inc()?;
            }
        }
        if config.failure.allow {
            return Ok(Action::Continue);
        }
        http.respond(config.failure.status, &[], "authorization service unavailable\n")?;
        Ok(Action::Pause)
    }
}

sluice_sdk::filter!(ExtAuthzRoot);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_patterns() {
        assert!(name_matches("x-auth-*", "X-Auth-User"));
        assert!(name_matches("x-auth-*", "x-auth-"));
        assert!(!name_matches("x-auth-*", "x-aut"));
        assert!(name_matches("cookie", "Cookie"));
        assert!(!name_matches("cookie", "cookies"));
        assert!(name_matches("*", "anything"));
        assert!(!any_match(&["*".into()], ":path"));
        // Multi-byte names never split inside a character.
        assert!(!name_matches("é*", "e"));
        assert!(!name_matches("ab*", "aé"));
    }
}
