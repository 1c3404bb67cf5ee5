//! Envoy's response flags (`response.flags`, `%RESPONSE_FLAGS%`): one bit per
//! thing that went wrong, in Envoy's order (`StreamInfo::CoreResponseFlag`).
//! Only those Sluice can tell are listed.

/// `UH`: no healthy upstream host.
pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
/// `UT`: upstream request timeout.
pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
/// `UR`: the upstream reset the stream.
pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
/// `UF`: upstream connection failure.
pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
/// `UO`: upstream overflow (circuit breaking).
pub const UPSTREAM_OVERFLOW: u64 = 0x80;
/// `NR`: no route.
pub const NO_ROUTE_FOUND: u64 = 0x100;
/// `UPE`: upstream protocol error.
pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000;
