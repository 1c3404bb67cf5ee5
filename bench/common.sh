# Shell pieces shared by the bench scripts (sourced): run.sh, wasm-startup.sh, instructions.sh.
# Needs ROOT (the checkout) and, for sluice_desc, SLUICE_GIVEN (a given SLUICE_BIN, or empty)
# and PGO (1: the binary was built by scripts/build-pgo.sh).

sluice_desc() { # what the sluice binary is: the checkout it was built from, or the given path
  if [[ -n "$SLUICE_GIVEN" ]]; then
    echo "$SLUICE_GIVEN (given; built $(stat -c %y "$SLUICE_GIVEN" | cut -d. -f1))"
  else
    echo "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- proxy src 2>/dev/null || echo ' (+ uncommitted changes)')$([[ "${PGO:-0}" == 1 ]] && echo ', profile-guided (scripts/build-pgo.sh)' || echo ', plain cargo build --release')"
  fi
}

install_pkgs() { # install_pkgs PKG...: apt-get install, without starting packaged services
  local sudo="" policy_rc=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  # Keep Debian from starting the packaged nginx/haproxy services on install.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    policy_rc=/usr/sbin/policy-rc.d
  fi
  $sudo apt-get update -qq || true
  local rc=0
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null || rc=$?
  [[ -z "$policy_rc" ]] || $sudo rm -f "$policy_rc"
  return $rc
}

# The bench filters: bench/filters/ is its own cargo workspace (upstream
# proxy-wasm SDK); its own target dir keeps it off the main build's lock.
BENCH_FILTERS_OUT="${CARGO_TARGET_DIR:-$ROOT/target}/bench-filters"
BENCH_FILTERS_WASM="$BENCH_FILTERS_OUT/wasm32-wasip1/release" # noop.wasm, header_rewrite.wasm
build_bench_filters() { # build_bench_filters LOG: build them for wasm32-wasip1, output to LOG
  "$ROOT/scripts/setup.sh" >"$1" 2>&1 || return 1 # the wasm target, on a fresh machine
  cargo build --release --target wasm32-wasip1 --manifest-path "$ROOT/bench/filters/Cargo.toml" \
    --target-dir "$BENCH_FILTERS_OUT" >>"$1" 2>&1
}

start_backend() { # start_backend DIR: the bench's nginx backend from DIR/backend.conf, its pid in PIDS
  nginx -e "$1/backend.stderr.log" -c "$1/backend.conf" &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:$BACKEND_H1/"
}

wait_ready() { # wait_ready URL: until it answers 2xx (-k: TLS too) within WAIT_SECS (30), or die
  for _ in $(seq $((${WAIT_SECS:-30} * 10))); do curl -fsk -o /dev/null "$1" && return 0; sleep 0.1; done
  die "no answer from $1"
}
