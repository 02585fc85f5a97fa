//! The node's subscriber: one connection to a standalone server (`SUBSCRIBE`), or in a cluster one
//! connection per shard the node needs, made and re-made by the cluster client (`SSUBSCRIBE` on
//! shard channels, re-subscribed by the library after a disconnection or a failover). Either way
//! the caller sees one stream of [`Event`]s, and [`Event::Interrupted`] whenever messages may have
//! been missed, so it can re-snapshot what it mirrors.
//!
//! A slot that moves to another master takes its shard channels with it: the old owner pushes a
//! `sunsubscribe` for each, the library forgets them and does not subscribe them again. That
//! push, when this side did not ask for it, is reported as [`Event::Dropped`]; the caller
//! subscribes the channel again (the library routes it to the slot's new owner).

use std::collections::HashMap;

use futures_util::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::{PushKind, RedisResult};
use tokio::sync::mpsc;

use super::Redis;
use super::cluster::tag_on;
use super::conn::{cluster_builder, masters};
use crate::config::RedisConfig;

/// What the subscriber hears.
pub enum Event {
    Message {
        channel: String,
        payload: Vec<u8>,
    },
    /// A shard connection dropped, or the client re-subscribed after a disconnection or a
    /// topology change: messages published meanwhile were lost.
    Interrupted(&'static str),
    /// The server unsubscribed this shard channel by itself (its slot moved to another master):
    /// nothing arrives on it until it is subscribed again.
    Dropped(String),
}

enum Inner {
    Standalone {
        sink: redis::aio::PubSubSink,
        stream: redis::aio::PubSubStream,
    },
    Cluster {
        conn: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
        /// Confirmations this side asked for and has not seen yet: any other `ssubscribe`
        /// confirmation is the library re-subscribing.
        expected: HashMap<String, usize>,
        /// `sunsubscribe` confirmations this side asked for and has not seen yet: any other one
        /// is the server dropping the channel (a slot move).
        leaving: HashMap<String, usize>,
    },
}

pub struct Subscriber {
    inner: Inner,
}

/// Publishes on the channel kind the subscriber listens to (`PUBLISH` or `SPUBLISH`). In a
/// cluster it goes through the subscriber's own cluster connection, so a failover that only this
/// traffic would notice refreshes the subscriber's slot map (and so its subscriptions).
#[derive(Clone)]
pub enum Publisher {
    Hot(Redis),
    Cluster(ClusterConnection),
}

impl Publisher {
    pub async fn publish(&mut self, channel: &str, payload: &[u8]) -> RedisResult<i64> {
        match self {
            Publisher::Hot(r) => {
                redis::cmd(r.publish_command())
                    .arg(channel)
                    .arg(payload)
                    .query_async(r)
                    .await
            }
            Publisher::Cluster(c) => {
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async(c)
                    .await
            }
        }
    }
}

impl Subscriber {
    /// Connects; `name` labels a standalone (or sentinel-found master's) connection in
    /// `CLIENT LIST`. In sentinel mode the sentinels are asked for the master first.
    pub async fn connect(cfg: &RedisConfig, name: &str, hot: &Redis) -> RedisResult<Self> {
        if let Some(info) = hot.pubsub_target(cfg).await? {
            let dial = super::dial::Dial::new(cfg)?;
            let (sink, stream) = super::named_pubsub(&dial, &info, name).await?.split();
            return Ok(Self {
                inner: Inner::Standalone { sink, stream },
            });
        }
        let (tx, pushes) = mpsc::unbounded_channel();
        let conn = cluster_builder(cfg)?
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?
            .get_async_connection()
            .await?;
        Ok(Self {
            inner: Inner::Cluster {
                conn,
                pushes,
                expected: HashMap::new(),
                leaving: HashMap::new(),
            },
        })
    }

    /// Whether the connection re-establishes itself and its subscriptions (cluster), so the
    /// caller never needs to rebuild it; a standalone subscriber is rebuilt by the caller.
    pub fn reconnects_itself(&self) -> bool {
        matches!(self.inner, Inner::Cluster { .. })
    }

    /// See [`Publisher`].
    pub fn publisher(&self, hot: &Redis) -> Publisher {
        match &self.inner {
            Inner::Standalone { .. } => Publisher::Hot(hot.clone()),
            Inner::Cluster { conn, .. } => Publisher::Cluster(conn.clone()),
        }
    }

    /// One liveness-probe channel per shard: `<base>` on a standalone server; in a cluster
    /// `<base>:{<base>-<n>}` for each master, with a tag that hashes to one of its slots.
    pub async fn probe_channels(&mut self, base: &str) -> RedisResult<Vec<String>> {
        match &mut self.inner {
            Inner::Standalone { .. } => Ok(vec![base.to_string()]),
            Inner::Cluster { conn, .. } => Ok(masters(conn)
                .await?
                .iter()
                .filter_map(|sh| tag_on(sh, base))
                .map(|t| format!("{base}:{{{t}}}"))
                .collect()),
        }
    }

    /// Subscribes, waiting for every confirmation. In a cluster each channel goes to its own
    /// shard (one `SSUBSCRIBE` per channel: channels of different slots cannot share one).
    pub async fn subscribe(&mut self, channels: &[&str]) -> RedisResult<()> {
        match &mut self.inner {
            Inner::Standalone { sink, .. } => sink.subscribe(channels).await,
            Inner::Cluster { conn, expected, .. } => {
                for ch in channels {
                    *expected.entry(ch.to_string()).or_default() += 1;
                    if let Err(e) = conn.ssubscribe(*ch).await {
                        expected.remove(*ch);
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }

    pub async fn unsubscribe(&mut self, channels: &[&str]) -> RedisResult<()> {
        match &mut self.inner {
            Inner::Standalone { sink, .. } => sink.unsubscribe(channels).await,
            Inner::Cluster {
                conn,
                expected,
                leaving,
                ..
            } => {
                for ch in channels {
                    expected.remove(*ch);
                    *leaving.entry(ch.to_string()).or_default() += 1;
                    if let Err(e) = conn.sunsubscribe(*ch).await {
                        // no confirmation comes: a later `sunsubscribe` is not this one's
                        forget(leaving, ch);
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }

    /// The next event; `None` when the connection is gone for good (standalone: reconnect and
    /// subscribe again). A cluster subscriber never ends: the client reconnects by itself.
    pub async fn next(&mut self) -> Option<Event> {
        match &mut self.inner {
            Inner::Standalone { stream, .. } => stream.next().await.map(|m| Event::Message {
                channel: m.get_channel_name().to_string(),
                payload: m.get_payload_bytes().to_vec(),
            }),
            Inner::Cluster {
                pushes,
                expected,
                leaving,
                ..
            } => loop {
                let p = pushes.recv().await?;
                match p.kind {
                    PushKind::SMessage | PushKind::Message => {
                        if let Some(m) = redis::Msg::from_push_info(p) {
                            return Some(Event::Message {
                                channel: m.get_channel_name().to_string(),
                                payload: m.get_payload_bytes().to_vec(),
                            });
                        }
                    }
                    PushKind::Disconnection => return Some(Event::Interrupted("disconnect")),
                    // a confirmation this side did not ask for: the library re-subscribed
                    PushKind::SSubscribe if !forget(expected, &push_channel(&p)) => {
                        return Some(Event::Interrupted("resubscribe"));
                    }
                    PushKind::SUnsubscribe => {
                        let ch = push_channel(&p);
                        if !forget(leaving, &ch) && !ch.is_empty() {
                            return Some(Event::Dropped(ch));
                        }
                    }
                    _ => {}
                }
            },
        }
    }
}

/// The channel a subscription push is about (empty if it names none).
fn push_channel(p: &redis::PushInfo) -> String {
    match p.data.first() {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Takes one awaited confirmation of `ch` off `awaited`; false if none was awaited.
fn forget(awaited: &mut HashMap<String, usize>, ch: &str) -> bool {
    match awaited.get_mut(ch) {
        Some(n) if *n > 1 => *n -= 1,
        Some(_) => {
            awaited.remove(ch);
        }
        None => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awaited_confirmations_are_taken_one_at_a_time() {
        let mut awaited = HashMap::new();
        *awaited.entry("a".to_string()).or_default() += 2;
        assert!(forget(&mut awaited, "a"));
        assert!(forget(&mut awaited, "a"));
        // a third `sunsubscribe` of "a" was not asked for: the server dropped the channel
        assert!(!forget(&mut awaited, "a"));
        assert!(!forget(&mut awaited, "b"));
        assert!(awaited.is_empty());
    }
}
