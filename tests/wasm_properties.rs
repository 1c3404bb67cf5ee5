//! End-to-end tests of the properties a filter reads of the route, the
//! upstream connection and the proxy's identity, in the `sluice proxy`
//! process: the `sink` fixture (upstream `proxy-wasm` crate) answers the
//! properties a request's `x-ask` names in `x-answer` (its response headers
//! phase), as it does on Envoy 1.40 with the same names (probed: the values
//! below are the shapes Envoy gave).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sluice_config::ListenerTls;
use sluice_tls::ServerTls;
use sluice_tls::test_certs::TestPki;
use support::{Sluice, echo_backend, eventually, get_with, sink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS backend (the test CA's `backend.test`) answering every HTTP/1.1
/// request 200 `secure`, with keep-alive. With its certificate's SHA-256.
async fn tls_backend(pki: &TestPki) -> (SocketAddr, String, tokio::task::JoinHandle<()>) {
    let server = pki.server("backend", &["backend.test"]).unwrap();
    let digest = sluice_tls::sha256_hex(&server.der);
    let cfg = ListenerTls {
        certificates: vec![server.files(&[])],
        client_ca: None,
        require_client_certificate: false,
    };
    let acceptor =
        ServerTls::from_config(&cfg, "backend", |p| p.to_path_buf(), &[b"http/1.1"]).unwrap().acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, digest, task)
}

fn config(node_id: &str, backend: SocketAddr, secure: SocketAddr, dead: SocketAddr, ca: &str) -> String {
    format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 2
node:
  id: {node_id}
  cluster: mesh-a
  metadata: {{ team: edge, replicas: 3, canary: true, nested: {{ x: "y" }}, zones: [z1, z2] }}
listeners:
  - name: main
    address: 127.0.0.1:0
    filters:
      - name: sink
        module: {module}
        config: cfg
        limits: {{ callback_timeout: 1s }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        metadata: {{ filter_metadata: {{ vh: {{ tier: gold }} }} }}
        routes:
          - name: to-dead
            match: {{ prefix: /dead }}
            forward: {{ cluster: dead }}
          - name: to-secure
            match: {{ prefix: /secure }}
            forward: {{ cluster: secure }}
          - name: to-bad-tls
            match: {{ prefix: /bad-tls }}
            forward: {{ cluster: bad-tls }}
          - name: main-route
            forward: {{ cluster: backend }}
            metadata: {{ filter_metadata: {{ acme: {{ role: admin, limits: {{ rps: 50 }} }} }} }}
clusters:
  - name: backend
    endpoints: ["{backend}"]
    metadata: {{ filter_metadata: {{ lb: {{ zone: z1 }} }} }}
  - name: dead
    endpoints: ["{dead}"]
  - name: secure
    endpoints: ["{secure}"]
    tls: {{ ca: {ca}, sni: backend.test }}
  - name: bad-tls
    endpoints: ["{backend}"]
    tls: {{ ca: {ca}, sni: backend.test }}
"#,
        module = sink().display()
    )
}

/// Status and the sink's answer for the properties `ask` names.
async fn ask(addr: SocketAddr, path: &str, ask: &str) -> (u16, Vec<String>) {
    let (status, headers, body) = get_with(addr, path, &[("x-ask", ask)]).await;
    let answer = headers.get("x-answer").unwrap_or_else(|| panic!("no x-answer: {status} {body}"));
    (status, answer.to_str().unwrap().split('|').map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_read_the_route_the_upstream_connection_and_the_node() {
    let pki = TestPki::new().unwrap();
    let backend = echo_backend().await;
    let (secure, digest, _tls_task) = tls_backend(&pki).await;
    // A port nothing listens on: the connection is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let ca = pki.ca_path().display().to_string();
    let proxy = Sluice::start(&config("node-1", backend.addr, secure, dead, &ca));
    let addr = proxy.addr("main");

    // The route's virtual host, the node, the listener's direction
    // (unspecified: 0, 8 bytes) and the connection's local address.
    let (status, answer) = ask(
        addr,
        "/plain",
        "xds.virtual_host_name,xds.route_name,xds.node.id,xds.node.cluster,xds.node.metadata.team,\
         xds.node.metadata.replicas,xds.node.metadata.canary,xds.node.metadata.nested.x,\
         xds.node.metadata.nope,xds.node.user_agent_name,xds.listener_direction,upstream.tls_version,\
         upstream.transport_failure_reason,upstream.local_address",
    )
    .await;
    assert_eq!(status, 200);
    let three = format!("0x{}", hex(&3.0f64.to_le_bytes()));
    assert_eq!(
        answer[..13],
        [
            "all",
            "main-route",
            "node-1",
            "mesh-a",
            "edge",
            three.as_str(),
            "0x01",
            "y",
            "-",
            "sluice",
            "0x0000000000000000",
            "-",
            "-"
        ]
    );
    let local: SocketAddr = answer[13].parse().unwrap_or_else(|_| panic!("{answer:?}"));
    assert_eq!(local.ip(), backend.addr.ip());
    assert!(local.port() != 0 && local.port() != backend.addr.port(), "{local}");
    // The route's, the virtual host's and the cluster's metadata.
    let metadata = "xds.route_metadata.filter_metadata.acme.role,xds.route_metadata.filter_metadata.acme.limits.rps,\
                    xds.virtual_host_metadata.filter_metadata.vh.tier,xds.cluster_metadata.filter_metadata.lb.zone";
    let fifty = format!("0x{}", hex(&50.0f64.to_le_bytes()));
    let (_, answer) = ask(addr, "/plain", metadata).await;
    assert_eq!(answer, ["admin", fifty.as_str(), "gold", "z1"]);
    // Another route and cluster, none of theirs; the virtual host's still.
    let (_, answer) = ask(addr, "/dead", metadata).await;
    assert_eq!(answer, ["-", "-", "gold", "-"]);
    // A list walked by index; the head's sizes; the cluster's endpoints.
    let (_, answer) = ask(
        addr,
        "/plain",
        "xds.node.metadata.zones.1,request.headers_bytes,response.headers_bytes,upstream.num_endpoints",
    )
    .await;
    assert_eq!(answer[0], "z2");
    let le =
        |v: &str| u64::from_str_radix(&v[2..], 16).map(u64::swap_bytes).unwrap_or_else(|_| panic!("{v}"));
    assert!(le(&answer[1]) > 20 && le(&answer[2]) > 20, "{answer:?}");
    assert_eq!(le(&answer[3]), 1, "{answer:?}");
    // The whole node: a serialized envoy.config.core.v3.Node (field 1, the id).
    let (_, answer) = ask(addr, "/plain", "xds.node").await;
    assert!(answer[0].starts_with(&format!("0x0a06{}", hex(b"node-1"))), "{answer:?}");

    // A refused connection: Envoy's reason, no local address; the 503 goes
    // through the filter's response phase.
    let (status, answer) =
        ask(addr, "/dead", "xds.route_name,upstream.transport_failure_reason,upstream.local_address").await;
    assert_eq!(status, 503);
    assert_eq!(answer, ["to-dead", "delayed connect error: Connection refused", "-"]);

    // TLS upstream: the session's version and the upstream's certificate.
    let (status, answer) = ask(
        addr,
        "/secure",
        "upstream.tls_version,upstream.dns_san_peer_certificate,upstream.sha256_peer_certificate_digest,\
         upstream.uri_san_peer_certificate,upstream.subject_peer_certificate",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer[..2], ["TLSv1.3", "backend.test"]);
    assert_eq!(answer[2], digest);
    assert_eq!(answer[3..], ["-", "CN=backend"], "no URI SAN; the subject");

    // A TLS handshake with a cleartext server fails: the reason says TLS.
    let (status, answer) = ask(addr, "/bad-tls", "upstream.transport_failure_reason").await;
    assert_eq!(status, 503);
    assert!(answer[0].starts_with("TLS error: "), "{answer:?}");

    // The node is config: a reload's new filters read the new one.
    proxy.write_config(&config("node-2", backend.addr, secure, dead, &ca));
    eventually(Duration::from_secs(20), || async {
        let (_, answer) = ask(addr, "/plain", "xds.node.id").await;
        (answer == ["node-2"]).then_some(())
    })
    .await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
