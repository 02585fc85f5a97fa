//! `bench churn`: a room of N anonymous viewers over the gateways, then R joins and R leaves per
//! second for a while; every few seconds the gateways' CPU and RSS, Redis's commands per second
//! and CPU, and the open sockets, then whether they stayed flat.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fastwebsockets::Frame;

use crate::client::{Ws, open_and_join};
use crate::measure::{
    median, percentile, process_cpu_seconds, redis_commandstats, redis_cpu_seconds, rss_kib,
    thread_cpu_ns, thread_cpu_seconds,
};

#[derive(clap::Args)]
pub struct Churn {
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
pub type Joining = tokio::task::JoinSet<anyhow::Result<(Ws, u64)>>;

/// One joined socket of the churn, read by its own task until it is told to leave (or this is
/// dropped). Leaving is a close frame, then a wait for the server's close: the server ends the
/// TCP connection first, so the client's ports do not pile up in TIME_WAIT at 1,000 a second.
pub struct Member {
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
pub struct Sample {
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
pub struct Sampler {
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

/// How much a series moved: the median of its last third against that of its first third.
/// Flat: within ±20 %.
pub const FLAT_WITHIN: f64 = 0.20;
/// A CPU series (`_pct`, % of one core) also counts as flat within ±2 points: a few % of a core
/// moves that much from one 5 s sample to the next on a shared machine.
pub const FLAT_CPU_POINTS: f64 = 2.0;

pub fn series_summary(name: &str, v: &[f64]) -> (serde_json::Value, bool, String) {
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

pub async fn run(gateways: &[String], topic: &str, c: Churn) -> anyhow::Result<()> {
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
