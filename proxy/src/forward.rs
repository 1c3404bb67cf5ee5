//! The request path: normalize, route, run filters, forward with retries and
//! timeouts, and answer. Errors become responses in [`crate::error`] only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use http::header::{CONTENT_TYPE, HOST, HeaderValue, LOCATION, USER_AGENT};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version, request};
use sluice_config::{AccessLogFormat, Redirect};
use sluice_filter::{LocalResponse, StreamInfo, TlsInfo};

use crate::accesslog::RequestLog;
use crate::body::{BodyEnd, ProxyBody};
use crate::chain::ChainRun;
use crate::dataplane::{Dataplane, ListenerRuntime};
use crate::error::{ErrorKind, ProxyError, Side, error_response};
use crate::headers;
use crate::metrics::{Metrics, RouteMetrics};
use crate::normalize::normalize_path;
use crate::router::{CompiledRoute, RouteAction};
use crate::upstream::{Fields, UpstreamRequest, forward};

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
    /// This worker's hold on the dataplane in force.
    pub dataplane: Rc<crate::dataplane::LocalDataplane>,
    /// Listener name.
    pub listener: Arc<str>,
    /// Downstream peer.
    pub remote: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Connection id.
    pub id: u64,
    /// The downstream IP as a header value (`x-forwarded-for`), made once.
    pub remote_ip: http::HeaderValue,
    /// TLS facts, for TLS listeners (shared by the connection's requests).
    pub tls: Option<Arc<TlsInfo>>,
    /// The route-timeout timer, reused request after request (see
    /// `upstream::forward`); taken while an exchange runs.
    pub deadline_timer: std::cell::Cell<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>,
}

/// Handles one downstream request, which began at `start`. Never fails:
/// errors become responses.
pub async fn handle(
    req: Request<ProxyBody>,
    conn: Rc<ConnInfo>,
    start: Instant,
) -> Result<Response<ProxyBody>, Infallible> {
    let dp = conn.dataplane.get(&conn.shared.dataplane);
    let grpc = is_grpc(&req);
    let format = dp.snapshot.config().access_log.format;
    let mut log = RequestLog {
        request_id: Default::default(),
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
        // Only the access log prints wall-clock time.
        start_wall: if format == AccessLogFormat::Off { SystemTime::UNIX_EPOCH } else { SystemTime::now() },
        start,
        upstream_us: None,
        user_agent: None,
    };
    let Some(listener) = dp.listeners.get(&*conn.listener) else {
        let err = ProxyError::new(Side::Internal, ErrorKind::NoRoute, "listener removed");
        return Ok(finish_error(&err, grpc, &conn.shared.metrics, format, log, Seen::default()));
    };
    let mut seen = Seen::default();
    // A span per request for `tracing` subscribers that want it (debug level: free when off).
    // Not boxed: the HTTP/1.1 driver pins this future in the connection's task
    // (allocated once per connection); HTTP/2 boxes it once per stream.
    let span =
        tracing::debug_span!("request", listener = %conn.listener, conn = conn.id, method = %req.method());
    let result =
        tracing::Instrument::instrument(proxy(req, grpc, &conn, &dp, listener, &mut log, &mut seen), span)
            .await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => finish_error(&err, grpc, &conn.shared.metrics, format, log, seen),
    };
    if conn.shared.draining.load(Ordering::Relaxed) && resp.version() != Version::HTTP_2 {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Where a request went, borrowed from the dataplane: for the error path.
/// (The access log takes its own copy of the names, and only when it is on:
/// cloning an `Arc` other workers clone too writes a shared cache line.)
#[derive(Default, Clone, Copy)]
struct Seen<'a> {
    route: Option<&'a Arc<str>>,
    cluster: Option<&'a Arc<str>>,
    metrics: Option<&'a Arc<RouteMetrics>>,
}

impl<'a> Seen<'a> {
    /// The route the request goes to now (none for [`Router::no_route`]).
    ///
    /// [`Router::no_route`]: crate::router::Router::no_route
    fn enter(&mut self, route: &'a Arc<CompiledRoute>) {
        let real = !route.is_no_route();
        self.route = real.then_some(&route.name);
        self.metrics = route.local_metrics.as_ref();
    }
}

fn no_route(authority: &str, path: &str) -> ProxyError {
    ProxyError::new(Side::Downstream, ErrorKind::NoRoute, format!("no route for {authority}{path}"))
}

/// A gRPC request (its errors are answered the gRPC way). gRPC calls are
/// always POSTs: any other request costs no field lookup.
fn is_grpc(req: &Request<ProxyBody>) -> bool {
    req.method() == http::Method::POST
        && req.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What runs when the response body ends: metrics, the filters' `on_log`, the
/// access log line. Cheap when the access log is off.
pub(crate) struct Completion {
    metrics: Option<Arc<RouteMetrics>>,
    status: u16,
    start: Instant,
    log: Option<Box<RequestLog>>,
    format: AccessLogFormat,
}

impl Completion {
    pub(crate) fn new(
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

    pub(crate) fn done(self, end: BodyEnd, bytes: u64) {
        // Sluice answered with an error instead of the response it failed.
        let replaced = match end {
            BodyEnd::Replaced { status, reason } => Some((status, reason)),
            _ => None,
        };
        if let Some(m) = &self.metrics {
            let status = replaced.map_or(self.status, |(s, _)| s);
            m.record(status, crate::clock::now().saturating_duration_since(self.start));
        }
        if let Some(mut l) = self.log {
            if let Some((status, reason)) = replaced {
                l.status = status;
                l.reason = Some(reason);
            }
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
    seen: Seen<'_>,
) -> Response<ProxyBody> {
    let resp = error_response(err, grpc);
    record_error(err, metrics, &mut log, (seen.route.map(|r| &**r), seen.cluster.map(|c| &**c)));
    if format != AccessLogFormat::Off {
        log.route = seen.route.cloned();
        log.cluster = seen.cluster.cloned();
    }
    let done = Completion::new(&log, format, seen.metrics.cloned(), err.status().as_u16());
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.on_end(move |end, n| done.done(end, n)))
}

/// Counts and logs an error Sluice answers (`sluice_local_replies_total`; a
/// warning when the upstream or Sluice failed). `names`: route and cluster.
fn record_error(
    err: &ProxyError,
    metrics: &Metrics,
    log: &mut RequestLog,
    names: (Option<&str>, Option<&str>),
) {
    metrics.local_replies.with_label_values(&[err.reason()]).inc();
    let (route, cluster) = names;
    match err.side {
        Side::Upstream | Side::Internal => tracing::warn!(
            request_id = %log.request_id, route = ?route, cluster = ?cluster, error = %err, "request failed"
        ),
        Side::Downstream => tracing::debug!(request_id = %log.request_id, error = %err, "request rejected"),
    }
    log.reason = Some(err.reason());
}

/// The error reply to a request whose filters ran: as Envoy sends its own
/// replies (an upstream connect failure's 503, a timeout's 504), it goes
/// through the filters' response phases, and their `on_log` sees it, with
/// Envoy's `response.code_details` and `response.flags` for the error. So
/// does the reply to a filter's own failure in a request phase (the failed
/// filter skips the rest of the request), as on Envoy; after a failure in the
/// response headers phase only `on_log` sees it (see
/// [`ChainRun::filter_local`]). `names`: route and cluster.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn finish_error_filtered(
    err: &ProxyError,
    grpc: bool,
    conn: &ConnInfo,
    dp: &Dataplane,
    log: &mut RequestLog,
    names: (Option<&str>, Option<&str>),
    metrics: Option<Arc<RouteMetrics>>,
    mut run: ChainRun,
) -> Response<ProxyBody> {
    record_error(err, &conn.shared.metrics, log, names);
    let info = run.info();
    *info.code_details.borrow_mut() = err.code_details();
    info.upstream_transport_failure.borrow_mut().clone_from(&err.transport_failure);
    info.response_flags.set(info.response_flags.get() | err.response_flags());
    let resp = run.filter_local(error_response(err, grpc)).await;
    finish_local(resp, log, dp, metrics, Some(run))
}

/// What the filters read of the request's route (`xds.route_name`,
/// `xds.virtual_host_name`, their metadata): nothing for no route.
fn enter_route(info: &StreamInfo, route: &CompiledRoute) {
    *info.route.borrow_mut() = (!route.is_no_route()).then(|| route.facts.clone());
}

/// [`finish_error_filtered`] for an error found before forwarding, after the
/// filters' request headers phase (no route, a path a filter broke).
async fn finish_error_run(
    err: &ProxyError,
    grpc: bool,
    conn: &ConnInfo,
    dp: &Dataplane,
    log: &mut RequestLog,
    seen: Seen<'_>,
    run: ChainRun,
) -> Response<ProxyBody> {
    let names = (seen.route.map(|r| &**r), seen.cluster.map(|c| &**c));
    finish_error_filtered(err, grpc, conn, dp, log, names, seen.metrics.cloned(), run).await
}

/// The per-request view of where the request goes.
pub(crate) struct Target<'a> {
    pub(crate) authority: String,
    /// `authority` is the request's `host` field, as it came.
    pub(crate) from_host: bool,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) route: &'a Arc<CompiledRoute>,
    /// The listener's `trust_forwarded_headers`.
    pub(crate) trust_forwarded: bool,
}

async fn proxy<'a>(
    mut req: Request<ProxyBody>,
    grpc: bool,
    conn: &Rc<ConnInfo>,
    dp: &'a Dataplane,
    listener: &'a ListenerRuntime,
    log: &mut RequestLog,
    seen: &mut Seen<'a>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let version = req.version();
    headers::check_framing(req.headers(), version)?;
    // The HTTP/1.1 codec enforces this itself; HTTP/2 only bounds the bytes.
    if req.headers().len() > listener.config.limits.max_request_headers {
        let detail = "too many request headers";
        return Err(ProxyError::new(Side::Downstream, ErrorKind::HeadersTooLarge, detail));
    }
    // Set by the HTTP/1.1 codec on a request asking for an upgrade.
    let upgrade = req.extensions_mut().remove::<crate::server::OnUpgrade>().and_then(|u| u.take());
    let (mut parts, body) = req.into_parts();
    // Which of the fields the forwarding path looks for the request came with.
    let scanned = headers::scan_fields(&parts.headers);
    log.request_id = headers::request_id(&parts.headers, scanned);
    let mut new_id = match &log.request_id {
        crate::accesslog::RequestId::Made(id) => Some(*id),
        _ => None,
    };
    let log_on = dp.snapshot.config().access_log.format != AccessLogFormat::Off;
    if log_on {
        log.user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    }

    let (authority, from_host) = match parts.uri.authority() {
        Some(a) => (a.as_str().to_owned(), false),
        None => match parts.headers.get(HOST).and_then(|h| h.to_str().ok()) {
            Some(h) if !h.is_empty() => (h.to_owned(), true),
            _ if version == Version::HTTP_10 => (String::new(), false),
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
    // No route: the listener's filters still run, as Envoy's do before its
    // router answers 404 (and a filter's header edit may yet find one).
    let route = match router.route(&authority, &parts.method, &path, query.as_deref(), &parts.headers) {
        Some(route) => route,
        None if !router.no_route().chain.is_empty() => router.no_route(),
        None => return Err(no_route(&authority, &path)),
    };
    seen.enter(route);
    if log_on && !route.is_no_route() {
        log.route = Some(route.name.clone());
    }

    let https = conn.tls.is_some();
    let trust_forwarded = listener.config.trust_forwarded_headers;
    let mut target = Target { authority, from_host, path, query, route, trust_forwarded };

    // Filters see the normalized, absolute form of the request.
    let mut chain = None;
    let mut headers_edited = false;
    if !route.chain.is_empty() {
        // Filters see the request id and the forwarding fields, as Envoy's
        // set them before its filters run: kept beside the map until a filter
        // edits it (see `sluice_filter::ProxyFields`).
        let kept = headers::take_fields(
            &mut parts.headers,
            scanned,
            new_id.take(),
            &conn.remote_ip,
            https,
            trust_forwarded,
        )
        .into_proxy_fields(&conn.remote_ip);
        let mut info = StreamInfo::new(
            log.request_id.clone(),
            conn.id,
            conn.remote,
            conn.local,
            conn.listener.clone(),
            version,
            log.start,
        );
        info.tls = conn.tls.clone();
        info.keep_proxy_fields(kept);
        enter_route(&info, route);
        let mut run = ChainRun::new(&route.chain, info, listener.config.limits.max_buffered_body_bytes);
        // An origin-form request (HTTP/1.1) keeps its URI and its `host` field,
        // which filters see as `:authority`; any other gets the absolute form,
        // its `host` field (if any) standing aside while the filters run.
        let host = if parts.uri.authority().is_none() && !target.authority.is_empty() {
            if let Some(pq) = normalized_path_and_query(&target, &parts.uri)? {
                parts.uri = Uri::from(pq);
            }
            None
        } else {
            parts.uri = absolute_uri(https, &target, &parts.uri)?;
            parts.headers.remove(HOST)
        };
        let end_of_stream = http_body::Body::is_end_stream(&body);
        match run.request_headers(&mut parts, end_of_stream).await {
            Ok(None) => {}
            Ok(Some(local)) => {
                run.keep_request_head(parts);
                let resp = Box::pin(run.local_response(local, version)).await;
                return Ok(finish_local(resp, log, dp, route.local_metrics.clone(), Some(run)));
            }
            // A filter failed (closed): the reply goes through the others'
            // response phases and `on_log` (the failed one skips them).
            Err(err) => {
                keep_answered_head(&mut run, parts);
                return Ok(Box::pin(finish_error_run(&err, grpc, conn, dp, log, *seen, run)).await);
            }
        }
        // Filters edit the authority, never `host`: put the downstream's value
        // back when the authority is unchanged, so it is not made again upstream.
        if let Some(h) = host
            && parts.uri.authority().is_some_and(|a| a.as_str().as_bytes() == h.as_bytes())
        {
            parts.headers.insert(HOST, h);
        }
        // A filter that edits request headers clears the route cache (the
        // wasm host does on any edit): without that, the head is as it was.
        headers_edited = run.info().take_route_cache_cleared();
        if headers_edited {
            target.from_host = false;
            // Most edits leave the authority, path and query as they were:
            // compared, not copied again.
            let authority = match parts.uri.authority() {
                Some(a) => a.as_str().as_bytes(),
                None => parts.headers.get(HOST).map_or(&b""[..], HeaderValue::as_bytes),
            };
            if authority != target.authority.as_bytes() {
                target.authority = match parts.uri.authority() {
                    Some(a) => a.as_str().to_owned(),
                    None => {
                        parts.headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned()
                    }
                };
            }
            let p = parts.uri.path();
            if p != target.path {
                let Some(normalized) = normalize_path(p) else {
                    keep_answered_head(&mut run, parts);
                    let err = ProxyError::bad_request("invalid path set by filter");
                    return Ok(Box::pin(finish_error_run(&err, grpc, conn, dp, log, *seen, run)).await);
                };
                target.path = normalized.into_owned();
            }
            let query = parts.uri.query();
            if query != target.query.as_deref() {
                target.query = query.map(str::to_owned);
            }
            // No route now: a 404 through the filters that ran.
            let rerouted = router
                .route(
                    &target.authority,
                    &parts.method,
                    &target.path,
                    target.query.as_deref(),
                    &parts.headers,
                )
                .unwrap_or(router.no_route());
            if !Arc::ptr_eq(rerouted, target.route) {
                target.route = rerouted;
                seen.enter(rerouted);
                if log_on {
                    log.route = (!rerouted.is_no_route()).then(|| rerouted.name.clone());
                }
                enter_route(run.info(), rerouted);
            }
        }
        chain = Some(run);
    }
    let route = target.route;

    match &route.action {
        RouteAction::NoRoute => {
            let err = no_route(&target.authority, &target.path);
            match chain {
                Some(mut run) => {
                    keep_answered_head(&mut run, parts);
                    Ok(Box::pin(finish_error_run(&err, grpc, conn, dp, log, *seen, run)).await)
                }
                None => Err(err),
            }
        }
        RouteAction::Direct { status, body: text, content_type } => {
            if let Some(run) = &mut chain {
                keep_answered_head(run, parts);
            }
            let mut resp = Response::new(ProxyBody::full(text.clone()));
            *resp.status_mut() = *status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
            }
            route.response_edits.apply(resp.headers_mut());
            Ok(Box::pin(finish_filtered_local(resp, log, dp, route.local_metrics.clone(), chain)).await)
        }
        RouteAction::Redirect(r) => {
            if let Some(run) = &mut chain {
                keep_answered_head(run, parts);
            }
            let resp = redirect(r, https, &target)?;
            Ok(Box::pin(finish_filtered_local(resp, log, dp, route.local_metrics.clone(), chain)).await)
        }
        RouteAction::Forward(fwd) => {
            let t = fwd.pick();
            seen.cluster = Some(&t.cluster.name);
            seen.metrics = Some(&t.metrics);
            if log_on {
                log.cluster = Some(t.cluster.name.clone());
            }
            if let Some(run) = &chain {
                *run.info().cluster.borrow_mut() = Some(t.cluster.facts.clone());
            }
            // Unless a filter edited a field the proxy manages, `x-request-id`
            // is the id this request was given and the scan of the head as it
            // came still holds; after such an edit the map is read again.
            let fields_edited =
                headers_edited && chain.as_ref().is_some_and(|r| r.info().proxy_fields_edited());
            let known_id = (!fields_edited).then_some(log.request_id.as_bytes());
            // Without filters, the fields the proxy sets are as the request came.
            let fields = match &chain {
                None => Fields::AsReceived { present: scanned, new_id },
                Some(run) => {
                    let present = (!fields_edited).then_some(scanned);
                    match run.info().take_proxy_fields() {
                        kept if kept.is_empty() => Fields::InMap { present },
                        kept => Fields::Kept { kept, present },
                    }
                }
            };
            let upstream_req = UpstreamRequest::prepare(
                parts,
                conn,
                &target,
                fwd,
                &t.cluster,
                upgrade.is_some(),
                https,
                known_id,
                fields,
            )?;
            let body = match &mut chain {
                Some(run) => run.wrap_request_body(body),
                None => body,
            };
            forward(upstream_req, body, conn, dp, fwd, &t.cluster, &t.metrics, route, log, chain, upgrade)
                .await
        }
    }
}

/// A request the proxy answers itself: `on_log` reads the head the filters
/// left (`host` is shown as `:authority`).
fn keep_answered_head(run: &mut ChainRun, mut parts: request::Parts) {
    if parts.uri.authority().is_some() {
        parts.headers.remove(HOST);
    }
    run.keep_request_head(parts);
}

/// The normalized path and query, when normalization changed the request's
/// (it usually changes nothing: the parsed one is kept as it is).
fn normalized_path_and_query(t: &Target<'_>, original: &Uri) -> Result<Option<PathAndQuery>, ProxyError> {
    match original.path_and_query() {
        Some(pq) if pq.path() == t.path && pq.query() == t.query.as_deref() => Ok(None),
        _ => {
            let pq = match &t.query {
                Some(q) => format!("{}?{q}", t.path),
                None => t.path.clone(),
            };
            pq.parse().map(Some).map_err(|e| ProxyError::bad_request(format!("invalid uri: {e}")))
        }
    }
}

fn absolute_uri(https: bool, t: &Target<'_>, original: &Uri) -> Result<Uri, ProxyError> {
    let authority = if t.authority.is_empty() { "localhost" } else { &t.authority };
    let authority: http::uri::Authority = match original.authority() {
        // An HTTP/2 request's own authority, already parsed.
        Some(a) if a.as_str() == authority => a.clone(),
        _ => authority.parse().map_err(|e| ProxyError::bad_request(format!("invalid authority: {e}")))?,
    };
    let path_and_query = match normalized_path_and_query(t, original)? {
        Some(pq) => pq,
        None => original.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if https { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP });
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|e| ProxyError::bad_request(format!("invalid uri: {e}")))
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
    metrics: Option<Arc<RouteMetrics>>,
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

pub(crate) fn finish_local(
    resp: Response<ProxyBody>,
    log: &mut RequestLog,
    dp: &Dataplane,
    metrics: Option<Arc<RouteMetrics>>,
    chain: Option<ChainRun>,
) -> Response<ProxyBody> {
    let status = resp.status().as_u16();
    log.status = status;
    let done = Completion::new(log, dp.snapshot.config().access_log.format, metrics, status);
    let (parts, body) = resp.into_parts();
    if let Some(run) = &chain {
        run.keep_response(crate::chain::LogHead::from_response(&parts, &body));
    }
    let body = body.on_end(move |end, n| {
        if let Some(mut run) = chain {
            run.log_end(end);
        }
        done.done(end, n);
    });
    Response::from_parts(parts, body)
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
