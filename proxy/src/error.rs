//! Proxy errors, and the one place that maps them to HTTP responses.
//!
//! Every error records the side that failed (downstream, upstream or internal),
//! as pingora's errors do, and a stable reason that becomes the
//! `x-sluice-reason` header, the `sluice_local_replies_total{reason}` label and
//! the access-log field.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use sluice_filter::{FilterError, FilterErrorKind};

/// Which side of the proxy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client, or its request.
    Downstream,
    /// The upstream server, or the way to it.
    Upstream,
    /// Sluice itself (including filters).
    Internal,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed (smuggling vectors, bad path, bad headers).
    BadRequest,
    /// No virtual host or route matched.
    NoRoute,
    /// The cluster has no healthy endpoint.
    NoHealthyUpstream,
    /// The upstream connection could not be made.
    ConnectFailure,
    /// The upstream connection timed out while connecting.
    ConnectTimeout,
    /// The upstream reset or closed before a full response.
    UpstreamReset,
    /// The upstream answered something that is not HTTP.
    UpstreamProtocol,
    /// The route or per-try timeout fired.
    UpstreamTimeout,
    /// A circuit breaker is open.
    CircuitOpen,
    /// The request body is larger than a buffer allows.
    PayloadTooLarge,
    /// Too many request headers (HTTP/2; HTTP/1.1 is refused by the codec).
    HeadersTooLarge,
    /// A filter failed (fail closed).
    Filter(FilterErrorKind),
    /// The filter chain's response buffer overflowed.
    ResponseTooLarge,
    /// The proxy is draining and refuses new work.
    Draining,
}

/// A proxy error.
#[derive(Debug, Clone)]
pub struct ProxyError {
    /// The failing side.
    pub side: Side,
    /// What went wrong.
    pub kind: ErrorKind,
    /// Detail for logs (never sent to the client).
    pub detail: String,
    /// Envoy's transport failure reason, when Sluice knows it (a refused
    /// connection's `delayed connect error: Connection refused`, `TLS error: …`).
    pub transport_failure: Option<Cow<'static, str>>,
}

impl ProxyError {
    /// A new error.
    pub fn new(side: Side, kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProxyError { side, kind, detail: detail.into(), transport_failure: None }
    }

    /// With Envoy's transport failure reason (see the field).
    pub fn with_transport_failure(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.transport_failure = Some(reason.into());
        self
    }

    /// A downstream error (malformed request).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ProxyError::new(Side::Downstream, ErrorKind::BadRequest, detail)
    }

    /// An upstream error.
    pub fn upstream(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProxyError::new(Side::Upstream, kind, detail)
    }

    /// The status code the downstream gets.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoHealthyUpstream
            | ErrorKind::ConnectFailure
            | ErrorKind::ConnectTimeout
            | ErrorKind::CircuitOpen
            | ErrorKind::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamReset | ErrorKind::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::Filter(FilterErrorKind::BodyTooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Filter(_) => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ResponseTooLarge => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable reason label.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::ConnectFailure => "upstream_connect_failure",
            ErrorKind::ConnectTimeout => "upstream_connect_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::UpstreamProtocol => "upstream_protocol_error",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::Filter(k) => k.as_str(),
            ErrorKind::ResponseTooLarge => "response_too_large",
            ErrorKind::Draining => "draining",
        }
    }

    /// Envoy's `response.code_details` for the reply to this error, so a
    /// filter written for Envoy reads what it expects; with the transport
    /// failure when known, as Envoy 1.40 (probed):
    /// `upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}`.
    /// Errors Envoy has no details for keep Sluice's reason.
    pub fn code_details(&self) -> Cow<'static, str> {
        match (self.kind, &self.transport_failure) {
            // Envoy's details have no spaces (`StringUtil::replaceAllEmptySpace`).
            (ErrorKind::ConnectFailure, Some(t)) => Cow::Owned(format!(
                "upstream_reset_before_response_started{{remote_connection_failure|{}}}",
                t.replace(' ', "_")
            )),
            _ => Cow::Borrowed(self.envoy_details()),
        }
    }

    fn envoy_details(&self) -> &'static str {
        match self.kind {
            ErrorKind::NoRoute => "route_not_found",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::ConnectFailure => "upstream_reset_before_response_started{remote_connection_failure}",
            ErrorKind::ConnectTimeout => "upstream_reset_before_response_started{connection_timeout}",
            ErrorKind::UpstreamReset => "upstream_reset_before_response_started{connection_termination}",
            ErrorKind::UpstreamProtocol => "upstream_reset_before_response_started{protocol_error}",
            ErrorKind::UpstreamTimeout => "upstream_response_timeout",
            ErrorKind::CircuitOpen => "upstream_reset_before_response_started{overflow}",
            ErrorKind::PayloadTooLarge | ErrorKind::Filter(FilterErrorKind::BodyTooLarge) => {
                "request_payload_too_large"
            }
            ErrorKind::ResponseTooLarge => "response_payload_too_large",
            ErrorKind::Filter(_) => "wasm_fail_stream",
            _ => self.reason(),
        }
    }

    /// Envoy's response flags for this error (`response.flags`; 0 for none
    /// of those Sluice can tell).
    pub fn response_flags(&self) -> u64 {
        use sluice_filter::response_flags as f;
        match self.kind {
            ErrorKind::NoRoute => f::NO_ROUTE_FOUND,
            ErrorKind::NoHealthyUpstream => f::NO_HEALTHY_UPSTREAM,
            ErrorKind::ConnectFailure | ErrorKind::ConnectTimeout => f::UPSTREAM_CONNECTION_FAILURE,
            ErrorKind::UpstreamReset => f::UPSTREAM_REMOTE_RESET,
            ErrorKind::UpstreamProtocol => f::UPSTREAM_PROTOCOL_ERROR,
            ErrorKind::UpstreamTimeout => f::UPSTREAM_REQUEST_TIMEOUT,
            ErrorKind::CircuitOpen => f::UPSTREAM_OVERFLOW,
            _ => 0,
        }
    }

    /// Whether the downstream connection must close after the reply (the request
    /// may have left unread bytes that could be smuggled as a second request).
    pub fn closes_connection(&self) -> bool {
        matches!(self.kind, ErrorKind::BadRequest | ErrorKind::PayloadTooLarge)
    }

    /// The short body sent with the status.
    pub fn body(&self) -> String {
        let text = match self.kind {
            ErrorKind::BadRequest => "bad request",
            ErrorKind::NoRoute => "no route",
            ErrorKind::NoHealthyUpstream => "no healthy upstream",
            ErrorKind::ConnectFailure | ErrorKind::ConnectTimeout => "upstream connect error",
            ErrorKind::UpstreamReset => "upstream reset before response",
            ErrorKind::UpstreamProtocol => "upstream protocol error",
            ErrorKind::UpstreamTimeout => "upstream request timeout",
            ErrorKind::CircuitOpen => "upstream overflow",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::HeadersTooLarge => "request header fields too large",
            ErrorKind::Filter(FilterErrorKind::BodyTooLarge) => "payload too large",
            ErrorKind::Filter(_) => "filter failed",
            ErrorKind::ResponseTooLarge => "response too large",
            ErrorKind::Draining => "draining",
        };
        format!("{text}\n")
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        };
        write!(f, "{side} error {}: {}", self.reason(), self.detail)
    }
}

impl std::error::Error for ProxyError {}

impl From<FilterError> for ProxyError {
    fn from(e: FilterError) -> Self {
        ProxyError::new(Side::Internal, ErrorKind::Filter(e.kind), e.to_string())
    }
}

/// Whether a body's error is a failure Sluice made itself (a response
/// filter's, or a buffer limit), which a server may still answer with an
/// error response when nothing of the response went out.
pub(crate) fn is_internal(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<ProxyError>().is_some_and(|e| e.side == Side::Internal)
}

/// gRPC status for an HTTP status, as Envoy maps local replies.
pub fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The `grpc-message` value for a text: percent-encoded as the gRPC spec asks
/// (control characters, non-ASCII bytes and `%`), as Envoy encodes its local replies.
pub fn grpc_message(text: &[u8]) -> Option<http::HeaderValue> {
    const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    http::HeaderValue::try_from(percent_encoding::percent_encode(text, GRPC_MESSAGE).to_string()).ok()
}

/// Builds the downstream response for an error: the one place errors become HTTP.
/// gRPC requests get a trailers-only gRPC reply with the mapped `grpc-status`.
pub fn error_response(err: &ProxyError, grpc: bool) -> http::Response<crate::body::ProxyBody> {
    use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
    let status = err.status();
    let mut resp = if grpc {
        let mut r = http::Response::new(crate::body::ProxyBody::empty());
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_status_for(status)));
        if let Some(v) = grpc_message(err.body().trim_end().as_bytes()) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = http::Response::new(crate::body::ProxyBody::full(err.body()));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    resp.headers_mut().insert("x-sluice-reason", HeaderValue::from_static(err.reason()));
    if err.closes_connection() {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::grpc_message;

    #[test]
    fn grpc_messages_are_percent_encoded_like_envoy() {
        assert_eq!(grpc_message(b"no healthy upstream").unwrap(), "no healthy upstream");
        assert_eq!(grpc_message(b"in jected\n50%").unwrap(), "in jected%0A50%25");
        assert_eq!(grpc_message("caf\u{e9}\r".as_bytes()).unwrap(), "caf%C3%A9%0D");
    }
}
