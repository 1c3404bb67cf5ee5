//! Reading PEM files: certificate chains, private keys (PKCS#8, PKCS#1, SEC1) and CA
//! bundles, with errors that name the config field and the file.
//!
//! Parsing uses `rustls::pki_types::pem` (what `rustls-pemfile` 2.x wraps; that crate
//! is unmaintained upstream, so we call the maintained API directly).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sluice_config::model::CertificateFiles;

use crate::TlsError;

/// Reads a whole file, naming `field` on failure.
pub(crate) fn read(field: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    })
}

fn pem_error(field: &str, path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Pem { field: field.to_owned(), path: path.to_owned(), reason: reason.into() }
}

/// Every `CERTIFICATE` section of `bytes`, in order. Other sections are skipped; a
/// malformed section or a file without certificates is an error.
pub(crate) fn certs_from_pem(
    field: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| pem_error(field, path, format!("invalid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(pem_error(field, path, "no certificate found"));
    }
    Ok(certs)
}

/// The first private key of `bytes` (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE
/// KEY`). A file with more than one key is refused, as it is almost always a mistake.
pub(crate) fn key_from_pem(
    field: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let keys = PrivateKeyDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| pem_error(field, path, format!("invalid PEM ({e})")))?;
    let mut keys = keys.into_iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) => Ok(key),
        (None, _) => Err(pem_error(field, path, "no private key found")),
        (Some(_), Some(_)) => Err(pem_error(field, path, "more than one private key found")),
    }
}

/// A root store from a PEM CA bundle; every certificate must be a usable trust anchor.
pub(crate) fn root_store(field: &str, path: &Path, bytes: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs_from_pem(field, path, bytes)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| pem_error(field, path, format!("certificate {i} is not a usable CA ({e})")))?;
    }
    Ok(roots)
}

/// Reads a CA bundle file into a root store.
pub(crate) fn load_root_store(field: &str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let bytes = read(field, path)?;
    root_store(field, path, &bytes).map(Arc::new)
}

/// A certificate chain and key loaded from files, checked to belong together.
pub(crate) struct LoadedCert {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) cert_path: PathBuf,
}

/// Loads `files` (the config entry at `field`) into a signing-ready [`CertifiedKey`].
pub(crate) fn load_certified_key(
    field: &str,
    files: &CertificateFiles,
    resolve: &dyn Fn(&Path) -> PathBuf,
    provider: &CryptoProvider,
) -> Result<LoadedCert, TlsError> {
    let cert_field = format!("{field}.cert");
    let key_field = format!("{field}.key");
    let cert_path = resolve(&files.cert);
    let key_path = resolve(&files.key);
    let chain = certs_from_pem(&cert_field, &cert_path, &read(&cert_field, &cert_path)?)?;
    let key = key_from_pem(&key_field, &key_path, &read(&key_field, &key_path)?)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| pem_error(&key_field, &key_path, format!("unusable private key ({e})")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public key, so there is nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::invalid(
                key_field,
                format!(
                    "the key in {} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
            ));
        }
        Err(e) => return Err(TlsError::rustls(cert_field, e)),
    }
    Ok(LoadedCert { key: Arc::new(certified), cert_path })
}
