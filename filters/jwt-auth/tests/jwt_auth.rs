//! The jwt-auth filter under the SDK's test kit: every algorithm, claim checks,
//! path rules, token locations, remote JWKS (cold start, sharing, refresh) and
//! hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sluice_filter_jwt_auth::JwtAuthRoot;
use sluice_sdk::LogLevel;
use sluice_sdk::testing::{TestHost, TestResponse};

#[path = "support/tokens.rs"]
mod tokens;
use tokens::{b64, ec_jwk, ec_key, es256, hs256, rs256, rsa_jwk, signing_input};

const NOW: u64 = 1_700_000_000;
const HS_SECRET: &[u8] = b"an-hmac-secret-of-32-bytes-long!";

fn jwks() -> Value {
    json!({"keys": [{"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)}, rsa_jwk("rs"), ec_jwk("es", 7)]})
}

fn claims() -> Value {
    json!({"iss": "https://idp.example", "aud": ["api"], "sub": "alice", "exp": NOW + 300, "nbf": NOW - 10,
           "groups": ["admin", "dev"], "org": {"id": "o-1"}})
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn config() -> Value {
    json!({
        "providers": [{
            "name": "idp",
            "issuer": "https://idp.example",
            "audiences": ["api"],
            "jwks": jwks(),
            "from_params": ["access_token"],
            "from_cookies": ["session"],
            "claims_to_headers": [{"claim": "sub", "header": "x-jwt-sub"}, {"claim": "groups", "header": "x-jwt-groups"},
                                  {"claim": "org.id", "header": "x-jwt-org"}],
            "payload_header": "x-jwt-payload",
        }],
        "rules": [
            {"match": {"prefix": "/public/"}, "action": "skip"},
            {"match": {"prefix": "/maybe/"}, "action": "allow_missing"},
        ],
        "clock_skew": "60s",
        "realm": "api",
    })
}

fn host_with(config: Value) -> TestHost {
    TestHost::new::<JwtAuthRoot>().now(UNIX_EPOCH + Duration::from_secs(NOW)).config(config).unwrap()
}

fn host() -> TestHost {
    host_with(config())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn every_algorithm_verifies_and_claims_are_forwarded() {
    let host = host();
    for token in [hs256("hs", &claims(), HS_SECRET), rs256("rs", &claims()), es256("es", &claims(), 7)] {
        let r = host.request().path("/api/x").header("authorization", &bearer(&token)).send();
        let up = r.upstream_request();
        assert_eq!(up.header("x-jwt-sub"), Some("alice"));
        assert_eq!(up.header("x-jwt-groups"), Some("admin,dev"));
        assert_eq!(up.header("x-jwt-org"), Some("o-1"));
        assert_eq!(up.header("x-jwt-payload"), token.split('.').nth(1));
        assert_eq!(up.header("authorization"), None, "the token is not forwarded by default");
    }
    assert_eq!(host.metric("jwt_auth_allowed"), Some(3));
}

#[test]
fn tokens_without_kid_try_every_key_of_their_algorithm() {
    let host = host();
    let input = signing_input(&json!({"alg": "ES256"}), &claims());
    let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&ec_key(7), input.as_bytes());
    let token = format!("{input}.{}", b64(&sig.to_bytes()));
    let r = host.request().header("authorization", &bearer(&token)).send();
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn missing_token_is_a_401_challenge_without_error_code() {
    let host = host();
    let r = host.request().path("/api").send();
    let local = r.local_response();
    assert_eq!(local.status, 401);
    assert_eq!(local.header("www-authenticate"), Some("Bearer realm=\"api\""));
    assert_eq!(local.body_text(), "Jwt is missing\n");
    assert_eq!(host.metric("jwt_auth_denied_missing"), Some(1));
    // A header with another scheme is not a bearer token.
    let r = host.request().header("authorization", "Basic YTpi").send();
    assert_eq!(r.local_response().header("www-authenticate"), Some("Bearer realm=\"api\""));
}

fn denied(host: &TestHost, token: &str) -> (u16, String, String) {
    let r = host.request().path("/api?x=1").header("authorization", &bearer(token)).send();
    let local = r.local_response();
    assert!(!local.body_text().contains(token), "the token leaked into the body");
    (local.status, local.header("www-authenticate").unwrap_or_default().to_string(), local.body_text())
}

#[test]
fn invalid_tokens_get_invalid_token_with_a_reason() {
    let host = host();
    let cases = [
        (hs256("hs", &with(claims(), "exp", json!(NOW - 61)), HS_SECRET), "Jwt is expired", "expired"),
        (
            hs256("hs", &with(claims(), "nbf", json!(NOW + 61)), HS_SECRET),
            "Jwt not yet valid",
            "not_yet_valid",
        ),
        (
            hs256("hs", &with(claims(), "aud", json!("web")), HS_SECRET),
            "Audiences in Jwt are not allowed",
            "bad_audience",
        ),
        (
            hs256("hs", &with(claims(), "iss", json!("https://evil")), HS_SECRET),
            "Jwt issuer is not configured",
            "bad_issuer",
        ),
        (hs256("hs", &claims(), b"another-secret"), "Jwt verification fails", "bad_signature"),
        (es256("es", &claims(), 9), "Jwt verification fails", "bad_signature"),
        (
            hs256("nope", &claims(), HS_SECRET),
            "Jwks doesn't have key to match kid or alg from Jwt",
            "unknown_kid",
        ),
        ("not-a-jwt".to_string(), "Jwt is not in the form of Header.Payload.Signature", "malformed"),
        (
            format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims().to_string().as_bytes())),
            "Jwt algorithm is not supported",
            "unsupported_alg",
        ),
    ];
    let mut seen = std::collections::HashMap::new();
    for (token, description, code) in cases {
        let count = seen.entry(code).or_insert(0);
        *count += 1;
        let count = *count;
        let (status, challenge, body) = denied(&host, &token);
        assert_eq!(status, 401, "{code}");
        assert_eq!(
            challenge,
            format!("Bearer realm=\"api\", error=\"invalid_token\", error_description=\"{description}\""),
            "{code}"
        );
        assert_eq!(body, format!("{description}\n"));
        assert_eq!(host.metric(&format!("jwt_auth_denied_{code}")), Some(count), "{code}");
        assert!(host.logged(LogLevel::Info, &format!("denied /api: {code}")), "{code}");
        assert!(!host.logs().iter().any(|l| l.message.contains(&token)), "the token leaked into the log");
    }
}

#[test]
fn tampered_payload_fails_the_signature() {
    let host = host();
    let token = rs256("rs", &claims());
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = b64(with(claims(), "sub", json!("mallory")).to_string().as_bytes());
    let (status, challenge, _) = denied(&host, &parts.join("."));
    assert_eq!(status, 401);
    assert!(challenge.contains("Jwt verification fails"));
}

#[test]
fn clock_skew_is_honoured() {
    let host = host();
    let ok = hs256("hs", &with(with(claims(), "exp", json!(NOW - 30)), "nbf", json!(NOW + 30)), HS_SECRET);
    assert!(host.request().header("authorization", &bearer(&ok)).send().try_upstream_request().is_some());
    let mut c = config();
    c["clock_skew"] = json!(0);
    let strict = host_with(c);
    let (status, challenge, _) = denied(&strict, &ok);
    assert_eq!(status, 401);
    assert!(challenge.contains("expired"));
}

#[test]
fn path_rules_skip_allow_missing_and_require() {
    let host = host();
    assert!(host.request().path("/public/logo.png").send().try_upstream_request().is_some());
    let bad = bearer("garbage");
    assert!(
        host.request()
            .path("/public/x")
            .header("authorization", &bad)
            .send()
            .try_upstream_request()
            .is_some()
    );
    assert!(host.request().path("/maybe/x").send().try_upstream_request().is_some());
    assert_eq!(host.metric("jwt_auth_missing_allowed"), Some(1));
    // allow_missing still refuses a bad token.
    assert_eq!(
        host.request().path("/maybe/x").header("authorization", &bad).send().local_response().status,
        401
    );
    assert_eq!(host.request().path("/other").send().local_response().status, 401);
}

#[test]
fn tokens_come_from_query_parameters_and_cookies() {
    let host = host();
    let token = es256("es", &claims(), 7);
    let r = host.request().path(&format!("/api/x?a=1&access_token={token}&b=2")).send();
    assert_eq!(r.upstream_request().path(), Some("/api/x?a=1&b=2"), "the token parameter is removed");
    assert_eq!(r.upstream_request().header("x-jwt-sub"), Some("alice"));
    let r = host.request().header("cookie", &format!("theme=dark; session={token}")).send();
    assert_eq!(r.upstream_request().header("x-jwt-sub"), Some("alice"));
}

#[test]
fn forward_keeps_the_token() {
    let mut c = config();
    c["providers"][0]["forward"] = json!(true);
    let host = host_with(c);
    let token = hs256("hs", &claims(), HS_SECRET);
    let r = host.request().header("authorization", &bearer(&token)).send();
    assert_eq!(r.upstream_request().header("authorization"), Some(bearer(&token).as_str()));
}

#[test]
fn spoofed_claim_headers_are_removed() {
    let host = host();
    let r =
        host.request().path("/public/x").header("x-jwt-sub", "admin").header("x-jwt-payload", "e30").send();
    let up = r.upstream_request();
    assert_eq!(up.header("x-jwt-sub"), None);
    assert_eq!(up.header("x-jwt-payload"), None);
    // A claim with a control character is not turned into a header.
    let token = hs256("hs", &with(claims(), "sub", json!("a\r\nx-admin: 1")), HS_SECRET);
    let r = host.request().header("authorization", &bearer(&token)).send();
    assert_eq!(r.upstream_request().header("x-jwt-sub"), None);
}

#[test]
fn providers_are_chosen_by_issuer_and_rules_can_restrict_them() {
    let c = json!({
        "providers": [
            {"name": "a", "issuer": "https://a", "jwks": {"keys": [{"kty": "oct", "k": b64(b"secret-a")}]}},
            {"name": "b", "issuer": "https://b", "jwks": {"keys": [{"kty": "oct", "k": b64(b"secret-b")}]}},
        ],
        "rules": [{"match": {"prefix": "/b-only/"}, "action": "require", "providers": ["b"]}],
    });
    let host = host_with(c);
    let a = hs256("x", &json!({"iss": "https://a"}), b"secret-a");
    let b = hs256("x", &json!({"iss": "https://b"}), b"secret-b");
    assert!(host.request().header("authorization", &bearer(&a)).send().try_upstream_request().is_some());
    assert!(host.request().header("authorization", &bearer(&b)).send().try_upstream_request().is_some());
    let r = host.request().path("/b-only/x").header("authorization", &bearer(&a)).send();
    assert!(r.local_response().header("www-authenticate").unwrap().contains("issuer"));
}

fn remote_config() -> Value {
    json!({"providers": [{
        "name": "idp", "issuer": "https://idp.example", "audiences": ["api"],
        "remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json", "authority": "idp.example",
                        "timeout": "500ms", "refresh": "60s", "retry": "2s"},
        "claims_to_headers": [{"claim": "sub", "header": "x-jwt-sub"}],
    }]})
}

fn jwks_response(doc: &Value) -> TestResponse {
    TestResponse::new(200).header("content-type", "application/json").body(doc.to_string())
}

#[test]
fn remote_jwks_is_fetched_at_configure_and_shared_with_other_vms() {
    let host = host_with(remote_config());
    assert_eq!(host.tick_period(), Some(Duration::from_secs(1)));
    let calls = host.http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].upstream, "idp");
    assert_eq!(calls[0].path(), Some("/.well-known/jwks.json"));
    assert_eq!(calls[0].header(":authority"), Some("idp.example"));
    assert_eq!(calls[0].timeout, Duration::from_millis(500));
    host.answer_http_call(calls[0].token, jwks_response(&jwks()));
    assert_eq!(host.metric("jwt_auth_jwks_fetch_ok"), Some(1));
    let r = host.request().header("authorization", &bearer(&rs256("rs", &claims()))).send();
    assert_eq!(r.upstream_request().header("x-jwt-sub"), Some("alice"));
    assert!(host.shared_data("sluice.jwt-auth.jwks:idp/.well-known/jwks.json").is_some());

    // Another VM finds the keys in shared data and does not fetch.
    let other = TestHost::new::<JwtAuthRoot>()
        .now(UNIX_EPOCH + Duration::from_secs(NOW))
        .share_with(&host)
        .config(remote_config())
        .unwrap();
    assert!(other.http_calls().is_empty());
    let r = other.request().header("authorization", &bearer(&es256("es", &claims(), 7))).send();
    assert!(r.try_upstream_request().is_some());
}

#[test]
fn cold_start_request_fetches_keys_itself() {
    let host = host_with(remote_config());
    let boot = host.http_calls()[0].token;
    host.fail_http_call(boot);
    assert_eq!(host.metric("jwt_auth_jwks_fetch_failed"), Some(1));
    let r = host.request().header("authorization", &bearer(&hs256("hs", &claims(), HS_SECRET))).send();
    assert!(r.is_paused());
    assert_eq!(r.http_call().path(), Some("/.well-known/jwks.json"));
    r.answer_http_call(jwks_response(&jwks()));
    assert_eq!(r.upstream_request().header("x-jwt-sub"), Some("alice"));

    // When that fetch fails too, the request is refused.
    let host = host_with(remote_config());
    host.fail_http_call(host.http_calls()[0].token);
    let r = host.request().header("authorization", &bearer(&hs256("hs", &claims(), HS_SECRET))).send();
    r.answer_http_call(TestResponse::new(503));
    let local = r.local_response();
    assert_eq!(local.status, 401);
    assert!(local.header("www-authenticate").unwrap().contains("Jwks remote fetch is failed"));
    assert_eq!(host.metric("jwt_auth_denied_keys_unavailable"), Some(1));
    assert!(host.logged(LogLevel::Warn, "status 503"));
}

#[test]
fn keys_are_refreshed_on_the_timer_and_rotation_is_picked_up() {
    let host = host_with(remote_config());
    host.answer_http_call(host.http_calls()[0].token, jwks_response(&json!({"keys": [ec_jwk("old", 7)]})));
    let new_token = es256("new", &claims(), 8);
    // Unknown kid: refused, and a refetch is wanted at the next tick.
    assert_eq!(
        host.request().header("authorization", &bearer(&new_token)).send().local_response().status,
        401
    );
    host.advance(Duration::from_millis(2100));
    let calls = host.http_calls();
    assert_eq!(calls.len(), 1, "refetch after an unknown kid");
    host.answer_http_call(
        calls[0].token,
        jwks_response(&json!({"keys": [ec_jwk("old", 7), ec_jwk("new", 8)]})),
    );
    assert!(
        host.request().header("authorization", &bearer(&new_token)).send().try_upstream_request().is_some()
    );
    // The periodic refresh happens after `refresh`, and a failure keeps the old keys.
    host.advance(Duration::from_secs(61));
    let calls = host.http_calls();
    assert_eq!(calls.len(), 1);
    host.answer_http_call(calls[0].token, TestResponse::new(200).body("not json"));
    assert!(
        host.request().header("authorization", &bearer(&new_token)).send().try_upstream_request().is_some()
    );
    assert!(host.logged(LogLevel::Warn, "not a JWKS document"));
}

#[test]
fn hostile_authorization_values_never_panic() {
    let host = host();
    let long = "a".repeat(20_000);
    let values = [
        "Bearer ".to_string(),
        "Bearer .".to_string(),
        "Bearer ..".to_string(),
        "Bearer ...".to_string(),
        "Bearer e30.e30.".to_string(),
        format!("Bearer {long}"),
        format!("Bearer {}.{}.{}", b64(b"{\"alg\":\"RS256\"}"), b64(b"{}"), b64(&[0u8; 600])),
        format!(
            "Bearer {}.{}.{}",
            b64(b"{\"alg\":\"ES256\"}"),
            b64(b"{\"iss\":\"https://idp.example\"}"),
            b64(&[255u8; 64])
        ),
        format!("Bearer {}.{}.x", b64("{\"alg\":\"HS256\",\"kid\":[]}".as_bytes()), b64(&[0xff, 0xfe])),
        "bearer \u{0}\u{1}".to_string(),
        "Bearer \u{1F600}.\u{1F600}.\u{1F600}".to_string(),
    ];
    for v in values {
        let r = host.request().header("authorization", &v).send();
        assert_eq!(r.local_response().status, 401, "{v:.60}");
    }
    assert_eq!(host.metric("jwt_auth_denied_too_large"), Some(1));
}

#[test]
fn bad_configs_are_rejected_with_the_field() {
    let cases = [
        (json!({"providers": []}), "at least one provider"),
        (json!({"providers": [{"name": "a", "issuer": "i"}]}), "exactly one of jwks and remote_jwks"),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": {"keys": []}}]}),
            "providers[0] (a).jwks: no usable key",
        ),
        (json!({"providers": [{"name": "a", "issuer": "i", "jwks": "{"}]}), "not a JWKS document"),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "remote_jwks": {"cluster": "c", "path": "x"}}]}),
            "must start with /",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": jwks()}], "rules": [{"match": {"prefix": "/"}, "action": "require", "providers": ["b"]}]}),
            "unknown provider \"b\"",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": jwks()}], "rules": [{"match": {"prefix": "/"}, "action": "deny"}]}),
            "unknown variant `deny`",
        ),
        (
            json!({"providers": [{"name": "a", "issuer": "i", "jwks": jwks(), "audience": "x"}]}),
            "unknown field `audience`",
        ),
        (json!({"providers": [{"name": "a", "issuer": "i", "jwks": jwks()}], "realm": "a\"b"}), "realm"),
    ];
    for (config, needle) in cases {
        let err = TestHost::new::<JwtAuthRoot>().config(config.clone()).unwrap_err();
        assert!(err.to_string().contains(needle), "{config}: {err}");
    }
}

#[test]
fn jwks_as_a_string_is_accepted() {
    let mut c = config();
    c["providers"][0]["jwks"] = Value::String(jwks().to_string());
    let host = host_with(c);
    let r = host.request().header("authorization", &bearer(&hs256("hs", &claims(), HS_SECRET))).send();
    assert!(r.try_upstream_request().is_some());
    let _ = SystemTime::now();
}
