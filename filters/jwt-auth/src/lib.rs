//! Sluice's JWT authentication filter: verifies bearer tokens (HS256, RS256,
//! ES256) against inline JWKS or JWKS fetched from a cluster (cached in shared data
//! for every VM and refreshed on a timer), checks issuer, audience, `exp`/`nbf`
//! with clock skew, applies per-path rules (require / allow-missing / skip),
//! forwards claims as headers and answers 401 with an RFC 6750
//! `WWW-Authenticate: Bearer` challenge. Reasons go to logs and metrics; tokens and
//! keys never appear in responses or logs.
//!
//! It authenticates; it does not authorize beyond issuer and audience (pair it with
//! `ext-authz` or route rules on the forwarded claim headers). The configuration
//! is documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod jwks;
pub mod jwt;
mod keys;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_filter_common::{cookie, query, strip_prefix_ci};
use sluice_sdk::{Action, CalloutResponse, Error, Http, HttpContext, Root, RootContext, Token};

pub use config::Config;
use config::{Provider, RuleAction};
use jwt::{ClaimRules, JwtError};
use keys::{KeyStore, Metrics};

/// The plugin: configuration, the key store (shared with requests of this VM).
#[derive(Default)]
pub struct JwtAuthRoot {
    config: Option<Rc<Config>>,
    keys: Rc<RefCell<KeyStore>>,
    metrics: Option<Rc<Metrics>>,
}

impl RootContext for JwtAuthRoot {
    type Config = Config;
    type Http = JwtAuth;

    fn on_configure(&mut self, root: &mut Root, config: Config) -> Result<(), Error> {
        let inline = config.validate()?;
        let metrics = Rc::new(Metrics::define()?);
        let remote = config.providers.iter().any(|p| p.remote_jwks.is_some());
        *self.keys.borrow_mut() = KeyStore::new(inline);
        root.set_tick_period(if remote { Duration::from_secs(1) } else { Duration::ZERO })?;
        sluice_sdk::info!(
            "jwt-auth configured: {} providers ({} with remote JWKS), {} path rules",
            config.providers.len(),
            config.providers.iter().filter(|p| p.remote_jwks.is_some()).count(),
            config.rules.len()
        );
        let config = Rc::new(config);
        self.config = Some(config.clone());
        self.metrics = Some(metrics.clone());
        if remote {
            // First fetch now rather than at the first tick; failures are retried.
            self.keys.borrow_mut().refresh(root, &config, &metrics, sluice_sdk::host::now()?);
        }
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> JwtAuth {
        JwtAuth {
            config: self.config.clone(),
            keys: self.keys.clone(),
            metrics: self.metrics.clone(),
            pending: None,
        }
    }

    fn on_tick(&mut self, root: &mut Root) -> Result<(), Error> {
        if let (Some(config), Some(metrics)) = (&self.config, &self.metrics) {
            self.keys.borrow_mut().refresh(root, config, metrics, sluice_sdk::host::now()?);
        }
        Ok(())
    }

    fn on_http_call_response(
        &mut self,
        _root: &mut Root,
        token: Token,
        response: CalloutResponse,
    ) -> Result<(), Error> {
        if let (Some(config), Some(metrics)) = (&self.config, &self.metrics) {
            let now = sluice_sdk::host::now()?;
            self.keys.borrow_mut().on_fetched(config, metrics, token, &response, now);
        }
        Ok(())
    }
}

/// A token waiting for its provider's keys.
struct Pending {
    call: Token,
    provider: usize,
    token: String,
}

/// One request.
pub struct JwtAuth {
    config: Option<Rc<Config>>,
    keys: Rc<RefCell<KeyStore>>,
    metrics: Option<Rc<Metrics>>,
    pending: Option<Pending>,
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Header(String),
    Param(String),
    Cookie,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn find_token(http: &Http, p: &Provider, path: &str) -> Result<Option<(String, Source)>, Error> {
    let req = http.request();
    for h in &p.from_headers {
        if let Some(v) = req.header(&h.name)?
            && let Some(t) = strip_prefix_ci(v.trim(), &h.prefix)
        {
            let t = t.trim();
            if !t.is_empty() {
                return Ok(Some((t.to_string(), Source::Header(h.name.clone()))));
            }
        }
    }
    for name in &p.from_params {
        if let Some(t) = query::param(path, name).filter(|t| !t.is_empty()) {
            return Ok(Some((t, Source::Param(name.clone()))));
        }
    }
    if !p.from_cookies.is_empty() {
        let cookies = req.headers().get_all("cookie")?;
        for name in &p.from_cookies {
            if let Some(t) = cookie::get(cookies.iter().map(String::as_str), name).filter(|t| !t.is_empty()) {
                return Ok(Some((t.to_string(), Source::Cookie)));
            }
        }
    }
    Ok(None)
}

impl JwtAuth {
    fn deny(&self, http: &mut Http, error: JwtError, provider: Option<&str>) -> Result<Action, Error> {
        let Some(config) = &self.config else { return Ok(Action::Continue) };
        if let Some(m) = &self.metrics {
            m.denied(error)?;
        }
        let path = http.request().path()?.unwrap_or_default();
        let (path, _) = query::split(&path);
        sluice_sdk::info!("jwt-auth: denied {path}: {} (provider {})", error.code(), provider.unwrap_or("-"));
        let challenge = match error {
            JwtError::Missing => format!("Bearer realm=\"{}\"", config.realm),
            other => format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                config.realm,
                other.description()
            ),
        };
        http.respond(401, &[("www-authenticate", &challenge)], format!("{}\n", error.description()))?;
        Ok(Action::Pause)
    }

    /// Verifies `token` for provider `index` with its loaded keys; on success edits
    /// the upstream request.
    fn check(&self, http: &mut Http, config: &Config, index: usize, token: &str) -> Result<Action, Error> {
        let provider = &config.providers[index];
        let result = {
            let store = self.keys.borrow();
            match store.keys(index) {
                None => Err(JwtError::KeysUnavailable),
                Some(keys) => jwt::decode(token, config.max_token_bytes).and_then(|jwt| {
                    jwt::verify_signature(&jwt, &keys)?;
                    let now = secs(sluice_sdk::host::now().unwrap_or(UNIX_EPOCH));
                    let rules = ClaimRules {
                        issuer: Some(&provider.issuer),
                        audiences: &provider.audiences,
                        now,
                        skew: config.clock_skew.get().as_secs(),
                    };
                    jwt::validate_claims(&jwt.claims, &rules)?;
                    Ok((jwt.claims.clone(), jwt.payload_b64.to_string()))
                }),
            }
        };
        match result {
            Ok((claims, payload)) => {
                let req = http.request();
                for c in &provider.claims_to_headers {
                    if let Some(v) = jwt::claim_header_value(&claims, &c.claim) {
                        req.set_header(&c.header, &v)?;
                    }
                }
                if let Some(h) = &provider.payload_header {
                    req.set_header(h, &payload)?;
                }
                if !provider.forward {
                    let path = req.path()?.unwrap_or_default();
                    match find_token(http, provider, &path)? {
                        Some((_, Source::Header(name))) => http.request().remove_header(&name)?,
                        Some((_, Source::Param(name))) => {
                            http.request().set_path(&query::remove(&path, &name))?
                        }
                        Some((_, Source::Cookie)) | None => {}
                    }
                }
                if let Some(m) = &self.metrics {
                    m.allowed.inc()?;
                }
                Ok(Action::Continue)
            }
            Err(e) => {
                if e == JwtError::UnknownKey {
                    self.keys.borrow_mut().want_refresh(index);
                }
                self.deny(http, e, Some(&provider.name))
            }
        }
    }
}

impl HttpContext for JwtAuth {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        // Headers this filter writes are never taken from the client.
        for p in &config.providers {
            for c in &p.claims_to_headers {
                http.request().remove_header(&c.header)?;
            }
            if let Some(h) = &p.payload_header {
                http.request().remove_header(h)?;
            }
        }
        let path = http.request().path()?.unwrap_or_default();
        let (action, allowed) = config.rule_for(&path);
        if action == RuleAction::Skip {
            return Ok(Action::Continue);
        }
        let mut candidates = Vec::new();
        for &i in &allowed {
            if let Some((token, _)) = find_token(http, &config.providers[i], &path)? {
                candidates.push((i, token));
            }
        }
        let Some((_, token)) = candidates.first().cloned() else {
            if action == RuleAction::AllowMissing {
                if let Some(m) = &self.metrics {
                    m.missing_allowed.inc()?;
                }
                return Ok(Action::Continue);
            }
            return self.deny(http, JwtError::Missing, None);
        };
        // The token's issuer picks the provider among those whose locations hold it.
        let issuer = match jwt::decode(&token, config.max_token_bytes) {
            Ok(jwt) => jwt.issuer().map(str::to_owned),
            Err(e) => return self.deny(http, e, None),
        };
        let provider = candidates
            .iter()
            .find(|(i, t)| *t == token && issuer.as_deref() == Some(config.providers[*i].issuer.as_str()))
            .map(|(i, _)| *i);
        let Some(index) = provider else {
            return self.deny(http, JwtError::BadIssuer, None);
        };
        if self.keys.borrow().keys(index).is_none() {
            let Some(remote) = &config.providers[index].remote_jwks else {
                return self.deny(http, JwtError::KeysUnavailable, Some(&config.providers[index].name));
            };
            // Keys not fetched yet (cold start): fetch them for this request.
            let call = http.http_call(&keys::fetch_call(remote))?;
            self.pending = Some(Pending { call, provider: index, token });
            return Ok(Action::Pause);
        }
        self.check(http, &config, index, &token)
    }

    fn on_http_call_response(
        &mut self,
        http: &mut Http,
        call: Token,
        response: CalloutResponse,
    ) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        let Some(pending) = self.pending.take_if(|p| p.call == call) else { return Ok(Action::Pause) };
        if let Some(metrics) = &self.metrics {
            let now = sluice_sdk::host::now()?;
            self.keys.borrow_mut().store_response(&config, metrics, pending.provider, &response, now);
        }
        self.check(http, &config, pending.provider, &pending.token)
    }
}

sluice_sdk::filter!(JwtAuthRoot);
