//! Plain data the test kit hands to tests: messages, local responses, callouts,
//! log lines.

use std::time::Duration;

use sluice_abi::{GrpcStatus, LogLevel};

fn find<'a>(entries: &'a [(String, String)], name: &str) -> Option<&'a str> {
    entries.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// A request or response as it left the filter (upstream request, downstream
/// response).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Headers in order, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
}

impl Message {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The first value of a trailer.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        find(&self.trailers, name)
    }

    /// `:status` as a number.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }

    /// `:path`.
    pub fn path(&self) -> Option<&str> {
        self.header(":path")
    }

    /// `:method`.
    pub fn method(&self) -> Option<&str> {
        self.header(":method")
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A local response a filter sent (`proxy_send_local_response`), as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers the filter added.
    pub headers: Vec<(String, String)>,
    /// Body (for gRPC replies: the status message).
    pub body: Vec<u8>,
    /// The gRPC status for gRPC replies.
    pub grpc_status: Option<GrpcStatus>,
    /// The status details string.
    pub details: String,
}

impl LocalResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response for the simulated upstream (or for an HTTP callout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) chunks: Vec<Vec<u8>>,
    pub(crate) trailers: Vec<(String, String)>,
}

impl Default for TestResponse {
    fn default() -> Self {
        TestResponse::new(200)
    }
}

impl TestResponse {
    /// A response with `status` and nothing else.
    pub fn new(status: u16) -> TestResponse {
        TestResponse { status, headers: Vec::new(), chunks: Vec::new(), trailers: Vec::new() }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> TestResponse {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the body (one chunk).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> TestResponse {
        let body = body.into();
        self.chunks = if body.is_empty() { Vec::new() } else { vec![body] };
        self
    }

    /// Sets the body as several chunks (each one a body callback).
    pub fn chunks<I, B>(mut self, chunks: I) -> TestResponse
    where
        I: IntoIterator<Item = B>,
        B: Into<Vec<u8>>,
    {
        self.chunks = chunks.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> TestResponse {
        self.trailers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub(crate) fn head(&self) -> Vec<(String, String)> {
        let mut h = vec![(":status".to_string(), self.status.to_string())];
        h.extend(self.headers.iter().cloned());
        h
    }

    pub(crate) fn joined_body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// An HTTP callout a filter made, waiting for the test to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallout {
    /// The token to answer with.
    pub token: u32,
    /// The context that made it.
    pub context_id: u32,
    /// The cluster.
    pub upstream: String,
    /// Headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
    /// Timeout.
    pub timeout: Duration,
}

impl HttpCallout {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// `:path`.
    pub fn path(&self) -> Option<&str> {
        self.header(":path")
    }

    /// `:method`.
    pub fn method(&self) -> Option<&str> {
        self.header(":method")
    }
}

/// A gRPC callout a filter made, waiting for the test to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCallout {
    /// The token to answer with.
    pub token: u32,
    /// The context that made it.
    pub context_id: u32,
    /// The cluster.
    pub upstream: String,
    /// The service.
    pub service: String,
    /// The method.
    pub method: String,
    /// Initial metadata.
    pub metadata: Vec<(String, Vec<u8>)>,
    /// The request message.
    pub message: Vec<u8>,
    /// Timeout.
    pub timeout: Duration,
}

/// How the test answers a gRPC callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcReply {
    /// Success with a response message.
    Ok(Vec<u8>),
    /// Failure with a status and message.
    Err(GrpcStatus, String),
}

/// One log line written through `proxy_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Level.
    pub level: LogLevel,
    /// Message.
    pub message: String,
}
