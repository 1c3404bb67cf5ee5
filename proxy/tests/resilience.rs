//! Retries, timeouts, circuit breaking and the mapping of upstream failures to
//! downstream answers, end to end against real (and deliberately broken) upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One listener, one route to cluster `backend` with `forward_extra` in its
/// `forward` map and `cluster_extra` lines in the cluster.
fn config(backends: &[SocketAddr], forward_extra: &str, cluster_extra: &str) -> String {
    let route = format!("- forward: {{ cluster: backend {forward_extra} }}");
    config_yaml(1, "", &route, &backend_cluster(backends, cluster_extra))
}

/// A backend answering `codes[i]` to its i-th request (the last code afterwards),
/// echoing the request body.
async fn scripted(codes: &'static [u16]) -> Backend {
    let n = Arc::new(AtomicUsize::new(0));
    Backend::start(move |req| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let code = codes[i.min(codes.len() - 1)];
            let mut r = Response::new(Full::new(req.into_body()));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r
        }
    })
    .await
}

const FAST_BACKOFF: &str = "backoff: { base: 1ms, max: 2ms }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_until_success_within_attempts() {
    let b = scripted(&[503, 500, 200]).await;
    let retry = format!(", retry: {{ on: [5xx], attempts: 3, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 200);
    assert_eq!(b.hits(), 3);
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_retries_total{cluster="backend"}"#), 2.0);

    // Attempts bound the retries: the last answer goes downstream.
    let always = Backend::status(500).await;
    let retry = format!(", retry: {{ on: [5xx], attempts: 2, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[always.addr], &retry, "")).await;
    let (parts, body) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 500);
    assert_eq!(&body[..], b"status 500", "the upstream's own answer, not a proxy error");
    assert_eq!(always.hits(), 3, "1 try + 2 retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_error_and_retriable_status_conditions() {
    let retry = format!(", retry: {{ on: [gateway-error], attempts: 2, {FAST_BACKOFF} }}");
    // 500 is not a gateway error: not retried.
    let b = scripted(&[500, 200]).await;
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    assert_eq!(get(p.addr("main"), "/").await.0.status, 500);
    assert_eq!(b.hits(), 1);
    // 502, 503 and 504 are.
    let b = scripted(&[502, 504, 200]).await;
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    assert_eq!(get(p.addr("main"), "/").await.0.status, 200);
    assert_eq!(b.hits(), 3);
    // retriable-status retries exactly the listed codes.
    let retry =
        format!(", retry: {{ on: [retriable-status], statuses: [409], attempts: 2, {FAST_BACKOFF} }}");
    let b = scripted(&[409, 200]).await;
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    assert_eq!(get(p.addr("main"), "/").await.0.status, 200);
    assert_eq!(b.hits(), 2);
    let b = scripted(&[503, 200]).await;
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    assert_eq!(get(p.addr("main"), "/").await.0.status, 503);
    assert_eq!(b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_endpoint() {
    let live = Backend::named("live").await;
    let dead = dead_addr();
    // Without retries, round robin sends every other request to the dead endpoint.
    let p = TestProxy::start(&config(&[dead, live.addr], "", "")).await;
    let mut c = h1_connect(p.addr("main")).await;
    let mut failed = 0;
    for _ in 0..10 {
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        if parts.status == 503 {
            assert_eq!(parts.headers["x-sluice-reason"], "upstream_connect_failure");
            failed += 1;
        }
    }
    assert_eq!(failed, 5);
    // With them, every request succeeds: the retry avoids the endpoint that failed.
    let retry = format!(", retry: {{ on: [connect-failure], attempts: 1, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[dead, live.addr], &retry, "")).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..10 {
        let (parts, body) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"live");
    }
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_retries_total{cluster="backend"}"#), 5.0);
    assert_eq!(metric(&m, r#"sluice_upstream_connect_failures_total{cluster="backend"}"#), 5.0);
}

/// A raw upstream that reads a request head and then closes without answering;
/// with `rst`, it aborts the connection (RST) instead of closing it (FIN).
async fn hang_up(rst: bool) -> RawBackend {
    RawBackend::start(move |mut s| async move {
        read_head(&mut s).await;
        if rst {
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_are_502_and_retried_with_reset() {
    let live = Backend::named("live").await;
    for rst in [false, true] {
        let bad = hang_up(rst).await;
        let p = TestProxy::start(&config(&[bad.addr], "", "")).await;
        let (parts, _) = get(p.addr("main"), "/").await;
        assert_eq!(parts.status, 502, "rst={rst}");
        assert_eq!(parts.headers["x-sluice-reason"], "upstream_reset");

        let retry = format!(", retry: {{ on: [reset], attempts: 1, {FAST_BACKOFF} }}");
        let p = TestProxy::start(&config(&[bad.addr, live.addr], &retry, "")).await;
        let mut c = h1_connect(p.addr("main")).await;
        for _ in 0..6 {
            let (parts, _) = send1(&mut c, get_req("x", "/")).await;
            assert_eq!(parts.status, 200, "rst={rst}");
        }
        assert_eq!(bad.accepted(), 4, "every other first attempt went to the resetting endpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_on_and_route_timeout_caps_the_whole() {
    let hang = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let live = Backend::named("live").await;
    // 1 s per try: the try that reaches `live` must also answer within it, on a
    // loaded machine too; the hanging endpoint holds for 30 s.
    let retry = format!(", retry: {{ on: [reset], attempts: 1, per_try_timeout: 1s, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[hang.addr, live.addr], &retry, "")).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..4 {
        let t = Instant::now();
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200);
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }
    assert_eq!(hang.accepted(), 2);

    // Per-try timeouts on every attempt: 504 after (1 + attempts) × per_try.
    let retry = format!(", retry: {{ on: [reset], attempts: 2, per_try_timeout: 100ms, {FAST_BACKOFF} }}");
    let hang2 = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let p = TestProxy::start(&config(&[hang2.addr], &retry, "")).await;
    let t = Instant::now();
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 504);
    assert_eq!(parts.headers["x-sluice-reason"], "upstream_timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(hang2.accepted(), 3);

    // The route timeout covers all attempts: without it, the first try alone
    // would take its 5 s per-try timeout.
    let retry = format!(
        ", timeout: 300ms, retry: {{ on: [reset], attempts: 5, per_try_timeout: 5s, {FAST_BACKOFF} }}"
    );
    let p = TestProxy::start(&config(&[hang2.addr], &retry, "")).await;
    let t = Instant::now();
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 504);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_is_504_and_the_proxy_keeps_serving() {
    let slow = Backend::start(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Response::new(Full::new(Bytes::from("ok")))
    })
    .await;
    // 1 s: the `/fast` requests, under the same timeout, must answer within it
    // on a loaded machine; `/slow` holds for 30 s.
    let p = TestProxy::start(&config(&[slow.addr], ", timeout: 1s", "")).await;
    let mut c = h1_connect(p.addr("main")).await;
    let t = Instant::now();
    let (parts, body) = send1(&mut c, get_req("x", "/slow")).await;
    assert_eq!(parts.status, 504);
    assert_eq!(parts.headers["x-sluice-reason"], "upstream_timeout");
    assert_eq!(&body[..], b"upstream request timeout\n");
    assert!(t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(10));
    // The same downstream connection keeps working.
    let (parts, _) = send1(&mut c, get_req("x", "/fast")).await;
    assert_eq!(parts.status, 200);
    // Its next request times out again on time: the connection's timer, moved
    // request after request, fires at the latest deadline.
    let t = Instant::now();
    let (parts, _) = send1(&mut c, get_req("x", "/slow")).await;
    assert_eq!(parts.status, 504);
    assert!(t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(10));
    let (parts, _) = send1(&mut c, get_req("x", "/fast")).await;
    assert_eq!(parts.status, 200);
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_local_replies_total{reason="upstream_timeout"}"#), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_not_retried_unless_configured() {
    let body = Bytes::from_static(b"{\"order\": 1}");
    let post = |addr: SocketAddr, body: Bytes| {
        Request::post(format!("http://{addr}/orders"))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap()
    };
    let b = scripted(&[503, 503, 200]).await;
    let retry = format!(", retry: {{ on: [5xx], attempts: 2, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    let (parts, _) = send(&h1_client(), post(p.addr("main"), body.clone())).await;
    assert_eq!(parts.status, 503);
    assert_eq!(b.hits(), 1, "a POST is not retried by default");
    // Idempotent methods with a body are retried, and the body is replayed.
    let put =
        Request::put(format!("http://{}/orders/1", p.addr("main"))).body(Full::new(body.clone())).unwrap();
    let (parts, echoed) = send(&h1_client(), put).await;
    assert_eq!(parts.status, 200);
    assert_eq!(echoed, body);
    assert_eq!(b.hits(), 3);

    let b = scripted(&[503, 200]).await;
    let retry = format!(", retry: {{ on: [5xx], attempts: 2, retry_non_idempotent: true, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    let (parts, echoed) = send(&h1_client(), post(p.addr("main"), body.clone())).await;
    assert_eq!(parts.status, 200);
    assert_eq!(echoed, body, "the retried POST carries the same body");
    assert_eq!(b.hits(), 2);

    // A body larger than max_body_bytes is streamed once, not buffered for replay.
    let b = scripted(&[503, 200]).await;
    let retry = format!(
        ", retry: {{ on: [5xx], attempts: 2, retry_non_idempotent: true, max_body_bytes: 4, {FAST_BACKOFF} }}"
    );
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    let (parts, _) = send(&h1_client(), post(p.addr("main"), body.clone())).await;
    assert_eq!(parts.status, 503);
    assert_eq!(b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_limits_retries() {
    let b = Backend::status(503).await;
    // No ratio, a floor of 1 retry/s over the 10 s window: 10 retries in all.
    let retry = format!(
        ", retry: {{ on: [5xx], attempts: 1, {FAST_BACKOFF}, budget: {{ ratio: 0.0, min_per_second: 1 }} }}"
    );
    let p = TestProxy::start(&config(&[b.addr], &retry, "")).await;
    let mut c = h1_connect(p.addr("main")).await;
    for i in 0..25 {
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 503, "request {i}: {:?}", parts.headers);
    }
    assert_eq!(b.hits(), 25 + 10);
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_retries_total{cluster="backend"}"#), 10.0);
    assert_eq!(metric(&m, r#"sluice_upstream_retry_budget_exhausted_total{cluster="backend"}"#), 15.0);
}

async fn assert_fast_503(addr: SocketAddr, limit: &str) {
    let t = Instant::now();
    let (parts, body) = get(addr, "/").await;
    assert_eq!(parts.status, 503, "{limit}");
    assert_eq!(parts.headers["x-sluice-reason"], "circuit_open", "{limit}");
    assert_eq!(&body[..], b"upstream overflow\n");
    // What is held (the first request, a pending connection) holds for 5 s or more.
    assert!(t.elapsed() < Duration::from_secs(2), "{limit}: rejection took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_max_requests_and_max_connections() {
    for (limit, breaker) in [
        ("requests", "circuit_breaker: { max_requests: 1 }"),
        // A local overflow is not the endpoint's fault: outlier detection must not eject it.
        (
            "connections",
            "circuit_breaker: { max_connections: 1 }\noutlier_detection: { consecutive_gateway_errors: 1 }",
        ),
    ] {
        let release = Arc::new(tokio::sync::Notify::new());
        let b = Backend::holding("b", release.clone()).await;
        let p = TestProxy::start(&config(&[b.addr], "", breaker)).await;
        let addr = p.addr("main");
        let first = tokio::spawn(async move { get(addr, "/hold").await.0.status });
        eventually("the first request is in flight", Duration::from_secs(30), || async { b.hits() == 1 })
            .await;
        assert_fast_503(addr, limit).await;
        assert_eq!(b.hits(), 1, "{limit}: the rejected request never reached the upstream");
        release.notify_waiters();
        assert_eq!(first.await.unwrap(), 200);
        let m = p.metrics().await;
        let series =
            format!(r#"sluice_circuit_breaker_rejections_total{{cluster="backend",limit="{limit}"}}"#);
        assert_eq!(metric(&m, &series), 1.0, "{limit}");
        // Capacity is back once the first exchange ended.
        assert_eq!(get(addr, "/").await.0.status, 200, "{limit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_max_pending_requests() {
    // A TLS cluster whose upstream accepts TCP but never answers the handshake,
    // so the first request stays pending on its connection.
    let pki = sluice_tls::test_certs::TestPki::new().unwrap();
    let silent = RawBackend::start(|mut s| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let extra = format!(
        "connect_timeout: 5s\ncircuit_breaker: {{ max_pending_requests: 1 }}\ntls: {{ ca: \"{}\", sni: localhost }}",
        pki.ca_path().display()
    );
    let p = TestProxy::start(&config(&[silent.addr], "", &extra)).await;
    let addr = p.addr("main");
    let first = tokio::spawn(async move { get(addr, "/").await.0 });
    eventually("the first connection is pending", Duration::from_secs(30), || async {
        silent.accepted() == 1
    })
    .await;
    assert_fast_503(addr, "pending").await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 503);
    assert_eq!(first.headers["x-sluice-reason"], "upstream_connect_timeout");
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, r#"sluice_circuit_breaker_rejections_total{cluster="backend",limit="pending"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_upstream_is_502() {
    let garbage = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\nnot http at all").await;
    })
    .await;
    let p = TestProxy::start(&config(&[garbage.addr], "", "")).await;
    let (parts, _) = get(p.addr("main"), "/").await;
    assert_eq!(parts.status, 502);
    assert_eq!(parts.headers["x-sluice-reason"], "upstream_protocol_error");
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_local_replies_total{reason="upstream_protocol_error"}"#), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_response_resets_downstream() {
    let partial = RawBackend::start(|mut s| async move {
        let head = read_head(&mut s).await;
        if head.starts_with("GET /ok") {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            let _ = read_head(&mut s).await;
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n").await;
        let _ = s.write_all(&[b'x'; 1000]).await;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    })
    .await;
    let p = TestProxy::start(&config(&[partial.addr], "", "")).await;
    let addr = p.addr("main");
    // HTTP/1.1: the status already went out, so the body is cut short.
    let mut c = h1_connect(addr).await;
    c.ready().await.unwrap();
    let resp = c.send_request(get_req("x", "/big")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "a truncated body must not look complete");
    // HTTP/2: the stream is reset.
    let mut c2 = h2_connect(addr).await;
    let req = Request::get(format!("http://{addr}/big")).body(Full::new(Bytes::new())).unwrap();
    c2.ready().await.unwrap();
    let resp = c2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err());
    // The h2 connection survives the reset stream.
    let req = Request::get(format!("http://{addr}/ok")).body(Full::new(Bytes::new())).unwrap();
    let (parts, body) = send2(&mut c2, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_circuit_breaker_limits_retries_in_flight() {
    // Each path fails its first attempt at once and holds its retry until released.
    let release = Arc::new(tokio::sync::Notify::new());
    let r2 = release.clone();
    let attempts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let b = Backend::start(move |req| {
        let release = r2.clone();
        let n = {
            let mut m = attempts.lock().unwrap();
            let n = m.entry(req.uri().path().to_owned()).or_default();
            *n += 1;
            *n
        };
        async move {
            let mut r = Response::new(Full::new(Bytes::from("x")));
            if n == 1 {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            } else {
                release.notified().await;
            }
            r
        }
    })
    .await;
    let retry = format!(", timeout: 5s, retry: {{ on: [5xx], attempts: 1, {FAST_BACKOFF} }}");
    let p = TestProxy::start(&config(&[b.addr], &retry, "circuit_breaker: { max_retries: 1 }")).await;
    let addr = p.addr("main");
    let first = tokio::spawn(async move { get(addr, "/one").await.0.status });
    eventually("the first retry is in flight", Duration::from_secs(30), || async { b.hits() == 2 }).await;
    // A second request needing a retry while one is in flight: the retry is refused
    // and the upstream's own answer comes back at once.
    let t = Instant::now();
    let (parts, _) = get(addr, "/two").await;
    assert_eq!(parts.status, 503);
    assert!(!parts.headers.contains_key("x-sluice-reason"), "the upstream's 503, not a proxy one");
    // A retry would be held until the 5 s route timeout.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(b.hits(), 3);
    release.notify_waiters();
    assert_eq!(first.await.unwrap(), 200);
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_retries_total{cluster="backend"}"#), 1.0);
    assert_eq!(metric(&m, r#"sluice_upstream_retry_budget_exhausted_total{cluster="backend"}"#), 1.0);
}
