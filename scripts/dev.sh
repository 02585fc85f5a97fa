#!/usr/bin/env bash
# Quick start: run the gateway with a demo room `lobby` and the demo page.
# Uses the Redis at GATEWAY_REDIS_URL (default redis://127.0.0.1:6379) or starts a local,
# in-memory redis-server when none answers; installs redis-server when the machine lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_redis_server
ensure_test_client
cargo build --release --quiet
exec target/release/gateway dev "$@"
