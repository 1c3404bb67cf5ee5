//! The example filter `examples/header_auth.rs`, tested through the test kit.
#![cfg(all(feature = "testing", not(target_arch = "wasm32")))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/header_auth.rs"]
mod header_auth;

use header_auth::AuthRoot;
use serde_json::json;
use sluice_sdk::LogLevel;
use sluice_sdk::testing::{TestHost, TestResponse};

fn host() -> TestHost {
    TestHost::new::<AuthRoot>()
        .config(json!({"tokens": {"t0ken": "alice"}, "authz_cluster": "authz", "timeout_ms": 250}))
        .unwrap()
}

#[test]
fn missing_token_is_401_and_the_reply_goes_through_the_response_path() {
    let host = host();
    let r = host.request().path("/a").send();
    let local = r.local_response();
    assert_eq!(local.status, 401);
    assert_eq!(local.header("www-authenticate"), Some("Bearer"));
    assert_eq!(local.body_text(), "missing bearer token\n");
    assert!(r.try_upstream_request().is_none());
    // Envoy runs the filter's response callbacks on its own local reply.
    assert_eq!(r.response().status(), Some(401));
    assert_eq!(r.response().header("x-auth"), Some("checked"));
    assert!(r.is_complete());
    assert_eq!(host.metric("auth_denied"), Some(1));
    assert_eq!(host.metric("auth_allowed"), Some(0));
}

#[test]
fn static_token_passes_with_user_header() {
    let host = host();
    let r = host.request().path("/a").header("Authorization", "Bearer t0ken").header("x-other", "1").send();
    let up = r.upstream_request();
    assert_eq!(up.header("x-auth-user"), Some("alice"));
    assert_eq!(up.header("authorization"), None);
    assert_eq!(up.header("x-other"), Some("1"));
    assert_eq!(up.path(), Some("/a"));
    assert_eq!(r.response().status(), Some(200));
    assert_eq!(host.metric("auth_allowed"), Some(1));
    assert!(host.logged(LogLevel::Info, "1 static tokens"));
}

#[test]
fn unknown_token_pauses_for_the_callout_then_resumes() {
    let host = host();
    let r = host
        .request()
        .header("authorization", "Bearer other")
        .body("payload")
        .upstream(TestResponse::new(201).body("created"))
        .send();
    assert!(r.is_paused());
    assert!(r.try_upstream_request().is_none());
    let call = r.http_call();
    assert_eq!(call.upstream, "authz");
    assert_eq!(call.path(), Some("/check"));
    assert_eq!(call.method(), Some("GET"));
    assert_eq!(call.header(":authority"), Some("authz"));
    assert_eq!(call.header("authorization"), Some("Bearer other"));
    assert_eq!(call.timeout.as_millis(), 250);

    r.answer_http_call(TestResponse::new(200).header("x-user", "bob"));
    assert!(!r.is_paused());
    let up = r.upstream_request();
    assert_eq!(up.header("x-auth-user"), Some("bob"));
    assert_eq!(up.body_text(), "payload");
    assert_eq!(r.response().status(), Some(201));
    assert_eq!(r.response().body_text(), "created");
}

#[test]
fn rejected_or_failed_callouts_answer_locally() {
    let host = host();
    let r = host.request().header("authorization", "Bearer bad").send();
    r.answer_http_call(TestResponse::new(403));
    assert_eq!(r.local_response().status, 403);
    assert_eq!(r.response().status(), Some(403));
    assert!(r.try_upstream_request().is_none());
    assert!(r.is_complete());

    let r = host.request().header("authorization", "Bearer bad").send();
    r.fail_http_call();
    assert_eq!(r.local_response().status, 503);
    assert!(host.logged(LogLevel::Warn, "authz callout failed"));
    assert_eq!(host.metric("auth_denied"), Some(2));
}

#[test]
fn bad_config_is_rejected_naming_the_field() {
    let err = TestHost::new::<AuthRoot>().config(json!({"tokens": {"a": 1}})).unwrap_err();
    assert_eq!(err.callback, "on_configure");
    let text = err.to_string();
    assert!(text.contains("invalid plugin configuration at `tokens.a`"), "{text}");

    let err = TestHost::new::<AuthRoot>().config(json!({"tokenz": {}})).unwrap_err();
    assert!(err.to_string().contains("unknown field `tokenz`"), "{err}");

    let err = TestHost::new::<AuthRoot>().config(json!({"timeout_ms": 0})).unwrap_err();
    assert!(err.to_string().contains("timeout_ms must be positive"), "{err}");
}
