//! The compiled, runnable form of a validated config snapshot.
//!
//! Building one does all the work that can fail (loading filters, TLS files)
//! before anything switches: a [`Dataplane`] that exists is good to serve.
//! Clusters whose config did not change are carried over from the previous
//! dataplane, so their pools, health and outlier state survive a reload.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use sluice_config::{ConfigError, FilterSpec, Listener, Snapshot};
use sluice_filter::{FilterFactory, FilterLoader, LoadContext};

use crate::cluster::ClusterState;
use crate::metrics::Metrics;
use crate::router::{Chain, RouteContext, Router};
use crate::tls;

/// A listener's runtime state.
pub struct ListenerRuntime {
    /// Name.
    pub name: Arc<str>,
    /// Its config.
    pub config: Listener,
    /// Routing table.
    pub router: Router,
}

/// Everything a request needs, for one config generation.
pub struct Dataplane {
    /// Monotonic generation number.
    pub generation: u64,
    /// The snapshot it was built from.
    pub snapshot: Snapshot,
    /// Listeners by name (looked up once per request: a fast hash, not
    /// SipHash; the names come from the config, not from requests).
    pub listeners: HashMap<String, Arc<ListenerRuntime>, foldhash::fast::RandomState>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<ClusterState>>,
    /// Every loaded filter, for the admin endpoint.
    pub filters: Vec<(String, Arc<dyn FilterFactory>)>,
}

impl Dataplane {
    /// Builds a dataplane. Fails with an error naming the file, field and reason.
    pub fn build(
        snapshot: Snapshot,
        generation: u64,
        previous: Option<&Dataplane>,
        loader: Option<&dyn FilterLoader>,
        metrics: &Metrics,
    ) -> Result<Dataplane, ConfigError> {
        let src = snapshot.source_name().to_owned();
        let cfg = snapshot.config();

        let mut clusters = HashMap::new();
        for (i, c) in cfg.clusters.iter().enumerate() {
            let reused =
                previous.and_then(|p| p.clusters.get(&c.name)).filter(|old| old.config == *c).cloned();
            let state = match reused {
                Some(s) => s,
                None => {
                    let tls = match &c.tls {
                        None => None,
                        Some(t) => Some(Arc::new(
                            tls::upstream(t, &snapshot, c.protocol, &format!("clusters[{i}].tls"))
                                .map_err(|e| ConfigError::field(&src, "", e.to_string()))?,
                        )),
                    };
                    ClusterState::new(c.clone(), metrics, tls)
                }
            };
            clusters.insert(c.name.clone(), state);
        }

        let cluster_names: Vec<String> = cfg.clusters.iter().map(|c| c.name.clone()).collect();
        let base_dir = snapshot.resolve(std::path::Path::new(""));
        let node = Arc::new(cfg.node.clone());
        let lcx = LoadContext { base_dir: &base_dir, clusters: &cluster_names, node: &node };
        let mut all_filters = Vec::new();
        let mut load_chain = |specs: &[FilterSpec], at: &str| -> Result<Chain, ConfigError> {
            let mut chain: Vec<Arc<dyn FilterFactory>> = Vec::with_capacity(specs.len());
            for (k, spec) in specs.iter().enumerate() {
                let Some(loader) = loader else {
                    return Err(ConfigError::field(
                        &src,
                        format!("{at}[{k}]"),
                        "this build has no filter host",
                    ));
                };
                let f = loader
                    .load(spec, &lcx)
                    .map_err(|e| ConfigError::field(&src, format!("{at}[{k}]"), e.to_string()))?;
                all_filters.push((at.to_owned(), f.clone()));
                chain.push(f);
            }
            Ok(Arc::from(chain))
        };

        let mut listeners = HashMap::default();
        for (li, l) in cfg.listeners.iter().enumerate() {
            let listener_chain = load_chain(&l.filters, &format!("listeners[{li}].filters"))?;
            let mut route_chains = HashMap::new();
            for (vi, vh) in l.virtual_hosts.iter().enumerate() {
                for (ri, r) in vh.routes.iter().enumerate() {
                    if let Some(rf) = &r.filters
                        && !rf.chain.is_empty()
                    {
                        let at = format!("listeners[{li}].virtual_hosts[{vi}].routes[{ri}].filters.chain");
                        route_chains.insert((vi, ri), load_chain(&rf.chain, &at)?);
                    }
                }
            }
            let rcx = RouteContext {
                listener: &l.name,
                clusters: &clusters,
                listener_chain: &listener_chain,
                route_chains: &route_chains,
                metrics,
                default_timeout: l.limits.request_timeout,
            };
            let router = Router::compile(&l.virtual_hosts, &rcx);
            listeners.insert(
                l.name.clone(),
                Arc::new(ListenerRuntime { name: l.name.as_str().into(), config: l.clone(), router }),
            );
        }
        Ok(Dataplane { generation, snapshot, listeners, clusters, filters: all_filters })
    }
}

/// A worker's hold on the dataplane in force.
///
/// Taking the shared `Arc` for every request would write its reference count,
/// a cache line every worker writes, on every request. A worker instead keeps
/// the current generation in an `Rc` and hands out clones of that, checking
/// the shared pointer (a read) for a newer one. The worker lets go of an old
/// generation on its next request, or when told of a switch
/// ([`LocalDataplane::refresh`]), so an idle worker does not keep an old
/// generation's filter VMs and clusters alive.
pub struct LocalDataplane {
    current: RefCell<Rc<Held>>,
}

/// A generation as a worker holds it: one `Arc` reference per worker, shared
/// within the worker by `Rc`.
pub struct Held(Arc<Dataplane>);

impl std::ops::Deref for Held {
    type Target = Dataplane;

    fn deref(&self) -> &Dataplane {
        &self.0
    }
}

impl LocalDataplane {
    /// Holds the dataplane in force now.
    pub fn new(live: &arc_swap::ArcSwap<Dataplane>) -> Self {
        LocalDataplane { current: RefCell::new(Rc::new(Held(live.load_full()))) }
    }

    /// The dataplane in force, taking it from `live` when it changed.
    #[inline]
    pub fn get(&self, live: &arc_swap::ArcSwap<Dataplane>) -> Rc<Held> {
        let now = live.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(&current.0, &*now) {
            *current = Rc::new(Held(arc_swap::Guard::into_inner(now)));
        }
        current.clone()
    }

    /// Lets go of an older generation now.
    pub fn refresh(&self, live: &arc_swap::ArcSwap<Dataplane>) {
        drop(self.get(live));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataplane(generation: u64, metrics: &Metrics) -> Arc<Dataplane> {
        let yaml = "listeners:\n  - name: l\n    address: \"127.0.0.1:0\"\n    virtual_hosts:\n      \
                    - name: all\n        domains: [\"*\"]\n        routes:\n          \
                    - direct_response: { status: 200 }\n";
        let snapshot = Snapshot::from_yaml(yaml, "test.yaml", std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        Arc::new(
            Dataplane::build(snapshot, generation, None, None, metrics).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn a_worker_takes_the_new_generation_and_lets_go_of_the_old() {
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let first = dataplane(1, &metrics);
        let live = arc_swap::ArcSwap::new(first.clone());
        let local = LocalDataplane::new(&live);
        let held = local.get(&live);
        assert_eq!(held.generation, 1);
        // Requests share the worker's reference: no new one per request.
        let strong = Arc::strong_count(&first);
        drop(local.get(&live));
        assert_eq!(Arc::strong_count(&first), strong);

        live.store(dataplane(2, &metrics));
        assert_eq!(local.get(&live).generation, 2, "the next request sees the switch");
        // An in-flight request still holds the old generation; once it ends,
        // only the test's own reference is left.
        assert_eq!(held.generation, 1);
        drop(held);
        assert_eq!(Arc::strong_count(&first), 1);

        // An idle worker told of a switch lets go without a request.
        let second = live.load_full();
        live.store(dataplane(3, &metrics));
        let before = Arc::strong_count(&second);
        local.refresh(&live);
        assert_eq!(Arc::strong_count(&second), before - 1);
    }
}
