//! Helpers shared by Sluice's ready filters (`filters/*`): path matching, cookie and
//! query-string parsing, percent-decoding, durations in configs, constant-time
//! comparison, stable hashing and a cheap random source for percentages.
//!
//! This crate is plain Rust with no host calls, so everything here is tested
//! natively (property tests included) and is safe on hostile input: nothing in it
//! panics on any byte string. It is not a filter and not part of the guest SDK.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cookie;
pub mod duration;
pub mod matching;
pub mod query;
pub mod random;

pub use duration::Dur;
pub use matching::PathMatch;

/// Compares two byte strings in time that depends only on their lengths, not on
/// where they differ (for secrets: API keys, passwords, HMACs).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keep the optimiser from short-circuiting the loop.
    std::hint::black_box(diff) == 0
}

/// FNV-1a, 64 bits: a stable hash (the same in every VM and across restarts) for
/// sticky routing and for shared-data keys.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `value` without `prefix`, compared ASCII-case-insensitively (`Bearer `,
/// `Basic `); `None` when it does not start with it. Never splits a character.
pub fn strip_prefix_ci<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Decodes lowercase or uppercase hex; `None` on odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// The value of one hex digit.
pub(crate) fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FNV_USER_1: u64 = 3_661_587_735_715_363_345;

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        assert_eq!(fnv1a64(&[b"user-1"]), fnv1a64(&[b"user-1"]));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        // A fixed value: changing the hash would move every sticky user.
        assert_eq!(fnv1a64(&[b"user-1"]), FNV_USER_1);
    }

    #[test]
    fn prefixes_are_case_insensitive() {
        assert_eq!(strip_prefix_ci("bearer abc", "Bearer "), Some("abc"));
        assert_eq!(strip_prefix_ci("Bear", "Bearer "), None);
        assert_eq!(strip_prefix_ci("Beaé abc", "Bear"), None);
        assert_eq!(strip_prefix_ci("x", ""), Some("x"));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }

    proptest! {
        #[test]
        fn ct_eq_agrees_with_eq(a in proptest::collection::vec(any::<u8>(), 0..40), b in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(ct_eq(&a, &b), a == b);
        }

        #[test]
        fn hex_round_trips_any(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        }

        #[test]
        fn unhex_never_panics(s in ".{0,64}") {
            let _ = unhex(&s);
        }
    }
}
