//! End-to-end HTTP behaviour of the data plane: real backends, real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_http1_and_h2c() {
    let backend = Backend::named("b1").await;
    let p = TestProxy::start(&simple_config(&[backend.addr])).await;
    let addr = p.addr("main");

    let (parts, body) = get(addr, "/hello?x=1").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"b1");
    assert_eq!(parts.headers["x-path"], "/hello?x=1");
    assert!(parts.headers.contains_key("x-echo-x-request-id"));
    assert!(parts.headers.contains_key("x-echo-traceparent"));
    assert_eq!(parts.headers["x-echo-x-forwarded-for"], "127.0.0.1");

    let req = Request::get(format!("http://{addr}/h2")).body(Full::new(Bytes::new())).unwrap();
    let (parts, body) = send(&h2_client(), req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, http::Version::HTTP_2);
    assert_eq!(&body[..], b"b1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_with_reason() {
    let backend = Backend::named("b1").await;
    let yaml = simple_config(&[backend.addr]).replace(r#"domains: ["*"]"#, r#"domains: ["api.example.com"]"#);
    let p = TestProxy::start(&yaml).await;
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 404);
    assert_eq!(parts.headers["x-sluice-reason"], "no_route");
    assert!(p.metrics().await.contains(r#"sluice_local_replies_total{reason="no_route"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_503() {
    // Bind then drop, so the port refuses connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let p = TestProxy::start(&simple_config(&[dead])).await;
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["x-sluice-reason"], "upstream_connect_failure");
}
