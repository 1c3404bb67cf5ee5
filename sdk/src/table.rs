//! Context ids to values: a direct-mapped table with a map for collisions.
//!
//! A value's slot is its id modulo the table's size (a power of two). Hosts
//! hand out context ids in sequence (Sluice and Envoy both count up), so the
//! ids live at one time nearly always sit in distinct slots, and a look-up is
//! an index and one compare. An id whose slot is taken goes to the overflow
//! map. Compiled to wasm, a hash-map look-up costs ~90 instructions, and each
//! request makes over a dozen of them.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use sluice_abi::ids::IdHasher;

/// The first table size.
const INITIAL_SLOTS: usize = 16;

pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

pub(crate) struct IdTable<V> {
    slots: Vec<Option<(u32, V)>>,
    /// Values whose slot was taken when they came.
    overflow: IdMap<V>,
    len: usize,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable { slots: Vec::new(), overflow: IdMap::default(), len: 0 }
    }
}

impl<V> IdTable<V> {
    /// An empty table (usable in a `const`).
    pub(crate) const EMPTY: IdTable<V> =
        IdTable { slots: Vec::new(), overflow: IdMap::with_hasher(BuildHasherDefault::new()), len: 0 };

    fn index(&self, id: u32) -> usize {
        id as usize & self.slots.len().wrapping_sub(1)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&V> {
        match self.slots.get(self.index(id)) {
            Some(Some((i, v))) if *i == id => Some(v),
            _ if self.overflow.is_empty() => None,
            _ => self.overflow.get(&id),
        }
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut V> {
        let index = self.index(id);
        let in_slot = matches!(self.slots.get(index), Some(Some((i, _))) if *i == id);
        if in_slot {
            return self.slots.get_mut(index).and_then(|s| s.as_mut()).map(|(_, v)| v);
        }
        self.overflow.get_mut(&id)
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    /// Adds `value` for `id`; a value already there is replaced and returned.
    pub(crate) fn insert(&mut self, id: u32, value: V) -> Option<V> {
        if let Some(old) = self.get_mut(id) {
            return Some(std::mem::replace(old, value));
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        self.place(id, value);
        self.len += 1;
        None
    }

    pub(crate) fn remove(&mut self, id: u32) -> Option<V> {
        let index = self.index(id);
        let in_slot = matches!(self.slots.get(index), Some(Some((i, _))) if *i == id);
        let value = if in_slot {
            self.slots.get_mut(index).and_then(Option::take).map(|(_, v)| v)
        } else {
            self.overflow.remove(&id)
        };
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    /// Puts `value` in its slot, or in the overflow map when that is taken.
    fn place(&mut self, id: u32, value: V) {
        let index = self.index(id);
        match self.slots.get_mut(index) {
            Some(slot @ None) => *slot = Some((id, value)),
            _ => {
                self.overflow.insert(id, value);
            }
        }
    }

    /// Doubles the table (at least [`INITIAL_SLOTS`]) and places every value again.
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(INITIAL_SLOTS);
        let old = std::mem::replace(&mut self.slots, (0..size).map(|_| None).collect());
        let overflow = std::mem::take(&mut self.overflow);
        for (id, value) in old.into_iter().flatten().chain(overflow) {
            self.place(id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The table against a `BTreeMap`, over inserts, look-ups and removals of
    /// ids that collide (same slot) and that do not.
    #[test]
    fn behaves_as_a_map() {
        let mut t = IdTable::default();
        let mut m = BTreeMap::new();
        // A long-lived id (a root), then sequential ids with some kept, and ids
        // a multiple of the size apart (same slot).
        assert_eq!(t.insert(1, 1000), None);
        m.insert(1, 1000);
        let mut x = 7u32;
        for step in 0..5000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let id = match x % 4 {
                0 => 2 + step,
                1 => 2 + step.saturating_sub(x % 8),
                2 => (x >> 8) % 64 * 16 + 1,
                _ => (x >> 8) % 512,
            };
            match (x >> 4) % 3 {
                0 => assert_eq!(t.insert(id, step), m.insert(id, step), "insert {id}"),
                1 => assert_eq!(t.remove(id), m.remove(&id), "remove {id}"),
                _ => {
                    assert_eq!(t.get(id), m.get(&id), "get {id}");
                    assert_eq!(t.contains(id), m.contains_key(&id));
                    if let Some(v) = t.get_mut(id) {
                        *v += 1;
                        *m.get_mut(&id).expect("in both") += 1;
                    }
                }
            }
            assert_eq!(t.len, m.len());
        }
        for (id, v) in &m {
            assert_eq!(t.get(*id), Some(v));
        }
    }

    #[test]
    fn sequential_ids_stay_in_their_slots() {
        let mut t = IdTable::default();
        t.insert(1, ());
        for id in 2..1000 {
            t.insert(id, ());
            assert!(t.remove(id).is_some());
        }
        // One id in sixteen shares the root's slot and passes through the map.
        assert!(t.overflow.is_empty());
        assert_eq!(t.slots.len(), INITIAL_SLOTS);
    }
}
