//! Downstream TLS: a rustls `ServerConfig` built from a listener's `tls` block.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use sluice_config::model::ListenerTls;
use tokio_rustls::TlsAcceptor;

use crate::sni::{CertSet, CertificateStatus, SniResolver};
use crate::{TlsError, pem, provider};

/// How a listener treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// No `client_ca`: no certificate is requested.
    None,
    /// `client_ca` set, `require_client_certificate: false`: a certificate is
    /// requested and, if sent, must chain to `client_ca`; clients without one get in.
    Optional,
    /// `client_ca` set, `require_client_certificate: true`: handshakes without a valid
    /// client certificate fail.
    Required,
}

/// A listener's TLS: the rustls config and its hot-swappable certificates.
///
/// Cheap to share behind an `Arc`; [`ServerTls::acceptor`] is a pointer copy.
#[derive(Debug)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    resolver: Arc<SniResolver>,
    field: String,
    client_auth: ClientAuthMode,
}

// === impl ServerTls ===

impl ServerTls {
    /// Builds the TLS of one listener from `cfg`.
    ///
    /// - `field` is the config path of `cfg`, e.g. `listeners[0].tls`; errors start with it.
    /// - `resolve` maps a path from the config to the file to open (typically joining
    ///   relative paths to the config file's directory).
    /// - `alpn` lists the protocols to offer, in preference order, e.g.
    ///   `&[b"h2", b"http/1.1"]`. A client that offers ALPN with none of them is refused.
    ///
    /// TLS 1.2 and 1.3 with the ring provider; see the crate docs for SNI rules.
    pub fn from_config(
        cfg: &ListenerTls,
        field: &str,
        resolve: impl Fn(&Path) -> PathBuf,
        alpn: &[&[u8]],
    ) -> Result<ServerTls, TlsError> {
        let provider = provider();
        let certs = CertSet::load(&format!("{field}.certificates"), &cfg.certificates, &resolve, &provider)?;
        let (verifier, client_auth) = client_verifier(cfg, field, &resolve)?;
        let resolver = Arc::new(SniResolver::new(certs));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            .map_err(|e| TlsError::rustls(field, e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tracing::debug!(
            field,
            certificates = cfg.certificates.len(),
            client_auth = ?client_auth,
            "downstream tls ready"
        );
        Ok(ServerTls { config: Arc::new(config), resolver, field: field.to_owned(), client_auth })
    }

    /// A tokio acceptor for this listener. Acceptors made before a
    /// [`ServerTls::reload_certificates`] see the new certificates too.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// The rustls config, for callers that drive rustls themselves.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// How client certificates are treated.
    pub fn client_auth(&self) -> ClientAuthMode {
        self.client_auth
    }

    /// Replaces the served certificates with `cfg.certificates` (re-read from disk).
    /// Handshakes already under way finish with the old ones; established connections
    /// are untouched. On error nothing changes.
    ///
    /// Only the certificates are reloaded: a change of `client_ca` or
    /// `require_client_certificate` needs a new [`ServerTls`].
    pub fn reload_certificates(
        &self,
        cfg: &ListenerTls,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<(), TlsError> {
        let set =
            CertSet::load(&format!("{}.certificates", self.field), &cfg.certificates, &resolve, &provider())?;
        self.resolver.store(set);
        tracing::info!(field = %self.field, "downstream certificates reloaded");
        Ok(())
    }

    /// What is being served, for the admin endpoint.
    pub fn certificates(&self) -> Vec<CertificateStatus> {
        self.resolver.load().status.clone()
    }

    /// The index (in `certificates`) of the certificate a handshake with `sni` gets.
    pub fn select_certificate(&self, sni: Option<&str>) -> usize {
        self.resolver.load().select_index(sni)
    }
}

fn client_verifier(
    cfg: &ListenerTls,
    field: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<(Arc<dyn ClientCertVerifier>, ClientAuthMode), TlsError> {
    let Some(ca) = &cfg.client_ca else {
        if cfg.require_client_certificate {
            return Err(TlsError::invalid(
                format!("{field}.require_client_certificate"),
                "requires client_ca",
            ));
        }
        return Ok((WebPkiClientVerifier::no_client_auth(), ClientAuthMode::None));
    };
    let ca_field = format!("{field}.client_ca");
    let roots = pem::load_root_store(&ca_field, &resolve(ca))?;
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let (builder, mode) = if cfg.require_client_certificate {
        (builder, ClientAuthMode::Required)
    } else {
        (builder.allow_unauthenticated(), ClientAuthMode::Optional)
    };
    let verifier = builder.build().map_err(|e| TlsError::invalid(ca_field, e.to_string()))?;
    Ok((verifier, mode))
}
