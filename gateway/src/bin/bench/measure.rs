//! Measurement helpers every scenario shares: CPU readers (a process's `/proc` ticks, its
//! threads' exact schedstat time, Redis's `INFO cpu`), RSS, Redis's `INFO commandstats`, the paced
//! publisher whose message bodies carry their send time, percentiles and medians.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{Ws, send};

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The process's CPU time (user + system) in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // fields after the command name, which is in parentheses and may hold spaces
    let rest = s.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> { Ok(f.get(i).context("short stat")?.parse()?) };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name
    Ok(ticks(11)? + ticks(12)?)
}

/// CPU time (user + system) of a process, in seconds (`/proc/<pid>/stat`, clock ticks of 10 ms).
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / 100.0)
}

/// Time on CPU of every thread of the processes, in ns, by thread id
/// (`/proc/<pid>/task/<tid>/schedstat`): exact, where `/proc/<pid>/stat` counts in 10 ms steps,
/// which is too coarse for a window of a fraction of a second.
pub fn thread_cpu_ns(pids: &[u32]) -> anyhow::Result<HashMap<u64, u64>> {
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
pub fn thread_cpu_seconds(before: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// The CPU time of several processes together, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| process_cpu_seconds(*p)).sum()
}

/// Redis's own CPU time (`used_cpu_user + used_cpu_sys` of `INFO cpu`), in seconds.
pub async fn redis_cpu_seconds(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<f64> {
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

/// `INFO commandstats`: calls and microseconds per command name.
pub async fn redis_commandstats(
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

/// Sends `messages` `new_msg` pushes at `rate` per second, each body the send time (µs since
/// `epoch`), then keeps reading (replies, its own copies) until aborted.
pub fn paced_publisher(
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

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
