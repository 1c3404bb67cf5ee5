#!/usr/bin/env bash
# Installs what Sluice's build needs on a machine that has only rustup and cargo:
# the pinned toolchain with rustfmt, clippy and the wasm targets. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  rustup toolchain install "$toolchain" --profile minimal
fi
rustup component add --toolchain "$toolchain" rustfmt clippy >/dev/null 2>&1
rustup target add --toolchain "$toolchain" wasm32-wasip1 wasm32-unknown-unknown >/dev/null 2>&1
