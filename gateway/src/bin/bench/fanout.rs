//! `bench fanout`: broadcast latency to many subscribers: S anonymous subscribers spread over the
//! gateways, one signed-in publisher sends M `new_msg` at a fixed rate; every delivery's latency
//! (publish → receive) is recorded, and with `--gateway-pid` / `--redis-pid` the CPU they used.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use fastwebsockets::OpCode;

use crate::client::{crowd, hs256, join, open};
use crate::measure::{cpu_ticks, paced_publisher, percentile};

#[derive(clap::Args)]
pub struct Fanout {
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
}

pub async fn run(gateways: &[String], topic: &str, a: Fanout) -> anyhow::Result<()> {
    let Fanout {
        subscribers,
        messages,
        rate,
        secret,
        gateway_pids,
        redis_pids,
    } = a;
    let (socks, _, _) = crowd(gateways, topic, subscribers, None, 64).await?;
    let cpu =
        |pids: &[u32]| -> Vec<u64> { pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect() };
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
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&frame.payload) else {
                    continue;
                };
                // live broadcasts only (refs null), not a join's history frames
                if v[3] == "new_msg"
                    && v[0].is_null()
                    && let Some(sent) = v[4]["body"].as_str().and_then(|b| b.parse::<u64>().ok())
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
    let mut publisher = open(&gateways[0], Some(&token)).await?;
    join(&mut publisher, topic).await?;
    let publisher_drain = paced_publisher(publisher, topic.to_string(), messages, rate, epoch);
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
        gateways.len(),
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
    Ok(())
}
