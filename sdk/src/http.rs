//! The per-request handle [`Http`] given to every [`HttpContext`](crate::HttpContext)
//! callback, and its views: [`Message`] (request or response), [`Headers`] and
//! [`Body`].

use sluice_abi::{BufferType, GRPC_STATUS_NONE, GrpcStatus, MapType, Status, StreamType, pairs};

use crate::callout::{GrpcCall, HttpCall, Token};
use crate::context::Action;
use crate::error::{Error, HostError};
use crate::{dispatch, sys};

/// Which callback is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// `on_request_headers`.
    RequestHeaders,
    /// `on_request_body`.
    RequestBody,
    /// `on_request_trailers`.
    RequestTrailers,
    /// `on_response_headers`.
    ResponseHeaders,
    /// `on_response_body`.
    ResponseBody,
    /// `on_response_trailers`.
    ResponseTrailers,
    /// `on_http_call_response` / `on_grpc_call_response` (the phase that paused is
    /// in [`Http::paused`]).
    Callout,
    /// `on_log`.
    Log,
}

/// Per-request state the SDK keeps between callbacks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HttpState {
    /// The stream the filter paused and has not resumed.
    pub(crate) paused: Option<StreamType>,
    /// The last phase that ran (before a callout).
    pub(crate) last_phase: Option<Phase>,
    pub(crate) request_until_end: bool,
    pub(crate) response_until_end: bool,
    /// The body size last reported per side (for the end-of-body call that
    /// `BufferUntilEnd` owes when trailers end the stream).
    pub(crate) request_body_size: usize,
    pub(crate) response_body_size: usize,
    pub(crate) responded: bool,
}

/// The request being filtered: the host services of one HTTP context.
#[derive(Debug)]
pub struct Http {
    pub(crate) id: u32,
    pub(crate) phase: Phase,
    pub(crate) body_size: Option<usize>,
    pub(crate) state: HttpState,
}

impl Http {
    /// The context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The callback that is running.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The stream this filter paused and has not resumed, if any.
    pub fn paused(&self) -> Option<StreamType> {
        self.state.paused
    }

    /// The request: headers (readable in `on_request_headers` and `on_log`), body
    /// (in `on_request_body`) and trailers.
    pub fn request(&self) -> Message {
        let body_size = if self.phase == Phase::RequestBody { self.body_size } else { None };
        Message { side: Side::Request, body_size }
    }

    /// The response: headers (readable in `on_response_headers` and `on_log`), body
    /// (in `on_response_body`) and trailers.
    pub fn response(&self) -> Message {
        let body_size = if self.phase == Phase::ResponseBody { self.body_size } else { None };
        Message { side: Side::Response, body_size }
    }

    /// Answers the request locally with `status`, `headers` and `body`; the request
    /// goes no further upstream. Return [`Action::Pause`] after it (the host stops
    /// the stream whatever the callback returns). Only possible before the response
    /// headers went downstream.
    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
    ) -> Result<(), HostError> {
        let h = pairs::encode(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        sys::send_local_response(u32::from(status), b"", body.as_ref(), &h, GRPC_STATUS_NONE)
            .map_err(sys::fail("proxy_send_local_response", format!("{status}")))
            .map_err(|e| {
                e.with_hint("a local response is only possible before the response headers went downstream")
            })?;
        self.state.responded = true;
        self.state.paused = None;
        Ok(())
    }

    /// Answers a gRPC request locally (HTTP 200 with `grpc-status` and
    /// `grpc-message` in a trailers-only reply).
    pub fn respond_grpc(
        &mut self,
        status: GrpcStatus,
        message: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), HostError> {
        let h = pairs::encode(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let code = i32::try_from(status.as_u32()).unwrap_or(2);
        sys::send_local_response(200, b"", message.as_bytes(), &h, code)
            .map_err(sys::fail("proxy_send_local_response", format!("grpc {status:?}")))?;
        self.state.responded = true;
        self.state.paused = None;
        Ok(())
    }

    /// True once this filter sent a local response.
    pub fn responded(&self) -> bool {
        self.state.responded
    }

    /// Resumes the stream this filter paused (request or response); does nothing if
    /// nothing is paused.
    pub fn resume(&mut self) -> Result<(), HostError> {
        match self.state.paused.take() {
            Some(stream) => continue_stream(stream),
            None => Ok(()),
        }
    }

    /// Resets the stream (HTTP/1.1: closes the downstream connection).
    pub fn reset(&mut self) -> Result<(), HostError> {
        self.state.paused = None;
        sys::close_stream(StreamType::HttpRequest.as_u32())
            .map_err(sys::fail("proxy_close_stream", "http request"))
    }

    /// Sends an HTTP callout; its response comes to
    /// [`on_http_call_response`](crate::HttpContext::on_http_call_response) of this
    /// context. Pause the stream to wait for it.
    pub fn http_call(&mut self, call: &HttpCall) -> Result<Token, HostError> {
        let token = call.dispatch()?;
        dispatch::register_callout(token, self.id, false);
        Ok(token)
    }

    /// Sends a unary gRPC callout; its result comes to
    /// [`on_grpc_call_response`](crate::HttpContext::on_grpc_call_response).
    pub fn grpc_call(&mut self, call: &GrpcCall) -> Result<Token, HostError> {
        let token = call.dispatch()?;
        dispatch::register_callout(token, self.id, true);
        Ok(token)
    }

    /// The default error policy: a 500 local response while the response has not
    /// started, else a reset. Returns the action to give back to the host.
    pub fn fail_closed(&mut self, _error: &Error) -> Action {
        let phase = match self.phase {
            Phase::Callout => self.state.last_phase.unwrap_or(Phase::RequestHeaders),
            p => p,
        };
        if phase == Phase::Log {
            return Action::Continue;
        }
        if !self.state.responded && phase <= Phase::ResponseHeaders {
            let headers = [("content-type", "text/plain")];
            if self.respond(500, &headers, "filter error\n").is_ok() {
                return Action::Pause;
            }
        }
        let _ = self.reset();
        Action::Pause
    }
}

fn continue_stream(stream: StreamType) -> Result<(), HostError> {
    sys::continue_stream(stream.as_u32()).map_err(sys::fail("proxy_continue_stream", format!("{stream:?}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// A view of the request or the response.
#[derive(Debug, Clone, Copy)]
pub struct Message {
    side: Side,
    body_size: Option<usize>,
}

impl Message {
    /// The headers.
    pub fn headers(&self) -> Headers {
        Headers {
            map: match self.side {
                Side::Request => MapType::HttpRequestHeaders,
                Side::Response => MapType::HttpResponseHeaders,
            },
        }
    }

    /// The trailers.
    pub fn trailers(&self) -> Headers {
        Headers {
            map: match self.side {
                Side::Request => MapType::HttpRequestTrailers,
                Side::Response => MapType::HttpResponseTrailers,
            },
        }
    }

    /// The body buffered so far (in a body callback).
    pub fn body(&self) -> Body {
        Body {
            buffer: match self.side {
                Side::Request => BufferType::HttpRequestBody,
                Side::Response => BufferType::HttpResponseBody,
            },
            size: self.body_size,
        }
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Result<Option<String>, HostError> {
        self.headers().get(name)
    }

    /// Sets a header, replacing any values.
    pub fn set_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        self.headers().set(name, value)
    }

    /// Appends a header value.
    pub fn add_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        self.headers().add(name, value)
    }

    /// Removes a header (all values).
    pub fn remove_header(&self, name: &str) -> Result<(), HostError> {
        self.headers().remove(name)
    }

    /// `:method` (request).
    pub fn method(&self) -> Result<Option<String>, HostError> {
        self.header(":method")
    }

    /// `:path`, query included (request).
    pub fn path(&self) -> Result<Option<String>, HostError> {
        self.header(":path")
    }

    /// Replaces `:path` (request).
    pub fn set_path(&self, path: &str) -> Result<(), HostError> {
        self.set_header(":path", path)
    }

    /// `:authority` (request).
    pub fn authority(&self) -> Result<Option<String>, HostError> {
        self.header(":authority")
    }

    /// `:scheme` (request).
    pub fn scheme(&self) -> Result<Option<String>, HostError> {
        self.header(":scheme")
    }

    /// `:status` (response); `None` when absent or not a number.
    pub fn status(&self) -> Result<Option<u16>, HostError> {
        Ok(self.header(":status")?.and_then(|s| s.parse().ok()))
    }
}

/// A header or trailer map of the current request.
#[derive(Debug, Clone, Copy)]
pub struct Headers {
    map: MapType,
}

fn map_name(map: MapType) -> &'static str {
    match map {
        MapType::HttpRequestHeaders => "request headers",
        MapType::HttpRequestTrailers => "request trailers",
        MapType::HttpResponseHeaders => "response headers",
        MapType::HttpResponseTrailers => "response trailers",
        MapType::GrpcReceiveInitialMetadata => "grpc initial metadata",
        MapType::GrpcReceiveTrailingMetadata => "grpc trailing metadata",
        MapType::HttpCallResponseHeaders => "http call response headers",
        MapType::HttpCallResponseTrailers => "http call response trailers",
    }
}

fn map_hint(map: MapType) -> &'static str {
    match map {
        MapType::HttpRequestHeaders => {
            "request headers are available in on_request_headers (and while paused there) and read-only in on_log"
        }
        MapType::HttpResponseHeaders => {
            "response headers are available in on_response_headers (and while paused there) and read-only in on_log"
        }
        MapType::HttpRequestTrailers => "request trailers are available in on_request_trailers",
        MapType::HttpResponseTrailers => "response trailers are available in on_response_trailers",
        _ => "this map is only available in its callout's response callback",
    }
}

fn lossy(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Reads and decodes a whole map.
pub(crate) fn read_pairs(map: MapType) -> Result<Vec<(String, String)>, HostError> {
    let raw = sys::get_header_map_pairs(map.as_u32())
        .map_err(|r| HostError::new("proxy_get_header_map_pairs", map_name(map), r).with_hint(map_hint(map)))?
        .unwrap_or_default();
    // A malformed map is a broken host contract; report it as an error, not a trap.
    let decoded = pairs::decode(&raw).map_err(|e| {
        HostError::new("proxy_get_header_map_pairs", map_name(map), Status::SerializationFailure.as_u32())
            .with_hint(if matches!(e, pairs::PairsError::TooMany) {
                "too many pairs"
            } else {
                "malformed pairs"
            })
    })?;
    Ok(decoded.into_iter().map(|(k, v)| (lossy(k.to_vec()), lossy(v.to_vec()))).collect())
}

impl Headers {
    /// The first value of `name` (lossy UTF-8); `None` if absent.
    pub fn get(&self, name: &str) -> Result<Option<String>, HostError> {
        Ok(self.get_bytes(name)?.map(lossy))
    }

    /// The first value of `name` as bytes.
    pub fn get_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        let key = name.to_ascii_lowercase();
        match sys::get_header_map_value(self.map.as_u32(), key.as_bytes()) {
            Ok(v) => Ok(Some(v.unwrap_or_default())),
            Err(raw) if raw == Status::NotFound.as_u32() => Ok(None),
            Err(raw) => Err(self.error("proxy_get_header_map_value", Some(&key), raw)),
        }
    }

    /// All entries in order, pseudo-headers included.
    pub fn all(&self) -> Result<Vec<(String, String)>, HostError> {
        read_pairs(self.map)
    }

    /// Every value of `name`, in order.
    pub fn get_all(&self, name: &str) -> Result<Vec<String>, HostError> {
        Ok(self.all()?.into_iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).collect())
    }

    /// Sets `name` to `value`, replacing any values.
    pub fn set(&self, name: &str, value: &str) -> Result<(), HostError> {
        let key = name.to_ascii_lowercase();
        sys::replace_header_map_value(self.map.as_u32(), key.as_bytes(), value.as_bytes())
            .map_err(|r| self.error("proxy_replace_header_map_value", Some(&key), r))
    }

    /// Appends a value of `name`.
    pub fn add(&self, name: &str, value: &str) -> Result<(), HostError> {
        let key = name.to_ascii_lowercase();
        sys::add_header_map_value(self.map.as_u32(), key.as_bytes(), value.as_bytes())
            .map_err(|r| self.error("proxy_add_header_map_value", Some(&key), r))
    }

    /// Removes every value of `name` (absent is fine).
    pub fn remove(&self, name: &str) -> Result<(), HostError> {
        let key = name.to_ascii_lowercase();
        sys::remove_header_map_value(self.map.as_u32(), key.as_bytes())
            .map_err(|r| self.error("proxy_remove_header_map_value", Some(&key), r))
    }

    /// Replaces the whole map.
    pub fn replace_all(&self, entries: &[(&str, &str)]) -> Result<(), HostError> {
        let data = pairs::encode(entries.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        sys::set_header_map_pairs(self.map.as_u32(), &data)
            .map_err(|r| self.error("proxy_set_header_map_pairs", None, r))
    }

    fn error(&self, call: &'static str, key: Option<&str>, raw: u32) -> HostError {
        let args = match key {
            Some(k) => format!("{}, {k:?}", map_name(self.map)),
            None => map_name(self.map).to_string(),
        };
        HostError::new(call, args, raw).with_hint(map_hint(self.map))
    }
}

/// The buffered body of the request or response.
#[derive(Debug, Clone, Copy)]
pub struct Body {
    buffer: BufferType,
    size: Option<usize>,
}

impl Body {
    fn name(&self) -> &'static str {
        match self.buffer {
            BufferType::HttpRequestBody => "request body",
            _ => "response body",
        }
    }

    fn error(&self, call: &'static str, raw: u32) -> HostError {
        HostError::new(call, self.name(), raw)
            .with_hint("a body is available in its body callback, while buffered or paused there")
    }

    /// The number of bytes buffered (as the body callback reported it).
    pub fn len(&self) -> usize {
        self.size.unwrap_or(0)
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads everything buffered.
    pub fn read(&self) -> Result<Vec<u8>, HostError> {
        self.read_range(0, self.size.unwrap_or(u32::MAX as usize))
    }

    /// Reads up to `max` bytes from `start`.
    pub fn read_range(&self, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
        match sys::get_buffer_bytes(self.buffer.as_u32(), start, max) {
            Ok(v) => Ok(v.unwrap_or_default()),
            Err(raw) if raw == Status::NotFound.as_u32() => Ok(Vec::new()),
            Err(raw) => Err(self.error("proxy_get_buffer_bytes", raw)),
        }
    }

    /// Reads everything buffered as (lossy) UTF-8.
    pub fn read_text(&self) -> Result<String, HostError> {
        Ok(lossy(self.read()?))
    }

    /// Replaces everything buffered with `data`. Remember to fix or remove
    /// `content-length` in the headers callback.
    pub fn replace(&self, data: impl AsRef<[u8]>) -> Result<(), HostError> {
        let size = self.size.unwrap_or(u32::MAX as usize);
        sys::set_buffer_bytes(self.buffer.as_u32(), 0, size, data.as_ref())
            .map_err(|r| self.error("proxy_set_buffer_bytes", r))
    }

    /// Appends `data` after the buffered bytes.
    pub fn append(&self, data: impl AsRef<[u8]>) -> Result<(), HostError> {
        let start = self.size.unwrap_or(u32::MAX as usize);
        sys::set_buffer_bytes(self.buffer.as_u32(), start, 0, data.as_ref())
            .map_err(|r| self.error("proxy_set_buffer_bytes", r))
    }

    /// Inserts `data` before the buffered bytes.
    pub fn prepend(&self, data: impl AsRef<[u8]>) -> Result<(), HostError> {
        sys::set_buffer_bytes(self.buffer.as_u32(), 0, 0, data.as_ref())
            .map_err(|r| self.error("proxy_set_buffer_bytes", r))
    }
}
