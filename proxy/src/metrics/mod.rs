//! Prometheus metrics of the data plane.
//!
//! Label lookups hash and lock, so the request path never does them: routes and
//! clusters resolve their metric handles once, when a config is compiled. What
//! every request records (its count by status class and its latencies) is kept
//! per worker ([`sharded`]); the rest are prometheus' own types.

pub mod sharded;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use sharded::{ClassCounter, ClassCounterVec, Latency, LatencyVec};

/// All data-plane metric families.
#[derive(Clone)]
pub struct Metrics {
    /// The registry everything is registered in (filters register here too).
    pub registry: Registry,
    /// `sluice_requests_total{listener,route,cluster,class}`.
    pub requests: ClassCounterVec,
    /// `sluice_downstream_request_duration_seconds{listener,route}`.
    pub downstream_latency: LatencyVec,
    /// `sluice_upstream_request_duration_seconds{cluster}`.
    pub upstream_latency: LatencyVec,
    /// `sluice_downstream_connections_active{listener}`.
    pub connections_active: IntGaugeVec,
    /// `sluice_downstream_connections_total{listener}`.
    pub connections_total: IntCounterVec,
    /// `sluice_downstream_connections_per_worker{listener,worker}`.
    pub worker_connections: IntGaugeVec,
    /// `sluice_downstream_connections_rebalanced_total{listener}`: connections
    /// handed from the accepting worker to a less loaded one.
    pub connections_rebalanced: IntCounterVec,
    /// `sluice_local_replies_total{reason}`: errors and proxy-made answers by reason.
    pub local_replies: IntCounterVec,
    /// `sluice_downstream_connections_closed_for_abuse_total{listener,reason}`.
    pub abuse_closes: IntCounterVec,
    /// `sluice_upstream_connections_total{cluster}`.
    pub upstream_connections: IntCounterVec,
    /// `sluice_upstream_connect_failures_total{cluster}`.
    pub upstream_connect_failures: IntCounterVec,
    /// `sluice_upstream_retries_total{cluster}`.
    pub retries: IntCounterVec,
    /// `sluice_upstream_stale_connection_resends_total{cluster}`.
    pub stale_resends: IntCounterVec,
    /// `sluice_upstream_pool_overflow_total{cluster}`.
    pub pool_overflow: IntCounterVec,
    /// `sluice_upstream_retry_budget_exhausted_total{cluster}`.
    pub retry_budget_exhausted: IntCounterVec,
    /// `sluice_circuit_breaker_rejections_total{cluster,limit}`.
    pub circuit_rejections: IntCounterVec,
    /// `sluice_upstream_endpoint_healthy{cluster,endpoint}` (1 healthy, 0 not).
    pub endpoint_healthy: IntGaugeVec,
    /// `sluice_upstream_ejections_total{cluster}`.
    pub ejections: IntCounterVec,
    /// `sluice_upstream_endpoints_ejected{cluster}`.
    pub ejected: IntGaugeVec,
    /// `sluice_health_checks_total{cluster,result}`.
    pub health_checks: IntCounterVec,
    /// `sluice_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `sluice_config_generation`.
    pub generation: IntGauge,
    /// `sluice_build_info{version}`.
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every family in `registry`.
    pub fn new(registry: Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let latency = |name: &str, help: &str, labels: &[&str]| -> Result<LatencyVec, prometheus::Error> {
            let h = LatencyVec::new(name, help, labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let generation = IntGauge::new("sluice_config_generation", "Generation of the config in force")?;
        registry.register(Box::new(generation.clone()))?;
        let m = Metrics {
            requests: {
                let c = ClassCounterVec::new(
                    "sluice_requests_total",
                    "Downstream requests by listener, route, cluster and status class",
                    &["listener", "route", "cluster", "class"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            downstream_latency: latency(
                "sluice_downstream_request_duration_seconds",
                "Time from request headers to the end of the response, downstream",
                &["listener", "route"],
            )?,
            upstream_latency: latency(
                "sluice_upstream_request_duration_seconds",
                "Time from sending the request upstream to its response headers",
                &["cluster"],
            )?,
            connections_active: gauge(
                "sluice_downstream_connections_active",
                "Open downstream connections",
                &["listener"],
            )?,
            connections_total: counter(
                "sluice_downstream_connections_total",
                "Accepted downstream connections",
                &["listener"],
            )?,
            worker_connections: gauge(
                "sluice_downstream_connections_per_worker",
                "Open downstream connections served by each worker",
                &["listener", "worker"],
            )?,
            connections_rebalanced: counter(
                "sluice_downstream_connections_rebalanced_total",
                "Connections handed by the accepting worker to a worker serving fewer (connection_balance: exact)",
                &["listener"],
            )?,
            local_replies: counter(
                "sluice_local_replies_total",
                "Responses made by the proxy (errors, redirects, direct responses) by reason",
                &["reason"],
            )?,
            abuse_closes: counter(
                "sluice_downstream_connections_closed_for_abuse_total",
                "Downstream connections closed by a protection (e.g. HTTP/2 rapid reset)",
                &["listener", "reason"],
            )?,
            upstream_connections: counter(
                "sluice_upstream_connections_total",
                "Upstream connections opened",
                &["cluster"],
            )?,
            upstream_connect_failures: counter(
                "sluice_upstream_connect_failures_total",
                "Upstream connections that failed or timed out",
                &["cluster"],
            )?,
            retries: counter("sluice_upstream_retries_total", "Retried upstream attempts", &["cluster"])?,
            stale_resends: counter(
                "sluice_upstream_stale_connection_resends_total",
                "Requests sent again on a fresh connection because a pooled HTTP/1.1 connection closed before answering",
                &["cluster"],
            )?,
            pool_overflow: counter(
                "sluice_upstream_pool_overflow_total",
                "Reusable HTTP/1.1 connections closed because the worker's pool already held max_idle_per_endpoint idle ones",
                &["cluster"],
            )?,
            retry_budget_exhausted: counter(
                "sluice_upstream_retry_budget_exhausted_total",
                "Retries refused by the retry budget or the retry circuit breaker",
                &["cluster"],
            )?,
            circuit_rejections: counter(
                "sluice_circuit_breaker_rejections_total",
                "Requests rejected by a circuit breaker",
                &["cluster", "limit"],
            )?,
            endpoint_healthy: gauge(
                "sluice_upstream_endpoint_healthy",
                "1 when the endpoint is healthy and not ejected",
                &["cluster", "endpoint"],
            )?,
            ejections: counter(
                "sluice_upstream_ejections_total",
                "Outlier-detection ejections",
                &["cluster"],
            )?,
            ejected: gauge("sluice_upstream_endpoints_ejected", "Endpoints ejected now", &["cluster"])?,
            health_checks: counter(
                "sluice_health_checks_total",
                "Active health checks by result",
                &["cluster", "result"],
            )?,
            reloads: counter("sluice_config_reloads_total", "Config reloads by result", &["result"])?,
            build_info: gauge("sluice_build_info", "Build information", &["version"])?,
            generation,
            registry,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(m)
    }

    /// Resolves the per-route request handles.
    pub fn route_handles(&self, listener: &str, route: &str, cluster: &str) -> Arc<RouteMetrics> {
        Arc::new(RouteMetrics {
            by_class: self.requests.with_label_values(&[listener, route, cluster]),
            latency: self.downstream_latency.with_label_values(&[listener, route]),
        })
    }
}

/// Pre-resolved request metrics of one (listener, route, cluster).
pub struct RouteMetrics {
    by_class: Arc<ClassCounter>,
    latency: Arc<Latency>,
}

impl RouteMetrics {
    /// Counts a finished request.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.by_class.inc(status);
        self.latency.observe(elapsed);
    }
}
