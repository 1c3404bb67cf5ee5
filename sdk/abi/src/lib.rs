//! proxy-wasm ABI (v0.2.1, v0.2.0, v0.1.0) constants and enums, defined once for
//! Sluice's host (`sluice-wasm`) and guest SDK (`sluice-sdk`).
//!
//! This crate is `no_std`, has no dependencies and no unsafe code. It holds numbers
//! and names only: the serialization of header maps lives in [`pairs`], which both
//! sides share so that they cannot disagree, and [`ids`] hashes the ids both
//! sides key their maps by.
#![no_std]

extern crate alloc;

pub mod ids;
pub mod pairs;

/// Names of the export that marks a module's ABI version (never called).
pub mod version {
    /// ABI 0.2.1 marker export.
    pub const V0_2_1: &str = "proxy_abi_version_0_2_1";
    /// ABI 0.2.0 marker export.
    pub const V0_2_0: &str = "proxy_abi_version_0_2_0";
    /// ABI 0.1.0 marker export.
    pub const V0_1_0: &str = "proxy_abi_version_0_1_0";
}

macro_rules! abi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Decodes a raw ABI value; `None` when it is out of range.
            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The raw ABI value.
            pub const fn as_u32(self) -> u32 {
                self as u32
            }
        }
    };
}

abi_enum! {
    /// Result of a host call (`proxy_status_t`).
    Status {
        /// Success.
        Ok = 0,
        /// The key, map, buffer, queue, token or context does not exist.
        NotFound = 1,
        /// An argument is invalid for this call or in this phase.
        BadArgument = 2,
        /// Data could not be serialized.
        SerializationFailure = 3,
        /// Data could not be parsed.
        ParseFailure = 4,
        /// A property expression is invalid (C++ host only).
        BadExpression = 5,
        /// A guest pointer or length is out of bounds.
        InvalidMemoryAccess = 6,
        /// The queue is empty.
        Empty = 7,
        /// Compare-and-swap failed.
        CasMismatch = 8,
        /// Result type mismatch (C++ host only).
        ResultMismatch = 9,
        /// The host failed.
        InternalFailure = 10,
        /// The connection is broken (C++ host only).
        BrokenConnection = 11,
        /// Not implemented by this host.
        Unimplemented = 12,
    }
}

abi_enum! {
    /// Log levels.
    LogLevel {
        /// Trace.
        Trace = 0,
        /// Debug.
        Debug = 1,
        /// Info.
        Info = 2,
        /// Warn.
        Warn = 3,
        /// Error.
        Error = 4,
        /// Critical.
        Critical = 5,
    }
}

abi_enum! {
    /// Header/metadata maps a host call may address.
    MapType {
        /// Request headers.
        HttpRequestHeaders = 0,
        /// Request trailers.
        HttpRequestTrailers = 1,
        /// Response headers.
        HttpResponseHeaders = 2,
        /// Response trailers.
        HttpResponseTrailers = 3,
        /// gRPC callout initial metadata.
        GrpcReceiveInitialMetadata = 4,
        /// gRPC callout trailing metadata.
        GrpcReceiveTrailingMetadata = 5,
        /// HTTP callout response headers.
        HttpCallResponseHeaders = 6,
        /// HTTP callout response trailers.
        HttpCallResponseTrailers = 7,
    }
}

abi_enum! {
    /// Buffers a host call may address.
    BufferType {
        /// Request body.
        HttpRequestBody = 0,
        /// Response body.
        HttpResponseBody = 1,
        /// Downstream TCP data.
        DownstreamData = 2,
        /// Upstream TCP data.
        UpstreamData = 3,
        /// HTTP callout response body.
        HttpCallResponseBody = 4,
        /// gRPC callout message.
        GrpcReceiveBuffer = 5,
        /// VM configuration (readable in `on_vm_start`).
        VmConfiguration = 6,
        /// Plugin configuration (readable in `on_configure`).
        PluginConfiguration = 7,
        /// Foreign function call arguments.
        CallData = 8,
    }
}

abi_enum! {
    /// Streams `proxy_continue_stream` / `proxy_close_stream` address.
    StreamType {
        /// The HTTP request.
        HttpRequest = 0,
        /// The HTTP response.
        HttpResponse = 1,
        /// Downstream TCP.
        Downstream = 2,
        /// Upstream TCP.
        Upstream = 3,
    }
}

abi_enum! {
    /// What a stream callback returns.
    Action {
        /// Go on.
        Continue = 0,
        /// Stop here (headers: hold; body: buffer and call again).
        Pause = 1,
    }
}

abi_enum! {
    /// Who closed a TCP connection.
    PeerType {
        /// Unknown.
        Unknown = 0,
        /// This side.
        Local = 1,
        /// The peer.
        Remote = 2,
    }
}

abi_enum! {
    /// Metric kinds.
    MetricType {
        /// Monotonic counter.
        Counter = 0,
        /// Gauge.
        Gauge = 1,
        /// Histogram.
        Histogram = 2,
    }
}

/// gRPC status used by `proxy_send_local_response` to mean "not a gRPC reply".
pub const GRPC_STATUS_NONE: i32 = -1;

abi_enum! {
    /// gRPC status codes (`proxy_on_grpc_close`, `proxy_send_local_response`).
    GrpcStatus {
        /// Not an error.
        Ok = 0,
        /// Cancelled by the caller.
        Cancelled = 1,
        /// Unknown error.
        Unknown = 2,
        /// The client sent an invalid argument.
        InvalidArgument = 3,
        /// The deadline expired.
        DeadlineExceeded = 4,
        /// Not found.
        NotFound = 5,
        /// Already exists.
        AlreadyExists = 6,
        /// Permission denied.
        PermissionDenied = 7,
        /// A resource is exhausted.
        ResourceExhausted = 8,
        /// The system is not in a state required for the operation.
        FailedPrecondition = 9,
        /// Aborted (concurrency conflict).
        Aborted = 10,
        /// Out of range.
        OutOfRange = 11,
        /// Not implemented.
        Unimplemented = 12,
        /// Internal error.
        Internal = 13,
        /// The service is unavailable.
        Unavailable = 14,
        /// Unrecoverable data loss.
        DataLoss = 15,
        /// The request has no valid credentials.
        Unauthenticated = 16,
    }
}

/// Guest exports: callbacks the host calls, and other well-known export names.
pub mod exports {
    /// Reactor initialisation (called once after instantiation).
    pub const INITIALIZE: &str = "_initialize";
    /// Command entry point, called only when `_initialize` is absent.
    pub const START: &str = "_start";
    /// Called after `_initialize` with (0, 0) when exported.
    pub const MAIN: &str = "main";
    /// `main` without arguments (wasi-libc's name), called when `main` is not exported.
    pub const MAIN_VOID: &str = "__main_void";
    /// Allocator (spec name).
    pub const ON_MEMORY_ALLOCATE: &str = "proxy_on_memory_allocate";
    /// Allocator (C name, used by `wasm32-unknown-unknown` Rust modules).
    pub const MALLOC: &str = "malloc";
    /// `(context_id, parent_context_id)`.
    pub const ON_CONTEXT_CREATE: &str = "proxy_on_context_create";
    /// `(root_context_id, vm_configuration_size) -> bool`.
    pub const ON_VM_START: &str = "proxy_on_vm_start";
    /// `(root_context_id, plugin_configuration_size) -> bool`.
    pub const ON_CONFIGURE: &str = "proxy_on_configure";
    /// `(root_context_id)`.
    pub const ON_TICK: &str = "proxy_on_tick";
    /// `(root_context_id, queue_id)`.
    pub const ON_QUEUE_READY: &str = "proxy_on_queue_ready";
    /// `(context_id) -> bool`.
    pub const ON_DONE: &str = "proxy_on_done";
    /// `(context_id)`.
    pub const ON_LOG: &str = "proxy_on_log";
    /// `(context_id)`.
    pub const ON_DELETE: &str = "proxy_on_delete";
    /// `(context_id, num_headers, end_of_stream) -> action` (0.1.0: no eos).
    pub const ON_REQUEST_HEADERS: &str = "proxy_on_request_headers";
    /// `(context_id, body_size, end_of_stream) -> action`.
    pub const ON_REQUEST_BODY: &str = "proxy_on_request_body";
    /// `(context_id, num_trailers) -> action`.
    pub const ON_REQUEST_TRAILERS: &str = "proxy_on_request_trailers";
    /// `(context_id, num_headers, end_of_stream) -> action` (0.1.0: no eos).
    pub const ON_RESPONSE_HEADERS: &str = "proxy_on_response_headers";
    /// `(context_id, body_size, end_of_stream) -> action`.
    pub const ON_RESPONSE_BODY: &str = "proxy_on_response_body";
    /// `(context_id, num_trailers) -> action`.
    pub const ON_RESPONSE_TRAILERS: &str = "proxy_on_response_trailers";
    /// `(context_id, token, num_headers, body_size, num_trailers)`.
    pub const ON_HTTP_CALL_RESPONSE: &str = "proxy_on_http_call_response";
    /// `(context_id, token, num_elements)`.
    pub const ON_GRPC_RECEIVE_INITIAL_METADATA: &str = "proxy_on_grpc_receive_initial_metadata";
    /// `(context_id, token, response_size)`.
    pub const ON_GRPC_RECEIVE: &str = "proxy_on_grpc_receive";
    /// `(context_id, token, num_elements)`.
    pub const ON_GRPC_RECEIVE_TRAILING_METADATA: &str = "proxy_on_grpc_receive_trailing_metadata";
    /// `(context_id, token, status_code)`.
    pub const ON_GRPC_CLOSE: &str = "proxy_on_grpc_close";
    /// `(context_id, function_id, data_size)`.
    pub const ON_FOREIGN_FUNCTION: &str = "proxy_on_foreign_function";
    /// `(context_id) -> action`.
    pub const ON_NEW_CONNECTION: &str = "proxy_on_new_connection";
    /// `(context_id, data_size, end_of_stream) -> action`.
    pub const ON_DOWNSTREAM_DATA: &str = "proxy_on_downstream_data";
    /// `(context_id, data_size, end_of_stream) -> action`.
    pub const ON_UPSTREAM_DATA: &str = "proxy_on_upstream_data";
    /// `(context_id, peer_type)`.
    pub const ON_DOWNSTREAM_CONNECTION_CLOSE: &str = "proxy_on_downstream_connection_close";
    /// `(context_id, peer_type)`.
    pub const ON_UPSTREAM_CONNECTION_CLOSE: &str = "proxy_on_upstream_connection_close";
}

/// Well-known property paths (segments joined by NUL when sent over the ABI).
pub mod properties {
    /// `plugin_name`.
    pub const PLUGIN_NAME: &[&str] = &["plugin_name"];
    /// `plugin_root_id`.
    pub const PLUGIN_ROOT_ID: &[&str] = &["plugin_root_id"];
    /// `source.address` (`ip:port`).
    pub const SOURCE_ADDRESS: &[&str] = &["source", "address"];
    /// `source.port` (i64 LE).
    pub const SOURCE_PORT: &[&str] = &["source", "port"];
    /// `destination.address`.
    pub const DESTINATION_ADDRESS: &[&str] = &["destination", "address"];
    /// `request.id`.
    pub const REQUEST_ID: &[&str] = &["request", "id"];
    /// `xds.route_name`.
    pub const ROUTE_NAME: &[&str] = &["xds", "route_name"];
    /// `xds.cluster_name`.
    pub const CLUSTER_NAME: &[&str] = &["xds", "cluster_name"];
    /// `connection.uri_san_peer_certificate`.
    pub const PEER_URI_SAN: &[&str] = &["connection", "uri_san_peer_certificate"];
}

/// Foreign functions (`proxy_call_foreign_function`) Sluice defines. Hosts that
/// do not know a name answer `NotFound` (Envoy does), so calling one is safe
/// anywhere.
pub mod foreign {
    /// `args`: a `u32`, little-endian, of [`noop`] bits; no result. The calling
    /// VM declares that its HTTP contexts answer those callbacks `Continue` and
    /// do nothing else in them, for every context, now and later (the set only
    /// grows). The host may then skip them, as Sluice does. The Sluice SDK
    /// declares the callbacks a filter leaves to their default.
    pub const NOOP_HTTP_CALLBACKS: &str = "sluice.noop_http_callbacks";

    /// The bits of [`NOOP_HTTP_CALLBACKS`].
    pub mod noop {
        pub const REQUEST_HEADERS: u32 = 1;
        pub const REQUEST_BODY: u32 = 1 << 1;
        /// Only with [`REQUEST_BODY`]: trailers may end a buffered body, whose
        /// last body call then comes from the trailers callback.
        pub const REQUEST_TRAILERS: u32 = 1 << 2;
        pub const RESPONSE_HEADERS: u32 = 1 << 3;
        pub const RESPONSE_BODY: u32 = 1 << 4;
        /// Only with [`RESPONSE_BODY`], as for the request.
        pub const RESPONSE_TRAILERS: u32 = 1 << 5;
        pub const LOG: u32 = 1 << 6;
        /// `on_done` of an HTTP context answers `true` (done) and does nothing else.
        pub const DONE: u32 = 1 << 7;
    }
}
