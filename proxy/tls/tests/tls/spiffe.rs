//! The SPIFFE upstream verifier: chain to the CA, then exactly one URI SAN equal to
//! the expected id.

use std::path::Path;

use sluice_config::model::UpstreamTls;
use sluice_tls::test_certs::{LeafSpec, TestPki};
use sluice_tls::{ClientTls, ServerTls, SpiffeError};

use crate::common::*;

const BACKEND: &str = "spiffe://mesh.test/ns/default/sa/backend";

fn spiffe_client(ca: &Path, id: &str) -> ClientTls {
    let cfg = UpstreamTls { sni: None, ca: ca.to_owned(), client_certificate: None };
    ClientTls::from_config(&cfg, "c", same, false).unwrap().with_expected_spiffe_id(id).unwrap()
}

fn server(leaf: &sluice_tls::test_certs::CertPaths) -> ServerTls {
    ServerTls::from_config(&listener_tls(vec![leaf.files(&[])]), "l", same, &[]).unwrap()
}

/// Handshake; the host name is arbitrary: the verifier ignores it.
async fn try_connect(server: &ServerTls, client: &ClientTls) -> std::io::Result<Connected> {
    let (addr, task) = accept_one(server.acceptor()).await;
    let name = client.server_name("backend.mesh.internal").unwrap();
    let connected = tokio::time::timeout(LIMIT, connect(client.connector(), addr, name)).await.unwrap();
    let _ = task.await;
    connected
}

fn spiffe_error(r: &std::io::Result<Connected>) -> SpiffeError {
    let err = r.as_ref().expect_err("the handshake must fail");
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err}"));
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<SpiffeError>().cloned().unwrap()
        }
        other => panic!("not a spiffe error: {other:?}"),
    }
}

#[tokio::test]
async fn accepts_the_expected_id_only() {
    let pki = TestPki::new().unwrap();
    // No DNS SAN at all: only the SPIFFE id identifies the server.
    let leaf = pki.issue(&LeafSpec::new("backend").uri(BACKEND)).unwrap();
    let server = server(&leaf);

    let good = spiffe_client(pki.ca_path(), BACKEND);
    assert_eq!(good.expected_spiffe_id(), Some(BACKEND));
    let connected = try_connect(&server, &good).await.unwrap();
    assert_eq!(connected.peer_leaf, Some(leaf.der.clone()));

    let wrong = spiffe_client(pki.ca_path(), "spiffe://mesh.test/ns/default/sa/other");
    let result = try_connect(&server, &wrong).await;
    assert_eq!(
        spiffe_error(&result),
        SpiffeError::Mismatch {
            expected: "spiffe://mesh.test/ns/default/sa/other".into(),
            presented: BACKEND.into(),
        }
    );
    assert_eq!(reason(&result), "bad_certificate");
}

#[tokio::test]
async fn refuses_two_uri_sans_none_and_expired_and_foreign() {
    let pki = TestPki::new().unwrap();
    let client = spiffe_client(pki.ca_path(), BACKEND);

    let two =
        pki.issue(&LeafSpec::new("two").uri(BACKEND).uri("spiffe://mesh.test/ns/default/sa/extra")).unwrap();
    let result = try_connect(&server(&two), &client).await;
    assert_eq!(spiffe_error(&result), SpiffeError::UriSanCount(2));

    let none = pki.server("dns-only", &["backend.mesh.internal"]).unwrap();
    let result = try_connect(&server(&none), &client).await;
    assert_eq!(spiffe_error(&result), SpiffeError::UriSanCount(0));

    let expired = pki.issue(&LeafSpec::new("old").uri(BACKEND).expired()).unwrap();
    let result = try_connect(&server(&expired), &client).await;
    assert_eq!(reason(&result), "expired");

    let foreign = TestPki::with_name("Foreign CA").unwrap();
    let minted = foreign.issue(&LeafSpec::new("minted").uri(BACKEND)).unwrap();
    let result = try_connect(&server(&minted), &client).await;
    assert_eq!(reason(&result), "unknown_ca");
}

#[test]
fn refuses_a_malformed_expected_id() {
    let pki = TestPki::new().unwrap();
    let cfg = UpstreamTls { sni: None, ca: pki.ca_path().to_owned(), client_certificate: None };
    let err = ClientTls::from_config(&cfg, "clusters[1].tls", same, false)
        .unwrap()
        .with_expected_spiffe_id("https://mesh.test/sa/x")
        .unwrap_err();
    assert_eq!(err.field(), "clusters[1].tls.spiffe_id");
    assert!(err.to_string().contains("spiffe://"), "{err}");
}
