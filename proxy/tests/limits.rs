//! Downstream protection: header size and count limits, the header read timeout
//! (slowloris) and HTTP/1.1 request-smuggling vectors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `bytes` on a fresh connection; returns what came back and whether the
/// proxy closed the connection (EOF or reset) within 15 s (it returns at the
/// close: the bound only matters when a test fails).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn responses(out: &str) -> usize {
    out.matches("HTTP/1.1 ").count()
}

fn config(backend: SocketAddr, limits: &str) -> String {
    let listener = format!("limits: {{ {limits} }}");
    config_yaml(1, &listener, "- forward: { cluster: backend }", &backend_cluster(&[backend], ""))
}

fn headers_request(n_extra: usize, value_len: usize) -> Vec<u8> {
    let mut r = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..n_extra {
        r.push_str(&format!("x-h{i}: {}\r\n", "v".repeat(value_len)));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_header_limits_answer_431_and_close() {
    let backend = Backend::status(200).await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");

    // One 100 KiB header.
    let (out, closed) = exchange(addr, &headers_request(1, 100 * 1024)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(closed, "the connection closes after a 431");
    // 100 headers (host, connection and 98 more) pass; 101 do not.
    let (out, _) = exchange(addr, &headers_request(98, 8)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{}", &out[..out.len().min(200)]);
    let (out, closed) = exchange(addr, &headers_request(99, 8)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(closed);
    assert_eq!(backend.hits(), 1, "only the request within limits reached the upstream");
    // The proxy is fine.
    assert_eq!(get(addr, "/").await.0.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_header_limits_refuse_the_stream() {
    let backend = Backend::status(200).await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");
    let mut c = h2_connect(addr).await;

    let big = Request::get(format!("http://{addr}/"))
        .header("x-big", "v".repeat(100 * 1024))
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.ready().await.unwrap();
    match c.send_request(big).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(e.to_string().contains("stream error") || e.is_closed(), "{e}"),
    }
    let mut many = Request::get(format!("http://{addr}/"));
    for i in 0..101 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let c2 = &mut h2_connect(addr).await;
    c2.ready().await.unwrap();
    match c2.send_request(many.body(Full::new(Bytes::new())).unwrap()).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(e.to_string().contains("stream error") || e.is_closed(), "{e}"),
    }
    assert_eq!(backend.hits(), 0);
    let req = Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new())).unwrap();
    let (parts, _) = send2(&mut h2_connect(addr).await, req).await;
    assert_eq!(parts.status, 200);
}

/// RFC 9110 §7.2: a request with more than one `host` field is a 400, over
/// HTTP/2 as over HTTP/1.1 (where the parser refuses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_with_several_host_fields_are_refused() {
    let backend = Backend::status(200).await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");
    let req = Request::get(format!("http://{addr}/"))
        .header("host", "a.test")
        .header("host", "b.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, body) = send2(&mut h2_connect(addr).await, req).await;
    assert_eq!(parts.status, 400);
    assert_eq!(parts.headers["x-sluice-reason"], "bad_request", "{body:?}");
    assert_eq!(backend.hits(), 0);
    // One `host` field is fine.
    let req = Request::get(format!("http://{addr}/"))
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, _) = send2(&mut h2_connect(addr).await, req).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr, "header_read_timeout: 5s, idle_timeout: 400ms")).await;
    let mut s = tokio::net::TcpStream::connect(p.addr("main")).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Read the response, then wait for the proxy to close the idle connection.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return t.elapsed(),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the idle connection is still open after 15s");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    assert!(closed >= Duration::from_millis(400), "closed before the idle timeout: {closed:?}");
    assert!(closed < Duration::from_secs(10), "closed late: {closed:?}");
}

/// Sends one byte every 50 ms (a head that never ends) until the proxy
/// closes the connection; returns when, counted from `t`.
async fn dribble_until_closed(s: &mut tokio::net::TcpStream, t: Instant) -> Duration {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.write_all(b"X").await.is_err() {
            return t.elapsed();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
            // A 408 may come first; the close follows.
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(15), "the dribbling connection is still open after 15s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_stops_slowloris() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr, "header_read_timeout: 300ms, idle_timeout: 60s")).await;
    let addr = p.addr("main");

    // A client dribbling its head one byte every 50 ms never finishes it.
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let closed_at = dribble_until_closed(&mut s, t).await;
    assert!(closed_at >= Duration::from_millis(300), "closed before the timeout: {closed_at:?}");
    assert!(closed_at < Duration::from_secs(10), "closed late: {closed_at:?}");

    // A connection that sends nothing at all gets the header read timeout too
    // (not the much longer idle timeout), so silent sockets cannot hold slots.
    let t = Instant::now();
    let (out, closed) = exchange(addr, b"").await;
    assert!(closed, "a silent new connection stays open: {out}");
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(backend.hits(), 0);
    // A normal request is unaffected.
    assert_eq!(get(addr, "/").await.0.status, 200);
}

/// Reads one response with a `content-length` body from a raw stream.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_dribbling_its_next_head_is_cut_after_header_read_timeout() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr, "header_read_timeout: 300ms, idle_timeout: 60s")).await;
    let mut s = tokio::net::TcpStream::connect(p.addr("main")).await.unwrap();
    // Counted from before the first request: the proxy's timer for the next
    // head starts once the first response is out, so never earlier than this.
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // The second request's head comes one byte every 50 ms and never ends.
    s.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let closed_at = dribble_until_closed(&mut s, t).await;
    assert!(closed_at >= Duration::from_millis(300), "closed before the timeout: {closed_at:?}");
    assert!(closed_at < Duration::from_secs(10), "closed late: {closed_at:?}");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streaming_longer_than_header_read_timeout_is_not_cut() {
    // The upstream sends its body in 10 chunks, 100 ms apart: 1 s in all.
    let backend = RawBackend::start(|mut s| async move {
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(format!("2\r\n{i}.\r\n").as_bytes()).await.unwrap();
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        // Keep the upstream connection open: the proxy may pool it.
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let p = TestProxy::start(&config(backend.addr, "header_read_timeout: 300ms, idle_timeout: 300ms")).await;
    let mut s = tokio::net::TcpStream::connect(p.addr("main")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let got_all = tokio::time::timeout(Duration::from_secs(5), async {
        while !out.ends_with(b"0\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    let text = String::from_utf8_lossy(&out);
    assert!(got_all, "the response was cut: {text}");
    for i in 0..10 {
        assert!(text.contains(&format!("{i}.")), "chunk {i} missing: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_vectors_are_rejected_and_close_the_connection() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let vectors: Vec<(&str, String)> = vec![
        (
            "duplicate cl (different)",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n{smuggled}"
            ),
        ),
        ("cl list", format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 37, 37\r\n\r\n{smuggled}")),
        ("cl sign", format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +37\r\n\r\n{smuggled}")),
        (
            "te xchunked",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "te chunked, identity",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "te identity",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "te twice",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "te space before colon",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "te vertical tab",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "te obs-fold",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "bad chunk size",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "chunk size overflow",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        ("nul in header", format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n{smuggled}")),
        ("bare cr", format!("GET / HTTP/1.1\rHost: x\r\n\r\n{smuggled}")),
        ("obs-fold", format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n{smuggled}")),
    ];
    let mut failures = Vec::new();
    for (name, bytes) in &vectors {
        let before = backend.hits();
        let (out, closed) = exchange(addr, bytes.as_bytes()).await;
        let smuggled_seen = backend.seen.lock().unwrap().iter().any(|s| s.uri.path() == "/smuggled");
        let ok = out.starts_with("HTTP/1.1 400") && responses(&out) == 1 && closed && !smuggled_seen;
        if !ok {
            let first = out.lines().next().unwrap_or("<nothing>").to_owned();
            failures.push(format!(
                "{name}: first line {first:?}, {} responses, closed={closed}, upstream requests +{}, smuggled seen={smuggled_seen}",
                responses(&out),
                backend.hits() - before
            ));
        }
    }
    assert!(failures.is_empty(), "smuggling vectors not rejected cleanly:\n{}", failures.join("\n"));
    assert!(!backend.seen.lock().unwrap().iter().any(|s| s.uri.path() == "/smuggled"));
    let m = p.metrics().await;
    assert!(metric(&m, r#"sluice_local_replies_total{reason="bad_request"}"#) >= 1.0);
    assert_eq!(get(addr, "/").await.0.status, 200);
}

/// Framings hyper normalizes instead of rejecting, as RFC 9112 allows an
/// intermediary to: with both `content-length` and `transfer-encoding`, the
/// length is dropped, the chunked body is forwarded and the connection closes
/// afterwards; identical duplicate lengths are one length. Either way the
/// upstream gets one unambiguous request and nothing is smuggled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_normalized_never_smuggled() {
    let backend = Backend::start(|req| async move { http::Response::new(Full::new(req.into_body())) }).await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (name, bytes) in [
        (
            "cl+te",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "te+cl",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
    ] {
        let before = backend.hits();
        let (out, closed) = exchange(addr, bytes.as_bytes()).await;
        // Either a 400, or the chunked reading (empty body) and then a close.
        let rejected = out.starts_with("HTTP/1.1 400");
        let normalized = out.starts_with("HTTP/1.1 200") && backend.hits() == before + 1;
        assert!(rejected || normalized, "{name}: {out}");
        assert_eq!(responses(&out), 1, "{name}: {out}");
        assert!(closed, "{name}: the connection must close after an ambiguous framing");
        if normalized {
            let seen = backend.last();
            assert!(
                !seen.headers.contains_key("content-length")
                    || !seen.headers.contains_key("transfer-encoding")
            );
            assert_eq!(seen.uri.path(), "/a");
        }
    }
    // Same length twice: one request whose body is the text after the head.
    let dup = format!(
        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\nContent-Length: 35\r\nConnection: close\r\n\r\n{smuggled}"
    );
    assert_eq!(smuggled.len(), 35);
    let (out, closed) = exchange(addr, dup.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(responses(&out), 1, "{out}");
    assert!(closed);
    assert!(!backend.seen.lock().unwrap().iter().any(|s| s.uri.path() == "/smuggled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_framing_still_works() {
    let backend = Backend::start(|req| async move { http::Response::new(Full::new(req.into_body())) }).await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");
    // Chunked (any case), then a keep-alive second request on the same connection.
    let two = "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
               POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nworld";
    let (out, closed) = exchange(addr, two.as_bytes()).await;
    assert_eq!(responses(&out), 2, "{out}");
    assert!(out.contains("hello") && out.contains("world"), "{out}");
    assert!(closed);
    let seen: Vec<String> = backend.seen.lock().unwrap().iter().map(|s| s.uri.path().to_owned()).collect();
    assert_eq!(seen, ["/a", "/b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_closes_the_connection() {
    // A slow backend that reports each request it receives.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    let backend = Backend::start(move |_req| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send(());
            tokio::time::sleep(Duration::from_millis(300)).await;
            http::Response::new(Full::new(Bytes::from("slow")))
        }
    })
    .await;
    let p = TestProxy::start(&config(backend.addr, "")).await;
    let addr = p.addr("main");

    // 1. The flood: HEADERS then RST_STREAM as fast as possible.
    let (mut client, conn) =
        h2::client::handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0usize;
    while sent < 5000 {
        client = match tokio::time::timeout(Duration::from_secs(2), client.ready()).await {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let req = Request::get(format!("http://{addr}/r{sent}")).body(()).unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, true) else { break };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    assert!(sent < 5000, "the connection survived {sent} reset streams");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(backend.hits() < 500, "the upstream saw {} of {sent} reset streams", backend.hits());

    // 2. The slow variant: each stream reaches the upstream before it is reset.
    // Sluice's own rule (Envoy's) closes the connection once most of at least 100
    // streams were reset within a second of starting.
    let (mut client, conn) =
        h2::client::handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    let conn = tokio::spawn(conn);
    while seen.try_recv().is_ok() {}
    let mut reset = 0usize;
    while reset < 400 {
        client = match tokio::time::timeout(Duration::from_secs(2), client.ready()).await {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let req = Request::get(format!("http://{addr}/s{reset}")).body(()).unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, true) else { break };
        if tokio::time::timeout(Duration::from_secs(2), seen.recv()).await.is_err() {
            break;
        }
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    assert!((100..400).contains(&reset), "closed after {reset} premature resets");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let m = p.metrics().await;
    assert!(
        m.contains("sluice_downstream_connections_closed_for_abuse_total{listener=\"main\",reason=\"premature_resets\"} 1"),
        "{m}"
    );
    // Other clients are unaffected.
    assert_eq!(get(addr, "/").await.0.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_extra_connections_until_a_slot_frees() {
    let backend = Backend::named("b").await;
    let yaml = config(backend.addr, "").replace("    limits:", "    max_connections: 2\n    limits:");
    let p = TestProxy::start(&yaml).await;
    let addr = p.addr("main");
    let req = || Request::get("/").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    let mut c1 = h1_connect(addr).await;
    let mut c2 = h1_connect(addr).await;
    assert_eq!(c1.send_request(req()).await.unwrap().status(), 200);
    assert_eq!(c2.send_request(req()).await.unwrap().status(), 200);
    // The third connection waits in the backlog: its request is not served...
    let mut c3 = h1_connect(addr).await;
    let mut pending = Box::pin(c3.send_request(req()));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending).await.is_err(),
        "served over the limit"
    );
    // ...until one of the first two goes away.
    drop(c1);
    let resp =
        tokio::time::timeout(Duration::from_secs(5), pending).await.expect("not served after a slot freed");
    assert_eq!(resp.unwrap().status(), 200);
    drop(c2);
}
