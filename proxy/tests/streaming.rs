//! Large bodies stream through the proxy with bounded memory, both ways.
//!
//! The proxy, the backend and the client share this process, so the RSS growth
//! measured here bounds the proxy's own. 64 MiB per direction: far above any
//! sane buffer (a proxy that buffered whole bodies would grow by at least that
//! much), while a transfer stays around a second in a debug build; a 1 GiB
//! variant would prove nothing more and cost most of a CI minute. This file
//! holds one test so that no other test's allocations blur the measurement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const SIZE: usize = 64 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Allowed RSS growth while 64 MiB goes through.
const BOUND: usize = 16 * 1024 * 1024;

/// A body of `left` bytes made of one reused 64 KiB chunk: generating it costs no memory.
struct Generated {
    left: usize,
    chunk: Bytes,
}

impl Generated {
    fn new(size: usize) -> Self {
        Generated { left: size, chunk: Bytes::from(vec![b'z'; CHUNK]) }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left as u64)
    }
}

/// Counts a body's bytes as they arrive, sampling the peak RSS on the way.
async fn drain(mut body: Incoming, peak: &AtomicUsize) -> usize {
    let mut n = 0;
    let mut frames = 0u32;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len();
        }
        frames += 1;
        if frames.is_multiple_of(64) {
            peak.fetch_max(rss_bytes(), Ordering::Relaxed);
        }
    }
    n
}

/// `GET /download` streams SIZE bytes; `POST /upload` counts the body and answers the count.
async fn streaming_backend(peak: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let peak = peak.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let peak = peak.clone();
                    async move {
                        let body: http_body_util::combinators::BoxBody<Bytes, Infallible> =
                            if req.uri().path() == "/upload" {
                                let n = drain(req.into_body(), &peak).await;
                                http_body_util::Full::new(Bytes::from(n.to_string())).boxed()
                            } else {
                                Generated::new(SIZE).boxed()
                            };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_bounded_memory() {
    let peak = Arc::new(AtomicUsize::new(0));
    let backend = streaming_backend(peak.clone()).await;
    let p = TestProxy::start(&simple_config(&[backend])).await;
    let addr = p.addr("main");

    // Warm up every path once (connections, pools, allocator arenas) before the baseline.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let up = |size: usize| {
        Request::post("/upload").header("host", "x").body(Generated::new(size).boxed()).unwrap()
    };
    h1.ready().await.unwrap();
    let resp = h1.send_request(up(4 * CHUNK)).await.unwrap();
    resp.into_body().collect().await.unwrap();

    // Download: backend → proxy → client.
    let baseline = rss_bytes();
    peak.store(baseline, Ordering::Relaxed);
    let req =
        Request::get("/download").header("host", "x").body(http_body_util::Empty::new().boxed()).unwrap();
    h1.ready().await.unwrap();
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = drain(resp.into_body(), &peak).await;
    assert_eq!(got, SIZE);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < BOUND, "download of {SIZE} bytes grew RSS by {growth} bytes");

    // Upload: client → proxy → backend.
    let baseline = rss_bytes();
    peak.store(baseline, Ordering::Relaxed);
    h1.ready().await.unwrap();
    let resp = h1.send_request(up(SIZE)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, SIZE.to_string());
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < BOUND, "upload of {SIZE} bytes grew RSS by {growth} bytes");

    // HTTP/2 downstream (flow-controlled) to the HTTP/1.1 upstream.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let baseline = rss_bytes();
    peak.store(baseline, Ordering::Relaxed);
    let req = Request::get(format!("http://{addr}/download")).body(http_body_util::Empty::new()).unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let got = drain(resp.into_body(), &peak).await;
    assert_eq!(got, SIZE);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < BOUND, "h2 download of {SIZE} bytes grew RSS by {growth} bytes");
}
