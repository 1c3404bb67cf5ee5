//! The ready filter library (`filters/`) end to end: each filter's documented
//! behaviour through the real `sluice proxy` process, with modules built by
//! `filters/build.sh` (size-optimised, as shipped), real hyper backends on
//! 127.0.0.1:0 and real clients. One test per filter (two for fault), each in its
//! own proxy process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
#[path = "../filters/jwt-auth/tests/support/tokens.rs"]
mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use support::{Backend, Sluice, root};
use tokens::{b64, ec_jwk, es256, hs256, rs256, rsa_jwk};

// === modules ===

/// The `.wasm` module of a ready filter (`fault`, `jwt-auth`, ...), built once per
/// test binary by `filters/build.sh` (its own target folder: no wait on the outer
/// build's lock, and the compiled dependencies are shared with manual runs).
fn module(filter: &str) -> PathBuf {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    let out = OUT.get_or_init(|| {
        let build = || {
            let out = Command::new("bash")
                .arg(root().join("filters/build.sh"))
                .current_dir(root())
                .output()
                .unwrap();
            assert!(out.status.success(), "filters/build.sh: {}", String::from_utf8_lossy(&out.stderr));
            // Cargo's own output (replaced by a link, atomically), not build.sh's
            // copy in out/, which a concurrent run may be rewriting.
            root().join("target/wasm-filters/wasm32-wasip1/release")
        };
        // The build takes a while: let this test's backends keep running meanwhile.
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(build),
            Err(_) => build(),
        }
    });
    let path = out.join(format!("sluice_filter_{}.wasm", filter.replace('-', "_")));
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// One filter entry of a chain, as a YAML flow mapping (JSON is YAML).
fn filter(name: &str, module_name: &str, config: &Value) -> String {
    json!({"name": name, "module": module(module_name).display().to_string(), "config": config}).to_string()
}

/// A proxy config: one listener `main` with the given listener chain, routes (YAML
/// list items, indented for `routes:`) and clusters (name, address).
fn proxy_config(workers: usize, chain: &[String], routes: &str, clusters: &[(&str, SocketAddr)]) -> String {
    let mut yaml = format!(
        "admin: {{ address: \"{{admin}}\" }}\nworkers: {workers}\nlisteners:\n  - name: main\n    address: 127.0.0.1:0\n    filters: [{}]\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n{routes}\nclusters:\n",
        chain.join(", ")
    );
    for (name, addr) in clusters {
        yaml.push_str(&format!("  - name: {name}\n    endpoints: [\"{addr}\"]\n"));
    }
    yaml
}

// === clients ===

/// A response, read whole.
struct Resp {
    status: u16,
    headers: http::HeaderMap,
    body: String,
    elapsed: Duration,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
    }

    /// A request header as the echo backend saw it.
    fn upstream(&self, name: &str) -> Option<&str> {
        self.header(&format!("x-echo-{name}"))
    }
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:?}", self.status, self.headers, self.body)
    }
}

/// Sends one request on a new HTTP/1.1 connection (so the kernel may hand each
/// request to either worker).
async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    send_with(&support::client(), addr, method, path, headers).await
}

async fn send_with<C>(
    client: &Client<C, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned(), elapsed: started.elapsed() }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(addr, "GET", path, headers).await
}

// === backends ===

/// A backend answering `<name> <path?query>` with every request header echoed as
/// `x-echo-<name>`, counting its requests.
struct Echo {
    backend: Backend,
    hits: Arc<AtomicUsize>,
}

impl Echo {
    async fn start(name: &'static str) -> Echo {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let backend = Backend::start(move |req: http::Request<hyper::body::Incoming>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let mut r = http::Response::new(Full::new(Bytes::from(format!("{name} {path}"))));
                for (k, v) in req.headers() {
                    if let Ok(n) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
                        r.headers_mut().append(n, v.clone());
                    }
                }
                r
            }
        })
        .await;
        Echo { backend, hits }
    }

    fn addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

// === fault ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aborts_and_delays_by_route_and_header() {
    let echo = Echo::start("backend").await;
    let listener_fault = filter(
        "fault",
        "fault",
        &json!({
            "rules": [
                {"name": "abort", "routes": ["aborted"],
                 "abort": {"http_status": 503, "grpc_status": 14, "body": "injected 100%\n"}},
                {"name": "slow", "routes": ["slow"], "delay": {"fixed": "300ms"}},
            ],
            "header_faults": {"enabled": true, "max_delay": "400ms"},
        }),
    );
    let route_fault = filter(
        "route-fault",
        "fault",
        &json!({"rules": [{"abort": {"http_status": 418, "body": "teapot\n"}}]}),
    );
    let routes = format!(
        "          - {{ name: aborted, match: {{ prefix: /abort }}, forward: {{ cluster: backend }} }}
          - {{ name: slow, match: {{ prefix: /slow }}, forward: {{ cluster: backend }} }}
          - name: chained
            match: {{ prefix: /chain }}
            forward: {{ cluster: backend }}
            filters: {{ mode: extend, chain: [{route_fault}] }}
          - {{ name: plain, forward: {{ cluster: backend }} }}"
    );
    let proxy = Sluice::start(&proxy_config(2, &[listener_fault], &routes, &[("backend", echo.addr())]));
    let addr = proxy.addr("main");

    // Abort by route, percentage 100: the upstream never sees it.
    let r = get(addr, "/abort/x", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-fault-injected")),
        (503, "injected 100%\n", Some("abort")),
        "{r:?}"
    );
    assert_eq!(echo.hits(), 0);

    // The same rule answers a gRPC request (h2c) with a trailers-only gRPC reply.
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let r =
        send_with(&h2, addr, "POST", "/abort/pkg.Svc/Call", &[("content-type", "application/grpc")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("grpc-status"), Some("14"), "{r:?}");
    // grpc-message is percent-encoded, as the gRPC spec (and Envoy) does.
    assert_eq!(r.header("grpc-message"), Some("injected 100%25%0A"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    assert_eq!(r.header("x-fault-injected"), Some("abort"));
    assert_eq!(echo.hits(), 0);

    // Delay by route: at least the delay, then upstream unchanged.
    let r = get(addr, "/slow/x", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-fault-injected")),
        (200, "backend /slow/x", Some("delay")),
        "{r:?}"
    );
    assert!(r.elapsed >= Duration::from_millis(300) && r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    assert_eq!(echo.hits(), 1);

    // Other routes get no fault from the rules.
    let r = get(addr, "/plain", &[]).await;
    assert_eq!((r.status, r.header("x-fault-injected")), (200, None), "{r:?}");

    // A route's own chain: only that route gets its fault.
    let r = get(addr, "/chain/x", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-fault-injected")),
        (418, "teapot\n", Some("abort")),
        "{r:?}"
    );
    assert_eq!(echo.hits(), 2);

    // Header faults: an abort with the asked status, a delay capped at max_delay,
    // and values that do not parse are ignored.
    let r = get(addr, "/plain", &[("x-fault-abort", "429")]).await;
    assert_eq!((r.status, r.header("x-fault-injected")), (429, Some("abort")), "{r:?}");
    let r = get(addr, "/plain", &[("x-fault-delay", "60000")]).await;
    assert_eq!((r.status, r.header("x-fault-injected")), (200, Some("delay")), "{r:?}");
    assert!(r.elapsed >= Duration::from_millis(400) && r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let r = get(addr, "/plain", &[("x-fault-abort", "99"), ("x-fault-delay", "soon")]).await;
    assert_eq!((r.status, r.header("x-fault-injected")), (200, None), "{r:?}");
    assert_eq!(r.upstream("x-fault-abort"), Some("99"), "header faults are forwarded unchanged");

    let metrics = get(proxy.admin, "/metrics", &[]).await.body;
    assert!(metrics.contains("sluice_wasm_custom_fault_aborts_injected"), "{metrics}");
}

// === jwt-auth ===

const HS_SECRET: &[u8] = b"an-hmac-secret-of-32-bytes-long!";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(issuer: &str) -> Value {
    json!({"iss": issuer, "aud": ["api"], "sub": "alice", "exp": now() + 300, "nbf": now() - 10,
           "groups": ["admin", "dev"], "org": {"id": "o-1"}})
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_verifies_inline_and_remote_keys_and_forwards_claims() {
    let echo = Echo::start("backend").await;
    // The identity provider's JWKS endpoint, fetched by the filter's callout.
    let fetches = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let seen = fetches.clone();
    let idp = Backend::start(move |req: http::Request<hyper::body::Incoming>| {
        let accept = req.headers().get("accept").map(|v| v.to_str().unwrap().to_owned());
        seen.lock().unwrap().push((req.uri().path().to_owned(), accept));
        async move {
            let jwks = json!({"keys": [ec_jwk("remote-es", 11), rsa_jwk("remote-rs")]});
            http::Response::new(Full::new(Bytes::from(jwks.to_string())))
        }
    })
    .await;
    let headers = json!([{"claim": "sub", "header": "x-jwt-sub"}, {"claim": "groups", "header": "x-jwt-groups"},
                         {"claim": "org.id", "header": "x-jwt-org"}]);
    let config = json!({
        "providers": [
            {"name": "inline", "issuer": "https://inline.example", "audiences": ["api"],
             "jwks": {"keys": [{"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)}, rsa_jwk("rs"), ec_jwk("es", 7)]},
             "from_params": ["access_token"], "claims_to_headers": headers},
            {"name": "remote", "issuer": "https://remote.example", "audiences": ["api"],
             "remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json", "retry": "1s"},
             "claims_to_headers": headers},
        ],
        "rules": [{"match": {"prefix": "/public/"}, "action": "allow_missing"}],
        "realm": "api",
    });
    let chain = [filter("jwt", "jwt-auth", &config)];
    let routes = "          - { forward: { cluster: backend } }";
    let proxy =
        Sluice::start(&proxy_config(2, &chain, routes, &[("backend", echo.addr()), ("idp", idp.addr)]));
    let addr = proxy.addr("main");
    let bearer = |t: &str| format!("Bearer {t}");

    // A remote provider's token: keys fetched from the `idp` cluster by callout.
    let token = es256("remote-es", &claims("https://remote.example"), 11);
    let r = get(addr, "/api/remote", &[("authorization", &bearer(&token))]).await;
    assert_eq!((r.status, r.upstream("x-jwt-sub")), (200, Some("alice")), "{r:?}");
    let token = rs256("remote-rs", &claims("https://remote.example"));
    let r = get(addr, "/api/remote", &[("authorization", &bearer(&token))]).await;
    assert_eq!(r.status, 200, "{r:?}");
    {
        let fetches = fetches.lock().unwrap();
        assert!(!fetches.is_empty());
        for (path, accept) in fetches.iter() {
            assert_eq!(
                (path.as_str(), accept.as_deref()),
                ("/.well-known/jwks.json", Some("application/json"))
            );
        }
    }

    // Every algorithm with inline keys; claims become upstream headers, the token is
    // not forwarded.
    let inline = claims("https://inline.example");
    for token in [hs256("hs", &inline, HS_SECRET), rs256("rs", &inline), es256("es", &inline, 7)] {
        let r = get(addr, "/api/x", &[("authorization", &bearer(&token)), ("x-jwt-sub", "mallory")]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.all("x-echo-x-jwt-sub"), ["alice"], "the client's x-jwt-sub is replaced");
        assert_eq!(r.upstream("x-jwt-groups"), Some("admin,dev"));
        assert_eq!(r.upstream("x-jwt-org"), Some("o-1"));
        assert_eq!(r.upstream("authorization"), None);
    }

    // A token in a query parameter is removed from the path sent upstream.
    let token = hs256("hs", &inline, HS_SECRET);
    let r = get(addr, &format!("/api/q?access_token={token}&x=1"), &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "backend /api/q?x=1"), "{r:?}");

    // No token: a challenge without an error code; the upstream is not reached.
    let hits = echo.hits();
    let r = get(addr, "/api/x", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "Jwt is missing\n"), "{r:?}");
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer realm="api""#));

    // Invalid tokens: 401 invalid_token with the reason.
    let cases = [
        (hs256("hs", &with(inline.clone(), "exp", json!(now() - 3600)), HS_SECRET), "Jwt is expired"),
        (hs256("hs", &with(inline.clone(), "nbf", json!(now() + 3600)), HS_SECRET), "Jwt not yet valid"),
        (hs256("hs", &inline, b"another-secret-of-32-bytes-long!"), "Jwt verification fails"),
        (es256("es", &inline, 9), "Jwt verification fails"),
        (
            hs256("hs", &with(inline.clone(), "aud", json!("web")), HS_SECRET),
            "Audiences in Jwt are not allowed",
        ),
        (
            hs256("hs", &with(inline.clone(), "iss", json!("https://evil.example")), HS_SECRET),
            "Jwt issuer is not configured",
        ),
    ];
    for (token, reason) in cases {
        let r = get(addr, "/api/x", &[("authorization", &bearer(&token))]).await;
        assert_eq!((r.status, r.body.trim_end()), (401, reason), "{r:?}");
        let challenge = format!(r#"Bearer realm="api", error="invalid_token", error_description="{reason}""#);
        assert_eq!(r.header("www-authenticate"), Some(challenge.as_str()));
    }
    assert_eq!(echo.hits(), hits, "denied requests never reach the upstream");

    // allow_missing: no token passes, and claim headers cannot be spoofed.
    let r = get(addr, "/public/x", &[("x-jwt-sub", "mallory"), ("x-jwt-org", "evil")]).await;
    assert_eq!((r.status, r.upstream("x-jwt-sub"), r.upstream("x-jwt-org")), (200, None, None), "{r:?}");
    // ... but a present token is still checked.
    let expired = hs256("hs", &with(inline.clone(), "exp", json!(now() - 3600)), HS_SECRET);
    let r = get(addr, "/public/x", &[("authorization", &bearer(&expired))]).await;
    assert_eq!(r.status, 401, "{r:?}");

    let metrics = get(proxy.admin, "/metrics", &[]).await.body;
    assert!(metrics.contains("sluice_wasm_custom_jwt_auth_jwks_fetch_ok"), "{metrics}");
}

// === api-key ===

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_authenticates_header_query_and_basic_credentials() {
    let echo = Echo::start("backend").await;
    let config = json!({
        "keys": [
            {"client": "alice", "key": "k-alice"},
            {"client": "reports", "key_sha256": sha256_hex("k-reports"), "paths": [{"prefix": "/reports/"}]},
        ],
        "from": [{"header": "x-api-key"}, {"query": "api_key"}],
        "basic": {"users": [{"user": "bob", "password": "pw"}]},
        "realm": "shop",
        "skip": [{"exact": "/healthz"}],
    });
    let chain = [filter("api-key", "api-key", &config)];
    let routes = "          - { forward: { cluster: backend } }";
    let proxy = Sluice::start(&proxy_config(2, &chain, routes, &[("backend", echo.addr())]));
    let addr = proxy.addr("main");
    let challenges = [r#"ApiKey realm="shop""#, r#"Basic realm="shop", charset="UTF-8""#];

    let r = get(addr, "/x", &[("x-api-client", "mallory")]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "missing credentials\n"), "{r:?}");
    assert_eq!(r.all("www-authenticate"), challenges);
    let r = get(addr, "/x", &[("x-api-key", "k-wrong")]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "invalid api key\n"), "{r:?}");
    assert_eq!(r.all("www-authenticate"), challenges);
    let r = get(addr, "/x?api_key=k-wrong", &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(echo.hits(), 0);

    // A header key: the client's name goes upstream, the key does not.
    let r = get(addr, "/x", &[("x-api-key", "k-alice"), ("x-api-client", "mallory")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.all("x-echo-x-api-client"), ["alice"]);
    assert_eq!(r.upstream("x-api-key"), None);
    // A query key is removed from the path.
    let r = get(addr, "/x?a=1&api_key=k-alice", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.upstream("x-api-client")),
        (200, "backend /x?a=1", Some("alice")),
        "{r:?}"
    );

    // A key limited to some paths (stored as a digest): 403 elsewhere.
    let r = get(addr, "/other", &[("x-api-key", "k-reports")]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "api key not allowed for this path\n"), "{r:?}");
    let r = get(addr, "/reports/q", &[("x-api-key", "k-reports")]).await;
    assert_eq!((r.status, r.upstream("x-api-client")), (200, Some("reports")), "{r:?}");

    // Basic credentials.
    let basic = |u: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(u));
    let r = get(addr, "/x", &[("authorization", &basic("bob:pw"))]).await;
    assert_eq!(
        (r.status, r.upstream("x-api-client"), r.upstream("authorization")),
        (200, Some("bob"), None),
        "{r:?}"
    );
    let r = get(addr, "/x", &[("authorization", &basic("bob:nope"))]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "invalid user or password\n"), "{r:?}");

    // Skipped paths pass without credentials, and the client header is still removed.
    let r = get(addr, "/healthz", &[("x-api-client", "mallory")]).await;
    assert_eq!((r.status, r.upstream("x-api-client")), (200, None), "{r:?}");
    assert_eq!(echo.hits(), 5);
}

// === ext-authz ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_allows_denies_and_applies_the_failure_policy() {
    let echo = Echo::start("backend").await;
    let checks = Arc::new(Mutex::new(Vec::<(String, http::HeaderMap)>::new()));
    let seen = checks.clone();
    let authz = Backend::start(move |req: http::Request<hyper::body::Incoming>| {
        let path = req.uri().path().to_owned();
        seen.lock().unwrap().push((path.clone(), req.headers().clone()));
        async move {
            if path.contains("/slow") {
                // Far longer than the filter's timeout.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let mut r = http::Response::builder();
            if path.contains("/deny") {
                r = r
                    .status(403)
                    .header("www-authenticate", "Custom realm=\"authz\"")
                    .header("x-user", "nobody");
                return r.body(Full::new(Bytes::from("nope\n"))).unwrap();
            }
            if path.contains("/broken") {
                return r.status(500).body(Full::new(Bytes::from("authz bug\n"))).unwrap();
            }
            r = r.header("x-user", "alice").header("x-auth-level", "gold").header("x-other", "no");
            r.body(Full::new(Bytes::new())).unwrap()
        }
    })
    .await;
    let base = json!({
        // 1 s: the checks that must pass get it too, on a loaded machine.
        "cluster": "authz", "path_prefix": "/check", "timeout": "1s",
        "allowed_headers": ["authorization", "x-tenant-*"],
        "allowed_upstream_headers": ["x-user", "x-auth-*"],
        "skip": [{"prefix": "/healthz"}],
    });
    let mut open = base.clone();
    open["failure"] = json!({"allow": true});
    let routes = format!(
        "          - name: open
            match: {{ prefix: /open/ }}
            forward: {{ cluster: backend }}
            filters: {{ mode: replace, chain: [{}] }}
          - {{ forward: {{ cluster: backend }} }}",
        filter("ext-authz-open", "ext-authz", &open)
    );
    let chain = [filter("ext-authz", "ext-authz", &base)];
    let proxy =
        Sluice::start(&proxy_config(2, &chain, &routes, &[("backend", echo.addr()), ("authz", authz.addr)]));
    let addr = proxy.addr("main");

    // Allowed: the service's headers go upstream (only the allowed ones, replacing
    // the client's), the check carries the request's facts and allowed headers.
    let r = get(
        addr,
        "/allow/1?q=2",
        &[("authorization", "Bearer t"), ("x-tenant-id", "t1"), ("x-secret", "s"), ("x-user", "mallory")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.all("x-echo-x-user"), ["alice"]);
    assert_eq!((r.upstream("x-auth-level"), r.upstream("x-other")), (Some("gold"), None));
    {
        let checks = checks.lock().unwrap();
        let (path, h) = checks.last().unwrap();
        assert_eq!(path, "/check/allow/1");
        let h = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("x-forwarded-uri").as_deref(), Some("/allow/1?q=2"));
        assert_eq!(h("x-forwarded-method").as_deref(), Some("GET"));
        assert_eq!(h("x-forwarded-host").as_deref(), Some(addr.to_string().as_str()));
        assert_eq!(h("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            (h("authorization").as_deref(), h("x-tenant-id").as_deref()),
            (Some("Bearer t"), Some("t1"))
        );
        assert_eq!((h("x-secret"), h("x-user")), (None, None));
    }

    // Denied: the service's status and body, with the allowed client headers.
    let hits = echo.hits();
    let r = get(addr, "/deny", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "nope\n"), "{r:?}");
    assert_eq!((r.header("www-authenticate"), r.header("x-user")), (Some("Custom realm=\"authz\""), None));
    assert_eq!(echo.hits(), hits);

    // The service too slow (timeout) or failing (5xx): the failure policy, closed...
    let r = get(addr, "/slow", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (503, "authorization service unavailable\n"), "{r:?}");
    assert!(r.elapsed >= Duration::from_secs(1) && r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    let r = get(addr, "/broken", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (503, "authorization service unavailable\n"), "{r:?}");
    assert_eq!(echo.hits(), hits);
    // ... or open on the route whose chain says so.
    let r = get(addr, "/open/slow", &[("x-user", "mallory")]).await;
    assert_eq!((r.status, r.body.as_str(), r.upstream("x-user")), (200, "backend /open/slow", None), "{r:?}");

    // Skipped paths are not checked.
    let before = checks.lock().unwrap().len();
    let r = get(addr, "/healthz", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(checks.lock().unwrap().len(), before);
}

// === canary-router ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_router_steers_to_the_canary_cluster_by_route_reevaluation() {
    let stable = Echo::start("stable").await;
    let canary = Echo::start("canary").await;
    let config = json!({
        "rules": [
            {"header": {"name": "x-canary", "value": "always"}, "target": "v2"},
            {"cookie": {"name": "canary", "value": "1"}, "target": "v2"},
            {"query": {"name": "canary"}, "target": "v2"},
            {"paths": [{"prefix": "/reviews/"}], "weights": {"v1": 50, "v2": 50}, "sticky": {"header": "x-user-id"}},
        ],
        "default": "v1",
        "targets": {"v2": {"authority": "reviews-v2.internal", "prefix_rewrite": {"from": "/reviews/", "to": "/v2/reviews/"}}},
        "response_header": "x-served-by",
    });
    let chain = [filter("canary", "canary-router", &config)];
    let routes = "          - name: reviews-canary
            match: { prefix: /, headers: [{ name: x-sluice-canary, exact: v2 }] }
            forward: { cluster: canary }
          - { name: reviews-stable, forward: { cluster: stable } }";
    let proxy = Sluice::start(&proxy_config(
        2,
        &chain,
        routes,
        &[("stable", stable.addr()), ("canary", canary.addr())],
    ));
    let addr = proxy.addr("main");

    // Header, cookie and query rules reach the canary cluster, rewritten.
    for (path, headers) in [
        ("/reviews/1", vec![("x-canary", "always")]),
        ("/reviews/1", vec![("cookie", "a=b; canary=1")]),
        ("/reviews/1?canary", vec![]),
    ] {
        let r = get(addr, path, &headers).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.starts_with("canary /v2/reviews/1"), "{path} {headers:?}: {r:?}");
        assert_eq!((r.header("x-served-by"), r.upstream("host")), (Some("v2"), Some("reviews-v2.internal")));
        assert_eq!(r.upstream("x-sluice-canary"), Some("v2"));
    }

    // No rule: the default. A client's own steering header matches the canary route
    // first, but the filter removes it and the route is evaluated again.
    let r = get(addr, "/other", &[("x-sluice-canary", "v2")]).await;
    assert_eq!((r.body.as_str(), r.header("x-served-by")), ("stable /other", Some("v1")), "{r:?}");
    assert_eq!(r.upstream("x-sluice-canary"), Some("v1"));

    // Sticky weights: a user always lands on the same cluster, and the split uses both.
    let mut on = [0, 0];
    for user in 0..24 {
        let user = format!("user-{user}");
        let first = get(addr, "/reviews/7", &[("x-user-id", &user)]).await;
        let again = get(addr, "/reviews/7", &[("x-user-id", &user)]).await;
        assert_eq!(first.header("x-served-by"), again.header("x-served-by"), "{user} moved");
        assert_eq!(first.body, again.body);
        match first.header("x-served-by") {
            Some("v1") => {
                assert_eq!(first.body, "stable /reviews/7");
                on[0] += 1;
            }
            Some("v2") => {
                assert_eq!(first.body, "canary /v2/reviews/7");
                on[1] += 1;
            }
            other => panic!("{user}: served by {other:?}"),
        }
    }
    assert!(on[0] > 0 && on[1] > 0, "split {on:?}");
    assert_eq!(stable.hits() + canary.hits(), 4 + 48);
}

// === rate-limit ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_buckets_are_shared_by_both_workers() {
    let echo = Echo::start("backend").await;
    let config =
        json!({"rules": [{"name": "per-client", "key": {"header": "x-client"}, "requests": 5, "per": "1h"}]});
    let chain = [filter("ratelimit", "rate-limit", &config)];
    let routes = "          - { forward: { cluster: backend } }";
    let proxy = Sluice::start(&proxy_config(2, &chain, routes, &[("backend", echo.addr())]));
    let addr = proxy.addr("main");

    // One connection per request: the kernel spreads them over both workers (and
    // their VMs), yet the bucket holds exactly five tokens.
    for left in (0..5).rev() {
        let r = get(addr, "/x", &[("x-client", "a")]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(left.to_string().as_str()), "{r:?}");
    }
    for _ in 0..3 {
        let r = get(addr, "/x", &[("x-client", "a")]).await;
        assert_eq!((r.status, r.body.as_str()), (429, "rate limited\n"), "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=720).contains(&retry), "retry-after {retry}");
        assert_eq!(
            (r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining")),
            (Some("5"), Some("0"))
        );
        let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset >= retry && reset <= 3600, "reset {reset}");
    }
    assert_eq!(echo.hits(), 5);

    // Another key has its own bucket; requests without the key are not limited.
    let r = get(addr, "/x", &[("x-client", "b")]).await;
    assert_eq!((r.status, r.header("x-ratelimit-remaining")), (200, Some("4")), "{r:?}");
    let r = get(addr, "/x", &[]).await;
    assert_eq!((r.status, r.header("x-ratelimit-limit")), (200, None), "{r:?}");

    // Concurrent requests on many connections: compare-and-swap lets exactly the
    // bucket's tokens in. The key exists first: the ABI has no create-if-absent
    // (a write with CAS 0 is unconditional, on Envoy too), so two workers both
    // creating a new key at once could each take a token from a full bucket.
    let r = get(addr, "/x", &[("x-client", "c")]).await;
    assert_eq!((r.status, r.header("x-ratelimit-remaining")), (200, Some("4")), "{r:?}");
    let tasks: Vec<_> = (0..16)
        .map(|_| tokio::spawn(async move { get(addr, "/x", &[("x-client", "c")]).await.status }))
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 12, "{statuses:?}");
    assert_eq!(echo.hits(), 5 + 2 + 1 + 4);
}

// === headers and CORS ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_edits_and_cors() {
    let echo = Echo::start("backend").await;
    let config = json!({
        "request": {"remove": ["x-debug"], "rename": {"x-client-version": "x-app-version"},
                    "set": {"x-env": "prod"}, "add": {"x-via": "sluice"}},
        "response": {"remove": ["x-echo-x-debug-out"], "set": {"x-frame-options": "DENY"}, "add": {"cache-control": "no-store"}},
        "cors": {"allow_origins": ["https://app.example.com", "https://*.example.org"],
                 "allow_methods": ["GET", "PUT"], "allow_headers": ["content-type", "authorization"],
                 "expose_headers": ["x-request-id"], "max_age": 600, "allow_credentials": true,
                 "reject_disallowed_preflight": true},
    });
    let chain = [filter("headers", "headers", &config)];
    let routes = "          - { forward: { cluster: backend } }";
    let proxy = Sluice::start(&proxy_config(2, &chain, routes, &[("backend", echo.addr())]));
    let addr = proxy.addr("main");

    // A preflight from an allowed origin is answered by the filter.
    let preflight = [("origin", "https://app.example.com"), ("access-control-request-method", "PUT")];
    let r = send(addr, "OPTIONS", "/items", &preflight).await;
    assert_eq!(r.status, 204, "{r:?}");
    for (name, value) in [
        ("access-control-allow-origin", "https://app.example.com"),
        ("access-control-allow-methods", "GET, PUT"),
        ("access-control-allow-headers", "content-type, authorization"),
        ("access-control-max-age", "600"),
        ("access-control-allow-credentials", "true"),
        ("vary", "origin"),
    ] {
        assert_eq!(r.header(name), Some(value), "{name}: {r:?}");
    }
    // ... and one from another origin is refused.
    let r = send(
        addr,
        "OPTIONS",
        "/items",
        &[("origin", "https://evil.example"), ("access-control-request-method", "PUT")],
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str(), r.header("access-control-allow-origin")),
        (403, "CORS origin not allowed\n", None)
    );
    assert_eq!(echo.hits(), 0, "preflights never reach the upstream");

    // An actual request: request edits upstream, response edits and CORS downstream.
    let r = get(
        addr,
        "/items",
        &[
            ("origin", "https://a.b.example.org"),
            ("x-debug", "1"),
            ("x-client-version", "7"),
            ("x-env", "dev"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.upstream("x-debug"), None);
    assert_eq!((r.upstream("x-client-version"), r.upstream("x-app-version")), (None, Some("7")));
    assert_eq!((r.all("x-echo-x-env"), r.upstream("x-via")), (vec!["prod"], Some("sluice")));
    assert_eq!(r.header("access-control-allow-origin"), Some("https://a.b.example.org"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-expose-headers"), Some("x-request-id"));
    assert!(r.all("vary").iter().any(|v| v.eq_ignore_ascii_case("origin")), "{r:?}");
    assert_eq!((r.header("x-frame-options"), r.header("cache-control")), (Some("DENY"), Some("no-store")));

    // The response edits run on every response; another origin gets no CORS headers.
    let r = get(addr, "/items", &[("origin", "https://evil.example"), ("x-debug-out", "1")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!((r.header("access-control-allow-origin"), r.upstream("x-debug-out")), (None, None));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(echo.hits(), 2);
}
