//! Joining and leaving: a room's object is acquired (created with its driver task), a cold room
//! subscribed and snapshotted, signed-in presence written with one script call; leaves remove it.

use super::driver::drive;
use super::*;

impl Hub {
    /// Adds a member to a room: subscribes and snapshots a cold room, writes signed-in presence
    /// (one script call), queues the reply, `presence_state` and `presence_count` in that order.
    pub async fn join(
        self: &Arc<Self>,
        id: &RoomId,
        j: Joiner<'_>,
    ) -> Result<Arc<Room>, JoinError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(JoinError::ShuttingDown);
        }
        let room = self.acquire(id);
        let r = Box::pin(self.join_inner(&room, &j)).await;
        let mut st = lock(&room.state);
        st.pending_joins -= 1;
        if let Err(e) = r {
            if st.members.is_empty() {
                st.empty_since.get_or_insert_with(Instant::now);
            }
            drop(st);
            room.wake.notify_one();
            return Err(e);
        }
        st.empty_since = None;
        if j.user.is_none() {
            st.anon_local += 1;
            st.anon_unflushed += 1;
            st.anon_unflushed_since.get_or_insert_with(Instant::now);
        }
        let cap = self.presence_cap();
        let state = st.mirror.state_payload(cap);
        let counts = st.counts();
        let ok = j.out.send(j.reply.clone())
            && j.out.send_wrapped(
                protocol::push_head(j.join_ref, &room.topic, "presence_state"),
                state,
            )
            && j.out.send(protocol::push(
                j.join_ref,
                &room.topic,
                "presence_count",
                &count_payload(counts),
            ));
        self.metrics.presence_frames("presence_state", 1);
        self.metrics.presence_frames("presence_count", 1);
        st.members.insert(
            j.socket,
            Member {
                out: j.out.clone(),
                join_ref: Arc::from(j.join_ref),
                anonymous: j.user.is_none(),
            },
        );
        drop(st);
        room.wake.notify_one();
        if !ok {
            tracing::debug!(room = %id, "joiner's queue is full or closed");
        }
        Ok(room)
    }

    /// The room object for `id`, created (with its driver task) if the node has none; counted as a
    /// pending join so it is not torn down meanwhile.
    fn acquire(self: &Arc<Self>, id: &RoomId) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if rooms.get(id).is_some_and(|r| r.is_deleted()) {
            // a deleted room's object winds down on its own; a new join starts afresh (and the
            // room may have been created again)
            rooms.remove(id);
        }
        let room = rooms
            .entry(id.clone())
            .or_insert_with(|| {
                let room = Arc::new(Room {
                    id: id.clone(),
                    topic: Arc::from(id.topic()),
                    keys: self.keys.room(id),
                    state: Mutex::new(RoomState::default()),
                    wake: Notify::new(),
                    init: tokio::sync::Mutex::new(()),
                    deleted: AtomicBool::new(false),
                });
                tokio::spawn(drive(self.clone(), room.clone()));
                room
            })
            .clone();
        self.metrics.rooms_local(rooms.len());
        lock(&room.state).pending_joins += 1;
        room
    }

    async fn join_inner(
        self: &Arc<Self>,
        room: &Arc<Room>,
        j: &Joiner<'_>,
    ) -> Result<(), JoinError> {
        let meta = j
            .user
            .map(|u| meta_json(&u.id, &u.username, crate::unix_ms(), &self.node));
        let mut joined = false;
        {
            let _init = room.init.lock().await;
            let (subscribed, installed) = {
                let st = lock(&room.state);
                (st.subscribed, st.installed)
            };
            if !subscribed {
                self.subscribe(&room.keys.events).await?;
                lock(&room.state).subscribed = true;
            }
            if !installed {
                // A cold room: one call checks the room, (for a signed-in joiner) writes the
                // presence, and returns the snapshot the mirror starts from.
                let snap = match &meta {
                    Some(meta) => {
                        joined = true;
                        self.write_join(room, j.conn, meta, true).await?
                    }
                    None => self.store.snapshot(&room.keys).await?,
                }
                .ok_or(JoinError::NoRoom)?;
                let mut st = lock(&room.state);
                if st.mirror.install(snap) == Applied::Gap {
                    st.resnapshot = true;
                }
                st.installed = true;
            }
        }
        if let (Some(meta), false) = (meta, joined) {
            self.write_join(room, j.conn, &meta, false).await?;
        }
        Ok(())
    }

    /// `join.lua` for a signed-in connection, keeping `signed_local` (the truth `sync` re-asserts)
    /// in step: a call that failed may still have run, so a failure re-syncs the room.
    async fn write_join(
        &self,
        room: &Room,
        conn: &str,
        meta: &str,
        want_snapshot: bool,
    ) -> Result<Option<crate::presence::Snapshot>, JoinError> {
        lock(&room.state).set_signed(conn, Some(meta.to_string()));
        let r = self.store.join(&room.keys, conn, meta, want_snapshot).await;
        let mut st = lock(&room.state);
        match r {
            Ok(JoinReply::Joined { snapshot, lost, .. }) => {
                if lost {
                    st.needs_sync = true;
                    drop(st);
                    room.wake.notify_one();
                }
                Ok(snapshot)
            }
            Ok(JoinReply::NoRoom) => {
                st.set_signed(conn, None);
                Err(JoinError::NoRoom)
            }
            Err(e) => {
                st.set_signed(conn, None);
                st.needs_sync = true;
                drop(st);
                room.wake.notify_one();
                Err(e.into())
            }
        }
    }

    /// Removes a member. A signed-in member's presence is removed with one script call (skipped
    /// when the node already released all its presence at shutdown).
    pub async fn leave(&self, room: &Arc<Room>, socket: u64, conn: &str) {
        let signed_in = {
            let mut st = lock(&room.state);
            let Some(m) = st.members.remove(&socket) else {
                return;
            };
            if m.anonymous {
                st.anon_local = st.anon_local.saturating_sub(1);
                st.anon_unflushed -= 1;
                st.anon_unflushed_since.get_or_insert_with(Instant::now);
            }
            if st.members.is_empty() {
                st.empty_since = Some(Instant::now());
            }
            let write = !m.anonymous
                && st.set_signed(conn, None)
                && !self.shutting_down.load(Ordering::Relaxed);
            if write {
                st.pending_leaves += 1;
            }
            write
        };
        room.wake.notify_one();
        if !signed_in {
            return;
        }
        let lost = match Box::pin(self.store.leave(&room.keys, conn, 0, false)).await {
            Ok(r) => r.lost,
            Err(e) => {
                tracing::warn!(room = %room.id, error = %e, "leave failed; the room will be re-synced");
                true
            }
        };
        let mut st = lock(&room.state);
        st.pending_leaves -= 1;
        if lost {
            st.needs_sync = true;
        }
        drop(st);
        room.wake.notify_one();
    }

    /// Publishes a ready Phoenix frame to a room on every node.
    pub async fn publish(&self, room: &Room, frame: &[u8]) -> Result<(), StoreError> {
        let cmd = redis::cmd("PUBLISH")
            .arg(&room.keys.events)
            .arg(frame)
            .clone();
        self.store.command::<i64>("publish", &cmd).await.map(|_| ())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), JoinError> {
        let (tx, rx) = oneshot::channel();
        self.sub_tx
            .send(SubCmd::Subscribe(channel.to_string(), tx))
            .map_err(|_| JoinError::Unavailable("subscriber stopped".into()))?;
        match tokio::time::timeout(self.cfg.redis.command_timeout(), rx).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(JoinError::Unavailable("pub/sub subscribe failed".into())),
        }
    }
}
