//! One VM: a `Store`, its instance's exports and root context; every call into
//! the guest goes through [`Vm::call`], which sets the epoch deadline and the
//! call frame and classifies failures.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sluice_abi::exports as ex;
use sluice_filter::FilterErrorKind;
use wasmtime::{
    Extern, Global, Instance, ModuleExport, Store, Trap, TypedFunc, Val, WasmParams, WasmResults,
};

use crate::factory::Plugin;
use crate::module::{AbiVersion, CompiledModule};
use crate::state::{CallFrame, Callback, VmState};

/// The guest called WASI `proc_exit`.
#[derive(Debug, thiserror::Error)]
#[error("guest called proc_exit({0})")]
pub(crate) struct GuestExit(pub i32);

/// [`VmFailure::label`] of a VM that could not start because every slot of the
/// pooling allocator was taken: the host's limit, not the module's fault.
pub(crate) const POOL_EXHAUSTED: &str = "pool_exhausted";

/// Why a VM failed: it is never called again.
#[derive(Debug, Clone)]
pub(crate) struct VmFailure {
    pub kind: FilterErrorKind,
    /// Metric label: `timeout`, `panic`, `unreachable`, `stack_overflow`, `oom`, …
    pub label: &'static str,
    pub callback: Callback,
    pub message: String,
}

enum HeadersFn {
    V1(TypedFunc<(i32, i32), i32>),
    V2(TypedFunc<(i32, i32, i32), i32>),
}

/// A callback most requests never reach (ticks, queue notifications, callout
/// responses, trailers): resolved on its first call instead of at instantiation.
struct Rare<P, R> {
    at: Option<ModuleExport>,
    func: OnceLock<Option<TypedFunc<P, R>>>,
}

impl<P, R> Rare<P, R> {
    fn new(at: Option<ModuleExport>) -> Rare<P, R> {
        Rare { at, func: OnceLock::new() }
    }
}

struct Exports {
    on_context_create: TypedFunc<(i32, i32), ()>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_tick: Rare<i32, ()>,
    on_queue_ready: Rare<(i32, i32), ()>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_request_headers: Option<HeadersFn>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Rare<(i32, i32), i32>,
    on_response_headers: Option<HeadersFn>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_trailers: Rare<(i32, i32), i32>,
    on_http_call_response: Rare<(i32, i32, i32, i32, i32), ()>,
    on_grpc_receive: Rare<(i32, i32, i32), ()>,
    on_grpc_close: Rare<(i32, i32, i32), ()>,
    /// The fused entry points (see [`crate::fuse`]) and the global naming the
    /// callback they are in.
    start: Option<TypedFunc<(i32, i32, i32, i32), i32>>,
    end: Option<TypedFunc<i32, ()>>,
    phase: Option<Global>,
}

/// A live VM.
pub(crate) struct Vm {
    pub store: Store<VmState>,
    instance: Instance,
    /// Owned (not behind an `Arc`): a call borrows it beside `store`, so the
    /// request path touches no reference count.
    ex: Exports,
    /// Generation of the worker slot this VM belongs to.
    pub generation: u64,
    pub tick_generation: u64,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.store.data().plugin.vm_dropped();
    }
}

fn deadline_ticks(budget: Duration, tick: Duration) -> u64 {
    let ticks = budget.as_nanos().div_ceil(tick.as_nanos().max(1));
    u64::try_from(ticks).unwrap_or(u64::MAX / 2).saturating_add(1)
}

impl Vm {
    /// Instantiates and starts a VM: `_initialize` (or `_start`), the root context,
    /// `on_vm_start` and `on_configure`. For a worker VM, the instantiation proper
    /// (before any guest code runs) is observed in `sluice_wasm_vm_instantiate_seconds`.
    pub fn new(
        module: &CompiledModule,
        plugin: Arc<Plugin>,
        worker: bool,
        generation: u64,
        capture: bool,
    ) -> Result<Vm, VmFailure> {
        let started = Instant::now();
        let engine = module.pre.module().engine().clone();
        let mut state = VmState::new(plugin.clone(), worker);
        if capture {
            state.log.capture = Some(Vec::new());
        }
        let mut store = Store::new(&engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(plugin.start_deadline_ticks);
        let fail = |callback, message: String| VmFailure {
            kind: FilterErrorKind::Unavailable,
            label: "instantiate",
            callback,
            message,
        };
        let instance = module.pre.instantiate(&mut store).map_err(|e| {
            if e.is::<wasmtime::PoolConcurrencyLimitError>() {
                // Not the module's fault: every slot of the VM pool is taken.
                let message =
                    format!("the wasm VM pool is full ({e:#}); raise max_instances or load fewer filters");
                VmFailure { label: POOL_EXHAUSTED, ..fail(Callback::Initialize, message) }
            } else {
                fail(Callback::Initialize, format!("cannot instantiate: {e:#}"))
            }
        })?;
        let idx = &module.exports;
        let memory = instance.get_module_export(&mut store, &idx.memory).and_then(Extern::into_memory);
        let alloc = typed::<i32, i32>(&instance, &mut store, Some(&idx.allocator)).ok().flatten();
        store.data_mut().memory = memory;
        store.data_mut().alloc = alloc;
        let init = match idx.init {
            Some((at, command)) => typed::<(), ()>(&instance, &mut store, Some(&at))
                .map_err(|e| fail(Callback::Initialize, format!("bad exports: {e:#}")))?
                .map(|f| (f, command)),
            None => None,
        };
        let ex = exports(&instance, &mut store, module)
            .map_err(|e| fail(Callback::Initialize, format!("bad exports: {e:#}")))?;
        let mut vm = Vm { store, instance, ex, generation, tick_generation: 0 };
        plugin.vm_created();
        if worker {
            plugin.vm_instantiate.observe(started.elapsed().as_secs_f64());
        }
        match init {
            Some((init, false)) => {
                call_in(&mut vm.store, Callback::Initialize, 0, plugin.start_deadline_ticks, |s| {
                    init.call(s, ())
                })?;
                vm.main(idx.main.as_ref(), plugin.start_deadline_ticks)?;
            }
            Some((start, true)) => {
                let r = call_in(&mut vm.store, Callback::Initialize, 0, plugin.start_deadline_ticks, |s| {
                    start.call(s, ())
                });
                // A command module's `_start` may end with `proc_exit(0)`.
                if let Err(f) = r
                    && !f.message.contains("proc_exit(0)")
                {
                    return Err(f);
                }
            }
            None => {}
        }
        let root = vm.store.data().root_id as i32;
        let ticks = plugin.start_deadline_ticks;
        let create = &vm.ex.on_context_create;
        call_in(&mut vm.store, Callback::ContextCreate, root as u32, ticks, |s| create.call(s, (root, 0)))?;
        if let Some(f) = vm.ex.on_vm_start.as_ref() {
            let len = plugin.vm_config.len() as i32;
            let ok =
                call_in(&mut vm.store, Callback::VmStart, root as u32, ticks, |s| f.call(s, (root, len)))?;
            if ok == 0 {
                return Err(vm.rejected(Callback::VmStart, "on_vm_start returned false"));
            }
        }
        if let Some(f) = vm.ex.on_configure.as_ref() {
            let len = plugin.plugin_config.len() as i32;
            let ok =
                call_in(&mut vm.store, Callback::Configure, root as u32, ticks, |s| f.call(s, (root, len)))?;
            if ok == 0 {
                return Err(vm.rejected(Callback::Configure, "on_configure returned false"));
            }
        }
        vm.store.data_mut().log.capture = None;
        Ok(vm)
    }

    /// A reactor's `main(0, 0)` or `__main_void()` after `_initialize`, as Envoy's
    /// C++ host calls it (some modules register their root contexts there); its
    /// result is ignored. One of another signature is not called.
    fn main(&mut self, main: Option<&(ModuleExport, bool)>, ticks: u64) -> Result<(), VmFailure> {
        let (instance, store) = (&self.instance, &mut self.store);
        match main {
            Some((at, true)) => {
                if let Ok(Some(f)) = typed::<(i32, i32), i32>(instance, store, Some(at)) {
                    call_in(store, Callback::Initialize, 0, ticks, |s| f.call(s, (0, 0)))?;
                }
            }
            Some((at, false)) => {
                if let Ok(Some(f)) = typed::<(), i32>(instance, store, Some(at)) {
                    call_in(store, Callback::Initialize, 0, ticks, |s| f.call(s, ()))?;
                }
            }
            None => {}
        }
        Ok(())
    }

    fn rejected(&mut self, callback: Callback, what: &str) -> VmFailure {
        let lines = self.store.data_mut().log.capture.take().unwrap_or_default();
        let message = if lines.is_empty() {
            format!("{what} (the plugin logged nothing)")
        } else {
            format!("{what}; plugin log: {}", lines.join(" | "))
        };
        VmFailure { kind: FilterErrorKind::Unavailable, label: "rejected", callback, message }
    }

    pub fn root_id(&self) -> u32 {
        self.store.data().root_id
    }

    // === callbacks ===

    pub fn context_create(&mut self, id: u32) -> Result<(), VmFailure> {
        let (f, root) = (&self.ex.on_context_create, self.store.data().root_id as i32);
        call(&mut self.store, Callback::ContextCreate, id, |s| f.call(s, (id as i32, root)))
    }

    pub fn headers(&mut self, callback: Callback, id: u32, n: usize, eos: bool) -> Result<i32, VmFailure> {
        let f = match callback {
            Callback::RequestHeaders => self.ex.on_request_headers.as_ref(),
            _ => self.ex.on_response_headers.as_ref(),
        };
        let (n, eos) = (n as i32, i32::from(eos));
        let store = &mut self.store;
        match f {
            None => Ok(0),
            Some(HeadersFn::V1(f)) => call(store, callback, id, |s| f.call(s, (id as i32, n))),
            Some(HeadersFn::V2(f)) => call(store, callback, id, |s| f.call(s, (id as i32, n, eos))),
        }
    }

    pub fn body(&mut self, callback: Callback, id: u32, size: usize, eos: bool) -> Result<i32, VmFailure> {
        let f = match callback {
            Callback::RequestBody => self.ex.on_request_body.as_ref(),
            _ => self.ex.on_response_body.as_ref(),
        };
        let Some(f) = f else { return Ok(0) };
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        call(&mut self.store, callback, id, |s| f.call(s, (id as i32, size, i32::from(eos))))
    }

    pub fn trailers(&mut self, callback: Callback, id: u32, n: usize) -> Result<i32, VmFailure> {
        let (instance, store) = (&self.instance, &mut self.store);
        let f = match callback {
            Callback::RequestTrailers => rare(instance, store, callback, &self.ex.on_request_trailers)?,
            _ => rare(instance, store, callback, &self.ex.on_response_trailers)?,
        };
        let Some(f) = f else { return Ok(0) };
        call(store, callback, id, |s| f.call(s, (id as i32, n as i32)))
    }

    /// A new context's `on_context_create`, then its `on_request_headers`: one
    /// guest call when the module has the fused entry point.
    pub fn start_request(&mut self, id: u32, n: usize, eos: bool) -> Result<i32, VmFailure> {
        let Some(f) = self.ex.start.as_ref() else {
            self.context_create(id)?;
            return self.headers(Callback::RequestHeaders, id, n, eos);
        };
        let args = (id as i32, self.store.data().root_id as i32, n as i32, i32::from(eos));
        let r = call(&mut self.store, Callback::RequestHeaders, id, |s| f.call(s, args));
        r.map_err(|failure| self.in_phase(failure, &[Callback::ContextCreate, Callback::RequestHeaders]))
    }

    /// `on_log`, `on_done` and `on_delete` for a finished HTTP context: one guest
    /// call when the module has the fused entry point.
    pub fn finish(&mut self, id: u32) -> Result<(), VmFailure> {
        if let Some(f) = self.ex.end.as_ref() {
            let r = call(&mut self.store, Callback::Log, id, |s| f.call(s, id as i32));
            return r.map_err(|failure| {
                self.in_phase(failure, &[Callback::Log, Callback::Done, Callback::Delete])
            });
        }
        let (ex, store) = (&self.ex, &mut self.store);
        if let Some(f) = ex.on_log.as_ref() {
            call(store, Callback::Log, id, |s| f.call(s, id as i32))?;
        }
        if let Some(f) = ex.on_done.as_ref() {
            // Envoy ignores `on_done`'s result for HTTP contexts.
            call(store, Callback::Done, id, |s| f.call(s, id as i32))?;
        }
        if let Some(f) = ex.on_delete.as_ref() {
            call(store, Callback::Delete, id, |s| f.call(s, id as i32))?;
        }
        Ok(())
    }

    /// The root context's shutdown, when a VM that did not fail is dropped (its
    /// filter unloaded or replaced): `on_done(root)`, then `on_delete(root)`,
    /// Envoy's order. A root answering `false` would wait for `proxy_done` on
    /// Envoy; here nothing could call back into a VM being dropped (its timers
    /// and callouts go with it), so `on_delete` follows at once. A failure is
    /// logged: the VM is going away whatever the policy.
    pub fn shutdown(&mut self) {
        let root = self.root_id();
        let done = match self.ex.on_done.as_ref() {
            Some(f) => call(&mut self.store, Callback::Done, root, |s| f.call(s, root as i32)).map(|_| ()),
            None => Ok(()),
        };
        if let Err(f) = done.and_then(|()| self.delete(root)) {
            let plugin = &*self.store.data().plugin.name;
            tracing::warn!(plugin, callback = f.callback.name(), reason = %f.message, "wasm root context failed at shutdown");
        }
    }

    /// `on_delete` alone, for a guest that declared `on_log` and `on_done` no-ops.
    pub fn delete(&mut self, id: u32) -> Result<(), VmFailure> {
        let (ex, store) = (&self.ex, &mut self.store);
        match ex.on_delete.as_ref() {
            Some(f) => call(store, Callback::Delete, id, |s| f.call(s, id as i32)),
            None => Ok(()),
        }
    }

    /// Names the callback a fused call failed in, from its phase global (one of
    /// the call's own: a call stopped before its first set leaves the last call's).
    fn in_phase(&mut self, mut failure: VmFailure, own: &[Callback]) -> VmFailure {
        if let Some(global) = self.ex.phase.as_ref()
            && let Val::I32(value) = global.get(&mut self.store)
            && let Some(callback) = crate::fuse::phase_callback(value)
            && own.contains(&callback)
        {
            failure.callback = callback;
        }
        failure
    }

    pub fn tick(&mut self) -> Result<(), VmFailure> {
        let root = self.root_id();
        let (instance, store) = (&self.instance, &mut self.store);
        match rare(instance, store, Callback::Tick, &self.ex.on_tick)? {
            Some(f) => call(store, Callback::Tick, root, |s| f.call(s, root as i32)),
            None => Ok(()),
        }
    }

    pub fn queue_ready(&mut self, queue: u32) -> Result<(), VmFailure> {
        let root = self.root_id();
        let (instance, store) = (&self.instance, &mut self.store);
        match rare(instance, store, Callback::QueueReady, &self.ex.on_queue_ready)? {
            Some(f) => call(store, Callback::QueueReady, root, |s| f.call(s, (root as i32, queue as i32))),
            None => Ok(()),
        }
    }

    pub fn http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body: usize,
        trailers: usize,
    ) -> Result<(), VmFailure> {
        let root = self.root_id();
        let (instance, store) = (&self.instance, &mut self.store);
        match rare(instance, store, Callback::HttpCallResponse, &self.ex.on_http_call_response)? {
            Some(f) => call(store, Callback::HttpCallResponse, root, |s| {
                f.call(s, (root as i32, token as i32, headers as i32, body as i32, trailers as i32))
            }),
            None => Ok(()),
        }
    }

    pub fn grpc_receive(&mut self, token: u32, size: usize) -> Result<(), VmFailure> {
        let root = self.root_id();
        let (instance, store) = (&self.instance, &mut self.store);
        match rare(instance, store, Callback::GrpcReceive, &self.ex.on_grpc_receive)? {
            Some(f) => call(store, Callback::GrpcReceive, root, |s| {
                f.call(s, (root as i32, token as i32, size as i32))
            }),
            None => Ok(()),
        }
    }

    pub fn grpc_close(&mut self, token: u32, code: u32) -> Result<(), VmFailure> {
        let root = self.root_id();
        let (instance, store) = (&self.instance, &mut self.store);
        match rare(instance, store, Callback::GrpcClose, &self.ex.on_grpc_close)? {
            Some(f) => call(store, Callback::GrpcClose, root, |s| {
                f.call(s, (root as i32, token as i32, code as i32))
            }),
            None => Ok(()),
        }
    }
}

/// Runs one guest callback under the plugin's callback deadline.
fn call<R>(
    store: &mut Store<VmState>,
    callback: Callback,
    ctx: u32,
    f: impl FnOnce(&mut Store<VmState>) -> wasmtime::Result<R>,
) -> Result<R, VmFailure> {
    let ticks = store.data().deadline_ticks;
    call_in(store, callback, ctx, ticks, f)
}

/// Runs one guest callback with a deadline of `ticks` epochs from now.
fn call_in<R>(
    store: &mut Store<VmState>,
    callback: Callback,
    ctx: u32,
    ticks: u64,
    f: impl FnOnce(&mut Store<VmState>) -> wasmtime::Result<R>,
) -> Result<R, VmFailure> {
    store.set_epoch_deadline(ticks);
    {
        let st = store.data_mut();
        st.frame = CallFrame { callback, ctx, effective: ctx };
        st.log.last_fatal = None;
        st.log.lines = 0;
        st.limiter.oom = false;
    }
    // A host call that panics (a Sluice bug) unwinds through the guest's frames
    // to here: wasmtime resumes the panic past them. The guest is left
    // mid-callback (its shadow stack not popped), so the VM fails like a trap,
    // and is never called again, instead of unwinding into the connection task.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *store)));
    let st = store.data_mut();
    st.frame = CallFrame { callback: Callback::None, ctx: 0, effective: 0 };
    crate::wasi::flush_lines(st);
    if st.log.dropped > 0 {
        crate::state::report_dropped_lines(st, callback);
    }
    match result {
        Ok(result) => result.map_err(|e| classify(store.data(), callback, e)),
        Err(payload) => Err(host_panic(callback, payload.as_ref())),
    }
}

/// [`VmFailure::label`] of a VM whose host call panicked.
pub(crate) const HOST_PANIC: &str = "host_panic";

/// The failure of a callback in which a host call panicked with `payload`.
fn host_panic(callback: Callback, payload: &(dyn std::any::Any + Send)) -> VmFailure {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    VmFailure {
        kind: FilterErrorKind::Internal,
        label: HOST_PANIC,
        callback,
        message: format!("a host call panicked ({what}): a Sluice bug; the VM is discarded"),
    }
}

/// A [`Rare`] callback, resolved now if this is its first call.
fn rare<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<VmState>,
    callback: Callback,
    rare: &Rare<P, R>,
) -> Result<Option<TypedFunc<P, R>>, VmFailure> {
    if let Some(f) = rare.func.get() {
        return Ok(f.clone());
    }
    // Cannot fail for an admitted module (export signatures are checked at load).
    let f = typed(instance, store, rare.at.as_ref()).map_err(|e| VmFailure {
        kind: FilterErrorKind::Internal,
        label: "host_error",
        callback,
        message: format!("bad export: {e:#}"),
    })?;
    Ok(rare.func.get_or_init(|| f).clone())
}

/// The typed function at `export`, if the module has it.
fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<VmState>,
    export: Option<&ModuleExport>,
) -> wasmtime::Result<Option<TypedFunc<P, R>>> {
    let Some(export) = export else { return Ok(None) };
    match instance.get_module_export(&mut *store, export).and_then(Extern::into_func) {
        Some(f) => f.typed(&*store).map(Some),
        None => Err(wasmtime::Error::msg("export is not a function of this module")),
    }
}

/// Resolves the callbacks at the indices located when the module was compiled
/// (the [`Rare`] ones on their first call).
fn exports(
    instance: &Instance,
    store: &mut Store<VmState>,
    module: &CompiledModule,
) -> wasmtime::Result<Exports> {
    let idx = &module.exports;
    let headers =
        |store: &mut Store<VmState>, at: Option<&ModuleExport>| -> wasmtime::Result<Option<HeadersFn>> {
            Ok(if module.abi == AbiVersion::V0_1_0 {
                typed(instance, store, at)?.map(HeadersFn::V1)
            } else {
                typed(instance, store, at)?.map(HeadersFn::V2)
            })
        };
    let on_context_create = typed(instance, store, Some(&idx.on_context_create))?
        .ok_or_else(|| wasmtime::Error::msg(format!("missing export `{}`", ex::ON_CONTEXT_CREATE)))?;
    Ok(Exports {
        on_context_create,
        on_vm_start: typed(instance, store, idx.on_vm_start.as_ref())?,
        on_configure: typed(instance, store, idx.on_configure.as_ref())?,
        on_tick: Rare::new(idx.on_tick),
        on_queue_ready: Rare::new(idx.on_queue_ready),
        on_done: typed(instance, store, idx.on_done.as_ref())?,
        on_log: typed(instance, store, idx.on_log.as_ref())?,
        on_delete: typed(instance, store, idx.on_delete.as_ref())?,
        on_request_headers: headers(store, idx.on_request_headers.as_ref())?,
        on_request_body: typed(instance, store, idx.on_request_body.as_ref())?,
        on_request_trailers: Rare::new(idx.on_request_trailers),
        on_response_headers: headers(store, idx.on_response_headers.as_ref())?,
        on_response_body: typed(instance, store, idx.on_response_body.as_ref())?,
        on_response_trailers: Rare::new(idx.on_response_trailers),
        on_http_call_response: Rare::new(idx.on_http_call_response),
        on_grpc_receive: Rare::new(idx.on_grpc_receive),
        on_grpc_close: Rare::new(idx.on_grpc_close),
        start: typed(instance, store, idx.fused_start.as_ref())?,
        end: typed(instance, store, idx.fused_end.as_ref())?,
        phase: idx
            .fused_phase
            .as_ref()
            .and_then(|at| instance.get_module_export(&mut *store, at))
            .and_then(Extern::into_global),
    })
}

/// Turns a guest call error into a [`VmFailure`] naming the callback and the
/// guest's last fatal log line (the Rust SDK logs the panic message at CRITICAL
/// before `unreachable`).
fn classify(state: &VmState, callback: Callback, err: wasmtime::Error) -> VmFailure {
    let trap = err.downcast_ref::<Trap>().copied();
    let (kind, label) = match trap {
        Some(Trap::Interrupt) => (FilterErrorKind::Timeout, "timeout"),
        Some(Trap::StackOverflow) => (FilterErrorKind::Trap, "stack_overflow"),
        _ if state.limiter.oom => (FilterErrorKind::OutOfMemory, "oom"),
        Some(Trap::UnreachableCodeReached) if state.log.last_fatal.is_some() => {
            (FilterErrorKind::Trap, "panic")
        }
        Some(Trap::UnreachableCodeReached) => (FilterErrorKind::Trap, "unreachable"),
        Some(Trap::MemoryOutOfBounds) => (FilterErrorKind::Trap, "memory_out_of_bounds"),
        Some(_) => (FilterErrorKind::Trap, "trap"),
        None if err.downcast_ref::<GuestExit>().is_some() => (FilterErrorKind::Trap, "exit"),
        None => (FilterErrorKind::Trap, "host_error"),
    };
    let what = match (kind, trap) {
        (FilterErrorKind::Timeout, _) => {
            format!(
                "ran past its {} ms time budget (epoch deadline)",
                state.plugin.limits.callback_timeout.as_millis()
            )
        }
        (FilterErrorKind::OutOfMemory, _) => {
            format!(
                "out of memory (cap {} bytes): {}",
                state.plugin.limits.memory_bytes,
                trap.map_or_else(|| format!("{err:#}"), |t| t.to_string())
            )
        }
        // wasmtime's own text already reads "wasm trap: …".
        (_, Some(t)) => t.to_string(),
        (_, None) => format!("{err:#}"),
    };
    let message = match &state.log.last_fatal {
        Some(fatal) => format!("{fatal} ({what})"),
        None => what,
    };
    VmFailure { kind, label, callback, message }
}

pub(crate) fn ticks_for(budget: Duration, tick: Duration) -> u64 {
    deadline_ticks(budget, tick)
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use sluice_config::{FailPolicy, FilterSpec, ReloadPolicy};
    use sluice_filter::{CalloutClient, CalloutError, CalloutResponse, LocalBoxFuture, StreamInfo};

    struct NoCallouts;

    impl CalloutClient for NoCallouts {
        fn call(
            &self,
            cluster: &str,
            _: http::Request<Bytes>,
            _: Duration,
        ) -> LocalBoxFuture<'static, Result<CalloutResponse, CalloutError>> {
            let cluster = cluster.to_owned();
            Box::pin(async move { Err(CalloutError::UnknownCluster(cluster)) })
        }
    }

    /// A host call that panics (here the test build's hook; in the field a
    /// Sluice bug, such as the `fd_write` overflow the fuzzer found) fails the
    /// VM like a trap: the request gets the fail policy's answer, nothing
    /// unwinds into the worker, and the next request gets a fresh VM.
    #[test]
    #[allow(clippy::expect_used)]
    fn a_panicking_host_call_fails_the_vm_not_the_worker() {
        let wat = format!(
            r#"(module
              (import "env" "{hook}" (func $panic (result i32)))
              (memory (export "memory") 1)
              (func (export "proxy_abi_version_0_2_1"))
              (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                ;; Panics for a request with a body to come.
                (if (i32.eqz (local.get 2)) (then (drop (call $panic))))
                (i32.const 0)))"#,
            hook = crate::hostcalls::TEST_PANIC
        );
        let bytes = wat::parse_str(wat).expect("wat");
        let registry = prometheus::Registry::new();
        let host = crate::WasmHost::new(crate::HostOptions::default(), &registry, Arc::new(NoCallouts))
            .expect("host");
        let reload = ReloadPolicy { base: Duration::ZERO, ..ReloadPolicy::default() };
        let spec = FilterSpec {
            name: "panicky".into(),
            module: "inline.wasm".into(),
            root_id: String::new(),
            vm_id: None,
            vm_config: None,
            config: None,
            fail_policy: FailPolicy::Reload(reload),
            limits: Default::default(),
            env: Default::default(),
        };
        let factory = host.load_bytes(&spec, &bytes, &[]).expect("load");
        let info = StreamInfo::new(
            "req-1",
            1,
            "127.0.0.1:40000".parse().expect("addr"),
            "127.0.0.1:8080".parse().expect("addr"),
            Arc::from("main"),
            http::Version::HTTP_11,
            Instant::now(),
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (factory, info) = (&factory, &info);
        let (first, second) = tokio::task::LocalSet::new().block_on(&rt, async {
            let one = |end_of_stream: bool| async move {
                let mut filter = factory.new_filter(info);
                let (mut req, ()) = http::Request::new(()).into_parts();
                sluice_filter::request_headers(&mut *filter, &mut req, info, end_of_stream).await
            };
            (one(false).await, one(true).await)
        });
        let err = first.expect_err("the panic fails the request");
        assert_eq!(err.kind, FilterErrorKind::Internal);
        assert_eq!(err.callback, "on_request_headers");
        assert!(err.reason.contains("a host call panicked (the test hook panics)"), "{}", err.reason);
        assert!(second.is_ok(), "a fresh VM serves the next request: {second:?}");
        let status = factory.status();
        assert_eq!(status["traps"], serde_json::json!({ HOST_PANIC: 1 }), "{status}");
        assert_eq!(status["reloads"], 1, "{status}");
    }

    #[test]
    fn deadline_is_budget_plus_one_tick() {
        assert_eq!(deadline_ticks(Duration::from_millis(100), Duration::from_millis(10)), 11);
        assert_eq!(deadline_ticks(Duration::from_millis(5), Duration::from_millis(10)), 2);
        assert_eq!(deadline_ticks(Duration::from_millis(101), Duration::from_millis(10)), 12);
    }
}
