//! Phoenix Channels V2 frames: decoding what clients send, encoding what the gateway sends, and the
//! close codes. Pure: no I/O, no Redis, no tokio. Everything leaving here is a complete JSON text
//! frame as `Bytes`, ready to be shared by every socket that gets it.
//!
//! A frame is `[join_ref, ref, topic, event, payload]`; refs are strings or null and are echoed
//! unchanged; payloads are JSON objects (the client crashes on anything else, so we never send one).

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// WebSocket close codes the gateway uses. Never 1000 when the client should come back: phoenix.js
/// 1.8.1–1.8.15 does not reconnect after 1000.
pub mod close {
    /// Process shutting down without a drain.
    pub const GOING_AWAY: u16 = 1001;
    /// Not a valid WebSocket client frame, frames out of order, or a close frame with a code a
    /// client may not send (`wsmessage::valid_close_code`).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client sent something that is not a V2 frame (bad JSON, not a 5-array, bad types).
    pub const MALFORMED: u16 = 1007;
    /// A message above `server.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error on our side.
    pub const INTERNAL: u16 = 1011;
    /// Drain / restart: reconnect, preferably elsewhere.
    pub const RESTART: u16 = 1012;
    /// Nothing received for `server.idle_timeout_ms`.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The connection's token expired while the socket was open (`exp` + `auth.leeway_s`):
    /// reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The socket's outbound queue overflowed: it cannot keep up with its rooms.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// More than `server.max_refused_joins_per_min` joins refused (rooms that do not exist,
    /// invalid topics) within a minute: a client looping over random room ids.
    pub const REFUSED_JOINS: u16 = 4009;
    /// Disconnected by the server: an operator's `POST /api/users/<sub>/disconnect` (or
    /// `gateway users disconnect`); a ban may follow, so the client should not retry at once.
    pub const DISCONNECTED: u16 = 4003;
}

/// Reply reasons, in one place so tests and clients can rely on the exact strings.
pub mod reason {
    pub const NOT_SIGNED_IN: &str = "Not signed in";
    /// A private room the token does not list, or a ban from the room.
    pub const NOT_ALLOWED: &str = "Not allowed";
    pub const ROOM_DOES_NOT_EXIST: &str = "Room does not exist";
    pub const INVALID_ROOM_ID: &str = "invalid room id";
    pub const UNMATCHED_TOPIC: &str = "unmatched topic";
    pub const UNKNOWN_EVENT: &str = "unknown event";
    pub const TOO_MANY_CHANNELS: &str = "too many channels joined";
    pub const PRESENCE_UNAVAILABLE: &str = "presence unavailable";
    pub const INVALID_PAYLOAD: &str = "invalid payload";
    pub const BINARY_UNSUPPORTED: &str = "binary payloads are not supported";
    pub const SHUTTING_DOWN: &str = "shutting down";
    pub const RATE_LIMITED: &str = "rate limited";
    pub const TOKEN_EXPIRED: &str = "token expired";
    /// A join's `since` is not a stream id `<ms>-<seq>` (nothing of the join happened).
    pub const INVALID_SINCE: &str = "invalid since";
}

/// A decoded client frame. Refs stay as the client sent them.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Payload,
}

/// The payload of an inbound frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Map<String, Value>),
    /// A binary push (phoenix.js sends one for an `ArrayBuffer` payload); the gateway refuses them.
    Binary,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("frame is not valid JSON")]
    Json,
    #[error("frame must be [join_ref, ref, topic, event, payload]")]
    Shape,
    #[error("join_ref and ref must be strings of at most 64 bytes, or null")]
    Ref,
    #[error("topic and event must be strings")]
    TopicEvent,
    #[error("payload must be a JSON object")]
    PayloadType,
    #[error("binary frame header is truncated or invalid")]
    Binary,
}

/// Decodes a text frame.
pub fn decode_text(data: &[u8]) -> Result<Inbound, DecodeError> {
    let v: Value = serde_json::from_slice(data).map_err(|_| DecodeError::Json)?;
    let Value::Array(mut items) = v else {
        return Err(DecodeError::Shape);
    };
    if items.len() != 5 {
        return Err(DecodeError::Shape);
    }
    let payload = items.pop().unwrap_or(Value::Null);
    let event = items.pop().unwrap_or(Value::Null);
    let topic = items.pop().unwrap_or(Value::Null);
    let reference = opt_ref(items.pop().unwrap_or(Value::Null))?;
    let join_ref = opt_ref(items.pop().unwrap_or(Value::Null))?;
    let (Value::String(topic), Value::String(event)) = (topic, event) else {
        return Err(DecodeError::TopicEvent);
    };
    let Value::Object(payload) = payload else {
        return Err(DecodeError::PayloadType);
    };
    Ok(Inbound {
        join_ref,
        reference,
        topic,
        event,
        payload: Payload::Json(payload),
    })
}

/// Decodes a binary push: `0 | len(join_ref) | len(ref) | len(topic) | len(event) | ... | data`.
pub fn decode_binary(data: &[u8]) -> Result<Inbound, DecodeError> {
    if data.len() < 5 || data[0] != 0 {
        return Err(DecodeError::Binary);
    }
    let lens = [data[1], data[2], data[3], data[4]].map(usize::from);
    let mut at = 5;
    let mut parts = Vec::with_capacity(4);
    for len in lens {
        let end = at + len;
        let s = data.get(at..end).ok_or(DecodeError::Binary)?;
        parts.push(
            std::str::from_utf8(s)
                .map_err(|_| DecodeError::Binary)?
                .to_string(),
        );
        at = end;
    }
    let mut parts = parts.into_iter();
    let mut next = || parts.next().unwrap_or_default();
    let join_ref = Some(next()).filter(|s| !s.is_empty());
    let reference = Some(next()).filter(|s| !s.is_empty());
    if [&join_ref, &reference]
        .iter()
        .any(|r| r.as_ref().is_some_and(|r| r.len() > MAX_REF_BYTES))
    {
        return Err(DecodeError::Ref);
    }
    Ok(Inbound {
        join_ref,
        reference,
        topic: next(),
        event: next(),
        payload: Payload::Binary,
    })
}

/// The longest `ref` / `join_ref` taken. phoenix.js sends counters ("1", "2", …); other clients
/// send at most a UUID. Every reply echoes the ref, so a long one would let a client that reads
/// nothing make the node hold its frames' worth for each reply (256 heartbeats with 64 KiB refs:
/// 16 MiB).
pub const MAX_REF_BYTES: usize = 64;

fn opt_ref(v: Value) -> Result<Option<String>, DecodeError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= MAX_REF_BYTES => Ok(Some(s)),
        _ => Err(DecodeError::Ref),
    }
}

/// Encodes `[join_ref, ref, topic, event, payload]` as a text frame body.
pub fn encode(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> Bytes {
    // Serialising a tuple of borrowed values writes the array without building a Value tree.
    let frame = (join_ref, reference, topic, event, payload);
    Bytes::from(serde_json::to_vec(&frame).unwrap_or_else(|_| b"[]".to_vec()))
}

/// `phx_reply` with `{"status":"ok","response":response}`.
pub fn reply_ok(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    response: Value,
) -> Bytes {
    encode(
        join_ref,
        reference,
        topic,
        "phx_reply",
        &json!({"status": "ok", "response": response}),
    )
}

/// `phx_reply` with `{"status":"error","response":{"reason":reason}}`.
pub fn reply_error(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    reason: &str,
) -> Bytes {
    encode(
        join_ref,
        reference,
        topic,
        "phx_reply",
        &json!({"status": "error", "response": {"reason": reason}}),
    )
}

/// Reply to a heartbeat: `[null, ref, "phoenix", "phx_reply", {"status":"ok","response":{}}]`.
pub fn heartbeat_reply(reference: Option<&str>) -> Bytes {
    reply_ok(None, reference, "phoenix", json!({}))
}

/// Server-side channel close: `[join_ref, join_ref, topic, "phx_close", {}]` — the join_ref must be
/// filled in, or it would close a newer channel on the same topic.
pub fn phx_close(join_ref: &str, topic: &str) -> Bytes {
    encode(
        Some(join_ref),
        Some(join_ref),
        topic,
        "phx_close",
        &json!({}),
    )
}

/// Channel-level error: `[join_ref, join_ref, topic, "phx_error", {"reason": reason}]`.
pub fn phx_error(join_ref: &str, topic: &str, reason: &str) -> Bytes {
    encode(
        Some(join_ref),
        Some(join_ref),
        topic,
        "phx_error",
        &json!({ "reason": reason }),
    )
}

/// A channel push to one socket (`presence_state`, the first `presence_count`): join_ref set, ref null.
pub fn push(join_ref: &str, topic: &str, event: &str, payload: &Value) -> Bytes {
    encode(Some(join_ref), None, topic, event, payload)
}

/// The start of a channel push, `[join_ref,null,topic,event,`, to be followed by a payload that
/// was serialised once for many sockets and the closing `]`.
pub fn push_head(join_ref: &str, topic: &str, event: &str) -> Bytes {
    let mut head = serde_json::to_vec(&(join_ref, (), topic, event)).unwrap_or_default();
    // `["jr",null,"topic","event"]` → `["jr",null,"topic","event",`
    head.pop();
    head.push(b',');
    Bytes::from(head)
}

/// A broadcast to a whole room (`new_msg`, `presence_diff`): both refs null, so it reaches
/// whichever channel object the client has on the topic.
pub fn broadcast(topic: &str, event: &str, payload: &Value) -> Bytes {
    encode(None, None, topic, event, payload)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
