//! Sluice's API-key and basic-auth filter: clients prove who they are with a key
//! (from a header or a query parameter) or HTTP basic credentials, checked against
//! keys in the config or in shared data (written by another component). Secrets
//! are kept and compared as SHA-256 digests, in constant time over every entry.
//! The client's name is forwarded upstream; missing or wrong credentials get a
//! 401, a key used outside its allowed paths a 403.
//!
//! It is not a key-management service (it only reads keys) and not a rate
//! limiter (chain `rate-limit` keyed on the client header). The configuration is
//! documented in this crate's README.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;

use std::cell::RefCell;
use std::rc::Rc;

use base64::Engine as _;
use sluice_filter_common::{ct_eq, matching, query, strip_prefix_ci};
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext, shared};

pub use config::Config;
use config::{KeyEntry, KeySource, Stored, digest, store_keys};

#[derive(Clone, Copy)]
struct Metrics {
    allowed: Counter,
    missing: Counter,
    invalid: Counter,
    forbidden: Counter,
}

/// Keys from shared data, and the raw value they were parsed from.
#[derive(Default)]
struct Dynamic {
    raw: Vec<u8>,
    keys: Rc<Vec<Stored>>,
}

/// The plugin.
#[derive(Default)]
pub struct ApiKeyRoot {
    config: Option<Rc<Config>>,
    keys: Rc<Vec<Stored>>,
    users: Rc<Vec<Stored>>,
    dynamic: Rc<RefCell<Dynamic>>,
    metrics: Option<Metrics>,
}

#[derive(serde::Deserialize)]
struct SharedKeys {
    keys: Vec<KeyEntry>,
}

impl ApiKeyRoot {
    fn reload_shared(&self) {
        let Some(key) = self.config.as_ref().and_then(|c| c.shared_data_key.clone()) else { return };
        let raw = match shared::get(&key) {
            Ok(Some((v, _))) => v,
            Ok(None) => Vec::new(),
            Err(e) => {
                sluice_sdk::warn!("api-key: cannot read shared data {key:?}: {e}");
                return;
            }
        };
        let mut dynamic = self.dynamic.borrow_mut();
        if raw == dynamic.raw {
            return;
        }
        let parsed = if raw.is_empty() {
            Ok(Vec::new())
        } else {
            serde_json::from_slice::<SharedKeys>(&raw)
                .map_err(|e| Error::msg(format!("not a key list: {e}")))
                .and_then(|s| store_keys(&s.keys, "keys"))
        };
        match parsed {
            Ok(keys) => {
                sluice_sdk::info!("api-key: {} keys from shared data {key:?}", keys.len());
                dynamic.keys = Rc::new(keys);
            }
            // Keep the previous keys: a bad write must not lock everyone out.
            Err(e) => sluice_sdk::warn!("api-key: ignoring shared data {key:?}: {e}"),
        }
        dynamic.raw = raw;
    }
}

impl RootContext for ApiKeyRoot {
    type Config = Config;
    type Http = ApiKey;

    fn on_configure(&mut self, root: &mut Root, config: Config) -> Result<(), Error> {
        let (keys, users) = config.prepare()?;
        self.metrics = Some(Metrics {
            allowed: Counter::new("api_key_allowed")?,
            missing: Counter::new("api_key_denied_missing")?,
            invalid: Counter::new("api_key_denied_invalid")?,
            forbidden: Counter::new("api_key_denied_forbidden")?,
        });
        sluice_sdk::info!("api-key configured: {} keys, {} basic users", keys.len(), users.len());
        self.keys = Rc::new(keys);
        self.users = Rc::new(users);
        let period = if config.shared_data_key.is_some() { config.refresh.get() } else { Default::default() };
        self.config = Some(Rc::new(config));
        *self.dynamic.borrow_mut() = Dynamic::default();
        self.reload_shared();
        root.set_tick_period(period)?;
        Ok(())
    }

    fn on_tick(&mut self, _root: &mut Root) -> Result<(), Error> {
        self.reload_shared();
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> ApiKey {
        ApiKey {
            config: self.config.clone(),
            keys: self.keys.clone(),
            users: self.users.clone(),
            dynamic: self.dynamic.borrow().keys.clone(),
            metrics: self.metrics,
        }
    }
}

/// One request.
pub struct ApiKey {
    config: Option<Rc<Config>>,
    keys: Rc<Vec<Stored>>,
    users: Rc<Vec<Stored>>,
    dynamic: Rc<Vec<Stored>>,
    metrics: Option<Metrics>,
}

/// Finds the entry whose digest equals `d`, looking at every entry (no early
/// exit, so timing does not tell which entry matched or how many exist before it).
fn find<'a>(entries: impl Iterator<Item = &'a Stored>, d: &[u8; 32]) -> Option<&'a Stored> {
    let mut found = None;
    for e in entries {
        if ct_eq(&e.digest, d) && found.is_none() {
            found = Some(e);
        }
    }
    found
}

/// Splits `authorization: Basic <b64(user:pass)>`.
pub fn parse_basic(value: &str) -> Option<(String, Vec<u8>)> {
    let encoded = strip_prefix_ci(value.trim(), "basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

enum Outcome {
    Allowed(String),
    Missing,
    Invalid(&'static str),
    Forbidden(String),
}

impl ApiKey {
    fn authenticate(&self, http: &Http, config: &Config, path: &str) -> Result<Outcome, Error> {
        let req = http.request();
        for source in &config.from {
            let presented = match source {
                KeySource::Header { header, prefix } => req
                    .header(header)?
                    .and_then(|v| strip_prefix_ci(v.trim(), prefix).map(|k| k.trim().to_string())),
                KeySource::Query { query: name } => query::param(path, name),
            };
            let Some(key) = presented.filter(|k| !k.is_empty()) else { continue };
            let d = digest(key.as_bytes());
            let Some(entry) = find(self.keys.iter().chain(self.dynamic.iter()), &d) else {
                return Ok(Outcome::Invalid("invalid api key"));
            };
            if !matching::any(&entry.paths, path) {
                return Ok(Outcome::Forbidden(entry.client.clone()));
            }
            if config.strip_credentials {
                match source {
                    KeySource::Header { header, .. } => req.remove_header(header)?,
                    KeySource::Query { query: name } => req.set_path(&query::remove(path, name))?,
                }
            }
            return Ok(Outcome::Allowed(entry.client.clone()));
        }
        if config.basic.is_some()
            && let Some(value) = req.header("authorization")?
            && strip_prefix_ci(value.trim(), "basic ").is_some()
        {
            let Some((user, password)) = parse_basic(&value) else {
                return Ok(Outcome::Invalid("malformed basic credentials"));
            };
            let d = digest(&password);
            let mut found = None;
            for u in self.users.iter() {
                let ok = ct_eq(u.client.as_bytes(), user.as_bytes()) & ct_eq(&u.digest, &d);
                if ok && found.is_none() {
                    found = Some(u.client.clone());
                }
            }
            let Some(user) = found else { return Ok(Outcome::Invalid("invalid user or password")) };
            if config.strip_credentials {
                req.remove_header("authorization")?;
            }
            return Ok(Outcome::Allowed(user));
        }
        Ok(Outcome::Missing)
    }

    fn challenges(config: &Config) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if !config.keys.is_empty() || config.shared_data_key.is_some() {
            h.push(("www-authenticate", format!("ApiKey realm=\"{}\"", config.realm)));
        }
        if config.basic.is_some() {
            h.push(("www-authenticate", format!("Basic realm=\"{}\", charset=\"UTF-8\"", config.realm)));
        }
        h
    }
}

impl HttpContext for ApiKey {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        http.request().remove_header(&config.client_header)?;
        let path = http.request().path()?.unwrap_or_default();
        if matching::any(&config.skip, &path) && !config.skip.is_empty() {
            return Ok(Action::Continue);
        }
        let (path_only, _) = query::split(&path);
        let outcome = self.authenticate(http, &config, &path)?;
        let m = self.metrics;
        match outcome {
            Outcome::Allowed(client) => {
                if let Some(m) = m {
                    m.allowed.inc()?;
                }
                http.request().set_header(&config.client_header, &client)?;
                Ok(Action::Continue)
            }
            Outcome::Missing => {
                if let Some(m) = m {
                    m.missing.inc()?;
                }
                sluice_sdk::info!("api-key: denied {path_only}: missing credentials");
                let challenges = Self::challenges(&config);
                let headers: Vec<(&str, &str)> = challenges.iter().map(|(k, v)| (*k, v.as_str())).collect();
                http.respond(401, &headers, "missing credentials\n")?;
                Ok(Action::Pause)
            }
            Outcome::Invalid(reason) => {
                if let Some(m) = m {
                    m.invalid.inc()?;
                }
                sluice_sdk::info!("api-key: denied {path_only}: {reason}");
                let challenges = Self::challenges(&config);
                let headers: Vec<(&str, &str)> = challenges.iter().map(|(k, v)| (*k, v.as_str())).collect();
                http.respond(401, &headers, format!("{reason}\n"))?;
                Ok(Action::Pause)
            }
            Outcome::Forbidden(client) => {
                if let Some(m) = m {
                    m.forbidden.inc()?;
                }
                sluice_sdk::info!("api-key: denied {path_only}: client {client} is not allowed on this path");
                http.respond(403, &[], "api key not allowed for this path\n")?;
                Ok(Action::Pause)
            }
        }
    }
}

sluice_sdk::filter!(ApiKeyRoot);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn basic_credentials_parse() {
        assert_eq!(parse_basic("Basic YWxpY2U6czNjcmV0"), Some(("alice".into(), b"s3cret".to_vec())));
        assert_eq!(parse_basic("basic YWxpY2U6czNj:cmV0"), None);
        assert_eq!(parse_basic("Basic YWxpY2U="), None, "no colon");
        assert_eq!(parse_basic("Basic Og=="), Some((String::new(), Vec::new())));
        assert_eq!(parse_basic("Bearer x"), None);
    }

    proptest! {
        #[test]
        fn parse_basic_never_panics(v in ".{0,80}") {
            let _ = parse_basic(&v);
        }

        #[test]
        fn parse_basic_round_trips(user in "[^:]{0,20}", pass in proptest::collection::vec(any::<u8>(), 0..30)) {
            let mut raw = user.clone().into_bytes();
            raw.push(b':');
            raw.extend_from_slice(&pass);
            let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(&raw));
            prop_assert_eq!(parse_basic(&v), Some((user, pass)));
        }
    }
}
