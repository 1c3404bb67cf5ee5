//! Header maps and buffers, with their per-phase windows: a map or body is
//! readable and writable while its callback runs (or while the request is paused
//! in it), the final heads are read-only in `on_log`, callout responses are
//! readable in their callback, and configuration buffers in `on_vm_start` /
//! `on_configure`. Outside its window a map reads as empty, a value as
//! NOT_FOUND, and a write is refused with BAD_ARGUMENT.

use sluice_abi::{BufferType, MapType, Status};
use sluice_filter::BodyBuf;
use wasmtime::Caller;

use crate::headers::{MAX_GUEST_FIELDS, MapMut, MapView, Write};
use crate::memory::{HostResult, give, memory, range, slice, store_u32, write_u32};
use crate::module::AbiVersion;
use crate::properties::LogScope;
use crate::state::{Callback, VmState};

/// Calls `f` with a readable view of `map` for the current call.
fn with_map<R>(st: &VmState, map: i32, f: impl FnOnce(MapView<'_>) -> R) -> Result<R, Status> {
    let map = MapType::from_u32(map as u32).ok_or(Status::BadArgument)?;
    // The live request head (its headers phase is running): with the fields
    // the proxy keeps beside its map.
    let id = st.frame.effective;
    if map == MapType::HttpRequestHeaders && id != 0 && st.live.request_owner == id {
        return Ok(crate::properties::request_map(&st.live.request, f));
    }
    let callout = st.callout.as_ref().and_then(|c| c.response.as_ref());
    let view = match map {
        MapType::HttpCallResponseHeaders => callout.map(|r| MapView::Response(&r.head)),
        MapType::HttpCallResponseTrailers | MapType::GrpcReceiveTrailingMetadata => {
            callout.map(|r| MapView::Plain(&r.trailers))
        }
        MapType::GrpcReceiveInitialMetadata => callout.map(|r| MapView::Plain(&r.head.headers)),
        MapType::HttpRequestHeaders => st.req_head(st.frame.effective).map(MapView::Request),
        MapType::HttpResponseHeaders => st.resp_head(st.frame.effective).map(MapView::Head),
        _ => st.contexts.get(&st.frame.effective).and_then(|ctx| match map {
            MapType::HttpRequestTrailers => ctx.req_trailers().map(MapView::Plain),
            _ => ctx.resp_trailers().map(MapView::Plain),
        }),
    };
    if let Some(view) = view {
        return Ok(f(view));
    }
    if st.frame.callback == Callback::Log && st.frame.effective == st.frame.ctx {
        return Ok(LogScope::with_map(map.as_u32(), f).unwrap_or_else(|f| f(MapView::Empty)));
    }
    Ok(f(MapView::Empty))
}

/// What a map edit may add, checked against the guest's quota: at most
/// [`MAX_GUEST_FIELDS`] fields in a map, and per request at most the plugin's
/// memory cap in bytes written into maps. Without it a guest looping on
/// `proxy_add_header_map_value` would grow host memory past its sandbox (or
/// reach the `http` crate's limit, where its maps panic).
#[derive(Clone, Copy)]
enum Growth {
    /// A removal.
    Nothing,
    /// One field written (added or replaced), of `bytes` (name and value).
    One { bytes: usize },
    /// The whole map replaced by `fields` fields of `bytes`.
    All { fields: usize, bytes: usize },
}

/// Calls `f` with a writable view of `map` (BAD_ARGUMENT outside its window, or
/// past the quota: see [`Growth`]). `managed`: the edit may touch a field the
/// proxy manages (`sluice_filter::is_proxy_managed`).
fn with_map_mut<R>(
    st: &mut VmState,
    map: i32,
    managed: bool,
    growth: Growth,
    f: impl FnOnce(&mut MapMut<'_>) -> Result<R, Status>,
) -> Result<R, Status> {
    let kind = MapType::from_u32(map as u32).ok_or(Status::BadArgument)?;
    let (callback, id) = (st.frame.callback, st.frame.effective);
    let VmState { contexts, live, plugin, .. } = st;
    let Some(ctx) = contexts.get_mut(&id) else {
        tracing::warn!(plugin = %plugin.name, callback = callback.name(), map, "header map is not writable here");
        return Err(Status::BadArgument);
    };
    let written = ctx.header_bytes_written;
    let mut map_mut = match kind {
        MapType::HttpRequestHeaders if live.request_owner == id => {
            // An edit of a field the proxy manages moves those it kept aside
            // into the map first; any other leaves them beside it, to be
            // written after the map's fields.
            if managed {
                crate::properties::materialize(&mut live.request.headers);
            }
            Some(MapMut::Request(&mut live.request))
        }
        MapType::HttpRequestHeaders => ctx.req_head_mut().map(MapMut::Request),
        MapType::HttpRequestTrailers => ctx.req_trailers_mut().map(MapMut::Plain),
        MapType::HttpResponseHeaders if live.response_owner == id => {
            Some(MapMut::Response(&mut live.response))
        }
        MapType::HttpResponseHeaders => ctx.resp_head_mut().map(MapMut::Response),
        MapType::HttpResponseTrailers => ctx.resp_trailers_mut().map(MapMut::Plain),
        _ => None,
    };
    let Some(map_mut) = map_mut.as_mut() else {
        tracing::warn!(plugin = %plugin.name, callback = callback.name(), map, "header map is not writable in this callback");
        return Err(Status::BadArgument);
    };
    let (fields, bytes) = match growth {
        Growth::Nothing => (0, 0),
        Growth::One { bytes } => (map_mut.len().saturating_add(1), bytes),
        Growth::All { fields, bytes } => (fields, bytes),
    };
    let cap = usize::try_from(plugin.limits.memory_bytes).unwrap_or(usize::MAX);
    let over = fields > MAX_GUEST_FIELDS || written.saturating_add(bytes) > cap;
    let result = if over { Err(Status::BadArgument) } else { f(map_mut) };
    if over {
        if !std::mem::replace(&mut ctx.quota_hit, true) {
            tracing::warn!(
                plugin = %plugin.name,
                callback = callback.name(),
                map,
                fields,
                bytes_written = written.saturating_add(bytes),
                "header map write refused: over the quota ({MAX_GUEST_FIELDS} fields per map, \
                 limits.memory_bytes ({cap}) bytes written per request)"
            );
        }
        return result;
    }
    if result.is_ok() {
        ctx.header_bytes_written = written.saturating_add(bytes);
        if kind == MapType::HttpRequestHeaders {
            ctx.req_edited = true;
            ctx.req_fields_edited |= managed;
        }
    }
    result
}

/// A short key copied out of guest memory (lowercased) without allocating.
struct Key {
    buf: [u8; 128],
    len: usize,
    heap: Vec<u8>,
}

impl Key {
    fn new(bytes: &[u8]) -> Key {
        let mut k = Key { buf: [0; 128], len: bytes.len(), heap: Vec::new() };
        if bytes.len() <= k.buf.len() {
            k.buf[..bytes.len()].copy_from_slice(bytes);
            k.buf[..bytes.len()].make_ascii_lowercase();
        } else {
            k.heap = bytes.to_ascii_lowercase();
        }
        k
    }

    fn as_slice(&self) -> &[u8] {
        if self.heap.is_empty() { &self.buf[..self.len] } else { &self.heap }
    }
}

pub(super) fn get_pairs(c: &mut Caller<'_, VmState>, map: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let size = with_map(c.data(), map, |v| v.count_and_size().1)?;
    give(c, size, ret_ptr, ret_size, |dst, st| {
        let _ = with_map(st, map, |v| v.encode_into(dst));
    })
}

pub(super) fn get_size(c: &mut Caller<'_, VmState>, map: i32, ret: i32) -> HostResult {
    let size = with_map(c.data(), map, |v| v.byte_size())?;
    store_u32(c, ret, u32::try_from(size).unwrap_or(u32::MAX))
}

pub(super) fn get_value(
    c: &mut Caller<'_, VmState>,
    map: i32,
    kp: i32,
    kn: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let mem = memory(c)?;
    let key = Key::new(slice(mem.data(&*c), kp, kn)?);
    let len = with_map(c.data(), map, |v| v.get(key.as_slice()).map(<[u8]>::len))?;
    match len {
        Some(len) => give(c, len, ret_ptr, ret_size, |dst, st| {
            let _ = with_map(st, map, |v| {
                if let Some(val) = v.get(key.as_slice())
                    && val.len() == dst.len()
                {
                    dst.copy_from_slice(val);
                }
            });
        }),
        // ABI 0.1.0: a missing header is an empty value.
        None if c.data().plugin.abi == AbiVersion::V0_1_0 => give(c, 0, ret_ptr, ret_size, |_, _| {}),
        None => Err(Status::NotFound.into()),
    }
}

pub(super) fn write_value(
    c: &mut Caller<'_, VmState>,
    map: i32,
    kp: i32,
    kn: i32,
    vp: i32,
    vn: i32,
    how: Write,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let key = slice(data, kp, kn)?;
    let value = slice(data, vp, vn)?;
    let growth = Growth::One { bytes: key.len().saturating_add(value.len()) };
    with_map_mut(st, map, sluice_filter::is_proxy_managed(key), growth, |m| m.write(key, value, how))?;
    Ok(())
}

pub(super) fn remove_value(c: &mut Caller<'_, VmState>, map: i32, kp: i32, kn: i32) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let key = slice(data, kp, kn)?;
    with_map_mut(st, map, sluice_filter::is_proxy_managed(key), Growth::Nothing, |m| {
        m.remove(key);
        Ok(())
    })?;
    Ok(())
}

pub(super) fn set_pairs(c: &mut Caller<'_, VmState>, map: i32, p: i32, n: i32) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let bytes = slice(data, p, n)?;
    let pairs = sluice_abi::pairs::decode(bytes).map_err(|_| Status::BadArgument)?;
    // The whole map is replaced: the kept fields go with it unless given back.
    let growth = Growth::All { fields: pairs.len(), bytes: bytes.len() };
    with_map_mut(st, map, true, growth, |m| m.replace_all(&pairs))?;
    Ok(())
}

/// The bytes of buffer `t` visible to the current call.
fn buffer(st: &VmState, t: i32) -> Result<&[u8], Status> {
    let t = BufferType::from_u32(t as u32).ok_or(Status::BadArgument)?;
    let ctx = st.contexts.get(&st.frame.effective);
    let found: Option<&[u8]> = match t {
        BufferType::HttpRequestBody => ctx.and_then(|c| c.req_body().map(|b| &b[..])),
        BufferType::HttpResponseBody => ctx.and_then(|c| c.resp_body().map(|b| &b[..])),
        BufferType::HttpCallResponseBody => {
            st.callout.as_ref().and_then(|c| c.response.as_ref()).map(|r| &r.body[..])
        }
        BufferType::GrpcReceiveBuffer => st.callout.as_ref().map(|c| &c.grpc_message[..]),
        BufferType::VmConfiguration if st.frame.callback == Callback::VmStart => {
            Some(&st.plugin.vm_config[..])
        }
        BufferType::PluginConfiguration if st.frame.callback == Callback::Configure => {
            Some(&st.plugin.plugin_config[..])
        }
        _ => None,
    };
    found.ok_or(Status::NotFound)
}

pub(super) fn get_buffer_bytes(
    c: &mut Caller<'_, VmState>,
    t: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let total = buffer(c.data(), t)?.len() as u64;
    // Clamp in u64: the SDK asks for u32::MAX bytes of configuration.
    let start = u64::from(start as u32);
    let len = if start >= total { 0 } else { u64::from(max as u32).min(total - start) };
    let (start, len) = (start as usize, len as usize);
    give(c, len, ret_ptr, ret_size, |dst, st| {
        if let Ok(buf) = buffer(st, t)
            && let Some(src) = buf.get(start..start + len)
            && src.len() == dst.len()
        {
            dst.copy_from_slice(src);
        }
    })
}

pub(super) fn get_buffer_status(
    c: &mut Caller<'_, VmState>,
    t: i32,
    ret_size: i32,
    ret_flags: i32,
) -> HostResult {
    let len = buffer(c.data(), t)?.len();
    let mem = memory(c)?;
    let data = mem.data_mut(&mut *c);
    range(data.len(), ret_flags, 4)?;
    write_u32(data, ret_size, u32::try_from(len).unwrap_or(u32::MAX))?;
    write_u32(data, ret_flags, 0)?;
    Ok(())
}

/// Replaces `size` bytes at `start` with the data: `(0, 0)` prepends, `(0, ≥len)`
/// replaces everything, `start ≥ len` appends (Envoy's three cases), and any other
/// range is spliced. A body still shared with the connection's read buffer is
/// copied first unless it is replaced whole.
fn splice(buf: &mut BodyBuf, start: u64, size: u64, data: &[u8]) {
    let len = buf.len() as u64;
    let start = start.min(len);
    let end = start.saturating_add(size).min(len);
    let (start, end) = (start as usize, end as usize);
    if start == 0 && end == buf.len() {
        buf.clear();
        buf.extend_from_slice(data);
    } else if start == buf.len() {
        buf.extend_from_slice(data);
    } else {
        buf.edit(|buf| {
            let tail = buf.split_off(end);
            buf.truncate(start);
            buf.extend_from_slice(data);
            buf.unsplit(tail);
        });
    }
}

pub(super) fn set_buffer_bytes(
    c: &mut Caller<'_, VmState>,
    t: i32,
    start: i32,
    size: i32,
    p: i32,
    n: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let bytes = slice(data, p, n)?;
    let cap = usize::try_from(st.plugin.limits.memory_bytes).unwrap_or(usize::MAX);
    let kind = BufferType::from_u32(t as u32).ok_or(Status::BadArgument)?;
    let Some(ctx) = st.effective_http() else { return Err(Status::NotFound.into()) };
    let buf = match kind {
        BufferType::HttpRequestBody => ctx.req_body_mut(),
        BufferType::HttpResponseBody => ctx.resp_body_mut(),
        _ => return Err(Status::BadArgument.into()),
    };
    let buf = buf.ok_or(Status::NotFound)?;
    if buf.len().saturating_add(bytes.len()) > cap {
        return Err(Status::BadArgument.into());
    }
    splice(buf, u64::from(start as u32), u64::from(size as u32), bytes);
    Ok(())
}

/// ABI 0.1.0: the plugin configuration, readable in `on_configure`.
pub(super) fn get_configuration(c: &mut Caller<'_, VmState>, ret_ptr: i32, ret_size: i32) -> HostResult {
    let len = buffer(c.data(), BufferType::PluginConfiguration as i32)?.len();
    give(c, len, ret_ptr, ret_size, |dst, st| {
        if let Ok(buf) = buffer(st, BufferType::PluginConfiguration as i32)
            && buf.len() == dst.len()
        {
            dst.copy_from_slice(buf);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::splice;
    use bytes::Bytes;
    use sluice_filter::BodyBuf;

    #[test]
    fn splice_covers_envoys_cases() {
        let run = |start, size, data: &[u8]| {
            let read_buf = Bytes::from_static(b"hello, and more");
            let mut b = BodyBuf::from(read_buf.slice(..5));
            splice(&mut b, start, size, data);
            // The buffer the chunk came from is never written through it.
            assert_eq!(&read_buf[..], b"hello, and more");
            b
        };
        assert_eq!(&run(0, 0, b">")[..], b">hello");
        assert_eq!(&run(0, 5, b"bye")[..], b"bye");
        assert_eq!(&run(0, u64::from(u32::MAX), b"bye")[..], b"bye");
        assert_eq!(&run(5, 0, b"!")[..], b"hello!");
        assert_eq!(&run(99, 3, b"!")[..], b"hello!");
        assert_eq!(&run(1, 3, b"EL")[..], b"hELo");
    }
}
