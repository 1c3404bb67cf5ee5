//! Filters written against the upstream `proxy-wasm` crate 0.2.5, driven through
//! `HttpFilter` on a worker-like runtime, with callouts to a real hyper server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_filter::{
    BodyAction, BodyBuf, EncodedFields, FilterErrorKind, FilterFactory, HeadersAction, ResponseHead,
};

use crate::common::{
    Exchange, TestCallouts, backend, captured_logs, fixture, host, host_with, metric, run, spec,
};

fn header(ex: &Exchange, name: &str) -> String {
    ex.req.headers.get(name).map(|v| v.to_str().unwrap_or_default().to_string()).unwrap_or_default()
}

fn resp_header(ex: &Exchange, name: &str) -> String {
    ex.resp.get(name.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

/// A sink factory with a `backend` cluster on a real server.
async fn sink(config: &str) -> (Arc<dyn FilterFactory>, prometheus::Registry, sluice_wasm::WasmHost) {
    sink_with(config, |_| {}).await
}

/// [`sink`], with its spec adjusted by `adjust`.
async fn sink_with(
    config: &str,
    adjust: impl FnOnce(&mut sluice_config::FilterSpec),
) -> (Arc<dyn FilterFactory>, prometheus::Registry, sluice_wasm::WasmHost) {
    let addr = backend().await;
    let mut callouts = TestCallouts::default();
    callouts.clusters.insert("backend".into(), addr);
    let (host, registry) = host_with(callouts);
    let mut s = spec("sink");
    s.config = Some(serde_json::Value::String(config.into()));
    s.vm_config = Some(serde_json::json!({"vm": 1}));
    adjust(&mut s);
    let factory = host.load_bytes(&s, &fixture("sink"), &["backend".to_string()]).expect("load sink");
    (factory, registry, host)
}

/// Runs request headers for `uri` and returns the exchange and the action.
async fn get(factory: &Arc<dyn FilterFactory>, uri: &str) -> (Exchange, HeadersAction) {
    let mut ex = Exchange::new(factory, uri);
    let action = ex.request_headers(true).await.expect("request headers");
    (ex, action)
}

/// Reads a shared-data key through the filter (`/get/<key>`).
async fn shared(factory: &Arc<dyn FilterFactory>, key: &str) -> String {
    let (ex, _) = get(factory, &format!("http://a.test/get/{key}")).await;
    header(&ex, "x-value")
}

#[test]
fn headers_edits_local_responses_and_reset() {
    run(async {
        let (factory, _, _host) = sink("cfg").await;
        let mut ex = Exchange::new(&factory, "http://a.test/");
        ex.req.headers.insert("x-replace", "old".parse().unwrap());
        ex.req.headers.insert("x-remove", "1".parse().unwrap());
        assert!(matches!(ex.request_headers(false).await, Ok(HeadersAction::Continue)));
        assert_eq!(header(&ex, "x-sink"), "1");
        assert_eq!(header(&ex, "x-replace"), "new");
        assert!(ex.req.headers.get("x-remove").is_none());
        assert!(ex.info.take_route_cache_cleared(), "request header edits clear the route cache");
        ex.resp.headers_mut().insert("content-length", "5".parse().unwrap());
        assert!(matches!(ex.response_headers(false).await, Ok(HeadersAction::Continue)));
        assert_eq!(resp_header(&ex, "x-config"), "cfg");
        assert!(ex.resp.headers_mut().get("content-length").is_none());

        let (mut ex, action) = get(&factory, "http://a.test/hello").await;
        let HeadersAction::Respond(local) = action else { panic!("expected a local response") };
        assert_eq!(local.status, 200);
        assert_eq!(&local.body[..], b"Hello, World!\n");
        assert!(local.headers.iter().any(|(k, v)| k == "x-hello" && v == "1"));
        assert_eq!(local.grpc_status, None);
        // The data plane sends the local response through the response path.
        ex.resp.headers_mut().insert("x-hello", "1".parse().unwrap());
        assert!(matches!(ex.response_headers(true).await, Ok(HeadersAction::Continue)));
        assert_eq!(resp_header(&ex, "x-seen-local"), "1");

        let (_, action) = get(&factory, "http://a.test/grpc-deny").await;
        let HeadersAction::Respond(local) = action else { panic!("expected a gRPC reply") };
        assert_eq!(local.grpc_status, Some(7));
        assert_eq!(&local.body[..], b"nope");

        let (_, action) = get(&factory, "http://a.test/reset").await;
        assert!(matches!(action, HeadersAction::Reset));

        let (ex, _) = get(&factory, "http://a.test/rewrite").await;
        assert_eq!(ex.req.uri.path(), "/rewritten");
        assert_eq!(ex.req.uri.authority().map(|a| a.as_str()), Some("other.test"));
        assert!(ex.info.take_route_cache_cleared());
    });
}

/// A response head as the HTTP/1.1 client hands it over: the upstream's
/// fields still encoded (`sluice_filter::ResponseHead`).
fn encoded_head(lines: &str) -> ResponseHead {
    let count = lines.matches("\r\n").count();
    let encoded = EncodedFields { lines: lines.as_bytes().to_vec(), count, length: None, has_date: false };
    ResponseHead::with_encoded(crate::common::response(200), Some(Box::new(encoded)))
}

fn resp_fields(ex: &Exchange) -> Vec<String> {
    let mut v = Vec::new();
    ex.resp
        .for_each(|n, x| v.push(format!("{}: {}", String::from_utf8_lossy(n), String::from_utf8_lossy(x))));
    v
}

#[test]
fn encoded_response_fields_read_and_edit_as_a_map_would() {
    run(async {
        // Removes `content-length`, adds `x-config`, reads `x-hello`: the
        // removal decodes the fields, in their order, names lower-cased.
        let (factory, _, _host) = sink("cfg").await;
        let (mut ex, _) = get(&factory, "http://a.test/").await;
        // (`content-length` last: a map's removal moves its last field into the gap.)
        ex.resp = encoded_head("Server: up\r\nX-Hello: 1\r\nx-b:  2 \r\nContent-Length: 5\r\n");
        assert!(matches!(ex.response_headers(false).await, Ok(HeadersAction::Continue)));
        assert!(ex.resp.encoded().is_none(), "a removal decodes the fields");
        let want = ["server: up", "x-hello: 1", "x-b: 2", "x-config: cfg", "x-seen-local: 1"];
        assert_eq!(resp_fields(&ex), want);

        // Only reads and appends: the upstream's fields stay encoded, and the
        // guest's field comes after them.
        let (host, _) = host();
        let factory = host.load_bytes(&spec("mini"), &fixture("mini"), &[]).expect("load mini");
        let (mut ex, _) = get(&factory, "http://a.test/").await;
        ex.resp = encoded_head("Server: up\r\nContent-Type: text/plain\r\n");
        assert!(matches!(ex.response_headers(true).await, Ok(HeadersAction::Continue)));
        let encoded = ex.resp.encoded().map(|e| String::from_utf8_lossy(&e.lines).into_owned());
        assert_eq!(encoded.as_deref(), Some("Server: up\r\nContent-Type: text/plain\r\n"));
        assert_eq!(resp_fields(&ex), ["server: up", "content-type: text/plain", "x-mini: mini"]);
    });
}

#[test]
fn bodies_buffer_and_rewrite() {
    run(async {
        let (factory, _, _host) = sink("cfg").await;
        let mut ex = Exchange::new(&factory, "http://a.test/upload");
        assert!(matches!(ex.request_headers(false).await, Ok(HeadersAction::Continue)));
        // Chunks as the proxy reads them: slices of a connection's read buffer.
        let read_buf = Bytes::from_static(b"a sec|hello");
        let mut body = BodyBuf::from(read_buf.slice(..5));
        assert!(matches!(ex.request_body(&mut body, false).await, Ok(BodyAction::Buffer)));
        body.extend_from_slice(b"ret here");
        assert!(matches!(ex.request_body(&mut body, true).await, Ok(BodyAction::Continue)));
        assert_eq!(&body[..], b"redacted");

        assert!(matches!(ex.response_headers(false).await, Ok(HeadersAction::Continue)));
        let chunk = read_buf.slice(6..);
        let mut body = BodyBuf::from(chunk.clone());
        assert!(matches!(ex.response_body(&mut body, false).await, Ok(BodyAction::Buffer)));
        // Read, not written: still the bytes that came in, not a copy.
        assert_eq!(body.as_ptr(), chunk.as_ptr());
        body.extend_from_slice(b" world");
        assert!(matches!(ex.response_body(&mut body, true).await, Ok(BodyAction::Continue)));
        assert_eq!(&body[..], b"hello world!");
        // The guest's rewrites went to copies: the read buffer is as it came.
        assert_eq!(&read_buf[..], b"a sec|hello");

        ex.log();
        // (No proxy in front of the host here: nothing set the forwarding fields.)
        assert_eq!(shared(&factory, "last_log").await, "/upload 200 a.test http xff= sink=1 seen=/");
    });
}

#[test]
fn plugin_config_rejection_names_the_reason() {
    let (host, registry) = host();
    let mut s = spec("sink");
    s.config = Some(serde_json::Value::String("reject".into()));
    let err = host.load_bytes(&s, &fixture("sink"), &[]).expect_err("rejected");
    assert!(err.reason.contains("on_configure returned false"), "{}", err.reason);
    assert!(err.reason.contains("config says reject"), "{}", err.reason);
    assert_eq!(metric(&registry, "sluice_wasm_load_failures_total", r#"plugin="sink""#), Some(1.0));
}

#[test]
fn http_callouts_resume_reply_and_time_out() {
    run(async {
        let (factory, registry, _host) = sink("cfg").await;
        let (ex, action) = get(&factory, "http://a.test/callout").await;
        assert!(matches!(action, HeadersAction::Continue));
        assert_eq!(header(&ex, "x-callout"), "even");
        assert_eq!(header(&ex, "x-callout-status"), "200");

        let started = Instant::now();
        let (ex, action) = get(&factory, "http://a.test/callout-slow").await;
        assert!(matches!(action, HeadersAction::Continue));
        assert_eq!(header(&ex, "x-callout-status"), "504");
        // The slow backend answers after 5 s.
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());

        // Unknown cluster: refused synchronously (BAD_ARGUMENT), the filter goes on.
        let (ex, action) = get(&factory, "http://a.test/callout-nowhere").await;
        assert!(matches!(action, HeadersAction::Continue));
        assert_eq!(header(&ex, "x-callout-error"), "BadArgument");
        assert_eq!(
            metric(&registry, "sluice_wasm_callouts_total", r#"kind="http",plugin="sink",result="ok""#),
            Some(1.0)
        );
        assert_eq!(
            metric(&registry, "sluice_wasm_callouts_total", r#"kind="http",plugin="sink",result="timeout""#),
            Some(1.0)
        );
    });
}

#[test]
fn grpc_callouts() {
    run(async {
        let (factory, _, _host) = sink("cfg").await;
        let (ex, action) = get(&factory, "http://a.test/grpc").await;
        assert!(matches!(action, HeadersAction::Continue));
        assert_eq!(header(&ex, "x-grpc-status"), "0");
        assert_eq!(header(&ex, "x-grpc-reply"), "pong:ping");
        let (ex, _) = get(&factory, "http://a.test/grpc-fail").await;
        assert_eq!(header(&ex, "x-grpc-status"), "7");
        assert_eq!(header(&ex, "x-grpc-message"), "denied");
        // The upstream named by a serialized GrpcService, as C++ SDK filters do.
        let (ex, _) = get(&factory, "http://a.test/grpc-service").await;
        assert_eq!(header(&ex, "x-grpc-reply"), "pong:ping");
        // An unknown cluster: PARSE_FAILURE, as Envoy answers; the SDK returns it
        // as an error (any other status would make it panic).
        let (ex, action) = get(&factory, "http://a.test/grpc-nowhere").await;
        assert!(matches!(action, HeadersAction::Continue));
        assert_eq!(header(&ex, "x-grpc-error"), "ParseFailure");
    });
}

#[test]
fn ticks_shared_data_and_queues() {
    run(async {
        let (factory, _, _host) = sink("tick").await;
        let (ex, _) = get(&factory, "http://a.test/shared").await;
        assert_eq!(header(&ex, "x-shared"), "v1|Err(CasMismatch)");
        // The queue notification and the ticks arrive on this worker's root context.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let job = shared(&factory, "last_job").await;
            let ticks = shared(&factory, "ticks").await;
            if job == "job-1" && ticks == "3" {
                break;
            }
            assert!(Instant::now() < deadline, "job={job:?} ticks={ticks:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The root stopped its timer at 3 ticks.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(shared(&factory, "ticks").await, "3");
    });
}

#[test]
fn guest_metrics_are_exported_with_the_plugin_label() {
    run(async {
        let (factory, registry, _host) = sink("cfg").await;
        get(&factory, "http://a.test/").await;
        let (ex, _) = get(&factory, "http://a.test/metrics").await;
        assert_eq!(header(&ex, "x-requests"), "2");
        assert_eq!(metric(&registry, "sluice_wasm_custom_sink_requests", r#"plugin="sink""#), Some(2.0));
        assert_eq!(metric(&registry, "sluice_wasm_custom_sink_level", r#"plugin="sink""#), Some(42.0));
        assert_eq!(metric(&registry, "sluice_wasm_custom_sink_sizes_count", r#"plugin="sink""#), Some(1.0));
    });
}

#[test]
fn properties() {
    run(async {
        let (factory, _, _host) = sink("cfg").await;
        let (ex, _) = get(&factory, "http://a.test/props").await;
        assert_eq!(header(&ex, "x-props"), "sink|127.0.0.1:40000|40000|req-1|/props|true|set");

        // At `on_log`: Envoy's sizes (names and values of the head, plus the
        // body), the gRPC status from the trailers, the trailers themselves.
        let (mut ex, _) = get(&factory, "http://a.test/sizes").await;
        ex.info.request_body_bytes.set(100);
        ex.info.response_body_bytes.set(1000);
        ex.resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
        ex.log_with_trailers(&trailers);
        let sizes = shared(&factory, "last_sizes").await;
        let fields: Vec<&str> = sizes.split('|').collect();
        let request: i64 = fields[0].parse().unwrap_or(0);
        // The request head: at least `:path` `/sizes` and `:method` `GET`, and the
        // sink's own `x-sink: 1`.
        let least = 100 + ":path/sizes".len() + ":methodGET".len() + "x-sink1".len();
        assert!(request >= least as i64, "{sizes}");
        // The response head (`:status` 200, the content type), the trailers, the body.
        let response: i64 = fields[1].parse().unwrap_or(0);
        let least = 1000 + ":status200".len() + "content-typeapplication/grpc".len() + "grpc-status7".len();
        assert!(response >= least as i64, "{sizes}");
        // grpc-status 7; the trailers as a map of one pair: 4 + 8 + 11 + 1 + 1 + 1 bytes.
        assert_eq!(&fields[2..], ["7", "26"], "{sizes}");
    });
}

#[test]
fn guest_logs_go_to_tracing_with_the_plugin_name() {
    let captured = captured_logs();
    run(async {
        let (factory, _, _host) = sink("cfg").await;
        get(&factory, "http://a.test/log").await;
    });
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("sink says hi"))
        .unwrap_or_else(|| panic!("no guest log in:\n{text}"));
    assert!(line.contains("INFO") && line.contains("plugin=\"sink\""), "{line}");
    assert!(text.contains("vm config: {\"vm\":1}"), "{text}");
}

#[test]
fn guest_panic_and_deadline_name_the_cause() {
    run(async {
        let (factory, registry, _host) = sink("cfg").await;
        let (_, _) = get(&factory, "http://a.test/").await;
        let mut ex = Exchange::new(&factory, "http://a.test/panic");
        let err = ex.request_headers(true).await.expect_err("panic");
        assert_eq!(err.kind, FilterErrorKind::Trap);
        assert_eq!(err.callback, "on_request_headers");
        assert!(err.reason.contains("sink exploded"), "{}", err.reason);
        assert_eq!(metric(&registry, "sluice_wasm_traps_total", r#"kind="panic",plugin="sink""#), Some(1.0));
    });
    run(async {
        // `/loop` loops until the deadline.
        let (factory, _, _host) =
            sink_with("cfg", |s| s.limits.callback_timeout = Duration::from_millis(50)).await;
        let mut ex = Exchange::new(&factory, "http://a.test/loop");
        let err = ex.request_headers(true).await.expect_err("deadline");
        assert_eq!(err.kind, FilterErrorKind::Timeout);
    });
}

#[test]
fn unknown_unknown_module_uses_malloc() {
    run(async {
        let (host, _) = host();
        let factory = host.load_bytes(&spec("mini"), &fixture("mini"), &[]).expect("load mini");
        let status = factory.status();
        assert_eq!(status["abi_version"], "0.2.1");
        let mut ex = Exchange::new(&factory, "http://a.test/");
        ex.request_headers(true).await.expect("headers");
        ex.response_headers(true).await.expect("response");
        assert_eq!(resp_header(&ex, "x-mini"), "mini");
    });
}

#[test]
fn hot_swap_keeps_in_flight_requests_and_frees_old_vms() {
    run(async {
        let addr = backend().await;
        let mut callouts = TestCallouts::default();
        callouts.clusters.insert("backend".into(), addr);
        let (host, registry) = host_with(callouts);
        let load = |config: &str| {
            let mut s = spec("swap");
            s.config = Some(serde_json::Value::String(config.into()));
            host.load_bytes(&s, &fixture("sink"), &["backend".to_string()]).expect("load")
        };
        let v1 = load("v1");
        let mut old = Exchange::new(&v1, "http://a.test/callout");
        let vms = || metric(&registry, "sluice_wasm_vms", r#"plugin="swap""#);
        {
            let pending = old.request_headers(true);
            tokio::pin!(pending);
            // The old request is paused on its callout when the new version lands.
            assert!(futures_util::poll!(pending.as_mut()).is_pending());
            let v2 = load("v2");
            let mut new = Exchange::new(&v2, "http://a.test/");
            new.request_headers(true).await.expect("v2 request");
            new.response_headers(true).await.expect("v2 response");
            assert_eq!(resp_header(&new, "x-config"), "v2");
            assert_eq!(vms(), Some(2.0));
            // One timed worker VM start per version (the validation VMs are not counted).
            let starts = metric(&registry, "sluice_wasm_vm_start_seconds_count", r#"plugin="swap""#);
            assert_eq!(starts, Some(2.0));
            assert!(matches!(pending.await, Ok(HeadersAction::Continue)));
            drop(v2);
            drop(new);
        }
        assert_eq!(header(&old, "x-callout"), "even");
        old.response_headers(true).await.expect("v1 response");
        assert_eq!(resp_header(&old, "x-config"), "v1");
        old.log();
        drop(old);
        drop(v1);
        assert_eq!(vms(), Some(0.0), "old VMs are freed once their last request ends");
    });
}
