//! Room history on Redis Streams, the Redis side: stream ids, the event frames built from stream
//! entries, the `since` join parameter, and the two script calls — `lua/publish.lua` (append to
//! `<p>:room:{R}:history` and publish, atomically) and `lua/history.lua` (read it).
//!
//! Every broadcast (an allow-listed client push, an admin broadcast) goes through
//! [`History::broadcast`]: one script call appends it to the room's stream (`MAXLEN ~
//! rooms.history_len`) and publishes it, so the stream's order is the order every node receives.
//! The published frame is `[null,null,"rooms:R","<event>",<payload with "id":"<stream id>">]`;
//! [`entry_frame`] rebuilds exactly those bytes from a stream entry, so a late joiner's history and
//! a live viewer's frames are the same. `rooms.history_len = 0` turns history off: a plain
//! `PUBLISH` of the frame without an id, as before.
//!
//! The node-local tail of each subscribed room (what warm joins and recoveries are served from)
//! is `fanout::history`.

use std::fmt;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::metrics::{Metrics, script};
use crate::presence::{Store, StoreError};
use crate::redis::keys::RoomKeys;
use crate::redis::scripts::{HISTORY_LUA, PUBLISH_LUA};

/// A Redis stream id `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// `<ms>-<seq>`, both decimal u64 (what Redis generates). Nothing else is accepted: no bare
    /// `<ms>`, no signs, no spaces, at most 20 digits each.
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        let num = |d: &str| {
            if d.is_empty() || d.len() > 20 || !d.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            d.parse::<u64>().ok()
        };
        Some(StreamId {
            ms: num(ms)?,
            seq: num(seq)?,
        })
    }

    /// The greatest id below this one (`0-0` stays `0-0`).
    pub fn pred(self) -> StreamId {
        match (self.ms, self.seq) {
            (0, 0) => self,
            (ms, 0) => StreamId {
                ms: ms - 1,
                seq: u64::MAX,
            },
            (ms, seq) => StreamId { ms, seq: seq - 1 },
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A join's `since` that is not a stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("since must be a stream id \"<ms>-<seq>\"")]
pub struct InvalidSince;

/// The `since` of a join payload: absent or `null` → `None`; a string `<ms>-<seq>` → its id;
/// anything else is refused, before anything else of the join happens.
pub fn since_param(params: &Map<String, Value>) -> Result<Option<StreamId>, InvalidSince> {
    match params.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => StreamId::parse(s).map(Some).ok_or(InvalidSince),
        Some(_) => Err(InvalidSince),
    }
}

/// `[null,null,"<topic>","<event>",` — the start of a room broadcast frame.
pub fn broadcast_head(topic: &str, event: &str) -> Vec<u8> {
    let mut head = serde_json::to_vec(&((), (), topic, event)).unwrap_or_default();
    // `[null,null,"t","e"]` → `[null,null,"t","e",`
    head.pop();
    head.push(b',');
    head
}

/// The payload with `"id":"<id>"` added as its last member, byte for byte what `publish.lua`
/// builds: `{…}` → `{…,"id":"<id>"}`, `{}` → `{"id":"<id>"}`.
pub fn with_id(payload: &[u8], id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + id.len() + 8);
    if payload == b"{}" {
        out.extend_from_slice(b"{\"id\":\"");
    } else {
        out.extend_from_slice(&payload[..payload.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"id\":\"");
    }
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The live frame of a stream entry: the bytes every viewer of the room received when it was
/// published.
pub fn entry_frame(topic: &str, event: &str, payload: &[u8], id: &str) -> Bytes {
    let mut f = broadcast_head(topic, event);
    f.extend_from_slice(&with_id(payload, id));
    f.push(b']');
    Bytes::from(f)
}

/// The stream id a live frame carries (its payload's last member `"id":"<ms>-<seq>"`), or `None`
/// for a frame without one (history off, or published by hand).
pub fn frame_id(frame: &[u8]) -> Option<StreamId> {
    let rest = frame.strip_suffix(b"\"}]")?;
    let digits = rest
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit() || **b == b'-')
        .count();
    let (before, id) = rest.split_at(rest.len() - digits);
    if !(before.ends_with(b",\"id\":\"") || before.ends_with(b"{\"id\":\"")) {
        return None;
    }
    StreamId::parse(std::str::from_utf8(id).ok()?)
}

/// `["<join_ref>",null,` — with `frame_body` of a live frame, the same event as a channel push to
/// one channel (its join_ref set, so the client drops it if the channel has rejoined since).
pub fn channel_head(join_ref: &str) -> Bytes {
    let mut head = serde_json::to_vec(&(join_ref, ())).unwrap_or_default();
    head.pop();
    head.push(b',');
    Bytes::from(head)
}

/// A live frame without its `[null,null,` and closing `]` (shared, no copy), for
/// `Outbox::send_wrapped(channel_head(..), body)`; `None` if it is not a room broadcast frame.
pub fn frame_body(frame: &Bytes) -> Option<Bytes> {
    const HEAD: &[u8] = b"[null,null,";
    if frame.starts_with(HEAD) && frame.ends_with(b"]") && frame.len() > HEAD.len() {
        Some(frame.slice(HEAD.len()..frame.len() - 1))
    } else {
        None
    }
}

/// `PUBLISH` (standalone Redis) or `SPUBLISH` (sharded pub/sub on Redis Cluster): how a room's
/// events are published, passed to `publish.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishCommand {
    Publish,
    SPublish,
}

impl PublishCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishCommand::Publish => "PUBLISH",
            PublishCommand::SPublish => "SPUBLISH",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("room does not exist")]
    NoRoom,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unexpected reply from a history script: {0}")]
    Reply(String),
}

/// What [`History::read`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadReq {
    /// The newest n entries.
    Last(usize),
    /// Every entry after the id; the newest n instead when the id is above the stream's last.
    Since(StreamId, usize),
}

/// One read of a room's stream (`lua/history.lua`).
#[derive(Debug, Clone, Default)]
pub struct Read {
    pub exists: bool,
    /// The stream's last generated id: the read covers every entry up to it.
    pub last: StreamId,
    /// The first retained entry (None: the stream holds none).
    pub first: Option<StreamId>,
    /// Entries were removed from the stream (trimmed to its cap).
    pub trimmed: bool,
    /// A `since` read's id was above `last`: `entries` are the newest n instead.
    pub ahead: bool,
    /// Oldest first, as live frames.
    pub entries: Vec<(StreamId, Bytes)>,
}

impl Read {
    /// Every entry the stream ever had with an id above this is still in it (conservatively:
    /// after trimming, the id just below the first retained entry).
    pub fn floor(&self) -> StreamId {
        if !self.exists || !self.trimmed {
            return StreamId::ZERO;
        }
        match self.first {
            Some(f) => f.pred(),
            None => self.last,
        }
    }

    /// For a `since` read: nothing after `since` was trimmed away, and `since` is an id this
    /// stream has had (not above its last).
    pub fn recovered(&self, since: StreamId) -> bool {
        self.exists && !self.ahead && since <= self.last && since >= self.floor()
    }
}

/// A published broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The entry's stream id (None: history is off).
    pub id: Option<StreamId>,
}

/// The history script calls, over the store's hot connection. Scripts run by SHA (`EVALSHA`);
/// after a Redis restart or `SCRIPT FLUSH` the first call answers `NOSCRIPT` and is sent again as
/// `EVAL`, which loads it.
pub struct History {
    store: Store,
    metrics: Metrics,
    publish_sha: String,
    read_sha: String,
    publish_command: PublishCommand,
    /// `rooms.history_len` (0: off).
    len: usize,
}

impl History {
    pub fn new(
        store: Store,
        metrics: Metrics,
        len: usize,
        publish_command: PublishCommand,
    ) -> Self {
        Self {
            store,
            metrics,
            publish_sha: redis::Script::new(PUBLISH_LUA).get_hash().to_string(),
            read_sha: redis::Script::new(HISTORY_LUA).get_hash().to_string(),
            publish_command,
            len,
        }
    }

    pub fn enabled(&self) -> bool {
        self.len > 0
    }

    /// Broadcasts `event` with `payload` (a JSON object; an `"id"` member is replaced by the
    /// stream id) to the room on every node: with history on, appended to the stream and
    /// published in one script call; off, a plain publish. `NoRoom` when the room's record is
    /// gone (history on: nothing is written or published then).
    pub async fn broadcast(
        &self,
        keys: &RoomKeys,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Result<Published, HistoryError> {
        let head = broadcast_head(topic, event);
        let body = match payload {
            Value::Object(m) if m.contains_key("id") => {
                let mut m = m.clone();
                m.remove("id");
                serde_json::to_vec(&m)
            }
            Value::Object(_) => serde_json::to_vec(payload),
            _ => return Err(HistoryError::Reply("payload must be an object".into())),
        }
        .map_err(|e| HistoryError::Reply(e.to_string()))?;
        if !self.enabled() {
            let mut frame = head;
            frame.extend_from_slice(&body);
            frame.push(b']');
            let cmd = redis::cmd(self.publish_command.as_str())
                .arg(&keys.events)
                .arg(frame)
                .clone();
            self.store
                .command::<i64>(crate::metrics::redis_op::PUBLISH, &cmd)
                .await?;
            return Ok(Published { id: None });
        }
        let len = self.len.to_string();
        let args: [&[u8]; 5] = [
            self.publish_command.as_str().as_bytes(),
            len.as_bytes(),
            &head,
            event.as_bytes(),
            &body,
        ];
        let keys3 = [
            keys.room.as_str(),
            keys.history.as_str(),
            keys.events.as_str(),
        ];
        let v = self
            .eval(
                script::BROADCAST,
                &self.publish_sha,
                PUBLISH_LUA,
                &keys3,
                &args,
            )
            .await?;
        match v {
            redis::Value::Nil => Err(HistoryError::NoRoom),
            id => {
                let id = bulk_str(&id)
                    .and_then(StreamId::parse)
                    .ok_or_else(|| HistoryError::Reply(format!("{id:?}")))?;
                Ok(Published { id: Some(id) })
            }
        }
    }

    /// Reads the room's stream; entries come back as the live frames of `topic`.
    pub async fn read(
        &self,
        keys: &RoomKeys,
        topic: &str,
        req: ReadReq,
    ) -> Result<Read, HistoryError> {
        let (mode, a, b) = match req {
            ReadReq::Last(n) => ("last", n.to_string(), String::new()),
            ReadReq::Since(id, n) => ("since", id.to_string(), n.to_string()),
        };
        let args: [&[u8]; 3] = [mode.as_bytes(), a.as_bytes(), b.as_bytes()];
        let v = self
            .eval(
                script::HISTORY,
                &self.read_sha,
                HISTORY_LUA,
                &[keys.history.as_str()],
                &args,
            )
            .await?;
        parse_read(&v, topic)
    }

    async fn eval(
        &self,
        name: &'static str,
        sha: &str,
        source: &str,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<redis::Value, StoreError> {
        let timer = self.metrics.script_timer(name);
        let build = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script).arg(keys.len());
            for k in keys {
                cmd.arg(*k);
            }
            for a in args {
                cmd.arg(*a);
            }
            cmd
        };
        let r = match self
            .store
            .command::<redis::Value>(name, &build("EVALSHA", sha))
            .await
        {
            Err(StoreError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                // EVAL runs it and caches it for the next EVALSHA
                self.store
                    .command::<redis::Value>(name, &build("EVAL", source))
                    .await
            }
            r => r,
        };
        timer.observe_duration();
        r
    }
}

fn bulk_str(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn parse_read(v: &redis::Value, topic: &str) -> Result<Read, HistoryError> {
    let bad = || HistoryError::Reply(format!("{v:?}"));
    let redis::Value::Array(v) = v else {
        return Err(bad());
    };
    let int = |i: usize| match v.get(i) {
        Some(redis::Value::Int(n)) => Ok(*n),
        _ => Err(bad()),
    };
    let id = |i: usize| {
        v.get(i)
            .and_then(bulk_str)
            .and_then(StreamId::parse)
            .ok_or_else(bad)
    };
    let exists = int(0)? == 1;
    let first = id(2)?;
    let mut out = Read {
        exists,
        last: id(1)?,
        first: (first != StreamId::ZERO).then_some(first),
        trimmed: int(3)? == 1,
        ahead: int(4)? == 1,
        entries: Vec::new(),
    };
    let Some(redis::Value::Array(entries)) = v.get(5) else {
        return Err(bad());
    };
    for e in entries {
        let redis::Value::Array(pair) = e else {
            return Err(bad());
        };
        let (Some(raw_id), Some(redis::Value::Array(fields))) = (pair.first(), pair.get(1)) else {
            return Err(bad());
        };
        let raw_id = bulk_str(raw_id).ok_or_else(bad)?;
        let sid = StreamId::parse(raw_id).ok_or_else(bad)?;
        let (mut event, mut payload) = (None, None);
        for kv in fields.chunks(2) {
            if let [redis::Value::BulkString(k), redis::Value::BulkString(val)] = kv {
                match k.as_slice() {
                    b"event" => event = std::str::from_utf8(val).ok(),
                    b"payload" => payload = Some(val.as_slice()),
                    _ => {}
                }
            }
        }
        match (event, payload) {
            (Some(ev), Some(p)) if p.starts_with(b"{") && p.ends_with(b"}") => {
                out.entries
                    .push((sid, entry_frame(topic, ev, p, &sid.to_string())));
            }
            // an entry this gateway did not write: skipped, never sent as a broken frame
            _ => tracing::warn!(%topic, id = %sid, "ignoring an unreadable history entry"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
