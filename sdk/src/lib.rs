//! The Sluice guest SDK: write proxy-wasm (ABI v0.2.1) filters in plain, safe Rust,
//! and unit-test them natively with `sluice_sdk::testing`. The same `.wasm` runs on Sluice and
//! on Envoy. This crate is not the host (that is `sluice-wasm`) and holds no
//! ready-made filters.
//!
//! # Shape
//!
//! A filter is a **root** type implementing [`RootContext`] (typed configuration,
//! shared state, timers; one per plugin) and a **per-request** type implementing
//! [`HttpContext`], registered with [`filter!`]. Callbacks are named `on_*` and have
//! defaults that let traffic through; host services are reached through the handle
//! each callback gets ([`Root`], [`Http`]) and the modules [`shared`], [`metrics`],
//! [`properties`], [`host`] and the logging macros ([`info!`] ...).
//!
//! Host calls return `Result`s whose errors say which call failed, with which status
//! and what that means (e.g. "request headers are available in on_request_headers
//! ..."), so `?` works in callbacks. A callback's error goes to
//! [`HttpContext::on_error`], which by default fails closed (500, or a reset once
//! the response started). Only a host that breaks the ABI contract makes the SDK
//! trap.
//!
//! # Example
//!
//! ```
//! use std::rc::Rc;
//!
//! use serde::Deserialize;
//! use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext, metrics::Counter};
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     /// The token clients must send in `x-api-key`.
//!     api_key: String,
//! }
//!
//! #[derive(Default)]
//! struct ApiKeyRoot {
//!     config: Option<Rc<Config>>,
//!     denied: Option<Counter>,
//! }
//!
//! impl RootContext for ApiKeyRoot {
//!     type Config = Config;
//!     type Http = ApiKey;
//!
//!     fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
//!         if config.api_key.is_empty() {
//!             return Err(Error::msg("api_key must not be empty"));
//!         }
//!         self.config = Some(Rc::new(config));
//!         self.denied = Some(Counter::new("api_key_denied")?);
//!         Ok(())
//!     }
//!
//!     fn new_http(&mut self, _root: &mut Root) -> ApiKey {
//!         ApiKey { config: self.config.clone(), denied: self.denied }
//!     }
//! }
//!
//! struct ApiKey {
//!     config: Option<Rc<Config>>,
//!     denied: Option<Counter>,
//! }
//!
//! impl HttpContext for ApiKey {
//!     fn on_request_headers(&mut self, http: &mut Http, _eos: bool) -> Result<Action, Error> {
//!         let Some(config) = &self.config else { return Ok(Action::Continue) };
//!         let key = http.request().header("x-api-key")?;
//!         if key.as_deref() == Some(config.api_key.as_str()) {
//!             http.request().remove_header("x-api-key")?;
//!             return Ok(Action::Continue);
//!         }
//!         if let Some(denied) = self.denied {
//!             denied.inc()?;
//!         }
//!         http.respond(401, &[("www-authenticate", "ApiKey")], "missing or wrong api key\n")?;
//!         Ok(Action::Pause)
//!     }
//! }
//!
//! sluice_sdk::filter!(ApiKeyRoot);
//!
//! // Natively, the test kit runs the same code:
//! # #[cfg(feature = "testing")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sluice_sdk::testing::TestHost;
//!
//! let host = TestHost::new::<ApiKeyRoot>().config(serde_json::json!({"api_key": "s3cret"}))?;
//! let denied = host.request().path("/a").send();
//! assert_eq!(denied.local_response().status, 401);
//! let ok = host.request().header("x-api-key", "s3cret").send();
//! assert_eq!(ok.upstream_request().header("x-api-key"), None);
//! assert_eq!(host.metric("api_key_denied"), Some(1));
//!
//! let rejected = TestHost::new::<ApiKeyRoot>().config(serde_json::json!({"api_key": 7})).unwrap_err();
//! assert!(rejected.to_string().contains("`api_key`"));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip1` (or `wasm32-unknown-unknown`):
//! `cargo build --target wasm32-wasip1 --release`.
//!
//! # Bodies
//!
//! Body callbacks return a [`BodyAction`]: `Continue` forwards what is buffered,
//! `Buffer` keeps the chunk and asks to be called again with everything buffered,
//! `BufferUntilEnd` buffers silently until the last chunk, `Pause` holds the body
//! for a callout. Read and rewrite it with `http.request().body()`.
//!
//! # Callouts
//!
//! [`Http::http_call`] sends a request to a cluster and returns a [`Token`]; pause,
//! and the response arrives at [`HttpContext::on_http_call_response`] of the same
//! request, which returns `Continue` to resume the paused stream or calls
//! [`Http::respond`] to answer. gRPC works the same way ([`Http::grpc_call`]).
//!
//! # Features
//!
//! - `testing` (default): the native test kit `sluice_sdk::testing`. It only exists off
//!   `wasm32`, so wasm builds are unaffected either way.
//!
//! # Targets
//!
//! On `wasm32` the host-call layer calls the proxy-wasm imports of module `env` and
//! the crate exports `proxy_abi_version_0_2_1`, `proxy_on_memory_allocate` (plus
//! `malloc` on `wasm32-unknown-unknown`) and every `proxy_on_*` callback; that glue
//! is the crate's only unsafe code. Elsewhere the same layer talks to the test host.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![deny(unsafe_code)]
// Natively without the test kit nothing drives the dispatcher.
#![cfg_attr(all(not(target_arch = "wasm32"), not(feature = "testing")), allow(dead_code))]

pub mod callout;
pub mod config;
mod context;
mod dispatch;
pub mod error;
pub mod host;
pub mod http;
pub mod log;
pub mod metrics;
pub mod properties;
mod root;
pub mod shared;
mod sys;
mod table;
pub mod tcp;
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub mod testing;

pub use callout::{CalloutResponse, GrpcCall, GrpcResponse, HttpCall, Token};
pub use context::{Action, BodyAction, Child, HttpContext, RootContext, StreamContext};
pub use error::{ConfigError, Error, HostError, Result};
pub use http::{Body, Headers, Http, Message, Phase};
pub use root::Root;
pub use sluice_abi::{GrpcStatus, LogLevel, PeerType, StreamType};
pub use tcp::Tcp;

/// Registers the filter's root type: every plugin (root context) of the module is a
/// fresh value from `factory` (`Default::default` when omitted).
///
/// ```
/// # #[derive(Default)] struct MyRoot;
/// # impl sluice_sdk::RootContext for MyRoot {
/// #     type Config = ();
/// #     type Http = ();
/// #     fn new_http(&mut self, _: &mut sluice_sdk::Root) {}
/// # }
/// sluice_sdk::filter!(MyRoot);
/// // or: sluice_sdk::filter!(MyRoot, || MyRoot::default());
/// ```
///
/// On `wasm32` this defines the module's `_initialize` export; natively it only
/// type-checks (tests use `testing::TestHost` directly).
#[macro_export]
macro_rules! filter {
    ($root:ty) => {
        $crate::filter!($root, <$root as ::core::default::Default>::default);
    };
    ($root:ty, $factory:expr) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn _initialize() {
            $crate::__private::initialize::<$root>($factory);
        }

        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() = || {
            let _: fn() -> $root = $factory;
        };
    };
}

/// Support for [`filter!`]; not public API.
#[doc(hidden)]
pub mod __private {
    use std::rc::Rc;

    use crate::RootContext;
    use crate::dispatch::{self, ErasedRoot};

    /// Runs constructors, installs the panic logger and registers the root factory.
    pub fn initialize<R: RootContext>(factory: fn() -> R) {
        crate::sys::call_ctors();
        #[cfg(target_arch = "wasm32")]
        std::panic::set_hook(Box::new(|info| {
            crate::log::log(crate::LogLevel::Critical, &format!("filter panicked: {info}"));
        }));
        dispatch::set_factory(Rc::new(move || Box::new(factory()) as Box<dyn ErasedRoot>));
    }
}
