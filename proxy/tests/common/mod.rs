//! Test harness: real hyper backends and clients on 127.0.0.1:0, and a real
//! `Proxy` started from YAML. Shared by the data-plane integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// A running backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
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
        let handler = Arc::new(handler);
        let h2 = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let handler = handler.clone();
                let hits = h2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let hits = hits.clone();
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(handler(Request::from_parts(parts, body)).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, hits, task }
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
        let proxy =
            Proxy::start(snapshot, ProxyOptions { registry: prometheus::Registry::new(), loader: None })
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

/// A minimal config: one listener `main` on port 0 forwarding everything to one cluster.
pub fn simple_config(backends: &[SocketAddr]) -> String {
    let eps: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 2
listeners:
  - name: main
    address: 127.0.0.1:0
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - forward: {{ cluster: backend }}
clusters:
  - name: backend
    endpoints: [{}]
"#,
        eps.join(", ")
    )
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
