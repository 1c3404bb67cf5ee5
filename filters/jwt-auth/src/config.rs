//! The jwt-auth configuration (see the README for the YAML form).

use serde::Deserialize;
use sluice_filter_common::{Dur, PathMatch};
use sluice_sdk::Error;

use crate::jwks::{self, KeySet};

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Token issuers.
    pub providers: Vec<Provider>,
    /// Per-path rules, first match wins.
    #[serde(default)]
    pub rules: Vec<PathRule>,
    /// What to do on paths no rule matches (default `require`).
    #[serde(default)]
    pub default_action: RuleAction,
    /// Allowed clock skew for `exp` and `nbf` (default 60s).
    #[serde(default = "default_skew")]
    pub clock_skew: Dur,
    /// The realm in `WWW-Authenticate` (default `sluice`).
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Longest token accepted, in bytes (default 8192).
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
}

fn default_skew() -> Dur {
    Dur::from_secs(60)
}

fn default_realm() -> String {
    "sluice".into()
}

fn default_max_token() -> usize {
    8192
}

/// One issuer and where its tokens and keys come from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Name, for rules, logs and metrics.
    pub name: String,
    /// The required `iss`.
    pub issuer: String,
    /// Accepted audiences (any); empty = `aud` not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// An inline JWKS: a JSON object, or a string holding one.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// A JWKS fetched from a cluster.
    #[serde(default)]
    pub remote_jwks: Option<RemoteJwks>,
    /// Headers carrying the token (default `authorization` with prefix `Bearer `).
    #[serde(default = "default_from_headers")]
    pub from_headers: Vec<FromHeader>,
    /// Query parameters carrying the token.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies carrying the token.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Keep the token in the request sent upstream (default false: the header or
    /// query parameter it came in is removed; cookies are left alone).
    #[serde(default)]
    pub forward: bool,
    /// Claims copied into request headers.
    #[serde(default)]
    pub claims_to_headers: Vec<ClaimToHeader>,
    /// A header to receive the token's payload segment (base64url JSON).
    #[serde(default)]
    pub payload_header: Option<String>,
}

fn default_from_headers() -> Vec<FromHeader> {
    vec![FromHeader { name: "authorization".into(), prefix: "Bearer ".into() }]
}

/// A header holding a token after a prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token (matched case-insensitively), e.g. `Bearer `.
    #[serde(default)]
    pub prefix: String,
}

/// Where a remote JWKS lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwks {
    /// The cluster serving it.
    pub cluster: String,
    /// Its path.
    pub path: String,
    /// `:authority` of the fetch (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fetch timeout (default 2s).
    #[serde(default = "default_fetch_timeout")]
    pub timeout: Dur,
    /// Refetch period (default 10m).
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
    /// Wait after a failed fetch (default 5s).
    #[serde(default = "default_retry")]
    pub retry: Dur,
}

fn default_fetch_timeout() -> Dur {
    Dur::from_secs(2)
}

fn default_refresh() -> Dur {
    Dur::from_secs(600)
}

fn default_retry() -> Dur {
    Dur::from_secs(5)
}

impl RemoteJwks {
    /// The shared-data key caching this JWKS for every VM.
    pub fn shared_key(&self) -> String {
        format!("sluice.jwt-auth.jwks:{}{}", self.cluster, self.path)
    }
}

/// A claim copied into a header.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Claim name; dots descend into objects (`org.id`).
    pub claim: String,
    /// Header name.
    pub header: String,
}

/// A per-path rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRule {
    /// Which paths.
    #[serde(rename = "match")]
    pub matches: PathMatch,
    /// What to do.
    pub action: RuleAction,
    /// Only these providers' tokens count (default: all).
    #[serde(default)]
    pub providers: Vec<String>,
}

/// What a rule requires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// A valid token is required.
    #[default]
    Require,
    /// A token is verified when present; requests without one pass.
    AllowMissing,
    /// No check at all.
    Skip,
}

impl Config {
    /// Checks the config and parses the inline key sets (one per provider, `None`
    /// for remote ones).
    pub fn validate(&self) -> Result<Vec<Option<KeySet>>, Error> {
        if self.providers.is_empty() {
            return Err(Error::msg("providers: at least one provider is required"));
        }
        let mut inline = Vec::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = format!("providers[{i}] ({})", p.name);
            if self.providers.iter().filter(|q| q.name == p.name).count() > 1 {
                return Err(Error::msg(format!("{at}: duplicate provider name")));
            }
            if p.from_headers.is_empty() && p.from_params.is_empty() && p.from_cookies.is_empty() {
                return Err(Error::msg(format!(
                    "{at}: no token location (from_headers, from_params, from_cookies)"
                )));
            }
            match (&p.jwks, &p.remote_jwks) {
                (Some(doc), None) => {
                    let bytes = match doc {
                        serde_json::Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    let set = jwks::parse(&bytes).map_err(|e| Error::msg(format!("{at}.jwks: {e}")))?;
                    inline.push(Some(set));
                }
                (None, Some(remote)) => {
                    if !remote.path.starts_with('/') {
                        return Err(Error::msg(format!("{at}.remote_jwks.path: must start with /")));
                    }
                    if remote.refresh.get().is_zero() || remote.timeout.get().is_zero() {
                        return Err(Error::msg(format!(
                            "{at}.remote_jwks: refresh and timeout must be positive"
                        )));
                    }
                    inline.push(None);
                }
                _ => return Err(Error::msg(format!("{at}: set exactly one of jwks and remote_jwks"))),
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            for name in &rule.providers {
                if !self.providers.iter().any(|p| &p.name == name) {
                    return Err(Error::msg(format!("rules[{i}].providers: unknown provider {name:?}")));
                }
            }
        }
        if self.realm.contains(['"', '\\']) || self.realm.chars().any(char::is_control) {
            return Err(Error::msg("realm: quotes, backslashes and control characters are not allowed"));
        }
        Ok(inline)
    }

    /// The rule for `path`: its action and allowed providers (indexes).
    pub fn rule_for(&self, path: &str) -> (RuleAction, Vec<usize>) {
        let all = || (0..self.providers.len()).collect::<Vec<_>>();
        for rule in &self.rules {
            if rule.matches.matches(path) {
                let allowed = if rule.providers.is_empty() {
                    all()
                } else {
                    (0..self.providers.len())
                        .filter(|&i| rule.providers.contains(&self.providers[i].name))
                        .collect()
                };
                return (rule.action, allowed);
            }
        }
        (self.default_action, all())
    }
}
