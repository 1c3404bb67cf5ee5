//! The proxy-wasm ABI host on wasmtime. Wasmtime types never leave this crate.
