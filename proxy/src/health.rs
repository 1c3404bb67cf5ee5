//! Background upkeep of clusters: active HTTP health checks, DNS
//! re-resolution and the ejection gauges. One task per cluster on the main
//! runtime; it ends when the cluster is dropped (after a reload removes it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::HealthCheck;
use tokio::net::TcpStream;

use crate::cluster::{ClusterState, now_ms};

/// Starts the upkeep task of a new cluster.
pub fn spawn_upkeep(cluster: &Arc<ClusterState>, rt: &tokio::runtime::Handle) {
    let weak = Arc::downgrade(cluster);
    rt.spawn(upkeep(weak));
}

async fn upkeep(weak: Weak<ClusterState>) {
    let (dns_every, hc) = match weak.upgrade() {
        Some(c) => {
            if !c.is_static() {
                c.resolve().await;
            }
            ((!c.is_static()).then_some(c.config.dns_refresh), c.config.health_check.clone())
        }
        None => return,
    };
    let mut counters: HashMap<SocketAddr, (u32, u32)> = HashMap::new();
    let mut next_dns = tokio::time::Instant::now() + dns_every.unwrap_or(Duration::from_secs(3600));
    let step = hc.as_ref().map_or(Duration::from_secs(1), |h| h.interval.min(Duration::from_secs(1)));
    let mut next_hc = tokio::time::Instant::now();
    loop {
        let Some(cluster) = weak.upgrade() else { return };
        let now = tokio::time::Instant::now();
        if dns_every.is_some() && now >= next_dns {
            cluster.resolve().await;
            next_dns = now + dns_every.unwrap_or_default();
        }
        if let Some(hc) = &hc
            && now >= next_hc
        {
            run_checks(&cluster, hc, &mut counters).await;
            next_hc = now + hc.interval;
        }
        refresh_gauges(&cluster);
        drop(cluster);
        tokio::time::sleep(step).await;
    }
}

fn refresh_gauges(cluster: &ClusterState) {
    let now = now_ms();
    let set = cluster.endpoints.load();
    let mut ejected = 0;
    for e in &set.endpoints {
        if e.is_ejected(now) {
            ejected += 1;
        }
        e.set_hc_healthy(e.hc_healthy.load(std::sync::atomic::Ordering::Relaxed));
    }
    cluster.metrics.ejected.set(ejected);
}

async fn run_checks(
    cluster: &Arc<ClusterState>,
    hc: &HealthCheck,
    counters: &mut HashMap<SocketAddr, (u32, u32)>,
) {
    let set = cluster.endpoints.load_full();
    let checks = set.endpoints.iter().map(|e| {
        let cluster = cluster.clone();
        let e = e.clone();
        let hc = hc.clone();
        async move {
            let ok = tokio::time::timeout(hc.timeout, check_one(&cluster, &e.addr, &e.host, &hc))
                .await
                .unwrap_or(Err("timeout".to_owned()));
            (e, ok)
        }
    });
    let results = futures_util::future::join_all(checks).await;
    for (e, result) in results {
        let entry = counters.entry(e.addr).or_insert((0, 0));
        let label = if result.is_ok() { "success" } else { "failure" };
        cluster.metrics_family().health_checks.with_label_values(&[&cluster.name, label]).inc();
        match result {
            Ok(()) => {
                entry.0 += 1;
                entry.1 = 0;
                if entry.0 >= hc.healthy_threshold && !e.hc_healthy.load(std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(cluster = %cluster.name, endpoint = %e.addr, "endpoint healthy");
                    e.set_hc_healthy(true);
                }
            }
            Err(why) => {
                entry.1 += 1;
                entry.0 = 0;
                if entry.1 >= hc.unhealthy_threshold
                    && e.hc_healthy.load(std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(cluster = %cluster.name, endpoint = %e.addr, reason = %why, "endpoint unhealthy");
                    e.set_hc_healthy(false);
                }
            }
        }
    }
}

async fn check_one(
    cluster: &ClusterState,
    addr: &SocketAddr,
    host: &str,
    hc: &HealthCheck,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let authority = hc.host.clone().unwrap_or_else(|| format!("{host}:{}", addr.port()));
    match &cluster.tls {
        None => request(cluster.is_h2(), TokioIo::new(tcp), &authority, hc, false).await,
        Some(tls) => {
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => {
                    rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?
                }
            };
            let s = tls.connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
            request(cluster.is_h2(), TokioIo::new(s), &authority, hc, true).await
        }
    }
}

async fn request<T>(
    h2: bool,
    io: TokioIo<T>,
    authority: &str,
    hc: &HealthCheck,
    https: bool,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let scheme = if https { "https" } else { "http" };
    let status = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(format!("{scheme}://{authority}{}", hc.path))
            .header(header::USER_AGENT, "sluice-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        let st = resp.status();
        let _ = resp.into_body().collect().await;
        st
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(hc.path.as_str())
            .header(header::HOST, authority)
            .header(header::USER_AGENT, "sluice-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        let st = resp.status();
        let _ = resp.into_body().collect().await;
        st
    };
    if hc.is_expected(status.as_u16()) { Ok(()) } else { Err(format!("status {status}")) }
}
