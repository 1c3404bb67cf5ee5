//! A hasher for the ids the ABI passes (context ids, callout tokens), for the
//! host's and the guest's maps keyed by them.

use core::hash::Hasher;

/// Hashes a `u32` id with one multiply. The ids are handed out by the host,
/// not chosen by anyone a map must distrust, so this spreads them well
/// enough; SipHash, `HashMap`'s default, costs several times as much (and
/// more still compiled to wasm).
#[derive(Default, Clone, Copy, Debug)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = ((self.0 << 8) | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
