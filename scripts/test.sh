#!/usr/bin/env bash
# Sets everything up and runs every check and test: the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TERM_COLOR=never
echo "== fmt"
cargo fmt --all -- --check
echo "== clippy (native)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== clippy (wasm32: sdk and filters)"
cargo clippy --target wasm32-wasip1 --locked -p sluice-sdk -p sluice-filter-common -p sluice-filter-fault \
    -p sluice-filter-jwt-auth -p sluice-filter-api-key -p sluice-filter-ext-authz \
    -p sluice-filter-canary-router -p sluice-filter-rate-limit -p sluice-filter-headers -- -D warnings
echo "== tests"
cargo test --workspace --locked
echo "== all checks passed"
