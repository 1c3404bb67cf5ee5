//! A VM's HTTP contexts by id: a direct-mapped table.
//!
//! A context's slot is its id modulo the table's size (a power of two). The
//! worker hands out ids whose slot is free ([`Contexts::is_free`], see
//! `WorkerSlot::next_ctx_id`), so a look-up is an index and one compare, not
//! a hash probe, and an id free in the table is unique among the live
//! contexts. The table doubles when it is half full, so a free id is at most
//! a few steps away even when long-lived contexts (a paused request, a
//! stream) hold slots while the ids move on.

use crate::state::HttpCtx;

/// The first table size.
const INITIAL_SLOTS: usize = 16;

/// A slot: the id of the context in it (0: free; ids start at 2) and the
/// context, reset to its default when freed. Contexts live in the table
/// itself: making one allocates nothing.
#[derive(Default)]
struct Slot {
    id: u32,
    ctx: HttpCtx,
}

#[derive(Default)]
pub(crate) struct Contexts {
    slots: Vec<Slot>,
    len: usize,
}

impl Contexts {
    fn index(&self, id: u32) -> usize {
        id as usize & (self.slots.len().wrapping_sub(1))
    }

    pub fn get(&self, id: &u32) -> Option<&HttpCtx> {
        match self.slots.get(self.index(*id)) {
            Some(s) if s.id == *id && *id != 0 => Some(&s.ctx),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: &u32) -> Option<&mut HttpCtx> {
        let index = self.index(*id);
        match self.slots.get_mut(index) {
            Some(s) if s.id == *id && *id != 0 => Some(&mut s.ctx),
            _ => None,
        }
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    /// Whether a context with `id` would take a free slot (the table makes
    /// room first when it is half full).
    pub fn is_free(&mut self, id: u32) -> bool {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        self.slots.get(self.index(id)).is_some_and(|s| s.id == 0)
    }

    /// Makes context `id` (a fresh one), growing the table until its slot is
    /// free (ids come from [`Contexts::is_free`], so that is a safety net,
    /// not a path). An id already live keeps its context.
    pub fn insert(&mut self, id: u32) {
        if id == 0 || self.contains_key(&id) {
            return;
        }
        while !self.is_free(id) {
            self.grow();
        }
        let index = self.index(id);
        if let Some(s) = self.slots.get_mut(index) {
            s.id = id;
            self.len += 1;
        }
    }

    /// Ends context `id` (reset in place: its slot is free again); `false`
    /// when there is none.
    pub fn remove(&mut self, id: &u32) -> bool {
        let index = self.index(*id);
        match self.slots.get_mut(index) {
            Some(s) if s.id == *id && *id != 0 => {
                s.id = 0;
                s.ctx = HttpCtx::default();
                self.len -= 1;
                true
            }
            _ => false,
        }
    }

    /// Every context, taken out (the table is left empty).
    pub fn drain(&mut self) -> impl Iterator<Item = (u32, HttpCtx)> + use<> {
        self.len = 0;
        std::mem::take(&mut self.slots).into_iter().filter(|s| s.id != 0).map(|s| (s.id, s.ctx))
    }

    /// Doubles the table (at least [`INITIAL_SLOTS`]); every context moves to
    /// its slot in the new size, which no other takes (ids differ in the
    /// lower bits the old size masked, or in the new one).
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(INITIAL_SLOTS);
        let old = std::mem::replace(&mut self.slots, (0..size).map(|_| Slot::default()).collect());
        for s in old.into_iter().filter(|s| s.id != 0) {
            let index = self.index(s.id);
            self.slots[index] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_to_their_contexts_and_free_ids_are_unique() {
        let mut t = Contexts::default();
        assert!(t.get(&5).is_none());
        assert!(t.is_free(5));
        t.insert(5);
        assert!(t.contains_key(&5));
        // Same slot, other id: not free, and not found.
        assert!(!t.is_free(5 + 16));
        assert!(t.get(&(5 + 16)).is_none());
        assert!(!t.remove(&(5 + 16)));
        assert_eq!(t.len, 1);
        assert!(t.remove(&5));
        assert!(!t.remove(&5));
        assert_eq!(t.len, 0);
    }

    #[test]
    fn a_long_lived_context_keeps_its_slot_while_ids_move_on() {
        let mut t = Contexts::default();
        t.insert(2);
        // Steady traffic: one context at a time, ids handed out as the worker
        // does (the next id whose slot is free).
        let mut next = 2u32;
        let mut skipped = 0;
        for _ in 0..10_000 {
            loop {
                next += 1;
                if t.is_free(next) {
                    break;
                }
                skipped += 1;
            }
            t.insert(next);
            assert!(t.get(&2).is_some(), "the long-lived context stays");
            assert!(t.remove(&next));
        }
        // One id in sixteen falls on the long-lived context's slot; the
        // table does not grow for them.
        assert!((600..=700).contains(&skipped), "{skipped}");
        assert_eq!(t.slots.len(), INITIAL_SLOTS);
    }

    #[test]
    fn the_table_grows_past_half_full_and_keeps_every_context() {
        let mut t = Contexts::default();
        let mut ids = Vec::new();
        let mut next = 1u32;
        for _ in 0..1000 {
            loop {
                next += 1;
                if t.is_free(next) {
                    break;
                }
            }
            t.insert(next);
            ids.push(next);
        }
        assert_eq!(t.len, 1000);
        assert!(t.slots.len() >= 2000);
        assert!(ids.iter().all(|id| t.get(id).is_some()));
        // An id inserted into a taken slot (not one handed out) still gets in.
        let taken = ids[0] + t.slots.len() as u32;
        t.insert(taken);
        assert!(t.get(&taken).is_some() && t.get(&ids[0]).is_some());
        let drained: Vec<u32> = t.drain().map(|(id, _)| id).collect();
        assert_eq!(drained.len(), 1001);
        assert_eq!(t.len, 0);
        assert!(t.get(&ids[1]).is_none());
    }
}
