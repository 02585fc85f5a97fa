//! Kicks and disconnects ordered by an operator (DESIGN §11), as they reach this node over
//! pub/sub: a kick on the room's own channel (only nodes with members there hear it), a
//! disconnect on the node-wide control channel. Each node answers how many channels or sockets it
//! closed by pushing the number onto the request's reply list, which the admin call sums
//! ([`crate::catalog::Catalog::kick`]).

use serde::Deserialize;

use super::*;

/// How long a reply list outlives its last answer: the admin call reads it within its own
/// deadline, so this only bounds what a crashed admin call leaves behind.
const REPLY_TTL_MS: u64 = 10_000;

/// `{"kick":"<sub>","reply":"<key>"}` on a room's channel.
#[derive(Deserialize)]
struct Kick {
    kick: String,
    reply: Option<String>,
}

/// `{"disconnect":"<sub>","reply":"<key>"}` on the control channel.
#[derive(Deserialize)]
struct Disconnect {
    disconnect: String,
    reply: Option<String>,
}

/// An order for the sessions of this node, which the hub does not own: handed to the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close every socket of user `user` with 4003, then answer how many on `reply`.
    Disconnect { user: String, reply: Option<String> },
}

impl Hub {
    /// A kick arrived for `room`: every channel of the user here gets `phx_close` with its
    /// join_ref and leaves at once (nothing more is delivered to it, its pushes are refused);
    /// the presence writes and the answer follow in a task.
    pub(super) fn kick(self: &Arc<Self>, room: &Arc<Room>, payload: &[u8]) {
        let Ok(k) = serde_json::from_slice::<Kick>(payload) else {
            tracing::warn!(room = %room.id, "unreadable kick message");
            return;
        };
        let kicked: Vec<(u64, Arc<str>)> = {
            let st = lock(&room.state);
            st.members
                .iter()
                .filter(|(_, m)| m.user.as_deref() == Some(k.kick.as_str()))
                .map(|(socket, m)| {
                    m.out.send(protocol::phx_close(&m.join_ref, &room.topic));
                    (*socket, m.join_ref.clone())
                })
                .collect()
        };
        let mut writes = Vec::new();
        for (socket, join_ref) in &kicked {
            let conn = format!("{}.{}", self.node, socket);
            if self.remove_member(room, *socket, &conn, Some(join_ref)) {
                writes.push(conn);
            }
        }
        tracing::info!(room = %room.id, channels = kicked.len(), "user kicked from the room");
        let (hub, room, n) = (self.clone(), room.clone(), kicked.len());
        tokio::spawn(async move {
            for conn in writes {
                hub.write_leave(&room, &conn).await;
            }
            if let Some(key) = k.reply {
                hub.reply(&key, n).await;
            }
        });
    }

    /// A message on the control channel: handed to the app (see [`Hub::take_control`]).
    pub(super) fn control(&self, payload: &[u8]) {
        match serde_json::from_slice::<Disconnect>(payload) {
            Ok(d) => {
                let _ = self.control_tx.send(Control::Disconnect {
                    user: d.disconnect,
                    reply: d.reply,
                });
            }
            Err(_) => tracing::warn!("unreadable control message"),
        }
    }

    /// The orders for this node's sessions; taken once, by the app.
    pub fn take_control(&self) -> Option<mpsc::UnboundedReceiver<Control>> {
        lock(&self.control_rx).take()
    }

    /// Answers a kick or disconnect: this node closed `n` channels or sockets.
    pub async fn reply(&self, key: &str, n: usize) {
        let push = redis::cmd("RPUSH").arg(key).arg(n).clone();
        let expire = redis::cmd("PEXPIRE").arg(key).arg(REPLY_TTL_MS).clone();
        let r = async {
            self.store.command::<i64>("publish", &push).await?;
            self.store.command::<i64>("publish", &expire).await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "answering a kick or disconnect failed");
        }
    }
}
