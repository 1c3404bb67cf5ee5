//! Downstream: SNI selection, ALPN, mTLS modes, `tls_info`.

use sluice_tls::test_certs::TestPki;
use sluice_tls::{ClientAuthMode, ServerTls, sha256_hex};

use crate::common::*;

const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Three certificates: default (`default.test`, plus SANs `stray.test` and
/// 127.0.0.1 that no `server_names` claims), `*.example.test`, `api.example.test`.
fn sni_fixture() -> (TestPki, Vec<sluice_tls::test_certs::CertPaths>, ServerTls) {
    let pki = TestPki::new().unwrap();
    let default = pki.server("default", &["default.test", "stray.test", "127.0.0.1"]).unwrap();
    let wild = pki.server("wild", &["*.example.test"]).unwrap();
    let api = pki.server("api", &["api.example.test"]).unwrap();
    let cfg = listener_tls(vec![
        default.files(&["default.test"]),
        wild.files(&["*.EXAMPLE.test"]),
        api.files(&["api.example.test"]),
    ]);
    let tls = ServerTls::from_config(&cfg, "listeners[0].tls", same, ALPN).unwrap();
    (pki, vec![default, wild, api], tls)
}

#[tokio::test]
async fn sni_picks_the_certificate_the_client_sees() {
    let (pki, certs, tls) = sni_fixture();
    // (SNI sent, index of the leaf the client must see)
    let cases = [
        ("api.example.test", 2),
        ("www.example.test", 1),
        ("API.Example.Test", 2),
        ("default.test", 0),
        // Unknown SNI: the default certificate (valid for it through its SANs).
        ("stray.test", 0),
        // An IP address sends no SNI: the default certificate.
        ("127.0.0.1", 0),
    ];
    for (name, want) in cases {
        let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
        let (server, client) = handshake(tls.acceptor(), connector, name).await;
        let server = server.unwrap_or_else(|e| panic!("{name}: server: {e}"));
        let client = client.unwrap_or_else(|e| panic!("{name}: client: {e}"));
        assert_eq!(client.peer_leaf.as_ref(), Some(&certs[want].der), "sni {name}");
        assert_eq!(client.data, b"hello");
        let sent_sni = (name != "127.0.0.1").then(|| name.to_ascii_lowercase());
        assert_eq!(server.info.server_name, sent_sni, "sni {name}");
        assert_eq!(server.info.version, "TLSv1.3");
        assert!(server.info.peer_uri_sans.is_empty());
        assert_eq!(server.info.peer_cert_sha256, None);
    }
    assert_eq!(tls.select_certificate(Some("x.y.example.test")), 1);
    let status = tls.certificates();
    assert_eq!(status.len(), 3);
    assert!(status[0].default && !status[1].default);
    assert_eq!(status[1].server_names, vec!["*.example.test"]);
    assert_eq!(status[2].sha256, sha256_hex(&certs[2].der));
    assert_eq!(status[2].field, "listeners[0].tls.certificates[2]");
}

#[tokio::test]
async fn empty_server_names_use_the_leaf_dns_sans() {
    let pki = TestPki::new().unwrap();
    let a = pki.server("a", &["a.test"]).unwrap();
    let b = pki.server("b", &["b.test", "*.b.test"]).unwrap();
    let cfg = listener_tls(vec![a.files(&[]), b.files(&[])]);
    let tls = ServerTls::from_config(&cfg, "l", same, ALPN).unwrap();
    assert_eq!(tls.select_certificate(Some("b.test")), 1);
    assert_eq!(tls.select_certificate(Some("x.b.test")), 1);
    assert_eq!(tls.select_certificate(Some("a.test")), 0);
    let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
    let (_, client) = handshake(tls.acceptor(), connector, "x.b.test").await;
    assert_eq!(client.unwrap().peer_leaf, Some(b.der));
}

#[tokio::test]
async fn alpn_negotiates_what_both_sides_offer() {
    let pki = TestPki::new().unwrap();
    let cert = pki.server("s", &["s.test"]).unwrap();
    let cfg = listener_tls(vec![cert.files(&[])]);
    let both = ServerTls::from_config(&cfg, "l", same, ALPN).unwrap();
    let h1_only = ServerTls::from_config(&cfg, "l", same, &[b"http/1.1"]).unwrap();

    let cases: [(&ServerTls, &[&[u8]], Option<&[u8]>); 4] = [
        (&both, &[b"h2", b"http/1.1"], Some(b"h2")),
        (&both, &[b"http/1.1"], Some(b"http/1.1")),
        (&both, &[], None),
        (&h1_only, &[b"h2", b"http/1.1"], Some(b"http/1.1")),
    ];
    for (server_tls, offer, want) in cases {
        let connector = client_config(pki.ca_path(), offer, None, BOTH);
        let (server, client) = handshake(server_tls.acceptor(), connector, "s.test").await;
        assert_eq!(server.unwrap().alpn.as_deref(), want, "offer {offer:?}");
        assert_eq!(client.unwrap().alpn.as_deref(), want, "offer {offer:?}");
    }

    // No protocol in common: refused.
    let connector = client_config(pki.ca_path(), &[b"h2"], None, BOTH);
    let (server, _) = handshake(h1_only.acceptor(), connector, "s.test").await;
    assert_eq!(reason(&server), "alpn");
}

#[tokio::test]
async fn tls12_is_accepted_and_reported() {
    let pki = TestPki::new().unwrap();
    let cert = pki.server("s", &["s.test"]).unwrap();
    let tls = ServerTls::from_config(&listener_tls(vec![cert.files(&[])]), "l", same, ALPN).unwrap();
    let connector = client_config(pki.ca_path(), ALPN, None, &[&rustls::version::TLS12]);
    let (server, client) = handshake(tls.acceptor(), connector, "s.test").await;
    assert_eq!(server.unwrap().info.version, "TLSv1.2");
    assert_eq!(client.unwrap().data, b"hello");
}

fn mtls(pki: &TestPki, require: bool) -> ServerTls {
    let cert = pki.server("s", &["s.test"]).unwrap();
    let mut cfg = listener_tls(vec![cert.files(&[])]);
    cfg.client_ca = Some(pki.ca_path().to_owned());
    cfg.require_client_certificate = require;
    ServerTls::from_config(&cfg, "l", same, ALPN).unwrap()
}

#[tokio::test]
async fn mtls_required_checks_the_client_certificate() {
    let pki = TestPki::new().unwrap();
    let foreign = TestPki::with_name("Foreign CA").unwrap();
    let tls = mtls(&pki, true);
    assert_eq!(tls.client_auth(), ClientAuthMode::Required);
    let id = "spiffe://mesh.test/ns/default/sa/frontend";
    let good = pki.client(id).unwrap();
    let bad = foreign.client(id).unwrap();

    // No certificate.
    let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
    let (server, client) = handshake(tls.acceptor(), connector, "s.test").await;
    assert_eq!(reason(&server), "no_client_cert");
    assert!(client.is_err(), "the client must not get data: {client:?}");

    // A certificate from a foreign CA.
    let connector = client_config(pki.ca_path(), ALPN, Some(&bad), BOTH);
    let (server, client) = handshake(tls.acceptor(), connector, "s.test").await;
    assert_eq!(reason(&server), "unknown_ca");
    assert!(client.is_err());

    // A good one, over TLS 1.3 and 1.2.
    for versions in [BOTH, &[&rustls::version::TLS12][..]] {
        let connector = client_config(pki.ca_path(), ALPN, Some(&good), versions);
        let (server, client) = handshake(tls.acceptor(), connector, "s.test").await;
        let info = server.unwrap().info;
        assert_eq!(client.unwrap().data, b"hello");
        assert_eq!(info.peer_uri_sans, vec![id.to_owned()]);
        assert!(info.peer_dns_sans.is_empty());
        assert_eq!(info.peer_subject.as_deref(), Some("CN=client-0"));
        assert_eq!(info.peer_cert_sha256, Some(sha256_hex(&good.der)));
        assert_eq!(info.server_name.as_deref(), Some("s.test"));
    }
}

#[tokio::test]
async fn resumed_sessions_keep_the_client_identity() {
    let pki = TestPki::new().unwrap();
    let tls = mtls(&pki, true);
    let id = "spiffe://mesh.test/ns/default/sa/frontend";
    let good = pki.client(id).unwrap();
    // One client config (one session cache) for both connections.
    let connector = client_config(pki.ca_path(), ALPN, Some(&good), BOTH);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (addr, server) = accept_one(tls.acceptor()).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("s.test").unwrap();
        let mut stream = connector.connect(name, tcp).await.unwrap();
        let mut data = Vec::new();
        // Reading to the end also takes the session ticket the server sent.
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut data).await.unwrap();
        kinds.push(stream.get_ref().1.handshake_kind());
        let accepted = server.await.unwrap().unwrap();
        assert_eq!(accepted.info.peer_uri_sans, vec![id.to_owned()]);
        assert_eq!(accepted.info.peer_cert_sha256, Some(sha256_hex(&good.der)));
    }
    assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]);
}

#[tokio::test]
async fn mtls_optional_lets_anonymous_clients_in_but_checks_presented_certs() {
    let pki = TestPki::new().unwrap();
    let foreign = TestPki::with_name("Foreign CA").unwrap();
    let tls = mtls(&pki, false);
    assert_eq!(tls.client_auth(), ClientAuthMode::Optional);
    let id = "spiffe://mesh.test/ns/default/sa/frontend";

    let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
    let (server, _) = handshake(tls.acceptor(), connector, "s.test").await;
    let info = server.unwrap().info;
    assert!(info.peer_uri_sans.is_empty() && info.peer_subject.is_none());

    let good = pki.client(id).unwrap();
    let connector = client_config(pki.ca_path(), ALPN, Some(&good), BOTH);
    let (server, _) = handshake(tls.acceptor(), connector, "s.test").await;
    assert_eq!(server.unwrap().info.peer_uri_sans, vec![id.to_owned()]);

    let bad = foreign.client(id).unwrap();
    let connector = client_config(pki.ca_path(), ALPN, Some(&bad), BOTH);
    let (server, _) = handshake(tls.acceptor(), connector, "s.test").await;
    assert_eq!(reason(&server), "unknown_ca");
}

#[tokio::test]
async fn reload_affects_new_handshakes_only() {
    let pki = TestPki::new().unwrap();
    let old = pki.server("old", &["s.test"]).unwrap();
    let new = pki.server("new", &["s.test"]).unwrap();
    let tls = ServerTls::from_config(&listener_tls(vec![old.files(&[])]), "l", same, ALPN).unwrap();
    // An acceptor made before the reload.
    let acceptor = tls.acceptor();

    // A connection established before the reload keeps working afterwards.
    let (addr, server) = accept_one(tls.acceptor()).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
    let name = rustls::pki_types::ServerName::try_from("s.test").unwrap();
    let mut early = connector.connect(name, tcp).await.unwrap();
    assert_eq!(early.get_ref().1.peer_certificates().unwrap()[0], old.der);

    tls.reload_certificates(&listener_tls(vec![new.files(&[])]), same).unwrap();
    let mut data = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut early, &mut data).await.unwrap();
    assert_eq!(data, b"hello");
    server.await.unwrap().unwrap();

    let (_, client) = handshake(acceptor, client_config(pki.ca_path(), ALPN, None, BOTH), "s.test").await;
    assert_eq!(client.unwrap().peer_leaf, Some(new.der.clone()));
    assert_eq!(tls.certificates()[0].sha256, sha256_hex(&new.der));

    // A failed reload changes nothing.
    let broken = listener_tls(vec![sluice_config::model::CertificateFiles {
        cert: pki.dir().join("missing.crt"),
        key: new.key.clone(),
        server_names: vec![],
    }]);
    let err = tls.reload_certificates(&broken, same).unwrap_err();
    assert_eq!(err.field(), "l.certificates[0].cert");
    assert_eq!(tls.certificates()[0].sha256, sha256_hex(&new.der));
}

#[tokio::test]
async fn metrics_count_handshakes_and_publish_expiry() {
    let pki = TestPki::new().unwrap();
    let cert = pki.server("s", &["s.test"]).unwrap();
    let mut cfg = listener_tls(vec![cert.files(&[])]);
    cfg.client_ca = Some(pki.ca_path().to_owned());
    cfg.require_client_certificate = true;
    let tls = ServerTls::from_config(&cfg, "l", same, ALPN).unwrap();
    let registry = prometheus::Registry::new();
    let metrics = sluice_tls::TlsMetrics::new(&registry).unwrap();
    metrics.observe_certificates("edge", &tls);

    let connector = client_config(pki.ca_path(), ALPN, None, BOTH);
    let (server, _) = handshake(tls.acceptor(), connector, "s.test").await;
    let err = server.unwrap_err();
    let label = metrics.handshake_failed(sluice_tls::Side::Downstream, "edge", &err);
    assert_eq!(label, "no_client_cert");
    metrics.handshake_ok(sluice_tls::Side::Downstream, "edge");

    let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
    assert!(
        text.contains(
            r#"sluice_tls_handshakes_total{name="edge",result="no_client_cert",side="downstream"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"sluice_tls_handshakes_total{name="edge",result="ok",side="downstream"} 1"#));
    let not_after = tls.certificates()[0].not_after_unix;
    assert!(text.contains(&format!(
        r#"sluice_tls_certificate_not_after_seconds{{certificate="l.certificates[0]",listener="edge"}} {not_after}"#
    )), "{text}");
}
