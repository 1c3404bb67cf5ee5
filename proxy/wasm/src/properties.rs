//! Properties (`proxy_get_property`): an Envoy-compatible set with Envoy's binary
//! encodings (strings raw, integers 8 bytes LE, bools 1 byte, timestamps and
//! durations as i64 nanoseconds, maps as pairs).
//!
//! The request's [`StreamInfo`] and, in `on_log`, the final heads are borrowed
//! by the filter for the duration of the synchronous guest call through scoped
//! thread-locals (`scoped-tls`): host calls run on the same thread, inside that
//! scope, so nothing is copied per request.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, request};
use sluice_filter::{EncodedFields, LogView, ResponseHead, StreamInfo, TlsInfo};

use crate::headers::{MapView, request_authority, request_scheme};
use crate::state::{Callback, VmState};

scoped_tls::scoped_thread_local!(pub(crate) static INFO: StreamInfo);
scoped_tls::scoped_thread_local!(static LOG_REQUEST: request::Parts);
scoped_tls::scoped_thread_local!(static LOG_REQUEST_ADDED: EncodedFields);
scoped_tls::scoped_thread_local!(static LOG_RESPONSE: ResponseHead);
scoped_tls::scoped_thread_local!(static LOG_REQUEST_TRAILERS: HeaderMap);
scoped_tls::scoped_thread_local!(static LOG_RESPONSE_TRAILERS: HeaderMap);

/// The downstream connection is TLS (`false` outside a request's call).
pub(crate) fn downstream_tls() -> bool {
    INFO.is_set() && INFO.with(|i| i.tls.is_some())
}

/// The scope of an `on_log` call: the final heads are readable.
pub(crate) struct LogScope;

fn set_opt<T: 'static, R>(key: &'static scoped_tls::ScopedKey<T>, v: Option<&T>, f: impl FnOnce() -> R) -> R {
    match v {
        Some(v) => key.set(v, f),
        None => f(),
    }
}

impl LogScope {
    pub fn enter<R>(view: &LogView<'_>, info: &StreamInfo, f: impl FnOnce() -> R) -> R {
        INFO.set(info, || {
            set_opt(&LOG_REQUEST, view.request, || {
                set_opt(&LOG_REQUEST_ADDED, view.request_added, || {
                    set_opt(&LOG_RESPONSE, view.response, || {
                        set_opt(&LOG_REQUEST_TRAILERS, view.request_trailers, || {
                            set_opt(&LOG_RESPONSE_TRAILERS, view.response_trailers, f)
                        })
                    })
                })
            })
        })
    }

    /// Reads one of the final maps during `on_log` (map types 0–3); gives `f`
    /// back when that map is not in scope.
    pub fn with_map<R, F: FnOnce(MapView<'_>) -> R>(map: u32, f: F) -> Result<R, F> {
        match map {
            0 if LOG_REQUEST.is_set() => Ok(LOG_REQUEST.with(|p| sent(p, f))),
            1 if LOG_REQUEST_TRAILERS.is_set() => Ok(LOG_REQUEST_TRAILERS.with(|h| f(MapView::Plain(h)))),
            2 if LOG_RESPONSE.is_set() => Ok(LOG_RESPONSE.with(|h| f(MapView::Head(h)))),
            3 if LOG_RESPONSE_TRAILERS.is_set() => Ok(LOG_RESPONSE_TRAILERS.with(|h| f(MapView::Plain(h)))),
            _ => Err(f),
        }
    }
}

fn addr(out: &mut Vec<u8>, a: SocketAddr) {
    use std::io::Write;
    let _ = write!(out, "{a}");
}

fn int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn uint(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn nanos_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "",
    }
}

/// Splits a property path: NUL-separated segments (a trailing NUL tolerated), or
/// one dotted segment.
fn segments(path: &[u8]) -> Vec<&str> {
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    let Ok(s) = std::str::from_utf8(path) else { return Vec::new() };
    if s.contains('\0') { s.split('\0').collect() } else { s.split('.').collect() }
}

/// The request head visible to this call: the context's (while in, or paused
/// in, its headers phase), the final one in `on_log`, or the one the proxy
/// sent on once the filters let it go (the later phases).
fn with_request<R>(state: &VmState, f: impl FnOnce(&request::Parts) -> R) -> Option<R> {
    state.contexts.get(&state.frame.effective)?;
    if let Some(p) = state.req_head(state.frame.effective) {
        return Some(f(p));
    }
    if state.frame.callback == Callback::Log && LOG_REQUEST.is_set() {
        return Some(LOG_REQUEST.with(|p| f(p)));
    }
    with_sent(state, |p, _| f(p))
}

/// The request head once it left the filters, from the request's stream info
/// (in scope for a filter's call), with the fields the proxy wrote after its map.
/// Only for the context called: the stream info is its request's.
fn with_sent<R>(state: &VmState, f: impl FnOnce(&request::Parts, Option<&EncodedFields>) -> R) -> Option<R> {
    if !stream_in_scope(state) {
        return None;
    }
    INFO.with(|info| {
        let (head, added) = (info.sent_request(), info.sent_request_added());
        head.as_ref().map(|p| f(p, added.as_ref()))
    })
}

/// The live request head (its headers phase is running) as a map: with the
/// fields the proxy set before the filters and keeps beside the map (in the
/// request's stream info, in scope for the call).
pub(crate) fn request_map<R>(p: &request::Parts, f: impl FnOnce(MapView<'_>) -> R) -> R {
    if INFO.is_set() {
        return INFO.with(|info| {
            let kept = info.proxy_fields();
            if kept.is_empty() { f(MapView::Request(p)) } else { f(MapView::Kept(p, &kept)) }
        });
    }
    f(MapView::Request(p))
}

/// Moves the fields the proxy keeps beside the live request head's map into
/// it: before the first edit, or before the head is parked (a pause).
pub(crate) fn materialize(map: &mut http::HeaderMap) {
    if INFO.is_set() {
        INFO.with(|info| info.materialize_proxy_fields(map));
    }
}

/// The final request head of `on_log` as a map: with the fields the proxy
/// sent after the map's, if any.
fn sent<R>(p: &request::Parts, f: impl FnOnce(MapView<'_>) -> R) -> R {
    if LOG_REQUEST_ADDED.is_set() {
        LOG_REQUEST_ADDED.with(|added| f(MapView::Sent(p, added)))
    } else {
        f(MapView::Request(p))
    }
}

/// [`with_request`] as a header map (pseudo-headers too, as Envoy's
/// `request.headers` property).
fn with_request_map<R>(state: &VmState, f: impl FnOnce(MapView<'_>) -> R) -> Option<R> {
    let id = state.frame.effective;
    state.contexts.get(&id)?;
    if state.live.request_owner == id {
        return Some(request_map(&state.live.request, f));
    }
    if let Some(p) = state.req_head(id) {
        return Some(f(MapView::Request(p)));
    }
    if state.frame.callback == Callback::Log && LOG_REQUEST.is_set() {
        return Some(LOG_REQUEST.with(|p| sent(p, f)));
    }
    with_sent(state, |p, added| match added {
        Some(added) => f(MapView::Sent(p, added)),
        None => f(MapView::Request(p)),
    })
}

/// The response head visible to this call: the context's (while in, or
/// paused in, its headers phase), the final one in `on_log`, or the one the
/// proxy sent downstream (the body phases).
fn with_response<R>(state: &VmState, f: impl FnOnce(&ResponseHead) -> R) -> Option<R> {
    state.contexts.get(&state.frame.effective)?;
    if let Some(p) = state.resp_head(state.frame.effective) {
        return Some(f(p));
    }
    if state.frame.callback == Callback::Log && LOG_RESPONSE.is_set() {
        return Some(LOG_RESPONSE.with(|p| f(p)));
    }
    if !stream_in_scope(state) {
        return None;
    }
    INFO.with(|info| info.sent_response().as_ref().map(f))
}

/// The response trailers, in `on_log` when the response had them.
fn log_trailers<R>(f: impl FnOnce(&HeaderMap) -> R) -> Option<R> {
    LOG_RESPONSE_TRAILERS.is_set().then(|| LOG_RESPONSE_TRAILERS.with(|t| f(t)))
}

fn encode_map(out: &mut Vec<u8>, view: MapView<'_>) {
    let (_, size) = view.count_and_size();
    let start = out.len();
    out.resize(start + size, 0);
    view.encode_into(&mut out[start..]);
}

fn header(out: &mut Vec<u8>, state: &VmState, name: &str) -> bool {
    with_request_map(state, |m| match m.get(name.as_bytes()) {
        Some(v) => {
            out.extend_from_slice(v);
            true
        }
        None => false,
    })
    .unwrap_or(false)
}

/// Whether the request whose stream info is in scope is the effective
/// context's: the running callback is a phase (or `on_log`) of that HTTP
/// context, or the answer to a callout it made, delivered with its stream.
pub(crate) fn stream_in_scope(state: &VmState) -> bool {
    let id = state.frame.effective;
    INFO.is_set()
        && (id == state.frame.ctx || id == state.callout_stream)
        && id != 0
        && state.contexts.contains_key(&id)
}

/// Writes the value of `path` into `out`; `false` when the property does not exist.
pub(crate) fn get(state: &VmState, path: &[u8], out: &mut Vec<u8>) -> bool {
    // Values set by the request's filters come first (Envoy: filter state
    // `wasm.<path>`), then this context's own (outside the stream's phases).
    let trimmed = path.strip_suffix(&[0]).unwrap_or(path);
    if stream_in_scope(state)
        && INFO.with(|info| match info.filter_state.borrow().get(trimmed) {
            Some(v) => {
                out.extend_from_slice(v);
                true
            }
            None => false,
        })
    {
        return true;
    }
    let props = match state.contexts.get(&state.frame.effective) {
        Some(ctx) => &ctx.properties,
        None => &state.root_properties,
    };
    if let Some(v) = props.get(trimmed) {
        out.extend_from_slice(v);
        return true;
    }
    let segs = segments(path);
    let plugin = &state.plugin;
    match segs.as_slice() {
        ["plugin_name"] => out.extend_from_slice(plugin.name.as_bytes()),
        ["plugin_root_id"] => out.extend_from_slice(plugin.root_id.as_bytes()),
        ["plugin_vm_id"] => out.extend_from_slice(plugin.vm_id.as_bytes()),
        ["xds", "node", rest @ ..] => return crate::xds::node(&plugin.node, rest, out),
        _ => {
            if !stream_in_scope(state) {
                return false;
            }
            return INFO.with(|info| stream_property(state, info, &segs, out));
        }
    }
    true
}

/// The peer certificate's facts Envoy names alike under `connection.` and `upstream.`.
const PEER_FIELDS: [&str; 4] = [
    "uri_san_peer_certificate",
    "dns_san_peer_certificate",
    "subject_peer_certificate",
    "sha256_peer_certificate_digest",
];

/// One of [`PEER_FIELDS`] of a TLS session; `false` when there is none (no
/// TLS, no peer certificate, no such SAN).
fn peer_field(tls: Option<&TlsInfo>, field: &str, out: &mut Vec<u8>) -> bool {
    let value = tls.and_then(|t| match field {
        "uri_san_peer_certificate" => t.peer_uri_sans.first().map(String::as_str),
        "dns_san_peer_certificate" => t.peer_dns_sans.first().map(String::as_str),
        "subject_peer_certificate" => t.peer_subject.as_deref(),
        _ => t.peer_cert_sha256.as_deref(),
    });
    value.map(|v| out.extend_from_slice(v.as_bytes())).is_some()
}

fn stream_property(state: &VmState, info: &StreamInfo, segs: &[&str], out: &mut Vec<u8>) -> bool {
    let tls = info.tls.as_deref();
    match segs {
        ["source", "address"] => addr(out, info.downstream_remote),
        ["source", "port"] => int(out, i64::from(info.downstream_remote.port())),
        ["destination", "address"] => addr(out, info.downstream_local),
        ["destination", "port"] => int(out, i64::from(info.downstream_local.port())),
        ["connection", "id"] | ["connection_id"] => uint(out, info.connection_id),
        ["connection", "mtls"] => {
            out.push(u8::from(tls.is_some_and(|t| !t.peer_uri_sans.is_empty() || t.peer_subject.is_some())))
        }
        ["connection", "tls_version"] => {
            out.extend_from_slice(tls.map_or("", |t| t.version.as_str()).as_bytes())
        }
        ["connection", "requested_server_name"] => {
            out.extend_from_slice(tls.and_then(|t| t.server_name.as_deref()).unwrap_or("").as_bytes())
        }
        ["connection", field] if PEER_FIELDS.contains(field) => return peer_field(tls, field, out),
        ["request", "id"] => out.extend_from_slice(info.request_id.as_bytes()),
        ["request", "protocol"] => out.extend_from_slice(protocol(info.protocol).as_bytes()),
        ["request", "time"] => int(out, nanos_since_epoch(info.start_time())),
        ["request", "duration"] => {
            let d = info.start.elapsed();
            int(out, i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        }
        ["request", "size"] => int(out, i64::try_from(info.request_body_bytes.get()).unwrap_or(i64::MAX)),
        ["response", "size"] => int(out, i64::try_from(info.response_body_bytes.get()).unwrap_or(i64::MAX)),
        ["response", "code"] => {
            let code = info.response_code.get().or_else(|| with_response(state, |h| h.status().as_u16()));
            match code {
                Some(c) => int(out, i64::from(c)),
                None => return false,
            }
        }
        ["response", "headers"] => match with_response(state, |h| encode_map(out, MapView::Head(h))) {
            Some(()) => {}
            None => return false,
        },
        ["request", "headers"] => match with_request_map(state, |m| encode_map(out, m)) {
            Some(()) => {}
            None => return false,
        },
        ["request", "path"] => match with_request(state, |p| {
            out.extend_from_slice(p.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes())
        }) {
            Some(()) => {}
            None => return false,
        },
        ["request", "url_path"] => {
            match with_request(state, |p| out.extend_from_slice(p.uri.path().as_bytes())) {
                Some(()) => {}
                None => return false,
            }
        }
        ["request", "query"] => {
            match with_request(state, |p| out.extend_from_slice(p.uri.query().unwrap_or("").as_bytes())) {
                Some(()) => {}
                None => return false,
            }
        }
        ["request", "host"] => match with_request(state, |p| out.extend_from_slice(request_authority(p))) {
            Some(()) => {}
            None => return false,
        },
        ["request", "scheme"] => {
            match with_request(state, |p| out.extend_from_slice(request_scheme(p).as_bytes())) {
                Some(()) => {}
                None => return false,
            }
        }
        ["request", "method"] => {
            match with_request(state, |p| out.extend_from_slice(p.method.as_str().as_bytes())) {
                Some(()) => {}
                None => return false,
            }
        }
        // Envoy's sizes: the head's `byteSize` (names and values) plus the body.
        ["request", "total_size"] => {
            let Some(head) = with_request_map(state, |m| m.byte_size()) else { return false };
            let total = head as u64 + info.request_body_bytes.get();
            int(out, i64::try_from(total).unwrap_or(i64::MAX));
        }
        // The head's part of `*.total_size` (Envoy 1.40, probed: `total_size`
        // less the body).
        ["request", "headers_bytes"] => match with_request_map(state, |m| m.byte_size()) {
            Some(n) => int(out, i64::try_from(n).unwrap_or(i64::MAX)),
            None => return false,
        },
        ["response", "headers_bytes"] => match with_response(state, |h| MapView::Head(h).byte_size()) {
            Some(n) => int(out, i64::try_from(n).unwrap_or(i64::MAX)),
            None => return false,
        },
        ["upstream", "num_endpoints"] => match info.cluster.borrow().as_deref() {
            Some(c) => uint(out, u64::from(c.num_endpoints.load(std::sync::atomic::Ordering::Relaxed))),
            None => return false,
        },
        ["response", "total_size"] => {
            let Some(head) = with_response(state, |h| MapView::Head(h).byte_size()) else { return false };
            let trailers = log_trailers(|t| MapView::Plain(t).byte_size()).unwrap_or(0);
            let total = (head + trailers) as u64 + info.response_body_bytes.get();
            int(out, i64::try_from(total).unwrap_or(i64::MAX));
        }
        // From the trailers (`on_log`), else the head (a trailers-only answer).
        ["response", "grpc_status"] => {
            let parse = |v: &[u8]| std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<i64>().ok());
            let code = log_trailers(|t| t.get("grpc-status").and_then(|v| parse(v.as_bytes())))
                .flatten()
                .or_else(|| {
                    with_response(state, |h| MapView::Head(h).get(b"grpc-status").and_then(parse)).flatten()
                });
            match code {
                Some(c) => int(out, c),
                None => return false,
            }
        }
        ["response", "trailers"] => match log_trailers(|t| encode_map(out, MapView::Plain(t))) {
            Some(()) => {}
            None => return false,
        },
        ["request", "referer"] => return header(out, state, "referer"),
        ["request", "useragent"] => return header(out, state, "user-agent"),
        ["response", "code_details"] => {
            let details = info.code_details.borrow();
            if details.is_empty() && info.response_code.get().is_none() {
                return false;
            }
            out.extend_from_slice(details.as_bytes());
        }
        ["response", "flags"] => uint(out, info.response_flags.get()),
        ["upstream", "request_attempt_count"] => uint(out, u64::from(info.upstream_attempts.get())),
        ["upstream", "address"] => match info.upstream_address.get() {
            Some(a) => addr(out, a),
            None => return false,
        },
        ["upstream", "port"] => match info.upstream_address.get() {
            Some(a) => int(out, i64::from(a.port())),
            None => return false,
        },
        ["upstream", "local_address"] => match info.upstream_local_address.get() {
            Some(a) => addr(out, a),
            None => return false,
        },
        // Not found on a cleartext connection, as on Envoy 1.40 (probed).
        ["upstream", "tls_version"] => match info.upstream_tls.borrow().as_deref() {
            Some(t) => out.extend_from_slice(t.version.as_bytes()),
            None => return false,
        },
        ["upstream", field] if PEER_FIELDS.contains(field) => {
            return peer_field(info.upstream_tls.borrow().as_deref(), field, out);
        }
        ["upstream", "transport_failure_reason"] => match info.upstream_transport_failure.borrow().as_deref()
        {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => return false,
        },
        ["xds", "route_metadata", rest @ ..] => {
            let route = info.route.borrow();
            return crate::xds::metadata(route.as_ref().and_then(|r| r.metadata.as_ref()), rest, out);
        }
        ["xds", "virtual_host_metadata", rest @ ..] => {
            let route = info.route.borrow();
            return crate::xds::metadata(
                route.as_ref().and_then(|r| r.virtual_host_metadata.as_deref()),
                rest,
                out,
            );
        }
        ["xds", "cluster_metadata", rest @ ..] => {
            let cluster = info.cluster.borrow();
            return crate::xds::metadata(cluster.as_ref().and_then(|c| c.metadata.as_ref()), rest, out);
        }
        ["xds", "virtual_host_name"] => match info.route.borrow().as_deref() {
            Some(r) => out.extend_from_slice(r.virtual_host.as_bytes()),
            None => return false,
        },
        ["xds", "route_name"] => match info.route.borrow().as_deref() {
            Some(r) => out.extend_from_slice(r.name.as_bytes()),
            None => return false,
        },
        ["xds", "cluster_name"] => match info.cluster.borrow().as_deref() {
            Some(c) => out.extend_from_slice(c.name.as_bytes()),
            None => return false,
        },
        // Sluice's listeners have no direction: Envoy's UNSPECIFIED.
        ["xds", "listener_direction"] => int(out, 0),
        ["xds", "listener_name"] | ["listener_name"] => out.extend_from_slice(info.listener_name.as_bytes()),
        _ => return false,
    }
    true
}
