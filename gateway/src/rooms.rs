//! The domain rules: what a room id is, which topics are rooms, and who may push what.
//!
//! A [`RoomId`] can only be built through validation, so every Redis key built from one (see
//! `redis::keys`) is built from a checked id: `^[A-Za-z0-9_-]{1,64}$` excludes `{`, `}`, `:`, `.`,
//! `/` and whitespace, so an id can neither escape its hash tag nor name another key.

use std::fmt;
use std::sync::Arc;

use crate::auth::Identity;
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

/// Why a push is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRefusal {
    NotSignedIn,
    UnknownEvent,
}

impl PushRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            PushRefusal::NotSignedIn => reason::NOT_SIGNED_IN,
            PushRefusal::UnknownEvent => reason::UNKNOWN_EVENT,
        }
    }
}

/// Which client events may be pushed into a room.
#[derive(Debug, Clone)]
pub struct PushPolicy {
    allowed: Vec<String>,
}

impl PushPolicy {
    pub fn new(client_events: &[String]) -> Self {
        Self {
            allowed: client_events.to_vec(),
        }
    }

    /// Anonymous identities may push nothing (checked first: an anonymous viewer learns nothing
    /// about the allow-list). Reserved names can never be pushed, whatever the configuration says.
    pub fn check(&self, identity: &Identity, event: &str) -> Result<(), PushRefusal> {
        if identity.user().is_none() {
            return Err(PushRefusal::NotSignedIn);
        }
        if is_reserved(event) || !self.allowed.iter().any(|e| e == event) {
            return Err(PushRefusal::UnknownEvent);
        }
        Ok(())
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
    fn push_rules() {
        let p = PushPolicy::new(&["new_msg".to_string()]);
        let user = Identity::User(Arc::new(User {
            id: "1".into(),
            username: "a".into(),
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
}
