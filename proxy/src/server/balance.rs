//! Spreading a listener's connections over the workers.
//!
//! Every worker accepts on its own `SO_REUSEPORT` socket, and the kernel picks
//! the socket by a hash of the 4-tuple: with few connections that is often
//! uneven (50 connections over 2 workers split 30/20 about a third of the time),
//! and a connection stays on its worker for life. With `connection_balance:
//! exact` (the default, as Envoy's `exact_balance`) the accepting worker hands
//! a new connection to the worker serving the fewest of the listener's
//! connections when that is fewer than its own. The hand-off is one channel
//! send at accept time; requests still never cross threads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// A connection accepted by one worker and served by another.
pub(crate) struct Handoff {
    /// The socket, deregistered from the accepting worker's reactor.
    pub stream: std::net::TcpStream,
    /// The downstream peer.
    pub remote: SocketAddr,
    /// The listener's connection-limit permit, held for the connection's life.
    pub permit: OwnedSemaphorePermit,
}

/// One listener binding's connection counts per worker and the workers' inboxes.
pub struct Balance {
    exact: bool,
    counts: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
}

/// A worker's end of a [`Balance`]: where handed-off connections arrive.
pub struct Inbox(pub(crate) mpsc::UnboundedReceiver<Handoff>);

impl Balance {
    /// The balance of a binding served by `workers` workers, and each worker's inbox.
    pub fn new(workers: usize, exact: bool) -> (std::sync::Arc<Balance>, Vec<Inbox>) {
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).map(|(tx, rx)| (tx, Inbox(rx))).unzip();
        let counts = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        (std::sync::Arc::new(Balance { exact, counts, inboxes }), receivers)
    }

    /// The worker that should serve a connection worker `me` just accepted:
    /// `None` for `me` itself. Counts it against the chosen worker.
    pub(crate) fn assign(&self, me: usize) -> Option<usize> {
        let mine = self.count(me);
        let target = if self.exact {
            self.counts
                .iter()
                .enumerate()
                .filter(|&(w, _)| w != me)
                .map(|(w, c)| (c.load(Ordering::Relaxed), w))
                .min()
                .filter(|&(n, _)| n < mine)
                .map(|(_, w)| w)
        } else {
            None
        };
        let serving = target.unwrap_or(me);
        if let Some(c) = self.counts.get(serving) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        target
    }

    /// Sends a connection to worker `to`. When that worker no longer accepts on
    /// this binding, the connection comes back to be served where it was accepted.
    pub(crate) fn hand_off(&self, to: usize, from: usize, h: Handoff) -> Result<(), Handoff> {
        let Some(inbox) = self.inboxes.get(to) else { return Err(h) };
        match inbox.send(h) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(h)) => {
                self.closed(to);
                if let Some(c) = self.counts.get(from) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                Err(h)
            }
        }
    }

    /// A connection served by `worker` ended.
    pub(crate) fn closed(&self, worker: usize) {
        if let Some(c) = self.counts.get(worker) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn count(&self, worker: usize) -> usize {
        self.counts.get(worker).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_fills_the_least_loaded_worker_first() {
        let (b, _inboxes) = Balance::new(3, true);
        // Worker 0 accepts everything: it keeps one, then hands off until even.
        assert_eq!(b.assign(0), None);
        assert_eq!(b.assign(0), Some(1));
        assert_eq!(b.assign(0), Some(2));
        assert_eq!(b.assign(0), None);
        assert_eq!((b.count(0), b.count(1), b.count(2)), (2, 1, 1));
        b.closed(1);
        assert_eq!(b.assign(2), Some(1));
        assert_eq!((b.count(0), b.count(1), b.count(2)), (2, 1, 1));
    }

    #[test]
    fn kernel_keeps_every_connection_where_it_was_accepted() {
        let (b, _inboxes) = Balance::new(2, false);
        for _ in 0..4 {
            assert_eq!(b.assign(0), None);
        }
        assert_eq!((b.count(0), b.count(1)), (4, 0));
    }
}
