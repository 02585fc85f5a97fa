#!/usr/bin/env bash
# Benchmarks on this machine: starts its own Redis (a standalone server, and for the cluster run a
# local 3-master cluster with a replica each, all on free ports, in memory) and two release
# gateways per run, then runs target/release/bench's scenarios against them and prints the figures.
# Each gateway runs cores / 2 worker threads (GATEWAY_SERVER_WORKER_THREADS overrides it).
#   scripts/bench.sh                          # standalone: idle memory, joins, fan-out; then cluster: fan-out
#   MODES=standalone VIEWERS=10000 scripts/bench.sh
#   MODES=cluster RUNS=3 scripts/bench.sh
#   IDLE_SIGNED_IN=1 IDLE_WINDOW=30 VIEWERS=10000 MODES=standalone SCENARIOS=idle scripts/bench.sh
#   IDLE_WINDOW=30 CASES=idle SERVERS="uws gateway" RUNS=3 scripts/bench.sh compare   # + CPU held idle
#   GATEWAY_BIN=/path/to/other/gateway scripts/bench.sh   # an A/B build (an older build that does not
#                                    # know a newer setting: GATEWAY_CONFIG=its own config/gateway.toml)
#   scripts/bench.sh history         # the cost of room history: fan-out CPU with history on vs off,
#                                    # join latency with history_on_join 20 vs 0 (medians of RUNS)
#   scripts/bench.sh compare         # the gateway against the bare stack (shared/perf/ceiling, one
#                                    # process): per run, in alternating order, on each: idle RSS per
#                                    # viewer (VIEWERS, default 10000, one process), warm-room joins
#                                    # (JOINS 2000, 64 in flight: joins/s, server CPU per join),
#                                    # fan-out to SUBSCRIBERS at 100/s and 20/s for FANOUT_SECONDS
#                                    # (10) each (deliveries per server CPU-second, Redis CPU apart,
#                                    # p50/p99, loss); then medians [ranges] of RUNS, gateway/ceiling
#                                    # ratios, and one JSON line. CEILING_DIR overrides where the
#                                    # ceiling's source is (default ../shared/perf/ceiling).
#                                    # The uWS yardstick (uWebSockets.js, one Node process, the same
#                                    # Phoenix V2 subset) runs in the same invocation and table:
#                                    # UWS_DIR (default ../shared/perf/uws) is copied to a scratch dir
#                                    # and `npm ci`-ed there at bench time. SERVERS="ceiling uws gateway"
#                                    # picks the servers (their order rotates from run to run).
#                                    # COMPARE_GATEWAYS=1: one gateway process instead of two.
#   RUNS=1 VIEWERS=1000 SUBSCRIBERS=500 FANOUT_SECONDS=3 scripts/bench.sh compare   # a quick look
#   SERVERS="uws gateway" RUNS=1 VIEWERS=1000 JOINS=500 SUBSCRIBERS=300 FANOUT_SECONDS=2 RATES=100 \
#     scripts/bench.sh compare                                 # the uWS yardstick against the gateway
#   scripts/bench.sh scale           # idle RSS per anonymous viewer at 1k / 10k (one gateway),
#                                    # 38k (two) and 50k (three): SCALE_STEPS="viewers:gateways ..."
#   scripts/bench.sh churn           # CHURN_VIEWERS (10000) anonymous viewers over two gateways,
#                                    # then CHURN_RATE (1000) joins and as many leaves per second for
#                                    # CHURN_SECONDS (60); a sample every CHURN_SAMPLE (5) s of the
#                                    # gateways' CPU and RSS, Redis's commands/s and CPU, the sockets;
#                                    # min/median/max of each and whether it stayed flat; a JSON line
#   scripts/bench.sh shards          # shards add capacity: for MASTERS (1 2 3) a fresh local cluster of
#                                    # that many masters (no replicas), two gateways, ROOMS (300) rooms,
#                                    # VIEWERS (3000) residents (SIGNED_IN 0.2 of them signed in, one
#                                    # publisher per room), a baseline window without messages, then
#                                    # RATES (500 1000 2000) msg/s over all rooms for SECONDS_PER_RATE (20)
#                                    # each (bash owns $SECONDS),
#                                    # with SIGNED_CHURN (20) signed-in and ANON_CHURN (100) anonymous
#                                    # joins and leaves per second throughout; per master Redis CPU per
#                                    # message, commands/s, what the gateways send it per heartbeat
#                                    # interval; medians of RUNS (3, master counts in alternating order),
#                                    # the busiest master's and the total's ratio to 1 master; a JSON line
#   scripts/bench.sh storm           # a lost gateway's audience coming back: STORM_VIEWERS (30000)
#                                    # phoenix.js viewers in STORM_ROOMS (100) rooms, one of STORM_BIG
#                                    # (7500), over 3 gateways from STORM_WORKERS (4) client processes,
#                                    # a control room and messages throughout; one gateway SIGKILLed;
#                                    # time back, presence complete, control p99; tests/storm-load.mjs
#   scripts/bench.sh bigroom         # a big signed-in room: BIGROOM_USERS (10000) users, one sub each,
#                                    # join one room over two gateways, BIGROOM_IN_FLIGHT (64) at a time;
#                                    # joins/s, gateway CPU per join (load generator excluded), Redis CPU
#                                    # and script calls, bytes per presence_state and per member; checks
#                                    # every sampled member's presence; medians [ranges] of RUNS.
#                                    # BIGROOM_DEFLATE=1: server.compression on, clients offer
#                                    # permessage-deflate (bytes on the wire and inflated)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_redis_server
ulimit -n 65536 2>/dev/null || true
cargo build --release --quiet --bins

COMPARE_VIEWERS=${VIEWERS:-10000}   # compare mode's default differs from the others'
SHARDS_VIEWERS=${VIEWERS:-3000}     # and shards mode's
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
# Two gateways share this machine: each gets half its cores as worker threads, as an operator running
# several gateways on one host would set it (a thread per core in each process only adds switches)
export GATEWAY_SERVER_WORKER_THREADS=${GATEWAY_SERVER_WORKER_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}

start_standalone() {
  port=$(free_port)
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
  for _ in $(seq 200); do grep -q '"event":"listening"' "$out" 2>/dev/null && break; sleep 0.05; done
  # stdout has a "starting" line (ports bound) before "listening" (sessions served)
  eval "gw$1=$(python3 -c "import json; print(next(e for e in map(json.loads, open('$out')) if e.get('event') == 'listening')['public'])")"
}
stop_gateways() { kill "$gw1_pid" "$gw2_pid" 2>/dev/null || true; wait "$gw1_pid" "$gw2_pid" 2>/dev/null || true; }

# `scripts/bench.sh history`: each run starts fresh gateways per setting, in alternating order, and
# prints one JSON line per measurement; the medians are printed at the end.
history_bench() {
  local subs=${H_SUBSCRIBERS:-2000} msgs=${H_MESSAGES:-400} rate=${H_RATE:-50} viewers=${H_VIEWERS:-2000}
  local results="$work/history.jsonl" order
  echo "== history bench on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}'); load $(cut -d' ' -f1-3 /proc/loadavg)"
  for i in $(seq "$RUNS"); do
    if [ $((i % 2)) -eq 1 ]; then order="100 0"; else order="0 100"; fi
    for len in $order; do
      echo "-- run $i: fan-out, rooms.history_len=$len"
      export GATEWAY_ROOMS_HISTORY_LEN=$len GATEWAY_ROOMS_HISTORY_ON_JOIN=$((len < 20 ? len : 20))
      start_gateway 1
      start_gateway 2
      target/release/gateway rooms create "hf-$len-$i" >/dev/null
      target/release/bench --gateway "$gw1" --gateway "$gw2" --room "hf-$len-$i" fanout-cost \
        --subscribers "$subs" --messages "$msgs" --rate "$rate" --secret "$secret" \
        --pid "$gw1_pid" --pid "$gw2_pid" --redis "$GATEWAY_REDIS_URL" | grep -v '^machine' \
        | while read -r l; do case "$l" in '{'*) echo "{\"history_len\":$len,${l#\{}" >>"$results";; *) echo "$l";; esac; done
      stop_gateways
      sleep 1
    done
    if [ $((i % 2)) -eq 1 ]; then order="20 0"; else order="0 20"; fi
    for oj in $order; do
      echo "-- run $i: join latency, rooms.history_on_join=$oj"
      export GATEWAY_ROOMS_HISTORY_LEN=100 GATEWAY_ROOMS_HISTORY_ON_JOIN=$oj
      start_gateway 1
      start_gateway 2
      target/release/gateway rooms create "hj-$oj-$i" >/dev/null
      target/release/bench --gateway "$gw1" --gateway "$gw2" --room "hj-$oj-$i" join-latency \
        --viewers "$viewers" --fill 50 --expect "$oj" --secret "$secret" --pid "$gw1_pid" --pid "$gw2_pid" \
        | grep -v '^machine' \
        | while read -r l; do case "$l" in '{'*) echo "{\"history_on_join\":$oj,${l#\{}" >>"$results";; *) echo "$l";; esac; done
      stop_gateways
      sleep 1
    done
  done
  unset GATEWAY_ROOMS_HISTORY_LEN GATEWAY_ROOMS_HISTORY_ON_JOIN
  history_redis_bench "$results"
  python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(key, **match):
    v = [r[key] for r in rows if all(r.get(k) == w for k, w in match.items())]
    return statistics.median(v), v
print("== history: medians of %d runs (all runs in brackets)" % len([r for r in rows if r.get("history_len") == 100]))
for key, label in [("deliveries_per_cpu_s", "fan-out deliveries per gateway CPU-second"),
                   ("redis_us_per_message", "Redis CPU per message (µs, INFO cpu, idle taken off)"),
                   ("redis_command_us_per_message", "Redis time executing a broadcast (µs, commandstats)"),
                   ("p99_ms", "fan-out latency p99 (ms)")]:
    on, on_all = med(key, scenario="fanout_cost", history_len=100)
    off, off_all = med(key, scenario="fanout_cost", history_len=0)
    print(f"{label}: history on {on:.1f} {[round(x, 1) for x in on_all]}, off {off:.1f} {[round(x, 1) for x in off_all]}, on/off {on / off:.3f}")
for rate in sorted({r["rate"] for r in rows if r.get("scenario") == "redis_broadcast"}):
    pace = "back to back" if rate == 0 else f"{rate}/s"
    for key, label in [("cpu_us", "CPU per broadcast (µs, INFO cpu)"), ("command_us", "command time per broadcast (µs, commandstats)")]:
        off, _ = med(key, scenario="redis_broadcast", shape="publish", rate=rate)
        for shape in ["publish", "script", "pipeline", "multi"]:
            v, v_all = med(key, scenario="redis_broadcast", shape=shape, rate=rate)
            print(f"Redis alone, {pace}: {label}: {shape} {v:.2f} {[round(x, 2) for x in v_all]}, / publish {v / off:.3f}")
for r in rows:
    if r.get("scenario") == "memory":
        print(f"history at the cap: {r['entries']} entries of a {r['payload_bytes']}-byte payload: MEMORY USAGE {r['memory_usage_bytes']} bytes")
for key, label in [("reply_p50_ms", "join reply p50 (ms)"), ("reply_p99_ms", "join reply p99 (ms)"),
                   ("done_p50_ms", "join + history p50 (ms)"), ("done_p99_ms", "join + history p99 (ms)"),
                   ("joins_per_s", "joins/s"), ("gateway_cpu_us_per_join", "gateway CPU per join (µs)")]:
    a, a_all = med(key, scenario="join_latency", history_on_join=20)
    b, b_all = med(key, scenario="join_latency", history_on_join=0)
    print(f"{label}: history_on_join 20: {a:.2f} {[round(x, 2) for x in a_all]}, 0: {b:.2f} {[round(x, 2) for x in b_all]}")
print(json.dumps({"history_bench": rows}))
PY
}
# Redis alone, no gateway and nothing else running: one room broadcast as a plain PUBLISH (history
# off), as publish.lua (history on), and as XADD + PUBLISH without a script (pipelined, and in
# MULTI: the least a per-broadcast append costs), to a room channel with two subscribers, from one
# connection (`bench redis-broadcast`), back to back (H_REDIS_CALLS per shape and run, 3 × RUNS
# runs) and paced (H_REDIS_PACED_CALLS at H_REDIS_RATE per second, RUNS runs); Redis's CPU
# (INFO cpu) and command time (commandstats) per broadcast. With two cores or more, Redis and the client are pinned to different cores (steadier
# figures: a VM's wake-ups across idle cores vary). Then the memory of a room's history at the cap
# (100 typical chat messages).
history_redis_bench() {
  local results=$1 cli="redis-cli -p $port" n=${H_REDIS_CALLS:-30000} pin=()
  local key='hr:room:{r}' head='[null,null,"rooms:r","new_msg",'
  local payload='{"at":1795860262969,"body":"hello there, a typical chat line of about fifty chars","user":{"id":"42","username":"ann"}}'
  if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    taskset -cp 1 "${redis_pids[0]}" >/dev/null
    pin=(taskset -c 0)
  fi
  # back to back (Redis busy, its caches warm), then at a chat's pace (Redis idle between calls)
  "${pin[@]}" target/release/bench redis-broadcast --redis "$GATEWAY_REDIS_URL" --calls "$n" --runs "$((RUNS * 3))" \
    | grep -v '^machine' | while read -r l; do case "$l" in '{'*) echo "$l" >>"$results";; *) echo "$l";; esac; done
  "${pin[@]}" target/release/bench redis-broadcast --redis "$GATEWAY_REDIS_URL" --calls "${H_REDIS_PACED_CALLS:-1000}" \
    --rate "${H_REDIS_RATE:-100}" --runs "$RUNS" \
    | grep -v '^machine' | while read -r l; do case "$l" in '{'*) echo "$l" >>"$results";; *) echo "$l";; esac; done
  [ "${#pin[@]}" -eq 0 ] || taskset -cp 0-$(($(nproc) - 1)) "${redis_pids[0]}" >/dev/null
  $cli HSET "$key" name r >/dev/null
  local sha; sha=$($cli SCRIPT LOAD "$(cat lua/publish.lua)")
  $cli DEL "$key:history" >/dev/null
  for _ in $(seq 100); do
    $cli EVALSHA "$sha" 3 "$key" "$key:history" "$key:events" PUBLISH 100 "$head" new_msg "$payload" >/dev/null
  done
  echo "{\"scenario\":\"memory\",\"entries\":$($cli XLEN "$key:history"),\"payload_bytes\":${#payload},\"memory_usage_bytes\":$($cli MEMORY USAGE "$key:history" SAMPLES 0)}" | tee -a "$results"
}
if [ "${1:-}" = history ]; then
  start_standalone
  history_bench
  exit 0
fi

# Runs one bench scenario of the compare mode: its prose goes to the screen (tagged with the
# server), its JSON line to the results with the server, run and case added. A scenario that fails
# without figures is reported and the run goes on; fanout-cost prints its figures before it fails
# on lost deliveries, so loss is recorded.
compare_case() {
  local server=$1 run=$2 case=$3 out="$work/case.out" rc=0 json
  shift 3
  "$@" >"$out" 2>&1 || rc=$?
  grep -v -e '^machine' -e '^{' "$out" | sed "s/^/   [$server] /" || true
  json=$(grep '^{' "$out" | tail -1 || true)
  if [ -n "$json" ]; then
    echo "{\"server\":\"$server\",\"run\":$run,\"case\":\"$case\",\"exit\":$rc,${json#\{}" >>"$compare_results"
  else
    echo "   [$server] !! $case failed (exit $rc) without figures"
  fi
}

start_ceiling() {
  local port
  port=$(free_port)
  : >"$work/ceiling.err"
  "$ceiling_bin" --listen "127.0.0.1:$port" 2>"$work/ceiling.err" &
  ceiling_pid=$!
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/ceiling.err" && break; sleep 0.05; done
  grep -q listening "$work/ceiling.err" || { echo "error: ceiling did not start: $(cat "$work/ceiling.err")" >&2; exit 1; }
  # one process is one world: both bench URLs point at it, its pid is the only server pid
  url1="127.0.0.1:$port" url2="127.0.0.1:$port" idle_pid=$ceiling_pid
  pid_args=(--pid "$ceiling_pid") redis_args=()
}
stop_ceiling() {
  kill "$ceiling_pid" 2>/dev/null || true
  wait "$ceiling_pid" 2>/dev/null || true
  grep -v listening "$work/ceiling.err" | sed 's/^/   [ceiling] /' || true
}
# The uWS yardstick: its folder (server.js, package.json, package-lock.json) is copied to a scratch
# dir and installed there (shared/ is read-only), once per compare.
prepare_uws() {
  local uws_dir=${UWS_DIR:-$(dirname "$PWD")/shared/perf/uws} f
  for f in server.js package.json package-lock.json; do
    [ -f "$uws_dir/$f" ] || { echo "error: compare needs the uWS server, $uws_dir/$f not found (set UWS_DIR, or SERVERS without uws)" >&2; exit 1; }
  done
  command -v node >/dev/null || { echo "error: the uWS server needs node (or run with SERVERS without uws)" >&2; exit 1; }
  mkdir -p "$work/uws"
  cp "$uws_dir/server.js" "$uws_dir/package.json" "$uws_dir/package-lock.json" "$work/uws/"
  (cd "$work/uws" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || { echo "error: npm ci of the uWS server failed" >&2; exit 1; }
}
start_uws() {
  local port
  port=$(free_port)
  : >"$work/uws.err"
  node "$work/uws/server.js" --port "$port" --host 127.0.0.1 2>"$work/uws.err" &
  uws_pid=$!
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/uws.err" && break; sleep 0.05; done
  grep -q listening "$work/uws.err" || { echo "error: uws did not start: $(cat "$work/uws.err")" >&2; exit 1; }
  # one process is one world, as the ceiling
  url1="127.0.0.1:$port" url2="127.0.0.1:$port" idle_pid=$uws_pid
  pid_args=(--pid "$uws_pid") redis_args=()
}
stop_uws() {
  kill "$uws_pid" 2>/dev/null || true
  wait "$uws_pid" 2>/dev/null || true
  grep -v listening "$work/uws.err" | sed 's/^/   [uws] /' || true
}
start_gw_pair() {
  start_gateway 1
  if [ "${COMPARE_GATEWAYS:-2}" = 1 ]; then
    # one gateway process serves both URLs (COMPARE_GATEWAYS=1), like the one uWS process
    gw2_pid=""
    url1=$gw1 url2=$gw1 idle_pid=$gw1_pid
    pid_args=(--pid "$gw1_pid") redis_args=(--redis "$GATEWAY_REDIS_URL")
    return
  fi
  start_gateway 2
  url1=$gw1 url2=$gw2 idle_pid=$gw1_pid
  pid_args=(--pid "$gw1_pid" --pid "$gw2_pid") redis_args=(--redis "$GATEWAY_REDIS_URL")
}

# `scripts/bench.sh compare`: the gateway (two fresh gateways per run on one standalone Redis)
# and the ceiling (one fresh process per run), which goes first alternating from run to run.
compare_bench() {
  local ceiling_dir=${CEILING_DIR:-$(dirname "$PWD")/shared/perf/ceiling}
  if [ ! -f "$ceiling_dir/Cargo.toml" ]; then
    echo "error: compare needs the ceiling server's source, not found at $ceiling_dir (set CEILING_DIR to its folder)" >&2
    exit 1
  fi
  local servers=${SERVERS:-ceiling uws gateway}
  cargo build --release --quiet --manifest-path "$ceiling_dir/Cargo.toml" --target-dir target/ceiling
  ceiling_bin=target/ceiling/release/ceiling
  [[ " $servers " != *" uws "* ]] || prepare_uws
  compare_results="$work/compare.jsonl"
  : >"$compare_results"
  # CASES / RATES run a part only, e.g. CASES=fanout RATES=100 for a quick A/B
  local CASES=${CASES:-idle joins fanout} RATES=${RATES:-100 20}
  [[ " $CASES " == *" fanout "* ]] || RATES=""
  local viewers=$COMPARE_VIEWERS joins=${JOINS:-2000} secs=${FANOUT_SECONDS:-10} order server rate i r
  start_standalone
  echo "== compare: gateway (2 processes, $GATEWAY_SERVER_WORKER_THREADS worker thread(s) each, standalone Redis $(redis-server --version | awk '{print $3}')) vs ceiling (1 process) and uws (1 Node process, uWebSockets.js) ($servers) on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "== $RUNS run(s); idle $viewers viewers; joins $joins (warm room, 64 in flight); fan-out $SUBSCRIBERS subscribers at 100/s and 20/s for $secs s each"
  for i in $(seq "$RUNS"); do
    # the servers' order rotates from run to run (two servers: alternates)
    read -r -a order <<<"$servers"
    order=("${order[@]:$(( (i - 1) % ${#order[@]} ))}" "${order[@]:0:$(( (i - 1) % ${#order[@]} ))}")
    for server in "${order[@]}"; do
      echo "-- run $i/$RUNS: $server: start"
      case $server in ceiling) start_ceiling;; uws) start_uws;; *) start_gw_pair;; esac
      if [ "$server" = gateway ]; then   # the ceiling has any room
        for r in idle joins f100 f20; do target/release/gateway rooms create "cmp$i-$r" >/dev/null; done
      fi
      if [[ " $CASES " == *" idle "* ]]; then
      echo "-- run $i/$RUNS: $server idle ($viewers anonymous viewers on one process)"
      compare_case "$server" "$i" idle target/release/bench --gateway "$url1" --room "cmp$i-idle" \
        idle --viewers "$viewers" --pid "$idle_pid" --idle-window "$IDLE_WINDOW"
      sleep 3   # the viewers' leaves settle
      fi
      if [[ " $CASES " == *" joins "* ]]; then
      echo "-- run $i/$RUNS: $server joins ($joins to a warm room, 64 in flight)"
      compare_case "$server" "$i" joins target/release/bench --gateway "$url1" --gateway "$url2" \
        --room "cmp$i-joins" joins --viewers "$joins" --in-flight 64 --warm "${pid_args[@]}"
      sleep 3
      fi
      for rate in $RATES; do
        echo "-- run $i/$RUNS: $server fanout $rate/s ($SUBSCRIBERS subscribers, $((rate * secs)) messages)"
        compare_case "$server" "$i" "fanout$rate" target/release/bench --gateway "$url1" --gateway "$url2" \
          --room "cmp$i-f$rate" fanout-cost --subscribers "$SUBSCRIBERS" --messages $((rate * secs)) \
          --rate "$rate" --secret "$secret" "${pid_args[@]}" "${redis_args[@]}"
        sleep 2
      done
      case $server in ceiling) stop_ceiling;; uws) stop_uws;; *) stop_gateways;; esac
      sleep 1
    done
  done
  python3 - "$compare_results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def with_redis(r):
    # deliveries per CPU-second of the server and its Redis together
    cpu = r["gateway_cpu_s"] + (r["redis_cpu_ms"] / 1000 if r.get("redis") else 0)
    return r["delivered"] / max(cpu, 0.01)
METRICS = [
    ("idle", "idle: RSS per anonymous viewer (KiB)", lambda r: r["bytes_per_viewer"] / 1024),
    ("joins", "joins: joins/s (warm room, 64 in flight)", lambda r: r["joins_per_s"]),
    ("joins", "joins: server CPU per join (µs)", lambda r: r["server_cpu_us_per_join"]),
    ("joins", "joins: latency p50 (ms)", lambda r: r["p50_ms"]),
    ("joins", "joins: latency p99 (ms)", lambda r: r["p99_ms"]),
]
for rate in (100, 20):
    c = f"fanout{rate}"
    METRICS += [
        (c, f"fanout {rate}/s: deliveries per server CPU-second", lambda r: r["deliveries_per_cpu_s"]),
        (c, f"fanout {rate}/s: deliveries per CPU-second incl. Redis", with_redis),
        (c, f"fanout {rate}/s: Redis CPU per message (µs)", lambda r: r["redis_us_per_message"] if r.get("redis") else None),
        (c, f"fanout {rate}/s: latency p50 (ms)", lambda r: r["p50_ms"]),
        (c, f"fanout {rate}/s: latency p99 (ms)", lambda r: r["p99_ms"]),
        (c, f"fanout {rate}/s: loss (%)", lambda r: 100 * r["lost"] / max(r["expected"], 1)),
    ]
def figures(server, case, f):
    v = [f(r) for r in sorted(rows, key=lambda r: r["run"]) if r["server"] == server and r["case"] == case]
    v = [x for x in v if x is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} if v else None
def fmt(x):
    return "—" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"
out, table = [], []
for case, label, f in METRICS:
    c, u, g = figures("ceiling", case, f), figures("uws", case, f), figures("gateway", case, f)
    ratio = g["median"] / c["median"] if c and g and c["median"] else None
    ratio_u = g["median"] / u["median"] if u and g and u["median"] else None
    out.append({"metric": label, "case": case, "ceiling": c, "uws": u, "gateway": g,
                "ratio_gateway_to_ceiling": ratio, "ratio_gateway_to_uws": ratio_u})
    cell = lambda s: "—" if s is None else f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"
    r = lambda x: "—" if x is None else f"{x:.3f}"
    table.append((label, cell(c), cell(u), cell(g), r(ratio), r(ratio_u)))
runs = max((r["run"] for r in rows), default=0)
print(f"== compare: medians of {runs} run(s) [min–max]; ratios = gateway / ceiling, gateway / uws")
head = ("metric", "ceiling median [range]", "uws median [range]", "gateway median [range]", "gw/ceiling", "gw/uws")
w = [max(len(t[i]) for t in table + [head]) for i in range(len(head))]
for t in [head] + table:
    print(" | ".join(x.ljust(w[i]) for i, x in enumerate(t)))
failed = [f"{r['server']} run {r['run']} {r['case']} (exit {r['exit']})" for r in rows if r["exit"] != 0]
if failed:
    print("non-zero exits (figures kept; see above): " + ", ".join(failed))
print(json.dumps({"compare": {"runs": runs, "rows": out, "raw": rows}}, ensure_ascii=False))
PY
}
if [ "${1:-}" = compare ]; then
  compare_bench
  exit 0
fi

# `scripts/bench.sh scale`: idle memory per anonymous viewer as the sockets grow. Each step starts
# fresh gateways and one `bench idle` per gateway in parallel (a process may hold at most
# `ulimit -Hn` descriptors, 20,000 on the reference machine, so no gateway or client takes more
# than SCALE_PER_PROCESS sockets). SCALE_STEPS: "viewers:gateways" pairs.
scale_bench() {
  local steps=${SCALE_STEPS:-1000:1 10000:1 38000:2 50000:3} step n g i per pids_all=() bench_pids=()
  start_standalone
  echo "== scale on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); open files: soft $(ulimit -Sn), hard $(ulimit -Hn)"
  for step in $steps; do
    n=${step%%:*}; g=${step##*:}; per=$((n / g))
    if [ "$per" -gt "${SCALE_PER_PROCESS:-19000}" ]; then
      echo "-- $n viewers over $g gateway(s): skipped, $per sockets per process exceed SCALE_PER_PROCESS"
      continue
    fi
    echo "-- $n anonymous viewers over $g gateway(s), $per each"
    pids_all=(); bench_pids=()
    for i in $(seq "$g"); do start_gateway "$i"; eval "pids_all+=(\$gw${i}_pid)"; done
    target/release/gateway rooms create "scale-$n" >/dev/null
    for i in $(seq "$g"); do
      eval "url=\$gw$i; pid=\$gw${i}_pid"
      target/release/bench --gateway "$url" --room "scale-$n" idle --viewers "$per" --pid "$pid" \
        >"$work/scale-$n-$i.out" &
      bench_pids+=($!)
    done
    wait "${bench_pids[@]}" || echo "-- a bench process failed (see above)"
    python3 - "$n" "$g" "$work"/scale-"$n"-*.out <<'PY'
import json, sys
n, g, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rows = [json.loads(l) for f in files for l in open(f) if l.startswith("{")]
for f in files:
    for l in open(f):
        if not l.startswith("{") and not l.startswith("machine"): print("   " + l.rstrip())
total = sum(r["rss_after_kib"] - r["rss_before_kib"] for r in rows) * 1024
print(json.dumps({"scenario": "scale", "viewers": n, "gateways": g, "measured": sum(r["viewers"] for r in rows),
                  "rss_growth_bytes": total, "bytes_per_viewer": total / max(1, sum(r["viewers"] for r in rows))}))
PY
    kill "${pids_all[@]}" 2>/dev/null || true
    wait "${pids_all[@]}" 2>/dev/null || true
    sleep 2
  done
}
if [ "${1:-}" = scale ]; then
  scale_bench
  exit 0
fi

# `scripts/bench.sh shards`: a cluster of $1 masters without replicas, slots split evenly by hand
# (`redis-cli --cluster create` wants three masters at least; a 1-master cluster is still cluster
# mode, so the comparison is like for like; a lone node knows its address only when announced);
# sets shard_ports, shard_pids, GATEWAY_REDIS_URL.
start_shard_cluster() {
  local n=$1 i port urls=() lo hi
  shard_ports=() shard_pids=()
  for i in $(seq "$n"); do
    port=$(free_port)
    mkdir -p "$work/shard$i"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout "${SHARDS_NODE_TIMEOUT:-2000}" --cluster-announce-ip 127.0.0.1 --save "" --appendonly no --dir "$work/shard$i" \
      >"$work/shard$i/redis.log" 2>&1 &
    pids+=($!)
    shard_pids+=($!)
    shard_ports+=("$port")
    urls+=("redis://127.0.0.1:$port")
  done
  for i in $(seq 0 $((n - 1))); do
    wait_ping "${shard_ports[$i]}"
    lo=$((16384 * i / n)) hi=$((16384 * (i + 1) / n - 1))
    redis-cli -p "${shard_ports[$i]}" cluster addslotsrange "$lo" "$hi" >/dev/null
    [ "$i" -eq 0 ] || redis-cli -p "${shard_ports[0]}" cluster meet 127.0.0.1 "${shard_ports[$i]}" >/dev/null
  done
  for _ in $(seq 200); do
    local ok=1
    for port in "${shard_ports[@]}"; do
      redis-cli -p "$port" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' || ok=0
      [ "$(redis-cli -p "$port" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" = "$n" ] || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  export GATEWAY_REDIS_MODE=cluster GATEWAY_REDIS_URL
  GATEWAY_REDIS_URL=$(IFS=,; echo "${urls[*]}")
}
stop_shard_cluster() {
  kill "${shard_pids[@]}" 2>/dev/null || true
  wait "${shard_pids[@]}" 2>/dev/null || true
  rm -rf "$work"/shard[0-9]*
}

shards_bench() {
  local masters_list=${MASTERS:-1 2 3} rooms=${ROOMS:-300} viewers=$SHARDS_VIEWERS secs=${SECONDS_PER_RATE:-20}
  local rates=${RATES:-500 1000 2000} results="$work/shards.jsonl" order i n r args
  : >"$results"
  # residents live the whole run (several minutes) without Phoenix heartbeats
  export GATEWAY_SERVER_IDLE_TIMEOUT_MS=3600000
  echo "== shards on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}'); $RUNS run(s); masters: $masters_list; $rooms rooms, $viewers residents, 2 gateways ($GATEWAY_SERVER_WORKER_THREADS worker thread(s) each); rates $rates msg/s for $secs s each; load $(cut -d' ' -f1-3 /proc/loadavg)"
  for i in $(seq "$RUNS"); do
    if [ $((i % 2)) -eq 1 ]; then order=$masters_list; else order=$(echo "$masters_list" | tr ' ' '\n' | tac | xargs); fi
    for n in $order; do
      echo "-- run $i/$RUNS: $n master(s)"
      start_shard_cluster "$n"
      for r in $(seq 0 $((rooms - 1))); do
        echo "HSET $GATEWAY_REDIS_PREFIX:room:{shards-$r} created_at $(date +%s%3N) name shards-$r access public"
      done | redis-cli -c -p "${shard_ports[0]}" >/dev/null
      start_gateway 1
      start_gateway 2
      args=()
      for r in $(seq 0 $((n - 1))); do args+=(--master "redis://127.0.0.1:${shard_ports[$r]}" --master-pid "${shard_pids[$r]}"); done
      # shellcheck disable=SC2086
      target/release/bench --gateway "$gw1" --gateway "$gw2" --room shards shards --rooms "$rooms" \
        --viewers "$viewers" --signed-in "${SIGNED_IN:-0.2}" $(printf -- '--rate %s ' $rates) --seconds "$secs" \
        --baseline "${BASELINE_SECONDS:-10}" --signed-churn "${SIGNED_CHURN:-20}" --anon-churn "${ANON_CHURN:-100}" \
        --secret "$secret" --pid "$gw1_pid" --pid "$gw2_pid" --prefix "$GATEWAY_REDIS_PREFIX" "${args[@]}" \
        | grep -v '^machine' | while read -r l; do case "$l" in '{'*) echo "{\"run\":$i,${l#\{}" >>"$results";; *) echo "   $l";; esac; done
      stop_gateways
      stop_shard_cluster
      sleep 1
    done
  done
  python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
masters = sorted({r["masters"] for r in rows})
rates = sorted({r["rate"] for r in rows if r["rate"] > 0})
runs = sorted({r["run"] for r in rows})
def get(n, rate, run):
    return next((r for r in rows if r["masters"] == n and r["rate"] == rate and r["run"] == run), None)
def busiest_us(r): return r["busiest_cpu_s"] * 1e6 / max(r["sent"], 1)
def total_us(r): return r["redis_cpu_s"] * 1e6 / max(r["sent"], 1)
def rng(v): return f"[{min(v):.1f}–{max(v):.1f}]"
print(f"== shards: medians of {len(runs)} run(s) [min–max]; µs = Redis CPU (INFO cpu) per message sent, all rooms")
out = {"runs": len(runs), "rows": []}
for rate in rates:
    base = [busiest_us(get(1, rate, k)) for k in runs if get(1, rate, k)] if 1 in masters else None
    base_t = [total_us(get(1, rate, k)) for k in runs if get(1, rate, k)] if 1 in masters else None
    for n in masters:
        rs = [get(n, rate, k) for k in runs if get(n, rate, k)]
        if not rs: continue
        b, t = [busiest_us(r) for r in rs], [total_us(r) for r in rs]
        per = [[m["cpu_us_per_msg"] for m in r["per_master"]] for r in rs]
        cmds = [[m["cmds_per_s"] for m in r["per_master"]] for r in rs]
        ctx = [[m["ctxsw_per_s"] for m in r["per_master"]] for r in rs]
        gw = [sum(r["gateway_cpu_s"]) / r["seconds"] * 100 for r in rs]
        sent = [r["msgs_per_s"] for r in rs]
        dlv = [r["delivered"] / r["seconds"] for r in rs]
        # ratios per run (same run for both figures), then their median
        rb = [busiest_us(r) / busiest_us(get(1, rate, r["run"])) for r in rs if get(1, rate, r["run"])]
        rt = [total_us(r) / total_us(get(1, rate, r["run"])) for r in rs if get(1, rate, r["run"])]
        # above the same run's baseline window (no messages): what a message adds
        def marginal(r):
            z = get(n, 0, r["run"])
            return None if not z else (r["redis_cpu_s"] / r["seconds"] - z["redis_cpu_s"] / z["seconds"]) * 1e6 / max(r["msgs_per_s"], 1)
        mg = [x for x in map(marginal, rs) if x is not None]
        row = {"rate": rate, "masters": n, "busiest_us_per_msg": med(b), "busiest_range": [min(b), max(b)],
               "total_marginal_us_per_msg": med(mg) if mg else None,
               "total_us_per_msg": med(t), "total_range": [min(t), max(t)],
               "busiest_ratio_to_1": med(rb) if rb else None, "busiest_ratio_runs": rb,
               "busiest_ratio_of_medians": med(b) / med(base) if base else None,
               "total_ratio_to_1": med(rt) if rt else None, "total_ratio_runs": rt,
               "per_master_us_per_msg": [med(sorted(p)[::-1][j] for p in per) for j in range(n)],
               "per_master_cmds_per_s": [med(sorted(c)[::-1][j] for c in cmds) for j in range(n)],
               "per_master_ctxsw_per_s": [med(sorted(c)[::-1][j] for c in ctx) for j in range(n)],
               "gateways_cpu_pct": med(gw), "msgs_per_s": med(sent), "delivered_per_s": med(dlv),
               "loads": [r["load"] for r in rs]}
        out["rows"].append(row)
        ratio = "" if n == 1 or not rb else f"; busiest/1-master {row['busiest_ratio_to_1']:.2f} {[round(x, 2) for x in rb]}, total/1-master {row['total_ratio_to_1']:.2f} {[round(x, 2) for x in rt]}"
        print(f"{rate:>5} msg/s, {n} master(s): busiest {med(b):.1f} µs/msg {rng(b)}, total {med(t):.1f} µs/msg {rng(t)}; per master (busiest first) "
              + ", ".join(f"{u:.1f} µs/msg {c:.0f} cmd/s {x:.0f} wakeups/s" for u, c, x in zip(row["per_master_us_per_msg"], row["per_master_cmds_per_s"], row["per_master_ctxsw_per_s"]))
              + (f"; above the baseline {med(mg):.1f} µs/msg in total" if mg else "")
              + f"; gateways {med(gw):.0f} % CPU, sent {med(sent):.0f}/s, delivered {med(dlv):.0f}/s{ratio}")
print("== per master per heartbeat interval (5 s), baseline window (no messages; churn on), per gateway: median of runs")
for n in masters:
    rs = [r for r in rows if r["masters"] == n and r["rate"] == 0]
    if not rs: continue
    for j in range(n):
        ms = [sorted(r["per_master"], key=lambda m: -m["rooms"])[j] for r in rs]
        names = sorted({k for m in ms for k in m["calls_per_s"]}, key=lambda k: -med([m["calls_per_s"].get(k, [0, 0])[0] for m in ms]))
        calls = ", ".join(f"{k} {med([m['calls_per_s'].get(k, [0, 0])[0] for m in ms]) * 5 / rs[0]['gateways']:.0f}" for k in names[:8])
        print(f"  {n} master(s), master {j + 1} wakeups (context switches) {med([m['ctxsw_per_s'] for m in ms]):.0f}/s;", end="")
        print(f" master {j + 1} ({ms[0]['rooms']} rooms): CPU {med([m['cpu_pct'] for m in ms]):.2f} %, {med([m['cmds_per_s'] for m in ms]):.0f} cmd/s, heartbeats expected {med([m['heartbeats_expected_per_s'] for m in ms]) * 5 / rs[0]['gateways']:.0f} per gateway; calls per gateway per 5 s: {calls}")
print(json.dumps({"shards": out, "raw": rows}))
PY
}
if [ "${1:-}" = shards ]; then
  shards_bench
  exit 0
fi

# `scripts/bench.sh bigroom`: one standalone Redis; per run two fresh gateways and a fresh room.
# The bench's members send no heartbeats: the idle timeout is raised so a long burst on a busy
# machine does not close the first joiners (4000) before the end.
if [ "${1:-}" = bigroom ]; then
  export GATEWAY_SERVER_IDLE_TIMEOUT_MS=${GATEWAY_SERVER_IDLE_TIMEOUT_MS:-600000}
  deflate_arg=()
  if [ "${BIGROOM_DEFLATE:-0}" = 1 ]; then
    export GATEWAY_SERVER_COMPRESSION=true
    deflate_arg=(--deflate)
  fi
  start_standalone
  results="$work/bigroom.jsonl"
  : >"$results"
  echo "== bigroom on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}'); $GATEWAY_SERVER_WORKER_THREADS worker thread(s) per gateway; compression ${GATEWAY_SERVER_COMPRESSION:-false}"
  for i in $(seq "$RUNS"); do
    start_gateway 1
    start_gateway 2
    target/release/gateway rooms create "big$i" >/dev/null
    echo "-- run $i/$RUNS: ${BIGROOM_USERS:-10000} users; load $(cut -d' ' -f1-3 /proc/loadavg)"
    target/release/bench --gateway "$gw1" --gateway "$gw2" --room "big$i" bigroom \
      --users "${BIGROOM_USERS:-10000}" --in-flight "${BIGROOM_IN_FLIGHT:-64}" --secret "$secret" \
      --pid "$gw1_pid" --pid "$gw2_pid" --redis "$GATEWAY_REDIS_URL" --user-prefix "big$i" "${deflate_arg[@]}" \
      | grep -v '^machine' | while read -r l; do case "$l" in '{'*) echo "$l" >>"$results";; *) echo "   $l";; esac; done \
      || echo "   !! run $i failed (see above)"
    stop_gateways
    sleep 1
  done
  python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"== bigroom: medians of {len(rows)} run(s) [min–max]")
for key, label in [("joins_per_s", "joins/s"), ("gateway_cpu_ms_per_join", "gateway CPU per join (ms)"),
                   ("redis_cpu_s", "Redis CPU (s)"), ("script_calls", "script calls"),
                   ("state_bytes_avg", "presence_state per joiner, avg (bytes)"),
                   ("member_bytes_avg", "received per member after its join, avg (bytes)"),
                   ("state_plain_bytes_avg", "presence_state per joiner inflated, avg (bytes)"),
                   ("member_plain_bytes_avg", "received per member inflated, avg (bytes)")]:
    v = [r[key] for r in rows if r.get(key) is not None]
    if v:
        print(f"{label}: {statistics.median(v):,.3f} [{min(v):,.3f}–{max(v):,.3f}]")
print("presence correct in every run" if rows and all(r["presence_ok"] for r in rows) else "!! presence check failed (see above)")
print(json.dumps({"bigroom": rows}))
PY
  exit 0
fi

# `scripts/bench.sh storm`: the reconnect storm at load size (tests/storm-load.mjs: its own Redis,
# three gateways, phoenix.js clients in STORM_WORKERS processes), RUNS times; then medians [ranges].
if [ "${1:-}" = storm ]; then
  ensure_test_client
  results="$work/storm.jsonl"
  : >"$results"
  echo "== storm on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}')"
  for i in $(seq "$RUNS"); do
    echo "-- run $i/$RUNS; load $(cut -d' ' -f1-3 /proc/loadavg)"
    GATEWAY_BIN="$PWD/$GATEWAY_BIN" node tests/storm-load.mjs \
      | while read -r l; do case "$l" in '{'*) echo "$l" >>"$results";; *) echo "   $l";; esac; done \
      || echo "   !! run $i failed (see above)"
    sleep 5   # TIME_WAIT and the last processes settle
  done
  python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l)["storm"] for l in open(sys.argv[1])]
print(f"== storm: medians of {len(rows)} run(s) [min–max]")
def show(label, f):
    v = [f(r) for r in rows]
    v = [x for x in v if x is not None]
    if v:
        print(f"{label}: {statistics.median(v):,.1f} [{min(v):,.1f}–{max(v):,.1f}]")
show("killed viewers", lambda r: r["killed_viewers"])
show("back after the kill, p50 (ms)", lambda r: r["back_ms"]["p50"])
show("back after the kill, p99 (ms)", lambda r: r["back_ms"]["p99"])
show("back after the kill, max (ms)  [target <= 5000]", lambda r: r["back_ms"]["max"])
show("presence complete in Redis (ms)", lambda r: r["presence_complete_ms"]["redis"])
show("presence complete as new viewers see it (ms)", lambda r: r["presence_complete_ms"]["new_viewer"])
show("control p99 before the kill (ms)", lambda r: r["control"]["p99_ms"]["before"])
show("control p99 during the storm (ms)", lambda r: r["control"]["p99_ms"]["storm"])
show("control p99 after (ms)", lambda r: r["control"]["p99_ms"]["after"])
show("control p99 throughout (ms)  [target <= 100]", lambda r: r["control"]["p99_ms"]["all"])
show("control messages lost", lambda r: r["control"]["lost"])
show("joins refused", lambda r: r["refused_joins"])
show("gateway share: request -> 101, mean (ms)", lambda r: r["gateway_share"]["request_to_101_mean_ms"])
show("accept -> 101 incl. the client's wait, mean (ms)", lambda r: r["gateway_share"]["accept_to_101_mean_ms"])
show("join script, mean (ms)", lambda r: r["gateway_share"]["join_script_mean_ms"])
show("client CPU, all processes (s)", lambda r: sum(r["client_cpu_s"]))
show("survivors' CPU (s)", lambda r: sum(r["survivors_cpu_s"]))
print(json.dumps({"storm": rows}))
PY
  exit 0
fi

# `scripts/bench.sh churn`: one standalone Redis, two gateways, the `churn` scenario.
if [ "${1:-}" = churn ]; then
  start_standalone
  start_gateway 1
  start_gateway 2
  target/release/gateway rooms create churn >/dev/null
  echo "== churn on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); redis $(redis-server --version | awk '{print $3}'); load $(cut -d' ' -f1-3 /proc/loadavg)"
  target/release/bench --gateway "$gw1" --gateway "$gw2" --room churn churn \
    --viewers "${CHURN_VIEWERS:-10000}" --rate "${CHURN_RATE:-1000}" --seconds "${CHURN_SECONDS:-60}" \
    --sample "${CHURN_SAMPLE:-5}" --pid "$gw1_pid" --pid "$gw2_pid" \
    --redis "$GATEWAY_REDIS_URL" --redis-pid "${redis_pids[0]}" | grep -v '^machine'
  stop_gateways
  exit 0
fi

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
