//! The per-room driver task: coalesced `presence_diff` and `presence_count`, anonymous batching,
//! re-snapshots, syncs, and the delayed teardown once the room has no local members.

use super::*;

/// The room's driver: coalesced diffs and counts, anonymous batches, re-snapshots, syncs, and the
/// delayed teardown once the room has no local members. Ends when the room is torn down.
pub(super) async fn drive(hub: Arc<Hub>, room: Arc<Room>) {
    let p = &hub.cfg.presence;
    let cap = p.anonymous_list_max;
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let mut teardown = false;
        {
            let mut st = lock(&room.state);
            if st.removed {
                return;
            }
            // a member's diff and count of this flush leave in one write
            let cork = crate::outbox::Cork::new();
            if st.installed && st.mirror.is_synced() {
                // presence_diff, at most one per diff interval; one that only moves the
                // anonymous list, at most one per anonymous diff interval
                let anon = st.anon_display();
                let anon_moved = st.mirror.anon_moved(anon, cap);
                let members_changed = st.mirror.members_changed();
                if members_changed || anon_moved {
                    // a big room's diffs are spaced by its size (`presence.diff_frames_per_s`)
                    let spacing = p.diff_spacing(st.members.len());
                    let mut due = st.last_diff.map_or(now, |t| t + spacing);
                    if !members_changed {
                        let anon_due = st
                            .last_anon_diff
                            .map_or(now, |t| t + p.anonymous_diff_interval());
                        due = due.max(anon_due);
                    }
                    if now >= due {
                        if let Some(diff) = st.mirror.take_diff(anon, cap) {
                            let frame = protocol::broadcast(&room.topic, "presence_diff", &diff);
                            let n = st.send_all(&frame);
                            hub.metrics.presence_frames("presence_diff", n);
                        }
                        st.last_diff = Some(now);
                        if anon_moved {
                            st.last_anon_diff = Some(now);
                        }
                    } else {
                        soonest(due);
                    }
                }
                // presence_count, at most one per count interval
                let counts = st.counts();
                if counts != st.count_sent {
                    let due = st.last_count.map_or(now, |t| t + p.count_interval());
                    if now >= due {
                        let frame = protocol::broadcast(
                            &room.topic,
                            "presence_count",
                            &count_payload(counts),
                        );
                        let n = st.send_all(&frame);
                        hub.metrics.presence_frames("presence_count", n);
                        st.count_sent = counts;
                        st.last_count = Some(now);
                    } else {
                        soonest(due);
                    }
                }
            }
            drop(cork);
            // anonymous batch: one HINCRBY-style call per flush interval
            // (not while a re-assertion is pending: that one writes the absolute count)
            if let Some(since) = st.anon_unflushed_since
                && st.anon_unflushed != 0
                && st.installed
                && !st.needs_sync
                && !hub.shutting_down.load(Ordering::Relaxed)
            {
                let due = since + p.anon_flush();
                if now >= due {
                    if let Some(delta) = st.begin_anon_delta() {
                        tokio::spawn(flush_anon(hub.clone(), room.clone(), delta));
                    }
                } else {
                    soonest(due);
                }
            }
            let resnapshot_due = st.resnapshot_at.is_none_or(|t| now >= t);
            if st.resnapshot
                && !resnapshot_due
                && let Some(t) = st.resnapshot_at
            {
                soonest(t);
            }
            if st.resnapshot && resnapshot_due && !st.resnapshotting && st.installed {
                st.resnapshot = false;
                st.resnapshot_at = None;
                st.resnapshotting = true;
                st.mirror.begin_resync();
                // what made presence re-snapshot (a rebuilt subscription, a lost envelope) may
                // have lost broadcasts too: the history tail starts over and is reloaded. A retry
                // after a failed snapshot is no new loss (frames arriving meanwhile still reset
                // the tail: see `Hub::deliver_event`)
                if st.resnapshot_backoff.is_zero() {
                    st.history.invalidate();
                }
                tokio::spawn(resnapshot(hub.clone(), room.clone()));
            }
            // the history tail's (re)load, once the room is installed (a cold room's first load is
            // part of its install)
            if st.installed && !room.is_deleted() {
                match st.history.load_due(now) {
                    Ok(()) => {
                        let (generation, req) = st.history.begin_load();
                        tokio::spawn(reload_history(hub.clone(), room.clone(), generation, req));
                    }
                    Err(Some(t)) => soonest(t),
                    Err(None) => {}
                }
            }
            let sync_due = st.sync_retry_at.is_none_or(|t| now >= t);
            if st.needs_sync
                && !sync_due
                && let Some(t) = st.sync_retry_at
            {
                soonest(t);
            }
            if st.needs_sync
                && sync_due
                && !st.syncing
                && st.installed
                && !room.is_deleted()
                && !hub.shutting_down.load(Ordering::Relaxed)
                && let Some(anon) = st.begin_anon_absolute()
            {
                st.needs_sync = false;
                st.syncing = true;
                st.sync_retry_at = None;
                let metas: Vec<(String, String)> = st
                    .signed_local
                    .iter()
                    .map(|(c, m)| (c.to_string(), m.clone()))
                    .collect();
                let version = st.signed_version;
                tokio::spawn(sync_room(hub.clone(), room.clone(), anon, metas, version));
            }
            if st.members.is_empty() && st.pending_joins == 0 {
                let since = *st.empty_since.get_or_insert(now);
                let due = since + hub.cfg.rooms.unsubscribe_delay();
                // only once every write of the room is done: nothing of this node may land after
                // (a room that never got installed has nothing of ours to re-assert)
                let gone = room.is_deleted() || !st.installed;
                let settled = !st.anon_writing
                    && !st.syncing
                    && !st.resnapshotting
                    && st.pending_leaves == 0
                    && (st.anon_unflushed == 0 || gone)
                    && (!st.needs_sync || gone);
                if now >= due && settled {
                    teardown = true;
                } else {
                    // still settling (a write in flight, or Redis away): look again shortly
                    soonest(due.max(now + Duration::from_millis(100)));
                }
            }
        }
        if teardown && remove_room(&hub, &room) {
            if lock(&room.state).installed
                && !room.is_deleted()
                && !hub.shutting_down.load(Ordering::Relaxed)
            {
                // the node leaves the room: its lease goes too, unless a join of a new room object
                // for the same id got in first (the script checks, atomically)
                if let Err(e) = hub.store.leave(&room.keys, "", 0, true).await {
                    tracing::debug!(room = %room.id, error = %e, "releasing the room's lease failed; it lapses by TTL");
                }
            }
            return;
        }
        match next {
            Some(t) => {
                tokio::select! {
                    _ = room.wake.notified() => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            None => room.wake.notified().await,
        }
    }
}

/// Takes the room out of the map if it is still empty; queues the UNSUBSCRIBE under the map lock
/// so a new subscription of the same room is always ordered after it. The UNSUBSCRIBE is queued
/// even when no subscription was confirmed to this room (one may have landed after its joiner
/// gave up); the subscriber ignores it for a channel it does not hold.
pub(super) fn remove_room(hub: &Hub, room: &Arc<Room>) -> bool {
    let mut rooms = lock(&hub.rooms);
    let mut st = lock(&room.state);
    if !st.members.is_empty() || st.pending_joins > 0 {
        return false;
    }
    st.removed = true;
    drop(st);
    let unsubscribe = match rooms.get(&room.id) {
        Some(r) if Arc::ptr_eq(r, room) => {
            rooms.remove(&room.id);
            true
        }
        // replaced after a deletion: the channel belongs to the room object that replaced it
        Some(_) => false,
        None => true,
    };
    if unsubscribe {
        let _ = hub
            .sub_tx
            .send(SubCmd::Unsubscribe(room.keys.events.clone()));
    }
    hub.metrics.rooms_local(rooms.len());
    true
}

pub(super) async fn flush_anon(hub: Arc<Hub>, room: Arc<Room>, delta: i64) {
    let r = if delta > 0 {
        hub.store
            .join(&room.keys, ("", None), &delta.to_string(), false)
            .await
            .map(|j| match j {
                JoinReply::Joined {
                    seq,
                    lost,
                    had_lease,
                    ..
                } => (seq, lost, true, had_lease),
                JoinReply::NoRoom => (0, false, false, true),
                // anonymous joins carry no ban key
                JoinReply::Banned => (0, false, true, true),
            })
    } else {
        hub.store
            .leave(&room.keys, "", delta.unsigned_abs(), false)
            .await
            .map(|r| (r.seq, r.lost, r.exists, r.had_lease))
    };
    if let Ok((_, _, false, _)) = r {
        lock(&room.state).end_anon_write(0);
        hub.mark_deleted(&room);
        return;
    }
    let mut st = lock(&room.state);
    match r {
        Ok((seq, lost, _, had_lease)) => {
            st.end_anon_write(seq);
            st.lease_renewed(lost, had_lease);
        }
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "anonymous count write failed; the next heartbeat re-asserts it");
            st.fail_anon_write();
        }
    }
    drop(st);
    room.wake.notify_one();
}

/// Reloads a room's history tail (the newest `rooms.history_len` entries), merged as
/// `history.rs` explains; a failure is retried with back-off.
pub(super) async fn reload_history(
    hub: Arc<Hub>,
    room: Arc<Room>,
    generation: u64,
    req: crate::history::ReadReq,
) {
    let r = match hub.history.read(&room.keys, room.topic(), req).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "reloading the room's history failed; retrying");
            None
        }
    };
    let max = hub.cfg.presence.heartbeat_interval();
    lock(&room.state)
        .history
        .end_load(generation, r.as_ref(), max);
    room.wake.notify_one();
}

pub(super) async fn resnapshot(hub: Arc<Hub>, room: Arc<Room>) {
    let r = hub.store.snapshot(&room.keys).await;
    let max = hub.cfg.presence.heartbeat_interval();
    let gone = {
        let mut st = lock(&room.state);
        st.resnapshotting = false;
        match r {
            Ok(Some(snap)) => {
                st.resnapshot_backoff = Duration::ZERO;
                hub.install_snapshot(&mut st, snap);
                false
            }
            Ok(None) => {
                // the room record is gone: exactly as if its `deleted` message had arrived
                st.mirror.abandon_resync();
                true
            }
            Err(e) => {
                // the first failure of a streak is worth a warning, the retries are not
                if st.resnapshot_backoff.is_zero() {
                    tracing::warn!(room = %room.id, error = %e, "re-snapshot failed; retrying with back-off");
                } else {
                    tracing::debug!(room = %room.id, error = %e, "re-snapshot failed again");
                }
                st.retry_resnapshot(max);
                false
            }
        }
    };
    if gone {
        hub.mark_deleted(&room);
    }
    room.wake.notify_one();
}

pub(super) async fn sync_room(
    hub: Arc<Hub>,
    room: Arc<Room>,
    anon: u64,
    metas: Vec<(String, String)>,
    version: u64,
) {
    let r = hub.store.sync(&room.keys, Some(anon), false, &metas).await;
    let max = hub.cfg.presence.heartbeat_interval();
    let mut st = lock(&room.state);
    st.syncing = false;
    match r {
        Ok(reply) if !reply.exists => {
            st.end_anon_absolute(0);
            drop(st);
            hub.mark_deleted(&room);
            return;
        }
        Ok(reply) => {
            st.end_anon_absolute(reply.seq);
            st.lease_held = true;
            st.sync_backoff = Duration::ZERO;
            // a signed-in join or leave written while this sync was under way may have been
            // undone by it: sync again with the new truth (after a pause, so churn cannot turn
            // this into back-to-back syncs)
            if st.signed_version != version {
                st.retry_sync(false, max);
            }
        }
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "presence sync failed; retrying");
            st.fail_anon_write();
            st.retry_sync(true, max);
        }
    }
    drop(st);
    room.wake.notify_one();
}
