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
//!
//! Every scenario prints its figures as prose and as one JSON line (`{"scenario": …}`), which
//! `scripts/bench.sh` collects. A join waits for its `phx_reply` only (not for `presence_state`),
//! so the scenarios also run against `ceiling` (`shared/perf/ceiling`, no presence), which
//! `scripts/bench.sh compare` measures side by side with the gateway.
//!
//! Everything runs on loopback against gateways you point it at; it opens only the sockets it is
//! told to and stops by itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::header::{CONNECTION, UPGRADE};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

mod redis_broadcast;

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
    Idle {
        #[arg(long, default_value_t = 5000)]
        viewers: usize,
        /// PID of the (first) gateway, to read its RSS and CPU time.
        #[arg(long)]
        pid: u32,
        /// Sign every viewer in with its own HS256 token (one user each, `exp` in an hour), so each
        /// socket holds a presence entry and a token deadline.
        #[arg(long)]
        secret: Option<String>,
        /// Seconds to measure the gateway's CPU while the viewers sit idle.
        #[arg(long, default_value_t = 0)]
        idle_window: u64,
    },
    /// Broadcast latency to many subscribers.
    Fanout {
        #[arg(long, default_value_t = 2000)]
        subscribers: usize,
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Messages per second from the publisher.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// HS256 secret to sign the publisher's token.
        #[arg(long, env = "GATEWAY_AUTH_HS256_SECRET")]
        secret: String,
        /// PIDs of the gateways, to report deliveries per gateway CPU-second.
        #[arg(long = "gateway-pid")]
        gateway_pids: Vec<u32>,
        /// PIDs of the Redis servers (each shard's master), to report Redis CPU per message.
        #[arg(long = "redis-pid")]
        redis_pids: Vec<u32>,
    },
    /// Anonymous connect+join throughput, and the servers' CPU per join. Prints a JSON line.
    Joins {
        #[arg(long, default_value_t = 2000)]
        viewers: usize,
        /// Joins under way at once (a new one starts as soon as one is answered).
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// First put one member on every gateway (kept until the end), so the measured joins
        /// find the room already subscribed everywhere.
        #[arg(long)]
        warm: bool,
        /// PID of each server process, whose CPU time during the joins is divided by the joins.
        #[arg(long = "pid")]
        pids: Vec<u32>,
    },
    /// The cost of fan-out: like `fanout`, and the CPU the gateways (`--pid`) and Redis
    /// (`--redis`, `INFO cpu`) used while the messages went out: deliveries per gateway
    /// CPU-second, Redis CPU per message. Prints a JSON line.
    FanoutCost(FanoutCost),
    /// Join latency in a warm room (a member on every gateway): `--fill` messages are said
    /// first, then N anonymous sockets (already open) join, `--in-flight` at a time; reports the
    /// reply's latency and the latency until the `--expect` history frames have arrived. Prints
    /// a JSON line.
    JoinLatency(JoinLatency),
    /// Churn in a big room: `--viewers` anonymous viewers join over the gateways, then for
    /// `--seconds` `--rate` new anonymous sockets open and join per second and as many of the
    /// oldest leave (a close frame), so the room stays at about `--viewers`. Every `--sample`
    /// seconds: each gateway's CPU and RSS, Redis's commands per second (`INFO commandstats`) and
    /// CPU, the open sockets. Prints a JSON line.
    Churn(Churn),
    /// Redis alone, no gateway: Redis's CPU and command time per room broadcast as a `PUBLISH`
    /// (history off), as `lua/publish.lua` (history on), and as `XADD` + `PUBLISH` pipelined
    /// or in `MULTI` (no script: the least a per-broadcast append costs). Prints JSON lines.
    RedisBroadcast(redis_broadcast::RedisBroadcast),
}

struct SpawnExecutor;
impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

type Ws = FragmentCollector<TokioIo<hyper::upgrade::Upgraded>>;

async fn open(addr: &str, token: Option<&str>) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let q = token.map(|t| format!("&token={t}")).unwrap_or_default();
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}/socket/websocket?vsn=2.0.0{q}"))
        .header("Host", addr)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await?;
    Ok(FragmentCollector::new(ws))
}

async fn send(ws: &mut Ws, text: String) -> anyhow::Result<()> {
    ws.write_frame(Frame::text(Payload::Owned(text.into_bytes())))
        .await?;
    Ok(())
}

/// Reads text frames until one satisfies `f` (which sees the parsed frame).
async fn until(
    ws: &mut Ws,
    mut f: impl FnMut(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text => {
                let v: serde_json::Value = serde_json::from_slice(&frame.payload)?;
                if f(&v) {
                    return Ok(v);
                }
            }
            OpCode::Close => bail!("closed by the gateway"),
            _ => {}
        }
    }
}

async fn join(ws: &mut Ws, topic: &str) -> anyhow::Result<()> {
    send(
        ws,
        serde_json::json!(["1", "1", topic, "phx_join", {}]).to_string(),
    )
    .await?;
    let r = until(ws, |v| v[3] == "phx_reply" && v[1] == "1").await?;
    if r[4]["status"] != "ok" {
        bail!("join refused: {}", r[4]);
    }
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The process's CPU time (user + system) in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // fields after the command name, which is in parentheses and may hold spaces
    let rest = s.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> { Ok(f.get(i).context("short stat")?.parse()?) };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name
    Ok(ticks(11)? + ticks(12)?)
}

/// Sends `messages` `new_msg` pushes at `rate` per second, each body the send time (µs since
/// `epoch`), then keeps reading (replies, its own copies) until aborted.
fn paced_publisher(
    mut publisher: Ws,
    topic: String,
    messages: usize,
    rate: u32,
    epoch: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
        for i in 0..messages {
            tick.tick().await;
            let sent = epoch.elapsed().as_micros() as u64;
            let frame = serde_json::json!(["1", (i + 2).to_string(), &topic, "new_msg", {"body": sent.to_string()}]);
            if send(&mut publisher, frame.to_string()).await.is_err() {
                break;
            }
        }
        while publisher.read_frame().await.is_ok() {}
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn hs256(secret: &str, sub: &str) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "username": sub, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// How long one open + join may take before the scenario gives up on it (a server that never
/// answers must not hang a bench run).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a socket to `addr` and joins `topic`; returns it and the time that took (µs).
async fn open_and_join(addr: &str, topic: &str, token: Option<&str>) -> anyhow::Result<(Ws, u64)> {
    let t = Instant::now();
    let ws = tokio::time::timeout(JOIN_TIMEOUT, async {
        let mut ws = open(addr, token).await?;
        join(&mut ws, topic).await?;
        Ok::<_, anyhow::Error>(ws)
    })
    .await
    .with_context(|| format!("no join reply from {addr} within {JOIN_TIMEOUT:?}"))??;
    Ok((ws, t.elapsed().as_micros() as u64))
}

/// Opens and joins `n` viewers (anonymous, or each signed in as its own user with `secret`),
/// spread over the gateways round-robin, `in_flight` at a time (a new one starts as soon as one
/// is answered); returns them, the join latencies (µs) and the time it all took.
async fn crowd(
    gateways: &[String],
    topic: &str,
    n: usize,
    secret: Option<&str>,
    in_flight: usize,
) -> anyhow::Result<(Vec<Ws>, Vec<u64>, Duration)> {
    let started = Instant::now();
    let mut all = Vec::with_capacity(n);
    let mut lat = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while all.len() < n {
        while next < n && pending.len() < in_flight.max(1) {
            let addr = gateways[next % gateways.len()].clone();
            let topic = topic.to_string();
            let token = secret
                .map(|s| hs256(s, &format!("idle-{next}")))
                .transpose()?;
            pending.spawn(async move { open_and_join(&addr, &topic, token.as_deref()).await });
            next += 1;
        }
        let Some(done) = pending.join_next().await else {
            break;
        };
        let (ws, us) = done??;
        all.push(ws);
        lat.push(us);
    }
    Ok((all, lat, started.elapsed()))
}

/// Keeps idle sockets read (pongs, presence frames) so their queues never fill.
fn drain_in_background(sockets: Vec<Ws>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { while ws.read_frame().await.is_ok() {} }))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    })
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
        Scenario::Idle {
            viewers,
            pid,
            secret,
            idle_window,
        } => {
            let before = rss_kib(pid)?;
            let gw = vec![cli.gateways[0].clone()];
            let (socks, _, took) = crowd(&gw, &topic, viewers, secret.as_deref(), 64).await?;
            let h = drain_in_background(socks);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kib(pid)?;
            let per = (after.saturating_sub(before)) as f64 * 1024.0 / viewers as f64;
            let kind = if secret.is_some() {
                "signed-in"
            } else {
                "anonymous"
            };
            println!(
                "idle: {viewers} {kind} viewers joined in {:.2} s; server RSS {before} KiB -> {after} KiB; {:.0} bytes ({:.2} KiB) per viewer",
                took.as_secs_f64(),
                per,
                per / 1024.0
            );
            let mut idle_cpu_ms = None;
            if idle_window > 0 {
                let t0 = cpu_ticks(pid)?;
                tokio::time::sleep(Duration::from_secs(idle_window)).await;
                let used = cpu_ticks(pid)? - t0;
                println!(
                    "idle cpu: {viewers} {kind} viewers, {idle_window} s: gateway used {} ms CPU = {:.2} % of one core",
                    used * 10,
                    used as f64 * 10.0 / (idle_window as f64 * 10.0)
                );
                idle_cpu_ms = Some(used * 10);
            }
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "idle", "viewers": viewers, "kind": kind, "join_s": took.as_secs_f64(),
                    "rss_before_kib": before, "rss_after_kib": after, "bytes_per_viewer": per,
                    "idle_window_s": idle_window, "idle_cpu_ms": idle_cpu_ms,
                })
            );
            h.abort();
        }
        Scenario::Joins {
            viewers,
            in_flight,
            warm,
            pids,
        } => {
            // one member per gateway URL, read until the end
            let holders = if warm {
                let h = joined(&cli.gateways, &topic, cli.gateways.len()).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                Some(drain_in_background(h))
            } else {
                None
            };
            // the joins take a fraction of a second: the threads' exact CPU time
            let cpu0 = thread_cpu_ns(&pids)?;
            let (socks, mut lat, took) =
                crowd(&cli.gateways, &topic, viewers, None, in_flight).await?;
            let cpu = thread_cpu_seconds(&cpu0, &thread_cpu_ns(&pids)?);
            lat.sort_unstable();
            let per_s = viewers as f64 / took.as_secs_f64();
            let cpu_us = (!pids.is_empty()).then(|| cpu * 1e6 / viewers as f64);
            let ms = |us: u64| us as f64 / 1000.0;
            println!(
                "joins: {viewers} anonymous connect+join{} in {:.2} s = {per_s:.0}/s ({in_flight} in flight); latency p50 {:.2} ms, p99 {:.2} ms{}",
                if warm { " to a warm room" } else { "" },
                took.as_secs_f64(),
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                cpu_us.map_or(String::new(), |us| format!(
                    "; server CPU {cpu:.3} s = {us:.1} µs per join"
                )),
            );
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "joins", "viewers": viewers, "in_flight": in_flight, "warm": warm,
                    "joins_per_s": per_s, "p50_ms": ms(percentile(&lat, 0.5)),
                    "p99_ms": ms(percentile(&lat, 0.99)),
                    "server_cpu_s": (!pids.is_empty()).then_some(cpu),
                    "server_cpu_us_per_join": cpu_us,
                })
            );
            drop(socks);
            if let Some(h) = holders {
                h.abort();
            }
        }
        Scenario::Fanout {
            subscribers,
            messages,
            rate,
            secret,
            gateway_pids,
            redis_pids,
        } => {
            let (socks, _, _) = crowd(&cli.gateways, &topic, subscribers, None, 64).await?;
            let cpu = |pids: &[u32]| -> Vec<u64> {
                pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect()
            };
            let (gw0, redis0) = (cpu(&gateway_pids), cpu(&redis_pids));
            let epoch = Instant::now();
            let received = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::with_capacity(subscribers);
            for mut ws in socks {
                let received = received.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(messages);
                    let deadline = tokio::time::sleep(
                        Duration::from_secs(30)
                            + Duration::from_millis(messages as u64 * 1000 / rate.max(1) as u64),
                    );
                    tokio::pin!(deadline);
                    while lat.len() < messages {
                        let frame = tokio::select! {
                            f = ws.read_frame() => match f { Ok(f) => f, Err(_) => break },
                            _ = &mut deadline => break,
                        };
                        if frame.opcode != OpCode::Text {
                            continue;
                        }
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&frame.payload)
                        else {
                            continue;
                        };
                        // live broadcasts only (refs null), not a join's history frames
                        if v[3] == "new_msg"
                            && v[0].is_null()
                            && let Some(sent) =
                                v[4]["body"].as_str().and_then(|b| b.parse::<u64>().ok())
                        {
                            let now = epoch.elapsed().as_micros() as u64;
                            lat.push(now.saturating_sub(sent));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat
                }));
            }
            let token = hs256(&secret, "bench-publisher")?;
            let mut publisher = open(&cli.gateways[0], Some(&token)).await?;
            join(&mut publisher, &topic).await?;
            let publisher_drain = paced_publisher(publisher, topic.clone(), messages, rate, epoch);
            let mut all = Vec::with_capacity(subscribers * messages);
            for t in tasks {
                all.extend(t.await?);
            }
            publisher_drain.abort();
            let (gw1, redis1) = (cpu(&gateway_pids), cpu(&redis_pids));
            all.sort_unstable();
            let expected = subscribers * messages;
            let ms = |us: u64| us as f64 / 1000.0;
            println!(
                "fanout: {subscribers} subscribers over {} gateway(s), {messages} messages at {rate}/s: delivered {}/{expected}; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                cli.gateways.len(),
                all.len(),
                ms(percentile(&all, 0.5)),
                ms(percentile(&all, 0.9)),
                ms(percentile(&all, 0.99)),
                ms(all.last().copied().unwrap_or(0)),
            );
            // clock ticks are 1/100 s
            let gw_cpu_s: f64 = gw1
                .iter()
                .zip(&gw0)
                .map(|(b, a)| (b - a) as f64 / 100.0)
                .sum();
            let per_cpu = all.len() as f64 / gw_cpu_s.max(0.01);
            if !gateway_pids.is_empty() {
                println!(
                    "fanout cpu: gateways used {gw_cpu_s:.2} CPU-s: {per_cpu:.0} deliveries per gateway CPU-second"
                );
            }
            let mut redis_cpu_s = Vec::new();
            for (i, (b, a)) in redis1.iter().zip(&redis0).enumerate() {
                println!(
                    "fanout redis: server {} (pid {}) used {:.2} CPU-s = {:.1} µs per message",
                    i + 1,
                    redis_pids[i],
                    (b - a) as f64 / 100.0,
                    (b - a) as f64 * 10_000.0 / messages.max(1) as f64
                );
                redis_cpu_s.push((b - a) as f64 / 100.0);
            }
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "fanout", "subscribers": subscribers, "messages": messages,
                    "rate": rate, "delivered": all.len(), "expected": expected,
                    "p50_ms": ms(percentile(&all, 0.5)), "p90_ms": ms(percentile(&all, 0.9)),
                    "p99_ms": ms(percentile(&all, 0.99)), "max_ms": ms(all.last().copied().unwrap_or(0)),
                    "gateway_cpu_s": (!gateway_pids.is_empty()).then_some(gw_cpu_s),
                    "deliveries_per_cpu_s": (!gateway_pids.is_empty()).then_some(per_cpu),
                    "redis_cpu_s": redis_cpu_s,
                })
            );
            if all.len() != expected {
                bail!("lost deliveries: {} of {expected}", expected - all.len());
            }
        }
        Scenario::FanoutCost(c) => fanout_cost(&cli.gateways, &topic, c).await?,
        Scenario::JoinLatency(c) => join_latency(&cli.gateways, &topic, c).await?,
        Scenario::Churn(c) => churn(&cli.gateways, &topic, c).await?,
        Scenario::RedisBroadcast(c) => redis_broadcast::run(c).await?,
    }
    Ok(())
}

/// CPU time (user + system) of a process, in seconds (`/proc/<pid>/stat`, clock ticks of 10 ms).
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / 100.0)
}

/// Time on CPU of every thread of the processes, in ns, by thread id
/// (`/proc/<pid>/task/<tid>/schedstat`): exact, where `/proc/<pid>/stat` counts in 10 ms steps,
/// which is too coarse for a window of a fraction of a second.
fn thread_cpu_ns(pids: &[u32]) -> anyhow::Result<HashMap<u64, u64>> {
    let mut by_tid = HashMap::new();
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?;
            let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue; // the thread ended meanwhile
            };
            let (Some(tid), Some(ns)) = (
                task.file_name().to_str().and_then(|t| t.parse().ok()),
                stat.split_whitespace().next().and_then(|n| n.parse().ok()),
            ) else {
                continue;
            };
            by_tid.insert(tid, ns);
        }
    }
    Ok(by_tid)
}

/// CPU seconds the threads used between two `thread_cpu_ns` readings (a thread that ended
/// in between is missed: tokio's worker threads do not end, only idle blocking-pool threads).
fn thread_cpu_seconds(before: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// The CPU time of several processes together, in seconds.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| process_cpu_seconds(*p)).sum()
}

/// Redis's own CPU time (`used_cpu_user + used_cpu_sys` of `INFO cpu`), in seconds.
async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let field = |name: &str| -> anyhow::Result<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .context("INFO cpu lacks a field")?
            .trim()
            .parse::<f64>()
            .map_err(Into::into)
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

#[derive(clap::Args)]
struct FanoutCost {
    #[arg(long, default_value_t = 2000)]
    subscribers: usize,
    #[arg(long, default_value_t = 400)]
    messages: usize,
    #[arg(long, default_value_t = 100)]
    rate: u32,
    #[arg(long, env = "GATEWAY_AUTH_HS256_SECRET")]
    secret: String,
    /// PID of each gateway, whose CPU time is counted.
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Redis URL, whose `used_cpu_user + used_cpu_sys` is counted (none: a server without
    /// Redis, such as `ceiling`).
    #[arg(long)]
    redis: Option<String>,
}

/// Opens and joins `n` anonymous sockets spread over the gateways, 64 at a time.
async fn joined(gateways: &[String], topic: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    Ok(crowd(gateways, topic, n, None, 64).await?.0)
}

/// The number in a live `new_msg` frame's `"body":"<digits>"` (the send time), without parsing
/// the whole frame: the bench shares the machine's cores with what it measures.
fn live_body_number(frame: &[u8]) -> Option<u64> {
    if !frame.starts_with(b"[null,null,") {
        return None;
    }
    let at = frame.windows(9).position(|w| w == b"\"new_msg\"")?;
    let rest = &frame[at..];
    let b = rest.windows(8).position(|w| w == b"\"body\":\"")? + 8;
    let digits = rest[b..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&rest[b..b + digits]).ok()?.parse().ok()
}

/// `INFO commandstats`: calls and microseconds per command name.
async fn redis_commandstats(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<HashMap<String, (f64, f64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut stats = HashMap::new();
    for l in info.lines() {
        let Some((name, rest)) = l.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else {
            continue;
        };
        let field = |k: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            stats.insert(name.to_string(), (calls, usec));
        }
    }
    Ok(stats)
}

/// Redis's time executing the broadcasts, from `INFO commandstats` (reset before sending): with
/// history on, every broadcast is one `EVALSHA` whose time includes the `XADD` and `PUBLISH` it
/// runs; off, one `PUBLISH`. The few heartbeat scripts and probe publishes of the window are
/// included either way. Returns (usec, a summary of the counters).
async fn redis_broadcast_usec(
    conn: &mut redis::aio::MultiplexedConnection,
    messages: usize,
) -> anyhow::Result<(f64, String)> {
    let stats = redis_commandstats(conn).await?;
    let get = |n: &str| stats.get(n).copied().unwrap_or((0.0, 0.0));
    let (script_calls, script_usec) = (
        get("evalsha").0 + get("eval").0,
        get("evalsha").1 + get("eval").1,
    );
    let usec = if script_calls >= messages as f64 {
        script_usec
    } else {
        script_usec + get("publish").1
    };
    let mut names: Vec<_> = stats.iter().collect();
    names.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    let summary = names
        .iter()
        .take(8)
        .map(|(n, (c, u))| format!("{n}={c:.0}/{u:.0}us"))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((usec, summary))
}

async fn fanout_cost(gateways: &[String], topic: &str, c: FanoutCost) -> anyhow::Result<()> {
    let mut rc = match &c.redis {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        None => None,
    };
    let socks = joined(gateways, topic, c.subscribers).await?;
    let epoch = Instant::now();
    let messages = c.messages;
    // sending takes `phase`, after a settling pause and an idle window as long: a subscriber
    // waits for all of that and 30 s more before it counts what is missing as lost
    let phase = Duration::from_secs_f64(messages as f64 / c.rate.max(1) as f64);
    let patience = Duration::from_secs(32) + phase * 2;
    let mut tasks = Vec::with_capacity(c.subscribers);
    for mut ws in socks {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(messages);
            let deadline = tokio::time::sleep(patience);
            tokio::pin!(deadline);
            while lat.len() < messages {
                let frame = tokio::select! {
                    f = ws.read_frame() => match f { Ok(f) => f, Err(_) => break },
                    _ = &mut deadline => break,
                };
                if frame.opcode != OpCode::Text {
                    continue;
                }
                if let Some(sent) = live_body_number(&frame.payload) {
                    lat.push((epoch.elapsed().as_micros() as u64).saturating_sub(sent));
                }
            }
            lat
        }));
    }
    let token = hs256(&c.secret, "bench-publisher")?;
    let mut publisher = open(&gateways[0], Some(&token)).await?;
    join(&mut publisher, topic).await?;
    // the joins' own work (history, presence) settles before the meter starts
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Redis's CPU, or 0 without Redis
    async fn redis_cpu(rc: &mut Option<redis::aio::MultiplexedConnection>) -> anyhow::Result<f64> {
        match rc {
            Some(rc) => redis_cpu_seconds(rc).await,
            None => Ok(0.0),
        }
    }
    // first the same time without messages: what the gateways and Redis use anyway (heartbeats,
    // probes, Redis's own timers) is taken off
    let (idle_gw0, idle_redis0) = (cpu_seconds(&c.pids)?, redis_cpu(&mut rc).await?);
    tokio::time::sleep(phase).await;
    let idle_gw = cpu_seconds(&c.pids)? - idle_gw0;
    let idle_redis = redis_cpu(&mut rc).await? - idle_redis0;
    if let Some(rc) = &mut rc {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(rc)
            .await?;
    }
    let cpu0 = cpu_seconds(&c.pids)?;
    let redis0 = redis_cpu(&mut rc).await?;
    let t0 = Instant::now();
    let rate = c.rate.max(1);
    let publisher_task = paced_publisher(publisher, topic.to_string(), messages, rate, epoch);
    let mut all = Vec::with_capacity(c.subscribers * messages);
    for t in tasks {
        all.extend(t.await?);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(&c.pids)?;
    let redis1 = redis_cpu(&mut rc).await?;
    let (cmd_usec, cmds) = match &mut rc {
        Some(rc) => redis_broadcast_usec(rc, messages).await?,
        None => (0.0, "no Redis".to_string()),
    };
    publisher_task.abort();
    all.sort_unstable();
    let expected = c.subscribers * messages;
    // the idle window was as long as the sending; the wait for the last deliveries is not
    let scale = wall / phase.as_secs_f64();
    let gw = (cpu1 - cpu0) - idle_gw * scale;
    let redis_cpu = (redis1 - redis0) - idle_redis * scale;
    let per_cpu = all.len() as f64 / gw.max(0.01);
    let redis_us = redis_cpu * 1e6 / messages as f64;
    let cmd_us = cmd_usec / messages as f64;
    let ms = |us: u64| us as f64 / 1000.0;
    let redis_part = if rc.is_some() {
        format!(
            "; Redis CPU {:.1} ms (idle {:.1} ms taken off) = {redis_us:.1} µs per message, of which executing the broadcast {cmd_us:.1} µs",
            redis_cpu * 1000.0,
            idle_redis * 1000.0,
        )
    } else {
        String::new()
    };
    println!(
        "fanout cost: {} subscribers over {} server URL(s), {messages} messages at {rate}/s: delivered {}/{expected} in {wall:.2} s; server CPU {gw:.2} s (idle {idle_gw:.2} s taken off) = {per_cpu:.0} deliveries per CPU-second{redis_part}; latency p50 {:.2} ms, p99 {:.2} ms",
        c.subscribers,
        gateways.len(),
        all.len(),
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
    );
    if rc.is_some() {
        println!("redis commandstats while sending (calls/usec): {cmds}");
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "fanout_cost", "subscribers": c.subscribers, "messages": messages,
            "rate": rate, "delivered": all.len(), "expected": expected,
            "lost": expected - all.len(), "redis": rc.is_some(),
            "gateway_cpu_s": gw, "gateway_idle_cpu_s": idle_gw, "deliveries_per_cpu_s": per_cpu,
            "redis_cpu_ms": redis_cpu * 1000.0, "redis_idle_cpu_ms": idle_redis * 1000.0,
            "redis_us_per_message": redis_us, "redis_command_us_per_message": cmd_us,
            "p50_ms": ms(percentile(&all, 0.5)), "p99_ms": ms(percentile(&all, 0.99)),
        })
    );
    if all.len() != expected {
        bail!("lost deliveries: {} of {expected}", expected - all.len());
    }
    Ok(())
}

#[derive(clap::Args)]
struct JoinLatency {
    #[arg(long, default_value_t = 2000)]
    viewers: usize,
    #[arg(long, default_value_t = 50)]
    fill: usize,
    /// History frames each join gets (`rooms.history_on_join`, or fewer in a short room).
    #[arg(long, default_value_t = 20)]
    expect: usize,
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    #[arg(long, env = "GATEWAY_AUTH_HS256_SECRET")]
    secret: String,
    /// PID of each gateway, whose CPU time per join is reported.
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

async fn join_latency(gateways: &[String], topic: &str, j: JoinLatency) -> anyhow::Result<()> {
    let JoinLatency {
        viewers,
        fill,
        expect,
        in_flight,
        secret,
        pids,
    } = j;
    let secret = secret.as_str();
    // the room is warm on every gateway: a member on each
    let holders = joined(gateways, topic, gateways.len()).await?;
    let holders = drain_in_background(holders);
    if fill > 0 {
        let token = hs256(secret, "bench-filler")?;
        let mut w = open(&gateways[0], Some(&token)).await?;
        join(&mut w, topic).await?;
        for i in 0..fill {
            let f = serde_json::json!(["1", format!("f{i}"), topic, "new_msg", {"body": format!("fill {i}")}]);
            send(&mut w, f.to_string()).await?;
        }
        let last = format!("f{}", fill - 1);
        until(&mut w, |v| v[3] == "phx_reply" && v[1] == last.as_str()).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // every socket is open before the first join: only the join is measured
    let mut socks = Vec::with_capacity(viewers);
    for start in (0..viewers).step_by(64) {
        let batch: Vec<_> = (start..(start + 64).min(viewers))
            .map(|k| {
                let addr = gateways[k % gateways.len()].clone();
                tokio::spawn(async move { open(&addr, None).await })
            })
            .collect();
        for h in batch {
            socks.push(h.await??);
        }
    }
    // per thread (schedstat): the joins take a fraction of a second, too short for 10 ms ticks
    let cpu0 = thread_cpu_ns(&pids)?;
    let started = Instant::now();
    let mut reply_us = Vec::with_capacity(viewers);
    let mut done_us = Vec::with_capacity(viewers);
    let mut kept = Vec::with_capacity(viewers);
    let mut it = socks.into_iter();
    loop {
        let batch: Vec<_> = it
            .by_ref()
            .take(in_flight.max(1))
            .map(|mut ws| {
                let topic = topic.to_string();
                tokio::spawn(async move {
                    let t = Instant::now();
                    send(
                        &mut ws,
                        serde_json::json!(["1", "1", &topic, "phx_join", {}]).to_string(),
                    )
                    .await?;
                    let mut reply = None;
                    let mut got = 0;
                    // byte checks, not a parse: the bench shares the cores with the gateways
                    while reply.is_none() || got < expect {
                        let frame = ws.read_frame().await?;
                        match frame.opcode {
                            OpCode::Text => {}
                            OpCode::Close => bail!("closed by the gateway"),
                            _ => continue,
                        }
                        let p = &frame.payload[..];
                        if p.starts_with(b"[\"1\",\"1\",") {
                            if !p.windows(13).any(|w| w == b"\"status\":\"ok\"") {
                                bail!("join refused: {}", String::from_utf8_lossy(p));
                            }
                            reply = Some(t.elapsed().as_micros() as u64);
                        } else if p.starts_with(b"[\"1\",null,")
                            && p.windows(9).any(|w| w == b"\"new_msg\"")
                        {
                            got += 1;
                        }
                    }
                    let done = t.elapsed().as_micros() as u64;
                    Ok::<_, anyhow::Error>((ws, reply.unwrap_or(done), done))
                })
            })
            .collect();
        if batch.is_empty() {
            break;
        }
        for h in batch {
            let (ws, r, d) = h.await??;
            reply_us.push(r);
            done_us.push(d);
            kept.push(ws);
        }
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds(&cpu0, &thread_cpu_ns(&pids)?);
    let cpu_us_per_join = cpu * 1e6 / viewers as f64;
    reply_us.sort_unstable();
    done_us.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "join latency: {viewers} anonymous joins in a warm room, {in_flight} in flight, {expect} history frames each: {:.0} joins/s, gateway CPU {cpu_us_per_join:.0} µs per join; reply p50 {:.2} ms, p99 {:.2} ms; with history p50 {:.2} ms, p99 {:.2} ms",
        viewers as f64 / took,
        ms(percentile(&reply_us, 0.5)),
        ms(percentile(&reply_us, 0.99)),
        ms(percentile(&done_us, 0.5)),
        ms(percentile(&done_us, 0.99)),
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "join_latency", "viewers": viewers, "in_flight": in_flight, "expect": expect,
            "joins_per_s": viewers as f64 / took, "gateway_cpu_us_per_join": cpu_us_per_join,
            "reply_p50_ms": ms(percentile(&reply_us, 0.5)), "reply_p99_ms": ms(percentile(&reply_us, 0.99)),
            "done_p50_ms": ms(percentile(&done_us, 0.5)), "done_p99_ms": ms(percentile(&done_us, 0.99)),
        })
    );
    holders.abort();
    drop(kept);
    Ok(())
}

#[derive(clap::Args)]
struct Churn {
    #[arg(long, default_value_t = 10_000)]
    viewers: usize,
    /// Joins and leaves per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    sample: u64,
    /// Joins under way at most; when the pacer would need more, the joins it cannot start
    /// are skipped (and counted): the achieved rate is reported.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// PID of each gateway, whose CPU and RSS are sampled.
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Redis URL, for `INFO commandstats` (and `INFO cpu` without `--redis-pid`).
    #[arg(long)]
    redis: String,
    /// PID of the Redis server, whose CPU is read from /proc.
    #[arg(long)]
    redis_pid: Option<u32>,
}

/// Joins under way: each ends with the joined socket and its open + join time (µs).
type Joining = tokio::task::JoinSet<anyhow::Result<(Ws, u64)>>;

/// One joined socket of the churn, read by its own task until it is told to leave (or this is
/// dropped). Leaving is a close frame, then a wait for the server's close: the server ends the
/// TCP connection first, so the client's ports do not pile up in TIME_WAIT at 1,000 a second.
struct Member {
    leave: tokio::sync::oneshot::Sender<()>,
}

impl Member {
    /// `open` counts the sockets whose task still runs (joined, or leaving).
    fn new(mut ws: Ws, open: Arc<AtomicUsize>) -> Member {
        let (leave, mut told) = tokio::sync::oneshot::channel::<()>();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = ws.read_frame() => if f.is_err() { break },
                    _ = &mut told => {
                        if ws.write_frame(Frame::close(1000, b"")).await.is_ok() {
                            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                                while ws.read_frame().await.is_ok() {}
                            })
                            .await;
                        }
                        break;
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Member { leave }
    }

    fn leave(self) {
        let _ = self.leave.send(());
    }
}

/// What the gateways and Redis did between two samples.
struct Sample {
    /// CPU of each gateway, % of one core.
    cpu_pct: Vec<f64>,
    rss_mib: Vec<f64>,
    redis_cmds_per_s: f64,
    /// The busiest commands: name, calls per second.
    redis_top: Vec<(String, f64)>,
    redis_cpu_pct: f64,
}

/// Reads the gateways' `/proc` figures and Redis's counters, and gives the rates since the
/// last reading.
struct Sampler {
    pids: Vec<u32>,
    redis_pid: Option<u32>,
    rc: redis::aio::MultiplexedConnection,
    at: Instant,
    /// Each gateway's threads' CPU time (`thread_cpu_ns`): 10 ms steps over a 5 s sample would be
    /// ±0.4 % of a core.
    cpu: Vec<HashMap<u64, u64>>,
    redis_cpu: f64,
    calls: HashMap<String, f64>,
}

impl Sampler {
    async fn new(
        pids: Vec<u32>,
        redis_pid: Option<u32>,
        rc: redis::aio::MultiplexedConnection,
    ) -> anyhow::Result<Sampler> {
        let mut s = Sampler {
            pids,
            redis_pid,
            rc,
            at: Instant::now(),
            cpu: Vec::new(),
            redis_cpu: 0.0,
            calls: HashMap::new(),
        };
        s.next().await?;
        Ok(s)
    }

    /// Redis's CPU seconds: its process's from /proc when the pid is known, else `INFO cpu`.
    async fn redis_cpu(&mut self) -> anyhow::Result<f64> {
        match self.redis_pid {
            Some(pid) => process_cpu_seconds(pid),
            None => redis_cpu_seconds(&mut self.rc).await,
        }
    }

    /// The figures since the last call (the first call only sets the baseline).
    async fn next(&mut self) -> anyhow::Result<Sample> {
        let now = Instant::now();
        let dt = (now - self.at).as_secs_f64().max(1e-3);
        let cpu = self
            .pids
            .iter()
            .map(|p| thread_cpu_ns(&[*p]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rss_mib = self
            .pids
            .iter()
            .map(|p| rss_kib(*p).map(|k| k as f64 / 1024.0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let redis_cpu = self.redis_cpu().await?;
        let calls: HashMap<String, f64> = redis_commandstats(&mut self.rc)
            .await?
            .into_iter()
            .map(|(name, (calls, _))| (name, calls))
            .collect();
        let mut per_s: Vec<(String, f64)> = calls
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    (c - self.calls.get(n).copied().unwrap_or(0.0)) / dt,
                )
            })
            .filter(|(_, r)| *r > 0.0)
            .collect();
        per_s.sort_by(|a, b| b.1.total_cmp(&a.1));
        let sample = Sample {
            cpu_pct: cpu
                .iter()
                .enumerate()
                .map(|(i, after)| match self.cpu.get(i) {
                    Some(before) => thread_cpu_seconds(before, after) * 100.0 / dt,
                    None => 0.0,
                })
                .collect(),
            rss_mib,
            redis_cmds_per_s: per_s.iter().map(|(_, r)| r).sum(),
            redis_top: per_s.into_iter().take(3).collect(),
            redis_cpu_pct: (redis_cpu - self.redis_cpu) * 100.0 / dt,
        };
        (self.at, self.cpu, self.redis_cpu, self.calls) = (now, cpu, redis_cpu, calls);
        Ok(sample)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How much a series moved: the median of its last third against that of its first third.
/// Flat: within ±20 %.
const FLAT_WITHIN: f64 = 0.20;
/// A CPU series (`_pct`, % of one core) also counts as flat within ±2 points: a few % of a core
/// moves that much from one 5 s sample to the next on a shared machine.
const FLAT_CPU_POINTS: f64 = 2.0;

fn series_summary(name: &str, v: &[f64]) -> (serde_json::Value, bool, String) {
    let third = (v.len() / 3).max(1);
    let (first, last) = (
        median(&v[..third.min(v.len())]),
        median(&v[v.len().saturating_sub(third)..]),
    );
    let change = if first == 0.0 {
        if last == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        last / first - 1.0
    };
    let flat = change.abs() <= FLAT_WITHIN
        || (name.ends_with("_pct") && (last - first).abs() <= FLAT_CPU_POINTS);
    let (min, max) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        });
    let line = format!(
        "  {name:<16} min {min:>9.1}  median {:>9.1}  max {max:>9.1};  first third {first:>9.1} -> last third {last:>9.1} ({:+.1} %): {}",
        median(v),
        change * 100.0,
        if flat { "flat" } else { "NOT flat" }
    );
    let json = serde_json::json!({
        "min": min, "median": median(v), "max": max, "first_third_median": first,
        "last_third_median": last, "change_pct": change * 100.0, "flat": flat,
    });
    (json, flat, line)
}

async fn churn(gateways: &[String], topic: &str, c: Churn) -> anyhow::Result<()> {
    let rc = redis::Client::open(c.redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let open_now = Arc::new(AtomicUsize::new(0));
    let mut live: VecDeque<Member> = VecDeque::with_capacity(c.viewers + c.in_flight);
    let mut joining = Joining::new();
    let mut next_gateway = 0;
    let mut start_join = |joining: &mut Joining| {
        let addr = gateways[next_gateway % gateways.len()].clone();
        next_gateway += 1;
        let topic = topic.to_string();
        joining.spawn(async move { open_and_join(&addr, &topic, None).await });
    };

    // the room fills, 64 joins at a time; a failure here ends the scenario
    let filled = Instant::now();
    let mut started = 0;
    while live.len() < c.viewers {
        while started < c.viewers && joining.len() < 64 {
            start_join(&mut joining);
            started += 1;
        }
        let Some(done) = joining.join_next().await else {
            break;
        };
        let (ws, _) = done??;
        live.push_back(Member::new(ws, open_now.clone()));
    }
    let fill_s = filled.elapsed().as_secs_f64();
    println!(
        "churn: {} anonymous viewers joined over {} gateway(s) in {fill_s:.2} s; now {} joins and {} leaves per second for {} s",
        c.viewers,
        gateways.len(),
        c.rate,
        c.rate,
        c.seconds
    );
    // the fill's anonymous batches and counts go out before the meter starts
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut sampler = Sampler::new(c.pids.clone(), c.redis_pid, rc).await?;
    let rate = c.rate.max(1) as f64;
    let run = Duration::from_secs(c.seconds.max(1));
    let every = Duration::from_secs(c.sample.max(1));
    let in_flight = c.in_flight.max(1);
    // the pacer looks every 5 ms: at 1,000/s that starts about 5 joins and 5 leaves each time
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut started, mut skipped, mut joined_n, mut left, mut failed) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut window_joins, mut window_leaves) = (0u64, 0u64);
    let (mut lat_all, mut lat_window) = (Vec::new(), Vec::new());
    let mut samples = Vec::new();
    let mut next_sample = every;
    let mut last_sample = Duration::ZERO;
    let t0 = Instant::now();
    loop {
        tokio::select! {
            _ = pace.tick() => {
                let el = t0.elapsed();
                if el >= next_sample || el >= run {
                    let s = sampler.next().await?;
                    let dt = (el - last_sample).as_secs_f64();
                    last_sample = el;
                    lat_window.sort_unstable();
                    let (joins_s, leaves_s) = (window_joins as f64 / dt, window_leaves as f64 / dt);
                    let ms = |us: u64| us as f64 / 1000.0;
                    let (p50, p99) = (ms(percentile(&lat_window, 0.5)), ms(percentile(&lat_window, 0.99)));
                    let sockets = open_now.load(Ordering::Relaxed);
                    let list = |v: &[f64], unit: &str| {
                        v.iter().map(|x| format!("{x:.1}{unit}")).collect::<Vec<_>>().join(" / ")
                    };
                    let top = s
                        .redis_top
                        .iter()
                        .map(|(n, r)| format!("{n} {r:.0}/s"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    println!(
                        "churn {:>5.1} s: gateway CPU {}, RSS {}; Redis {:.0} commands/s ({top}), CPU {:.1} %; sockets {sockets} (room {}); joins {joins_s:.0}/s, leaves {leaves_s:.0}/s, join p50 {p50:.2} ms, p99 {p99:.2} ms",
                        el.as_secs_f64(),
                        list(&s.cpu_pct, " %"),
                        list(&s.rss_mib, " MiB"),
                        s.redis_cmds_per_s,
                        s.redis_cpu_pct,
                        live.len(),
                    );
                    samples.push((el.as_secs_f64(), s, sockets, joins_s, leaves_s, p50, p99));
                    (window_joins, window_leaves) = (0, 0);
                    lat_window.clear();
                    next_sample += every;
                    if el >= run {
                        break;
                    }
                }
                let due = (rate * el.as_secs_f64()) as u64;
                while started + skipped < due && joining.len() < in_flight {
                    start_join(&mut joining);
                    started += 1;
                }
                // more than 100 ms behind with every slot busy: the client cannot go faster, and
                // a burst to catch up would not be the rate asked for; those joins are skipped
                let behind = due.saturating_sub(started + skipped);
                if behind as f64 > rate / 10.0 {
                    skipped += behind;
                }
                // the oldest leave as fast as new ones joined: the room stays at `viewers`
                while left < due.min(joined_n) {
                    let Some(m) = live.pop_front() else { break };
                    m.leave();
                    left += 1;
                    window_leaves += 1;
                }
            }
            Some(done) = joining.join_next() => {
                match done.map_err(anyhow::Error::from).and_then(|r| r) {
                    Ok((ws, us)) => {
                        live.push_back(Member::new(ws, open_now.clone()));
                        joined_n += 1;
                        window_joins += 1;
                        lat_window.push(us);
                        lat_all.push(us);
                    }
                    Err(e) => {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("churn: a join failed: {e:#}");
                        }
                    }
                }
            }
        }
    }
    let took = t0.elapsed().as_secs_f64();
    lat_all.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "churn: {took:.1} s at {} joins + {} leaves per second asked: achieved {:.0} joins/s and {:.0} leaves/s ({joined_n} joins, {left} leaves, {failed} failed, {skipped} skipped by the pacer); join p50 {:.2} ms, p99 {:.2} ms; room {} at the end",
        c.rate,
        c.rate,
        joined_n as f64 / took,
        left as f64 / took,
        ms(percentile(&lat_all, 0.5)),
        ms(percentile(&lat_all, 0.99)),
        live.len(),
    );
    // the series, one value per sample
    let mut series: Vec<(String, Vec<f64>)> = Vec::new();
    for (i, _) in c.pids.iter().enumerate() {
        series.push((
            format!("gw{}_cpu_pct", i + 1),
            samples.iter().map(|s| s.1.cpu_pct[i]).collect(),
        ));
        series.push((
            format!("gw{}_rss_mib", i + 1),
            samples.iter().map(|s| s.1.rss_mib[i]).collect(),
        ));
    }
    series.push((
        "redis_cmds_per_s".into(),
        samples.iter().map(|s| s.1.redis_cmds_per_s).collect(),
    ));
    series.push((
        "redis_cpu_pct".into(),
        samples.iter().map(|s| s.1.redis_cpu_pct).collect(),
    ));
    series.push((
        "sockets".into(),
        samples.iter().map(|s| s.2 as f64).collect(),
    ));
    series.push(("joins_per_s".into(), samples.iter().map(|s| s.3).collect()));
    series.push(("leaves_per_s".into(), samples.iter().map(|s| s.4).collect()));
    let mut summary = serde_json::Map::new();
    let mut moved = Vec::new();
    println!(
        "churn: {} samples; flat = the median of the last third within ±{:.0} % of the first third's (CPU: or within ±{FLAT_CPU_POINTS} points)",
        samples.len(),
        FLAT_WITHIN * 100.0
    );
    for (name, v) in &series {
        let (json, flat, line) = series_summary(name, v);
        println!("{line}");
        if !flat {
            moved.push(name.clone());
        }
        summary.insert(name.clone(), json);
    }
    println!(
        "churn: stayed flat: {}",
        if moved.is_empty() {
            "yes".to_string()
        } else {
            format!("no ({})", moved.join(", "))
        }
    );
    let samples_json: Vec<_> = samples
        .iter()
        .map(|(t, s, sockets, joins_s, leaves_s, p50, p99)| {
            serde_json::json!({
                "t_s": t, "gateway_cpu_pct": s.cpu_pct, "gateway_rss_mib": s.rss_mib,
                "redis_cmds_per_s": s.redis_cmds_per_s, "redis_top": s.redis_top,
                "redis_cpu_pct": s.redis_cpu_pct, "sockets": sockets, "joins_per_s": joins_s,
                "leaves_per_s": leaves_s, "join_p50_ms": p50, "join_p99_ms": p99,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "churn", "viewers": c.viewers, "rate": c.rate, "seconds": c.seconds,
            "gateways": gateways.len(), "fill_s": fill_s, "joins": joined_n, "leaves": left,
            "failed": failed, "skipped": skipped, "joins_per_s": joined_n as f64 / took,
            "leaves_per_s": left as f64 / took, "join_p50_ms": ms(percentile(&lat_all, 0.5)),
            "join_p99_ms": ms(percentile(&lat_all, 0.99)), "flat": moved.is_empty(),
            "not_flat": moved, "series": summary, "samples": samples_json,
        })
    );
    Ok(())
}
