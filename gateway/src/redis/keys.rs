//! Every Redis key and channel name the gateway uses, built in one place from a validated
//! [`RoomId`]. All keys of a room share the hash tag `{<room>}`, so each script touches one slot and
//! the layout runs unchanged on Redis Cluster.
//!
//! | key | type | contents |
//! |---|---|---|
//! | `<p>:room:{R}` | HASH | the room record; its existence is "the room exists" |
//! | `<p>:room:{R}:presence` | HASH | connection id → meta JSON (signed-in only) |
//! | `<p>:room:{R}:anon` | HASH | node id → that node's anonymous viewers |
//! | `<p>:room:{R}:nodes` | ZSET | node id → lease expiry (ms, Redis clock) |
//! | `<p>:room:{R}:seq` | STRING | presence change counter |
//! | `<p>:room:{R}:members` | HASH | user id → that user's signed-in connections in R (events hook edges) |
//! | `<p>:room:{R}:unacked` | HASH | the events hook's outbox: event id → `<owner node>\|<since ms>\|<at ms>\|<username>`, until the application acknowledged it |
//! | `<p>:room:{R}:events` | channel | room events and presence changes |
//! | `<p>:room:{R}:history` | STREAM | the room's recent broadcasts (`MAXLEN ~ rooms.history_len`) |
//! | `<p>:room:{R}:ban:<sub>` | STRING (TTL) | user `sub` may not join R until it expires (kick with `ban_s`) |
//! | `<p>:user:{<sub>}:ban` | STRING (TTL) | a token with `sub` signs nothing in until it expires |
//! | `<p>:control` | channel | node-wide orders (disconnect a user) |
//! | `<p>:reply:<id>` | LIST (TTL) | each node's answer to one kick or disconnect (how many it closed) |
//! | `<p>:node:<node>` | STRING (TTL) | node record for operators |
//! | `<p>:node:<node>:probe` | channel | the node's own pub/sub liveness probe |

use crate::rooms::RoomId;

/// Key builder for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one room, in the order the Lua scripts take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKeys {
    pub room: String,
    pub presence: String,
    pub anon: String,
    pub nodes: String,
    pub seq: String,
    pub events: String,
    /// User id → that user's connections in `presence` (the events hook's member edges).
    pub members: String,
    /// The events hook's outbox: event id → owner and what re-posting it needs (see lua/common.lua).
    pub unacked: String,
    /// The history stream (not one of the presence scripts' keys).
    pub history: String,
}

impl RoomKeys {
    /// KEYS[1..8] of every presence script.
    pub fn all(&self) -> [&str; 8] {
        [
            &self.room,
            &self.presence,
            &self.anon,
            &self.nodes,
            &self.seq,
            &self.events,
            &self.members,
            &self.unacked,
        ]
    }

    /// The room id inside the hash tag of these keys.
    pub fn room_id(&self) -> &str {
        let tag = self.room.rsplit_once('{').map_or("", |(_, t)| t);
        tag.strip_suffix('}').unwrap_or(tag)
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn room_record(&self, room: &RoomId) -> String {
        format!("{}:room:{{{}}}", self.prefix, room)
    }

    pub fn room(&self, room: &RoomId) -> RoomKeys {
        let base = self.room_record(room);
        RoomKeys {
            presence: format!("{base}:presence"),
            anon: format!("{base}:anon"),
            nodes: format!("{base}:nodes"),
            seq: format!("{base}:seq"),
            events: format!("{base}:events"),
            members: format!("{base}:members"),
            unacked: format!("{base}:unacked"),
            history: format!("{base}:history"),
            room: base,
        }
    }

    pub fn events(&self, room: &RoomId) -> String {
        format!("{}:events", self.room_record(room))
    }

    /// Room id of an events channel name, if it is one of ours.
    pub fn room_of_channel(&self, channel: &str) -> Option<RoomId> {
        let rest = channel
            .strip_prefix(&self.prefix)?
            .strip_prefix(":room:{")?;
        let id = rest.strip_suffix("}:events")?;
        RoomId::parse(id).ok()
    }

    /// Pattern matching every room record (for `SCAN`): `<p>:room:{*}`.
    pub fn room_record_pattern(&self) -> String {
        format!("{}:room:{{*}}", self.prefix)
    }

    /// Room id of a room record key.
    pub fn room_of_record(&self, key: &str) -> Option<RoomId> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":room:{")?;
        RoomId::parse(rest.strip_suffix('}')?).ok()
    }

    /// The ban of user `sub` from a room; shares the room's hash tag, so `join.lua` checks it in
    /// the same call. `sub` is any string (it comes from a verified token or the admin API): it
    /// sits after the tag, so it cannot change the slot or name another room's key.
    pub fn room_ban(&self, room: &RoomId, sub: &str) -> String {
        format!("{}:ban:{}", self.room_record(room), sub)
    }

    /// The ban of user `sub` from signing in anywhere. The tag is the user id: a `sub` holding
    /// `{` or `}` only moves the key to another slot, never onto a room's key.
    pub fn user_ban(&self, sub: &str) -> String {
        format!("{}:user:{{{}}}:ban", self.prefix, sub)
    }

    /// The node-wide control channel: every node subscribes to it from start-up.
    pub fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Where nodes answer one kick or disconnect (`id` is random per request).
    pub fn reply(&self, id: &str) -> String {
        format!("{}:reply:{}", self.prefix, id)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{}", self.prefix, node)
    }

    pub fn node_pattern(&self) -> String {
        format!("{}:node:*", self.prefix)
    }

    pub fn probe(&self, node: &str) -> String {
        format!("{}:node:{}:probe", self.prefix, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("gw");
        let r = RoomId::parse("lobby").unwrap();
        let rk = k.room(&r);
        assert_eq!(rk.room, "gw:room:{lobby}");
        assert_eq!(rk.presence, "gw:room:{lobby}:presence");
        assert_eq!(rk.anon, "gw:room:{lobby}:anon");
        assert_eq!(rk.nodes, "gw:room:{lobby}:nodes");
        assert_eq!(rk.seq, "gw:room:{lobby}:seq");
        assert_eq!(rk.events, "gw:room:{lobby}:events");
        assert_eq!(rk.history, "gw:room:{lobby}:history");
        assert_eq!(rk.members, "gw:room:{lobby}:members");
        assert_eq!(rk.unacked, "gw:room:{lobby}:unacked");
        assert_eq!(rk.all().len(), 8);
        assert_eq!(rk.room_id(), "lobby");
        assert_eq!(k.events(&r), rk.events);
        assert_eq!(k.node("n1"), "gw:node:n1");
        assert_eq!(k.probe("n1"), "gw:node:n1:probe");
        assert_eq!(k.room_ban(&r, "alice"), "gw:room:{lobby}:ban:alice");
        assert_eq!(k.user_ban("alice"), "gw:user:{alice}:ban");
        assert_eq!(k.control(), "gw:control");
        assert_eq!(k.reply("x1"), "gw:reply:x1");
    }

    #[test]
    fn parses_names_back() {
        let k = Keys::new("gw");
        assert_eq!(
            k.room_of_channel("gw:room:{lobby}:events")
                .unwrap()
                .as_str(),
            "lobby"
        );
        assert!(k.room_of_channel("gw:room:{lo}bby}:events").is_none());
        assert!(k.room_of_channel("other:room:{lobby}:events").is_none());
        assert_eq!(k.room_of_record("gw:room:{a-1}").unwrap().as_str(), "a-1");
        assert!(k.room_of_record("gw:room:{a}:presence").is_none());
    }
}
