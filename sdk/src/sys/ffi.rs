//! The one unsafe module of the SDK: raw proxy-wasm v0.2.1 imports (module `env`)
//! wrapped into safe functions, and the `#[no_mangle]` exports the host calls,
//! which forward to the safe dispatcher in [`crate::dispatch`].
//!
//! Every function here has the same signature as its twin in `sys/native.rs`, which
//! routes the calls to the native test host instead.
//!
//! Memory protocol: data the host returns lives in a region it obtained from our
//! allocator export (`proxy_on_memory_allocate` / `malloc`), one call of exactly
//! `len` bytes. We take ownership with `Vec::from_raw_parts(ptr, len, len)`, which
//! frees it with the same (size `len`, align 1) layout it was allocated with.
#![allow(unsafe_code)]

use std::ptr::null_mut;

use crate::dispatch;

type Raw = Result<(), u32>;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_done() -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_status(
        buffer_type: u32,
        return_buffer_size: *mut usize,
        return_flags: *mut u32,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, map_data: *const u8, map_size: usize) -> u32;
    fn proxy_get_header_map_size(map_type: u32, return_map_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_stream(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_send(token: u32, message_data: *const u8, message_size: usize, end_stream: u32) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
    fn proxy_grpc_close(token: u32) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id_data: *const u8,
        vm_id_size: usize,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
}

#[cfg(target_os = "wasi")]
unsafe extern "C" {
    fn __wasm_call_ctors();
}

fn status(raw: u32) -> Raw {
    if raw == 0 { Ok(()) } else { Err(raw) }
}

/// Takes ownership of a host-written region.
///
/// # Safety
///
/// `ptr` is null, or was returned by our allocator export for exactly `len` bytes
/// that the host has initialised, and nothing else owns it.
unsafe fn take(ptr: *mut u8, len: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: guaranteed by the caller (the ABI's memory protocol).
        Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
    }
}

/// Calls a host function that returns one allocated region.
fn out_bytes(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, u32> {
    let mut ptr: *mut u8 = null_mut();
    let mut len: usize = 0;
    status(call(&mut ptr, &mut len))?;
    // SAFETY: on OK the host wrote either (0, 0) or a region from our allocator of
    // exactly `len` bytes (ABI memory protocol); we are its only owner.
    Ok(unsafe { take(ptr, len) })
}

/// Runs the module's static constructors (wasip1 reactors need this once, from
/// `_initialize`).
pub(crate) fn call_ctors() {
    #[cfg(target_os = "wasi")]
    // SAFETY: `__wasm_call_ctors` is the linker-generated constructor runner; it is
    // called exactly once, from `_initialize`, before any other guest code.
    unsafe {
        __wasm_call_ctors();
    }
}

pub(crate) fn log(level: u32, msg: &str) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_log(level, msg.as_ptr(), msg.len()) })
}

pub(crate) fn get_log_level() -> Result<u32, u32> {
    let mut level = 0u32;
    // SAFETY: `level` is a valid, writable u32.
    status(unsafe { proxy_get_log_level(&mut level) })?;
    Ok(level)
}

pub(crate) fn get_current_time_nanos() -> Result<u64, u32> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid, writable u64.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

pub(crate) fn set_tick_period_ms(ms: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

pub(crate) fn set_effective_context(id: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_set_effective_context(id) })
}

pub(crate) fn done() -> Raw {
    // SAFETY: no arguments.
    status(unsafe { proxy_done() })
}

pub(crate) fn get_buffer_bytes(ty: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: the out-pointers are valid and writable (see `out_bytes`).
    out_bytes(|p, l| unsafe { proxy_get_buffer_bytes(ty, start, max, p, l) })
}

pub(crate) fn get_buffer_status(ty: u32) -> Result<(usize, u32), u32> {
    let mut size = 0usize;
    let mut flags = 0u32;
    // SAFETY: both out-pointers are valid and writable.
    status(unsafe { proxy_get_buffer_status(ty, &mut size, &mut flags) })?;
    Ok((size, flags))
}

pub(crate) fn set_buffer_bytes(ty: u32, start: usize, size: usize, data: &[u8]) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_set_buffer_bytes(ty, start, size, data.as_ptr(), data.len()) })
}

pub(crate) fn get_header_map_pairs(map: u32) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: the out-pointers are valid and writable (see `out_bytes`).
    out_bytes(|p, l| unsafe { proxy_get_header_map_pairs(map, p, l) })
}

pub(crate) fn set_header_map_pairs(map: u32, data: &[u8]) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_set_header_map_pairs(map, data.as_ptr(), data.len()) })
}

pub(crate) fn get_header_map_size(map: u32) -> Result<usize, u32> {
    let mut size = 0usize;
    // SAFETY: `size` is valid and writable.
    status(unsafe { proxy_get_header_map_size(map, &mut size) })?;
    Ok(size)
}

pub(crate) fn get_header_map_value(map: u32, key: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: `key` is valid for reads; the out-pointers are valid and writable.
    out_bytes(|p, l| unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), p, l) })
}

pub(crate) fn add_header_map_value(map: u32, key: &[u8], value: &[u8]) -> Raw {
    // SAFETY: both slices are valid for reads for the duration of the call.
    status(unsafe { proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len()) })
}

pub(crate) fn replace_header_map_value(map: u32, key: &[u8], value: &[u8]) -> Raw {
    // SAFETY: both slices are valid for reads for the duration of the call.
    status(unsafe {
        proxy_replace_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

pub(crate) fn remove_header_map_value(map: u32, key: &[u8]) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_remove_header_map_value(map, key.as_ptr(), key.len()) })
}

pub(crate) fn continue_stream(ty: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_continue_stream(ty) })
}

pub(crate) fn close_stream(ty: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_close_stream(ty) })
}

pub(crate) fn send_local_response(
    status_code: u32,
    details: &[u8],
    body: &[u8],
    headers: &[u8],
    grpc: i32,
) -> Raw {
    // SAFETY: all slices are valid for reads for the duration of the call.
    status(unsafe {
        proxy_send_local_response(
            status_code,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc,
        )
    })
}

pub(crate) fn get_status() -> Result<(u32, Option<Vec<u8>>), u32> {
    let mut code = 0u32;
    // SAFETY: `code` and the out-pointers are valid and writable.
    let message = out_bytes(|p, l| unsafe { proxy_get_status(&mut code, p, l) })?;
    Ok((code, message))
}

pub(crate) fn http_call(
    upstream: &[u8],
    headers: &[u8],
    body: &[u8],
    trailers: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    let mut token = 0u32;
    // SAFETY: all slices are valid for reads; `token` is valid and writable.
    status(unsafe {
        proxy_http_call(
            upstream.as_ptr(),
            upstream.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

pub(crate) fn grpc_call(
    upstream: &[u8],
    service: &[u8],
    method: &[u8],
    metadata: &[u8],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    let mut token = 0u32;
    // SAFETY: all slices are valid for reads; `token` is valid and writable.
    status(unsafe {
        proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

pub(crate) fn grpc_stream(
    upstream: &[u8],
    service: &[u8],
    method: &[u8],
    metadata: &[u8],
) -> Result<u32, u32> {
    let mut token = 0u32;
    // SAFETY: all slices are valid for reads; `token` is valid and writable.
    status(unsafe {
        proxy_grpc_stream(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            &mut token,
        )
    })?;
    Ok(token)
}

pub(crate) fn grpc_send(token: u32, message: &[u8], end_stream: bool) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_grpc_send(token, message.as_ptr(), message.len(), u32::from(end_stream)) })
}

pub(crate) fn grpc_cancel(token: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_grpc_cancel(token) })
}

pub(crate) fn grpc_close(token: u32) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_grpc_close(token) })
}

pub(crate) fn get_shared_data(key: &[u8]) -> Result<(Option<Vec<u8>>, u32), u32> {
    let mut cas = 0u32;
    // SAFETY: `key` is valid for reads; `cas` and the out-pointers are writable.
    let value = out_bytes(|p, l| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), p, l, &mut cas) })?;
    Ok((value, cas))
}

pub(crate) fn set_shared_data(key: &[u8], value: &[u8], cas: u32) -> Raw {
    // SAFETY: both slices are valid for reads for the duration of the call.
    status(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

pub(crate) fn register_shared_queue(name: &[u8]) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: `name` is valid for reads; `id` is writable.
    status(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub(crate) fn resolve_shared_queue(vm_id: &[u8], name: &[u8]) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: both slices are valid for reads; `id` is writable.
    status(unsafe {
        proxy_resolve_shared_queue(vm_id.as_ptr(), vm_id.len(), name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

pub(crate) fn enqueue_shared_queue(id: u32, data: &[u8]) -> Raw {
    // SAFETY: the slice is valid for reads for the duration of the call.
    status(unsafe { proxy_enqueue_shared_queue(id, data.as_ptr(), data.len()) })
}

pub(crate) fn dequeue_shared_queue(id: u32) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: the out-pointers are valid and writable (see `out_bytes`).
    out_bytes(|p, l| unsafe { proxy_dequeue_shared_queue(id, p, l) })
}

pub(crate) fn define_metric(ty: u32, name: &[u8]) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: `name` is valid for reads; `id` is writable.
    status(unsafe { proxy_define_metric(ty, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub(crate) fn increment_metric(id: u32, delta: i64) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_increment_metric(id, delta) })
}

pub(crate) fn record_metric(id: u32, value: u64) -> Raw {
    // SAFETY: scalar arguments only.
    status(unsafe { proxy_record_metric(id, value) })
}

pub(crate) fn get_metric(id: u32) -> Result<u64, u32> {
    let mut v = 0u64;
    // SAFETY: `v` is valid and writable.
    status(unsafe { proxy_get_metric(id, &mut v) })?;
    Ok(v)
}

pub(crate) fn get_property(path: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: `path` is valid for reads; the out-pointers are valid and writable.
    out_bytes(|p, l| unsafe { proxy_get_property(path.as_ptr(), path.len(), p, l) })
}

pub(crate) fn set_property(path: &[u8], value: &[u8]) -> Raw {
    // SAFETY: both slices are valid for reads for the duration of the call.
    status(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

pub(crate) fn call_foreign_function(name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, u32> {
    // SAFETY: both slices are valid for reads; the out-pointers are writable.
    out_bytes(|p, l| unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), p, l)
    })
}

// === exports ===

/// The ABI version marker (never called).
#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

fn allocate(size: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve_exact(size).is_err() {
        return null_mut();
    }
    let ptr = v.as_mut_ptr();
    std::mem::forget(v);
    ptr
}

/// The allocator the host fills return values into.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    allocate(size)
}

/// `malloc` for hosts that look it up first (wasm32-unknown-unknown has no libc, so
/// the name is free there; on wasip1 it belongs to wasi-libc).
#[cfg(target_os = "unknown")]
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut u8 {
    allocate(size)
}

/// `(context_id, parent_context_id)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    dispatch::on_context_create(context_id, parent_context_id);
}

/// `(root_context_id, vm_configuration_size) -> bool`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> u32 {
    u32::from(dispatch::on_vm_start(context_id, vm_configuration_size))
}

/// `(root_context_id, plugin_configuration_size) -> bool`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> u32 {
    u32::from(dispatch::on_configure(context_id, plugin_configuration_size))
}

/// `(root_context_id)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    dispatch::on_tick(context_id);
}

/// `(root_context_id, queue_id)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_queue_ready(context_id: u32, queue_id: u32) {
    dispatch::on_queue_ready(context_id, queue_id);
}

/// `(context_id) -> bool`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
    u32::from(dispatch::on_done(context_id))
}

/// `(context_id)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context_id: u32) {
    dispatch::on_log(context_id);
}

/// `(context_id)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    dispatch::on_delete(context_id);
}

/// `(context_id, function_id, arguments_size)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_foreign_function(context_id: u32, function_id: u32, arguments_size: usize) {
    dispatch::on_foreign_function(context_id, function_id, arguments_size);
}

/// `(context_id) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_new_connection(context_id: u32) -> u32 {
    dispatch::on_new_connection(context_id)
}

/// `(context_id, data_size, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_downstream_data(context_id: u32, data_size: usize, end_of_stream: u32) -> u32 {
    dispatch::on_downstream_data(context_id, data_size, end_of_stream != 0)
}

/// `(context_id, data_size, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_upstream_data(context_id: u32, data_size: usize, end_of_stream: u32) -> u32 {
    dispatch::on_upstream_data(context_id, data_size, end_of_stream != 0)
}

/// `(context_id, peer_type)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_downstream_connection_close(context_id: u32, peer_type: u32) {
    dispatch::on_downstream_connection_close(context_id, peer_type);
}

/// `(context_id, peer_type)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_upstream_connection_close(context_id: u32, peer_type: u32) {
    dispatch::on_upstream_connection_close(context_id, peer_type);
}

/// `(context_id, num_headers, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: u32) -> u32 {
    dispatch::on_request_headers(context_id, num_headers, end_of_stream != 0)
}

/// `(context_id, body_size, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: u32) -> u32 {
    dispatch::on_request_body(context_id, body_size, end_of_stream != 0)
}

/// `(context_id, num_trailers) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> u32 {
    dispatch::on_request_trailers(context_id, num_trailers)
}

/// `(context_id, num_headers, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: u32) -> u32 {
    dispatch::on_response_headers(context_id, num_headers, end_of_stream != 0)
}

/// `(context_id, body_size, end_of_stream) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: u32) -> u32 {
    dispatch::on_response_body(context_id, body_size, end_of_stream != 0)
}

/// `(context_id, num_trailers) -> action`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> u32 {
    dispatch::on_response_trailers(context_id, num_trailers)
}

/// `(context_id, token, num_headers, body_size, num_trailers)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    dispatch::on_http_call_response(context_id, token, num_headers, body_size, num_trailers);
}

/// `(context_id, token, num_elements)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(context_id: u32, token: u32, num_elements: usize) {
    dispatch::on_grpc_receive_initial_metadata(context_id, token, num_elements);
}

/// `(context_id, token, response_size)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token: u32, response_size: usize) {
    dispatch::on_grpc_receive(context_id, token, response_size);
}

/// `(context_id, token, num_elements)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(context_id: u32, token: u32, num_elements: usize) {
    dispatch::on_grpc_receive_trailing_metadata(context_id, token, num_elements);
}

/// `(context_id, token, status_code)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token: u32, status_code: u32) {
    dispatch::on_grpc_close(context_id, token, status_code);
}
