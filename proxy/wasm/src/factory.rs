//! The loaded filter: [`Plugin`] (what every VM of it shares), the factory with a
//! VM slot per worker thread, the fail policy, and status.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::{self, Rc};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluice_abi::MetricType;
use sluice_config::{FailPolicy, FilterLimits, FilterSpec, Node, ReloadPolicy};
use sluice_filter::{FilterError, FilterErrorKind, FilterFactory, HttpFilter, LoadContext, StreamInfo};
use thread_local::ThreadLocal;

use crate::host::HostShared;
use crate::metrics::GuestMetric;
use crate::module::{AbiVersion, CompiledModule};
use crate::state::HttpCtx;
use crate::vm::{POOL_EXHAUSTED, Vm, VmFailure, ticks_for};

/// Everything the VMs of one loaded filter share.
pub(crate) struct Plugin {
    pub name: Arc<str>,
    pub root_id: String,
    /// The scope of shared data and queues: the spec's `vm_id`, or the name.
    pub vm_id: Arc<str>,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    /// WASI environment, as `K=V` strings.
    pub env: Vec<String>,
    pub limits: FilterLimits,
    pub policy: FailPolicy,
    pub clusters: Vec<String>,
    /// The proxy's identity (`xds.node.*`).
    pub node: Arc<Node>,
    pub digest: String,
    pub abi: AbiVersion,
    pub module: String,
    pub deadline_ticks: u64,
    pub start_deadline_ticks: u64,
    pub host: Arc<HostShared>,
    /// Guest metrics defined so far (id = index + 1).
    pub guest_metrics: Mutex<Vec<(MetricType, String, GuestMetric)>>,
    vms: prometheus::IntGauge,
    vm_start: prometheus::Histogram,
    /// The instantiation proper of a worker VM (observed by [`Vm::new`]).
    pub vm_instantiate: prometheus::Histogram,
    fail_open: prometheus::IntCounter,
    status: Mutex<StatusRecord>,
    vm_count: AtomicU64,
}

#[derive(Default)]
struct StatusRecord {
    traps: BTreeMap<&'static str, u64>,
    last_error: Option<String>,
    reloads: u64,
    fail_open: u64,
    pause_timeouts: u64,
    /// Worker VM starts refused because the VM pool was full.
    pool_exhausted: u64,
    failed_workers: usize,
    reloading_workers: usize,
    /// The HTTP callbacks a VM of the plugin declared no-ops (union).
    noop_http: u32,
}

impl Plugin {
    pub fn vm_created(&self) {
        self.vms.inc();
        self.vm_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn vm_dropped(&self) {
        self.vms.dec();
        self.vm_count.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn count_fail_open(&self) {
        self.fail_open.inc();
        self.status.lock().fail_open += 1;
    }

    /// A VM of the plugin declared these HTTP callbacks no-ops.
    pub fn record_noop(&self, bits: u32) {
        self.status.lock().noop_http |= bits;
    }

    pub fn count_pause_timeout(&self) {
        self.host.metrics.timeouts.with_label_values(&[&*self.name, "pause"]).inc();
        self.status.lock().pause_timeouts += 1;
    }

    pub fn error(&self, kind: FilterErrorKind, callback: &'static str, reason: String) -> FilterError {
        FilterError { plugin: self.name.to_string(), callback, kind, reason }
    }
}

/// Per-worker VM state.
pub(crate) struct WorkerSlot {
    pub vm: Option<Vm>,
    pub generation: u64,
    health: Health,
    /// Reloads since the last request that completed without a failure.
    reloads: u32,
    pub last_error: Option<FilterError>,
    /// Contexts of a failed VM, kept until their request picks its data back up.
    pub orphans: Vec<(u64, u32, HttpCtx)>,
    next_ctx: u32,
    /// The last attempt to start a VM found the VM pool full.
    starved: bool,
}

impl Drop for WorkerSlot {
    /// A live VM (one that did not fail) shuts its root context down.
    fn drop(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.shutdown();
        }
    }
}

enum Health {
    Fresh,
    Ready,
    /// Failed for good (fail policy closed or open, or the crash-loop cap hit).
    Failed,
    /// Fail policy reload: a new VM may be built after `until`.
    Backoff {
        until: Instant,
    },
}

impl WorkerSlot {
    fn new() -> WorkerSlot {
        WorkerSlot {
            vm: None,
            generation: 0,
            health: Health::Fresh,
            reloads: 0,
            last_error: None,
            orphans: Vec::new(),
            next_ctx: 1,
            starved: false,
        }
    }

    /// A fresh HTTP context id in the current VM (`None` without one): the
    /// next one whose slot in the VM's context table is free, which no live
    /// context has (see [`crate::contexts`]).
    pub fn next_ctx_id(&mut self) -> Option<u32> {
        let contexts = &mut self.vm.as_mut()?.store.data_mut().contexts;
        loop {
            self.next_ctx = self.next_ctx.wrapping_add(1);
            let id = self.next_ctx;
            if id > 1 && contexts.is_free(id) {
                return Some(id);
            }
        }
    }

    /// The live VM, built if this worker has none yet (or its backoff is over).
    pub fn ensure(&mut self, inner: &FactoryInner) -> Result<&mut Vm, FilterError> {
        if self.vm.is_none() {
            let plugin = &inner.plugin;
            let reloading = match self.health {
                Health::Ready | Health::Fresh => false,
                Health::Failed => return Err(self.unavailable(inner)),
                Health::Backoff { until } if Instant::now() < until => return Err(self.unavailable(inner)),
                Health::Backoff { .. } => true,
            };
            self.generation += 1;
            let span = tracing::debug_span!("wasm_vm_start", plugin = %plugin.name, reloading);
            let _enter = span.enter();
            let started = Instant::now();
            match Vm::new(&inner.module, plugin.clone(), true, self.generation, false) {
                Ok(vm) => {
                    plugin.vm_start.observe(started.elapsed().as_secs_f64());
                    if reloading {
                        plugin.host.metrics.reloads.with_label_values(&[&*plugin.name]).inc();
                        let mut st = plugin.status.lock();
                        st.reloads += 1;
                        st.reloading_workers = st.reloading_workers.saturating_sub(1);
                        tracing::info!(plugin = %plugin.name, "wasm VM rebuilt after a failure");
                    }
                    self.health = Health::Ready;
                    self.starved = false;
                    self.next_ctx = 1;
                    self.vm = Some(vm);
                    if let Some(vm) = self.vm.as_mut() {
                        crate::callout::flush(inner, vm, None);
                    }
                }
                Err(failure) if failure.label == POOL_EXHAUSTED => return Err(self.starved(inner, failure)),
                Err(failure) => {
                    if reloading {
                        let mut st = plugin.status.lock();
                        st.reloading_workers = st.reloading_workers.saturating_sub(1);
                    }
                    return Err(self.fail(inner, failure));
                }
            }
        }
        self.vm.as_mut().ok_or_else(|| inner.plugin.error(FilterErrorKind::Internal, "none", "no VM".into()))
    }

    /// The VM could not start because the VM pool is full. That is the host's
    /// limit, not the guest's failure: no fail policy beyond this request (closed
    /// answers 503, open skips the filter), no backoff, and no state change, so
    /// the next request tries again and gets a VM as soon as a slot frees (in a
    /// hot swap, when the old chain's VMs are dropped). Logged once per streak.
    fn starved(&mut self, inner: &FactoryInner, failure: VmFailure) -> FilterError {
        let plugin = &inner.plugin;
        let err = plugin.error(FilterErrorKind::Unavailable, "vm_start", failure.message);
        plugin.host.metrics.pool_exhausted.with_label_values(&[&*plugin.name]).inc();
        if !std::mem::replace(&mut self.starved, true) {
            tracing::warn!(plugin = %plugin.name, reason = %err.reason, "wasm VM not started: the VM pool is full");
        }
        let mut st = plugin.status.lock();
        st.pool_exhausted += 1;
        st.last_error = Some(err.to_string());
        err
    }

    fn unavailable(&self, inner: &FactoryInner) -> FilterError {
        let reason = match &self.last_error {
            Some(e) => format!("VM failed earlier: {}", e.reason),
            None => "VM unavailable".into(),
        };
        inner.plugin.error(FilterErrorKind::Unavailable, "none", reason)
    }

    /// Marks the VM failed: records it, drops the VM (keeping its contexts' data
    /// for their requests), wakes every paused request and applies the policy.
    pub fn fail(&mut self, inner: &FactoryInner, failure: VmFailure) -> FilterError {
        let plugin = &inner.plugin;
        let err = plugin.error(failure.kind, failure.callback.name(), failure.message);
        plugin.host.metrics.traps.with_label_values(&[&*plugin.name, failure.label]).inc();
        if failure.kind == FilterErrorKind::Timeout {
            plugin.host.metrics.timeouts.with_label_values(&[&*plugin.name, "callback"]).inc();
        }
        tracing::error!(plugin = %plugin.name, callback = err.callback, kind = failure.label, reason = %err.reason, "wasm VM failed");
        if let Some(mut vm) = self.vm.take() {
            let mut contexts = vm.store.data_mut().take_contexts();
            let generation = vm.generation;
            drop(vm);
            for (id, mut ctx) in contexts.drain() {
                if let Some(w) = ctx.waker.take() {
                    w.wake();
                }
                self.orphans.push((generation, id, ctx));
            }
        }
        let mut st = plugin.status.lock();
        *st.traps.entry(failure.label).or_default() += 1;
        st.last_error = Some(err.to_string());
        self.health = match &plugin.policy {
            FailPolicy::Closed | FailPolicy::Open => {
                st.failed_workers += 1;
                Health::Failed
            }
            FailPolicy::Reload(policy) => {
                if self.reloads >= policy.max_consecutive {
                    tracing::error!(plugin = %plugin.name, reloads = self.reloads, "wasm VM crash loop: not reloading again");
                    st.failed_workers += 1;
                    Health::Failed
                } else {
                    st.reloading_workers += 1;
                    let until = Instant::now() + backoff(policy, self.reloads);
                    self.reloads += 1;
                    Health::Backoff { until }
                }
            }
        };
        self.last_error = Some(err.clone());
        err
    }

    /// A request finished without a failure: the crash-loop counter restarts.
    pub fn request_succeeded(&mut self) {
        if matches!(self.health, Health::Ready) {
            self.reloads = 0;
        }
    }
}

fn backoff(policy: &ReloadPolicy, reloads: u32) -> Duration {
    let factor = 1u32.checked_shl(reloads.min(20)).unwrap_or(u32::MAX);
    policy.base.saturating_mul(factor).min(policy.max)
}

/// The factory: shared by every worker, holds a VM slot per worker thread.
pub(crate) struct FactoryInner {
    pub plugin: Arc<Plugin>,
    pub module: Arc<CompiledModule>,
    workers: ThreadLocal<RefCell<WorkerSlot>>,
    pub weak: Weak<FactoryInner>,
}

impl FactoryInner {
    /// This worker's slot.
    pub fn slot(&self) -> &RefCell<WorkerSlot> {
        self.workers.get_or(|| RefCell::new(WorkerSlot::new()))
    }

    /// This worker's hold on the factory, shared by its requests: making a
    /// filter then counts a reference only this worker writes. (Upgrading
    /// `weak` per request wrote the factory's count, which every worker
    /// writes: a cache line bouncing between cores, twice per filter.)
    fn hold(&self) -> Option<Rc<WorkerHold>> {
        thread_local! {
            /// This thread's holds, by factory address. A hold keeps its
            /// factory alive, so a live entry's address cannot be reused.
            static HOLDS: RefCell<Vec<(usize, rc::Weak<WorkerHold>)>> = const { RefCell::new(Vec::new()) };
        }
        let key = std::ptr::from_ref(self) as usize;
        HOLDS.with(|holds| {
            let mut holds = holds.borrow_mut();
            if let Some(hold) = holds.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade()) {
                return Some(hold);
            }
            let hold = Rc::new(WorkerHold(self.weak.upgrade()?));
            holds.retain(|(k, w)| *k != key && w.strong_count() > 0);
            holds.push((key, Rc::downgrade(&hold)));
            Some(hold)
        })
    }
}

/// A worker's hold on a factory (see [`FactoryInner::hold`]); dropped with the
/// worker's last request that uses it.
pub(crate) struct WorkerHold(Arc<FactoryInner>);

impl std::ops::Deref for WorkerHold {
    type Target = FactoryInner;
    fn deref(&self) -> &FactoryInner {
        &self.0
    }
}

/// Builds factories.
pub(crate) struct WasmFactory;

impl WasmFactory {
    /// Makes the factory and validates the module and config with one VM.
    pub fn build(
        host: Arc<HostShared>,
        module: Arc<CompiledModule>,
        spec: &FilterSpec,
        cx: &LoadContext<'_>,
    ) -> Result<Arc<dyn FilterFactory>, String> {
        let tick = host.options.epoch_tick;
        let label = [spec.name.as_str()];
        let plugin = Arc::new(Plugin {
            name: Arc::from(spec.name.as_str()),
            root_id: spec.root_id.clone(),
            vm_id: Arc::from(spec.vm_id.as_deref().unwrap_or(&spec.name)),
            vm_config: spec.vm_config_bytes(),
            plugin_config: spec.plugin_config_bytes(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            limits: spec.limits.clone(),
            policy: spec.fail_policy.clone(),
            clusters: cx.clusters.to_vec(),
            node: cx.node.clone(),
            digest: module.digest.clone(),
            abi: module.abi,
            module: spec.module.clone(),
            deadline_ticks: ticks_for(spec.limits.callback_timeout, tick),
            start_deadline_ticks: ticks_for(spec.limits.callback_timeout.max(Duration::from_secs(1)), tick),
            guest_metrics: Mutex::new(Vec::new()),
            vms: host.metrics.vms.with_label_values(&label),
            vm_start: host.metrics.vm_start.with_label_values(&label),
            vm_instantiate: host.metrics.vm_instantiate.with_label_values(&label),
            fail_open: host.metrics.fail_open.with_label_values(&label),
            status: Mutex::new(StatusRecord::default()),
            vm_count: AtomicU64::new(0),
            host,
        });
        // Validate: instantiate and configure one VM now, then shut it down.
        Vm::new(&module, plugin.clone(), false, 0, true)
            .map_err(|f| match f.label {
                "rejected" | "instantiate" | POOL_EXHAUSTED => f.message,
                _ => format!("{} failed: {}", f.callback.name(), f.message),
            })?
            .shutdown();
        let inner = Arc::new_cyclic(|weak| FactoryInner {
            plugin,
            module,
            workers: ThreadLocal::new(),
            weak: weak.clone(),
        });
        Ok(inner)
    }
}

impl FilterFactory for FactoryInner {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    fn new_filter(&self, _info: &StreamInfo) -> Box<dyn HttpFilter> {
        match self.hold() {
            Some(hold) => Box::new(crate::filter::WasmFilter::new(hold)),
            None => Box::new(crate::filter::Unavailable(self.plugin.clone())),
        }
    }

    fn prepare_worker(&self) {
        // Build this worker's VM now (root context, `on_vm_start`, `on_configure`) so
        // the first request does not pay for it. A failure is recorded by `ensure`.
        let _ = self.slot().borrow_mut().ensure(self);
    }

    fn status(&self) -> serde_json::Value {
        let p = &self.plugin;
        let st = p.status.lock();
        let state = if st.failed_workers > 0 {
            "failed"
        } else if st.reloading_workers > 0 {
            "reloading"
        } else {
            "ok"
        };
        let policy = match &p.policy {
            FailPolicy::Closed => "closed",
            FailPolicy::Open => "open",
            FailPolicy::Reload(_) => "reload",
        };
        serde_json::json!({
            "name": &*p.name,
            "module": p.module,
            "digest": p.digest,
            "abi_version": p.abi.as_str(),
            "root_id": p.root_id,
            "vm_id": &*p.vm_id,
            "fail_policy": policy,
            "vms": p.vm_count.load(Ordering::Relaxed),
            "state": state,
            "failed_workers": st.failed_workers,
            "reloading_workers": st.reloading_workers,
            "traps": st.traps,
            "reloads": st.reloads,
            "fail_open_passes": st.fail_open,
            "pause_timeouts": st.pause_timeouts,
            "pool_exhausted": st.pool_exhausted,
            "noop_callbacks": crate::state::noop_names(st.noop_http),
            "last_error": st.last_error,
        })
    }
}
