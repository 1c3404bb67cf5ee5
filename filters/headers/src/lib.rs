//! Sluice's headers filter: add, set, remove and rename request and response
//! headers, and CORS — answering preflights and adding the CORS response headers
//! for allowed origins (exact origins, `*.suffix` subdomain patterns, or `*`).
//!
//! It edits regular headers only (pseudo-headers are the router's and the
//! canary-router's business) and has no value templating. The configuration is
//! documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cors;

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, Error, Headers, Http, HttpContext, Root, RootContext};

use cors::Cors;

/// The plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Edits of the request sent upstream.
    #[serde(default)]
    pub request: Edits,
    /// Edits of the response sent downstream.
    #[serde(default)]
    pub response: Edits,
    /// The CORS policy.
    #[serde(default)]
    pub cors: Option<Cors>,
}

/// Header edits, applied in this order: remove, rename, set, add.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edits {
    /// Headers removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers renamed (`from: to`; every value moves, replacing `to`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Headers set (replacing any value).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Header values appended.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_value(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

impl Edits {
    fn validate(&self, at: &str) -> Result<(), Error> {
        let names = self
            .remove
            .iter()
            .chain(self.rename.keys())
            .chain(self.rename.values())
            .chain(self.set.keys())
            .chain(self.add.keys());
        for n in names {
            if !valid_name(n) {
                return Err(Error::msg(format!(
                    "{at}: {n:?} is not a header name (pseudo-headers cannot be edited)"
                )));
            }
        }
        for v in self.set.values().chain(self.add.values()) {
            if !valid_value(v) {
                return Err(Error::msg(format!("{at}: header values cannot hold control characters")));
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rename.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the edits to `headers`.
    fn apply(&self, headers: Headers) -> Result<(), Error> {
        for name in &self.remove {
            headers.remove(name)?;
        }
        for (from, to) in &self.rename {
            let values = headers.get_all(from)?;
            if values.is_empty() {
                continue;
            }
            headers.remove(from)?;
            headers.remove(to)?;
            for v in values {
                headers.add(to, &v)?;
            }
        }
        for (name, value) in &self.set {
            headers.set(name, value)?;
        }
        for (name, value) in &self.add {
            headers.add(name, value)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Metrics {
    preflights: Counter,
    rejected: Counter,
}

/// The plugin.
#[derive(Default)]
pub struct HeadersRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl RootContext for HeadersRoot {
    type Config = Config;
    type Http = HeaderEdit;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        config.request.validate("request")?;
        config.response.validate("response")?;
        if let Some(c) = &config.cors {
            c.validate().map_err(Error::msg)?;
        }
        self.metrics = Some(Metrics {
            preflights: Counter::new("cors_preflights")?,
            rejected: Counter::new("cors_rejected")?,
        });
        sluice_sdk::info!("headers configured (cors {})", if config.cors.is_some() { "on" } else { "off" });
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> HeaderEdit {
        HeaderEdit { config: self.config.clone(), metrics: self.metrics, cors_origin: None, preflight: false }
    }
}

/// One request.
pub struct HeaderEdit {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
    /// The `access-control-allow-origin` value for an allowed origin.
    cors_origin: Option<String>,
    preflight: bool,
}

impl HttpContext for HeaderEdit {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        if let Some(cors) = &config.cors {
            let req = http.request();
            if let Some(origin) = req.header("origin")? {
                let allowed = cors.allow_origin(&origin);
                let is_preflight = req.method()?.as_deref() == Some("OPTIONS")
                    && req.header("access-control-request-method")?.is_some();
                if is_preflight {
                    match &allowed {
                        Some(allow) => {
                            let requested = req.header("access-control-request-headers")?;
                            let headers = cors.preflight_headers(allow, requested.as_deref());
                            let refs: Vec<(&str, &str)> =
                                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                            if let Some(m) = self.metrics {
                                m.preflights.inc()?;
                            }
                            self.preflight = true;
                            http.respond(204, &refs, "")?;
                            return Ok(Action::Pause);
                        }
                        None if cors.reject_disallowed_preflight => {
                            if let Some(m) = self.metrics {
                                m.rejected.inc()?;
                            }
                            sluice_sdk::info!("headers: CORS preflight from a disallowed origin refused");
                            self.preflight = true;
                            http.respond(403, &[], "CORS origin not allowed\n")?;
                            return Ok(Action::Pause);
                        }
                        None => {}
                    }
                }
                self.cors_origin = allowed;
            }
        }
        if !config.request.is_empty() {
            config.request.apply(http.request().headers())?;
        }
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let resp = http.response();
        if !self.preflight
            && let (Some(cors), Some(origin)) = (&config.cors, &self.cors_origin)
        {
            for (k, v) in cors.response_headers(origin) {
                resp.set_header(&k, &v)?;
            }
            resp.add_header("vary", "origin")?;
        }
        if !config.response.is_empty() {
            config.response.apply(resp.headers())?;
        }
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(HeadersRoot);
