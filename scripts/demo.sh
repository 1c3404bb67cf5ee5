#!/usr/bin/env bash
# Sets everything up and runs the Sluice demo (examples/demo/sluice.yaml):
# builds the proxy and the demo's wasm filters, starts the proxy, takes a short
# scripted tour when curl is available, then keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== building sluice (release)"
cargo build --release --locked --bin sluice
echo "== building the demo filters (wasm32-wasip1)"
cargo build --release --locked --target wasm32-wasip1 -p sluice-filter-headers -p sluice-filter-fault
mkdir -p target/demo
cp target/wasm32-wasip1/release/sluice_filter_headers.wasm target/wasm32-wasip1/release/sluice_filter_fault.wasm target/demo/
config=examples/demo/sluice.yaml
./target/release/sluice --log warn proxy --check --config "$config"
log=target/demo/sluice.log
./target/release/sluice proxy --config "$config" >"$log" 2>&1 &
pid=$!
echo "== the proxy runs (access log and logs: $log)"
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then break; fi
  sleep 0.1
done
if command -v curl >/dev/null; then
  echo
  echo "== 10 requests to /reviews (weighted 80/20 between v1 and v2)"
  for _ in $(seq 1 10); do curl -s localhost:8080/reviews; done | sort | uniq -c
  echo "== as jason (header match: always v2)"
  curl -s -H 'end-user: jason' localhost:8080/reviews
  echo "== 20 requests straight to the flaky ratings service (the fault filter aborts 25 %)"
  for _ in $(seq 1 20); do curl -s -o /dev/null -w '%{http_code}\n' localhost:9103/ratings; done | sort | uniq -c
  echo "== 20 requests to /ratings through the edge (retries on 5xx hide the failures)"
  for _ in $(seq 1 20); do curl -s -o /dev/null -w '%{http_code}\n' localhost:8080/ratings; done | sort | uniq -c
  echo "== response headers set by the headers filter"
  curl -s -D - -o /dev/null localhost:8080/reviews | grep -i x-powered-by || true
  echo "== a few metrics"
  curl -s localhost:9901/metrics | grep -E '^sluice_(requests_total\{.*listener="edge"|upstream_retries_total)' | grep -v ' 0$' || true
  echo "== filter status: curl -s localhost:9901/filters"
fi
echo
echo "Sluice is running (admin on 127.0.0.1:9901, logs in $log). Edit $config to reload it. Ctrl-C stops it."
wait $pid
