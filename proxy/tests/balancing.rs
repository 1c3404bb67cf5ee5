//! Load balancing, active health checks and outlier detection, end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

const WAIT: Duration = Duration::from_secs(30);

fn cluster_config(backends: &[SocketAddr], cluster_extra: &str) -> String {
    config_yaml(1, "", "- forward: { cluster: backend }", &backend_cluster(backends, cluster_extra))
}

/// Which backend answered (its `x-backend` header).
async fn who(c: &mut H1, req: Request<Full<Bytes>>) -> String {
    let (parts, _) = send1(c, req).await;
    assert_eq!(parts.status, 200);
    parts.headers["x-backend"].to_str().unwrap().to_owned()
}

async fn clusters(p: &TestProxy) -> serde_json::Value {
    let (status, body) = get_text(p.admin(), "/clusters").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// The admin view of one endpoint of cluster `backend`.
async fn endpoint_state(p: &TestProxy, addr: SocketAddr) -> serde_json::Value {
    let v = clusters(p).await;
    let c = v["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "backend").unwrap().clone();
    c["endpoints"].as_array().unwrap().iter().find(|e| e["address"] == addr.to_string()).unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let bs = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let p = TestProxy::start(&cluster_config(&addrs, "lb: round_robin")).await;
    let mut c = h1_connect(p.addr("main")).await;
    let mut order = Vec::new();
    for _ in 0..300 {
        order.push(who(&mut c, get_req("x", "/")).await);
    }
    for b in &bs {
        assert_eq!(b.hits(), 100);
    }
    // Strict rotation: no endpoint twice in a row.
    assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_idle_endpoint() {
    let release = Arc::new(tokio::sync::Notify::new());
    let a = Backend::holding("a", release.clone()).await;
    let b = Backend::holding("b", release.clone()).await;
    let p = TestProxy::start(&cluster_config(&[a.addr, b.addr], "lb: least_request")).await;
    let addr = p.addr("main");

    // One request stays in flight on one endpoint.
    let held = tokio::spawn(async move {
        let mut c = h1_connect(addr).await;
        who(&mut c, get_req("x", "/hold")).await
    });
    eventually("the held request reaches a backend", WAIT, || async { a.hits() + b.hits() == 1 }).await;
    let busy = if a.hits() == 1 { "a" } else { "b" };

    let mut c = h1_connect(addr).await;
    for _ in 0..40 {
        let got = who(&mut c, get_req("x", "/")).await;
        assert_ne!(got, busy, "least_request sent a request to the busy endpoint");
    }
    release.notify_waiters();
    assert_eq!(held.await.unwrap(), busy);

    // With both idle again, both take traffic.
    for _ in 0..40 {
        who(&mut c, get_req("x", "/")).await;
    }
    assert!(a.hits() > 2 && b.hits() > 2, "a={} b={}", a.hits(), b.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_uses_every_endpoint() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let p = TestProxy::start(&cluster_config(&[a.addr, b.addr], "lb: random")).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..200 {
        who(&mut c, get_req("x", "/")).await;
    }
    // Binomial(200, 0.5): below 50 is about 7 standard deviations away.
    assert!(a.hits() >= 50 && b.hits() >= 50, "a={} b={}", a.hits(), b.hits());
}

/// Sends `rounds` requests per key and checks every key always lands on the
/// same backend; returns how many distinct backends the keys used.
async fn stickiness<F>(c: &mut H1, keys: usize, rounds: usize, mut make: F) -> usize
where
    F: FnMut(usize) -> Request<Full<Bytes>>,
{
    let mut placed: HashMap<usize, String> = HashMap::new();
    for _ in 0..rounds {
        for k in 0..keys {
            let got = who(c, make(k)).await;
            let first = placed.entry(k).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "key {k} moved between endpoints");
        }
    }
    placed.values().collect::<HashSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_sticks_by_header() {
    let bs = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let p = TestProxy::start(&cluster_config(&addrs, "lb: { ring_hash: { header: x-user } }")).await;
    let mut c = h1_connect(p.addr("main")).await;
    let used = stickiness(&mut c, 30, 4, |k| {
        Request::get("/")
            .header("host", "x")
            .header("x-user", format!("user-{k}"))
            .body(Full::default())
            .unwrap()
    })
    .await;
    assert!(used >= 2, "30 keys all hashed to one of three endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_sticks_by_cookie() {
    let bs = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let p = TestProxy::start(&cluster_config(&addrs, "lb: { ring_hash: { cookie: session } }")).await;
    let mut c = h1_connect(p.addr("main")).await;
    let used = stickiness(&mut c, 30, 3, |k| {
        // Other cookies change between rounds; only `session` matters.
        let other = fastrand::u32(..);
        Request::get("/")
            .header("host", "x")
            .header("cookie", format!("theme=dark{other}; session=s{k}; lang=en"))
            .body(Full::default())
            .unwrap()
    })
    .await;
    assert!(used >= 2, "30 cookies all hashed to one of three endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_sticks_by_source_ip() {
    let bs = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let p = TestProxy::start(&cluster_config(&addrs, "lb: { ring_hash: { source_ip: true } }")).await;
    let addr = p.addr("main");
    let mut placed: HashMap<u8, String> = HashMap::new();
    for round in 0..3 {
        for k in 2..22u8 {
            // A fresh connection each time, from 127.0.0.k (another source port each time).
            let mut c = h1_connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)), addr).await;
            let got = who(&mut c, get_req("x", "/")).await;
            let first = placed.entry(k).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "127.0.0.{k} moved in round {round}");
        }
    }
    let used = placed.values().collect::<HashSet<_>>().len();
    assert!(used >= 2, "20 source addresses all hashed to one endpoint");
}

/// A backend whose `/health` answers 200 or 503 as `healthy` says.
async fn health_backend(name: &'static str, healthy: Arc<AtomicBool>) -> Backend {
    Backend::start(move |req| {
        let healthy = healthy.clone();
        async move {
            let mut r = Response::new(Full::new(Bytes::from(name)));
            r.headers_mut().insert("x-backend", name.parse().unwrap());
            if req.uri().path() == "/health" && !healthy.load(Ordering::SeqCst) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_remove_and_restore_endpoints() {
    let a_ok = Arc::new(AtomicBool::new(true));
    let b_ok = Arc::new(AtomicBool::new(true));
    let a = health_backend("a", a_ok.clone()).await;
    let b = health_backend("b", b_ok.clone()).await;
    let extra = "health_check: { path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 2 }";
    let p = TestProxy::start(&cluster_config(&[a.addr, b.addr], extra)).await;
    let mut c = h1_connect(p.addr("main")).await;
    eventually("health checks run", WAIT, || async { b.seen.lock().unwrap().len() >= 2 }).await;
    let hc = b.seen.lock().unwrap().iter().find(|s| s.uri.path() == "/health").cloned().unwrap();
    assert_eq!(hc.headers["user-agent"], "sluice-health-check");

    // b fails its checks: it stops getting traffic.
    b_ok.store(false, Ordering::SeqCst);
    eventually("b marked unhealthy", WAIT, || async { endpoint_state(&p, b.addr).await["healthy"] == false })
        .await;
    let before = b.hits_except("/health");
    for _ in 0..20 {
        assert_eq!(who(&mut c, get_req("x", "/")).await, "a");
    }
    assert_eq!(b.hits_except("/health"), before);
    let m = p.metrics().await;
    assert!(metric(&m, r#"sluice_health_checks_total{cluster="backend",result="failure"}"#) >= 2.0);
    let b_gauge = format!(r#"sluice_upstream_endpoint_healthy{{cluster="backend",endpoint="{}"}}"#, b.addr);
    assert_eq!(metric(&m, &b_gauge), 0.0);

    // Both unhealthy: a fast 503, not a hang.
    a_ok.store(false, Ordering::SeqCst);
    eventually("a marked unhealthy", WAIT, || async { endpoint_state(&p, a.addr).await["healthy"] == false })
        .await;
    let (parts, _) = send1(&mut c, get_req("x", "/")).await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["x-sluice-reason"], "no_healthy_upstream");

    // Recovery brings both back into rotation.
    a_ok.store(true, Ordering::SeqCst);
    b_ok.store(true, Ordering::SeqCst);
    eventually("both healthy again", WAIT, || async {
        endpoint_state(&p, a.addr).await["healthy"] == true
            && endpoint_state(&p, b.addr).await["healthy"] == true
    })
    .await;
    let mut got = HashSet::new();
    for _ in 0..10 {
        got.insert(who(&mut c, get_req("x", "/")).await);
    }
    assert_eq!(got.len(), 2, "both endpoints serve again: {got:?}");
    let m = p.metrics().await;
    assert_eq!(metric(&m, &b_gauge), 1.0);
}

/// A backend answering 500 while `failing`, 200 otherwise.
async fn flaky_backend(name: &'static str, failing: Arc<AtomicBool>) -> Backend {
    Backend::start(move |_req| {
        let failing = failing.clone();
        async move {
            let mut r = Response::new(Full::new(Bytes::from(name)));
            r.headers_mut().insert("x-backend", name.parse().unwrap());
            if failing.load(Ordering::SeqCst) {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_consecutive_5xx_and_reports_it() {
    let never = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicBool::new(true));
    let a = flaky_backend("a", never.clone()).await;
    let b = flaky_backend("b", never.clone()).await;
    let bad = flaky_backend("bad", failing.clone()).await;
    let extra =
        "outlier_detection: { consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 50 }";
    let p = TestProxy::start(&cluster_config(&[a.addr, b.addr, bad.addr], extra)).await;
    let mut c = h1_connect(p.addr("main")).await;
    let mut errors = 0;
    for _ in 0..60 {
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        if parts.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "exactly consecutive_5xx failures reach clients before the ejection");
    assert_eq!(bad.hits(), 3);
    let st = endpoint_state(&p, bad.addr).await;
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["ejections"], 1);
    assert!(st["ejected_for_ms"].as_u64().unwrap() > 20_000, "{st}");
    assert_eq!(endpoint_state(&p, a.addr).await["ejected"], false);
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_ejections_total{cluster="backend"}"#), 1.0);
    assert_eq!(metric(&m, r#"sluice_upstream_endpoints_ejected{cluster="backend"}"#), 1.0);
    let g = format!(r#"sluice_upstream_endpoint_healthy{{cluster="backend",endpoint="{}"}}"#, bad.addr);
    assert_eq!(metric(&m, &g), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_respects_max_ejection_percent() {
    let failing = Arc::new(AtomicBool::new(true));
    let a = flaky_backend("a", failing.clone()).await;
    let b = flaky_backend("b", failing.clone()).await;
    let c_ = flaky_backend("c", failing.clone()).await;
    let d = flaky_backend("d", failing.clone()).await;
    // Four endpoints, all failing, at most 50% ejected: exactly two.
    let extra =
        "outlier_detection: { consecutive_5xx: 2, base_ejection_time: 30s, max_ejection_percent: 50 }";
    let p = TestProxy::start(&cluster_config(&[a.addr, b.addr, c_.addr, d.addr], extra)).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..40 {
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 500);
    }
    let v = clusters(&p).await;
    let ejected =
        v["clusters"][0]["endpoints"].as_array().unwrap().iter().filter(|e| e["ejected"] == true).count();
    assert_eq!(ejected, 2, "{v}");
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_upstream_ejections_total{cluster="backend"}"#), 2.0);
    assert_eq!(metric(&m, r#"sluice_upstream_endpoints_ejected{cluster="backend"}"#), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_unreachable_endpoints_and_lets_them_back() {
    let never = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicBool::new(true));
    let a = flaky_backend("a", never).await;
    let flaky = flaky_backend("flaky", failing.clone()).await;
    let dead = dead_addr();
    let extra = "outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 2, base_ejection_time: 30s, max_ejection_percent: 100 }";
    let p = TestProxy::start(&cluster_config(&[a.addr, dead], extra)).await;
    let mut c = h1_connect(p.addr("main")).await;
    let mut unavailable = 0;
    for _ in 0..20 {
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        if parts.status == 503 {
            unavailable += 1;
        }
    }
    assert_eq!(unavailable, 2, "two connect failures, then the dead endpoint is ejected");
    assert_eq!(endpoint_state(&p, dead).await["ejected"], true);

    // An ejection expires after base_ejection_time: with a short one, the endpoint comes back.
    // (2 s: long enough that the ejection is still on when the admin page is read
    // on a loaded machine.)
    let extra = "outlier_detection: { consecutive_5xx: 2, base_ejection_time: 2s, max_ejection_percent: 50 }";
    let p = TestProxy::start(&cluster_config(&[a.addr, flaky.addr], extra)).await;
    let mut c = h1_connect(p.addr("main")).await;
    for _ in 0..8 {
        send1(&mut c, get_req("x", "/")).await;
    }
    assert_eq!(endpoint_state(&p, flaky.addr).await["ejected"], true);
    failing.store(false, Ordering::SeqCst);
    let before = flaky.hits();
    let deadline = tokio::time::Instant::now() + WAIT;
    while flaky.hits() == before {
        assert!(tokio::time::Instant::now() < deadline, "the ejected endpoint never came back");
        let (parts, _) = send1(&mut c, get_req("x", "/")).await;
        assert_eq!(parts.status, 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(endpoint_state(&p, flaky.addr).await["ejected"], false);
}
