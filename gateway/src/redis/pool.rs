//! The pool for cold paths (admin API, CLI): deadpool over a standalone server, a cluster or the
//! master Sentinel names (asked again for every new connection; a pooled connection to a server
//! that is no longer master is dropped at checkout). Every checkout costs a round trip, which is
//! why the hot path does not use it.

use deadpool::managed;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::conn::{cluster_builder, scan_cluster, scan_one};
use super::dial::Dial;
use super::sentinel::Sentinels;
use crate::config::{RedisConfig, RedisMode};

#[derive(Clone)]
pub enum Pool {
    Standalone(deadpool_redis::Pool),
    Cluster(managed::Pool<ClusterManager>),
    Sentinel(managed::Pool<SentinelManager>),
}

/// A checked-out connection (back to the pool on drop).
pub enum PoolConn {
    Standalone(deadpool_redis::Connection),
    Cluster(managed::Object<ClusterManager>),
    Sentinel(managed::Object<SentinelManager>),
}

/// Cluster connections made by the gateway's cluster client (deadpool-redis' own manager cannot
/// take the TLS files).
pub struct ClusterManager(redis::cluster::ClusterClient);

impl managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<ClusterConnection, RedisError> {
        self.0.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        redis::cmd("PING").query_async::<()>(conn).await?;
        Ok(())
    }
}

/// Connections to the master the sentinels name at the time each is made.
pub struct SentinelManager(Sentinels);

impl managed::Manager for SentinelManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        Ok(self.0.master().await?.2)
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        // after a failover the old master answers PING as a replica: ask its role
        let role: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => Ok(()),
            _ => Err(managed::RecycleError::message("no longer the master")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("redis pool: {0}")]
pub struct PoolError(String);

impl Pool {
    pub fn new(cfg: &RedisConfig) -> anyhow::Result<Self> {
        let pool = deadpool_redis::PoolConfig {
            max_size: cfg.pool_size.max(1),
            timeouts: deadpool_redis::Timeouts {
                wait: Some(cfg.command_timeout()),
                create: Some(cfg.connect_timeout()),
                recycle: Some(cfg.command_timeout()),
            },
            ..Default::default()
        };
        let rt = deadpool_redis::Runtime::Tokio1;
        Ok(match cfg.mode {
            RedisMode::Standalone => {
                let info = Dial::new(cfg)?.info(cfg.url.as_str())?;
                let mgr = deadpool_redis::Manager::new_with_config(
                    info,
                    redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(cfg.connect_timeout()))
                        .set_response_timeout(Some(cfg.command_timeout())),
                )?;
                Pool::Standalone(
                    deadpool_redis::Pool::builder(mgr)
                        .config(pool)
                        .runtime(rt)
                        .build()?,
                )
            }
            RedisMode::Cluster => Pool::Cluster(
                managed::Pool::builder(ClusterManager(cluster_builder(cfg)?.build()?))
                    .config(pool)
                    .runtime(rt)
                    .build()?,
            ),
            RedisMode::Sentinel => Pool::Sentinel(
                managed::Pool::builder(SentinelManager(Sentinels::new(cfg)?))
                    .config(pool)
                    .runtime(rt)
                    .build()?,
            ),
        })
    }

    pub async fn get(&self) -> Result<PoolConn, PoolError> {
        match self {
            Pool::Standalone(p) => p
                .get()
                .await
                .map(PoolConn::Standalone)
                .map_err(|e| PoolError(e.to_string())),
            Pool::Cluster(p) => p
                .get()
                .await
                .map(PoolConn::Cluster)
                .map_err(|e| PoolError(e.to_string())),
            Pool::Sentinel(p) => p
                .get()
                .await
                .map(PoolConn::Sentinel)
                .map_err(|e| PoolError(e.to_string())),
        }
    }
}

impl PoolConn {
    /// See [`super::Redis::publish_command`].
    pub fn publish_command(&self) -> &'static str {
        match self {
            PoolConn::Standalone(_) | PoolConn::Sentinel(_) => "PUBLISH",
            PoolConn::Cluster(_) => "SPUBLISH",
        }
    }

    /// Every key matching `pattern`, on every master of a cluster.
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        match self {
            PoolConn::Standalone(c) => scan_one(c, pattern).await,
            PoolConn::Sentinel(c) => scan_one(&mut **c, pattern).await,
            PoolConn::Cluster(c) => scan_cluster(c, pattern).await,
        }
    }
}

impl ConnectionLike for PoolConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            PoolConn::Standalone(c) => c.req_packed_command(cmd),
            PoolConn::Cluster(c) => c.req_packed_command(cmd),
            PoolConn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            PoolConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            PoolConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            PoolConn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            PoolConn::Standalone(c) => c.get_db(),
            PoolConn::Cluster(c) => c.get_db(),
            PoolConn::Sentinel(c) => c.get_db(),
        }
    }
}
