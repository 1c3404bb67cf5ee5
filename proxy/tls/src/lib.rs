//! TLS for Sluice's data plane: rustls server configs for listeners and client
//! configs for upstream clusters, built from the config model, plus what a handshake
//! tells the rest of the proxy (a [`sluice_filter::TlsInfo`], metrics labels).
//!
//! It is rustls 0.23 with the **ring** provider only (no aws-lc, no OpenSSL), TLS 1.2
//! and 1.3. It does not accept connections, hold sockets or decide policy; the data
//! plane drives the [`tokio_rustls::TlsAcceptor`] / [`tokio_rustls::TlsConnector`] it
//! gets from here.
//!
//! - [`ServerTls`] (a listener's `tls`): certificates picked by SNI from their
//!   `server_names` (exact or `*.suffix`, case-insensitive; exact beats wildcard, the
//!   longest wildcard suffix wins; no or unknown SNI gets the first certificate;
//!   empty `server_names` means the leaf's DNS SANs), ALPN as given, and client
//!   certificates checked against `client_ca` when set ([`ClientAuthMode`]).
//!   Certificates sit behind an `ArcSwap`: [`ServerTls::reload_certificates`] affects
//!   only handshakes that start afterwards.
//! - [`ClientTls`] (a cluster's `tls`): roots from `ca`, optional client certificate,
//!   SNI override, and optionally a SPIFFE id the upstream must present instead of a
//!   DNS name ([`ClientTls::with_expected_spiffe_id`], [`SpiffeServerVerifier`]).
//! - [`tls_info`] fills [`sluice_filter::TlsInfo`] from an accepted connection;
//!   [`handshake_failure_reason`] and [`TlsMetrics`] turn failures into metrics.
//! - `test_certs` (feature `test-util`): a throwaway rcgen PKI writing PEM files, for
//!   tests across the workspace.
//!
//! Errors ([`TlsError`]) start with the config field, e.g.
//! `listeners[0].tls.certificates[1].key: no private key found in certs/b.key`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

mod client;
mod error;
mod info;
mod metrics;
mod pem;
mod server;
mod session;
mod sni;
mod spiffe;
#[cfg(feature = "test-util")]
pub mod test_certs;

pub use client::ClientTls;
pub use error::TlsError;
pub use info::{
    CertIdentity, cert_identity, client_tls_info, handshake_failure_reason, sha256_hex, tls_info,
    version_name,
};
pub use metrics::{Side, TlsMetrics};
pub use server::{ClientAuthMode, ServerTls};
pub use sni::CertificateStatus;
pub use spiffe::{SpiffeError, SpiffeServerVerifier, validate_spiffe_id};

/// The protocol versions Sluice speaks: TLS 1.3 preferred, TLS 1.2 as the minimum.
pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The one crypto provider: rustls' ring provider with its default suites and groups.
/// Configs are built with it explicitly, so no process-wide default is needed.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}
