#!/usr/bin/env bash
# Builds the release `sluice` with profile-guided optimization (PGO), as
# rustc, Chrome and Firefox ship theirs: an instrumented build serves a
# training workload, and the final build is laid out and inlined by the
# profile it wrote. On this repository's HTTP/1.1 path that is ~18 % fewer
# instructions and ~37 % fewer instruction-cache misses per request than the
# plain `cargo build --release` (docs/benchmarks-history.md, "Profile-guided
# build, 2026-12-01").
#
#   ./scripts/build-pgo.sh            # prints the binary's path last
#
# Output: ${CARGO_TARGET_DIR:-target}/pgo/release/sluice. Intermediate: the
# instrumented build in target/pgo-generate and its profiles in
# target/pgo-data (both kept, so a rebuild is incremental).
#
# The training (scripts/pgo-train.sh) sends real traffic through the
# instrumented proxy, so that every path a deployment uses hot is measured:
# HTTP/1.1 keep-alive (many connections and one), h2c, TLS with ALPN h2 and
# http/1.1 downstream, a TLS HTTP/2 upstream (a mesh hop), and wasm filter
# chains (the bench's no-op and header-rewrite filters). Code the training
# never runs (admin pages, config errors, retries) is compiled as cold: for
# size, not speed. Needs what bench/run.sh needs (nginx as the backend, wrk,
# h2load; installed from Debian packages when missing) and openssl (the
# training's throwaway certificates).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf 'build-pgo: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

./scripts/setup.sh >&2
rustup component add llvm-tools >&2 || die "rustup component add llvm-tools failed"
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[[ -x "$PROFDATA" ]] || die "llvm-profdata not found at $PROFDATA"

T=${CARGO_TARGET_DIR:-$ROOT/target}
DATA="$T/pgo-data"
rm -rf "$DATA"
mkdir -p "$DATA"

log "instrumented build (target/pgo-generate)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$DATA" \
  cargo build --release --locked --bin sluice --target-dir "$T/pgo-generate" >&2

log "training"
"$ROOT/scripts/pgo-train.sh" "$T/pgo-generate/release/sluice" >&2
ls "$DATA"/*.profraw >/dev/null 2>&1 || die "the training wrote no profile to $DATA"
"$PROFDATA" merge -o "$DATA/merged.profdata" "$DATA"/*.profraw >&2

log "optimized build (target/pgo)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$DATA/merged.profdata" \
  cargo build --release --locked --bin sluice --target-dir "$T/pgo" >&2
echo "$T/pgo/release/sluice"
