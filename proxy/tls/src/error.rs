//! The one error type of this crate: every variant names the config field it came
//! from (the caller's prefix, e.g. `listeners[0].tls`, plus the sub-field) and, where
//! a file is involved, the file as written in the config.

use std::path::PathBuf;

/// Why a TLS configuration could not be built.
///
/// The `Display` form starts with the config field, so it can be shown to an
/// operator as is: `listeners[0].tls.certificates[1].key: no private key found in
/// certs/b.key`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        /// The config field that names the file.
        field: String,
        /// The file, as resolved against the config's directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but its PEM content is unusable.
    #[error("{field}: {reason} in {}", path.display())]
    Pem {
        /// The config field that names the file.
        field: String,
        /// The file, as resolved against the config's directory.
        path: PathBuf,
        /// What is wrong, e.g. `no private key found`.
        reason: String,
    },
    /// A value is invalid on its own or together with other fields.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending config field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused a certificate, key or setting.
    #[error("{field}: {source}")]
    Rustls {
        /// The config field the refused value came from.
        field: String,
        /// The rustls error.
        source: rustls::Error,
    },
}

impl TlsError {
    /// The config field this error is about, e.g. `listeners[0].tls.certificates[1].key`.
    pub fn field(&self) -> &str {
        match self {
            TlsError::Read { field, .. }
            | TlsError::Pem { field, .. }
            | TlsError::Invalid { field, .. }
            | TlsError::Rustls { field, .. } => field,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TlsError::Invalid { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn rustls(field: impl Into<String>, source: rustls::Error) -> Self {
        TlsError::Rustls { field: field.into(), source }
    }
}
