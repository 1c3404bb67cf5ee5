//! Sluice's own downstream HTTP/1.1 codec, over raw sockets: persistence for
//! HTTP/1.0 and 1.1, `Expect: 100-continue`, HEAD, response framing
//! (content-length, chunked, close-delimited), trailers only for clients that
//! asked (`te: trailers`), pipelining, `date` on local replies, and the
//! HTTP/2 preface on a cleartext listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(backend: SocketAddr) -> String {
    simple_config(&[backend])
}

/// Reads one response (head and a `content-length` or chunked body) from `s`.
async fn read_one(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    let done = |out: &[u8]| {
        let text = String::from_utf8_lossy(out);
        let Some(end) = text.find("\r\n\r\n") else { return false };
        let head = text[..end].to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            return text[end..].ends_with("0\r\n\r\n")
                || text[end + 4..].contains("\r\n0\r\n") && text.ends_with("\r\n\r\n");
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        out.len() >= end + 4 + len
    };
    while !done(&out) {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
            Ok(Ok(1)) => out.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the proxy closes `s` within 10 s (it returns at the close).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_persistence_follows_the_request() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr)).await;
    let addr = p.addr("main");
    // HTTP/1.0 without keep-alive: one response, then the proxy closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_one(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    assert!(closed(&mut s).await);
    // HTTP/1.0 with keep-alive: the connection carries a second request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
        let r = read_one(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.to_ascii_lowercase().contains("connection: keep-alive"), "{r}");
    }
    // HTTP/1.1 `connection: close`.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let r = read_one(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(closed(&mut s).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_the_interim_response_before_the_body() {
    let backend = Backend::start(|req| async move { http::Response::new(Full::new(req.into_body())) }).await;
    let p = TestProxy::start(&config(backend.addr)).await;
    let mut s = TcpStream::connect(p.addr("main")).await.unwrap();
    s.write_all(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    // Nothing of the body is sent until the proxy says so.
    let interim = read_one(&mut s).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let r = read_one(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\nhello"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_keep_their_length_and_carry_no_body() {
    let backend =
        Backend::start(|_req| async move { http::Response::new(Full::new(Bytes::from_static(b"12345"))) })
            .await;
    let p = TestProxy::start(&config(backend.addr)).await;
    let mut s = TcpStream::connect(p.addr("main")).await.unwrap();
    // A HEAD then a GET, pipelined: the GET's response starts right after the HEAD's head.
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).await.unwrap();
    let (head_resp, get_resp) = all.split_at(all.find("\r\n\r\n").unwrap() + 4);
    assert!(head_resp.starts_with("HTTP/1.1 200"), "{all}");
    assert!(head_resp.to_ascii_lowercase().contains("content-length: 5"), "{all}");
    assert!(get_resp.starts_with("HTTP/1.1 200"), "{all}");
    assert!(get_resp.ends_with("\r\n\r\n12345"), "{all}");
}

/// A raw upstream answering with a chunked body and a trailer field.
async fn chunked_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: abc\r\n\r\n")
                .await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_http11_clients_that_asked_for_them() {
    let b = chunked_backend().await;
    let p = TestProxy::start(&config(b.addr)).await;
    let mut s = TcpStream::connect(p.addr("main")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n").await.unwrap();
    let r = read_one(&mut s).await;
    assert!(r.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{r}");
    assert!(r.ends_with("5\r\nhello\r\n0\r\nx-sum: abc\r\n\r\n"), "{r}");
    // Without `te: trailers` the body arrives whole and the trailer is dropped.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_one(&mut s).await;
    assert!(r.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{r}");
    assert!(!r.contains("x-sum"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_gets_an_unknown_length_body_until_close() {
    let b = chunked_backend().await;
    let p = TestProxy::start(&config(b.addr)).await;
    let mut s = TcpStream::connect(p.addr("main")).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut all)).await.unwrap().unwrap();
    let lower = all.to_ascii_lowercase();
    assert!(!lower.contains("transfer-encoding"), "HTTP/1.0 has no chunked coding: {all}");
    assert!(lower.contains("connection: close"), "{all}");
    assert!(all.ends_with("\r\n\r\nhello"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_carry_a_date_and_a_length() {
    let p = TestProxy::start(&config(dead_addr())).await;
    let out = raw(p.addr("main"), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let lower = out.to_ascii_lowercase();
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(lower.contains("\r\ndate: "), "{out}");
    assert!(lower.contains("\r\ncontent-length: "), "{out}");
    assert!(lower.contains("x-sluice-reason"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_line_that_is_not_http_is_a_400_and_a_close() {
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&config(backend.addr)).await;
    let out = raw(p.addr("main"), b"HELLO\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // An HTTP/2 preface is not mistaken for a bad HTTP/1.1 request: h2c works.
    let mut c = h2_connect(p.addr("main")).await;
    let req = http::Request::get("http://x/").body(Full::new(Bytes::new())).unwrap();
    let (parts, body) = send2(&mut c, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(body, "b");
    assert_eq!(backend.hits(), 1);
}
