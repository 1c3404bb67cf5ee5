//! The api-key filter under the SDK's test kit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use sluice_filter_api_key::ApiKeyRoot;
use sluice_filter_common::hex;
use sluice_sdk::LogLevel;
use sluice_sdk::testing::TestHost;

fn sha(s: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(s.as_bytes()))
}

fn config() -> Value {
    json!({
        "keys": [
            {"client": "alice", "key": "k-alice"},
            {"client": "ci", "key_sha256": sha("k-ci")},
            {"client": "reports", "key": "k-reports", "paths": [{"prefix": "/reports/"}]},
        ],
        "from": [{"header": "x-api-key"}, {"header": "authorization", "prefix": "ApiKey "}, {"query": "api_key"}],
        "basic": {"users": [{"user": "bob", "password": "pw"}, {"user": "carol", "password_sha256": sha("c-pw")}]},
        "realm": "shop",
        "skip": [{"exact": "/healthz"}],
    })
}

fn host() -> TestHost {
    TestHost::new::<ApiKeyRoot>().config(config()).unwrap()
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

#[test]
fn keys_from_every_source_pass_and_are_stripped() {
    let host = host();
    let r = host.request().header("x-api-key", "k-alice").send();
    let up = r.upstream_request();
    assert_eq!(up.header("x-api-client"), Some("alice"));
    assert_eq!(up.header("x-api-key"), None);
    let r = host.request().header("authorization", "apikey k-ci").send();
    assert_eq!(r.upstream_request().header("x-api-client"), Some("ci"));
    assert_eq!(r.upstream_request().header("authorization"), None);
    let r = host.request().path("/x?a=1&api_key=k-alice").send();
    assert_eq!(r.upstream_request().path(), Some("/x?a=1"));
    assert_eq!(host.metric("api_key_allowed"), Some(3));
}

#[test]
fn basic_auth_users_pass() {
    let host = host();
    let r = host.request().header("authorization", &basic("bob", "pw")).send();
    assert_eq!(r.upstream_request().header("x-api-client"), Some("bob"));
    assert_eq!(r.upstream_request().header("authorization"), None);
    let r = host.request().header("authorization", &basic("carol", "c-pw")).send();
    assert_eq!(r.upstream_request().header("x-api-client"), Some("carol"));
    for (u, p) in [("bob", "c-pw"), ("carol", "pw"), ("eve", "pw"), ("bob", "")] {
        let r = host.request().header("authorization", &basic(u, p)).send();
        assert_eq!(r.local_response().status, 401, "{u}:{p}");
        assert_eq!(r.local_response().body_text(), "invalid user or password\n");
    }
}

#[test]
fn missing_credentials_get_401_with_both_challenges() {
    let host = host();
    let r = host.request().path("/x").send();
    let local = r.local_response();
    assert_eq!(local.status, 401);
    let challenges: Vec<&str> =
        local.headers.iter().filter(|(k, _)| k == "www-authenticate").map(|(_, v)| v.as_str()).collect();
    assert_eq!(challenges, ["ApiKey realm=\"shop\"", "Basic realm=\"shop\", charset=\"UTF-8\""]);
    assert_eq!(local.body_text(), "missing credentials\n");
    assert_eq!(host.metric("api_key_denied_missing"), Some(1));
}

#[test]
fn wrong_keys_get_401_and_the_key_is_never_echoed() {
    let host = host();
    let r = host.request().header("x-api-key", "k-alicE").send();
    let local = r.local_response();
    assert_eq!(local.status, 401);
    assert_eq!(local.body_text(), "invalid api key\n");
    assert!(!host.logs().iter().any(|l| l.message.contains("k-alicE")));
    assert!(host.logged(LogLevel::Info, "denied /: invalid api key"));
    assert_eq!(host.metric("api_key_denied_invalid"), Some(1));
}

#[test]
fn keys_limited_to_paths_get_403_elsewhere() {
    let host = host();
    assert!(
        host.request()
            .path("/reports/q1")
            .header("x-api-key", "k-reports")
            .send()
            .try_upstream_request()
            .is_some()
    );
    let r = host.request().path("/admin").header("x-api-key", "k-reports").send();
    assert_eq!(r.local_response().status, 403);
    assert!(host.logged(LogLevel::Info, "client reports is not allowed"));
    assert_eq!(host.metric("api_key_denied_forbidden"), Some(1));
}

#[test]
fn skipped_paths_and_spoofed_client_header() {
    let host = host();
    let r = host.request().path("/healthz").header("x-api-client", "admin").send();
    assert_eq!(r.upstream_request().header("x-api-client"), None);
    let r = host.request().header("x-api-key", "k-alice").header("x-api-client", "admin").send();
    assert_eq!(r.upstream_request().header_all("x-api-client"), ["alice"]);
}

#[test]
fn keys_in_shared_data_are_loaded_and_refreshed() {
    let host = TestHost::new::<ApiKeyRoot>()
        .config(json!({"shared_data_key": "tenants/api-keys", "refresh": "5s"}))
        .unwrap();
    assert_eq!(host.tick_period(), Some(Duration::from_secs(5)));
    assert_eq!(host.request().header("x-api-key", "k-dyn").send().local_response().status, 401);
    host.set_shared_data(
        "tenants/api-keys",
        json!({"keys": [{"client": "dyn", "key": "k-dyn"}]}).to_string(),
    );
    host.advance(Duration::from_secs(5));
    let r = host.request().header("x-api-key", "k-dyn").send();
    assert_eq!(r.upstream_request().header("x-api-client"), Some("dyn"));
    // A bad write keeps the previous keys.
    host.set_shared_data("tenants/api-keys", "{oops");
    host.advance(Duration::from_secs(5));
    assert!(host.request().header("x-api-key", "k-dyn").send().try_upstream_request().is_some());
    assert!(host.logged(LogLevel::Warn, "ignoring shared data"));
    // Removing the value removes the keys.
    host.set_shared_data("tenants/api-keys", "");
    host.advance(Duration::from_secs(5));
    assert_eq!(host.request().header("x-api-key", "k-dyn").send().local_response().status, 401);
}

#[test]
fn hostile_credentials_never_panic() {
    let host = host();
    let long = "k".repeat(50_000);
    for v in
        ["", " ", "Basic", "Basic ", "Basic !!!", "Basic Og==", "basic \u{0}", "ApiKey ", &long, "\u{1F600}"]
    {
        let r = host
            .request()
            .header("authorization", v)
            .header("x-api-key", v)
            .path(&format!("/?api_key={v}"))
            .send();
        assert!(r.try_local_response().is_some(), "{v:.40}");
    }
}

#[test]
fn bad_configs_are_rejected() {
    let cases = [
        (json!({}), "no credentials"),
        (json!({"keys": [{"client": "a"}]}), "keys[0] (a): set exactly one non-empty secret"),
        (json!({"keys": [{"client": "a", "key": "x", "key_sha256": sha("x")}]}), "exactly one"),
        (json!({"keys": [{"client": "a", "key_sha256": "abc"}]}), "64 hex digits"),
        (json!({"basic": {"users": [{"user": "a:b", "password": "x"}]}}), "cannot contain ':'"),
        (json!({"keys": [{"client": "a", "key": "x"}], "from": [{"cookie": "x"}]}), "from"),
        (json!({"keys": [{"client": "a", "key": "x"}], "realm": "\"x"}), "realm"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<ApiKeyRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}
