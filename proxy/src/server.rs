//! Workers, listeners and downstream connections.
//!
//! Each worker is a thread running a tokio current-thread runtime inside a
//! `LocalSet`, with its own `SO_REUSEPORT` socket per listener, so the kernel
//! spreads connections and a request never crosses threads. Workers take
//! commands (add/remove a listener, drain) over a channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sluice_config::{HttpProtocol, Limits, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::forward::{ConnInfo, Shared, handle};
use crate::pool::LocalExec;

/// How a listener accepts: its sockets (one per worker) and its TLS acceptor.
pub struct BoundListener {
    /// Listener config.
    pub config: Listener,
    /// The address actually bound.
    pub local_addr: SocketAddr,
    /// One socket per worker.
    pub sockets: Vec<std::net::TcpListener>,
    /// Downstream TLS.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Shared connection limit.
    pub limit: Arc<Semaphore>,
}

/// Binds `workers` sockets to the listener's address with `SO_REUSEPORT`.
pub fn bind(config: &Listener, workers: usize) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let mut addr = config.address;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        let l: std::net::TcpListener = s.into();
        // With port 0 the first socket picks the port; the others join it.
        addr = l.local_addr()?;
        sockets.push(l);
    }
    Ok((addr, sockets))
}

/// A command to a worker.
pub enum WorkerCmd {
    /// Start accepting on a listener.
    Add {
        /// Listener name.
        name: String,
        /// Identity of this binding (to tell replacements apart).
        binding: u64,
        /// The worker's socket.
        socket: std::net::TcpListener,
        /// Listener config.
        config: Box<Listener>,
        /// TLS acceptor.
        tls: Option<Arc<crate::tls::ServerTls>>,
        /// Shared connection limit.
        limit: Arc<Semaphore>,
    },
    /// Stop accepting on a binding; its connections drain.
    Remove {
        /// Binding id.
        binding: u64,
    },
    /// A new dataplane is about to be in force: prepare its filters' per-worker
    /// state, then acknowledge.
    Warm(Arc<crate::dataplane::Dataplane>, tokio::sync::oneshot::Sender<()>),
}

/// A running worker.
pub struct WorkerHandle {
    /// Command channel.
    pub tx: mpsc::UnboundedSender<WorkerCmd>,
    /// Joins the thread.
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts a worker thread.
pub fn spawn_worker(
    index: usize,
    shared: Arc<Shared>,
    drain: watch::Receiver<Option<Duration>>,
) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new().name(format!("sluice-worker-{index}")).spawn(move || {
        crate::metrics::sharded::enter_worker(index);
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start worker runtime");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, worker_main(index, shared, rx, drain));
    })?;
    Ok(WorkerHandle { tx, thread })
}

async fn worker_main(
    index: usize,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<WorkerCmd>,
    mut drain: watch::Receiver<Option<Duration>>,
) {
    let active = Rc::new(std::cell::Cell::new(0usize));
    let idle_done = Rc::new(tokio::sync::Notify::new());
    let mut accepting: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    // Close idle pooled upstream connections and forget pools of removed clusters.
    let reaper_shared = shared.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let dp = reaper_shared.dataplane.load();
            crate::pool::reap(&|id| {
                dp.clusters.values().find(|c| c.id == id).map(|c| c.config.pool.idle_timeout)
            });
        }
    });
    let drain_timeout = loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(WorkerCmd::Add { name, binding, socket, config, tls, limit }) => {
                    let listener = match TcpListener::from_std(socket) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listener = %name, error = %e, "cannot register listener socket");
                            continue;
                        }
                    };
                    let (stop_tx, stop_rx) = watch::channel(false);
                    accepting.insert(binding, stop_tx);
                    let ctx = AcceptCtx {
                        name: name.as_str().into(),
                        shared: shared.clone(),
                        config: Rc::new(*config),
                        tls,
                        limit,
                        active: active.clone(),
                        idle_done: idle_done.clone(),
                        drain: drain.clone(),
                    };
                    tokio::task::spawn_local(accept_loop(listener, ctx, stop_rx));
                }
                Some(WorkerCmd::Warm(dp, done)) => {
                    for (_, f) in &dp.filters {
                        f.prepare_worker();
                    }
                    let _ = done.send(());
                }
                Some(WorkerCmd::Remove { binding }) => {
                    if let Some(tx) = accepting.remove(&binding) {
                        let _ = tx.send(true);
                    }
                }
                None => break None,
            },
            changed = drain.changed() => {
                if changed.is_err() {
                    break None;
                }
                if let Some(t) = *drain.borrow() {
                    break Some(t);
                }
            }
        }
    };
    for (_, tx) in accepting.drain() {
        let _ = tx.send(true);
    }
    let timeout = drain_timeout.unwrap_or(Duration::from_secs(0));
    let wait = async {
        while active.get() > 0 {
            idle_done.notified().await;
        }
    };
    if tokio::time::timeout(timeout, wait).await.is_err() {
        tracing::warn!(
            worker = index,
            connections = active.get(),
            "drain timeout: closing remaining connections"
        );
    }
}

struct AcceptCtx {
    name: Arc<str>,
    shared: Arc<Shared>,
    config: Rc<Listener>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    limit: Arc<Semaphore>,
    active: Rc<std::cell::Cell<usize>>,
    idle_done: Rc<tokio::sync::Notify>,
    drain: watch::Receiver<Option<Duration>>,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(listener: TcpListener, cx: AcceptCtx, mut stop: watch::Receiver<bool>) {
    let cx = Rc::new(cx);
    let gauge = cx.shared.metrics.connections_active.with_label_values(&[&cx.name]);
    let total = cx.shared.metrics.connections_total.with_label_values(&[&cx.name]);
    loop {
        let permit = tokio::select! {
            p = cx.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %cx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        total.inc();
        gauge.inc();
        cx.active.set(cx.active.get() + 1);
        let cx2 = cx.clone();
        let gauge2 = gauge.clone();
        tokio::task::spawn_local(async move {
            serve_connection(stream, remote, &cx2).await;
            drop(permit);
            gauge2.dec();
            cx2.active.set(cx2.active.get() - 1);
            cx2.idle_done.notify_waiters();
        });
    }
}

fn builder(limits: &Limits, protocols: &[HttpProtocol], h2_only: Option<bool>) -> auto::Builder<LocalExec> {
    let mut b = auto::Builder::new(LocalExec);
    let h1 = protocols.contains(&HttpProtocol::Http1);
    let h2 = protocols.contains(&HttpProtocol::Http2);
    match h2_only {
        Some(true) => b = b.http2_only(),
        Some(false) => b = b.http1_only(),
        None if h1 && !h2 => b = b.http1_only(),
        None if h2 && !h1 => b = b.http2_only(),
        None => {}
    }
    // No header-read timer in hyper: it boxes, arms and cancels one around every
    // request (~0.5 µs of a ~15 µs request). The connection's watcher enforces
    // the same limit lazily (`watch_connection`).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None::<Duration>)
        .max_headers(limits.max_request_headers)
        .max_buf_size(limits.max_request_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_header_list_size(limits.max_request_header_bytes as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_resets);
    b
}

async fn serve_connection(stream: TcpStream, remote: SocketAddr, cx: &Rc<AcceptCtx>) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(remote);
    let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let limits = &cx.config.limits;
    let conn = |tls| {
        Rc::new(ConnInfo {
            shared: cx.shared.clone(),
            listener: cx.name.clone(),
            remote,
            local,
            id,
            tls,
            remote_ip: crate::headers::ip_value(remote.ip()),
        })
    };
    match &cx.tls {
        None => {
            let conn = conn(None);
            let b = builder(limits, &cx.config.protocols, None);
            run_http(b, TokioIo::new(stream), conn, cx).await;
        }
        Some(tls) => {
            let accepted =
                tokio::time::timeout(limits.header_read_timeout, tls.acceptor().accept(stream)).await;
            let tls_stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = match &cx.shared.tls_metrics {
                        Some(m) => m.handshake_failed(sluice_tls::Side::Downstream, &cx.name, &e),
                        None => "error",
                    };
                    tracing::debug!(listener = %cx.name, %remote, error = %e, reason, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = %cx.name, %remote, "tls handshake timed out");
                    return;
                }
            };
            if let Some(m) = &cx.shared.tls_metrics {
                m.handshake_ok(sluice_tls::Side::Downstream, &cx.name);
            }
            let (_, session) = tls_stream.get_ref();
            // No ALPN means HTTP/1.1.
            let h2 = session.alpn_protocol() == Some(b"h2");
            let conn = conn(Some(Arc::new(crate::tls::tls_info(session))));
            let b = builder(limits, &cx.config.protocols, Some(h2));
            run_http(b, TokioIo::new(tls_stream), conn, cx).await;
        }
    }
}

async fn run_http<T>(b: auto::Builder<LocalExec>, io: TokioIo<T>, conn: Rc<ConnInfo>, cx: &Rc<AcceptCtx>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Rc::new(Activity::default());
    let act = activity.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let conn = conn.clone();
        if req.version() == http::Version::HTTP_2 {
            act.h2.set(true);
        }
        let mut guard = act.begin();
        async move {
            let r = handle(req, conn).await;
            guard.completed = true;
            // The request stays active until its response body ends, so the
            // header-read and idle timeouts never cut a response that streams.
            r.map(|resp| resp.map(|body| body.on_end(move |_, _| drop(guard))))
        }
    });
    let served = b.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    // Timers and signals live in a watcher task, so waking the connection for
    // its requests polls hyper and nothing else (no timer re-arm, no Notify
    // registrations per wakeup).
    let control = Rc::new(Control::default());
    if cx.drain.borrow().is_some() {
        control.shutdown.set(true);
    }
    let watcher = tokio::task::spawn_local(watch_connection(activity, control.clone(), cx.clone()));
    let mut shutdown_sent = false;
    let result = std::future::poll_fn(|task| {
        if control.close.get() {
            return Poll::Ready(None);
        }
        if control.shutdown.get() && !shutdown_sent {
            shutdown_sent = true;
            served.as_mut().graceful_shutdown();
        }
        match served.as_mut().poll(task) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => {
                control.park(task.waker());
                Poll::Pending
            }
        }
    })
    .await;
    watcher.abort();
    if let Some(Err(e)) = result {
        tracing::debug!(listener = %cx.name, error = %e, "downstream connection error");
    }
}

/// What a connection's watcher asks of its connection task.
#[derive(Default)]
struct Control {
    /// Stop taking requests: GOAWAY / `connection: close`, finish in-flight ones.
    shutdown: std::cell::Cell<bool>,
    /// Drop the connection now.
    close: std::cell::Cell<bool>,
    waker: std::cell::RefCell<Option<Waker>>,
}

impl Control {
    fn park(&self, waker: &Waker) {
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
async fn watch_connection(activity: Rc<Activity>, control: Rc<Control>, cx: Rc<AcceptCtx>) {
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
                    tracing::debug!(listener = %cx.name, used = activity.used.get(), "closing idle downstream connection");
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
struct Activity {
    /// Requests started on this connection.
    streams: std::cell::Cell<u64>,
    /// Requests the client gave up on (reset, went away) within a second of
    /// starting them, before their response: the HTTP/2 rapid-reset pattern.
    premature: std::cell::Cell<u64>,
    /// Signalled when the connection looks abusive.
    abuse: tokio::sync::Notify,
    in_flight: std::cell::Cell<usize>,
    last: std::cell::Cell<std::time::Instant>,
    /// A request arrived on this connection.
    used: std::cell::Cell<bool>,
    /// The connection speaks HTTP/2 (known from its first request).
    h2: std::cell::Cell<bool>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            streams: std::cell::Cell::new(0),
            premature: std::cell::Cell::new(0),
            abuse: tokio::sync::Notify::new(),
            in_flight: std::cell::Cell::new(0),
            last: std::cell::Cell::new(std::time::Instant::now()),
            used: std::cell::Cell::new(false),
            h2: std::cell::Cell::new(false),
        }
    }
}

struct ActivityGuard {
    activity: Rc<Activity>,
    started: std::time::Instant,
    /// The request's handler returned (its response went to hyper).
    completed: bool,
}

/// Close a connection once this many of its requests were reset prematurely,
/// if they are at least half of its requests (Envoy's rapid-reset rule).
const PREMATURE_RESET_MIN: u64 = 100;
const PREMATURE_RESET_WINDOW: Duration = Duration::from_secs(1);

impl Activity {
    fn begin(self: &Rc<Self>) -> ActivityGuard {
        self.used.set(true);
        self.streams.set(self.streams.get() + 1);
        self.in_flight.set(self.in_flight.get() + 1);
        ActivityGuard { activity: self.clone(), started: std::time::Instant::now(), completed: false }
    }

    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.last.get() + timeout)
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.in_flight.set(a.in_flight.get() - 1);
        let now = std::time::Instant::now();
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
