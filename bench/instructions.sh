#!/usr/bin/env bash
# User-space instructions per proxied request, Sluice next to nginx, counted by
# valgrind (callgrind): a deterministic cost figure for A/B-testing changes to
# the request path, where CPU µs/request from bench/run.sh moves ±5 % between
# runs on a shared 2-core box. It counts instructions, not time: cache misses,
# contended atomics and the kernel's share are not in it (run.sh measures
# those). See docs/benchmarks.md ("Instructions per request").
#
#   ./bench/instructions.sh                    # build, count Sluice and nginx
#   SLUICE_BIN=/path/to/sluice ./bench/instructions.sh
#   FILTERS=1 FILTER=noop ./bench/instructions.sh   # Sluice also with a chain of bench filters
#
# Each proxy runs under callgrind twice, with WARM and WARM+N HTTP/1.1
# keep-alive requests (h2load --h1, CONNS connections); the difference ÷ N is
# the figure (start-up and warm-up cancel out). Same static nginx backend and
# proxy configs as bench/run.sh; WORKERS proxy workers.
#
# Knobs: N=10000 WARM=1000 CONNS=10 WORKERS=2 PORT_BASE=18280 INSTALL=1 SLUICE_BIN=
#        KEEP=0 (1: keep the callgrind files for callgrind_annotate; the path is printed)
#        FILTERS=0 (N > 0: also Sluice with N FILTER filters, noop, hdr or sdk (the no-op on the
#        Sluice SDK), from bench/filters/,
#        run with --wasm-pooling false: valgrind cannot reserve the pool's address space.
#        The guest's code is counted too: it runs as wasmtime compiled it.)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
PY=${PYTHON:-python3}
: "${N:=10000}" "${WARM:=1000}" "${CONNS:=10}" "${WORKERS:=2}" "${PORT_BASE:=18280}"
: "${INSTALL:=1}" "${SLUICE_BIN:=}" "${KEEP:=0}" "${FILTERS:=0}" "${FILTER:=noop}"
# Under valgrind a proxy (compiling its filters) takes longer to answer.
export WAIT_SECS=${WAIT_SECS:-180}

die() { printf 'instructions: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/common.sh
source "$BENCH_DIR/common.sh" # install_pkgs, build_bench_filters, start_backend, wait_ready
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
if ((${#need[@]})); then
  [[ "$INSTALL" == 1 ]] || die "missing: ${need[*]} (INSTALL=0)"
  install_pkgs "${need[@]}" || die "apt-get install ${need[*]} failed"
fi
if [[ -z "$SLUICE_BIN" ]]; then
  (cd "$ROOT" && cargo build --release --bin sluice) >&2 || die "cargo build failed"
  SLUICE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/sluice"
fi

RUN=$(mktemp -d /tmp/sluice-instructions.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  if [[ "$KEEP" == 1 ]]; then echo "callgrind files: $RUN/*.callgrind" >&2; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

export RUN_DIR=$RUN WORKERS BACKEND_WORKERS=1 CASE=nginx FILTERS FILTER
export BACKEND_H1=$PORT_BASE BACKEND_H2=$((PORT_BASE + 1)) PORT_H1=$((PORT_BASE + 2))
export PORT_H2=$((PORT_BASE + 3)) ADMIN_PORT=$((PORT_BASE + 4))
"$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/nginx-backend.conf" "$RUN/backend.conf"
"$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/sluice.yaml" "$RUN/sluice.yaml"
# nginx proxy: one process (no master), so that callgrind sees the worker.
"$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/nginx-proxy.conf" "$RUN/proxy.conf"
sed -i -e 's/^master_process on;/master_process off;/' "$RUN/proxy.conf"
if ((FILTERS > 0)); then
  build_bench_filters "$RUN/filters-build.log" || die "building bench/filters failed: $(tail -n1 "$RUN/filters-build.log")"
  mkdir -p "$RUN/wasm"
  cp "$BENCH_FILTERS_WASM/noop.wasm" "$RUN/wasm/noop.wasm"
  cp "$BENCH_FILTERS_WASM/header_rewrite.wasm" "$RUN/wasm/hdr.wasm"
  cp "$BENCH_FILTERS_WASM/noop_sdk.wasm" "$RUN/wasm/sdk.wasm"
  WASM_DIR="$RUN/wasm" "$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/sluice-wasm.yaml" "$RUN/sluice-wasm.yaml"
fi
start_backend "$RUN"

count() { # count NAME REQUESTS CMD...: Ir of CMD serving REQUESTS requests
  local name=$1 n=$2; shift 2
  local out="$RUN/$name.$n.callgrind"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$RUN/$name.$n.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid") # a proxy left behind would answer the next one's requests
  wait_ready "http://127.0.0.1:$PORT_H1/"
  kill -0 "$pid" 2>/dev/null || die "$name exited: $(grep -v '^==' "$RUN/$name.$n.log" | tail -n1)"
  local done
  done=$(h2load --h1 -n "$n" -c "$CONNS" -t 1 "http://127.0.0.1:$PORT_H1/" | awk '/^requests:/ {print $8}')
  [[ "$done" == "$n" ]] || die "$name: $done of $n requests succeeded"
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

declare -A IR
IR[sluice]=$(($(count sluice $((WARM + N)) "$SLUICE_BIN" proxy --config "$RUN/sluice.yaml") -
  $(count sluice "$WARM" "$SLUICE_BIN" proxy --config "$RUN/sluice.yaml")))
if ((FILTERS > 0)); then
  # Twice first: the first run compiles the module into the cache the second loads.
  wasm=("$SLUICE_BIN" proxy --wasm-pooling false --cache-dir "$RUN/cache" --config "$RUN/sluice-wasm.yaml")
  count sluice-wasm "$WARM" "${wasm[@]}" >/dev/null
  IR[wasm]=$(($(count sluice-wasm $((WARM + N)) "${wasm[@]}") - $(count sluice-wasm "$WARM" "${wasm[@]}")))
fi
IR[nginx]=$(($(count nginx $((WARM + N)) nginx -e "$RUN/proxy.stderr.log" -c "$RUN/proxy.conf") -
  $(count nginx "$WARM" nginx -e "$RUN/proxy.stderr.log" -c "$RUN/proxy.conf")))

"$PY" - "${IR[sluice]}" "${IR[nginx]}" "$N" "${IR[wasm]:-0}" "$FILTERS" "$FILTER" <<'PY'
import sys
s, g, n, w, k = (int(x) for x in sys.argv[1:6])
print(f"user-space instructions per request (callgrind, {n} HTTP/1.1 keep-alive requests)")
print(f"  sluice  {s / n:8.0f}")
print(f"  nginx   {g / n:8.0f}")
print(f"  sluice / nginx  {s / g:.2f}x")
if k:
    print(f"  sluice + {k} {sys.argv[6]} filter(s)  {w / n:8.0f}  (+{(w - s) / n / k:.0f} per filter)")
PY
