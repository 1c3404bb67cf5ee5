//! A client session cache that can be emptied: after the client certificate rotates,
//! resuming an old session would present the old identity to the upstream (a resumed
//! TLS 1.3 session carries the certificate of the full handshake), so a rotation
//! starts from an empty cache.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::NamedGroup;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;

/// Sessions kept per upstream config (rustls' default size).
const SESSIONS: usize = 256;

/// rustls' in-memory session cache behind an `ArcSwap`, so it can be replaced whole.
#[derive(Debug)]
pub(crate) struct ResettableSessions {
    cache: ArcSwap<ClientSessionMemoryCache>,
}

impl ResettableSessions {
    pub(crate) fn new() -> Arc<ResettableSessions> {
        Arc::new(ResettableSessions { cache: ArcSwap::from_pointee(ClientSessionMemoryCache::new(SESSIONS)) })
    }

    /// Forgets every session and ticket; the next handshakes are full ones.
    pub(crate) fn clear(&self) {
        self.cache.store(Arc::new(ClientSessionMemoryCache::new(SESSIONS)));
    }
}

impl ClientSessionStore for ResettableSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache.load().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache.load().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.cache.load().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.cache.load().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.cache.load().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.cache.load().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.cache.load().take_tls13_ticket(server_name)
    }
}
