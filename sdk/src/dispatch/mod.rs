//! The dispatcher: maps context ids to the filter's contexts and turns each
//! `proxy_on_*` callback into a typed call. The exports in `sys/ffi.rs` (wasm) and
//! the test kit (native) both call the functions here, so both run the same code.
//!
//! A context is taken out of its slot while its callback runs, so host calls made
//! from the callback (callouts, resume) can use the dispatcher state. A callback for
//! a context that is unknown or already running breaks the host contract: that, and
//! only that, traps (after a CRITICAL log line saying why).

use std::any::TypeId;
use std::cell::RefCell;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

use sluice_abi::{BufferType, LogLevel, Status, StreamType};

use crate::callout::{CalloutResponse, GrpcResponse, Token};
use crate::context::{Action, BodyAction, Child, HttpContext, RootContext, StreamContext};
use crate::error::{Error, HostError};
use crate::http::{Http, HttpState, Phase};
use crate::log::log;
use crate::root::Root;
use crate::shared::Queue;
use crate::sys;
use crate::table::{IdMap, IdTable};
use crate::tcp::Tcp;

mod callout;
mod kept;
mod tcp;

pub(crate) use callout::*;
pub(crate) use kept::{Kept, kept};
use kept::{answer_kept, kept_body, kept_headers};
pub(crate) use tcp::*;

// === erased root ===

pub(crate) enum ErasedChild {
    Http(Box<dyn HttpContext>),
    Stream(Box<dyn StreamContext>),
}

/// [`RootContext`] without its associated types, so roots can be boxed.
pub(crate) trait ErasedRoot {
    fn vm_start(&mut self, root: &mut Root, config: Option<Vec<u8>>) -> bool;
    fn configure(&mut self, root: &mut Root, config: &[u8]) -> bool;
    fn tick(&mut self, root: &mut Root) -> Result<(), Error>;
    fn queue_ready(&mut self, root: &mut Root, queue: Queue) -> Result<(), Error>;
    fn http_call_response(
        &mut self,
        root: &mut Root,
        token: Token,
        response: CalloutResponse,
    ) -> Result<(), Error>;
    fn grpc_call_response(
        &mut self,
        root: &mut Root,
        token: Token,
        response: GrpcResponse,
    ) -> Result<(), Error>;
    fn foreign_function(&mut self, root: &mut Root, id: u32, args: Option<Vec<u8>>) -> Result<(), Error>;
    fn done(&mut self, root: &mut Root) -> bool;
    fn log(&mut self, root: &mut Root);
    fn new_child(&mut self, root: &mut Root) -> ErasedChild;
    /// The type of the root's HTTP contexts.
    fn http_type(&self) -> TypeId;
}

impl<R: RootContext> ErasedRoot for R {
    fn vm_start(&mut self, root: &mut Root, config: Option<Vec<u8>>) -> bool {
        match self.on_vm_start(root, config) {
            Ok(()) => true,
            Err(e) => {
                log(LogLevel::Error, &format!("on_vm_start failed: {e}"));
                false
            }
        }
    }

    fn configure(&mut self, root: &mut Root, config: &[u8]) -> bool {
        let result = R::parse_config(config).map_err(Error::from).and_then(|c| self.on_configure(root, c));
        match result {
            Ok(()) => true,
            Err(e) => {
                log(LogLevel::Error, &format!("plugin configuration rejected: {e}"));
                false
            }
        }
    }

    fn tick(&mut self, root: &mut Root) -> Result<(), Error> {
        self.on_tick(root)
    }

    fn queue_ready(&mut self, root: &mut Root, queue: Queue) -> Result<(), Error> {
        self.on_queue_ready(root, queue)
    }

    fn http_call_response(
        &mut self,
        root: &mut Root,
        token: Token,
        response: CalloutResponse,
    ) -> Result<(), Error> {
        self.on_http_call_response(root, token, response)
    }

    fn grpc_call_response(
        &mut self,
        root: &mut Root,
        token: Token,
        response: GrpcResponse,
    ) -> Result<(), Error> {
        self.on_grpc_call_response(root, token, response)
    }

    fn foreign_function(&mut self, root: &mut Root, id: u32, args: Option<Vec<u8>>) -> Result<(), Error> {
        self.on_foreign_function(root, id, args)
    }

    fn done(&mut self, root: &mut Root) -> bool {
        self.on_done(root)
    }

    fn log(&mut self, root: &mut Root) {
        self.on_log(root)
    }

    fn new_child(&mut self, root: &mut Root) -> ErasedChild {
        match RootContext::new_child(self, root) {
            Child::Http(h) => ErasedChild::Http(Box::new(h)),
            Child::Stream(s) => ErasedChild::Stream(s),
        }
    }

    fn http_type(&self) -> TypeId {
        TypeId::of::<R::Http>()
    }
}

// === guest state ===

pub(crate) type RootFactory = Rc<dyn Fn() -> Box<dyn ErasedRoot>>;

struct HttpSlot {
    ctx: Option<Box<dyn HttpContext>>,
    state: HttpState,
}

#[derive(Clone, Copy)]
struct Callout {
    context: u32,
    grpc: bool,
}

/// Everything the guest keeps: the filter factory, the live contexts and the
/// callouts in flight.
#[derive(Default)]
pub(crate) struct Guest {
    factory: Option<RootFactory>,
    /// Every context, by id (one table: one look-up finds any kind).
    contexts: IdTable<Ctx>,
    callouts: IdMap<Callout>,
    /// The type of the HTTP contexts (one root type per guest, so one type).
    http_type: Option<TypeId>,
    /// The [`Kept`] callbacks: those that type leaves to their default.
    kept: u32,
}

/// A context of any kind; `None` while its callback runs.
enum Ctx {
    Root(Option<Box<dyn ErasedRoot>>),
    Http(HttpSlot),
    Stream(Option<Box<dyn StreamContext>>),
}

impl Guest {
    const EMPTY: Guest = Guest {
        factory: None,
        contexts: IdTable::EMPTY,
        callouts: IdMap::with_hasher(BuildHasherDefault::new()),
        http_type: None,
        kept: 0,
    };

    /// A guest whose roots are made by `factory`.
    #[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
    pub(crate) fn new(factory: RootFactory) -> Guest {
        Guest { factory: Some(factory), ..Guest::default() }
    }
}

thread_local! {
    // Const-initialized: no lazy-initialization check on each callback's access.
    static GUEST: RefCell<Guest> = const { RefCell::new(Guest::EMPTY) };
}

fn with_guest<T>(f: impl FnOnce(&mut Guest) -> T) -> T {
    GUEST.with(|g| match g.try_borrow_mut() {
        Ok(mut g) => f(&mut g),
        Err(_) => contract("a callback arrived while the dispatcher was busy (re-entrant call)"),
    })
}

/// Sets the factory of root contexts (the `filter!` macro calls this).
pub(crate) fn set_factory(factory: RootFactory) {
    with_guest(|g| g.factory = Some(factory));
}

/// Runs `f` with `guest` as this thread's guest state (the test kit keeps one guest
/// per simulated VM and swaps it in around each callback).
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub(crate) fn with_installed<T>(guest: &mut Guest, f: impl FnOnce() -> T) -> T {
    struct Swap<'a>(&'a mut Guest);
    impl Drop for Swap<'_> {
        fn drop(&mut self) {
            GUEST.with(|g| std::mem::swap(&mut *g.borrow_mut(), self.0));
        }
    }
    GUEST.with(|g| std::mem::swap(&mut *g.borrow_mut(), guest));
    let _swap = Swap(guest);
    f()
}

/// Records which context a callout token belongs to.
pub(crate) fn register_callout(token: Token, context: u32, grpc: bool) {
    with_guest(|g| g.callouts.insert(token.0, Callout { context, grpc }));
}

/// Forgets that `context` paused `stream` (it was resumed from elsewhere).
pub(crate) fn mark_resumed(context: u32, stream: StreamType) {
    with_guest(|g| {
        if let Some(Ctx::Http(slot)) = g.contexts.get_mut(context)
            && slot.state.paused == Some(stream)
        {
            slot.state.paused = None;
        }
    });
}

/// The host broke the ABI contract: log why, then trap.
fn contract(message: &str) -> ! {
    log(LogLevel::Critical, &format!("sluice-sdk: host contract broken: {message}"));
    panic!("sluice-sdk: host contract broken: {message}");
}

fn with_root<T>(id: u32, callback: &str, f: impl FnOnce(&mut dyn ErasedRoot, &mut Root) -> T) -> T {
    let taken = with_guest(|g| match g.contexts.get_mut(id) {
        Some(Ctx::Root(slot)) => Some(slot.take()),
        _ => None,
    });
    let mut ctx = match taken {
        Some(Some(ctx)) => ctx,
        Some(None) => contract(&format!("{callback} re-entered root context {id}")),
        None => contract(&format!("{callback} for unknown root context {id}")),
    };
    let mut root = Root { id };
    let out = f(&mut *ctx, &mut root);
    with_guest(|g| {
        if let Some(Ctx::Root(slot)) = g.contexts.get_mut(id) {
            *slot = Some(ctx);
        }
    });
    out
}

fn with_http<T>(
    id: u32,
    callback: &str,
    phase: Phase,
    body_size: Option<usize>,
    f: impl FnOnce(&mut dyn HttpContext, &mut Http) -> T,
) -> T {
    let taken = with_guest(|g| match g.contexts.get_mut(id) {
        Some(Ctx::Http(s)) => Some((s.ctx.take(), s.state)),
        _ => None,
    });
    let (mut ctx, state) = match taken {
        Some((Some(ctx), state)) => (ctx, state),
        Some((None, _)) => contract(&format!("{callback} re-entered HTTP context {id}")),
        None => contract(&format!("{callback} for unknown HTTP context {id}")),
    };
    let mut http = Http { id, phase, body_size, state };
    let out = f(&mut *ctx, &mut http);
    if !matches!(phase, Phase::Callout | Phase::Log) {
        http.state.last_phase = Some(phase);
    }
    with_guest(|g| {
        if let Some(Ctx::Http(slot)) = g.contexts.get_mut(id) {
            slot.ctx = Some(ctx);
            slot.state = http.state;
        }
    });
    out
}

fn with_stream<T>(
    id: u32,
    callback: &str,
    size: usize,
    f: impl FnOnce(&mut dyn StreamContext, &mut Tcp) -> T,
) -> T {
    let taken = with_guest(|g| match g.contexts.get_mut(id) {
        Some(Ctx::Stream(slot)) => Some(slot.take()),
        _ => None,
    });
    let mut ctx = match taken {
        Some(Some(ctx)) => ctx,
        Some(None) => contract(&format!("{callback} re-entered TCP context {id}")),
        None => contract(&format!("{callback} for unknown TCP context {id}")),
    };
    let mut tcp = Tcp { id, data_size: size };
    let out = f(&mut *ctx, &mut tcp);
    with_guest(|g| {
        if let Some(Ctx::Stream(slot)) = g.contexts.get_mut(id) {
            *slot = Some(ctx);
        }
    });
    out
}

enum Kind {
    Root,
    Http,
    Stream,
}

fn kind(id: u32) -> Option<Kind> {
    with_guest(|g| match g.contexts.get(id)? {
        Ctx::Root(_) => Some(Kind::Root),
        Ctx::Http(_) => Some(Kind::Http),
        Ctx::Stream(_) => Some(Kind::Stream),
    })
}

fn report(callback: &str, e: &Error) {
    log(LogLevel::Error, &format!("{callback} failed: {e}"));
}

fn read_buffer(ty: BufferType, size: usize, what: &'static str) -> Result<Option<Vec<u8>>, HostError> {
    if size == 0 {
        return Ok(None);
    }
    match sys::get_buffer_bytes(ty.as_u32(), 0, size) {
        Ok(v) => Ok(v),
        Err(raw) if raw == Status::NotFound.as_u32() => Ok(None),
        Err(raw) => Err(HostError::new("proxy_get_buffer_bytes", what, raw)),
    }
}

// === lifecycle ===

pub(crate) fn on_context_create(id: u32, parent: u32) {
    if parent == 0 {
        let factory = with_guest(|g| g.factory.clone());
        let Some(factory) = factory else {
            contract("no filter is registered: the module must invoke sluice_sdk::filter!(YourRoot)")
        };
        let root = factory();
        let duplicate = with_guest(|g| {
            let known = g.contexts.contains(id);
            if !known {
                g.http_type = Some(root.http_type());
                g.contexts.insert(id, Ctx::Root(Some(root)));
            }
            known
        });
        if duplicate {
            contract(&format!("proxy_on_context_create for existing root context {id}"));
        }
        return;
    }
    let child = with_root(parent, "proxy_on_context_create", |r, root| r.new_child(root));
    let duplicate = with_guest(|g| {
        if g.contexts.contains(id) {
            return true;
        }
        let ctx = match child {
            ErasedChild::Http(ctx) => Ctx::Http(HttpSlot { ctx: Some(ctx), state: HttpState::default() }),
            ErasedChild::Stream(ctx) => Ctx::Stream(Some(ctx)),
        };
        g.contexts.insert(id, ctx);
        false
    });
    if duplicate {
        contract(&format!("proxy_on_context_create for existing context {id}"));
    }
}

pub(crate) fn on_vm_start(id: u32, size: usize) -> bool {
    let config = match read_buffer(BufferType::VmConfiguration, size, "vm configuration") {
        Ok(c) => c,
        Err(e) => {
            log(LogLevel::Error, &format!("on_vm_start: cannot read the VM configuration: {e}"));
            return false;
        }
    };
    with_root(id, "proxy_on_vm_start", |r, root| r.vm_start(root, config))
}

pub(crate) fn on_configure(id: u32, size: usize) -> bool {
    let config = match read_buffer(BufferType::PluginConfiguration, size, "plugin configuration") {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            log(LogLevel::Error, &format!("on_configure: cannot read the plugin configuration: {e}"));
            return false;
        }
    };
    with_root(id, "proxy_on_configure", |r, root| r.configure(root, &config))
}

pub(crate) fn on_tick(id: u32) {
    if let Err(e) = with_root(id, "proxy_on_tick", |r, root| r.tick(root)) {
        report("on_tick", &e);
    }
}

pub(crate) fn on_queue_ready(id: u32, queue: u32) {
    if let Err(e) = with_root(id, "proxy_on_queue_ready", |r, root| r.queue_ready(root, Queue(queue))) {
        report("on_queue_ready", &e);
    }
}

pub(crate) fn on_foreign_function(id: u32, function_id: u32, size: usize) {
    let args = read_buffer(BufferType::CallData, size, "foreign function arguments");
    let result = match args {
        Ok(args) => {
            with_root(id, "proxy_on_foreign_function", |r, root| r.foreign_function(root, function_id, args))
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        report("on_foreign_function", &e);
    }
}

pub(crate) fn on_done(id: u32) -> bool {
    match kind(id) {
        Some(Kind::Root) => with_root(id, "proxy_on_done", |r, root| r.done(root)),
        Some(_) => true,
        None => contract(&format!("proxy_on_done for unknown context {id}")),
    }
}

pub(crate) fn on_log(id: u32) {
    if answer_kept(id, Kept::Log, |_| Some(())).is_some() {
        return;
    }
    match kind(id) {
        Some(Kind::Root) => with_root(id, "proxy_on_log", |r, root| r.log(root)),
        Some(Kind::Http) => {
            if let Err(e) = with_http(id, "proxy_on_log", Phase::Log, None, |c, http| c.on_log(http)) {
                report("on_log", &e);
            }
        }
        Some(Kind::Stream) => with_stream(id, "proxy_on_log", 0, |c, tcp| c.on_log(tcp)),
        None => contract(&format!("proxy_on_log for unknown context {id}")),
    }
}

pub(crate) fn on_delete(id: u32) {
    let known = with_guest(|g| {
        let known = g.contexts.remove(id).is_some();
        if !g.callouts.is_empty() {
            g.callouts.retain(|_, c| c.context != id);
        }
        known
    });
    if !known {
        contract(&format!("proxy_on_delete for unknown context {id}"));
    }
}

// === HTTP ===

fn headers_result(
    ctx: &mut dyn HttpContext,
    http: &mut Http,
    stream: StreamType,
    name: &str,
    r: Result<Action, Error>,
) -> u32 {
    let action = match r {
        Ok(a) => a,
        Err(e) => {
            report(name, &e);
            ctx.on_error(http, e)
        }
    };
    match action {
        Action::Continue => Action::Continue.as_raw(),
        Action::Pause => {
            if !http.state.responded {
                http.state.paused = Some(stream);
            }
            Action::Pause.as_raw()
        }
    }
}

fn body_result(
    ctx: &mut dyn HttpContext,
    http: &mut Http,
    stream: StreamType,
    name: &str,
    eos: bool,
    r: Result<BodyAction, Error>,
) -> u32 {
    let action = match r {
        Ok(a) => a,
        Err(e) => {
            report(name, &e);
            match ctx.on_error(http, e) {
                Action::Continue => BodyAction::Continue,
                Action::Pause => BodyAction::Pause,
            }
        }
    };
    let until_end = |h: &mut Http, v: bool| match stream {
        StreamType::HttpRequest => h.state.request_until_end = v,
        _ => h.state.response_until_end = v,
    };
    match action {
        BodyAction::Continue => Action::Continue.as_raw(),
        BodyAction::Buffer => Action::Pause.as_raw(),
        // At end of stream there is nothing left to wait for.
        BodyAction::BufferUntilEnd if eos => Action::Continue.as_raw(),
        BodyAction::BufferUntilEnd => {
            until_end(http, true);
            Action::Pause.as_raw()
        }
        BodyAction::Pause => {
            if !http.state.responded {
                http.state.paused = Some(stream);
            }
            Action::Pause.as_raw()
        }
    }
}

impl Action {
    fn as_raw(self) -> u32 {
        match self {
            Action::Continue => sluice_abi::Action::Continue.as_u32(),
            Action::Pause => sluice_abi::Action::Pause.as_u32(),
        }
    }
}

/// Trailers ended a body the filter buffers with `BufferUntilEnd`: give it the
/// end-of-body call it waits for (the buffered body is still readable here).
fn final_body_call(c: &mut dyn HttpContext, http: &mut Http, stream: StreamType) -> u32 {
    let trailers_phase = http.phase;
    let (phase, size, name) = match stream {
        StreamType::HttpRequest => {
            http.state.request_until_end = false;
            (Phase::RequestBody, http.state.request_body_size, "on_request_body")
        }
        _ => {
            http.state.response_until_end = false;
            (Phase::ResponseBody, http.state.response_body_size, "on_response_body")
        }
    };
    http.phase = phase;
    http.body_size = Some(size);
    let r = match stream {
        StreamType::HttpRequest => c.on_request_body(http, size, true),
        _ => c.on_response_body(http, size, true),
    };
    let raw = body_result(c, http, stream, name, true, r);
    http.phase = trailers_phase;
    http.body_size = None;
    raw
}

pub(crate) fn on_request_headers(id: u32, _num_headers: usize, eos: bool) -> u32 {
    if let Some(raw) = answer_kept(id, Kept::RequestHeaders, |s| kept_headers(s, Phase::RequestHeaders)) {
        return raw;
    }
    with_http(id, "proxy_on_request_headers", Phase::RequestHeaders, None, |c, http| {
        let r = c.on_request_headers(http, eos);
        headers_result(c, http, StreamType::HttpRequest, "on_request_headers", r)
    })
}

pub(crate) fn on_request_body(id: u32, size: usize, eos: bool) -> u32 {
    let kept = answer_kept(id, Kept::RequestBody, |s| {
        s.request_body_size = size;
        s.last_phase = Some(Phase::RequestBody);
        Some(kept_body(&mut s.request_until_end, eos))
    });
    if let Some(raw) = kept {
        return raw;
    }
    with_http(id, "proxy_on_request_body", Phase::RequestBody, Some(size), |c, http| {
        http.state.request_body_size = size;
        if http.state.request_until_end && !eos {
            return Action::Pause.as_raw();
        }
        http.state.request_until_end = false;
        let r = c.on_request_body(http, size, eos);
        body_result(c, http, StreamType::HttpRequest, "on_request_body", eos, r)
    })
}

pub(crate) fn on_request_trailers(id: u32, _num_trailers: usize) -> u32 {
    // A body buffered until its end owes the filter its end-of-body call first.
    let kept = answer_kept(id, Kept::RequestTrailers, |s| {
        (!s.request_until_end).then(|| kept_headers(s, Phase::RequestTrailers)).flatten()
    });
    if let Some(raw) = kept {
        return raw;
    }
    with_http(id, "proxy_on_request_trailers", Phase::RequestTrailers, None, |c, http| {
        if http.state.request_until_end {
            let raw = final_body_call(c, http, StreamType::HttpRequest);
            if raw != Action::Continue.as_raw() {
                return raw;
            }
        }
        let r = c.on_request_trailers(http);
        headers_result(c, http, StreamType::HttpRequest, "on_request_trailers", r)
    })
}

pub(crate) fn on_response_headers(id: u32, _num_headers: usize, eos: bool) -> u32 {
    if let Some(raw) = answer_kept(id, Kept::ResponseHeaders, |s| kept_headers(s, Phase::ResponseHeaders)) {
        return raw;
    }
    with_http(id, "proxy_on_response_headers", Phase::ResponseHeaders, None, |c, http| {
        let r = c.on_response_headers(http, eos);
        headers_result(c, http, StreamType::HttpResponse, "on_response_headers", r)
    })
}

pub(crate) fn on_response_body(id: u32, size: usize, eos: bool) -> u32 {
    let kept = answer_kept(id, Kept::ResponseBody, |s| {
        s.response_body_size = size;
        s.last_phase = Some(Phase::ResponseBody);
        Some(kept_body(&mut s.response_until_end, eos))
    });
    if let Some(raw) = kept {
        return raw;
    }
    with_http(id, "proxy_on_response_body", Phase::ResponseBody, Some(size), |c, http| {
        http.state.response_body_size = size;
        if http.state.response_until_end && !eos {
            return Action::Pause.as_raw();
        }
        http.state.response_until_end = false;
        let r = c.on_response_body(http, size, eos);
        body_result(c, http, StreamType::HttpResponse, "on_response_body", eos, r)
    })
}

pub(crate) fn on_response_trailers(id: u32, _num_trailers: usize) -> u32 {
    let kept = answer_kept(id, Kept::ResponseTrailers, |s| {
        (!s.response_until_end).then(|| kept_headers(s, Phase::ResponseTrailers)).flatten()
    });
    if let Some(raw) = kept {
        return raw;
    }
    with_http(id, "proxy_on_response_trailers", Phase::ResponseTrailers, None, |c, http| {
        if http.state.response_until_end {
            let raw = final_body_call(c, http, StreamType::HttpResponse);
            if raw != Action::Continue.as_raw() {
                return raw;
            }
        }
        let r = c.on_response_trailers(http);
        headers_result(c, http, StreamType::HttpResponse, "on_response_trailers", r)
    })
}
