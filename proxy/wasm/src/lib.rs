//! `sluice-wasm` is Sluice's proxy-wasm ABI host (v0.2.1 and v0.2.0, plus v0.1.0
//! modules) on wasmtime. It implements the filter seam of `sluice-filter`
//! ([`FilterLoader`], [`FilterFactory`], [`HttpFilter`]) for proxy-wasm modules; it
//! is not a data plane (it never touches sockets except through the
//! [`CalloutClient`] it is given) and wasmtime types never leave it.
//!
//! # Execution model
//!
//! * **One [`WasmHost`] per process**: one wasmtime `Engine` (epoch interruption
//!   on, pooling allocator with copy-on-write memory images), one epoch ticker
//!   thread, one `Linker` filled once with every proxy-wasm import and a WASI
//!   preview1 subset implemented here, and a module cache keyed by the sha256 of
//!   the module bytes (in memory, and on disk through wasmtime's compilation cache
//!   when [`HostOptions::cache_dir`] is set, so a restart does not recompile).
//! * **[`FilterLoader::load`]** runs off the request path: it reads the module (a
//!   file, or `sha256:<hex>` through a [`ModuleStore`], digest verified), admits it
//!   (size cap, ABI version marker, allowed imports, export signatures), compiles it
//!   once per digest into an `InstancePre`, and instantiates and configures one VM
//!   eagerly so that a bad module or config is rejected before the config switches.
//! * **One VM per worker thread per filter**: the factory keeps a
//!   `ThreadLocal<RefCell<WorkerSlot>>`; a VM is a `Store` + instance + root
//!   context, built on each worker when a config naming the filter is applied
//!   ([`FilterFactory::prepare_worker`], before the switch) or on a later request
//!   after a failure (`_initialize`, `proxy_on_context_create(root, 0)`,
//!   `proxy_on_vm_start`, `proxy_on_configure`).
//!   The VMs are freed when the factory is dropped (hot swap).
//! * **One HTTP context per request inside the worker's VM**: no `Store` is made per
//!   request. Request and response heads, bodies and trailers are moved (not
//!   copied) into the context for the duration of a callback, and stay there while
//!   the filter is paused in it, so that a later callback (an HTTP callout
//!   response, a tick) can still edit them before `proxy_continue_stream`.
//! * **No re-entrancy**: the host never calls into the guest from inside a host
//!   call (the guest allocator excepted). `proxy_continue_stream`,
//!   `proxy_send_local_response`, callouts, timers and queue notifications are
//!   recorded and applied after the callback returns; callout responses, ticks and
//!   queue notifications are delivered by `spawn_local` tasks on the worker.
//! * **Sandbox**: a memory cap per VM, an epoch deadline per callback, wasm stack
//!   overflow as a trap, hostile pointers answered with `INVALID_MEMORY_ACCESS`.
//!   A trap discards the VM (it is never reused) and applies the filter's
//!   [`FailPolicy`](sluice_config::FailPolicy): `closed` fails the request,
//!   `open` skips the filter, `reload` fails the request and builds a fresh VM for
//!   the next ones with exponential backoff and a crash-loop cap.
//!
//! See `docs/wasm-host.md` for the knobs, metrics and deviations from Envoy.

mod callout;
mod contexts;
mod factory;
mod filter;
mod fuse;
mod headers;
mod host;
mod hostcalls;
mod memory;
mod metrics;
mod module;
mod phase;
mod properties;
mod shared;
mod state;
mod vm;
mod wasi;
mod xds;

pub use host::{HostError, HostOptions, ModuleStore, WasmHost};
pub use module::AbiVersion;

#[doc(no_inline)]
pub use sluice_filter::{CalloutClient, FilterFactory, FilterLoader, HttpFilter};
