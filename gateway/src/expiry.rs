//! Token lifetimes of open sockets and channels: one deadline list per node, sorted by time, and
//! one task that acts on what is due. No timer per socket: an idle signed-in socket costs one
//! entry in the list (a few dozen bytes), an anonymous one nothing.
//!
//! * A connection token (query or subprotocol) that expires closes its socket with
//!   [`close::TOKEN_EXPIRED`] (4001); the session's end removes its presence, and phoenix.js
//!   reconnects (with a fresh token when the application passes `params` as a function).
//! * A per-join `guardian_token` that expires ends that channel only: its presence leaves and it
//!   gets `phx_error` (phoenix.js rejoins, asking its params function again); the socket's other
//!   channels are untouched.
//!
//! A token is valid until `exp + auth.leeway_s` (what the verifier accepts), so that is the
//! deadline; the task wakes at the earliest one, never more than [`TICK`] late.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::fanout::{Hub, Room};
use crate::outbox::Outbox;
use crate::protocol::{self, close};

/// The task looks at the list at least this often (a deadline added meanwhile that is earlier
/// than the one it sleeps for wakes it at once).
const TICK: Duration = Duration::from_secs(1);

/// What to do when a token runs out.
pub enum Expiring {
    /// The connection's own token: close the socket.
    Socket(Outbox),
    /// A channel's `guardian_token`: leave the room and tell the channel.
    Channel {
        out: Outbox,
        room: Arc<Room>,
        socket: u64,
        conn: Arc<str>,
        join_ref: Arc<str>,
    },
}

/// An entry's place in the list, to take it out again (the socket closed, the channel left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpiryKey {
    at_ms: i64,
    id: u64,
}

/// The node's deadline list.
#[derive(Default)]
pub struct Expiries {
    list: Mutex<BTreeMap<ExpiryKey, Expiring>>,
    next_id: AtomicU64,
    wake: Notify,
}

impl Expiries {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ExpiryKey, Expiring>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a deadline (Unix ms); returns the key that removes it.
    pub fn add(&self, at_ms: i64, what: Expiring) -> ExpiryKey {
        let key = ExpiryKey {
            at_ms,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        };
        let mut list = self.lock();
        let earliest = list.keys().next().is_none_or(|k| key < *k);
        list.insert(key, what);
        drop(list);
        if earliest {
            self.wake.notify_one();
        }
        key
    }

    pub fn remove(&self, key: ExpiryKey) {
        self.lock().remove(&key);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every entry due at `now_ms`.
    fn take_due(&self, now_ms: i64) -> Vec<Expiring> {
        let mut list = self.lock();
        let later = list.split_off(&ExpiryKey {
            at_ms: now_ms + 1,
            id: 0,
        });
        std::mem::replace(&mut *list, later).into_values().collect()
    }

    fn next_due(&self) -> Option<i64> {
        self.lock().keys().next().map(|k| k.at_ms)
    }

    /// Acts on due deadlines for the life of the process.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>) {
        loop {
            let now = crate::unix_ms();
            for e in self.take_due(now) {
                match e {
                    Expiring::Socket(out) => out.close(close::TOKEN_EXPIRED),
                    Expiring::Channel {
                        out,
                        room,
                        socket,
                        conn,
                        join_ref,
                    } => {
                        // the leave waits on Redis: in its own task, so that a slow or paused
                        // Redis never holds back the 4001s and phx_errors due at the same moment
                        let hub = hub.clone();
                        tokio::spawn(async move {
                            if hub.expire_member(&room, socket, &conn, &join_ref).await {
                                out.send(protocol::phx_error(
                                    &join_ref,
                                    room.topic(),
                                    "token expired",
                                ));
                            }
                        });
                    }
                }
            }
            let pause = self
                .next_due()
                .map_or(TICK, |at| {
                    Duration::from_millis((at - crate::unix_ms()).max(0) as u64)
                })
                .min(TICK);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Expiring {
        Expiring::Socket(Outbox::new(
            crate::outbox::Limits::frames(4),
            crate::metrics::Metrics::new(),
        ))
    }

    #[test]
    fn due_entries_come_out_in_order_and_later_ones_stay() {
        let e = Expiries::default();
        e.add(300, socket());
        let k = e.add(100, socket());
        e.add(200, socket());
        e.add(100, socket());
        assert_eq!(e.next_due(), Some(100));
        e.remove(k);
        assert_eq!(
            e.take_due(200).len(),
            2,
            "one at 100 (the other removed) and one at 200"
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e.next_due(), Some(300));
        assert!(e.take_due(299).is_empty());
        assert_eq!(e.take_due(300).len(), 1);
        assert!(e.is_empty());
    }
}
