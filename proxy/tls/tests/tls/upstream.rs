//! Upstream: `ClientTls` against a real `ServerTls`.

use sluice_config::model::UpstreamTls;
use sluice_tls::test_certs::{CertPaths, TestPki};
use sluice_tls::{ClientTls, ServerTls};

use crate::common::*;

fn upstream_cfg(ca: &std::path::Path, client: Option<&CertPaths>) -> UpstreamTls {
    UpstreamTls { sni: None, ca: ca.to_owned(), client_certificate: client.map(|c| c.files(&[])) }
}

/// A server for `backend.test` (and 127.0.0.1), mTLS required when `client_ca` is set.
fn backend(pki: &TestPki, client_ca: Option<&std::path::Path>) -> ServerTls {
    let cert = pki.server("backend", &["backend.test", "127.0.0.1"]).unwrap();
    let mut cfg = listener_tls(vec![cert.files(&[])]);
    cfg.client_ca = client_ca.map(ToOwned::to_owned);
    cfg.require_client_certificate = client_ca.is_some();
    ServerTls::from_config(&cfg, "l", same, &[b"h2", b"http/1.1"]).unwrap()
}

async fn run(
    server: &ServerTls,
    client: &ClientTls,
    host: &str,
) -> (std::io::Result<Accepted>, std::io::Result<Connected>) {
    let (addr, task) = accept_one(server.acceptor()).await;
    let name = client.server_name(host).unwrap();
    let client = tokio::time::timeout(LIMIT, connect(client.connector(), addr, name)).await.unwrap();
    let server = tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
    (server, client)
}

#[tokio::test]
async fn verifies_the_server_chain_and_name() {
    let pki = TestPki::new().unwrap();
    let server = backend(&pki, None);
    for (h2, want) in [(true, b"h2".as_slice()), (false, b"http/1.1".as_slice())] {
        let client =
            ClientTls::from_config(&upstream_cfg(pki.ca_path(), None), "clusters[0].tls", same, h2).unwrap();
        let (accepted, connected) = run(&server, &client, "backend.test").await;
        assert_eq!(connected.unwrap().data, b"hello");
        let accepted = accepted.unwrap();
        assert_eq!(accepted.alpn.as_deref(), Some(want));
        assert_eq!(accepted.info.server_name.as_deref(), Some("backend.test"));
    }

    let client = ClientTls::from_config(&upstream_cfg(pki.ca_path(), None), "c", same, false).unwrap();
    // IP literal, with or without brackets: verified against the IP SAN, no SNI.
    let (accepted, connected) = run(&server, &client, "127.0.0.1").await;
    assert!(connected.is_ok());
    assert_eq!(accepted.unwrap().info.server_name, None);
    // A name the certificate does not cover.
    let (_, connected) = run(&server, &client, "other.test").await;
    assert_eq!(reason(&connected), "name_mismatch");
    assert!(client.server_name("[::1]").is_ok());
    assert!(client.server_name("bad name").is_err());
}

#[tokio::test]
async fn rejects_a_server_from_a_foreign_ca() {
    let pki = TestPki::new().unwrap();
    let foreign = TestPki::with_name("Foreign CA").unwrap();
    let server = backend(&foreign, None);
    let client = ClientTls::from_config(&upstream_cfg(pki.ca_path(), None), "c", same, false).unwrap();
    let (_, connected) = run(&server, &client, "backend.test").await;
    assert_eq!(reason(&connected), "unknown_ca");
}

#[tokio::test]
async fn rejects_an_expired_server_certificate() {
    let pki = TestPki::new().unwrap();
    let cert = pki.expired_server("old", &["backend.test"]).unwrap();
    let server = ServerTls::from_config(&listener_tls(vec![cert.files(&[])]), "l", same, &[]).unwrap();
    let client = ClientTls::from_config(&upstream_cfg(pki.ca_path(), None), "c", same, false).unwrap();
    let (_, connected) = run(&server, &client, "backend.test").await;
    assert_eq!(reason(&connected), "expired");
}

#[tokio::test]
async fn sni_override_is_sent_and_verified() {
    let pki = TestPki::new().unwrap();
    let server = backend(&pki, None);
    let mut cfg = upstream_cfg(pki.ca_path(), None);
    cfg.sni = Some("backend.test".into());
    let client = ClientTls::from_config(&cfg, "c", same, false).unwrap();
    assert!(client.sni_override().is_some());
    // The endpoint is an address; the SNI override names the service.
    let (accepted, connected) = run(&server, &client, "10.9.9.9").await;
    assert!(connected.is_ok());
    assert_eq!(accepted.unwrap().info.server_name.as_deref(), Some("backend.test"));

    cfg.sni = Some("not a name".into());
    let err = ClientTls::from_config(&cfg, "clusters[3].tls", same, false).unwrap_err();
    assert_eq!(err.field(), "clusters[3].tls.sni");
}

#[tokio::test]
async fn presents_and_rotates_a_client_certificate() {
    let pki = TestPki::new().unwrap();
    let server = backend(&pki, Some(pki.ca_path()));
    let first = pki.client("spiffe://mesh.test/ns/default/sa/frontend").unwrap();
    let second = pki.client("spiffe://mesh.test/ns/default/sa/frontend-v2").unwrap();

    // Without a client certificate the server refuses us.
    let anonymous = ClientTls::from_config(&upstream_cfg(pki.ca_path(), None), "c", same, false).unwrap();
    let (accepted, _) = run(&server, &anonymous, "backend.test").await;
    assert_eq!(reason(&accepted), "no_client_cert");

    let cfg = upstream_cfg(pki.ca_path(), Some(&first));
    let client = ClientTls::from_config(&cfg, "c", same, false).unwrap();
    let (accepted, connected) = run(&server, &client, "backend.test").await;
    assert_eq!(connected.unwrap().data, b"hello");
    assert_eq!(
        accepted.unwrap().info.peer_uri_sans,
        vec!["spiffe://mesh.test/ns/default/sa/frontend".to_owned()]
    );

    client.reload_client_certificate(&upstream_cfg(pki.ca_path(), Some(&second)), same).unwrap();
    let (accepted, _) = run(&server, &client, "backend.test").await;
    assert_eq!(accepted.unwrap().info.peer_cert_sha256, Some(sluice_tls::sha256_hex(&second.der)));
    // Removing the certificate is not a reload.
    assert!(client.reload_client_certificate(&upstream_cfg(pki.ca_path(), None), same).is_err());
}

#[tokio::test]
async fn chains_through_intermediates_both_ways() {
    let root = TestPki::new().unwrap();
    let issuer = root.intermediate("Issuer CA").unwrap();
    // The server trusts only the root for client certificates, and vice versa.
    let server = backend(&issuer, Some(root.ca_path()));
    let client_cert = issuer.client("spiffe://mesh.test/ns/default/sa/frontend").unwrap();
    let chain = std::fs::read_to_string(&client_cert.cert).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);

    let client =
        ClientTls::from_config(&upstream_cfg(root.ca_path(), Some(&client_cert)), "c", same, true).unwrap();
    let (accepted, connected) = run(&server, &client, "backend.test").await;
    assert_eq!(connected.unwrap().data, b"hello");
    assert_eq!(
        accepted.unwrap().info.peer_uri_sans,
        vec!["spiffe://mesh.test/ns/default/sa/frontend".to_owned()]
    );

    // The same through the SPIFFE verifier.
    let leaf = issuer.server_spiffe("svid", &[], "spiffe://mesh.test/ns/default/sa/backend").unwrap();
    let spiffe_server = ServerTls::from_config(&listener_tls(vec![leaf.files(&[])]), "l", same, &[]).unwrap();
    let client = ClientTls::from_config(&upstream_cfg(root.ca_path(), None), "c", same, false)
        .unwrap()
        .with_expected_spiffe_id("spiffe://mesh.test/ns/default/sa/backend")
        .unwrap();
    let (_, connected) = run(&spiffe_server, &client, "backend.test").await;
    assert_eq!(connected.unwrap().peer_leaf, Some(leaf.der));
}
