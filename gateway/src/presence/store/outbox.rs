//! The events hook's acknowledgements in Redis: once the application answered a batch with a 2xx
//! (or its retries ran out), the batch's entries leave each room's outbox
//! (`<p>:room:{R}:unacked`, written by the scripts) — one `HDEL` per room per batch, sent side by
//! side over the hot multiplexed connection (so pipelined; in Cluster mode each goes to its
//! room's slot). A failed `HDEL` is logged and counted: the entry stays and is re-posted later
//! with the same id (the heartbeat's scan takes it over once stale), a repeat the application
//! drops by id, never a loss.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::hooks::events::Outbox;
use crate::metrics::{Metrics, redis_op};

/// The rooms' outboxes, reached over the presence store's connection.
pub struct RoomOutbox {
    conn: crate::redis::Redis,
    timeout: Duration,
    metrics: Metrics,
}

impl RoomOutbox {
    pub fn new(conn: crate::redis::Redis, timeout: Duration, metrics: Metrics) -> Self {
        Self {
            conn,
            timeout,
            metrics,
        }
    }

    async fn hdel(&self, key: Arc<str>, ids: Vec<String>) {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&*key).arg(&ids);
        match tokio::time::timeout(self.timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.metrics.redis_error(redis_op::EVENTS_ACK);
                tracing::warn!(%key, events = ids.len(), error = %e, "events outbox: acknowledgement failed");
            }
            Err(_) => {
                self.metrics.redis_error(redis_op::EVENTS_ACK);
                tracing::warn!(%key, events = ids.len(), "events outbox: acknowledgement timed out");
            }
        }
    }
}

impl Outbox for RoomOutbox {
    fn ack(
        &self,
        entries: Vec<(Arc<str>, Vec<String>)>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            futures_util::future::join_all(entries.into_iter().map(|(k, ids)| self.hdel(k, ids)))
                .await;
        })
    }
}
