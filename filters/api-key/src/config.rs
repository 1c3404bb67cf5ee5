//! The api-key configuration (see the README for the YAML form).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_filter_common::{Dur, PathMatch, unhex};
use sluice_sdk::Error;

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Inline API keys.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// A shared-data key holding more keys as JSON `{"keys": [...]}` (same entry
    /// form), written by another component and re-read every `refresh`.
    #[serde(default)]
    pub shared_data_key: Option<String>,
    /// How often `shared_data_key` is re-read (default 10s).
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
    /// Where the API key is read, in order (default: header `x-api-key`).
    #[serde(default = "default_from")]
    pub from: Vec<KeySource>,
    /// HTTP basic authentication users.
    #[serde(default)]
    pub basic: Option<Basic>,
    /// Realm of the challenges (default `sluice`).
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Header set upstream to the client's name (default `x-api-client`; removed
    /// from incoming requests).
    #[serde(default = "default_client_header")]
    pub client_header: String,
    /// Remove the credential (header or query parameter) upstream (default true).
    #[serde(default = "yes")]
    pub strip_credentials: bool,
    /// Paths that need no credentials.
    #[serde(default)]
    pub skip: Vec<PathMatch>,
}

fn default_refresh() -> Dur {
    Dur::from_secs(10)
}

fn default_from() -> Vec<KeySource> {
    vec![KeySource::Header { header: "x-api-key".into(), prefix: String::new() }]
}

fn default_realm() -> String {
    "sluice".into()
}

fn default_client_header() -> String {
    "x-api-client".into()
}

fn yes() -> bool {
    true
}

/// One API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The client's name (forwarded in `client_header`, used in logs).
    pub client: String,
    /// The key in clear.
    #[serde(default)]
    pub key: Option<String>,
    /// Or its SHA-256, hex.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Paths this key may use (default: all).
    #[serde(default)]
    pub paths: Vec<PathMatch>,
}

/// Where an API key is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum KeySource {
    /// A header, after an optional prefix (case-insensitive).
    Header {
        /// Header name.
        header: String,
        /// Prefix before the key, e.g. `ApiKey `.
        #[serde(default)]
        prefix: String,
    },
    /// A query parameter.
    Query {
        /// Parameter name.
        query: String,
    },
}

/// HTTP basic authentication (RFC 7617).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Basic {
    /// The users.
    pub users: Vec<BasicUser>,
}

/// One basic-auth user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicUser {
    /// User name (forwarded as the client name).
    pub user: String,
    /// Password in clear.
    #[serde(default)]
    pub password: Option<String>,
    /// Or its SHA-256, hex.
    #[serde(default)]
    pub password_sha256: Option<String>,
}

/// A key ready for comparison: the SHA-256 of the key.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Client name.
    pub client: String,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
    /// Allowed paths (empty = all).
    pub paths: Vec<PathMatch>,
}

/// SHA-256 of a secret.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn stored(
    client: &str,
    clear: Option<&String>,
    hashed: Option<&String>,
    at: &str,
) -> Result<[u8; 32], Error> {
    match (clear, hashed) {
        (Some(k), None) if !k.is_empty() => Ok(digest(k.as_bytes())),
        (None, Some(h)) => unhex(h.trim())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| Error::msg(format!("{at} ({client}): sha256 must be 64 hex digits"))),
        _ => Err(Error::msg(format!("{at} ({client}): set exactly one non-empty secret (clear or sha256)"))),
    }
}

/// Turns key entries into stored digests.
pub fn store_keys(entries: &[KeyEntry], at: &str) -> Result<Vec<Stored>, Error> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let d = stored(&e.client, e.key.as_ref(), e.key_sha256.as_ref(), &format!("{at}[{i}]"))?;
            Ok(Stored { client: e.client.clone(), digest: d, paths: e.paths.clone() })
        })
        .collect()
}

impl Config {
    /// Validates and returns the inline keys and basic users as stored digests.
    pub fn prepare(&self) -> Result<(Vec<Stored>, Vec<Stored>), Error> {
        let keys = store_keys(&self.keys, "keys")?;
        let mut users = Vec::new();
        if let Some(basic) = &self.basic {
            for (i, u) in basic.users.iter().enumerate() {
                if u.user.contains(':') {
                    return Err(Error::msg(format!("basic.users[{i}]: a user name cannot contain ':'")));
                }
                let d = stored(
                    &u.user,
                    u.password.as_ref(),
                    u.password_sha256.as_ref(),
                    &format!("basic.users[{i}]"),
                )?;
                users.push(Stored { client: u.user.clone(), digest: d, paths: Vec::new() });
            }
        }
        if keys.is_empty() && users.is_empty() && self.shared_data_key.is_none() {
            return Err(Error::msg("no credentials: set keys, basic.users or shared_data_key"));
        }
        if self.realm.contains(['"', '\\']) || self.realm.chars().any(char::is_control) {
            return Err(Error::msg("realm: quotes, backslashes and control characters are not allowed"));
        }
        if self.refresh.get().is_zero() {
            return Err(Error::msg("refresh must be positive"));
        }
        Ok((keys, users))
    }
}
