//! The per-request [`HttpFilter`]: an HTTP context inside this worker's VM.
//!
//! Each phase moves its data (head, body, trailers) into the context, calls the
//! guest, applies what the guest asked for, and — when the guest paused — waits
//! (up to `pause_timeout`) for a later callback to resume, reply or reset. The
//! data is moved back when the phase ends, also when the future is dropped.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::{HeaderMap, request, response};
use sluice_config::FailPolicy;
use sluice_filter::{
    BodyAction, FilterError, FilterErrorKind, FilterFuture, HeadersAction, HttpFilter, LocalResponse,
    LogView, StreamInfo,
};

use crate::factory::{FactoryInner, Plugin, WorkerSlot};
use crate::headers::MapView;
use crate::properties::{INFO, LogScope};
use crate::state::{Callback, HttpCtx, Signal};
use crate::vm::{Vm, VmFailure};

/// One kind of phase: where its data lives in the context and how the guest is called.
trait Phase {
    type Value;
    const CALLBACK: Callback;
    const BODY: bool = false;
    fn slot(ctx: &mut HttpCtx) -> &mut Option<Self::Value>;
    fn placeholder() -> Self::Value;
    /// Takes this phase's resume flag.
    fn resumed(sig: &mut Signal) -> bool;
    /// The callback's size argument (entries or bytes).
    fn arg(value: &Self::Value) -> usize;
    fn invoke(vm: &mut Vm, id: u32, arg: usize, eos: bool) -> Result<i32, VmFailure>;
}

fn empty_request() -> request::Parts {
    http::Request::new(()).into_parts().0
}

fn empty_response() -> response::Parts {
    http::Response::new(()).into_parts().0
}

macro_rules! phase {
    ($name:ident, $value:ty, $cb:expr, $body:expr, $field:ident, $placeholder:expr, $flag:ident, $arg:expr, $invoke:expr) => {
        struct $name;
        impl Phase for $name {
            type Value = $value;
            const CALLBACK: Callback = $cb;
            const BODY: bool = $body;
            fn slot(ctx: &mut HttpCtx) -> &mut Option<$value> {
                &mut ctx.$field
            }
            fn placeholder() -> $value {
                $placeholder
            }
            fn resumed(sig: &mut Signal) -> bool {
                std::mem::take(&mut sig.$flag)
            }
            fn arg(value: &$value) -> usize {
                let f: fn(&$value) -> usize = $arg;
                f(value)
            }
            fn invoke(vm: &mut Vm, id: u32, arg: usize, eos: bool) -> Result<i32, VmFailure> {
                let f: fn(&mut Vm, Callback, u32, usize, bool) -> Result<i32, VmFailure> = $invoke;
                f(vm, $cb, id, arg, eos)
            }
        }
    };
}

phase!(
    ReqHeaders,
    request::Parts,
    Callback::RequestHeaders,
    false,
    req_head,
    empty_request(),
    resume_request,
    |v| MapView::Request(v).count_and_size().0,
    |vm, cb, id, n, eos| vm.headers(cb, id, n, eos)
);
phase!(
    ReqBody,
    BytesMut,
    Callback::RequestBody,
    true,
    req_body,
    BytesMut::new(),
    resume_request,
    |v| v.len(),
    |vm, cb, id, n, eos| vm.body(cb, id, n, eos)
);
phase!(
    ReqTrailers,
    HeaderMap,
    Callback::RequestTrailers,
    false,
    req_trailers,
    HeaderMap::new(),
    resume_request,
    |v| v.len(),
    |vm, cb, id, n, _| vm.trailers(cb, id, n)
);
phase!(
    RespHeaders,
    response::Parts,
    Callback::ResponseHeaders,
    false,
    resp_head,
    empty_response(),
    resume_response,
    |v| MapView::Response(v).count_and_size().0,
    |vm, cb, id, n, eos| vm.headers(cb, id, n, eos)
);
phase!(
    RespBody,
    BytesMut,
    Callback::ResponseBody,
    true,
    resp_body,
    BytesMut::new(),
    resume_response,
    |v| v.len(),
    |vm, cb, id, n, eos| vm.body(cb, id, n, eos)
);
phase!(
    RespTrailers,
    HeaderMap,
    Callback::ResponseTrailers,
    false,
    resp_trailers,
    HeaderMap::new(),
    resume_response,
    |v| v.len(),
    |vm, cb, id, n, _| vm.trailers(cb, id, n)
);

/// How a phase ended.
enum Step {
    Continue,
    Buffer,
    Respond(LocalResponse),
    Reset,
}

#[derive(Clone, Copy)]
struct CtxRef {
    id: u32,
    generation: u64,
}

/// The error for a request whose context's VM failed.
fn lost(slot: &WorkerSlot, plugin: &Plugin, callback: Callback) -> FilterError {
    let reason = match &slot.last_error {
        Some(e) => format!("VM failed: {}", e.reason),
        None => "VM failed".into(),
    };
    plugin.error(FilterErrorKind::Unavailable, callback.name(), reason)
}

/// Finds a context: in the live VM, or among the orphans of a failed one.
fn find_ctx(slot: &mut WorkerSlot, c: CtxRef) -> Option<&mut HttpCtx> {
    let live = slot.vm.as_ref().is_some_and(|vm| vm.generation == c.generation);
    if live {
        return slot.vm.as_mut().and_then(|vm| vm.store.data_mut().contexts.get_mut(&c.id)).map(|b| &mut **b);
    }
    slot.orphans.iter_mut().find(|(g, id, _)| *g == c.generation && *id == c.id).map(|(_, _, ctx)| ctx)
}

/// A phase's data moved into the context; moved back by `unpark` or on drop.
struct Parked<'a, P: Phase> {
    inner: &'a FactoryInner,
    ctx: Option<CtxRef>,
    value: &'a mut P::Value,
}

impl<P: Phase> Parked<'_, P> {
    fn park(&mut self, slot: &mut WorkerSlot, c: CtxRef) {
        if let Some(ctx) = find_ctx(slot, c) {
            P::resumed(&mut ctx.signal);
            *P::slot(ctx) = Some(std::mem::replace(self.value, P::placeholder()));
            self.ctx = Some(c);
        }
    }

    fn unpark(&mut self, info: Option<&StreamInfo>) {
        let Some(c) = self.ctx.take() else { return };
        let Ok(mut slot) = self.inner.slot().try_borrow_mut() else { return };
        if let Some(ctx) = find_ctx(&mut slot, c) {
            if let Some(v) = P::slot(ctx).take() {
                *self.value = v;
            }
            if P::CALLBACK == Callback::RequestHeaders
                && std::mem::take(&mut ctx.req_edited)
                && let Some(info) = info
            {
                info.clear_route_cache();
            }
        }
    }
}

impl<P: Phase> Drop for Parked<'_, P> {
    fn drop(&mut self) {
        self.unpark(None);
    }
}

/// What the guest decided, or `None` when it paused and must be waited for.
fn decide<P: Phase>(vm: &mut Vm, id: u32, action: i32, eos: bool) -> Option<Step> {
    let ctx = vm.store.data_mut().contexts.get_mut(&id)?;
    if let Some(local) = ctx.signal.local.take() {
        return Some(Step::Respond(local));
    }
    if std::mem::take(&mut ctx.signal.reset) {
        return Some(Step::Reset);
    }
    let resumed = P::resumed(&mut ctx.signal);
    if action == 0 || resumed {
        return Some(Step::Continue);
    }
    if P::BODY && !eos {
        return Some(Step::Buffer);
    }
    None
}

/// Polls a paused context for the guest's decision.
fn poll_resume<P: Phase>(
    inner: &FactoryInner,
    c: CtxRef,
    cx: &mut Context<'_>,
) -> Poll<Result<Step, FilterError>> {
    let Ok(mut slot) = inner.slot().try_borrow_mut() else {
        cx.waker().wake_by_ref();
        return Poll::Pending;
    };
    let live = slot.vm.as_ref().is_some_and(|vm| vm.generation == c.generation);
    let ctx =
        if live { slot.vm.as_mut().and_then(|vm| vm.store.data_mut().contexts.get_mut(&c.id)) } else { None };
    let Some(ctx) = ctx else {
        return Poll::Ready(Err(lost(&slot, &inner.plugin, P::CALLBACK)));
    };
    if let Some(local) = ctx.signal.local.take() {
        return Poll::Ready(Ok(Step::Respond(local)));
    }
    if std::mem::take(&mut ctx.signal.reset) {
        return Poll::Ready(Ok(Step::Reset));
    }
    if P::resumed(&mut ctx.signal) {
        return Poll::Ready(Ok(Step::Continue));
    }
    match &ctx.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => ctx.waker = Some(cx.waker().clone()),
    }
    Poll::Pending
}

/// The per-request filter.
pub(crate) struct WasmFilter {
    inner: Arc<FactoryInner>,
    ctx: Option<CtxRef>,
    /// Fail-open: this request skips the filter from now on.
    bypass: bool,
    /// A failure happened during this request.
    failed: bool,
    /// Filters stay on the worker that made them.
    _local: PhantomData<*const ()>,
}

impl WasmFilter {
    pub fn new(inner: Arc<FactoryInner>) -> WasmFilter {
        WasmFilter { inner, ctx: None, bypass: false, failed: false, _local: PhantomData }
    }

    /// Applies the fail policy to a failure of this request.
    fn on_failure(&mut self, err: FilterError) -> Result<Step, FilterError> {
        self.failed = true;
        match self.inner.plugin.policy {
            FailPolicy::Open => {
                self.bypass = true;
                self.inner.plugin.count_fail_open();
                tracing::debug!(plugin = %self.inner.plugin.name, reason = %err.reason, "wasm filter failed open");
                Ok(Step::Continue)
            }
            FailPolicy::Closed | FailPolicy::Reload(_) => Err(err),
        }
    }

    /// This request's context, made on its first phase.
    fn context(&mut self, slot: &mut WorkerSlot, callback: Callback) -> Result<CtxRef, FilterError> {
        let inner = &*self.inner;
        if let Some(c) = self.ctx {
            if slot.vm.as_ref().is_some_and(|vm| vm.generation == c.generation) {
                return Ok(c);
            }
            return Err(lost(slot, &inner.plugin, callback));
        }
        slot.ensure(inner)?;
        let id = slot.next_ctx_id();
        let Some(vm) = slot.vm.as_mut() else { return Err(lost(slot, &inner.plugin, callback)) };
        let c = CtxRef { id, generation: vm.generation };
        vm.store.data_mut().contexts.insert(id, Box::default());
        self.ctx = Some(c);
        if let Err(f) = vm.context_create(id) {
            return Err(slot.fail(inner, f));
        }
        Ok(c)
    }

    /// Runs one phase.
    async fn run<P: Phase>(
        &mut self,
        value: &mut P::Value,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<Step, FilterError> {
        if self.bypass {
            return Ok(Step::Continue);
        }
        let inner = self.inner.clone();
        let cell = inner.slot();
        let arg = P::arg(value);
        let mut parked = Parked::<P> { inner: &inner, ctx: None, value };
        let busy = || {
            inner.plugin.error(
                FilterErrorKind::Internal,
                P::CALLBACK.name(),
                "worker VM busy (re-entered)".into(),
            )
        };
        let (c, decided) = {
            let Ok(mut guard) = cell.try_borrow_mut() else { return Err(busy()) };
            let slot = &mut *guard;
            let c = match self.context(slot, P::CALLBACK) {
                Ok(c) => c,
                Err(err) => {
                    drop(guard);
                    return self.on_failure(err);
                }
            };
            parked.park(slot, c);
            let Some(vm) = slot.vm.as_mut() else { return Err(busy()) };
            let decided = match INFO.set(info, || P::invoke(vm, c.id, arg, eos)) {
                Err(f) => Err(slot.fail(&inner, f)),
                Ok(action) => {
                    crate::callout::flush(&inner, vm);
                    Ok(decide::<P>(vm, c.id, action, eos))
                }
            };
            (c, decided)
        };
        let step = match decided {
            Err(err) => {
                parked.unpark(Some(info));
                return self.on_failure(err);
            }
            Ok(Some(step)) => step,
            Ok(None) => {
                let timeout = inner.plugin.limits.pause_timeout;
                let wait = std::future::poll_fn(|cx| poll_resume::<P>(&inner, c, cx));
                match tokio::time::timeout(timeout, wait).await {
                    Ok(Ok(step)) => step,
                    Ok(Err(err)) => {
                        parked.unpark(Some(info));
                        return self.on_failure(err);
                    }
                    Err(_) => {
                        parked.unpark(Some(info));
                        inner.plugin.count_pause_timeout();
                        let err = inner.plugin.error(
                            FilterErrorKind::Timeout,
                            P::CALLBACK.name(),
                            format!("paused for longer than the {} ms pause_timeout", timeout.as_millis()),
                        );
                        return self.on_failure(err);
                    }
                }
            }
        };
        parked.unpark(Some(info));
        Ok(step)
    }

    /// Ends the context: `on_log` (with the final heads when given), `on_done`,
    /// `on_delete`.
    fn finish(&mut self, view: Option<(&LogView<'_>, &StreamInfo)>) {
        let Some(c) = self.ctx.take() else { return };
        let inner = self.inner.clone();
        let Ok(mut guard) = inner.slot().try_borrow_mut() else {
            tracing::warn!(plugin = %inner.plugin.name, "worker VM busy at request end; context leaked");
            return;
        };
        let slot = &mut *guard;
        slot.orphans.retain(|(g, id, _)| !(*g == c.generation && *id == c.id));
        let Some(vm) = slot.vm.as_mut().filter(|vm| vm.generation == c.generation) else { return };
        let result = match view {
            Some((view, info)) => LogScope::enter(view, info, || vm.finish(c.id, true)),
            None => vm.finish(c.id, true),
        };
        vm.store.data_mut().contexts.remove(&c.id);
        match result {
            Ok(()) => {
                crate::callout::flush(&inner, vm);
                if !self.failed {
                    slot.request_succeeded();
                }
            }
            Err(f) => {
                slot.fail(&inner, f);
            }
        }
    }
}

impl Drop for WasmFilter {
    fn drop(&mut self) {
        self.finish(None);
    }
}

fn headers_action(r: Result<Step, FilterError>) -> Result<HeadersAction, FilterError> {
    Ok(match r? {
        Step::Continue | Step::Buffer => HeadersAction::Continue,
        Step::Respond(l) => HeadersAction::Respond(l),
        Step::Reset => HeadersAction::Reset,
    })
}

fn body_action(r: Result<Step, FilterError>) -> Result<BodyAction, FilterError> {
    Ok(match r? {
        Step::Continue => BodyAction::Continue,
        Step::Buffer => BodyAction::Buffer,
        Step::Respond(l) => BodyAction::Respond(l),
        Step::Reset => BodyAction::Reset,
    })
}

impl HttpFilter for WasmFilter {
    fn on_request_headers<'a>(
        &'a mut self,
        head: &'a mut request::Parts,
        info: &'a StreamInfo,
        end_of_stream: bool,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { headers_action(self.run::<ReqHeaders>(head, info, end_of_stream).await) })
    }

    fn on_request_body<'a>(
        &'a mut self,
        body: &'a mut BytesMut,
        info: &'a StreamInfo,
        end_of_stream: bool,
    ) -> FilterFuture<'a, BodyAction> {
        Box::pin(async move { body_action(self.run::<ReqBody>(body, info, end_of_stream).await) })
    }

    fn on_request_trailers<'a>(
        &'a mut self,
        trailers: &'a mut HeaderMap,
        info: &'a StreamInfo,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { headers_action(self.run::<ReqTrailers>(trailers, info, true).await) })
    }

    fn on_response_headers<'a>(
        &'a mut self,
        head: &'a mut response::Parts,
        info: &'a StreamInfo,
        end_of_stream: bool,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { headers_action(self.run::<RespHeaders>(head, info, end_of_stream).await) })
    }

    fn on_response_body<'a>(
        &'a mut self,
        body: &'a mut BytesMut,
        info: &'a StreamInfo,
        end_of_stream: bool,
    ) -> FilterFuture<'a, BodyAction> {
        Box::pin(async move { body_action(self.run::<RespBody>(body, info, end_of_stream).await) })
    }

    fn on_response_trailers<'a>(
        &'a mut self,
        trailers: &'a mut HeaderMap,
        info: &'a StreamInfo,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { headers_action(self.run::<RespTrailers>(trailers, info, true).await) })
    }

    fn on_log(&mut self, view: &LogView<'_>, info: &StreamInfo) {
        self.finish(Some((view, info)));
    }
}

/// The filter of a factory that is being torn down: fails closed.
pub(crate) struct Unavailable(pub Arc<Plugin>);

impl Unavailable {
    fn err(&self, callback: &'static str) -> FilterError {
        self.0.error(FilterErrorKind::Unavailable, callback, "filter is being unloaded".into())
    }
}

impl HttpFilter for Unavailable {
    fn on_request_headers<'a>(
        &'a mut self,
        _: &'a mut request::Parts,
        _: &'a StreamInfo,
        _: bool,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { Err(self.err("on_request_headers")) })
    }
    fn on_request_body<'a>(
        &'a mut self,
        _: &'a mut BytesMut,
        _: &'a StreamInfo,
        _: bool,
    ) -> FilterFuture<'a, BodyAction> {
        Box::pin(async move { Err(self.err("on_request_body")) })
    }
    fn on_request_trailers<'a>(
        &'a mut self,
        _: &'a mut HeaderMap,
        _: &'a StreamInfo,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { Err(self.err("on_request_trailers")) })
    }
    fn on_response_headers<'a>(
        &'a mut self,
        _: &'a mut response::Parts,
        _: &'a StreamInfo,
        _: bool,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { Err(self.err("on_response_headers")) })
    }
    fn on_response_body<'a>(
        &'a mut self,
        _: &'a mut BytesMut,
        _: &'a StreamInfo,
        _: bool,
    ) -> FilterFuture<'a, BodyAction> {
        Box::pin(async move { Err(self.err("on_response_body")) })
    }
    fn on_response_trailers<'a>(
        &'a mut self,
        _: &'a mut HeaderMap,
        _: &'a StreamInfo,
    ) -> FilterFuture<'a, HeadersAction> {
        Box::pin(async move { Err(self.err("on_response_trailers")) })
    }
    fn on_log(&mut self, _: &LogView<'_>, _: &StreamInfo) {}
}
