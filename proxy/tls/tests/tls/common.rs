//! Helpers: one-shot TLS server and client over loopback TCP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sluice_config::model::{CertificateFiles, ListenerTls};
use sluice_filter::TlsInfo;
use sluice_tls::test_certs::CertPaths;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Guard against a hung test; handshakes on loopback take milliseconds.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Paths in tests are absolute already.
pub fn same(p: &Path) -> PathBuf {
    p.to_owned()
}

/// What the server saw of a successful handshake.
#[derive(Debug)]
pub struct Accepted {
    pub info: TlsInfo,
    pub alpn: Option<Vec<u8>>,
}

/// What the client saw.
#[derive(Debug)]
pub struct Connected {
    pub peer_leaf: Option<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    /// What the server wrote after the handshake (`hello`).
    pub data: Vec<u8>,
}

/// Accepts one connection with `acceptor`, writes `hello` and closes.
pub async fn accept_one(acceptor: TlsAcceptor) -> (SocketAddr, JoinHandle<std::io::Result<Accepted>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let accepted =
            Accepted { info: sluice_tls::tls_info(conn), alpn: conn.alpn_protocol().map(<[u8]>::to_vec) };
        tls.write_all(b"hello").await?;
        tls.shutdown().await?;
        Ok(accepted)
    });
    (addr, task)
}

/// Connects to `addr` as `name` with `connector`, reads until the server closes.
pub async fn connect(
    connector: TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<Connected> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector.connect(name, tcp).await?;
    let (_, conn) = tls.get_ref();
    let peer_leaf = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let mut data = Vec::new();
    tls.read_to_end(&mut data).await?;
    Ok(Connected { peer_leaf, alpn, data })
}

/// Runs one handshake: server task plus client; returns both results.
pub async fn handshake(
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    name: &str,
) -> (std::io::Result<Accepted>, std::io::Result<Connected>) {
    let (addr, server) = accept_one(acceptor).await;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let client = tokio::time::timeout(LIMIT, connect(connector, addr, name)).await.expect("client timed out");
    let server = tokio::time::timeout(LIMIT, server).await.expect("server timed out").unwrap();
    (server, client)
}

/// A plain rustls client trusting `ca`, offering `alpn`, optionally with a client cert.
pub fn client_config(
    ca: &Path,
    alpn: &[&[u8]],
    client_cert: Option<&CertPaths>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(sluice_tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(paths) => {
            let chain = vec![paths.der.clone()];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&paths.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub const BOTH: &[&rustls::SupportedProtocolVersion] = sluice_tls::PROTOCOL_VERSIONS;

/// A listener `tls` block serving `certs` with no client auth.
pub fn listener_tls(certs: Vec<CertificateFiles>) -> ListenerTls {
    ListenerTls { certificates: certs, client_ca: None, require_client_certificate: false }
}

/// The reason label of a failed handshake.
pub fn reason<T: std::fmt::Debug>(r: &std::io::Result<T>) -> &'static str {
    match r {
        Ok(v) => panic!("expected a failed handshake, got {v:?}"),
        Err(e) => sluice_tls::handshake_failure_reason(e),
    }
}
