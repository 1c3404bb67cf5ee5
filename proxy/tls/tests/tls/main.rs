//! sluice-tls integration tests: real handshakes over real TCP sockets on 127.0.0.1,
//! with certificates from the crate's own `test_certs` PKI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod files;
mod server;
mod spiffe;
mod upstream;
