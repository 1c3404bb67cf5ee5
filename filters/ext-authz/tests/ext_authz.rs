//! The ext-authz filter under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use sluice_filter_ext_authz::ExtAuthzRoot;
use sluice_sdk::LogLevel;
use sluice_sdk::testing::{TestHost, TestResponse};

fn config() -> Value {
    json!({
        "cluster": "authz",
        "path_prefix": "/check",
        "authority": "authz.internal",
        "timeout": "250ms",
        "allowed_headers": ["authorization", "x-tenant-*"],
        "allowed_upstream_headers": ["x-user", "x-auth-*"],
        "skip": [{"prefix": "/healthz"}],
    })
}

fn host_with(config: Value) -> TestHost {
    TestHost::new::<ExtAuthzRoot>().config(config).unwrap()
}

#[test]
fn the_check_carries_the_request_and_selected_headers() {
    let host = host_with(config());
    let r = host
        .request()
        .method("POST")
        .path("/orders/7?x=1")
        .authority("shop.example")
        .header("authorization", "Bearer t")
        .header("x-tenant-id", "acme")
        .header("cookie", "secret=1")
        .source_address("10.1.2.3:5555")
        .body("payload")
        .send();
    assert!(r.is_paused());
    let call = r.http_call();
    assert_eq!(call.upstream, "authz");
    assert_eq!(call.method(), Some("POST"));
    assert_eq!(call.path(), Some("/check/orders/7?x=1"));
    assert_eq!(call.header(":authority"), Some("authz.internal"));
    assert_eq!(call.header("authorization"), Some("Bearer t"));
    assert_eq!(call.header("x-tenant-id"), Some("acme"));
    assert_eq!(call.header("cookie"), None, "not in allowed_headers");
    assert_eq!(call.header("x-forwarded-host"), Some("shop.example"));
    assert_eq!(call.header("x-forwarded-method"), Some("POST"));
    assert_eq!(call.header("x-forwarded-uri"), Some("/orders/7?x=1"));
    assert_eq!(call.header("x-forwarded-for"), Some("10.1.2.3"));
    assert!(call.body.is_empty());
    assert_eq!(call.timeout, Duration::from_millis(250));
}

#[test]
fn a_2xx_allows_and_copies_allowed_headers_upstream() {
    let host = host_with(config());
    let r = host.request().path("/a").header("x-user", "spoofed").body("b").send();
    r.answer_http_call(
        TestResponse::new(204)
            .header("x-user", "alice")
            .header("x-auth-roles", "admin")
            .header("x-other", "no"),
    );
    let up = r.upstream_request();
    assert_eq!(up.header_all("x-user"), ["alice"]);
    assert_eq!(up.header("x-auth-roles"), Some("admin"));
    assert_eq!(up.header("x-other"), None);
    assert_eq!(up.body_text(), "b");
    assert_eq!(host.metric("ext_authz_allowed"), Some(1));
    // Without the header in the answer, the client's copy is still dropped.
    let r = host.request().header("x-user", "spoofed").header("x-auth-admin", "1").send();
    r.answer_http_call(TestResponse::new(200));
    assert_eq!(r.upstream_request().header("x-user"), None);
    assert_eq!(r.upstream_request().header("x-auth-admin"), None);
    assert_eq!(host.histogram("ext_authz_latency_ms").len(), 2);
}

#[test]
fn denials_pass_the_service_answer_through() {
    let host = host_with(config());
    let r = host.request().path("/a?token=x").send();
    r.answer_http_call(
        TestResponse::new(401)
            .header("www-authenticate", "Bearer realm=\"x\"")
            .header("x-internal", "secret")
            .body("login first\n"),
    );
    let local = r.local_response();
    assert_eq!(local.status, 401);
    assert_eq!(local.header("www-authenticate"), Some("Bearer realm=\"x\""));
    assert_eq!(local.header("x-internal"), None);
    assert_eq!(local.body_text(), "login first\n");
    assert!(r.try_upstream_request().is_none());
    assert!(host.logged(LogLevel::Info, "denied /a: service answered 401"));
    let r = host.request().send();
    r.answer_http_call(TestResponse::new(302).header("location", "https://login"));
    assert_eq!(r.local_response().status, 302);
    assert_eq!(r.local_response().header("location"), Some("https://login"));
    assert_eq!(host.metric("ext_authz_denied"), Some(2));
}

#[test]
fn denials_can_use_a_configured_reply() {
    let mut c = config();
    c["deny"] = json!({"pass_through": false, "status": 404, "body": "no such thing\n"});
    let host = host_with(c);
    let r = host.request().send();
    r.answer_http_call(TestResponse::new(403).body("internal reason"));
    assert_eq!(r.local_response().status, 404);
    assert_eq!(r.local_response().body_text(), "no such thing\n");
}

#[test]
fn failures_deny_by_default_and_can_fail_open() {
    let host = host_with(config());
    let r = host.request().send();
    r.fail_http_call();
    assert_eq!(r.local_response().status, 503);
    assert_eq!(r.local_response().body_text(), "authorization service unavailable\n");
    assert_eq!(host.metric("ext_authz_failed"), Some(1));
    assert!(host.logged(LogLevel::Warn, "check of / failed"));

    let mut c = config();
    c["failure"] = json!({"allow": true});
    let open = host_with(c);
    let r = open.request().send();
    r.fail_http_call();
    assert!(r.try_upstream_request().is_some());
    assert_eq!(open.metric("ext_authz_failed_open"), Some(1));
}

#[test]
fn a_5xx_answer_follows_the_failure_policy() {
    // How hosts report a callout timeout: Sluice's synthetic 504, Envoy's local reply.
    let timeout = || {
        TestResponse::new(504).header("x-sluice-callout-error", "timeout").body("upstream request timeout")
    };
    let host = host_with(config());
    let r = host.request().path("/a?x=1").send();
    r.answer_http_call(timeout());
    assert_eq!(r.local_response().status, 503);
    assert_eq!(r.local_response().body_text(), "authorization service unavailable\n");
    assert!(host.logged(LogLevel::Warn, "check of /a failed: status 504 (timeout)"));
    let r = host.request().send();
    r.answer_http_call(TestResponse::new(500).body("bug"));
    assert_eq!(r.local_response().status, 503);
    assert_eq!((host.metric("ext_authz_failed"), host.metric("ext_authz_denied")), (Some(2), Some(0)));

    let mut c = config();
    c["failure"] = json!({"allow": true});
    let open = host_with(c);
    let r = open.request().header("x-user", "spoofed").send();
    r.answer_http_call(TestResponse::new(503).header("x-user", "alice"));
    assert_eq!(r.upstream_request().header("x-user"), None, "a failed check copies nothing upstream");
    assert_eq!(open.metric("ext_authz_failed_open"), Some(1));
}

#[test]
fn skipped_paths_are_not_checked() {
    let host = host_with(config());
    let r = host.request().path("/healthz/live").send();
    assert!(host.http_calls().is_empty());
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn method_override_and_hostile_headers() {
    let mut c = config();
    c["method"] = json!("GET");
    c["allowed_headers"] = json!(["*"]);
    let host = host_with(c);
    let r = host.request().method("DELETE").header("x-é", "\u{0}").header("x", &"v".repeat(10_000)).send();
    let call = r.http_call();
    assert_eq!(call.method(), Some("GET"));
    assert_eq!(call.header("x-forwarded-method"), Some("DELETE"));
    assert_eq!(call.header("x").map(str::len), Some(10_000));
    r.answer_http_call(TestResponse::new(200));
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn bad_configs_are_rejected() {
    let cases = [
        (json!({}), "missing field `cluster`"),
        (json!({"cluster": ""}), "cluster must not be empty"),
        (json!({"cluster": "a", "path_prefix": "x"}), "path_prefix must start with /"),
        (json!({"cluster": "a", "timeout": 0}), "timeout must be positive"),
        (json!({"cluster": "a", "failure": {"status": 42}}), "failure.status"),
        (json!({"cluster": "a", "deny": {"stauts": 403}}), "unknown field `stauts`"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<ExtAuthzRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
