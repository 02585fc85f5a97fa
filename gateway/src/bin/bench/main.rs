//! `bench`: load generator and meter for a running gateway (see `scripts/bench.sh`, which starts
//! Redis and two gateways and runs every scenario).
//!
//! * `idle`    — N anonymous viewers join one room and stay; the gateway's RSS before and after
//!   gives the memory per viewer.
//! * `fanout`  — S anonymous subscribers spread over the given gateways, one signed-in publisher
//!   sends M `new_msg` at a fixed rate; every delivery's latency (publish → receive) is recorded.
//! * `joins`   — N anonymous connect+joins, `--in-flight` at a time (optionally to a room that
//!   already has a member on every gateway, `--warm`); joins per second, reply latency and the
//!   servers' CPU per join (`--pid`).
//! * `fanout-cost` — `fanout` with the CPU the gateways and Redis used per delivery and message
//!   (history on vs off: `scripts/bench.sh history`).
//! * `join-latency` — joins to a warm room that has history: latency of the reply and of the
//!   last history frame (`rooms.history_on_join` 20 vs 0).
//! * `redis-broadcast` — Redis alone, no gateway: the CPU of one room broadcast as `PUBLISH`
//!   (history off), as `publish.lua` (history on), and as `XADD` + `PUBLISH` without a script.
//! * `churn` — a room of N anonymous viewers over the gateways, then R joins and R leaves per
//!   second for a while; every few seconds the gateways' CPU and RSS, Redis's commands per
//!   second and CPU, and the open sockets, then whether they stayed flat.
//! * `shards` — many rooms (`<room>-0` …) on a Redis Cluster, a steady mix (messages in every
//!   room, signed-in joins and leaves, anonymous churn); per master Redis CPU per message, commands
//!   per second, wakeups, and what the gateways send it (`scripts/bench.sh shards`, 1 / 2 / 3
//!   masters).
//!
//! * `bigroom` — N signed-in users (distinct `sub`s) join one room over the gateways, 64 in
//!   flight: joins per second, the gateways' CPU per join, Redis's CPU and script calls, the bytes
//!   of each `presence_state` and of the diffs each member gets, then a check that sampled members
//!   and a fresh joiner per gateway hold all N users.
//!
//! Every scenario prints its figures as prose and as one JSON line (`{"scenario": …}`), which
//! `scripts/bench.sh` collects. A join waits for its `phx_reply` only (not for `presence_state`),
//! so the scenarios also run against `ceiling` (`shared/perf/ceiling`, no presence), which
//! `scripts/bench.sh compare` measures side by side with the gateway.
//!
//! Everything runs on loopback against gateways you point it at; it opens only the sockets it is
//! told to and stops by itself.
//!
//! | file | owns |
//! |---|---|
//! | `main.rs` | the command line and the dispatch to one scenario |
//! | `client.rs` | the WebSocket client: open, send, read until, join, crowds of joined sockets |
//! | `zclient.rs` | a client that negotiates permessage-deflate and inflates what it reads (`bigroom --deflate`) |
//! | `measure.rs` | CPU and RSS readers, Redis `INFO` counters, the paced publisher, percentiles, medians |
//! | `shards.rs` | the shards-add-capacity scenario |
//! | `idle.rs`, `joins.rs`, `bigroom.rs`, `fanout.rs`, `fanout_cost.rs`, `join_latency.rs`, `churn.rs`, `redis_broadcast.rs` | one scenario each |

use anyhow::bail;
use clap::{Parser, Subcommand};

mod bigroom;
mod churn;
mod client;
mod fanout;
mod fanout_cost;
mod idle;
mod join_latency;
mod joins;
mod measure;
mod redis_broadcast;
mod shards;
mod zclient;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Load generator and meter for a running gateway"
)]
struct Cli {
    /// Public address of each gateway (host:port); clients are spread over them round-robin.
    /// Required by every scenario but `redis-broadcast`.
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// Room to use (must exist).
    #[arg(long, default_value = "bench")]
    room: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Memory per idle viewer (anonymous, or signed in with `--secret`), then the gateway's CPU
    /// while they sit idle.
    Idle(idle::Idle),
    /// Broadcast latency to many subscribers.
    Fanout(fanout::Fanout),
    /// Anonymous connect+join throughput, and the servers' CPU per join. Prints a JSON line.
    Joins(joins::Joins),
    /// The cost of fan-out: like `fanout`, and the CPU the gateways (`--pid`) and Redis
    /// (`--redis`, `INFO cpu`) used while the messages went out: deliveries per gateway
    /// CPU-second, Redis CPU per message. Prints a JSON line.
    FanoutCost(fanout_cost::FanoutCost),
    /// Join latency in a warm room (a member on every gateway): `--fill` messages are said
    /// first, then N anonymous sockets (already open) join, `--in-flight` at a time; reports the
    /// reply's latency and the latency until the `--expect` history frames have arrived. Prints
    /// a JSON line.
    JoinLatency(join_latency::JoinLatency),
    /// Churn in a big room: `--viewers` anonymous viewers join over the gateways, then for
    /// `--seconds` `--rate` new anonymous sockets open and join per second and as many of the
    /// oldest leave (a close frame), so the room stays at about `--viewers`. Every `--sample`
    /// seconds: each gateway's CPU and RSS, Redis's commands per second (`INFO commandstats`) and
    /// CPU, the open sockets. Prints a JSON line.
    Churn(churn::Churn),
    /// Redis alone, no gateway: Redis's CPU and command time per room broadcast as a `PUBLISH`
    /// (history off), as `lua/publish.lua` (history on), and as `XADD` + `PUBLISH` pipelined
    /// or in `MULTI` (no script: the least a per-broadcast append costs). Prints JSON lines.
    RedisBroadcast(redis_broadcast::RedisBroadcast),
    /// Shards add capacity: many rooms `<room>-N`, a steady mix, per-master Redis CPU and commands.
    Shards(shards::Shards),
    /// A big signed-in room: `--users` users (one `sub` each) join one room over the gateways,
    /// `--in-flight` at a time; joins/s, gateway CPU per join (`--pid`), Redis CPU and script
    /// calls (`--redis`), bytes per `presence_state` and per member, and a presence check of
    /// sampled members and a fresh joiner per gateway. Prints a JSON line; fails if a view is wrong.
    Bigroom(bigroom::BigRoom),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let topic = format!("rooms:{}", cli.room);
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores, {host}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if cli.gateways.is_empty() && !matches!(cli.scenario, Scenario::RedisBroadcast(_)) {
        bail!("--gateway is required (the public address of a gateway, host:port)");
    }
    match cli.scenario {
        Scenario::Idle(a) => idle::run(&cli.gateways, &topic, a).await?,
        Scenario::Joins(a) => joins::run(&cli.gateways, &topic, a).await?,
        Scenario::Fanout(a) => fanout::run(&cli.gateways, &topic, a).await?,
        Scenario::FanoutCost(c) => fanout_cost::run(&cli.gateways, &topic, c).await?,
        Scenario::JoinLatency(c) => join_latency::run(&cli.gateways, &topic, c).await?,
        Scenario::Churn(c) => churn::run(&cli.gateways, &topic, c).await?,
        Scenario::RedisBroadcast(c) => redis_broadcast::run(c).await?,
        Scenario::Shards(c) => shards::run(&cli.gateways, &cli.room, c).await?,
        Scenario::Bigroom(c) => bigroom::run(&cli.gateways, &topic, c).await?,
    }
    Ok(())
}
