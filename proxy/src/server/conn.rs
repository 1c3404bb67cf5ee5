//! What a downstream connection's watcher task and its connection task share:
//! request activity (for the idle and header-read timeouts and rapid-reset
//! detection) and the watcher's orders (drain, close).

use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use super::AcceptCtx;

/// What a connection's watcher asks of its connection task.
#[derive(Default)]
pub(super) struct Control {
    /// Stop taking requests: GOAWAY / `connection: close`, finish in-flight ones.
    pub(super) shutdown: std::cell::Cell<bool>,
    /// Drop the connection now.
    pub(super) close: std::cell::Cell<bool>,
    waker: std::cell::RefCell<Option<Waker>>,
}

impl Control {
    pub(super) fn park(&self, waker: &Waker) {
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *w = Some(waker.clone());
        }
    }

    fn signal(&self, close: bool) {
        if close {
            self.close.set(true);
        } else {
            self.shutdown.set(true);
        }
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Watches one connection: drain, the idle timeout, rapid-reset abuse.
pub(super) async fn watch_connection(activity: Rc<Activity>, control: Rc<Control>, cx: Rc<AcceptCtx>) {
    let idle_timeout = cx.config.limits.idle_timeout;
    let mut drain = cx.drain.clone();
    // Checked again here (not only in `run_http`): a drain may have begun since.
    let mut draining = drain.borrow().is_some();
    if draining {
        control.signal(false);
    }
    // HTTP/1.1 (and a connection that has sent no request yet) must deliver a
    // whole request head within `header_read_timeout` of the previous response's
    // end (or of connecting), as hyper's own header timer had it; HTTP/2 gets the
    // idle timeout once it is in use.
    let head_timeout = cx.config.limits.header_read_timeout.min(idle_timeout);
    let mut abused = false;
    loop {
        let h2 = activity.h2.get();
        let timeout = if h2 { idle_timeout } else { head_timeout };
        let idle = if activity.in_flight.get() > 0 {
            tokio::time::Instant::now() + timeout
        } else {
            activity.idle_deadline(timeout)
        };
        tokio::select! {
            _ = activity.abuse.notified(), if !abused => {
                abused = true;
                draining = true;
                tracing::warn!(
                    listener = %cx.name,
                    streams = activity.streams.get(),
                    premature_resets = activity.premature.get(),
                    "closing a connection that resets its requests prematurely (rapid reset)"
                );
                cx.shared.metrics.abuse_closes.with_label_values(&[&cx.name, "premature_resets"]).inc();
                // GOAWAY now; the connection is dropped if it does not wind down promptly.
                control.signal(false);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if abused => {
                control.signal(true);
                return;
            }
            changed = drain.changed(), if !draining => {
                if changed.is_err() || drain.borrow().is_some() {
                    draining = true;
                    control.signal(false);
                }
            }
            _ = tokio::time::sleep_until(idle), if !draining => {
                if activity.in_flight.get() == 0 && activity.last.get().elapsed() >= timeout {
                    tracing::debug!(listener = %cx.name, requests = activity.streams.get(), "closing idle downstream connection");
                    if h2 {
                        // GOAWAY: nothing is in flight.
                        control.signal(false);
                        draining = true;
                    } else {
                        // Nothing in flight, perhaps half a request head: drop it
                        // (a graceful close would wait for that head).
                        control.signal(true);
                        return;
                    }
                }
            }
        }
    }
}

/// Request activity on a connection, for the idle timeout.
pub(super) struct Activity {
    /// Requests started on this connection.
    streams: std::cell::Cell<u64>,
    /// Requests the client gave up on (reset, went away) within a second of
    /// starting them, before their response: the HTTP/2 rapid-reset pattern.
    premature: std::cell::Cell<u64>,
    /// Signalled when the connection looks abusive.
    abuse: tokio::sync::Notify,
    in_flight: std::cell::Cell<usize>,
    last: std::cell::Cell<std::time::Instant>,
    /// The connection speaks HTTP/2 (known from its first request).
    pub(super) h2: std::cell::Cell<bool>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            streams: std::cell::Cell::new(0),
            premature: std::cell::Cell::new(0),
            abuse: tokio::sync::Notify::new(),
            in_flight: std::cell::Cell::new(0),
            last: std::cell::Cell::new(std::time::Instant::now()),
            h2: std::cell::Cell::new(false),
        }
    }
}

pub(super) struct ActivityGuard {
    activity: Rc<Activity>,
    started: std::time::Instant,
    /// The request's handler returned (its response went to hyper).
    pub(super) completed: bool,
}

/// Close a connection once this many of its requests were reset prematurely,
/// if they are at least half of its requests (Envoy's rapid-reset rule).
const PREMATURE_RESET_MIN: u64 = 100;
const PREMATURE_RESET_WINDOW: Duration = Duration::from_secs(1);

impl Activity {
    pub(super) fn begin(self: &Rc<Self>) -> ActivityGuard {
        self.streams.set(self.streams.get() + 1);
        self.in_flight.set(self.in_flight.get() + 1);
        ActivityGuard { activity: self.clone(), started: crate::clock::now(), completed: false }
    }

    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.last.get() + timeout)
    }
}

impl ActivityGuard {
    /// When the request began (one clock read serves the connection's
    /// bookkeeping and the request's timings).
    pub(super) fn started(&self) -> std::time::Instant {
        self.started
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.in_flight.set(a.in_flight.get() - 1);
        let now = crate::clock::now();
        a.last.set(now);
        if !self.completed && now.saturating_duration_since(self.started) < PREMATURE_RESET_WINDOW {
            let premature = a.premature.get() + 1;
            a.premature.set(premature);
            if premature >= PREMATURE_RESET_MIN && premature * 2 > a.streams.get() {
                a.abuse.notify_one();
            }
        }
    }
}
