//! The room catalogue in Redis: create, list, inspect and delete room records (`<p>:room:{R}`).
//! Cold paths only (CLI, admin API): they use the pool, never the hot connection. In a cluster,
//! listings scan every master.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;

use crate::redis::keys::Keys;
use crate::redis::{Pool, PoolError};
use crate::rooms::{Access, RoomId};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("room {0} already exists")]
    Exists(RoomId),
    #[error("room {0} does not exist")]
    Missing(RoomId),
}

/// Milliseconds since the Unix epoch as ISO 8601 in UTC, `2026-12-07T03:03:33.123Z` (for the
/// CLI; proleptic Gregorian calendar, Howard Hinnant's `civil_from_days`).
pub fn iso8601_utc(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoomRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// `public` or `private` (see [`Access`]).
    pub access: &'static str,
}

/// How long an admin kick or disconnect waits for every node's answer. Nodes answer within a
/// command deadline; a subscriber that is not a gateway (someone's `redis-cli SUBSCRIBE`) never
/// answers, so the call returns what it has after this.
const ANSWERS_WAIT: Duration = Duration::from_secs(2);
/// How often the reply list is read while answers are missing.
const ANSWERS_POLL: Duration = Duration::from_millis(20);

/// Presence of a room as Redis holds it (all nodes).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoomPresence {
    pub room: String,
    /// (user id, username, connections)
    pub users: Vec<PresenceUser>,
    pub anonymous: u64,
    /// node id → anonymous viewers on it
    pub anonymous_by_node: HashMap<String, u64>,
    /// node id → lease expiry (ms since epoch, Redis clock)
    pub leases: HashMap<String, i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PresenceUser {
    pub id: String,
    pub username: String,
    pub connections: usize,
}

/// One broadcast of a room's history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistoryEvent {
    /// The stream id (also the payload's `"id"`).
    pub id: String,
    pub event: String,
    pub payload: serde_json::Value,
}

pub struct Catalog {
    pool: Pool,
    keys: Keys,
}

impl Catalog {
    pub fn new(pool: Pool, keys: Keys) -> Self {
        Self { pool, keys }
    }

    pub async fn create(
        &self,
        id: &RoomId,
        name: Option<&str>,
        access: Access,
    ) -> Result<RoomRecord, CatalogError> {
        let mut c = self.pool.get().await?;
        let key = self.keys.room_record(id);
        let created: bool = c.hset_nx(&key, "created_at", crate::unix_ms()).await?;
        if !created {
            return Err(CatalogError::Exists(id.clone()));
        }
        let _: () = c
            .hset_multiple(
                &key,
                &[
                    ("name", name.unwrap_or(id.as_str())),
                    ("access", access.as_str()),
                ],
            )
            .await?;
        self.get(id)
            .await?
            .ok_or_else(|| CatalogError::Missing(id.clone()))
    }

    pub async fn get(&self, id: &RoomId) -> Result<Option<RoomRecord>, CatalogError> {
        let mut c = self.pool.get().await?;
        let h: HashMap<String, String> = c.hgetall(self.keys.room_record(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(RoomRecord {
            id: id.to_string(),
            name: h.get("name").cloned().unwrap_or_else(|| id.to_string()),
            created_at: h
                .get("created_at")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            access: Access::parse(h.get("access").map(String::as_str)).as_str(),
        }))
    }

    /// Every room record, found with `SCAN` (never `KEYS`), sorted by id.
    pub async fn list(&self) -> Result<Vec<RoomRecord>, CatalogError> {
        let mut c = self.pool.get().await?;
        let mut ids: Vec<RoomId> = c
            .scan_match(&self.keys.room_record_pattern())
            .await?
            .iter()
            .filter_map(|k| self.keys.room_of_record(k))
            .collect();
        drop(c);
        ids.sort();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.get(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Deletes the record, the room's presence keys (its events outbox too: a deleted room's
    /// unsent events are not posted) and its history; tells every node to close
    /// the room's channels (a `{"deleted":true}` control message on the room's channel).
    pub async fn delete(&self, id: &RoomId) -> Result<(), CatalogError> {
        let mut c = self.pool.get().await?;
        let k = self.keys.room(id);
        let n: i64 = redis::cmd("DEL")
            .arg(&k.room)
            .arg(&k.presence)
            .arg(&k.anon)
            .arg(&k.nodes)
            .arg(&k.seq)
            .arg(&k.members)
            .arg(&k.unacked)
            .arg(&k.history)
            .query_async(&mut c)
            .await?;
        let _: i64 = redis::cmd(c.publish_command())
            .arg(&k.events)
            .arg(r#"{"deleted":true}"#)
            .query_async(&mut c)
            .await?;
        if n == 0 {
            return Err(CatalogError::Missing(id.clone()));
        }
        Ok(())
    }

    /// Kicks user `sub` from the room on every node (see `fanout/moderation.rs`), after setting
    /// the ban first when `ban_s` > 0 (so a rejoin racing the kick is refused). Returns how many
    /// channels were closed, summed from every node's answer.
    pub async fn kick(&self, id: &RoomId, sub: &str, ban_s: u64) -> Result<u64, CatalogError> {
        if self.get(id).await?.is_none() {
            return Err(CatalogError::Missing(id.clone()));
        }
        if ban_s > 0 {
            self.ban(&self.keys.room_ban(id, sub), ban_s).await?;
        }
        let msg = |reply: &str| serde_json::json!({"kick": sub, "reply": reply}).to_string();
        self.order(&self.keys.events(id), msg).await
    }

    /// Closes every socket of user `sub` on every node with 4003, after setting the user's ban
    /// first when `ban_s` > 0. Returns how many sockets were closed, summed from every node's
    /// answer.
    pub async fn disconnect(&self, sub: &str, ban_s: u64) -> Result<u64, CatalogError> {
        if ban_s > 0 {
            self.ban(&self.keys.user_ban(sub), ban_s).await?;
        }
        let msg = |reply: &str| serde_json::json!({"disconnect": sub, "reply": reply}).to_string();
        self.order(&self.keys.control(), msg).await
    }

    async fn ban(&self, key: &str, ban_s: u64) -> Result<(), CatalogError> {
        let mut c = self.pool.get().await?;
        let _: () = c.set_ex(key, "1", ban_s).await?;
        Ok(())
    }

    /// Publishes an order on `channel` and sums the answers. `PUBLISH` says how many subscribers
    /// got it (every node subscribed there); each node pushes its count onto the reply list, and
    /// the call waits until that many answers are in, or [`ANSWERS_WAIT`].
    async fn order(
        &self,
        channel: &str,
        msg: impl Fn(&str) -> String,
    ) -> Result<u64, CatalogError> {
        let mut c = self.pool.get().await?;
        let reply = self.keys.reply(&format!("{:016x}", rand::random::<u64>()));
        let receivers: usize = redis::cmd(c.publish_command())
            .arg(channel)
            .arg(msg(&reply))
            .query_async(&mut c)
            .await?;
        let until = tokio::time::Instant::now() + ANSWERS_WAIT;
        let mut answers: Vec<u64> = Vec::new();
        if receivers > 0 {
            loop {
                answers = c.lrange(&reply, 0, -1).await?;
                if answers.len() >= receivers || tokio::time::Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(ANSWERS_POLL).await;
            }
        }
        let _: () = c.del(&reply).await?;
        Ok(answers.iter().sum())
    }

    /// The room's newest `last` broadcasts from its history stream, oldest first, each with its
    /// payload as clients got it (the stream id as `"id"`).
    pub async fn history(
        &self,
        id: &RoomId,
        last: usize,
    ) -> Result<Vec<HistoryEvent>, CatalogError> {
        let mut c = self.pool.get().await?;
        let k = self.keys.room(id);
        let rows: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XREVRANGE")
            .arg(&k.history)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(last)
            .query_async(&mut c)
            .await?;
        let mut out: Vec<HistoryEvent> = rows
            .into_iter()
            .filter_map(|(sid, fields)| {
                let event = String::from_utf8(fields.get("event")?.clone()).ok()?;
                let payload = crate::history::with_id(fields.get("payload")?, &sid);
                Some(HistoryEvent {
                    payload: serde_json::from_slice(&payload).ok()?,
                    id: sid,
                    event,
                })
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Presence as stored in Redis (read-only: lapsed leases are reported, not swept).
    pub async fn presence(&self, id: &RoomId) -> Result<RoomPresence, CatalogError> {
        let mut c = self.pool.get().await?;
        let k = self.keys.room(id);
        let metas: HashMap<String, String> = c.hgetall(&k.presence).await?;
        let anon: HashMap<String, u64> = c.hgetall(&k.anon).await?;
        let leases: Vec<(String, f64)> = c.zrange_withscores(&k.nodes, 0, -1).await?;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
        let now = secs * 1000 + micros / 1000;
        let live: HashMap<String, i64> = leases.into_iter().map(|(n, s)| (n, s as i64)).collect();
        let is_live = |node: &str| live.get(node).is_some_and(|exp| *exp > now);
        let mut users: HashMap<String, PresenceUser> = HashMap::new();
        for (conn, meta) in &metas {
            let node = conn.rsplit_once('.').map(|(n, _)| n).unwrap_or("");
            if !is_live(node) {
                continue;
            }
            if let Ok(m) = serde_json::from_str::<crate::presence::Meta>(meta) {
                users
                    .entry(m.user_id.clone())
                    .or_insert_with(|| PresenceUser {
                        id: m.user_id.clone(),
                        username: m.username.clone(),
                        connections: 0,
                    })
                    .connections += 1;
            }
        }
        let mut users: Vec<PresenceUser> = users.into_values().collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        let anonymous = anon
            .iter()
            .filter(|(n, _)| is_live(n))
            .map(|(_, v)| *v)
            .sum();
        Ok(RoomPresence {
            room: id.to_string(),
            users,
            anonymous,
            anonymous_by_node: anon,
            leases: live,
        })
    }

    /// Live gateway processes: the `<p>:node:<id>` records (each expires one TTL after its node
    /// stops refreshing it).
    pub async fn nodes(&self) -> Result<Vec<serde_json::Value>, CatalogError> {
        let mut c = self.pool.get().await?;
        let mut keys = c.scan_match(&self.keys.node_pattern()).await?;
        keys.retain(|k| !k.ends_with(":probe"));
        let mut out = Vec::new();
        for k in keys {
            let v: Option<String> = c.get(&k).await?;
            if let Some(v) = v.and_then(|v| serde_json::from_str(&v).ok()) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::iso8601_utc;

    #[test]
    fn times_print_as_iso8601_utc() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso8601_utc(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59.999Z");
    }
}
