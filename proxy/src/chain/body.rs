//! A body that runs the filter chain on each frame as it is polled: no task, no
//! channel, no future per frame. While a filter is paused the body is simply not
//! ready (and holds the request's filter lock).

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use sluice_filter::{BodyAction, BodyBuf, HeadersAction, PhaseData, ResponseHead};

use super::{Failure, Shared, action_err, overflow, reset_error};
use crate::body::{BoxError, ProxyBody};

/// Where a frame is in the chain.
struct Run {
    /// This frame ends the stream.
    eos: bool,
    /// Trailers that arrived with the end of the stream, still to filter.
    trailers: Option<HeaderMap>,
    /// Next chain step (0 = the first filter in this direction).
    step: usize,
    /// Filtering the trailers (after the data).
    in_trailers: bool,
    /// The filter at `step` paused: poll it instead of calling it.
    paused: bool,
    /// Data released by the data pass, sent before the trailers.
    out: Bytes,
}

pub(crate) struct FilterBody {
    inner: ProxyBody,
    shared: Rc<Shared>,
    request: bool,
    /// One buffer per filter, plus the chain's output (inline for short chains).
    /// A chunk stays shared with the connection's read buffer until a filter
    /// writes it (see [`BodyBuf`]).
    bufs: smallvec::SmallVec<[BodyBuf; 4]>,
    run: Option<Run>,
    /// Holding the filter lock (a frame is in the chain).
    held: bool,
    /// The end of stream went through the chain.
    ended: bool,
    /// Trailers to send after the data released with them.
    out_trailers: Option<HeaderMap>,
    done: bool,
}

/// What one pass of the chain produced.
enum Out {
    /// Nothing to send yet (buffered, or an empty chunk).
    Nothing,
    Frame(Frame<Bytes>),
}

impl FilterBody {
    pub(super) fn new(inner: ProxyBody, shared: Rc<Shared>, request: bool) -> Self {
        FilterBody {
            inner,
            shared,
            request,
            bufs: smallvec::SmallVec::new(),
            run: None,
            held: false,
            ended: false,
            out_trailers: None,
            done: false,
        }
    }

    /// Takes in the next inner frame; `Ready(Err)` ends the body.
    fn ingest(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let (data, trailers, eos) = match frame {
            None => (None, None, true),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => (Some(d), None, self.inner.is_end_stream()),
                Err(f) => (None, f.into_trailers().ok(), true),
            },
            Some(Err(e)) => return Poll::Ready(Err(e)),
        };
        if let Some(d) = data {
            let info = &self.shared.info;
            let counter = if self.request { &info.request_body_bytes } else { &info.response_body_bytes };
            counter.set(counter.get() + d.len() as u64);
            if self.bufs.is_empty() {
                self.bufs.push(BodyBuf::new());
            }
            self.bufs[0].extend(d);
        }
        self.run = Some(Run { eos, trailers, step: 0, in_trailers: false, paused: false, out: Bytes::new() });
        Poll::Ready(Ok(()))
    }

    /// Drives the current frame through the chain (the lock is held).
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<Out, Failure>> {
        let sh = &*self.shared;
        let Some(mut g) = sh.filters.value() else {
            return Poll::Ready(Err(Failure::Error(super::busy())));
        };
        let Some(run) = self.run.as_mut() else { return Poll::Ready(Ok(Out::Nothing)) };
        let n = g.list.len();
        if self.bufs.len() < n + 1 {
            self.bufs.resize(n + 1, BodyBuf::new());
        }
        let (request, info, bufs) = (self.request, &sh.info, &mut self.bufs);
        while !run.in_trailers && run.step < n {
            let step = run.step;
            if bufs[step].is_empty() && !run.eos && !run.paused {
                self.run = None;
                return Poll::Ready(Ok(Out::Nothing));
            }
            let filter = &mut g.list[if request { step } else { n - 1 - step }];
            let action = if run.paused {
                let data = if request {
                    PhaseData::RequestBody(&mut bufs[step])
                } else {
                    PhaseData::ResponseBody(&mut bufs[step])
                };
                let r = ready!(filter.poll_resume(cx, data, info));
                run.paused = false;
                r.map(BodyAction::from)
            } else if request {
                filter.on_request_body(&mut bufs[step], info, run.eos)
            } else {
                filter.on_response_body(&mut bufs[step], info, run.eos)
            };
            match action.map_err(|e| Failure::Error(action_err(e)))? {
                BodyAction::Pause => run.paused = true,
                BodyAction::Continue => {
                    pass_on(bufs, step);
                    run.step += 1;
                }
                BodyAction::Buffer if !run.eos => {
                    let over = bufs[step].len() > sh.max_buffer;
                    self.run = None;
                    if over {
                        return Poll::Ready(Err(Failure::Error(overflow(request))));
                    }
                    return Poll::Ready(Ok(Out::Nothing));
                }
                BodyAction::Buffer => {
                    pass_on(bufs, step);
                    run.step += 1;
                }
                BodyAction::Respond(local) => return Poll::Ready(Err(Failure::Local(*local))),
                BodyAction::Reset => return Poll::Ready(Err(Failure::Error(reset_error()))),
            }
        }
        if !run.in_trailers {
            run.out = bufs[n].take();
            if run.eos {
                self.ended = true;
            }
            if run.trailers.is_none() {
                let out = std::mem::take(&mut run.out);
                self.run = None;
                return Poll::Ready(Ok(if out.is_empty() {
                    Out::Nothing
                } else {
                    Out::Frame(Frame::data(out))
                }));
            }
            run.in_trailers = true;
            run.step = 0;
        }
        let Some(t) = run.trailers.as_mut() else { return Poll::Ready(Ok(Out::Nothing)) };
        while run.step < n {
            let step = run.step;
            let filter = &mut g.list[if request { step } else { n - 1 - step }];
            let action = if run.paused {
                let data =
                    if request { PhaseData::RequestTrailers(t) } else { PhaseData::ResponseTrailers(t) };
                let r = ready!(filter.poll_resume(cx, data, info));
                run.paused = false;
                r.map(HeadersAction::from)
            } else if request {
                filter.on_request_trailers(t, info)
            } else {
                filter.on_response_trailers(t, info)
            };
            match action.map_err(|e| Failure::Error(action_err(e)))? {
                HeadersAction::Pause => run.paused = true,
                HeadersAction::Continue => run.step += 1,
                HeadersAction::Respond(local) => return Poll::Ready(Err(Failure::Local(*local))),
                HeadersAction::Reset => return Poll::Ready(Err(Failure::Error(reset_error()))),
            }
        }
        let Some(run) = self.run.take() else { return Poll::Ready(Ok(Out::Nothing)) };
        let Some(t) = run.trailers else { return Poll::Ready(Ok(Out::Nothing)) };
        if request {
            g.request_trailers = Some(Box::new(t.clone()));
        } else {
            g.response_trailers = Some(Box::new(t.clone()));
        }
        // Data released at the end goes first; the trailers follow on the next poll.
        if !run.out.is_empty() {
            self.out_trailers = Some(t);
            return Poll::Ready(Ok(Out::Frame(Frame::data(run.out))));
        }
        Poll::Ready(Ok(Out::Frame(Frame::trailers(t))))
    }

    /// Keeps the encoded response head for the body phases and `on_log`, with
    /// the fields its encoder copied from the inner body (it needs them no more).
    pub(crate) fn keep_response_head(self: Pin<&mut Self>, parts: http::response::Parts) {
        let this = self.get_mut();
        if !this.request {
            let encoded = this.inner.take_verbatim();
            this.shared.info.set_sent_response(ResponseHead::with_encoded(parts, encoded));
        }
    }

    /// The body the chain reads.
    pub(crate) fn inner(&self) -> &ProxyBody {
        &self.inner
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.shared.filters.release();
        }
    }
}

/// Hands filter `step`'s buffer to the next one: a move when the next buffer is
/// empty (the common case), an append otherwise.
fn pass_on(bufs: &mut [BodyBuf], step: usize) {
    if bufs[step + 1].is_empty() {
        bufs.swap(step, step + 1);
    } else {
        let moved = bufs[step].take();
        bufs[step + 1].extend(moved);
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
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(t) = this.out_trailers.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.run.is_none() {
                if this.ended {
                    this.done = true;
                    return Poll::Ready(None);
                }
                if let Err(e) = ready!(this.ingest(cx)) {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if !this.held {
                ready!(this.shared.filters.poll_acquire(cx));
                this.held = true;
            }
            let out = ready!(this.drive(cx));
            this.release();
            match out {
                Ok(Out::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Out::Nothing) => {}
                Err(f) => {
                    this.run = None;
                    this.done = true;
                    // An error travels with the body too: a downstream writer
                    // that has written nothing yet answers with it (a response
                    // over the buffer limit gets its 500).
                    let e: BoxError = match &f {
                        Failure::Error(e) => Box::new(e.clone()),
                        Failure::Local(_) => "stopped by filter".into(),
                    };
                    *this.shared.failure.borrow_mut() = Some(f);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Known as soon as the end went through the chain, so the proxy can return
        // the upstream connection to its pool without waiting for one more poll.
        self.done || (self.run.is_none() && self.ended && self.out_trailers.is_none())
    }
}

impl Drop for FilterBody {
    fn drop(&mut self) {
        self.release();
    }
}
