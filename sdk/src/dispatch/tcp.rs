//! TCP stream callbacks.

use sluice_abi::PeerType;

use super::{report, with_stream};
use crate::context::{Action, StreamContext};
use crate::error::Error;
use crate::tcp::Tcp;

fn tcp_result(ctx: &mut dyn StreamContext, tcp: &mut Tcp, name: &str, r: Result<Action, Error>) -> u32 {
    let action = match r {
        Ok(a) => a,
        Err(e) => {
            report(name, &e);
            ctx.on_error(tcp, e)
        }
    };
    action.as_raw()
}

pub(crate) fn on_new_connection(id: u32) -> u32 {
    with_stream(id, "proxy_on_new_connection", 0, |c, tcp| {
        let r = c.on_new_connection(tcp);
        tcp_result(c, tcp, "on_new_connection", r)
    })
}

pub(crate) fn on_downstream_data(id: u32, size: usize, eos: bool) -> u32 {
    with_stream(id, "proxy_on_downstream_data", size, |c, tcp| {
        let r = c.on_downstream_data(tcp, size, eos);
        tcp_result(c, tcp, "on_downstream_data", r)
    })
}

pub(crate) fn on_upstream_data(id: u32, size: usize, eos: bool) -> u32 {
    with_stream(id, "proxy_on_upstream_data", size, |c, tcp| {
        let r = c.on_upstream_data(tcp, size, eos);
        tcp_result(c, tcp, "on_upstream_data", r)
    })
}

fn peer(raw: u32) -> PeerType {
    PeerType::from_u32(raw).unwrap_or(PeerType::Unknown)
}

pub(crate) fn on_downstream_connection_close(id: u32, peer_type: u32) {
    with_stream(id, "proxy_on_downstream_connection_close", 0, |c, tcp| {
        c.on_downstream_close(tcp, peer(peer_type))
    });
}

pub(crate) fn on_upstream_connection_close(id: u32, peer_type: u32) {
    with_stream(id, "proxy_on_upstream_connection_close", 0, |c, tcp| {
        c.on_upstream_close(tcp, peer(peer_type))
    });
}
