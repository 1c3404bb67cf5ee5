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

/// Opens `n` HTTP/1.1 connections to `addr` one after the other, each serving
/// a request before the next opens (so the proxy has placed it), and keeps them.
async fn open_served(addr: std::net::SocketAddr, n: usize, open: &mut Vec<H1>) {
    for _ in 0..n {
        let mut c = h1_connect(addr).await;
        let (parts, body) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"b");
        open.push(c);
    }
}

/// `sluice_downstream_connections_per_worker` of listener `main`, workers 0..n.
fn per_worker(m: &str, n: usize) -> Vec<f64> {
    (0..n)
        .map(|w| {
            metric(
                m,
                &format!("sluice_downstream_connections_per_worker{{listener=\"main\",worker=\"{w}\"}}"),
            )
        })
        .collect()
}

/// A listener's connections are spread evenly over the workers
/// (`connection_balance: exact`, the default) whatever socket the kernel's
/// `SO_REUSEPORT` hash picks. Each connection serves a request before the
/// next one opens, so every count is settled when it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_evenly_over_workers() {
    let backend = Backend::named("b").await;
    let clusters = backend_cluster(&[backend.addr], "");
    let p = TestProxy::start(&config_yaml(3, "", "- forward: { cluster: backend }", &clusters)).await;
    let addr = p.addr("main");
    let mut open = Vec::new();
    open_served(addr, 12, &mut open).await;
    let m = p.metrics().await;
    assert_eq!(per_worker(&m, 3), vec![4.0, 4.0, 4.0], "{m}");
    assert_eq!(metric(&m, "sluice_downstream_connections_total{listener=\"main\"}"), 12.0);

    // Closing connections frees their workers' shares: the next ones fill them.
    open.truncate(6);
    eventually("closed connections leave the counts", std::time::Duration::from_secs(30), || async {
        metric(&p.metrics().await, "sluice_downstream_connections_active{listener=\"main\"}") == 6.0
    })
    .await;
    open_served(addr, 6, &mut open).await;
    let m = p.metrics().await;
    assert_eq!(per_worker(&m, 3), vec![4.0, 4.0, 4.0], "{m}");
}

/// `connection_balance: kernel`: the `SO_REUSEPORT` hash alone decides, and no
/// connection is handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_balance_keeps_connections_where_accepted() {
    let backend = Backend::named("b").await;
    let clusters = backend_cluster(&[backend.addr], "");
    let listener = "connection_balance: kernel\n";
    let p = TestProxy::start(&config_yaml(2, listener, "- forward: { cluster: backend }", &clusters)).await;
    let mut open = Vec::new();
    open_served(p.addr("main"), 8, &mut open).await;
    let m = p.metrics().await;
    assert_eq!(metric(&m, "sluice_downstream_connections_rebalanced_total{listener=\"main\"}"), 0.0, "{m}");
    assert_eq!(per_worker(&m, 2).iter().sum::<f64>(), 8.0, "{m}");
}
