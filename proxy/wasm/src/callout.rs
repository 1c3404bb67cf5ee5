//! Work that happens after a callback returns: waking paused requests, starting
//! callouts, timers and queue notifications as `spawn_local` tasks on the worker,
//! and delivering their results back into the VM (never from inside a host call).

use std::rc;
use std::sync::Weak;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, StatusCode};
use sluice_filter::{CalloutError, CalloutResponse, StreamInfo, StreamOwner};

use crate::factory::FactoryInner;
use crate::properties::INFO;
use crate::state::{CalloutData, Deferred};
use crate::vm::{Vm, VmFailure};

/// Applies the work host calls recorded during the last callback (most
/// callbacks leave none: that check is inlined into the caller). `info`: the
/// stream info of the request whose phase (or `on_log`) the callback was.
#[inline]
pub(crate) fn flush(inner: &FactoryInner, vm: &mut Vm, info: Option<&StreamInfo>) {
    if !vm.store.data().deferred.is_empty() {
        flush_deferred(inner, vm, info);
    }
}

fn flush_deferred(inner: &FactoryInner, vm: &mut Vm, info: Option<&StreamInfo>) {
    let mut list = std::mem::take(&mut vm.store.data_mut().deferred);
    let worker = vm.store.data().worker;
    for item in list.drain(..) {
        match item {
            Deferred::Wake(id) => {
                if let Some(w) = vm.store.data_mut().contexts.get_mut(&id).and_then(|c| c.waker.take()) {
                    w.wake();
                }
            }
            Deferred::Callout { token, cluster, request, timeout, grpc, stream } => {
                if worker {
                    // The answer's callback reads the request's facts (its
                    // properties) as it would in the phase that made the call.
                    let stream = (stream != 0)
                        .then(|| info.and_then(StreamInfo::owner))
                        .flatten()
                        .map(|o| (stream, o));
                    let call = Callout { token, cluster: &cluster, request: *request, timeout, grpc, stream };
                    spawn_callout(inner, vm.generation, call);
                } else {
                    // The validation VM never runs callouts; the worker VMs make their own.
                    vm.store.data_mut().pending_callouts.remove(&token);
                }
            }
            Deferred::Tick => {
                vm.tick_generation += 1;
                if worker {
                    spawn_tick(inner, vm);
                }
            }
            Deferred::Mailbox(rx) => {
                if worker {
                    spawn_mailbox(inner, vm.generation, rx);
                }
            }
        }
    }
    let st = vm.store.data_mut();
    if st.deferred.is_empty() {
        st.deferred = list;
    }
}

/// Runs `f` on this worker's VM if it is still generation `generation`; applies the
/// fail policy when the callback fails.
/// `f` returns `Ok(false)` to stop a task without failing the VM.
fn with_vm(
    weak: &Weak<FactoryInner>,
    generation: u64,
    info: Option<&StreamInfo>,
    f: impl FnOnce(&mut Vm) -> Result<bool, VmFailure>,
) -> bool {
    let Some(inner) = weak.upgrade() else { return false };
    let Ok(mut guard) = inner.slot().try_borrow_mut() else { return true };
    let slot = &mut *guard;
    let Some(vm) = slot.vm.as_mut().filter(|vm| vm.generation == generation) else { return false };
    match f(vm) {
        Ok(go_on) => {
            flush(&inner, vm, info);
            go_on
        }
        Err(failure) => {
            slot.fail(&inner, failure);
            false
        }
    }
}

/// A callout to start (see [`spawn_callout`]).
struct Callout<'a> {
    token: u32,
    cluster: &'a str,
    request: http::Request<Bytes>,
    timeout: Duration,
    grpc: bool,
    /// The HTTP context that made it and its request's owner.
    stream: Option<(u32, rc::Weak<dyn StreamOwner>)>,
}

fn spawn_callout(inner: &FactoryInner, generation: u64, call: Callout<'_>) {
    let Callout { token, cluster, request, timeout, grpc, stream } = call;
    let plugin = inner.plugin.clone();
    let call = plugin.host.callouts.call(cluster, request, timeout);
    let weak = inner.weak.clone();
    tokio::task::spawn_local(async move {
        // The client enforces the timeout; this is the backstop for one that does not.
        let result = match tokio::time::timeout(timeout + Duration::from_secs(1), call).await {
            Ok(r) => r,
            Err(_) => Err(CalloutError::Timeout),
        };
        let kind = if grpc { "grpc" } else { "http" };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CalloutError::Timeout) => "timeout",
            Err(_) => "error",
        };
        plugin.host.metrics.callouts.with_label_values(&[&*plugin.name, kind, outcome]).inc();
        if matches!(result, Err(CalloutError::Timeout)) {
            plugin.host.metrics.timeouts.with_label_values(&[&*plugin.name, "callout"]).inc();
        }
        drop(plugin);
        // The request, if it is still on.
        let stream = stream.and_then(|(ctx, owner)| owner.upgrade().map(|o| (ctx, o)));
        let info = stream.as_ref().map(|(_, owner)| owner.stream_info());
        with_vm(&weak, generation, info, |vm| {
            if vm.store.data_mut().pending_callouts.remove(&token).is_none() {
                return Ok(true); // cancelled
            }
            let deliver = |vm: &mut Vm| {
                if grpc { deliver_grpc(vm, token, result) } else { deliver_http(vm, token, result) }
            };
            match &stream {
                Some((ctx, owner)) => {
                    vm.store.data_mut().callout_stream = *ctx;
                    let r = INFO.set(owner.stream_info(), || deliver(vm));
                    vm.store.data_mut().callout_stream = 0;
                    r
                }
                None => deliver(vm),
            }
            .map(|()| true)
        });
    });
}

/// A failed HTTP callout is reported as a synthetic response, as Envoy 1.40 does:
/// 504 for a timeout, 503 otherwise, with `x-sluice-callout-error`.
fn synthetic(err: &CalloutError) -> CalloutResponse {
    let (status, body, reason) = match err {
        CalloutError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout", "timeout"),
        CalloutError::UnknownCluster(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "unknown_cluster")
        }
        CalloutError::Upstream(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers",
            "upstream",
        ),
    };
    let mut head = crate::state::empty_response();
    head.status = status;
    head.headers.insert("content-type", HeaderValue::from_static("text/plain"));
    head.headers.insert("x-sluice-callout-error", HeaderValue::from_static(reason));
    CalloutResponse { head, body: Bytes::from_static(body.as_bytes()), trailers: HeaderMap::new() }
}

fn deliver_http(
    vm: &mut Vm,
    token: u32,
    result: Result<CalloutResponse, CalloutError>,
) -> Result<(), VmFailure> {
    let response = result.unwrap_or_else(|e| synthetic(&e));
    let headers = response.head.headers.len() + 1;
    let body = response.body.len();
    let trailers = response.trailers.len();
    vm.store.data_mut().callout = Some(CalloutData {
        response: Some(response),
        grpc_message: Bytes::new(),
        status: (0, String::new()),
    });
    let r = vm.http_call_response(token, headers, body, trailers);
    vm.store.data_mut().callout = None;
    r
}

/// gRPC status codes from HTTP statuses (gRPC's HTTP-to-gRPC mapping).
fn grpc_from_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

fn grpc_header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Reads a unary gRPC response: `Ok(message)` or `Err((code, message))`.
fn parse_grpc(response: &CalloutResponse) -> Result<Bytes, (u32, String)> {
    if response.head.status != StatusCode::OK {
        return Err((
            grpc_from_http(response.head.status),
            format!("http status {}", response.head.status.as_u16()),
        ));
    }
    // Trailers-only responses carry the status in the headers.
    let status = grpc_header(&response.trailers, "grpc-status")
        .or_else(|| grpc_header(&response.head.headers, "grpc-status"));
    let message = grpc_header(&response.trailers, "grpc-message")
        .or_else(|| grpc_header(&response.head.headers, "grpc-message"))
        .unwrap_or_default();
    let code = match status {
        Some(s) => s.trim().parse::<u32>().unwrap_or(2),
        None => return Err((13, "missing grpc-status".into())),
    };
    if code != 0 {
        return Err((code, message));
    }
    let mut body = response.body.clone();
    if body.is_empty() {
        return Ok(Bytes::new());
    }
    if body.len() < 5 {
        return Err((13, "truncated gRPC frame".into()));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err((12, "compressed gRPC responses are not supported".into()));
    }
    if body.len() < len {
        return Err((13, "truncated gRPC message".into()));
    }
    Ok(body.split_to(len))
}

fn deliver_grpc(
    vm: &mut Vm,
    token: u32,
    result: Result<CalloutResponse, CalloutError>,
) -> Result<(), VmFailure> {
    let (parsed, response) = match result {
        Ok(response) => (parse_grpc(&response), Some(response)),
        Err(CalloutError::Timeout) => (Err((4, "deadline exceeded".into())), None),
        Err(e) => (Err((14, e.to_string())), None),
    };
    let r = match parsed {
        Ok(message) => {
            let size = message.len();
            vm.store.data_mut().callout =
                Some(CalloutData { response, grpc_message: message, status: (0, String::new()) });
            vm.grpc_receive(token, size)
        }
        Err((code, message)) => {
            vm.store.data_mut().callout =
                Some(CalloutData { response, grpc_message: Bytes::new(), status: (code, message) });
            vm.grpc_close(token, code)
        }
    };
    vm.store.data_mut().callout = None;
    r
}

/// Frames a unary gRPC request over HTTP/2.
pub(crate) fn grpc_request(
    authority: &str,
    service: &str,
    method: &str,
    metadata: &[(&[u8], &[u8])],
    message: &[u8],
    timeout: Duration,
) -> Option<http::Request<Bytes>> {
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len()).ok()?.to_be_bytes());
    body.extend_from_slice(message);
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/{service}/{method}"))
        .version(http::Version::HTTP_2)
        .header("host", authority)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if !timeout.is_zero() {
        req = req.header("grpc-timeout", format!("{}m", timeout.as_millis().max(1)));
    }
    for (k, v) in metadata {
        if k.first() == Some(&b':') {
            continue;
        }
        req = req.header(*k, *v);
    }
    req.body(Bytes::from(body)).ok()
}

fn spawn_tick(inner: &FactoryInner, vm: &Vm) {
    let Some(period) = vm.store.data().tick_period.filter(|p| !p.is_zero()) else { return };
    let (generation, tick_generation, weak) = (vm.generation, vm.tick_generation, inner.weak.clone());
    tokio::task::spawn_local(async move {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let alive = with_vm(&weak, generation, None, |vm| {
                if vm.tick_generation == tick_generation { vm.tick().map(|()| true) } else { Ok(false) }
            });
            if !alive {
                return;
            }
        }
    });
}

fn spawn_mailbox(inner: &FactoryInner, generation: u64, mut rx: tokio::sync::mpsc::UnboundedReceiver<u32>) {
    let weak = inner.weak.clone();
    tokio::task::spawn_local(async move {
        while let Some(queue) = rx.recv().await {
            if !with_vm(&weak, generation, None, |vm| vm.queue_ready(queue).map(|()| true)) {
                return;
            }
        }
    });
}
