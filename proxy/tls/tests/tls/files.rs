//! Loading: key formats, and errors that name the field and the file.

use std::path::{Path, PathBuf};

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use sluice_config::model::{CertificateFiles, ListenerTls, UpstreamTls};
use sluice_tls::test_certs::TestPki;
use sluice_tls::{ClientTls, ServerTls, TlsError};

use crate::common::*;

const FIELD: &str = "listeners[0].tls";

fn build(cfg: &ListenerTls) -> Result<ServerTls, TlsError> {
    ServerTls::from_config(cfg, FIELD, same, &[b"http/1.1"])
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[tokio::test]
async fn loads_pkcs1_rsa_keys() {
    // An RSA key and self-signed leaf made once with openssl (ring cannot generate RSA).
    let cert = fixture("rsa-pkcs1.crt");
    let key = fixture("rsa-pkcs1.key");
    assert!(std::fs::read_to_string(&key).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let files = CertificateFiles { cert: cert.clone(), key, server_names: vec![] };
    let tls = build(&listener_tls(vec![files])).unwrap();
    assert_eq!(tls.certificates()[0].server_names, vec!["rsa.example.test"]);
    // The self-signed leaf is its own trust anchor.
    let connector = client_config(&cert, &[b"http/1.1"], None, BOTH);
    let (server, client) = handshake(tls.acceptor(), connector, "rsa.example.test").await;
    server.unwrap();
    assert_eq!(client.unwrap().data, b"hello");
}

#[tokio::test]
async fn loads_sec1_ec_keys() {
    let pki = TestPki::new().unwrap();
    let leaf = pki.server("ec", &["ec.test"]).unwrap();
    // PKCS#8 PrivateKeyInfo { version, algorithm, privateKey OCTET STRING(ECPrivateKey) }.
    let pkcs8 = rustls::pki_types::PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
    let (_, info) = x509_parser::der_parser::parse_der(pkcs8.secret_der()).unwrap();
    let seq = info.as_sequence().unwrap();
    let sec1 = seq[2].as_slice().unwrap();
    // openssl's layout: an EC PARAMETERS block, then the key.
    let text = format!(
        "{}{}",
        pem("EC PARAMETERS", &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
        pem("EC PRIVATE KEY", sec1)
    );
    let key = pki.write("ec-sec1.key", text).unwrap();
    let files = CertificateFiles { cert: leaf.cert.clone(), key, server_names: vec![] };
    let tls = build(&listener_tls(vec![files])).unwrap();
    let connector = client_config(pki.ca_path(), &[], None, BOTH);
    let (server, client) = handshake(tls.acceptor(), connector, "ec.test").await;
    server.unwrap();
    assert_eq!(client.unwrap().peer_leaf, Some(leaf.der));
}

/// Builds a listener whose second certificate uses `cert`/`key` and returns the error.
fn second_entry_error(pki: &TestPki, cert: PathBuf, key: PathBuf) -> TlsError {
    let good = pki.server("good", &["good.test"]).unwrap();
    let cfg = listener_tls(vec![good.files(&[]), CertificateFiles { cert, key, server_names: vec![] }]);
    build(&cfg).unwrap_err()
}

#[test]
fn bad_files_name_the_field_and_the_file() {
    let pki = TestPki::new().unwrap();
    let leaf = pki.server("b", &["b.test"]).unwrap();
    let other = pki.server("c", &["c.test"]).unwrap();
    let d = pki.dir().display().to_string();

    let missing = pki.dir().join("nope.crt");
    let err = second_entry_error(&pki, missing, leaf.key.clone());
    assert!(matches!(err, TlsError::Read { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{FIELD}.certificates[1].cert: cannot read {d}/nope.crt: ")), "{msg}");

    // A key file holding a certificate.
    let err = second_entry_error(&pki, leaf.cert.clone(), leaf.cert.clone());
    assert_eq!(err.to_string(), format!("{FIELD}.certificates[1].key: no private key found in {d}/b.crt"));

    // A certificate file holding only a key.
    let err = second_entry_error(&pki, leaf.key.clone(), leaf.key.clone());
    assert_eq!(err.to_string(), format!("{FIELD}.certificates[1].cert: no certificate found in {d}/b.key"));

    // Broken PEM.
    let broken = pki.write("broken.crt", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n").unwrap();
    let msg = second_entry_error(&pki, broken, leaf.key.clone()).to_string();
    assert!(msg.starts_with(&format!("{FIELD}.certificates[1].cert: invalid PEM (")), "{msg}");
    assert!(msg.ends_with(&format!(" in {d}/broken.crt")), "{msg}");

    // Two keys in one file.
    let both = std::fs::read_to_string(&leaf.key).unwrap() + &std::fs::read_to_string(&other.key).unwrap();
    let two = pki.write("two.key", both).unwrap();
    let msg = second_entry_error(&pki, leaf.cert.clone(), two).to_string();
    assert_eq!(msg, format!("{FIELD}.certificates[1].key: more than one private key found in {d}/two.key"));

    // A key that belongs to another certificate.
    let msg = second_entry_error(&pki, leaf.cert.clone(), other.key.clone()).to_string();
    assert_eq!(
        msg,
        format!(
            "{FIELD}.certificates[1].key: the key in {d}/c.key does not match the certificate in {d}/b.crt"
        )
    );
}

#[test]
fn bad_settings_name_the_field() {
    let pki = TestPki::new().unwrap();
    let leaf = pki.server("b", &["b.test"]).unwrap();

    let err = build(&listener_tls(vec![])).unwrap_err();
    assert_eq!(err.to_string(), format!("{FIELD}.certificates: at least one certificate is required"));

    let mut cfg = listener_tls(vec![leaf.files(&["ok.test", "a.*.test"])]);
    let err = build(&cfg).unwrap_err();
    assert_eq!(err.field(), format!("{FIELD}.certificates[0].server_names[1]"));

    cfg = listener_tls(vec![leaf.files(&[])]);
    cfg.require_client_certificate = true;
    let err = build(&cfg).unwrap_err();
    assert_eq!(err.to_string(), format!("{FIELD}.require_client_certificate: requires client_ca"));

    cfg.client_ca = Some(pki.dir().join("no-ca.pem"));
    let err = build(&cfg).unwrap_err();
    assert_eq!(err.field(), format!("{FIELD}.client_ca"));
    assert!(err.to_string().contains("no-ca.pem"), "{err}");

    // A CA bundle with no certificate in it.
    cfg.client_ca = Some(leaf.key.clone());
    let err = build(&cfg).unwrap_err();
    assert_eq!(err.to_string(), format!("{FIELD}.client_ca: no certificate found in {}", leaf.key.display()));

    let upstream = UpstreamTls {
        sni: None,
        ca: pki.dir().join("missing-ca.pem"),
        client_certificate: Some(leaf.files(&[])),
    };
    let err = ClientTls::from_config(&upstream, "clusters[0].tls", same, false).unwrap_err();
    assert_eq!(err.field(), "clusters[0].tls.ca");
    let upstream = UpstreamTls {
        ca: pki.ca_path().to_owned(),
        client_certificate: Some(CertificateFiles {
            cert: leaf.cert.clone(),
            key: pki.dir().join("gone.key"),
            server_names: vec![],
        }),
        ..upstream
    };
    let err = ClientTls::from_config(&upstream, "clusters[0].tls", same, false).unwrap_err();
    assert_eq!(err.field(), "clusters[0].tls.client_certificate.key");
}

#[test]
fn resolve_maps_config_paths_to_files() {
    let pki = TestPki::new().unwrap();
    let leaf = pki.server("rel", &["rel.test"]).unwrap();
    let cfg = listener_tls(vec![CertificateFiles {
        cert: "rel.crt".into(),
        key: "rel.key".into(),
        server_names: vec![],
    }]);
    let base = pki.dir().to_owned();
    let tls = ServerTls::from_config(&cfg, FIELD, |p: &Path| base.join(p), &[]).unwrap();
    assert_eq!(tls.certificates()[0].cert_path, leaf.cert);
}
