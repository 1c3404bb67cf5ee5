//! The plugin handle [`Root`] given to every [`RootContext`](crate::RootContext)
//! callback.

use std::time::Duration;

use crate::callout::{GrpcCall, HttpCall, Token};
use crate::error::HostError;
use crate::{dispatch, sys};

/// The plugin (root context): timers, callouts and shutdown.
#[derive(Debug)]
pub struct Root {
    pub(crate) id: u32,
}

impl Root {
    /// The root context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Calls [`on_tick`](crate::RootContext::on_tick) every `period` (rounded down to
    /// milliseconds, at least 1 ms); `Duration::ZERO` stops the timer.
    pub fn set_tick_period(&mut self, period: Duration) -> Result<(), HostError> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        let ms = if period.is_zero() { 0 } else { ms.max(1) };
        sys::set_tick_period_ms(ms).map_err(sys::fail("proxy_set_tick_period_milliseconds", format!("{ms}")))
    }

    /// Sends an HTTP callout whose response comes to
    /// [`on_http_call_response`](crate::RootContext::on_http_call_response).
    pub fn http_call(&mut self, call: &HttpCall) -> Result<Token, HostError> {
        let token = call.dispatch()?;
        dispatch::register_callout(token, self.id, false);
        Ok(token)
    }

    /// Sends a unary gRPC callout whose result comes to
    /// [`on_grpc_call_response`](crate::RootContext::on_grpc_call_response).
    pub fn grpc_call(&mut self, call: &GrpcCall) -> Result<Token, HostError> {
        let token = call.dispatch()?;
        dispatch::register_callout(token, self.id, true);
        Ok(token)
    }

    /// Finishes a shutdown that [`on_done`](crate::RootContext::on_done) postponed.
    pub fn done(&mut self) -> Result<(), HostError> {
        sys::done().map_err(sys::fail("proxy_done", ""))
    }

    /// Resumes a paused request of this plugin from the root (after a tick, say):
    /// continues `stream` of HTTP context `context_id`.
    pub fn resume_http(&mut self, context_id: u32, stream: sluice_abi::StreamType) -> Result<(), HostError> {
        sys::set_effective_context(context_id)
            .map_err(sys::fail("proxy_set_effective_context", format!("{context_id}")))?;
        let r = sys::continue_stream(stream.as_u32())
            .map_err(sys::fail("proxy_continue_stream", format!("{stream:?}")));
        let _ = sys::set_effective_context(self.id);
        dispatch::mark_resumed(context_id, stream);
        r
    }
}
