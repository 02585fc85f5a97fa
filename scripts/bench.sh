#!/usr/bin/env bash
# Benchmarks on this machine: starts its own Redis (a standalone server, and for the cluster run a
# local 3-master cluster with a replica each, all on free ports, in memory) and two release
# gateways per run, then runs target/release/bench's scenarios against them and prints the figures.
#   scripts/bench.sh                          # standalone: idle memory, joins, fan-out; then cluster: fan-out
#   MODES=standalone VIEWERS=10000 scripts/bench.sh
#   MODES=cluster RUNS=3 scripts/bench.sh
#   IDLE_SIGNED_IN=1 IDLE_WINDOW=30 VIEWERS=10000 MODES=standalone SCENARIOS=idle scripts/bench.sh
#   GATEWAY_BIN=/path/to/other/gateway scripts/bench.sh   # an A/B build
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
MODES=${MODES:-standalone cluster}
SCENARIOS=${SCENARIOS:-idle joins fanout}
GATEWAY_BIN=${GATEWAY_BIN:-target/release/gateway}
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
IDLE_SIGNED_IN=${IDLE_SIGNED_IN:-0}
IDLE_WINDOW=${IDLE_WINDOW:-0}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() {
  python3 -c 'import socket,random
while True:
    p=random.randint(20000,50000)
    try:
        a=socket.socket(); a.bind(("127.0.0.1",p)); b=socket.socket(); b.bind(("127.0.0.1",p+10000)); a.close(); b.close(); print(p); break
    except OSError: pass'
}
wait_ping() { for _ in $(seq 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

# 32+ bytes: shorter HS256 secrets are refused at start
secret=bench-hs256-secret-0123456789abcdef
export GATEWAY_REDIS_PREFIX=bench GATEWAY_AUTH_HS256_SECRET="$secret" \
  GATEWAY_SERVER_LISTEN=127.0.0.1:0 GATEWAY_ADMIN_LISTEN=127.0.0.1:0 GATEWAY_LOG=warn \
  GATEWAY_SERVER_PUSH_RATE_PER_S=100000 GATEWAY_SERVER_PUSH_BURST=100000
# (the fan-out scenario's one publisher sends far more than a person's 10 pushes per second)

start_standalone() {
  local port; port=$(free_port)
  mkdir -p "$work/standalone"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/standalone" >"$work/standalone/redis.log" 2>&1 &
  pids+=($!)
  redis_pids=($!)
  wait_ping "$port"
  export GATEWAY_REDIS_MODE=standalone GATEWAY_REDIS_URL="redis://127.0.0.1:$port"
}

start_cluster() {
  local ports=() port urls=()
  for i in 1 2 3 4 5 6; do
    port=$(free_port)
    mkdir -p "$work/cluster$i"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --save "" --appendonly no --dir "$work/cluster$i" >"$work/cluster$i/redis.log" 2>&1 &
    pids+=($!)
    eval "cluster_pid_$port=$!"
    ports+=("$port")
    urls+=("redis://127.0.0.1:$port")
  done
  for p in "${ports[@]}"; do wait_ping "$p"; done
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes >"$work/cluster-create.log"
  for _ in $(seq 100); do
    redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok && break
    sleep 0.1
  done
  sleep 1
  # the masters' pids, in CLUSTER SLOTS order
  redis_pids=()
  for p in $(redis-cli -p "${ports[0]}" --json cluster slots | python3 -c 'import json,sys; print(" ".join(str(r[2][1]) for r in json.load(sys.stdin)))'); do
    eval "redis_pids+=(\$cluster_pid_$p)"
  done
  export GATEWAY_REDIS_MODE=cluster GATEWAY_REDIS_URL
  GATEWAY_REDIS_URL=$(IFS=,; echo "${urls[*]}")
}

start_gateway() {
  local out="$work/gw$1.out"
  : >"$out"
  "$GATEWAY_BIN" serve >"$out" 2>"$work/gw$1.err" &
  eval "gw$1_pid=$!"
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$out" 2>/dev/null && break; sleep 0.05; done
  eval "gw$1=$(python3 -c "import json,sys; print(json.load(open('$out'))['public'])")"
}
stop_gateways() { kill "$gw1_pid" "$gw2_pid" 2>/dev/null || true; wait "$gw1_pid" "$gw2_pid" 2>/dev/null || true; }

echo "== bench on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}')"
for mode in $MODES; do
  "start_$mode"
  target/release/gateway rooms create bench >/dev/null
  if [ "$mode" = cluster ]; then
    echo "== cluster: 3 masters + 3 replicas; the bench room is in slot $(redis-cli -u "${GATEWAY_REDIS_URL%%,*}" cluster keyslot 'bench:room:{bench}'); Redis servers below are the masters in slot order"
  else
    echo "== standalone"
  fi
  for i in $(seq "$RUNS"); do
    echo "-- $mode run $i (fresh gateways)"
    start_gateway 1
    start_gateway 2
    if [ "$mode" = standalone ] && has idle; then
      idle_args=(--viewers "$VIEWERS" --pid "$gw1_pid" --idle-window "$IDLE_WINDOW")
      [ "$IDLE_SIGNED_IN" = 1 ] && idle_args+=(--secret "$secret")
      target/release/bench --gateway "$gw1" idle "${idle_args[@]}" | grep -v '^machine'
      sleep 3   # let the viewers' leaves settle
    fi
    if [ "$mode" = standalone ] && has joins; then
      target/release/bench --gateway "$gw1" --gateway "$gw2" joins --viewers "$SUBSCRIBERS" | grep -v '^machine'
      sleep 3
    fi
    has fanout || { stop_gateways; sleep 1; continue; }
    redis_args=()
    for p in "${redis_pids[@]}"; do redis_args+=(--redis-pid "$p"); done
    target/release/bench --gateway "$gw1" --gateway "$gw2" fanout --subscribers "$SUBSCRIBERS" \
      --messages "$MESSAGES" --rate "$RATE" --secret "$secret" \
      --gateway-pid "$gw1_pid" --gateway-pid "$gw2_pid" "${redis_args[@]}" | grep -v '^machine' | sed "s/^/[$mode] /"
    stop_gateways
    sleep 1
  done
done
