//! A `phx_join`: the checks (payload, topic, `since`, rate, channel count, a channel's own
//! token, bans), the hub's join, the reply, and the refused-join count that closes a socket
//! looping over rooms it may not join (4009).

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Channel, Session, idle};
use crate::auth::{AuthError, Identity};
use crate::expiry::Expiring;
use crate::fanout::{JoinError, Joiner, Want};
use crate::metrics::join_result;
use crate::protocol::{self, Inbound, Payload, close, reason};
use crate::rooms::RoomId;

impl Session {
    pub(super) async fn join(&mut self, f: Inbound) {
        let app = self.app.clone();
        let Payload::Json(params) = &f.payload else {
            app.metrics.join(join_result::INVALID);
            self.reply_error(&f, reason::INVALID_PAYLOAD);
            return self.refused_join();
        };
        let id = match RoomId::from_topic(&f.topic) {
            Ok(id) => id,
            Err(e) => {
                app.metrics.join(join_result::INVALID);
                self.reply_error(&f, e.reason());
                return self.refused_join();
            }
        };
        // `since` (a lossless rejoin) is checked before anything of the join happens
        let want = match crate::history::since_param(params) {
            Ok(Some(since)) => Want::Since(since),
            Ok(None) => Want::Last,
            Err(_) => {
                app.metrics.join(join_result::INVALID);
                return self.reply_error(&f, reason::INVALID_SINCE);
            }
        };
        // every join that could reach Redis takes a token, a re-join of a joined topic included;
        // without one nothing happens (the joined channel stays) and it is not a refused join
        let s = &app.cfg.server;
        if !self.joins.take(s.join_rate_per_s, s.join_burst) {
            app.metrics.join(join_result::RATE_LIMITED);
            return self.reply_error(&f, reason::RATE_LIMITED);
        }
        let join_ref: Arc<str> = Arc::from(
            f.join_ref
                .clone()
                .or_else(|| f.reference.clone())
                .unwrap_or_default(),
        );
        if !self.channels.contains_key(&f.topic)
            && self.channels.len() >= app.cfg.server.max_channels_per_socket
        {
            app.metrics.join(join_result::REFUSED);
            return self.reply_error(&f, reason::TOO_MANY_CHANNELS);
        }
        // per-channel sign-in with `guardian_token`, else the connection's identity
        let own_token =
            matches!(params.get("guardian_token"), Some(Value::String(t)) if !t.is_empty());
        let (identity, auth_error): (Identity, Option<AuthError>) =
            match params.get("guardian_token") {
                Some(Value::String(t)) if !t.is_empty() => {
                    app.unless_banned(app.verifier.identify(Some(t)).await)
                        .await
                }
                Some(Value::Null) | None => {
                    (self.identity.clone(), self.auth_error.as_deref().copied())
                }
                Some(_) => (Identity::Anonymous, Some(AuthError::Malformed)),
            };
        if let Some(e) = auth_error
            && app.cfg.auth.reject_invalid_tokens
        {
            app.metrics.join(join_result::REFUSED);
            let why = if e == AuthError::Banned {
                "banned"
            } else {
                "invalid token"
            };
            return self.reply_error(&f, why);
        }
        // a second join of a joined topic replaces the channel; the old one is closed with its
        // own join_ref after the new join's reply
        let previous = self.channels.remove(&f.topic);
        // a kicked channel already got its phx_close
        let previous_open = previous
            .as_ref()
            .is_some_and(|old| old.room.is_member(self.socket, &old.join_ref));
        if let Some(old) = &previous {
            self.end_channel(old).await;
        }
        let mut response = Map::new();
        match identity.user() {
            Some(u) => {
                response.insert("auth".into(), json!("user"));
                response.insert("user".into(), json!({"id": u.id, "username": u.username}));
            }
            None => {
                response.insert("auth".into(), json!("anonymous"));
                if let Some(e) = auth_error {
                    response.insert("auth_error".into(), json!(e.to_string()));
                }
            }
        }
        let conn = self.conn();
        let joiner = Joiner {
            socket: self.socket,
            conn: &conn,
            user: identity.user(),
            join_ref: &join_ref,
            out: self.out.clone(),
            reference: f.reference.as_deref(),
            response,
            want,
        };
        match app.hub.join(&id, joiner).await {
            Ok(room) => {
                app.metrics.join(join_result::OK);
                // a channel signed in with its own token ends (phx_error) when that expires
                let expiry = match identity.user() {
                    Some(u) if own_token => Some(app.expiries.add(
                        u.valid_until_ms,
                        Expiring::Channel {
                            out: self.out.clone(),
                            room: room.clone(),
                            socket: self.socket,
                            conn: conn.clone(),
                            join_ref: join_ref.clone(),
                        },
                    )),
                    _ => None,
                };
                self.channels.insert(Channel {
                    room,
                    join_ref: join_ref.clone(),
                    identity,
                    expiry,
                });
                if own_token {
                    self.publish_users();
                }
            }
            Err(e) => {
                let (label, why) = match &e {
                    JoinError::NoRoom => (join_result::NO_ROOM, reason::ROOM_DOES_NOT_EXIST),
                    JoinError::Unavailable(_) => {
                        (join_result::UNAVAILABLE, reason::PRESENCE_UNAVAILABLE)
                    }
                    JoinError::ShuttingDown => (join_result::UNAVAILABLE, reason::SHUTTING_DOWN),
                    JoinError::Refused(r) => (join_result::REFUSED, r.reason()),
                };
                if let JoinError::Unavailable(detail) = &e {
                    tracing::warn!(room = %id, %detail, "join failed");
                }
                app.metrics.join(label);
                self.reply_error(&f, why);
                // a room that does not exist, a private room, a ban: the client's own fault
                if let JoinError::NoRoom | JoinError::Refused(_) = e {
                    self.refused_join();
                }
            }
        }
        if let Some(old) = previous
            && previous_open
            && *old.join_ref != *join_ref
        {
            self.out.send(protocol::phx_close(&old.join_ref, &f.topic));
        }
    }

    /// Counts a join refused for the client's own fault; past the per-minute limit the socket is
    /// closed (after the refusal's reply) with 4009, so a client looping over random room ids
    /// cannot keep the node busy.
    pub(super) fn refused_join(&mut self) {
        let now = idle::ms(tokio::time::Instant::now());
        if now.saturating_sub(self.refused_since_ms) >= 60_000 {
            self.refused_since_ms = now;
            self.refused_joins = 0;
        }
        self.refused_joins += 1;
        if self.refused_joins > self.app.cfg.server.max_refused_joins_per_min {
            tracing::debug!(socket = self.socket, "too many refused joins; closing");
            self.out.close(close::REFUSED_JOINS);
        }
    }
}
