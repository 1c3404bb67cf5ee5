//! Test harness: real hyper backends and clients on 127.0.0.1:0, and a real
//! `Proxy` started from YAML. Shared by the data-plane integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::Snapshot;
use sluice_proxy::{Proxy, ProxyOptions};
use tokio::net::TcpListener;

/// A response a backend handler returns.
pub type Resp = Response<Full<Bytes>>;

/// What a backend saw of one request (recorded before its handler runs).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

/// A running backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts an HTTP/1.1 + h2c backend whose handler gets the whole request.
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Resp> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// Serves on an already-bound listener.
    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Resp> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let h2 = hits.clone();
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let handler = handler.clone();
                let hits = h2.clone();
                let seen = s2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let hits = hits.clone();
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().clone(),
                                uri: req.uri().clone(),
                                version: req.version(),
                                headers: req.headers().clone(),
                            });
                            hits.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(handler(Request::from_parts(parts, body)).await)
                        }
                    });
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Above the proxy's limits, so that the proxy's own limits are what tests see.
                    b.http1().max_headers(1000);
                    let _ = b.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
                });
            }
        });
        Backend { addr, hits, seen, task }
    }

    /// A backend answering 200 with `name` in the body and an `x-backend` header,
    /// echoing the request path in `x-path` and request headers as `x-echo-<name>`.
    pub async fn named(name: &'static str) -> Backend {
        Backend::start(move |req| async move {
            let mut r = Response::new(Full::new(Bytes::from(name)));
            r.headers_mut().insert("x-backend", name.parse().unwrap());
            if let Ok(v) = req.uri().to_string().parse() {
                r.headers_mut().insert("x-path", v);
            }
            for (k, v) in req.headers() {
                if let Ok(n) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
                    r.headers_mut().append(n, v.clone());
                }
            }
            r
        })
        .await
    }

    /// A backend named `name` (as [`Backend::named`] without the echo) whose
    /// requests to `/hold` wait until `release` is notified.
    pub async fn holding(name: &'static str, release: Arc<tokio::sync::Notify>) -> Backend {
        Backend::start(move |req| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/hold" {
                    release.notified().await;
                }
                let mut r = Response::new(Full::new(Bytes::from(name)));
                r.headers_mut().insert("x-backend", name.parse().unwrap());
                r
            }
        })
        .await
    }

    /// A backend answering `status` always.
    pub async fn status(code: u16) -> Backend {
        Backend::start(move |_req| async move {
            let mut r = Response::new(Full::new(Bytes::from(format!("status {code}"))));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Requests seen whose path is not `exclude` (e.g. a health-check path).
    pub fn hits_except(&self, exclude: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| s.uri.path() != exclude).count()
    }

    /// The last request seen.
    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("backend saw no request")
    }
}

/// A running proxy with its addresses.
pub struct TestProxy {
    pub proxy: Proxy,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Starts a proxy from YAML. `{admin}` is replaced by `127.0.0.1:0`.
    pub async fn start(yaml: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let yaml = yaml.replace("{admin}", "127.0.0.1:0");
        let snapshot = Snapshot::from_yaml(&yaml, "test.yaml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let proxy = Proxy::start(
            snapshot,
            ProxyOptions { registry: prometheus::Registry::new(), loader: None, callouts: None },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        TestProxy { proxy, dir }
    }

    /// The address of a listener.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy.listener_addr(listener).unwrap()
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.proxy.admin_addr().unwrap()
    }

    /// Applies new YAML.
    pub async fn reload(&self, yaml: &str) -> Result<u64, sluice_config::ConfigError> {
        let yaml = yaml.replace("{admin}", "127.0.0.1:0");
        let snapshot = Snapshot::from_yaml(&yaml, "test.yaml", self.dir.path())?;
        self.proxy.reload(snapshot).await
    }

    /// Reads `/metrics`.
    pub async fn metrics(&self) -> String {
        let (_, body) = get_text(self.admin(), "/metrics").await;
        body
    }
}

/// Re-indents a YAML fragment: strips its common leading white space and
/// surrounding blank lines, then puts `n` spaces before every line.
pub fn indent(yaml: &str, n: usize) -> String {
    let lines: Vec<&str> = yaml.trim_matches('\n').lines().collect();
    let common = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let pad = " ".repeat(n);
    lines
        .iter()
        .map(|l| if l.trim().is_empty() { String::new() } else { format!("{pad}{}\n", &l[common..]) })
        .collect()
}

/// A config: loopback admin, `workers` workers, one listener `main` on port 0
/// with the `listener` keys, one catch-all virtual host `all` with `routes`
/// (list items), and `clusters` (list items). Fragments are written unindented.
pub fn config_yaml(workers: usize, listener: &str, routes: &str, clusters: &str) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}\nworkers: {workers}\nlisteners:\n  - name: main\n    address: 127.0.0.1:0\n{}    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n{}clusters:\n{}",
        indent(listener, 4),
        indent(routes, 10),
        if clusters.trim().is_empty() { "  []\n".to_owned() } else { indent(clusters, 2) },
    )
}

/// A cluster `backend` over `backends`, with `extra` keys (unindented).
pub fn backend_cluster(backends: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!("- name: backend\n  endpoints: [{}]\n{}", eps.join(", "), indent(extra, 2))
}

/// A minimal config: one listener `main` on port 0 forwarding everything to one cluster.
pub fn simple_config(backends: &[SocketAddr]) -> String {
    config_yaml(2, "", "- forward: { cluster: backend }", &backend_cluster(backends, ""))
}

/// An HTTP/1.1 client.
pub fn h1_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// Sends a request and collects the response.
pub async fn send(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    req: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

/// GET over HTTP/1.1.
pub async fn get(addr: SocketAddr, path: &str) -> (http::response::Parts, Bytes) {
    let req = Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap();
    send(&h1_client(), req).await
}

/// GET returning the body as text.
pub async fn get_text(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let (p, b) = get(addr, path).await;
    (p.status, String::from_utf8_lossy(&b).into_owned())
}

/// Sends raw bytes over a fresh TCP connection and reads until the peer closes
/// (or `limit` bytes).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A single HTTP/1.1 connection (the caller controls connection reuse).
pub type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
/// A single HTTP/2 connection.
pub type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// Opens one HTTP/1.1 connection to `addr`.
pub async fn h1_connect(addr: SocketAddr) -> H1 {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    h1_handshake(s).await
}

/// Opens one HTTP/1.1 connection to `addr` from the local address `from` (any 127.x.y.z).
pub async fn h1_connect_from(from: std::net::IpAddr, addr: SocketAddr) -> H1 {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let s = sock.connect(addr).await.unwrap();
    h1_handshake(s).await
}

/// HTTP/1.1 client handshake over any stream.
pub async fn h1_handshake<T>(io: T) -> H1
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// Opens one h2c (prior knowledge) connection to `addr`.
pub async fn h2_connect(addr: SocketAddr) -> H2 {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    h2_handshake(s).await
}

/// HTTP/2 client handshake over any stream.
pub async fn h2_handshake<T>(io: T) -> H2
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends a request on an HTTP/1.1 connection and collects the response.
pub async fn send1(c: &mut H1, req: Request<Full<Bytes>>) -> (http::response::Parts, Bytes) {
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

/// Sends a request on an HTTP/2 connection and collects the response.
pub async fn send2(c: &mut H2, req: Request<Full<Bytes>>) -> (http::response::Parts, Bytes) {
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

/// A GET request with a `host` header, for HTTP/1.1 connections.
pub fn get_req(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path).header(http::header::HOST, host).body(Full::new(Bytes::new())).unwrap()
}

/// A raw TCP backend: each accepted connection goes to `handler`.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    pub async fn start<F, Fut>(handler: F) -> RawBackend
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a2 = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                a2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        RawBackend { addr, accepted, task }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads an HTTP/1.1 request head (up to the blank line) from a raw stream.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A port that refuses connections (bound, then released).
pub fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Extracts one sample's value from a Prometheus text exposition. `series` is
/// `name{k="v",...}` with the labels in any order (all of them must match, and the
/// sample may have no others). A missing series reads as 0.
pub fn metric(text: &str, series: &str) -> f64 {
    fn split(s: &str) -> (&str, Vec<&str>) {
        match s.split_once('{') {
            Some((name, rest)) => {
                let labels = rest.trim_end_matches('}');
                let mut v: Vec<&str> = if labels.is_empty() { vec![] } else { labels.split("\",").collect() };
                for l in &mut v {
                    *l = l.trim_end_matches('"');
                }
                v.sort_unstable();
                (name, v)
            }
            None => (s, vec![]),
        }
    }
    let want = split(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (split(s) == want).then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A TLS client connection to `addr` with `sni`, trusting `ca`, offering `alpn`.
/// Returns the stream, the negotiated ALPN and the leaf the server presented.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    ca: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
    rustls::pki_types::CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(sluice_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = session.peer_certificates().unwrap()[0].clone();
    (stream, alpn, leaf)
}
