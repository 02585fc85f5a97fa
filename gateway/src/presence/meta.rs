//! The presence wire types both sides share: a signed-in connection's [`Meta`] as stored in the
//! room's presence hash, the [`Envelope`] a script publishes for one change, and a whole-room
//! [`Snapshot`]. Plain data (serde), no Redis and no sockets: the [`super::Store`] reads them out of
//! script replies, the [`super::Mirror`] applies them.

use std::collections::HashMap;

use serde::Deserialize;

/// One signed-in connection's meta, as stored in `<p>:room:{R}:presence`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Meta {
    pub user_id: String,
    pub username: String,
    pub online_at: i64,
    #[serde(default)]
    pub node: String,
}

/// A presence change as published by the scripts (see `lua/common.lua`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    pub seq: u64,
    pub anon: u64,
    #[serde(default)]
    pub joins: HashMap<String, Meta>,
    #[serde(default)]
    pub leaves: Vec<String>,
}

/// A whole-room snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub seq: u64,
    pub anon: u64,
    pub metas: HashMap<String, Meta>,
}

/// Builds the meta JSON stored for a signed-in connection.
pub fn meta_json(user_id: &str, username: &str, online_at: i64, node: &str) -> String {
    serde_json::to_string(&Meta {
        user_id: user_id.to_string(),
        username: username.to_string(),
        online_at,
        node: node.to_string(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_parses_the_script_format() {
        let e: Envelope = serde_json::from_str(
            r#"{"seq":1795000000000001,"anon":3,"joins":{"n.1":{"user_id":"7","username":"a","online_at":5,"node":"n"}},"leaves":["m.2"]}"#,
        ).unwrap();
        assert_eq!(e.seq, 1795000000000001);
        assert_eq!(e.joins["n.1"].user_id, "7");
        assert_eq!(e.leaves, vec!["m.2"]);
        let e: Envelope =
            serde_json::from_str(r#"{"seq":2,"anon":0,"joins":{},"leaves":[]}"#).unwrap();
        assert!(e.joins.is_empty());
    }
}
