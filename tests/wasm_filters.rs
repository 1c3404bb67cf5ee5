//! End-to-end tests of wasm filters in the `sluice proxy` process: modules built
//! from source (a filter written against the upstream `proxy-wasm` crate, as
//! for Envoy, and one written with Sluice's SDK), real backends, real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::{Sluice, build_wasm, client, echo_backend, eventually, get, get_with, root, sink};

/// Every callback's budget in these tests: a worker preempted mid-callback on
/// a loaded machine must not trip it. The tests of the deadline itself use
/// [`with_short_deadline`].
const CALLBACK_TIMEOUT: &str = "1s";

/// `config` with a 50 ms callback budget, for the tests of the deadline.
fn with_short_deadline(config: String) -> String {
    config.replace(&format!("callback_timeout: {CALLBACK_TIMEOUT}"), "callback_timeout: 50ms")
}

fn config(
    backend: std::net::SocketAddr,
    module: &std::path::Path,
    filter_config: &str,
    fail_policy: &str,
) -> String {
    format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 2
listeners:
  - name: main
    address: 127.0.0.1:0
    filters:
      - name: sink
        module: {module}
        config: "{filter_config}"
        fail_policy: {fail_policy}
        limits: {{ callback_timeout: {CALLBACK_TIMEOUT} }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ path: /rewritten }}
            direct_response: {{ status: 200, body: "rerouted" }}
          - forward: {{ cluster: backend }}
clusters:
  - name: backend
    endpoints: ["{backend}"]
"#,
        module = module.display()
    )
}

/// The sink's `last_details` (what its `on_log` saw) once it is the request
/// to `path`'s (read through the proxy: `/get/<key>` answers shared data).
async fn last_details(addr: std::net::SocketAddr, path: &str) -> String {
    let suffix = format!("|{path}");
    eventually(Duration::from_secs(10), || async {
        let (_, headers, _) = get(addr, "/get/last_details").await;
        let details = headers.get("x-echo-x-value").map(|v| v.to_str().unwrap().to_owned());
        details.filter(|d| d.ends_with(&suffix))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_filter_runs_unmodified() {
    let backend = echo_backend().await;
    let proxy = Sluice::start(&config(backend.addr, &sink(), "hello", "closed"));
    let addr = proxy.addr("main");

    // Local response, and the filter's response phases run on it (as on
    // Envoy, the body phase too: the sink appends `!` to every body).
    let (status, headers, body) = get(addr, "/hello").await;
    assert_eq!((status, body.as_str()), (200, "Hello, World!\n!"));
    assert_eq!(headers["x-hello"], "1");
    assert_eq!(headers["x-config"], "hello");

    // Request header edits reach the upstream; the response gets the plugin config.
    let (status, headers, _) = get(addr, "/plain").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo-x-sink"], "1");
    assert_eq!(headers["x-config"], "hello");

    // A `:path` rewrite by the filter re-evaluates the route (to a direct
    // response, whose body the sink's body phase appends `!` to).
    let (status, _, body) = get(addr, "/rewrite").await;
    assert_eq!((status, body.as_str()), (200, "rerouted!"));

    // An HTTP callout to a configured cluster, then resume.
    let (status, headers, body) = get(addr, "/callout").await;
    // The sink appends `!` to response bodies (buffered body rewrite).
    assert_eq!((status, body.as_str()), (200, "/callout!"));
    assert_eq!(headers["x-echo-x-callout"], "even");
    // The callout's answer callback reads the request's properties.
    let props = headers["x-echo-x-callout-props"].to_str().unwrap();
    let (source, connection) = props.split_once('|').unwrap();
    assert!(source.starts_with("127.0.0.1:") && connection.parse::<u64>().is_ok(), "{props}");

    // Properties seen by the guest.
    let (_, headers, _) = get(addr, "/props").await;
    let props = headers["x-echo-x-props"].to_str().unwrap().to_owned();
    assert!(props.starts_with("sink|127.0.0.1:"), "{props}");
    // Request properties read in the response phase (Envoy answers them for the
    // whole stream): path, url_path, method, user agent, id, headers (with the
    // filter's own `x-sink`, as the request went upstream).
    let (_, headers, _) = get_with(addr, "/late-props?q=1", &[("user-agent", "ua/1")]).await;
    assert_eq!(headers["x-late-props"], "/late-props?q=1|/late-props|GET|ua/1|true|true");

    // The admin endpoint reports the plugin.
    let (_, _, filters) = get(proxy.admin, "/filters").await;
    assert!(filters.contains("\"abi_version\": \"0.2.1\""), "{filters}");
    assert!(filters.contains("\"state\": \"ok\""), "{filters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_or_trapping_filter_fails_closed_fast_and_reload_recovers() {
    let backend = echo_backend().await;
    let policy = "{ reload: { base: 20ms, max: 200ms } }";
    // One worker, so every request meets the same VM slot.
    let proxy = Sluice::start(&with_short_deadline(
        config(backend.addr, &sink(), "x", policy).replace("workers: 2", "workers: 1"),
    ));
    let addr = proxy.addr("main");

    let t = Instant::now();
    let (status, headers, _) = get(addr, "/loop").await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-sluice-reason"], "filter_timeout");
    // A 50 ms budget: an infinite loop cut by anything but the deadline would not end.
    assert!(t.elapsed() < Duration::from_secs(3), "loop took {:?}", t.elapsed());

    // Once the reload backoff is over a fresh VM runs, and traps again on /panic.
    let reason = eventually(Duration::from_secs(10), || async {
        let (status, headers, _) = get(addr, "/panic").await;
        assert_eq!(status, 503);
        let r = headers["x-sluice-reason"].to_str().unwrap().to_owned();
        (r != "filter_unavailable").then_some(r)
    })
    .await;
    assert_eq!(reason, "filter_trap");

    // After the backoff a fresh VM serves again.
    eventually(Duration::from_secs(10), || async {
        let (status, _, _) = get(addr, "/plain").await;
        (status == 200).then_some(())
    })
    .await;
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    assert!(metrics.contains("sluice_wasm_traps_total"), "{metrics}");
    let (_, _, filters) = get(proxy.admin, "/filters").await;
    assert!(filters.contains("sink exploded"), "the trap message names the panic: {filters}");
}

/// `--wasm-pooling false`: VMs get their memory on demand instead of from the
/// pool (no up-front address-space reservation). Filters run as before, and the
/// sandbox still holds: a looping callback ends at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_answers_from_the_request_body_phase() {
    let backend = echo_backend().await;
    let proxy = Sluice::start(&config(backend.addr, &sink(), "cfg", "closed"));
    let addr = proxy.addr("main");
    let post = |body: &'static str| {
        let req = http::Request::post(format!("http://{addr}/upload"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap();
        client().request(req)
    };
    // The sink buffers the body and refuses it once it has seen all of it:
    // the client gets the filter's reply, not the upstream exchange's error.
    let resp = post("forbidden words").await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-sink-body"], "refused");
    // (Its own reply's body goes through its response body phase too.)
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "no!");
    // A body it lets through reaches the upstream.
    let resp = post("fine words").await.unwrap();
    assert_eq!(resp.status(), 200);
    // (The echo backend answers with the path; the sink appends `!`.)
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "/upload!");

    // Properties read after their head's own phase (`/late-body`: path, method,
    // the request's fields as they went upstream with the sink's `x-sink`, the
    // response code, the response's fields with the sink's `x-config`): the
    // request's in the request body phase, both in the response body phase.
    // Envoy 1.40 answers NOT_FOUND there (docs/wasm-host.md, "Deviations").
    // Over HTTP/1.1 (the server hands the encoded response head back) and h2c
    // (a copy), each to an HTTP/1.1 upstream.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for (client, name) in [(client(), "HTTP/1.1"), (h2, "h2c")] {
        let req = http::Request::post(format!("http://{addr}/late-body"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"data")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "/late-body|/late-body,POST,true,-,false|/late-body,POST,true,200,true",
            "{name}"
        );
    }
}

/// Sluice's own error replies go through the filters, as Envoy's do: a
/// request to an upstream that refuses connections gets a 503 the filter's
/// response phases saw (the `x-config` field it adds, the `!` it appends to
/// bodies), and its `on_log`
/// sees the 503 and the request path, with Envoy's
/// `response.code_details`, `response.flags` (UF, 0x20), the attempt count and
/// the upstream's address. A response from the upstream is `via_upstream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_error_replies_go_through_the_filters() {
    let backend = echo_backend().await;
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let yaml = config(backend.addr, &sink(), "cfg", "closed")
        .replace(
            "          - forward: { cluster: backend }",
            "          - match: { prefix: /dead }\n            forward: { cluster: dead }\n          - forward: { cluster: backend }",
        )
        + &format!("  - name: dead\n    endpoints: [\"{dead}\"]\n");
    let proxy = Sluice::start(&yaml);
    let addr = proxy.addr("main");

    let (status, headers, body) = get(addr, "/dead/details").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-sluice-reason"], "upstream_connect_failure");
    assert_eq!(headers["x-config"], "cfg");
    assert!(body.ends_with('!'), "{body}");
    let details = last_details(addr, "/dead/details").await;
    assert_eq!(
        details,
        format!(
            "503|upstream_reset_before_response_started{{remote_connection_failure|delayed_connect_error:_Connection_refused}}|32|1|{dead}|/dead/details"
        )
    );

    let (status, _, _) = get(addr, "/details").await;
    assert_eq!(status, 200);
    let details = last_details(addr, "/details").await;
    assert_eq!(details, format!("200|via_upstream|0|1|{}|/details", backend.addr));
}

/// A request no route matches still goes through the listener's filters, as
/// Envoy's connection manager runs its filters before the router answers 404:
/// a filter can steer it to a route by editing its headers, and otherwise its
/// 404 goes through the response phases and `on_log` (flag NR). So does a 404
/// after a filter's edit left a request that had a route without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_route_matches_go_through_the_listener_filters() {
    let backend = echo_backend().await;
    let routes = "          - match: { path: /rewritten }\n            direct_response: { status: 200, body: \"rerouted\" }\n          - forward: { cluster: backend }";
    let yaml = config(backend.addr, &sink(), "cfg", "closed").replace(
        routes,
        r#"          - match: { prefix: /get/ }
            forward: { cluster: backend }
          - match: { path: /rewrite, headers: [{ name: x-known, exact: "1" }] }
            forward: { cluster: backend }
      - name: other
        domains: ["other.test"]
        routes:
          - match: { path: /rewritten, headers: [{ name: x-go, exact: "1" }] }
            direct_response: { status: 200, body: "rerouted" }"#,
    );
    assert!(yaml.contains("other.test"), "{yaml}");
    let proxy = Sluice::start(&yaml);
    let addr = proxy.addr("main");
    // No route: the filter's response phases and on_log see the 404.
    let (status, headers, body) = get(addr, "/nowhere/details").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["x-sluice-reason"], "no_route");
    assert_eq!(headers["x-config"], "cfg", "on_http_response_headers ran");
    assert!(body.ends_with('!'), "on_http_response_body ran: {body}");
    let details = last_details(addr, "/nowhere/details").await;
    assert_eq!(details, "404|route_not_found|256|0|-|/nowhere/details");

    // No route until the filter's edit (authority other.test, path
    // /rewritten) makes one match.
    let (status, _, body) = get_with(addr, "/rewrite", &[("x-go", "1")]).await;
    assert_eq!((status, body.as_str()), (200, "rerouted!"));
    // Without x-go the edit leads nowhere: 404 through the filter.
    let (status, headers, body) = get(addr, "/rewrite").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["x-config"], "cfg");
    assert!(body.ends_with('!'), "{body}");
    // A request that had a route (x-known) loses it by the edit: the same.
    let (status, headers, body) = get_with(addr, "/rewrite", &[("x-known", "1")]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["x-sluice-reason"], "no_route");
    assert_eq!(headers["x-config"], "cfg");
    assert!(body.ends_with('!'), "{body}");
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    assert!(metrics.contains(r#"sluice_local_replies_total{reason="no_route"} 3"#), "{metrics}");
}

/// A filter that fails (closed) gets a 503 (`wasm_fail_stream`) that every
/// other filter's `on_log` sees, whether the failure came in the request
/// headers, the request body or the response headers phase. The reply to a
/// failure in a request phase goes through the other filters' response
/// phases (the sink's `x-config` and `!`); after one in the response headers
/// phase it does not. All as Envoy 1.40 does (probed with these filters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_filters_log_a_failed_filters_reply() {
    let backend = echo_backend().await;
    let module = sink();
    // A trapping sink on each of three routes (a VM failed closed stays
    // failed on its worker: one request each).
    let routes: String = ["/trap-request", "/trap-body", "/trap-response"]
        .iter()
        .map(|prefix| {
            format!(
                "          - match: {{ prefix: {prefix} }}\n            forward: {{ cluster: backend }}\n            filters:\n              mode: extend\n              chain:\n                - name: trapper{}\n                  module: {}\n                  config: trapper\n                  limits: {{ callback_timeout: {CALLBACK_TIMEOUT} }}\n",
                &prefix[5..],
                module.display()
            )
        })
        .collect();
    let yaml = config(backend.addr, &module, "cfg", "closed").replacen(
        "          - match: { path: /rewritten }",
        &format!("{routes}          - match: {{ path: /rewritten }}"),
        1,
    );
    assert!(yaml.contains("trapper-response"), "{yaml}");
    let proxy = Sluice::start(&yaml);
    let addr = proxy.addr("main");
    for (path, attempts, upstream, response_phases) in [
        ("/trap-request/details", "0", "-".to_owned(), true),
        ("/trap-body/details", "1", backend.addr.to_string(), true),
        ("/trap-response/details", "1", backend.addr.to_string(), false),
    ] {
        let req = http::Request::post(format!("http://{addr}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"data")))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body =
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(headers["x-sluice-reason"], "filter_trap", "{path}: {body}");
        assert_eq!(headers.get("x-config").is_some(), response_phases, "{path}");
        assert_eq!(body.ends_with('!'), response_phases, "{path}: {body}");
        let details = last_details(addr, path).await;
        assert_eq!(details, format!("503|wasm_fail_stream|0|{attempts}|{upstream}|{path}"), "{path}");
    }
}

/// When the route's deadline ends a request while its upstream connection is
/// still being made, the filters' `on_log` still reads the request as it would
/// have gone (`request.path` here). The upstream never completes a connection:
/// its accept queue (backlog 0) is kept full, so the proxy's SYN goes unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_log_reads_the_request_when_the_deadline_ends_its_connect() {
    let backend = echo_backend().await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.local_addr().unwrap();
    let _listener = socket.listen(0).unwrap();
    // Fills the queue (never accepted); a later connect waits.
    let _filler = tokio::net::TcpStream::connect(stuck).await.unwrap();
    let yaml = config(backend.addr, &sink(), "cfg", "closed")
        .replace(
            "          - forward: { cluster: backend }",
            "          - match: { prefix: /stuck }\n            forward: { cluster: stuck, timeout: 300ms }\n          - forward: { cluster: backend }",
        )
        + &format!("  - name: stuck\n    endpoints: [\"{stuck}\"]\n    connect_timeout: 10s\n");
    let proxy = Sluice::start(&yaml);
    let addr = proxy.addr("main");
    let (status, headers, body) = get(addr, "/stuck/details").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(headers["x-sluice-reason"], "upstream_timeout");
    let details = last_details(addr, "/stuck/details").await;
    assert_eq!(details, format!("504|upstream_response_timeout|4|1|{stuck}|/stuck/details"));
}

/// A property one filter sets (`proxy_set_property`) is read by the request's
/// other filters, as Envoy keeps it in the stream's filter state: the
/// listener's sink sets `shared_key`, the route's sink (`reader`) reads it and
/// sends it upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_one_filter_sets_is_read_by_the_next() {
    let backend = echo_backend().await;
    let module = sink();
    let route = format!(
        "          - match: {{ prefix: /share-prop }}\n            forward: {{ cluster: backend }}\n            filters:\n              mode: extend\n              chain:\n                - name: reader\n                  module: {}\n                  config: reader\n",
        module.display()
    );
    let yaml = config(backend.addr, &module, "cfg", "closed").replacen(
        "          - match: { path: /rewritten }",
        &format!("{route}          - match: {{ path: /rewritten }}"),
        1,
    );
    let proxy = Sluice::start(&yaml);
    let (status, headers, body) = get(proxy.addr("main"), "/share-prop").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-echo-x-shared-prop"], "cfg");
}

/// The body a filter buffers (the sink pauses each body until its end) is
/// bounded by the listener's `max_buffered_body_bytes`: past it a request gets
/// 413 and a response 500, and the proxy serves on. Each body declares 8 KiB
/// and sends 4 KiB, so the end never comes and only the limit can answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_buffered_past_the_limit_gets_413_or_500() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Never answers: the request side alone decides.
    let (silent, _silent) = raw_backend(b"").await;
    let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n".to_vec();
    response.extend([b'a'; 4096]);
    let (big, _big) = raw_backend(Box::leak(response.into_boxed_slice())).await;
    // Reads what the filter's `on_log` saw (`/get/last_log`).
    let echo = echo_backend().await;
    let yaml = config(silent, &sink(), "cfg", "closed")
        .replace("    filters:", "    limits: { max_buffered_body_bytes: 1024 }\n    filters:")
        .replace(
            "          - forward: { cluster: backend }",
            "          - match: { path: /big }\n            forward: { cluster: big }\n          \
             - match: { prefix: /get/ }\n            forward: { cluster: echo }\n          \
             - forward: { cluster: backend }",
        )
        .replace(
            "clusters:",
            &format!("clusters:\n  - name: big\n    endpoints: [\"{big}\"]\n  - name: echo\n    endpoints: [\"{}\"]", echo.addr),
        );
    let proxy = Sluice::start(&yaml);
    let addr = proxy.addr("main");

    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 8192\r\n\r\n").await.unwrap();
    s.write_all(&[b'b'; 4096]).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed without an answer: {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&chunk[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 413 "), "{}", String::from_utf8_lossy(&head));

    // The head waits for the first body bytes, so nothing went out when the
    // limit was hit: a 500, not a closed connection.
    let (status, headers, _) = get(addr, "/big").await;
    assert_eq!(status, 500, "a response body over the limit");
    assert_eq!(headers["x-sluice-reason"], "response_too_large");
    // The request's metrics (and access log line) count the 500 that went
    // downstream, not the upstream's 200 that never did.
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    let count = |class: &str| {
        let series = format!("sluice_requests_total{{class=\"{class}\",cluster=\"big\",");
        metrics.lines().find(|l| l.starts_with(&series)).and_then(|l| l.rsplit(' ').next()).map(str::to_owned)
    };
    assert_eq!(count("5xx").as_deref(), Some("1"), "{metrics}");
    assert_eq!(count("2xx").as_deref(), Some("0"), "{metrics}");
    // So does the filters' `on_log`, as in Envoy, where filters see the local
    // reply that replaced the response.
    let (_, headers, _) = get(addr, "/get/last_log").await;
    let logged = headers.get("x-echo-x-value").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(logged.starts_with("/big 500 "), "on_log saw: {logged:?}");
    // The limit is the proxy's, not a filter failure.
    let (_, _, filters) = get(proxy.admin, "/filters").await;
    assert!(filters.contains("\"state\": \"ok\""), "{filters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_run_without_the_pooling_allocator() {
    let backend = echo_backend().await;
    let proxy = Sluice::start_with(
        &with_short_deadline(config(backend.addr, &sink(), "hello", "closed")),
        &["--wasm-pooling", "false"],
    );
    let addr = proxy.addr("main");
    let (status, headers, _) = get(addr, "/plain").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-config"], "hello");

    let t = Instant::now();
    let (status, headers, _) = get(addr, "/loop").await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-sluice-reason"], "filter_timeout");
    // A 50 ms budget: an infinite loop cut by anything but the deadline would not end.
    assert!(t.elapsed() < Duration::from_secs(3), "loop took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_filter_config_under_load_fails_no_request() {
    let backend = echo_backend().await;
    let module = sink();
    let proxy = Sluice::start(&config(backend.addr, &module, "v1", "closed"));
    let addr = proxy.addr("main");
    let stop = Arc::new(AtomicBool::new(false));
    let seen_v2 = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (stop, seen_v2) = (stop.clone(), seen_v2.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, headers, _) = get(addr, "/plain").await;
                n += 1;
                match headers.get("x-config").and_then(|v| v.to_str().ok()) {
                    Some("v1") if status == 200 => {}
                    Some("v2") if status == 200 => {
                        seen_v2.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => failures.push(status),
                }
            }
            (failures, n)
        }));
    }
    for round in 0..4 {
        let v = if round % 2 == 0 { "v2" } else { "v1" };
        proxy.write_config(&config(backend.addr, &module, v, "closed"));
        proxy.wait_for("config applied");
    }
    proxy.write_config(&config(backend.addr, &module, "v2", "closed"));
    proxy.wait_for("config applied");
    eventually(Duration::from_secs(30), || {
        let seen = seen_v2.clone();
        async move { (seen.load(Ordering::Relaxed) > 0).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        let (failures, n) = t.await.unwrap();
        total += n;
        assert!(failures.is_empty(), "failed requests during the swap: {failures:?}");
    }
    assert!(total > 50, "only {total} requests");

    // A module that fails to configure is rejected and the old chain keeps serving.
    proxy.write_config(&config(backend.addr, &module, "reject", "closed"));
    let rejected = proxy.wait_for("config rejected; the previous config keeps serving");
    let err = rejected["fields"]["error"].as_str().unwrap().to_owned();
    assert!(err.contains("listeners[0].filters[0]") && err.contains("config says reject"), "{err}");
    let (status, headers, _) = get(addr, "/plain").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-config"], "v2");

    // So is a malformed module (reliability case 9): a truncated copy, then WAT
    // text. The error names the field, the file and the reason.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&module).unwrap();
    for (name, content, reason) in [
        ("truncated.wasm", &bytes[..bytes.len() / 2], "invalid module"),
        ("text.wasm", b"(module)".as_slice(), "not a WebAssembly binary"),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, content).unwrap();
        proxy.write_config(&config(backend.addr, &bad, "v3", "closed"));
        // (Skipping any late line about an earlier file.)
        let err = loop {
            let rejected = proxy.wait_for("config rejected; the previous config keeps serving");
            let err = rejected["fields"]["error"].as_str().unwrap().to_owned();
            if err.contains(name) {
                break err;
            }
        };
        assert!(err.contains("listeners[0].filters[0]") && err.contains(reason), "{err}");
        let (status, headers, _) = get(addr, "/plain").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-config"], "v2", "the old chain serves");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_requests_reuse_upstream_connections() {
    let backend = echo_backend().await;
    let proxy = Sluice::start(&config(backend.addr, &sink(), "x", "closed"));
    let addr = proxy.addr("main");
    for _ in 0..30 {
        let (status, _, body) = get(addr, "/plain").await;
        assert_eq!((status, body.as_str()), (200, "/plain!"));
    }
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    let opened: u64 = metrics
        .lines()
        .find(|l| l.starts_with("sluice_upstream_connections_total{cluster=\"backend\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    // Sequential requests on keep-alive connections: at most one upstream connection per worker.
    assert!(opened <= 2, "{opened} upstream connections for 30 sequential requests");
}

/// With a filter chain, `x-forwarded-for`/`-proto` are set before the filters
/// (as Envoy's connection manager does); a downstream that names them in
/// `connection` cannot strip them on the way upstream, nor spoof them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_set_before_filters_survive_hop_by_hop_stripping() {
    let backend = echo_backend().await;
    let proxy = Sluice::start(&config(backend.addr, &sink(), "x", "closed"));
    let addr = proxy.addr("main");
    let fields = [
        ("connection", "keep-alive, x-forwarded-for, x-forwarded-proto"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
    ];
    let (status, h, _) = get_with(addr, "/plain", &fields).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-echo-x-forwarded-for"], "127.0.0.1", "{h:?}");
    assert_eq!(h["x-echo-x-forwarded-proto"], "http", "{h:?}");
    assert_eq!(h["x-echo-x-sink"], "1", "{h:?}");
}

/// With a filter chain, the fields the proxy sets reach the upstream exactly
/// once, whether a filter edited the request (`sink`: they go in the map
/// first) or only read it (`mini`: they stay beside the map, and the encoder
/// writes them). `x-request-id` and `x-forwarded-for`/`-proto` are set before
/// the filters, which read them; spoofed ones are replaced. `traceparent` is
/// set after the filters (as Envoy's router sets its trace context),
/// continuing the downstream's trace with a new span. `on_log` reads them all
/// in the request head as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fields_reach_filters_on_log_and_the_upstream_once() {
    let backend = echo_backend().await;
    let fixtures = root().join("proxy/wasm/tests/fixtures/Cargo.toml");
    let mini = build_wasm(&fixtures, "wasm32-wasip1", "release").join("mini.wasm");
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (module, name) in [(mini, "tiny"), (sink(), "sink")] {
        let proxy = Sluice::start(
            &config(backend.addr, &module, "x", "closed").replace("name: sink", &format!("name: {name}")),
        );
        let addr = proxy.addr("main");
        let fields =
            [("traceparent", incoming), ("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "https")];
        let (status, headers, _) = get_with(addr, "/traced", &fields).await;
        assert_eq!(status, 200);
        let all = |field: &str| -> Vec<String> {
            headers
                .get_all(format!("x-echo-{field}").as_str())
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(all("x-forwarded-for"), ["127.0.0.1"], "{name}");
        assert_eq!(all("x-forwarded-proto"), ["http"], "{name}");
        let ids = all("x-request-id");
        assert_eq!(ids.len(), 1, "{name}: {ids:?}");
        assert!(ids[0].len() == 32 && ids[0].bytes().all(|b| b.is_ascii_hexdigit()), "{name}: {ids:?}");
        let sent = all("traceparent");
        assert_eq!(sent.len(), 1, "{name}: {sent:?}");
        let sent = &sent[0];
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent.ends_with("-01"),
            "{name}: {sent}"
        );
        assert_eq!(sent.len(), incoming.len(), "{name}: {sent}");
        assert_ne!(sent, incoming, "{name}: a new span id for this hop");
        if name == "tiny" {
            let logged = proxy.wait_for_prefix("mini on_log ");
            let want = format!(" seen=127.0.0.1 xff=127.0.0.1 traceparent={sent}");
            assert!(logged.ends_with(&want), "{logged}");
        } else {
            // A filter that pauses without editing the request (a callout)
            // finds the fields in the head when it resumes; they are sent once.
            let (status, headers, _) = get(addr, "/callout-readonly").await;
            assert_eq!(status, 200);
            assert_eq!(headers["x-echo-x-seen-after-pause"], "127.0.0.1", "{headers:?}");
            assert_eq!(headers.get_all("x-echo-x-forwarded-for").iter().count(), 1, "{headers:?}");
            assert_eq!(headers.get_all("x-echo-x-request-id").iter().count(), 1, "{headers:?}");
            // An edit of a field the proxy set before the filters replaces
            // it (the others are still sent, once); a removal stands.
            let (status, headers, _) = get(addr, "/own-id").await;
            assert_eq!(status, 200);
            let ids: Vec<_> = headers.get_all("x-echo-x-request-id").iter().collect();
            assert_eq!(ids, ["filter-id"], "{headers:?}");
            assert_eq!(headers.get_all("x-echo-x-forwarded-for").iter().count(), 1, "{headers:?}");
            assert_eq!(headers.get_all("x-echo-traceparent").iter().count(), 1, "{headers:?}");
            let (status, headers, _) = get(addr, "/drop-xff").await;
            assert_eq!(status, 200);
            assert!(headers.get("x-echo-x-forwarded-for").is_none(), "{headers:?}");
            assert_eq!(headers.get_all("x-echo-x-forwarded-proto").iter().count(), 1, "{headers:?}");
            assert_eq!(headers.get_all("x-echo-x-request-id").iter().count(), 1, "{headers:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_shared_data_queues_metrics_and_logs_work_through_the_proxy() {
    let backend = echo_backend().await;
    // `tick` in the config makes the sink count three ticks in shared data.
    let proxy = Sluice::start(&config(backend.addr, &sink(), "tick", "closed"));
    let addr = proxy.addr("main");

    // Shared data with CAS (a stale CAS is refused), and a queue item.
    let (status, headers, _) = get(addr, "/shared").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo-x-shared"], "v1|Err(CasMismatch)");
    // The root's on_queue_ready moved the enqueued item into shared data.
    eventually(Duration::from_secs(30), || async {
        let (_, headers, _) = get(addr, "/get/last_job").await;
        (headers.get("x-echo-x-value").is_some_and(|v| v == "job-1")).then_some(())
    })
    .await;

    // `on_log` sees the final response head (the HTTP/1.1 server hands the
    // encoded head back to the chain) and the request head as it was sent
    // upstream: the filter's `x-sink`, the proxy's `x-forwarded-for`, and the
    // `host` field shown as `:authority`. The request headers phase saw
    // `x-forwarded-for`/`-proto` already (Envoy sets them before its filters).
    let logged = format!("/logged 200 {addr} http xff=127.0.0.1 sink=1 seen=127.0.0.1/http");
    eventually(Duration::from_secs(30), || async {
        let (status, _, body) = get(addr, "/logged").await;
        assert_eq!((status, body.as_ref()), (200, &b"/logged!"[..]));
        let (_, headers, _) = get(addr, "/get/last_log").await;
        (headers.get("x-echo-x-value").is_some_and(|v| v == logged.as_str())).then_some(())
    })
    .await;
    // After the filter's own reply, `on_log` reads the head the filters left
    // (with the forwarding fields set before them).
    let answered = format!("/hello 200 {addr} http xff=127.0.0.1 sink=1 seen=127.0.0.1/http");
    eventually(Duration::from_secs(30), || async {
        let (status, _, _) = get(addr, "/hello").await;
        assert_eq!(status, 200);
        let (_, headers, _) = get(addr, "/get/last_log").await;
        (headers.get("x-echo-x-value").is_some_and(|v| v == answered.as_str())).then_some(())
    })
    .await;

    // Ticks on every worker's root context, counted across VMs in shared data.
    eventually(Duration::from_secs(30), || async {
        let (_, headers, _) = get(addr, "/get/ticks").await;
        let n: u32 = headers.get("x-echo-x-value").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        (n >= 3).then_some(())
    })
    .await;

    // Guest metrics are exported with the plugin label.
    let (_, headers, _) = get(addr, "/metrics").await;
    assert!(headers.contains_key("x-echo-x-requests"));
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    assert!(metrics.contains("sluice_wasm_custom_sink_level{plugin=\"sink\"} 42"), "{metrics}");
    assert!(metrics.contains("sluice_wasm_custom_sink_requests{plugin=\"sink\"}"), "{metrics}");

    // Guest logs reach the proxy's log with the plugin name.
    let (status, _, _) = get(addr, "/log").await;
    assert_eq!(status, 200);
    let line = proxy.wait_for("sink says hi");
    assert_eq!(line["fields"]["plugin"], "sink", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm32_unknown_unknown_module_runs_too() {
    let backend = echo_backend().await;
    let mini =
        build_wasm(&root().join("proxy/wasm/tests/fixtures/Cargo.toml"), "wasm32-unknown-unknown", "release")
            .join("mini.wasm");
    let proxy = Sluice::start(&config(backend.addr, &mini, "", "closed").replace("name: sink", "name: tiny"));
    let (status, headers, _) = get(proxy.addr("main"), "/x").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-mini"], "tiny");
}

/// The process's thread names (`comm`, at most 15 bytes).
fn threads(proxy: &Sluice) -> Vec<String> {
    let dir = format!("/proc/{}/task", proxy.child.id());
    std::fs::read_dir(dir)
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap().trim().to_owned())
        .collect()
}

/// The wasm engine and its epoch ticker start with the first filter: a proxy
/// without filters has neither (nor the engine's memory), and the reload that
/// adds a filter starts them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_engine_starts_with_the_first_filter() {
    let backend = echo_backend().await;
    let with_filter = config(backend.addr, &sink(), "hello", "closed");
    let (head, rest) = with_filter.split_once("    filters:\n").unwrap();
    let without = format!("{head}{}", &rest[rest.find("    virtual_hosts:").unwrap()..]);
    let ticker = "sluice-wasm-epo";
    let started = |p: &Sluice| {
        p.logs().iter().filter(|l| l["fields"]["message"].as_str() == Some("wasm engine started")).count()
    };

    let proxy = Sluice::start(&without);
    let addr = proxy.addr("main");
    let (status, headers, _) = get(addr, "/plain").await;
    assert_eq!(status, 200);
    assert!(headers.get("x-config").is_none());
    assert!(!threads(&proxy).iter().any(|t| t == ticker), "{:?}", threads(&proxy));
    assert_eq!(started(&proxy), 0);

    proxy.write_config(&with_filter);
    proxy.wait_for("config applied");
    let (status, headers, _) = get(addr, "/plain").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-config"], "hello");
    assert!(threads(&proxy).iter().any(|t| t == ticker), "{:?}", threads(&proxy));

    // Another module load reuses the engine.
    proxy.write_config(&with_filter.replace("config: \"hello\"", "config: \"again\""));
    proxy.wait_for("config applied");
    let (_, headers, _) = get(addr, "/plain").await;
    assert_eq!(headers["x-config"], "again");
    assert_eq!(started(&proxy), 1);
    assert_eq!(threads(&proxy).iter().filter(|t| *t == ticker).count(), 1);
}

/// An upstream that answers every request on a connection with `response`,
/// byte for byte (mixed-case names, as many servers send them).
async fn raw_backend(response: &'static [u8]) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Each request is a bodiless head: answer at its end.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    if s.write_all(response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// The response head's lines for `GET path` over a fresh HTTP/1.1
/// connection, and the body.
async fn head_lines(addr: std::net::SocketAddr, path: &str) -> (Vec<String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
    (head.split("\r\n").map(str::to_owned).collect(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_read_encoded_response_fields_in_place_and_decode_them_to_edit() {
    let (backend, _task) = raw_backend(
        b"HTTP/1.1 200 OK\r\nServer: Up\r\nX-Hello: 1\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    // `mini` only appends a field: the upstream's leave as they came (no map
    // was built), the filter's after them.
    let fixtures = root().join("proxy/wasm/tests/fixtures/Cargo.toml");
    let mini = build_wasm(&fixtures, "wasm32-wasip1", "release").join("mini.wasm");
    let proxy = Sluice::start(&config(backend, &mini, "", "closed").replace("name: sink", "name: tiny"));
    let (lines, body) = head_lines(proxy.addr("main"), "/").await;
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 OK",
            "Server: Up",
            "X-Hello: 1",
            "Date: Mon, 30 Nov 2026 06:00:00 GMT",
            "Content-Length: 2",
            "x-mini: tiny",
            "connection: close",
        ]
    );
    assert_eq!(body, "ok");
    // `on_log` reads the head the client got, fields still encoded.
    proxy.wait_for_prefix("mini on_log server=Up x-mini=tiny seen=127.0.0.1 xff=127.0.0.1 traceparent=00-");
    drop(proxy);

    // The sink removes `content-length`, so the fields are decoded into a map
    // first: same fields and order, names in lower case; the sink read
    // `X-Hello` from the encoded fields (`x-seen-local`).
    let proxy = Sluice::start(&config(backend, &sink(), "cfg", "closed"));
    let (lines, body) = head_lines(proxy.addr("main"), "/").await;
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 OK",
            "server: Up",
            "x-hello: 1",
            "date: Mon, 30 Nov 2026 06:00:00 GMT",
            "x-config: cfg",
            "x-seen-local: 1",
            "transfer-encoding: chunked",
            "connection: close",
        ]
    );
    // The sink appends `!` to bodies (chunked: its length changed).
    assert!(body.contains("ok!"), "{body:?}");
}
