//! The chain's body state machine with a native filter that pauses: the body
//! is not ready while the filter waits, resumes where it stopped, and the
//! filter lock is free again at the end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, request};
use http_body::{Body, Frame};
use sluice_filter::{
    BodyAction, BodyBuf, FilterError, FilterFactory, HeadersAction, HttpFilter, LogView, PhaseData, Resumed,
    StreamInfo,
};

use super::ChainRun;
use crate::body::ProxyBody;

/// A gate the test opens; the filter pauses on it.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    waker: Mutex<Option<Waker>>,
    logs: AtomicUsize,
    /// `x-forwarded-for` as the request headers phase saw it in the map.
    seen: Mutex<Option<HeaderValue>>,
    /// What the filter answers to `ignores_response`.
    ignores: AtomicBool,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.waker.lock()
            && let Some(w) = w.take()
        {
            w.wake();
        }
    }
}

struct Pausing(Arc<Gate>);

impl HttpFilter for Pausing {
    fn ignores_response(&self, _trailers: bool) -> bool {
        self.0.ignores.load(Ordering::SeqCst)
    }
    fn on_request_headers(
        &mut self,
        head: &mut request::Parts,
        _: &StreamInfo,
        _: bool,
    ) -> Result<HeadersAction, FilterError> {
        if let Ok(mut seen) = self.0.seen.lock() {
            *seen = head.headers.get("x-forwarded-for").cloned();
        }
        Ok(HeadersAction::Continue)
    }
    fn on_request_body(
        &mut self,
        _: &mut BodyBuf,
        _: &StreamInfo,
        _: bool,
    ) -> Result<BodyAction, FilterError> {
        Ok(BodyAction::Continue)
    }
    fn on_request_trailers(
        &mut self,
        _: &mut HeaderMap,
        _: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        Ok(HeadersAction::Continue)
    }
    fn on_response_headers(
        &mut self,
        _: &mut sluice_filter::ResponseHead,
        _: &StreamInfo,
        _: bool,
    ) -> Result<HeadersAction, FilterError> {
        Ok(HeadersAction::Continue)
    }
    fn on_response_body(
        &mut self,
        _: &mut BodyBuf,
        _: &StreamInfo,
        _: bool,
    ) -> Result<BodyAction, FilterError> {
        self.0.open.store(false, Ordering::SeqCst);
        Ok(BodyAction::Pause)
    }
    fn on_response_trailers(
        &mut self,
        _: &mut HeaderMap,
        _: &StreamInfo,
    ) -> Result<HeadersAction, FilterError> {
        self.0.open.store(false, Ordering::SeqCst);
        Ok(HeadersAction::Pause)
    }
    fn poll_resume(
        &mut self,
        cx: &mut Context<'_>,
        data: PhaseData<'_>,
        _: &StreamInfo,
    ) -> Poll<Result<Resumed, FilterError>> {
        if !self.0.open.load(Ordering::SeqCst) {
            if let Ok(mut w) = self.0.waker.lock() {
                *w = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        match data {
            PhaseData::ResponseBody(b) => b.edit(|m| m.make_ascii_uppercase()),
            PhaseData::ResponseTrailers(t) => {
                t.insert("x-gate", HeaderValue::from_static("passed"));
            }
            _ => {}
        }
        Poll::Ready(Ok(Resumed::Continue))
    }
    fn on_log(&mut self, _: &LogView<'_>, _: &StreamInfo) {
        self.0.logs.fetch_add(1, Ordering::SeqCst);
    }
}

struct Factory(Arc<Gate>);

impl FilterFactory for Factory {
    fn name(&self) -> &str {
        "gate"
    }
    fn new_filter(&self, _: &StreamInfo) -> Box<dyn HttpFilter> {
        Box::new(Pausing(self.0.clone()))
    }
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A body of given frames.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn poll(body: &mut ProxyBody) -> Poll<Option<Frame<Bytes>>> {
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(body).poll_frame(&mut cx).map(|f| f.and_then(Result::ok))
}

/// A runtime, and a chain of one [`Pausing`] filter behind its gate.
fn gated_chain() -> (tokio::runtime::Runtime, Arc<Gate>, crate::router::Chain) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let Ok(rt) = rt else { panic!("runtime") };
    let gate = Arc::new(Gate::default());
    let chain: crate::router::Chain =
        Arc::from(vec![Arc::new(Factory(gate.clone())) as Arc<dyn FilterFactory>]);
    (rt, gate, chain)
}

fn stream_info() -> StreamInfo {
    StreamInfo::new(
        "id",
        1,
        ([127, 0, 0, 1], 1).into(),
        ([127, 0, 0, 1], 2).into(),
        "l".into(),
        http::Version::HTTP_11,
        std::time::Instant::now(),
    )
}

/// A filter that does not read the fields the proxy kept beside the map
/// (every native one, by default) finds them in the map.
#[test]
fn a_native_filter_finds_the_proxy_fields_in_the_map() {
    let (rt, gate, chain) = gated_chain();
    let mut info = stream_info();
    info.keep_proxy_fields(sluice_filter::ProxyFields {
        request_id: None,
        forwarded_for: Some(HeaderValue::from_static("10.1.2.3")),
        forwarded_proto: Some("http"),
    });
    rt.block_on(async {
        let mut run = ChainRun::new(&chain, info, 1 << 20);
        let (mut head, _) = http::Request::get("/").body(()).unwrap_or_default().into_parts();
        assert!(matches!(run.request_headers(&mut head, true).await, Ok(None)));
        let seen = gate.seen.lock().ok().and_then(|s| s.clone());
        assert_eq!(seen, Some(HeaderValue::from_static("10.1.2.3")));
        assert_eq!(head.headers.get("x-forwarded-proto").map(HeaderValue::as_bytes), Some(&b"http"[..]));
        assert!(run.info().take_proxy_fields().is_empty(), "moved into the map, not sent twice");
    });
}

#[test]
fn a_paused_body_filter_resumes_where_it_stopped() {
    let (rt, gate, chain) = gated_chain();
    let info = stream_info();
    rt.block_on(async {
        let mut run = ChainRun::new(&chain, info, 1 << 20);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames =
            Frames(VecDeque::from([Frame::data(Bytes::from_static(b"hello")), Frame::trailers(trailers)]));
        let mut body = run.wrap_response_body(ProxyBody::boxed(frames));

        // The body phase paused: nothing comes out, and other phases must wait.
        assert!(poll(&mut body).is_pending());
        assert!(poll(&mut body).is_pending());
        assert!(!run.shared.filters.try_acquire(), "the paused phase holds the filter lock");
        gate.open();
        let Poll::Ready(Some(frame)) = poll(&mut body) else { panic!("data after resume") };
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"HELLO")));

        // The end of the body (an empty last call, as the trailers arrived) and
        // then the trailers phase pause in turn; the trailers resume with the edit.
        assert!(poll(&mut body).is_pending());
        gate.open();
        assert!(poll(&mut body).is_pending());
        gate.open();
        let Poll::Ready(Some(frame)) = poll(&mut body) else { panic!("trailers after resume") };
        let Ok(t) = frame.into_trailers() else { panic!("expected trailers") };
        assert_eq!(t.get("x-gate").map(HeaderValue::as_bytes), Some(&b"passed"[..]));
        assert_eq!(t.get("grpc-status").map(HeaderValue::as_bytes), Some(&b"0"[..]));
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        assert!(body.is_end_stream());

        // The lock is free again: on_log runs.
        drop(body);
        run.log(None);
        assert_eq!(gate.logs.load(Ordering::SeqCst), 1);
    });
}

/// A body the filters only read goes through the chain as it came: each chunk
/// still shares the buffer it was read into (no copy per chunk, however large).
#[test]
fn a_body_no_filter_writes_is_not_copied() {
    let (rt, _gate, chain) = gated_chain();
    let info = stream_info();
    rt.block_on(async {
        let mut run = ChainRun::new(&chain, info, 1 << 20);
        let read_buf = Bytes::from(vec![b'x'; 64 * 1024]);
        let (a, b) = (read_buf.slice(..40_000), read_buf.slice(40_000..));
        let frames = Frames(VecDeque::from([Frame::data(a.clone()), Frame::data(b.clone())]));
        let mut body = run.wrap_request_body(ProxyBody::boxed(frames));
        for sent in [a, b] {
            let Poll::Ready(Some(frame)) = poll(&mut body) else { panic!("a data frame") };
            let Ok(data) = frame.into_data() else { panic!("expected data") };
            assert_eq!((data.as_ptr(), data.len()), (sent.as_ptr(), sent.len()));
        }
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
    });
}

/// The response is left out of the chain only when every filter ignores it,
/// and never while a phase holds the filters.
#[test]
fn the_response_skips_the_chain_only_when_every_filter_ignores_it() {
    let (a, b) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
    let chain: crate::router::Chain = Arc::from(vec![
        Arc::new(Factory(a.clone())) as Arc<dyn FilterFactory>,
        Arc::new(Factory(b.clone())) as Arc<dyn FilterFactory>,
    ]);
    let run = ChainRun::new(&chain, stream_info(), 1 << 20);
    assert!(!run.ignores_response(true));
    a.ignores.store(true, Ordering::SeqCst);
    assert!(!run.ignores_response(true), "the second filter still reads the response");
    b.ignores.store(true, Ordering::SeqCst);
    assert!(run.ignores_response(true));
    let held = run.shared.filters.try_hold();
    assert!(held.is_some());
    assert!(!run.ignores_response(true), "a phase holds the filters");
}
