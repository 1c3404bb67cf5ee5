//! The test kit driving small filters through every part of the SDK: bodies,
//! trailers, errors, timers, shared data, queues, gRPC, properties, TCP.
#![cfg(all(feature = "testing", not(target_arch = "wasm32")))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use sluice_sdk::shared::{Queue, Shared};
use sluice_sdk::testing::{GrpcReply, TestHost, TestResponse};
use sluice_sdk::{
    Action, BodyAction, Child, Error, GrpcCall, GrpcResponse, GrpcStatus, Http, HttpContext, LogLevel, Root,
    RootContext, StreamContext, StreamType, Tcp, Token, properties,
};

// === bodies ===

#[derive(Default, Deserialize)]
#[serde(default)]
struct BodyConfig {
    /// Buffer the whole request body and upper-case it.
    upper_request: bool,
    /// Redact "secret" from the response body, chunk by chunk with `Buffer`.
    redact: bool,
}

#[derive(Default)]
struct BodyRoot {
    upper: bool,
    redact: bool,
}

impl RootContext for BodyRoot {
    type Config = BodyConfig;
    type Http = BodyFilter;
    fn on_configure(&mut self, _: &mut Root, c: BodyConfig) -> Result<(), Error> {
        self.upper = c.upper_request;
        self.redact = c.redact;
        Ok(())
    }
    fn new_http(&mut self, _: &mut Root) -> BodyFilter {
        BodyFilter { upper: self.upper, redact: self.redact, calls: 0 }
    }
}

struct BodyFilter {
    upper: bool,
    redact: bool,
    calls: usize,
}

impl HttpContext for BodyFilter {
    fn on_request_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        if self.upper {
            http.request().remove_header("content-length")?;
        }
        Ok(Action::Continue)
    }

    fn on_request_body(&mut self, http: &mut Http, size: usize, eos: bool) -> Result<BodyAction, Error> {
        self.calls += 1;
        if !self.upper {
            return Ok(BodyAction::Continue);
        }
        if !eos {
            return Ok(BodyAction::BufferUntilEnd);
        }
        let body = http.request().body();
        assert_eq!(body.len(), size);
        let text = body.read_text()?;
        body.replace(text.to_uppercase())?;
        http.request().body().append(format!("|calls={}", self.calls))?;
        Ok(BodyAction::Continue)
    }

    fn on_request_trailers(&mut self, http: &mut Http) -> Result<Action, Error> {
        let checksum = http.request().trailers().get("x-checksum")?;
        http.request().trailers().set("x-seen", checksum.as_deref().unwrap_or("none"))?;
        Ok(Action::Continue)
    }

    fn on_response_body(&mut self, http: &mut Http, _: usize, eos: bool) -> Result<BodyAction, Error> {
        if !self.redact {
            return Ok(BodyAction::Continue);
        }
        if !eos {
            return Ok(BodyAction::Buffer);
        }
        let body = http.response().body();
        let text = body.read_text()?;
        if text.contains("secret") {
            body.replace(text.replace("secret", "******"))?;
        }
        Ok(BodyAction::Continue)
    }
}

#[test]
fn buffer_until_end_calls_the_filter_once_with_the_whole_body() {
    let host = TestHost::new::<BodyRoot>().config(json!({"upper_request": true})).unwrap();
    let r = host
        .request()
        .method("POST")
        .header("content-length", "11")
        .chunks(["hello", " ", "world"])
        .trailer("x-checksum", "abc")
        .send();
    let up = r.upstream_request();
    assert_eq!(up.body_text(), "HELLO WORLD|calls=2");
    assert_eq!(up.header("content-length"), None);
    assert_eq!(up.trailer("x-seen"), Some("abc"));
}

#[test]
fn buffer_rewrites_the_response_body_at_the_end() {
    let host = TestHost::new::<BodyRoot>().config(json!({"redact": true})).unwrap();
    let r = host.request().upstream(TestResponse::new(200).chunks(["the sec", "ret is ", "out"])).send();
    assert_eq!(r.response().body_text(), "the ****** is out");
    // Without buffering each chunk is forwarded as it comes.
    let host = TestHost::new::<BodyRoot>().start().unwrap();
    let r = host.request().body("x").upstream(TestResponse::new(200).chunks(["a", "b"])).send();
    assert_eq!(r.response().body_text(), "ab");
    assert_eq!(r.upstream_request().body_text(), "x");
}

// === errors ===

#[derive(Default)]
struct Misuse;

impl RootContext for Misuse {
    type Config = ();
    type Http = MisuseHttp;
    fn new_http(&mut self, _: &mut Root) -> MisuseHttp {
        MisuseHttp
    }
}

struct MisuseHttp;

impl HttpContext for MisuseHttp {
    fn on_request_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        if http.request().path()?.as_deref() == Some("/open") {
            http.request().set_header("x-open", "1")?;
        }
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        // Request headers are gone by now (Envoy: empty map, writes rejected).
        assert_eq!(http.request().header(":path")?, None);
        http.request().set_header("x-late", "1")?;
        Ok(Action::Continue)
    }

    fn on_error(&mut self, http: &mut Http, error: Error) -> Action {
        if http.request().header("x-fail-open").ok().flatten().is_some() {
            return Action::Continue;
        }
        http.fail_closed(&error)
    }
}

#[test]
fn host_errors_are_descriptive_and_fail_closed_by_default() {
    let host = TestHost::new::<Misuse>().start().unwrap();
    let r = host.request().path("/x").send();
    assert!(r.try_upstream_request().is_some());
    assert_eq!(r.local_response().status, 500);
    assert_eq!(r.response().status(), Some(500));
    let logs: Vec<String> =
        host.logs().into_iter().filter(|l| l.level == LogLevel::Error).map(|l| l.message).collect();
    let line = logs.iter().find(|l| l.contains("on_response_headers failed")).expect("error logged");
    assert!(line.contains("proxy_replace_header_map_value(request headers, \"x-late\")"), "{line}");
    assert!(line.contains("BAD_ARGUMENT (2)"), "{line}");
    assert!(line.contains("request headers are available in on_request_headers"), "{line}");
}

// === callbacks left to their default ===

/// Keeps every default: after the first request the dispatcher answers each
/// callback itself.
#[derive(Default)]
struct PassRoot;

impl RootContext for PassRoot {
    type Config = ();
    type Http = ();
    fn new_http(&mut self, _: &mut Root) {}
}

#[test]
fn a_filter_keeping_every_default_passes_every_request_through_unchanged() {
    let host = TestHost::new::<PassRoot>().start().unwrap();
    for i in 0..3 {
        let body = format!("request {i}");
        let r = host
            .request()
            .method("POST")
            .chunks([&body[..4], &body[4..]])
            .trailer("x-sum", "1")
            .upstream(
                TestResponse::new(200).header("x-n", &i.to_string()).chunks(["a", "b"]).trailer("x-t", "2"),
            )
            .send();
        let up = r.upstream_request();
        assert_eq!(up.body_text(), body);
        assert_eq!(up.trailer("x-sum"), Some("1"));
        let down = r.response();
        assert_eq!(down.status(), Some(200));
        assert_eq!(down.header("x-n"), Some(i.to_string().as_str()));
        assert_eq!(down.body_text(), "ab");
        assert_eq!(down.trailer("x-t"), Some("2"));
    }
}

#[derive(Default)]
struct WrapRoot;

impl RootContext for WrapRoot {
    type Config = ();
    type Http = Wrapper;
    fn new_http(&mut self, _: &mut Root) -> Wrapper {
        Wrapper(Passive)
    }
}

/// Keeps every default.
struct Passive;

impl HttpContext for Passive {}

/// Delegates to [`Passive`]'s defaults, then does its own work: its callbacks
/// are its own and must run on every request.
struct Wrapper(Passive);

impl HttpContext for Wrapper {
    fn on_response_headers(&mut self, http: &mut Http, eos: bool) -> Result<Action, Error> {
        let action = self.0.on_response_headers(http, eos)?;
        http.response().set_header("x-wrapped", "1")?;
        Ok(action)
    }

    fn on_response_body(&mut self, http: &mut Http, size: usize, eos: bool) -> Result<BodyAction, Error> {
        let action = self.0.on_response_body(http, size, eos)?;
        if !eos {
            return Ok(BodyAction::BufferUntilEnd);
        }
        http.response().body().append("|wrapped")?;
        Ok(action)
    }
}

#[test]
fn a_context_that_delegates_to_another_types_default_runs_its_own_callbacks_every_time() {
    let host = TestHost::new::<WrapRoot>().start().unwrap();
    for _ in 0..3 {
        let r = host.request().upstream(TestResponse::new(200).chunks(["a", "b"])).send();
        assert_eq!(r.response().header("x-wrapped"), Some("1"));
        assert_eq!(r.response().body_text(), "ab|wrapped");
    }
}

// === timers, resume from the root, shared data ===

#[derive(Default)]
struct Gate {
    waiting: Vec<u32>,
    ticks: u32,
}

impl RootContext for Gate {
    type Config = ();
    type Http = GateHttp;

    fn on_vm_start(&mut self, root: &mut Root, _: Option<Vec<u8>>) -> Result<(), Error> {
        root.set_tick_period(Duration::from_millis(100))?;
        Ok(())
    }

    fn new_http(&mut self, _: &mut Root) -> GateHttp {
        GateHttp
    }

    fn on_tick(&mut self, root: &mut Root) -> Result<(), Error> {
        self.ticks += 1;
        Shared::<u32>::new("ticks").update(|n| n.unwrap_or(0) + 1)?;
        let now = sluice_sdk::host::now()?;
        sluice_sdk::debug!("tick {} at {:?}", self.ticks, now);
        if let Some(Some(bytes)) =
            Queue::resolve("", "gate").ok().flatten().map(|q| q.dequeue().ok().flatten())
        {
            let id = u32::from_le_bytes(bytes.try_into().unwrap());
            self.waiting.push(id);
        }
        for id in self.waiting.drain(..) {
            root.resume_http(id, StreamType::HttpRequest)?;
        }
        Ok(())
    }
}

struct GateHttp;

impl HttpContext for GateHttp {
    fn on_request_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        let q = Queue::register("gate")?;
        q.enqueue(&http.id().to_le_bytes())?;
        Ok(Action::Pause)
    }
}

#[test]
fn ticks_follow_the_clock_and_a_root_can_resume_a_request() {
    let host = TestHost::new::<Gate>().start().unwrap();
    assert_eq!(host.tick_period(), Some(Duration::from_millis(100)));
    let r = host.request().send();
    assert!(r.is_paused());
    assert_eq!(host.queue_items("gate").len(), 1);
    let before = host.now();
    assert_eq!(host.advance(Duration::from_millis(250)), 2);
    assert_eq!(host.now().duration_since(before).unwrap(), Duration::from_millis(250));
    assert!(!r.is_paused());
    assert!(r.is_complete());
    assert_eq!(host.shared_json::<u32>("ticks"), Some(2));
    assert!(host.logged(LogLevel::Debug, "tick 2"));
}

#[test]
fn shared_data_update_retries_on_cas_conflicts_across_vms() {
    let a = TestHost::new::<Gate>().start().unwrap();
    let b = TestHost::new::<Gate>().share_with(&a).start().unwrap();
    a.tick();
    b.tick();
    a.tick();
    assert_eq!(a.shared_json::<u32>("ticks"), Some(3));
    assert_eq!(b.shared_json::<u32>("ticks"), Some(3));
    // Garbage in shared data is a decode error naming the key, not a panic.
    b.set_shared_data("ticks", "not json");
    b.tick();
    assert!(b.logged(LogLevel::Error, "cannot decode shared data \"ticks\""));
}

// === queues ===

#[derive(Default)]
struct Collector {
    got: Vec<String>,
}

impl RootContext for Collector {
    type Config = ();
    type Http = ();
    fn on_vm_start(&mut self, _: &mut Root, _: Option<Vec<u8>>) -> Result<(), Error> {
        Queue::register("events")?;
        Ok(())
    }
    fn new_http(&mut self, _: &mut Root) {}
    fn on_queue_ready(&mut self, _: &mut Root, queue: Queue) -> Result<(), Error> {
        while let Some(item) = queue.dequeue()? {
            self.got.push(String::from_utf8_lossy(&item).into_owned());
        }
        sluice_sdk::info!("collected {:?}", self.got);
        Ok(())
    }
}

#[test]
fn queue_ready_delivers_items_to_the_registering_root() {
    let host = TestHost::new::<Collector>().start().unwrap();
    host.enqueue("events", "a");
    host.enqueue("events", "b");
    assert!(host.logged(LogLevel::Info, "collected [\"a\", \"b\"]"));
    assert!(host.queue_items("events").is_empty());
    // A filter without HTTP behaviour passes requests untouched.
    let r = host.request().header("x", "1").send();
    assert_eq!(r.upstream_request().header("x"), Some("1"));
}

// === gRPC callouts and local replies ===

#[derive(Default)]
struct GrpcAuth;

impl RootContext for GrpcAuth {
    type Config = ();
    type Http = GrpcAuthHttp;
    fn new_http(&mut self, _: &mut Root) -> GrpcAuthHttp {
        GrpcAuthHttp { token: None }
    }
}

struct GrpcAuthHttp {
    token: Option<Token>,
}

impl HttpContext for GrpcAuthHttp {
    fn on_request_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        let call = GrpcCall::new("authz", "auth.v1.Auth", "Check")
            .metadata("x-user", "alice")
            .message(b"req".to_vec())
            .timeout(Duration::from_secs(2));
        self.token = Some(http.grpc_call(&call)?);
        Ok(Action::Pause)
    }

    fn on_grpc_call_response(
        &mut self,
        http: &mut Http,
        token: Token,
        r: GrpcResponse,
    ) -> Result<Action, Error> {
        assert_eq!(Some(token), self.token);
        if r.is_ok() {
            let verdict = String::from_utf8(r.message.unwrap_or_default()).unwrap();
            http.request().set_header("x-verdict", &verdict)?;
            return Ok(Action::Continue);
        }
        http.respond_grpc(GrpcStatus::PermissionDenied, &format!("denied: {}", r.status_message), &[])?;
        Ok(Action::Pause)
    }
}

#[test]
fn grpc_callouts_resume_or_answer_with_a_grpc_status() {
    let host = TestHost::new::<GrpcAuth>().start().unwrap();
    let r = host.request().send();
    let call = r.grpc_call();
    assert_eq!((call.service.as_str(), call.method.as_str()), ("auth.v1.Auth", "Check"));
    assert_eq!(call.message, b"req");
    assert_eq!(call.metadata, vec![("x-user".to_string(), b"alice".to_vec())]);
    r.answer_grpc_call(GrpcReply::Ok(b"ok".to_vec()));
    assert_eq!(r.upstream_request().header("x-verdict"), Some("ok"));

    let r = host.request().send();
    r.answer_grpc_call(GrpcReply::Err(GrpcStatus::Unavailable, "down".into()));
    let local = r.local_response();
    assert_eq!(local.status, 200);
    assert_eq!(local.grpc_status, Some(GrpcStatus::PermissionDenied));
    assert_eq!(r.response().header("grpc-status"), Some("7"));
    assert_eq!(r.response().header("grpc-message"), Some("denied: down"));
}

// === properties ===

#[derive(Default)]
struct Props;

impl RootContext for Props {
    type Config = ();
    type Http = PropsHttp;
    fn new_http(&mut self, _: &mut Root) -> PropsHttp {
        PropsHttp
    }
}

struct PropsHttp;

impl HttpContext for PropsHttp {
    fn on_request_headers(&mut self, http: &mut Http, _: bool) -> Result<Action, Error> {
        let req = http.request();
        req.set_header("x-source", &properties::source_address()?.unwrap_or_default())?;
        req.set_header("x-port", &properties::source_port()?.unwrap_or(-1).to_string())?;
        req.set_header("x-peer", &properties::peer_identity()?.unwrap_or_default())?;
        req.set_header("x-mtls", &properties::mtls()?.unwrap_or(false).to_string())?;
        req.set_header("x-plugin", &properties::plugin_name()?.unwrap_or_default())?;
        req.set_header("x-route", &properties::route_name()?.unwrap_or_else(|| "none".into()))?;
        req.set_header("x-request-path", &properties::get_string(&["request", "path"])?.unwrap_or_default())?;
        properties::set(&["decision"], b"allow")?;
        req.set_header("x-decision", &properties::get_string(&["decision"])?.unwrap_or_default())?;
        Ok(Action::Continue)
    }

    fn on_log(&mut self, _: &mut Http) -> Result<(), Error> {
        sluice_sdk::info!("response code {:?}", properties::response_code()?);
        Ok(())
    }
}

#[test]
fn properties_use_envoy_encodings() {
    let host =
        TestHost::new::<Props>().plugin_name("props").property(&["xds", "route_name"], "r1").start().unwrap();
    let r = host
        .request()
        .path("/p?q=1")
        .source_address("10.1.2.3:4567")
        .peer_identity("spiffe://mesh/ns/a/sa/b")
        .upstream(TestResponse::new(404))
        .send();
    let up = r.upstream_request();
    assert_eq!(up.header("x-source"), Some("10.1.2.3:4567"));
    assert_eq!(up.header("x-port"), Some("4567"));
    assert_eq!(up.header("x-peer"), Some("spiffe://mesh/ns/a/sa/b"));
    assert_eq!(up.header("x-mtls"), Some("true"));
    assert_eq!(up.header("x-plugin"), Some("props"));
    assert_eq!(up.header("x-route"), Some("r1"));
    assert_eq!(up.header("x-request-path"), Some("/p?q=1"));
    assert_eq!(up.header("x-decision"), Some("allow"));
    assert!(host.logged(LogLevel::Info, "response code Some(404)"));
}

// === TCP and foreign functions ===

#[derive(Default)]
struct Tcpish;

impl RootContext for Tcpish {
    type Config = ();
    type Http = ();
    fn new_http(&mut self, _: &mut Root) {}
    fn new_child(&mut self, _: &mut Root) -> Child<()> {
        Child::Stream(Box::new(Upper))
    }
    fn on_foreign_function(&mut self, _: &mut Root, id: u32, args: Option<Vec<u8>>) -> Result<(), Error> {
        let reply = sluice_sdk::host::call_foreign_function("echo", &args.unwrap_or_default())?;
        sluice_sdk::info!("foreign {id}: {:?}", reply.map(String::from_utf8));
        Ok(())
    }
}

struct Upper;

impl StreamContext for Upper {
    fn on_downstream_data(&mut self, tcp: &mut Tcp, _: usize, eos: bool) -> Result<Action, Error> {
        let data = tcp.downstream_data()?;
        if data.ends_with(b"\n") || eos {
            tcp.set_downstream_data(&data.to_ascii_uppercase())?;
            return Ok(Action::Continue);
        }
        if data.starts_with(b"QUIT") {
            tcp.close_downstream()?;
        }
        Ok(Action::Pause)
    }
}

#[test]
fn tcp_streams_and_foreign_functions() {
    let host = TestHost::new::<Tcpish>().foreign_function("echo", |args| Ok(args.to_vec())).start().unwrap();
    let c = host.connection();
    assert!(c.accepted());
    assert!(!c.downstream(b"hel", false));
    assert!(c.downstream(b"lo\n", false));
    assert_eq!(c.sent_upstream(), b"HELLO\n");
    assert!(c.upstream(b"pong", false));
    assert_eq!(c.sent_downstream(), b"pong");
    c.close();

    let c = host.connection();
    c.downstream(b"QUIT", false);
    assert!(c.was_closed());

    host.call_foreign_function(7, b"hi");
    assert!(host.logged(LogLevel::Info, "foreign 7: Some(Ok(\"hi\"))"));
}
