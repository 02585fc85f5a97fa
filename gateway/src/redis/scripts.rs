//! The Lua scripts of `lua/`, compiled into the binary. Each presence script is `lua/common.lua`
//! followed by the script itself (Redis has no `require`); the history scripts (`publish`,
//! `history`) stand alone. They run by SHA (`EVALSHA`) and are loaded again when Redis answers
//! `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).

use redis::Script;

macro_rules! script {
    ($file:literal, $cluster:expr) => {
        script(
            concat!(
                include_str!("../../../lua/common.lua"),
                include_str!(concat!("../../../lua/", $file))
            ),
            $cluster,
        )
    };
}

/// The script's text, with `PUBLISH` turned into `SPUBLISH` for a cluster: room events travel on
/// shard channels there, and a script may only touch its own slot.
fn script(text: &str, cluster: bool) -> Script {
    if cluster {
        Script::new(&text.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))
    } else {
        Script::new(text)
    }
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

impl Scripts {
    /// The scripts for the Redis behind `redis`.
    pub fn for_redis(redis: &super::Redis) -> Self {
        Self::new(redis.is_cluster())
    }

    /// The scripts for a standalone server, or (`cluster`) for Redis Cluster.
    pub fn new(cluster: bool) -> Self {
        Self {
            join: script!("join.lua", cluster),
            leave: script!("leave.lua", cluster),
            heartbeat: script!("heartbeat.lua", cluster),
            snapshot: script!("snapshot.lua", cluster),
            sync: script!("sync.lua", cluster),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_scripts_publish_on_shard_channels() {
        let (s, c) = (Scripts::new(false), Scripts::new(true));
        for ((name, a), (_, b)) in s.all().iter().zip(c.all().iter()) {
            // publish/history take the publish command as an argument
            if *name != "publish" && *name != "history" {
                assert_ne!(a.get_hash(), b.get_hash(), "{name}");
            }
        }
        let text = include_str!("../../../lua/common.lua");
        assert!(text.contains("redis.call('PUBLISH'"));
        assert!(!text.contains("SPUBLISH"));
    }
}
