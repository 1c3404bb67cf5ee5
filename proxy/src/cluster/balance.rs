//! Load balancing: round robin, least request (power of two choices), random and
//! ring hash. Only available endpoints (healthy, not ejected) are picked.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_config::LbPolicy;

use super::{ClusterState, Endpoint, now_ms};

/// Virtual nodes per endpoint on the hash ring.
const VNODES: usize = 128;

/// The hash ring: sorted (hash, endpoint index).
#[derive(Debug, Default)]
pub(super) struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub(super) fn build(endpoints: &[Arc<Endpoint>]) -> Ring {
        let mut points = Vec::with_capacity(endpoints.len() * VNODES);
        for (i, e) in endpoints.iter().enumerate() {
            for v in 0..VNODES {
                points.push((hash_of(&(e.addr, v)), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }
}

/// Hashes a value with a fixed-key hasher (stable across processes of one build).
pub fn hash_of<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// The request attribute a ring hash uses, already hashed.
#[derive(Debug, Clone, Copy)]
pub struct HashKey(pub u64);

/// Per-worker balancer state.
#[derive(Debug, Default)]
pub struct Picker {
    rr: usize,
}

impl Picker {
    /// Picks an endpoint of `cluster`, avoiding `avoid` (the previous attempt's
    /// endpoint) when another is available.
    pub fn pick(
        &mut self,
        cluster: &ClusterState,
        key: Option<HashKey>,
        avoid: Option<&Endpoint>,
    ) -> Option<Arc<Endpoint>> {
        let set = cluster.endpoints.load();
        let eps = &set.endpoints;
        if eps.is_empty() {
            return None;
        }
        // The clock is read only when an endpoint has been ejected.
        let now = std::cell::OnceCell::new();
        let available = |e: &Endpoint| {
            e.hc_healthy.load(Ordering::Relaxed) && {
                let until = e.ejected_until.load(Ordering::Relaxed);
                until == 0 || until <= *now.get_or_init(now_ms)
            }
        };
        let ok = |e: &Arc<Endpoint>| available(e) && avoid.is_none_or(|a| !std::ptr::eq(a, &**e));
        let ok_any = |e: &Arc<Endpoint>| available(e);
        let pick_with = |this: &mut Self, pred: &dyn Fn(&Arc<Endpoint>) -> bool| -> Option<Arc<Endpoint>> {
            match &cluster.config.lb {
                LbPolicy::RoundRobin => {
                    // A retry's pick does not move the rotation: otherwise every
                    // request after a retried one would start on the endpoint
                    // that just failed.
                    let mut rr = this.rr;
                    for _ in 0..eps.len() {
                        rr = rr.wrapping_add(1);
                        let e = &eps[rr % eps.len()];
                        if pred(e) {
                            if avoid.is_none() {
                                this.rr = rr;
                            }
                            return Some(e.clone());
                        }
                    }
                    None
                }
                LbPolicy::Random => random_available(eps, pred),
                LbPolicy::LeastRequest => {
                    // Two *distinct* candidates: sampling with replacement would
                    // compare an endpoint with itself and ignore load half the time
                    // with two endpoints.
                    let a = random_available(eps, pred)?;
                    let b = random_available(eps, &|e| !Arc::ptr_eq(e, &a) && pred(e))
                        .unwrap_or_else(|| a.clone());
                    let la = a.active.load(Ordering::Relaxed);
                    let lb = b.active.load(Ordering::Relaxed);
                    Some(if lb < la { b } else { a })
                }
                LbPolicy::RingHash(_) => {
                    let h = match key {
                        Some(k) => k.0,
                        None => fastrand::u64(..),
                    };
                    let pts = &set.ring.points;
                    let start = pts.partition_point(|(p, _)| *p < h);
                    for i in 0..pts.len() {
                        let (_, idx) = pts[(start + i) % pts.len()];
                        if let Some(e) = eps.get(idx)
                            && pred(e)
                        {
                            return Some(e.clone());
                        }
                    }
                    None
                }
            }
        };
        pick_with(self, &ok).or_else(|| if avoid.is_some() { pick_with(self, &ok_any) } else { None })
    }
}

fn random_available(eps: &[Arc<Endpoint>], pred: &dyn Fn(&Arc<Endpoint>) -> bool) -> Option<Arc<Endpoint>> {
    let n = eps.len();
    let start = fastrand::usize(..n);
    (0..n).map(|i| &eps[(start + i) % n]).find(|e| pred(e)).cloned()
}
