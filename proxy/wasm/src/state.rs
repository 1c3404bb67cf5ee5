//! What a VM's `Store` holds: per-VM host state, per-request contexts, and the
//! work host calls leave for after the callback.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, request};
use sluice_abi::foreign::noop;
use sluice_abi::ids::IdHasher;
use sluice_filter::{BodyBuf, CalloutResponse, LocalResponse, ResponseHead};
use tokio::sync::mpsc::UnboundedSender;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::contexts::Contexts;

use crate::factory::Plugin;
use crate::metrics::GuestMetric;

/// `tracing` target of guest log lines.
pub(crate) const GUEST_TARGET: &str = "sluice_wasm::guest";

/// The guest callbacks, for error messages, metrics and map windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callback {
    None,
    Initialize,
    ContextCreate,
    VmStart,
    Configure,
    Tick,
    QueueReady,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Done,
    Delete,
    HttpCallResponse,
    GrpcReceive,
    GrpcClose,
    Allocate,
}

impl Callback {
    pub fn name(self) -> &'static str {
        match self {
            Callback::None => "none",
            Callback::Initialize => "_initialize",
            Callback::ContextCreate => "on_context_create",
            Callback::VmStart => "on_vm_start",
            Callback::Configure => "on_configure",
            Callback::Tick => "on_tick",
            Callback::QueueReady => "on_queue_ready",
            Callback::RequestHeaders => "on_request_headers",
            Callback::RequestBody => "on_request_body",
            Callback::RequestTrailers => "on_request_trailers",
            Callback::ResponseHeaders => "on_response_headers",
            Callback::ResponseBody => "on_response_body",
            Callback::ResponseTrailers => "on_response_trailers",
            Callback::Log => "on_log",
            Callback::Done => "on_done",
            Callback::Delete => "on_delete",
            Callback::HttpCallResponse => "on_http_call_response",
            Callback::GrpcReceive => "on_grpc_receive",
            Callback::GrpcClose => "on_grpc_close",
            Callback::Allocate => "allocator",
        }
    }

    /// The callback's bit in [`noop`] (0 for those the set cannot hold).
    fn noop_bit(self) -> u32 {
        match self {
            Callback::RequestHeaders => noop::REQUEST_HEADERS,
            Callback::RequestBody => noop::REQUEST_BODY,
            Callback::RequestTrailers => noop::REQUEST_TRAILERS,
            Callback::ResponseHeaders => noop::RESPONSE_HEADERS,
            Callback::ResponseBody => noop::RESPONSE_BODY,
            Callback::ResponseTrailers => noop::RESPONSE_TRAILERS,
            Callback::Log => noop::LOG,
            Callback::Done => noop::DONE,
            _ => 0,
        }
    }
}

/// Every bit of [`noop`].
const NOOP_ALL: u32 = noop::REQUEST_HEADERS
    | noop::REQUEST_BODY
    | noop::REQUEST_TRAILERS
    | noop::RESPONSE_HEADERS
    | noop::RESPONSE_BODY
    | noop::RESPONSE_TRAILERS
    | noop::LOG
    | noop::DONE;

/// The names of the callbacks in a [`noop`] set, for logs and the admin API.
pub(crate) fn noop_names(bits: u32) -> Vec<&'static str> {
    [
        Callback::RequestHeaders,
        Callback::RequestBody,
        Callback::RequestTrailers,
        Callback::ResponseHeaders,
        Callback::ResponseBody,
        Callback::ResponseTrailers,
        Callback::Log,
        Callback::Done,
    ]
    .into_iter()
    .filter(|c| bits & c.noop_bit() != 0)
    .map(Callback::name)
    .collect()
}

/// The callback being run: its context, and the effective context host calls act on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallFrame {
    pub callback: Callback,
    pub ctx: u32,
    pub effective: u32,
}

/// What a paused (or running) HTTP context was told to do by the guest.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    pub resume_request: bool,
    pub resume_response: bool,
    pub reset: bool,
    /// Boxed: rare, and the context stays small.
    pub local: Option<Box<LocalResponse>>,
}

/// The data of the phase a context is in (or paused in). The filter lock of a
/// request lets one phase of a filter run at a time, so one slot is enough; a
/// context stays a few cache lines, which it touches on every request. Heads
/// are boxed: they are only here while paused (see [`LiveHeads`]).
#[derive(Default)]
pub(crate) enum Parked {
    #[default]
    None,
    ReqHead(Box<request::Parts>),
    ReqBody(BodyBuf),
    ReqTrailers(HeaderMap),
    RespHead(Box<ResponseHead>),
    RespBody(BodyBuf),
    RespTrailers(HeaderMap),
}

macro_rules! parked_access {
    ($get:ident, $get_mut:ident, $variant:ident, $ty:ty) => {
        pub fn $get(&self) -> Option<&$ty> {
            match &self.parked {
                Parked::$variant(v) => Some(v),
                _ => None,
            }
        }
        pub fn $get_mut(&mut self) -> Option<&mut $ty> {
            match &mut self.parked {
                Parked::$variant(v) => Some(v),
                _ => None,
            }
        }
    };
}

impl HttpCtx {
    parked_access!(req_head, req_head_mut, ReqHead, request::Parts);
    parked_access!(req_body, req_body_mut, ReqBody, BodyBuf);
    parked_access!(req_trailers, req_trailers_mut, ReqTrailers, HeaderMap);
    parked_access!(resp_head, resp_head_mut, RespHead, ResponseHead);
    parked_access!(resp_body, resp_body_mut, RespBody, BodyBuf);
    parked_access!(resp_trailers, resp_trailers_mut, RespTrailers, HeaderMap);
}

/// One HTTP request's context inside a VM.
#[derive(Default)]
pub(crate) struct HttpCtx {
    /// The current phase's head, body or trailers, readable and writable by host calls.
    pub parked: Parked,
    /// The guest edited request headers or pseudo-headers: clear the route cache.
    pub req_edited: bool,
    /// Among them a field the proxy manages (`sluice_filter::is_proxy_managed`).
    pub req_fields_edited: bool,
    pub signal: Signal,
    pub waker: Option<Waker>,
    /// This context's own copy of its `proxy_set_property` values: what it
    /// reads back where its request's filter state is out of reach (a
    /// callout answered after the request ended).
    pub properties: sluice_filter::FilterState,
    /// Bytes the guest wrote into header and trailer maps of this request
    /// (checked against the plugin's memory cap).
    pub header_bytes_written: usize,
    /// A header write of this request was refused over the quota (logged once).
    pub quota_hit: bool,
}

/// The response of a callout, readable during its callback.
pub(crate) struct CalloutData {
    pub response: Option<CalloutResponse>,
    /// gRPC: the message (buffer 5).
    pub grpc_message: Bytes,
    /// `proxy_get_status`: code and message.
    pub status: (u32, String),
}

/// Work for after the callback returns (the host never re-enters the guest).
pub(crate) enum Deferred {
    /// Start a callout. `stream`: the HTTP context whose phase made it (0
    /// for none): its answer is delivered with that request's stream info.
    Callout {
        token: u32,
        cluster: String,
        request: Box<http::Request<Bytes>>,
        timeout: Duration,
        grpc: bool,
        stream: u32,
    },
    /// (Re)start the root's tick timer.
    Tick,
    /// Wake the task waiting on this HTTP context.
    Wake(u32),
    /// Start the queue-notification task of this VM.
    Mailbox(tokio::sync::mpsc::UnboundedReceiver<u32>),
}

pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// Memory and table caps of a VM; remembers a refused growth so that the trap
/// that follows is reported as out-of-memory.
pub(crate) struct Limiter {
    pub memory_bytes: usize,
    pub oom: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.oom = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Guest log handling: capture (at load), the last CRITICAL line (the Rust SDK's
/// panic message), and line buffers for WASI stdout/stderr.
#[derive(Default)]
pub(crate) struct LogState {
    /// Lines kept while loading, for the `LoadError` message.
    pub capture: Option<Vec<String>>,
    /// The last CRITICAL log line or stderr line of the current callback.
    pub last_fatal: Option<String>,
    /// `last_fatal` came from stderr (a CRITICAL log line wins over it).
    pub fatal_from_stderr: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Lines emitted in the current callback.
    pub lines: u32,
    /// Lines dropped in the current callback, past [`MAX_LINES_PER_CALLBACK`].
    pub dropped: u32,
}

const MAX_CAPTURED_LINES: usize = 32;
const MAX_LINE: usize = 2048;
/// Most log lines (`proxy_log`, stdout, stderr) one callback may emit: a guest
/// logging in a loop cannot flood the proxy's log. The rest are counted.
const MAX_LINES_PER_CALLBACK: u32 = 100;

impl LogState {
    /// Counts a line the subscriber would emit: whether it may be.
    pub fn admit(&mut self) -> bool {
        if self.lines < MAX_LINES_PER_CALLBACK {
            self.lines += 1;
            true
        } else {
            self.dropped = self.dropped.saturating_add(1);
            false
        }
    }

    pub fn capture(&mut self, level: &str, line: &str) {
        if let Some(lines) = &mut self.capture
            && lines.len() < MAX_CAPTURED_LINES
        {
            lines.push(format!("{level}: {}", truncate(line, MAX_LINE)));
        }
    }

    pub fn fatal(&mut self, line: &str) {
        self.fatal_from_stderr = false;
        self.last_fatal = Some(truncate(line, MAX_LINE).to_string());
    }
}

/// At the end of a callback that dropped log lines: counts and reports them.
pub(crate) fn report_dropped_lines(st: &mut VmState, callback: Callback) {
    let dropped = std::mem::take(&mut st.log.dropped);
    let plugin = &*st.plugin.name;
    st.plugin.host.metrics.log_dropped.with_label_values(&[plugin]).inc_by(u64::from(dropped));
    tracing::warn!(
        target: GUEST_TARGET,
        plugin,
        callback = callback.name(),
        dropped,
        "guest log lines dropped: more than {MAX_LINES_PER_CALLBACK} in one callback"
    );
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A phase's data as `Parked` holds it (heads boxed).
pub(crate) trait ParkedForm<T> {
    fn wrap(v: T) -> Self;
    fn unwrap(self) -> T;
}

impl<T> ParkedForm<T> for Box<T> {
    fn wrap(v: T) -> Self {
        Box::new(v)
    }
    fn unwrap(self) -> T {
        *self
    }
}

macro_rules! parked_as_is {
    ($($t:ty),*) => {$(
        impl ParkedForm<$t> for $t {
            fn wrap(v: $t) -> Self {
                v
            }
            fn unwrap(self) -> $t {
                self
            }
        }
    )*};
}
parked_as_is!(BodyBuf, HeaderMap);

/// The heads of the header phase being run, kept in the VM rather than in the
/// context: a head moves into the guest's reach and back with one swap each
/// way (the caller is left the placeholder that sat here). A context that
/// pauses in a header phase takes its head along (`Parked`); so does each
/// context of a VM that fails.
pub(crate) struct LiveHeads {
    /// The context whose request head is in `request` (0: none, a placeholder).
    pub request_owner: u32,
    pub request: request::Parts,
    /// The context whose response head is in `response` (0: none).
    pub response_owner: u32,
    pub response: ResponseHead,
}

/// An empty request head.
pub(crate) fn empty_request() -> request::Parts {
    http::Request::new(()).into_parts().0
}

/// An empty response head.
pub(crate) fn empty_response() -> http::response::Parts {
    http::Response::new(()).into_parts().0
}

impl LiveHeads {
    fn new() -> LiveHeads {
        LiveHeads {
            request_owner: 0,
            request: empty_request(),
            response_owner: 0,
            response: ResponseHead::new(empty_response()),
        }
    }

    /// Moves the heads still here to their contexts (the VM is going away).
    fn park_in(&mut self, contexts: &mut Contexts) {
        let owner = std::mem::take(&mut self.request_owner);
        if let Some(ctx) = contexts.get_mut(&owner) {
            let head = std::mem::replace(&mut self.request, empty_request());
            ctx.parked = Parked::ReqHead(Box::new(head));
        }
        let owner = std::mem::take(&mut self.response_owner);
        if let Some(ctx) = contexts.get_mut(&owner) {
            let head = std::mem::replace(&mut self.response, ResponseHead::new(empty_response()));
            ctx.parked = Parked::RespHead(Box::new(head));
        }
    }
}

/// The data of a VM's `Store`.
pub(crate) struct VmState {
    pub plugin: Arc<Plugin>,
    /// The plugin's callback deadline in epoch ticks, kept here so a call reads
    /// no more than the store's own state.
    pub deadline_ticks: u64,
    pub limiter: Limiter,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub root_id: u32,
    pub frame: CallFrame,
    pub contexts: Contexts,
    pub live: LiveHeads,
    /// `true` for a worker's VM (may spawn tasks), `false` for the validation VM.
    pub worker: bool,
    pub tick_period: Option<Duration>,
    pub callout: Option<CalloutData>,
    /// Callouts in flight, by token (`true` = gRPC).
    pub pending_callouts: IdMap<bool>,
    pub next_token: u32,
    /// While a callout's answer is delivered with its request's stream info
    /// in scope: the HTTP context that made it (else 0).
    pub callout_stream: u32,
    pub deferred: Vec<Deferred>,
    pub metrics: Vec<Option<GuestMetric>>,
    pub log: LogState,
    /// Strong end of this VM's queue mailbox (queues hold weak senders).
    pub mailbox: Option<UnboundedSender<u32>>,
    /// `proxy_set_property` values set on the root context.
    pub root_properties: sluice_filter::FilterState,
    /// The HTTP callbacks the guest declared no-ops ([`noop`] bits, see
    /// [`VmState::declare_noop`]); the filter skips them.
    pub noop_http: u32,
}

impl VmState {
    pub fn new(plugin: Arc<Plugin>, worker: bool) -> VmState {
        let memory_bytes = usize::try_from(plugin.limits.memory_bytes).unwrap_or(usize::MAX);
        VmState {
            deadline_ticks: plugin.deadline_ticks,
            plugin,
            limiter: Limiter { memory_bytes, oom: false },
            memory: None,
            alloc: None,
            root_id: 1,
            frame: CallFrame { callback: Callback::None, ctx: 0, effective: 0 },
            contexts: Contexts::default(),
            live: LiveHeads::new(),
            worker,
            tick_period: None,
            callout: None,
            pending_callouts: IdMap::default(),
            next_token: 1,
            callout_stream: 0,
            deferred: Vec::new(),
            metrics: Vec::new(),
            log: LogState::default(),
            mailbox: None,
            root_properties: sluice_filter::FilterState::default(),
            noop_http: 0,
        }
    }

    /// Adds to the HTTP callbacks the guest declared no-ops (the foreign
    /// function `sluice.noop_http_callbacks`). A trailers callback counts only
    /// with its body's: trailers deliver the last call of a body buffered until
    /// its end. Returns the new set when it grew.
    pub fn declare_noop(&mut self, bits: u32) -> Option<u32> {
        let mut set = self.noop_http | (bits & NOOP_ALL);
        if set & noop::REQUEST_BODY == 0 {
            set &= !noop::REQUEST_TRAILERS;
        }
        if set & noop::RESPONSE_BODY == 0 {
            set &= !noop::RESPONSE_TRAILERS;
        }
        (set != self.noop_http).then(|| {
            self.noop_http = set;
            set
        })
    }

    /// `callback` is a declared no-op: the filter answers it without the guest.
    #[inline]
    pub fn skips(&self, callback: Callback) -> bool {
        self.noop_http & callback.noop_bit() != 0
    }

    /// `on_log` and `on_done` are declared no-ops: a context ends with `on_delete` alone.
    #[inline]
    pub fn skips_log_and_done(&self) -> bool {
        self.noop_http & (noop::LOG | noop::DONE) == noop::LOG | noop::DONE
    }

    /// The response body, `on_log`, `on_done` and, when `trailers` may still
    /// come, the trailers callback are all declared no-ops: nothing of a
    /// request after its response head reaches the guest but `on_delete`.
    #[inline]
    pub fn ignores_response(&self, trailers: bool) -> bool {
        let after_head =
            noop::RESPONSE_BODY | noop::LOG | noop::DONE | if trailers { noop::RESPONSE_TRAILERS } else { 0 };
        self.noop_http & after_head == after_head
    }

    /// Makes HTTP context `id` (in the context table: no allocation).
    pub fn new_context(&mut self, id: u32) {
        self.contexts.insert(id);
    }

    /// Drops HTTP context `id`.
    pub fn release_context(&mut self, id: u32) {
        self.contexts.remove(&id);
    }

    /// Takes every HTTP context out (the VM failed), each with its head.
    pub fn take_contexts(&mut self) -> Contexts {
        let mut contexts = std::mem::take(&mut self.contexts);
        self.live.park_in(&mut contexts);
        contexts
    }

    /// The request head of context `id`, in its header phase (or paused in it).
    pub fn req_head(&self, id: u32) -> Option<&request::Parts> {
        if id != 0 && self.live.request_owner == id {
            return Some(&self.live.request);
        }
        self.contexts.get(&id)?.req_head()
    }

    /// The response head of context `id`, in its header phase (or paused in it).
    pub fn resp_head(&self, id: u32) -> Option<&ResponseHead> {
        if id != 0 && self.live.response_owner == id {
            return Some(&self.live.response);
        }
        self.contexts.get(&id)?.resp_head()
    }

    /// The HTTP context host calls currently act on, if the effective context is one.
    pub fn effective_http(&mut self) -> Option<&mut HttpCtx> {
        let id = self.frame.effective;
        self.contexts.get_mut(&id)
    }
}
