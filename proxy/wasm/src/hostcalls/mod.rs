//! The host functions: every proxy-wasm import (ABI 0.2.1, 0.2.0 and 0.1.0, plus
//! the two Emscripten extras Envoy's host provides) and the WASI subset, defined
//! once in a `Linker` shared by every module.
//!
//! Every host call bounds-checks guest pointers (`INVALID_MEMORY_ACCESS`), never
//! panics, and never calls back into the guest except its allocator.

mod callouts;
mod maps;
mod misc;
mod stream;

use wasmtime::{Caller, Engine, Linker};

use crate::memory::status;
use crate::state::VmState;

/// The `env` imports a module may have.
pub(crate) const ENV_IMPORTS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_get_status",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_call_foreign_function",
    // ABI 0.1.0.
    "proxy_get_configuration",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    // Emscripten / C++ SDK extras.
    "emscripten_notify_memory_growth",
    "pthread_equal",
];

/// Test builds only: an `env` import whose host function panics, standing for a
/// host-call bug (see `vm::call_in`); other builds neither define nor admit it.
pub(crate) const TEST_PANIC: &str = "sluice_test_panic";

/// Module names the WASI subset is registered under.
pub(crate) const WASI_MODULES: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable"];

/// The WASI functions a module may import (no filesystem paths, no sockets).
pub(crate) const WASI_IMPORTS: &[&str] = crate::wasi::ALLOWED;

type C<'a> = Caller<'a, VmState>;

/// Builds the linker with every host function.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<VmState>> {
    let mut l = Linker::new(engine);
    let m = "env";
    #[cfg(test)]
    l.func_wrap(m, TEST_PANIC, |_: C<'_>| -> i32 { panic!("the test hook panics") })?;
    // Logging, time, contexts.
    l.func_wrap(m, "proxy_log", |mut c: C<'_>, level: i32, p: i32, n: i32| {
        status(misc::log(&mut c, level, p, n))
    })?;
    l.func_wrap(m, "proxy_get_log_level", |mut c: C<'_>, r: i32| status(misc::get_log_level(&mut c, r)))?;
    l.func_wrap(m, "proxy_get_current_time_nanoseconds", |mut c: C<'_>, r: i32| {
        status(misc::current_time(&mut c, r))
    })?;
    l.func_wrap(m, "proxy_set_tick_period_milliseconds", |mut c: C<'_>, ms: i32| {
        status(misc::set_tick_period(&mut c, ms))
    })?;
    l.func_wrap(m, "proxy_set_effective_context", |mut c: C<'_>, id: i32| {
        status(misc::set_effective_context(&mut c, id))
    })?;
    l.func_wrap(m, "proxy_done", |_: C<'_>| status(Err(sluice_abi::Status::NotFound.into())))?;
    l.func_wrap(m, "proxy_get_status", |mut c: C<'_>, code: i32, p: i32, n: i32| {
        status(misc::get_status(&mut c, code, p, n))
    })?;
    // Buffers.
    l.func_wrap(
        m,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, max: i32, p: i32, n: i32| {
            status(maps::get_buffer_bytes(&mut c, t, start, max, p, n))
        },
    )?;
    l.func_wrap(
        m,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, size: i32, p: i32, n: i32| {
            status(maps::set_buffer_bytes(&mut c, t, start, size, p, n))
        },
    )?;
    l.func_wrap(m, "proxy_get_buffer_status", |mut c: C<'_>, t: i32, size: i32, flags: i32| {
        status(maps::get_buffer_status(&mut c, t, size, flags))
    })?;
    l.func_wrap(m, "proxy_get_configuration", |mut c: C<'_>, p: i32, n: i32| {
        status(maps::get_configuration(&mut c, p, n))
    })?;
    // Header maps.
    l.func_wrap(m, "proxy_get_header_map_pairs", |mut c: C<'_>, t: i32, p: i32, n: i32| {
        status(maps::get_pairs(&mut c, t, p, n))
    })?;
    l.func_wrap(m, "proxy_set_header_map_pairs", |mut c: C<'_>, t: i32, p: i32, n: i32| {
        status(maps::set_pairs(&mut c, t, p, n))
    })?;
    l.func_wrap(m, "proxy_get_header_map_size", |mut c: C<'_>, t: i32, r: i32| {
        status(maps::get_size(&mut c, t, r))
    })?;
    l.func_wrap(
        m,
        "proxy_get_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kn: i32, p: i32, n: i32| {
            status(maps::get_value(&mut c, t, kp, kn, p, n))
        },
    )?;
    l.func_wrap(
        m,
        "proxy_add_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| {
            status(maps::write_value(&mut c, t, kp, kn, vp, vn, crate::headers::Write::Add))
        },
    )?;
    l.func_wrap(
        m,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| {
            status(maps::write_value(&mut c, t, kp, kn, vp, vn, crate::headers::Write::Replace))
        },
    )?;
    l.func_wrap(m, "proxy_remove_header_map_value", |mut c: C<'_>, t: i32, kp: i32, kn: i32| {
        status(maps::remove_value(&mut c, t, kp, kn))
    })?;
    // Stream control.
    l.func_wrap(m, "proxy_continue_stream", |mut c: C<'_>, t: i32| {
        status(stream::continue_stream(&mut c, t))
    })?;
    l.func_wrap(m, "proxy_close_stream", |mut c: C<'_>, t: i32| status(stream::close_stream(&mut c, t)))?;
    l.func_wrap(m, "proxy_continue_request", |mut c: C<'_>| status(stream::continue_stream(&mut c, 0)))?;
    l.func_wrap(m, "proxy_continue_response", |mut c: C<'_>| status(stream::continue_stream(&mut c, 1)))?;
    l.func_wrap(m, "proxy_clear_route_cache", |mut c: C<'_>| status(stream::clear_route_cache(&mut c)))?;
    l.func_wrap(
        m,
        "proxy_send_local_response",
        |mut c: C<'_>, code: i32, dp: i32, dn: i32, bp: i32, bn: i32, hp: i32, hn: i32, grpc: i32| {
            status(stream::send_local_response(&mut c, code, (dp, dn), (bp, bn), (hp, hn), grpc))
        },
    )?;
    // Callouts.
    l.func_wrap(
        m,
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         upn: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         tp: i32,
         tn: i32,
         timeout: i32,
         tok: i32| {
            status(callouts::http_call(&mut c, (up, upn), (hp, hn), (bp, bn), (tp, tn), timeout, tok))
        },
    )?;
    l.func_wrap(
        m,
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: i32,
         upn: i32,
         sp: i32,
         sn: i32,
         mp: i32,
         mn: i32,
         dp: i32,
         dn: i32,
         msgp: i32,
         msgn: i32,
         timeout: i32,
         tok: i32| {
            status(callouts::grpc_call(
                &mut c,
                [(up, upn), (sp, sn), (mp, mn), (dp, dn), (msgp, msgn)],
                timeout,
                tok,
            ))
        },
    )?;
    l.func_wrap(
        m,
        "proxy_grpc_stream",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            // Streaming gRPC is not supported; the SDK reports it as an error.
            Ok(sluice_abi::Status::InternalFailure as i32)
        },
    )?;
    l.func_wrap(m, "proxy_grpc_send", |_: C<'_>, _: i32, _: i32, _: i32, _: i32| {
        Ok(sluice_abi::Status::NotFound as i32)
    })?;
    l.func_wrap(m, "proxy_grpc_cancel", |mut c: C<'_>, tok: i32| status(callouts::cancel(&mut c, tok)))?;
    l.func_wrap(m, "proxy_grpc_close", |mut c: C<'_>, tok: i32| status(callouts::cancel(&mut c, tok)))?;
    // Shared data and queues.
    l.func_wrap(m, "proxy_get_shared_data", |mut c: C<'_>, kp: i32, kn: i32, p: i32, n: i32, cas: i32| {
        status(misc::get_shared_data(&mut c, kp, kn, p, n, cas))
    })?;
    l.func_wrap(m, "proxy_set_shared_data", |mut c: C<'_>, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| {
        status(misc::set_shared_data(&mut c, kp, kn, vp, vn, cas))
    })?;
    l.func_wrap(m, "proxy_register_shared_queue", |mut c: C<'_>, p: i32, n: i32, r: i32| {
        status(misc::register_queue(&mut c, p, n, r))
    })?;
    l.func_wrap(
        m,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vn: i32, p: i32, n: i32, r: i32| {
            status(misc::resolve_queue(&mut c, vp, vn, p, n, r))
        },
    )?;
    l.func_wrap(m, "proxy_enqueue_shared_queue", |mut c: C<'_>, id: i32, p: i32, n: i32| {
        status(misc::enqueue(&mut c, id, p, n))
    })?;
    l.func_wrap(m, "proxy_dequeue_shared_queue", |mut c: C<'_>, id: i32, p: i32, n: i32| {
        status(misc::dequeue(&mut c, id, p, n))
    })?;
    // Metrics.
    l.func_wrap(m, "proxy_define_metric", |mut c: C<'_>, t: i32, p: i32, n: i32, r: i32| {
        status(misc::define_metric(&mut c, t, p, n, r))
    })?;
    l.func_wrap(m, "proxy_increment_metric", |mut c: C<'_>, id: i32, delta: i64| {
        status(misc::increment_metric(&mut c, id, delta))
    })?;
    l.func_wrap(m, "proxy_record_metric", |mut c: C<'_>, id: i32, v: i64| {
        status(misc::record_metric(&mut c, id, v))
    })?;
    l.func_wrap(m, "proxy_get_metric", |mut c: C<'_>, id: i32, r: i32| {
        status(misc::get_metric(&mut c, id, r))
    })?;
    // Properties and foreign functions.
    l.func_wrap(m, "proxy_get_property", |mut c: C<'_>, pp: i32, pn: i32, p: i32, n: i32| {
        status(misc::get_property(&mut c, pp, pn, p, n))
    })?;
    l.func_wrap(m, "proxy_set_property", |mut c: C<'_>, pp: i32, pn: i32, vp: i32, vn: i32| {
        status(misc::set_property(&mut c, pp, pn, vp, vn))
    })?;
    l.func_wrap(
        m,
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: i32, nn: i32, ap: i32, an: i32, _ret_ptr: i32, _ret_size: i32| {
            status(misc::call_foreign_function(&mut c, np, nn, ap, an))
        },
    )?;
    // Emscripten extras.
    l.func_wrap(m, "emscripten_notify_memory_growth", |_: C<'_>, _: i32| {})?;
    l.func_wrap(m, "pthread_equal", |_: C<'_>, a: i32, b: i32| i32::from(a == b))?;
    for module in WASI_MODULES {
        crate::wasi::add(&mut l, module)?;
    }
    Ok(l)
}
