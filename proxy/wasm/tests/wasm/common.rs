//! Test harness: a host, specs, a worker-like runtime, request heads, and a real
//! `CalloutClient` over hyper.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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

pub fn spec(name: &str) -> FilterSpec {
    FilterSpec {
        name: name.into(),
        module: "inline.wasm".into(),
        root_id: String::new(),
        vm_config: None,
        config: None,
        fail_policy: FailPolicy::Closed,
        limits: FilterLimits {
            callback_timeout: Duration::from_millis(50),
            memory_bytes: 8 * 1024 * 1024,
            ..FilterLimits::default()
        },
        env: Default::default(),
    }
}

/// Runs a future like a Sluice worker: current-thread runtime inside a `LocalSet`.
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
        "req-1".into(),
        7,
        "127.0.0.1:40000".parse().expect("addr"),
        "127.0.0.1:8080".parse().expect("addr"),
        Arc::from("main"),
        http::Version::HTTP_11,
    )
}

/// One request through one filter, the way the data plane drives it.
pub struct Exchange {
    pub filter: Box<dyn HttpFilter>,
    pub info: StreamInfo,
    pub req: request::Parts,
    pub resp: response::Parts,
}

impl Exchange {
    pub fn new(factory: &Arc<dyn FilterFactory>, uri: &str) -> Exchange {
        let info = info();
        Exchange { filter: factory.new_filter(&info), info, req: request("GET", uri), resp: response(200) }
    }

    pub async fn request_headers(&mut self, eos: bool) -> Result<HeadersAction, FilterError> {
        self.filter.on_request_headers(&mut self.req, &self.info, eos).await
    }

    pub async fn request_body(&mut self, body: &mut BytesMut, eos: bool) -> Result<BodyAction, FilterError> {
        self.filter.on_request_body(body, &self.info, eos).await
    }

    pub async fn response_headers(&mut self, eos: bool) -> Result<HeadersAction, FilterError> {
        self.filter.on_response_headers(&mut self.resp, &self.info, eos).await
    }

    pub async fn response_body(&mut self, body: &mut BytesMut, eos: bool) -> Result<BodyAction, FilterError> {
        self.filter.on_response_body(body, &self.info, eos).await
    }

    pub fn log(&mut self) {
        let trailers = HeaderMap::new();
        let view = LogView {
            request: &self.req,
            response: Some(&self.resp),
            request_trailers: None,
            response_trailers: Some(&trailers),
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
