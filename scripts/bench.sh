#!/usr/bin/env bash
# Benchmarks on this machine: starts its own redis-server (free port, in memory) and two release
# gateways, then runs target/release/bench's scenarios against them and prints the figures.
#   scripts/bench.sh                 # idle memory (5,000 viewers), joins, fan-out (2,000 subscribers)
#   VIEWERS=10000 SUBSCRIBERS=5000 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_redis_server
ulimit -n 65536 2>/dev/null || true
cargo build --release --quiet --bins

VIEWERS=${VIEWERS:-5000}
SUBSCRIBERS=${SUBSCRIBERS:-2000}
MESSAGES=${MESSAGES:-200}
RATE=${RATE:-50}
RUNS=${RUNS:-3}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# 32+ bytes: shorter HS256 secrets are refused at start
secret=bench-hs256-secret-0123456789abcdef
export GATEWAY_REDIS_URL="redis://127.0.0.1:$port" GATEWAY_REDIS_PREFIX=bench \
  GATEWAY_AUTH_HS256_SECRET="$secret" GATEWAY_SERVER_LISTEN=127.0.0.1:0 GATEWAY_ADMIN_LISTEN=127.0.0.1:0 \
  GATEWAY_LOG=warn \
  GATEWAY_SERVER_PUSH_RATE_PER_S=100000 GATEWAY_SERVER_PUSH_BURST=100000
# (the fan-out scenario's one publisher sends far more than a person's 10 pushes per second)
start_gateway() {
  local out="$work/gw$1.out"
  : >"$out"
  target/release/gateway serve >"$out" 2>"$work/gw$1.err" &
  eval "gw$1_pid=$!"
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$out" 2>/dev/null && break; sleep 0.05; done
  eval "gw$1=$(python3 -c "import json,sys; print(json.load(open('$out'))['public'])")"
}
stop_gateways() { kill "$gw1_pid" "$gw2_pid" 2>/dev/null || true; wait "$gw1_pid" "$gw2_pid" 2>/dev/null || true; }
target/release/gateway rooms create bench >/dev/null

echo "== bench on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}')"
for i in $(seq "$RUNS"); do
  echo "-- run $i (fresh gateways)"
  start_gateway 1
  start_gateway 2
  target/release/bench --gateway "$gw1" idle --viewers "$VIEWERS" --pid "$gw1_pid" | grep -v '^machine'
  sleep 3   # let the viewers' leaves settle
  target/release/bench --gateway "$gw1" --gateway "$gw2" joins --viewers "$SUBSCRIBERS" | grep -v '^machine'
  sleep 3
  target/release/bench --gateway "$gw1" --gateway "$gw2" fanout --subscribers "$SUBSCRIBERS" \
    --messages "$MESSAGES" --rate "$RATE" --secret "$secret" | grep -v '^machine'
  stop_gateways
  sleep 1
done
