//! The canary router under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use sluice_filter_canary_router::CanaryRoot;
use sluice_sdk::testing::TestHost;

fn config() -> Value {
    json!({
        "targets": {
            "v2": {"authority": "reviews-v2.internal", "prefix_rewrite": {"from": "/api/", "to": "/api/v2/"}},
        },
        "rules": [
            {"header": {"name": "x-canary", "value": "always"}, "target": "v2"},
            {"header": {"name": "x-canary", "value": "never"}, "target": "v1"},
            {"cookie": {"name": "canary", "value": "1"}, "target": "v2"},
            {"query": {"name": "canary"}, "target": "v2"},
            {"paths": [{"prefix": "/api/"}], "weights": {"v1": 80, "v2": 20}, "sticky": {"header": "x-user-id"}},
        ],
        "default": "v1",
        "response_header": "x-served-by",
    })
}

fn host_with(config: Value) -> TestHost {
    TestHost::new::<CanaryRoot>().config(config).unwrap()
}

fn target_of(
    host: &TestHost,
    build: impl FnOnce(sluice_sdk::testing::RequestBuilder) -> sluice_sdk::testing::RequestBuilder,
) -> Option<String> {
    let r = build(host.request()).send();
    r.upstream_request().header("x-sluice-canary").map(str::to_owned)
}

#[test]
fn header_cookie_and_query_rules_pick_their_target() {
    let host = host_with(config());
    assert_eq!(target_of(&host, |r| r.path("/web").header("x-canary", "always")).as_deref(), Some("v2"));
    assert_eq!(target_of(&host, |r| r.path("/api/x").header("x-canary", "never")).as_deref(), Some("v1"));
    assert_eq!(target_of(&host, |r| r.path("/web").header("cookie", "a=b; canary=1")).as_deref(), Some("v2"));
    assert_eq!(target_of(&host, |r| r.path("/web?canary")).as_deref(), Some("v2"));
    assert_eq!(
        target_of(&host, |r| r.path("/web").header("cookie", "canary=0")).as_deref(),
        Some("v1"),
        "default"
    );
    assert_eq!(host.metric("canary_router_selected_v2"), Some(3));
    assert_eq!(host.metric("canary_router_selected_v1"), Some(2));
}

#[test]
fn the_chosen_target_rewrites_authority_and_path_and_is_echoed() {
    let host = host_with(config());
    let r = host.request().path("/api/items?q=1").authority("reviews").header("x-canary", "always").send();
    let up = r.upstream_request();
    assert_eq!(up.header(":authority"), Some("reviews-v2.internal"));
    assert_eq!(up.path(), Some("/api/v2/items?q=1"));
    assert_eq!(r.response().header("x-served-by"), Some("v2"));
    // v1 has no rewrites.
    let r = host.request().path("/api/items").authority("reviews").header("x-canary", "never").send();
    assert_eq!(r.upstream_request().header(":authority"), Some("reviews"));
    assert_eq!(r.upstream_request().path(), Some("/api/items"));
}

#[test]
fn sticky_weights_keep_each_user_on_one_target() {
    let host = host_with(config());
    let mut v2_users = 0;
    for user in 0..500 {
        let id = format!("user-{user}");
        let first = target_of(&host, |r| r.path("/api/a").header("x-user-id", &id)).unwrap();
        for _ in 0..3 {
            assert_eq!(
                target_of(&host, |r| r.path("/api/b").header("x-user-id", &id)).unwrap(),
                first,
                "{id}"
            );
        }
        if first == "v2" {
            v2_users += 1;
        }
    }
    assert!((60..140).contains(&v2_users), "{v2_users} of 500 users on v2 at 20%");
    // Without the sticky key the split is random but still weighted.
    let v2 = (0..500).filter(|_| target_of(&host, |r| r.path("/api/a")).as_deref() == Some("v2")).count();
    assert!((50..150).contains(&v2), "{v2}");
}

#[test]
fn sticky_cookie_and_salt() {
    let c =
        json!({"rules": [{"weights": {"a": 50, "b": 50}, "sticky": {"cookie": "session"}, "salt": "s1"}]});
    let host = host_with(c);
    let pick = |s: &str| target_of(&host, |r| r.header("cookie", &format!("session={s}"))).unwrap();
    for s in ["x", "y", "z"] {
        assert_eq!(pick(s), pick(s));
    }
    let both = (0..100).map(|i| pick(&i.to_string())).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(both.len(), 2);
}

#[test]
fn clients_cannot_steer_with_the_header_itself() {
    let host = host_with(json!({"rules": [{"header": {"name": "x-canary"}, "target": "v2"}]}));
    let r = host.request().header("x-sluice-canary", "v2").send();
    assert_eq!(r.upstream_request().header("x-sluice-canary"), None);
    assert_eq!(host.metric("canary_router_unrouted"), Some(1));
    let r = host.request().header("x-sluice-canary", "v9").header("x-canary", "").send();
    assert_eq!(r.upstream_request().header_all("x-sluice-canary"), ["v2"]);
}

#[test]
fn hostile_inputs_never_panic() {
    let host = host_with(config());
    for v in ["", ";", "=;=", "canary", "canary=", "\u{0}", "é=é; canary=1é", &"c=".repeat(5000)] {
        let r = host
            .request()
            .path(&format!("/api/{v}?{v}&canary={v}%zz"))
            .header("cookie", v)
            .header("x-user-id", v)
            .send();
        assert!(r.try_upstream_request().is_some(), "{v:.30}");
    }
}

#[test]
fn bad_configs_are_rejected() {
    let cases = [
        (json!({"rules": [{"target": "v2"}]}), "exactly one of header, cookie, query, weights"),
        (
            json!({"rules": [{"header": {"name": "a"}, "cookie": {"name": "b"}, "target": "v2"}]}),
            "exactly one",
        ),
        (json!({"rules": [{"header": {"name": "a"}}]}), "target is required"),
        (json!({"rules": [{"weights": {"a": 0}}]}), "add up to 0"),
        (json!({"rules": [{"weights": {"a": 1}, "target": "a"}]}), "no target"),
        (
            json!({"rules": [{"header": {"name": "a"}, "target": "x", "sticky": {"header": "u"}}]}),
            "sticky only",
        ),
        (json!({"rules": [], "header": ":authority"}), "regular header"),
        (
            json!({"rules": [], "targets": {"v2": {"prefix_rewrite": {"from": "a", "to": "/b"}}}}),
            "targets.v2.prefix_rewrite",
        ),
        (json!({"rules": [{"weights": {"a": -1}}]}), "rules[0].weights.a"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<CanaryRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
