//! Metrics the host exports (Envoy prefixes them `wasmcustom.`; Sluice exposes them
//! on its Prometheus endpoint). Define them once (in `on_vm_start` or
//! `on_configure`) and keep the handles.

use sluice_abi::MetricType;

use crate::error::HostError;
use crate::sys;

fn define(ty: MetricType, name: &str) -> Result<u32, HostError> {
    sys::define_metric(ty.as_u32(), name.as_bytes())
        .map_err(sys::fail("proxy_define_metric", format!("{ty:?}, {name:?}")))
}

fn value(id: u32) -> Result<u64, HostError> {
    sys::get_metric(id).map_err(sys::fail("proxy_get_metric", format!("{id}")))
}

/// A monotonic counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter(u32);

impl Counter {
    /// Defines (or finds) the counter `name`.
    pub fn new(name: &str) -> Result<Counter, HostError> {
        define(MetricType::Counter, name).map(Counter)
    }

    /// Adds one.
    pub fn inc(self) -> Result<(), HostError> {
        self.increment(1)
    }

    /// Adds `n` (zero is a no-op: hosts reject non-positive counter deltas).
    pub fn increment(self, n: u64) -> Result<(), HostError> {
        if n == 0 {
            return Ok(());
        }
        let delta = i64::try_from(n).unwrap_or(i64::MAX);
        sys::increment_metric(self.0, delta)
            .map_err(sys::fail("proxy_increment_metric", format!("counter {}, {n}", self.0)))
    }

    /// The current value.
    pub fn value(self) -> Result<u64, HostError> {
        value(self.0)
    }
}

/// A gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauge(u32);

impl Gauge {
    /// Defines (or finds) the gauge `name`.
    pub fn new(name: &str) -> Result<Gauge, HostError> {
        define(MetricType::Gauge, name).map(Gauge)
    }

    /// Sets the value.
    pub fn set(self, v: i64) -> Result<(), HostError> {
        sys::record_metric(self.0, v as u64)
            .map_err(sys::fail("proxy_record_metric", format!("gauge {}, {v}", self.0)))
    }

    /// Adds `delta` (may be negative).
    pub fn increment(self, delta: i64) -> Result<(), HostError> {
        sys::increment_metric(self.0, delta)
            .map_err(sys::fail("proxy_increment_metric", format!("gauge {}, {delta}", self.0)))
    }

    /// The current value.
    pub fn value(self) -> Result<i64, HostError> {
        value(self.0).map(|v| v as i64)
    }
}

/// A histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram(u32);

impl Histogram {
    /// Defines (or finds) the histogram `name`.
    pub fn new(name: &str) -> Result<Histogram, HostError> {
        define(MetricType::Histogram, name).map(Histogram)
    }

    /// Records one observation.
    pub fn record(self, v: u64) -> Result<(), HostError> {
        sys::record_metric(self.0, v)
            .map_err(sys::fail("proxy_record_metric", format!("histogram {}, {v}", self.0)))
    }
}
