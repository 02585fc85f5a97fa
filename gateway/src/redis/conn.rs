//! [`Redis`]: the shared multiplexed connection of the hot path, standalone, cluster or the
//! master named by Sentinel. Everything
//! above `redis/` talks to this type and never learns the mode: a command or a script goes to the
//! node that owns its first key (cluster) or to the one server (standalone); work for many rooms is
//! grouped per master with [`Redis::group_by_shard`]; listings scan every master.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::cluster::{Shard, parse_slots, slot};
use super::dial::Dial;
use super::sentinel::Failover;
use crate::config::{RedisConfig, RedisMode};

#[derive(Clone)]
enum Inner {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<Failover>),
}

/// The hot connection (cheap to clone: clones share one multiplexed connection per server).
#[derive(Clone)]
pub struct Redis {
    inner: Inner,
    /// Cluster: the masters and their slots as last read (refreshed after topology events).
    shards: Arc<Mutex<Vec<Shard>>>,
}

impl Redis {
    /// Connects the hot path. Standalone: a `ConnectionManager` that reconnects by itself.
    /// Cluster: a cluster connection that follows `MOVED`/`ASK` and refreshes its slot map.
    /// Sentinel: the master the sentinels name, asked again after a failover.
    pub async fn connect(cfg: &RedisConfig) -> RedisResult<Self> {
        let inner = match cfg.mode {
            RedisMode::Standalone => {
                let client = Dial::new(cfg)?.client(cfg.url.as_str())?;
                let mcfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(cfg.command_timeout()))
                    .set_connection_timeout(Some(cfg.connect_timeout()))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                Inner::Standalone(client.get_connection_manager_with_config(mcfg).await?)
            }
            RedisMode::Cluster => Inner::Cluster(
                cluster_builder(cfg)?
                    .build()?
                    .get_async_connection()
                    .await?,
            ),
            RedisMode::Sentinel => Inner::Sentinel(Failover::connect(cfg).await?),
        };
        let r = Self {
            inner,
            shards: Arc::new(Mutex::new(Vec::new())),
        };
        if r.is_cluster() {
            r.refresh_shards().await?;
        }
        Ok(r)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }

    /// How the subscriber reaches the one server (standalone) or the master of the moment
    /// (sentinel: the sentinels are asked again); `None` in a cluster.
    pub(crate) async fn pubsub_target(
        &self,
        cfg: &RedisConfig,
    ) -> RedisResult<Option<redis::ConnectionInfo>> {
        match &self.inner {
            Inner::Standalone(_) => Dial::new(cfg)?.info(cfg.url.as_str()).map(Some),
            Inner::Sentinel(f) => f.refresh().await.map(Some),
            Inner::Cluster(_) => Ok(None),
        }
    }

    /// The command that publishes a room event: `SPUBLISH` (shard channel, touches only the
    /// room's shard) in a cluster, `PUBLISH` on a standalone server.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// `PING`: the server, or in a cluster the first master of the last-read map to answer (each
    /// shard's reachability is the subscriber's per-shard probe's business; a plain `PING` there
    /// would need every node, replicas included).
    pub async fn ping(&self) -> RedisResult<()> {
        match &self.inner {
            Inner::Standalone(c) => redis::cmd("PING").query_async(&mut c.clone()).await,
            Inner::Sentinel(_) => redis::cmd("PING").query_async(&mut self.clone()).await,
            Inner::Cluster(c) => {
                // every master at once, the first answer wins: a random one could be the master
                // that just died, and would make every node unready for a shard most do not need
                let route = |host, port| {
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port })
                };
                let mut pings: Vec<_> = self
                    .shards()
                    .into_iter()
                    .map(|s| route(s.host, s.port))
                    .collect();
                if pings.is_empty() {
                    pings.push(RoutingInfo::SingleNode(
                        SingleNodeRoutingInfo::RandomPrimary,
                    ));
                }
                let pings = pings.into_iter().map(|r| {
                    let mut c = c.clone();
                    Box::pin(async move { c.route_command(redis::cmd("PING"), r).await })
                });
                futures_util::future::select_ok(pings).await.map(|_| ())
            }
        }
    }

    /// Reads the slot map (`CLUSTER SLOTS`) again; a no-op on a standalone server.
    pub async fn refresh_shards(&self) -> RedisResult<()> {
        let Inner::Cluster(c) = &self.inner else {
            return Ok(());
        };
        let shards = masters(&mut c.clone()).await?;
        *self.shards.lock().unwrap_or_else(PoisonError::into_inner) = shards;
        Ok(())
    }

    /// The masters as last read (empty on a standalone server).
    pub fn shards(&self) -> Vec<Shard> {
        self.shards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Groups items by the master that owns their key's slot: one group on a standalone server.
    /// Each group goes out as one pipeline with [`Redis::pipeline_on_shard`]; an item whose slot
    /// moved since the map was read fails alone (`MOVED`), and is retried after
    /// [`Redis::refresh_shards`].
    pub fn group_by_shard<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
        let keys: Vec<&str> = keys.collect();
        if !self.is_cluster() {
            return if keys.is_empty() {
                Vec::new()
            } else {
                vec![(0..keys.len()).collect()]
            };
        }
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); shards.len() + 1];
        for (i, k) in keys.iter().enumerate() {
            let s = slot(k.as_bytes());
            let at = shards
                .iter()
                .position(|sh| sh.owns(s))
                .unwrap_or(shards.len());
            groups[at].push(i);
        }
        drop(shards);
        // items of an unknown slot each go alone, routed by their own key
        let unknown = groups.pop().unwrap_or_default();
        groups.retain(|g| !g.is_empty());
        groups.extend(unknown.into_iter().map(|i| vec![i]));
        groups
    }

    /// Sends `pipe` (every command on the master of `key`'s slot, see [`Redis::group_by_shard`])
    /// and returns one raw value per command: a failed command is a `Value::ServerError` in its
    /// place (read it with `Value::extract_error`), the others are unaffected. The cluster client
    /// refuses a pipeline whose commands name several slots unless it is routed explicitly, so it
    /// goes explicitly to the master of `key`'s slot.
    pub async fn pipeline_on_shard(&self, pipe: &Pipeline, key: &str) -> RedisResult<Vec<Value>> {
        let n = pipe.len();
        match &self.inner {
            Inner::Standalone(c) => c.clone().req_packed_commands(pipe, 0, n).await,
            Inner::Sentinel(_) => self.clone().req_packed_commands(pipe, 0, n).await,
            Inner::Cluster(c) => {
                // routed by the client's own slot map, which follows failovers by itself
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(
                    slot(key.as_bytes()),
                    SlotAddr::Master,
                ));
                c.clone().route_pipeline(pipe.clone(), 0, n, route).await
            }
        }
    }

    /// `redis_version` of the server, or of every master of a cluster, as `(server, version)`
    /// (`server` is empty for a standalone server: the caller knows its URL).
    pub async fn server_versions(&self) -> RedisResult<Vec<(String, String)>> {
        let info = redis::cmd("INFO").arg("server").clone();
        let read = |v: Value| -> RedisResult<String> {
            let text: String = redis::from_redis_value(v)?;
            Ok(info_field(&text, "redis_version")
                .unwrap_or("unknown")
                .to_string())
        };
        match &self.inner {
            Inner::Standalone(_) | Inner::Sentinel(_) => {
                let v = info.query_async(&mut self.clone()).await?;
                Ok(vec![(String::new(), read(v)?)])
            }
            Inner::Cluster(c) => {
                let mut out = Vec::new();
                for sh in masters(&mut c.clone()).await? {
                    let v = c
                        .clone()
                        .route_command(
                            info.clone(),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                host: sh.host.clone(),
                                port: sh.port,
                            }),
                        )
                        .await?;
                    out.push((format!("{}:{}", sh.host, sh.port), read(v)?));
                }
                Ok(out)
            }
        }
    }

    /// Every key matching `pattern` on every master, found with `SCAN` (never `KEYS`).
    pub async fn scan_match(&self, pattern: &str) -> RedisResult<Vec<String>> {
        match &self.inner {
            Inner::Standalone(c) => scan_one(&mut c.clone(), pattern).await,
            Inner::Sentinel(_) => scan_one(&mut self.clone(), pattern).await,
            Inner::Cluster(c) => scan_cluster(&mut c.clone(), pattern).await,
        }
    }
}

/// The oldest Redis the gateway runs on: history recovery reads `entries-added` of
/// `XINFO STREAM` (7.0), and cluster rooms use sharded pub/sub (7.0). On 6.2 a stale `since`
/// would be answered `recovered: true` over a gap, so an older server is refused at start.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// A field of an `INFO` reply (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Whether `version` (`7.0.15`, `6.2.14`, `255.255.255` for unstable builds) is at least
/// [`MIN_VERSION`]; an unreadable one is refused too.
pub fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_VERSION,
        _ => false,
    }
}

/// `SCAN … MATCH pattern` to the end on one server.
pub(crate) async fn scan_one(
    c: &mut (impl ConnectionLike + Send + Sync),
    pattern: &str,
) -> RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut it: redis::AsyncIter<String> = redis::AsyncCommands::scan_match(c, pattern).await?;
    while let Some(k) = it.next_item().await {
        keys.push(k?);
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The masters of a cluster, read with `CLUSTER SLOTS`.
pub(crate) async fn masters(c: &mut ClusterConnection) -> RedisResult<Vec<Shard>> {
    let v = c
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    parse_slots(&v).ok_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Parse, "unreadable CLUSTER SLOTS reply"))
    })
}

/// `SCAN … MATCH pattern` to the end on every master of a cluster.
pub(crate) async fn scan_cluster(
    c: &mut ClusterConnection,
    pattern: &str,
) -> RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    for sh in masters(c).await? {
        let mut cursor: u64 = 0;
        loop {
            let cmd = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500)
                .clone();
            let v = c
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: sh.host.clone(),
                        port: sh.port,
                    }),
                )
                .await?;
            let (next, batch): (u64, Vec<String>) = redis::from_redis_value(v)?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The cluster client settings shared by the hot connection, the pool and the subscriber: every
/// seed URL with its credentials, and the TLS files when the seeds are `rediss://`.
/// Retries of a cluster request answered `CLUSTERDOWN`/`TRYAGAIN` (or routed to a node being
/// replaced), and the bounds of the pause before each (redis-rs draws it between the minimum and
/// 10 ms × 2^retry, capped by the maximum). redis-rs's own minimum is 1,280 ms: with it, a
/// request to a *healthy* master that met the cluster's short `CLUSTERDOWN` window during
/// another shard's failover waited 1.28 s (measured: 1,282–1,286 ms in every failover). With
/// 50–150 ms pauses it goes through within a pause of the window's end. Sixteen of them (0.8–2.4 s
/// together, ≈ 1.5 s typically) outlast the window (0.9–1.1 s measured); ten pauses of 50–250 ms
/// did not always (a push failed `CLUSTERDOWN` after 833 ms in one CI run).
const CLUSTER_RETRIES: u32 = 16;
const CLUSTER_RETRY_MIN_MS: u64 = 50;
const CLUSTER_RETRY_MAX_MS: u64 = 150;

pub(crate) fn cluster_builder(cfg: &RedisConfig) -> RedisResult<ClusterClientBuilder> {
    let dial = Dial::new(cfg)?;
    let mut b = ClusterClientBuilder::new(cfg.urls())
        .connection_timeout(cfg.connect_timeout())
        .response_timeout(cfg.command_timeout())
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_RETRY_MIN_MS)
        .max_retry_wait(CLUSTER_RETRY_MAX_MS);
    if cfg.uses_tls()
        && let Some(certs) = dial.certificates()
    {
        b = b.certs(certs);
    }
    Ok(b)
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Standalone(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move {
                    let r = f.conn().req_packed_command(cmd).await;
                    if let Err(e) = &r {
                        f.on_error(e);
                    }
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move {
                    let r = f.conn().req_packed_commands(pipeline, offset, count).await;
                    if let Err(e) = &r {
                        f.on_error(e);
                    }
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Standalone(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
            Inner::Sentinel(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_from_info_and_refuses_below_7_0() {
        let info = "# Server\r\nredis_version:6.2.14\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("6.2.14"));
        assert_eq!(info_field(info, "redis_mode"), None);
        assert!(!version_supported("6.2.14"));
        assert!(!version_supported("5.0.7"));
        assert!(!version_supported("unknown"));
        assert!(!version_supported(""));
        assert!(version_supported("7.0.0"));
        assert!(version_supported("7.0.15"));
        assert!(version_supported("7.2.4"));
        assert!(version_supported("8.0.1"));
        assert!(version_supported("255.255.255"));
    }
}
