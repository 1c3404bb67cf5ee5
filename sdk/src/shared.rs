//! Shared data (a process-wide key/value store with compare-and-swap) and shared
//! queues: the only state VMs on different workers can share.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_abi::Status;

use crate::error::{Error, HostError};
use crate::sys;

/// A compare-and-swap version of a shared-data value (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cas(pub u32);

/// How often [`Shared::update`] retries after a CAS mismatch.
pub const MAX_CAS_RETRIES: usize = 32;

/// Reads a shared value and its CAS; `None` when the key is absent.
pub fn get(key: &str) -> Result<Option<(Vec<u8>, Cas)>, HostError> {
    match sys::get_shared_data(key.as_bytes()) {
        Ok((value, cas)) => Ok(Some((value.unwrap_or_default(), Cas(cas)))),
        Err(raw) if raw == Status::NotFound.as_u32() => Ok(None),
        Err(raw) => Err(HostError::new("proxy_get_shared_data", format!("{key:?}"), raw)),
    }
}

/// Writes a shared value. With `Some(cas)` the write only happens if the value is
/// still at that version; otherwise the error [`is`](HostError::is)
/// `CasMismatch`. `None` writes unconditionally.
pub fn set(key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), HostError> {
    sys::set_shared_data(key.as_bytes(), value, cas.map_or(0, |c| c.0))
        .map_err(sys::fail("proxy_set_shared_data", format!("{key:?}")))
}

/// Removes a shared value (stores an empty one, as the proxy-wasm SDKs do).
pub fn remove(key: &str) -> Result<(), HostError> {
    set(key, &[], None)
}

/// A typed shared value, stored as JSON.
///
/// ```no_run
/// let hits = sluice_sdk::shared::Shared::<u64>::new("hits");
/// let now = hits.update(|n| n.unwrap_or(0) + 1)?;
/// # Ok::<(), sluice_sdk::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Shared<T> {
    key: String,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Shared<T> {
    /// A handle on `key`.
    pub fn new(key: impl Into<String>) -> Shared<T> {
        Shared { key: key.into(), _type: PhantomData }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn decode(&self, bytes: &[u8]) -> Result<Option<T>, Error> {
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(bytes).map(Some).map_err(|e| Error::Decode {
            what: format!("shared data {:?}", self.key),
            message: e.to_string(),
        })
    }

    fn encode(&self, value: &T) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(value).map_err(|e| Error::Decode {
            what: format!("shared data {:?}", self.key),
            message: e.to_string(),
        })
    }

    /// Reads the value; `None` when absent or removed.
    pub fn get(&self) -> Result<Option<T>, Error> {
        match get(&self.key)? {
            Some((bytes, _)) => self.decode(&bytes),
            None => Ok(None),
        }
    }

    /// Writes the value unconditionally.
    pub fn set(&self, value: &T) -> Result<(), Error> {
        Ok(set(&self.key, &self.encode(value)?, None)?)
    }

    /// Read-modify-write with compare-and-swap, retrying on conflicts up to
    /// [`MAX_CAS_RETRIES`] times. Returns the value written. (An absent key is
    /// created with an unconditional write: the ABI has no "create if absent".)
    pub fn update(&self, mut f: impl FnMut(Option<T>) -> T) -> Result<T, Error> {
        for _ in 0..MAX_CAS_RETRIES {
            let (current, cas) = match get(&self.key)? {
                Some((bytes, cas)) => (self.decode(&bytes)?, Some(cas)),
                None => (None, None),
            };
            let next = f(current);
            match set(&self.key, &self.encode(&next)?, cas) {
                Ok(()) => return Ok(next),
                Err(e) if e.is(Status::CasMismatch) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::msg(format!(
            "shared data {:?}: gave up after {MAX_CAS_RETRIES} compare-and-swap conflicts",
            self.key
        )))
    }
}

/// A shared queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Queue(pub(crate) u32);

impl Queue {
    /// Registers (or finds) this VM's queue `name`; enqueues on it call
    /// [`on_queue_ready`](crate::RootContext::on_queue_ready) of the registering root.
    pub fn register(name: &str) -> Result<Queue, HostError> {
        sys::register_shared_queue(name.as_bytes())
            .map(Queue)
            .map_err(sys::fail("proxy_register_shared_queue", format!("{name:?}")))
    }

    /// Finds the queue `name` of VM `vm_id` (empty = this VM); `None` if nobody
    /// registered it.
    pub fn resolve(vm_id: &str, name: &str) -> Result<Option<Queue>, HostError> {
        match sys::resolve_shared_queue(vm_id.as_bytes(), name.as_bytes()) {
            Ok(id) => Ok(Some(Queue(id))),
            Err(raw) if raw == Status::NotFound.as_u32() => Ok(None),
            Err(raw) => {
                Err(HostError::new("proxy_resolve_shared_queue", format!("{vm_id:?}, {name:?}"), raw))
            }
        }
    }

    /// A queue from its raw id.
    pub fn from_id(id: u32) -> Queue {
        Queue(id)
    }

    /// The raw id.
    pub fn id(self) -> u32 {
        self.0
    }

    /// Appends an item.
    pub fn enqueue(self, data: &[u8]) -> Result<(), HostError> {
        sys::enqueue_shared_queue(self.0, data)
            .map_err(sys::fail("proxy_enqueue_shared_queue", format!("{}", self.0)))
    }

    /// Takes the oldest item; `None` when the queue is empty.
    pub fn dequeue(self) -> Result<Option<Vec<u8>>, HostError> {
        match sys::dequeue_shared_queue(self.0) {
            Ok(v) => Ok(Some(v.unwrap_or_default())),
            Err(raw) if raw == Status::Empty.as_u32() => Ok(None),
            Err(raw) => Err(HostError::new("proxy_dequeue_shared_queue", format!("{}", self.0), raw)),
        }
    }
}
