//! Upstream clusters: endpoints, health, outlier detection, circuit breakers and
//! load balancing. Shared by every worker; the per-worker connection pools live
//! in [`crate::pool`].

mod balance;
mod outlier;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use sluice_config::{Cluster, EndpointAddr, HttpProtocol, parse_endpoint};

pub use balance::{HashKey, Picker, hash_of};

/// Hashes bytes for the ring.
pub fn hash_bytes(b: &[u8]) -> u64 {
    hash_of(b)
}
pub use outlier::Outcome;

use crate::metrics::Metrics;

/// Milliseconds since the process started (monotonic), for atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One upstream endpoint and its shared state.
#[derive(Debug)]
pub struct Endpoint {
    /// Resolved address.
    pub addr: SocketAddr,
    /// The host as configured (a DNS name or an IP), used for SNI and `host`.
    pub host: Arc<str>,
    /// Active health: true until a health check says otherwise.
    pub hc_healthy: AtomicBool,
    /// Outlier ejection: ejected until this `now_ms()`; 0 when not ejected.
    pub ejected_until: AtomicU64,
    /// Times ejected (grows the next ejection).
    pub ejections: AtomicU32,
    /// Consecutive 5xx responses.
    pub consecutive_5xx: AtomicU32,
    /// Consecutive gateway errors and connect failures.
    pub consecutive_gateway: AtomicU32,
    /// Requests in flight to this endpoint (all workers).
    pub active: AtomicUsize,
    /// The cluster's circuit-breaker counters: a request in flight holds the
    /// endpoint and reaches them through it (no clone of the cluster's `Arc`,
    /// whose count every worker writes).
    pub breaker: Arc<Breaker>,
    healthy_gauge: IntGauge,
}

impl Endpoint {
    /// Whether the endpoint may take traffic now.
    pub fn available(&self, now: u64) -> bool {
        self.hc_healthy.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// Whether it is ejected now.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    fn update_gauge(&self) {
        self.healthy_gauge.set(i64::from(self.available(now_ms())));
    }

    /// Marks the active-health state.
    pub fn set_hc_healthy(&self, healthy: bool) {
        self.hc_healthy.store(healthy, Ordering::Relaxed);
        self.update_gauge();
    }
}

/// The endpoints of a cluster at one moment, with the hash ring.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Endpoints in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    ring: balance::Ring,
}

/// Circuit-breaker counters, shared by every worker.
#[derive(Debug, Default)]
pub struct Breaker {
    /// Open upstream connections.
    pub connections: AtomicUsize,
    /// Requests waiting for a connection.
    pub pending: AtomicUsize,
    /// Requests in flight.
    pub requests: AtomicUsize,
    /// Retries in flight.
    pub retries: AtomicUsize,
}

/// Handles to the cluster's metrics, resolved once.
pub struct ClusterMetrics {
    /// Connections opened.
    pub connections: IntCounter,
    /// Connect failures.
    pub connect_failures: IntCounter,
    /// Retries.
    pub retries: IntCounter,
    /// Requests resent because a pooled connection had gone stale.
    pub stale_resends: IntCounter,
    /// Reusable connections closed because the idle pool was full.
    pub pool_overflow: IntCounter,
    /// Retries refused by the budget.
    pub retry_budget_exhausted: IntCounter,
    /// Rejections by limit.
    pub rejected_connections: IntCounter,
    /// Rejections by limit.
    pub rejected_pending: IntCounter,
    /// Rejections by limit.
    pub rejected_requests: IntCounter,
    /// Ejections.
    pub ejections: IntCounter,
    /// Ejected now.
    pub ejected: IntGauge,
    /// Upstream latency.
    pub latency: Arc<crate::metrics::Latency>,
}

/// A cluster, shared by all workers. Kept across reloads when its config is unchanged,
/// so pools, health and outlier state survive.
pub struct ClusterState {
    /// Unique id for per-worker pool maps.
    pub id: u64,
    /// Name.
    pub name: Arc<str>,
    /// Configuration.
    pub config: Cluster,
    /// Parsed endpoint addresses as configured.
    pub addrs: Vec<EndpointAddr>,
    /// Current endpoints (replaced by DNS refresh).
    pub endpoints: ArcSwap<EndpointSet>,
    /// Circuit-breaker counters.
    pub breaker: Arc<Breaker>,
    /// Metrics.
    pub metrics: ClusterMetrics,
    /// Upstream TLS connector and ALPN.
    pub tls: Option<Arc<crate::pool::UpstreamTls>>,
    /// What the filters of requests sent to it read of it (name, metadata).
    pub facts: Arc<sluice_filter::ClusterFacts>,
    metrics_family: Metrics,
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState").field("name", &self.name).finish()
    }
}

impl ClusterState {
    /// Builds the cluster; IP endpoints are usable at once, DNS names after the
    /// first resolution (done by the caller with [`ClusterState::resolve`]).
    pub fn new(config: Cluster, metrics: &Metrics, tls: Option<Arc<crate::pool::UpstreamTls>>) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let name: Arc<str> = config.name.as_str().into();
        let addrs: Vec<EndpointAddr> =
            config.endpoints.iter().filter_map(|e| parse_endpoint(e).ok()).collect();
        let cm = ClusterMetrics {
            connections: metrics.upstream_connections.with_label_values(&[&name]),
            connect_failures: metrics.upstream_connect_failures.with_label_values(&[&name]),
            retries: metrics.retries.with_label_values(&[&name]),
            stale_resends: metrics.stale_resends.with_label_values(&[&name]),
            pool_overflow: metrics.pool_overflow.with_label_values(&[&name]),
            retry_budget_exhausted: metrics.retry_budget_exhausted.with_label_values(&[&name]),
            rejected_connections: metrics.circuit_rejections.with_label_values(&[&name, "connections"]),
            rejected_pending: metrics.circuit_rejections.with_label_values(&[&name, "pending"]),
            rejected_requests: metrics.circuit_rejections.with_label_values(&[&name, "requests"]),
            ejections: metrics.ejections.with_label_values(&[&name]),
            ejected: metrics.ejected.with_label_values(&[&name]),
            latency: metrics.upstream_latency.with_label_values(&[&name]),
        };
        let state = Arc::new(ClusterState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            facts: Arc::new(sluice_filter::ClusterFacts {
                name: name.clone(),
                metadata: (!config.metadata.is_empty()).then(|| config.metadata.clone()),
                num_endpoints: Default::default(),
            }),
            name,
            config,
            addrs,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            breaker: Arc::default(),
            metrics: cm,
            tls,
            metrics_family: metrics.clone(),
        });
        let literal: Vec<SocketAddr> = state
            .addrs
            .iter()
            .filter_map(|a| a.host.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, a.port)))
            .collect();
        if literal.len() == state.addrs.len() {
            let hosts: Vec<(SocketAddr, Arc<str>)> = literal
                .into_iter()
                .zip(state.addrs.iter())
                .map(|(sa, a)| (sa, a.host.as_str().into()))
                .collect();
            state.set_endpoints(hosts);
        }
        state
    }

    /// Whether every endpoint is an IP literal (no DNS refresh needed).
    pub fn is_static(&self) -> bool {
        self.addrs.iter().all(|a| a.host.parse::<std::net::IpAddr>().is_ok())
    }

    /// The metric families (for labels resolved at run time).
    pub fn metrics_family(&self) -> &Metrics {
        &self.metrics_family
    }

    /// Whether the upstream speaks HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.config.protocol == HttpProtocol::Http2
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub fn set_endpoints(&self, resolved: Vec<(SocketAddr, Arc<str>)>) {
        let old = self.endpoints.load();
        let endpoints: Vec<Arc<Endpoint>> = resolved
            .into_iter()
            .map(|(addr, host)| {
                if let Some(e) = old.endpoints.iter().find(|e| e.addr == addr) {
                    return e.clone();
                }
                let addr_label = addr.to_string();
                let gauge = self
                    .metrics_family
                    .endpoint_healthy
                    .with_label_values(&[self.name.as_ref(), addr_label.as_str()]);
                let e = Endpoint {
                    addr,
                    host,
                    // New endpoints start healthy, so traffic flows before the first
                    // active check completes (documented in docs/config.md).
                    hc_healthy: AtomicBool::new(true),
                    ejected_until: AtomicU64::new(0),
                    ejections: AtomicU32::new(0),
                    consecutive_5xx: AtomicU32::new(0),
                    consecutive_gateway: AtomicU32::new(0),
                    active: AtomicUsize::new(0),
                    breaker: self.breaker.clone(),
                    healthy_gauge: gauge,
                };
                e.update_gauge();
                Arc::new(e)
            })
            .collect();
        let ring = balance::Ring::build(&endpoints);
        self.facts.num_endpoints.store(u32::try_from(endpoints.len()).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.endpoints.store(Arc::new(EndpointSet { endpoints, ring }));
    }

    /// Resolves DNS names and updates the endpoint set. Keeps the old set when
    /// resolution fails entirely.
    pub async fn resolve(&self) {
        let mut resolved = Vec::new();
        for a in &self.addrs {
            if let Ok(ip) = a.host.parse::<std::net::IpAddr>() {
                resolved.push((SocketAddr::new(ip, a.port), a.host.as_str().into()));
                continue;
            }
            match tokio::net::lookup_host((a.host.as_str(), a.port)).await {
                Ok(addrs) => {
                    let host: Arc<str> = a.host.as_str().into();
                    for sa in addrs {
                        if !resolved.iter().any(|(r, _)| *r == sa) {
                            resolved.push((sa, host.clone()));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(cluster = %self.name, host = %a.host, error = %e, "dns resolution failed")
                }
            }
        }
        if resolved.is_empty() && !self.endpoints.load().endpoints.is_empty() {
            return;
        }
        let changed = {
            let cur = self.endpoints.load();
            cur.endpoints.len() != resolved.len()
                || cur.endpoints.iter().zip(&resolved).any(|(e, (sa, _))| e.addr != *sa)
        };
        if changed {
            tracing::info!(cluster = %self.name, endpoints = resolved.len(), "endpoints updated");
            self.set_endpoints(resolved);
        }
    }

    /// Records the outcome of a request to `endpoint` for outlier detection.
    pub fn record_outcome(&self, endpoint: &Endpoint, outcome: Outcome) {
        if let Some(od) = &self.config.outlier_detection {
            outlier::record(self, od, endpoint, outcome);
        }
    }

    /// The retry-ready timeout for connecting.
    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout
    }
}
