//! Passive outlier detection: consecutive 5xx or gateway errors eject an
//! endpoint for `base_ejection_time × times ejected` (capped), never more than
//! `max_ejection_percent` of the cluster at once.

use std::sync::atomic::Ordering;

use sluice_config::OutlierDetection;

use super::{ClusterState, Endpoint, now_ms};

/// What happened to one upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx other than the gateway errors.
    ServerError,
    /// 502, 503, 504, a connect failure, a reset or a timeout.
    GatewayError,
}

pub(super) fn record(cluster: &ClusterState, od: &OutlierDetection, ep: &Endpoint, outcome: Outcome) {
    match outcome {
        Outcome::Success => {
            ep.consecutive_5xx.store(0, Ordering::Relaxed);
            ep.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        Outcome::ServerError => {
            ep.consecutive_gateway.store(0, Ordering::Relaxed);
            let n = ep.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            if od.consecutive_5xx > 0 && n >= od.consecutive_5xx {
                eject(cluster, od, ep, "consecutive 5xx");
            }
        }
        Outcome::GatewayError => {
            let n5 = ep.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            let ng = ep.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            if od.consecutive_gateway_errors > 0 && ng >= od.consecutive_gateway_errors {
                eject(cluster, od, ep, "consecutive gateway errors");
            } else if od.consecutive_5xx > 0 && n5 >= od.consecutive_5xx {
                eject(cluster, od, ep, "consecutive 5xx");
            }
        }
    }
}

fn eject(cluster: &ClusterState, od: &OutlierDetection, ep: &Endpoint, why: &str) {
    let now = now_ms();
    if ep.is_ejected(now) {
        return;
    }
    let set = cluster.endpoints.load();
    let total = set.endpoints.len().max(1);
    let ejected = set.endpoints.iter().filter(|e| e.is_ejected(now)).count();
    // At least one endpoint may always be ejected, as in Envoy.
    let max = (total * od.max_ejection_percent as usize / 100).max(1);
    if ejected >= max {
        tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, "ejection skipped: max_ejection_percent reached");
        return;
    }
    let times = ep.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let base = od.base_ejection_time.as_millis() as u64;
    let duration =
        base.saturating_mul(u64::from(times)).min(od.max_ejection_time.as_millis() as u64).max(base);
    ep.ejected_until.store(now + duration, Ordering::Relaxed);
    ep.consecutive_5xx.store(0, Ordering::Relaxed);
    ep.consecutive_gateway.store(0, Ordering::Relaxed);
    ep.update_gauge();
    cluster.metrics.ejections.inc();
    cluster.metrics.ejected.set((ejected + 1) as i64);
    tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, reason = why, ejection_ms = duration, times, "endpoint ejected");
}
