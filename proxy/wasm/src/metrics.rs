//! Prometheus metrics: the host's own (per plugin), and the metrics guests define
//! with `proxy_define_metric` (exported as `sluice_wasm_custom_<name>{plugin}`).

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use sluice_abi::MetricType;

/// Buckets of the VM start histograms (seconds): a VM is built from the
/// compiled module in microseconds.
const VM_START_BUCKETS: [f64; 11] = [2.5e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1, 1.0];

/// The host's metrics.
pub(crate) struct HostMetrics {
    pub loads: IntCounterVec,
    pub load_failures: IntCounterVec,
    pub traps: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub reloads: IntCounterVec,
    pub fail_open: IntCounterVec,
    pub pool_exhausted: IntCounterVec,
    pub vms: IntGaugeVec,
    pub vm_start: HistogramVec,
    pub vm_instantiate: HistogramVec,
    pub module_cache: IntCounterVec,
    pub callouts: IntCounterVec,
    pub log_dropped: IntCounterVec,
}

impl HostMetrics {
    pub fn new(registry: &Registry) -> Result<HostMetrics, prometheus::Error> {
        fn counter(
            registry: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let vms = IntGaugeVec::new(Opts::new("sluice_wasm_vms", "Live wasm VMs, by plugin"), &["plugin"])?;
        registry.register(Box::new(vms.clone()))?;
        // Off the request path: a worker's VM is built once per filter (and on reload).
        let histogram = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(VM_START_BUCKETS.to_vec()),
                &["plugin"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let vm_start = histogram(
            "sluice_wasm_vm_start_seconds",
            "Time to build a worker's wasm VM from the compiled module (instantiate, \
             _initialize, root context, on_vm_start, on_configure), by plugin",
        )?;
        let vm_instantiate = histogram(
            "sluice_wasm_vm_instantiate_seconds",
            "Time to instantiate a worker's wasm VM from the compiled module before any \
             guest code runs (Store, instance, exports), by plugin; part of \
             sluice_wasm_vm_start_seconds",
        )?;
        Ok(HostMetrics {
            loads: counter(registry, "sluice_wasm_loads_total", "Wasm filters loaded", &["plugin"])?,
            load_failures: counter(
                registry,
                "sluice_wasm_load_failures_total",
                "Wasm filters rejected at load",
                &["plugin"],
            )?,
            traps: counter(
                registry,
                "sluice_wasm_traps_total",
                "Wasm VM failures (trap, timeout, oom, …) by plugin and kind",
                &["plugin", "kind"],
            )?,
            timeouts: counter(
                registry,
                "sluice_wasm_timeouts_total",
                "Wasm timeouts: callback deadlines, pauses past pause_timeout, callouts",
                &["plugin", "what"],
            )?,
            reloads: counter(
                registry,
                "sluice_wasm_reloads_total",
                "Wasm VMs rebuilt after a failure (fail policy reload)",
                &["plugin"],
            )?,
            fail_open: counter(
                registry,
                "sluice_wasm_fail_open_total",
                "Requests that skipped a failed wasm filter (fail policy open)",
                &["plugin"],
            )?,
            pool_exhausted: counter(
                registry,
                "sluice_wasm_vm_pool_exhausted_total",
                "Worker wasm VMs not started because the VM pool (max_instances) was full, by plugin",
                &["plugin"],
            )?,
            vms,
            vm_start,
            vm_instantiate,
            module_cache: counter(
                registry,
                "sluice_wasm_module_cache_total",
                "Module lookups: memory (already compiled), disk (compilation cache), compiled",
                &["result"],
            )?,
            callouts: counter(
                registry,
                "sluice_wasm_callouts_total",
                "Callouts made by wasm filters",
                &["plugin", "kind", "result"],
            )?,
            log_dropped: counter(
                registry,
                "sluice_wasm_log_lines_dropped_total",
                "Guest log lines dropped because a callback emitted more than 100, by plugin",
                &["plugin"],
            )?,
        })
    }
}

/// A guest-defined metric.
#[derive(Clone)]
pub(crate) enum GuestMetric {
    Counter(IntCounter),
    Gauge(IntGauge),
    Histogram(Histogram),
}

enum Family {
    Counter(IntCounterVec),
    Gauge(IntGaugeVec),
    Histogram(HistogramVec),
}

/// The families of guest metrics, shared by every plugin (label `plugin`).
pub(crate) struct GuestMetricFamilies {
    registry: Registry,
    families: Mutex<HashMap<String, Family>>,
}

/// Makes a guest metric name a Prometheus name.
fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 20);
    out.push_str("sluice_wasm_custom_");
    for c in name.chars() {
        out.push(if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' });
    }
    out
}

impl GuestMetricFamilies {
    pub fn new(registry: Registry) -> GuestMetricFamilies {
        GuestMetricFamilies { registry, families: Mutex::new(HashMap::new()) }
    }

    /// The metric `name` of `kind` for `plugin`. A name already used with another
    /// kind gets a working metric that is not exported (and a warning).
    pub fn define(&self, plugin: &str, kind: MetricType, name: &str) -> GuestMetric {
        let full = sanitize(name);
        let mut families = self.families.lock();
        if !families.contains_key(&full)
            && let Some(family) = self.make(&full, kind)
        {
            families.insert(full.clone(), family);
        }
        match (families.get(&full), kind) {
            (Some(Family::Counter(f)), MetricType::Counter) => {
                GuestMetric::Counter(f.with_label_values(&[plugin]))
            }
            (Some(Family::Gauge(f)), MetricType::Gauge) => GuestMetric::Gauge(f.with_label_values(&[plugin])),
            (Some(Family::Histogram(f)), MetricType::Histogram) => {
                GuestMetric::Histogram(f.with_label_values(&[plugin]))
            }
            _ => {
                tracing::warn!(
                    plugin,
                    metric = name,
                    "guest metric name clashes with another metric; not exported"
                );
                detached(&full, kind)
            }
        }
    }

    fn make(&self, full: &str, kind: MetricType) -> Option<Family> {
        let help = "Metric defined by a wasm filter";
        let family = match kind {
            MetricType::Counter => {
                Family::Counter(IntCounterVec::new(Opts::new(full, help), &["plugin"]).ok()?)
            }
            MetricType::Gauge => Family::Gauge(IntGaugeVec::new(Opts::new(full, help), &["plugin"]).ok()?),
            MetricType::Histogram => {
                let opts = HistogramOpts::new(full, help)
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 16).ok()?);
                Family::Histogram(HistogramVec::new(opts, &["plugin"]).ok()?)
            }
        };
        let registered = match &family {
            Family::Counter(f) => self.registry.register(Box::new(f.clone())),
            Family::Gauge(f) => self.registry.register(Box::new(f.clone())),
            Family::Histogram(f) => self.registry.register(Box::new(f.clone())),
        };
        registered.ok().map(|()| family)
    }
}

fn detached(full: &str, kind: MetricType) -> GuestMetric {
    let fallback = || {
        GuestMetric::Gauge(
            IntGauge::with_opts(Opts::new("sluice_wasm_detached", "detached"))
                .unwrap_or_else(|_| unreachable_gauge()),
        )
    };
    match kind {
        MetricType::Counter => {
            IntCounter::new(full, "detached").map(GuestMetric::Counter).unwrap_or_else(|_| fallback())
        }
        MetricType::Gauge => {
            IntGauge::new(full, "detached").map(GuestMetric::Gauge).unwrap_or_else(|_| fallback())
        }
        MetricType::Histogram => Histogram::with_opts(HistogramOpts::new(full, "detached"))
            .map(GuestMetric::Histogram)
            .unwrap_or_else(|_| fallback()),
    }
}

#[allow(clippy::expect_used)]
fn unreachable_gauge() -> IntGauge {
    // A constant, valid name: cannot fail.
    IntGauge::new("sluice_wasm_detached_metric", "detached").expect("valid metric name")
}
