//! Process-wide shared data (with compare-and-swap) and shared queues, visible to
//! every VM of the process. Both are scoped by a "vm id": Sluice uses the plugin
//! name, so the VMs of one plugin on every worker (and across hot swaps) share,
//! and different plugins do not unless one names the other explicitly.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use sluice_abi::Status;
use tokio::sync::mpsc::{UnboundedSender, WeakUnboundedSender};

/// Largest shared-data value and queue item, in bytes.
pub(crate) const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest number of keys per scope.
const MAX_KEYS: usize = 100_000;
/// Bytes of keys and values per scope: without it, 100k keys of 1 MiB values
/// would let one plugin hold 100 GiB of the process.
const MAX_SCOPE_BYTES: usize = 64 * 1024 * 1024;
/// Items kept per queue; older items are dropped past this.
const MAX_QUEUE_ITEMS: usize = 10_000;
/// Bytes kept per queue; older items are dropped past this.
const MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Queues per scope.
const MAX_QUEUES: usize = 1024;

#[derive(Default)]
pub(crate) struct SharedState {
    data: RwLock<HashMap<String, Scope>>,
    cas: AtomicU32,
    queues: Mutex<Queues>,
}

/// The shared data of one scope.
#[derive(Default)]
struct Scope {
    entries: HashMap<Vec<u8>, (Bytes, u32)>,
    /// Bytes of its keys and values.
    bytes: usize,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(String, Vec<u8>), u32>,
    by_id: HashMap<u32, Queue>,
    next_id: u32,
}

struct Queue {
    items: VecDeque<Bytes>,
    /// Bytes of its items.
    bytes: usize,
    /// Registrants, last one first served: (mailbox, root context id).
    owners: Vec<WeakUnboundedSender<u32>>,
}

impl SharedState {
    fn next_cas(&self) -> u32 {
        loop {
            let v = self.cas.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if v != 0 {
                return v;
            }
        }
    }

    /// The value and CAS of `key`.
    pub fn get(&self, scope: &str, key: &[u8]) -> Option<(Bytes, u32)> {
        self.data.read().get(scope)?.entries.get(key).cloned()
    }

    /// Sets `key`; `cas` 0 is unconditional, otherwise it must match. Past the
    /// scope's quotas (keys, bytes) it is `BadArgument`, as for a value too large.
    pub fn set(&self, scope: &str, key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
        if value.len() > MAX_VALUE_BYTES || key.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut data = self.data.write();
        let Scope { entries, bytes } = match data.get_mut(scope) {
            Some(e) => e,
            None => data.entry(scope.to_string()).or_default(),
        };
        match entries.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                let after = *bytes - entry.0.len() + value.len();
                if after > MAX_SCOPE_BYTES {
                    return Err(Status::BadArgument);
                }
                *entry = (Bytes::copy_from_slice(value), self.next_cas());
                *bytes = after;
            }
            None => {
                let after = *bytes + key.len() + value.len();
                if entries.len() >= MAX_KEYS || after > MAX_SCOPE_BYTES {
                    return Err(Status::BadArgument);
                }
                entries.insert(key.to_vec(), (Bytes::copy_from_slice(value), self.next_cas()));
                *bytes = after;
            }
        }
        Ok(())
    }

    /// Registers (or re-registers) a queue; the caller's mailbox becomes its
    /// first-served owner. A new queue past the scope's [`MAX_QUEUES`], or with
    /// a name over [`MAX_VALUE_BYTES`], is `BadArgument`.
    pub fn register_queue(
        &self,
        scope: &str,
        name: &[u8],
        owner: &UnboundedSender<u32>,
    ) -> Result<u32, Status> {
        if name.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut q = self.queues.lock();
        let key = (scope.to_string(), name.to_vec());
        let id = match q.by_name.get(&key) {
            Some(id) => *id,
            None => {
                // Counted on registration only (rare: at VM start).
                if q.by_name.keys().filter(|(s, _)| s == scope).count() >= MAX_QUEUES {
                    return Err(Status::BadArgument);
                }
                q.next_id += 1;
                let id = q.next_id;
                q.by_name.insert(key, id);
                q.by_id.insert(id, Queue { items: VecDeque::new(), bytes: 0, owners: Vec::new() });
                id
            }
        };
        if let Some(queue) = q.by_id.get_mut(&id) {
            queue.owners.retain(|o| o.upgrade().is_some_and(|tx| !tx.same_channel(owner)));
            queue.owners.push(owner.downgrade());
        }
        Ok(id)
    }

    pub fn resolve_queue(&self, scope: &str, name: &[u8]) -> Option<u32> {
        self.queues.lock().by_name.get(&(scope.to_string(), name.to_vec())).copied()
    }

    /// Appends an item and notifies the latest live registrant.
    pub fn enqueue(&self, id: u32, item: &[u8]) -> Result<(), Status> {
        if item.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut q = self.queues.lock();
        let queue = q.by_id.get_mut(&id).ok_or(Status::NotFound)?;
        let mut dropped = 0;
        while queue.items.len() >= MAX_QUEUE_ITEMS || queue.bytes + item.len() > MAX_QUEUE_BYTES {
            let Some(oldest) = queue.items.pop_front() else { break };
            queue.bytes -= oldest.len();
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(queue = id, dropped, "shared queue full; dropped its oldest items");
        }
        queue.bytes += item.len();
        queue.items.push_back(Bytes::copy_from_slice(item));
        while let Some(owner) = queue.owners.last() {
            if owner.upgrade().is_some_and(|tx| tx.send(id).is_ok()) {
                break;
            }
            queue.owners.pop();
        }
        Ok(())
    }

    pub fn dequeue(&self, id: u32) -> Result<Bytes, Status> {
        let mut q = self.queues.lock();
        let queue = q.by_id.get_mut(&id).ok_or(Status::NotFound)?;
        let item = queue.items.pop_front().ok_or(Status::Empty)?;
        queue.bytes -= item.len();
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_is_never_zero_and_must_match() {
        let s = SharedState::default();
        s.set("p", b"k", b"v1", 0).unwrap_or_else(|_| panic!("set"));
        let (v, cas) = s.get("p", b"k").unwrap_or_default();
        assert_eq!(&v[..], b"v1");
        assert_ne!(cas, 0);
        assert_eq!(s.set("p", b"k", b"v2", cas.wrapping_add(7)), Err(Status::CasMismatch));
        assert_eq!(s.set("p", b"k", b"v2", cas), Ok(()));
        assert!(s.get("other", b"k").is_none());
    }

    /// A scope holds at most 64 MiB of keys and values; a replaced value gives
    /// its bytes back, and other scopes are not charged.
    #[test]
    fn a_scope_holds_at_most_its_byte_quota() {
        let s = SharedState::default();
        let mib = vec![7u8; MAX_VALUE_BYTES];
        let keys = MAX_SCOPE_BYTES / (MAX_VALUE_BYTES + 2);
        for i in 0..keys {
            assert_eq!(s.set("p", &(i as u16).to_le_bytes(), &mib, 0), Ok(()), "key {i}");
        }
        assert_eq!(s.set("p", b"one more", &mib, 0), Err(Status::BadArgument));
        assert_eq!(s.set("q", b"one more", &mib, 0), Ok(()), "another scope");
        // Replacing a value by a smaller one frees room.
        assert_eq!(s.set("p", &0u16.to_le_bytes(), b"small", 0), Ok(()));
        assert_eq!(s.set("p", b"one more", &mib, 0), Ok(()));
        assert_eq!(s.get("p", b"one more").map(|(v, _)| v.len()), Some(MAX_VALUE_BYTES));
    }

    /// A queue keeps at most 64 MiB (oldest dropped first); a scope has at
    /// most 1,024 queues.
    #[test]
    fn queues_are_bounded_in_bytes_and_number() {
        let s = SharedState::default();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let id = s.register_queue("p", b"q", &tx).unwrap_or_default();
        let items = MAX_QUEUE_BYTES / MAX_VALUE_BYTES;
        for i in 0..items + 3 {
            let mut item = vec![0u8; MAX_VALUE_BYTES];
            item[0] = i as u8;
            assert_eq!(s.enqueue(id, &item), Ok(()));
        }
        // The first three went to make room.
        assert_eq!(s.dequeue(id).map(|item| item[0]), Ok(3));
        let mut left = 1;
        while s.dequeue(id).is_ok() {
            left += 1;
        }
        assert_eq!(left, items);
        for i in 1..MAX_QUEUES {
            assert!(s.register_queue("p", format!("q{i}").as_bytes(), &tx).is_ok(), "queue {i}");
        }
        assert_eq!(s.register_queue("p", b"past the cap", &tx), Err(Status::BadArgument));
        assert_eq!(s.register_queue("p", b"q", &tx), Ok(id), "an existing queue registers again");
        assert!(s.register_queue("other", b"q", &tx).is_ok());
    }
}
