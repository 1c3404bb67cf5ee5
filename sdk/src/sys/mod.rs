//! The host-call layer: one safe function per proxy-wasm import, returning raw
//! statuses. On `wasm32` these call the real imports (`ffi`, the only unsafe module);
//! elsewhere they call the native host installed by the test kit (`native`).
//!
//! Callers turn raw statuses into [`HostError`]s with [`fail`], naming the call and
//! its arguments.
// The layer mirrors the whole ABI; a few calls have no public wrapper yet.
#![allow(dead_code)]

use crate::error::HostError;

#[cfg(target_arch = "wasm32")]
mod ffi;
#[cfg(target_arch = "wasm32")]
pub(crate) use ffi::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;

/// Describes a failed host call.
pub(crate) fn fail(call: &'static str, args: impl Into<String>) -> impl FnOnce(u32) -> HostError {
    move |raw| HostError::new(call, args, raw)
}
