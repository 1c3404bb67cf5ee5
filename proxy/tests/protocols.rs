//! Protocols through the proxy: TLS with ALPN (h2 and HTTP/1.1) and SNI
//! certificate selection, gRPC (unary, server streaming, error statuses and
//! trailers) over h2c to an HTTP/2 cluster, and WebSocket over HTTP/1.1 Upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// tungstenite's handshake callback type returns a large `Err`; not ours to shrink.
#![allow(clippy::result_large_err)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http::uri::PathAndQuery;
use http_body_util::Full;
use sluice_tls::test_certs::{LeafSpec, TestPki};
use tokio_tungstenite::tungstenite::Message;
use tonic::codegen::{BoxFuture, Service, StdError, tokio_stream};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

// === TLS ===

struct TlsSetup {
    pki: TestPki,
    a: sluice_tls::test_certs::CertPaths,
    b: sluice_tls::test_certs::CertPaths,
}

fn tls_setup() -> TlsSetup {
    let pki = TestPki::new().unwrap();
    // `a` is the default certificate (listed first); it also covers fallback.test,
    // which no certificate names in `server_names`.
    let a = pki.issue(&LeafSpec::new("a").dns(&["a.test", "fallback.test"])).unwrap();
    let b = pki.server("b", &["b.test", "*.wild.test"]).unwrap();
    TlsSetup { pki, a, b }
}

fn tls_config(t: &TlsSetup, backend: SocketAddr, protocols: &str) -> String {
    let listener = format!(
        "protocols: {protocols}\ntls:\n  certificates:\n    - {{ cert: \"{}\", key: \"{}\", server_names: [a.test] }}\n    - {{ cert: \"{}\", key: \"{}\", server_names: [b.test, \"*.wild.test\"] }}",
        t.a.cert.display(),
        t.a.key.display(),
        t.b.cert.display(),
        t.b.key.display(),
    );
    config_yaml(2, &listener, "- forward: { cluster: backend }", &backend_cluster(&[backend], ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_negotiates_h2_or_http1() {
    let t = tls_setup();
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&tls_config(&t, backend.addr, "[http1, http2]")).await;
    let addr = p.addr("main");
    let ca = t.pki.ca_der();

    // A client preferring h2 gets h2.
    let (stream, alpn, _) = tls_connect(addr, "a.test", ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let mut c = h2_handshake(stream).await;
    let req = Request::get("https://a.test/secure").body(Full::new(Bytes::new())).unwrap();
    let (parts, body) = send2(&mut c, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, http::Version::HTTP_2);
    assert_eq!(&body[..], b"b");
    let seen = backend.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], "a.test");

    // HTTP/1.1 by ALPN, and without ALPN at all.
    for offer in [&[&b"http/1.1"[..]][..], &[]] {
        let (stream, alpn, _) = tls_connect(addr, "a.test", ca, offer).await;
        assert_eq!(alpn.as_deref(), offer.first().copied(), "{offer:?}");
        let mut c = h1_handshake(stream).await;
        let (parts, body) = send1(&mut c, get_req("a.test", "/one")).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, http::Version::HTTP_11);
        assert_eq!(&body[..], b"b");
    }
    let m = p.metrics().await;
    assert_eq!(metric(&m, r#"sluice_tls_handshakes_total{side="downstream",name="main",result="ok"}"#), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_only_listener_never_speaks_h2() {
    let t = tls_setup();
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&tls_config(&t, backend.addr, "[http1]")).await;
    let (stream, alpn, _) =
        tls_connect(p.addr("main"), "a.test", t.pki.ca_der(), &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let mut c = h1_handshake(stream).await;
    assert_eq!(send1(&mut c, get_req("a.test", "/")).await.0.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate() {
    let t = tls_setup();
    let backend = Backend::named("b").await;
    let p = TestProxy::start(&tls_config(&t, backend.addr, "[http1, http2]")).await;
    let addr = p.addr("main");
    for (sni, want) in
        [("a.test", &t.a.der), ("b.test", &t.b.der), ("x.wild.test", &t.b.der), ("fallback.test", &t.a.der)]
    {
        // tls_connect verifies the chain and the name, so a wrong pick fails here.
        let (stream, _, leaf) = tls_connect(addr, sni, t.pki.ca_der(), &[b"http/1.1"]).await;
        assert_eq!(&leaf, want, "SNI {sni} got the wrong certificate");
        let mut c = h1_handshake(stream).await;
        assert_eq!(send1(&mut c, get_req(sni, "/")).await.0.status, 200, "{sni}");
    }
}

// === gRPC ===

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
    /// Messages to stream back.
    #[prost(uint32, tag = "2")]
    count: u32,
    /// When non-zero, fail with this gRPC code (after `count` messages when streaming).
    #[prost(int32, tag = "3")]
    fail_code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(uint32, tag = "2")]
    index: u32,
}

fn failure(code: i32) -> Status {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert("x-trailer", "from-upstream".parse().unwrap());
    Status::with_metadata(Code::from(code), "requested failure", meta)
}

struct UnarySvc;

impl tonic::server::UnaryService<EchoRequest> for UnarySvc {
    type Response = EchoReply;
    type Future = BoxFuture<tonic::Response<EchoReply>, Status>;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let seen_te = req.metadata().get("te").map(|v| v.to_str().unwrap().to_owned());
            let r = req.into_inner();
            if r.fail_code != 0 {
                return Err(failure(r.fail_code));
            }
            let mut resp = tonic::Response::new(EchoReply { message: r.message, index: 0 });
            resp.metadata_mut().insert("x-seen-te", seen_te.unwrap_or_default().parse().unwrap());
            Ok(resp)
        })
    }
}

struct StreamSvc;

impl tonic::server::ServerStreamingService<EchoRequest> for StreamSvc {
    type Response = EchoReply;
    type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let r = req.into_inner();
            let mut items: Vec<Result<EchoReply, Status>> =
                (0..r.count).map(|i| Ok(EchoReply { message: r.message.clone(), index: i })).collect();
            if r.fail_code != 0 {
                items.push(Err(failure(r.fail_code)));
            }
            let s: Self::ResponseStream = Box::pin(tokio_stream::iter(items));
            Ok(tonic::Response::new(s))
        })
    }
}

#[derive(Clone)]
struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "test.Echo";
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(UnarySvc, req).await,
                "/test.Echo/Stream" => grpc.server_streaming(StreamSvc, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

async fn grpc_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

fn grpc_config(backend: SocketAddr) -> String {
    let routes = "- { match: { prefix: /test.Echo/ }, forward: { cluster: grpc } }\n- { match: { prefix: /slow.Service/ }, forward: { cluster: grpc, timeout: 100ms } }";
    let clusters = format!("- {{ name: grpc, protocol: http2, endpoints: [\"{backend}\"] }}");
    config_yaml(2, "", routes, &clusters)
}

type GrpcClient = tonic::client::Grpc<tonic::transport::Channel>;

async fn grpc_client(addr: SocketAddr) -> GrpcClient {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

async fn unary(
    c: &mut GrpcClient,
    path: &'static str,
    r: EchoRequest,
) -> Result<tonic::Response<EchoReply>, Status> {
    c.ready().await.unwrap();
    c.unary(
        tonic::Request::new(r),
        PathAndQuery::from_static(path),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_through_the_proxy() {
    let backend = grpc_backend().await;
    let p = TestProxy::start(&grpc_config(backend)).await;
    let mut c = grpc_client(p.addr("main")).await;

    let resp = unary(&mut c, "/test.Echo/Unary", EchoRequest { message: "hi".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(resp.get_ref().message, "hi");
    assert_eq!(resp.metadata().get("x-seen-te").unwrap(), "trailers", "te: trailers reaches the server");

    // An error status (trailers-only response) passes intact, with its metadata.
    let err = unary(
        &mut c,
        "/test.Echo/Unary",
        EchoRequest { message: "x".into(), fail_code: Code::NotFound as i32, ..Default::default() },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "requested failure");
    assert_eq!(err.metadata().get("x-trailer").unwrap(), "from-upstream");

    // Proxy-made errors are gRPC-shaped: no route is UNIMPLEMENTED.
    let err = unary(&mut c, "/other.Service/Call", EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(err.metadata().get("x-sluice-reason").unwrap(), "no_route");

    // The h2 connection to the proxy and the one upstream carry many calls.
    let mut handles = Vec::new();
    for i in 0..50 {
        let mut c = c.clone();
        handles.push(tokio::spawn(async move {
            let r = EchoRequest { message: format!("m{i}"), ..Default::default() };
            unary(&mut c, "/test.Echo/Unary", r).await.unwrap().into_inner().message
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), format!("m{i}"));
    }
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, r#"sluice_upstream_connections_total{cluster="grpc"}"#),
        1.0,
        "one shared h2 connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_streaming_with_trailers() {
    let backend = grpc_backend().await;
    let p = TestProxy::start(&grpc_config(backend)).await;
    let mut c = grpc_client(p.addr("main")).await;
    let codec = || ProstCodec::<EchoRequest, EchoReply>::default();

    // 2000 messages: more than the flow-control windows hold, so it really streams.
    c.ready().await.unwrap();
    let r = EchoRequest { message: "s".repeat(100), count: 2000, fail_code: 0 };
    let resp = c
        .server_streaming(tonic::Request::new(r), PathAndQuery::from_static("/test.Echo/Stream"), codec())
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let mut n = 0;
    while let Some(item) = stream.message().await.unwrap() {
        assert_eq!(item.index, n);
        n += 1;
    }
    assert_eq!(n, 2000);
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    // A stream that fails after 3 messages: the messages, then the status in the trailers.
    c.ready().await.unwrap();
    let r = EchoRequest { message: "f".into(), count: 3, fail_code: Code::ResourceExhausted as i32 };
    let resp = c
        .server_streaming(tonic::Request::new(r), PathAndQuery::from_static("/test.Echo/Stream"), codec())
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    for i in 0..3 {
        assert_eq!(stream.message().await.unwrap().unwrap().index, i);
    }
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.metadata().get("x-trailer").unwrap(), "from-upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_a_grpc_status() {
    // A backend that never answers the stream.
    let backend = Backend::start(|_req| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        http::Response::new(Full::new(Bytes::new()))
    })
    .await;
    let p = TestProxy::start(&grpc_config(backend.addr)).await;
    let mut c = grpc_client(p.addr("main")).await;
    let err = unary(&mut c, "/slow.Service/Call", EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.metadata().get("x-sluice-reason").unwrap(), "upstream_timeout");
}

// === WebSocket ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<http::HeaderMap>();
    let ws = RawBackend::start(move |s| {
        let seen_tx = seen_tx.clone();
        async move {
            let cb =
                |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                 resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    let _ = seen_tx.send(req.headers().clone());
                    Ok(resp)
                };
            let mut ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                match msg {
                    Message::Text(t) => ws.send(Message::text(format!("echo: {t}"))).await.unwrap(),
                    Message::Binary(b) => ws.send(Message::Binary(b)).await.unwrap(),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
    })
    .await;
    let p = TestProxy::start(&simple_config(&[ws.addr])).await;
    let addr = p.addr("main");

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, resp) =
        tokio_tungstenite::client_async(format!("ws://{addr}/chat?room=1"), tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    let seen = seen_rx.recv().await.unwrap();
    assert_eq!(seen["upgrade"].to_str().unwrap().to_ascii_lowercase(), "websocket");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(seen.contains_key("sec-websocket-key"));

    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("echo: hello"));
    // A message larger than any single read, both ways.
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap().into_data().to_vec(), big);
    for i in 0..100 {
        client.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..100 {
        assert_eq!(client.next().await.unwrap().unwrap(), Message::text(format!("echo: m{i}")));
    }
    client.close(None).await.unwrap();
    // The tunnel ends and the proxy serves new requests.
    while let Some(Ok(_)) = client.next().await {}
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, r#"sluice_requests_total{listener="main",route="all/0",cluster="backend",class="1xx"}"#),
        1.0
    );
    let plain = Backend::named("after").await;
    let p2 = TestProxy::start(&simple_config(&[plain.addr])).await;
    assert_eq!(get(p2.addr("main"), "/").await.0.status, 200);
}
