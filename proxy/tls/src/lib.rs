//! TLS for Sluice: rustls configs built from the validated config.
