//! Callout results: delivered to the context that made the callout.

use sluice_abi::{BufferType, GrpcStatus, LogLevel};

use super::{Callout, Kind, kind, report, with_guest, with_http, with_root};
use crate::callout::{CalloutResponse, GrpcResponse, Token};
use crate::context::{Action, HttpContext};
use crate::error::{Error, HostError};
use crate::http::{Http, Phase};
use crate::log::log;
use crate::sys;

fn take_callout(token: u32, grpc: bool) -> Option<Callout> {
    with_guest(|g| match g.callouts.get(&token) {
        Some(c) if c.grpc == grpc => g.callouts.remove(&token),
        _ => None,
    })
}

/// Delivers a callout result to the HTTP context that made it, then resumes its
/// paused stream if the filter says `Continue`.
fn deliver_to_http(
    context: u32,
    name: &str,
    f: impl FnOnce(&mut dyn HttpContext, &mut Http) -> Result<Action, Error>,
) {
    if let Err(raw) = sys::set_effective_context(context) {
        let e = HostError::new("proxy_set_effective_context", format!("{context}"), raw);
        log(LogLevel::Error, &format!("{name}: cannot switch to context {context}: {e}"));
        return;
    }
    with_http(context, name, Phase::Callout, None, |c, http| {
        let r = f(c, http);
        let action = match r {
            Ok(a) => a,
            Err(e) => {
                report(name, &e);
                c.on_error(http, e)
            }
        };
        if action == Action::Continue
            && let Err(e) = http.resume()
        {
            report(name, &e.into());
        }
    });
}

pub(crate) fn on_http_call_response(
    root_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    let Some(callout) = take_callout(token, false) else {
        log(LogLevel::Warn, &format!("on_http_call_response: ignoring unknown callout token {token}"));
        return;
    };
    let response = CalloutResponse::fetch(num_headers, body_size, num_trailers);
    match kind(callout.context) {
        Some(Kind::Http) => deliver_to_http(callout.context, "on_http_call_response", |c, http| {
            c.on_http_call_response(http, Token(token), response?)
        }),
        Some(Kind::Root) => {
            let r = with_root(callout.context, "proxy_on_http_call_response", |r, root| {
                r.http_call_response(root, Token(token), response?)
            });
            if let Err(e) = r {
                report("on_http_call_response", &e);
            }
        }
        _ => log(
            LogLevel::Warn,
            &format!("on_http_call_response: context of token {token} (root {root_id}) is gone"),
        ),
    }
}

fn deliver_grpc(token: u32, response: Result<GrpcResponse, HostError>) {
    let Some(callout) = take_callout(token, true) else {
        // Unknown gRPC tokens are ignored, as the Rust SDK does (e.g. the close that
        // follows a delivered unary response).
        return;
    };
    match kind(callout.context) {
        Some(Kind::Http) => deliver_to_http(callout.context, "on_grpc_call_response", |c, http| {
            c.on_grpc_call_response(http, Token(token), response?)
        }),
        Some(Kind::Root) => {
            let r = with_root(callout.context, "proxy_on_grpc_receive", |r, root| {
                r.grpc_call_response(root, Token(token), response?)
            });
            if let Err(e) = r {
                report("on_grpc_call_response", &e);
            }
        }
        _ => {}
    }
}

pub(crate) fn on_grpc_receive(_root_id: u32, token: u32, size: usize) {
    let known = with_guest(|g| g.callouts.get(&token).is_some_and(|c| c.grpc));
    if !known {
        return;
    }
    let message = match sys::get_buffer_bytes(BufferType::GrpcReceiveBuffer.as_u32(), 0, size) {
        Ok(m) => Ok(GrpcResponse {
            status: GrpcStatus::Ok,
            raw_status: 0,
            message: Some(m.unwrap_or_default()),
            status_message: String::new(),
        }),
        Err(raw) => Err(HostError::new("proxy_get_buffer_bytes", "grpc message", raw)),
    };
    deliver_grpc(token, message);
}

pub(crate) fn on_grpc_close(_root_id: u32, token: u32, status: u32) {
    let known = with_guest(|g| g.callouts.get(&token).is_some_and(|c| c.grpc));
    if !known {
        return;
    }
    let response = crate::host::status().map(|(_, message)| GrpcResponse {
        status: GrpcStatus::from_u32(status).unwrap_or(GrpcStatus::Unknown),
        raw_status: status,
        message: None,
        status_message: message,
    });
    deliver_grpc(token, response);
}

// Unary calls get no metadata callbacks; streams are not supported yet.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn on_grpc_receive_initial_metadata(_root_id: u32, _token: u32, _num_elements: usize) {}

#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn on_grpc_receive_trailing_metadata(_root_id: u32, _token: u32, _num_elements: usize) {}
