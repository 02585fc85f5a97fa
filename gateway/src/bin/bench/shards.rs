//! `bench shards`: does a Redis Cluster shard add capacity? Many rooms (`<room>-0` …, which must
//! exist), resident viewers spread over them and over the gateways (one signed-in publisher per
//! room, a share of the others signed in), then a steady mix for each `--rate` window: messages
//! in every room (round-robin), signed-in joins and leaves, anonymous churn. Before and after each
//! window every master's `INFO cpu` and `INFO commandstats` (and, with `--master-pid`, its context
//! switches from /proc) and the gateways' CPU are read; one JSON line per window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use fastwebsockets::{Frame, OpCode};
use tokio::sync::{mpsc, oneshot};

use crate::client::{Ws, hs256, open_and_join, send};
use crate::measure::{
    redis_commandstats, redis_cpu_seconds, rss_kib, thread_cpu_ns, thread_cpu_seconds,
};

#[derive(clap::Args)]
pub struct Shards {
    #[arg(long, default_value_t = 300)]
    rooms: usize,
    /// Resident viewers (the rooms' publishers included), spread evenly over rooms and gateways.
    #[arg(long, default_value_t = 3000)]
    viewers: usize,
    /// Share of the residents that are signed in (at least the one publisher per room).
    #[arg(long, default_value_t = 0.2)]
    signed_in: f64,
    /// Messages per second over all rooms, one window each.
    #[arg(long = "rate", default_values_t = [500, 1000, 2000])]
    rates: Vec<u32>,
    /// Seconds per rate window.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// A first window without messages (churn, heartbeats, probes only), in seconds; 0: none.
    #[arg(long, default_value_t = 10)]
    baseline: u64,
    /// Signed-in joins per second during every window, and as many leaves (the oldest).
    #[arg(long, default_value_t = 20)]
    signed_churn: u32,
    /// Anonymous joins per second, and as many leaves.
    #[arg(long, default_value_t = 100)]
    anon_churn: u32,
    #[arg(long, env = "GATEWAY_AUTH_HS256_SECRET")]
    secret: String,
    /// PID of each gateway, whose CPU and RSS are read.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Each master, `redis://host:port` (a plain connection for `INFO`).
    #[arg(long = "master", required = true)]
    masters: Vec<String>,
    /// PID of each master, in `--master` order: context switches from /proc.
    #[arg(long = "master-pid")]
    master_pids: Vec<u32>,
    /// Key prefix of the gateways (`redis.prefix`), to count the room records on each master.
    #[arg(long, default_value = "bench")]
    prefix: String,
}

/// `presence.heartbeat_interval_ms` as `scripts/bench.sh` leaves it (the default, 5 s): the
/// heartbeats each master should see are its rooms × gateways per interval.
const HEARTBEAT_S: f64 = 5.0;
/// Joins under way at most during a window: at 120 joins/s that is 2 s of joins waiting for replies
/// before the pacer holds back (a saturated machine, not the bench, is then the limit).
const JOINS_IN_FLIGHT: usize = 256;
/// Pushes queued per publisher: a room gets ~7 per second at 2,000 msg/s over 300 rooms, so a full
/// queue means its socket is stuck, and further pushes are counted as dropped, not queued.
const PUBLISH_QUEUE: usize = 256;

/// Frames the members have received: `new_msg` deliveries, and every text frame.
#[derive(Default)]
struct Seen {
    delivered: AtomicU64,
    frames: AtomicU64,
}

fn is_new_msg(payload: &[u8]) -> bool {
    payload.starts_with(b"[null,null,") && payload.windows(9).take(96).any(|w| w == b"\"new_msg\"")
}

/// A joined socket read by its own task (counting deliveries) until told to leave; a publisher
/// also sends one `new_msg` per token it is given.
struct Member {
    leave: oneshot::Sender<()>,
}

fn spawn_member(
    mut ws: Ws,
    topic: String,
    seen: Arc<Seen>,
    mut publish: Option<mpsc::Receiver<()>>,
) -> Member {
    let (leave, mut told) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut n = 1u64;
        loop {
            // fastwebsockets keeps a partly read frame in its buffer, so a cancelled read loses nothing
            tokio::select! {
                f = ws.read_frame() => match f {
                    Ok(f) if f.opcode == OpCode::Text => {
                        seen.frames.fetch_add(1, Ordering::Relaxed);
                        if is_new_msg(&f.payload) {
                            seen.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(f) if f.opcode == OpCode::Close => break,
                    Ok(_) => {}
                    Err(_) => break,
                },
                Some(()) = async { match publish.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                    n += 1;
                    let frame = serde_json::json!(["1", n.to_string(), &topic, "new_msg",
                        {"body": "hello there, a typical chat line of about fifty chars"}]);
                    if send(&mut ws, frame.to_string()).await.is_err() {
                        break;
                    }
                }
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
    });
    Member { leave }
}

/// One master's counters at one moment.
struct MasterSnap {
    cpu_s: f64,
    calls: HashMap<String, (f64, f64)>,
    ctxsw: u64,
}

fn ctx_switches(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(s.lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

struct Meter {
    conns: Vec<redis::aio::MultiplexedConnection>,
    master_pids: Vec<u32>,
    gw_pids: Vec<u32>,
}

impl Meter {
    async fn snap(&mut self) -> anyhow::Result<(Vec<MasterSnap>, Vec<HashMap<u64, u64>>)> {
        let mut out = Vec::with_capacity(self.conns.len());
        for (i, c) in self.conns.iter_mut().enumerate() {
            out.push(MasterSnap {
                cpu_s: redis_cpu_seconds(c).await?,
                calls: redis_commandstats(c).await?,
                ctxsw: match self.master_pids.get(i) {
                    Some(p) => ctx_switches(*p)?,
                    None => 0,
                },
            });
        }
        let gw = self
            .gw_pids
            .iter()
            .map(|p| thread_cpu_ns(&[*p]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((out, gw))
    }
}

/// Joins under way: the socket, its room index and whether it is signed in.
type Joining = tokio::task::JoinSet<anyhow::Result<(Ws, usize, bool)>>;

struct Crowd {
    gateways: Vec<String>,
    room: String,
    rooms: usize,
    secret: String,
    seen: Arc<Seen>,
    next: usize,
    joining: Joining,
    anon: VecDeque<Member>,
    signed: VecDeque<Member>,
    failed: u64,
}

impl Crowd {
    fn topic(&self, r: usize) -> String {
        format!("rooms:{}-{r}", self.room)
    }

    /// Starts one join: room `r`, the gateway `g`, signed in or not.
    fn start(&mut self, r: usize, g: usize, signed: bool) -> anyhow::Result<()> {
        let addr = self.gateways[g % self.gateways.len()].clone();
        let topic = self.topic(r);
        self.next += 1;
        let token = if signed {
            Some(hs256(&self.secret, &format!("shards-{}", self.next))?)
        } else {
            None
        };
        self.joining.spawn(async move {
            let (ws, _) = open_and_join(&addr, &topic, token.as_deref()).await?;
            Ok((ws, r, signed))
        });
        Ok(())
    }

    /// A churn join: rooms and gateways in a stride, so every room gets its share.
    fn start_churn(&mut self, signed: bool) -> anyhow::Result<()> {
        let r = (self.next * 7919) % self.rooms;
        let g = self.next;
        self.start(r, g, signed)
    }

    fn done(
        &mut self,
        res: Result<anyhow::Result<(Ws, usize, bool)>, tokio::task::JoinError>,
    ) -> bool {
        match res.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((ws, r, signed)) => {
                let m = spawn_member(ws, self.topic(r), self.seen.clone(), None);
                if signed {
                    self.signed.push_back(m)
                } else {
                    self.anon.push_back(m)
                }
                true
            }
            Err(e) => {
                self.failed += 1;
                if self.failed <= 3 {
                    eprintln!("shards: a join failed: {e:#}");
                }
                false
            }
        }
    }
}

pub async fn run(gateways: &[String], room: &str, c: Shards) -> anyhow::Result<()> {
    let mut conns = Vec::new();
    let mut rooms_on = Vec::new();
    for url in &c.masters {
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connect {url}"))?;
        // the room records this master holds (`<prefix>:room:{<room>-N}`, nothing after the tag)
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:room:{{{room}-*}}", c.prefix))
            .query_async(&mut conn)
            .await?;
        rooms_on.push(keys.len());
        conns.push(conn);
    }
    let mut meter = Meter {
        conns,
        master_pids: c.master_pids.clone(),
        gw_pids: c.pids.clone(),
    };
    let seen = Arc::new(Seen::default());
    let mut crowd = Crowd {
        gateways: gateways.to_vec(),
        room: room.to_string(),
        rooms: c.rooms.max(1),
        secret: c.secret.clone(),
        seen: seen.clone(),
        next: 0,
        joining: Joining::new(),
        anon: VecDeque::new(),
        signed: VecDeque::new(),
        failed: 0,
    };
    let rooms = crowd.rooms;

    // the publishers: one signed-in member per room, on the gateways in turn
    let t_fill = Instant::now();
    let mut publishers = Vec::with_capacity(rooms);
    let mut pending = tokio::task::JoinSet::new();
    for r in 0..rooms {
        let addr = gateways[r % gateways.len()].clone();
        let topic = crowd.topic(r);
        let token = hs256(&c.secret, &format!("shards-pub-{r}"))?;
        pending.spawn(async move {
            open_and_join(&addr, &topic, Some(&token))
                .await
                .map(|(ws, _)| (r, ws))
        });
        while pending.len() >= 64 {
            if let Some(d) = pending.join_next().await {
                publishers.push(d??);
            }
        }
    }
    while let Some(d) = pending.join_next().await {
        publishers.push(d??);
    }
    publishers.sort_by_key(|(r, _)| *r);
    let mut pub_tx = Vec::with_capacity(rooms);
    let mut pub_members = Vec::with_capacity(rooms);
    for (r, ws) in publishers {
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        pub_members.push(spawn_member(ws, crowd.topic(r), seen.clone(), Some(rx)));
        pub_tx.push(tx);
    }
    // the other residents: viewer i in room i % rooms, on gateway (i / rooms) + room, so every
    // room has members on every gateway
    let others = c.viewers.saturating_sub(rooms);
    let signed_others = ((c.viewers as f64 * c.signed_in) as usize).saturating_sub(rooms);
    let mut i = 0;
    while crowd.anon.len() + crowd.signed.len() < others {
        while i < others && crowd.joining.len() < 64 {
            crowd.start(i % rooms, i / rooms + i % rooms, i < signed_others)?;
            i += 1;
        }
        let Some(d) = crowd.joining.join_next().await else {
            break;
        };
        if !crowd.done(d) {
            anyhow::bail!("a resident's join failed");
        }
    }
    println!(
        "shards: {rooms} rooms over {} master(s) (room records per master: {rooms_on:?}), {} residents ({} signed in, publishers included) over {} gateway(s) in {:.1} s; churn {} signed-in and {} anonymous joins (and leaves) per second",
        c.masters.len(),
        rooms + others,
        rooms + signed_others,
        gateways.len(),
        t_fill.elapsed().as_secs_f64(),
        c.signed_churn,
        c.anon_churn
    );
    // the fill's anonymous batches, snapshots and presence diffs settle before the first window
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut windows: Vec<(u32, u64)> = Vec::new();
    if c.baseline > 0 {
        windows.push((0, c.baseline));
    }
    windows.extend(c.rates.iter().map(|r| (*r, c.seconds.max(1))));
    let mut next_room = 0usize;
    for (rate, secs) in windows {
        let (m0, g0) = meter.snap().await?;
        let (d0, f0) = (
            seen.delivered.load(Ordering::Relaxed),
            seen.frames.load(Ordering::Relaxed),
        );
        let (mut sent, mut dropped) = (0u64, 0u64);
        let (mut aj, mut sj, mut al, mut sl) = (0u64, 0u64, 0u64, 0u64);
        // every 5 ms: at 2,000 msg/s that is 10 pushes per look, smooth enough for 20 s windows
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let t0 = Instant::now();
        let run = Duration::from_secs(secs);
        loop {
            tokio::select! {
                _ = pace.tick() => {
                    let el = t0.elapsed();
                    if el >= run { break; }
                    let s = el.as_secs_f64();
                    while sent + dropped < (rate as f64 * s) as u64 {
                        match pub_tx[next_room % rooms].try_send(()) {
                            Ok(()) => sent += 1,
                            Err(_) => dropped += 1,
                        }
                        next_room += 1;
                    }
                    // joins are started on schedule; the oldest of each kind leaves as many
                    while aj < (c.anon_churn as f64 * s) as u64 && crowd.joining.len() < JOINS_IN_FLIGHT {
                        crowd.start_churn(false)?;
                        aj += 1;
                    }
                    while sj < (c.signed_churn as f64 * s) as u64 && crowd.joining.len() < JOINS_IN_FLIGHT {
                        crowd.start_churn(true)?;
                        sj += 1;
                    }
                    while al < aj.min((c.anon_churn as f64 * s) as u64) {
                        let Some(m) = crowd.anon.pop_front() else { break };
                        let _ = m.leave.send(());
                        al += 1;
                    }
                    while sl < sj.min((c.signed_churn as f64 * s) as u64) {
                        let Some(m) = crowd.signed.pop_front() else { break };
                        let _ = m.leave.send(());
                        sl += 1;
                    }
                }
                Some(d) = crowd.joining.join_next() => { crowd.done(d); }
            }
        }
        let (m1, g1) = meter.snap().await?;
        let dt = t0.elapsed().as_secs_f64();
        let msgs = sent as f64;
        let mut per_master = Vec::new();
        for (i, (a, b)) in m0.iter().zip(&m1).enumerate() {
            let cpu = b.cpu_s - a.cpu_s;
            let mut calls: Vec<(String, f64, f64)> = b
                .calls
                .iter()
                .map(|(n, (c1, u1))| {
                    let (c0, u0) = a.calls.get(n).copied().unwrap_or((0.0, 0.0));
                    (n.clone(), c1 - c0, u1 - u0)
                })
                .filter(|(n, c, _)| *c > 0.0 && n != "info")
                .collect();
            calls.sort_by(|x, y| y.1.total_cmp(&x.1));
            let total: f64 = calls.iter().map(|x| x.1).sum();
            let usec: f64 = calls.iter().map(|x| x.2).sum();
            let hb = rooms_on[i] as f64 * gateways.len() as f64 * dt / HEARTBEAT_S;
            per_master.push(serde_json::json!({
                "master": c.masters[i], "rooms": rooms_on[i], "cpu_s": cpu,
                "cpu_pct": cpu * 100.0 / dt,
                "cpu_us_per_msg": if msgs > 0.0 { cpu * 1e6 / msgs } else { 0.0 },
                "cmds_per_s": total / dt, "cmd_usec_per_s": usec / dt,
                "ctxsw_per_s": (b.ctxsw.saturating_sub(a.ctxsw)) as f64 / dt,
                "heartbeats_expected_per_s": hb / dt,
                "calls_per_s": calls.iter().take(14).map(|(n, c, u)| (n.clone(), serde_json::json!([c / dt, u / dt]))).collect::<serde_json::Map<_, _>>(),
            }));
        }
        let gw_cpu: Vec<f64> = g0
            .iter()
            .zip(&g1)
            .map(|(a, b)| thread_cpu_seconds(a, b))
            .collect();
        let gw_rss: Vec<f64> = c
            .pids
            .iter()
            .map(|p| rss_kib(*p).map(|k| k as f64 / 1024.0))
            .collect::<anyhow::Result<_>>()?;
        let redis_total: f64 = m0.iter().zip(&m1).map(|(a, b)| b.cpu_s - a.cpu_s).sum();
        let busiest = m0
            .iter()
            .zip(&m1)
            .map(|(a, b)| b.cpu_s - a.cpu_s)
            .fold(0.0, f64::max);
        let delivered = seen.delivered.load(Ordering::Relaxed) - d0;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "shards {} master(s), {rate} msg/s asked, {dt:.1} s: sent {:.0}/s ({dropped} dropped at the client), delivered {:.0}/s; churn {:.0}+{:.0} joins/s (anon+signed); Redis CPU total {:.1} % (busiest master {:.1} %, {:.1} µs/msg); per master {}; gateways CPU {}; load {}",
            c.masters.len(),
            msgs / dt,
            delivered as f64 / dt,
            aj as f64 / dt,
            sj as f64 / dt,
            redis_total * 100.0 / dt,
            busiest * 100.0 / dt,
            if msgs > 0.0 {
                busiest * 1e6 / msgs
            } else {
                0.0
            },
            per_master
                .iter()
                .map(|m| format!(
                    "{:.1} % {:.0} cmd/s",
                    m["cpu_pct"].as_f64().unwrap_or(0.0),
                    m["cmds_per_s"].as_f64().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(" | "),
            gw_cpu
                .iter()
                .map(|x| format!("{:.1} %", x * 100.0 / dt))
                .collect::<Vec<_>>()
                .join(" / "),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        println!(
            "{}",
            serde_json::json!({
                "scenario": "shards", "masters": c.masters.len(), "rate": rate, "seconds": dt,
                "rooms": rooms, "residents": rooms + others, "gateways": gateways.len(),
                "sent": sent, "dropped": dropped, "msgs_per_s": msgs / dt,
                "delivered": delivered, "frames": seen.frames.load(Ordering::Relaxed) - f0,
                "anon_joins": aj, "signed_joins": sj, "anon_leaves": al, "signed_leaves": sl,
                "join_failures": crowd.failed, "gateway_cpu_s": gw_cpu, "gateway_rss_mib": gw_rss,
                "redis_cpu_s": redis_total, "busiest_cpu_s": busiest, "per_master": per_master,
                "load": load.trim(),
            })
        );
    }
    for m in crowd
        .anon
        .drain(..)
        .chain(crowd.signed.drain(..))
        .chain(pub_members)
    {
        let _ = m.leave.send(());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
