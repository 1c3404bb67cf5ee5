//! The fault filter under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use sluice_filter_fault::FaultRoot;
use sluice_sdk::GrpcStatus;
use sluice_sdk::testing::{TestHost, TestResponse};

fn host(config: serde_json::Value) -> TestHost {
    TestHost::new::<FaultRoot>().config(config).unwrap()
}

#[test]
fn without_rules_requests_pass_and_no_timer_runs() {
    let host = host(json!({}));
    let r = host.request().path("/a").send();
    assert_eq!(r.upstream_request().path(), Some("/a"));
    assert_eq!(r.response().status(), Some(200));
    assert_eq!(host.tick_period(), None);
}

#[test]
fn abort_answers_with_the_status_and_body() {
    let host = host(json!({"rules": [{"abort": {"http_status": 503, "body": "chaos\n"}}]}));
    let r = host.request().send();
    let local = r.local_response();
    assert_eq!(local.status, 503);
    assert_eq!(local.body_text(), "chaos\n");
    assert_eq!(local.header("x-fault-injected"), Some("abort"));
    assert!(r.try_upstream_request().is_none());
    assert_eq!(host.metric("fault_aborts_injected"), Some(1));
}

#[test]
fn grpc_abort_for_grpc_requests_and_http_for_the_rest() {
    let host = host(json!({"rules": [{"abort": {"http_status": 503, "grpc_status": 14}}]}));
    let r = host.request().method("POST").header("content-type", "application/grpc+proto").send();
    let local = r.local_response();
    assert_eq!(local.status, 200);
    assert_eq!(local.grpc_status, Some(GrpcStatus::Unavailable));
    let r = host.request().send();
    assert_eq!(r.local_response().status, 503);
    assert_eq!(r.local_response().grpc_status, None);

    // Only a gRPC status: every request gets a gRPC reply.
    let host = self::host(json!({"rules": [{"abort": {"grpc_status": 8}}]}));
    assert_eq!(host.request().send().local_response().grpc_status, Some(GrpcStatus::ResourceExhausted));
}

#[test]
fn delay_holds_the_request_until_the_timer_fires() {
    let host = host(json!({"rules": [{"delay": {"fixed": "500ms"}}], "tick": "10ms"}));
    assert_eq!(host.tick_period(), Some(Duration::from_millis(10)));
    let r = host.request().path("/slow").upstream(TestResponse::new(200).body("ok")).send();
    assert!(r.is_paused());
    assert!(r.try_upstream_request().is_none());
    assert_eq!(host.metric("fault_delays_injected"), Some(1));
    assert_eq!(host.metric("fault_active_delays"), Some(1));
    host.advance(Duration::from_millis(480));
    assert!(r.is_paused(), "released too early");
    host.advance(Duration::from_millis(30));
    assert!(!r.is_paused());
    assert_eq!(r.upstream_request().path(), Some("/slow"));
    assert_eq!(r.response().body_text(), "ok");
    assert_eq!(r.response().header("x-fault-injected"), Some("delay"));
    assert_eq!(host.metric("fault_active_delays"), Some(0));
}

#[test]
fn delays_release_each_request_at_its_own_time() {
    let host = host(json!({"header_faults": {"enabled": true}}));
    let slow = host.request().header("x-fault-delay", "300").send();
    let fast = host.request().header("x-fault-delay", "100").send();
    let none = host.request().send();
    assert!(none.try_upstream_request().is_some());
    host.advance(Duration::from_millis(150));
    assert!(!fast.is_paused());
    assert!(slow.is_paused());
    host.advance(Duration::from_millis(200));
    assert!(!slow.is_paused());
    assert!(slow.try_upstream_request().is_some());
}

#[test]
fn rules_select_by_route_name() {
    let host = host(json!({"rules": [{"routes": ["reviews"], "abort": {"http_status": 500}}]}));
    let r = host.request().property(&["xds", "route_name"], "reviews").send();
    assert_eq!(r.local_response().status, 500);
    let r = host.request().property(&["xds", "route_name"], "ratings").send();
    assert!(r.try_upstream_request().is_some());
    // No route name known: route-scoped rules do not apply.
    assert!(host.request().send().try_upstream_request().is_some());
}

#[test]
fn rules_select_by_path_and_headers_first_match_wins() {
    let host = host(json!({"rules": [
        {"name": "testers", "paths": [{"prefix": "/api/"}], "headers": {"x-user": "tester"}, "abort": {"http_status": 418}},
        {"paths": [{"prefix": "/api/"}], "headers": {"x-chaos": "*"}, "abort": {"http_status": 503}},
    ]}));
    assert_eq!(host.request().path("/api/x").header("x-user", "tester").send().local_response().status, 418);
    assert_eq!(host.request().path("/api/x").header("x-chaos", "yes").send().local_response().status, 503);
    assert!(host.request().path("/api/x").header("x-user", "bob").send().try_upstream_request().is_some());
    assert!(host.request().path("/web").header("x-user", "tester").send().try_upstream_request().is_some());
}

#[test]
fn percentage_applies_to_about_that_share() {
    let host = host(json!({"rules": [{"abort": {"http_status": 503, "percentage": 30}}]}));
    let aborted = (0..400).filter(|_| host.request().send().try_local_response().is_some()).count();
    assert!((70..170).contains(&aborted), "{aborted} of 400 aborted at 30%");
    let host = self::host(json!({"rules": [{"abort": {"http_status": 503, "percentage": 0}}]}));
    assert!((0..100).all(|_| host.request().send().try_local_response().is_none()));
}

#[test]
fn header_faults_only_when_enabled() {
    let off = host(json!({}));
    let r = off.request().header("x-fault-abort", "503").header("x-fault-delay", "1000").send();
    assert!(r.try_upstream_request().is_some());

    let on = host(json!({"header_faults": {"enabled": true, "max_delay": "2s"}}));
    assert_eq!(on.request().header("x-fault-abort", "429").send().local_response().status, 429);
    let r = on.request().header("x-fault-abort-grpc", "16").send();
    assert_eq!(r.local_response().grpc_status, Some(GrpcStatus::Unauthenticated));
    let r = on.request().header("x-fault-abort", "503").header("x-fault-abort-percentage", "0").send();
    assert!(r.try_upstream_request().is_some());
    // The header delay is capped by max_delay.
    let r = on.request().header("x-fault-delay", "3600000").send();
    assert!(r.is_paused());
    on.advance(Duration::from_millis(2010));
    assert!(!r.is_paused());
}

#[test]
fn hostile_header_values_are_ignored() {
    let on = host(json!({"header_faults": {"enabled": true}}));
    for v in ["", "-1", "abc", "99999999999999999999", "1e9", "NaN", " 7 0", "\u{0}", "600", "199", "0"] {
        let r = on
            .request()
            .header("x-fault-abort", v)
            .header("x-fault-abort-grpc", v)
            .header("x-fault-delay-percentage", v)
            .header("x-fault-abort-percentage", v)
            .send();
        assert!(r.try_upstream_request().is_some() || r.is_paused(), "{v:?}");
    }
    let r = on.request().header("x-fault-delay", "abc").send();
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn max_active_faults_caps_concurrent_delays() {
    let host = host(json!({"rules": [{"delay": {"fixed": "1s"}}], "max_active_faults": 2}));
    let a = host.request().send();
    let b = host.request().send();
    let c = host.request().send();
    assert!(a.is_paused() && b.is_paused());
    assert!(c.try_upstream_request().is_some(), "third request should not be delayed");
}

#[test]
fn bad_configs_are_rejected_with_the_field() {
    let cases = [
        (json!({"rules": [{}]}), "needs a delay or an abort"),
        (json!({"rules": [{"abort": {"http_status": 99}}]}), "rules[0].abort.http_status"),
        (json!({"rules": [{"abort": {"grpc_status": 0}}]}), "not a gRPC error status"),
        (json!({"rules": [{"abort": {}}]}), "set http_status or grpc_status"),
        (json!({"rules": [{"delay": {"fixed": "1s", "percentage": 101}}]}), "not a percentage"),
        (json!({"rules": [{"delay": {"fixed": "1w"}}]}), "unknown unit"),
        (json!({"rules": [{"delay": {"fixd": "1s"}}]}), "unknown field `fixd`"),
        (json!({"tick": 0}), "tick must be positive"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<FaultRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
