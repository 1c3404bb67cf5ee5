//! A cheap random source for percentages (fault injection, weighted routing):
//! SplitMix64 seeded from the host clock and a per-VM counter. Not for secrets.

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0) };
}

/// Mixes `seed` into the generator (call with the host clock's nanoseconds).
pub fn seed(seed: u64) {
    STATE.with(|s| s.set(s.get() ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
}

/// The next 64 random bits.
pub fn next_u64() -> u64 {
    STATE.with(|s| {
        let v = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(v);
        mix(v)
    })
}

/// SplitMix64's finaliser: spreads the bits of `z`.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A value in `[0, n)` (0 when `n` is 0).
pub fn below(n: u64) -> u64 {
    if n == 0 { 0 } else { next_u64() % n }
}

/// True with probability `percent`/100 (clamped to 0..=100; 0 never, 100 always).
/// Resolution is a millionth of a percent.
pub fn chance(percent: f64) -> bool {
    if percent.is_nan() || percent <= 0.0 {
        return false;
    }
    if percent >= 100.0 {
        return true;
    }
    let threshold = (percent * 1_000_000.0) as u64;
    below(100_000_000) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_edges_and_rate() {
        seed(42);
        assert!((0..1000).all(|_| !chance(0.0)));
        assert!((0..1000).all(|_| chance(100.0)));
        assert!(!chance(f64::NAN));
        let hits = (0..10_000).filter(|_| chance(25.0)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert_eq!(below(0), 0);
        assert!((0..100).all(|_| below(7) < 7));
    }
}
