//! Upstream TLS: a rustls `ClientConfig` built from a cluster's `tls` block.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use sluice_config::model::{CertificateFiles, UpstreamTls};
use tokio_rustls::TlsConnector;

use crate::session::ResettableSessions;
use crate::spiffe::SpiffeServerVerifier;
use crate::{TlsError, pem, provider};

/// A cluster's upstream TLS: trust roots, optional client certificate, SNI and
/// (optionally) a SPIFFE id the upstream must present.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    field: String,
    sni: Option<ServerName<'static>>,
    roots: Arc<RootCertStore>,
    client_cert: Option<Arc<ClientCertResolver>>,
    alpn: Vec<Vec<u8>>,
    expected_spiffe_id: Option<String>,
    sessions: Arc<ResettableSessions>,
}

// === impl ClientTls ===

impl ClientTls {
    /// Builds a cluster's upstream TLS from `cfg`.
    ///
    /// - `field` is the config path of `cfg`, e.g. `clusters[2].tls`; errors start with it.
    /// - `resolve` maps a path from the config to the file to open.
    /// - `alpn_h2`: offer ALPN `h2` (the cluster speaks HTTP/2) instead of `http/1.1`.
    ///
    /// The upstream's chain must lead to `cfg.ca` and its certificate must be valid for
    /// the name from [`ClientTls::server_name`] (or, after
    /// [`ClientTls::with_expected_spiffe_id`], carry that SPIFFE id).
    pub fn from_config(
        cfg: &UpstreamTls,
        field: &str,
        resolve: impl Fn(&Path) -> PathBuf,
        alpn_h2: bool,
    ) -> Result<ClientTls, TlsError> {
        let sni = match &cfg.sni {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                TlsError::invalid(format!("{field}.sni"), format!("not a valid server name: {name:?}"))
            })?),
            None => None,
        };
        let roots = pem::load_root_store(&format!("{field}.ca"), &resolve(&cfg.ca))?;
        let client_cert = match &cfg.client_certificate {
            Some(files) => Some(Arc::new(ClientCertResolver::load(
                &format!("{field}.client_certificate"),
                files,
                &resolve,
            )?)),
            None => None,
        };
        let alpn = vec![if alpn_h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let sessions = ResettableSessions::new();
        let config = build_config(field, &roots, client_cert.as_ref(), &alpn, None, &sessions)?;
        Ok(ClientTls {
            sessions,
            config,
            field: field.to_owned(),
            sni,
            roots,
            client_cert,
            alpn,
            expected_spiffe_id: None,
        })
    }

    /// Authenticates the upstream by SPIFFE id instead of by name: the chain must still
    /// lead to `ca`, and the leaf must carry exactly one URI SAN, equal to `id`
    /// (e.g. `spiffe://mesh.test/ns/default/sa/backend`). SNI is still sent.
    pub fn with_expected_spiffe_id(mut self, id: &str) -> Result<ClientTls, TlsError> {
        crate::spiffe::validate_spiffe_id(id)
            .map_err(|e| TlsError::invalid(format!("{}.spiffe_id", self.field), e.to_string()))?;
        // Sessions verified under the old rules must not be resumed under the new ones.
        let sessions = ResettableSessions::new();
        self.config = build_config(
            &self.field,
            &self.roots,
            self.client_cert.as_ref(),
            &self.alpn,
            Some(id),
            &sessions,
        )?;
        self.sessions = sessions;
        self.expected_spiffe_id = Some(id.to_owned());
        Ok(self)
    }

    /// A tokio connector using this config.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.config.clone())
    }

    /// The rustls config.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name to connect with: the configured `sni`, else `default_host` (the
    /// endpoint's host; a DNS name or an IP address, IPv6 with or without brackets).
    /// An IP address sends no SNI and is verified against the certificate's IP SANs.
    pub fn server_name(&self, default_host: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(sni) = &self.sni {
            return Ok(sni.clone());
        }
        let host = default_host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(default_host);
        ServerName::try_from(host.to_owned()).map_err(|_| {
            TlsError::invalid(
                format!("{}.sni", self.field),
                format!("the endpoint host {default_host:?} is not a valid server name; set sni"),
            )
        })
    }

    /// The configured `sni`, if any (`None` means "use the endpoint's host").
    pub fn sni_override(&self) -> Option<&ServerName<'static>> {
        self.sni.as_ref()
    }

    /// The SPIFFE id the upstream must present, if set.
    pub fn expected_spiffe_id(&self) -> Option<&str> {
        self.expected_spiffe_id.as_deref()
    }

    /// Re-reads the client certificate (`cfg.client_certificate`); new handshakes use it,
    /// and cached sessions are dropped so none resumes with the old identity.
    /// Adding or removing the client certificate, or changing `ca` or `sni`, needs a new
    /// [`ClientTls`]. On error nothing changes.
    pub fn reload_client_certificate(
        &self,
        cfg: &UpstreamTls,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<(), TlsError> {
        let field = format!("{}.client_certificate", self.field);
        match (&self.client_cert, &cfg.client_certificate) {
            (Some(current), Some(files)) => {
                let fresh = ClientCertResolver::load(&field, files, &resolve)?;
                current.key.store(fresh.key.load_full());
                // A resumed session would still carry the old certificate.
                self.sessions.clear();
                tracing::info!(field, "upstream client certificate reloaded");
                Ok(())
            }
            _ => Err(TlsError::invalid(
                field,
                "adding or removing the client certificate needs a new upstream tls config",
            )),
        }
    }
}

fn build_config(
    field: &str,
    roots: &Arc<RootCertStore>,
    client_cert: Option<&Arc<ClientCertResolver>>,
    alpn: &[Vec<u8>],
    expected_spiffe_id: Option<&str>,
    sessions: &Arc<ResettableSessions>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(crate::PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::rustls(field, e))?;
    let builder = match expected_spiffe_id {
        Some(id) => {
            let verifier: Arc<dyn ServerCertVerifier> = Arc::new(
                SpiffeServerVerifier::new(roots.clone(), id)
                    .map_err(|e| TlsError::invalid(format!("{field}.spiffe_id"), e.to_string()))?,
            );
            builder.dangerous().with_custom_certificate_verifier(verifier)
        }
        None => builder.with_root_certificates(roots.clone()),
    };
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver.clone()),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    config.resumption = Resumption::store(sessions.clone());
    Ok(Arc::new(config))
}

/// Presents one client certificate, swappable for rotation.
#[derive(Debug)]
struct ClientCertResolver {
    key: ArcSwap<CertifiedKey>,
}

impl ClientCertResolver {
    fn load(
        field: &str,
        files: &CertificateFiles,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<ClientCertResolver, TlsError> {
        let loaded = pem::load_certified_key(field, files, resolve, &provider())?;
        Ok(ClientCertResolver { key: ArcSwap::new(loaded.key) })
    }
}

impl ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
