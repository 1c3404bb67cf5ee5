//! Routing end to end: virtual hosts, path/method/header/query matching, weighted
//! clusters, redirects, direct responses, rewrites, header edits, path
//! normalization, hop-by-hop stripping and the forwarding/tracing headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// A direct-response route answering `body`.
fn direct(body: &str) -> String {
    format!("direct_response: {{ status: 200, body: \"{body}\" }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_hosts_match_exact_then_wildcards_then_catch_all() {
    let yaml = format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    virtual_hosts:
      - name: exact
        domains: ["api.example.com"]
        routes: [{{ {exact} }}]
      - name: with-port
        domains: ["ported.example.com:8443"]
        routes: [{{ {ported} }}]
      - name: suffix
        domains: ["*.example.com"]
        routes: [{{ {suffix} }}]
      - name: deep-suffix
        domains: ["*.deep.example.com"]
        routes: [{{ {deep} }}]
      - name: prefix
        domains: ["api.*"]
        routes: [{{ {prefix} }}]
      - name: all
        domains: ["*"]
        routes: [{{ {all} }}]
"#,
        exact = direct("exact"),
        ported = direct("ported"),
        suffix = direct("suffix"),
        deep = direct("deep"),
        prefix = direct("prefix"),
        all = direct("catch-all"),
    );
    let p = TestProxy::start(&yaml).await;
    let addr = p.addr("main");
    let cases = [
        ("api.example.com", "exact"),
        ("API.Example.COM", "exact"),
        ("api.example.com:8080", "exact"),
        ("ported.example.com:8443", "ported"),
        ("ported.example.com", "suffix"),
        ("www.example.com", "suffix"),
        ("a.b.example.com", "suffix"),
        ("x.deep.example.com", "deep"),
        ("api.other.org", "prefix"),
        ("api.other.org:81", "prefix"),
        ("example.com", "catch-all"),
        ("other.net", "catch-all"),
    ];
    let mut c = h1_connect(addr).await;
    for (host, want) in cases {
        let (parts, body) = send1(&mut c, get_req(host, "/")).await;
        assert_eq!(parts.status, 200, "{host}");
        assert_eq!(&body[..], want.as_bytes(), "host {host}");
    }
    // HTTP/2 routes by :authority.
    let mut c2 = h2_connect(addr).await;
    for (host, want) in [("api.example.com", "exact"), ("www.example.com", "suffix"), ("z.org", "catch-all")]
    {
        let req = Request::get(format!("http://{host}/")).body(Full::new(Bytes::new())).unwrap();
        let (parts, body) = send2(&mut c2, req).await;
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert_eq!(&body[..], want.as_bytes(), "h2 authority {host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_catch_all_unknown_host_is_404() {
    let route = format!("- {{ {} }}", direct("exact"));
    let yaml = config_yaml(1, "", &route, "").replace(r#"domains: ["*"]"#, r#"domains: ["api.example.com"]"#);
    let p = TestProxy::start(&yaml).await;
    let mut c = h1_connect(p.addr("main")).await;
    assert_eq!(send1(&mut c, get_req("api.example.com", "/")).await.0.status, 200);
    let (parts, _) = send1(&mut c, get_req("evil.example.com", "/")).await;
    assert_eq!(parts.status, 404);
    assert_eq!(parts.headers["x-sluice-reason"], "no_route");
}

fn matching_config() -> String {
    let routes = [
        (r#"match: { path: /exact }"#, "exact"),
        (r#"match: { regex: "/items/[0-9]+" }"#, "regex"),
        (r#"match: { prefix: /api/, methods: [POST, PUT] }"#, "api-write"),
        (r#"match: { prefix: /api/, headers: [{ name: x-version, exact: "2" }] }"#, "api-v2"),
        (r#"match: { prefix: /api/, headers: [{ name: x-canary, regex: "yes|true" }] }"#, "api-canary"),
        (r#"match: { prefix: /api/, headers: [{ name: x-debug }] }"#, "api-debug"),
        (r#"match: { prefix: /api/, headers: [{ name: authorization, present: false }] }"#, "api-anon"),
        (r#"match: { prefix: /api/ }"#, "api-authed"),
        (r#"match: { prefix: /q, query: [{ name: mode, exact: fast }] }"#, "q-fast"),
        (r#"match: { prefix: /q, query: [{ name: id, regex: "[0-9]+" }] }"#, "q-id"),
        (r#"match: { prefix: /q, query: [{ name: "a b", exact: "c&d" }] }"#, "q-decoded"),
        (
            r#"match: { prefix: /q, query: [{ name: flag, present: true }, { name: off, present: false }] }"#,
            "q-flag",
        ),
        (r#"match: { prefix: / }"#, "fallback"),
    ];
    let list: Vec<String> = routes.iter().map(|(m, name)| format!("- {{ {m}, {} }}", direct(name))).collect();
    config_yaml(1, "", &list.join("\n"), "")
}

async fn route_of(c: &mut H1, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut b = Request::builder().method(method).uri(path).header("host", "test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (parts, body) = send1(c, b.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(parts.status, 200, "{method} {path}");
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_path_method_headers_and_query_first_match_wins() {
    let p = TestProxy::start(&matching_config()).await;
    let mut c = h1_connect(p.addr("main")).await;
    let auth = [("authorization", "Bearer x")];
    let cases: Vec<(&str, &str, Vec<(&str, &str)>, &str)> = vec![
        // Paths: exact, regex (whole path), prefix.
        ("GET", "/exact", vec![], "exact"),
        ("GET", "/exact?x=1", vec![], "exact"),
        ("GET", "/exact/more", vec![], "fallback"),
        ("GET", "/exactly", vec![], "fallback"),
        ("GET", "/items/42", vec![], "regex"),
        ("GET", "/items/42x", vec![], "fallback"),
        ("GET", "/items/", vec![], "fallback"),
        // Methods.
        ("POST", "/api/x", vec![], "api-write"),
        ("PUT", "/api/x", vec![], "api-write"),
        ("DELETE", "/api/x", auth.to_vec(), "api-authed"),
        ("GET", "/api", vec![], "fallback"),
        // Headers: exact, regex (whole value), present, absent.
        ("GET", "/api/x", vec![("x-version", "2")], "api-v2"),
        ("GET", "/api/x", vec![("x-version", "20"), ("authorization", "t")], "api-authed"),
        ("GET", "/api/x", vec![("x-canary", "true")], "api-canary"),
        ("GET", "/api/x", vec![("x-canary", "yes")], "api-canary"),
        ("GET", "/api/x", vec![("x-canary", "yesno"), ("authorization", "t")], "api-authed"),
        ("GET", "/api/x", vec![("x-debug", "")], "api-debug"),
        ("GET", "/api/x", vec![], "api-anon"),
        ("GET", "/api/x", auth.to_vec(), "api-authed"),
        // Query parameters: exact, regex, percent-decoding, present and absent.
        ("GET", "/q?mode=fast", vec![], "q-fast"),
        ("GET", "/q?x=1&mode=fast", vec![], "q-fast"),
        ("GET", "/q?mode=slow", vec![], "fallback"),
        ("GET", "/q?id=123", vec![], "q-id"),
        ("GET", "/q?id=12a", vec![], "fallback"),
        ("GET", "/q?a%20b=c%26d", vec![], "q-decoded"),
        ("GET", "/q?a+b=c%26d", vec![], "q-decoded"),
        ("GET", "/q?flag", vec![], "q-flag"),
        ("GET", "/q?flag=1&off=1", vec![], "fallback"),
        ("GET", "/q", vec![], "fallback"),
    ];
    for (method, path, headers, want) in cases {
        let got = route_of(&mut c, method, path, &headers).await;
        assert_eq!(got, want, "{method} {path} {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_by_weight() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let z = Backend::named("z").await;
    let route =
        "- forward: { clusters: [{ name: a, weight: 3 }, { name: b, weight: 1 }, { name: z, weight: 0 }] }";
    let clusters = format!(
        "- {{ name: a, endpoints: [\"{}\"] }}\n- {{ name: b, endpoints: [\"{}\"] }}\n- {{ name: z, endpoints: [\"{}\"] }}",
        a.addr, b.addr, z.addr
    );
    let yaml = config_yaml(1, "", route, &clusters);
    let p = TestProxy::start(&yaml).await;
    let mut c = h1_connect(p.addr("main")).await;
    const N: usize = 400;
    for _ in 0..N {
        let (parts, _) = send1(&mut c, get_req("t", "/")).await;
        assert_eq!(parts.status, 200);
    }
    // Expected 300 / 100; the bounds are about 7 standard deviations wide.
    assert_eq!(a.hits() + b.hits(), N);
    assert!((240..=360).contains(&a.hits()), "a got {} of {N}", a.hits());
    assert_eq!(z.hits(), 0, "a zero-weight cluster gets nothing");
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, r#"sluice_requests_total{listener="main",route="all/0",cluster="a",class="2xx"}"#)
            as usize,
        a.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses() {
    let routes = r#"
- match: { prefix: /old/ }
  redirect: { scheme: https, prefix_rewrite: /new/ }
- match: { path: /moved }
  redirect: { code: 308, host: other.example.com, path: /here, strip_query: true }
- match: { path: /temp }
  redirect: { code: 302, path: /elsewhere }
- match: { path: /teapot }
  direct_response: { status: 418, body: "short and stout", content_type: text/plain }
  response_headers: { set: { x-brewed: "yes" } }
- match: { path: /empty }
  direct_response: { status: 204 }
"#;
    let yaml = config_yaml(1, "", routes, "");
    let p = TestProxy::start(&yaml).await;
    let mut c = h1_connect(p.addr("main")).await;

    let (parts, _) = send1(&mut c, get_req("www.example.com", "/old/a/b?x=1")).await;
    assert_eq!(parts.status, 301);
    assert_eq!(parts.headers["location"], "https://www.example.com/new/a/b?x=1");

    let (parts, _) = send1(&mut c, get_req("www.example.com", "/moved?secret=1")).await;
    assert_eq!(parts.status, 308);
    assert_eq!(parts.headers["location"], "http://other.example.com/here");

    let (parts, _) = send1(&mut c, get_req("www.example.com:8080", "/temp?k=v")).await;
    assert_eq!(parts.status, 302);
    assert_eq!(parts.headers["location"], "http://www.example.com:8080/elsewhere?k=v");

    let (parts, body) = send1(&mut c, get_req("x", "/teapot")).await;
    assert_eq!(parts.status, 418);
    assert_eq!(&body[..], b"short and stout");
    assert_eq!(parts.headers["content-type"], "text/plain");
    assert_eq!(parts.headers["x-brewed"], "yes");

    let (parts, body) = send1(&mut c, get_req("x", "/empty")).await;
    assert_eq!(parts.status, 204);
    assert!(body.is_empty());

    let m = p.metrics().await;
    assert_eq!(
        metric(&m, r#"sluice_requests_total{listener="main",route="all/0",cluster="",class="3xx"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"sluice_requests_total{listener="main",route="all/3",cluster="",class="4xx"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_and_host_rewrites_and_header_edits() {
    let backend = Backend::start(|req| async move {
        let mut r = http::Response::new(Full::new(Bytes::from(req.uri().to_string())));
        let h = r.headers_mut();
        h.insert("x-host", req.headers()["host"].clone());
        for (k, v) in req.headers() {
            h.append(http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()).unwrap(), v.clone());
        }
        h.insert("x-internal", "secret".parse().unwrap());
        h.insert("x-resp-set", "backend".parse().unwrap());
        h.insert("x-resp-add", "backend".parse().unwrap());
        r
    })
    .await;
    let routes = r#"
- match: { prefix: /api/v1/ }
  forward: { cluster: backend, prefix_rewrite: /v1/, host_rewrite: internal.svc:8080 }
  request_headers:
    add: { x-req-add: proxy }
    set: { x-req-set: proxy }
    remove: [x-req-remove]
  response_headers:
    add: { x-resp-add: proxy }
    set: { x-resp-set: proxy }
    remove: [x-internal]
- match: { path: /login }
  forward: { cluster: backend, prefix_rewrite: /auth/login }
- match: { prefix: /strip }
  forward: { cluster: backend, prefix_rewrite: / }
- forward: { cluster: backend }
"#;
    let yaml = config_yaml(1, "", routes, &backend_cluster(&[backend.addr], ""));
    let p = TestProxy::start(&yaml).await;
    let mut c = h1_connect(p.addr("main")).await;

    let req = Request::get("/api/v1/users/7?full=1")
        .header("host", "public.example.com")
        .header("x-req-add", "client")
        .header("x-req-set", "client")
        .header("x-req-remove", "client")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, body) = send1(&mut c, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"/v1/users/7?full=1", "prefix rewritten, query kept");
    assert_eq!(parts.headers["x-host"], "internal.svc:8080");
    let all = |name: &str| -> Vec<String> {
        parts.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(all("x-echo-x-req-add"), ["client", "proxy"], "add appends");
    assert_eq!(all("x-echo-x-req-set"), ["proxy"], "set replaces");
    assert!(all("x-echo-x-req-remove").is_empty(), "remove removes");
    assert_eq!(all("x-resp-add"), ["backend", "proxy"]);
    assert_eq!(all("x-resp-set"), ["proxy"]);
    assert!(all("x-internal").is_empty());

    let (_, body) = send1(&mut c, get_req("h", "/login?next=/x")).await;
    assert_eq!(&body[..], b"/auth/login?next=/x", "exact path rewritten");
    let (_, body) = send1(&mut c, get_req("h", "/strip/a/b")).await;
    assert_eq!(&body[..], b"/a/b", "no double slash after rewrite to /");
    let (parts, body) = send1(&mut c, get_req("keep.example.com", "/other")).await;
    assert_eq!(&body[..], b"/other");
    assert_eq!(parts.headers["x-host"], "keep.example.com", "authority kept without host_rewrite");
    assert!(parts.headers.contains_key("x-internal"), "edits are per route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_routing_and_forwarded_normalized() {
    let backend = Backend::named("b").await;
    let routes = "- { match: { prefix: /admin }, direct_response: { status: 403, body: denied } }\n- forward: { cluster: backend }";
    let yaml = config_yaml(1, "", routes, &backend_cluster(&[backend.addr], ""));
    let p = TestProxy::start(&yaml).await;
    let addr = p.addr("main");
    // Policy sees the normalized path: every spelling of /admin is denied.
    for path in
        ["/admin", "/public/../admin", "/a/%2e%2e/admin", "/a/%2E%2e/%2e/admin", "//admin", "/./admin/x"]
    {
        let out =
            raw(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
    }
    assert_eq!(backend.hits(), 0);
    // The upstream gets the same normalized form.
    let cases = [
        ("/a/b/../c", "/a/c"),
        ("//x", "/x"),
        ("/x//y///z", "/x/y/z"),
        ("/%7Euser/./p", "/~user/p"),
        ("/a/%2fb", "/a/%2Fb"),
        ("/../../etc/passwd?q=1", "/etc/passwd?q=1"),
    ];
    for (sent, want) in cases {
        let out =
            raw(addr, format!("GET {sent} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{sent}: {out}");
        assert_eq!(backend.last().uri.to_string(), want, "{sent}");
    }
    // An invalid escape is rejected, not guessed at.
    let out = raw(addr, b"GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let backend = Backend::start(|_req| async move {
        let mut r = http::Response::new(Full::new(Bytes::from("ok")));
        let h = r.headers_mut();
        h.insert("connection", "x-upstream-private".parse().unwrap());
        h.insert("x-upstream-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-public", "1".parse().unwrap());
        r
    })
    .await;
    let p = TestProxy::start(&simple_config(&[backend.addr])).await;
    let mut c = h1_connect(p.addr("main")).await;
    let req = Request::get("/")
        .header("host", "x")
        .header("connection", "keep-alive, x-authz-user, x-forwarded-for, x-request-id, host")
        .header("x-authz-user", "admin")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-request-id", "my-request")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-other", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, _) = send1(&mut c, req).await;
    assert_eq!(parts.status, 200);
    let seen = backend.last().headers;
    for h in ["connection", "x-authz-user", "keep-alive", "proxy-connection"] {
        assert!(!seen.contains_key(h), "upstream saw hop-by-hop `{h}`: {seen:?}");
    }
    assert_eq!(seen["te"], "trailers", "te: trailers survives (gRPC needs it)");
    assert_eq!(seen["x-other"], "kept");
    // Identity headers the proxy sets cannot be stripped by naming them in `connection`.
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-request-id"], "my-request");
    assert!(seen.contains_key("traceparent"));
    // The upstream request has its `host` (the authority) however it is named.
    assert_eq!(seen.get_all("host").iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(), ["x"]);
    for h in ["x-request-id", "x-forwarded-for", "x-forwarded-proto", "traceparent"] {
        assert_eq!(seen.get_all(h).iter().count(), 1, "{h} in {seen:?}");
    }
    // And downstream does not see the upstream's hop-by-hop headers.
    assert!(!parts.headers.contains_key("x-upstream-private"), "{:?}", parts.headers);
    assert!(!parts.headers.contains_key("keep-alive"));
    assert_eq!(parts.headers["x-public"], "1");
}

/// The fields the proxy sets, the same whether the HTTP/1.1 encoder writes
/// them after the request's own (nothing else touches the request's map: the
/// common case) or they go in the map (here: a route that edits request
/// fields; also with filters, or an HTTP/2 upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_request_id_and_traceparent() {
    check_forwarded_fields("{ forward: { cluster: backend } }").await;
    check_forwarded_fields("{ forward: { cluster: backend }, request_headers: { set: { x-edited: yes } } }")
        .await;
}

async fn check_forwarded_fields(route: &str) {
    let backend = Backend::named("b").await;
    let yaml = format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 1
listeners:
  - name: edge
    address: 127.0.0.1:0
    virtual_hosts:
      - {{ name: all, domains: ["*"], routes: [{route}] }}
  - name: internal
    address: 127.0.0.1:0
    trust_forwarded_headers: true
    virtual_hosts:
      - {{ name: all, domains: ["*"], routes: [{route}] }}
clusters:
  - {{ name: backend, endpoints: ["{}"] }}
"#,
        backend.addr
    );
    // Each field the proxy sets is there once.
    let once = |h: &http::HeaderMap| {
        for name in ["x-request-id", "x-forwarded-for", "x-forwarded-proto", "traceparent"] {
            assert_eq!(h.get_all(name).iter().count(), 1, "{name} in {h:?} ({route})");
        }
    };
    let p = TestProxy::start(&yaml).await;
    let mut edge = h1_connect(p.addr("edge")).await;
    let mut internal = h1_connect(p.addr("internal")).await;
    let spoofed = || {
        Request::get("/")
            .header("host", "x")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-proto", "https")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // An untrusted client cannot spoof its address or scheme.
    send1(&mut edge, spoofed()).await;
    let h = backend.last().headers;
    once(&h);
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    // A trusted hop's chain is kept and extended.
    send1(&mut internal, spoofed()).await;
    let h = backend.last().headers;
    once(&h);
    assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    // A trusted hop without them gets them.
    send1(&mut internal, get_req("x", "/")).await;
    let h = backend.last().headers;
    once(&h);
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");

    // No request id: one is made (32 hex digits) and the trace starts from it.
    send1(&mut edge, get_req("x", "/")).await;
    let h = backend.last().headers;
    once(&h);
    let rid = h["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 32);
    assert!(rid.bytes().all(|b| b.is_ascii_hexdigit()));
    let tp = h["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", rid.as_str(), "01"), "{tp}");
    send1(&mut edge, get_req("x", "/")).await;
    assert_ne!(backend.last().headers["x-request-id"].to_str().unwrap(), rid, "ids are unique");

    // An incoming id is kept; an incoming trace keeps its id and flags, with a new parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace}-00f067aa0ba902b7-00");
    let req = Request::get("/")
        .header("host", "x")
        .header("x-request-id", "req-123")
        .header("traceparent", &incoming)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send1(&mut edge, req).await;
    let h = backend.last().headers;
    once(&h);
    assert_eq!(h["x-request-id"], "req-123");
    let tp = h["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace, "00"), "{tp}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "this hop gets its own span id");
    assert_eq!(parts[2].len(), 16);

    // A malformed traceparent is replaced, not propagated.
    let req = Request::get("/")
        .header("host", "x")
        .header("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send1(&mut edge, req).await;
    let h = backend.last().headers;
    once(&h);
    let tp = h["traceparent"].to_str().unwrap().to_owned();
    assert!(!tp.contains("00000000000000000000000000000000"), "{tp}");

    // An ill-formed request id (empty, or past 128 bytes) is replaced by a new one.
    for bad in [String::new(), "x".repeat(129)] {
        let req = Request::get("/").header("host", "x").header("x-request-id", &bad);
        send1(&mut edge, req.body(Full::new(Bytes::new())).unwrap()).await;
        let h = backend.last().headers;
        once(&h);
        assert_eq!(h["x-request-id"].len(), 32, "{h:?}");
    }
}
