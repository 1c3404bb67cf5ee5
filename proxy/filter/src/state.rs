//! Values filters set on a stream for each other: proxy-wasm's
//! `proxy_set_property`, Envoy's filter state (`wasm.<path>`).

/// Keyed byte values, set and read by every filter of one request (or, kept
/// by a filter for itself, read back in its own callbacks). Bounded: at most
/// [`FilterState::MAX_ENTRIES`] keys.
#[derive(Debug, Default, Clone)]
pub struct FilterState {
    entries: Vec<(Box<[u8]>, Box<[u8]>)>,
}

impl FilterState {
    /// The most keys one state holds.
    pub const MAX_ENTRIES: usize = 256;

    /// The value of `key`, if set.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.iter().find(|(k, _)| **k == *key).map(|(_, v)| &**v)
    }

    /// Sets `key` (replacing its value); `false` when the state is full and
    /// `key` is new.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        if let Some((_, v)) = self.entries.iter_mut().find(|(k, _)| **k == *key) {
            *v = value.into();
            return true;
        }
        if self.entries.len() >= Self::MAX_ENTRIES {
            return false;
        }
        self.entries.push((key.into(), value.into()));
        true
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_replaced_and_the_state_is_bounded() {
        let mut s = FilterState::default();
        assert!(s.is_empty() && s.get(b"a").is_none());
        assert!(s.set(b"a", b"1") && s.set(b"a", b"2"));
        assert_eq!(s.get(b"a"), Some(&b"2"[..]));
        for i in 1..FilterState::MAX_ENTRIES {
            assert!(s.set(format!("k{i}").as_bytes(), b"v"));
        }
        assert!(!s.set(b"one-too-many", b"v"));
        assert!(s.set(b"a", b"3"), "an existing key is still replaced");
        assert_eq!(s.get(b"a"), Some(&b"3"[..]));
    }
}
