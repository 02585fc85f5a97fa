//! `bench join-latency`: joins to a warm room that has history: latency of the reply and of the
//! last history frame (`rooms.history_on_join` 20 vs 0).

use std::time::{Duration, Instant};

use anyhow::bail;
use fastwebsockets::OpCode;

use crate::client::{drain_in_background, hs256, join, joined, open, send, until};
use crate::measure::{percentile, thread_cpu_ns, thread_cpu_seconds};

#[derive(clap::Args)]
pub struct JoinLatency {
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

pub async fn run(gateways: &[String], topic: &str, j: JoinLatency) -> anyhow::Result<()> {
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
