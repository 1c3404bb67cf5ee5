//! Workers, listeners and downstream connections.
//!
//! Each worker is a thread running a tokio current-thread runtime inside a
//! `LocalSet`, with its own `SO_REUSEPORT` socket per listener; the kernel
//! spreads connections over the sockets, [`balance`] evens them out, and a
//! request never crosses threads. Workers take commands (add/remove a
//! listener, drain) over a channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_config::{HttpProtocol, Limits, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use self::conn::{Activity, Control, watch_connection};
use self::prefixed::Prefixed;
use crate::body::ProxyBody;
use crate::dataplane::LocalDataplane;
use crate::forward::{ConnInfo, Shared, handle};
use crate::h1::Io;
use crate::pool::LocalExec;

mod balance;
mod conn;
pub(crate) mod h1;
mod prefixed;

pub use balance::{Balance, Inbox};
pub use h1::{OnUpgrade, Upgraded};

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
        /// The binding's connection counts per worker.
        balance: Arc<Balance>,
        /// Where connections other workers accepted for this worker arrive.
        inbox: Inbox,
    },
    /// Stop accepting on a binding; its connections drain.
    Remove {
        /// Binding id.
        binding: u64,
    },
    /// A new dataplane is about to be in force: prepare its filters' per-worker
    /// state, then acknowledge.
    Warm(Arc<crate::dataplane::Dataplane>, tokio::sync::oneshot::Sender<()>),
    /// A new dataplane is in force: let go of the old one.
    Switched,
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
    let dataplane = Rc::new(LocalDataplane::new(&shared.dataplane));
    // Close idle pooled upstream connections and forget pools of removed clusters.
    let reaper_shared = shared.clone();
    let reaper_dataplane = dataplane.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let dp = reaper_dataplane.get(&reaper_shared.dataplane);
            crate::pool::reap(&|id| {
                dp.clusters.values().find(|c| c.id == id).map(|c| c.config.pool.idle_timeout)
            });
        }
    });
    let drain_timeout = loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(WorkerCmd::Add { name, binding, socket, config, tls, limit, balance, inbox }) => {
                    let listener = match TcpListener::from_std(socket) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listener = %name, error = %e, "cannot register listener socket");
                            continue;
                        }
                    };
                    let (stop_tx, stop_rx) = watch::channel(false);
                    accepting.insert(binding, stop_tx);
                    let metrics = &shared.metrics;
                    let ctx = AcceptCtx {
                        name: name.as_str().into(),
                        open: metrics.connections_active.with_label_values(&[name.as_str()]),
                        open_here: metrics
                            .worker_connections
                            .with_label_values(&[name.as_str(), index.to_string().as_str()]),
                        shared: shared.clone(),
                        dataplane: dataplane.clone(),
                        config: Rc::new(*config),
                        tls,
                        limit,
                        active: active.clone(),
                        idle_done: idle_done.clone(),
                        drain: drain.clone(),
                        worker: index,
                        balance,
                    };
                    tokio::task::spawn_local(accept_loop(listener, ctx, inbox, stop_rx));
                }
                Some(WorkerCmd::Warm(dp, done)) => {
                    for (_, f) in &dp.filters {
                        f.prepare_worker();
                    }
                    let _ = done.send(());
                }
                Some(WorkerCmd::Switched) => dataplane.refresh(&shared.dataplane),
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
    /// `sluice_downstream_connections_active` of the listener.
    open: prometheus::IntGauge,
    /// `sluice_downstream_connections_per_worker` of the listener and this worker.
    open_here: prometheus::IntGauge,
    shared: Arc<Shared>,
    dataplane: Rc<LocalDataplane>,
    config: Rc<Listener>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    limit: Arc<Semaphore>,
    active: Rc<std::cell::Cell<usize>>,
    idle_done: Rc<tokio::sync::Notify>,
    drain: watch::Receiver<Option<Duration>>,
    /// This worker's index.
    worker: usize,
    balance: Arc<Balance>,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(
    listener: TcpListener,
    cx: AcceptCtx,
    mut inbox: Inbox,
    mut stop: watch::Receiver<bool>,
) {
    let cx = Rc::new(cx);
    let total = cx.shared.metrics.connections_total.with_label_values(&[&cx.name]);
    let rebalanced = cx.shared.metrics.connections_rebalanced.with_label_values(&[&cx.name]);
    let mut inbox_open = true;
    loop {
        let permit = tokio::select! {
            p = cx.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return drain_inbox(&mut inbox, &cx).await,
        };
        let (stream, remote, permit) = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, remote)) => {
                    total.inc();
                    let Some(to) = cx.balance.assign(cx.worker) else {
                        spawn_serve(stream, remote, permit, &cx);
                        continue;
                    };
                    // Deregistered here, registered again by the worker it goes to.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            cx.balance.closed(to);
                            tracing::debug!(listener = %cx.name, %remote, error = %e, "cannot hand off a connection");
                            continue;
                        }
                    };
                    match cx.balance.hand_off(to, cx.worker, balance::Handoff { stream, remote, permit }) {
                        Ok(()) => {
                            rebalanced.inc();
                            continue;
                        }
                        Err(h) => (h.stream, h.remote, h.permit),
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %cx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            h = inbox.0.recv(), if inbox_open => match h {
                Some(h) => {
                    drop(permit);
                    (h.stream, h.remote, h.permit)
                }
                None => {
                    inbox_open = false;
                    continue;
                }
            },
            _ = stop.changed() => return drain_inbox(&mut inbox, &cx).await,
        };
        serve_handoff(stream, remote, permit, &cx);
    }
}

/// The binding stopped: connections already handed to this worker are still
/// served. Closed first, then received until empty: `recv` (unlike
/// `try_recv`) also waits for a hand-off another worker is sending at this
/// moment. Returning before it arrived (or without draining, as the wait for a
/// connection permit once did) dropped that connection with its request
/// unread, and the client got a reset.
async fn drain_inbox(inbox: &mut Inbox, cx: &Rc<AcceptCtx>) {
    inbox.0.close();
    while let Some(h) = inbox.0.recv().await {
        serve_handoff(h.stream, h.remote, h.permit, cx);
    }
}

/// Serves a connection counted against this worker already (handed over, or
/// handed back).
fn serve_handoff(
    stream: std::net::TcpStream,
    remote: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    cx: &Rc<AcceptCtx>,
) {
    match TcpStream::from_std(stream) {
        Ok(stream) => spawn_serve(stream, remote, permit, cx),
        Err(e) => {
            cx.balance.closed(cx.worker);
            tracing::warn!(listener = %cx.name, %remote, error = %e, "cannot register a connection");
        }
    }
}

/// Serves an accepted connection on this worker, counted in its [`Balance`].
fn spawn_serve(
    stream: TcpStream,
    remote: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    cx: &Rc<AcceptCtx>,
) {
    cx.open.inc();
    cx.open_here.inc();
    cx.active.set(cx.active.get() + 1);
    let cx = cx.clone();
    // Each poll of a connection's task reads the clock once (see `clock`).
    tokio::task::spawn_local(crate::clock::Scoped::new(async move {
        serve_connection(stream, remote, &cx).await;
        cx.balance.closed(cx.worker);
        drop(permit);
        cx.open.dec();
        cx.open_here.dec();
        cx.active.set(cx.active.get() - 1);
        cx.idle_done.notify_waiters();
    }));
}

fn h2_builder(limits: &Limits) -> http2::Builder<LocalExec> {
    let mut b = http2::Builder::new(LocalExec);
    b.timer(TokioTimer::new())
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
            dataplane: cx.dataplane.clone(),
            listener: cx.name.clone(),
            remote,
            local,
            id,
            tls,
            remote_ip: crate::headers::ip_value(remote.ip()),
            deadline_timer: std::cell::Cell::new(None),
        })
    };
    let protocols = &cx.config.protocols;
    let h1 = protocols.contains(&HttpProtocol::Http1);
    let h2 = protocols.contains(&HttpProtocol::Http2);
    let (io, conn, h2_now) = match &cx.tls {
        // Cleartext: HTTP/1.1, or HTTP/2 with prior knowledge (the preface says which).
        None => (Io::Tcp(stream), conn(None), !h1),
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
            // ALPN decides; no ALPN means HTTP/1.1.
            let alpn_h2 = session.alpn_protocol() == Some(b"h2");
            let conn = conn(Some(Arc::new(crate::tls::tls_info(session))));
            (Io::TlsServer(Box::new(tls_stream)), conn, alpn_h2)
        }
    };
    // Timers and signals live in a watcher task, so waking the connection for
    // its requests polls the codec and nothing else (no timer re-arm, no
    // Notify registrations per wakeup).
    let activity = Rc::new(Activity::default());
    let control = Rc::new(Control::default());
    if cx.drain.borrow().is_some() {
        control.shutdown.set(true);
    }
    let watcher = tokio::task::spawn_local(watch_connection(activity.clone(), control.clone(), cx.clone()));
    let h2_io = if h2_now {
        Some((io, bytes::BytesMut::new()))
    } else {
        let h2c = h2 && cx.tls.is_none();
        h1::serve(io, conn.clone(), cx, &activity, &control, h2c).await
    };
    if let Some((io, read)) = h2_io {
        activity.h2.set(true);
        run_h2(Prefixed::new(read.freeze(), io), conn, cx, &activity, &control).await;
    }
    watcher.abort();
}

async fn run_h2<T>(
    io: T,
    conn: Rc<ConnInfo>,
    cx: &Rc<AcceptCtx>,
    activity: &Rc<Activity>,
    control: &Rc<Control>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let act = activity.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let conn = conn.clone();
        let mut guard = act.begin();
        // Boxed: hyper moves each stream's future into a task of its own, and a
        // box is one allocation against several copies of the large future.
        // Allocated first and written second, so that the future is built in
        // the box rather than on the stack and copied (`Box::pin(handle(..))`
        // copies all ~6.7 KiB).
        let start = guard.started();
        let fut =
            Box::into_pin(Box::write(Box::new_uninit(), handle(req.map(ProxyBody::incoming), conn, start)));
        async move {
            let r = fut.await;
            guard.completed = true;
            // The request stays active until its response body ends, so the
            // idle timeout never cuts a response that streams.
            r.map(|resp| resp.map(|body| body.on_end(move |_, _| drop(guard))))
        }
    });
    let served = h2_builder(&cx.config.limits).serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
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
    if let Some(Err(e)) = result {
        tracing::debug!(listener = %cx.name, error = %e, "downstream connection error");
    }
}
