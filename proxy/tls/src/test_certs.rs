//! A throwaway PKI for tests (feature `test-util`): a CA and leaves generated with
//! rcgen (ECDSA P-256), written as PEM files into a temporary directory that is
//! removed when the [`TestPki`] drops.
//!
//! ```
//! # fn main() -> Result<(), sluice_tls::test_certs::TestPkiError> {
//! use sluice_tls::test_certs::TestPki;
//! let pki = TestPki::new()?;
//! let server = pki.server("localhost", &["localhost", "*.example.test"])?;
//! let client = pki.client("spiffe://mesh.test/ns/default/sa/frontend")?;
//! assert!(server.cert.exists() && client.key.exists() && pki.ca_path().exists());
//! # Ok(()) }
//! ```
//!
//! Not for production: keys are unprotected and the CA lives as long as the value.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::pki_types::CertificateDer;
use sluice_config::model::CertificateFiles;
use tempfile::TempDir;

/// Why the test PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestPkiError {
    /// rcgen refused the parameters.
    #[error("generating a test certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing test pki files: {0}")]
    Io(#[from] std::io::Error),
}

fn ca_params(common_name: &str) -> Result<CertificateParams, TestPkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2200, 1, 1);
    Ok(params)
}

/// The files of one issued leaf.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// PEM chain file: the leaf, then the intermediates of an
    /// [`TestPki::intermediate`] PKI (never the root).
    pub cert: PathBuf,
    /// PEM PKCS#8 key file.
    pub key: PathBuf,
    /// The leaf, DER, to compare with what a peer saw.
    pub der: CertificateDer<'static>,
}

impl CertPaths {
    /// A `certificates` / `client_certificate` config entry for these files.
    pub fn files(&self, server_names: &[&str]) -> CertificateFiles {
        CertificateFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_names: server_names.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// What to put in a leaf; see [`TestPki::issue`].
#[derive(Debug, Clone, Default)]
pub struct LeafSpec {
    name: String,
    dns: Vec<String>,
    uris: Vec<String>,
    expired: bool,
}

impl LeafSpec {
    /// A leaf whose files are `<name>.crt` / `<name>.key` and whose CN is `name`.
    pub fn new(name: &str) -> LeafSpec {
        LeafSpec { name: name.to_owned(), ..LeafSpec::default() }
    }

    /// Adds DNS SANs (IP addresses become IP SANs).
    pub fn dns(mut self, names: &[&str]) -> LeafSpec {
        self.dns.extend(names.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Adds a URI SAN (call twice for a certificate with two).
    pub fn uri(mut self, uri: &str) -> LeafSpec {
        self.uris.push(uri.to_owned());
        self
    }

    /// Makes the leaf valid from 2000-01-01 to 2001-01-01 only.
    pub fn expired(mut self) -> LeafSpec {
        self.expired = true;
        self
    }
}

/// A temporary CA and the directory its PEM files live in.
pub struct TestPki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    ca_path: PathBuf,
    /// Intermediates (PEM, nearest first) appended to every leaf's chain file.
    chain_pem: String,
    clients: AtomicUsize,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

// === impl TestPki ===

impl TestPki {
    /// A new CA (`CN=Sluice Test CA`) in a new temporary directory, written to `ca.crt`.
    pub fn new() -> Result<TestPki, TestPkiError> {
        TestPki::with_name("Sluice Test CA")
    }

    /// A new CA with the given common name (handy for a "foreign" CA).
    pub fn with_name(common_name: &str) -> Result<TestPki, TestPkiError> {
        let dir = tempfile::Builder::new().prefix("sluice-pki-").tempdir()?;
        let params = ca_params(common_name)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, cert.pem())?;
        Ok(TestPki {
            dir,
            issuer: Issuer::new(params, key),
            ca_der: cert.der().clone(),
            ca_path,
            chain_pem: String::new(),
            clients: AtomicUsize::new(0),
        })
    }

    /// An intermediate CA signed by this one, in a directory of its own. Its leaves'
    /// chain files carry the intermediates; its [`TestPki::ca_path`] is this PKI's
    /// root, so peers trust the root only.
    pub fn intermediate(&self, common_name: &str) -> Result<TestPki, TestPkiError> {
        let dir = tempfile::Builder::new().prefix("sluice-pki-").tempdir()?;
        let params = ca_params(common_name)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let ca_path = dir.path().join("ca.crt");
        std::fs::copy(&self.ca_path, &ca_path)?;
        Ok(TestPki {
            dir,
            issuer: Issuer::new(params, key),
            ca_der: self.ca_der.clone(),
            ca_path,
            chain_pem: cert.pem() + &self.chain_pem,
            clients: AtomicUsize::new(0),
        })
    }

    /// The directory holding every file of this PKI.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The root CA certificate, PEM (`ca.crt`).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The root CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A server leaf for `dns` names, files `<name>.crt` / `<name>.key`.
    pub fn server(&self, name: &str, dns: &[&str]) -> Result<CertPaths, TestPkiError> {
        self.issue(&LeafSpec::new(name).dns(dns))
    }

    /// A server leaf for `dns` names that also carries a SPIFFE id (one URI SAN).
    pub fn server_spiffe(
        &self,
        name: &str,
        dns: &[&str],
        spiffe_id: &str,
    ) -> Result<CertPaths, TestPkiError> {
        self.issue(&LeafSpec::new(name).dns(dns).uri(spiffe_id))
    }

    /// A client leaf carrying `spiffe_id` as its one URI SAN, files `client-<n>.*`.
    pub fn client(&self, spiffe_id: &str) -> Result<CertPaths, TestPkiError> {
        let n = self.clients.fetch_add(1, Ordering::Relaxed);
        self.issue(&LeafSpec::new(&format!("client-{n}")).uri(spiffe_id))
    }

    /// A server leaf for `dns` names that expired in 2001.
    pub fn expired_server(&self, name: &str, dns: &[&str]) -> Result<CertPaths, TestPkiError> {
        self.issue(&LeafSpec::new(name).dns(dns).expired())
    }

    /// Issues a leaf as `spec` says. Leaves have `CA:FALSE`, `digitalSignature` and
    /// both `serverAuth` and `clientAuth`, like mesh SVIDs.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertPaths, TestPkiError> {
        let mut params = CertificateParams::new(spec.dns.clone())?;
        for uri in &spec.uris {
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into()?));
        }
        params.distinguished_name.push(DnType::CommonName, &spec.name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        if spec.expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        } else {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2199, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let paths = CertPaths {
            cert: self.dir.path().join(format!("{}.crt", spec.name)),
            key: self.dir.path().join(format!("{}.key", spec.name)),
            der: cert.der().clone(),
        };
        std::fs::write(&paths.cert, cert.pem() + &self.chain_pem)?;
        std::fs::write(&paths.key, key.serialize_pem())?;
        Ok(paths)
    }

    /// Writes `contents` to `file_name` in [`TestPki::dir`] (for bad-file tests).
    pub fn write(&self, file_name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf, TestPkiError> {
        let path = self.dir.path().join(file_name);
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}
