#!/usr/bin/env bash
# Try cluster mode locally: a Redis Cluster of 3 masters and 3 replicas (in memory, on free ports),
# and two gateways against it (`gateway dev`: room `lobby`, demo tokens, the demo page). Ctrl-C
# (or SIGTERM) stops everything and removes the cluster's files. The nodes run with
# cluster-require-full-coverage no, as docs/scaling.md recommends: a failing shard does not stop
# the healthy ones.
#
#   scripts/dev-cluster.sh [--gateways N] [--port P] [--no-build]
#
#   --gateways N  gateways to start, 0–3 (default 2); 0 only runs the cluster
#   --port P      first gateway's public port (default 4000); gateway k listens on P+2k, its admin
#                 port on P+2k+1. 0: free ports, printed once the gateways listen
#   --no-build    use target/release/gateway (or $GATEWAY_BIN) as it is
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

gateways=2 port=4000 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --gateways) gateways="${2:?--gateways needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$gateways" in 0|1|2|3) ;; *) echo "error: --gateways must be 0, 1, 2 or 3" >&2; exit 2 ;; esac
case "$port" in ''|*[!0-9]*) echo "error: --port must be a number" >&2; exit 2 ;; esac

ensure_redis_server
bin="${GATEWAY_BIN:-target/release/gateway}"
if [ "$build" = 1 ] && [ -z "${GATEWAY_BIN:-}" ]; then
  ensure_test_client
  cargo build --release --quiet
fi
[ -x "$bin" ] || { echo "error: $bin not found; build it (cargo build --release) or drop --no-build" >&2; exit 1; }

dir="$(mktemp -d "${TMPDIR:-/tmp}/gw-dev-cluster.XXXXXX")"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
  echo "dev-cluster: stopped; removed $dir" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# a port p with p and its cluster bus port p + 10000 free, both below the kernel's ephemeral range
# (where outgoing connections take their ports) when it starts at 32768 or above
eph_low="$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
if [ "$eph_low" -ge 32768 ]; then span=$((eph_low - 10000 - 20000)); else span=30000; fi
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % span))
    if ! in_use "$p" && ! in_use $((p + 10000)) && [[ " ${ports[*]:-} " != *" $p "* ]]; then echo "$p"; return; fi
  done
  echo "error: no free port pair for a cluster node" >&2
}

# starts one node on a free port; a port taken meanwhile (the node exits) is retried on another
start_node() {
  local p pid
  for _ in 1 2 3 4 5; do
    p="$(free_port)"; [ -n "$p" ] || exit 1
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --cluster-require-full-coverage no \
      --save "" --appendonly no --dir "$dir/$p" >"$dir/$p/redis.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      [ "$(redis-cli -p "$p" PING 2>/dev/null)" = PONG ] && { ports+=("$p"); pids+=("$pid"); return; }
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    tail -2 "$dir/$p/redis.log" >&2
    kill "$pid" 2>/dev/null || true
    echo "dev-cluster: redis-server on $p did not come up; trying another port" >&2
  done
  echo "error: could not start a cluster node" >&2; exit 1
}

ports=()
for i in 1 2 3 4 5 6; do start_node; done
nodes=(); for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
  || { cat "$dir/create.log" >&2; echo "error: redis-cli --cluster create failed" >&2; exit 1; }
for _ in $(seq 100); do
  ok=1
  for p in "${ports[@]}"; do redis-cli -p "$p" CLUSTER INFO 2>/dev/null | grep -q cluster_state:ok || ok=0; done
  [ "$ok" = 1 ] && break; sleep 0.2
done
[ "$ok" = 1 ] || { echo "error: the cluster did not reach cluster_state:ok" >&2; exit 1; }
seeds="$(printf 'redis://127.0.0.1:%s,' "${ports[@]:0:3}")"; seeds="${seeds%,}"
echo "dev-cluster: Redis Cluster up: masters and replicas on ${ports[*]} (files in $dir)" >&2
echo "  redis-cli -c -p ${ports[0]} CLUSTER NODES      # the topology" >&2
echo "  redis-cli -p <port> DEBUG SLEEP 30  or  kill a master's redis-server: a replica takes over" >&2

for k in $(seq 0 $((gateways - 1))); do
  if [ "$port" = 0 ]; then pub=0 adm=0; else pub=$((port + 2 * k)) adm=$((port + 2 * k + 1)); fi
  # the first gateway talks on this terminal; the others log to files
  run() {
    GATEWAY_REDIS_MODE=cluster GATEWAY_REDIS_URL="$seeds" \
      GATEWAY_SERVER_LISTEN="127.0.0.1:$pub" GATEWAY_ADMIN_LISTEN="127.0.0.1:$adm" \
      exec "$bin" dev >"$dir/gateway$k.out"
  }
  if [ "$k" = 0 ]; then run & else run 2>"$dir/gateway$k.log" & fi
  pids+=("$!")
done
for k in $(seq 0 $((gateways - 1))); do
  line=""
  for _ in $(seq 300); do
    line="$(grep -m1 '"event":"listening"' "$dir/gateway$k.out" 2>/dev/null || true)"
    [ -n "$line" ] && break; sleep 0.1
  done
  [ -n "$line" ] || { echo "error: gateway $k did not start; see above or $dir/gateway$k.log" >&2; exit 1; }
  echo "dev-cluster: gateway $k: $line" >&2
done
echo "dev-cluster: ready (GATEWAY_REDIS_MODE=cluster GATEWAY_REDIS_URL=$seeds); Ctrl-C stops everything" >&2
# until a signal, or until any process ends
wait -n "${pids[@]}" || true
echo "dev-cluster: a process ended; stopping" >&2
