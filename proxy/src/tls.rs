//! Adapters from the config to TLS connectors and acceptors (built by `sluice-tls`).

use sluice_config::{HttpProtocol, Snapshot, UpstreamTls as UpstreamTlsConfig};

use crate::pool::UpstreamTls;

/// Builds the upstream TLS connector of a cluster.
pub fn upstream(_cfg: &UpstreamTlsConfig, _snapshot: &Snapshot, _protocol: HttpProtocol) -> Result<UpstreamTls, String> {
    Err("upstream TLS is not wired yet".to_owned())
}

/// A downstream TLS acceptor.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl ServerTls {
    /// The acceptor.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Builds a listener's TLS acceptor.
pub fn server(_cfg: &sluice_config::ListenerTls, _snapshot: &Snapshot, _alpn: &[&[u8]]) -> Result<ServerTls, String> {
    Err("downstream TLS is not wired yet".to_owned())
}

/// TLS facts of an accepted session.
pub fn tls_info(conn: &rustls::ServerConnection) -> sluice_filter::TlsInfo {
    sluice_filter::TlsInfo {
        version: match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            _ => String::new(),
        },
        server_name: conn.server_name().map(str::to_owned),
        ..Default::default()
    }
}
