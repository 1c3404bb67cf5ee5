//! Sluice's own HTTP/1.1 upstream client, end to end against raw TCP
//! upstreams that speak exactly the bytes each case needs: connection reuse,
//! a pooled connection the upstream drops, `1xx` heads, bodies read until
//! close, chunked trailers, and a full-duplex exchange.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(backend: SocketAddr) -> String {
    simple_config(&[backend])
}

/// A keep-alive upstream answering every request on a connection with `ok`.
async fn keep_alive_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        loop {
            let head = read_head(&mut s).await;
            if head.is_empty() {
                return;
            }
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let b = keep_alive_backend().await;
    let p = TestProxy::start(&config(b.addr)).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..5 {
        let (parts, body) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(body, "ok");
    }
    assert_eq!(b.accepted(), 1, "the pooled connection carries every request");
}

/// Sends `n` GETs at once over two h2c connections and checks each is a 200.
async fn burst(addr: SocketAddr, n: usize) {
    let conns = [h2_connect(addr).await, h2_connect(addr).await];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut c = conns[i % 2].clone();
        let req = Request::get(format!("http://x/{i}")).body(Full::new(Bytes::new())).unwrap();
        tasks.spawn(async move { send2(&mut c, req).await.0.status });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
}

/// A backend where every request waits until `n` requests are waiting, so a
/// burst of `n` needs `n` connections at once.
async fn barrier_backend(n: usize) -> RawBackend {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    RawBackend::start(move |mut s| {
        let barrier = barrier.clone();
        async move {
            loop {
                if read_head(&mut s).await.is_empty() {
                    return;
                }
                barrier.wait().await;
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// Two bursts of `n` against a one-worker proxy with `pool` settings.
async fn two_bursts(n: usize, pool: &str) -> (RawBackend, String) {
    let b = barrier_backend(n).await;
    let yaml = config_yaml(1, "", "- forward: { cluster: backend }", &backend_cluster(&[b.addr], pool));
    let p = TestProxy::start(&yaml).await;
    let within = std::time::Duration::from_secs(60);
    for round in 1..=2 {
        tokio::time::timeout(within, burst(p.addr("main"), n)).await.unwrap_or_else(|_| {
            panic!("burst {round} did not complete: {} upstream connections", b.accepted())
        });
    }
    let m = p.metrics().await;
    (b, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_a_burst_opened_are_reused_by_the_next_burst() {
    // With the default pool every connection of the first burst is kept and
    // the second burst opens none (a cap below `N` would close some and
    // reopen them).
    const N: usize = 200;
    let (b, m) = two_bursts(N, "").await;
    assert_eq!(b.accepted(), N, "the second burst reused the first burst's connections");
    assert_eq!(metric(&m, r#"sluice_upstream_connections_total{cluster="backend"}"#), N as f64);
    assert_eq!(metric(&m, r#"sluice_upstream_pool_overflow_total{cluster="backend"}"#), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_idle_pool_closes_and_counts_the_connections_it_cannot_keep() {
    // Cap 2, bursts of 5: each burst ends with 3 connections closed (counted)
    // and the next burst opens 3 again.
    let (b, m) = two_bursts(5, "pool: { max_idle_per_endpoint: 2 }").await;
    assert_eq!(b.accepted(), 8);
    assert_eq!(metric(&m, r#"sluice_upstream_connections_total{cluster="backend"}"#), 8.0);
    assert_eq!(metric(&m, r#"sluice_upstream_pool_overflow_total{cluster="backend"}"#), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_drops_is_replaced_without_an_error() {
    // Each connection answers its first request, then closes on the second
    // without a byte of response: the race of an upstream's idle timeout.
    let b = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        read_head(&mut s).await;
    })
    .await;
    let p = TestProxy::start(&config(b.addr)).await;
    let mut c = h1_connect(p.addr("main")).await;
    for i in 1..=3 {
        let (parts, body) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200, "request {i}");
        assert_eq!(body, "ok");
    }
    assert_eq!(b.accepted(), 3, "requests 2 and 3 were sent again on fresh connections");
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_local_replies_total{reason="upstream_reset"}"#), 0.0);
    assert_eq!(metric(&m, r#"sluice_upstream_stale_connection_resends_total{cluster="backend"}"#), 2.0);
}

/// A backend that never answers and reports, per connection, when the proxy
/// closed it (read returned EOF after the request head).
async fn silent_backend() -> (RawBackend, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut s| {
        let tx = tx.clone();
        async move {
            read_head(&mut s).await;
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    (b, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_that_goes_away_mid_request_cancels_the_upstream_exchange() {
    // As in Envoy and nginx (proxy_ignore_client_abort off): a client that
    // disconnects while its request waits frees the upstream connection at
    // once instead of leaving it busy until the upstream answers.
    let (b, mut closed) = silent_backend().await;
    let p = TestProxy::start(&config(b.addr)).await;
    let within = std::time::Duration::from_secs(10);

    // HTTP/1.1: the client closes its connection.
    let mut s = tokio::net::TcpStream::connect(p.addr("main")).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    eventually("the upstream saw the request", within, || async { b.accepted() == 1 }).await;
    drop(s);
    tokio::time::timeout(within, closed.recv())
        .await
        .expect("upstream closed after the HTTP/1.1 client left");

    // HTTP/2: the client resets the stream (dropping the response future).
    let mut c = h2_connect(p.addr("main")).await;
    c.ready().await.unwrap();
    let req = Request::get("http://x/slow").body(Full::new(Bytes::new())).unwrap();
    let pending = tokio::spawn(c.send_request(req));
    eventually("the upstream saw the second request", within, || async { b.accepted() == 2 }).await;
    pending.abort();
    tokio::time::timeout(within, closed.recv()).await.expect("upstream closed after the HTTP/2 stream reset");
    // The HTTP/2 connection itself stays usable.
    assert!(c.ready().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_heads_are_skipped() {
    let b = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone")
            .await;
        read_head(&mut s).await;
    })
    .await;
    let p = TestProxy::start(&config(b.addr)).await;
    let (parts, body) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 201);
    assert_eq!(body, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_delimited_by_close_is_read_to_the_end_and_the_connection_not_reused() {
    let b = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ").await;
        let _ = s.write_all(b"the end").await;
    })
    .await;
    let p = TestProxy::start(&config(b.addr)).await;
    for _ in 0..2 {
        let (parts, body) = get(p.addr("main"), "/").await;
        assert_eq!(parts.status, 200);
        assert_eq!(body, "until the end");
    }
    assert_eq!(b.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_trailers_reach_an_h2_downstream() {
    let b = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n")
            .await;
        read_head(&mut s).await;
    })
    .await;
    let p = TestProxy::start(&config(b.addr)).await;
    let addr = p.addr("main");
    let req = Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new())).unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), "hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_is_full_duplex() {
    // The upstream answers at once, then echoes each request chunk as it comes:
    // the downstream reads the echo of one chunk before it sends the next.
    let b = RawBackend::start(|mut s| async move {
        let head = read_head(&mut s).await;
        assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
        // The request body's chunked framing is the response's: echo the bytes.
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            s.write_all(&buf[..n]).await.unwrap();
        }
    })
    .await;
    let p = TestProxy::start(&config(b.addr)).await;
    let tcp = tokio::net::TcpStream::connect(p.addr("main")).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post("http://x/echo").body(()).unwrap();
    let (resp, mut up) = client.send_request(req, false).unwrap();
    up.send_data(Bytes::from_static(b"ping1"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut down = resp.into_body();
    for (i, next) in ["ping2", "ping3"].into_iter().enumerate() {
        let chunk = down.data().await.unwrap().unwrap();
        let _ = down.flow_control().release_capacity(chunk.len());
        assert_eq!(chunk, format!("ping{}", i + 1), "echo arrives before the next chunk is sent");
        up.send_data(Bytes::from(next), false).unwrap();
    }
    let chunk = down.data().await.unwrap().unwrap();
    assert_eq!(chunk, "ping3");
    up.send_data(Bytes::new(), true).unwrap();
    // The end (h2 may deliver it as an empty DATA frame with END_STREAM).
    while let Some(rest) = down.data().await {
        assert_eq!(rest.unwrap(), "", "nothing after the echo");
    }
}

/// An upstream whose response head has mixed-case names, repeated fields and
/// hop-by-hop fields (one named by `connection`), on every request.
async fn mixed_head_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\nServer: raw\r\nSet-Cookie: a=1\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(head).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_fields_keep_the_upstreams_order_and_case_without_hop_by_hop_ones() {
    let b = mixed_head_backend().await;
    let routes = "- match: { prefix: /edited }\n  forward: { cluster: backend }\n  response_headers: { set: { x-edited: \"1\", date: \"x\" }, add: { set-cookie: c=3 }, remove: [server] }\n- forward: { cluster: backend }";
    let p = TestProxy::start(&config_yaml(1, "", routes, &backend_cluster(&[b.addr], ""))).await;

    // Nothing reads or edits the fields: they pass as the upstream wrote them.
    let (lines, body) = head_lines(p.addr("main"), "/").await;
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 OK",
            "Server: raw",
            "Set-Cookie: a=1",
            "Set-Cookie: b=2",
            "Date: Mon, 30 Nov 2026 06:00:00 GMT",
            "Content-Length: 2",
            "connection: close",
        ]
    );
    assert_eq!(body, "ok");

    // A route's edits apply to them: removed and replaced fields go, set and
    // added ones follow the upstream's (as appended to a map).
    let (lines, body) = head_lines(p.addr("main"), "/edited").await;
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 OK",
            "Set-Cookie: a=1",
            "Set-Cookie: b=2",
            "Content-Length: 2",
            "date: x",
            "x-edited: 1",
            "set-cookie: c=3",
            "connection: close",
        ]
    );
    assert_eq!(body, "ok");

    // An HTTP/2 downstream gets the same end-to-end fields.
    let mut c = h2_connect(p.addr("main")).await;
    let (parts, body) = send2(&mut c, Request::get("http://x/").body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(parts.status, 200);
    let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(!parts.headers.contains_key("x-private") && !parts.headers.contains_key("keep-alive"));
    assert_eq!(body, "ok");
    let (parts, _) =
        send2(&mut c, Request::get("http://x/edited").body(Full::new(Bytes::new())).unwrap()).await;
    let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2", "c=3"], "the map path appends too");
    assert!(!parts.headers.contains_key("server"));
    assert_eq!(
        (&parts.headers["x-edited"], &parts.headers["date"]),
        (&"1".parse::<http::HeaderValue>().unwrap(), &"x".parse::<http::HeaderValue>().unwrap())
    );
}

/// A `GET path` over a fresh connection: the response head's lines (status
/// line first) and the body.
async fn head_lines(addr: SocketAddr, path: &str) -> (Vec<String>, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let out = raw(addr, req.as_bytes()).await;
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
    (head.split("\r\n").map(str::to_owned).collect(), body.to_owned())
}
