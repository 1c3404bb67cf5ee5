#!/usr/bin/env bash
# The training workload of scripts/build-pgo.sh: real traffic through an
# instrumented `sluice` (the argument), which writes its profile when it exits.
#
#   ./scripts/pgo-train.sh target/pgo-generate/release/sluice
#
# Phases, each a fresh proxy process on 127.0.0.1 (PORT_BASE=18680..18689),
# an nginx backend (bench/peers/nginx-backend.conf) behind it:
#   1. HTTP/1.1 keep-alive (wrk: 50 connections, then 1), h2c (h2load);
#      TLS downstream with ALPN http/1.1 (wrk) and h2 (h2load) to an HTTP/2
#      upstream; a mesh hop (plaintext in, TLS + client certificate + HTTP/2
#      to the proxy's own TLS listener): scripts/pgo-train.yaml.
#   2. The bench's wasm filter chains: 1 and 3 no-op filters, 3 no-op filters on
#      the Sluice SDK (whose callbacks left to their default the host skips), 3
#      header-rewrite filters (bench/filters, built for wasm32-wasip1).
set -euo pipefail
BIN=$(realpath "$1")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR="$ROOT/bench"
PY=${PYTHON:-python3}
: "${PORT_BASE:=18680}" "${INSTALL:=1}"
log() { printf 'pgo-train: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=bench/common.sh
source "$BENCH_DIR/common.sh" # install_pkgs, build_bench_filters, start_backend, wait_ready
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  [[ "$INSTALL" == 1 ]] || die "missing: ${need[*]} (INSTALL=0)"
  install_pkgs "${need[@]}" || die "apt-get install ${need[*]} failed"
fi

R=$(mktemp -d /tmp/sluice-pgo-train.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$R"
}
trap cleanup EXIT

export RUN_DIR=$R WORKERS=2 BACKEND_WORKERS=1 CASE=train
export BACKEND_H1=$PORT_BASE BACKEND_H2=$((PORT_BASE + 1)) PORT_H1=$((PORT_BASE + 2))
export PORT_H2=$((PORT_BASE + 3)) ADMIN_PORT=$((PORT_BASE + 4))
export PORT_TLS=$((PORT_BASE + 5)) PORT_HOP=$((PORT_BASE + 6))

build_bench_filters "$R/filters-build.log" || die "building bench/filters failed: $(tail -n1 "$R/filters-build.log")"
mkdir -p "$R/wasm"
cp "$BENCH_FILTERS_WASM/noop.wasm" "$R/wasm/noop.wasm"
cp "$BENCH_FILTERS_WASM/header_rewrite.wasm" "$R/wasm/hdr.wasm"
cp "$BENCH_FILTERS_WASM/noop_sdk.wasm" "$R/wasm/sdk.wasm"

# Throwaway certificates: a CA, and a localhost certificate it signed that
# serves the TLS listener and is the mesh hop's client certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=pgo-train-ca -keyout "$R/ca.key" -out "$R/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$R/leaf.key" -out "$R/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
  >"$R/leaf.ext"
openssl x509 -req -in "$R/leaf.csr" -CA "$R/ca.pem" -CAkey "$R/ca.key" -CAcreateserial -days 2 \
  -extfile "$R/leaf.ext" -out "$R/leaf.pem" 2>/dev/null

"$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/nginx-backend.conf" "$R/backend.conf"
start_backend "$R"

"$PY" "$BENCH_DIR/bench.py" render "$ROOT/scripts/pgo-train.yaml" "$R/mesh.yaml"

run() { # run NAME CONFIG CMD...: one proxy process serving the traffic CMD... makes
  local name=$1 config=$2 pid rc=0
  shift 2
  "$BIN" proxy --cache-dir "$R/cache" --config "$config" >"$R/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_ready "http://127.0.0.1:$PORT_H1/"
  "$@" || die "$name: the traffic failed"
  kill -INT "$pid"
  wait "$pid" || rc=$?
  [[ $rc == 0 ]] || die "$name: the proxy exited with $rc (log: $(tail -n3 "$R/$name.log"))"
  log "$name done"
}

wrk_ok() { # wrk_ok ARGS...: wrk, failing when a response was not 2xx/3xx
  local out
  out=$(wrk "$@") || return 1
  ! grep -q 'Non-2xx' <<<"$out" || { log "wrk $*: $(grep 'Non-2xx' <<<"$out")"; return 1; }
}

load() { # HTTP/1.1 keep-alive on the plaintext listener: 50 connections, then 1
  wrk_ok -t2 -c50 -d4s "http://127.0.0.1:$PORT_H1/" && wrk_ok -t1 -c1 -d1s "http://127.0.0.1:$PORT_H1/"
}

h2_ok() { # h2_ok URL N: h2load, failing unless every request got a 2xx
  local out
  out=$(h2load -n "$2" -c 10 -m 10 -t 1 "$1") || return 1
  grep -qE "status codes: $2 2xx" <<<"$out" || { log "h2load $1: $(grep -E '^(requests|status codes):' <<<"$out")"; return 1; }
}

mesh() {
  load &&
    h2_ok "http://127.0.0.1:$PORT_H1/" 60000 &&
    wrk_ok -t2 -c20 -d3s "https://127.0.0.1:$PORT_TLS/" &&
    h2_ok "https://127.0.0.1:$PORT_TLS/" 30000 &&
    wrk_ok -t2 -c20 -d3s "http://127.0.0.1:$PORT_HOP/"
}
run mesh "$R/mesh.yaml" mesh

for chain in "1 noop" "3 noop" "3 sdk" "3 hdr"; do
  read -r FILTERS FILTER <<<"$chain"
  export FILTERS FILTER WASM_DIR="$R/wasm"
  "$PY" "$BENCH_DIR/bench.py" render "$BENCH_DIR/peers/sluice-wasm.yaml" "$R/wasm-$FILTERS-$FILTER.yaml"
  run "wasm-$FILTERS-$FILTER" "$R/wasm-$FILTERS-$FILTER.yaml" load
done
