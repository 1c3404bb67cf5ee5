//! The admin listener: `/metrics`, `/config`, `/clusters`, `/filters`,
//! `/healthz`, `/readyz`. Loopback by default; plain HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::Encoder;
use tokio::net::TcpListener;

use crate::cluster::now_ms;
use crate::forward::Shared;

/// Serves the admin endpoints until the listener errors.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    r
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    reply(StatusCode::OK, "application/json", body)
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let families = shared.metrics.registry.gather();
            let mut buf = Vec::new();
            let enc = prometheus::TextEncoder::new();
            if enc.encode(&families, &mut buf).is_err() {
                return reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encode error\n");
            }
            reply(StatusCode::OK, "text/plain; version=0.0.4", buf)
        }
        "/config" => {
            let dp = shared.dataplane.load();
            json(&serde_json::json!({
                "generation": dp.generation,
                "source": dp.snapshot.source_name(),
                "config": dp.snapshot.config(),
            }))
        }
        "/clusters" => {
            let dp = shared.dataplane.load();
            let now = now_ms();
            let mut clusters: Vec<_> = dp.clusters.values().collect();
            clusters.sort_by(|a, b| a.name.cmp(&b.name));
            let list: Vec<_> = clusters
                .iter()
                .map(|c| {
                    let set = c.endpoints.load();
                    let eps: Vec<_> = set
                        .endpoints
                        .iter()
                        .map(|e| {
                            let until = e.ejected_until.load(Ordering::Relaxed);
                            serde_json::json!({
                                "address": e.addr.to_string(),
                                "host": &*e.host,
                                "healthy": e.hc_healthy.load(Ordering::Relaxed),
                                "ejected": until > now,
                                "ejected_for_ms": until.saturating_sub(now),
                                "ejections": e.ejections.load(Ordering::Relaxed),
                                "active_requests": e.active.load(Ordering::Relaxed),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "name": &*c.name,
                        "protocol": c.config.protocol,
                        "lb": c.config.lb,
                        "connections": c.breaker.connections.load(Ordering::Relaxed),
                        "active_requests": c.breaker.requests.load(Ordering::Relaxed),
                        "pending_requests": c.breaker.pending.load(Ordering::Relaxed),
                        "endpoints": eps,
                    })
                })
                .collect();
            json(&serde_json::json!({ "clusters": list }))
        }
        "/filters" => {
            let dp = shared.dataplane.load();
            let list: Vec<_> = dp
                .filters
                .iter()
                .map(|(at, f)| serde_json::json!({ "at": at, "name": f.name(), "status": f.status() }))
                .collect();
            json(&serde_json::json!({ "generation": dp.generation, "filters": list }))
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if shared.draining.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /metrics /config /clusters /filters /healthz /readyz\n",
        ),
    }
}
