#!/usr/bin/env bash
# Builds every ready filter to a size-optimised wasm32-wasip1 module and prints the
# sizes. Modules land in target/wasm-filters/out/<crate_name>.wasm.
#
# The workspace's release profile (thin LTO, line tables) is not changed: the size
# settings are passed with --config, into a separate target folder.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=target/wasm-filters
out=$target_dir/out
mkdir -p "$out"
filters=(fault jwt-auth api-key ext-authz canary-router rate-limit headers)
args=()
for f in "${filters[@]}"; do args+=(-p "sluice-filter-$f"); done
cargo build --release --locked --target wasm32-wasip1 --target-dir "$target_dir" "${args[@]}" \
    --config 'profile.release.opt-level="s"' \
    --config 'profile.release.lto=true' \
    --config 'profile.release.codegen-units=1' \
    --config 'profile.release.panic="abort"' \
    --config 'profile.release.debug=false' \
    --config 'profile.release.strip=true'
for f in "${filters[@]}"; do
    name=sluice_filter_${f//-/_}
    cp "$target_dir/wasm32-wasip1/release/$name.wasm" "$out/$name.wasm"
    printf '%-36s %8d bytes\n' "$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done
