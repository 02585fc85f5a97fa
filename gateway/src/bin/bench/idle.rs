//! `bench idle`: memory per idle viewer (anonymous, or signed in with `--secret`): the gateway's
//! RSS before and after N viewers join one room, then, with `--idle-window`, its CPU while they sit.

use std::time::Duration;

use crate::client::{crowd, drain_in_background};
use crate::measure::{cpu_ticks, rss_kib};

#[derive(clap::Args)]
pub struct Idle {
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
}

pub async fn run(gateways: &[String], topic: &str, a: Idle) -> anyhow::Result<()> {
    let Idle {
        viewers,
        pid,
        secret,
        idle_window,
    } = a;
    let before = rss_kib(pid)?;
    let gw = vec![gateways[0].clone()];
    let (socks, _, took) = crowd(&gw, topic, viewers, secret.as_deref(), 64).await?;
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
    Ok(())
}
