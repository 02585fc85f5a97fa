//! `bench redis-broadcast`: what one room broadcast costs Redis alone — no gateway — in four
//! shapes, so the price of history can be split into its parts:
//!
//! * `publish`  — `PUBLISH` of the frame: history off (`rooms.history_len = 0`).
//! * `script`   — `EVALSHA lua/publish.lua`: history on, as the gateway sends it (the `XADD` and
//!   the `PUBLISH` of the frame with its stream id, in one atomic call).
//! * `pipeline` — `XADD` and `PUBLISH` sent together in one write, no script: not atomic and the
//!   frame has no id, so not a way to build history (DESIGN §9), but the least any design that
//!   appends each broadcast to a stream can cost.
//! * `multi`    — the same two commands inside `MULTI`/`EXEC`: atomic, still no id in the frame.
//!
//! One connection sends the calls one after the other, each waiting for its reply (as a node sends
//! one client push), to a room channel with two subscribers (two gateways). Per call: Redis's
//! process CPU (`INFO cpu`: command execution, parsing, and the socket reads and writes to the
//! caller and the subscribers) and command time (`INFO commandstats` of the top-level commands).
//! The shapes take turns within each run, in alternating order. Prints one JSON line per shape
//! and run, then a summary.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;

#[derive(clap::Args)]
pub struct RedisBroadcast {
    /// Redis URL (a private server: its statistics are reset, and keys `hr:room:{r}*` written).
    #[arg(long)]
    redis: String,
    /// Calls per shape and run.
    #[arg(long, default_value_t = 30_000)]
    calls: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Calls per second (0: each as soon as the last is answered). Paced calls find Redis idle
    /// and its caches cold, as a room's messages do at a chat's pace.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Also measure `lua/publish.lua`-like variants: `name=path` of a script taking the same
    /// KEYS and ARGV (experiments; repeatable).
    #[arg(long = "variant")]
    variants: Vec<String>,
}

const ROOM: &str = "hr:room:{r}";
const HISTORY: &str = "hr:room:{r}:history";
const CHANNEL: &str = "hr:room:{r}:events";
const HEAD: &str = r#"[null,null,"rooms:r","new_msg","#;
/// A typical chat message (119 bytes), as the gateway stores it.
const PAYLOAD: &str = r#"{"at":1795860262969,"body":"hello there, a typical chat line of about fifty chars","user":{"id":"42","username":"ann"}}"#;

/// One way of sending a broadcast: its name, the `commandstats` names whose time is the
/// broadcast's (commands run by a script or an `EXEC` are counted again under their own names,
/// so only the top level is summed), and the request.
struct Shape {
    name: String,
    top_level: &'static [&'static str],
    request: redis::Pipeline,
}

/// `EVALSHA` of a publish script, with the KEYS and ARGV `lua/publish.lua` takes.
fn evalsha(sha: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("EVALSHA")
        .arg(sha)
        .arg(3)
        .arg(ROOM)
        .arg(HISTORY)
        .arg(CHANNEL)
        .arg("PUBLISH")
        .arg(100)
        .arg(HEAD)
        .arg("new_msg")
        .arg(PAYLOAD);
    pipe
}

pub async fn run(c: RedisBroadcast) -> anyhow::Result<()> {
    let client = redis::Client::open(c.redis.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut meter = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL")
        .arg(ROOM)
        .arg(HISTORY)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("HSET")
        .arg(ROOM)
        .arg("name")
        .arg("r")
        .query_async(&mut conn)
        .await?;

    let frame = format!("{HEAD}{PAYLOAD}]");
    let mut publish = redis::pipe();
    publish.cmd("PUBLISH").arg(CHANNEL).arg(&frame);
    let mut pipeline = redis::pipe();
    pipeline
        .cmd("XADD")
        .arg(HISTORY)
        .arg("MAXLEN")
        .arg("~")
        .arg(100)
        .arg("*")
        .arg("event")
        .arg("new_msg")
        .arg("payload")
        .arg(PAYLOAD)
        .cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(&frame);
    let mut multi = pipeline.clone();
    multi.atomic();
    let mut shapes = vec![
        Shape {
            name: "publish".into(),
            top_level: &["publish"],
            request: publish,
        },
        Shape {
            name: "script".into(),
            top_level: &["evalsha"],
            request: evalsha(&load(&mut conn, gateway::redis::scripts::PUBLISH_LUA).await?),
        },
        Shape {
            name: "pipeline".into(),
            top_level: &["xadd", "publish"],
            request: pipeline,
        },
        Shape {
            name: "multi".into(),
            top_level: &["multi", "exec"],
            request: multi,
        },
    ];
    for v in &c.variants {
        let (name, path) = v.split_once('=').context("--variant takes name=path")?;
        let source = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        shapes.push(Shape {
            name: name.to_string(),
            top_level: &["evalsha"],
            request: evalsha(&load(&mut conn, &source).await?),
        });
    }

    // two subscribers, as two gateways; each drains what it gets
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut sub = client.get_async_pubsub().await?;
        sub.subscribe(CHANNEL).await?;
        subscribers.push(tokio::spawn(async move {
            let mut messages = sub.into_on_message();
            while messages.next().await.is_some() {}
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // warm up every shape (the script cache, the stream at its cap, the allocator)
    for shape in &shapes {
        for _ in 0..1000 {
            let _: redis::Value = shape.request.query_async(&mut conn).await?;
        }
    }

    // (shape index, CPU µs, command µs) per shape and run
    let mut rows: Vec<(usize, f64, f64)> = Vec::new();
    for run in 1..=c.runs {
        let mut order: Vec<usize> = (0..shapes.len()).collect();
        if run % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let shape = &shapes[i];
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut meter)
                .await?;
            let cpu0 = crate::measure::redis_cpu_seconds(&mut meter).await?;
            let mut pace = (c.rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / c.rate as f64));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            for _ in 0..c.calls {
                if let Some(t) = pace.as_mut() {
                    t.tick().await;
                }
                let _: redis::Value = shape.request.query_async(&mut conn).await?;
            }
            let cpu1 = crate::measure::redis_cpu_seconds(&mut meter).await?;
            let stats = crate::measure::redis_commandstats(&mut meter).await?;
            let usec: f64 = shape
                .top_level
                .iter()
                .map(|n| stats.get(*n).map(|s| s.1).unwrap_or(0.0))
                .sum();
            let calls = c.calls as f64;
            let (cpu_us, command_us) = ((cpu1 - cpu0) * 1e6 / calls, usec / calls);
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "redis_broadcast", "shape": shape.name, "run": run,
                    "calls": c.calls, "rate": c.rate, "cpu_us": cpu_us, "command_us": command_us,
                })
            );
            rows.push((i, cpu_us, command_us));
        }
    }

    let of = |i: usize, pick: fn(&(usize, f64, f64)) -> f64| -> Vec<f64> {
        rows.iter().filter(|r| r.0 == i).map(pick).collect()
    };
    let base = crate::measure::median(&of(0, |r| r.1));
    for (i, shape) in shapes.iter().enumerate() {
        let cpu = of(i, |r| r.1);
        let m = crate::measure::median(&cpu);
        let runs: Vec<String> = cpu.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "redis-broadcast {:10} Redis CPU {m:6.2} µs per broadcast ({:.3}× publish) [{}], command time {:5.2} µs (medians of {})",
            shape.name,
            m / base,
            runs.join(" "),
            crate::measure::median(&of(i, |r| r.2)),
            c.runs
        );
    }

    let _: () = redis::cmd("DEL")
        .arg(ROOM)
        .arg(HISTORY)
        .query_async(&mut conn)
        .await?;
    for s in subscribers {
        s.abort();
    }
    Ok(())
}

/// `SCRIPT LOAD`: the script's SHA.
async fn load(
    conn: &mut redis::aio::MultiplexedConnection,
    source: &str,
) -> anyhow::Result<String> {
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(source)
        .query_async(conn)
        .await
        .context("SCRIPT LOAD")?;
    Ok(sha)
}
