//! The headers/CORS filter under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use sluice_filter_headers::HeadersRoot;
use sluice_sdk::testing::{TestHost, TestResponse};

fn host_with(config: Value) -> TestHost {
    TestHost::new::<HeadersRoot>().config(config).unwrap()
}

#[test]
fn request_and_response_edits_apply_in_order() {
    let host = host_with(json!({
        "request": {
            "remove": ["x-debug"],
            "rename": {"x-old": "x-new"},
            "set": {"x-env": "prod", "x-new": "ignored-because-set-runs-after-rename"},
            "add": {"x-tag": "b"},
        },
        "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}, "add": {"cache-control": "no-store"},
                     "rename": {"x-upstream-time": "x-time"}},
    }));
    let r = host
        .request()
        .header("x-debug", "1")
        .header("x-old", "v1")
        .header("x-old", "v2")
        .header("x-env", "dev")
        .header("x-tag", "a")
        .upstream(
            TestResponse::new(200)
                .header("server", "nginx")
                .header("x-upstream-time", "5")
                .header("cache-control", "private"),
        )
        .send();
    let up = r.upstream_request();
    assert_eq!(up.header("x-debug"), None);
    assert_eq!(up.header("x-old"), None);
    assert_eq!(up.header_all("x-new"), ["ignored-because-set-runs-after-rename"]);
    assert_eq!(up.header_all("x-env"), ["prod"]);
    assert_eq!(up.header_all("x-tag"), ["a", "b"]);
    let resp = r.response();
    assert_eq!(resp.header("server"), None);
    assert_eq!(resp.header("x-frame-options"), Some("DENY"));
    assert_eq!(resp.header_all("cache-control"), ["private", "no-store"]);
    assert_eq!(resp.header("x-time"), Some("5"));
    assert_eq!(resp.header("x-upstream-time"), None);
}

#[test]
fn rename_moves_all_values() {
    let host = host_with(json!({"request": {"rename": {"a": "b"}}}));
    let r = host.request().header("a", "1").header("a", "2").header("b", "old").send();
    assert_eq!(r.upstream_request().header_all("b"), ["1", "2"]);
    let r = host.request().header("b", "kept").send();
    assert_eq!(r.upstream_request().header_all("b"), ["kept"], "nothing to rename: b untouched");
}

fn cors() -> Value {
    json!({"cors": {
        "allow_origins": ["https://app.example.com", "https://*.example.org"],
        "allow_methods": ["GET", "PUT"],
        "allow_headers": ["content-type", "authorization"],
        "expose_headers": ["x-request-id"],
        "max_age": "10m",
        "allow_credentials": true,
    }})
}

#[test]
fn preflight_from_an_allowed_origin_is_answered() {
    let host = host_with(cors());
    let r = host
        .request()
        .method("OPTIONS")
        .header("origin", "https://admin.example.org")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "content-type")
        .send();
    let local = r.local_response();
    assert_eq!(local.status, 204);
    assert_eq!(local.header("access-control-allow-origin"), Some("https://admin.example.org"));
    assert_eq!(local.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(local.header("access-control-allow-headers"), Some("content-type, authorization"));
    assert_eq!(local.header("access-control-max-age"), Some("600"));
    assert_eq!(local.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(local.header("vary"), Some("origin"));
    assert!(r.try_upstream_request().is_none());
    assert_eq!(r.response().header_all("access-control-allow-origin").len(), 1, "not added twice");
    assert_eq!(host.metric("cors_preflights"), Some(1));
}

#[test]
fn preflight_from_other_origins_goes_upstream_or_is_refused() {
    let host = host_with(cors());
    let preflight = |host: &TestHost, origin: &str| {
        host.request()
            .method("OPTIONS")
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let r = preflight(&host, "https://evil.example.com");
    assert!(r.try_upstream_request().is_some());
    assert_eq!(r.response().header("access-control-allow-origin"), None);
    let mut c = cors();
    c["cors"]["reject_disallowed_preflight"] = json!(true);
    let strict = host_with(c);
    let r = preflight(&strict, "https://evil.example.com");
    assert_eq!(r.local_response().status, 403);
    assert_eq!(strict.metric("cors_rejected"), Some(1));
    // An OPTIONS without access-control-request-method is not a preflight.
    let r = strict.request().method("OPTIONS").header("origin", "https://evil.example.com").send();
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn actual_requests_get_cors_response_headers() {
    let host = host_with(cors());
    let r = host
        .request()
        .header("origin", "https://app.example.com")
        .upstream(TestResponse::new(200).header("vary", "accept-encoding"))
        .send();
    let resp = r.response();
    assert_eq!(resp.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert_eq!(resp.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(resp.header("access-control-expose-headers"), Some("x-request-id"));
    assert_eq!(resp.header_all("vary"), ["accept-encoding", "origin"]);
    let r = host.request().header("origin", "https://app.example.com.evil.net").send();
    assert_eq!(r.response().header("access-control-allow-origin"), None);
    let r = host.request().send();
    assert_eq!(r.response().header("access-control-allow-origin"), None);
}

#[test]
fn wildcard_origin_without_credentials_answers_star_and_reflects_headers() {
    let host = host_with(json!({"cors": {"allow_origins": ["*"], "allow_headers": ["*"], "max_age": 86400}}));
    let r = host
        .request()
        .method("OPTIONS")
        .header("origin", "https://anyone.test")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-custom, content-type")
        .send();
    let local = r.local_response();
    assert_eq!(local.header("access-control-allow-origin"), Some("*"));
    assert_eq!(local.header("access-control-allow-headers"), Some("x-custom, content-type"));
    assert_eq!(local.header("access-control-allow-methods"), Some("GET, HEAD, POST"));
    assert_eq!(local.header("access-control-allow-credentials"), None);
    assert_eq!(local.header("access-control-max-age"), Some("86400"), "a bare number is seconds");
    // With credentials, `*` must not be sent: the origin is echoed.
    let host = host_with(json!({"cors": {"allow_origins": ["*"], "allow_credentials": true}}));
    let r = host.request().header("origin", "https://a.test").send();
    assert_eq!(r.response().header("access-control-allow-origin"), Some("https://a.test"));
}

#[test]
fn hostile_origins_never_panic() {
    let host = host_with(cors());
    for o in [
        "",
        "*",
        "null",
        "https://",
        "://",
        "https://*.example.org",
        "\u{0}",
        "é://é.example.org",
        &"a".repeat(10_000),
    ] {
        let r = host
            .request()
            .method("OPTIONS")
            .header("origin", o)
            .header("access-control-request-method", "GET")
            .send();
        assert!(r.try_upstream_request().is_some() || r.try_local_response().is_some(), "{o:.20}");
    }
}

#[test]
fn bad_configs_are_rejected() {
    let cases = [
        (json!({"request": {"set": {":path": "/x"}}}), "pseudo-headers cannot be edited"),
        (json!({"response": {"add": {"x": "a\r\nb"}}}), "control characters"),
        (json!({"request": {"remove": ["bad name"]}}), "is not a header name"),
        (json!({"cors": {"allow_origins": []}}), "at least one origin"),
        (json!({"cors": {"allow_origins": ["https://*"]}}), "`*.suffix` pattern"),
        (json!({"cors": {"allow_origins": ["*"], "allow_methods": ["GET, POST"]}}), "comma"),
        (json!({"cors": {"allow_origins": ["*"], "max_age": "forever"}}), "max_age"),
        (json!({"request": {"sett": {}}}), "unknown field `sett`"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<HeadersRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
