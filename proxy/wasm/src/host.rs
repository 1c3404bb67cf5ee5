//! The process-wide host: engine, epoch ticker, linker, module cache, and the
//! [`FilterLoader`] implementation. The engine and its ticker start with the
//! first module load, so a proxy without filters carries none of it.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluice_config::FilterSpec;
use sluice_filter::{CalloutClient, FilterFactory, FilterLoader, LoadContext, LoadError};
use wasmtime::{
    Cache, CacheConfig, Config, Enabled, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig,
};

use crate::factory::WasmFactory;
use crate::metrics::{GuestMetricFamilies, HostMetrics};
use crate::module::{self, CompiledModule};
use crate::shared::SharedState;
use crate::state::VmState;

/// Resolves `sha256:<hex>` module references (the control plane's module store).
pub trait ModuleStore: Send + Sync {
    /// The bytes of the module with this sha256 (lowercase hex), if stored. The host
    /// verifies the digest of what is returned.
    fn get(&self, sha256_hex: &str) -> Option<Vec<u8>>;
}

/// Options of the [`WasmHost`].
#[derive(Clone)]
pub struct HostOptions {
    /// Directory of the compiled-artifact disk cache (wasmtime's cache, keyed by
    /// the module bytes and the engine configuration). `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// Period of the epoch ticker that enforces callback deadlines.
    pub epoch_tick: Duration,
    /// Where `sha256:` module references are resolved.
    pub module_store: Option<Arc<dyn ModuleStore>>,
    /// Use wasmtime's pooling instance allocator (faster instantiation, bounded
    /// slots). When the pool is exhausted, creating a VM fails fast.
    pub pooling: bool,
    /// Pool size: how many VMs may exist at once in the process.
    pub max_instances: u32,
    /// Largest linear memory any VM may have (a pool slot's size); a filter whose
    /// `limits.memory_bytes` is larger is rejected at load.
    pub max_memory_bytes: u64,
    /// Pooling: per freed VM slot, up to this many bytes of the pages its VM
    /// wrote (linear memory, and tables) are reset in place and kept resident for
    /// the next VM of the slot, which then takes no page faults on them. Only on
    /// Linux 6.7+ (`PAGEMAP_SCAN`); elsewhere, or with 0, freed pages are released.
    /// Bounds the RSS of idle warm slots (at most 100 of them) to this much each.
    pub keep_resident_bytes: u64,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            module_store: None,
            pooling: true,
            max_instances: 1000,
            max_memory_bytes: 1024 * 1024 * 1024,
            keep_resident_bytes: 512 * 1024,
        }
    }
}

impl fmt::Debug for HostOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostOptions")
            .field("cache_dir", &self.cache_dir)
            .field("epoch_tick", &self.epoch_tick)
            .field("module_store", &self.module_store.is_some())
            .field("pooling", &self.pooling)
            .field("max_instances", &self.max_instances)
            .field("max_memory_bytes", &self.max_memory_bytes)
            .field("keep_resident_bytes", &self.keep_resident_bytes)
            .finish()
    }
}

/// Why the host could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The wasmtime engine could not be configured.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The compilation cache could not be set up.
    #[error("wasm compilation cache at {path}: {reason}")]
    Cache {
        /// The cache directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The metrics could not be registered.
    #[error("wasm host metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The epoch ticker thread could not be started.
    #[error("epoch ticker thread: {0}")]
    Ticker(#[from] std::io::Error),
    /// An option is out of range.
    #[error("invalid wasm host option: {0}")]
    Invalid(String),
}

/// The proxy-wasm host: build one per process and hand it to the data plane as
/// its `Arc<dyn FilterLoader>`.
pub struct WasmHost {
    shared: Arc<HostShared>,
}

impl fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmHost").field("options", &self.shared.options).finish()
    }
}

/// What every factory, VM and host call of the process shares.
pub(crate) struct HostShared {
    pub options: HostOptions,
    pub metrics: HostMetrics,
    pub guest_metrics: GuestMetricFamilies,
    pub callouts: Arc<dyn CalloutClient>,
    pub shared: SharedState,
    /// Built by the first load (see [`Runtime`]); kept for the host's life.
    runtime: Mutex<Option<Arc<Runtime>>>,
    modules: Mutex<HashMap<String, Weak<CompiledModule>>>,
}

/// The engine and what hangs off it. Built on the first module load rather than
/// at start: a proxy without filters then has no epoch ticker waking it 100
/// times a second and none of the engine's code and data in its RSS.
struct Runtime {
    engine: Engine,
    linker: Linker<VmState>,
    cache: Option<Cache>,
    /// Stopped when the host (the last factory) is dropped.
    _ticker: Ticker,
}

impl Runtime {
    fn build(options: &HostOptions) -> Result<Runtime, HostError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(512 * 1024);
        config.memory_init_cow(true);
        config.parallel_compilation(true);
        // `SLUICE_WASM_PERFMAP=1`: name the guest's compiled functions for
        // `perf` (and other samplers) in /tmp/perf-<pid>.map.
        if std::env::var_os("SLUICE_WASM_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if options.pooling {
            let mut pool = PoolingAllocationConfig::new();
            let max_memory = usize::try_from(options.max_memory_bytes)
                .map_err(|_| HostError::Invalid("max_memory_bytes does not fit in usize".into()))?;
            pool.total_core_instances(options.max_instances)
                .total_memories(options.max_instances)
                .total_tables(options.max_instances)
                .max_memory_size(max_memory)
                .max_unused_warm_slots(options.max_instances.min(100));
            // A VM's dirty pages are reset in place when its slot is freed, rather
            // than released with madvise and faulted back in by the next VM (most of
            // a VM start's guest-side cost). Only with PAGEMAP_SCAN (Linux 6.7+):
            // without it wasmtime would memset the lowest bytes whether used or not.
            if options.keep_resident_bytes > 0 && PoolingAllocationConfig::is_pagemap_scan_available() {
                let keep = usize::try_from(options.keep_resident_bytes)
                    .map_err(|_| HostError::Invalid("keep_resident_bytes does not fit in usize".into()))?;
                pool.pagemap_scan(Enabled::Yes).linear_memory_keep_resident(keep).table_keep_resident(keep);
            }
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let cache = match &options.cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| HostError::Cache { path: dir.clone(), reason: e.to_string() })?;
                let mut cache_config = CacheConfig::new();
                cache_config.with_directory(dir.clone());
                let cache = Cache::new(cache_config)
                    .map_err(|e| HostError::Cache { path: dir.clone(), reason: format!("{e:#}") })?;
                config.cache(Some(cache.clone()));
                Some(cache)
            }
            None => None,
        };
        let engine = Engine::new(&config).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let linker = crate::hostcalls::linker(&engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let ticker = Ticker::start(engine.clone(), options.epoch_tick)?;
        Ok(Runtime { engine, linker, cache, _ticker: ticker })
    }
}

impl WasmHost {
    /// Checks the options and registers the host metrics. The engine and its
    /// epoch ticker start with the first module load.
    pub fn new(
        options: HostOptions,
        registry: &prometheus::Registry,
        callouts: Arc<dyn CalloutClient>,
    ) -> Result<WasmHost, HostError> {
        if options.epoch_tick.is_zero() {
            return Err(HostError::Invalid("epoch_tick must be positive".into()));
        }
        if options.pooling && usize::try_from(options.max_memory_bytes).is_err() {
            return Err(HostError::Invalid("max_memory_bytes does not fit in usize".into()));
        }
        let metrics = HostMetrics::new(registry)?;
        Ok(WasmHost {
            shared: Arc::new(HostShared {
                metrics,
                guest_metrics: GuestMetricFamilies::new(registry.clone()),
                callouts,
                shared: SharedState::default(),
                runtime: Mutex::new(None),
                modules: Mutex::new(HashMap::new()),
                options,
            }),
        })
    }

    /// Loads a module (bytes already read), for tests and tools: same admission as
    /// [`FilterLoader::load`] minus reading the file.
    pub fn load_bytes(
        &self,
        spec: &FilterSpec,
        bytes: &[u8],
        clusters: &[String],
    ) -> Result<Arc<dyn FilterFactory>, LoadError> {
        let node = Arc::default();
        let cx = LoadContext { base_dir: std::path::Path::new(""), clusters, node: &node };
        let result = self.load_inner(spec, bytes, &cx);
        self.record_load(spec, &result);
        result
    }

    fn record_load(&self, spec: &FilterSpec, result: &Result<Arc<dyn FilterFactory>, LoadError>) {
        match result {
            Ok(_) => {
                self.shared.metrics.loads.with_label_values(&[spec.name.as_str()]).inc();
                tracing::info!(plugin = %spec.name, module = %spec.module, "wasm filter loaded");
            }
            Err(e) => {
                self.shared.metrics.load_failures.with_label_values(&[spec.name.as_str()]).inc();
                tracing::warn!(plugin = %spec.name, module = %spec.module, error = %e.reason, "wasm filter rejected");
            }
        }
    }

    fn load_inner(
        &self,
        spec: &FilterSpec,
        bytes: &[u8],
        cx: &LoadContext<'_>,
    ) -> Result<Arc<dyn FilterFactory>, LoadError> {
        let err = |reason: String| LoadError { plugin: spec.name.clone(), reason };
        let limit = spec.limits.max_module_bytes;
        if bytes.len() as u64 > limit {
            return Err(err(format!("module is {} bytes, over the {limit}-byte limit", bytes.len())));
        }
        if spec.limits.memory_bytes > self.shared.options.max_memory_bytes {
            return Err(err(format!(
                "limits.memory_bytes {} is over the host's max_memory_bytes {}",
                spec.limits.memory_bytes, self.shared.options.max_memory_bytes
            )));
        }
        if spec.limits.memory_bytes == 0 || spec.limits.callback_timeout.is_zero() {
            return Err(err("limits.memory_bytes and limits.callback_timeout must be positive".into()));
        }
        let digest = module::sha256_hex(bytes);
        let compiled = self.compiled(&digest, bytes).map_err(err)?;
        let factory = WasmFactory::build(self.shared.clone(), compiled, spec, cx).map_err(err)?;
        Ok(factory)
    }

    /// The compiled module for these bytes: from the in-memory cache, or compiled
    /// now (wasmtime's disk cache makes that a load when it has the artifact).
    fn compiled(&self, digest: &str, bytes: &[u8]) -> Result<Arc<CompiledModule>, String> {
        if let Some(found) = self.shared.modules.lock().get(digest).and_then(Weak::upgrade) {
            self.shared.metrics.module_cache.with_label_values(&["memory"]).inc();
            return Ok(found);
        }
        let rt = self.runtime()?;
        let started = Instant::now();
        let hits_before = rt.cache.as_ref().map_or(0, Cache::cache_hits);
        let compiled = Arc::new(CompiledModule::compile(&rt.engine, &rt.linker, digest, bytes)?);
        let hit = rt.cache.as_ref().is_some_and(|c| c.cache_hits() > hits_before);
        let outcome = if hit { "disk" } else { "compiled" };
        self.shared.metrics.module_cache.with_label_values(&[outcome]).inc();
        tracing::info!(digest, outcome, elapsed_ms = started.elapsed().as_millis() as u64, abi = %compiled.abi, "wasm module ready");
        let mut modules = self.shared.modules.lock();
        modules.retain(|_, m| m.strong_count() > 0);
        modules.insert(digest.to_string(), Arc::downgrade(&compiled));
        Ok(compiled)
    }

    /// The engine, built by the first call. A failure is returned to that load
    /// (and the next load tries again).
    fn runtime(&self) -> Result<Arc<Runtime>, String> {
        let mut slot = self.shared.runtime.lock();
        if let Some(rt) = slot.as_ref() {
            return Ok(rt.clone());
        }
        let started = Instant::now();
        let rt = Arc::new(Runtime::build(&self.shared.options).map_err(|e| e.to_string())?);
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "wasm engine started");
        *slot = Some(rt.clone());
        Ok(rt)
    }

    fn read_module(&self, spec: &FilterSpec, cx: &LoadContext<'_>) -> Result<Vec<u8>, LoadError> {
        let err = |reason: String| LoadError { plugin: spec.name.clone(), reason };
        let limit = spec.limits.max_module_bytes;
        if let Some(hex_digest) = spec.module_digest() {
            let wanted = hex_digest.to_ascii_lowercase();
            if wanted.len() != 64 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(format!("module reference `{}` is not sha256:<64 hex digits>", spec.module)));
            }
            let store = self.shared.options.module_store.as_ref().ok_or_else(|| {
                err(format!("module `{}` needs a module store, and none is configured", spec.module))
            })?;
            let bytes = store
                .get(&wanted)
                .ok_or_else(|| err(format!("module `{}` is not in the module store", spec.module)))?;
            let got = module::sha256_hex(&bytes);
            if got != wanted {
                return Err(err(format!("module store returned bytes with sha256 {got}, expected {wanted}")));
            }
            return Ok(bytes);
        }
        let path = spec.module_path().unwrap_or_default();
        let path = if path.is_relative() { cx.base_dir.join(path) } else { path };
        let meta = std::fs::metadata(&path).map_err(|e| err(format!("module {}: {e}", path.display())))?;
        if meta.len() > limit {
            return Err(err(format!(
                "module {} is {} bytes, over the {limit}-byte limit",
                path.display(),
                meta.len()
            )));
        }
        std::fs::read(&path).map_err(|e| err(format!("module {}: {e}", path.display())))
    }
}

impl FilterLoader for WasmHost {
    fn load(&self, spec: &FilterSpec, cx: &LoadContext<'_>) -> Result<Arc<dyn FilterFactory>, LoadError> {
        let span = tracing::info_span!("wasm_load", plugin = %spec.name);
        let _enter = span.enter();
        let result = self.read_module(spec, cx).and_then(|bytes| {
            // The error names the module, as its read errors do.
            self.load_inner(spec, &bytes, cx).map_err(|mut e| {
                e.reason = format!("module `{}`: {}", spec.module, e.reason);
                e
            })
        });
        self.record_load(spec, &result);
        result
    }
}

// === impl Ticker ===

/// The epoch ticker thread: increments the engine's epoch every tick. Stopped and
/// joined when the host is dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("sluice-wasm-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })?;
        Ok(Ticker { stop, thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
