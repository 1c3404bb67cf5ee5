//! What a handshake tells the rest of the proxy: the negotiated version, the SNI,
//! the peer certificate's identity (URI SANs, DNS SANs, subject, SHA-256), and why a
//! failed handshake failed (a metrics label).

use rustls::pki_types::CertificateDer;
use rustls::{CommonState, ProtocolVersion, ServerConnection};
use sha2::{Digest, Sha256};
use sluice_filter::TlsInfo;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The identity facts of one certificate, parsed with x509-parser.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertIdentity {
    /// URI SANs (SPIFFE ids), in certificate order.
    pub uri_sans: Vec<String>,
    /// DNS SANs, in certificate order.
    pub dns_sans: Vec<String>,
    /// The subject, RFC 4514 style (`CN=frontend, O=mesh`); empty subjects give `""`.
    pub subject: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub sha256: String,
    /// `notAfter` as Unix seconds.
    pub not_after_unix: i64,
    /// Whether the certificate is a CA (basic constraints).
    pub is_ca: bool,
}

/// Parses `der`. `None` when the certificate cannot be parsed (a peer certificate has
/// already been verified by then, so this only happens for unverified input).
pub fn cert_identity(der: &[u8]) -> Option<CertIdentity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut uri_sans = Vec::new();
    let mut dns_sans = Vec::new();
    // A malformed SAN extension yields no SANs rather than a partial list.
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    Some(CertIdentity {
        uri_sans,
        dns_sans,
        subject: cert.subject().to_string(),
        sha256: sha256_hex(der),
        not_after_unix: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `TLSv1.3`, `TLSv1.2`, … (the names OpenSSL and Envoy's `%DOWNSTREAM_TLS_VERSION%` use).
pub fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        ProtocolVersion::TLSv1_1 => "TLSv1.1".to_owned(),
        ProtocolVersion::TLSv1_0 => "TLSv1".to_owned(),
        other => format!("{other:?}"),
    }
}

/// The [`TlsInfo`] of an accepted downstream connection, for the filter chain's
/// `connection.*` properties and the access log.
///
/// Call it after the handshake (`tokio_rustls::server::TlsStream::get_ref().1`).
/// All URI SANs are reported; enforcing SPIFFE's one-URI-SAN rule is the caller's
/// policy.
pub fn tls_info(conn: &ServerConnection) -> TlsInfo {
    let mut info = common_info(conn);
    info.server_name = conn.server_name().map(str::to_owned);
    info
}

/// The [`TlsInfo`] of an upstream (client-side) connection: the peer is the upstream
/// server, and `server_name` is the SNI we sent, if known to the caller.
pub fn client_tls_info(conn: &rustls::ClientConnection, sni: Option<&str>) -> TlsInfo {
    let mut info = common_info(conn);
    info.server_name = sni.map(str::to_owned);
    info
}

fn common_info(conn: &CommonState) -> TlsInfo {
    let peer = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|der: &CertificateDer<'_>| cert_identity(der));
    TlsInfo {
        version: conn.protocol_version().map(version_name).unwrap_or_default(),
        server_name: None,
        peer_uri_sans: peer.as_ref().map(|p| p.uri_sans.clone()).unwrap_or_default(),
        peer_dns_sans: peer.as_ref().map(|p| p.dns_sans.clone()).unwrap_or_default(),
        peer_subject: peer.as_ref().map(|p| p.subject.clone()),
        peer_cert_sha256: peer.map(|p| p.sha256),
    }
}

/// A short, stable label for why a handshake failed, for a metrics label or a log
/// field: `no_client_cert`, `bad_certificate`, `unknown_ca`, `expired`,
/// `name_mismatch`, `alpn`, `protocol_version`, `peer_alert`, `protocol`, `eof`,
/// `timeout`, `io`.
///
/// `err` is what `TlsAcceptor::accept` / `TlsConnector::connect` returned.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error, PeerIncompatible};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "name_mismatch",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoApplicationProtocol => "alpn",
        Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered)
        | Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled)
        | Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired) => "protocol_version",
        Error::AlertReceived(_) => "peer_alert",
        _ => "protocol",
    }
}
