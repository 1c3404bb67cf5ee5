//! The request path: normalize, route, run filters, forward with retries and
//! timeouts, and answer. Errors become responses in [`crate::error`] only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, HeaderValue, LOCATION, USER_AGENT};
use http::{Method, Request, Response, StatusCode, Uri, Version, request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sluice_config::{AccessLogFormat, LbPolicy, Redirect};
use sluice_filter::{LocalResponse, StreamInfo, TlsInfo};

use crate::accesslog::RequestLog;
use crate::body::{BodyEnd, ProxyBody};
use crate::chain::ChainRun;
use crate::cluster::{ClusterState, Endpoint, HashKey, Outcome, Picker};
use crate::dataplane::{Dataplane, ListenerRuntime};
use crate::error::{ErrorKind, ProxyError, Side, error_response};
use crate::headers;
use crate::metrics::{Metrics, RouteMetrics};
use crate::normalize::normalize_path;
use crate::pool::{self, Conn};
use crate::router::{CompiledRoute, Forward, RouteAction};

/// State shared by every worker.
pub struct Shared {
    /// The dataplane in force.
    pub dataplane: arc_swap::ArcSwap<Dataplane>,
    /// Metrics.
    pub metrics: Metrics,
    /// Set when draining: new requests get `connection: close`.
    pub draining: AtomicBool,
    /// TLS handshake metrics.
    pub tls_metrics: Option<crate::tls::TlsMetrics>,
}

/// One downstream connection.
pub struct ConnInfo {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Listener name.
    pub listener: Arc<str>,
    /// Downstream peer.
    pub remote: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Connection id.
    pub id: u64,
    /// TLS facts, for TLS listeners.
    pub tls: Option<TlsInfo>,
}

thread_local! {
    static PICKER: std::cell::RefCell<Picker> = std::cell::RefCell::new(Picker::default());
}

/// Handles one downstream request. Never fails: errors become responses.
pub async fn handle(req: Request<Incoming>, conn: Rc<ConnInfo>) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let dp = conn.shared.dataplane.load_full();
    let grpc = is_grpc(req.headers());
    let format = dp.snapshot.config().access_log.format;
    let mut log = RequestLog {
        request_id: String::new(),
        listener: conn.listener.clone(),
        downstream: conn.remote,
        method: req.method().clone(),
        authority: String::new(),
        path: String::new(),
        protocol: req.version(),
        route: None,
        cluster: None,
        upstream: None,
        attempts: 0,
        status: 0,
        reason: None,
        start_wall: SystemTime::now(),
        start,
        upstream_us: None,
        user_agent: None,
    };
    let Some(listener) = dp.listeners.get(&*conn.listener).cloned() else {
        let err = ProxyError::new(Side::Internal, ErrorKind::NoRoute, "listener removed");
        return Ok(finish_error(&err, grpc, &conn.shared.metrics, format, log, None));
    };
    let mut metrics_slot: Option<Arc<RouteMetrics>> = None;
    // Boxed once so the large request future is never moved.
    let result = Box::pin(proxy(req, &conn, &dp, &listener, &mut log, &mut metrics_slot)).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => finish_error(&err, grpc, &conn.shared.metrics, format, log, metrics_slot),
    };
    if conn.shared.draining.load(Ordering::Relaxed) && resp.version() != Version::HTTP_2 {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What runs when the response body ends: metrics, the filters' `on_log`, the
/// access log line. Cheap when the access log is off.
struct Completion {
    metrics: Option<Arc<RouteMetrics>>,
    status: u16,
    start: Instant,
    log: Option<Box<RequestLog>>,
    format: AccessLogFormat,
}

impl Completion {
    fn new(
        log: &RequestLog,
        format: AccessLogFormat,
        metrics: Option<Arc<RouteMetrics>>,
        status: u16,
    ) -> Self {
        let start = log.start;
        let log = (format != AccessLogFormat::Off).then(|| {
            let mut l = Box::new(log.clone());
            l.status = status;
            l
        });
        Completion { metrics, status, start, log, format }
    }

    fn done(self, end: BodyEnd, bytes: u64) {
        if let Some(m) = &self.metrics {
            m.record(self.status, self.start.elapsed().as_secs_f64());
        }
        if let Some(l) = self.log {
            l.emit(self.format, bytes, end == BodyEnd::Complete);
        }
    }
}

/// Builds the error response, counting and logging it.
fn finish_error(
    err: &ProxyError,
    grpc: bool,
    metrics: &Metrics,
    format: AccessLogFormat,
    mut log: RequestLog,
    route_metrics: Option<Arc<RouteMetrics>>,
) -> Response<ProxyBody> {
    let resp = error_response(err, grpc);
    metrics.local_replies.with_label_values(&[err.reason()]).inc();
    match err.side {
        Side::Upstream | Side::Internal => tracing::warn!(
            request_id = %log.request_id, route = ?log.route, cluster = ?log.cluster, error = %err, "request failed"
        ),
        Side::Downstream => tracing::debug!(request_id = %log.request_id, error = %err, "request rejected"),
    }
    log.reason = Some(err.reason());
    let done = Completion::new(&log, format, route_metrics, err.status().as_u16());
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.on_end(move |end, n| done.done(end, n)))
}

/// The per-request view of where the request goes.
struct Target<'a> {
    authority: String,
    path: String,
    query: Option<String>,
    route: &'a Arc<CompiledRoute>,
    /// The listener's `trust_forwarded_headers`.
    trust_forwarded: bool,
}

async fn proxy(
    mut req: Request<Incoming>,
    conn: &Rc<ConnInfo>,
    dp: &Arc<Dataplane>,
    listener: &Arc<ListenerRuntime>,
    log: &mut RequestLog,
    metrics_slot: &mut Option<Arc<RouteMetrics>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let version = req.version();
    headers::check_framing(req.headers(), version)?;
    // The HTTP/1.1 codec enforces this itself; HTTP/2 only bounds the bytes.
    if req.headers().len() > listener.config.limits.max_request_headers {
        let detail = "too many request headers";
        return Err(ProxyError::new(Side::Downstream, ErrorKind::HeadersTooLarge, detail));
    }
    let upgrade = if version != Version::HTTP_2 && headers::is_upgrade(req.headers()) {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    let request_id = headers::request_id(&mut parts.headers);
    let log_on = dp.snapshot.config().access_log.format != AccessLogFormat::Off;
    log.request_id.clone_from(&request_id);
    if log_on {
        log.user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    }

    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => match parts.headers.get(HOST).and_then(|h| h.to_str().ok()) {
            Some(h) if !h.is_empty() => h.to_owned(),
            _ if version == Version::HTTP_10 => String::new(),
            _ => return Err(ProxyError::bad_request("missing host")),
        },
    };
    let raw_path = parts.uri.path();
    let path = normalize_path(raw_path).ok_or_else(|| ProxyError::bad_request("invalid path"))?.into_owned();
    let query = parts.uri.query().map(str::to_owned);
    if log_on {
        log.authority.clone_from(&authority);
        log.path = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
    }

    let router = &listener.router;
    let route = router.route(&authority, &parts.method, &path, query.as_deref(), &parts.headers).ok_or_else(
        || ProxyError::new(Side::Downstream, ErrorKind::NoRoute, format!("no route for {authority}{path}")),
    )?;
    log.route = Some(route.name.clone());
    *metrics_slot = Some(route.local_metrics.clone());

    let https = conn.tls.is_some();
    let trust_forwarded = listener.config.trust_forwarded_headers;
    let mut target = Target { authority, path, query, route, trust_forwarded };

    // Filters see the normalized, absolute form of the request.
    let mut chain = None;
    if !route.chain.is_empty() {
        let mut info = StreamInfo::new(
            request_id.clone(),
            conn.id,
            conn.remote,
            conn.local,
            conn.listener.clone(),
            version,
        );
        info.tls = conn.tls.clone();
        *info.route_name.borrow_mut() = Some(route.name.clone());
        let mut run = ChainRun::new(&route.chain, info, listener.config.limits.max_buffered_body_bytes);
        parts.uri = absolute_uri(https, &target)?;
        parts.headers.remove(HOST);
        let end_of_stream = http_body::Body::is_end_stream(&body);
        if let Some(local) = run.request_headers(&mut parts, end_of_stream).await? {
            let resp = run.local_response(local, version).await;
            return Ok(finish_local(resp, log, dp, route.local_metrics.clone(), Some(run)));
        }
        if run.info().take_route_cache_cleared() {
            target.authority = parts.uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
            let p = parts.uri.path();
            target.path = normalize_path(p)
                .ok_or_else(|| ProxyError::bad_request("invalid path set by filter"))?
                .into_owned();
            target.query = parts.uri.query().map(str::to_owned);
            let rerouted = router
                .route(
                    &target.authority,
                    &parts.method,
                    &target.path,
                    target.query.as_deref(),
                    &parts.headers,
                )
                .ok_or_else(|| {
                    ProxyError::new(Side::Downstream, ErrorKind::NoRoute, "no route after filters")
                })?;
            target.route = rerouted;
            log.route = Some(rerouted.name.clone());
            *run.info().route_name.borrow_mut() = Some(rerouted.name.clone());
        }
        chain = Some(run);
    }
    let route = target.route;

    match &route.action {
        RouteAction::Direct { status, body: text, content_type } => {
            let mut resp = Response::new(ProxyBody::full(text.clone()));
            *resp.status_mut() = *status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
            }
            route.response_edits.apply(resp.headers_mut());
            Ok(finish_filtered_local(resp, log, dp, route.local_metrics.clone(), chain).await)
        }
        RouteAction::Redirect(r) => {
            let resp = redirect(r, https, &target)?;
            Ok(finish_filtered_local(resp, log, dp, route.local_metrics.clone(), chain).await)
        }
        RouteAction::Forward(fwd) => {
            let t = fwd.pick();
            log.cluster = Some(t.cluster.name.clone());
            *metrics_slot = Some(t.metrics.clone());
            if let Some(run) = &chain {
                *run.info().cluster_name.borrow_mut() = Some(t.cluster.name.clone());
            }
            let upstream_req =
                UpstreamRequest::prepare(parts, conn, &target, fwd, &t.cluster, upgrade.is_some(), https)?;
            let body = match &mut chain {
                Some(run) => run.wrap_request_body(body),
                None => ProxyBody::incoming(body),
            };
            forward(
                upstream_req,
                body,
                conn,
                dp,
                fwd,
                &t.cluster,
                t.metrics.clone(),
                route,
                log,
                chain,
                upgrade,
            )
            .await
        }
    }
}

fn absolute_uri(https: bool, t: &Target<'_>) -> Result<Uri, ProxyError> {
    let pq = match &t.query {
        Some(q) => format!("{}?{q}", t.path),
        None => t.path.clone(),
    };
    let authority = if t.authority.is_empty() { "localhost" } else { &t.authority };
    Uri::builder()
        .scheme(if https { "https" } else { "http" })
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| ProxyError::bad_request(format!("invalid uri: {e}")))
}

fn redirect(r: &Redirect, https: bool, t: &Target<'_>) -> Result<Response<ProxyBody>, ProxyError> {
    let scheme = r.scheme.as_deref().unwrap_or(if https { "https" } else { "http" });
    let host = r.host.as_deref().unwrap_or(&t.authority);
    let mut path = match (&r.path, &r.prefix_rewrite, t.route.matched_prefix()) {
        (Some(p), _, _) => p.clone(),
        (None, Some(rw), Some(prefix)) => format!("{rw}{}", t.path.strip_prefix(prefix).unwrap_or(&t.path)),
        _ => t.path.clone(),
    };
    if !r.strip_query
        && let Some(q) = &t.query
    {
        path.push('?');
        path.push_str(q);
    }
    let location = HeaderValue::from_str(&format!("{scheme}://{host}{path}"))
        .map_err(|_| ProxyError::bad_request("invalid redirect location"))?;
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    resp.headers_mut().insert(LOCATION, location);
    Ok(resp)
}

/// Runs response filters on a proxy-made response, then finishes it.
async fn finish_filtered_local(
    resp: Response<ProxyBody>,
    log: &mut RequestLog,
    dp: &Dataplane,
    metrics: Arc<RouteMetrics>,
    chain: Option<ChainRun>,
) -> Response<ProxyBody> {
    match chain {
        None => finish_local(resp, log, dp, metrics, None),
        Some(mut run) => {
            let resp = run.filter_local(resp).await;
            finish_local(resp, log, dp, metrics, Some(run))
        }
    }
}

fn finish_local(
    resp: Response<ProxyBody>,
    log: &mut RequestLog,
    dp: &Dataplane,
    metrics: Arc<RouteMetrics>,
    chain: Option<ChainRun>,
) -> Response<ProxyBody> {
    let status = resp.status().as_u16();
    log.status = status;
    let done = Completion::new(log, dp.snapshot.config().access_log.format, Some(metrics), status);
    let (parts, body) = resp.into_parts();
    let head = chain.as_ref().map(|_| crate::chain::LogHead::from_response(&parts));
    let body = body.on_end(move |end, n| {
        if let Some(mut run) = chain {
            run.log(head.as_ref());
        }
        done.done(end, n);
    });
    Response::from_parts(parts, body)
}

/// The upstream request template; cloned for each attempt.
pub(crate) struct UpstreamRequest {
    method: Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl UpstreamRequest {
    fn prepare(
        mut parts: request::Parts,
        conn: &ConnInfo,
        target: &Target<'_>,
        fwd: &Forward,
        cluster: &ClusterState,
        upgrade: bool,
        https: bool,
    ) -> Result<Self, ProxyError> {
        let h = &mut parts.headers;
        // Naming `x-request-id` in `connection` must not strip the id the proxy keeps.
        let request_id_value = h.get(&headers::X_REQUEST_ID).cloned();
        headers::strip_hop_by_hop(h, upgrade);
        if let Some(v) = request_id_value {
            h.insert(headers::X_REQUEST_ID.clone(), v);
        }
        target.route.request_edits.apply(h);
        headers::set_forwarded(h, conn.remote.ip(), https, target.trust_forwarded);
        let request_id = h.get(&headers::X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        headers::propagate_traceparent(h, &request_id);

        let path = match (&fwd.prefix_rewrite, target.route.matched_prefix()) {
            (Some(rw), Some(prefix)) => {
                let rest = target.path.strip_prefix(prefix).unwrap_or(&target.path);
                let mut p = String::with_capacity(rw.len() + rest.len());
                p.push_str(rw);
                if rw.ends_with('/') && rest.starts_with('/') {
                    p.push_str(&rest[1..]);
                } else {
                    p.push_str(rest);
                }
                p
            }
            _ => target.path.clone(),
        };
        let authority = match &fwd.host_rewrite {
            Some(a) => a.as_str().to_owned(),
            None => target.authority.clone(),
        };
        let pq = match &target.query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let (uri, version) = if cluster.is_h2() {
            h.remove(HOST);
            let scheme = if cluster.tls.is_some() { "https" } else { "http" };
            let authority = if authority.is_empty() { "localhost".to_owned() } else { authority };
            let uri = Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query(pq)
                .build()
                .map_err(|e| ProxyError::bad_request(format!("invalid uri: {e}")))?;
            (uri, Version::HTTP_2)
        } else {
            if !authority.is_empty() {
                let v = HeaderValue::from_str(&authority)
                    .map_err(|_| ProxyError::bad_request("invalid authority"))?;
                h.insert(HOST, v);
            }
            let uri = Uri::try_from(pq).map_err(|e| ProxyError::bad_request(format!("invalid path: {e}")))?;
            (uri, Version::HTTP_11)
        };
        Ok(UpstreamRequest { method: parts.method, uri, version, headers: parts.headers })
    }

    fn build(&self, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }

    fn into_request(self, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// A body that can be sent again on a retry.
enum Replay {
    /// Not retriable: streamed once.
    Once(Option<ProxyBody>),
    /// Retriable: kept in memory.
    Bytes(Bytes),
}

impl Replay {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            Replay::Once(b) => b.take(),
            Replay::Bytes(b) => Some(ProxyBody::full(b.clone())),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Replay::Bytes(_))
    }
}

/// One retry in flight, counted against the cluster's `max_retries`.
struct RetrySlot(Arc<ClusterState>);

impl RetrySlot {
    fn take(cluster: &Arc<ClusterState>) -> Self {
        cluster.breaker.retries.fetch_add(1, Ordering::Relaxed);
        RetrySlot(cluster.clone())
    }
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.breaker.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements in-flight counters when the exchange ends.
struct InFlight {
    cluster: Arc<ClusterState>,
    endpoint: Arc<Endpoint>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.breaker.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    template: UpstreamRequest,
    body: ProxyBody,
    conn: &Rc<ConnInfo>,
    dp: &Arc<Dataplane>,
    fwd: &Forward,
    cluster: &Arc<ClusterState>,
    metrics: Arc<RouteMetrics>,
    route: &Arc<CompiledRoute>,
    log: &mut RequestLog,
    mut chain: Option<ChainRun>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let retry = fwd.retry.as_deref();
    if let Some(r) = retry {
        r.budget.deposit();
    }
    let idempotent = matches!(
        template.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let mut replay = match retry {
        Some(r)
            if r.policy.attempts > 0
                && downstream_upgrade.is_none()
                && (idempotent || r.policy.retry_non_idempotent) =>
        {
            if http_body::Body::is_end_stream(&body) {
                Replay::Bytes(Bytes::new())
            } else {
                let small = template
                    .headers
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|n| n <= r.policy.max_body_bytes);
                if small {
                    let collected = body.collect().await.map_err(|e| {
                        ProxyError::new(Side::Downstream, ErrorKind::BadRequest, format!("request body: {e}"))
                    })?;
                    Replay::Bytes(collected.to_bytes())
                } else {
                    Replay::Once(Some(body))
                }
            }
        }
        _ => Replay::Once(Some(body)),
    };
    let hash = hash_key(cluster, &template.headers, conn.remote);
    let max_attempts = 1 + retry.map_or(0, |r| r.policy.attempts);
    let per_try = retry.and_then(|r| r.policy.per_try_timeout);
    let deadline = fwd.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut template = Some(template);
    let mut last_endpoint: Option<Arc<Endpoint>> = None;
    // Held from a retry's admission until its attempt ends (`max_retries`).
    let mut retry_slot: Option<RetrySlot> = None;
    let mut attempt = 0u32;

    let (resp, sender, inflight) = loop {
        attempt += 1;
        log.attempts = attempt;
        let breaker = &cluster.config.circuit_breaker;
        if cluster.breaker.requests.load(Ordering::Relaxed) >= breaker.max_requests {
            cluster.metrics.rejected_requests.inc();
            return Err(ProxyError::upstream(ErrorKind::CircuitOpen, "max_requests reached"));
        }
        let endpoint =
            PICKER.with(|p| p.borrow_mut().pick(cluster, hash, last_endpoint.as_deref())).ok_or_else(
                || ProxyError::upstream(ErrorKind::NoHealthyUpstream, format!("cluster {}", cluster.name)),
            )?;
        log.upstream = Some(endpoint.addr);
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        cluster.breaker.requests.fetch_add(1, Ordering::Relaxed);
        let inflight = InFlight { cluster: cluster.clone(), endpoint: endpoint.clone() };
        let last_attempt = attempt >= max_attempts || !replay.replayable();
        let Some(body) = replay.take() else {
            return Err(ProxyError::new(
                Side::Internal,
                ErrorKind::UpstreamReset,
                "request body already sent",
            ));
        };
        let req = match (last_attempt, template.as_ref()) {
            (true, _) => match template.take() {
                Some(t) => t.into_request(body),
                None => return Err(ProxyError::new(Side::Internal, ErrorKind::UpstreamReset, "no request")),
            },
            (false, Some(t)) => t.build(body),
            (false, None) => {
                return Err(ProxyError::new(Side::Internal, ErrorKind::UpstreamReset, "no request"));
            }
        };
        let started = Instant::now();
        let send = Box::pin(send_request(cluster, &endpoint, req));
        let result = match (per_try, deadline) {
            (Some(pt), Some(dl)) => {
                let until = (tokio::time::Instant::now() + pt).min(dl);
                tokio::time::timeout_at(until, send).await
            }
            (Some(pt), None) => tokio::time::timeout(pt, send).await,
            (None, Some(dl)) => tokio::time::timeout_at(dl, send).await,
            (None, None) => Ok(send.await),
        };
        drop(retry_slot.take());
        let elapsed = started.elapsed();
        cluster.metrics.latency.observe(elapsed.as_secs_f64());
        // Set when the retry was already admitted (budget and retry breaker).
        let mut admitted = false;
        let err = match result {
            Ok(Ok((resp, sender))) => {
                let status = resp.status().as_u16();
                let outcome = match status {
                    502..=504 => Outcome::GatewayError,
                    500..=599 => Outcome::ServerError,
                    _ => Outcome::Success,
                };
                cluster.record_outcome(&endpoint, outcome);
                let retry_it = !last_attempt && retry.is_some_and(|r| r.retry_status(status));
                // A retry refused by the budget or the retry breaker passes the
                // upstream's own answer through (not a proxy-made 502).
                if !retry_it || !retry.is_some_and(|r| admit_retry(cluster, r)) {
                    log.upstream_us = Some(elapsed.as_micros() as u64);
                    break (resp, sender, inflight);
                }
                admitted = true;
                ProxyError::upstream(ErrorKind::UpstreamProtocol, format!("retriable status {status}"))
            }
            Ok(Err(e)) => {
                // A failing request body is the downstream's fault and an open
                // circuit breaker a local overflow: neither is the endpoint's.
                if e.side == Side::Upstream && e.kind != ErrorKind::CircuitOpen {
                    cluster.record_outcome(&endpoint, Outcome::GatewayError);
                }
                let retriable = retry.is_some_and(|r| match e.kind {
                    ErrorKind::ConnectFailure | ErrorKind::ConnectTimeout => r.retry_connect_failure(),
                    ErrorKind::UpstreamReset | ErrorKind::UpstreamProtocol => r.retry_reset(),
                    _ => false,
                });
                if last_attempt || !retriable {
                    return Err(e);
                }
                e
            }
            Err(_) => {
                cluster.record_outcome(&endpoint, Outcome::GatewayError);
                let timed_out_overall = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                let e = ProxyError::upstream(
                    ErrorKind::UpstreamTimeout,
                    format!("upstream {} timed out", endpoint.addr),
                );
                if last_attempt || timed_out_overall || !retry.is_some_and(|r| r.retry_reset()) {
                    return Err(e);
                }
                e
            }
        };
        drop(inflight);
        // Retry: budget, retry circuit breaker, backoff.
        let Some(r) = retry else { return Err(err) };
        if !admitted && !admit_retry(cluster, r) {
            return Err(err);
        }
        cluster.metrics.retries.inc();
        tracing::debug!(attempt, error = %err, "retrying upstream request");
        retry_slot = Some(RetrySlot::take(cluster));
        let wait = crate::retry::backoff(&r.policy.backoff, attempt);
        match deadline {
            Some(dl) => tokio::time::sleep_until((tokio::time::Instant::now() + wait).min(dl)).await,
            None => tokio::time::sleep(wait).await,
        }
        last_endpoint = Some(endpoint);
    };

    let status = resp.status();
    let mut resp = resp;
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream_upgrade
    {
        let up = hyper::upgrade::on(&mut resp);
        tokio::task::spawn_local(async move {
            let _keep = inflight;
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let mut d = TokioIo::new(d);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        parts.version = Version::HTTP_11;
        log.status = 101;
        return Ok(finish_local(Response::from_parts(parts, ProxyBody::empty()), log, dp, metrics, None));
    }

    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    route.response_edits.apply(&mut parts.headers);
    parts.version = if log.protocol == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let max_idle = cluster.config.pool.max_idle_per_endpoint;
    let pool_ret = sender.map(|(pool, s)| {
        move |end: BodyEnd| {
            if end == BodyEnd::Complete {
                pool.put_back(s, max_idle);
            }
        }
    });
    let mut body = ProxyBody::incoming(body);
    if let Some(run) = &mut chain {
        let end_of_stream = http_body::Body::is_end_stream(&body);
        match run.response_headers(&mut parts, end_of_stream).await {
            Ok(None) => {}
            Ok(Some(local)) => {
                drop(body);
                let resp = run.local_response(local, log.protocol).await;
                return Ok(finish_local(resp, log, dp, metrics, chain));
            }
            Err(e) => return Err(e),
        }
        body = run.wrap_response_body(body);
    }
    let status = parts.status.as_u16();
    log.status = status;
    let done = Completion::new(log, dp.snapshot.config().access_log.format, Some(metrics), status);
    let head = chain.as_ref().map(|_| crate::chain::LogHead::from_response(&parts));
    let body = body.on_end(move |end, n| {
        if let Some(f) = pool_ret {
            f(end);
        }
        drop(inflight);
        if let Some(mut run) = chain {
            run.log(head.as_ref());
        }
        done.done(end, n);
    });
    Ok(Response::from_parts(parts, body))
}

/// Takes a retry from the route's budget and the cluster's retry breaker;
/// counts a refusal.
fn admit_retry(cluster: &ClusterState, r: &crate::router::CompiledRetry) -> bool {
    let ok = cluster.breaker.retries.load(Ordering::Relaxed) < cluster.config.circuit_breaker.max_retries
        && r.budget.try_withdraw();
    if !ok {
        cluster.metrics.retry_budget_exhausted.inc();
    }
    ok
}

fn hash_key(cluster: &ClusterState, h: &http::HeaderMap, remote: SocketAddr) -> Option<HashKey> {
    let LbPolicy::RingHash(on) = &cluster.config.lb else { return None };
    if let Some(name) = &on.header {
        return h.get(name.as_str()).map(|v| HashKey(crate::cluster::hash_bytes(v.as_bytes())));
    }
    if let Some(cookie) = &on.cookie {
        for v in h.get_all(COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            for kv in s.split(';') {
                if let Some((k, val)) = kv.trim().split_once('=')
                    && k == cookie
                {
                    return Some(HashKey(crate::cluster::hash_bytes(val.as_bytes())));
                }
            }
        }
        return None;
    }
    on.source_ip.then(|| HashKey(crate::cluster::hash_bytes(remote.ip().to_string().as_bytes())))
}

/// Picks an endpoint with this worker's balancer.
pub(crate) fn pick_endpoint(
    cluster: &ClusterState,
    hash: Option<HashKey>,
    avoid: Option<&Endpoint>,
) -> Option<Arc<Endpoint>> {
    PICKER.with(|p| p.borrow_mut().pick(cluster, hash, avoid))
}

pub(crate) type Sender = Option<(Rc<pool::EndpointPool>, hyper::client::conn::http1::SendRequest<ProxyBody>)>;

/// Sends one attempt; an HTTP/1.1 sender comes back for the pool.
pub(crate) async fn send_request(
    cluster: &Arc<ClusterState>,
    endpoint: &Arc<Endpoint>,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Sender), ProxyError> {
    let pool = pool::endpoint_pool(cluster, endpoint);
    match pool::checkout(cluster, endpoint, &pool).await? {
        Conn::H1(mut s) => match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, Some((pool, s)))),
            Err(mut e) => match e.take_message() {
                // The pooled connection died before the request went out: use a fresh one.
                Some(req) => match pool::connect(cluster, endpoint).await? {
                    Conn::H1(mut s) => {
                        let resp = s.send_request(req).await.map_err(upstream_error)?;
                        Ok((resp, Some((pool, s))))
                    }
                    Conn::H2(mut s) => Ok((s.send_request(req).await.map_err(upstream_error)?, None)),
                },
                None => Err(upstream_error(e.into_error())),
            },
        },
        Conn::H2(mut s) => {
            s.ready().await.map_err(upstream_error)?;
            Ok((s.send_request(req).await.map_err(upstream_error)?, None))
        }
    }
}

fn upstream_error(e: hyper::Error) -> ProxyError {
    // The request body we were streaming failed (e.g. a malformed chunk from
    // downstream): a bad request, not an upstream failure.
    if e.is_user() && std::error::Error::source(&e).is_some() {
        return ProxyError::new(Side::Downstream, ErrorKind::BadRequest, format!("request body: {e}"));
    }
    let kind = if e.is_parse() || e.is_parse_status() {
        ErrorKind::UpstreamProtocol
    } else {
        ErrorKind::UpstreamReset
    };
    ProxyError::upstream(kind, e.to_string())
}

/// A proxy-made response for a filter's local reply.
pub(crate) fn local_reply(local: LocalResponse, version: Version) -> Response<ProxyBody> {
    let mut resp = if let Some(code) = local.grpc_status {
        let mut r = Response::new(ProxyBody::empty());
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from(code));
        if !local.body.is_empty()
            && let Some(v) = crate::error::grpc_message(&local.body)
        {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(ProxyBody::full(local.body.clone()));
        *r.status_mut() = local.status;
        r
    };
    for (k, v) in local.headers {
        resp.headers_mut().append(k, v);
    }
    if !local.details.is_empty()
        && let Ok(v) = HeaderValue::from_str(&local.details)
    {
        resp.headers_mut().insert("x-sluice-reason", v);
    }
    *resp.version_mut() = if version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    resp
}
