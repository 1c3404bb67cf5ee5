//! Verifying an upstream by SPIFFE id instead of DNS name.
//!
//! webpki only matches DNS names and IP addresses, so [`SpiffeServerVerifier`] checks
//! the chain with `verify_server_cert_signed_by_trust_anchor` (validity dates, key
//! usage, `serverAuth`, signatures) and then requires the leaf to carry exactly one
//! URI SAN, equal to the expected id (X.509-SVID rules). The `ServerName` the
//! connection was opened with is ignored by this verifier; it is still sent as SNI.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme};

use crate::info::cert_identity;

/// Why a SPIFFE identity check failed. Carried inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The leaf's single URI SAN is not the expected id.
    #[error("spiffe id mismatch: expected {expected}, presented {presented}")]
    Mismatch {
        /// The id we wanted.
        expected: String,
        /// The id the peer presented.
        presented: String,
    },
    /// The leaf has zero or several URI SANs.
    #[error("an x509-svid must have exactly one uri san, found {0}")]
    UriSanCount(usize),
    /// The leaf could not be parsed.
    #[error("cannot parse the leaf certificate")]
    Unparseable,
    /// An expected id is not a SPIFFE id.
    #[error("{reason}: {id:?}")]
    InvalidId {
        /// The refused id.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks that `id` is a SPIFFE id: `spiffe://<trust-domain>[/<path>]`, trust domain
/// of `[a-z0-9.-_]`, path segments non-empty and not `.`/`..`, no query or fragment.
pub fn validate_spiffe_id(id: &str) -> Result<(), SpiffeError> {
    check_syntax(id).map_err(|reason| SpiffeError::InvalidId { id: id.to_owned(), reason })
}

fn check_syntax(id: &str) -> Result<(), &'static str> {
    let rest = id.strip_prefix("spiffe://").ok_or("a spiffe id starts with spiffe://")?;
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return Err("the trust domain is empty");
    }
    if !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
        return Err("the trust domain may only contain lowercase letters, digits, '-', '.' and '_'");
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err("path segments must be non-empty and not '.' or '..'");
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err("path segments may only contain letters, digits, '-', '.' and '_'");
            }
        }
    }
    Ok(())
}

/// A rustls server-certificate verifier that authenticates the peer by SPIFFE id.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    /// A verifier accepting chains to `roots` whose leaf's only URI SAN is `expected`.
    /// `expected` must pass [`validate_spiffe_id`].
    pub fn new(roots: Arc<RootCertStore>, expected: &str) -> Result<Self, SpiffeError> {
        validate_spiffe_id(expected)?;
        Ok(SpiffeServerVerifier {
            roots,
            expected: expected.to_owned(),
            algs: crate::provider().signature_verification_algorithms,
        })
    }

    /// The id this verifier requires.
    pub fn expected(&self) -> &str {
        &self.expected
    }

    fn check_id(&self, der: &[u8]) -> Result<(), SpiffeError> {
        let identity = cert_identity(der).ok_or(SpiffeError::Unparseable)?;
        match identity.uri_sans.as_slice() {
            [only] if *only == self.expected => Ok(()),
            [only] => Err(SpiffeError::Mismatch { expected: self.expected.clone(), presented: only.clone() }),
            other => Err(SpiffeError::UriSanCount(other.len())),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        self.check_id(end_entity).map_err(|e| {
            tracing::debug!(error = %e, "upstream spiffe id refused");
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::validate_spiffe_id;

    #[test]
    fn spiffe_id_syntax() {
        for ok in ["spiffe://mesh.test", "spiffe://mesh.test/ns/default/sa/frontend", "spiffe://a-b_c.d/x.y"]
        {
            assert!(validate_spiffe_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "https://mesh.test/a",
            "spiffe://",
            "spiffe:///path",
            "spiffe://Mesh.test/a",
            "spiffe://mesh.test/",
            "spiffe://mesh.test//a",
            "spiffe://mesh.test/a/../b",
            "spiffe://mesh.test/a?x=1",
            "spiffe://user@mesh.test/a",
        ] {
            assert!(validate_spiffe_id(bad).is_err(), "{bad:?}");
        }
    }
}
