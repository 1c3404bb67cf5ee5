//! HTTP and gRPC callouts: requests a filter makes to another cluster, answered
//! later through `on_http_call_response` / `on_grpc_call_response` of the context
//! that made them.

use std::time::Duration;

use sluice_abi::{BufferType, GrpcStatus, MapType, pairs};

use crate::error::HostError;
use crate::sys;

/// Identifies one callout; compare it with the token the call returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub(crate) u32);

impl Token {
    /// The host's raw token.
    pub fn raw(self) -> u32 {
        self.0
    }
}

/// An HTTP request to another cluster.
///
/// ```
/// use std::time::Duration;
/// use sluice_sdk::HttpCall;
///
/// let call = HttpCall::get("authz", "/check")
///     .header("x-user", "alice")
///     .timeout(Duration::from_millis(500));
/// assert_eq!(call.upstream(), "authz");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    upstream: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    timeout: Duration,
}

impl HttpCall {
    /// A request with `method` and `path` to `upstream` (a cluster name). The
    /// `:authority` defaults to the upstream name; the timeout to 5 seconds.
    pub fn new(upstream: impl Into<String>, method: &str, path: &str) -> HttpCall {
        let upstream = upstream.into();
        HttpCall {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), upstream.clone()),
            ],
            upstream,
            body: Vec::new(),
            trailers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }

    /// A GET request.
    pub fn get(upstream: impl Into<String>, path: &str) -> HttpCall {
        HttpCall::new(upstream, "GET", path)
    }

    /// A POST request.
    pub fn post(upstream: impl Into<String>, path: &str) -> HttpCall {
        HttpCall::new(upstream, "POST", path)
    }

    /// Sets the `:authority`.
    pub fn authority(self, authority: &str) -> HttpCall {
        self.set_header(":authority", authority)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> HttpCall {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    fn set_header(mut self, name: &str, value: &str) -> HttpCall {
        match self.headers.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value.into(),
            None => self.headers.push((name.into(), value.into())),
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> HttpCall {
        self.body = body.into();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> HttpCall {
        self.trailers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the timeout (rounded down to milliseconds; zero means none on Envoy).
    pub fn timeout(mut self, timeout: Duration) -> HttpCall {
        self.timeout = timeout;
        self
    }

    /// The cluster the call goes to.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub(crate) fn dispatch(&self) -> Result<Token, HostError> {
        let headers = pairs::encode(self.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let trailers = pairs::encode(self.trailers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let timeout = u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX);
        sys::http_call(self.upstream.as_bytes(), &headers, &self.body, &trailers, timeout)
            .map(Token)
            .map_err(|raw| {
                HostError::new("proxy_http_call", format!("upstream {:?}", self.upstream), raw).with_hint(
                    "the upstream must be a known cluster and the headers must include :method, :path and :authority",
                )
            })
    }
}

/// Why a callout produced no response (timeout, reset, unknown cluster...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutFailure {
    /// The host's status code for the call.
    pub code: u32,
    /// The host's message.
    pub message: String,
}

/// The response to an HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalloutResponse {
    /// Response headers, `:status` included.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// Response trailers.
    pub trailers: Vec<(String, String)>,
    /// Set when the call failed and there is no response.
    pub failure: Option<CalloutFailure>,
}

impl CalloutResponse {
    /// The `:status`, or `None` if the call failed.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn fetch(
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) -> Result<CalloutResponse, HostError> {
        if num_headers == 0 {
            let (code, message) = crate::host::status()?;
            return Ok(CalloutResponse {
                failure: Some(CalloutFailure { code, message }),
                ..Default::default()
            });
        }
        let headers = crate::http::read_pairs(MapType::HttpCallResponseHeaders)?;
        let body = if body_size == 0 {
            Vec::new()
        } else {
            sys::get_buffer_bytes(BufferType::HttpCallResponseBody.as_u32(), 0, body_size)
                .map_err(sys::fail("proxy_get_buffer_bytes", "http call response body"))?
                .unwrap_or_default()
        };
        let trailers = if num_trailers == 0 {
            Vec::new()
        } else {
            crate::http::read_pairs(MapType::HttpCallResponseTrailers)?
        };
        Ok(CalloutResponse { headers, body, trailers, failure: None })
    }
}

/// A unary gRPC call to another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    upstream: String,
    service: String,
    method: String,
    metadata: Vec<(String, Vec<u8>)>,
    message: Vec<u8>,
    timeout: Duration,
}

impl GrpcCall {
    /// A call of `service`/`method` on `upstream` (a cluster name), with an empty
    /// message and a 5 second timeout.
    pub fn new(
        upstream: impl Into<String>,
        service: impl Into<String>,
        method: impl Into<String>,
    ) -> GrpcCall {
        GrpcCall {
            upstream: upstream.into(),
            service: service.into(),
            method: method.into(),
            metadata: Vec::new(),
            message: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }

    /// Adds initial metadata.
    pub fn metadata(mut self, name: &str, value: impl Into<Vec<u8>>) -> GrpcCall {
        self.metadata.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the (already serialized) request message.
    pub fn message(mut self, message: impl Into<Vec<u8>>) -> GrpcCall {
        self.message = message.into();
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> GrpcCall {
        self.timeout = timeout;
        self
    }

    pub(crate) fn dispatch(&self) -> Result<Token, HostError> {
        let md = pairs::encode(self.metadata.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
        let timeout = u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX);
        sys::grpc_call(
            self.upstream.as_bytes(),
            self.service.as_bytes(),
            self.method.as_bytes(),
            &md,
            &self.message,
            timeout,
        )
        .map(Token)
        .map_err(|raw| {
            HostError::new(
                "proxy_grpc_call",
                format!("upstream {:?}, {}/{}", self.upstream, self.service, self.method),
                raw,
            )
            .with_hint("the upstream must be a known cluster")
        })
    }
}

/// The result of a unary gRPC callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcResponse {
    /// The gRPC status (`Ok` with a message on success).
    pub status: GrpcStatus,
    /// The raw status code (kept when it is outside the known range).
    pub raw_status: u32,
    /// The response message on success.
    pub message: Option<Vec<u8>>,
    /// The status message on failure.
    pub status_message: String,
}

impl GrpcResponse {
    /// True on success.
    pub fn is_ok(&self) -> bool {
        self.status == GrpcStatus::Ok
    }
}
