//! The pool for cold paths (admin API, CLI): deadpool-redis over a standalone server or a
//! cluster. Every checkout costs a `PING` round trip, which is why the hot path does not use it.

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::conn::{scan_cluster, scan_one};
use crate::config::{RedisConfig, RedisMode};

#[derive(Clone)]
pub enum Pool {
    Standalone(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A checked-out connection (back to the pool on drop).
pub enum PoolConn {
    Standalone(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
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
        let rt = Some(deadpool_redis::Runtime::Tokio1);
        Ok(match cfg.mode {
            RedisMode::Standalone => {
                let mut pc = deadpool_redis::Config::from_url(cfg.url.clone());
                pc.pool = Some(pool);
                Pool::Standalone(pc.create_pool(rt)?)
            }
            RedisMode::Cluster => {
                let urls: Vec<String> = cfg.urls().into_iter().map(String::from).collect();
                let mut pc = deadpool_redis::cluster::Config::from_urls(urls);
                pc.pool = Some(pool);
                Pool::Cluster(pc.create_pool(rt)?)
            }
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
        }
    }
}

impl PoolConn {
    /// See [`super::Redis::publish_command`].
    pub fn publish_command(&self) -> &'static str {
        match self {
            PoolConn::Standalone(_) => "PUBLISH",
            PoolConn::Cluster(_) => "SPUBLISH",
        }
    }

    /// Every key matching `pattern`, on every master of a cluster.
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        match self {
            PoolConn::Standalone(c) => scan_one(c, pattern).await,
            PoolConn::Cluster(c) => scan_cluster(c, pattern).await,
        }
    }
}

impl ConnectionLike for PoolConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            PoolConn::Standalone(c) => c.req_packed_command(cmd),
            PoolConn::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            PoolConn::Standalone(c) => c.get_db(),
            PoolConn::Cluster(c) => c.get_db(),
        }
    }
}
