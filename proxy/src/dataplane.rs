//! The compiled, runnable form of a validated config snapshot.
//!
//! Building one does all the work that can fail (loading filters, TLS files)
//! before anything switches: a [`Dataplane`] that exists is good to serve.
//! Clusters whose config did not change are carried over from the previous
//! dataplane, so their pools, health and outlier state survive a reload.

use std::collections::HashMap;
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
    /// Listeners by name.
    pub listeners: HashMap<String, Arc<ListenerRuntime>>,
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
        let lcx = LoadContext { base_dir: &base_dir, clusters: &cluster_names };
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

        let mut listeners = HashMap::new();
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
