//! Per-worker upstream connection pools.
//!
//! Each worker thread keeps its own idle HTTP/1.1 connections and one HTTP/2
//! connection per endpoint, so the request path takes no lock. Connection
//! counts for circuit breaking are shared atomics on the cluster.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use sluice_filter::TlsInfo;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::cluster::{ClusterState, Endpoint};
use crate::error::{ErrorKind, ProxyError};
use crate::h1::{H1Conn, Io};

/// Spawns hyper's background tasks on the current worker (`spawn_local`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// How to wrap upstream connections in TLS.
pub struct UpstreamTls {
    /// The connector (root store, client certificate, ALPN).
    pub connector: tokio_rustls::TlsConnector,
    /// SNI and verified name; `None` means "the endpoint's host".
    pub server_name: Option<ServerName<'static>>,
}

/// A connection ready to take one request.
pub enum Conn {
    /// HTTP/1.1: exclusive until the response body ends.
    H1(Box<H1Conn>),
    /// HTTP/2: shared.
    H2(http2::SendRequest<ProxyBody>, ConnFacts),
}

impl Conn {
    /// What filters may read of the connection.
    pub fn facts(&self) -> &ConnFacts {
        match self {
            Conn::H1(c) => &c.facts,
            Conn::H2(_, f) => f,
        }
    }
}

/// What the filters of a request the connection carries may read of it:
/// `upstream.local_address`, and `upstream.tls_version` and the peer
/// certificate's facts when it is TLS. Known once, when it connected.
#[derive(Debug, Clone, Default)]
pub struct ConnFacts {
    /// The connection's local address.
    pub local: Option<SocketAddr>,
    /// Its TLS session, if TLS.
    pub tls: Option<Arc<TlsInfo>>,
}

struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
}

/// One endpoint's connections on this worker.
pub struct EndpointPool {
    idle: RefCell<Vec<Idle>>,
    h2: RefCell<Option<(http2::SendRequest<ProxyBody>, ConnFacts)>>,
    /// The cluster's `sluice_upstream_pool_overflow_total`.
    overflow: prometheus::IntCounter,
}

impl EndpointPool {
    fn new(cluster: &ClusterState) -> Self {
        EndpointPool {
            idle: RefCell::default(),
            h2: RefCell::default(),
            overflow: cluster.metrics.pool_overflow.clone(),
        }
    }

    /// Returns an HTTP/1.1 connection after its response ended cleanly. A
    /// full pool closes it, and counts that: a steady rate means
    /// `max_idle_per_endpoint` is below the concurrency the upstream sees.
    pub fn put_back(&self, conn: Box<H1Conn>, max_idle: usize) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < max_idle {
            idle.push(Idle { conn, since: crate::clock::now() });
        } else {
            self.overflow.inc();
        }
    }

    fn take_idle(&self, idle_timeout: Duration) -> Option<Box<H1Conn>> {
        let mut idle = self.idle.borrow_mut();
        let now = crate::clock::now();
        // Most recently used first; a connection the upstream closed (or
        // that has stray bytes) is dropped.
        while let Some(c) = idle.pop() {
            if now.saturating_duration_since(c.since) < idle_timeout && !c.conn.idle_unusable() {
                return Some(c.conn);
            }
        }
        None
    }

    fn reap(&self, idle_timeout: Duration) {
        self.idle.borrow_mut().retain(|c| c.since.elapsed() < idle_timeout && !c.conn.idle_unusable());
    }
}

thread_local! {
    /// Keyed by cluster id and endpoint address: internal keys, so a fast
    /// hash (no flooding to defend against), looked up on every request.
    static POOLS: RefCell<FxHashMap<(u64, SocketAddr), Rc<EndpointPool>>> = RefCell::new(FxHashMap::default());
}

/// This worker's pool for an endpoint of a cluster.
pub fn endpoint_pool(cluster: &ClusterState, ep: &Endpoint) -> Rc<EndpointPool> {
    POOLS.with(|p| {
        p.borrow_mut()
            .entry((cluster.id, ep.addr))
            .or_insert_with(|| Rc::new(EndpointPool::new(cluster)))
            .clone()
    })
}

/// Drops idle connections past their timeout, and pools of clusters that are gone.
pub fn reap(live: &dyn Fn(u64) -> Option<Duration>) {
    POOLS.with(|p| {
        p.borrow_mut().retain(|(id, _), pool| match live(*id) {
            Some(timeout) => {
                pool.reap(timeout);
                true
            }
            None => false,
        })
    });
}

/// Takes a connection to `ep`: an idle one, the shared HTTP/2 one, or a new one.
pub async fn checkout(
    cluster: &Arc<ClusterState>,
    ep: &Arc<Endpoint>,
    pool: &Rc<EndpointPool>,
) -> Result<Conn, ProxyError> {
    if cluster.is_h2() {
        let existing = pool.h2.borrow().as_ref().filter(|(s, _)| !s.is_closed()).cloned();
        if let Some((s, facts)) = existing {
            return Ok(Conn::H2(s, facts));
        }
    } else if let Some(s) = pool.take_idle(cluster.config.pool.idle_timeout) {
        return Ok(Conn::H1(s));
    }
    let conn = connect(cluster, ep).await?;
    if let Conn::H2(s, facts) = &conn {
        *pool.h2.borrow_mut() = Some((s.clone(), facts.clone()));
    }
    Ok(conn)
}

/// Opens a new connection, honouring the connection and pending-request limits.
///
/// Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is the cold path, and its
/// large state would otherwise be part of every request's future.
pub async fn connect(cluster: &Arc<ClusterState>, ep: &Arc<Endpoint>) -> Result<Conn, ProxyError> {
    Box::pin(connect_new(cluster, ep)).await
}

async fn connect_new(cluster: &Arc<ClusterState>, ep: &Arc<Endpoint>) -> Result<Conn, ProxyError> {
    let limits = &cluster.config.circuit_breaker;
    let b = &cluster.breaker;
    if b.connections.load(Ordering::Relaxed) >= limits.max_connections {
        cluster.metrics.rejected_connections.inc();
        return Err(ProxyError::upstream(ErrorKind::CircuitOpen, "max_connections reached"));
    }
    if b.pending.fetch_add(1, Ordering::Relaxed) >= limits.max_pending_requests {
        b.pending.fetch_sub(1, Ordering::Relaxed);
        cluster.metrics.rejected_pending.inc();
        return Err(ProxyError::upstream(ErrorKind::CircuitOpen, "max_pending_requests reached"));
    }
    let result = tokio::time::timeout(cluster.connect_timeout(), handshake(cluster, ep)).await;
    b.pending.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(Ok(conn)) => {
            cluster.metrics.connections.inc();
            Ok(conn)
        }
        Ok(Err(e)) => {
            cluster.metrics.connect_failures.inc();
            Err(e)
        }
        Err(_) => {
            cluster.metrics.connect_failures.inc();
            Err(ProxyError::upstream(
                ErrorKind::ConnectTimeout,
                format!("connect to {} timed out after {:?}", ep.addr, cluster.connect_timeout()),
            ))
        }
    }
}

async fn handshake(cluster: &Arc<ClusterState>, ep: &Arc<Endpoint>) -> Result<Conn, ProxyError> {
    let connect_err = |e: std::io::Error| {
        let err = ProxyError::upstream(ErrorKind::ConnectFailure, format!("connect to {}: {e}", ep.addr));
        match e.kind() {
            // Envoy's words for it (`upstream.transport_failure_reason`, and
            // in `response.code_details`).
            std::io::ErrorKind::ConnectionRefused => {
                err.with_transport_failure("delayed connect error: Connection refused")
            }
            _ => err,
        }
    };
    let tcp = TcpStream::connect(ep.addr).await.map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok();
    match &cluster.tls {
        None => establish(cluster, ep, Io::Tcp(tcp), ConnFacts { local, tls: None }).await,
        Some(tls) => {
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(ep.host.to_string()).map_err(|e| {
                    ProxyError::upstream(
                        ErrorKind::ConnectFailure,
                        format!("invalid server name {}: {e}", ep.host),
                    )
                })?,
            };
            let sni = match &name {
                ServerName::DnsName(d) => Some(d.as_ref().to_owned()),
                _ => None,
            };
            let stream = tls.connector.connect(name, tcp).await.map_err(|e| {
                ProxyError::upstream(
                    ErrorKind::ConnectFailure,
                    format!("tls handshake with {}: {e}", ep.addr),
                )
                .with_transport_failure(format!("TLS error: {e}"))
            })?;
            let info = sluice_tls::client_tls_info(stream.get_ref().1, sni.as_deref());
            let facts = ConnFacts { local, tls: Some(Arc::new(info)) };
            establish(cluster, ep, Io::Tls(Box::new(stream)), facts).await
        }
    }
}

async fn establish(
    cluster: &Arc<ClusterState>,
    ep: &Arc<Endpoint>,
    io: Io,
    facts: ConnFacts,
) -> Result<Conn, ProxyError> {
    let hs_err = |e: hyper::Error| {
        ProxyError::upstream(ErrorKind::ConnectFailure, format!("http handshake with {}: {e}", ep.addr))
    };
    let counter = ConnCounter::new(cluster.clone());
    if cluster.is_h2() {
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(io))
            .await
            .map_err(hs_err)?;
        let addr = ep.addr;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream h2 connection ended");
            }
            drop(counter);
        });
        Ok(Conn::H2(sender, facts))
    } else {
        Ok(Conn::H1(H1Conn::new(io, ep.addr, counter, facts)))
    }
}

/// Counts an open upstream connection for the circuit breaker.
pub(crate) struct ConnCounter(Arc<ClusterState>);

impl ConnCounter {
    fn new(c: Arc<ClusterState>) -> Self {
        c.breaker.connections.fetch_add(1, Ordering::Relaxed);
        ConnCounter(c)
    }
}

impl Drop for ConnCounter {
    fn drop(&mut self) {
        self.0.breaker.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
