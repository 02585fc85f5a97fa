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
}

/// Reply reasons, in one place so tests and clients can rely on the exact strings.
pub mod reason {
    pub const NOT_SIGNED_IN: &str = "Not signed in";
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
mod tests {
    use super::*;

    #[test]
    fn decodes_a_join() {
        let f =
            decode_text(br#"["3","3","rooms:lobby","phx_join",{"guardian_token":"t"}]"#).unwrap();
        assert_eq!(f.join_ref.as_deref(), Some("3"));
        assert_eq!(f.reference.as_deref(), Some("3"));
        assert_eq!(f.topic, "rooms:lobby");
        assert_eq!(f.event, "phx_join");
        let Payload::Json(p) = f.payload else {
            panic!("json")
        };
        assert_eq!(p["guardian_token"], "t");
    }

    #[test]
    fn decodes_a_heartbeat_with_null_join_ref() {
        let f = decode_text(br#"[null,"4","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(f.join_ref, None);
        assert_eq!(f.reference.as_deref(), Some("4"));
    }

    #[test]
    fn refuses_malformed_frames() {
        assert_eq!(decode_text(b"nope"), Err(DecodeError::Json));
        assert_eq!(decode_text(b"{}"), Err(DecodeError::Shape));
        assert_eq!(
            decode_text(br#"[null,"1","t","e"]"#),
            Err(DecodeError::Shape)
        );
        assert_eq!(
            decode_text(br#"[null,"1","t","e",{},1]"#),
            Err(DecodeError::Shape)
        );
        assert_eq!(decode_text(br#"[1,"1","t","e",{}]"#), Err(DecodeError::Ref));
        // refs are echoed in every reply: a long one is refused, 64 bytes are fine
        let r64 = "7".repeat(MAX_REF_BYTES);
        let ok = format!(r#"["{r64}","{r64}","phoenix","heartbeat",{{}}]"#);
        assert!(decode_text(ok.as_bytes()).is_ok());
        let long = format!(r#"[null,"{r64}8","phoenix","heartbeat",{{}}]"#);
        assert_eq!(decode_text(long.as_bytes()), Err(DecodeError::Ref));
        let long = format!(r#"["{r64}8",null,"phoenix","heartbeat",{{}}]"#);
        assert_eq!(decode_text(long.as_bytes()), Err(DecodeError::Ref));
        assert_eq!(
            decode_text(br#"[null,"1",5,"e",{}]"#),
            Err(DecodeError::TopicEvent)
        );
        assert_eq!(
            decode_text(br#"[null,"1","t","e",[]]"#),
            Err(DecodeError::PayloadType)
        );
        assert_eq!(
            decode_text(br#"[null,"1","t","e",null]"#),
            Err(DecodeError::PayloadType)
        );
    }

    #[test]
    fn decodes_binary_pushes() {
        let mut b = vec![0u8, 1, 1, 7, 3];
        b.extend_from_slice(b"3");
        b.extend_from_slice(b"5");
        b.extend_from_slice(b"rooms:a");
        b.extend_from_slice(b"msg");
        b.extend_from_slice(&[1, 2, 3]);
        let f = decode_binary(&b).unwrap();
        assert_eq!(f.join_ref.as_deref(), Some("3"));
        assert_eq!(f.reference.as_deref(), Some("5"));
        assert_eq!(f.topic, "rooms:a");
        assert_eq!(f.event, "msg");
        assert_eq!(f.payload, Payload::Binary);
        assert_eq!(decode_binary(&[0, 9, 0, 0, 0]), Err(DecodeError::Binary));
        assert_eq!(decode_binary(&[1, 0, 0, 0, 0]), Err(DecodeError::Binary));
    }

    #[test]
    fn encodes_replies_like_phoenix() {
        assert_eq!(
            &heartbeat_reply(Some("4"))[..],
            br#"[null,"4","phoenix","phx_reply",{"response":{},"status":"ok"}]"#
        );
        assert_eq!(
            &reply_error(Some("3"), Some("3"), "rooms:x", reason::ROOM_DOES_NOT_EXIST)[..],
            br#"["3","3","rooms:x","phx_reply",{"response":{"reason":"Room does not exist"},"status":"error"}]"#
        );
        assert_eq!(
            &phx_close("7", "rooms:x")[..],
            br#"["7","7","rooms:x","phx_close",{}]"#
        );
        assert_eq!(
            &broadcast("rooms:x", "new_msg", &json!({"body":"hi"}))[..],
            br#"[null,null,"rooms:x","new_msg",{"body":"hi"}]"#
        );
    }

    #[test]
    fn push_head_plus_payload_is_a_frame() {
        let mut b = push_head("3", "rooms:a", "presence_state").to_vec();
        b.extend_from_slice(br#"{"u":{"metas":[]}}"#);
        b.push(b']');
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!(["3", null, "rooms:a", "presence_state", {"u":{"metas":[]}}])
        );
    }

    #[test]
    fn encoded_strings_are_escaped() {
        let b = broadcast("rooms:x", "new_msg", &json!({"body":"\"]\n"}));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v[4]["body"], "\"]\n");
    }
}

/// Property tests of the decoders: arbitrary bytes, arbitrary JSON values, and round trips.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    const CASES: u32 = 2048;

    /// Short strings of any chars (control chars, quotes, backslashes, non-ASCII included).
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            vec(any::<char>(), 0..8).prop_map(String::from_iter),
            "[a-z0-9:\"\\\\ ]{0,6}",
        ]
    }

    /// Any JSON value, nested a few levels. Floats are exact binary fractions, so a value written
    /// and read back by serde_json compares equal.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..5).prop_map(Value::Array),
                btree_map(text(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        btree_map(text(), json_value(), 0..5).prop_map(|m| m.into_iter().collect())
    }

    /// The fields of a valid V2 frame.
    type Fields = (
        Option<String>,
        Option<String>,
        String,
        String,
        Map<String, Value>,
    );

    fn fields() -> impl Strategy<Value = Fields> {
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            text(),
            text(),
            json_object(),
        )
    }

    fn frame_value((join_ref, reference, topic, event, payload): &Fields) -> Value {
        json!([join_ref, reference, topic, event, payload])
    }

    /// Mostly frame-like values: valid frames, valid frames with one element replaced by any
    /// value, with an element added or removed, and any JSON value at all.
    fn frame_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            2 => fields().prop_map(|f| frame_value(&f)),
            3 => (fields(), 0..5usize, json_value()).prop_map(|(f, i, v)| {
                let mut a = frame_value(&f);
                a[i] = v;
                a
            }),
            1 => (fields(), 0..6usize, json_value()).prop_map(|(f, i, v)| {
                let Value::Array(mut a) = frame_value(&f) else { unreachable!() };
                a.insert(i, v);
                Value::Array(a)
            }),
            1 => (fields(), 0..5usize).prop_map(|(f, i)| {
                let Value::Array(mut a) = frame_value(&f) else { unreachable!() };
                a.remove(i);
                Value::Array(a)
            }),
            1 => json_value(),
        ]
    }

    /// What `decode_text` must make of a parsed JSON value, written from the protocol text
    /// (PHOENIX_PROTOCOL.md §2.1): exactly five elements, refs strings or null, topic and event
    /// strings, payload an object. `Err` lists every rule the value breaks; the decoder may name
    /// any one of them.
    fn expected(v: &Value) -> Result<Inbound, Vec<DecodeError>> {
        let Some(a) = v.as_array().filter(|a| a.len() == 5) else {
            return Err(vec![DecodeError::Shape]);
        };
        let mut broken = Vec::new();
        let is_ref =
            |v: &Value| v.is_null() || v.as_str().is_some_and(|s| s.len() <= MAX_REF_BYTES);
        if !is_ref(&a[0]) || !is_ref(&a[1]) {
            broken.push(DecodeError::Ref);
        }
        if !a[2].is_string() || !a[3].is_string() {
            broken.push(DecodeError::TopicEvent);
        }
        if !a[4].is_object() {
            broken.push(DecodeError::PayloadType);
        }
        if !broken.is_empty() {
            return Err(broken);
        }
        let s = |v: &Value| v.as_str().map(str::to_string);
        Ok(Inbound {
            join_ref: s(&a[0]),
            reference: s(&a[1]),
            topic: s(&a[2]).unwrap_or_default(),
            event: s(&a[3]).unwrap_or_default(),
            payload: Payload::Json(a[4].as_object().cloned().unwrap_or_default()),
        })
    }

    /// `decode_text` agrees with [`expected`] on whatever serde_json makes of the bytes (and
    /// says `Json` when they are not JSON at all).
    fn check_text(bytes: &[u8]) -> Result<(), TestCaseError> {
        let got = decode_text(bytes);
        match serde_json::from_slice::<Value>(bytes) {
            Err(_) => prop_assert_eq!(got, Err(DecodeError::Json)),
            Ok(v) => match (expected(&v), got) {
                (Ok(want), Ok(got)) => prop_assert_eq!(got, want),
                (Err(rules), Err(e)) => prop_assert!(
                    rules.contains(&e),
                    "{v} refused with {e:?}, but it breaks only {rules:?}"
                ),
                (want, got) => prop_assert!(false, "{v}: wanted {want:?}, got {got:?}"),
            },
        }
        Ok(())
    }

    /// Bits of JSON text, some broken (lone surrogate, out-of-range number, stray byte).
    fn token_soup() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just("["),
            Just("]"),
            Just("{"),
            Just("}"),
            Just(","),
            Just(":"),
            Just(" "),
            Just("null"),
            Just("true"),
            Just("\"\""),
            Just("\"3\""),
            Just("\"rooms:a\""),
            Just("\"phx_join\""),
            Just("\"a\\\"b\""),
            Just("\"\\ud800\""),
            Just("\"\\u00e9\""),
            Just("0"),
            Just("-1.5e3"),
            Just("1e400"),
            Just("\u{fffd}"),
        ];
        vec(token, 0..24).prop_map(|t| t.concat().into_bytes())
    }

    /// A valid frame's text with a few bytes overwritten, inserted or removed.
    fn mangled_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            fields(),
            vec((any::<u8>(), 0..3u8, any::<prop::sample::Index>()), 1..4),
        )
            .prop_map(|(f, edits)| {
                let mut b = serde_json::to_vec(&frame_value(&f)).unwrap_or_default();
                for (byte, kind, at) in edits {
                    let i = at.index(b.len() + 1);
                    match kind {
                        0 if i < b.len() => b[i] = byte,
                        1 if i < b.len() => {
                            b.remove(i);
                        }
                        _ => b.insert(i, byte),
                    }
                }
                b
            })
    }

    /// What `decode_binary` must make of the bytes, from the layout in PHOENIX_PROTOCOL.md §2.4:
    /// kind 0, four single-byte lengths, four UTF-8 fields, then any payload; empty refs are null.
    fn expected_binary(b: &[u8]) -> Option<Inbound> {
        if b.len() < 5 || b[0] != 0 {
            return None;
        }
        let mut at = 5;
        let mut parts = Vec::new();
        for &len in &b[1..5] {
            let part = b.get(at..at + usize::from(len))?;
            parts.push(String::from_utf8(part.to_vec()).ok()?);
            at += usize::from(len);
        }
        let nonempty = |s: &String| Some(s.clone()).filter(|s| !s.is_empty());
        Some(Inbound {
            join_ref: nonempty(&parts[0]),
            reference: nonempty(&parts[1]),
            topic: parts[2].clone(),
            event: parts[3].clone(),
            payload: Payload::Binary,
        })
    }

    /// Binary frames with kind 0 and small lengths, so the header is often (not always) right.
    fn binary_like() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
            [0..8u8, 0..8u8, 0..12u8, 0..8u8],
            vec(prop_oneof![3 => 0x20..0x7fu8, 1 => any::<u8>()], 0..40),
        )
            .prop_map(|(kind, lens, rest)| {
                let mut b = vec![kind];
                b.extend_from_slice(&lens);
                b.extend_from_slice(&rest);
                b
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

        /// Any bytes at all: both decoders return (never panic) and agree with the protocol text.
        #[test]
        fn arbitrary_bytes_never_panic(b in prop_oneof![
            vec(any::<u8>(), 0..200),
            vec(prop_oneof![Just(0u8), any::<u8>()], 0..8),
            token_soup(),
            mangled_frame(),
            binary_like(),
        ]) {
            check_text(&b)?;
            prop_assert_eq!(decode_binary(&b).ok(), expected_binary(&b));
        }

        /// Any JSON value: accepted exactly when it is a V2 frame, with its fields; otherwise
        /// refused for a rule it really breaks.
        #[test]
        fn decodes_exactly_the_v2_frames(v in frame_like()) {
            check_text(&serde_json::to_vec(&v).unwrap_or_default())?;
        }

        /// A valid frame, written by `encode` or by serde_json (compact or pretty), decodes to
        /// the same fields; so does a binary push with the same (short) fields.
        #[test]
        fn valid_frames_round_trip(f in fields(), pretty in any::<bool>()) {
            let (join_ref, reference, topic, event, payload) = &f;
            let want = Inbound {
                join_ref: join_ref.clone(),
                reference: reference.clone(),
                topic: topic.clone(),
                event: event.clone(),
                payload: Payload::Json(payload.clone()),
            };
            let encoded = encode(
                join_ref.as_deref(),
                reference.as_deref(),
                topic,
                event,
                &Value::Object(payload.clone()),
            );
            prop_assert_eq!(decode_text(&encoded), Ok(want.clone()));
            let written = if pretty {
                serde_json::to_vec_pretty(&frame_value(&f))
            } else {
                serde_json::to_vec(&frame_value(&f))
            };
            prop_assert_eq!(decode_text(&written.unwrap_or_default()), Ok(want));

            // binary: every field fits in one length byte; an empty ref reads as null
            let mut b = vec![0u8];
            let strs = [
                join_ref.as_deref().unwrap_or(""),
                reference.as_deref().unwrap_or(""),
                topic.as_str(),
                event.as_str(),
            ];
            for s in strs {
                b.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
            }
            for s in strs {
                b.extend_from_slice(s.as_bytes());
            }
            b.extend_from_slice(&serde_json::to_vec(payload).unwrap_or_default());
            let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
            prop_assert_eq!(
                decode_binary(&b),
                Ok(Inbound {
                    join_ref: nonempty(join_ref),
                    reference: nonempty(reference),
                    topic: topic.clone(),
                    event: event.clone(),
                    payload: Payload::Binary,
                })
            );
        }

        /// Deeply nested payloads are refused as bad JSON (serde_json's depth limit), never
        /// overflow the stack; shallow ones are accepted.
        #[test]
        fn deep_nesting_is_refused_not_a_crash(depth in prop_oneof![0..120usize, 0..5000usize]) {
            let mut b = br#"[null,"1","rooms:a","new_msg",{"a":"#.to_vec();
            b.extend(std::iter::repeat_n(b'[', depth));
            b.push(b'0');
            b.extend(std::iter::repeat_n(b']', depth));
            b.extend_from_slice(b"}]");
            let got = decode_text(&b);
            if depth <= 100 {
                prop_assert!(got.is_ok(), "depth {depth}: {got:?}");
            } else {
                prop_assert!(matches!(got, Ok(_) | Err(DecodeError::Json)), "depth {depth}: {got:?}");
            }
        }
    }
}
