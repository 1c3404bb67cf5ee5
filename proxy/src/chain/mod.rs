//! Running a filter chain for one request: request phases forward, response
//! phases backward, bodies through per-filter buffers.
//!
//! Filter phases are plain calls; a filter that must wait answers `Pause` and
//! is then polled with [`HttpFilter::poll_resume`] (see `sluice-filter`). The
//! filters of a request are shared by the request-body task, the handler and the
//! response-body task behind one [`LocalLock`]: a filter's callbacks never run
//! concurrently (a wasm VM is single-threaded), but a request body may still
//! stream while the response arrives (gRPC bidi streams).

mod body;
mod lock;

pub(crate) use body::FilterBody;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Poll;

use http::{HeaderMap, Response, request};
use http_body::Body;
use sluice_filter::{
    EncodedFields, FilterError, FilterErrorKind, HeadersAction, HttpFilter, LocalResponse, LogView,
    PhaseData, ResponseHead, StreamInfo,
};

use crate::body::{BodyEnd, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::router::Chain;

use lock::{Held, LocalLock};

/// Why the chain stopped a body that was already streaming.
#[derive(Debug)]
pub enum Failure {
    /// A filter answered: send this instead of the upstream's response.
    Local(LocalResponse),
    /// A filter failed or a buffer overflowed.
    Error(ProxyError),
}

/// The final heads handed to `on_log`.
pub struct LogHead {
    head: ResponseHead,
}

impl LogHead {
    /// Copies what `on_log` may read from a response head: its status,
    /// version and fields (`body`'s encoded ones, then the map's).
    pub fn from_response(p: &http::response::Parts, body: &ProxyBody) -> Self {
        let mut parts = Response::new(()).into_parts().0;
        parts.status = p.status;
        parts.version = p.version;
        parts.headers = p.headers.clone();
        let encoded = body.verbatim().map(|v| Box::new(v.clone()));
        LogHead { head: ResponseHead::with_encoded(parts, encoded) }
    }

    /// The head of the error response Sluice sent instead of a response it
    /// failed before any byte went out ([`BodyEnd::Replaced`]): its status
    /// and the fields `error_response` gives a non-gRPC reply.
    fn replaced(status: u16, reason: &'static str) -> Self {
        use http::header::{CONTENT_TYPE, HeaderValue};
        let mut parts = Response::new(()).into_parts().0;
        parts.status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        parts.headers.insert("x-sluice-reason", HeaderValue::from_static(reason));
        LogHead { head: ResponseHead::with_encoded(parts, None) }
    }
}

struct Filters {
    /// Inline up to four filters: no allocation for the list itself.
    list: smallvec::SmallVec<[Box<dyn HttpFilter>; 4]>,
    /// Boxed: trailers are rare, and inline they would push the per-request
    /// state past glibc's thread cache (1,032 bytes) into malloc's slow path.
    request_trailers: Option<Box<HeaderMap>>,
    response_trailers: Option<Box<HeaderMap>>,
}

/// What the request's tasks share: one allocation per request.
struct Shared {
    filters: LocalLock<Filters>,
    info: StreamInfo,
    failure: RefCell<Option<Failure>>,
    max_buffer: usize,
    /// A filter failed in the response headers phase: the reply to that
    /// skips the response phases (see [`ChainRun::filter_local`]).
    response_failed: Cell<bool>,
}

impl sluice_filter::StreamOwner for Shared {
    fn stream_info(&self) -> &StreamInfo {
        &self.info
    }
}

/// One request's run through its filter chain.
pub struct ChainRun {
    shared: Rc<Shared>,
}

fn overflow(request: bool) -> ProxyError {
    if request {
        ProxyError::new(
            Side::Downstream,
            ErrorKind::PayloadTooLarge,
            "request body over the filter buffer limit",
        )
    } else {
        ProxyError::new(
            Side::Internal,
            ErrorKind::ResponseTooLarge,
            "response body over the filter buffer limit",
        )
    }
}

fn reset_error() -> ProxyError {
    ProxyError::new(
        Side::Internal,
        ErrorKind::Filter(FilterErrorKind::Unavailable),
        "filter reset the stream",
    )
}

fn action_err(e: FilterError) -> ProxyError {
    ProxyError::from(e)
}

/// The lock's value is only borrowed by its holder; failing that is a bug.
fn busy() -> ProxyError {
    ProxyError::new(Side::Internal, ErrorKind::Filter(FilterErrorKind::Internal), "filter chain state busy")
}

/// A header phase's decision: `Some` is a local response.
fn headers_decision(action: HeadersAction) -> Result<Option<LocalResponse>, ProxyError> {
    match action {
        HeadersAction::Continue | HeadersAction::Pause => Ok(None),
        HeadersAction::Respond(local) => Ok(Some(*local)),
        HeadersAction::Reset => Err(reset_error()),
    }
}

/// A message head the header phases run over: request heads go through the
/// chain forward, response heads backward.
trait Head {
    const FORWARD: bool;
    /// Readies the head for `filter`: a request head gets the fields the
    /// proxy kept aside, unless the filter reads them beside the map.
    fn ready(filter: &dyn HttpFilter, head: &mut Self, info: &StreamInfo);
    fn call(
        filter: &mut dyn HttpFilter,
        head: &mut Self,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<HeadersAction, FilterError>;
    fn data(&mut self) -> PhaseData<'_>;
}

impl Head for request::Parts {
    const FORWARD: bool = true;
    fn ready(filter: &dyn HttpFilter, head: &mut Self, info: &StreamInfo) {
        if !filter.reads_proxy_fields() {
            info.materialize_proxy_fields(&mut head.headers);
            // It does not say what it edits: assume the worst.
            info.mark_proxy_fields_edited();
        }
    }
    fn call(
        f: &mut dyn HttpFilter,
        h: &mut Self,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<HeadersAction, FilterError> {
        f.on_request_headers(h, info, eos)
    }
    fn data(&mut self) -> PhaseData<'_> {
        PhaseData::RequestHeaders(self)
    }
}

impl Head for ResponseHead {
    const FORWARD: bool = false;
    fn ready(_: &dyn HttpFilter, _: &mut Self, _: &StreamInfo) {}
    fn call(
        f: &mut dyn HttpFilter,
        h: &mut Self,
        info: &StreamInfo,
        eos: bool,
    ) -> Result<HeadersAction, FilterError> {
        f.on_response_headers(h, info, eos)
    }
    fn data(&mut self) -> PhaseData<'_> {
        PhaseData::ResponseHeaders(self)
    }
}

/// Runs a header phase over the chain (the lock is held), waiting on a filter
/// that paused. `Some` is a local response.
async fn run_heads<H: Head>(
    sh: &Shared,
    held: &Held<'_, Filters>,
    head: &mut H,
    eos: bool,
) -> Result<Option<LocalResponse>, ProxyError> {
    let n = held.value().ok_or_else(busy)?.list.len();
    for k in 0..n {
        let i = if H::FORWARD { k } else { n - 1 - k };
        let action = {
            let mut f = held.value().ok_or_else(busy)?;
            H::ready(&*f.list[i], head, &sh.info);
            H::call(&mut *f.list[i], head, &sh.info, eos).map_err(action_err)?
        };
        let action = match action {
            HeadersAction::Pause => std::future::poll_fn(|cx| {
                let Some(mut f) = held.value() else { return Poll::Ready(Err(busy())) };
                f.list[i].poll_resume(cx, head.data(), &sh.info).map(|r| r.map_err(action_err))
            })
            .await?
            .into(),
            a => a,
        };
        if let Some(local) = headers_decision(action)? {
            return Ok(Some(local));
        }
    }
    Ok(None)
}

impl ChainRun {
    /// Makes the per-request filters.
    pub fn new(chain: &Chain, info: StreamInfo, max_buffer: usize) -> Self {
        let list = chain.iter().map(|f| f.new_filter(&info)).collect();
        let filters = Filters { list, request_trailers: None, response_trailers: None };
        let mut info = info;
        ChainRun {
            shared: Rc::new_cyclic(|owner: &std::rc::Weak<Shared>| {
                info.set_owner(owner.clone());
                Shared {
                    filters: LocalLock::new(filters),
                    info,
                    failure: RefCell::new(None),
                    max_buffer,
                    response_failed: Cell::new(false),
                }
            }),
        }
    }

    /// The request's stream info.
    pub fn info(&self) -> &StreamInfo {
        &self.shared.info
    }

    /// Takes a failure recorded by a body task.
    pub fn take_failure(&self) -> Option<Failure> {
        self.shared.failure.borrow_mut().take()
    }

    /// Runs `on_request_headers` forward. `Some` is a local response.
    pub async fn request_headers(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let sh = &*self.shared;
        let held = sh.filters.acquire().await;
        run_heads(sh, &held, head, end_of_stream).await
    }

    /// Keeps the request head the response phases and `on_log` read: the
    /// filters' when the proxy answered itself. Moved, not copied.
    pub fn keep_request_head(&mut self, mut head: request::Parts) {
        self.shared.info.materialize_proxy_fields(&mut head.headers);
        self.shared.info.set_sent_request(head, None);
    }

    /// The request head as the upstream client sent it, handed back for the
    /// response phases and `on_log` (moved, not copied), with the fields it
    /// wrote after the map's.
    pub fn sent_request(&self, head: request::Parts, added: Option<EncodedFields>) {
        self.shared.info.set_sent_request(head, added);
    }

    /// Runs `on_response_headers` backward. `Some` is a local response.
    pub async fn response_headers(
        &mut self,
        head: &mut ResponseHead,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let sh = &*self.shared;
        sh.info.response_code.set(Some(head.status().as_u16()));
        let held = sh.filters.acquire().await;
        let result = run_heads(sh, &held, head, end_of_stream).await;
        if result.is_err() {
            sh.response_failed.set(true);
        }
        result
    }

    /// Makes a local response and runs it through the response filters (as
    /// Envoy does, the filters see their own local replies).
    pub async fn local_response(
        &mut self,
        local: LocalResponse,
        version: http::Version,
    ) -> Response<ProxyBody> {
        // Envoy's `response.code_details` for a filter's reply: its details.
        *self.shared.info.code_details.borrow_mut() = std::borrow::Cow::Owned(local.details.clone());
        let resp = crate::forward::local_reply(local, version);
        self.filter_local(resp).await
    }

    /// Runs the response phases over a proxy-made response; not after a
    /// filter failed in the response headers phase (Envoy 1.40, probed: its
    /// reply to that skips the filters' response phases, where the reply to a
    /// failure in a request phase goes through them).
    pub async fn filter_local(&mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if self.shared.response_failed.get() {
            self.shared.info.response_code.set(Some(resp.status().as_u16()));
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let eos = body.is_end_stream();
        let mut head = ResponseHead::new(parts);
        match self.response_headers(&mut head, eos).await {
            // A second local reply from the response phase replaces the first, once.
            Ok(Some(local)) => crate::forward::local_reply(local, head.version()),
            // The body phases run on it too, as on Envoy (a filter may rewrite
            // an error page).
            Ok(None) => {
                let body = if self.ignores_response(true) { body } else { self.wrap_response_body(body) };
                Response::from_parts(head.into_parts().0, body)
            }
            Err(e) => crate::error::error_response(&e, false),
        }
    }

    /// No phase of the request holds its filters (a request body paused in a
    /// filter, still owned by an upstream connection's task, would).
    pub fn filters_free(&self) -> bool {
        self.shared.filters.try_hold().is_some()
    }

    /// Every filter ignores the rest of the response
    /// ([`HttpFilter::ignores_response`]; `trailers`: the response may still
    /// carry trailers): its body need not go through the chain, and `on_log`
    /// reads no response head.
    pub fn ignores_response(&self, trailers: bool) -> bool {
        let Some(held) = self.shared.filters.try_hold() else { return false };
        let Some(f) = held.value() else { return false };
        f.list.iter().all(|filter| filter.ignores_response(trailers))
    }

    /// Streams the request body through `on_request_body` / `on_request_trailers`.
    /// A body-less request is passed through untouched (no body callbacks, as in Envoy).
    pub fn wrap_request_body(&mut self, body: ProxyBody) -> ProxyBody {
        self.wrap_body(body, true)
    }

    /// Streams the response body through `on_response_body` / `on_response_trailers`.
    pub fn wrap_response_body(&mut self, body: ProxyBody) -> ProxyBody {
        self.wrap_body(body, false)
    }

    fn wrap_body(&mut self, body: ProxyBody, request: bool) -> ProxyBody {
        if body.is_end_stream() {
            return body;
        }
        ProxyBody::filter(body::FilterBody::new(body, self.shared.clone(), request))
    }

    /// Keeps a copy of the response head for the response body phases and
    /// `on_log`, when the server does not hand its own back
    /// (`ProxyBody::keep_head`). Before the body is polled.
    pub fn keep_response(&self, head: LogHead) {
        self.shared.info.set_sent_response(head.head);
    }

    /// [`ChainRun::log`] at the end of the response body: a response Sluice
    /// replaced with its error is logged with the error's head, as Envoy's
    /// filters see the local reply that replaced a response.
    pub fn log_end(&mut self, end: BodyEnd) {
        let replaced = match end {
            BodyEnd::Replaced { status, reason } => Some(LogHead::replaced(status, reason)),
            _ => None,
        };
        self.log(replaced.as_ref());
    }

    /// Runs `on_log` on every filter, in order. The response head is
    /// `response`, or else the one kept in the stream info.
    pub fn log(&mut self, response: Option<&LogHead>) {
        let sh = &*self.shared;
        let Some(held) = sh.filters.try_hold() else { return };
        let Some(mut f) = held.value() else { return };
        let f = &mut *f;
        let kept = sh.info.sent_response();
        let request = sh.info.sent_request();
        let request_added = sh.info.sent_request_added();
        let view = LogView {
            request: request.as_ref(),
            request_added: request_added.as_ref(),
            response: response.map(|r| &r.head).or(kept.as_ref()),
            request_trailers: f.request_trailers.as_deref(),
            response_trailers: f.response_trailers.as_deref(),
        };
        for filter in f.list.iter_mut() {
            filter.on_log(&view, &sh.info);
        }
    }
}

#[cfg(test)]
mod tests;
