//! The Lua scripts of `lua/`, compiled into the binary. Each presence script is `lua/common.lua`
//! followed by the script itself (Redis has no `require`); the history scripts (`publish`,
//! `history`) stand alone. They run by SHA (`EVALSHA`) and are loaded again when Redis answers
//! `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).

use redis::Script;

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("../../../lua/common.lua"),
            include_str!(concat!("../../../lua/", $file))
        ))
    };
}

/// `lua/publish.lua`: a broadcast appended to the room's history stream and published.
pub const PUBLISH_LUA: &str = include_str!("../../../lua/publish.lua");
/// `lua/history.lua`: a read of the room's history stream.
pub const HISTORY_LUA: &str = include_str!("../../../lua/history.lua");

/// The loaded scripts.
pub struct Scripts {
    pub join: Script,
    pub leave: Script,
    pub heartbeat: Script,
    pub snapshot: Script,
    pub sync: Script,
    pub publish: Script,
    pub history: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            join: script!("join.lua"),
            leave: script!("leave.lua"),
            heartbeat: script!("heartbeat.lua"),
            snapshot: script!("snapshot.lua"),
            sync: script!("sync.lua"),
            publish: Script::new(PUBLISH_LUA),
            history: Script::new(HISTORY_LUA),
        }
    }

    fn all(&self) -> [(&'static str, &Script); 7] {
        [
            ("join", &self.join),
            ("leave", &self.leave),
            ("heartbeat", &self.heartbeat),
            ("snapshot", &self.snapshot),
            ("sync", &self.sync),
            ("publish", &self.publish),
            ("history", &self.history),
        ]
    }

    /// `SCRIPT LOAD`s every script (at start-up, and after `NOSCRIPT` in a pipeline).
    pub async fn load_all(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<()> {
        for (_, s) in self.all() {
            s.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Name and SHA of each script (for logs and operators).
    pub fn hashes(&self) -> Vec<(&'static str, String)> {
        self.all()
            .iter()
            .map(|(n, s)| (*n, s.get_hash().to_string()))
            .collect()
    }
}
