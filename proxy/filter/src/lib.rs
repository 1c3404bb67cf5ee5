//! The filter-chain seam: what the data plane calls on each filter of a request,
//! and what a filter implementation (the wasm host, or a native filter) provides.
//!
//! The data plane depends on this crate, never on wasmtime. A filter implementation
//! depends on this crate, never on hyper.
//!
//! # Threading
//!
//! Sluice runs one tokio current-thread runtime per worker thread, inside a
//! `LocalSet`. [`FilterFactory`] values are shared by all workers (`Send + Sync`);
//! [`HttpFilter`] values are made and driven on one worker and may be `!Send`, so a
//! factory can keep per-worker state (such as a wasm VM per worker) without locks.
//! `tokio::task::spawn_local` is available on worker threads.
//!
//! # Request heads
//!
//! Filters see request heads in a normalized form. An origin-form request
//! (HTTP/1.1's usual `GET /path`) keeps its URI and its one `host` header, which is
//! its authority (proxy-wasm's `:authority`; `:scheme` is the downstream's); any
//! other request's URI is absolute (scheme, authority, path and query) and its
//! `host` header is not in the map. Either way `host` is the authority, not a
//! header of its own: keeping HTTP/1.1 heads as they came spares every filtered
//! request an authority parse and two map edits. The path
//! has already been normalized (dot segments, merged slashes). Edits to the URI or
//! the headers must call [`StreamInfo::clear_route_cache`] so the route is
//! re-evaluated, as Envoy does. `x-request-id` and `x-forwarded-for`/`-proto`,
//! which the proxy sets before the filters, are in the map for every filter
//! unless it opts to read them beside it ([`HttpFilter::reads_proxy_fields`],
//! [`ProxyFields`]).
//!
//! # Order
//!
//! Request phases run through the chain forward, response phases backward. A
//! phase returning `Continue` hands the message to the next filter.
//!
//! # Pausing
//!
//! Phases are plain calls: a filter that decides at once (the common case) costs
//! no future, no allocation and no task wakeup. A filter that must wait (for a
//! callout, a timer) returns `Pause`; the data plane then keeps the chain where
//! it is and calls [`HttpFilter::poll_resume`] with the same phase's data until it
//! is ready, as Envoy's filter manager does with `StopIteration` and
//! `continueDecoding`. [`resume`] is the same as a future.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, request, response};
use sluice_config::FilterSpec;

mod body;
mod fields;
mod head;
pub mod response_flags;
mod state;

pub use body::BodyBuf;
pub use fields::{
    ProxyFields, X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID, is_proxy_managed, managed, managed_field,
};
pub use head::{EncodedFields, ResponseHead};
pub use state::FilterState;

/// A boxed, possibly `!Send`, future.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What a header or trailer phase decided.
#[derive(Debug)]
pub enum HeadersAction {
    /// Hand the (possibly edited) message to the next filter.
    Continue,
    /// Wait: the data plane calls [`HttpFilter::poll_resume`] until it decides.
    Pause,
    /// Stop the chain and answer with this response instead (boxed: rare,
    /// and it would make every phase's result as large as itself).
    Respond(Box<LocalResponse>),
    /// Reset the stream (close the downstream connection for HTTP/1.1).
    Reset,
}

/// What a body phase decided.
#[derive(Debug)]
pub enum BodyAction {
    /// Forward what is in the buffer now (the filter may have rewritten it).
    Continue,
    /// Keep the buffer and call again with more data appended (at most the
    /// listener's `max_buffered_body_bytes`: 413 for a request, 500 for a response).
    Buffer,
    /// Wait: the data plane calls [`HttpFilter::poll_resume`] until it decides.
    Pause,
    /// Stop the chain and answer with this response instead (request side, or
    /// response side before the response headers went downstream; boxed).
    Respond(Box<LocalResponse>),
    /// Reset the stream.
    Reset,
}

/// A response made by a filter (or by the proxy itself).
#[derive(Debug, Clone)]
pub struct LocalResponse {
    /// HTTP status (200 for gRPC replies).
    pub status: StatusCode,
    /// Headers to add.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body (for gRPC: the `grpc-message`).
    pub body: Bytes,
    /// `Some(code)` makes a gRPC trailers-only reply with that `grpc-status`.
    pub grpc_status: Option<u32>,
    /// Short reason for logs and the `x-sluice-reason` header; empty for none.
    pub details: String,
}

impl LocalResponse {
    /// A plain response with a body.
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        LocalResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
            grpc_status: None,
            details: String::new(),
        }
    }
}

/// Why a filter failed. The fail policy has already been applied by the filter
/// implementation: an error returned to the data plane means "fail closed".
#[derive(Debug, Clone, thiserror::Error)]
#[error("filter `{plugin}` failed in {callback}: {reason}")]
pub struct FilterError {
    /// The plugin's name.
    pub plugin: String,
    /// The callback that failed (`on_request_headers`, …).
    pub callback: &'static str,
    /// What kind of failure.
    pub kind: FilterErrorKind,
    /// Human-readable detail (trap message, guest panic message, …).
    pub reason: String,
}

/// Kinds of filter failure, which decide the status the downstream sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterErrorKind {
    /// The guest trapped (panic, unreachable, out-of-bounds, stack overflow, …).
    Trap,
    /// A callback ran past its time budget, or a pause past its timeout.
    Timeout,
    /// The guest ran out of memory.
    OutOfMemory,
    /// The filter's VM is failed and not (yet) replaced.
    Unavailable,
    /// A body buffered by the chain outgrew the limit.
    BodyTooLarge,
    /// The host broke (a bug); logged loudly.
    Internal,
}

impl FilterErrorKind {
    /// A stable label for metrics and the `x-sluice-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterErrorKind::Trap => "filter_trap",
            FilterErrorKind::Timeout => "filter_timeout",
            FilterErrorKind::OutOfMemory => "filter_oom",
            FilterErrorKind::Unavailable => "filter_unavailable",
            FilterErrorKind::BodyTooLarge => "body_too_large",
            FilterErrorKind::Internal => "filter_internal",
        }
    }
}

/// A filter or module that cannot be loaded: the config that names it is rejected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("filter `{plugin}`: {reason}")]
pub struct LoadError {
    /// The plugin's name.
    pub plugin: String,
    /// Why (compile error, missing export, `on_configure` returned false with the
    /// plugin's log lines, …).
    pub reason: String,
}

/// Facts about the TLS session of a connection (downstream, or upstream).
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// Negotiated version, e.g. `TLSv1.3`.
    pub version: String,
    /// SNI sent by the client.
    pub server_name: Option<String>,
    /// The peer certificate's URI SANs (SPIFFE ids).
    pub peer_uri_sans: Vec<String>,
    /// The peer certificate's DNS SANs.
    pub peer_dns_sans: Vec<String>,
    /// The peer certificate's subject.
    pub peer_subject: Option<String>,
    /// SHA-256 of the peer certificate (hex).
    pub peer_cert_sha256: Option<String>,
}

/// A route as its requests' filters read it (`xds.route_name`,
/// `xds.virtual_host_name`, `xds.route_metadata`, `xds.virtual_host_metadata`):
/// made once per route when the config loads, shared by its requests (one
/// reference count per request).
#[derive(Debug, Default)]
pub struct RouteFacts {
    /// The route's name.
    pub name: Arc<str>,
    /// Its virtual host's name.
    pub virtual_host: Arc<str>,
    /// Its metadata, when it has some.
    pub metadata: Option<sluice_config::Metadata>,
    /// Its virtual host's metadata, when it has some (shared by the host's routes).
    pub virtual_host_metadata: Option<Arc<sluice_config::Metadata>>,
}

/// A cluster as the filters of the requests sent to it read it
/// (`xds.cluster_name`, `xds.cluster_metadata`).
#[derive(Debug, Default)]
pub struct ClusterFacts {
    /// The cluster's name.
    pub name: Arc<str>,
    /// Its metadata, when it has some.
    pub metadata: Option<sluice_config::Metadata>,
    /// How many endpoints it has now (`upstream.num_endpoints`; DNS may change it).
    pub num_endpoints: std::sync::atomic::AtomicU32,
}

/// A request's id: one the proxy made (32 hex digits, kept as bytes) or the
/// downstream's `x-request-id`. Made into text only where it is read (a log
/// line, a filter's `request.id` property): copying a made one is 33 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RequestId {
    /// Not known yet.
    #[default]
    Unset,
    /// Made by the proxy: lower-case hex digits.
    Made([u8; 32]),
    /// The downstream's `x-request-id`.
    Given(String),
}

impl RequestId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Unset => b"",
            RequestId::Made(b) => b,
            RequestId::Given(s) => s.as_bytes(),
        }
    }

    /// The id as text (a made one is ASCII, so it always is).
    pub fn as_str(&self) -> &str {
        match self {
            RequestId::Unset => "",
            RequestId::Made(b) => std::str::from_utf8(b).unwrap_or_default(),
            RequestId::Given(s) => s,
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        RequestId::Given(s)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        RequestId::Given(s.to_owned())
    }
}

/// What owns a request's [`StreamInfo`] (the proxy's per-request state): a
/// filter reaches the stream info through it after its phase returned, from a
/// callout's answer (see [`StreamInfo::owner`]).
pub trait StreamOwner {
    /// The stream info it owns.
    fn stream_info(&self) -> &StreamInfo;
}

/// Per-request facts a filter may read (the proxy-wasm "properties").
#[derive(Debug)]
pub struct StreamInfo {
    /// `x-request-id` of the request.
    pub request_id: RequestId,
    /// Connection id, unique in the process.
    pub connection_id: u64,
    /// Downstream peer address.
    pub downstream_remote: SocketAddr,
    /// Local address the downstream connected to.
    pub downstream_local: SocketAddr,
    /// Downstream TLS, if any (shared with the connection: not copied per request).
    pub tls: Option<Arc<TlsInfo>>,
    /// Listener name.
    pub listener_name: Arc<str>,
    /// Request protocol.
    pub protocol: http::Version,
    /// When the request started (its wall-clock time: [`StreamInfo::start_time`]).
    pub start: Instant,
    /// The matched route (updated when the route is re-evaluated); `None`
    /// when no route matches.
    pub route: RefCell<Option<Arc<RouteFacts>>>,
    /// The chosen cluster.
    pub cluster: RefCell<Option<Arc<ClusterFacts>>>,
    /// Upstream address of the last attempt.
    pub upstream_address: Cell<Option<SocketAddr>>,
    /// The local address of the last attempt's upstream connection.
    pub upstream_local_address: Cell<Option<SocketAddr>>,
    /// The TLS session of the last attempt's upstream connection, if TLS.
    pub upstream_tls: RefCell<Option<Arc<TlsInfo>>>,
    /// Why the last attempt's upstream connection failed, in Envoy's words
    /// (`delayed connect error: Connection refused`, a TLS error …).
    pub upstream_transport_failure: RefCell<Option<std::borrow::Cow<'static, str>>>,
    /// Attempts made upstream so far (Envoy's `upstream.request_attempt_count`).
    pub upstream_attempts: Cell<u32>,
    /// Response status, once known.
    pub response_code: Cell<Option<u16>>,
    /// Where the response came from, as Envoy's `response.code_details`:
    /// `via_upstream`, Envoy's details for a reply Sluice made for an error
    /// (`route_not_found`, `upstream_response_timeout` …), or a filter's own
    /// details for its local reply. Empty until known.
    pub code_details: RefCell<std::borrow::Cow<'static, str>>,
    /// Envoy's response flags for what went wrong (see [`response_flags`]).
    pub response_flags: Cell<u64>,
    /// Request body bytes seen so far.
    pub request_body_bytes: Cell<u64>,
    /// Response body bytes seen so far.
    pub response_body_bytes: Cell<u64>,
    /// Values the request's filters set for each other (proxy-wasm
    /// `proxy_set_property`; Envoy's filter state).
    pub filter_state: RefCell<FilterState>,
    /// Set by a filter that edited request headers: the proxy re-evaluates the route.
    route_cache_cleared: Cell<bool>,
    /// Set when a filter edited (or may have edited) a field the proxy sets
    /// or reads on the way upstream (see [`is_proxy_managed`]).
    proxy_fields_edited: Cell<bool>,
    /// The fields the proxy set before the filters and kept out of the
    /// request head's map (see [`ProxyFields`]).
    proxy_fields: RefCell<ProxyFields>,
    /// The request head once it left the filters (see [`StreamInfo::set_sent_request`]).
    sent_request: RefCell<Option<request::Parts>>,
    /// The fields the proxy added to it after the filters, kept out of its map.
    sent_request_added: RefCell<Option<EncodedFields>>,
    /// The response head once it left the filters (see [`StreamInfo::set_sent_response`]).
    sent_response: RefCell<Option<ResponseHead>>,
    /// Its owner, when it has one (see [`StreamInfo::owner`]).
    owner: Option<std::rc::Weak<dyn StreamOwner>>,
}

impl StreamInfo {
    /// A new record for a request.
    pub fn new(
        request_id: impl Into<RequestId>,
        connection_id: u64,
        downstream_remote: SocketAddr,
        downstream_local: SocketAddr,
        listener_name: Arc<str>,
        protocol: http::Version,
        start: Instant,
    ) -> Self {
        StreamInfo {
            request_id: request_id.into(),
            connection_id,
            downstream_remote,
            downstream_local,
            tls: None,
            listener_name,
            protocol,
            start,
            route: RefCell::new(None),
            cluster: RefCell::new(None),
            upstream_address: Cell::new(None),
            upstream_local_address: Cell::new(None),
            upstream_tls: RefCell::new(None),
            upstream_transport_failure: RefCell::new(None),
            upstream_attempts: Cell::new(0),
            response_code: Cell::new(None),
            code_details: RefCell::new(std::borrow::Cow::Borrowed("")),
            response_flags: Cell::new(0),
            request_body_bytes: Cell::new(0),
            response_body_bytes: Cell::new(0),
            filter_state: RefCell::new(FilterState::default()),
            route_cache_cleared: Cell::new(false),
            proxy_fields_edited: Cell::new(false),
            proxy_fields: RefCell::new(ProxyFields::default()),
            sent_request: RefCell::new(None),
            sent_request_added: RefCell::new(None),
            sent_response: RefCell::new(None),
            owner: None,
        }
    }

    /// Records what owns this stream info (the proxy does, when it moves it
    /// into its per-request state).
    pub fn set_owner(&mut self, owner: std::rc::Weak<dyn StreamOwner>) {
        self.owner = Some(owner);
    }

    /// What owns this stream info: a filter keeps it to read the request's
    /// facts from a callback that runs after its phase returned (a callout's
    /// answer); `upgrade` fails once the request is over.
    pub fn owner(&self) -> Option<std::rc::Weak<dyn StreamOwner>> {
        self.owner.clone()
    }

    /// Hands back the request head once it left the filters: as the upstream
    /// client sent it (with the fields it wrote after the map's, `added`), or
    /// as the proxy answered it itself. Moved, not copied. The later phases
    /// and `on_log` read the request's properties from it.
    pub fn set_sent_request(&self, head: request::Parts, added: Option<EncodedFields>) {
        *self.sent_request.borrow_mut() = Some(head);
        *self.sent_request_added.borrow_mut() = added;
    }

    /// The request head handed back by [`StreamInfo::set_sent_request`], if it was.
    pub fn sent_request(&self) -> std::cell::Ref<'_, Option<request::Parts>> {
        self.sent_request.borrow()
    }

    /// The fields the proxy wrote after the sent request head's map, if any.
    pub fn sent_request_added(&self) -> std::cell::Ref<'_, Option<EncodedFields>> {
        self.sent_request_added.borrow()
    }

    /// Hands back the response head once it left the filters (as the server
    /// encoded it, or a copy when the server keeps its own). Moved, not copied
    /// where the server allows. The response body phases and `on_log` read the
    /// response's properties from it.
    pub fn set_sent_response(&self, head: ResponseHead) {
        *self.sent_response.borrow_mut() = Some(head);
    }

    /// The response head handed back by [`StreamInfo::set_sent_response`], if it was.
    pub fn sent_response(&self) -> std::cell::Ref<'_, Option<ResponseHead>> {
        self.sent_response.borrow()
    }

    /// Keeps the fields the proxy set on the request out of its head's map
    /// while the filters run (see [`ProxyFields`]).
    pub fn keep_proxy_fields(&mut self, fields: ProxyFields) {
        *self.proxy_fields.get_mut() = fields;
    }

    /// The fields kept out of the request head's map (empty once moved into it).
    pub fn proxy_fields(&self) -> std::cell::Ref<'_, ProxyFields> {
        self.proxy_fields.borrow()
    }

    /// Moves the fields kept aside into the request head's map: before a
    /// filter edits it, or hands it to anything that reads only the map.
    pub fn materialize_proxy_fields(&self, map: &mut HeaderMap) {
        if let Ok(mut f) = self.proxy_fields.try_borrow_mut()
            && !f.is_empty()
        {
            f.move_into(map);
        }
    }

    /// Takes the fields still kept aside (the proxy, once the filters ran).
    pub fn take_proxy_fields(&self) -> ProxyFields {
        self.proxy_fields.try_borrow_mut().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default()
    }

    /// The wall-clock time the request started: read when asked (rare), so a
    /// request costs no wall-clock read of its own.
    pub fn start_time(&self) -> SystemTime {
        SystemTime::now().checked_sub(self.start.elapsed()).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Asks the proxy to re-evaluate the route after this phase (request headers changed).
    pub fn clear_route_cache(&self) {
        self.route_cache_cleared.set(true);
    }

    /// Takes the "route cache cleared" flag (used by the proxy).
    pub fn take_route_cache_cleared(&self) -> bool {
        self.route_cache_cleared.replace(false)
    }

    /// Records that a filter edited, or may have edited, a field the proxy
    /// manages ([`is_proxy_managed`]). A filter that reads the proxy's fields
    /// beside the map ([`HttpFilter::reads_proxy_fields`]) calls it when it
    /// edits one of them (with [`StreamInfo::clear_route_cache`]); for any
    /// other filter the chain assumes it might.
    pub fn mark_proxy_fields_edited(&self) {
        self.proxy_fields_edited.set(true);
    }

    /// Whether a filter edited, or may have edited, a field the proxy manages:
    /// if not, those fields stand as the proxy found and set them, even after
    /// other edits to the head.
    pub fn proxy_fields_edited(&self) -> bool {
        self.proxy_fields_edited.get()
    }
}

/// What `on_log` sees: the final request and response heads.
pub struct LogView<'a> {
    /// The request as forwarded upstream (the filters' own when the proxy
    /// answered itself; `None` when the request ended before either).
    pub request: Option<&'a request::Parts>,
    /// Fields the proxy sent after `request`'s own, kept out of its map (the
    /// `traceparent` it set after the filters ran): part of the request too.
    pub request_added: Option<&'a EncodedFields>,
    /// The response as sent downstream, if any was.
    pub response: Option<&'a ResponseHead>,
    /// Request trailers, if any.
    pub request_trailers: Option<&'a HeaderMap>,
    /// Response trailers, if any.
    pub response_trailers: Option<&'a HeaderMap>,
}

/// The data of the phase a paused filter is in, handed back to
/// [`HttpFilter::poll_resume`].
#[derive(Debug)]
pub enum PhaseData<'a> {
    /// `on_request_headers`.
    RequestHeaders(&'a mut request::Parts),
    /// `on_request_body`.
    RequestBody(&'a mut BodyBuf),
    /// `on_request_trailers`.
    RequestTrailers(&'a mut HeaderMap),
    /// `on_response_headers`.
    ResponseHeaders(&'a mut ResponseHead),
    /// `on_response_body`.
    ResponseBody(&'a mut BodyBuf),
    /// `on_response_trailers`.
    ResponseTrailers(&'a mut HeaderMap),
}

impl PhaseData<'_> {
    /// A shorter-lived copy of the same references.
    pub fn reborrow(&mut self) -> PhaseData<'_> {
        match self {
            PhaseData::RequestHeaders(v) => PhaseData::RequestHeaders(v),
            PhaseData::RequestBody(v) => PhaseData::RequestBody(v),
            PhaseData::RequestTrailers(v) => PhaseData::RequestTrailers(v),
            PhaseData::ResponseHeaders(v) => PhaseData::ResponseHeaders(v),
            PhaseData::ResponseBody(v) => PhaseData::ResponseBody(v),
            PhaseData::ResponseTrailers(v) => PhaseData::ResponseTrailers(v),
        }
    }
}

/// What a paused phase finally decided.
#[derive(Debug)]
pub enum Resumed {
    /// Go on (for a body phase: forward what is in the buffer now).
    Continue,
    /// Body phases: keep the buffer and call again with more data.
    Buffer,
    /// Answer with this response instead (boxed).
    Respond(Box<LocalResponse>),
    /// Reset the stream.
    Reset,
}

/// One filter's per-request state. Created on a worker for each request that
/// reaches it; dropped when the request ends (after `on_log`).
///
/// Each phase either decides at once or returns `Pause`; while paused, no other
/// phase of this filter is called, and [`HttpFilter::poll_resume`] is polled (with
/// that phase's data) until it is ready.
pub trait HttpFilter {
    /// Whether this filter reads the fields the proxy set before the filters
    /// beside the request head's map ([`StreamInfo::proxy_fields`]), moves
    /// them into it before an edit that touches them
    /// ([`StreamInfo::materialize_proxy_fields`]), and reports such an edit
    /// ([`StreamInfo::mark_proxy_fields_edited`]). If not (the default), the
    /// chain moves them into the map before calling
    /// [`HttpFilter::on_request_headers`], and assumes the filter edits them.
    fn reads_proxy_fields(&self) -> bool {
        false
    }

    /// Whether, for this request, this filter does nothing with the response
    /// body, nothing in [`HttpFilter::on_log`], and, when `trailers` (the
    /// response may still carry trailers), nothing with them: its callbacks
    /// for them would return at once (a wasm filter that declared them
    /// no-ops). Asked once the response-header phase is over. When every
    /// filter of the chain says so, the response body is not wrapped in the
    /// chain, and no copy of the response head is kept for `on_log`. The
    /// default, `false`, is always correct.
    fn ignores_response(&self, trailers: bool) -> bool {
        let _ = trailers;
        false
    }

    /// Request headers arrived. `end_of_stream` means there is no body.
    fn on_request_headers(
        &mut self,
        head: &mut request::Parts,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<HeadersAction, FilterError>;

    /// A request body chunk (or everything buffered so far).
    fn on_request_body(
        &mut self,
        body: &mut BodyBuf,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<BodyAction, FilterError>;

    /// Request trailers arrived.
    fn on_request_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<HeadersAction, FilterError>;

    /// Response headers arrived from upstream (or from a local response).
    fn on_response_headers(
        &mut self,
        head: &mut ResponseHead,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<HeadersAction, FilterError>;

    /// A response body chunk (or everything buffered so far).
    fn on_response_body(
        &mut self,
        body: &mut BodyBuf,
        info: &StreamInfo,
        end_of_stream: bool,
    ) -> Result<BodyAction, FilterError>;

    /// Response trailers arrived.
    fn on_response_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<HeadersAction, FilterError>;

    /// Polls the phase that returned `Pause`; `data` is that phase's data. A
    /// filter that is not paused answers an error.
    fn poll_resume(
        &mut self,
        cx: &mut Context<'_>,
        data: PhaseData<'_>,
        info: &StreamInfo,
    ) -> Poll<Result<Resumed, FilterError>>;

    /// The request is over (completed, failed or reset): final logging.
    fn on_log(&mut self, view: &LogView<'_>, info: &StreamInfo);
}

/// Waits for a paused phase's decision (a future over [`HttpFilter::poll_resume`]).
pub async fn resume<F: HttpFilter + ?Sized>(
    filter: &mut F,
    mut data: PhaseData<'_>,
    info: &StreamInfo,
) -> Result<Resumed, FilterError> {
    std::future::poll_fn(|cx| filter.poll_resume(cx, data.reborrow(), info)).await
}

/// Runs `on_request_headers` to its decision, waiting while it is paused
/// (`Buffer` counts as `Continue`). For tests and simple drivers.
pub async fn request_headers<F: HttpFilter + ?Sized>(
    filter: &mut F,
    head: &mut request::Parts,
    info: &StreamInfo,
    end_of_stream: bool,
) -> Result<HeadersAction, FilterError> {
    match filter.on_request_headers(head, info, end_of_stream)? {
        HeadersAction::Pause => resume(filter, PhaseData::RequestHeaders(head), info).await.map(Into::into),
        a => Ok(a),
    }
}

/// Runs `on_response_headers` to its decision, waiting while it is paused.
pub async fn response_headers<F: HttpFilter + ?Sized>(
    filter: &mut F,
    head: &mut ResponseHead,
    info: &StreamInfo,
    end_of_stream: bool,
) -> Result<HeadersAction, FilterError> {
    match filter.on_response_headers(head, info, end_of_stream)? {
        HeadersAction::Pause => resume(filter, PhaseData::ResponseHeaders(head), info).await.map(Into::into),
        a => Ok(a),
    }
}

/// Runs `on_request_body` to its decision, waiting while it is paused.
pub async fn request_body<F: HttpFilter + ?Sized>(
    filter: &mut F,
    body: &mut BodyBuf,
    info: &StreamInfo,
    end_of_stream: bool,
) -> Result<BodyAction, FilterError> {
    match filter.on_request_body(body, info, end_of_stream)? {
        BodyAction::Pause => resume(filter, PhaseData::RequestBody(body), info).await.map(Into::into),
        a => Ok(a),
    }
}

/// Runs `on_response_body` to its decision, waiting while it is paused.
pub async fn response_body<F: HttpFilter + ?Sized>(
    filter: &mut F,
    body: &mut BodyBuf,
    info: &StreamInfo,
    end_of_stream: bool,
) -> Result<BodyAction, FilterError> {
    match filter.on_response_body(body, info, end_of_stream)? {
        BodyAction::Pause => resume(filter, PhaseData::ResponseBody(body), info).await.map(Into::into),
        a => Ok(a),
    }
}

impl From<Resumed> for HeadersAction {
    fn from(r: Resumed) -> Self {
        match r {
            Resumed::Continue | Resumed::Buffer => HeadersAction::Continue,
            Resumed::Respond(l) => HeadersAction::Respond(l),
            Resumed::Reset => HeadersAction::Reset,
        }
    }
}

impl From<Resumed> for BodyAction {
    fn from(r: Resumed) -> Self {
        match r {
            Resumed::Continue => BodyAction::Continue,
            Resumed::Buffer => BodyAction::Buffer,
            Resumed::Respond(l) => BodyAction::Respond(l),
            Resumed::Reset => BodyAction::Reset,
        }
    }
}

/// A loaded filter: shared by all workers, makes the per-request [`HttpFilter`]s.
pub trait FilterFactory: Send + Sync {
    /// The plugin's name.
    fn name(&self) -> &str;

    /// Makes the per-request filter. Called on a worker thread. Never fails: a
    /// filter that cannot run answers per its fail policy from its callbacks.
    fn new_filter(&self, info: &StreamInfo) -> Box<dyn HttpFilter>;

    /// Live status for the admin endpoint (digest, ABI version, VMs, state, traps,
    /// last error).
    fn status(&self) -> serde_json::Value;

    /// Called on each worker thread when a config naming this filter is applied,
    /// before requests arrive: a chance to build per-worker state (a wasm VM and its
    /// root context) off the request path. Failures are the filter's to record.
    fn prepare_worker(&self) {}
}

impl fmt::Debug for dyn FilterFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterFactory").field("name", &self.name()).finish()
    }
}

/// What a loader may need besides the spec.
pub struct LoadContext<'a> {
    /// The folder relative module paths are resolved against.
    pub base_dir: &'a Path,
    /// Clusters callouts may target.
    pub clusters: &'a [String],
    /// The proxy's identity (`xds.node.*`).
    pub node: &'a Arc<sluice_config::Node>,
}

/// Builds filter factories from specs. Called off the request path (config load
/// and reload), possibly on a blocking thread: compile, instantiate, configure.
pub trait FilterLoader: Send + Sync {
    /// Loads one filter. An error rejects the whole config that names it.
    fn load(&self, spec: &FilterSpec, cx: &LoadContext<'_>) -> Result<Arc<dyn FilterFactory>, LoadError>;
}

/// A response from an HTTP callout.
#[derive(Debug, Clone)]
pub struct CalloutResponse {
    /// Status and headers.
    pub head: response::Parts,
    /// Whole body.
    pub body: Bytes,
    /// Trailers (gRPC status lives here).
    pub trailers: HeaderMap,
}

/// Why a callout failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CalloutError {
    /// No such cluster.
    #[error("unknown cluster `{0}`")]
    UnknownCluster(String),
    /// The callout timed out.
    #[error("timed out")]
    Timeout,
    /// The upstream could not be reached or reset.
    #[error("upstream failed: {0}")]
    Upstream(String),
}

/// HTTP callouts to configured clusters, provided by the data plane. The
/// returned future runs on the calling worker thread.
pub trait CalloutClient: Send + Sync {
    /// Sends `request` (absolute-form not needed: the cluster picks the endpoint;
    /// the URI's path and the `host` header are used) to `cluster`.
    fn call(
        &self,
        cluster: &str,
        request: http::Request<Bytes>,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<CalloutResponse, CalloutError>>;
}
