//! The Redis side of presence: the [`Store`] that changes and reads a room's presence with one
//! Lua script call each (see `redis::scripts`, `lua/`), over the hot multiplexed connection with a
//! deadline, and the typed replies of those scripts, read out of their flat arrays. It never
//! writes to sockets: the published envelopes reach the [`super::Mirror`] through `fanout`.

use std::sync::Arc;

use crate::hooks::events::EventsHook;
use crate::metrics::script;
use crate::redis::keys::RoomKeys;
use crate::redis::scripts::Scripts;

use super::Snapshot;
use replies::{edges_at, flag_at, int_at, metas_at, taken_at};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within the deadline")]
    Timeout,
    /// One failure shared by several calls (a pipeline that failed as a whole).
    #[error("redis: {0}")]
    Shared(String),
    #[error("unexpected reply from a presence script: {0}")]
    Reply(String),
}

/// Result of `join.lua`.
#[derive(Debug)]
pub enum JoinReply {
    NoRoom,
    /// The user is banned from the room (its ban key exists): nothing was written.
    Banned,
    Joined {
        seq: u64,
        anon: u64,
        snapshot: Option<Snapshot>,
        /// The call found this node's own lease lapsed and swept its entries: re-assert (sync).
        lost: bool,
        /// This node's lease existed before the call (false: its first call in the room, or
        /// another node swept it — then its other entries there are gone too).
        had_lease: bool,
    },
}

/// Result of `leave.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveReply {
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    pub anon: u64,
    /// The call found this node's own lease lapsed and swept its entries: re-assert (sync).
    pub lost: bool,
    /// false: the room record is gone (the script wrote nothing and removed this node's entries).
    pub exists: bool,
    /// This node's lease existed before the call (see [`JoinReply::Joined::had_lease`]).
    pub had_lease: bool,
}

/// Result of `sync.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReply {
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    pub anon: u64,
    /// false: the room record is gone (nothing was written back into it).
    pub exists: bool,
}

/// Result of `heartbeat.lua` for one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// false: this node's lease had lapsed (its entries may be gone): re-assert with sync.
    pub had_lease: bool,
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    /// false: the room record is gone (the lease was not renewed).
    pub exists: bool,
}

/// Rooms per heartbeat pipeline: each chunk has its own deadline, so one slow batch does not
/// fail every room of the node.
const HEARTBEAT_CHUNK: usize = 200;

/// Timings every script call carries.
#[derive(Debug, Clone)]
pub struct Lease {
    pub node: String,
    pub lease_ms: u64,
    pub key_ttl_ms: u64,
}

/// Presence writes and reads, one script call each, over the shared multiplexed connection
/// (one round trip per call: no pool checkout on this path).
#[derive(Clone)]
pub struct Store {
    conn: crate::redis::Redis,
    scripts: Arc<Scripts>,
    lease: Arc<Lease>,
    timeout: std::time::Duration,
    metrics: crate::metrics::Metrics,
    /// Where the edges the scripts report go (`hooks.events_url`); `None`: the hook is off and
    /// the edges are ignored (the scripts keep the members hash either way).
    events: Option<Arc<EventsHook>>,
}

type Flat = Vec<redis::Value>;

impl Store {
    pub fn new(
        conn: crate::redis::Redis,
        scripts: Arc<Scripts>,
        lease: Lease,
        timeout: std::time::Duration,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            conn,
            scripts,
            lease: Arc::new(lease),
            timeout,
            metrics,
            events: None,
        }
    }

    /// Reports the events hook's edges of every script call to `hook`, and has the scripts keep
    /// them in each room's outbox until `hook` acknowledges them there (see `outbox.rs`).
    pub fn with_events(mut self, hook: Option<Arc<EventsHook>>) -> Self {
        if let Some(h) = &hook {
            h.attach_outbox(Arc::new(outbox::RoomOutbox::new(
                self.conn.clone(),
                self.timeout,
                self.metrics.clone(),
            )));
        }
        self.events = hook;
        self
    }

    /// The scripts' outbox flag: `1` when this node has an events hook (the scripts write its
    /// edges to the room's outbox and take over dead nodes' entries), `` (nothing) otherwise.
    fn outbox_flag(&self) -> &'static str {
        if self.events.is_some() { "1" } else { "" }
    }

    /// Hands the events hook's parts of a script's reply to the hook: the outbox entries the call
    /// took over (index `taken`; older, so first) and the edges it caused (index `i`), both kept
    /// in the room's outbox until acknowledged. An unreadable part is logged, never an error of
    /// the call: the change itself was made.
    fn report(&self, keys: &RoomKeys, v: &[redis::Value], (i, taken): (usize, usize)) {
        let Some(hook) = &self.events else {
            return;
        };
        let room = keys.room_id();
        for part in [taken_at(room, v, taken), edges_at(room, v, i)] {
            match part {
                Ok(events) => hook.report(&events, Some(&keys.unacked)),
                Err(e) => {
                    tracing::warn!(room, error = %e, "unreadable events in a script reply")
                }
            }
        }
    }

    /// The hot connection.
    pub fn redis(&self) -> &crate::redis::Redis {
        &self.conn
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let timer = self.metrics.script_timer(name);
        let r = tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await;
        timer.observe_duration();
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_error(name);
                Err(e.into())
            }
            Err(_) => {
                self.metrics.redis_error(name);
                Err(StoreError::Timeout)
            }
        }
    }

    /// A plain command on the hot connection, with the command deadline; failures are counted
    /// under `op` in `gateway_redis_errors_total`.
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_error(op);
                Err(e.into())
            }
            Err(_) => {
                self.metrics.redis_error(op);
                Err(StoreError::Timeout)
            }
        }
    }

    fn with_keys<'a>(inv: &mut redis::ScriptInvocation<'a>, keys: &RoomKeys) {
        for k in keys.all() {
            inv.key(k);
        }
    }

    /// `join.lua`: a signed-in connection (conn, meta) or `n` anonymous viewers (conn = "").
    /// `ban`: the joining user's ban key in this room (`gw:room:{R}:ban:<sub>`), checked in the
    /// same call, so a ban costs signed-in joins no extra round trip.
    pub async fn join(
        &self,
        keys: &RoomKeys,
        (conn, ban): (&str, Option<&str>),
        meta_or_count: &str,
        want_snapshot: bool,
    ) -> Result<JoinReply, StoreError> {
        let mut inv = self.scripts.join.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        if let Some(b) = ban {
            inv.key(b);
        }
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(conn)
            .arg(meta_or_count)
            .arg(if want_snapshot { "1" } else { "0" })
            .arg(self.outbox_flag());
        let v: Flat = self.run(script::JOIN, inv).await?;
        match int_at(&v, 0)? {
            0 => return Ok(JoinReply::NoRoom),
            2 => return Ok(JoinReply::Banned),
            _ => {}
        }
        self.report(keys, &v, (6, 7));
        let seq = int_at(&v, 1)?;
        let anon = int_at(&v, 2)?;
        let snapshot = if want_snapshot {
            Some(Snapshot {
                seq,
                anon,
                metas: metas_at(&v, 3)?,
            })
        } else {
            None
        };
        Ok(JoinReply::Joined {
            seq,
            anon,
            snapshot,
            lost: int_at(&v, 4)? == 1,
            had_lease: flag_at(&v, 5)?,
        })
    }

    /// `leave.lua`: a signed-in connection (conn) or `count` anonymous viewers (conn = "").
    /// `release_if_idle`: the node leaves the room; its lease goes too if it holds nothing there.
    pub async fn leave(
        &self,
        keys: &RoomKeys,
        conn: &str,
        count: u64,
        release_if_idle: bool,
    ) -> Result<LeaveReply, StoreError> {
        let mut inv = self.scripts.leave.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(conn)
            .arg(count)
            .arg(if release_if_idle { "1" } else { "0" })
            .arg(self.outbox_flag());
        let v: Flat = self.run(script::LEAVE, inv).await?;
        self.report(keys, &v, (5, 6));
        Ok(LeaveReply {
            seq: int_at(&v, 0)?,
            anon: int_at(&v, 1)?,
            lost: int_at(&v, 2)? == 1,
            exists: flag_at(&v, 3)?,
            had_lease: flag_at(&v, 4)?,
        })
    }

    /// `snapshot.lua`; `None` when the room does not exist.
    pub async fn snapshot(&self, keys: &RoomKeys) -> Result<Option<Snapshot>, StoreError> {
        let mut inv = self.scripts.snapshot.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(self.lease.key_ttl_ms)
            .arg(&self.lease.node)
            .arg(self.outbox_flag());
        let v: Flat = self.run(script::SNAPSHOT, inv).await?;
        if int_at(&v, 0)? == 0 {
            return Ok(None);
        }
        self.report(keys, &v, (4, 5));
        Ok(Some(Snapshot {
            seq: int_at(&v, 1)?,
            anon: int_at(&v, 2)?,
            metas: metas_at(&v, 3)?,
        }))
    }

    /// `sync.lua`: this node's truth in the room replaces what Redis holds for it.
    /// `anon = None` leaves the anonymous field alone (a batch is in flight).
    pub async fn sync(
        &self,
        keys: &RoomKeys,
        anon: Option<u64>,
        release: bool,
        metas: &[(String, String)],
    ) -> Result<SyncReply, StoreError> {
        let mut inv = self.scripts.sync.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(anon.map(|n| n.to_string()).unwrap_or_default())
            .arg(if release { "1" } else { "0" })
            .arg(self.outbox_flag());
        for (c, m) in metas {
            inv.arg(c).arg(m);
        }
        let v: Flat = self.run(script::SYNC, inv).await?;
        self.report(keys, &v, (3, 4));
        Ok(SyncReply {
            seq: int_at(&v, 0)?,
            anon: int_at(&v, 1)?,
            exists: flag_at(&v, 2)?,
        })
    }

    /// `heartbeat.lua` for many rooms, pipelined in chunks of [`HEARTBEAT_CHUNK`] that run side by
    /// side, each with its own deadline. Each entry: room keys and the anonymous count to re-assert
    /// (None: leave it alone). Returns one result per room, in order: a script error (`WRONGTYPE`
    /// on one room's keys) or a chunk's timeout fails only those rooms.
    pub async fn heartbeat(
        &self,
        rooms: &[(RoomKeys, Option<u64>)],
    ) -> Vec<Result<HeartbeatReply, StoreError>> {
        let timer = self.metrics.script_timer(script::HEARTBEAT);
        // one pipeline per master (a pipeline cannot span the slots of several masters), in
        // chunks; a standalone server is one master
        let groups = self
            .conn
            .group_by_shard(rooms.iter().map(|(k, _)| k.room.as_str()));
        let chunks = groups
            .iter()
            .flat_map(|g| g.chunks(HEARTBEAT_CHUNK))
            .map(|idx| self.heartbeat_chunk(rooms, idx));
        let mut out: Vec<Result<HeartbeatReply, StoreError>> =
            (0..rooms.len()).map(|_| Err(StoreError::Timeout)).collect();
        for part in futures_util::future::join_all(chunks).await {
            for (i, r) in part {
                out[i] = r;
            }
        }
        if out.iter().any(Result::is_err) {
            // a slot may have moved (failover, resharding): group by the current map next time
            let _ = self.conn.refresh_shards().await;
        }
        timer.observe_duration();
        for r in &out {
            if r.is_err() {
                self.metrics.redis_error(script::HEARTBEAT);
            }
        }
        out
    }

    /// One pipeline of heartbeats: the rooms `idx` of `rooms`, all on one master. Returns each
    /// room's index with its outcome.
    async fn heartbeat_chunk(
        &self,
        rooms: &[(RoomKeys, Option<u64>)],
        idx: &[usize],
    ) -> Vec<(usize, Result<HeartbeatReply, StoreError>)> {
        // outbox entries held longer than this are re-reported by the room's scanning node
        let stale_ms = self
            .events
            .as_ref()
            .map_or(0, |h| h.stale_after().as_millis() as u64);
        let pipe = |idx: &[usize]| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in idx {
                let (keys, anon) = &rooms[i];
                let mut inv = self.scripts.heartbeat.prepare_invoke();
                Self::with_keys(&mut inv, keys);
                inv.arg(&self.lease.node)
                    .arg(self.lease.lease_ms)
                    .arg(self.lease.key_ttl_ms)
                    .arg(anon.map(|n| n.to_string()).unwrap_or_default())
                    .arg(self.outbox_flag())
                    .arg(stale_ms);
                pipe.invoke_script(&inv);
            }
            pipe
        };
        let mut out: std::collections::HashMap<usize, Result<HeartbeatReply, StoreError>> =
            idx.iter().map(|&i| (i, Err(StoreError::Timeout))).collect();
        let mut todo: Vec<usize> = idx.to_vec();
        // a second round only for the scripts Redis did not know (restart, SCRIPT FLUSH,
        // a freshly promoted replica)
        for round in 0..2 {
            let mut conn = self.conn.clone();
            let replies: Vec<redis::RedisResult<Flat>> = match tokio::time::timeout(
                self.timeout,
                self.conn
                    .pipeline_on_shard(&pipe(&todo), &rooms[todo[0]].0.room),
            )
            .await
            {
                Ok(Ok(r)) => r
                    .into_iter()
                    .map(|v| {
                        v.extract_error()
                            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
                    })
                    .collect(),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    for &i in &todo {
                        out.insert(i, Err(StoreError::Shared(msg.clone())));
                    }
                    return out.into_iter().collect();
                }
                Err(_) => return out.into_iter().collect(),
            };
            let mut again = Vec::new();
            for (&i, r) in todo.iter().zip(replies) {
                match r {
                    Err(e)
                        if round == 0
                            && e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        again.push(i)
                    }
                    Err(e) => {
                        out.insert(i, Err(e.into()));
                    }
                    Ok(v) => {
                        self.report(&rooms[i].0, &v, (4, 5));
                        out.insert(
                            i,
                            (|| {
                                Ok(HeartbeatReply {
                                    had_lease: int_at(&v, 0)? == 1,
                                    seq: int_at(&v, 1)?,
                                    exists: flag_at(&v, 3)?,
                                })
                            })(),
                        );
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            if let Err(e) = self.scripts.load_all(&mut conn).await {
                let msg = e.to_string();
                for &i in &again {
                    out.insert(i, Err(StoreError::Shared(msg.clone())));
                }
                break;
            }
            todo = again;
        }
        out.into_iter().collect()
    }
}

mod outbox;
mod replies;

#[cfg(test)]
mod tests;
