//! Integration tests of the wasm host: one binary, a module per topic.
//!
//! `sandbox` drives inline WAT modules (traps, deadlines, memory, hostile host
//! calls, admission); `lifecycle` a VM's start and end; `scopes` shared
//! data's per plugin or per `vm_id`; `quotas` what a guest can make the host hold, and the
//! VM pool; `fuzz` random host-call sequences with hostile arguments; `sdk` drives filters written against the upstream
//! `proxy-wasm` crate 0.2.5 (`tests/fixtures`), built once per run, against a
//! real hyper server for callouts; `wasi` the WASI stubs other runtimes probe.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fuzz;
mod lifecycle;
mod loading;
mod quotas;
mod sandbox;
mod scopes;
mod sdk;
mod wasi;
