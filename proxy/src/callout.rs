//! HTTP callouts for filters (`proxy_http_call`, gRPC callouts): requests to a
//! configured cluster through the same balancer and per-worker pools as
//! proxied traffic. Futures run on the calling worker.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Uri, Version};
use http_body_util::BodyExt;
use sluice_filter::{CalloutClient, CalloutError, CalloutResponse, LocalBoxFuture};

use crate::body::ProxyBody;
use crate::cluster::ClusterState;
use crate::forward::Shared;
use crate::upstream::{pick_endpoint, send_request};

/// The data plane's [`CalloutClient`]. Created before the proxy (the filter host
/// needs it at construction) and attached to it once it runs.
#[derive(Default)]
pub struct ClusterCallouts {
    shared: OnceLock<Weak<Shared>>,
}

impl ClusterCallouts {
    /// A detached client: calls fail until [`ClusterCallouts::attach`].
    pub fn new() -> Arc<Self> {
        Arc::new(ClusterCallouts::default())
    }

    /// Connects the client to a running proxy.
    pub fn attach(&self, proxy: &crate::Proxy) {
        let _ = self.shared.set(Arc::downgrade(proxy.shared()));
    }
}

impl CalloutClient for ClusterCallouts {
    fn call(
        &self,
        cluster: &str,
        request: Request<Bytes>,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<CalloutResponse, CalloutError>> {
        let shared = self.shared.get().and_then(Weak::upgrade);
        let name = cluster.to_owned();
        Box::pin(async move {
            let shared = shared.ok_or_else(|| CalloutError::Upstream("proxy not running".to_owned()))?;
            let cluster = shared
                .dataplane
                .load()
                .clusters
                .get(&name)
                .cloned()
                .ok_or(CalloutError::UnknownCluster(name))?;
            let call = call(cluster, request);
            if timeout.is_zero() {
                call.await
            } else {
                tokio::time::timeout(timeout, call).await.unwrap_or(Err(CalloutError::Timeout))
            }
        })
    }
}

async fn call(cluster: Arc<ClusterState>, request: Request<Bytes>) -> Result<CalloutResponse, CalloutError> {
    let endpoint = pick_endpoint(&cluster, None, None)
        .ok_or_else(|| CalloutError::Upstream(format!("no healthy endpoint in cluster {}", cluster.name)))?;
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_else(|| endpoint.host.to_string());
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if cluster.is_h2() {
        parts.headers.remove(HOST);
        let scheme = if cluster.tls.is_some() { "https" } else { "http" };
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|e| CalloutError::Upstream(e.to_string()))?;
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::try_from(pq).map_err(|e| CalloutError::Upstream(e.to_string()))?;
        if let Ok(v) = authority.parse() {
            parts.headers.insert(HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    let req = Request::from_parts(parts, ProxyBody::full(body));
    endpoint.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = send_request(&cluster, &endpoint, req, &Default::default(), false, None).await;
    endpoint.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let answer = result.map_err(|e| CalloutError::Upstream(e.to_string()))?;
    let (head, body) = answer.response.into_parts();
    let collected = body.collect().await.map_err(|e| CalloutError::Upstream(e.to_string()))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok(CalloutResponse { head, body: collected.to_bytes(), trailers })
}
