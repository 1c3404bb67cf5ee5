//! Typed access to host properties (`proxy_get_property`): the connection, the
//! request, the route and the plugin.
//!
//! Paths are lists of segments (`["source", "address"]`), sent NUL-joined. Values
//! follow Envoy's encodings: strings raw, integers as 8-byte little-endian, booleans
//! as one byte. Hosts that return every property as a string (ngx_wasm_module) are
//! accepted too: the integer and boolean readers fall back to parsing text.

use sluice_abi::{Status, pairs};

use crate::error::{Error, HostError};
use crate::sys;

pub use sluice_abi::properties as paths;

fn encode_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

fn show(path: &[&str]) -> String {
    path.join(".")
}

fn decode_error(path: &[&str], message: impl Into<String>) -> Error {
    Error::Decode { what: format!("property {}", show(path)), message: message.into() }
}

/// The raw value of a property; `None` when the host does not have it.
pub fn get(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    match sys::get_property(&encode_path(path)) {
        Ok(v) => Ok(v),
        Err(raw) if raw == Status::NotFound.as_u32() => Ok(None),
        Err(raw) => Err(HostError::new("proxy_get_property", show(path), raw)),
    }
}

/// Sets a property (Envoy: filter state `wasm.<path>`). Set during a phase
/// of a request, its `on_log` or the answer to a callout the request's context
/// made, every filter of that request reads it back with [`get`] and the same
/// path, on Sluice as on Envoy; set where no request is in scope, it stays
/// this context's.
pub fn set(path: &[&str], value: &[u8]) -> Result<(), HostError> {
    sys::set_property(&encode_path(path), value).map_err(sys::fail("proxy_set_property", show(path)))
}

/// A string property (lossy UTF-8).
pub fn get_string(path: &[&str]) -> Result<Option<String>, HostError> {
    Ok(get(path)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// A signed integer property (8-byte LE, or decimal text).
pub fn get_i64(path: &[&str]) -> Result<Option<i64>, Error> {
    let Some(v) = get(path)? else { return Ok(None) };
    if let Ok(bytes) = <[u8; 8]>::try_from(v.as_slice()) {
        return Ok(Some(i64::from_le_bytes(bytes)));
    }
    let text = String::from_utf8_lossy(&v);
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| decode_error(path, format!("not an integer ({} bytes)", v.len())))
}

/// An unsigned integer property (8-byte LE, or decimal text).
pub fn get_u64(path: &[&str]) -> Result<Option<u64>, Error> {
    let Some(v) = get(path)? else { return Ok(None) };
    if let Ok(bytes) = <[u8; 8]>::try_from(v.as_slice()) {
        return Ok(Some(u64::from_le_bytes(bytes)));
    }
    let text = String::from_utf8_lossy(&v);
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| decode_error(path, format!("not an integer ({} bytes)", v.len())))
}

/// A boolean property (one byte, or `true`/`false` text).
pub fn get_bool(path: &[&str]) -> Result<Option<bool>, Error> {
    let Some(v) = get(path)? else { return Ok(None) };
    match v.as_slice() {
        [b] => Ok(Some(*b != 0)),
        b"true" => Ok(Some(true)),
        b"false" => Ok(Some(false)),
        _ => Err(decode_error(path, "not a boolean")),
    }
}

/// A map property (pairs-encoded, e.g. `request.headers`).
pub fn get_map(path: &[&str]) -> Result<Option<Vec<(String, String)>>, Error> {
    let Some(v) = get(path)? else { return Ok(None) };
    let decoded = pairs::decode(&v).map_err(|e| decode_error(path, format!("malformed map: {e:?}")))?;
    Ok(Some(
        decoded
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
    ))
}

/// `plugin_name`: the filter's name in the chain.
pub fn plugin_name() -> Result<Option<String>, HostError> {
    get_string(paths::PLUGIN_NAME)
}

/// `plugin_root_id`.
pub fn plugin_root_id() -> Result<Option<String>, HostError> {
    get_string(paths::PLUGIN_ROOT_ID)
}

/// `plugin_vm_id`.
pub fn plugin_vm_id() -> Result<Option<String>, HostError> {
    get_string(&["plugin_vm_id"])
}

/// `source.address`: the downstream peer, `ip:port`.
pub fn source_address() -> Result<Option<String>, HostError> {
    get_string(paths::SOURCE_ADDRESS)
}

/// `source.port`.
pub fn source_port() -> Result<Option<i64>, Error> {
    get_i64(paths::SOURCE_PORT)
}

/// `destination.address`: the local address the connection came to, `ip:port`.
pub fn destination_address() -> Result<Option<String>, HostError> {
    get_string(paths::DESTINATION_ADDRESS)
}

/// `destination.port`.
pub fn destination_port() -> Result<Option<i64>, Error> {
    get_i64(&["destination", "port"])
}

/// `connection.id`.
pub fn connection_id() -> Result<Option<u64>, Error> {
    get_u64(&["connection", "id"])
}

/// `connection.mtls`: whether the downstream presented a verified certificate.
pub fn mtls() -> Result<Option<bool>, Error> {
    get_bool(&["connection", "mtls"])
}

/// The downstream peer's identity: the URI SAN of its certificate
/// (`connection.uri_san_peer_certificate`, a SPIFFE id in a mesh).
pub fn peer_identity() -> Result<Option<String>, HostError> {
    get_string(paths::PEER_URI_SAN)
}

/// `request.id` (`x-request-id`).
pub fn request_id() -> Result<Option<String>, HostError> {
    get_string(paths::REQUEST_ID)
}

/// `request.protocol` (`HTTP/1.1`, `HTTP/2`).
pub fn request_protocol() -> Result<Option<String>, HostError> {
    get_string(&["request", "protocol"])
}

/// `response.code` (in response callbacks and `on_log`).
pub fn response_code() -> Result<Option<i64>, Error> {
    get_i64(&["response", "code"])
}

/// `xds.route_name`: the matched route.
pub fn route_name() -> Result<Option<String>, HostError> {
    get_string(paths::ROUTE_NAME)
}

/// `xds.cluster_name`: the upstream cluster.
pub fn cluster_name() -> Result<Option<String>, HostError> {
    get_string(paths::CLUSTER_NAME)
}
