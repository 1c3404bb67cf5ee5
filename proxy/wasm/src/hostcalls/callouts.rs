//! HTTP and unary gRPC callouts: validated and recorded here, started after the
//! callback returns, answered to the root context (`on_http_call_response`,
//! `on_grpc_receive` / `on_grpc_close`).

use std::time::Duration;

use bytes::Bytes;
use sluice_abi::Status;
use wasmtime::Caller;

use crate::memory::{HostResult, memory, range, slice, write_u32};
use crate::state::{Deferred, VmState};

/// Callouts one VM may have in flight.
const MAX_IN_FLIGHT: usize = 1024;

fn utf8(b: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(b).map_err(|_| Status::BadArgument)
}

fn known(st: &VmState, cluster: &str) -> bool {
    st.plugin.clusters.iter().any(|c| c == cluster)
}

fn check_cluster(st: &VmState, cluster: &str) -> Result<(), Status> {
    if known(st, cluster) {
        return Ok(());
    }
    tracing::warn!(plugin = %st.plugin.name, cluster, "callout to an unknown cluster");
    Err(Status::BadArgument)
}

/// `envoy.config.core.v3.GrpcService`, the fields a gRPC callout's upstream
/// may name its cluster with (C++ SDK filters send it serialized).
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
}

/// The cluster of a gRPC callout, as Envoy reads `upstream`: a cluster's name,
/// or a serialized `GrpcService` whose `envoy_grpc` names it. An unknown
/// cluster is PARSE_FAILURE (Envoy's answer; the Rust SDK panics on anything
/// but OK, PARSE_FAILURE and INTERNAL_FAILURE), and so is a `GrpcService`
/// naming no cluster (`google_grpc`, which Sluice cannot call, or a name that
/// happens to parse as one).
fn grpc_cluster(st: &VmState, upstream: &[u8]) -> Result<String, Status> {
    if let Ok(name) = std::str::from_utf8(upstream)
        && known(st, name)
    {
        return Ok(name.to_owned());
    }
    let name = match <GrpcService as prost::Message>::decode(upstream) {
        Ok(GrpcService { envoy_grpc: Some(e) }) => e.cluster_name,
        _ => String::from_utf8_lossy(upstream).into_owned(),
    };
    if known(st, &name) {
        return Ok(name);
    }
    tracing::warn!(plugin = %st.plugin.name, cluster = %name, "gRPC callout to an unknown cluster");
    Err(Status::ParseFailure)
}

fn timeout(st: &VmState, ms: i32) -> Duration {
    match u64::from(ms as u32) {
        0 => st.plugin.limits.pause_timeout,
        ms => Duration::from_millis(ms),
    }
}

fn start(
    st: &mut VmState,
    cluster: String,
    request: http::Request<Bytes>,
    timeout: Duration,
    grpc: bool,
) -> Result<u32, Status> {
    if st.pending_callouts.len() >= MAX_IN_FLIGHT {
        return Err(Status::InternalFailure);
    }
    let token = st.next_token;
    st.next_token = st.next_token.wrapping_add(1).max(1);
    st.pending_callouts.insert(token, grpc);
    let stream = if crate::properties::stream_in_scope(st) { st.frame.effective } else { 0 };
    st.deferred.push(Deferred::Callout { token, cluster, request: Box::new(request), timeout, grpc, stream });
    Ok(token)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn http_call(
    c: &mut Caller<'_, VmState>,
    upstream: (i32, i32),
    headers: (i32, i32),
    body: (i32, i32),
    _trailers: (i32, i32),
    timeout_ms: i32,
    ret_token: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret_token, 4)?;
    let cluster = utf8(slice(data, upstream.0, upstream.1)?)?;
    check_cluster(st, cluster)?;
    let pairs =
        sluice_abi::pairs::decode(slice(data, headers.0, headers.1)?).map_err(|_| Status::BadArgument)?;
    let find = |name: &[u8]| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let (Some(method), Some(path), Some(authority)) = (find(b":method"), find(b":path"), find(b":authority"))
    else {
        return Err(Status::BadArgument.into());
    };
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(method).map_err(|_| Status::BadArgument)?)
        .uri(http::Uri::try_from(path).map_err(|_| Status::BadArgument)?)
        .header(
            http::header::HOST,
            http::HeaderValue::from_bytes(authority).map_err(|_| Status::BadArgument)?,
        );
    for (k, v) in &pairs {
        if k.first() == Some(&b':') || k.eq_ignore_ascii_case(b"host") {
            continue;
        }
        let name = http::HeaderName::from_bytes(k).map_err(|_| Status::BadArgument)?;
        let value = http::HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)?;
        builder = builder.header(name, value);
    }
    let body = Bytes::copy_from_slice(slice(data, body.0, body.1)?);
    let request = builder.body(body).map_err(|_| Status::BadArgument)?;
    let timeout = timeout(st, timeout_ms);
    let token = start(st, cluster.to_string(), request, timeout, false)?;
    write_u32(data, ret_token, token)?;
    Ok(())
}

/// `parts` = upstream, service, method, initial metadata, message.
pub(super) fn grpc_call(
    c: &mut Caller<'_, VmState>,
    parts: [(i32, i32); 5],
    timeout_ms: i32,
    ret_token: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret_token, 4)?;
    let [up, service, method, metadata, message] = parts;
    let cluster = grpc_cluster(st, slice(data, up.0, up.1)?)?;
    // PARSE_FAILURE, not BAD_ARGUMENT, for the same reason as the cluster's.
    fn text(b: &[u8]) -> Result<&str, Status> {
        std::str::from_utf8(b).map_err(|_| Status::ParseFailure)
    }
    let service = text(slice(data, service.0, service.1)?)?;
    let method = text(slice(data, method.0, method.1)?)?;
    let metadata =
        sluice_abi::pairs::decode(slice(data, metadata.0, metadata.1)?).map_err(|_| Status::ParseFailure)?;
    let message = slice(data, message.0, message.1)?;
    let timeout = timeout(st, timeout_ms);
    let request = crate::callout::grpc_request(&cluster, service, method, &metadata, message, timeout)
        .ok_or(Status::ParseFailure)?;
    let token = start(st, cluster, request, timeout, true)?;
    write_u32(data, ret_token, token)?;
    Ok(())
}

/// `proxy_grpc_cancel` / `proxy_grpc_close` on a unary call: no callback follows.
pub(super) fn cancel(c: &mut Caller<'_, VmState>, token: i32) -> HostResult {
    match c.data_mut().pending_callouts.remove(&(token as u32)) {
        Some(_) => Ok(()),
        None => Err(Status::NotFound.into()),
    }
}
