//! The rate-limit filter under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use sluice_filter_common::{fnv1a64, hex};
use sluice_filter_rate_limit::RateLimitRoot;
use sluice_sdk::testing::{Exchange, TestHost};

fn host_with(config: Value) -> TestHost {
    TestHost::new::<RateLimitRoot>().plugin_name("rl").config(config).unwrap()
}

fn per_user() -> Value {
    json!({"rules": [{"name": "per-user", "key": {"header": "x-user"}, "requests": 3, "per": "1m"}]})
}

fn remaining(r: &Exchange) -> Option<String> {
    r.response().header("x-ratelimit-remaining").map(str::to_owned)
}

#[test]
fn a_burst_is_allowed_then_429_with_retry_after() {
    let host = host_with(per_user());
    for left in ["2", "1", "0"] {
        let r = host.request().header("x-user", "alice").send();
        assert!(r.try_upstream_request().is_some());
        assert_eq!(remaining(&r).as_deref(), Some(left));
        assert_eq!(r.response().header("x-ratelimit-limit"), Some("3"));
    }
    let r = host.request().header("x-user", "alice").send();
    let local = r.local_response();
    assert_eq!(local.status, 429);
    assert_eq!(local.body_text(), "rate limited\n");
    assert_eq!(local.header("retry-after"), Some("20"), "one token every 20s");
    assert_eq!(local.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(local.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(local.header("x-ratelimit-reset"), Some("60"));
    assert_eq!(host.metric("rate_limit_limited"), Some(1));
    assert_eq!(host.metric("rate_limit_allowed"), Some(3));
    // Other keys have their own bucket.
    assert!(host.request().header("x-user", "bob").send().try_upstream_request().is_some());
    // Tokens come back at the configured rate.
    host.advance(Duration::from_secs(19));
    assert_eq!(host.request().header("x-user", "alice").send().local_response().status, 429);
    host.advance(Duration::from_secs(1));
    assert!(host.request().header("x-user", "alice").send().try_upstream_request().is_some());
}

#[test]
fn missing_keys_skip_the_rule_or_share_a_bucket() {
    let host = host_with(per_user());
    for _ in 0..10 {
        let r = host.request().send();
        assert!(r.try_upstream_request().is_some());
        assert_eq!(r.response().header("x-ratelimit-limit"), None);
    }
    let mut c = per_user();
    c["rules"][0]["missing_key"] = json!("shared");
    let host = host_with(c);
    let limited = (0..5).filter(|_| host.request().send().try_local_response().is_some()).count();
    assert_eq!(limited, 2);
}

#[test]
fn buckets_are_shared_across_vms() {
    let a = host_with(per_user());
    let b = TestHost::new::<RateLimitRoot>().plugin_name("rl").share_with(&a).config(per_user()).unwrap();
    assert!(a.request().header("x-user", "u").send().try_upstream_request().is_some());
    assert!(b.request().header("x-user", "u").send().try_upstream_request().is_some());
    assert!(a.request().header("x-user", "u").send().try_upstream_request().is_some());
    assert_eq!(b.request().header("x-user", "u").send().local_response().status, 429);
}

#[test]
fn source_ip_ignores_the_port_and_route_keys_use_the_route_name() {
    let host = host_with(json!({"rules": [{"name": "ip", "key": "source_ip", "requests": 1, "per": "1s"}]}));
    assert!(host.request().source_address("10.0.0.1:1000").send().try_upstream_request().is_some());
    assert_eq!(host.request().source_address("10.0.0.1:2000").send().local_response().status, 429);
    assert!(host.request().source_address("10.0.0.2:1000").send().try_upstream_request().is_some());
    assert!(host.request().source_address("[::1]:80").send().try_upstream_request().is_some());

    let host = host_with(
        json!({"rules": [{"name": "r", "key": "route", "requests": 1, "per": "1s", "routes": ["api"]}]}),
    );
    let send = |route: &str| host.request().property(&["xds", "route_name"], route).send();
    assert!(send("api").try_upstream_request().is_some());
    assert_eq!(send("api").local_response().status, 429);
    assert!(send("web").try_upstream_request().is_some(), "rule scoped to the api route");
    assert!(send("web").try_upstream_request().is_some());
}

#[test]
fn global_rules_scoped_by_path_and_method() {
    let host = host_with(json!({"rules": [
        {"name": "writes", "key": "global", "requests": 2, "per": "1h", "paths": [{"prefix": "/api/"}], "methods": ["POST"]},
    ]}));
    let post = || host.request().method("POST").path("/api/x").send();
    assert!(post().try_upstream_request().is_some());
    assert!(post().try_upstream_request().is_some());
    assert_eq!(post().local_response().header("retry-after"), Some("1800"));
    assert!(host.request().path("/api/x").send().try_upstream_request().is_some(), "GET not limited");
    assert!(host.request().method("POST").path("/web").send().try_upstream_request().is_some());
}

#[test]
fn headers_report_the_tightest_rule() {
    let host = host_with(json!({
        "rules": [
            {"name": "wide", "key": "global", "requests": 100, "per": "1s"},
            {"name": "narrow", "key": {"header": "x-user"}, "requests": 5, "per": "1s", "burst": 2},
        ],
        "status": 503,
        "body": "slow down\n",
    }));
    let r = host.request().header("x-user", "a").send();
    assert_eq!(r.response().header("x-ratelimit-limit"), Some("5"));
    assert_eq!(remaining(&r).as_deref(), Some("1"));
    host.request().header("x-user", "a").send();
    let r = host.request().header("x-user", "a").send();
    assert_eq!(r.local_response().status, 503);
    assert_eq!(r.local_response().body_text(), "slow down\n");
    assert_eq!(r.local_response().header("retry-after"), Some("1"));
}

#[test]
fn response_headers_can_be_turned_off() {
    let mut c = per_user();
    c["response_headers"] = json!(false);
    let host = host_with(c);
    let r = host.request().header("x-user", "a").send();
    assert_eq!(r.response().header("x-ratelimit-remaining"), None);
}

#[test]
fn garbage_in_shared_data_is_a_fresh_bucket_and_hostile_keys_are_fine() {
    let host = host_with(json!({"rules": [{"name": "g", "key": "global", "requests": 1, "per": "1m"}]}));
    assert!(host.request().send().try_upstream_request().is_some());
    assert_eq!(host.request().send().local_response().status, 429);
    // The bucket lives under a fixed-size key; a value that is not a bucket counts
    // as a fresh one.
    let key = format!("sluice.ratelimit:rl:g:{}", hex(&fnv1a64(&[b""]).to_be_bytes()));
    assert_eq!(host.shared_data(&key).map(|v| v.len()), Some(16));
    host.set_shared_data(&key, "garbage");
    assert!(host.request().send().try_upstream_request().is_some());
    let host = host_with(per_user());
    for v in ["", "\u{0}", &"x".repeat(100_000), "é", "a:b:c"] {
        let r = host.request().header("x-user", v).send();
        assert!(r.try_upstream_request().is_some(), "{v:.20}");
    }
}

#[test]
fn bad_configs_are_rejected() {
    let cases = [
        (json!({"rules": []}), "at least one rule"),
        (json!({"rules": [{"name": "a", "key": "global", "requests": 0, "per": "1s"}]}), "must be positive"),
        (json!({"rules": [{"name": "a", "key": "global", "requests": 1, "per": 0}]}), "per must be positive"),
        (
            json!({"rules": [{"name": "a", "key": "global", "requests": 1, "per": "1s"}, {"name": "a", "key": "route", "requests": 1, "per": "1s"}]}),
            "unique",
        ),
        (json!({"rules": [{"name": "a", "key": "ip", "requests": 1, "per": "1s"}]}), "unknown variant `ip`"),
        (
            json!({"rules": [{"name": "a", "key": "global", "requests": 1, "per": "1s"}], "status": 200}),
            "not an error status",
        ),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<RateLimitRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
