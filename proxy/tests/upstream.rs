//! Upstream connections: TLS to the upstream (CA check, SNI, client
//! certificate for mTLS), h2 over TLS, and DNS-named endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::{CertificateFiles, ListenerTls};
use sluice_tls::ServerTls;
use sluice_tls::test_certs::TestPki;

/// A TLS backend requiring a client certificate signed by the test CA. It
/// answers with the SNI it saw, the client's URI SAN and the HTTP version.
async fn tls_backend(pki: &TestPki) -> SocketAddr {
    let server = pki.server("backend", &["backend.test"]).unwrap();
    let cfg = ListenerTls {
        certificates: vec![CertificateFiles { cert: server.cert, key: server.key, server_names: vec![] }],
        client_ca: Some(pki.ca_path().to_path_buf()),
        require_client_certificate: true,
    };
    let tls = Arc::new(
        ServerTls::from_config(&cfg, "backend", |p| p.to_path_buf(), &[b"h2", b"http/1.1"]).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.acceptor().accept(tcp).await else { return };
                let info = sluice_tls::tls_info(stream.get_ref().1);
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let info = info.clone();
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from("secure")));
                        let h = r.headers_mut();
                        h.insert("x-sni", info.server_name.clone().unwrap_or_default().parse().unwrap());
                        h.insert("x-peer", info.peer_uri_sans.join(",").parse().unwrap());
                        h.insert("x-version", format!("{:?}", req.version()).parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn tls_cluster(
    addr: SocketAddr,
    pki: &TestPki,
    client: &sluice_tls::test_certs::CertPaths,
    protocol: &str,
) -> String {
    backend_cluster(
        &[addr],
        &format!(
            "protocol: {protocol}\ntls:\n  ca: {}\n  sni: backend.test\n  client_certificate: {{ cert: {}, key: {} }}",
            pki.ca_path().display(),
            client.cert.display(),
            client.key.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mtls_with_sni_over_http1_and_h2() {
    let pki = TestPki::new().unwrap();
    let backend = tls_backend(&pki).await;
    let client = pki.client("spiffe://mesh.test/ns/default/sa/sluice").unwrap();
    for (protocol, version) in [("http1", "HTTP/1.1"), ("http2", "HTTP/2.0")] {
        let yaml = config_yaml(
            2,
            "",
            "- forward: { cluster: backend }",
            &tls_cluster(backend, &pki, &client, protocol),
        );
        let p = TestProxy::start(&yaml).await;
        let (parts, body) = get(p.addr("main"), "/").await;
        assert_eq!(parts.status, 200, "{protocol}");
        assert_eq!(&body[..], b"secure");
        assert_eq!(parts.headers["x-sni"], "backend.test");
        assert_eq!(parts.headers["x-peer"], "spiffe://mesh.test/ns/default/sa/sluice");
        assert_eq!(parts.headers["x-version"], version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_from_a_foreign_ca_is_refused() {
    let pki = TestPki::new().unwrap();
    let other = TestPki::new().unwrap();
    let backend = tls_backend(&other).await;
    let client = pki.client("spiffe://mesh.test/ns/default/sa/sluice").unwrap();
    let yaml =
        config_yaml(1, "", "- forward: { cluster: backend }", &tls_cluster(backend, &pki, &client, "http1"));
    let p = TestProxy::start(&yaml).await;
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["x-sluice-reason"], "upstream_connect_failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_rejects_the_config_naming_the_field() {
    let yaml = config_yaml(
        1,
        "",
        "- forward: { cluster: backend }",
        &backend_cluster(&["127.0.0.1:9".parse().unwrap()], "tls: { ca: /nonexistent/ca.pem }"),
    );
    let snapshot = sluice_config::Snapshot::from_yaml(
        &yaml.replace("{admin}", "127.0.0.1:0"),
        "t.yaml",
        std::path::Path::new("/"),
    )
    .unwrap();
    let err = sluice_proxy::Proxy::start(
        snapshot,
        sluice_proxy::ProxyOptions { registry: prometheus::Registry::new(), loader: None, callouts: None },
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("clusters[0].tls") && err.contains("/nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_named_endpoints_are_resolved() {
    let backend = Backend::named("by-name").await;
    let ep = format!("\"localhost:{}\"", backend.addr.port());
    let yaml = config_yaml(
        1,
        "",
        "- forward: { cluster: backend }",
        &format!("- name: backend\n  endpoints: [{ep}]\n  dns_refresh: 100ms\n"),
    );
    let p = TestProxy::start(&yaml).await;
    let addr = p.addr("main");
    // The first resolution runs in the background after start.
    eventually("the DNS-named endpoint answers", std::time::Duration::from_secs(30), || async move {
        let (parts, body) = get(addr, "/").await;
        parts.status == 200 && &body[..] == b"by-name"
    })
    .await;
}
