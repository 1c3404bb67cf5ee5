//! An example Sluice filter: token authentication with an optional callout.
//!
//! Requests must carry `authorization: Bearer <token>`. Known tokens (from the
//! config) pass at once; unknown ones are checked with an HTTP callout to the
//! `authz_cluster` (200 = allowed, the callout's `x-user` header is forwarded
//! upstream), and without one they get a 403. Missing credentials get a 401.
//!
//! Build: `cargo build -p sluice-sdk --example header_auth --target wasm32-wasip1 --release`
//!
//! Config:
//! ```json
//! {"tokens": {"t0ken": "alice"}, "authz_cluster": "authz", "timeout_ms": 500}
//! ```

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, CalloutResponse, Error, Http, HttpCall, HttpContext, Root, RootContext, Token};

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Static tokens and the user each one stands for.
    #[serde(default)]
    pub tokens: BTreeMap<String, String>,
    /// Cluster asked about unknown tokens (`GET /check`, token in `authorization`).
    #[serde(default)]
    pub authz_cluster: Option<String>,
    /// Callout timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    1000
}

#[derive(Clone, Copy)]
struct Metrics {
    allowed: Counter,
    denied: Counter,
}

/// The plugin.
#[derive(Default)]
pub struct AuthRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl RootContext for AuthRoot {
    type Config = Config;
    type Http = Auth;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        if config.timeout_ms == 0 {
            return Err(Error::msg("timeout_ms must be positive"));
        }
        self.metrics =
            Some(Metrics { allowed: Counter::new("auth_allowed")?, denied: Counter::new("auth_denied")? });
        sluice_sdk::info!("header_auth configured with {} static tokens", config.tokens.len());
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> Auth {
        Auth { config: self.config.clone(), metrics: self.metrics, pending: None }
    }
}

/// One request.
pub struct Auth {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
    pending: Option<Token>,
}

impl Auth {
    fn deny(&mut self, http: &mut Http, status: u16, reason: &str) -> Result<Action, Error> {
        if let Some(m) = self.metrics {
            m.denied.inc()?;
        }
        http.respond(status, &[("www-authenticate", "Bearer")], format!("{reason}\n"))?;
        Ok(Action::Pause)
    }

    fn allow(&mut self, http: &mut Http, user: &str) -> Result<(), Error> {
        if let Some(m) = self.metrics {
            m.allowed.inc()?;
        }
        http.request().set_header("x-auth-user", user)?;
        http.request().remove_header("authorization")?;
        Ok(())
    }
}

impl HttpContext for Auth {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else {
            return Err(Error::msg("not configured"));
        };
        let token = http
            .request()
            .header("authorization")?
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
        let Some(token) = token else {
            return self.deny(http, 401, "missing bearer token");
        };
        if let Some(user) = config.tokens.get(&token) {
            self.allow(http, user)?;
            return Ok(Action::Continue);
        }
        let Some(cluster) = &config.authz_cluster else {
            return self.deny(http, 403, "unknown token");
        };
        let call = HttpCall::get(cluster.as_str(), "/check")
            .header("authorization", &format!("Bearer {token}"))
            .timeout(Duration::from_millis(config.timeout_ms));
        self.pending = Some(http.http_call(&call)?);
        Ok(Action::Pause)
    }

    fn on_http_call_response(
        &mut self,
        http: &mut Http,
        token: Token,
        response: CalloutResponse,
    ) -> Result<Action, Error> {
        if self.pending != Some(token) {
            return Ok(Action::Pause);
        }
        self.pending = None;
        match response.status() {
            Some(200) => {
                let user = response.header("x-user").unwrap_or("unknown").to_owned();
                self.allow(http, &user)?;
                Ok(Action::Continue)
            }
            Some(_) => self.deny(http, 403, "token rejected"),
            None => {
                sluice_sdk::warn!("authz callout failed: {:?}", response.failure);
                self.deny(http, 503, "authorization service unavailable")
            }
        }
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        http.response().set_header("x-auth", "checked")?;
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(AuthRoot);
