//! `bench`: load generator and meter for a running gateway (see `scripts/bench.sh`, which starts
//! Redis and two gateways and runs every scenario).
//!
//! * `idle`    — N anonymous viewers join one room and stay; the gateway's RSS before and after
//!   gives the memory per viewer.
//! * `fanout`  — S anonymous subscribers spread over the given gateways, one signed-in publisher
//!   sends M `new_msg` at a fixed rate; every delivery's latency (publish → receive) is recorded.
//! * `joins`   — N anonymous joins as fast as the clients go; joins per second and reply latency.
//! * `fanout-cost` — `fanout` with the CPU the gateways and Redis used per delivery and message
//!   (history on vs off: `scripts/bench.sh history`).
//! * `join-latency` — joins to a warm room that has history: latency of the reply and of the
//!   last history frame (`rooms.history_on_join` 20 vs 0).
//!
//! Everything runs on loopback against gateways you point it at; it opens only the sockets it is
//! told to and stops by itself.

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

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Load generator and meter for a running gateway"
)]
struct Cli {
    /// Public address of each gateway (host:port); clients are spread over them round-robin.
    #[arg(long = "gateway", required = true)]
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
    /// Anonymous join throughput.
    Joins {
        #[arg(long, default_value_t = 2000)]
        viewers: usize,
    },
    /// The cost of fan-out: like `fanout`, and the CPU the gateways (`--pid`) and Redis
    /// (`--redis`, `INFO cpu`) used while the messages went out: deliveries per gateway
    /// CPU-second, Redis CPU per message. Prints a JSON line.
    FanoutCost {
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
        /// Redis URL, whose `used_cpu_user + used_cpu_sys` is counted.
        #[arg(long)]
        redis: String,
    },
    /// Join latency in a warm room (a member on every gateway): `--fill` messages are said
    /// first, then N anonymous sockets (already open) join, `--in-flight` at a time; reports the
    /// reply's latency and the latency until the `--expect` history frames have arrived. Prints
    /// a JSON line.
    JoinLatency {
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
    },
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

/// Opens and joins `n` viewers (anonymous, or each signed in as its own user with `secret`), 64 at a time; returns them and the join latencies (µs).
async fn crowd(
    gateways: &[String],
    topic: &str,
    n: usize,
    secret: Option<&str>,
) -> anyhow::Result<(Vec<Ws>, Vec<u64>, Duration)> {
    let started = Instant::now();
    let mut all = Vec::with_capacity(n);
    let mut lat = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 64).min(n))
            .map(|k| {
                let addr = gateways[k % gateways.len()].clone();
                let topic = topic.to_string();
                let token = secret.map(|s| hs256(s, &format!("idle-{k}")));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let token = token.transpose()?;
                    let mut ws = open(&addr, token.as_deref()).await?;
                    join(&mut ws, &topic).await?;
                    Ok::<_, anyhow::Error>((ws, t.elapsed().as_micros() as u64))
                })
            })
            .collect();
        for h in batch {
            let (ws, us) = h.await??;
            all.push(ws);
            lat.push(us);
        }
        i += 64;
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
    match cli.scenario {
        Scenario::Idle {
            viewers,
            pid,
            secret,
            idle_window,
        } => {
            let before = rss_kib(pid)?;
            let gw = vec![cli.gateways[0].clone()];
            let (socks, _, took) = crowd(&gw, &topic, viewers, secret.as_deref()).await?;
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
                "idle: {viewers} {kind} viewers joined in {:.2} s; gateway RSS {before} KiB -> {after} KiB; {:.0} bytes ({:.2} KiB) per viewer",
                took.as_secs_f64(),
                per,
                per / 1024.0
            );
            if idle_window > 0 {
                let t0 = cpu_ticks(pid)?;
                tokio::time::sleep(Duration::from_secs(idle_window)).await;
                let used = cpu_ticks(pid)? - t0;
                println!(
                    "idle cpu: {viewers} {kind} viewers, {idle_window} s: gateway used {} ms CPU = {:.2} % of one core",
                    used * 10,
                    used as f64 * 10.0 / (idle_window as f64 * 10.0)
                );
            }
            h.abort();
        }
        Scenario::Joins { viewers } => {
            let (socks, mut lat, took) = crowd(&cli.gateways, &topic, viewers, None).await?;
            lat.sort_unstable();
            println!(
                "joins: {viewers} anonymous connect+join in {:.2} s = {:.0}/s (64 in flight); latency p50 {:.2} ms, p99 {:.2} ms",
                took.as_secs_f64(),
                viewers as f64 / took.as_secs_f64(),
                percentile(&lat, 0.5) as f64 / 1000.0,
                percentile(&lat, 0.99) as f64 / 1000.0
            );
            drop(socks);
        }
        Scenario::Fanout {
            subscribers,
            messages,
            rate,
            secret,
            gateway_pids,
            redis_pids,
        } => {
            let (socks, _, _) = crowd(&cli.gateways, &topic, subscribers, None).await?;
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
            if !gateway_pids.is_empty() {
                // clock ticks are 1/100 s
                let gw_cpu_s: f64 = gw1
                    .iter()
                    .zip(&gw0)
                    .map(|(b, a)| (b - a) as f64 / 100.0)
                    .sum();
                println!(
                    "fanout cpu: gateways used {gw_cpu_s:.2} CPU-s: {:.0} deliveries per gateway CPU-second",
                    all.len() as f64 / gw_cpu_s.max(0.01)
                );
            }
            for (i, (b, a)) in redis1.iter().zip(&redis0).enumerate() {
                println!(
                    "fanout redis: server {} (pid {}) used {:.2} CPU-s = {:.1} µs per message",
                    i + 1,
                    redis_pids[i],
                    (b - a) as f64 / 100.0,
                    (b - a) as f64 * 10_000.0 / messages.max(1) as f64
                );
            }
            if all.len() != expected {
                bail!("lost deliveries: {} of {expected}", expected - all.len());
            }
        }
        Scenario::FanoutCost {
            subscribers,
            messages,
            rate,
            secret,
            pids,
            redis,
        } => {
            let c = FanoutCost {
                subscribers,
                messages,
                rate,
                secret,
                pids,
                redis,
            };
            fanout_cost(&cli.gateways, &topic, c).await?;
        }
        Scenario::JoinLatency {
            viewers,
            fill,
            expect,
            in_flight,
            secret,
            pids,
        } => {
            let j = JoinLatency {
                viewers,
                fill,
                expect,
                in_flight,
                secret,
                pids,
            };
            join_latency(&cli.gateways, &topic, j).await?;
        }
    }
    Ok(())
}

/// CPU time (user + system) of a process, in seconds (`/proc/<pid>/stat`, clock ticks of 10 ms).
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / 100.0)
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

struct FanoutCost {
    subscribers: usize,
    messages: usize,
    rate: u32,
    secret: String,
    pids: Vec<u32>,
    redis: String,
}

/// Opens and joins `n` anonymous sockets spread over the gateways, 64 at a time.
async fn joined(gateways: &[String], topic: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    let mut all = Vec::with_capacity(n);
    for start in (0..n).step_by(64) {
        let batch: Vec<_> = (start..(start + 64).min(n))
            .map(|k| {
                let addr = gateways[k % gateways.len()].clone();
                let topic = topic.to_string();
                tokio::spawn(async move {
                    let mut ws = open(&addr, None).await?;
                    join(&mut ws, &topic).await?;
                    Ok::<_, anyhow::Error>(ws)
                })
            })
            .collect();
        for h in batch {
            all.push(h.await??);
        }
    }
    Ok(all)
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

/// Redis's time executing the broadcasts, from `INFO commandstats` (reset before sending): with
/// history on, every broadcast is one `EVALSHA` whose time includes the `XADD` and `PUBLISH` it
/// runs; off, one `PUBLISH`. The few heartbeat scripts and probe publishes of the window are
/// included either way. Returns (usec, a summary of the counters).
async fn redis_broadcast_usec(
    conn: &mut redis::aio::MultiplexedConnection,
    messages: usize,
) -> anyhow::Result<(f64, String)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut stats = std::collections::HashMap::new();
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
    let mut rc = redis::Client::open(c.redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let socks = joined(gateways, topic, c.subscribers).await?;
    let epoch = Instant::now();
    let messages = c.messages;
    let mut tasks = Vec::with_capacity(c.subscribers);
    for mut ws in socks {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(messages);
            let deadline = tokio::time::sleep(Duration::from_secs(60));
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
    let gw_cpu = |pids: &[u32]| -> anyhow::Result<f64> {
        pids.iter().map(|p| process_cpu_seconds(*p)).sum()
    };
    // first the same time without messages: what the gateways and Redis use anyway (heartbeats,
    // probes, Redis's own timers) is taken off
    let phase = Duration::from_secs_f64(messages as f64 / c.rate.max(1) as f64);
    let (idle_gw0, idle_redis0) = (gw_cpu(&c.pids)?, redis_cpu_seconds(&mut rc).await?);
    tokio::time::sleep(phase).await;
    let idle_gw = gw_cpu(&c.pids)? - idle_gw0;
    let idle_redis = redis_cpu_seconds(&mut rc).await? - idle_redis0;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut rc)
        .await?;
    let cpu0 = gw_cpu(&c.pids)?;
    let redis0 = redis_cpu_seconds(&mut rc).await?;
    let t0 = Instant::now();
    let rate = c.rate.max(1);
    let publisher_task = paced_publisher(publisher, topic.to_string(), messages, rate, epoch);
    let mut all = Vec::with_capacity(c.subscribers * messages);
    for t in tasks {
        all.extend(t.await?);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = gw_cpu(&c.pids)?;
    let redis1 = redis_cpu_seconds(&mut rc).await?;
    let (cmd_usec, cmds) = redis_broadcast_usec(&mut rc, messages).await?;
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
    println!(
        "fanout cost: {} subscribers over {} gateway(s), {messages} messages at {rate}/s: delivered {}/{expected} in {wall:.2} s; gateway CPU {gw:.2} s (idle {idle_gw:.2} s taken off) = {per_cpu:.0} deliveries per CPU-second; Redis CPU {:.1} ms (idle {:.1} ms taken off) = {redis_us:.1} µs per message, of which executing the broadcast {cmd_us:.1} µs; latency p50 {:.2} ms, p99 {:.2} ms",
        c.subscribers,
        gateways.len(),
        all.len(),
        redis_cpu * 1000.0,
        idle_redis * 1000.0,
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
    );
    println!("redis commandstats while sending (calls/usec): {cmds}");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "fanout_cost", "subscribers": c.subscribers, "messages": messages,
            "rate": rate, "delivered": all.len(), "expected": expected,
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

struct JoinLatency {
    viewers: usize,
    fill: usize,
    expect: usize,
    in_flight: usize,
    secret: String,
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
    let cpu0: f64 = pids
        .iter()
        .map(|p| process_cpu_seconds(*p))
        .sum::<anyhow::Result<f64>>()?;
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
    let cpu = pids
        .iter()
        .map(|p| process_cpu_seconds(*p))
        .sum::<anyhow::Result<f64>>()?
        - cpu0;
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
