#!/usr/bin/env python3
"""Helper for bench/run.sh (Python 3.11 standard library only).

Sub-commands:
  ports-free PORT...            exit 1 (listing them) if any port is taken on 127.0.0.1
  render TEMPLATE OUT           copy TEMPLATE to OUT replacing @NAME@ with $NAME
                                (and `#@repeat NAME` ... `#@end` blocks, $NAME times)
  ready --pid P --h1 URL [--h2 URL] --body TEXT --timeout S
                                wait until URL answers 200 with TEXT (and the h2c URL
                                answers one request); exit 2 if P exited first
  rss --pid P                   print the RSS (KiB) of P and its descendants
  measure ...                   warm up, then run one load-generator run while sampling
                                CPU (proxy, backend, load generator, whole machine) and
                                RSS; write the raw output and a JSON record
  report DIR [--pool DIR2 ...]  print the per-run and summary tables from DIR/raw/*.json
                                (and DIR2's) and write DIR/summary.{txt,md,json}

What is measured and why: on a 2-vCPU box shared by the load generator, the
backend and the proxy, requests/s mostly says how the CPU was split; the
proxy's own CPU time per request (utime+stime of its processes over the run,
divided by the requests completed) is the stable cost figure. "other CPU" is
the machine's busy time not accounted to those three, to flag noisy runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# --------------------------------------------------------------------------
# /proc sampling


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx: master and workers)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _tree_sums(pid: int, a: int, b: int) -> tuple[int, int]:
    """Two /proc/<pid>/stat fields (indexes into `_stat_fields`), summed over pid
    and its descendants."""
    x = y = 0
    for p in process_tree(pid):
        f = _stat_fields(p)
        if f is not None:
            x += int(f[a])
            y += int(f[b])
    return x, y


def tree_cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime), in clock ticks, summed over pid and its descendants."""
    return _tree_sums(pid, 11, 12)  # fields 14, 15


def tree_cpu_ticks(pid: int) -> int:
    """utime+stime, in clock ticks, summed over pid and its descendants."""
    return sum(tree_cpu_split(pid))


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over pid and its descendants (shared pages count per process)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def tree_faults(pid: int) -> tuple[int, int]:
    """(minor, major) page faults, summed over pid and its descendants."""
    return _tree_sums(pid, 7, 9)  # fields 10, 12


def steal_ticks() -> int:
    """Clock ticks all CPUs spent waiting for the hypervisor since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) if len(parts) > 8 else 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    vals = [int(v) for v in parts[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice;
    # guest time is already included in user/nice.
    vals = vals[:8]
    idle = vals[3] + vals[4]
    total = sum(vals)
    return total - idle, total


def pid_alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


# --------------------------------------------------------------------------
# ports-free, render


def cmd_ports_free(args: argparse.Namespace) -> int:
    taken = []
    for port in args.ports:
        # Something answering is a taker; so is a listener that keeps us from binding
        # (SO_REUSEADDR only lets us past connections in TIME_WAIT, as servers do).
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(0.5)
        try:
            c.connect(("127.0.0.1", port))
            taken.append(port)
            continue
        except OSError:
            pass
        finally:
            c.close()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            taken.append(port)
        finally:
            s.close()
    if taken:
        print("ports already in use: " + " ".join(map(str, taken)), file=sys.stderr)
        return 1
    return 0


PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def expand_repeats(text: str) -> str:
    """Expand `#@repeat NAME` ... `#@end` blocks: the lines between are written
    $NAME times, with @I@ standing for 1, 2, ... (e.g. N wasm filters)."""
    out: list[str] = []
    block: list[str] | None = None
    count = 0
    for line in text.splitlines(keepends=True):
        word = line.strip().split()
        if word[:1] == ["#@repeat"] and len(word) == 2:
            block, count = [], int(os.environ.get(word[1], "0"))
        elif word[:1] == ["#@end"] and block is not None:
            for i in range(1, count + 1):
                out.extend(l.replace("@I@", str(i)) for l in block)
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    return "".join(out)


def cmd_render(args: argparse.Namespace) -> int:
    text = expand_repeats(Path(args.template).read_text())
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in os.environ})
    if missing:
        print(f"{args.template}: no value for " + ", ".join(missing), file=sys.stderr)
        return 1
    Path(args.out).write_text(PLACEHOLDER.sub(lambda m: os.environ[m.group(1)], text))
    return 0


# --------------------------------------------------------------------------
# ready


def _http_ok(url: str, body: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            got = resp.read().decode("utf-8", "replace")
            if resp.status == 200 and got == body:
                return True, ""
            return False, f"status {resp.status}, body {got!r}"
    except urllib.error.HTTPError as e:
        return False, f"status {e.code}"
    except (OSError, ValueError) as e:
        return False, str(e)


def _h2_ok(url: str) -> tuple[bool, str]:
    try:
        out = subprocess.run(
            ["h2load", "-n", "2", "-c", "1", url],
            capture_output=True, text=True, timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    m = re.search(r"status codes: (\d+) 2xx", out)
    if m and int(m.group(1)) == 2:
        return True, ""
    line = next((l for l in out.splitlines() if l.startswith("requests:")), out.strip()[-200:])
    return False, f"h2c check: {line}"


def cmd_ready(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    why = ""
    while time.monotonic() < deadline:
        if args.pid and not pid_alive(args.pid):
            last = f"; last check: {why}" if why else ""
            print(f"process {args.pid} exited before it was ready{last}", file=sys.stderr)
            return 2
        ok, why = _http_ok(args.h1, args.body)
        if ok:
            break
        time.sleep(0.05)
    else:
        print(f"not ready after {args.timeout}s: {args.h1}: {why}", file=sys.stderr)
        return 1
    if args.h2:
        ok, why = _h2_ok(args.h2)
        if not ok:
            print(f"HTTP/1.1 ready but {args.h2}: {why}", file=sys.stderr)
            return 1
    return 0


def cmd_rss(args: argparse.Namespace) -> int:
    print(tree_rss_kib(args.pid))
    return 0


# --------------------------------------------------------------------------
# load generators


def _dur_to_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"bad duration {value!r}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * scale


def wrk_cmd(a: argparse.Namespace, seconds: int) -> list[str]:
    return ["wrk", "-t", str(a.threads), "-c", str(a.conns), "-d", f"{seconds}s",
            "--latency", a.url]


def h2load_cmd(a: argparse.Namespace, seconds: int, log: str | None) -> list[str]:
    cmd = ["h2load", "-t", str(a.threads), "-c", str(a.conns), "-m", str(a.streams),
           "-D", str(seconds)]
    if log:
        cmd += ["--log-file", log]
    return cmd + [a.url]


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise ValueError("wrk: no 'requests in' line")
    r["requests"] = int(m.group(1))
    r["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    for pct, key in (("50", "p50_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)", out, re.M)
        r[key] = _dur_to_ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


def parse_h2load(out: str, log: str) -> dict:
    r: dict = {}
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    if not m:
        raise ValueError("h2load: no 'finished in' line")
    r["rps"] = float(m.group(2))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    r["requests"] = int(m.group(1))
    r["errors"] = int(m.group(3)) + int(m.group(4)) + int(m.group(5))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    r["non2xx"] = int(m.group(2)) + int(m.group(3)) + int(m.group(4)) if m else 0
    # Percentiles from the per-request log (start µs, status, duration µs).
    durations = []
    try:
        with open(log) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    durations.append(int(parts[2]))
    except OSError:
        pass
    durations.sort()

    def pct(p: float) -> float | None:
        if not durations:
            return None
        return durations[min(len(durations) - 1, int(p * len(durations)))] / 1000.0

    r["p50_ms"], r["p90_ms"], r["p99_ms"] = pct(0.50), pct(0.90), pct(0.99)
    return r


# --------------------------------------------------------------------------
# measure


def _run_timed(cmd: list[str]) -> tuple[str, float]:
    """Run cmd, return (stdout+stderr, CPU seconds of the load generator itself)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {p.returncode}: {out.strip()[-500:]}")
    return out, ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, busy_pct: float) -> float:
    """Wait (up to max_wait s) until the machine's busy CPU over 1 s is below busy_pct
    (% of one core). Everything of ours is idle then, so what is busy is someone else.
    Returns the last busy figure."""
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        b0, t0 = machine_ticks(), time.monotonic()
        time.sleep(1.0)
        b1, t1 = machine_ticks(), time.monotonic()
        busy = 100 * (b1[0] - b0[0]) / CLK_TCK / (t1 - t0)
        if busy < busy_pct or time.monotonic() >= deadline:
            if told:
                print(f"    (machine busy {busy:.0f} % of one core; going on)", file=sys.stderr)
            return busy
        if not told:
            print(f"    waiting up to {max_wait:.0f} s for the machine to go quiet "
                  f"(busy {busy:.0f} % of one core, threshold {busy_pct:.0f} %)", file=sys.stderr)
            told = True


def cmd_measure(a: argparse.Namespace) -> int:
    raw = Path(a.out_dir)
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{a.case}-{a.proto}-rep{a.rep}"
    log = str(Path(a.scratch) / f"{stem}.h2load.log") if a.proto == "h2" else None

    build = (lambda s, lg=None: h2load_cmd(a, s, lg)) if a.proto == "h2" else \
            (lambda s, lg=None: wrk_cmd(a, s))
    busy_before = wait_quiet(a.quiet_wait, a.quiet_busy) if a.quiet_wait > 0 else None
    if a.warmup > 0:
        _run_timed(build(a.warmup))

    sample = [p for p in (a.proxy_pid,) if p]
    rss_max = [0]
    stop = threading.Event()

    def poll_rss() -> None:
        while not stop.wait(0.5):
            if a.proxy_pid:
                rss_max[0] = max(rss_max[0], tree_rss_kib(a.proxy_pid))

    poller = threading.Thread(target=poll_rss, daemon=True)
    watched = {"backend": a.backend_pid, **({"proxy": a.proxy_pid} if a.proxy_pid else {})}
    trees0 = {k: set(process_tree(pid)) for k, pid in watched.items()}
    m0 = machine_ticks()
    p0 = tree_cpu_split(a.proxy_pid) if a.proxy_pid else (0, 0)
    f0 = tree_faults(a.proxy_pid) if a.proxy_pid else (0, 0)
    s0 = steal_ticks()
    b0 = tree_cpu_ticks(a.backend_pid)
    t0 = time.monotonic()
    poller.start()
    out, lg_cpu = _run_timed(build(a.duration, log))
    t1 = time.monotonic()
    p1 = tree_cpu_split(a.proxy_pid) if a.proxy_pid else (0, 0)
    f1 = tree_faults(a.proxy_pid) if a.proxy_pid else (0, 0)
    s1 = steal_ticks()
    b1 = tree_cpu_ticks(a.backend_pid)
    m1 = machine_ticks()
    stop.set()
    poller.join()
    # A run is invalid if a process we sample died or was replaced meanwhile (its CPU
    # time would be lost, and the load generator saw errors from it).
    invalid = []
    for k, pid in watched.items():
        if not pid_alive(pid):
            invalid.append(f"{k} process {pid} died during the run")
        elif not trees0[k] <= set(process_tree(pid)):
            invalid.append(f"{k} lost processes during the run "
                           f"({len(trees0[k] - set(process_tree(pid)))} of {len(trees0[k])})")
    if a.proxy_pid:
        rss_max[0] = max(rss_max[0], tree_rss_kib(a.proxy_pid))

    (raw / f"{stem}.out").write_text(out)
    parsed = parse_h2load(out, log or "") if a.proto == "h2" else parse_wrk(out)
    if log:
        try:
            os.unlink(log)
        except OSError:
            pass

    wall = t1 - t0
    busy_ticks = m1[0] - m0[0]
    proxy_s = (sum(p1) - sum(p0)) / CLK_TCK
    proxy_sys_s = (p1[1] - p0[1]) / CLK_TCK
    backend_s = (b1 - b0) / CLK_TCK
    machine_busy_s = busy_ticks / CLK_TCK
    other_s = max(0.0, machine_busy_s - proxy_s - backend_s - lg_cpu)
    req = parsed["requests"] or 1
    rec = {
        "case": a.case, "proto": a.proto, "rep": a.rep, "tool": build(a.duration)[0],
        "command": " ".join(build(a.duration, log and "<log>")),
        "wall_s": round(wall, 3), **parsed,
        "proxy_cpu_s": round(proxy_s, 3) if sample else None,
        "proxy_cpu_pct": round(100 * proxy_s / wall, 1) if sample else None,
        "proxy_us_per_req": round(1e6 * proxy_s / req, 2) if sample else None,
        "proxy_sys_us_per_req": round(1e6 * proxy_sys_s / req, 2) if sample else None,
        "backend_cpu_pct": round(100 * backend_s / wall, 1),
        "backend_us_per_req": round(1e6 * backend_s / req, 2),
        "loadgen_cpu_pct": round(100 * lg_cpu / wall, 1),
        "other_cpu_pct": round(100 * other_s / wall, 1),
        "machine_busy_pct": round(100 * machine_busy_s / wall, 1),
        # CPU time the hypervisor gave to someone else, and the proxy's page faults:
        # what moves a proxy's µs per request when its instructions do not.
        "steal_pct": round(100 * (s1 - s0) / CLK_TCK / wall, 1),
        "proxy_minflt_per_kreq": round(1000 * (f1[0] - f0[0]) / req, 2) if sample else None,
        "proxy_majflt_per_kreq": round(1000 * (f1[1] - f0[1]) / req, 3) if sample else None,
        "busy_before_pct": None if busy_before is None else round(busy_before, 1),
        "ncpu": NCPU,
        "rss_idle_kib": a.rss_idle if sample else None,
        "rss_loaded_kib": rss_max[0] if sample else None,
        "invalid": "; ".join(invalid) or None,
    }
    (raw / f"{stem}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"  {a.case:<14} {a.proto}  rep {a.rep}: {rec['rps']:>9,.0f} req/s  "
          f"p50 {_fmt(rec['p50_ms'], 2)} ms  p99 {_fmt(rec['p99_ms'], 2)} ms  "
          f"proxy {_fmt(rec['proxy_us_per_req'], 1)} µs/req  "
          f"errors {rec['errors'] + rec['non2xx']}  other CPU {rec['other_cpu_pct']} %  "
          f"steal {rec['steal_pct']} %"
          + (f"  INVALID: {rec['invalid']}" if invalid else ""))
    return 3 if invalid else 0


# --------------------------------------------------------------------------
# report


def _fmt(v, nd: int = 1, suffix: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and nd == 0:
        return f"{v:,.0f}{suffix}"
    return f"{v:.{nd}f}{suffix}"


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


NOISY_OTHER_PCT = 10.0
PROTO_NAME = {"h1": "HTTP/1.1 (wrk)", "h2": "HTTP/2 h2c (h2load)",
              "lat": "HTTP/1.1, 1 connection (wrk -t1 -c1): unloaded latency"}
PROTOS = ("h1", "h2", "lat")


def _table(headers: list[str], rows: list[list[str]], md: bool) -> str:
    if md:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summarize(recs: list[dict], case_order: list[str]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in recs:
        if r.get("invalid"):
            continue
        groups.setdefault((r["proto"], r["case"]), []).append(r)
    summary: dict = {}
    for (proto, case), all_rs in groups.items():
        # Quiet runs only, when there are any: a noisy run's numbers say more about
        # the neighbours than about the proxy.
        quiet = [r for r in all_rs if r["other_cpu_pct"] <= NOISY_OTHER_PCT]
        rs = quiet or all_rs
        s = {k: _med([r.get(k) for r in rs]) for k in (
            "rps", "p50_ms", "p99_ms", "proxy_cpu_pct", "proxy_us_per_req",
            "proxy_sys_us_per_req", "backend_us_per_req", "loadgen_cpu_pct", "other_cpu_pct",
            "rss_idle_kib", "rss_loaded_kib", "steal_pct")}
        s["runs"] = len(rs)
        s["all_noisy"] = not quiet
        s["rps_min"] = min(r["rps"] for r in rs)
        s["rps_max"] = max(r["rps"] for r in rs)
        # Every valid run by round, noisy or not: a round's pair shares its noise.
        s["rps_by_round"] = {f"{r['round'][0]}/{r['round'][1]}": r["rps"]
                             for r in all_rs if "round" in r}
        s["errors"] = sum(r["errors"] + r["non2xx"] for r in rs)
        s["other_cpu"] = max(r["other_cpu_pct"] for r in rs)
        summary.setdefault(proto, {})[case] = s
    for proto, cases in summary.items():
        d, n = cases.get("direct"), cases.get("nginx")
        for s in cases.values():
            s["x_direct_rps"] = _ratio(s["rps"], d and d["rps"])
            s["x_nginx_rps"] = _ratio(s["rps"], n and n["rps"])
            s["x_nginx_cpu"] = _ratio(s["proxy_us_per_req"], n and n["proxy_us_per_req"])
            s["x_nginx_p99"] = _ratio(s["p99_ms"], n and n["p99_ms"])
    return summary


def targets(summary: dict) -> list[str]:
    """Sluice's targets from the issue, checked against this run's peers."""
    lines = []

    def check(label: str, ok: bool, detail: str, *rows) -> None:
        noisy = " (noisy: " + ", ".join(n for n, r in rows if r["all_noisy"]) + ")" \
            if any(r["all_noisy"] for _, r in rows) else ""
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}{noisy}")

    idle, idle_row = None, None
    for proto in ("h1", "h2"):
        cases = summary.get(proto, {})
        s = cases.get("sluice")
        if not s:
            continue
        name = PROTO_NAME[proto]
        if idle is None and s["rss_idle_kib"] is not None:
            idle, idle_row = s["rss_idle_kib"], s
        n, e = cases.get("nginx"), cases.get("envoy")
        if n and s["proxy_us_per_req"] is not None and n["proxy_us_per_req"] is not None:
            check(f"{name}: proxy CPU/request <= nginx",
                  s["proxy_us_per_req"] <= n["proxy_us_per_req"],
                  f"{s['proxy_us_per_req']:.1f} vs {n['proxy_us_per_req']:.1f} µs",
                  ("sluice", s), ("nginx", n))
        if n:
            check(f"{name}: req/s >= nginx", s["rps"] >= n["rps"],
                  f"{s['rps']:,.0f} vs {n['rps']:,.0f}", ("sluice", s), ("nginx", n))
        if e:
            check(f"{name}: req/s >= envoy", s["rps"] >= e["rps"],
                  f"{s['rps']:,.0f} vs {e['rps']:,.0f}", ("sluice", s), ("envoy", e))
        if n and s["p99_ms"] is not None and n["p99_ms"] is not None:
            check(f"{name}: p99 <= nginx", s["p99_ms"] <= n["p99_ms"],
                  f"{s['p99_ms']:.2f} vs {n['p99_ms']:.2f} ms", ("sluice", s), ("nginx", n))
    if idle is not None:
        check("idle RSS <= 15 MiB", idle <= 15 * 1024, f"{idle / 1024:.1f} MiB",
              ("sluice", idle_row))
    return lines


# --------------------------------------------------------------------------
# wasm filter cases: <proxy>-<filter><count> against <proxy>

FILTER_CASE = re.compile(r"^(?P<proxy>[a-z0-9]+)-(?P<kind>[a-z]+)(?P<n>\d+)$")
FILTER_NAME = {"noop": "no-op", "sdk": "no-op (Sluice SDK)", "hdr": "header rewrite"}


def _slope(points: list[tuple[int, float | None]]) -> float | None:
    """Least-squares slope of y over n (the cost of one more filter)."""
    pts = [(n, y) for n, y in points if y is not None]
    if len(pts) < 2:
        return None
    mn = sum(n for n, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((n - mn) ** 2 for n, _ in pts)
    return sum((n - mn) * (y - my) for n, y in pts) / den if den else None


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median: the order statistics
    x(k) and x(n+1-k) with the largest k such that P(Binomial(n, 1/2) < k) <= (1-level)/2.
    None when n is too small for any such k (n < 6 at 95 %)."""
    xs, n = sorted(xs), len(xs)
    tail, k, acc = (1 - level) / 2, 0, 0.0
    while k < n:
        acc_next = acc + math.comb(n, k) / 2 ** n  # P(B <= k)
        if acc_next > tail:
            break
        acc, k = acc_next, k + 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


def paired_ratio(s: dict, base: dict) -> dict | None:
    """req/s ÷ the baseline's req/s of the same round, over the rounds both ran in:
    the median of those pairs and its 95 % interval. A round's two runs are a few
    seconds to a minute apart, so slow drifts of the host cancel in the pair."""
    a, b = s.get("rps_by_round") or {}, base.get("rps_by_round") or {}
    pairs = [a[k] / b[k] for k in a if k in b and b[k]]
    if len(pairs) < 2:
        return None
    ci = median_ci(pairs)
    return {"n": len(pairs), "median": statistics.median(pairs),
            "lo": ci[0] if ci else None, "hi": ci[1] if ci else None}


def filter_summary(summary: dict) -> dict:
    """Per protocol, proxy and filter kind: for each filter count N, req/s ÷ the same
    proxy without filters and the added CPU µs/request, p50 and p99 (µs) per filter,
    (x(N) - x(0)) / N; and `fit`, the least-squares slope over N = 0 and every N."""
    found: dict = {}
    for proto, cases in summary.items():
        for case, s in cases.items():
            m = FILTER_CASE.match(case)
            if m and m["proxy"] in cases:
                found.setdefault((proto, m["proxy"], m["kind"]), {})[int(m["n"])] = s
    out: dict = {}
    kind_order = list(FILTER_NAME)
    order = lambda k: (k[0], k[1] != "sluice", k[1],
                       kind_order.index(k[2]) if k[2] in kind_order else len(kind_order), k[2])
    for (proto, proxy, kind), by_n in sorted(found.items(), key=lambda kv: order(kv[0])):
        base = summary[proto][proxy]
        keys = (("cpu_us", "proxy_us_per_req", 1.0), ("p50_us", "p50_ms", 1000.0),
                ("p99_us", "p99_ms", 1000.0))

        def per_filter(s: dict, n: int, key: str, scale: float) -> float | None:
            if s[key] is None or base[key] is None:
                return None
            return (s[key] - base[key]) * scale / n

        rows = {n: {"rps_ratio": _ratio(s["rps"], base["rps"]),
                    "paired": paired_ratio(s, base),
                    **{k: per_filter(s, n, key, sc) for k, key, sc in keys},
                    "noisy": s["all_noisy"] or base["all_noisy"]}
                for n, s in sorted(by_n.items())}
        fit: dict = {}
        for k, key, sc in keys:
            v = _slope([(0, base[key])] + [(n, s[key]) for n, s in by_n.items()])
            fit[k] = None if v is None else v * sc
        fit["noisy"] = any(r["noisy"] for r in rows.values())
        out.setdefault(proto, {}).setdefault(proxy, {})[kind] = {"rows": rows, "fit": fit}
    return out


def render_filters(fs: dict, md: bool) -> list[str]:
    out = []
    for proto in PROTOS:
        if proto not in fs:
            continue
        title = (f"{PROTO_NAME[proto]}: wasm filters, per filter, against the same proxy "
                 f"without filters ((x(N) - x(0)) / N; fit = least-squares slope over N = 0 and "
                 f"every N; * = a noisy side)")
        out += [f"**{title}**" if md else title + ":", ""]
        rows = []
        for proxy, kinds in fs[proto].items():
            for kind, e in kinds.items():
                for n, r in list(e["rows"].items()) + [("fit", e["fit"])]:
                    rows.append([proxy, FILTER_NAME.get(kind, kind),
                                 str(n) + (" *" if r["noisy"] else ""),
                                 _fmt(r.get("rps_ratio"), 3),
                                 _fmt((r.get("paired") or {}).get("median"), 3),
                                 _fmt(r["cpu_us"], 2),
                                 _fmt(r["p50_us"], 1), _fmt(r["p99_us"], 1)])
        out.append(_table(["proxy", "filter", "filters", "req/s ÷ no filter",
                           "same, median of the rounds' pairs",
                           "+CPU µs/req per filter", "+p50 µs per filter",
                           "+p99 µs per filter"], rows, md))
        out.append("")
    return out


def filter_targets(fs: dict) -> list[str]:
    """The issue's wasm targets that this run measures (the others: wasm-startup.sh)."""
    lines = []

    def check(label: str, value: float | None, ok, detail: str, noisy: bool) -> None:
        if value is not None:
            lines.append(f"  [{'PASS' if ok(value) else 'FAIL'}] {label}: {detail}"
                         + (" (noisy)" if noisy else ""))

    h1, lat = fs.get("h1", {}), fs.get("lat", {})
    for kind in FILTER_NAME:
        name = FILTER_NAME.get(kind, kind)
        s, e = h1.get("sluice", {}).get(kind), h1.get("envoy", {}).get(kind)
        if s:
            fit = s["fit"]["cpu_us"]
            env = f"; Envoy+V8 here: {e['fit']['cpu_us']:.2f}" if e and e["fit"]["cpu_us"] is not None else ""
            check(f"HTTP/1.1: a {name} filter adds <= 1 µs proxy CPU/request", fit,
                  lambda v: v <= 1.0, f"{_fmt(fit, 2)} µs per filter (fit){env}", s["fit"]["noisy"])
            r3 = s["rows"].get(3)
            if r3:
                env = ""
                if e and e["rows"].get(3):
                    env = f"; Envoy+V8 here: {100 * e['rows'][3]['rps_ratio']:.0f} %"
                pr = r3.get("paired")
                paired = ""
                if pr:
                    ci = (f", 95 % interval {100 * pr['lo']:.1f}–{100 * pr['hi']:.1f} %"
                          if pr["lo"] is not None else "")
                    paired = (f"; round by round: median {100 * pr['median']:.1f} %{ci} "
                              f"over {pr['n']} rounds")
                check(f"HTTP/1.1: 3 {name} filters keep >= 90 % of no-filter req/s",
                      r3["rps_ratio"], lambda v: v >= 0.90,
                      f"{_fmt(100 * r3['rps_ratio'], 1)} % (median ÷ median){paired}{env}",
                      r3["noisy"])
        s, e = lat.get("sluice", {}).get(kind), lat.get("envoy", {}).get(kind)
        if s:
            fit = s["fit"]["p50_us"]
            env = f"; Envoy+V8 here: {e['fit']['p50_us']:.1f}" if e and e["fit"]["p50_us"] is not None else ""
            check(f"1 connection: a {name} filter adds <= 3 µs p50", fit, lambda v: v <= 3.0,
                  f"{_fmt(fit, 1)} µs per filter (fit){env}", s["fit"]["noisy"])
    return lines


def render_report(recs: list[dict], summary: dict, case_order: list[str], meta: dict,
                  md: bool) -> str:
    out = []
    order = lambda c: case_order.index(c) if c in case_order else len(case_order)
    if not md:
        out.append("Per run:")
        rows = []
        for r in sorted(recs, key=lambda r: (r["proto"], order(r["case"]), r["run"])):
            noisy = " *" if r["other_cpu_pct"] > NOISY_OTHER_PCT else ""
            if r.get("invalid"):
                noisy += " INVALID (not counted): " + r["invalid"]
            nd = 3 if r["proto"] == "lat" else 2
            rows.append([r["run"], _fmt(r["rps"], 0),
                         _fmt(r["p50_ms"], nd), _fmt(r["p99_ms"], nd),
                         str(r["errors"] + r["non2xx"]), _fmt(r["proxy_cpu_pct"], 0),
                         _fmt(r["proxy_us_per_req"], 1), _fmt(r.get("proxy_sys_us_per_req"), 1),
                         _fmt(r["backend_cpu_pct"], 0),
                         _fmt(r["loadgen_cpu_pct"], 0), _fmt(r.get("steal_pct"), 1),
                         _fmt(r.get("proxy_minflt_per_kreq"), 2),
                         _fmt(r["other_cpu_pct"], 1) + noisy])
        out.append(_table(["run", "req/s", "p50 ms", "p99 ms", "errors", "proxy CPU %",
                           "proxy µs/req", "of it kernel", "backend CPU %", "loadgen CPU %",
                           "steal %", "proxy faults/1k req", "other CPU %"],
                          rows, md))
        out.append(f"(CPU % is of one core; {NCPU} cores = {100 * NCPU} %. "
                   f"* = other CPU > {NOISY_OTHER_PCT:.0f} %: noisy run, distrust it.)")
        out.append("")
    for proto in PROTOS:
        if proto not in summary:
            continue
        cases = summary[proto]
        nd = 3 if proto == "lat" else 2
        n_runs = max(s["runs"] for s in cases.values())
        title = (f"{PROTO_NAME[proto]}: per case, the median of its quiet runs "
                 f"(other CPU <= {NOISY_OTHER_PCT:.0f} %), or of all its runs (marked *) "
                 f"when none was quiet; up to {n_runs} run(s) per case")
        out.append(f"**{title}**" if md else title + ":")
        out.append("")
        rows = []
        for case in sorted(cases, key=order):
            s = cases[case]
            rss = "—" if s["rss_idle_kib"] is None else \
                f"{s['rss_idle_kib'] / 1024:.1f} → {s['rss_loaded_kib'] / 1024:.1f}"
            rows.append([case + (" *" if s["all_noisy"] else "") + f" ({s['runs']})",
                         _fmt(s["rps"], 0), _fmt(s["p50_ms"], nd), _fmt(s["p99_ms"], nd),
                         str(s["errors"]), _fmt(s["proxy_cpu_pct"], 0),
                         _fmt(s["proxy_us_per_req"], 1), _fmt(s["proxy_sys_us_per_req"], 1), rss,
                         _fmt(s["backend_us_per_req"], 1),
                         _fmt(s["other_cpu"], 1), _fmt(s["steal_pct"], 1),
                         _fmt(s["x_direct_rps"], 2), _fmt(s["x_nginx_rps"], 2),
                         _fmt(s["x_nginx_cpu"], 2), _fmt(s["x_nginx_p99"], 2)])
        out.append(_table(["case (runs)", "req/s", "p50 ms", "p99 ms", "errors", "proxy CPU %",
                           "proxy CPU µs/req", "of it kernel", "RSS idle → loaded MiB",
                           "backend µs/req",
                           "other CPU % (max)", "steal %", "req/s ÷ direct", "req/s ÷ nginx",
                           "CPU/req ÷ nginx", "p99 ÷ nginx"], rows, md))
        out.append("")
    fs = filter_summary(summary)
    if fs:
        out.extend(render_filters(fs, md))
    t = targets(summary) + filter_targets(fs)
    if t:
        out.append("Sluice targets (vs this run's peers):")
        out.extend(t)
        out.append("")
    if meta.get("skipped"):
        out.append("Skipped cases:")
        out.extend(f"  {line}" for line in meta["skipped"])
        out.append("")
    return "\n".join(out)


def cmd_report(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    recs = []
    for k, src in enumerate([d, *map(Path, a.pool)]):
        for p in sorted((src / "raw").glob("*.json")):
            r = json.loads(p.read_text())
            r["run"] = f"{r['case']} {r['proto']} #{r['rep']}" + (f" ({src.name})" if k else "")
            r["round"] = (k, r["rep"])  # pairs a case with its baseline of the same round
            recs.append(r)
    read = lambda name: (d / name).read_text() if (d / name).exists() else ""
    meta = {
        "header": read("header.txt").rstrip("\n"),
        "skipped": [l for l in read("skipped.txt").splitlines() if l.strip()],
        "cases": [c for c in a.cases.split(",") if c],
    }
    if not recs:
        print("no measurements", file=sys.stderr)
        return 1
    if all(r.get("invalid") for r in recs):
        print("every run was invalid", file=sys.stderr)
        return 1
    summary = summarize(recs, meta["cases"])
    filters = filter_summary(summary)
    text = render_report(recs, summary, meta["cases"], meta, md=False)
    md = render_report(recs, summary, meta["cases"], meta, md=True)
    (d / "summary.txt").write_text(meta["header"] + "\n\n" + text + "\n")
    (d / "summary.md").write_text("```\n" + meta["header"] + "\n```\n\n" + md + "\n")
    (d / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary, "filters": filters}, indent=1) + "\n")
    print(text)
    return 0


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("ports-free")
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(fn=cmd_ports_free)

    p = sub.add_parser("render")
    p.add_argument("template")
    p.add_argument("out")
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("ready")
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--h1", required=True)
    p.add_argument("--h2")
    p.add_argument("--body", required=True)
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(fn=cmd_ready)

    p = sub.add_parser("rss")
    p.add_argument("--pid", type=int, required=True)
    p.set_defaults(fn=cmd_rss)

    p = sub.add_parser("measure")
    p.add_argument("--case", required=True)
    p.add_argument("--proto", choices=PROTOS, required=True)
    p.add_argument("--rep", type=int, default=1)
    p.add_argument("--url", required=True)
    p.add_argument("--proxy-pid", type=int, default=0)
    p.add_argument("--backend-pid", type=int, required=True)
    p.add_argument("--rss-idle", type=int, default=None)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--scratch", default="/tmp")
    p.add_argument("--quiet-wait", type=float, default=0,
                   help="wait up to this many seconds for the machine to go quiet first")
    p.add_argument("--quiet-busy", type=float, default=25,
                   help="'quiet' = busy below this % of one core")
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("report")
    p.add_argument("dir")
    p.add_argument("--cases", default="", help="case order for the tables (comma-separated)")
    p.add_argument("--pool", action="append", default=[], metavar="DIR",
                   help="also count the runs of this earlier results dir (same knobs!)")
    p.set_defaults(fn=cmd_report)

    a = ap.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
