//! Running a filter chain for one request: request phases forward, response
//! phases backward, bodies through per-filter buffers.
//!
//! The filters of a request are shared by the request-body task, the handler
//! and the response-body task behind one async mutex: a filter's callbacks
//! never run concurrently (a wasm VM is single-threaded), but a request body
//! may still stream while the response arrives (gRPC bidi streams).

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, request, response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use sluice_filter::{
    BodyAction, FilterError, FilterErrorKind, HeadersAction, HttpFilter, LocalResponse, LogView, StreamInfo,
};
use tokio::sync::Mutex;

use crate::body::{BoxError, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::router::Chain;

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
    parts: response::Parts,
}

impl LogHead {
    /// Copies what `on_log` may read from a response head.
    pub fn from_response(p: &response::Parts) -> Self {
        let mut parts = Response::new(()).into_parts().0;
        parts.status = p.status;
        parts.version = p.version;
        parts.headers = p.headers.clone();
        LogHead { parts }
    }
}

struct Filters {
    list: Vec<Box<dyn HttpFilter>>,
    request_head: request::Parts,
    request_trailers: Option<HeaderMap>,
    response_trailers: Option<HeaderMap>,
}

/// One request's run through its filter chain.
pub struct ChainRun {
    filters: Rc<Mutex<Filters>>,
    info: Rc<StreamInfo>,
    max_buffer: usize,
    failure: Rc<RefCell<Option<Failure>>>,
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

fn action_err(e: FilterError) -> ProxyError {
    ProxyError::from(e)
}

impl ChainRun {
    /// Makes the per-request filters.
    pub fn new(chain: &Chain, info: StreamInfo, max_buffer: usize) -> Self {
        let list = chain.iter().map(|f| f.new_filter(&info)).collect();
        let request_head = Request::new(()).into_parts().0;
        ChainRun {
            filters: Rc::new(Mutex::new(Filters {
                list,
                request_head,
                request_trailers: None,
                response_trailers: None,
            })),
            info: Rc::new(info),
            max_buffer,
            failure: Rc::new(RefCell::new(None)),
        }
    }

    /// The request's stream info.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Takes a failure recorded by a body task.
    pub fn take_failure(&self) -> Option<Failure> {
        self.failure.borrow_mut().take()
    }

    /// Runs `on_request_headers` forward. `Some` is a local response.
    pub async fn request_headers(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let mut f = self.filters.lock().await;
        for filter in f.list.iter_mut() {
            match filter.on_request_headers(head, &self.info, end_of_stream).await.map_err(action_err)? {
                HeadersAction::Continue => {}
                HeadersAction::Respond(local) => return Ok(Some(local)),
                HeadersAction::Reset => {
                    return Err(ProxyError::new(
                        Side::Internal,
                        ErrorKind::Filter(FilterErrorKind::Unavailable),
                        "filter reset the stream",
                    ));
                }
            }
        }
        f.request_head.method = head.method.clone();
        f.request_head.uri = head.uri.clone();
        f.request_head.version = head.version;
        f.request_head.headers = head.headers.clone();
        Ok(None)
    }

    /// Runs `on_response_headers` backward. `Some` is a local response.
    pub async fn response_headers(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        self.info.response_code.set(Some(head.status.as_u16()));
        let mut f = self.filters.lock().await;
        for filter in f.list.iter_mut().rev() {
            match filter.on_response_headers(head, &self.info, end_of_stream).await.map_err(action_err)? {
                HeadersAction::Continue => {}
                HeadersAction::Respond(local) => return Ok(Some(local)),
                HeadersAction::Reset => {
                    return Err(ProxyError::new(
                        Side::Internal,
                        ErrorKind::Filter(FilterErrorKind::Unavailable),
                        "filter reset the stream",
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Makes a local response and runs it through the response filters (as
    /// Envoy does, the filters see their own local replies).
    pub async fn local_response(
        &mut self,
        local: LocalResponse,
        version: http::Version,
    ) -> Response<ProxyBody> {
        let resp = crate::forward::local_reply(local, version);
        self.filter_local(resp).await
    }

    /// Runs the response-header phase over a proxy-made response.
    pub async fn filter_local(&mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        let eos = body.is_end_stream();
        match self.response_headers(&mut parts, eos).await {
            // A second local reply from the response phase replaces the first, once.
            Ok(Some(local)) => crate::forward::local_reply(local, parts.version),
            Ok(None) => Response::from_parts(parts, body),
            Err(e) => crate::error::error_response(&e, false),
        }
    }

    /// Streams the request body through `on_request_body` / `on_request_trailers`.
    /// A body-less request is passed through untouched (no body callbacks, as in Envoy).
    pub fn wrap_request_body(&mut self, body: hyper::body::Incoming) -> ProxyBody {
        self.wrap_body(ProxyBody::incoming(body), true)
    }

    /// Streams the response body through `on_response_body` / `on_response_trailers`.
    pub fn wrap_response_body(&mut self, body: ProxyBody) -> ProxyBody {
        self.wrap_body(body, false)
    }

    fn wrap_body(&mut self, body: ProxyBody, request: bool) -> ProxyBody {
        if body.is_end_stream() {
            return body;
        }
        ProxyBody::boxed(FilterBody {
            state: Some(BodyState {
                inner: body,
                filters: self.filters.clone(),
                info: self.info.clone(),
                bufs: Vec::new(),
                request,
                max: self.max_buffer,
                failure: self.failure.clone(),
                ended: false,
                trailers: None,
            }),
            running: None,
            done: false,
        })
    }

    /// Runs `on_log` on every filter, in order.
    pub fn log(&mut self, response: Option<&LogHead>) {
        let Ok(mut f) = self.filters.try_lock() else { return };
        let f = &mut *f;
        let view = LogView {
            request: &f.request_head,
            response: response.map(|r| &r.parts),
            request_trailers: f.request_trailers.as_ref(),
            response_trailers: f.response_trailers.as_ref(),
        };
        for filter in f.list.iter_mut() {
            filter.on_log(&view, &self.info);
        }
    }
}

/// Hands filter `step`'s buffer to the next one: a move when the next buffer is
/// empty (the common case), an append otherwise.
fn pass_on(bufs: &mut [BytesMut], step: usize) {
    if bufs[step + 1].is_empty() {
        bufs.swap(step, step + 1);
    } else {
        let moved = std::mem::take(&mut bufs[step]);
        bufs[step + 1].extend_from_slice(&moved);
    }
}

/// Passes buffered data through the chain; returns what leaves its end.
async fn run_body(
    filters: &Mutex<Filters>,
    info: &StreamInfo,
    bufs: &mut [BytesMut],
    eos: bool,
    request: bool,
    max: usize,
) -> Result<Bytes, Failure> {
    let mut g = filters.lock().await;
    let n = g.list.len();
    let order: Vec<usize> = if request { (0..n).collect() } else { (0..n).rev().collect() };
    for (step, &i) in order.iter().enumerate() {
        if bufs[step].is_empty() && !eos {
            return Ok(Bytes::new());
        }
        let filter = &mut g.list[i];
        let action = if request {
            filter.on_request_body(&mut bufs[step], info, eos).await
        } else {
            filter.on_response_body(&mut bufs[step], info, eos).await
        };
        match action.map_err(|e| Failure::Error(action_err(e)))? {
            BodyAction::Continue => {
                pass_on(bufs, step);
            }
            BodyAction::Buffer if !eos => {
                if bufs[step].len() > max {
                    return Err(Failure::Error(overflow(request)));
                }
                return Ok(Bytes::new());
            }
            BodyAction::Buffer => {
                pass_on(bufs, step);
            }
            BodyAction::Respond(local) => return Err(Failure::Local(local)),
            BodyAction::Reset => {
                return Err(Failure::Error(ProxyError::new(
                    Side::Internal,
                    ErrorKind::Filter(FilterErrorKind::Unavailable),
                    "filter reset the stream",
                )));
            }
        }
    }
    Ok(std::mem::take(&mut bufs[n]).freeze())
}

async fn run_trailers(
    filters: &Mutex<Filters>,
    info: &StreamInfo,
    t: &mut HeaderMap,
    request: bool,
) -> Result<(), Failure> {
    let mut g = filters.lock().await;
    let n = g.list.len();
    for k in 0..n {
        let i = if request { k } else { n - 1 - k };
        let filter = &mut g.list[i];
        let a = if request {
            filter.on_request_trailers(t, info).await
        } else {
            filter.on_response_trailers(t, info).await
        };
        match a.map_err(|e| Failure::Error(action_err(e)))? {
            HeadersAction::Continue => {}
            HeadersAction::Respond(local) => return Err(Failure::Local(local)),
            HeadersAction::Reset => {
                return Err(Failure::Error(ProxyError::new(
                    Side::Internal,
                    ErrorKind::Filter(FilterErrorKind::Unavailable),
                    "filter reset the stream",
                )));
            }
        }
    }
    Ok(())
}

/// What a [`FilterBody`] owns between frames.
struct BodyState {
    inner: ProxyBody,
    filters: Rc<Mutex<Filters>>,
    info: Rc<StreamInfo>,
    /// One buffer per filter, plus the chain's output.
    bufs: Vec<BytesMut>,
    request: bool,
    max: usize,
    failure: Rc<RefCell<Option<Failure>>>,
    /// The end of stream went through the chain: nothing more to produce.
    ended: bool,
    /// Trailers to send after the data released with them.
    trailers: Option<HeaderMap>,
}

/// What one step of the body produced.
type Step = (BodyState, Result<Option<Frame<Bytes>>, BoxError>);

/// A body that runs the filter chain on each frame as it is polled: no task,
/// no channel. While a filter is paused the body is simply not ready.
struct FilterBody {
    state: Option<BodyState>,
    running: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Step>>>>,
    done: bool,
}

impl BodyState {
    /// Reads inner frames until the chain lets something out (or the body ends).
    async fn step(mut self) -> Step {
        if let Some(t) = self.trailers.take() {
            return (self, Ok(Some(Frame::trailers(t))));
        }
        if self.ended {
            return (self, Ok(None));
        }
        if self.bufs.is_empty() {
            let n = self.filters.lock().await.list.len();
            self.bufs = vec![BytesMut::new(); n + 1];
        }
        loop {
            let frame = self.inner.frame().await;
            let (data, trailers, eos) = match frame {
                None => (None, None, true),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => (Some(d), None, self.inner.is_end_stream()),
                    Err(f) => (None, f.into_trailers().ok(), true),
                },
                Some(Err(e)) => return (self, Err(e)),
            };
            if let Some(d) = data {
                let counter =
                    if self.request { &self.info.request_body_bytes } else { &self.info.response_body_bytes };
                counter.set(counter.get() + d.len() as u64);
                if self.bufs[0].is_empty() {
                    // Take the chunk over without copying when nothing else shares it.
                    self.bufs[0] = d.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                } else {
                    self.bufs[0].extend_from_slice(&d);
                }
            }
            self.ended = eos;
            let out = match run_body(&self.filters, &self.info, &mut self.bufs, eos, self.request, self.max)
                .await
            {
                Ok(out) => out,
                Err(f) => {
                    *self.failure.borrow_mut() = Some(f);
                    return (self, Err("stopped by filter".into()));
                }
            };
            if let Some(mut t) = trailers {
                if let Err(f) = run_trailers(&self.filters, &self.info, &mut t, self.request).await {
                    *self.failure.borrow_mut() = Some(f);
                    return (self, Err("stopped by filter".into()));
                }
                {
                    let mut g = self.filters.lock().await;
                    if self.request {
                        g.request_trailers = Some(t.clone());
                    } else {
                        g.response_trailers = Some(t.clone());
                    }
                }
                // Data released at the end goes first; the trailers follow on the next poll.
                if !out.is_empty() {
                    self.trailers = Some(t);
                    return (self, Ok(Some(Frame::data(out))));
                }
                return (self, Ok(Some(Frame::trailers(t))));
            }
            if !out.is_empty() {
                return (self, Ok(Some(Frame::data(out))));
            }
            if eos {
                return (self, Ok(None));
            }
        }
    }
}

impl Body for FilterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.running.is_none() {
            let Some(state) = this.state.take() else { return Poll::Ready(None) };
            this.running = Some(Box::pin(state.step()));
        }
        let Some(fut) = this.running.as_mut() else { return Poll::Ready(None) };
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((state, result)) => {
                this.running = None;
                this.state = Some(state);
                match result {
                    Ok(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {
                        this.done = true;
                        Poll::Ready(None)
                    }
                    Err(e) => {
                        this.done = true;
                        Poll::Ready(Some(Err(e)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Known as soon as the end went through the chain, so the proxy can return
        // the upstream connection to its pool without waiting for one more poll.
        self.done
            || (self.running.is_none()
                && self.state.as_ref().is_some_and(|s| s.ended && s.trailers.is_none()))
    }
}
