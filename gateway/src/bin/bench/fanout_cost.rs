//! `bench fanout-cost`: `fanout` with the CPU the gateways and Redis used per delivery and message
//! (history on vs off: `scripts/bench.sh history`).

use std::time::{Duration, Instant};

use anyhow::bail;
use fastwebsockets::OpCode;

use crate::client::{hs256, join, joined, open};
use crate::measure::{
    cpu_seconds, paced_publisher, percentile, redis_commandstats, redis_cpu_seconds,
};

#[derive(clap::Args)]
pub struct FanoutCost {
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

/// The number in a live `new_msg` frame's `"body":"<digits>"` (the send time), without parsing
/// the whole frame: the bench shares the machine's cores with what it measures.
pub fn live_body_number(frame: &[u8]) -> Option<u64> {
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
pub async fn redis_broadcast_usec(
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

pub async fn run(gateways: &[String], topic: &str, c: FanoutCost) -> anyhow::Result<()> {
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
