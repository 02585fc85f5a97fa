//! The domain rules: what a room id is, which topics are rooms, who may push what, and what of a
//! push reaches the room ([`broadcast_payload`]: the body, and the sender from the token only).
//!
//! A [`RoomId`] can only be built through validation, so every Redis key built from one (see
//! `redis::keys`) is built from a checked id: `^[A-Za-z0-9_-]{1,64}$` excludes `{`, `}`, `:`, `.`,
//! `/` and whitespace, so an id can neither escape its hash tag nor name another key.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::auth::{Identity, User};
use crate::protocol::reason;

pub const TOPIC_PREFIX: &str = "rooms:";
pub const MAX_ROOM_ID_LEN: usize = 64;

/// A validated room id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a `rooms:` topic at all (Phoenix: "unmatched topic").
    #[error("unmatched topic")]
    Unmatched,
    #[error("invalid room id")]
    InvalidId,
}

impl TopicError {
    pub fn reason(&self) -> &'static str {
        match self {
            TopicError::Unmatched => reason::UNMATCHED_TOPIC,
            TopicError::InvalidId => reason::INVALID_ROOM_ID,
        }
    }
}

impl RoomId {
    pub fn parse(id: &str) -> Result<Self, TopicError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ROOM_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(RoomId(Arc::from(id)))
        } else {
            Err(TopicError::InvalidId)
        }
    }

    /// `rooms:<id>` → id.
    pub fn from_topic(topic: &str) -> Result<Self, TopicError> {
        let id = topic
            .strip_prefix(TOPIC_PREFIX)
            .ok_or(TopicError::Unmatched)?;
        Self::parse(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn topic(&self) -> String {
        format!("{TOPIC_PREFIX}{}", self.0)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who may join a room (field `access` of the room record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Anyone, signed in or not (the default, and what a record without the field means).
    #[default]
    Public,
    /// Only signed-in users whose token's `rooms` claim names the room (or holds `"*"`).
    Private,
}

impl Access {
    /// The record's field value; anything but `private` is public.
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("private") => Access::Private,
            _ => Access::Public,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Private => "private",
        }
    }
}

/// Why a join is refused by the room's rules (the room exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// A private room and no signed-in identity.
    NotSignedIn,
    /// A private room the token does not list, or a ban.
    NotAllowed,
}

impl JoinRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            JoinRefusal::NotSignedIn => reason::NOT_SIGNED_IN,
            JoinRefusal::NotAllowed => reason::NOT_ALLOWED,
        }
    }
}

/// May `user` (None: anonymous) join room `id` of this access? The identity is the one that
/// signs the join in: its `guardian_token` if it has one, else the connection's token.
pub fn may_join(access: Access, id: &RoomId, user: Option<&User>) -> Result<(), JoinRefusal> {
    match (access, user) {
        (Access::Public, _) => Ok(()),
        (Access::Private, None) => Err(JoinRefusal::NotSignedIn),
        (Access::Private, Some(u)) if u.rooms.allows(id.as_str()) => Ok(()),
        (Access::Private, Some(_)) => Err(JoinRefusal::NotAllowed),
    }
}

/// Why a push is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRefusal {
    NotSignedIn,
    UnknownEvent,
    /// The payload has no acceptable `body` (missing, wrong type, empty, or too large).
    InvalidPayload,
}

impl PushRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            PushRefusal::NotSignedIn => reason::NOT_SIGNED_IN,
            PushRefusal::UnknownEvent => reason::UNKNOWN_EVENT,
            PushRefusal::InvalidPayload => reason::INVALID_PAYLOAD,
        }
    }
}

/// The event whose body is a chat message: a non-empty string.
pub const NEW_MSG: &str = "new_msg";

/// What the room gets for an allowed push of `event` by `user`: exactly
/// `{"body": <body>, "user": {"id", "username"}, "at": <at_ms>}`.
///
/// Only `body` is taken from the client. Every other field is dropped, silently: a client must not
/// be able to attach an `id` (history ids are the server's), a `user`-like or `system` field that
/// receivers might trust, or bulk that `max_body_bytes` would not count. The sender comes only
/// from the verified token. `new_msg`'s body is a non-empty string of at most `max_body_bytes`
/// bytes; any other allowed event's body is any JSON value of at most `max_body_bytes` bytes
/// serialised. A missing body is refused for every event.
pub fn broadcast_payload(
    event: &str,
    payload: &Map<String, Value>,
    user: Option<&User>,
    at_ms: i64,
    max_body_bytes: usize,
) -> Result<Value, PushRefusal> {
    let body = payload.get("body").ok_or(PushRefusal::InvalidPayload)?;
    let fits = if event == NEW_MSG {
        matches!(body, Value::String(b) if !b.is_empty() && b.len() <= max_body_bytes)
    } else {
        serialized_len(body) <= max_body_bytes
    };
    if !fits {
        return Err(PushRefusal::InvalidPayload);
    }
    Ok(json!({
        "body": body,
        "user": user.map(|u| json!({"id": u.id, "username": u.username})),
        "at": at_ms,
    }))
}

/// Length of `v` as compact JSON, counted without building the text.
fn serialized_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // writing a `Value` to a sink that never fails cannot fail; if it somehow did, count it as
    // too large rather than let it through
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// Which client events may be pushed into a room.
#[derive(Debug, Clone)]
pub struct PushPolicy {
    allowed: Vec<String>,
    anonymous: Vec<String>,
}

impl PushPolicy {
    pub fn new(client_events: &[String]) -> Self {
        Self::with_anonymous(client_events, &[])
    }

    /// `anonymous_events`: what an anonymous identity may push (`rooms.anonymous_events`).
    pub fn with_anonymous(client_events: &[String], anonymous_events: &[String]) -> Self {
        Self {
            allowed: client_events.to_vec(),
            anonymous: anonymous_events.to_vec(),
        }
    }

    /// Anonymous identities may push only `rooms.anonymous_events`; anything else is `Not signed
    /// in` (checked first: an anonymous viewer learns nothing about the allow-list). Reserved names
    /// can never be pushed, whatever the configuration says.
    pub fn check(&self, identity: &Identity, event: &str) -> Result<(), PushRefusal> {
        if is_reserved(event) && identity.user().is_some() {
            return Err(PushRefusal::UnknownEvent);
        }
        let anonymous_may = !is_reserved(event) && self.anonymous.iter().any(|e| e == event);
        match identity.user() {
            // what anyone may push, a signed-in user may push too
            Some(_) if anonymous_may || self.allowed.iter().any(|e| e == event) => Ok(()),
            Some(_) => Err(PushRefusal::UnknownEvent),
            None if anonymous_may => Ok(()),
            None => Err(PushRefusal::NotSignedIn),
        }
    }
}

/// Events that only the server may send.
pub fn is_reserved(event: &str) -> bool {
    event.starts_with("phx_") || event.starts_with("presence_") || event == "heartbeat"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::User;

    #[test]
    fn room_ids() {
        assert_eq!(RoomId::from_topic("rooms:lobby").unwrap().as_str(), "lobby");
        assert!(RoomId::from_topic("rooms:A-z_09").is_ok());
        assert!(RoomId::from_topic(&format!("rooms:{}", "a".repeat(64))).is_ok());
        for bad in [
            "rooms:",
            "rooms:a}b",
            "rooms:../x",
            "rooms:a b",
            "rooms:a:b",
            "rooms:é",
            "rooms:{x}",
        ] {
            assert_eq!(RoomId::from_topic(bad), Err(TopicError::InvalidId), "{bad}");
        }
        assert_eq!(
            RoomId::from_topic(&format!("rooms:{}", "a".repeat(65))),
            Err(TopicError::InvalidId)
        );
        assert_eq!(RoomId::from_topic("room:lobby"), Err(TopicError::Unmatched));
        assert_eq!(RoomId::from_topic("phoenix"), Err(TopicError::Unmatched));
    }

    #[test]
    fn private_rooms_need_the_rooms_claim() {
        use crate::auth::RoomGrant;
        let id = RoomId::parse("vip").unwrap();
        let with = |rooms| User { rooms, ..user() };
        assert_eq!(may_join(Access::Public, &id, None), Ok(()));
        assert_eq!(may_join(Access::Public, &id, Some(&user())), Ok(()));
        assert_eq!(
            may_join(Access::Private, &id, None),
            Err(JoinRefusal::NotSignedIn)
        );
        assert_eq!(
            may_join(Access::Private, &id, Some(&user())),
            Err(JoinRefusal::NotAllowed)
        );
        let other = with(RoomGrant::Some(vec!["other".into()]));
        assert_eq!(
            may_join(Access::Private, &id, Some(&other)),
            Err(JoinRefusal::NotAllowed)
        );
        let listed = with(RoomGrant::Some(vec!["vip".into()]));
        assert_eq!(may_join(Access::Private, &id, Some(&listed)), Ok(()));
        assert_eq!(
            may_join(Access::Private, &id, Some(&with(RoomGrant::All))),
            Ok(())
        );
        assert_eq!(Access::parse(Some("private")), Access::Private);
        assert_eq!(Access::parse(None), Access::Public);
        assert_eq!(Access::parse(Some("odd")), Access::Public);
    }

    #[test]
    fn push_rules() {
        let p = PushPolicy::new(&["new_msg".to_string()]);
        let user = Identity::User(Arc::new(User {
            id: "1".into(),
            username: "a".into(),
            valid_until_ms: i64::MAX,
            rooms: crate::auth::RoomGrant::None,
        }));
        assert_eq!(
            p.check(&Identity::Anonymous, "new_msg"),
            Err(PushRefusal::NotSignedIn)
        );
        assert_eq!(
            p.check(&Identity::Anonymous, "presence_diff"),
            Err(PushRefusal::NotSignedIn)
        );
        assert_eq!(p.check(&user, "new_msg"), Ok(()));
        assert_eq!(
            p.check(&user, "presence_diff"),
            Err(PushRefusal::UnknownEvent)
        );
        assert_eq!(p.check(&user, "phx_reply"), Err(PushRefusal::UnknownEvent));
        assert_eq!(p.check(&user, "typing"), Err(PushRefusal::UnknownEvent));
        let p = PushPolicy::new(&["presence_diff".to_string()]);
        assert_eq!(
            p.check(&user, "presence_diff"),
            Err(PushRefusal::UnknownEvent)
        );
    }

    fn user() -> User {
        User {
            id: "42".into(),
            username: "ann".into(),
            valid_until_ms: i64::MAX,
            rooms: crate::auth::RoomGrant::None,
        }
    }

    #[test]
    fn anonymous_events_are_the_only_anonymous_pushes() {
        let p = PushPolicy::with_anonymous(&["new_msg".into()], &["reaction".into()]);
        assert_eq!(p.check(&Identity::Anonymous, "reaction"), Ok(()));
        assert_eq!(
            p.check(&Identity::Anonymous, "new_msg"),
            Err(PushRefusal::NotSignedIn)
        );
        let signed = Identity::User(Arc::new(user()));
        assert_eq!(
            p.check(&signed, "reaction"),
            Ok(()),
            "signed-in users may too"
        );
        assert_eq!(p.check(&signed, "typing"), Err(PushRefusal::UnknownEvent));
        // a reserved name stays refused even if configured (config validation refuses it too)
        let p = PushPolicy::with_anonymous(&[], &["phx_join".into()]);
        assert_eq!(
            p.check(&Identity::Anonymous, "phx_join"),
            Err(PushRefusal::NotSignedIn)
        );
        let out = broadcast_payload(
            "reaction",
            &obj(json!({"body": "+1", "user": "x"})),
            None,
            1,
            64,
        )
        .expect("accepted");
        assert_eq!(out, json!({"body": "+1", "user": null, "at": 1}));
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn a_broadcast_carries_only_body_user_and_at() {
        let forged = obj(json!({
            "body": "hi",
            "id": "1700000000000-0",
            "system": true,
            "user": {"id": "admin", "username": "root"},
            "username": "root",
            "at": 1,
            "x": "y".repeat(10_000),
        }));
        let out = broadcast_payload(NEW_MSG, &forged, Some(&user()), 123, 4096).expect("accepted");
        assert_eq!(
            out,
            json!({"body": "hi", "user": {"id": "42", "username": "ann"}, "at": 123})
        );
        let other = obj(json!({"body": {"typing": true}, "system": "x", "x": [1, 2, 3]}));
        let out = broadcast_payload("typing", &other, Some(&user()), 5, 4096).expect("accepted");
        assert_eq!(
            out,
            json!({"body": {"typing": true}, "user": {"id": "42", "username": "ann"}, "at": 5})
        );
    }

    #[test]
    fn bodies_are_bounded_for_every_event() {
        let u = user();
        let refuse = |event: &str, p: Value, max: usize| {
            assert_eq!(
                broadcast_payload(event, &obj(p.clone()), Some(&u), 0, max),
                Err(PushRefusal::InvalidPayload),
                "{event} {p}"
            );
        };
        // new_msg: a non-empty string of at most max bytes
        refuse(NEW_MSG, json!({}), 10);
        refuse(NEW_MSG, json!({"body": ""}), 10);
        refuse(NEW_MSG, json!({"body": 5}), 10);
        refuse(NEW_MSG, json!({"body": "12345678901"}), 10);
        refuse(NEW_MSG, json!({"body": "é".repeat(6)}), 10); // 12 bytes
        assert!(
            broadcast_payload(
                NEW_MSG,
                &obj(json!({"body": "1234567890"})),
                Some(&u),
                0,
                10
            )
            .is_ok()
        );
        // other events: any JSON value, serialised size at most max
        refuse("typing", json!({"x": 1}), 10);
        refuse("typing", json!({"body": "123456789"}), 10); // 11 bytes with quotes
        refuse("typing", json!({"body": {"k": "12345"}}), 10); // {"k":"12345"} = 13
        refuse("typing", json!({"body": ["a".repeat(100)]}), 64);
        for ok in [
            json!("12345678"),
            json!(null),
            json!(true),
            json!([1, 2, 3]),
            json!({"a": 1}),
        ] {
            assert!(
                broadcast_payload("typing", &obj(json!({"body": ok.clone()})), Some(&u), 0, 10)
                    .is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn serialized_len_matches_the_text() {
        for v in [
            json!(null),
            json!("a\"b\n"),
            json!({"k": [1, 2.5, "é"]}),
            json!([]),
        ] {
            assert_eq!(
                serialized_len(&v),
                serde_json::to_string(&v).unwrap().len(),
                "{v}"
            );
        }
    }
}
