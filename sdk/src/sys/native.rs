//! Native twin of `sys/ffi.rs`: the same safe functions, routed to the host
//! installed on this thread (the test kit's `TestHost`), so filter code runs under
//! `cargo test` unchanged. Without an installed host every call returns
//! `UNIMPLEMENTED`.

use std::cell::RefCell;
use std::rc::Rc;

use sluice_abi::Status;

type Raw = Result<(), u32>;

/// A host implemented in Rust, at the ABI's level: raw statuses, pairs-encoded maps.
///
/// This is what the test kit implements; it is public only so that other native
/// hosts can be written, and is not part of the filter-author API.
#[doc(hidden)]
#[allow(missing_docs)]
pub trait NativeHost {
    fn log(&mut self, level: u32, msg: &str) -> Raw;
    fn get_log_level(&mut self) -> Result<u32, u32>;
    fn get_current_time_nanos(&mut self) -> Result<u64, u32>;
    fn set_tick_period_ms(&mut self, ms: u32) -> Raw;
    fn set_effective_context(&mut self, id: u32) -> Raw;
    fn done(&mut self) -> Raw;
    fn get_buffer_bytes(&mut self, ty: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, u32>;
    fn get_buffer_status(&mut self, ty: u32) -> Result<(usize, u32), u32>;
    fn set_buffer_bytes(&mut self, ty: u32, start: usize, size: usize, data: &[u8]) -> Raw;
    fn get_header_map_pairs(&mut self, map: u32) -> Result<Option<Vec<u8>>, u32>;
    fn set_header_map_pairs(&mut self, map: u32, data: &[u8]) -> Raw;
    fn get_header_map_size(&mut self, map: u32) -> Result<usize, u32>;
    fn get_header_map_value(&mut self, map: u32, key: &[u8]) -> Result<Option<Vec<u8>>, u32>;
    fn add_header_map_value(&mut self, map: u32, key: &[u8], value: &[u8]) -> Raw;
    fn replace_header_map_value(&mut self, map: u32, key: &[u8], value: &[u8]) -> Raw;
    fn remove_header_map_value(&mut self, map: u32, key: &[u8]) -> Raw;
    fn continue_stream(&mut self, ty: u32) -> Raw;
    fn close_stream(&mut self, ty: u32) -> Raw;
    fn send_local_response(
        &mut self,
        status: u32,
        details: &[u8],
        body: &[u8],
        headers: &[u8],
        grpc: i32,
    ) -> Raw;
    fn get_status(&mut self) -> Result<(u32, Option<Vec<u8>>), u32>;
    fn http_call(
        &mut self,
        upstream: &[u8],
        headers: &[u8],
        body: &[u8],
        trailers: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, u32>;
    fn grpc_call(
        &mut self,
        upstream: &[u8],
        service: &[u8],
        method: &[u8],
        metadata: &[u8],
        message: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, u32>;
    fn grpc_stream(
        &mut self,
        upstream: &[u8],
        service: &[u8],
        method: &[u8],
        metadata: &[u8],
    ) -> Result<u32, u32>;
    fn grpc_send(&mut self, token: u32, message: &[u8], end_stream: bool) -> Raw;
    fn grpc_cancel(&mut self, token: u32) -> Raw;
    fn grpc_close(&mut self, token: u32) -> Raw;
    fn get_shared_data(&mut self, key: &[u8]) -> Result<(Option<Vec<u8>>, u32), u32>;
    fn set_shared_data(&mut self, key: &[u8], value: &[u8], cas: u32) -> Raw;
    fn register_shared_queue(&mut self, name: &[u8]) -> Result<u32, u32>;
    fn resolve_shared_queue(&mut self, vm_id: &[u8], name: &[u8]) -> Result<u32, u32>;
    fn enqueue_shared_queue(&mut self, id: u32, data: &[u8]) -> Raw;
    fn dequeue_shared_queue(&mut self, id: u32) -> Result<Option<Vec<u8>>, u32>;
    fn define_metric(&mut self, ty: u32, name: &[u8]) -> Result<u32, u32>;
    fn increment_metric(&mut self, id: u32, delta: i64) -> Raw;
    fn record_metric(&mut self, id: u32, value: u64) -> Raw;
    fn get_metric(&mut self, id: u32) -> Result<u64, u32>;
    fn get_property(&mut self, path: &[u8]) -> Result<Option<Vec<u8>>, u32>;
    fn set_property(&mut self, path: &[u8], value: &[u8]) -> Raw;
    fn call_foreign_function(&mut self, name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, u32>;
}

/// The host shared between the test kit and this thread's host-call layer.
pub(crate) type SharedHost = Rc<RefCell<dyn NativeHost>>;

thread_local! {
    static HOST: RefCell<Option<SharedHost>> = const { RefCell::new(None) };
}

/// Installs `host` for this thread until the guard drops (restoring the previous one).
pub(crate) fn install(host: SharedHost) -> HostGuard {
    let previous = HOST.with(|h| h.borrow_mut().replace(host));
    HostGuard { previous }
}

/// Restores the previously installed host on drop.
pub(crate) struct HostGuard {
    previous: Option<SharedHost>,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        HOST.with(|h| *h.borrow_mut() = previous);
    }
}

fn with<T>(f: impl FnOnce(&mut dyn NativeHost) -> Result<T, u32>) -> Result<T, u32> {
    let host = HOST.with(|h| h.borrow().clone());
    match host {
        Some(host) => match host.try_borrow_mut() {
            Ok(mut h) => f(&mut *h),
            // A host call while the host is busy would be re-entrancy: refuse it.
            Err(_) => Err(Status::InternalFailure.as_u32()),
        },
        None => Err(Status::Unimplemented.as_u32()),
    }
}

pub(crate) fn call_ctors() {}

pub(crate) fn log(level: u32, msg: &str) -> Raw {
    with(|h| h.log(level, msg))
}
pub(crate) fn get_log_level() -> Result<u32, u32> {
    with(|h| h.get_log_level())
}
pub(crate) fn get_current_time_nanos() -> Result<u64, u32> {
    with(|h| h.get_current_time_nanos())
}
pub(crate) fn set_tick_period_ms(ms: u32) -> Raw {
    with(|h| h.set_tick_period_ms(ms))
}
pub(crate) fn set_effective_context(id: u32) -> Raw {
    with(|h| h.set_effective_context(id))
}
pub(crate) fn done() -> Raw {
    with(|h| h.done())
}
pub(crate) fn get_buffer_bytes(ty: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.get_buffer_bytes(ty, start, max))
}
pub(crate) fn get_buffer_status(ty: u32) -> Result<(usize, u32), u32> {
    with(|h| h.get_buffer_status(ty))
}
pub(crate) fn set_buffer_bytes(ty: u32, start: usize, size: usize, data: &[u8]) -> Raw {
    with(|h| h.set_buffer_bytes(ty, start, size, data))
}
pub(crate) fn get_header_map_pairs(map: u32) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.get_header_map_pairs(map))
}
pub(crate) fn set_header_map_pairs(map: u32, data: &[u8]) -> Raw {
    with(|h| h.set_header_map_pairs(map, data))
}
pub(crate) fn get_header_map_size(map: u32) -> Result<usize, u32> {
    with(|h| h.get_header_map_size(map))
}
pub(crate) fn get_header_map_value(map: u32, key: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.get_header_map_value(map, key))
}
pub(crate) fn add_header_map_value(map: u32, key: &[u8], value: &[u8]) -> Raw {
    with(|h| h.add_header_map_value(map, key, value))
}
pub(crate) fn replace_header_map_value(map: u32, key: &[u8], value: &[u8]) -> Raw {
    with(|h| h.replace_header_map_value(map, key, value))
}
pub(crate) fn remove_header_map_value(map: u32, key: &[u8]) -> Raw {
    with(|h| h.remove_header_map_value(map, key))
}
pub(crate) fn continue_stream(ty: u32) -> Raw {
    with(|h| h.continue_stream(ty))
}
pub(crate) fn close_stream(ty: u32) -> Raw {
    with(|h| h.close_stream(ty))
}
pub(crate) fn send_local_response(
    status: u32,
    details: &[u8],
    body: &[u8],
    headers: &[u8],
    grpc: i32,
) -> Raw {
    with(|h| h.send_local_response(status, details, body, headers, grpc))
}
pub(crate) fn get_status() -> Result<(u32, Option<Vec<u8>>), u32> {
    with(|h| h.get_status())
}
pub(crate) fn http_call(
    upstream: &[u8],
    headers: &[u8],
    body: &[u8],
    trailers: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    with(|h| h.http_call(upstream, headers, body, trailers, timeout_ms))
}
pub(crate) fn grpc_call(
    upstream: &[u8],
    service: &[u8],
    method: &[u8],
    metadata: &[u8],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    with(|h| h.grpc_call(upstream, service, method, metadata, message, timeout_ms))
}
pub(crate) fn grpc_stream(
    upstream: &[u8],
    service: &[u8],
    method: &[u8],
    metadata: &[u8],
) -> Result<u32, u32> {
    with(|h| h.grpc_stream(upstream, service, method, metadata))
}
pub(crate) fn grpc_send(token: u32, message: &[u8], end_stream: bool) -> Raw {
    with(|h| h.grpc_send(token, message, end_stream))
}
pub(crate) fn grpc_cancel(token: u32) -> Raw {
    with(|h| h.grpc_cancel(token))
}
pub(crate) fn grpc_close(token: u32) -> Raw {
    with(|h| h.grpc_close(token))
}
pub(crate) fn get_shared_data(key: &[u8]) -> Result<(Option<Vec<u8>>, u32), u32> {
    with(|h| h.get_shared_data(key))
}
pub(crate) fn set_shared_data(key: &[u8], value: &[u8], cas: u32) -> Raw {
    with(|h| h.set_shared_data(key, value, cas))
}
pub(crate) fn register_shared_queue(name: &[u8]) -> Result<u32, u32> {
    with(|h| h.register_shared_queue(name))
}
pub(crate) fn resolve_shared_queue(vm_id: &[u8], name: &[u8]) -> Result<u32, u32> {
    with(|h| h.resolve_shared_queue(vm_id, name))
}
pub(crate) fn enqueue_shared_queue(id: u32, data: &[u8]) -> Raw {
    with(|h| h.enqueue_shared_queue(id, data))
}
pub(crate) fn dequeue_shared_queue(id: u32) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.dequeue_shared_queue(id))
}
pub(crate) fn define_metric(ty: u32, name: &[u8]) -> Result<u32, u32> {
    with(|h| h.define_metric(ty, name))
}
pub(crate) fn increment_metric(id: u32, delta: i64) -> Raw {
    with(|h| h.increment_metric(id, delta))
}
pub(crate) fn record_metric(id: u32, value: u64) -> Raw {
    with(|h| h.record_metric(id, value))
}
pub(crate) fn get_metric(id: u32) -> Result<u64, u32> {
    with(|h| h.get_metric(id))
}
pub(crate) fn get_property(path: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.get_property(path))
}
pub(crate) fn set_property(path: &[u8], value: &[u8]) -> Raw {
    with(|h| h.set_property(path, value))
}
pub(crate) fn call_foreign_function(name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    with(|h| h.call_foreign_function(name, args))
}
