//! proxy-wasm ABI constants, defined once for the host and the guest SDK.
#![no_std]
