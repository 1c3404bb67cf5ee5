//! The per-request [`HttpFilter`]: an HTTP context inside this worker's VM.
//!
//! Each phase moves its data where host calls reach it (a head into the VM's
//! live slot with one swap, a body or trailers into the context), calls the
//! guest and applies what the guest asked for, all in one plain call. When the
//! guest paused, the data stays in the context and the phase answers `Pause`;
//! `poll_resume` then waits (up to `pause_timeout`) for a later callback to
//! resume, reply or reset, and moves the data back.

use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, request};
use sluice_config::FailPolicy;
use sluice_filter::{
    BodyAction, BodyBuf, FilterError, FilterErrorKind, HeadersAction, HttpFilter, LocalResponse, LogView,
    PhaseData, ResponseHead, Resumed, StreamInfo,
};

use crate::factory::{FactoryInner, Plugin, WorkerHold, WorkerSlot};
use crate::phase::{
    Phase, Placeholder, ReqBody, ReqHeaders, ReqTrailers, RespBody, RespHeaders, RespTrailers,
};
use crate::properties::{INFO, LogScope};
use crate::state::{Callback, HttpCtx, LiveHeads, VmState};
use crate::vm::{Vm, VmFailure};

/// How a phase ended.
enum Step {
    Continue,
    Buffer,
    /// Boxed as the guest left it: a phase's result stays small.
    Respond(Box<LocalResponse>),
    Reset,
}

#[derive(Clone, Copy)]
struct CtxRef {
    id: u32,
    generation: u64,
}

/// The error for a request whose context's VM failed.
#[cold]
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
        return slot.vm.as_mut().and_then(|vm| vm.store.data_mut().contexts.get_mut(&c.id));
    }
    slot.orphans.iter_mut().find(|(g, id, _)| *g == c.generation && *id == c.id).map(|(_, _, ctx)| ctx)
}

/// Moves a phase's data where host calls read and edit it: a head into the
/// VM's live slot (one swap), anything else (or a head while the slot is
/// taken) into the context.
fn park<P: Phase>(slot: &mut WorkerSlot, c: CtxRef, value: &mut P::Value, info: &StreamInfo) -> bool {
    if let Some(vm) = slot.vm.as_mut().filter(|vm| vm.generation == c.generation) {
        let VmState { contexts, live, .. } = vm.store.data_mut();
        let Some(ctx) = contexts.get_mut(&c.id) else { return false };
        if let Some((owner, v)) = P::live(live)
            && *owner == 0
        {
            P::resumed(&mut ctx.signal);
            swap_head(v, value);
            *owner = c.id;
            return true;
        }
    }
    let Some(ctx) = find_ctx(slot, c) else { return false };
    P::resumed(&mut ctx.signal);
    P::settle(value, info);
    P::park(ctx, std::mem::replace(value, P::Value::fresh()));
    true
}

/// Moves a phase's data back from the VM or the context (it stays with the
/// caller once the phase has decided, also when the VM failed meanwhile).
fn unpark<P: Phase>(slot: &mut WorkerSlot, c: CtxRef, value: &mut P::Value, info: &StreamInfo) {
    match slot.vm.as_mut().filter(|vm| vm.generation == c.generation) {
        Some(vm) => {
            let VmState { contexts, live, .. } = vm.store.data_mut();
            take_back::<P>(Some(live), contexts.get_mut(&c.id), c.id, value, info);
        }
        None => {
            let Some(ctx) = find_ctx(slot, c) else { return };
            take_back::<P>(None, Some(ctx), c.id, value, info);
        }
    }
}

/// Puts the phase's data back with the caller: swapped back from the VM's
/// live slot, or taken from the context (the placeholder is dropped). Written
/// in place: returned, a head would be copied on the way.
fn take_back<P: Phase>(
    live: Option<&mut LiveHeads>,
    mut ctx: Option<&mut HttpCtx>,
    id: u32,
    value: &mut P::Value,
    info: &StreamInfo,
) {
    if P::CALLBACK == Callback::RequestHeaders
        && let Some(c) = ctx.as_mut()
        && std::mem::take(&mut c.req_edited)
    {
        info.clear_route_cache();
        if std::mem::take(&mut c.req_fields_edited) {
            info.mark_proxy_fields_edited();
        }
    }
    if let Some((owner, v)) = live.and_then(P::live)
        && *owner == id
    {
        swap_head(v, value);
        *owner = 0;
        return;
    }
    if let Some(v) = ctx.and_then(P::unpark) {
        *value = v;
    }
}

/// Swaps a head with the VM's live slot. Kept out of line: inlined, the
/// compiler swaps through a temporary with three copies.
#[inline(never)]
fn swap_head<T>(a: &mut T, b: &mut T) {
    std::mem::swap(a, b);
}

/// The guest paused: the context keeps the phase's data until it decides (the
/// live slot gets a new placeholder).
fn hold<P: Phase>(live: &mut LiveHeads, ctx: &mut HttpCtx, id: u32, info: &StreamInfo) {
    if let Some((owner, v)) = P::live(live)
        && *owner == id
    {
        *owner = 0;
        P::settle(v, info);
        P::park(ctx, std::mem::replace(v, P::Value::fresh()));
    }
}

/// A phase the guest paused: its data is parked in the context until it decides
/// or the pause times out.
struct Paused {
    callback: Callback,
    ctx: CtxRef,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// Whether a callback's return value stops the phase, as Envoy reads the C++
/// SDK's statuses (the Rust SDK returns 0 or 1): headers stop on
/// StopIteration (1), StopAllIterationAndBuffer (3) and
/// StopAllIterationAndWatermark (4); a body on StopIterationAndBuffer (1),
/// StopIterationAndWatermark (2) and StopIterationNoBuffer (3); trailers on
/// StopIteration (1). Anything else continues (ContinueAndEndStream too).
fn stops(callback: Callback, action: i32) -> bool {
    match callback {
        Callback::RequestHeaders | Callback::ResponseHeaders => matches!(action, 1 | 3 | 4),
        Callback::RequestBody | Callback::ResponseBody => matches!(action, 1..=3),
        _ => action == 1,
    }
}

/// What the guest decided, or `None` when it paused and must be waited for.
fn decide<P: Phase>(ctx: &mut HttpCtx, action: i32, eos: bool) -> Option<Step> {
    if let Some(local) = ctx.signal.local.take() {
        return Some(Step::Respond(local));
    }
    if std::mem::take(&mut ctx.signal.reset) {
        return Some(Step::Reset);
    }
    let resumed = P::resumed(&mut ctx.signal);
    if !stops(P::CALLBACK, action) || resumed {
        return Some(Step::Continue);
    }
    if P::BODY && !eos {
        return Some(Step::Buffer);
    }
    None
}

/// Looks at a paused context for the guest's decision.
fn poll_resume<P: Phase>(
    slot: &mut WorkerSlot,
    plugin: &Plugin,
    c: CtxRef,
    cx: &mut Context<'_>,
) -> Poll<Result<Step, FilterError>> {
    let live = slot.vm.as_ref().is_some_and(|vm| vm.generation == c.generation);
    let ctx =
        if live { slot.vm.as_mut().and_then(|vm| vm.store.data_mut().contexts.get_mut(&c.id)) } else { None };
    let Some(ctx) = ctx else {
        return Poll::Ready(Err(lost(slot, plugin, P::CALLBACK)));
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

/// This request's context (`ctx`), made on its first phase; `true` when it is
/// new and the guest has yet to hear of it (see [`first_call`]).
#[inline]
fn context(
    ctx: &mut Option<CtxRef>,
    inner: &FactoryInner,
    slot: &mut WorkerSlot,
    callback: Callback,
) -> Result<(CtxRef, bool), FilterError> {
    match *ctx {
        Some(c) if slot.vm.as_ref().is_some_and(|vm| vm.generation == c.generation) => Ok((c, false)),
        Some(_) => Err(lost(slot, &inner.plugin, callback)),
        None => new_context(ctx, inner, slot, callback),
    }
}

/// [`context`]'s first phase: makes the context (and the VM, if the worker
/// has none yet).
#[inline(never)]
fn new_context(
    ctx: &mut Option<CtxRef>,
    inner: &FactoryInner,
    slot: &mut WorkerSlot,
    callback: Callback,
) -> Result<(CtxRef, bool), FilterError> {
    slot.ensure(inner)?;
    let (Some(id), Some(vm)) = (slot.next_ctx_id(), slot.vm.as_mut()) else {
        return Err(lost(slot, &inner.plugin, callback));
    };
    let c = CtxRef { id, generation: vm.generation };
    vm.store.data_mut().new_context(id);
    *ctx = Some(c);
    Ok((c, true))
}

/// A new context's first phase: `on_context_create`, then the phase's callback,
/// in one guest call when that is `on_request_headers` (see [`crate::fuse`]).
fn first_call<P: Phase>(vm: &mut Vm, id: u32, arg: usize, eos: bool) -> Result<i32, VmFailure> {
    if P::CALLBACK == Callback::RequestHeaders {
        if vm.store.data().skips(P::CALLBACK) {
            vm.context_create(id)?;
            return Ok(0);
        }
        return vm.start_request(id, arg, eos);
    }
    vm.context_create(id)?;
    P::invoke(vm, id, arg, eos)
}

/// Why a phase did not reach the guest's decision.
enum Failed {
    /// The worker's VM is in use (a bug): an error, the fail policy aside.
    Busy(FilterError),
    /// The VM or the context failed: the fail policy decides.
    Policy(FilterError),
}

/// The per-request filter.
pub(crate) struct WasmFilter {
    inner: Rc<WorkerHold>,
    ctx: Option<CtxRef>,
    /// The phase waiting for the guest, if any.
    paused: Option<Paused>,
    /// Fail-open: this request skips the filter from now on.
    bypass: bool,
    /// A failure happened during this request.
    failed: bool,
    /// Filters stay on the worker that made them.
    _local: PhantomData<*const ()>,
}

impl WasmFilter {
    pub fn new(inner: Rc<WorkerHold>) -> WasmFilter {
        WasmFilter { inner, ctx: None, paused: None, bypass: false, failed: false, _local: PhantomData }
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

    /// Runs one phase: the guest's decision, or `None` when it paused (its
    /// data then stays parked in the context until [`WasmFilter::poll_phase`]).
    fn run<P: Phase>(
        &mut self,
        value: &mut P::Value,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<Option<Step>, FilterError> {
        // Failed open, or failed closed earlier in this request (the reply
        // to that failure passes through, as on Envoy).
        if self.bypass || self.failed {
            return Ok(Some(Step::Continue));
        }
        match self.run_guest::<P>(value, info, eos) {
            Ok(step) => Ok(step),
            Err(Failed::Busy(err)) => Err(err),
            Err(Failed::Policy(err)) => self.on_failure(err).map(Some),
        }
    }

    /// [`WasmFilter::run`] past the bypass check; borrows the factory (no
    /// reference count per phase).
    fn run_guest<P: Phase>(
        &mut self,
        value: &mut P::Value,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<Option<Step>, Failed> {
        let inner = &*self.inner;
        let Ok(mut guard) = inner.slot().try_borrow_mut() else {
            return Err(Failed::Busy(inner.plugin.error(
                FilterErrorKind::Internal,
                P::CALLBACK.name(),
                "worker VM busy (re-entered)".into(),
            )));
        };
        let slot = &mut *guard;
        let (c, new) = context(&mut self.ctx, inner, slot, P::CALLBACK).map_err(Failed::Policy)?;
        // A callback the guest declared a no-op continues without it.
        if !new && slot.vm.as_ref().is_some_and(|vm| vm.store.data().skips(P::CALLBACK)) {
            return Ok(Some(Step::Continue));
        }
        let arg = P::arg(value, info);
        let parked = park::<P>(slot, c, value, info);
        let outcome = match slot.vm.as_mut() {
            None => Err(lost(slot, &inner.plugin, P::CALLBACK)),
            Some(vm) => match if new {
                INFO.set(info, || first_call::<P>(vm, c.id, arg, eos))
            } else {
                INFO.set(info, || P::invoke(vm, c.id, arg, eos))
            } {
                Err(f) => Err(slot.fail(inner, f)),
                Ok(action) => {
                    crate::callout::flush(inner, vm, Some(info));
                    // One look-up for the decision and the data.
                    let VmState { contexts, live, .. } = vm.store.data_mut();
                    Ok(contexts.get_mut(&c.id).map(|ctx| {
                        let step = decide::<P>(ctx, action, eos);
                        // A pause leaves the data parked.
                        if step.is_none() && parked {
                            hold::<P>(live, ctx, c.id, info);
                        } else {
                            take_back::<P>(Some(live), Some(ctx), c.id, value, info);
                        }
                        step
                    }))
                }
            },
        };
        match outcome {
            Ok(Some(None)) if parked => {
                let timeout = inner.plugin.limits.pause_timeout;
                self.paused = Some(Paused {
                    callback: P::CALLBACK,
                    ctx: c,
                    deadline: Box::pin(tokio::time::sleep(timeout)),
                });
                Ok(None)
            }
            Ok(Some(step)) => Ok(Some(step.unwrap_or(Step::Continue))),
            Ok(None) => {
                unpark::<P>(slot, c, value, info);
                Ok(Some(Step::Continue))
            }
            Err(err) => {
                unpark::<P>(slot, c, value, info);
                Err(Failed::Policy(err))
            }
        }
    }

    /// Polls the paused phase `P` for the guest's decision (or the pause timeout).
    fn poll_phase<P: Phase>(
        &mut self,
        cx: &mut Context<'_>,
        value: &mut P::Value,
        info: &StreamInfo,
    ) -> Poll<Result<Step, FilterError>> {
        let inner = Rc::clone(&self.inner);
        let Some(paused) = self.paused.as_mut().filter(|p| p.callback == P::CALLBACK) else {
            return Poll::Ready(Err(inner.plugin.error(
                FilterErrorKind::Internal,
                P::CALLBACK.name(),
                "resumed a phase that is not paused".into(),
            )));
        };
        let c = paused.ctx;
        let Ok(mut guard) = inner.slot().try_borrow_mut() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let slot = &mut *guard;
        let outcome = match poll_resume::<P>(slot, &inner.plugin, c, cx) {
            Poll::Ready(r) => r,
            Poll::Pending => match paused.deadline.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    inner.plugin.count_pause_timeout();
                    let timeout = inner.plugin.limits.pause_timeout;
                    Err(inner.plugin.error(
                        FilterErrorKind::Timeout,
                        P::CALLBACK.name(),
                        format!("paused for longer than the {} ms pause_timeout", timeout.as_millis()),
                    ))
                }
            },
        };
        self.paused = None;
        unpark::<P>(slot, c, value, info);
        drop(guard);
        Poll::Ready(match outcome {
            Ok(step) => Ok(step),
            Err(err) => self.on_failure(err),
        })
    }

    /// Ends the context: `on_log` (with the final heads when given), `on_done`,
    /// `on_delete`.
    fn finish(&mut self, view: Option<(&LogView<'_>, &StreamInfo)>) {
        let Some(c) = self.ctx.take() else { return };
        let inner = &*self.inner;
        let Ok(mut guard) = inner.slot().try_borrow_mut() else {
            tracing::warn!(plugin = %inner.plugin.name, "worker VM busy at request end; context leaked");
            return;
        };
        let slot = &mut *guard;
        slot.orphans.retain(|(g, id, _)| !(*g == c.generation && *id == c.id));
        let Some(vm) = slot.vm.as_mut().filter(|vm| vm.generation == c.generation) else { return };
        let result = if vm.store.data().skips_log_and_done() {
            vm.delete(c.id)
        } else {
            match view {
                Some((view, info)) => LogScope::enter(view, info, || vm.finish(c.id)),
                None => vm.finish(c.id),
            }
        };
        vm.store.data_mut().release_context(c.id);
        match result {
            Ok(()) => {
                crate::callout::flush(inner, vm, view.map(|(_, info)| info));
                if !self.failed {
                    slot.request_succeeded();
                }
            }
            Err(f) => {
                slot.fail(inner, f);
            }
        }
    }
}

impl Drop for WasmFilter {
    fn drop(&mut self) {
        self.finish(None);
    }
}

fn headers_action(r: Result<Option<Step>, FilterError>) -> Result<HeadersAction, FilterError> {
    Ok(match r? {
        None => HeadersAction::Pause,
        Some(Step::Continue | Step::Buffer) => HeadersAction::Continue,
        Some(Step::Respond(l)) => HeadersAction::Respond(l),
        Some(Step::Reset) => HeadersAction::Reset,
    })
}

fn body_action(r: Result<Option<Step>, FilterError>) -> Result<BodyAction, FilterError> {
    Ok(match r? {
        None => BodyAction::Pause,
        Some(Step::Continue) => BodyAction::Continue,
        Some(Step::Buffer) => BodyAction::Buffer,
        Some(Step::Respond(l)) => BodyAction::Respond(l),
        Some(Step::Reset) => BodyAction::Reset,
    })
}

fn resumed(step: Step) -> Resumed {
    match step {
        Step::Continue => Resumed::Continue,
        Step::Buffer => Resumed::Buffer,
        Step::Respond(l) => Resumed::Respond(l),
        Step::Reset => Resumed::Reset,
    }
}

impl HttpFilter for WasmFilter {
    /// Host calls read the fields the proxy kept beside the map and move them
    /// in on the first edit (or a pause).
    fn reads_proxy_fields(&self) -> bool {
        true
    }

    /// Only for a context of the live VM, not paused, whose guest declared
    /// every callback after the response head a no-op: those callbacks would
    /// return at once (see `run_guest`), and `finish` calls `on_delete` alone.
    fn ignores_response(&self, trailers: bool) -> bool {
        let Some(c) = self.ctx.filter(|_| self.paused.is_none()) else { return false };
        let Ok(slot) = self.inner.slot().try_borrow() else { return false };
        slot.vm
            .as_ref()
            .is_some_and(|vm| vm.generation == c.generation && vm.store.data().ignores_response(trailers))
    }

    fn on_request_headers(
        &mut self,
        head: &mut request::Parts,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<HeadersAction, FilterError> {
        headers_action(self.run::<ReqHeaders>(head, info, end_of_stream))
    }

    fn on_request_body(
        &mut self,
        body: &mut BodyBuf,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<BodyAction, FilterError> {
        body_action(self.run::<ReqBody>(body, info, end_of_stream))
    }

    fn on_request_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        headers_action(self.run::<ReqTrailers>(trailers, info, true))
    }

    fn on_response_headers(
        &mut self,
        head: &mut ResponseHead,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<HeadersAction, FilterError> {
        headers_action(self.run::<RespHeaders>(head, info, end_of_stream))
    }

    fn on_response_body(
        &mut self,
        body: &mut BodyBuf,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<BodyAction, FilterError> {
        body_action(self.run::<RespBody>(body, info, end_of_stream))
    }

    fn on_response_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        headers_action(self.run::<RespTrailers>(trailers, info, true))
    }

    fn poll_resume(
        &mut self,
        cx: &mut Context<'_>,
        data: PhaseData<'_>,
        info: &StreamInfo,
    ) -> Poll<Result<Resumed, FilterError>> {
        let r = match data {
            PhaseData::RequestHeaders(v) => self.poll_phase::<ReqHeaders>(cx, v, info),
            PhaseData::RequestBody(v) => self.poll_phase::<ReqBody>(cx, v, info),
            PhaseData::RequestTrailers(v) => self.poll_phase::<ReqTrailers>(cx, v, info),
            PhaseData::ResponseHeaders(v) => self.poll_phase::<RespHeaders>(cx, v, info),
            PhaseData::ResponseBody(v) => self.poll_phase::<RespBody>(cx, v, info),
            PhaseData::ResponseTrailers(v) => self.poll_phase::<RespTrailers>(cx, v, info),
        };
        r.map(|r| r.map(resumed))
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
    fn on_request_headers(
        &mut self,
        _: &mut request::Parts,
        _: &StreamInfo,
        _: bool,
    ) -> Result<HeadersAction, FilterError> {
        Err(self.err("on_request_headers"))
    }
    fn on_request_body(
        &mut self,
        _: &mut BodyBuf,
        _: &StreamInfo,
        _: bool,
    ) -> Result<BodyAction, FilterError> {
        Err(self.err("on_request_body"))
    }
    fn on_request_trailers(
        &mut self,
        _: &mut HeaderMap,
        _: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        Err(self.err("on_request_trailers"))
    }
    fn on_response_headers(
        &mut self,
        _: &mut ResponseHead,
        _: &StreamInfo,
        _: bool,
    ) -> Result<HeadersAction, FilterError> {
        Err(self.err("on_response_headers"))
    }
    fn on_response_body(
        &mut self,
        _: &mut BodyBuf,
        _: &StreamInfo,
        _: bool,
    ) -> Result<BodyAction, FilterError> {
        Err(self.err("on_response_body"))
    }
    fn on_response_trailers(
        &mut self,
        _: &mut HeaderMap,
        _: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        Err(self.err("on_response_trailers"))
    }
    fn poll_resume(
        &mut self,
        _: &mut Context<'_>,
        _: PhaseData<'_>,
        _: &StreamInfo,
    ) -> Poll<Result<Resumed, FilterError>> {
        Poll::Ready(Err(self.err("poll_resume")))
    }
    fn on_log(&mut self, _: &LogView<'_>, _: &StreamInfo) {}
}
