#!/usr/bin/env python3
"""Sluice's wasm start-up figures (run by bench/wasm-startup.sh; Python 3.11 stdlib).

Measures, against a small in-process HTTP backend on loopback:

* start time: exec of `sluice proxy` -> first request answered through it (200 and the
  backend's body), with no filters, with 5 distinct modules and an empty cache dir
  (cold: every module compiled), and again with the same cache dir (cached: every
  module loaded from wasmtime's disk cache). The module-cache counters on /metrics
  confirm which of the two happened.
* VM start time: `sluice_wasm_vm_start_seconds` (sum / count) from /metrics: the
  worker VMs built at start (the module just compiled or loaded), and the ones built
  by config reloads (the module already in memory): instantiate, `_initialize`,
  root context, `on_vm_start`, `on_configure`. Alongside, the instantiation proper
  of the same VMs, `sluice_wasm_vm_instantiate_seconds` (Store, instance, exports:
  before any guest code runs).
* RSS per extra VM: RSS of the process after a few hundred requests, with 0, 1, 5
  and 10 filters (the same module, so one compiled copy), per filter and worker:
  (RSS(N) - RSS(0)) / (N x workers), and the least-squares slope over N / workers.
* Envoy (when given): start time and RSS with the same 5 modules, for reference
  (V8 has no compiled-module cache there).

Every figure is the median over --reps rounds (min-max shown); configurations are
interleaved within a round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bench as b

BODY = b"hello from backend\n"
MIB = 1024.0


# --------------------------------------------------------------------------
# modules


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def variant(module: bytes, tag: str) -> bytes:
    """The module with a custom section appended: same code, another sha256, so
    Sluice (and wasmtime's disk cache) treat it as a module of its own."""
    name, payload = b"sluice-bench", tag.encode()
    body = _leb(len(name)) + name + payload
    return module + b"\x00" + _leb(len(body)) + body


def make_modules(noop: Path, hdr: Path, out: Path) -> list[str]:
    """Five distinct modules: no-op and header-rewrite variants, alternating."""
    out.mkdir(parents=True, exist_ok=True)
    srcs = [noop.read_bytes(), hdr.read_bytes()]
    paths = []
    for i in range(1, 6):
        p = out / f"m{i}.wasm"
        p.write_bytes(variant(srcs[(i - 1) % 2], f"variant {i}"))
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------
# backend, processes, requests


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


class Proc:
    """A started process in its own process group, stopped with TERM then KILL."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.started = time.perf_counter()
        with open(log, "ab") as f:
            self.p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      env=env)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait()


def get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def first_request(proc: Proc, port: int, timeout: float) -> float:
    """Polls until a request through the proxy answers 200 with the body; returns
    the time since the process was started."""
    t0, deadline = proc.started, time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.p.poll() is not None:
            tail = proc.log.read_text(errors="replace")[-400:]
            raise RuntimeError(f"exited with {proc.p.returncode} before serving: {tail}")
        try:
            status, body = get(port, timeout=1.0)
            if status == 200 and body == BODY:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no answer through 127.0.0.1:{port} after {timeout} s")


def start(argv: list[str], log: Path, port: int, timeout: float, quiet: tuple[float, float],
          env: dict | None = None) -> tuple[Proc, float]:
    if quiet[0] > 0:
        b.wait_quiet(*quiet)
    proc = Proc(argv, log, env)
    try:
        return proc, first_request(proc, port, timeout)
    except BaseException:
        proc.stop()
        raise


def drive(port: int, requests: int, conns: int = 8) -> None:
    """Keep-alive requests on several connections (so that every worker gets some)."""
    errors = []

    def one(n: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            for _ in range(n):
                c.request("GET", "/")
                r = c.getresponse()
                if r.read() != BODY or r.status != 200:
                    errors.append(r.status)
        except OSError as e:
            errors.append(str(e))
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(requests // conns,)) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MiB, over the process and its descendants."""
    total = anon = 0
    for p in b.process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
        except OSError:
            pass
    return total / MIB, anon / MIB


def metrics(admin: int) -> str:
    status, body = get(admin, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return body.decode()


VM_START = "sluice_wasm_vm_start_seconds"
VM_INSTANTIATE = "sluice_wasm_vm_instantiate_seconds"


def vm_starts(text: str, name: str = VM_START) -> tuple[float, float]:
    """(count, sum in seconds) of a VM start histogram over every plugin."""
    return tuple(metric_sum(text, f"{name}_{k}") for k in ("count", "sum"))


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (over all label sets, or those containing `labels`)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


# --------------------------------------------------------------------------
# configs


def sluice_config(path: Path, modules: list[str], a: argparse.Namespace, extra: str = "") -> None:
    cfg = {
        "admin": {"address": f"127.0.0.1:{a.port_base + 2}"},
        "workers": a.workers,
        "listeners": [{
            "name": "bench", "address": f"127.0.0.1:{a.port_base + 1}",
            "filters": [{"name": f"f{i}", "module": m} for i, m in enumerate(modules, 1)],
            "virtual_hosts": [{"name": "all", "domains": ["*"],
                               "routes": [{"forward": {"cluster": "backend"}}]}],
        }],
        "clusters": [{"name": "backend", "endpoints": [f"127.0.0.1:{a.port_base}"]}],
    }
    # JSON is YAML; write then rename, so the config watcher never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=1) + "\n" + extra)
    tmp.replace(path)


def envoy_config(path: Path, modules: list[str], a: argparse.Namespace) -> None:
    wasm = [{
        "name": f"f{i}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {"name": f"f{i}", "root_id": "", "vm_config": {
                "vm_id": f"vm{i}", "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": m}}}},
        },
    } for i, m in enumerate(modules, 1)]
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
        "http_filters": wasm + [router],
    }
    addr = lambda port: {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    cfg = {
        "admin": {"address": addr(a.port_base + 4)},
        "static_resources": {
            "listeners": [{"name": "bench", "address": addr(a.port_base + 3), "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm}]}]}],
            "clusters": [{"name": "backend", "type": "STATIC", "connect_timeout": "2s",
                          "load_assignment": {"cluster_name": "backend", "endpoints": [
                              {"lb_endpoints": [{"endpoint": {"address": addr(a.port_base)}}]}]}}],
        },
    }
    path.write_text(json.dumps(cfg, indent=1) + "\n")


# --------------------------------------------------------------------------
# the rounds


def run(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sluice-startup."))
    quiet = (a.quiet_wait, a.quiet_busy)
    modules = make_modules(Path(a.noop), Path(a.hdr), work / "modules")
    noop = str(work / "modules" / "noop.wasm")
    shutil.copy(a.noop, noop)
    warm_cache = work / "cache-warm"  # for the RSS runs: modules loaded, never compiled there
    res: dict = {k: [] for k in (
        "start_none", "start_cold", "start_cached", "vm_start_boot_us", "vm_start_reload_us",
        "vm_inst_boot_us", "vm_inst_reload_us",
        "envoy_start_none", "envoy_start_5")}
    res["rss"] = {}
    res["envoy_rss"] = {}
    res["checks"] = []
    sluice = lambda cfg, cache: [a.sluice, "proxy", "--config", str(cfg), "--cache-dir", str(cache)]
    port, admin = a.port_base + 1, a.port_base + 2

    def measure_rss(proc: Proc, port: int) -> tuple[float, float]:
        drive(port, a.requests)
        time.sleep(0.3)
        return rss(proc.p.pid)

    # Compile the RSS module into the warm cache once, unmeasured.
    cfg = work / "sluice.yaml"
    sluice_config(cfg, [noop], a)
    p, _ = start(sluice(cfg, warm_cache), raw / "sluice-prewarm.log", port, a.timeout, (0, 0))
    p.stop()

    for rep in range(1, a.reps + 1):
        print(f"== round {rep} of {a.reps}", file=sys.stderr)
        # Start time without filters.
        cfg = work / "sluice.yaml"
        sluice_config(cfg, [], a)
        p, t = start(sluice(cfg, work / f"cache-none-{rep}"), raw / "sluice-none.log", port,
                     a.timeout, quiet)
        res["start_none"].append(t)
        res["rss"].setdefault(0, []).append(measure_rss(p, port))
        p.stop()

        # 5 distinct modules, cold cache, then the same cache again.
        cache = work / f"cache-{rep}"
        sluice_config(cfg, modules, a)

        def timed_start(key: str, outcome: str) -> tuple[Proc, dict]:
            p, t = start(sluice(cfg, cache), raw / f"sluice-{key}.log", port, a.timeout, quiet)
            text = metrics(admin)
            n = metric_sum(text, "sluice_wasm_module_cache_total", f'result="{outcome}"')
            how = {"compiled": "compiled", "disk": "loaded from the disk cache"}[outcome]
            res["checks"].append(f"round {rep} {key}: {n:.0f} of 5 modules {how}")
            res[f"start_{key}"].append(t)
            counts = {}
            for name, k in ((VM_START, "vm_start"), (VM_INSTANTIATE, "vm_inst")):
                c, s = counts[name] = vm_starts(text, name)
                if c:
                    res[f"{k}_boot_us"].append(1e6 * s / c)
            return p, counts

        p, _ = timed_start("cold", "compiled")
        p.stop()
        p, before = timed_start("cached", "disk")
        # Reloads: each builds new factories and W x 5 new VMs from the in-memory modules.
        for k in range(1, a.reloads + 1):
            sluice_config(cfg, modules, a, extra=f"# reload {rep}.{k}\n")
            deadline = time.monotonic() + a.timeout
            while metric_sum(metrics(admin), "sluice_config_reloads_total", 'result="ok"') < k:
                if time.monotonic() > deadline:
                    raise RuntimeError("config reload not applied in time")
                time.sleep(0.02)
        text = metrics(admin)
        for name, k in ((VM_START, "vm_start"), (VM_INSTANTIATE, "vm_inst")):
            (c, s), (c0, s0) = vm_starts(text, name), before[name]
            if c > c0:
                res[f"{k}_reload_us"].append(1e6 * (s - s0) / (c - c0))
                if name == VM_START:
                    res["checks"].append(f"round {rep}: {c - c0:.0f} VMs built by {a.reloads} reloads")
        p.stop()

        # RSS with N filters of one module (loaded from the warm cache).
        for n in (1, 5, 10):
            cfg_n = work / f"sluice-{n}.yaml"
            sluice_config(cfg_n, [noop] * n, a)
            p, _ = start(sluice(cfg_n, warm_cache), raw / f"sluice-rss{n}.log", port, a.timeout,
                         (0, 0))
            res["rss"].setdefault(n, []).append(measure_rss(p, port))
            p.stop()

        if a.envoy:
            eport = a.port_base + 3
            for key, mods in (("envoy_start_none", []), ("envoy_start_5", modules)):
                ecfg = work / f"{key}.yaml"
                envoy_config(ecfg, mods, a)
                argv = [a.envoy, "--concurrency", str(a.workers), "--disable-hot-restart",
                        "--log-level", "warn", "-c", str(ecfg)]
                p, t = start(argv, raw / f"{key}.log", eport, a.timeout, quiet)
                res[key].append(t)
                res["envoy_rss"].setdefault(len(mods), []).append(measure_rss(p, eport))
                p.stop()
    shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------
# report


def _spread(xs: list[float], scale: float = 1.0, nd: int = 1) -> str:
    if not xs:
        return "—"
    xs = [x * scale for x in xs]
    med = b._med(xs)
    return f"{med:.{nd}f} ({min(xs):.{nd}f}–{max(xs):.{nd}f})" if len(xs) > 1 else f"{med:.{nd}f}"


def summarize(res: dict, workers: int) -> dict:
    med = lambda xs: b._med(xs) if xs else None
    rss = {n: (med([r[0] for r in v]), med([r[1] for r in v])) for n, v in res["rss"].items()}
    s: dict = {
        "start_none_ms": med([1e3 * t for t in res["start_none"]]),
        "start_cold_ms": med([1e3 * t for t in res["start_cold"]]),
        "start_cached_ms": med([1e3 * t for t in res["start_cached"]]),
        "vm_start_boot_us": med(res["vm_start_boot_us"]),
        "vm_start_reload_us": med(res["vm_start_reload_us"]),
        "vm_inst_boot_us": med(res["vm_inst_boot_us"]),
        "vm_inst_reload_us": med(res["vm_inst_reload_us"]),
        "rss_mib": {n: {"rss": r[0], "anon": r[1]} for n, r in sorted(rss.items())},
        "envoy_start_none_ms": med([1e3 * t for t in res["envoy_start_none"]]),
        "envoy_start_5_ms": med([1e3 * t for t in res["envoy_start_5"]]),
    }
    per_vm: dict = {}
    if 0 in rss:
        for i, kind in ((0, "rss"), (1, "anon")):
            per_vm[kind] = {n: 1024 * (rss[n][i] - rss[0][i]) / (n * workers)
                            for n in sorted(rss) if n}
            slope = b._slope([(n, rss[n][i]) for n in rss])
            per_vm[kind]["fit"] = None if slope is None else 1024 * slope / workers
    s["kib_per_vm"] = per_vm
    e = {n: (med([r[0] for r in v]), med([r[1] for r in v])) for n, v in res["envoy_rss"].items()}
    if 0 in e and 5 in e:
        s["envoy_kib_per_vm_5"] = {"rss": 1024 * (e[5][0] - e[0][0]) / (5 * workers),
                                   "anon": 1024 * (e[5][1] - e[0][1]) / (5 * workers)}
        s["envoy_rss_mib"] = {n: {"rss": r[0], "anon": r[1]} for n, r in sorted(e.items())}
    return s


def render(res: dict, s: dict, a: argparse.Namespace, md: bool) -> str:
    out = []
    head = lambda t: out.extend([f"**{t}**" if md else t + ":", ""])
    head(f"Start time: exec -> first request answered through the proxy, ms, median "
         f"(min–max) of {a.reps} rounds; {a.workers} workers")
    rows = [["sluice, no filters", _spread(res["start_none"], 1e3)],
            ["sluice, 5 modules, empty cache dir (cold: compiled)", _spread(res["start_cold"], 1e3)],
            ["sluice, 5 modules, same cache dir (cached: loaded)", _spread(res["start_cached"], 1e3)]]
    if res["envoy_start_none"]:
        rows += [["envoy, no filters", _spread(res["envoy_start_none"], 1e3)],
                 ["envoy, the same 5 modules (V8)", _spread(res["envoy_start_5"], 1e3)]]
    out += [b._table(["configuration", "start ms"], rows, md), ""]

    head("VM start, µs per VM, median (min–max) of the rounds: whole start "
         "(sluice_wasm_vm_start_seconds sum / count: instantiate, _initialize, root context, "
         "on_vm_start, on_configure) and the instantiation proper "
         "(sluice_wasm_vm_instantiate_seconds: Store, instance, exports; no guest code)")
    out += [b._table(["when", "whole start µs", "instantiate µs"], [
        [f"at start ({a.workers} workers x 5 filters, module just compiled or loaded)",
         _spread(res["vm_start_boot_us"], 1, 1), _spread(res["vm_inst_boot_us"], 1, 1)],
        [f"on reload ({a.reloads} reloads x {a.workers} workers x 5 filters, module in memory)",
         _spread(res["vm_start_reload_us"], 1, 1), _spread(res["vm_inst_reload_us"], 1, 1)]], md), ""]

    head(f"RSS after {a.requests} requests, N filters of one module (no-op), {a.workers} "
         f"workers (N x {a.workers} VMs); MiB, median of {a.reps}; per VM = (RSS(N) - RSS(0)) "
         f"/ (N x {a.workers}), fit = slope over N / {a.workers}")
    rows = []
    for n, r in s["rss_mib"].items():
        pv = s["kib_per_vm"]
        rows.append([str(n), f"{r['rss']:.1f}", f"{r['anon']:.1f}",
                     b._fmt(pv.get("rss", {}).get(n), 0), b._fmt(pv.get("anon", {}).get(n), 0)])
    pv = s["kib_per_vm"]
    rows.append(["fit", "", "", b._fmt(pv.get("rss", {}).get("fit"), 0),
                 b._fmt(pv.get("anon", {}).get("fit"), 0)])
    if "envoy_kib_per_vm_5" in s:
        e = s["envoy_rss_mib"]
        rows.append(["envoy 0 → 5 (distinct modules)", f"{e[0]['rss']:.1f} → {e[5]['rss']:.1f}",
                     f"{e[0]['anon']:.1f} → {e[5]['anon']:.1f}",
                     b._fmt(s["envoy_kib_per_vm_5"]["rss"], 0), b._fmt(s["envoy_kib_per_vm_5"]["anon"], 0)])
    out += [b._table(["filters", "VmRSS MiB", "RssAnon MiB", "KiB per VM (RSS)",
                      "KiB per VM (anon)"], rows, md), ""]

    out.append("Targets:")
    def check(label: str, v, limit: float, unit: str) -> None:
        if v is not None:
            out.append(f"  [{'PASS' if v <= limit else 'FAIL'}] {label}: {v:.1f} {unit}")
    check("VM instantiation from a cached module <= 20 µs (on reload, instantiate proper)",
          s["vm_inst_reload_us"], 20, "µs")
    check("VM start from a cached module <= 20 µs (on reload, whole start)", s["vm_start_reload_us"], 20, "µs")
    check("<= 2 MiB RSS per extra VM (5 filters)", (s["kib_per_vm"].get("rss", {}).get(5)), 2048, "KiB")
    check("start with 5 cached modules <= 200 ms", s["start_cached_ms"], 200, "ms")
    out.append("")
    # The same check in every round is said once, with how many rounds it held in.
    seen: dict[str, int] = {}
    for c in res["checks"]:
        what = re.sub(r"^round \d+:? ?", "", c)
        seen[what] = seen.get(what, 0) + 1
    out.append("Checks: " + "; ".join(f"{w} ({n} of {a.reps} rounds)" for w, n in seen.items()))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--envoy", default="")
    ap.add_argument("--noop", required=True, help="the no-op filter's .wasm")
    ap.add_argument("--hdr", required=True, help="the header-rewrite filter's .wasm")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--port-base", type=int, default=18180)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--quiet-wait", type=float, default=30)
    ap.add_argument("--quiet-busy", type=float, default=25)
    ap.add_argument("--header", default="", help="text file to put on top of the summaries")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    ports = list(range(a.port_base, a.port_base + 5))
    if b.cmd_ports_free(argparse.Namespace(ports=ports)) != 0:
        print(f"refusing to start: a port in {ports[0]}..{ports[-1]} is taken (PORT_BASE=)",
              file=sys.stderr)
        return 1
    backend = ThreadingHTTPServer(("127.0.0.1", a.port_base), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        res = run(a)
    finally:
        backend.shutdown()
    s = summarize(res, a.workers)
    header = Path(a.header).read_text().rstrip("\n") if a.header else ""
    out = Path(a.out)
    text = render(res, s, a, md=False)
    (out / "summary.txt").write_text(header + "\n\n" + text + "\n")
    (out / "summary.md").write_text("```\n" + header + "\n```\n\n" + render(res, s, a, md=True) + "\n")
    (out / "summary.json").write_text(json.dumps({"raw": res, "summary": s}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
