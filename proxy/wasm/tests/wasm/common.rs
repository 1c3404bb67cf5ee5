//! Test harness: a host, specs, a worker-like runtime, request heads, and a real
//! `CalloutClient` over hyper.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, request, response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::{FailPolicy, FilterLimits, FilterSpec};
use sluice_filter::{
    BodyAction, CalloutClient, CalloutError, CalloutResponse, FilterError, FilterFactory, HeadersAction,
    HttpFilter, LocalBoxFuture, LogView, StreamInfo,
};
use sluice_wasm::{HostOptions, WasmHost};

/// A `CalloutClient` over hyper: cluster name → address.
#[derive(Default)]
pub struct TestCallouts {
    pub clusters: HashMap<String, SocketAddr>,
}

impl CalloutClient for TestCallouts {
    fn call(
        &self,
        cluster: &str,
        request: http::Request<Bytes>,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<CalloutResponse, CalloutError>> {
        let addr = self.clusters.get(cluster).copied();
        let cluster = cluster.to_string();
        Box::pin(async move {
            let addr = addr.ok_or(CalloutError::UnknownCluster(cluster))?;
            match tokio::time::timeout(timeout, send(addr, request)).await {
                Ok(r) => r.map_err(|e| CalloutError::Upstream(e.to_string())),
                Err(_) => Err(CalloutError::Timeout),
            }
        })
    }
}

async fn send(addr: SocketAddr, request: http::Request<Bytes>) -> anyhow::Result<CalloutResponse> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let io = TokioIo::new(stream);
    let (mut parts, body) = request.into_parts();
    let response = if parts.version == http::Version::HTTP_2 {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        parts.uri = format!("http://{addr}{pq}").parse()?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::task::spawn_local(conn);
        sender.send_request(http::Request::from_parts(parts, Full::new(body))).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::task::spawn_local(conn);
        sender.send_request(http::Request::from_parts(parts, Full::new(body))).await?
    };
    let (head, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok(CalloutResponse { head, body: collected.to_bytes(), trailers })
}

/// A host with its registry.
pub fn host_with(callouts: TestCallouts) -> (WasmHost, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let options = HostOptions { max_instances: 64, ..HostOptions::default() };
    let host = WasmHost::new(options, &registry, Arc::new(callouts)).expect("host");
    (host, registry)
}

pub fn host() -> (WasmHost, prometheus::Registry) {
    host_with(TestCallouts::default())
}

/// A filter of the tests' modules. Its callbacks get 2 s: tests of what host
/// calls answer make up to ~30,000 of them in one callback, a debug build on a
/// loaded 2-core CI machine can take tens of milliseconds for that, and a
/// deadline there would be a false failure. Tests of the deadline set their own.
pub fn spec(name: &str) -> FilterSpec {
    FilterSpec {
        name: name.into(),
        module: "inline.wasm".into(),
        root_id: String::new(),
        vm_id: None,
        vm_config: None,
        config: None,
        fail_policy: FailPolicy::Closed,
        limits: FilterLimits {
            callback_timeout: Duration::from_secs(2),
            memory_bytes: 8 * 1024 * 1024,
            ..FilterLimits::default()
        },
        env: Default::default(),
    }
}

/// Runs a future like a Sluice worker: current-thread runtime inside a `LocalSet`.
/// Runs one request through `factory`'s request headers (they must continue)
/// and `on_log`; returns the request header `name` as the filter left it.
pub fn request_header_set(factory: &Arc<dyn FilterFactory>, name: &str) -> Option<String> {
    run(async {
        let mut ex = Exchange::new(factory, "http://a.test/");
        let action = ex.request_headers(true).await;
        assert!(matches!(action, Ok(sluice_filter::HeadersAction::Continue)), "{action:?}");
        ex.log();
        ex.req.headers.get(name).map(|v| v.to_str().unwrap_or("?").to_owned())
    })
}

pub fn run<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f)
}

pub fn request(method: &str, uri: &str) -> request::Parts {
    http::Request::builder().method(method).uri(uri).body(()).expect("request").into_parts().0
}

pub fn response(status: u16) -> response::Parts {
    http::Response::builder().status(status).body(()).expect("response").into_parts().0
}

pub fn info() -> StreamInfo {
    StreamInfo::new(
        "req-1",
        7,
        "127.0.0.1:40000".parse().expect("addr"),
        "127.0.0.1:8080".parse().expect("addr"),
        Arc::from("main"),
        http::Version::HTTP_11,
        std::time::Instant::now(),
    )
}

/// One request through one filter, the way the data plane drives it.
pub struct Exchange {
    pub filter: Box<dyn HttpFilter>,
    pub info: StreamInfo,
    pub req: request::Parts,
    pub resp: sluice_filter::ResponseHead,
}

impl Exchange {
    pub fn new(factory: &Arc<dyn FilterFactory>, uri: &str) -> Exchange {
        let info = info();
        Exchange {
            filter: factory.new_filter(&info),
            info,
            req: request("GET", uri),
            resp: sluice_filter::ResponseHead::new(response(200)),
        }
    }

    pub async fn request_headers(&mut self, eos: bool) -> Result<HeadersAction, FilterError> {
        sluice_filter::request_headers(&mut *self.filter, &mut self.req, &self.info, eos).await
    }

    pub async fn request_body(
        &mut self,
        body: &mut sluice_filter::BodyBuf,
        eos: bool,
    ) -> Result<BodyAction, FilterError> {
        sluice_filter::request_body(&mut *self.filter, body, &self.info, eos).await
    }

    pub async fn response_headers(&mut self, eos: bool) -> Result<HeadersAction, FilterError> {
        sluice_filter::response_headers(&mut *self.filter, &mut self.resp, &self.info, eos).await
    }

    pub async fn response_body(
        &mut self,
        body: &mut sluice_filter::BodyBuf,
        eos: bool,
    ) -> Result<BodyAction, FilterError> {
        sluice_filter::response_body(&mut *self.filter, body, &self.info, eos).await
    }

    pub fn log(&mut self) {
        self.log_with_trailers(&HeaderMap::new());
    }

    /// `on_log` after a response that ended with `trailers`.
    pub fn log_with_trailers(&mut self, trailers: &HeaderMap) {
        let view = LogView {
            request_added: None,
            request: Some(&self.req),
            response: Some(&self.resp),
            request_trailers: None,
            response_trailers: Some(trailers),
        };
        self.filter.on_log(&view, &self.info);
    }
}

/// The value of a metric sample in the registry's text output.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &str) -> Option<f64> {
    let families = registry.gather();
    let mut out = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut out).ok()?;
    let text = String::from_utf8(out).ok()?;
    let prefix = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// Builds the `proxy-wasm` fixtures once per test run and returns a module's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(build_fixtures).as_ref().unwrap_or_else(|e| panic!("building fixtures: {e}"));
    let target = if name == "mini" { "wasm32-unknown-unknown" } else { "wasm32-wasip1" };
    std::fs::read(dir.join(target).join("release").join(format!("{name}.wasm"))).expect("fixture module")
}

fn build_fixtures() -> Result<std::path::PathBuf, String> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = manifest.join("tests/fixtures");
    // A separate target dir: the outer build holds the workspace target's lock.
    let target_dir = manifest.join("../../target/wasm-fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (package, target) in [("sink", "wasm32-wasip1"), ("mini", "wasm32-unknown-unknown")] {
        let out = std::process::Command::new(&cargo)
            .current_dir(&fixtures)
            .args(["build", "--release", "--locked", "-p", package, "--target", target, "--target-dir"])
            .arg(&target_dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    Ok(target_dir)
}

/// A real upstream for callouts on 127.0.0.1:0 (HTTP/1.1 and h2c): `/bytes/even`,
/// `/slow`, and the gRPC methods `test.Svc/Echo` (replies "pong:<msg>") and
/// `test.Svc/Fail` (trailers-only PERMISSION_DENIED).
pub async fn backend() -> SocketAddr {
    use futures_util::stream;
    use http_body_util::{StreamBody, combinators::BoxBody};
    use hyper::body::Frame;

    type Body = BoxBody<Bytes, std::convert::Infallible>;
    async fn handle(
        req: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<Body>, std::convert::Infallible> {
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let full = |b: &'static [u8]| Full::new(Bytes::from_static(b)).boxed();
        let resp = match path.as_str() {
            "/bytes/even" => http::Response::new(full(&[2])),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                http::Response::new(full(b"late"))
            }
            "/test.Svc/Echo" => {
                let msg = body.get(5..).unwrap_or_default();
                let reply = [b"pong:".as_slice(), msg].concat();
                let mut framed = vec![0u8];
                framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                framed.extend_from_slice(&reply);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let frames = vec![Ok(Frame::data(Bytes::from(framed))), Ok(Frame::trailers(trailers))];
                let mut r = http::Response::new(StreamBody::new(stream::iter(frames)).boxed());
                r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
                r
            }
            "/test.Svc/Fail" => {
                let mut r = http::Response::new(full(b""));
                r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
                r.headers_mut().insert("grpc-status", http::HeaderValue::from_static("7"));
                r.headers_mut().insert("grpc-message", http::HeaderValue::from_static("denied"));
                r
            }
            _ => {
                let mut r = http::Response::new(full(b"not found"));
                *r.status_mut() = http::StatusCode::NOT_FOUND;
                r
            }
        };
        Ok(resp)
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::task::spawn_local(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::task::spawn_local(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ =
                    builder.serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle)).await;
            });
        }
    });
    addr
}

#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process-wide log capture (a scoped subscriber races with callsite
/// interest caching when tests run in parallel, so the capture is global).
pub fn captured_logs() -> &'static Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
        captured
    })
}
