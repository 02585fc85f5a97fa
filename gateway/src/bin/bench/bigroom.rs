//! `bench bigroom`: N signed-in users (one `sub` each) join one room over the gateways,
//! `--in-flight` at a time, and stay. Reports joins per second, the gateways' CPU per join (their
//! threads' exact time, the load generator excluded), Redis's CPU and script calls, the bytes of
//! each joiner's `presence_state` and the bytes each member received during the burst (diffs and
//! counts); then checks that presence is right everywhere: sampled members, which applied their
//! state and every diff as phoenix.js `Presence` does, and one fresh joiner per gateway must each
//! hold all N users with one meta each. With `--deflate` the sockets offer permessage-deflate
//! (the gateway must run with `server.compression`), and bytes are reported on the wire and
//! inflated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::client::{JOIN_TIMEOUT, hs256};
use crate::measure::{percentile, redis_commandstats, redis_cpu_seconds};
use crate::measure::{thread_cpu_ns, thread_cpu_seconds};
use crate::zclient::{CLOSE, TEXT, ZWs, open};

#[derive(clap::Args)]
pub struct BigRoom {
    /// Signed-in users (distinct `sub`s) that join the room.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Joins under way at once (a new one starts as soon as one has its `presence_state`).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Members that keep a full phoenix.js-style view of presence to check at the end (spread
    /// over the join order, the first and the last joiner included).
    #[arg(long, default_value_t = 32)]
    sample: usize,
    /// HS256 secret the gateways verify tokens with.
    #[arg(long)]
    secret: String,
    /// PID of each gateway process.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Redis URL for `INFO cpu` and `INFO commandstats`.
    #[arg(long)]
    redis: Option<String>,
    /// Prefix of the users' `sub`s (each run of a series should use its own room, not its own
    /// prefix: the prefix only names them).
    #[arg(long, default_value = "big")]
    user_prefix: String,
    /// Offer permessage-deflate, and require that the gateways accept it.
    #[arg(long)]
    deflate: bool,
}

/// What one member received after its join: bytes of `presence_state`, of everything after it,
/// and (for a sampled member) its presence view, phoenix.js style: key → refs.
#[derive(Default)]
struct Member {
    /// On the wire (compressed, with `--deflate`).
    state_bytes: AtomicU64,
    later_bytes: AtomicU64,
    /// Inflated: the JSON.
    state_plain: AtomicU64,
    later_plain: AtomicU64,
    later_frames: AtomicU64,
    /// The close code the gateway sent (0: still open).
    closed: std::sync::atomic::AtomicU32,
    view: Option<std::sync::Mutex<BTreeMap<String, Vec<String>>>>,
}

type View = BTreeMap<String, Vec<String>>;

fn refs(p: &Value) -> Vec<String> {
    p["metas"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["phx_ref"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// phoenix.js `Presence.syncDiff`: joins first (the new metas replace ones with the same ref),
/// then leaves (a key with no metas left goes).
fn apply_diff(view: &mut View, diff: &Value) {
    if let Some(joins) = diff["joins"].as_object() {
        for (k, p) in joins {
            let new = refs(p);
            let e = view.entry(k.clone()).or_default();
            e.retain(|r| !new.contains(r));
            e.extend(new);
        }
    }
    if let Some(leaves) = diff["leaves"].as_object() {
        for (k, p) in leaves {
            let gone = refs(p);
            if let Some(e) = view.get_mut(k) {
                e.retain(|r| !gone.contains(r));
                if e.is_empty() {
                    view.remove(k);
                }
            }
        }
    }
}

/// A joiner's socket, its `presence_state`'s size on the wire and inflated, its parsed view when
/// asked for, and the join's latency (µs).
type Joined = (ZWs, (u64, u64), Option<View>, u64);

/// Opens a signed-in socket, joins, waits for the reply and `presence_state`.
async fn join_one(
    addr: &str,
    topic: &str,
    token: &str,
    (parse, deflate): (bool, bool),
) -> anyhow::Result<Joined> {
    let t = Instant::now();
    tokio::time::timeout(JOIN_TIMEOUT, async {
        let mut ws = open(addr, Some(token), deflate).await?;
        if ws.deflate != deflate {
            bail!(
                "permessage-deflate offered: {deflate}, accepted: {}",
                ws.deflate
            );
        }
        ws.send(&serde_json::json!(["1", "1", topic, "phx_join", {}]).to_string())
            .await?;
        loop {
            let f = ws.read().await?;
            match f.opcode {
                TEXT => {}
                CLOSE => bail!("closed by the gateway"),
                _ => continue,
            }
            // only the frame's head is parsed on the hot path (a state can be a megabyte)
            let head = &f.payload[..f.payload.len().min(96)];
            let head = String::from_utf8_lossy(head);
            if head.contains("\"phx_reply\"") {
                let v: Value = serde_json::from_slice(&f.payload)?;
                if v[4]["status"] != "ok" {
                    bail!("join refused: {}", v[4]);
                }
            } else if head.contains("\"presence_state\"") {
                let n = (f.wire as u64, f.payload.len() as u64);
                let view = if parse {
                    let v: Value = serde_json::from_slice(&f.payload)?;
                    let mut view = View::new();
                    apply_diff(&mut view, &serde_json::json!({"joins": v[4], "leaves": {}}));
                    Some(view)
                } else {
                    None
                };
                return Ok((ws, n, view, t.elapsed().as_micros() as u64));
            }
        }
    })
    .await
    .with_context(|| {
        format!("no join reply and presence_state from {addr} within {JOIN_TIMEOUT:?}")
    })?
}

/// Reads a member's socket until it closes: counts bytes, applies diffs to a sampled view.
fn keep_reading(mut ws: ZWs, m: Arc<Member>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(f) = ws.read().await {
            if f.opcode == CLOSE {
                let code = match f.payload.get(..2) {
                    Some(c) => u32::from(u16::from_be_bytes([c[0], c[1]])),
                    None => 1005,
                };
                m.closed.store(code, Ordering::Relaxed);
                break;
            }
            if f.opcode != TEXT {
                continue;
            }
            m.later_bytes.fetch_add(f.wire as u64, Ordering::Relaxed);
            m.later_plain
                .fetch_add(f.payload.len() as u64, Ordering::Relaxed);
            m.later_frames.fetch_add(1, Ordering::Relaxed);
            if let Some(view) = &m.view
                && String::from_utf8_lossy(&f.payload[..f.payload.len().min(96)])
                    .contains("\"presence_diff\"")
                && let Ok(v) = serde_json::from_slice::<Value>(&f.payload)
                && let Ok(mut view) = view.lock()
            {
                apply_diff(&mut view, &v[4]);
            }
        }
    })
}

/// Whether a view holds exactly the users `expect`, one meta each (the anonymous `""` aside).
fn check_view(view: &View, expect: &BTreeSet<String>) -> Result<(), String> {
    let users: BTreeSet<&String> = view.keys().filter(|k| !k.is_empty()).collect();
    let missing = expect.iter().filter(|u| !users.contains(u)).count();
    let extra = users.iter().filter(|u| !expect.contains(**u)).count();
    let multi = view
        .iter()
        .filter(|(k, r)| !k.is_empty() && r.len() != 1)
        .count();
    if missing + extra + multi > 0 {
        return Err(format!(
            "{} users, {missing} missing, {extra} unexpected, {multi} with other than one meta",
            users.len()
        ));
    }
    Ok(())
}

pub async fn run(gateways: &[String], topic: &str, a: BigRoom) -> anyhow::Result<()> {
    let BigRoom {
        users,
        in_flight,
        sample,
        secret,
        pids,
        redis,
        user_prefix,
        deflate,
    } = a;
    let mut rconn = match &redis {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        None => None,
    };
    // tokens are minted before the clock starts
    let tokens: Vec<String> = (0..users)
        .map(|i| hs256(&secret, &format!("{user_prefix}-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let step = (users / sample.max(1)).max(1);
    let sampled = |i: usize| sample > 0 && (i.is_multiple_of(step) || i + 1 == users);
    let members: Vec<Arc<Member>> = (0..users)
        .map(|i| {
            Arc::new(Member {
                view: sampled(i).then(Default::default),
                ..Default::default()
            })
        })
        .collect();
    let (redis_cpu0, stats0) = match rconn.as_mut() {
        Some(c) => (
            Some(redis_cpu_seconds(c).await?),
            Some(redis_commandstats(c).await?),
        ),
        None => (None, None),
    };
    let cpu0 = thread_cpu_ns(&pids)?;
    let started = Instant::now();
    let mut readers = Vec::with_capacity(users);
    let mut lat = Vec::with_capacity(users);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while readers.len() < users {
        while next < users && pending.len() < in_flight.max(1) {
            let addr = gateways[next % gateways.len()].clone();
            let (topic, token, i) = (topic.to_string(), tokens[next].clone(), next);
            let parse = members[i].view.is_some();
            pending.spawn(async move {
                let r = join_one(&addr, &topic, &token, (parse, deflate)).await;
                (i, r)
            });
            next += 1;
        }
        let Some(done) = pending.join_next().await else {
            break;
        };
        let (i, r) = done?;
        let (ws, (state_bytes, state_plain), view, us) = r.with_context(|| format!("user {i}"))?;
        let m = &members[i];
        m.state_bytes.store(state_bytes, Ordering::Relaxed);
        m.state_plain.store(state_plain, Ordering::Relaxed);
        if let (Some(v), Some(held)) = (view, &m.view)
            && let Ok(mut held) = held.lock()
        {
            // diffs read before the state was handed over are none: the reader starts now
            *held = v;
        }
        readers.push(keep_reading(ws, m.clone()));
        lat.push(us);
    }
    let took = started.elapsed();
    // the burst's last diffs: wait until every sampled view holds everyone (or 30 s)
    let expect: BTreeSet<String> = (0..users).map(|i| format!("{user_prefix}-{i}")).collect();
    let settle_until = Instant::now() + Duration::from_secs(30);
    loop {
        let all = members.iter().filter_map(|m| m.view.as_ref()).all(|v| {
            v.lock()
                .map(|v| check_view(&v, &expect).is_ok())
                .unwrap_or(false)
        });
        if all || Instant::now() >= settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // one more diff interval and count interval for stragglers, then the meters
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let settled = started.elapsed();
    let cpu = thread_cpu_seconds(&cpu0, &thread_cpu_ns(&pids)?);
    let (redis_cpu, script_calls) = match (rconn.as_mut(), redis_cpu0, stats0) {
        (Some(c), Some(c0), Some(s0)) => {
            let s1 = redis_commandstats(c).await?;
            let calls = |s: &std::collections::HashMap<String, (f64, f64)>| {
                ["evalsha", "eval", "fcall"]
                    .iter()
                    .filter_map(|k| s.get(*k).map(|v| v.0))
                    .sum::<f64>()
            };
            (
                Some(redis_cpu_seconds(c).await? - c0),
                Some(calls(&s1) - calls(&s0)),
            )
        }
        _ => (None, None),
    };
    // the checks: every sampled member, then a fresh joiner per gateway
    let mut failures = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if let Some(v) = &m.view {
            let v = v.lock().map_err(|_| anyhow::anyhow!("poisoned view"))?;
            if let Err(e) = check_view(&v, &expect) {
                failures.push(format!("member {i}: {e}"));
            }
        }
    }
    let checked_members = members.iter().filter(|m| m.view.is_some()).count();
    // a member the gateway closed (slow consumer, idle timeout) left the room: the views are then
    // rightly short of it, and the run is not the one asked for
    let mut closes: BTreeMap<u32, usize> = BTreeMap::new();
    for m in &members {
        let c = m.closed.load(Ordering::Relaxed);
        if c != 0 {
            *closes.entry(c).or_default() += 1;
        }
    }
    if !closes.is_empty() {
        failures.insert(
            0,
            format!("members closed by the gateway (code: count): {closes:?}"),
        );
    }
    for (g, addr) in gateways.iter().enumerate() {
        let token = hs256(&secret, &format!("{user_prefix}-fresh-{g}"))?;
        let (ws, _, view, _) = join_one(addr, topic, &token, (true, deflate)).await?;
        let view = view.unwrap_or_default();
        let mut view_without_me = view.clone();
        view_without_me.remove(&format!("{user_prefix}-fresh-{g}"));
        // a fresh joiner from an earlier gateway may be listed too
        view_without_me.retain(|k, _| !k.starts_with(&format!("{user_prefix}-fresh-")));
        if let Err(e) = check_view(&view_without_me, &expect) {
            failures.push(format!("fresh joiner on gateway {g}: {e}"));
        }
        drop(ws);
    }
    let state: Vec<u64> = members
        .iter()
        .map(|m| m.state_bytes.load(Ordering::Relaxed))
        .collect();
    let later: Vec<u64> = members
        .iter()
        .map(|m| m.later_bytes.load(Ordering::Relaxed))
        .collect();
    let state_plain: Vec<u64> = members
        .iter()
        .map(|m| m.state_plain.load(Ordering::Relaxed))
        .collect();
    let later_plain: Vec<u64> = members
        .iter()
        .map(|m| m.later_plain.load(Ordering::Relaxed))
        .collect();
    let frames: u64 = members
        .iter()
        .map(|m| m.later_frames.load(Ordering::Relaxed))
        .sum();
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    lat.sort_unstable();
    let per_s = users as f64 / took.as_secs_f64();
    let cpu_ms_per_join = cpu * 1e3 / users as f64;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "bigroom: {users} signed-in users joined one room over {} gateway(s) in {:.2} s = {per_s:.0} joins/s ({in_flight} in flight); join → presence_state p50 {:.1} ms, p99 {:.1} ms",
        gateways.len(),
        took.as_secs_f64(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
    );
    println!(
        "bigroom: gateway CPU {cpu:.2} s over {:.1} s (until settled) = {cpu_ms_per_join:.3} ms per join{}",
        settled.as_secs_f64(),
        match (redis_cpu, script_calls) {
            (Some(c), Some(n)) => format!("; Redis CPU {c:.2} s, {n:.0} script calls"),
            _ => String::new(),
        }
    );
    println!(
        "bigroom: presence_state per joiner avg {:.0} bytes, last {} bytes; received per member after its join avg {:.0} bytes, first joiner {} bytes; {frames} frames in all{}",
        avg(&state),
        state.last().copied().unwrap_or(0),
        avg(&later),
        later.first().copied().unwrap_or(0),
        if deflate {
            format!(
                " (on the wire, compressed; inflated: presence_state avg {:.0} bytes, per member after its join avg {:.0} bytes)",
                avg(&state_plain),
                avg(&later_plain)
            )
        } else {
            String::new()
        }
    );
    let ok = failures.is_empty();
    println!(
        "bigroom: presence check ({checked_members} sampled members, {} fresh joiners): {}",
        gateways.len(),
        if ok {
            "every view holds all users".to_string()
        } else {
            failures.join("; ")
        }
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "bigroom", "users": users, "in_flight": in_flight,
            "gateways": gateways.len(), "seconds": took.as_secs_f64(), "joins_per_s": per_s,
            "p50_ms": ms(percentile(&lat, 0.5)), "p99_ms": ms(percentile(&lat, 0.99)),
            "gateway_cpu_s": cpu, "gateway_cpu_ms_per_join": cpu_ms_per_join,
            "redis_cpu_s": redis_cpu, "script_calls": script_calls,
            "state_bytes_avg": avg(&state), "state_bytes_last": state.last(),
            "member_bytes_avg": avg(&later), "member_bytes_first": later.first(),
            "deflate": deflate, "state_plain_bytes_avg": avg(&state_plain),
            "member_plain_bytes_avg": avg(&later_plain),
            "frames_after_join": frames, "checked_members": checked_members,
            "closed_by_gateway": closes.values().sum::<usize>(),
            "presence_ok": ok,
        })
    );
    for r in readers {
        r.abort();
    }
    if !ok {
        bail!("presence check failed");
    }
    Ok(())
}
