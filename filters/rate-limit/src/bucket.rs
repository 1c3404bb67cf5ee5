//! Token-bucket arithmetic and the bucket's shared-data encoding. Pure code: the
//! filter reads, updates and compare-and-swaps these values.

/// A bucket's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens available (may be fractional).
    pub tokens: f64,
    /// When `tokens` was computed, in nanoseconds since the epoch.
    pub at_nanos: u64,
}

/// A limit: `capacity` tokens, refilled at `rate_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Bucket size (the burst).
    pub capacity: f64,
    /// Tokens added per second.
    pub rate_per_sec: f64,
}

/// The outcome of taking one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Take {
    /// Whether the request may go.
    pub allowed: bool,
    /// The state to store (only changed when allowed).
    pub bucket: Bucket,
    /// Whole tokens left.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until one token is available (0 when allowed).
    pub retry_after_secs: u64,
}

impl Bucket {
    /// Encodes as 16 bytes: tokens (f64 LE) then time (u64 LE).
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.at_nanos.to_le_bytes());
        out
    }

    /// Decodes what [`encode`](Self::encode) wrote; `None` for anything else
    /// (another writer's garbage, a removed value).
    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        let tokens = f64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let at_nanos = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        (bytes.len() == 16 && tokens.is_finite() && tokens >= 0.0).then_some(Bucket { tokens, at_nanos })
    }
}

fn ceil_secs(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 { x.ceil().min(u64::MAX as f64) as u64 } else { 0 }
}

impl Limit {
    /// Refills `state` (a fresh, full bucket when `None`) up to `now_nanos` and takes
    /// one token if there is one. A clock going backwards refills nothing.
    pub fn take(&self, state: Option<Bucket>, now_nanos: u64) -> Take {
        let current = match state {
            None => self.capacity,
            Some(b) => {
                let elapsed = now_nanos.saturating_sub(b.at_nanos) as f64 / 1e9;
                (b.tokens + elapsed * self.rate_per_sec).min(self.capacity)
            }
        };
        let allowed = current >= 1.0;
        let after = if allowed { current - 1.0 } else { current };
        let missing_for_full = self.capacity - after;
        let retry = if allowed { 0.0 } else { (1.0 - after) / self.rate_per_sec };
        Take {
            allowed,
            bucket: Bucket { tokens: after, at_nanos: now_nanos.max(state.map_or(0, |b| b.at_nanos)) },
            remaining: after.floor().max(0.0) as u64,
            reset_secs: ceil_secs(missing_for_full / self.rate_per_sec),
            retry_after_secs: if allowed { 0 } else { ceil_secs(retry).max(1) },
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_refill() {
        let limit = Limit { capacity: 3.0, rate_per_sec: 1.0 };
        let mut state = None;
        for left in [2, 1, 0] {
            let t = limit.take(state, 0);
            assert!(t.allowed);
            assert_eq!(t.remaining, left);
            state = Some(t.bucket);
        }
        let t = limit.take(state, SEC / 2);
        assert!(!t.allowed);
        assert_eq!(t.retry_after_secs, 1);
        assert_eq!(t.reset_secs, 3);
        let t = limit.take(state, SEC);
        assert!(t.allowed);
        assert_eq!(t.remaining, 0);
        // A clock going backwards does not mint tokens.
        let t = limit.take(Some(Bucket { tokens: 0.0, at_nanos: 10 * SEC }), SEC);
        assert!(!t.allowed);
    }

    #[test]
    fn slow_rates_give_long_retries() {
        let limit = Limit { capacity: 1.0, rate_per_sec: 1.0 / 60.0 };
        let t = limit.take(Some(Bucket { tokens: 0.0, at_nanos: 0 }), 0);
        assert_eq!(t.retry_after_secs, 60);
        assert_eq!(t.reset_secs, 60);
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let b = Bucket { tokens: 2.5, at_nanos: 77 };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b""), None);
        assert_eq!(Bucket::decode(&[0u8; 15]), None);
        assert_eq!(Bucket::decode(&[0u8; 17]), None);
        let mut nan = b.encode();
        nan[..8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(Bucket::decode(&nan), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Bucket::decode(&bytes);
        }

        #[test]
        fn take_stays_within_bounds(cap in 1u32..10_000, rate in 0.001f64..10_000.0, tokens in 0.0f64..20_000.0, at in any::<u64>(), now in any::<u64>()) {
            let limit = Limit { capacity: f64::from(cap), rate_per_sec: rate };
            let t = limit.take(Some(Bucket { tokens, at_nanos: at }), now);
            prop_assert!(t.bucket.tokens >= 0.0 && t.bucket.tokens <= f64::from(cap));
            prop_assert!(t.remaining <= u64::from(cap));
            prop_assert_eq!(t.allowed, t.retry_after_secs == 0);
            prop_assert!(Bucket::decode(&t.bucket.encode()).is_some());
        }

        #[test]
        fn never_more_than_capacity_plus_refill(cap in 1u32..50, rate in 0.1f64..100.0, steps in proptest::collection::vec(0u64..SEC, 1..200)) {
            let limit = Limit { capacity: f64::from(cap), rate_per_sec: rate };
            let (mut state, mut now, mut allowed) = (None, 0u64, 0u64);
            for step in &steps {
                now += step;
                let t = limit.take(state, now);
                if t.allowed {
                    allowed += 1;
                    state = Some(t.bucket);
                }
            }
            let bound = f64::from(cap) + rate * now as f64 / 1e9 + 1.0;
            prop_assert!((allowed as f64) <= bound, "{} > {}", allowed, bound);
        }
    }
}
