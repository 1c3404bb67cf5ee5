//! Certificate selection by SNI, behind an [`ArcSwap`] so certificates can be
//! replaced while the listener runs: a handshake reads the set once, so only
//! handshakes that start after a swap see the new certificates.
//!
//! Rules: names compare case-insensitively and without a trailing dot; an exact name
//! beats a wildcard; `*.example.com` matches any name ending in `.example.com`
//! (one or more labels), the longest matching suffix wins; a certificate listed
//! earlier wins a tie; no SNI, or an SNI nothing matches, gets the first certificate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sluice_config::model::CertificateFiles;

use crate::TlsError;
use crate::info::cert_identity;
use crate::pem::load_certified_key;

/// What the admin endpoint shows about one served certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateStatus {
    /// Config field of the entry, e.g. `listeners[0].tls.certificates[1]`.
    pub field: String,
    /// The certificate file, as resolved.
    pub cert_path: PathBuf,
    /// SNI patterns this certificate serves (configured, or the leaf's DNS SANs).
    pub server_names: Vec<String>,
    /// Whether this is the default certificate (the first).
    pub default: bool,
    /// Leaf subject.
    pub subject: String,
    /// Leaf DNS SANs.
    pub dns_sans: Vec<String>,
    /// Leaf URI SANs.
    pub uri_sans: Vec<String>,
    /// Leaf `notAfter`, Unix seconds.
    pub not_after_unix: i64,
    /// SHA-256 of the leaf, hex.
    pub sha256: String,
}

/// An immutable set of certificates with its SNI index.
#[derive(Debug)]
pub(crate) struct CertSet {
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// Wildcard suffixes without the `*.`: `example.com` for `*.example.com`.
    wildcard: HashMap<String, usize>,
    pub(crate) status: Vec<CertificateStatus>,
}

impl CertSet {
    /// Loads `certs` (the config list at `field`, e.g. `listeners[0].tls.certificates`).
    pub(crate) fn load(
        field: &str,
        certs: &[CertificateFiles],
        resolve: &dyn Fn(&Path) -> PathBuf,
        provider: &CryptoProvider,
    ) -> Result<CertSet, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::invalid(field, "at least one certificate is required"));
        }
        let now = unix_now();
        let mut set = CertSet {
            keys: Vec::with_capacity(certs.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            status: Vec::with_capacity(certs.len()),
        };
        for (i, files) in certs.iter().enumerate() {
            let entry_field = format!("{field}[{i}]");
            let loaded = load_certified_key(&entry_field, files, resolve, provider)?;
            let leaf =
                loaded.key.end_entity_cert().ok().and_then(|der| cert_identity(der)).ok_or_else(|| {
                    TlsError::invalid(
                        format!("{entry_field}.cert"),
                        format!("cannot parse the leaf certificate in {}", loaded.cert_path.display()),
                    )
                })?;
            let names = if files.server_names.is_empty() {
                leaf.dns_sans.clone()
            } else {
                files.server_names.clone()
            };
            let mut patterns = Vec::with_capacity(names.len());
            for (j, name) in names.iter().enumerate() {
                let pattern = Pattern::parse(name).map_err(|reason| {
                    let f = if files.server_names.is_empty() {
                        format!("{entry_field}.cert")
                    } else {
                        format!("{entry_field}.server_names[{j}]")
                    };
                    TlsError::invalid(f, format!("{reason}: {name:?}"))
                })?;
                patterns.push(pattern.to_string());
                let (map, key) = match pattern {
                    Pattern::Exact(n) => (&mut set.exact, n),
                    Pattern::Wildcard(s) => (&mut set.wildcard, s),
                };
                // The first certificate to claim a name keeps it.
                map.entry(key).or_insert(i);
            }
            if leaf.not_after_unix < now {
                tracing::warn!(
                    field = %entry_field,
                    cert = %loaded.cert_path.display(),
                    not_after = leaf.not_after_unix,
                    "serving an expired certificate"
                );
            }
            set.status.push(CertificateStatus {
                field: entry_field,
                cert_path: loaded.cert_path,
                server_names: patterns,
                default: i == 0,
                subject: leaf.subject,
                dns_sans: leaf.dns_sans,
                uri_sans: leaf.uri_sans,
                not_after_unix: leaf.not_after_unix,
                sha256: leaf.sha256,
            });
            set.keys.push(loaded.key);
        }
        Ok(set)
    }

    /// The index of the certificate for `sni`.
    pub(crate) fn select_index(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let name = normalize(sni);
        if let Some(&i) = self.exact.get(name.as_str()) {
            return i;
        }
        // Longest suffix first: for a.b.example.com try b.example.com, then example.com, then com.
        let mut rest = name.as_str();
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(&i) = self.wildcard.get(rest) {
                return i;
            }
        }
        0
    }

    fn select(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.keys.get(self.select_index(sni)).cloned()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A parsed `server_names` entry.
#[derive(Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Wildcard(String),
}

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern, &'static str> {
        let name = normalize(raw);
        let (wild, base) = match name.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, name.as_str()),
        };
        if base.is_empty() {
            return Err("empty server name");
        }
        if base.contains('*') {
            return Err("a wildcard is only allowed as a leading `*.` label");
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if base.len() > 253 || !base.split('.').all(valid_label) {
            return Err("not a valid DNS name");
        }
        Ok(if wild { Pattern::Wildcard(base.to_owned()) } else { Pattern::Exact(base.to_owned()) })
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(n) => f.write_str(n),
            Pattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// The rustls certificate resolver: reads the current [`CertSet`] per handshake.
#[derive(Debug)]
pub(crate) struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl SniResolver {
    pub(crate) fn new(set: CertSet) -> SniResolver {
        SniResolver { set: ArcSwap::from_pointee(set) }
    }

    /// Replaces the set; handshakes in progress keep the one they read.
    pub(crate) fn store(&self, set: CertSet) {
        self.set.store(Arc::new(set));
    }

    pub(crate) fn load(&self) -> Arc<CertSet> {
        self.set.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        let sni = client_hello.server_name();
        let key = set.select(sni);
        tracing::trace!(sni, index = set.select_index(sni), "selected certificate");
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&[&str]]) -> CertSet {
        let mut set =
            CertSet { keys: Vec::new(), exact: HashMap::new(), wildcard: HashMap::new(), status: Vec::new() };
        for (i, names) in names.iter().enumerate() {
            for name in *names {
                match Pattern::parse(name).unwrap() {
                    Pattern::Exact(n) => set.exact.entry(n).or_insert(i),
                    Pattern::Wildcard(s) => set.wildcard.entry(s).or_insert(i),
                };
            }
        }
        set
    }

    #[test]
    fn selection_rules() {
        let s = set(&[
            &["default.test"],
            &["*.example.test"],
            &["api.example.test", "*.b.example.test"],
            &["*.example.test", "other.test"],
        ]);
        let cases = [
            (None, 0),
            (Some("default.test"), 0),
            (Some("unknown.test"), 0),
            (Some("x.example.test"), 1),
            (Some("X.Example.TEST."), 1),
            (Some("api.example.test"), 2),
            (Some("API.EXAMPLE.TEST"), 2),
            (Some("c.b.example.test"), 2),
            (Some("d.c.example.test"), 1),
            (Some("example.test"), 0),
            (Some("other.test"), 3),
        ];
        for (sni, want) in cases {
            assert_eq!(s.select_index(sni), want, "sni {sni:?}");
        }
    }

    #[test]
    fn pattern_parsing() {
        assert_eq!(Pattern::parse("*.Example.com").unwrap(), Pattern::Wildcard("example.com".into()));
        assert_eq!(Pattern::parse("Host.test.").unwrap(), Pattern::Exact("host.test".into()));
        for bad in ["", "*", "*.", "a.*.test", "*a.test", "a..test", "sp ace.test"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
