//! A lock for the filters of one request, shared by the tasks of that request on
//! one worker thread (request body, handler, response body).
//!
//! Filter phases are plain calls, so the lock is only ever contended while a
//! filter is paused in one phase and another phase of the same request arrives
//! (a gRPC bidi stream whose response starts while a request-body filter waits
//! for a callout): then the second waits its turn. It is a `Cell` flag and a
//! waker list: no atomics, no task wakeup when uncontended.

use std::cell::{Cell, RefCell, RefMut};
use std::task::{Context, Poll, Waker};

pub(crate) struct LocalLock<T> {
    locked: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
    value: RefCell<T>,
}

impl<T> LocalLock<T> {
    pub fn new(value: T) -> Self {
        LocalLock { locked: Cell::new(false), waiters: RefCell::new(Vec::new()), value: RefCell::new(value) }
    }

    /// Takes the lock if it is free.
    pub fn try_acquire(&self) -> bool {
        !self.locked.replace(true)
    }

    /// Takes the lock, or registers to be woken when it is released.
    pub fn poll_acquire(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.try_acquire() {
            return Poll::Ready(());
        }
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Releases the lock and wakes whoever waits for it.
    pub fn release(&self) {
        self.locked.set(false);
        // Nobody waits, almost always: no take, no drop of an empty list.
        let waiters = {
            let mut list = self.waiters.borrow_mut();
            if list.is_empty() {
                return;
            }
            std::mem::take(&mut *list)
        };
        for w in waiters {
            w.wake();
        }
    }

    /// The value. Only the holder of the lock calls this, so the borrow never
    /// conflicts; a conflict would be a bug and yields `None`.
    pub fn value(&self) -> Option<RefMut<'_, T>> {
        debug_assert!(self.locked.get(), "LocalLock::value without the lock");
        self.value.try_borrow_mut().ok()
    }

    /// Takes the lock for the scope of the returned guard.
    pub async fn acquire(&self) -> Held<'_, T> {
        std::future::poll_fn(|cx| self.poll_acquire(cx)).await;
        Held { lock: self }
    }

    /// The lock for the scope of the returned guard, if it is free.
    pub fn try_hold(&self) -> Option<Held<'_, T>> {
        self.try_acquire().then(|| Held { lock: self })
    }
}

/// Holds a [`LocalLock`] until dropped.
pub(crate) struct Held<'a, T> {
    lock: &'a LocalLock<T>,
}

impl<T> Held<'_, T> {
    pub fn value(&self) -> Option<RefMut<'_, T>> {
        self.lock.value()
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_and_is_woken() {
        let lock = LocalLock::new(1);
        let held = lock.try_hold();
        assert!(held.is_some());
        assert!(lock.try_hold().is_none());
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(std::sync::Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(lock.poll_acquire(&mut cx).is_pending());
        drop(held);
        assert!(woken.load(std::sync::atomic::Ordering::SeqCst));
        assert!(lock.poll_acquire(&mut cx).is_ready());
        if let Some(mut v) = lock.value() {
            *v += 1;
        }
        lock.release();
        assert_eq!(lock.try_hold().and_then(|h| h.value().map(|v| *v)), Some(2));
    }
}
