//! Joining and leaving: a room's object is acquired (created with its driver task), a cold room
//! subscribed and snapshotted, signed-in presence written with one script call; leaves remove it.

use super::driver::drive;
use super::history;
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
        // one deadline for the whole join, waiting for a cold room's install included
        let until = Instant::now() + self.join_deadline();
        let known = lock(&self.rooms)
            .get(id)
            .filter(|r| !r.is_deleted())
            .map(|r| r.access);
        let access = match known {
            Some(a) => a,
            // a cold room: check it exists (and read its access) before any room object, task or
            // subscription is made for it (anonymous clients can ask for any id)
            None => self.check_exists(id).await?,
        };
        // a private room's rule, from the node's memory once the room is warm; a refusal has
        // written nothing
        crate::rooms::may_join(access, id, j.user).map_err(JoinError::Refused)?;
        let room = self.acquire(id, access);
        let r = Box::pin(self.join_inner(&room, &j, until)).await;
        // the reads the channel's history needs (none in a warm room), before the final lock
        let read = match r {
            Ok(()) => Box::pin(self.history_reads(&room, j.want, until)).await,
            Err(_) => None,
        };
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
        // everything the channel gets is queued here, under the room lock: the reply, its
        // presence, its history; live frames follow once it is a member
        let served = self.serve_history(&st, j.want, read.as_ref());
        let mut response = j.response.clone();
        if let Some(recovered) = served.recovered {
            response.insert("recovered".into(), Value::Bool(recovered));
        }
        let reply = protocol::reply_ok(
            Some(j.join_ref),
            j.reference,
            &room.topic,
            Value::Object(response),
        );
        // the reply, presence_state, presence_count and history leave in one write, as the
        // writer would batch them (a direct write each would be four syscalls per join)
        let cork = crate::outbox::Cork::new();
        let ok = j.out.send(reply)
            && j.out.send_wrapped(
                protocol::push_head(j.join_ref, &room.topic, "presence_state"),
                state,
            )
            && j.out.send(protocol::push(
                j.join_ref,
                &room.topic,
                "presence_count",
                &count_payload(counts),
            ))
            && history::send_history(&j.out, j.join_ref, &served);
        drop(cork);
        self.metrics.presence_frames("presence_state", 1);
        self.metrics.presence_frames("presence_count", 1);
        let delivered = st.history.delivered();
        st.members.insert(
            j.socket,
            Member {
                out: j.out.clone(),
                join_ref: Arc::from(j.join_ref),
                anonymous: j.user.is_none(),
                user: j.user.map(|u| Arc::from(u.id.as_str())),
                skip_until: served
                    .last
                    .filter(|l| delivered.is_none_or(|d| *l > d))
                    .map(Box::new),
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
    fn acquire(self: &Arc<Self>, id: &RoomId, access: Access) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if rooms.get(id).is_some_and(|r| r.is_deleted()) {
            // a deleted room's object winds down on its own; a new join starts afresh (and the
            // room may have been created again)
            rooms.remove(id);
        }
        let room = rooms
            .entry(id.clone())
            .or_insert_with(|| {
                let rooms_cfg = &self.cfg.rooms;
                let room = Arc::new(Room {
                    id: id.clone(),
                    access,
                    topic: Arc::from(id.topic()),
                    keys: self.keys.room(id),
                    state: Mutex::new(RoomState {
                        history: history::Tail::new(
                            rooms_cfg.history_len,
                            rooms_cfg.history_on_join,
                        ),
                        ..Default::default()
                    }),
                    wake: Notify::new(),
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

    /// How long a join may take, a cold room's subscribe and first snapshot included: two command
    /// deadlines (phoenix.js gives up on a join after 10 s and sends it again).
    fn join_deadline(&self) -> Duration {
        self.cfg.redis.command_timeout() * 2
    }

    /// Reads the room record (a few short fields) for whether it exists and its `access`,
    /// answered from memory for an id found missing a moment ago. Only a cold room pays it: a warm
    /// room's object holds its access.
    async fn check_exists(&self, id: &RoomId) -> Result<Access, JoinError> {
        if self.known_missing(id) {
            return Err(JoinError::NoRoom);
        }
        let cmd = redis::cmd("HGETALL").arg(self.keys.room(id).room).clone();
        let record: HashMap<String, String> = self.store.command("exists", &cmd).await?;
        if record.is_empty() {
            self.remember_missing(id);
            return Err(JoinError::NoRoom);
        }
        Ok(Access::parse(record.get("access").map(String::as_str)))
    }

    async fn join_inner(
        self: &Arc<Self>,
        room: &Arc<Room>,
        j: &Joiner<'_>,
        until: Instant,
    ) -> Result<(), JoinError> {
        let meta = j
            .user
            .map(|u| meta_json(&u.id, &u.username, crate::unix_ms(), &self.node));
        // a signed-in join checks the user's ban from the room in the same script call
        let ban = j.user.map(|u| self.keys.room_ban(&room.id, &u.id));
        let ban = ban.as_deref();
        let mut joined = false;
        loop {
            // a cold room is installed once: the first joiner does it, every joiner arriving
            // meanwhile waits for that outcome (and fails with it), within its own deadline
            let wait = {
                let mut st = lock(&room.state);
                if st.installed {
                    break;
                }
                match &st.installing {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        st.installing = Some(rx);
                        Ok(tx)
                    }
                }
            };
            let wait = match wait {
                Ok(tx) => {
                    let r = self
                        .install(room, (j.conn, ban), meta.as_deref(), until)
                        .await;
                    joined = r.is_ok() && meta.is_some();
                    lock(&room.state).installing = None;
                    let _ = tx.send(Some(r.clone()));
                    r?;
                    break;
                }
                Err(rx) => Some(rx),
            };
            if let Some(mut rx) = wait {
                match tokio::time::timeout_at(until, rx.wait_for(Option::is_some)).await {
                    Ok(Ok(outcome)) => {
                        // the installer's own refusal (its user is banned) is not this joiner's:
                        // it looks again (and installs the room itself)
                        if let Some(Err(e)) = &*outcome
                            && !matches!(e, JoinError::Refused(_))
                        {
                            return Err(e.clone());
                        }
                    }
                    // the installer's channel closed without an outcome: look again
                    Ok(Err(_)) => {}
                    Err(_) => {
                        return Err(JoinError::Unavailable(
                            "timed out waiting for the room's first snapshot".into(),
                        ));
                    }
                }
            }
        }
        if let (Some(meta), false) = (meta, joined) {
            if Instant::now() >= until {
                return Err(JoinError::Unavailable("join deadline passed".into()));
            }
            self.write_join(room, (j.conn, ban), &meta, false).await?;
        }
        Ok(())
    }

    /// A cold room: subscribe, then one call that checks the room, (for a signed-in joiner)
    /// writes its presence, and returns the snapshot the mirror starts from.
    async fn install(
        &self,
        room: &Arc<Room>,
        conn: (&str, Option<&str>),
        meta: Option<&str>,
        until: Instant,
    ) -> Result<(), JoinError> {
        if !lock(&room.state).subscribed {
            self.subscribe(&room.keys.events, until).await?;
            lock(&room.state).subscribed = true;
        }
        if Instant::now() >= until {
            return Err(JoinError::Unavailable("join deadline passed".into()));
        }
        // the presence snapshot and the history tail, read side by side (both after the
        // subscription: see `history.rs` for why that order matters)
        let presence = async {
            Ok::<_, JoinError>(match meta {
                Some(meta) => self.write_join(room, conn, meta, true).await?,
                None => self.store.snapshot(&room.keys).await?,
            })
        };
        let (snap, ()) = tokio::join!(presence, self.load_history(room, until));
        let snap = snap?;
        let Some(snap) = snap else {
            self.remember_missing(&room.id);
            return Err(JoinError::NoRoom);
        };
        let mut st = lock(&room.state);
        self.install_snapshot(&mut st, snap);
        st.installed = true;
        Ok(())
    }

    /// `join.lua` for a signed-in connection, keeping `signed_local` (the truth `sync` re-asserts)
    /// in step: a call that failed may still have run, so a failure re-syncs the room.
    async fn write_join(
        &self,
        room: &Arc<Room>,
        (conn, ban): (&str, Option<&str>),
        meta: &str,
        want_snapshot: bool,
    ) -> Result<Option<crate::presence::Snapshot>, JoinError> {
        lock(&room.state).set_signed(conn, Some(meta.to_string()));
        let r = self
            .store
            .join(&room.keys, (conn, ban), meta, want_snapshot)
            .await;
        let mut st = lock(&room.state);
        match r {
            Ok(JoinReply::Joined {
                snapshot,
                lost,
                had_lease,
                ..
            }) => {
                st.lease_renewed(lost, had_lease);
                let wake = st.needs_sync;
                drop(st);
                if wake {
                    room.wake.notify_one();
                }
                Ok(snapshot)
            }
            Ok(JoinReply::NoRoom) => {
                st.set_signed(conn, None);
                Err(JoinError::NoRoom)
            }
            Ok(JoinReply::Banned) => {
                st.set_signed(conn, None);
                Err(JoinError::Refused(JoinRefusal::NotAllowed))
            }
            Err(e) => {
                st.set_signed(conn, None);
                st.needs_sync = true;
                st.pending_leaves += 1;
                drop(st);
                // The call may still run after its deadline (Redis slow, not gone): an idempotent
                // leave, queued behind it on the same connection, removes what it wrote, whether
                // or not the room gets installed (a sync needs an installed room).
                let (store, room, conn) = (self.store.clone(), room.clone(), conn.to_string());
                tokio::spawn(async move {
                    if let Err(e) = store.leave(&room.keys, &conn, 0, false).await {
                        tracing::debug!(room = %room.id, error = %e, "undoing a failed join failed; the next install or sync removes it");
                    }
                    lock(&room.state).pending_leaves -= 1;
                    room.wake.notify_one();
                });
                Err(e.into())
            }
        }
    }

    /// Installs a (first or new) snapshot into the room's mirror. A connection of this node that
    /// the node does not know (a join whose reply was lost, written after its deadline) would be
    /// kept alive by this node's heartbeats for as long as it holds the room: a sync removes it.
    pub(super) fn install_snapshot(&self, st: &mut RoomState, snap: crate::presence::Snapshot) {
        let prefix = format!("{}.", self.node);
        if snap
            .metas
            .keys()
            .any(|c| c.starts_with(&prefix) && !st.signed_local.contains_key(c.as_str()))
        {
            st.needs_sync = true;
        }
        if st.mirror.install(snap) == Applied::Gap {
            st.resnapshot = true;
        }
    }

    /// Removes a member. A signed-in member's presence is removed with one script call (skipped
    /// when the node already released all its presence at shutdown).
    pub async fn leave(&self, room: &Arc<Room>, socket: u64, conn: &str) {
        if self.remove_member(room, socket, conn, None) {
            self.write_leave(room, conn).await;
        }
    }

    /// Takes the member out of the room's local state at once (nothing more reaches it), only if
    /// its channel is still the one with `join_ref` when one is given (a kick must not remove a
    /// channel joined again meanwhile); returns whether its signed-in presence must be removed
    /// from Redis ([`Hub::write_leave`]).
    pub(super) fn remove_member(
        &self,
        room: &Arc<Room>,
        socket: u64,
        conn: &str,
        join_ref: Option<&str>,
    ) -> bool {
        let signed_in = {
            let mut st = lock(&room.state);
            let current = st
                .members
                .get(&socket)
                .is_some_and(|m| join_ref.is_none_or(|jr| *m.join_ref == *jr));
            if !current {
                return false;
            }
            let Some(m) = st.members.remove(&socket) else {
                return false;
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
        signed_in
    }

    /// The leave script for a member [`Hub::remove_member`] took out.
    pub(super) async fn write_leave(&self, room: &Arc<Room>, conn: &str) {
        let lost = match Box::pin(self.store.leave(&room.keys, conn, 0, false)).await {
            Ok(r) if !r.exists => {
                self.mark_deleted(room);
                false
            }
            Ok(r) => {
                let mut st = lock(&room.state);
                st.lease_renewed(r.lost, r.had_lease);
                false
            }
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

    /// A channel's token expired: the member leaves like on `phx_leave`, unless the socket has
    /// joined the room again since (another join_ref). Returns whether it left.
    pub async fn expire_member(
        &self,
        room: &Arc<Room>,
        socket: u64,
        conn: &str,
        join_ref: &str,
    ) -> bool {
        let current = lock(&room.state)
            .members
            .get(&socket)
            .is_some_and(|m| &*m.join_ref == join_ref);
        if current {
            self.leave(room, socket, conn).await;
        }
        current
    }

    /// Broadcasts `event` with `payload` to a room on every node: appended to the room's history
    /// and published in one script call (see [`crate::history`]).
    pub async fn publish(
        &self,
        room: &Room,
        event: &str,
        payload: &Value,
    ) -> Result<crate::history::Published, crate::history::HistoryError> {
        let r = self
            .history
            .broadcast(&room.keys, room.topic(), event, payload)
            .await;
        if let Err(crate::history::HistoryError::NoRoom) = r {
            // the record is gone: exactly as if its `deleted` message had arrived
            self.mark_deleted(room);
        }
        r
    }

    /// Asks the subscriber for the room's channel and waits for its answer until `until` (and no
    /// longer than a command deadline). Refused at once when too many requests already wait.
    async fn subscribe(&self, channel: &str, until: Instant) -> Result<(), JoinError> {
        if self.sub_pending.fetch_add(1, Ordering::AcqRel) >= SUBSCRIBE_QUEUE_MAX {
            self.sub_pending.fetch_sub(1, Ordering::AcqRel);
            return Err(JoinError::Unavailable(
                "too many subscriptions pending".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        if self
            .sub_tx
            .send(SubCmd::Subscribe(channel.to_string(), tx))
            .is_err()
        {
            self.sub_pending.fetch_sub(1, Ordering::AcqRel);
            return Err(JoinError::Unavailable("subscriber stopped".into()));
        }
        let until = until.min(Instant::now() + self.cfg.redis.command_timeout());
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(JoinError::Unavailable("pub/sub subscribe failed".into())),
        }
    }
}
