//! The time of the current poll of a connection's task, read once: the
//! request path reads the clock up to seven times a request (its start, the
//! pool's idle checks, the attempt's start and end, the metrics, the
//! connection's last activity), most of them within the same poll. Like
//! nginx, which reads the time once per turn of its event loop, a connection
//! task's poll reads it at most once ([`Scoped`]); anywhere else [`now`]
//! reads the clock.
//!
//! A duration measured with it is exact to within the poll it began or ended
//! in: a poll does CPU work only (microseconds), never waits.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

thread_local! {
    /// `Some(None)`: inside a poll, not read yet; `Some(Some(t))`: read.
    static POLL_TIME: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// The time now: the current poll's, when inside a [`Scoped`] poll.
#[inline]
pub(crate) fn now() -> Instant {
    POLL_TIME.with(|t| match t.get() {
        Some(Some(at)) => at,
        Some(None) => {
            let at = Instant::now();
            t.set(Some(Some(at)));
            at
        }
        None => Instant::now(),
    })
}

pin_project_lite::pin_project! {
    /// A future whose every poll reads the clock at most once (see [`now`]).
    pub(crate) struct Scoped<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Scoped<F> {
    pub(crate) fn new(inner: F) -> Self {
        Scoped { inner }
    }
}

/// Leaves a poll's scope (restoring an outer one), also when the poll panics.
struct Leave(Option<Option<Instant>>);

impl Drop for Leave {
    fn drop(&mut self) {
        POLL_TIME.with(|t| t.set(self.0));
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _leave = Leave(POLL_TIME.with(|t| t.replace(Some(None))));
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_read_per_poll_and_fresh_reads_outside() {
        let outside = now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(now() > outside, "outside a poll, every call reads the clock");
        let mut polls = Vec::new();
        let mut fut = Box::pin(Scoped::new(std::future::poll_fn(|cx| {
            let (a, b) = (now(), now());
            assert_eq!(a, b, "one poll, one time");
            polls.push(a);
            if polls.len() < 2 {
                // The next poll comes later: it must see a later time.
                std::thread::sleep(std::time::Duration::from_millis(2));
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        })));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        drop(fut);
        assert!(polls[1] > polls[0], "each poll reads the clock again");
        let after = now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(now() > after, "the scope ends with the poll");
    }
}
