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
/// Items kept per queue; older items are dropped past this.
const MAX_QUEUE_ITEMS: usize = 10_000;

#[derive(Default)]
pub(crate) struct SharedState {
    data: RwLock<HashMap<String, HashMap<Vec<u8>, (Bytes, u32)>>>,
    cas: AtomicU32,
    queues: Mutex<Queues>,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(String, Vec<u8>), u32>,
    by_id: HashMap<u32, Queue>,
    next_id: u32,
}

struct Queue {
    items: VecDeque<Bytes>,
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
        self.data.read().get(scope)?.get(key).cloned()
    }

    /// Sets `key`; `cas` 0 is unconditional, otherwise it must match.
    pub fn set(&self, scope: &str, key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
        if value.len() > MAX_VALUE_BYTES || key.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut data = self.data.write();
        let entries = match data.get_mut(scope) {
            Some(e) => e,
            None => data.entry(scope.to_string()).or_default(),
        };
        match entries.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                *entry = (Bytes::copy_from_slice(value), self.next_cas());
            }
            None => {
                if entries.len() >= MAX_KEYS {
                    return Err(Status::BadArgument);
                }
                entries.insert(key.to_vec(), (Bytes::copy_from_slice(value), self.next_cas()));
            }
        }
        Ok(())
    }

    /// Registers (or re-registers) a queue; the caller's mailbox becomes its
    /// first-served owner.
    pub fn register_queue(&self, scope: &str, name: &[u8], owner: &UnboundedSender<u32>) -> u32 {
        let mut q = self.queues.lock();
        let key = (scope.to_string(), name.to_vec());
        let id = match q.by_name.get(&key) {
            Some(id) => *id,
            None => {
                q.next_id += 1;
                let id = q.next_id;
                q.by_name.insert(key, id);
                q.by_id.insert(id, Queue { items: VecDeque::new(), owners: Vec::new() });
                id
            }
        };
        if let Some(queue) = q.by_id.get_mut(&id) {
            queue.owners.retain(|o| o.upgrade().is_some_and(|tx| !tx.same_channel(owner)));
            queue.owners.push(owner.downgrade());
        }
        id
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
        if queue.items.len() >= MAX_QUEUE_ITEMS {
            queue.items.pop_front();
            tracing::warn!(queue = id, "shared queue full; dropped its oldest item");
        }
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
        queue.items.pop_front().ok_or(Status::Empty)
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
}
