//! Retry budgets and backoff.
//!
//! The budget follows Linkerd's model: over a 10 s window, retries may add at
//! most `ratio` × requests, plus `min_per_second` × 10, so a failing upstream
//! cannot be hammered by retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_config::{Backoff, RetryBudget as BudgetConfig};

use crate::cluster::now_ms;

const WINDOW: usize = 10;

#[derive(Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A sliding-window retry budget, shared by every worker.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u64,
    buckets: [Bucket; WINDOW],
}

impl RetryBudget {
    /// A new, empty budget.
    pub fn new(cfg: &BudgetConfig) -> Self {
        RetryBudget {
            ratio: cfg.ratio,
            min_per_second: u64::from(cfg.min_per_second),
            buckets: Default::default(),
        }
    }

    fn bucket(&self, now_s: u64) -> &Bucket {
        let b = &self.buckets[(now_s % WINDOW as u64) as usize];
        let seen = b.second.load(Ordering::Relaxed);
        if seen != now_s
            && b.second.compare_exchange(seen, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Counts a request.
    pub fn deposit(&self) {
        self.bucket(now_ms() / 1000).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self) -> bool {
        let now_s = now_ms() / 1000;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Relaxed);
            if s + (WINDOW as u64) > now_s && s <= now_s {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = (requests as f64 * self.ratio) as u64 + self.min_per_second * WINDOW as u64;
        if retries >= allowed {
            return false;
        }
        self.bucket(now_s).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The wait before retry number `attempt` (1-based): full jitter over an
/// exponentially growing interval.
pub fn backoff(cfg: &Backoff, attempt: u32) -> Duration {
    let base = cfg.base.as_micros() as u64;
    let cap = cfg.max.as_micros() as u64;
    let ceiling = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(cap).max(1);
    Duration::from_micros(fastrand::u64(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_limits_retries() {
        let b = RetryBudget::new(&BudgetConfig { ratio: 0.5, min_per_second: 0 });
        for _ in 0..10 {
            b.deposit();
        }
        let granted = (0..10).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn backoff_is_bounded() {
        let cfg = Backoff { base: Duration::from_millis(10), max: Duration::from_millis(40) };
        for attempt in 1..10 {
            assert!(backoff(&cfg, attempt) <= Duration::from_millis(40));
        }
    }
}
