//! The native test kit: unit-test a filter with plain `cargo test`, no wasm, no
//! proxy.
//!
//! [`TestHost`] is a simulated proxy-wasm host running one VM with one plugin of
//! your root type. It drives the SDK's real dispatcher through the real lifecycle
//! (context create, `on_vm_start`, `on_configure`, request headers, body chunks,
//! trailers, response, `on_log`, `on_done`, `on_delete`) and behaves like Envoy
//! where hosts differ: maps and bodies are only available in their callbacks,
//! stream actions take effect after the callback returns, a local response goes
//! through the filter's own response callbacks.
//!
//! ```
//! use serde::Deserialize;
//! use sluice_sdk::testing::{TestHost, TestResponse};
//! use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext};
//!
//! #[derive(Default)]
//! struct AddHeader { value: String }
//!
//! #[derive(Deserialize)]
//! struct Config { value: String }
//!
//! impl RootContext for AddHeader {
//!     type Config = Config;
//!     type Http = Tagger;
//!     fn on_configure(&mut self, _: &mut Root, c: Config) -> Result<(), Error> {
//!         self.value = c.value;
//!         Ok(())
//!     }
//!     fn new_http(&mut self, _: &mut Root) -> Tagger {
//!         Tagger(self.value.clone())
//!     }
//! }
//!
//! struct Tagger(String);
//!
//! impl HttpContext for Tagger {
//!     fn on_response_headers(&mut self, http: &mut Http, _eos: bool) -> Result<Action, Error> {
//!         http.response().set_header("x-tag", &self.0)?;
//!         Ok(Action::Continue)
//!     }
//! }
//!
//! let host = TestHost::new::<AddHeader>().config(serde_json::json!({"value": "v1"})).unwrap();
//! let r = host.request().path("/").upstream(TestResponse::new(204)).send();
//! assert_eq!(r.response().status(), Some(204));
//! assert_eq!(r.response().header("x-tag"), Some("v1"));
//! ```
//!
//! Available off `wasm32` with the `testing` feature (on by default).

mod driver;
mod state;
mod types;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use sluice_abi::LogLevel;

pub use self::types::{GrpcCallout, GrpcReply, HttpCallout, LocalResponse, LogEntry, Message, TestResponse};

use self::driver::Inner;
use self::state::{Activity, HostState, SharedStore, Stage, StreamState};
use crate::RootContext;
use crate::dispatch::{self, ErasedRoot, Guest, RootFactory};

static NEXT_HOST: AtomicU64 = AtomicU64::new(1);

fn value_bytes(value: &serde_json::Value) -> Vec<u8> {
    match value {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

fn path_bytes(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

fn render_logs(logs: &[LogEntry]) -> String {
    if logs.is_empty() {
        return "(no log lines)".into();
    }
    logs.iter().map(|l| format!("\n  [{:?}] {}", l.level, l.message)).collect()
}

/// The plugin did not start: `on_vm_start` or `on_configure` returned false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// The callback that refused (`on_vm_start` or `on_configure`).
    pub callback: &'static str,
    /// Everything the filter logged, which names the reason.
    pub logs: Vec<LogEntry>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} returned false; filter log:{}", self.callback, render_logs(&self.logs))
    }
}

impl std::error::Error for StartError {}

/// Configures a [`TestHost`] before the plugin starts.
pub struct TestHostBuilder {
    factory: RootFactory,
    vm_config: Vec<u8>,
    properties: Vec<(Vec<u8>, Vec<u8>)>,
    vm_id: String,
    log_level: LogLevel,
    shared: Option<Rc<RefCell<SharedStore>>>,
    foreign: Vec<(String, state::ForeignFn)>,
    now: Option<SystemTime>,
}

impl fmt::Debug for TestHostBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHostBuilder").field("vm_id", &self.vm_id).finish_non_exhaustive()
    }
}

impl TestHostBuilder {
    /// VM configuration for `on_vm_start` (a JSON string is passed as its raw bytes).
    pub fn vm_config(mut self, value: serde_json::Value) -> Self {
        self.vm_config = value_bytes(&value);
        self
    }

    /// The `plugin_name` property (default `test-plugin`).
    pub fn plugin_name(self, name: &str) -> Self {
        self.property(&["plugin_name"], name)
    }

    /// The VM id (shared queues are per VM id; default empty).
    pub fn vm_id(mut self, id: &str) -> Self {
        self.vm_id = id.into();
        self
    }

    /// A host-wide property, raw bytes (`xds.cluster_name`, `node`...). Requests can
    /// override it.
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties.push((path_bytes(path), value.into()));
        self
    }

    /// Drops guest log lines below `level` (default: keep all).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Shares shared data and queues with `other` (as VMs of one proxy do).
    pub fn share_with(mut self, other: &TestHost) -> Self {
        self.shared = Some(other.inner.host.borrow().shared.clone());
        self
    }

    /// Answers `proxy_call_foreign_function(name, ...)` with `f` (an `Err` is a raw
    /// status).
    pub fn foreign_function(
        mut self,
        name: &str,
        f: impl FnMut(&[u8]) -> Result<Vec<u8>, u32> + 'static,
    ) -> Self {
        self.foreign.push((name.into(), Box::new(f)));
        self
    }

    /// Sets the host clock's start.
    pub fn now(mut self, now: SystemTime) -> Self {
        self.now = Some(now);
        self
    }

    /// Starts the plugin with this JSON configuration (a JSON string is passed as
    /// its raw bytes, `null` as no configuration).
    pub fn config(self, value: serde_json::Value) -> Result<TestHost, StartError> {
        let bytes = value_bytes(&value);
        self.config_bytes(bytes)
    }

    /// Starts the plugin with raw configuration bytes.
    pub fn config_bytes(self, bytes: impl Into<Vec<u8>>) -> Result<TestHost, StartError> {
        let host_id = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.unwrap_or_default();
        let mut state = HostState::new(host_id, shared);
        state.vm_id = self.vm_id;
        state.log_level = self.log_level;
        state.vm_config = self.vm_config;
        state.plugin_config = bytes.into();
        state.properties.insert(path_bytes(&["plugin_name"]), b"test-plugin".to_vec());
        state.properties.insert(path_bytes(&["plugin_root_id"]), Vec::new());
        state.properties.insert(path_bytes(&["plugin_vm_id"]), state.vm_id.clone().into_bytes());
        state.properties.extend(self.properties);
        state.foreign.extend(self.foreign);
        if let Some(now) = self.now {
            state.now_nanos = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        }
        let root = state.root_id;
        let inner = Rc::new(Inner {
            host: Rc::new(RefCell::new(state)),
            guest: RefCell::new(Guest::new(self.factory)),
            root,
            next_context: Cell::new(root + 1),
        });
        let host = TestHost { inner };
        host.inner.invoke(root, Activity::Root, || dispatch::on_context_create(root, 0));
        let vm_len = host.inner.host.borrow().vm_config.len();
        if !host.inner.invoke(root, Activity::VmStart, || dispatch::on_vm_start(root, vm_len)) {
            return Err(StartError { callback: "on_vm_start", logs: host.logs() });
        }
        host.configure_current()?;
        Ok(host)
    }

    /// Starts the plugin without configuration.
    pub fn start(self) -> Result<TestHost, StartError> {
        self.config_bytes(Vec::new())
    }
}

/// A simulated host running one plugin. Cheap to make: use one per test.
pub struct TestHost {
    inner: Rc<Inner>,
}

impl fmt::Debug for TestHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHost").field("root", &self.inner.root).finish_non_exhaustive()
    }
}

impl TestHost {
    /// A host for root type `R` (made with `R::default()`); finish with
    /// [`config`](TestHostBuilder::config) or [`start`](TestHostBuilder::start).
    #[allow(clippy::new_ret_no_self)]
    pub fn new<R: RootContext + Default>() -> TestHostBuilder {
        TestHost::with_factory(R::default)
    }

    /// A host whose root is made by `factory`.
    pub fn with_factory<R: RootContext>(factory: impl Fn() -> R + 'static) -> TestHostBuilder {
        let factory: RootFactory = Rc::new(move || Box::new(factory()) as Box<dyn ErasedRoot>);
        TestHostBuilder {
            factory,
            vm_config: Vec::new(),
            properties: Vec::new(),
            vm_id: String::new(),
            log_level: LogLevel::Trace,
            shared: None,
            foreign: Vec::new(),
            now: None,
        }
    }

    fn configure_current(&self) -> Result<(), StartError> {
        let root = self.inner.root;
        let len = self.inner.host.borrow().plugin_config.len();
        let ok = self.inner.invoke(root, Activity::Configure, || dispatch::on_configure(root, len));
        self.inner.pump();
        if ok { Ok(()) } else { Err(StartError { callback: "on_configure", logs: self.logs() }) }
    }

    /// Pushes a new configuration (`on_configure` again), as a config update does.
    pub fn reconfigure(&self, value: serde_json::Value) -> Result<(), StartError> {
        self.inner.host.borrow_mut().plugin_config = value_bytes(&value);
        self.configure_current()
    }

    /// The root context id.
    pub fn root_id(&self) -> u32 {
        self.inner.root
    }

    /// Starts building a request (GET `/` to `example.com` over http by default).
    pub fn request(&self) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.clone(),
            method: "GET".into(),
            path: "/".into(),
            authority: "example.com".into(),
            scheme: "http".into(),
            headers: Vec::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
            upstream: TestResponse::default(),
            properties: Vec::new(),
        }
    }

    // === time ===

    /// The host clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.inner.host.borrow().now_nanos)
    }

    /// The tick period the plugin set, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        self.inner.host.borrow().tick_period
    }

    /// Calls `on_tick` now (whatever the period).
    pub fn tick(&self) {
        let root = self.inner.root;
        self.inner.invoke(root, Activity::Root, || dispatch::on_tick(root));
        self.inner.pump();
    }

    /// Moves the clock forward by `by`, calling `on_tick` at every period boundary
    /// passed. Returns how many ticks fired.
    pub fn advance(&self, by: Duration) -> usize {
        let target = self.inner.host.borrow().now_nanos.saturating_add(by.as_nanos() as u64);
        let mut fired = 0;
        loop {
            let due = {
                let mut h = self.inner.host.borrow_mut();
                match h.tick_period {
                    Some(p) if h.next_tick_nanos <= target => {
                        h.now_nanos = h.next_tick_nanos;
                        h.next_tick_nanos += p.as_nanos() as u64;
                        true
                    }
                    _ => false,
                }
            };
            if !due {
                break;
            }
            fired += 1;
            self.tick();
        }
        self.inner.host.borrow_mut().now_nanos = target;
        fired
    }

    // === callouts ===

    /// HTTP callouts waiting for an answer, oldest first.
    pub fn http_calls(&self) -> Vec<HttpCallout> {
        self.inner.host.borrow().http_calls.values().cloned().collect()
    }

    /// gRPC callouts waiting for an answer, oldest first.
    pub fn grpc_calls(&self) -> Vec<GrpcCallout> {
        self.inner.host.borrow().grpc_calls.values().cloned().collect()
    }

    /// Answers HTTP callout `token` with `response`; panics if there is no such
    /// pending callout.
    pub fn answer_http_call(&self, token: u32, response: TestResponse) {
        self.deliver_http(token, Some(response));
    }

    /// Fails HTTP callout `token` (timeout/reset: the filter sees no headers).
    pub fn fail_http_call(&self, token: u32) {
        self.deliver_http(token, None);
    }

    fn deliver_http(&self, token: u32, response: Option<TestResponse>) {
        let call = self.inner.host.borrow_mut().http_calls.remove(&token);
        if call.is_none() {
            panic!("test host: no pending HTTP callout with token {token}; pending: {:?}", self.http_calls());
        }
        let (nh, bs, nt) = match &response {
            Some(r) => (r.head().len(), r.joined_body().len(), r.trailers.len()),
            None => (0, 0, 0),
        };
        if response.is_none() {
            self.inner.host.borrow_mut().call_status =
                (sluice_abi::Status::BrokenConnection.as_u32(), "reset".into());
        }
        let root = self.inner.root;
        self.inner.invoke(root, Activity::HttpCallResponse { token, response }, || {
            dispatch::on_http_call_response(root, token, nh, bs, nt)
        });
        self.inner.pump();
    }

    /// Answers gRPC callout `token`; panics if there is no such pending callout.
    pub fn answer_grpc_call(&self, token: u32, reply: GrpcReply) {
        let call = self.inner.host.borrow_mut().grpc_calls.remove(&token);
        if call.is_none() {
            panic!("test host: no pending gRPC callout with token {token}; pending: {:?}", self.grpc_calls());
        }
        let root = self.inner.root;
        match reply {
            GrpcReply::Ok(message) => {
                let len = message.len();
                self.inner.invoke(root, Activity::GrpcReceive { message }, || {
                    dispatch::on_grpc_receive(root, token, len)
                });
            }
            GrpcReply::Err(status, message) => {
                self.inner.host.borrow_mut().call_status = (status.as_u32(), message);
                self.inner.invoke(root, Activity::GrpcClose, || {
                    dispatch::on_grpc_close(root, token, status.as_u32())
                });
            }
        }
        self.inner.pump();
    }

    // === observations ===

    /// Every log line so far (guest lines, and the test host's own prefixed
    /// `[test host]`).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.inner.host.borrow().logs.clone()
    }

    /// True if some log line at `level` or above contains `needle`.
    pub fn logged(&self, level: LogLevel, needle: &str) -> bool {
        self.inner
            .host
            .borrow()
            .logs
            .iter()
            .any(|l| l.level.as_u32() >= level.as_u32() && l.message.contains(needle))
    }

    /// Forgets the log lines so far.
    pub fn clear_logs(&self) {
        self.inner.host.borrow_mut().logs.clear();
    }

    /// The value of counter or gauge `name`, if defined.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.inner.host.borrow().metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    /// The observations of histogram `name` (empty if undefined).
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        let h = self.inner.host.borrow();
        h.metrics.iter().find(|m| m.name == name).map(|m| m.records.clone()).unwrap_or_default()
    }

    /// A shared-data value, if set.
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        let h = self.inner.host.borrow();
        let store = h.shared.borrow();
        store.data.get(key.as_bytes()).map(|(v, _)| v.clone())
    }

    /// A shared-data value decoded from JSON (as [`crate::shared::Shared`] stores it).
    pub fn shared_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.shared_data(key).and_then(|v| serde_json::from_slice(&v).ok())
    }

    /// Sets a shared-data value, as another VM would.
    pub fn set_shared_data(&self, key: &str, value: impl Into<Vec<u8>>) {
        let h = self.inner.host.borrow();
        let mut store = h.shared.borrow_mut();
        store.next_cas = store.next_cas.wrapping_add(1).max(1);
        let cas = store.next_cas;
        store.data.insert(key.as_bytes().to_vec(), (value.into(), cas));
    }

    /// Items waiting in this VM's queue `name`.
    pub fn queue_items(&self, name: &str) -> Vec<Vec<u8>> {
        let h = self.inner.host.borrow();
        let store = h.shared.borrow();
        store
            .queues
            .iter()
            .find(|q| q.vm_id == h.vm_id && q.name == name)
            .map(|q| q.items.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Enqueues an item on this VM's queue `name` as another VM would, and delivers
    /// `on_queue_ready` to the root that registered it. Panics if nobody registered
    /// the queue.
    pub fn enqueue(&self, name: &str, item: impl Into<Vec<u8>>) {
        {
            let h = self.inner.host.borrow();
            let mut store = h.shared.borrow_mut();
            let Some(index) = store.queues.iter().position(|q| q.vm_id == h.vm_id && q.name == name) else {
                panic!("test host: no queue {name:?} registered in this VM");
            };
            store.queues[index].items.push_back(item.into());
            let owner = store.queues[index].owner;
            store.ready.push((owner, index as u32 + 1));
        }
        self.inner.pump();
    }

    /// Sets a host-wide property.
    pub fn set_property(&self, path: &[&str], value: impl Into<Vec<u8>>) {
        self.inner.host.borrow_mut().properties.insert(path_bytes(path), value.into());
    }

    /// Calls the plugin's `on_foreign_function(function_id, args)`.
    pub fn call_foreign_function(&self, function_id: u32, args: &[u8]) {
        let root = self.inner.root;
        let len = args.len();
        self.inner.invoke(root, Activity::Foreign { args: args.to_vec() }, || {
            dispatch::on_foreign_function(root, function_id, len)
        });
        self.inner.pump();
    }

    /// Opens a TCP connection through the plugin (its root must make
    /// [`Child::Stream`](crate::Child::Stream) contexts): context creation, then
    /// `on_new_connection`.
    pub fn connection(&self) -> Connection {
        let id = self.inner.next_context.get();
        self.inner.next_context.set(id + 1);
        self.inner.host.borrow_mut().streams.insert(id, StreamState::default());
        let root = self.inner.root;
        self.inner.invoke(id, Activity::Root, || dispatch::on_context_create(id, root));
        let action = self.inner.invoke(id, Activity::Root, || dispatch::on_new_connection(id));
        self.inner.pump();
        Connection { inner: self.inner.clone(), context: id, accepted: action == 0 }
    }

    /// True once the plugin called `proxy_done`.
    pub fn done_called(&self) -> bool {
        self.inner.host.borrow().done_called
    }

    /// Shuts the plugin down (`on_done`, then `on_delete` if it agreed). Returns
    /// `on_done`'s answer.
    pub fn shutdown(&self) -> bool {
        let root = self.inner.root;
        let done = self.inner.invoke(root, Activity::Root, || dispatch::on_done(root));
        if done {
            self.inner.invoke(root, Activity::Root, || dispatch::on_delete(root));
        }
        done
    }
}

/// Builds one request; [`send`](RequestBuilder::send) runs it through the filter.
pub struct RequestBuilder {
    inner: Rc<Inner>,
    method: String,
    path: String,
    authority: String,
    scheme: String,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
    trailers: Vec<(String, String)>,
    upstream: TestResponse,
    properties: Vec<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RequestBuilder {
    /// `:method`.
    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }

    /// `:path` (query included).
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }

    /// `:authority`.
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = authority.into();
        self
    }

    /// `:scheme`.
    pub fn scheme(mut self, scheme: &str) -> Self {
        self.scheme = scheme.into();
        self
    }

    /// Adds a header (names are lowercased, as hosts do).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the body (one chunk).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        let body = body.into();
        self.chunks = if body.is_empty() { Vec::new() } else { vec![body] };
        self
    }

    /// Sets the body as several chunks (each one an `on_request_body` call).
    pub fn chunks<I, B>(mut self, chunks: I) -> Self
    where
        I: IntoIterator<Item = B>,
        B: Into<Vec<u8>>,
    {
        self.chunks = chunks.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// What the simulated upstream answers (default: 200, no body).
    pub fn upstream(mut self, response: TestResponse) -> Self {
        self.upstream = response;
        self
    }

    /// A property of this request, raw bytes.
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties.push((path_bytes(path), value.into()));
        self
    }

    /// An integer property of this request (8-byte LE, as Envoy encodes them).
    pub fn property_i64(self, path: &[&str], value: i64) -> Self {
        self.property(path, value.to_le_bytes().to_vec())
    }

    /// `source.address` (`ip:port`) and `source.port`.
    pub fn source_address(self, address: &str) -> Self {
        let port = address.rsplit_once(':').and_then(|(_, p)| p.parse::<i64>().ok());
        let this = self.property(&["source", "address"], address);
        match port {
            Some(p) => this.property_i64(&["source", "port"], p),
            None => this,
        }
    }

    /// The downstream peer's certificate URI SAN (`connection.uri_san_peer_certificate`)
    /// and `connection.mtls = true`.
    pub fn peer_identity(self, uri: &str) -> Self {
        self.property(&["connection", "uri_san_peer_certificate"], uri)
            .property(&["connection", "mtls"], vec![1])
    }

    /// Runs the request through the filter as far as it goes: to the end, or to a
    /// pause (waiting for a callout or timer).
    pub fn send(self) -> Exchange {
        let mut headers = vec![
            (":method".to_string(), self.method),
            (":scheme".to_string(), self.scheme),
            (":authority".to_string(), self.authority),
            (":path".to_string(), self.path),
        ];
        headers.extend(self.headers);
        let state = StreamState {
            req_headers: headers,
            req_chunks: self.chunks,
            req_trailers: self.trailers,
            upstream: self.upstream,
            stage: Some(Stage::RequestHeaders),
            properties: self.properties.into_iter().collect(),
            ..StreamState::default()
        };
        let context = self.inner.start_stream(state);
        Exchange { inner: self.inner, context }
    }
}

/// A request sent through the filter: what reached the upstream, what the client
/// got, and the callouts it waits for.
pub struct Exchange {
    inner: Rc<Inner>,
    context: u32,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange").field("context", &self.context).finish_non_exhaustive()
    }
}

impl Exchange {
    fn read<T>(&self, f: impl FnOnce(&StreamState) -> T) -> T {
        let h = self.inner.host.borrow();
        match h.streams.get(&self.context) {
            Some(s) => f(s),
            None => panic!("test host: no stream {}", self.context),
        }
    }

    fn logs(&self) -> String {
        render_logs(&self.inner.host.borrow().logs)
    }

    fn describe(&self) -> String {
        self.read(|s| match (s.stage, s.blocked) {
            (_, Some(b)) => format!("paused in {b:?}"),
            (Some(Stage::Done), _) if s.reset => "reset".into(),
            (Some(Stage::Done), _) => "complete".into(),
            (stage, None) => format!("at {stage:?}"),
        })
    }

    /// The HTTP context id.
    pub fn context_id(&self) -> u32 {
        self.context
    }

    /// The local response the filter sent; panics (showing the filter's log) if it
    /// sent none.
    pub fn local_response(&self) -> LocalResponse {
        match self.try_local_response() {
            Some(l) => l,
            None => {
                panic!("the filter sent no local response (request {}); log:{}", self.describe(), self.logs())
            }
        }
    }

    /// The local response the filter sent, if any.
    pub fn try_local_response(&self) -> Option<LocalResponse> {
        self.read(|s| s.local.clone())
    }

    /// The request as it reached the upstream; panics if it did not.
    pub fn upstream_request(&self) -> Message {
        match self.try_upstream_request() {
            Some(m) => m,
            None => {
                panic!("the request did not reach the upstream ({}); log:{}", self.describe(), self.logs())
            }
        }
    }

    /// The request as it reached the upstream, if it did.
    pub fn try_upstream_request(&self) -> Option<Message> {
        self.read(|s| s.upstream_request.clone())
    }

    /// The response the client got (the upstream's, or the local response, after
    /// the filter's response callbacks); panics if the exchange is not complete.
    pub fn response(&self) -> Message {
        match self.read(|s| s.downstream.clone()) {
            Some(m) => m,
            None => panic!("no response went downstream ({}); log:{}", self.describe(), self.logs()),
        }
    }

    /// True while the filter holds the request or response (waiting for a callout,
    /// a timer...).
    pub fn is_paused(&self) -> bool {
        self.read(|s| s.blocked.is_some())
    }

    /// True once the context was deleted (`on_log`, `on_done`, `on_delete` ran).
    pub fn is_complete(&self) -> bool {
        self.read(|s| s.deleted)
    }

    /// True if the filter reset the stream.
    pub fn was_reset(&self) -> bool {
        self.read(|s| s.reset)
    }

    /// The one HTTP callout this request is waiting for; panics unless there is
    /// exactly one.
    pub fn http_call(&self) -> HttpCallout {
        let calls: Vec<_> = self
            .inner
            .host
            .borrow()
            .http_calls
            .values()
            .filter(|c| c.context_id == self.context)
            .cloned()
            .collect();
        match <[HttpCallout; 1]>::try_from(calls) {
            Ok([c]) => c,
            Err(calls) => {
                panic!("expected one pending HTTP callout from request {}, found {calls:?}", self.context)
            }
        }
    }

    /// Answers this request's one pending HTTP callout.
    pub fn answer_http_call(&self, response: TestResponse) {
        let token = self.http_call().token;
        TestHost { inner: self.inner.clone() }.answer_http_call(token, response);
    }

    /// Fails this request's one pending HTTP callout.
    pub fn fail_http_call(&self) {
        let token = self.http_call().token;
        TestHost { inner: self.inner.clone() }.fail_http_call(token);
    }

    /// The one gRPC callout this request is waiting for; panics unless there is
    /// exactly one.
    pub fn grpc_call(&self) -> GrpcCallout {
        let calls: Vec<_> = self
            .inner
            .host
            .borrow()
            .grpc_calls
            .values()
            .filter(|c| c.context_id == self.context)
            .cloned()
            .collect();
        match <[GrpcCallout; 1]>::try_from(calls) {
            Ok([c]) => c,
            Err(calls) => {
                panic!("expected one pending gRPC callout from request {}, found {calls:?}", self.context)
            }
        }
    }

    /// Answers this request's one pending gRPC callout.
    pub fn answer_grpc_call(&self, reply: GrpcReply) {
        let token = self.grpc_call().token;
        TestHost { inner: self.inner.clone() }.answer_grpc_call(token, reply);
    }
}

/// A simulated TCP connection (see [`TestHost::connection`]).
pub struct Connection {
    inner: Rc<Inner>,
    context: u32,
    accepted: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("context", &self.context).finish_non_exhaustive()
    }
}

impl Connection {
    /// True if `on_new_connection` continued.
    pub fn accepted(&self) -> bool {
        self.accepted
    }

    /// Delivers downstream bytes; returns true if the filter let the buffer through
    /// (it then counts as sent upstream and the buffer empties).
    pub fn downstream(&self, data: &[u8], end_of_stream: bool) -> bool {
        let ctx = self.context;
        let size = self.inner.with_stream(ctx, |s| {
            s.req_buffer.extend_from_slice(data);
            s.req_buffer.len()
        });
        let action =
            self.inner.invoke(ctx, Activity::Root, || dispatch::on_downstream_data(ctx, size, end_of_stream));
        if action == 0 {
            self.inner.with_stream(ctx, |s| s.req_forwarded.append(&mut s.req_buffer));
        }
        self.inner.pump();
        action == 0
    }

    /// Delivers upstream bytes; returns true if the filter let the buffer through.
    pub fn upstream(&self, data: &[u8], end_of_stream: bool) -> bool {
        let ctx = self.context;
        let size = self.inner.with_stream(ctx, |s| {
            s.resp_buffer.extend_from_slice(data);
            s.resp_buffer.len()
        });
        let action =
            self.inner.invoke(ctx, Activity::Root, || dispatch::on_upstream_data(ctx, size, end_of_stream));
        if action == 0 {
            self.inner.with_stream(ctx, |s| s.resp_forwarded.append(&mut s.resp_buffer));
        }
        self.inner.pump();
        action == 0
    }

    /// Bytes forwarded upstream so far.
    pub fn sent_upstream(&self) -> Vec<u8> {
        self.inner.with_stream(self.context, |s| s.req_forwarded.clone())
    }

    /// Bytes forwarded downstream so far.
    pub fn sent_downstream(&self) -> Vec<u8> {
        self.inner.with_stream(self.context, |s| s.resp_forwarded.clone())
    }

    /// True if the filter closed the connection.
    pub fn was_closed(&self) -> bool {
        self.inner.with_stream(self.context, |s| s.reset)
    }

    /// Closes both sides (remote peer), then `on_log`, `on_done`, `on_delete`.
    pub fn close(&self) {
        let ctx = self.context;
        if self.inner.with_stream(ctx, |s| s.deleted) {
            return;
        }
        let remote = sluice_abi::PeerType::Remote.as_u32();
        self.inner.invoke(ctx, Activity::Root, || dispatch::on_downstream_connection_close(ctx, remote));
        self.inner.invoke(ctx, Activity::Root, || dispatch::on_upstream_connection_close(ctx, remote));
        self.inner.with_stream(ctx, |s| s.stage = Some(Stage::Log));
        self.inner.run(ctx);
    }
}
