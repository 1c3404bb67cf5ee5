//! Prometheus metrics for TLS: handshake outcomes by side and reason, and the expiry
//! of the certificates each listener serves.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::ServerTls;
use crate::info::handshake_failure_reason;

/// Which side of the proxy a handshake was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A downstream client connected to one of our listeners.
    Downstream,
    /// We connected to an upstream cluster.
    Upstream,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        }
    }
}

/// TLS metrics, registered once per process.
///
/// - `sluice_tls_handshakes_total{side, name, result}`: `result` is `ok` or a reason
///   from [`handshake_failure_reason`]; `name` is the listener or cluster.
/// - `sluice_tls_certificate_not_after_seconds{listener, certificate}`: each served
///   certificate's `notAfter` (Unix seconds); `certificate` is its config field.
#[derive(Debug, Clone)]
pub struct TlsMetrics {
    handshakes: IntCounterVec,
    not_after: IntGaugeVec,
}

// === impl TlsMetrics ===

impl TlsMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &Registry) -> Result<TlsMetrics, prometheus::Error> {
        let handshakes = IntCounterVec::new(
            Opts::new("sluice_tls_handshakes_total", "TLS handshakes by outcome"),
            &["side", "name", "result"],
        )?;
        let not_after = IntGaugeVec::new(
            Opts::new(
                "sluice_tls_certificate_not_after_seconds",
                "notAfter of each served certificate, Unix seconds",
            ),
            &["listener", "certificate"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(not_after.clone()))?;
        Ok(TlsMetrics { handshakes, not_after })
    }

    /// Counts a completed handshake.
    pub fn handshake_ok(&self, side: Side, name: &str) {
        self.handshakes.with_label_values(&[side.label(), name, "ok"]).inc();
    }

    /// Counts a failed handshake and returns the reason label it was counted under.
    pub fn handshake_failed(&self, side: Side, name: &str, err: &std::io::Error) -> &'static str {
        let reason = handshake_failure_reason(err);
        self.handshakes.with_label_values(&[side.label(), name, reason]).inc();
        reason
    }

    /// Publishes the expiry of the certificates `tls` serves for `listener` (call after
    /// building or reloading it).
    pub fn observe_certificates(&self, listener: &str, tls: &ServerTls) {
        for cert in tls.certificates() {
            self.not_after.with_label_values(&[listener, cert.field.as_str()]).set(cert.not_after_unix);
        }
    }
}
