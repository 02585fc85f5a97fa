//! `bench joins`: anonymous connect+join throughput, `--in-flight` at a time (optionally to a
//! room that already has a member on every gateway, `--warm`): joins per second, reply latency
//! and the servers' CPU per join (`--pid`).

use std::time::Duration;

use crate::client::{crowd, drain_in_background, joined};
use crate::measure::{percentile, thread_cpu_ns, thread_cpu_seconds};

#[derive(clap::Args)]
pub struct Joins {
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
}

pub async fn run(gateways: &[String], topic: &str, a: Joins) -> anyhow::Result<()> {
    let Joins {
        viewers,
        in_flight,
        warm,
        pids,
    } = a;
    // one member per gateway URL, read until the end
    let holders = if warm {
        let h = joined(gateways, topic, gateways.len()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some(drain_in_background(h))
    } else {
        None
    };
    // the joins take a fraction of a second: the threads' exact CPU time
    let cpu0 = thread_cpu_ns(&pids)?;
    let (socks, mut lat, took) = crowd(gateways, topic, viewers, None, in_flight).await?;
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
    Ok(())
}
