//! The upstream half of the request path: the upstream request template, the
//! attempt loop (balancer pick, pool checkout, per-try and route timeouts,
//! retries with budget and backoff, outlier accounting) and the response's
//! way back (hop-by-hop strip, header edits, response filters).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version, request};
use http_body_util::BodyExt;
use sluice_config::LbPolicy;
use sluice_filter::StreamInfo;

use crate::accesslog::RequestLog;
use crate::body::ProxyBody;
use crate::chain::{ChainRun, Failure};
use crate::cluster::{ClusterState, Endpoint, HashKey, Outcome, Picker};
use crate::dataplane::Dataplane;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::h1;
use crate::headers;
use crate::metrics::RouteMetrics;
use crate::pool::{self, Conn};
use crate::router::{CompiledRoute, Forward};

use crate::forward::{Completion, ConnInfo, Target, finish_local};

thread_local! {
    static PICKER: std::cell::RefCell<Picker> = std::cell::RefCell::new(Picker::default());
}

/// The upstream request template; cloned for each attempt.
pub(crate) struct UpstreamRequest<'a> {
    method: Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    /// The fields the proxy sets, when kept out of `headers`.
    added: headers::Added<'a>,
}

/// Where the fields the proxy sets on a request stand.
pub(crate) enum Fields {
    /// As the request came: `present` is [`headers::scan_fields`] of
    /// it, `new_id` the request id made for it (not in the map).
    AsReceived { present: u8, new_id: Option<[u8; 32]> },
    /// Filters saw them (and may have changed them): the map has them
    /// (`x-forwarded-for`/`-proto` and the request id were set before the
    /// filters ran, `traceparent` is set after). `present` is
    /// [`headers::scan_fields`] of the request as it came when no filter
    /// edited its fields (then `connection` and `traceparent` are as it came).
    InMap { present: Option<u8> },
    /// Filters saw them, and none edited the map: `kept` are those the map
    /// does not have (set before the filters, kept beside the map while they
    /// ran), `present` as for `InMap`.
    Kept { kept: sluice_filter::ProxyFields, present: Option<u8> },
}

impl<'a> UpstreamRequest<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare(
        mut parts: request::Parts,
        conn: &'a ConnInfo,
        target: &Target<'_>,
        fwd: &Forward,
        cluster: &ClusterState,
        upgrade: bool,
        https: bool,
        known_request_id: Option<&[u8]>,
        fields: Fields,
    ) -> Result<Self, ProxyError> {
        let h = &mut parts.headers;
        let named_hop_headers = match &fields {
            Fields::AsReceived { present, .. }
            | Fields::InMap { present: Some(present) }
            | Fields::Kept { present: Some(present), .. } => present & headers::scanned::CONNECTION != 0,
            Fields::InMap { present: None } | Fields::Kept { present: None, .. } => {
                h.contains_key(http::header::CONNECTION)
            }
        };
        // The `host` field is the authority going upstream, as it came (no
        // filter, no rewrite, and no `connection` field could name it).
        let host_kept = matches!(fields, Fields::AsReceived { .. })
            && target.from_host
            && fwd.host_rewrite.is_none()
            && !named_hop_headers;
        // Naming `x-request-id` in `connection` must not strip the id the proxy keeps.
        let request_id_value = match known_request_id {
            Some(_) if !named_hop_headers => None,
            _ => h.get(&headers::X_REQUEST_ID).cloned(),
        };
        // With filters, `x-forwarded-for`/`-proto` were set before them (as
        // Envoy's connection manager does) and are kept the same way.
        let forwarded = match fields {
            Fields::InMap { .. } | Fields::Kept { .. } if named_hop_headers => {
                Some((h.get(&headers::X_FORWARDED_FOR).cloned(), h.get(&headers::X_FORWARDED_PROTO).cloned()))
            }
            _ => None,
        };
        headers::strip_hop_by_hop(h, upgrade);
        if named_hop_headers && let Some(v) = &request_id_value {
            h.insert(headers::X_REQUEST_ID.clone(), v.clone());
        }
        if let Some((xff, xfp)) = forwarded {
            for (name, value) in [(&headers::X_FORWARDED_FOR, xff), (&headers::X_FORWARDED_PROTO, xfp)] {
                if let Some(v) = value {
                    h.insert(name, v);
                }
            }
        }
        let request_id = match known_request_id {
            Some(id) => id,
            None => request_id_value.as_ref().map_or(&b""[..], |v| v.as_bytes()),
        };
        // The HTTP/1.1 encoder writes the fields the proxy sets after the
        // request's own, unless something reads or edits the map before it.
        let mut added = headers::Added::default();
        match fields {
            Fields::AsReceived { present, new_id }
                if target.route.request_edits.is_empty() && !cluster.is_h2() =>
            {
                added = headers::Added::take_over(
                    h,
                    present,
                    new_id,
                    request_id,
                    &conn.remote_ip,
                    https,
                    target.trust_forwarded,
                );
            }
            // The route's edits come after the forwarding fields (Envoy's
            // router applies them after its connection manager set those).
            Fields::AsReceived { new_id, .. } => {
                if let Some(id) = new_id {
                    headers::set_request_id(h, &id);
                }
                headers::set_forwarded(h, &conn.remote_ip, https, target.trust_forwarded);
                target.route.request_edits.apply(h);
                headers::propagate_traceparent(h, request_id);
            }
            // After filters, `traceparent` (set after them, as Envoy's router
            // sets its trace context) is kept aside all the same.
            Fields::InMap { present } if target.route.request_edits.is_empty() && !cluster.is_h2() => {
                added = headers::Added::traceparent(h, present, request_id);
            }
            Fields::Kept { kept, present } if target.route.request_edits.is_empty() && !cluster.is_h2() => {
                added = headers::Added::traceparent(h, present, request_id);
                added.keep(&kept, &conn.remote_ip);
            }
            Fields::Kept { mut kept, .. } => {
                kept.move_into(h);
                target.route.request_edits.apply(h);
                headers::propagate_traceparent(h, request_id);
            }
            Fields::InMap { .. } => {
                target.route.request_edits.apply(h);
                headers::propagate_traceparent(h, request_id);
            }
        }

        let rewritten = fwd.prefix_rewrite.is_some() && target.route.matched_prefix().is_some();
        let path: std::borrow::Cow<'_, str> = match (&fwd.prefix_rewrite, target.route.matched_prefix()) {
            (Some(rw), Some(prefix)) => {
                let rest = target.path.strip_prefix(prefix).unwrap_or(&target.path);
                let mut p = String::with_capacity(rw.len() + rest.len());
                p.push_str(rw);
                if rw.ends_with('/') && rest.starts_with('/') {
                    p.push_str(&rest[1..]);
                } else {
                    p.push_str(rest);
                }
                p.into()
            }
            _ => target.path.as_str().into(),
        };
        let authority: &str = match &fwd.host_rewrite {
            Some(a) => a.as_str(),
            None => &target.authority,
        };
        // The upstream path and query, built only when it differs from the
        // downstream's (a rewrite, or normalization changed it).
        let same_pq = |p: &http::uri::PathAndQuery| p.path() == path && p.query() == target.query.as_deref();
        let pq = || match &target.query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone().into_owned(),
        };
        let (uri, version) = if cluster.is_h2() {
            h.remove(HOST);
            let scheme = if cluster.tls.is_some() { "https" } else { "http" };
            let authority = if authority.is_empty() { "localhost" } else { authority };
            let uri = Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query(pq())
                .build()
                .map_err(|e| ProxyError::bad_request(format!("invalid uri: {e}")))?;
            (uri, Version::HTTP_2)
        } else {
            let host_matches = host_kept || h.get(HOST).is_some_and(|v| v.as_bytes() == authority.as_bytes());
            if !authority.is_empty() && !host_matches {
                let v = HeaderValue::from_str(authority)
                    .map_err(|_| ProxyError::bad_request("invalid authority"))?;
                h.insert(HOST, v);
            }
            // The common case: the downstream's origin-form URI is already what goes
            // upstream (no rewrite, normalization changed nothing): no re-parse.
            let unchanged = !rewritten && parts.uri.path_and_query().is_some_and(same_pq);
            let uri = match (unchanged, parts.uri.scheme().is_none()) {
                (true, true) => std::mem::take(&mut parts.uri),
                // Absolute (HTTP/2 downstream, or made so for filters): keep the parsed
                // path and query, drop scheme and authority.
                (true, false) => match parts.uri.path_and_query() {
                    Some(p) => Uri::from(p.clone()),
                    None => Uri::from_static("/"),
                },
                (false, _) => {
                    Uri::try_from(pq()).map_err(|e| ProxyError::bad_request(format!("invalid path: {e}")))?
                }
            };
            (uri, Version::HTTP_11)
        };
        Ok(UpstreamRequest { method: parts.method, uri, version, headers: parts.headers, added })
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

/// Decrements in-flight counters (the endpoint's and the cluster's) when the
/// exchange ends.
struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.breaker.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Forwards a request upstream (attempts, retries, the response's way back)
/// and answers it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    template: UpstreamRequest<'_>,
    body: ProxyBody,
    conn: &Rc<ConnInfo>,
    dp: &Dataplane,
    fwd: &Forward,
    cluster: &Arc<ClusterState>,
    metrics: &Arc<RouteMetrics>,
    route: &Arc<CompiledRoute>,
    log: &mut RequestLog,
    chain: Option<ChainRun>,
    downstream_upgrade: Option<tokio::sync::oneshot::Receiver<crate::server::Upgraded>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(run) = chain else {
        return exchange(
            template,
            body,
            conn,
            dp,
            fwd,
            cluster,
            metrics,
            route,
            log,
            &mut None,
            downstream_upgrade,
        )
        .await;
    };
    let grpc = template.method == Method::POST
        && template.headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut chain = Some(run);
    let result =
        exchange(template, body, conn, dp, fwd, cluster, metrics, route, log, &mut chain, downstream_upgrade)
            .await;
    match (result, chain) {
        // As Envoy's own replies (an upstream connect failure's 503, a
        // timeout's 504), the error's reply goes through the filters' response
        // phases and their `on_log`; so does a filter's own failure in the
        // request body phase, while after one in the response headers phase
        // only `on_log` sees it (`ChainRun::filter_local`). Not while a
        // request body paused in a filter is still held (by an HTTP/2
        // upstream connection's task): waiting for it could take long.
        (Err(err), Some(run)) if run.filters_free() => {
            let names = (Some(&*route.name), Some(&*cluster.name));
            Ok(Box::pin(crate::forward::finish_error_filtered(
                &err,
                grpc,
                conn,
                dp,
                log,
                names,
                Some(metrics.clone()),
                run,
            ))
            .await)
        }
        (result, _) => result,
    }
}

/// [`forward`]'s attempts and the response's way back. `chain` is taken by
/// the response it answers with; left in place with an error.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    mut template: UpstreamRequest<'_>,
    body: ProxyBody,
    conn: &Rc<ConnInfo>,
    dp: &Dataplane,
    fwd: &Forward,
    cluster: &Arc<ClusterState>,
    metrics: &Arc<RouteMetrics>,
    route: &Arc<CompiledRoute>,
    log: &mut RequestLog,
    chain: &mut Option<ChainRun>,
    downstream_upgrade: Option<tokio::sync::oneshot::Receiver<crate::server::Upgraded>>,
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
                    // Boxed: rare, and large; kept out of every request's future.
                    let collected = Box::pin(body.collect()).await.map_err(|e| {
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
    // For an HTTP/1.x downstream, the HTTP/1.1 client keeps the response's
    // fields encoded for the downstream encoder (`h1::verbatim`); the route's
    // edits, if any, apply to them there, and a filter chain reads them where
    // they are (`sluice_filter::ResponseHead`), decoding them only to edit them.
    let verbatim = log.protocol != Version::HTTP_2 && downstream_upgrade.is_none();
    let max_attempts = 1 + retry.map_or(0, |r| r.policy.attempts);
    let per_try = retry.and_then(|r| r.policy.per_try_timeout);
    // One clock read serves the deadline and the first attempt's start.
    let first_start = crate::clock::now();
    let deadline = fwd.timeout.map(|t| tokio::time::Instant::from_std(first_start + t));
    // The same for every attempt.
    let added = std::mem::take(&mut template.added);
    let mut template = Some(template);
    let mut last_endpoint: Option<Arc<Endpoint>> = None;
    // Held from a retry's admission until its attempt ends (`max_retries`).
    let mut retry_slot: Option<RetrySlot> = None;
    let mut attempt = 0u32;

    let (answer, inflight) = loop {
        attempt += 1;
        log.attempts = attempt;
        let breaker = &cluster.config.circuit_breaker;
        if cluster.breaker.requests.load(Ordering::Relaxed) >= breaker.max_requests {
            cluster.metrics.rejected_requests.inc();
            hand_back_unsent(chain, &mut template, &added);
            return Err(ProxyError::upstream(ErrorKind::CircuitOpen, "max_requests reached"));
        }
        let Some(endpoint) = PICKER.with(|p| p.borrow_mut().pick(cluster, hash, last_endpoint.as_deref()))
        else {
            hand_back_unsent(chain, &mut template, &added);
            return Err(ProxyError::upstream(
                ErrorKind::NoHealthyUpstream,
                format!("cluster {}", cluster.name),
            ));
        };
        log.upstream = Some(endpoint.addr);
        if let Some(run) = &chain {
            let info = run.info();
            info.upstream_address.set(Some(endpoint.addr));
            info.upstream_local_address.set(None);
            info.upstream_attempts.set(attempt);
        }
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        cluster.breaker.requests.fetch_add(1, Ordering::Relaxed);
        let inflight = InFlight { endpoint };
        let endpoint = &inflight.endpoint;
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
        let started = if attempt == 1 { first_start } else { crate::clock::now() };
        let until = match (per_try, deadline) {
            (Some(pt), dl) => {
                let t = tokio::time::Instant::now() + pt;
                Some(dl.map_or(t, |dl| t.min(dl)))
            }
            (None, dl) => dl,
        };
        // The exchange's future is made where it is awaited, in one of two
        // shapes: every other shape would be one more copy of its state.
        // A filter chain's `on_log` reads the request head as it was sent upstream.
        let head_back = chain.as_ref();
        let result = match until {
            Some(t) => {
                // The connection's deadline timer, moved to this request's
                // deadline: a later deadline than the one it was registered
                // with costs one compare-and-swap, where a new timer per request
                // was a registration and a removal in the timer wheel. (It comes
                // back when the exchange ends; a second request in flight on the
                // connection, HTTP/2, makes its own.)
                let mut timer = match conn.deadline_timer.take() {
                    Some(mut timer) => {
                        timer.as_mut().reset(t);
                        timer
                    }
                    None => Box::pin(tokio::time::sleep_until(t)),
                };
                let exchange = send_request(cluster, endpoint, req, &added, verbatim, head_back);
                let mut exchange = std::pin::pin!(exchange);
                let r = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                        return Poll::Ready(Ok(r));
                    }
                    timer.as_mut().poll(cx).map(Err)
                })
                .await;
                conn.deadline_timer.set(Some(timer));
                r
            }
            None => Ok(send_request(cluster, endpoint, req, &added, verbatim, head_back).await),
        };
        drop(retry_slot.take());
        let elapsed = crate::clock::now().saturating_duration_since(started);
        cluster.metrics.latency.observe(elapsed);
        // Set when the retry was already admitted (budget and retry breaker).
        let mut admitted = false;
        let err = match result {
            Ok(Ok(answer)) => {
                let status = answer.response.status().as_u16();
                let outcome = match status {
                    502..=504 => Outcome::GatewayError,
                    500..=599 => Outcome::ServerError,
                    _ => Outcome::Success,
                };
                cluster.record_outcome(endpoint, outcome);
                let retry_it = !last_attempt && retry.is_some_and(|r| r.retry_status(status));
                // A retry refused by the budget or the retry breaker passes the
                // upstream's own answer through (not a proxy-made 502).
                if !retry_it || !retry.is_some_and(|r| admit_retry(cluster, r)) {
                    log.upstream_us = Some(elapsed.as_micros() as u64);
                    break (answer, inflight);
                }
                admitted = true;
                ProxyError::upstream(ErrorKind::UpstreamProtocol, format!("retriable status {status}"))
            }
            Ok(Err(e)) => {
                // A filter stopped the request body (its own reply, a reset, a
                // buffer overflow): that is the answer, not the exchange's error.
                if let Some(failure) = chain.as_ref().and_then(ChainRun::take_failure) {
                    drop(inflight);
                    return match failure {
                        Failure::Local(local) => match chain.take() {
                            Some(mut run) => {
                                let resp = Box::pin(run.local_response(local, log.protocol)).await;
                                Ok(finish_local(resp, log, dp, Some(metrics.clone()), Some(run)))
                            }
                            None => Err(e),
                        },
                        // The chain stays: `forward` answers, its `on_log` sees it.
                        Failure::Error(err) => Err(err),
                    };
                }
                // A failing request body is the downstream's fault and an open
                // circuit breaker a local overflow: neither is the endpoint's.
                if e.side == Side::Upstream && e.kind != ErrorKind::CircuitOpen {
                    cluster.record_outcome(endpoint, Outcome::GatewayError);
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
                cluster.record_outcome(endpoint, Outcome::GatewayError);
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
        let tried = endpoint.clone();
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
        last_endpoint = Some(tried);
    };

    let h1::Answer { response: resp, upgraded, stripped } = answer;
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream_upgrade
    {
        let Some((mut up, early)) = upgraded else {
            return Err(ProxyError::upstream(
                ErrorKind::UpstreamProtocol,
                "101 without an upgradable connection",
            ));
        };
        tokio::task::spawn_local(async move {
            let _keep = inflight;
            match down.await {
                Ok((mut d, from_client)) => {
                    use tokio::io::AsyncWriteExt;
                    // Bytes either side sent right after the head go first.
                    if !early.is_empty() && d.write_all(&early).await.is_err() {
                        return;
                    }
                    if !from_client.is_empty() && up.write_all(&from_client).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut d, &mut up).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed: the 101 never reached the client"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        parts.version = Version::HTTP_11;
        log.status = 101;
        return Ok(finish_local(
            Response::from_parts(parts, ProxyBody::empty()),
            log,
            dp,
            Some(metrics.clone()),
            None,
        ));
    }

    let (mut parts, mut body) = resp.into_parts();
    let upstream_version = parts.version;
    if !stripped {
        headers::strip_hop_by_hop(&mut parts.headers, false);
    }
    // On encoded fields: the edits drop the ones they replace or remove here
    // and set and add theirs in the (otherwise empty) map.
    if !route.response_edits.is_empty()
        && let Some(v) = body.verbatim_mut()
    {
        h1::drop_named(v, route.response_edits.replaced());
    }
    route.response_edits.apply(&mut parts.headers);
    parts.version = if log.protocol == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    // Every filter ignores the rest of the response: the body goes out as it
    // came, and `on_log` needs no head (see `HttpFilter::ignores_response`).
    let mut unwrapped = false;
    if let Some(run) = chain.as_mut() {
        let end_of_stream = http_body::Body::is_end_stream(&body);
        let mut head = sluice_filter::ResponseHead::with_encoded(parts, body.take_verbatim());
        *run.info().code_details.borrow_mut() = std::borrow::Cow::Borrowed("via_upstream");
        match run.response_headers(&mut head, end_of_stream).await {
            Ok(None) => {}
            Ok(Some(local)) => {
                drop(body);
                let resp = Box::pin(run.local_response(local, log.protocol)).await;
                return Ok(finish_local(resp, log, dp, Some(metrics.clone()), chain.take()));
            }
            // A response filter failed: `forward` answers, the chain's
            // `on_log` sees the reply.
            Err(e) => return Err(e),
        }
        // The fields no filter decoded go back to the encoder still encoded.
        let encoded;
        (parts, encoded) = head.into_parts();
        body.set_verbatim(encoded);
        // Trailers need chunked coding: an HTTP/1.x response of known length has none.
        let trailers =
            upstream_version > Version::HTTP_11 || http_body::Body::size_hint(&body).exact().is_none();
        unwrapped = run.ignores_response(trailers);
        if !unwrapped {
            body = run.wrap_response_body(body);
        }
    }
    let status = parts.status.as_u16();
    log.status = status;
    let done = Completion::new(log, dp.snapshot.config().access_log.format, Some(metrics.clone()), status);
    // The HTTP/1.1 server hands a chain's body the head once it is encoded
    // (`ProxyBody::keep_head`); otherwise the chain keeps a copy for the body
    // phases and `on_log`.
    let handed_back = log.protocol != Version::HTTP_2 && body.keeps_head();
    if let Some(run) = chain.as_ref().filter(|_| !handed_back && !unwrapped) {
        run.keep_response(crate::chain::LogHead::from_response(&parts, &body));
    }
    let chain = chain.take();
    let body = body.on_end(move |end, n| {
        drop(inflight);
        if let Some(mut run) = chain {
            if unwrapped {
                // What the chain's body would have counted (`response.size`).
                run.info().response_body_bytes.set(n);
            }
            run.log_end(end);
        }
        done.done(end, n);
    });
    Ok(Response::from_parts(parts, body))
}

/// Hands the request head to the chain when the request fails before an
/// attempt sent it (the filters' `on_log` reads it), unless an earlier attempt
/// handed one back.
fn hand_back_unsent(
    chain: &Option<ChainRun>,
    template: &mut Option<UpstreamRequest<'_>>,
    added: &headers::Added<'_>,
) {
    if let Some(run) = chain
        && run.info().sent_request().is_none()
        && let Some(t) = template.take()
    {
        run.sent_request(t.into_request(ProxyBody::empty()).into_parts().0, added.encoded());
    }
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

/// Sends one attempt and waits for the response head. An HTTP/1.1 response
/// body returns its connection to the pool when it completes. `verbatim`: an
/// HTTP/1.1 response keeps its fields encoded (see `h1::verbatim`).
/// `added`: fields the proxy sets, kept out of the request's map.
/// `head_back`: where the request head is handed back once encoded (for the
/// filters' later phases and `on_log`; HTTP/2 sends a copy).
pub(crate) async fn send_request(
    cluster: &Arc<ClusterState>,
    endpoint: &Arc<Endpoint>,
    req: Request<ProxyBody>,
    added: &headers::Added<'_>,
    verbatim: bool,
    head_back: Option<&ChainRun>,
) -> Result<h1::Answer, ProxyError> {
    let pool = pool::endpoint_pool(cluster, endpoint);
    // Never sent if the checkout fails, or the route's deadline drops this
    // future first: the filters' `on_log` reads it as it would have gone.
    // (The guard borrows the request: moving it in and out cost a copy of
    // it per request, filters or not.)
    let checkout = {
        let guard = Unsent { req: &req, added, head_back, armed: true };
        let r = pool::checkout(cluster, endpoint, &pool).await;
        guard.disarm();
        r
    };
    let conn = match checkout {
        Ok(conn) => conn,
        Err(e) => {
            if let Some(run) = head_back {
                run.sent_request(req.into_parts().0, added.encoded());
            }
            return Err(e);
        }
    };
    if let Some(run) = head_back {
        record_conn(run.info(), conn.facts());
    }
    match conn {
        Conn::H1(conn) => {
            let (parts, body) = req.into_parts();
            let mut ex = h1::Exchange::start(conn, &parts, added, body, verbatim);
            // The head is encoded: hand it back before the body phases run
            // (they read the request's properties and fields from it).
            if let Some(run) = head_back {
                run.sent_request(parts, added.encoded());
            }
            let head = match std::future::poll_fn(|cx| ex.poll_head(cx)).await {
                Ok(head) => head,
                // The pooled connection was closed by the upstream while idle:
                // send the request again on a fresh one.
                Err(e) if ex.can_resend() => {
                    tracing::debug!(upstream = %endpoint.addr, error = %e, "stale pooled connection; resending");
                    cluster.metrics.stale_resends.inc();
                    match pool::connect(cluster, endpoint).await? {
                        Conn::H1(fresh) => {
                            if let Some(run) = head_back {
                                record_conn(run.info(), &fresh.facts);
                            }
                            ex.resend_on(fresh)
                        }
                        Conn::H2(..) => return Err(e),
                    }
                    std::future::poll_fn(|cx| ex.poll_head(cx)).await?
                }
                Err(e) => return Err(e),
            };
            let home = Some((pool, cluster.config.pool.max_idle_per_endpoint));
            Ok(ex.into_answer(head, home))
        }
        Conn::H2(mut s, _) => {
            // (`added` is empty: `UpstreamRequest::prepare` keeps fields
            // aside only for an HTTP/1.1 cluster.)
            if let Some(run) = head_back {
                run.sent_request(copy_head(&req), None);
            }
            s.ready().await.map_err(upstream_error)?;
            let resp = s.send_request(req).await.map_err(upstream_error)?;
            Ok(h1::Answer { response: resp.map(ProxyBody::incoming), upgraded: None, stripped: false })
        }
    }
}

/// The request's filters read the connection's facts (`upstream.local_address`,
/// `upstream.tls_version` …).
fn record_conn(info: &StreamInfo, facts: &pool::ConnFacts) {
    info.upstream_local_address.set(facts.local);
    if facts.tls.is_some() || info.upstream_tls.borrow().is_some() {
        info.upstream_tls.borrow_mut().clone_from(&facts.tls);
    }
}

/// A request no connection took yet: a copy of its head goes to the filter
/// chain if the attempt is dropped while armed (see [`send_request`]).
struct Unsent<'a, 'b> {
    req: &'a Request<ProxyBody>,
    added: &'a headers::Added<'b>,
    head_back: Option<&'a ChainRun>,
    armed: bool,
}

impl Unsent<'_, '_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unsent<'_, '_> {
    fn drop(&mut self) {
        if let Some(run) = self.head_back.filter(|_| self.armed) {
            run.sent_request(copy_head(self.req), self.added.encoded());
        }
    }
}

/// A copy of a request's head (method, URI, version, fields).
fn copy_head<B>(req: &Request<B>) -> request::Parts {
    let mut parts = Request::new(()).into_parts().0;
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
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
