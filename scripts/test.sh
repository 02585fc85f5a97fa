#!/usr/bin/env bash
# Runs every test: Rust unit tests, then the end-to-end suite (real redis-server processes on free
# ports, real gateway processes, the real phoenix npm client, a real Prometheus for the dashboard),
# with Autobahn|Testsuite's RFC 6455 cases in between (scripts/conformance.sh).
# Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_redis_server
ensure_test_client
ensure_chromium
ensure_prometheus
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== cargo build --release"
cargo build --release --locked
echo "== unit tests (cargo test)"
cargo test --release --locked --workspace
echo "== WebSocket conformance (Autobahn|Testsuite, scripts/conformance.sh)"
bash scripts/conformance.sh
echo "== end-to-end tests (node --test)"
export GATEWAY_BIN="$PWD/target/release/gateway"
cd tests
node --test --test-concurrency=1 --test-reporter=spec
