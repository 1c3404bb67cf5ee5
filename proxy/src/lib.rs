//! Sluice's data plane: listeners, routing, filter chains, upstream pools, load
//! balancing, health, retries, the admin endpoint and config hot reload.
//!
//! It runs validated config only ([`sluice_config::Snapshot`]) and reaches
//! filters only through the `sluice-filter` seam: it knows nothing of wasmtime.
//! [`Proxy`] is the entry point; the `sluice` binary composes it.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod accesslog;
pub mod admin;
pub mod body;
pub mod callout;
pub mod chain;
mod clock;
pub mod cluster;
pub mod dataplane;
pub mod error;
pub mod forward;
pub mod h1;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod normalize;
pub mod pool;
pub mod retry;
pub mod router;
pub mod server;
pub mod source;
pub mod tls;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::Registry;
use sluice_config::{ConfigError, Listener, Snapshot};
use sluice_filter::FilterLoader;
use tokio::sync::{Semaphore, watch};

use crate::dataplane::Dataplane;
use crate::forward::Shared;
use crate::metrics::Metrics;
use crate::server::{WorkerCmd, WorkerHandle};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("listener `{listener}`: cannot bind {address}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin listener could not bind.
    #[error("admin: cannot bind {address}: {source}")]
    Admin {
        /// Address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A worker thread could not start.
    #[error("worker: {0}")]
    Worker(std::io::Error),
}

/// How to build the proxy.
pub struct ProxyOptions {
    /// The registry for all metrics (filters register into it too).
    pub registry: Registry,
    /// The filter host; without one, configs with filters are rejected.
    pub loader: Option<Arc<dyn FilterLoader>>,
    /// The callout client given to the filter host, attached to this proxy before
    /// its filters' worker VMs start (so `on_configure` may call out).
    pub callouts: Option<Arc<callout::ClusterCallouts>>,
}

struct Binding {
    id: u64,
    addr: SocketAddr,
    identity: String,
    /// Duplicates of the workers' sockets: a changed listener on the same address
    /// takes these over, so connections queued in the kernel are not dropped
    /// (closing a `SO_REUSEPORT` socket resets its accept queue).
    sockets: Vec<std::net::TcpListener>,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    loader: Option<Arc<dyn FilterLoader>>,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<WorkerCmd>>,
    threads: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
    drain_tx: watch::Sender<Option<Duration>>,
    bindings: parking_lot::Mutex<HashMap<String, Binding>>,
    admin_addr: Option<SocketAddr>,
    generation: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
    rt: tokio::runtime::Handle,
}

static NEXT_BINDING: AtomicU64 = AtomicU64::new(1);

fn identity(l: &Listener) -> String {
    serde_json::json!([l.address, l.tls, l.protocols, l.limits, l.max_connections]).to_string()
}

impl Proxy {
    /// Builds the dataplane, binds every listener, starts the workers and the
    /// admin listener. Must be called inside a multi-thread tokio runtime (it
    /// runs the admin endpoint, health checks and DNS).
    pub async fn start(snapshot: Snapshot, opts: ProxyOptions) -> Result<Proxy, StartError> {
        let metrics = Metrics::new(opts.registry)?;
        let workers_n = snapshot
            .config()
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // Before the routes resolve their per-worker metrics.
        crate::metrics::sharded::set_workers(workers_n);
        let dp = build(snapshot, 1, None, opts.loader.clone(), metrics.clone()).await?;
        let rt = tokio::runtime::Handle::current();
        for c in dp.clusters.values() {
            health::spawn_upkeep(c, &rt);
        }
        metrics.generation.set(1);
        let shared = Arc::new(Shared {
            dataplane: arc_swap::ArcSwap::from_pointee(dp),
            tls_metrics: tls::TlsMetrics::new(&metrics.registry).ok(),
            metrics,
            draining: AtomicBool::new(false),
        });
        let admin_addr = match shared.dataplane.load().snapshot.config().admin.address {
            Some(addr) => {
                let l =
                    admin::bind(addr).await.map_err(|source| StartError::Admin { address: addr, source })?;
                let bound = l.local_addr().map_err(|source| StartError::Admin { address: addr, source })?;
                tokio::spawn(admin::serve(l, shared.clone()));
                Some(bound)
            }
            None => None,
        };
        let (drain_tx, drain_rx) = watch::channel(None);
        let mut workers = Vec::with_capacity(workers_n);
        let mut threads = Vec::with_capacity(workers_n);
        for i in 0..workers_n {
            let WorkerHandle { tx, thread } =
                server::spawn_worker(i, shared.clone(), drain_rx.clone()).map_err(StartError::Worker)?;
            workers.push(tx);
            threads.push(thread);
        }
        let proxy = Proxy {
            shared,
            loader: opts.loader,
            workers,
            threads: parking_lot::Mutex::new(threads),
            drain_tx,
            bindings: parking_lot::Mutex::new(HashMap::new()),
            admin_addr,
            generation: AtomicU64::new(1),
            reload_lock: tokio::sync::Mutex::new(()),
            rt,
        };
        let listeners = proxy.shared.dataplane.load().snapshot.config().listeners.clone();
        let src = proxy.shared.dataplane.load().snapshot.source_name().to_owned();
        proxy.reconcile_listeners(&listeners, &src)?;
        if let Some(c) = &opts.callouts {
            c.attach(&proxy);
        }
        proxy.warm_workers(&proxy.shared.dataplane.load_full()).await;
        Ok(proxy)
    }

    /// Validates and applies a new snapshot atomically: new requests use it,
    /// in-flight requests finish on the old one. On error nothing changes.
    pub async fn reload(&self, snapshot: Snapshot) -> Result<u64, ConfigError> {
        let _guard = self.reload_lock.lock().await;
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let src = snapshot.source_name().to_owned();
        let previous = self.shared.dataplane.load_full();
        let result =
            build(snapshot, generation, Some(previous), self.loader.clone(), self.shared.metrics.clone())
                .await;
        let dp = match result {
            Ok(dp) => dp,
            Err(e) => {
                self.shared.metrics.reloads.with_label_values(&["failed"]).inc();
                return Err(e);
            }
        };
        let listeners = dp.snapshot.config().listeners.clone();
        // Bind new listeners before switching, so a bind failure rejects the config.
        if let Err(e) = self.check_new_listeners(&listeners, &src) {
            self.shared.metrics.reloads.with_label_values(&["failed"]).inc();
            return Err(e);
        }
        let old = self.shared.dataplane.load_full();
        for c in dp.clusters.values() {
            if !old.clusters.values().any(|o| Arc::ptr_eq(o, c)) {
                health::spawn_upkeep(c, &self.rt);
            }
        }
        let dp = Arc::new(dp);
        // Filters get their per-worker VMs before the switch, so the first requests
        // on the new config do not pay for them.
        self.warm_workers(&dp).await;
        self.shared.dataplane.store(dp);
        drop(old);
        // Workers hold the generation they last served: let them drop the old one.
        for w in &self.workers {
            let _ = w.send(WorkerCmd::Switched);
        }
        self.generation.store(generation, Ordering::Relaxed);
        self.shared.metrics.generation.set(generation as i64);
        if let Err(e) = self.reconcile_listeners(&listeners, &src) {
            tracing::error!(error = %e, "listener update failed after config switch");
        }
        self.shared.metrics.reloads.with_label_values(&["ok"]).inc();
        tracing::info!(generation, source = %src, "config applied");
        Ok(generation)
    }

    fn check_new_listeners(&self, listeners: &[Listener], src: &str) -> Result<(), ConfigError> {
        let bindings = self.bindings.lock();
        for (i, l) in listeners.iter().enumerate() {
            let same_addr =
                bindings.get(&l.name).is_some_and(|b| b.addr == l.address || l.address.port() == 0);
            if same_addr {
                continue;
            }
            let in_use = bindings.values().any(|b| b.addr == l.address);
            if !in_use && let Err(e) = std::net::TcpListener::bind(l.address) {
                return Err(ConfigError::field(
                    src,
                    format!("listeners[{i}].address"),
                    format!("cannot bind {}: {e}", l.address),
                ));
            }
        }
        Ok(())
    }

    fn reconcile_listeners(&self, listeners: &[Listener], src: &str) -> Result<(), StartError> {
        let mut bindings = self.bindings.lock();
        let mut keep = std::collections::HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            keep.insert(l.name.clone());
            let ident = identity(l);
            if bindings.get(&l.name).is_some_and(|b| b.identity == ident) {
                continue;
            }
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let mut alpn: Vec<&[u8]> = l
                        .protocols
                        .iter()
                        .map(|p| match p {
                            sluice_config::HttpProtocol::Http2 => &b"h2"[..],
                            sluice_config::HttpProtocol::Http1 => &b"http/1.1"[..],
                        })
                        .collect();
                    // rustls picks the server's first protocol the client offers:
                    // prefer h2 whatever the order of `protocols`.
                    alpn.sort_by_key(|p| *p != b"h2");
                    let snap = self.shared.dataplane.load().snapshot.clone();
                    let tls = tls::server(t, &snap, &alpn, &format!("listeners[{i}].tls"))
                        .map_err(|e| ConfigError::field(src, "", e.to_string()))?;
                    if let Some(m) = &self.shared.tls_metrics {
                        m.observe_certificates(&l.name, &tls);
                    }
                    Some(Arc::new(tls))
                }
            };
            // With port 0 keep the old port.
            let mut cfg = l.clone();
            if cfg.address.port() == 0
                && let Some(old) = bindings.get(&l.name)
            {
                cfg.address = old.addr;
            }
            let bind_err = |source| StartError::Bind { listener: l.name.clone(), address: l.address, source };
            // Same address: the new binding takes over the very same sockets.
            let (addr, sockets) = match bindings.get(&l.name) {
                Some(old) if old.addr == cfg.address => {
                    let dups: std::io::Result<Vec<_>> = old.sockets.iter().map(|s| s.try_clone()).collect();
                    (old.addr, dups.map_err(bind_err)?)
                }
                _ => server::bind(&cfg, self.workers.len()).map_err(bind_err)?,
            };
            let kept: std::io::Result<Vec<_>> = sockets.iter().map(|s| s.try_clone()).collect();
            let kept = kept.map_err(bind_err)?;
            let id = NEXT_BINDING.fetch_add(1, Ordering::Relaxed);
            let limit = Arc::new(Semaphore::new(l.max_connections));
            let exact = l.connection_balance == sluice_config::ConnectionBalance::Exact;
            let (balance, inboxes) = server::Balance::new(self.workers.len(), exact);
            for ((w, socket), inbox) in self.workers.iter().zip(sockets).zip(inboxes) {
                let _ = w.send(WorkerCmd::Add {
                    name: l.name.clone(),
                    binding: id,
                    socket,
                    config: Box::new(cfg.clone()),
                    tls: tls.clone(),
                    limit: limit.clone(),
                    balance: balance.clone(),
                    inbox,
                });
            }
            let binding = Binding { id, addr, identity: ident, sockets: kept };
            if let Some(old) = bindings.insert(l.name.clone(), binding) {
                self.remove_binding(old.id);
            }
            tracing::info!(listener = %l.name, address = %addr, "listening");
        }
        let gone: Vec<String> = bindings.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for name in gone {
            if let Some(b) = bindings.remove(&name) {
                self.remove_binding(b.id);
                tracing::info!(listener = %name, "listener removed");
            }
        }
        Ok(())
    }

    async fn warm_workers(&self, dp: &Arc<Dataplane>) {
        if dp.filters.is_empty() {
            return;
        }
        // One worker at a time: VM starts map and fault in memory, and two
        // threads of one process doing that at once wait on each other's
        // address-space lock. A worker stuck on a slow VM start must not hold
        // the reload forever.
        let all = async {
            for w in &self.workers {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if w.send(WorkerCmd::Warm(dp.clone(), tx)).is_ok() {
                    let _ = rx.await;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    }

    fn remove_binding(&self, id: u64) {
        for w in &self.workers {
            let _ = w.send(WorkerCmd::Remove { binding: id });
        }
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.bindings.lock().get(name).map(|b| b.addr)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The current config generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Graceful drain: stop accepting, ask connections to close (GOAWAY,
    /// `connection: close`), wait up to `timeout` for in-flight requests, stop.
    pub async fn drain(&self, timeout: Duration) {
        self.shared.draining.store(true, Ordering::Relaxed);
        // Close our socket duplicates so that, once the workers stop accepting,
        // new connections are refused.
        for b in self.bindings.lock().values_mut() {
            b.sockets.clear();
        }
        let _ = self.drain_tx.send(Some(timeout));
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock());
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    /// The longest drain timeout of the listeners in force.
    pub fn drain_timeout(&self) -> Duration {
        let dp = self.shared.dataplane.load();
        dp.snapshot
            .config()
            .listeners
            .iter()
            .map(|l| l.drain_timeout)
            .max()
            .unwrap_or(Duration::from_secs(15))
    }
}

async fn build(
    snapshot: Snapshot,
    generation: u64,
    previous: Option<Arc<Dataplane>>,
    loader: Option<Arc<dyn FilterLoader>>,
    metrics: Metrics,
) -> Result<Dataplane, ConfigError> {
    let src = snapshot.source_name().to_owned();
    // Filter loading compiles and instantiates modules: keep it off the async threads.
    tokio::task::spawn_blocking(move || {
        Dataplane::build(snapshot, generation, previous.as_deref(), loader.as_deref(), &metrics)
    })
    .await
    .unwrap_or_else(|e| Err(ConfigError::field(&src, "", format!("config build panicked: {e}"))))
}
