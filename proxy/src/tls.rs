//! Adapters from the config to the TLS connectors and acceptors built by `sluice-tls`.

use sluice_config::{HttpProtocol, ListenerTls, Snapshot, UpstreamTls as UpstreamTlsConfig};

use crate::pool::UpstreamTls;

pub use sluice_tls::{ServerTls, TlsMetrics, tls_info};

/// Builds the upstream TLS connector of a cluster. `field` names it in errors.
pub fn upstream(
    cfg: &UpstreamTlsConfig,
    snapshot: &Snapshot,
    protocol: HttpProtocol,
    field: &str,
) -> Result<UpstreamTls, sluice_tls::TlsError> {
    let c = sluice_tls::ClientTls::from_config(
        cfg,
        field,
        |p| snapshot.resolve(p),
        protocol == HttpProtocol::Http2,
    )?;
    Ok(UpstreamTls { connector: c.connector(), server_name: c.sni_override().cloned() })
}

/// Builds a listener's TLS acceptor. `field` names it in errors.
pub fn server(
    cfg: &ListenerTls,
    snapshot: &Snapshot,
    alpn: &[&[u8]],
    field: &str,
) -> Result<ServerTls, sluice_tls::TlsError> {
    ServerTls::from_config(cfg, field, |p| snapshot.resolve(p), alpn)
}
