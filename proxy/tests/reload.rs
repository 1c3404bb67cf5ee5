//! Hot reload, graceful drain and the admin endpoints, end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};

const WAIT: Duration = Duration::from_secs(30);

fn routes_config(routes: &str, backend: SocketAddr, cluster_extra: &str) -> String {
    config_yaml(2, "", routes, &backend_cluster(&[backend], cluster_extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_to_new_requests_and_in_flight_ones_finish() {
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = Backend::holding("from-backend", release.clone()).await;
    let v1 = r#"          - { match: { path: /v1 }, direct_response: { status: 200, body: one } }
          - { match: { prefix: / }, forward: { cluster: backend } }"#;
    let p = TestProxy::start(&routes_config(v1, backend.addr, "")).await;
    let addr = p.addr("main");
    let mut c = h1_connect(addr).await;
    assert_eq!(&send1(&mut c, get_req("x", "/v1")).await.1[..], b"one");
    assert_eq!(send1(&mut c, get_req("x", "/v2")).await.1, "from-backend");

    // A request in flight on the old config...
    let held = tokio::spawn(async move { get(addr, "/hold").await });
    eventually("the held request reaches the backend", WAIT, || async { backend.hits() == 2 }).await;

    // ...while the new config changes one route, adds one and drops the catch-all.
    let v2 = r#"          - { match: { path: /v1 }, direct_response: { status: 200, body: uno } }
          - { match: { path: /v2 }, direct_response: { status: 200, body: two } }"#;
    let generation = p.reload(&routes_config(v2, backend.addr, "")).await.unwrap();
    assert_eq!(generation, 2);
    assert_eq!(p.proxy.generation(), 2);
    // New requests, even on an old keep-alive connection, see the new routes.
    assert_eq!(&send1(&mut c, get_req("x", "/v1")).await.1[..], b"uno");
    assert_eq!(&send1(&mut c, get_req("x", "/v2")).await.1[..], b"two");
    assert_eq!(send1(&mut c, get_req("x", "/other")).await.0.status, 404);
    // The in-flight request completes on the config it started with.
    release.notify_waiters();
    let (parts, body) = held.await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(body, "from-backend");

    let m = p.metrics().await;
    assert_eq!(metric(&m, "sluice_config_generation"), 2.0);
    assert_eq!(metric(&m, r#"sluice_config_reloads_total{result="ok"}"#), 1.0);
    let (_, config) = get_text(p.admin(), "/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["generation"], 2);
    let routes = &config["config"]["listeners"][0]["virtual_hosts"][0]["routes"];
    assert_eq!(routes.as_array().unwrap().len(), 2, "{routes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_rejected_with_field_and_reason_and_the_old_one_serves() {
    let backend = Backend::named("b").await;
    let good = r#"          - { forward: { cluster: backend } }"#;
    let p = TestProxy::start(&routes_config(good, backend.addr, "")).await;
    let addr = p.addr("main");

    // Invalid content: the error names the field and says why.
    let bad = r#"          - { forward: { cluster: nope } }"#;
    let err = p.reload(&routes_config(bad, backend.addr, "")).await.unwrap_err().to_string();
    assert!(err.contains("listeners[0].virtual_hosts[0].routes[0].forward.cluster"), "{err}");
    assert!(err.contains("unknown cluster `nope`"), "{err}");
    // Several problems are all listed.
    let bad = r#"          - { match: { prefix: nope, regex: "(" }, forward: { cluster: backend } }"#;
    let err = p.reload(&routes_config(bad, backend.addr, "")).await.unwrap_err().to_string();
    assert!(err.contains("routes[0].match.prefix: must start with `/`"), "{err}");
    assert!(err.contains("routes[0].match"), "{err}");
    // Unparseable YAML and unknown fields say where.
    let err = p.reload("listeners: [ { name: main").await.unwrap_err().to_string();
    assert!(err.contains("test.yaml"), "{err}");
    let err = p.reload(&routes_config(good, backend.addr, "colour: blue")).await.unwrap_err().to_string();
    assert!(err.contains("colour"), "{err}");
    // A config that validates but cannot be built (a missing CA file) is rejected too.
    let err = p
        .reload(&routes_config(good, backend.addr, "tls: { ca: /nonexistent/ca.pem }"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("clusters[0].tls"), "{err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");

    // Nothing changed.
    assert_eq!(p.proxy.generation(), 1);
    let (parts, body) = get(addr, "/").await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"b");
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_config_reloads_total{result="failed"}"#), 1.0);
    assert_eq!(metric(&m, "sluice_config_generation"), 1.0);
}

/// Reloads `times` times, alternating between two configs, while four clients
/// send requests continuously; asserts that none failed and both configs served.
async fn reload_under_load(configs: [String; 2], times: usize) {
    let b1 = Backend::named("b1").await;
    let b2 = Backend::named("b2").await;
    let configs =
        configs.map(|c| c.replace("{b1}", &b1.addr.to_string()).replace("{b2}", &b2.addr.to_string()));
    let p = TestProxy::start(&configs[0]).await;
    let addr = p.addr("main");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let stop = stop.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut by_config = [0usize; 2];
            // Half the clients keep one connection, half open a new one per request.
            let mut kept = if i % 2 == 0 { Some(h1_connect(addr).await) } else { None };
            while !stop.load(Ordering::Relaxed) {
                let resp = match &mut kept {
                    Some(c) => {
                        let r = async {
                            c.ready().await?;
                            c.send_request(get_req("x", "/")).await
                        };
                        r.await
                    }
                    None => {
                        let mut c = h1_connect(addr).await;
                        let r = async {
                            c.ready().await?;
                            c.send_request(get_req("x", "/")).await
                        };
                        r.await
                    }
                };
                match resp {
                    Ok(r) if r.status() == 200 => {
                        let generation = r.headers()["x-config"].to_str().unwrap().to_owned();
                        by_config[usize::from(generation == "b")] += 1;
                        if let Err(e) = r.into_body().collect().await {
                            failures.push(format!("body: {e}"));
                        }
                    }
                    Ok(r) => failures.push(format!("status {} {:?}", r.status(), r.headers())),
                    Err(e) => failures.push(format!(
                        "error: {e} (kept: {}) {:?}",
                        kept.is_some(),
                        std::error::Error::source(&e)
                    )),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (failures, by_config)
        }));
    }
    eventually("load is flowing", WAIT, || async { done.load(Ordering::Relaxed) > 20 }).await;
    for n in 0..times {
        let before = done.load(Ordering::Relaxed);
        p.reload(&configs[(n + 1) % 2]).await.unwrap();
        // Let some requests through on each config.
        eventually("requests flow after a reload", WAIT, || async {
            done.load(Ordering::Relaxed) > before + 5
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut by_config = [0, 0];
    for t in tasks {
        let (f, b) = t.await.unwrap();
        failures.extend(f);
        by_config[0] += b[0];
        by_config[1] += b[1];
    }
    assert_eq!(p.proxy.generation(), times as u64 + 1);
    let total = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(by_config[0] > 0 && by_config[1] > 0, "{by_config:?}");
}

fn load_config(tag: &str, cluster: &str, connect_timeout: &str, limits: &str) -> String {
    let route =
        format!("- forward: {{ cluster: {cluster} }}\n  response_headers: {{ set: {{ x-config: {tag} }} }}");
    let clusters = format!(
        "- {{ name: one, endpoints: [\"{{b1}}\"], connect_timeout: {connect_timeout} }}\n- {{ name: two, endpoints: [\"{{b2}}\"] }}"
    );
    config_yaml(2, &format!("limits: {{ {limits} }}"), &route, &clusters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_steady_load_fails_no_request() {
    // Routes, the target cluster and one cluster's own settings change every time
    // (so clusters are rebuilt and their pools replaced).
    let configs = [load_config("a", "one", "1s", ""), load_config("b", "two", "2s", "")];
    reload_under_load(configs, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_listener_settings_under_load_fails_no_request() {
    // Listener limits are part of the listener's identity: a change rebinds its
    // sockets (SO_REUSEPORT) while connections keep arriving.
    let configs = [
        load_config("a", "one", "1s", "idle_timeout: 1h"),
        load_config("b", "one", "1s", "idle_timeout: 2h"),
    ];
    reload_under_load(configs, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_work_and_refuses_new_connections() {
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = Backend::holding("finished", release.clone()).await;
    let p = Arc::new(TestProxy::start(&simple_config(&[backend.addr])).await);
    let addr = p.addr("main");
    assert_eq!(get_text(p.admin(), "/readyz").await.0, 200);

    // An HTTP/1.1 request and an HTTP/2 stream are in flight when the drain starts.
    let mut c1 = h1_connect(addr).await;
    let held1 = tokio::spawn(async move {
        let r = send1(&mut c1, get_req("x", "/hold")).await;
        (r, c1)
    });
    let mut c2 = h2_connect(addr).await;
    let mut c2b = c2.clone();
    let held2 = tokio::spawn(async move {
        let req = Request::get(format!("http://{addr}/hold")).body(Full::new(Bytes::new())).unwrap();
        send2(&mut c2b, req).await
    });
    eventually("both requests reach the backend", WAIT, || async { backend.hits() == 2 }).await;

    let p2 = p.clone();
    let drained = tokio::spawn(async move { p2.proxy.drain(Duration::from_secs(60)).await });

    // Not ready any more, still alive.
    eventually("readyz turns 503", WAIT, || async { get_text(p.admin(), "/readyz").await.0 == 503 }).await;
    assert_eq!(get_text(p.admin(), "/healthz").await.0, 200);
    // New connections are refused.
    eventually("new connections are refused", WAIT, || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(!drained.is_finished(), "the drain must wait for in-flight requests");

    // The in-flight requests complete; the HTTP/1.1 one is told the connection closes.
    let t = Instant::now();
    release.notify_waiters();
    let (((parts, body), mut c1), (parts2, body2)) = (held1.await.unwrap(), held2.await.unwrap());
    assert_eq!(parts.status, 200);
    assert_eq!(body, "finished");
    assert_eq!(parts.headers["connection"], "close");
    assert_eq!(parts2.status, 200);
    assert_eq!(body2, "finished");
    drained.await.unwrap();
    // Well before the 60 s drain timeout: the drain ended when the work did.
    assert!(t.elapsed() < Duration::from_secs(30), "the drain ended when the work did: {:?}", t.elapsed());
    // Both downstream connections are closed.
    assert!(c1.ready().await.is_err());
    let req = Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new())).unwrap();
    assert!(c2.ready().await.is_err() || c2.send_request(req).await.is_err());
    assert_eq!(get_text(p.admin(), "/readyz").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait() {
    let backend = Backend::start(|_req| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(Full::new(Bytes::new()))
    })
    .await;
    let p = TestProxy::start(&simple_config(&[backend.addr])).await;
    let addr = p.addr("main");
    let stuck = tokio::spawn(async move {
        let mut c = h1_connect(addr).await;
        c.ready().await.unwrap();
        c.send_request(get_req("x", "/")).await
    });
    eventually("the request is in flight", WAIT, || async { backend.hits() == 1 }).await;
    let t = Instant::now();
    p.proxy.drain(Duration::from_millis(300)).await;
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(10), "{took:?}");
    // The stuck exchange is cut, not left hanging.
    let r = tokio::time::timeout(WAIT, stuck).await.expect("the stuck request was not cut").unwrap();
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&simple_config(&[backend.addr])).await;
    let addr = p.addr("main");
    let admin = p.admin();
    assert!(admin.ip().is_loopback());
    for _ in 0..5 {
        assert_eq!(get(addr, "/").await.0.status, 200);
    }
    let (_, _) = get(addr, "/missing").await;

    let (status, m) = get_text(admin, "/metrics").await;
    assert_eq!(status, 200);
    for family in [
        "sluice_requests_total",
        "sluice_downstream_request_duration_seconds",
        "sluice_upstream_request_duration_seconds",
        "sluice_downstream_connections_active",
        "sluice_downstream_connections_total",
        "sluice_upstream_connections_total",
        "sluice_upstream_endpoint_healthy",
        "sluice_config_generation",
        "sluice_build_info",
    ] {
        assert!(m.contains(&format!("# TYPE {family} ")), "family {family} missing from /metrics");
    }
    assert_eq!(
        metric(&m, r#"sluice_requests_total{listener="main",route="all/0",cluster="backend",class="2xx"}"#),
        6.0
    );
    assert_eq!(
        metric(&m, r#"sluice_downstream_request_duration_seconds_count{listener="main",route="all/0"}"#),
        6.0
    );
    assert_eq!(metric(&m, r#"sluice_upstream_request_duration_seconds_count{cluster="backend"}"#), 6.0);
    assert_eq!(metric(&m, r#"sluice_downstream_connections_total{listener="main"}"#), 6.0);
    let ep = format!(r#"sluice_upstream_endpoint_healthy{{cluster="backend",endpoint="{}"}}"#, backend.addr);
    assert_eq!(metric(&m, &ep), 1.0);

    let (status, config) = get_text(admin, "/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["generation"], 1);
    assert_eq!(config["source"], "test.yaml");
    assert_eq!(config["config"]["clusters"][0]["name"], "backend");
    assert_eq!(config["config"]["listeners"][0]["name"], "main");

    let (status, clusters) = get_text(admin, "/clusters").await;
    assert_eq!(status, 200);
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let c = &clusters["clusters"][0];
    assert_eq!(c["name"], "backend");
    assert_eq!(c["endpoints"][0]["address"], backend.addr.to_string());
    assert_eq!(c["endpoints"][0]["healthy"], true);
    assert_eq!(c["endpoints"][0]["ejected"], false);
    assert_eq!(c["active_requests"], 0);

    assert_eq!(get_text(admin, "/healthz").await.0, 200);
    assert_eq!(get_text(admin, "/readyz").await.0, 200);
    assert_eq!(get_text(admin, "/filters").await.0, 200);
    let (status, help) = get_text(admin, "/nope").await;
    assert_eq!(status, 404);
    assert!(help.contains("/metrics"));
}
