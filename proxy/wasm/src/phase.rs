//! The six phases of an HTTP context, as the filter drives them: where each
//! phase's data is parked in the context while the guest pauses, the size the
//! callback is told, the VM's live slot for a head, and the guest call.

use http::{HeaderMap, request};
use sluice_filter::{BodyBuf, ResponseHead, StreamInfo};

use crate::headers::MapView;
use crate::state::{Callback, HttpCtx, LiveHeads, Parked, ParkedForm, Signal, empty_request, empty_response};
use crate::vm::{Vm, VmFailure};

/// One kind of phase: where its data lives in the context and how the guest is called.
pub(crate) trait Phase {
    type Value: Placeholder;
    const CALLBACK: Callback;
    const BODY: bool = false;
    /// Parks the phase's data in the context.
    fn park(ctx: &mut HttpCtx, value: Self::Value);
    /// Takes the phase's data back, if it is still parked.
    fn unpark(ctx: &mut HttpCtx) -> Option<Self::Value>;
    /// Takes this phase's resume flag.
    fn resumed(sig: &mut Signal) -> bool;
    /// The callback's size argument (entries or bytes).
    fn arg(value: &Self::Value, info: &StreamInfo) -> usize;
    /// Readies the data to be parked in the context (a pause): a request
    /// head takes in the fields the proxy kept beside its map.
    fn settle(value: &mut Self::Value, info: &StreamInfo);
    /// The VM's slot for this phase's data and its owner (the heads only).
    fn live(live: &mut LiveHeads) -> Option<(&mut u32, &mut Self::Value)>;
    fn invoke(vm: &mut Vm, id: u32, arg: usize, eos: bool) -> Result<i32, VmFailure>;
}

/// An empty value of a phase's data: what the caller holds while the data is
/// parked in a context (rare: a head normally swaps with the VM's live slot).
pub(crate) trait Placeholder: Sized {
    fn fresh() -> Self;
}

impl Placeholder for request::Parts {
    fn fresh() -> Self {
        empty_request()
    }
}

impl Placeholder for ResponseHead {
    fn fresh() -> Self {
        ResponseHead::new(empty_response())
    }
}

impl Placeholder for BodyBuf {
    fn fresh() -> Self {
        BodyBuf::new()
    }
}

impl Placeholder for HeaderMap {
    fn fresh() -> Self {
        HeaderMap::new()
    }
}

macro_rules! phase {
    ($name:ident, $value:ty, $cb:expr, $body:expr, $variant:ident, $flag:ident, $arg:expr, $settle:expr, $live:expr, $invoke:expr) => {
        pub(crate) struct $name;
        impl Phase for $name {
            type Value = $value;
            const CALLBACK: Callback = $cb;
            const BODY: bool = $body;
            fn park(ctx: &mut HttpCtx, value: $value) {
                ctx.parked = Parked::$variant(ParkedForm::wrap(value));
            }
            fn unpark(ctx: &mut HttpCtx) -> Option<$value> {
                match std::mem::take(&mut ctx.parked) {
                    Parked::$variant(v) => Some(ParkedForm::unwrap(v)),
                    other => {
                        ctx.parked = other;
                        None
                    }
                }
            }
            fn resumed(sig: &mut Signal) -> bool {
                std::mem::take(&mut sig.$flag)
            }
            fn arg(value: &$value, info: &StreamInfo) -> usize {
                let f: fn(&$value, &StreamInfo) -> usize = $arg;
                f(value, info)
            }
            fn settle(value: &mut $value, info: &StreamInfo) {
                let f: fn(&mut $value, &StreamInfo) = $settle;
                f(value, info)
            }
            fn live(live: &mut LiveHeads) -> Option<(&mut u32, &mut $value)> {
                let f: fn(&mut LiveHeads) -> Option<(&mut u32, &mut $value)> = $live;
                f(live)
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
    ReqHead,
    resume_request,
    |v, i| MapView::Request(v).count() + i.proxy_fields().len(),
    |v, i| i.materialize_proxy_fields(&mut v.headers),
    |l| Some((&mut l.request_owner, &mut l.request)),
    |vm, cb, id, n, eos| vm.headers(cb, id, n, eos)
);
phase!(
    ReqBody,
    BodyBuf,
    Callback::RequestBody,
    true,
    ReqBody,
    resume_request,
    |v, _| v.len(),
    |_, _| {},
    |_| None,
    |vm, cb, id, n, eos| vm.body(cb, id, n, eos)
);
phase!(
    ReqTrailers,
    HeaderMap,
    Callback::RequestTrailers,
    false,
    ReqTrailers,
    resume_request,
    |v, _| v.len(),
    |_, _| {},
    |_| None,
    |vm, cb, id, n, _| vm.trailers(cb, id, n)
);
phase!(
    RespHeaders,
    ResponseHead,
    Callback::ResponseHeaders,
    false,
    RespHead,
    resume_response,
    |v, _| MapView::Head(v).count(),
    |_, _| {},
    |l| Some((&mut l.response_owner, &mut l.response)),
    |vm, cb, id, n, eos| vm.headers(cb, id, n, eos)
);
phase!(
    RespBody,
    BodyBuf,
    Callback::ResponseBody,
    true,
    RespBody,
    resume_response,
    |v, _| v.len(),
    |_, _| {},
    |_| None,
    |vm, cb, id, n, eos| vm.body(cb, id, n, eos)
);
phase!(
    RespTrailers,
    HeaderMap,
    Callback::ResponseTrailers,
    false,
    RespTrailers,
    resume_response,
    |v, _| v.len(),
    |_, _| {},
    |_| None,
    |vm, cb, id, n, _| vm.trailers(cb, id, n)
);
