//! The traits a filter implements: [`RootContext`] (one per plugin: config, shared
//! state, timers) and [`HttpContext`] (one per request), plus [`StreamContext`] for
//! TCP filters. Every callback has a default that lets traffic through.

use serde::de::DeserializeOwned;

use crate::callout::{CalloutResponse, GrpcResponse, Token};
use crate::config;
use crate::dispatch::{self, Kept};
use crate::error::{ConfigError, Error};
use crate::http::Http;
use crate::root::Root;
use crate::shared::Queue;
use crate::tcp::Tcp;

/// What a header or trailer callback decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand the (possibly edited) message on.
    Continue,
    /// Hold the message (headers and any body behind them) until the filter calls
    /// [`Http::resume`], usually from a callout response or after a local response.
    /// From a callout-response callback, `Pause` means "keep waiting".
    Pause,
}

/// What a body callback decided. Buffering is explicit: the host keeps the chunks
/// and calls again with the whole buffered body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyAction {
    /// Forward what is buffered now (possibly rewritten).
    Continue,
    /// Keep this chunk buffered and call again when more arrives, with the total
    /// buffered size (proxy-wasm `Pause` in a body callback). The host caps the
    /// buffer (413 for a request, 500 for a response).
    Buffer,
    /// Buffer the whole body and call once more at end of stream: the SDK answers
    /// `Buffer` to every chunk without calling the filter until the last one.
    BufferUntilEnd,
    /// Hold the buffered body until [`Http::resume`] (waiting for a callout).
    Pause,
}

/// What kind of child context the root makes for a new stream.
pub enum Child<H> {
    /// An HTTP request.
    Http(H),
    /// A TCP connection.
    Stream(Box<dyn StreamContext>),
}

/// The plugin: built once per VM and root id, configured by `on_configure`, and
/// the factory of per-request contexts.
///
/// Register it with [`filter!`](crate::filter).
pub trait RootContext: 'static {
    /// The typed plugin configuration, read from JSON by [`parse_config`](Self::parse_config).
    /// Use `()` for none.
    type Config: DeserializeOwned;
    /// The per-request context; use `()` for a filter without HTTP behaviour.
    type Http: HttpContext;

    /// Makes the context of a new request (or TCP connection: see
    /// [`new_child`](Self::new_child)).
    fn new_http(&mut self, root: &mut Root) -> Self::Http;

    /// Makes the context of a new stream. The default makes an HTTP context; return
    /// [`Child::Stream`] for a TCP filter.
    fn new_child(&mut self, root: &mut Root) -> Child<Self::Http> {
        Child::Http(self.new_http(root))
    }

    /// Called once when the VM starts, with the VM configuration (if any). An error
    /// makes the VM unusable.
    fn on_vm_start(&mut self, _root: &mut Root, _vm_config: Option<Vec<u8>>) -> Result<(), Error> {
        Ok(())
    }

    /// Decodes the plugin configuration. The default reads JSON (empty = `null`, or
    /// `{}` for a struct whose fields all have defaults) and names the offending
    /// field on error.
    fn parse_config(bytes: &[u8]) -> Result<Self::Config, ConfigError>
    where
        Self: Sized,
    {
        config::from_json(bytes)
    }

    /// Called with the decoded configuration. An error rejects the configuration:
    /// the SDK logs it and answers `false`, which the host surfaces.
    fn on_configure(&mut self, _root: &mut Root, _config: Self::Config) -> Result<(), Error> {
        Ok(())
    }

    /// Called every tick period (see [`Root::set_tick_period`]).
    fn on_tick(&mut self, _root: &mut Root) -> Result<(), Error> {
        Ok(())
    }

    /// Called when an item was enqueued on a queue this root registered.
    fn on_queue_ready(&mut self, _root: &mut Root, _queue: Queue) -> Result<(), Error> {
        Ok(())
    }

    /// Called with the response to an HTTP callout this root made.
    fn on_http_call_response(
        &mut self,
        _root: &mut Root,
        _token: Token,
        _response: CalloutResponse,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// Called with the result of a gRPC callout this root made.
    fn on_grpc_call_response(
        &mut self,
        _root: &mut Root,
        _token: Token,
        _response: GrpcResponse,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// Called when the host calls a foreign function on this plugin.
    fn on_foreign_function(
        &mut self,
        _root: &mut Root,
        _function_id: u32,
        _args: Option<Vec<u8>>,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// The plugin is shutting down. Return `false` to finish later with
    /// [`Root::done`].
    fn on_done(&mut self, _root: &mut Root) -> bool {
        true
    }

    /// Final logging for the plugin.
    fn on_log(&mut self, _root: &mut Root) {}
}

/// One HTTP request and its response.
///
/// Callbacks come in the lifecycle order: request headers, request body chunks,
/// request trailers, response headers, response body chunks, response trailers,
/// `on_log`, `on_done`. Callout responses arrive in between while a phase is paused.
///
/// Implement only the callbacks the filter needs: one the type leaves to its
/// default costs next to nothing, since after its first call the SDK answers it
/// without reaching the context (a no-op filter pays for little more than its
/// context's creation and deletion).
pub trait HttpContext: 'static {
    /// Request headers arrived (`end_of_stream`: there is no body).
    fn on_request_headers(&mut self, _http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        dispatch::kept::<Self>(Kept::RequestHeaders);
        Ok(Action::Continue)
    }

    /// A request body chunk arrived; `body_size` is everything buffered so far.
    fn on_request_body(
        &mut self,
        _http: &mut Http,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Result<BodyAction, Error> {
        dispatch::kept::<Self>(Kept::RequestBody);
        Ok(BodyAction::Continue)
    }

    /// Request trailers arrived.
    fn on_request_trailers(&mut self, _http: &mut Http) -> Result<Action, Error> {
        dispatch::kept::<Self>(Kept::RequestTrailers);
        Ok(Action::Continue)
    }

    /// Response headers arrived (`end_of_stream`: there is no body).
    fn on_response_headers(&mut self, _http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        dispatch::kept::<Self>(Kept::ResponseHeaders);
        Ok(Action::Continue)
    }

    /// A response body chunk arrived; `body_size` is everything buffered so far.
    fn on_response_body(
        &mut self,
        _http: &mut Http,
        _body_size: usize,
        _end_of_stream: bool,
    ) -> Result<BodyAction, Error> {
        dispatch::kept::<Self>(Kept::ResponseBody);
        Ok(BodyAction::Continue)
    }

    /// Response trailers arrived.
    fn on_response_trailers(&mut self, _http: &mut Http) -> Result<Action, Error> {
        dispatch::kept::<Self>(Kept::ResponseTrailers);
        Ok(Action::Continue)
    }

    /// The response to an HTTP callout made by this request. Return
    /// [`Action::Continue`] to resume the paused stream, [`Action::Pause`] to keep
    /// waiting; call [`Http::respond`] to answer instead.
    fn on_http_call_response(
        &mut self,
        _http: &mut Http,
        _token: Token,
        _response: CalloutResponse,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// The result of a gRPC callout made by this request; same contract as
    /// [`on_http_call_response`](Self::on_http_call_response).
    fn on_grpc_call_response(
        &mut self,
        _http: &mut Http,
        _token: Token,
        _response: GrpcResponse,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// Final logging: request and response headers are readable.
    fn on_log(&mut self, _http: &mut Http) -> Result<(), Error> {
        dispatch::kept::<Self>(Kept::Log);
        Ok(())
    }

    /// A callback returned an error. The default logs it and fails closed: a 500
    /// local response while that is still possible, else a reset of the stream.
    /// Return [`Action::Continue`] to fail open instead.
    fn on_error(&mut self, http: &mut Http, error: Error) -> Action {
        http.fail_closed(&error)
    }
}

/// A filter that does nothing to requests.
impl HttpContext for () {}

/// One TCP connection.
pub trait StreamContext: 'static {
    /// A new downstream connection.
    fn on_new_connection(&mut self, _tcp: &mut Tcp) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// Data from downstream; `data_size` is everything buffered.
    fn on_downstream_data(
        &mut self,
        _tcp: &mut Tcp,
        _data_size: usize,
        _end_of_stream: bool,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// Data from upstream; `data_size` is everything buffered.
    fn on_upstream_data(
        &mut self,
        _tcp: &mut Tcp,
        _data_size: usize,
        _end_of_stream: bool,
    ) -> Result<Action, Error> {
        Ok(Action::Continue)
    }

    /// The downstream side closed.
    fn on_downstream_close(&mut self, _tcp: &mut Tcp, _peer: sluice_abi::PeerType) {}

    /// The upstream side closed.
    fn on_upstream_close(&mut self, _tcp: &mut Tcp, _peer: sluice_abi::PeerType) {}

    /// Final logging.
    fn on_log(&mut self, _tcp: &mut Tcp) {}

    /// A callback returned an error. The default logs it and closes the connection.
    fn on_error(&mut self, tcp: &mut Tcp, error: Error) -> Action {
        tcp.fail_closed(&error)
    }
}
