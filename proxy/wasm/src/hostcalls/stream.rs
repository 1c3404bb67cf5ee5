//! Stream control: continue, close, local responses. Recorded on the effective
//! context and applied after the callback returns.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use sluice_abi::{Status, StreamType};
use sluice_filter::LocalResponse;
use wasmtime::Caller;

use crate::memory::{HostResult, memory, slice};
use crate::state::{Callback, Deferred, VmState};

fn effective_id(st: &VmState) -> u32 {
    st.frame.effective
}

pub(super) fn continue_stream(c: &mut Caller<'_, VmState>, t: i32) -> HostResult {
    let st = c.data_mut();
    let id = effective_id(st);
    let kind = StreamType::from_u32(t as u32).ok_or(Status::BadArgument)?;
    let Some(ctx) = st.effective_http() else {
        // Nothing to resume on a root context; harmless.
        return Ok(());
    };
    match kind {
        StreamType::HttpRequest => ctx.signal.resume_request = true,
        StreamType::HttpResponse => ctx.signal.resume_response = true,
        // No TCP streams in Sluice.
        StreamType::Downstream | StreamType::Upstream => return Err(Status::BadArgument.into()),
    }
    st.deferred.push(Deferred::Wake(id));
    Ok(())
}

pub(super) fn close_stream(c: &mut Caller<'_, VmState>, t: i32) -> HostResult {
    let st = c.data_mut();
    let id = effective_id(st);
    StreamType::from_u32(t as u32).ok_or(Status::BadArgument)?;
    let Some(ctx) = st.effective_http() else { return Ok(()) };
    ctx.signal.reset = true;
    st.deferred.push(Deferred::Wake(id));
    Ok(())
}

/// ABI 0.1.0 `proxy_clear_route_cache`.
pub(super) fn clear_route_cache(c: &mut Caller<'_, VmState>) -> HostResult {
    if let Some(ctx) = c.data_mut().effective_http() {
        ctx.req_edited = true;
    }
    Ok(())
}

pub(super) fn send_local_response(
    c: &mut Caller<'_, VmState>,
    code: i32,
    details: (i32, i32),
    body: (i32, i32),
    headers: (i32, i32),
    grpc: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let details = String::from_utf8_lossy(slice(data, details.0, details.1)?).into_owned();
    let body = Bytes::copy_from_slice(slice(data, body.0, body.1)?);
    let pairs =
        sluice_abi::pairs::decode(slice(data, headers.0, headers.1)?).map_err(|_| Status::BadArgument)?;
    if pairs.len() > crate::headers::MAX_GUEST_FIELDS {
        tracing::warn!(plugin = %st.plugin.name, fields = pairs.len(), "proxy_send_local_response: too many header fields");
        return Err(Status::BadArgument.into());
    }
    let mut hdrs = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        if k.first() == Some(&b':') {
            continue;
        }
        let name = HeaderName::from_bytes(k).map_err(|_| Status::BadArgument)?;
        let value = HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)?;
        hdrs.push((name, value));
    }
    let status =
        u16::try_from(code).ok().and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Status::BadArgument)?;
    if !(100..=599).contains(&status.as_u16()) {
        return Err(Status::BadArgument.into());
    }
    let grpc_status = u32::try_from(grpc).ok();
    let callback = st.frame.callback;
    let id = st.frame.effective;
    let plugin = st.plugin.clone();
    let Some(ctx) = st.effective_http() else {
        tracing::warn!(plugin = %plugin.name, callback = callback.name(), "proxy_send_local_response outside an HTTP context");
        return Err(Status::BadArgument.into());
    };
    if matches!(callback, Callback::Log | Callback::Done | Callback::Delete) {
        tracing::warn!(plugin = %plugin.name, callback = callback.name(), "local response after the request ended; ignored");
        return Ok(());
    }
    ctx.signal.local = Some(Box::new(LocalResponse { status, headers: hdrs, body, grpc_status, details }));
    st.deferred.push(Deferred::Wake(id));
    Ok(())
}
