//! The lease heartbeat (one pipelined script call per room of this node, never per socket) and the
//! release of all of this node's presence on drain.

use super::*;

impl Hub {
    /// Renews this node's leases in all its rooms, one pipelined round trip, every
    /// `presence.heartbeat_interval_ms`.
    pub async fn run_heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.presence.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _in_flight = self.heartbeat_lock.lock().await;
            if self.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
            let mut batch = Vec::with_capacity(rooms.len());
            let mut absolute = Vec::with_capacity(rooms.len());
            let mut live = Vec::with_capacity(rooms.len());
            for r in rooms {
                let mut st = lock(&r.state);
                if !st.installed || st.removed || r.is_deleted() {
                    continue;
                }
                let anon = st.begin_anon_absolute();
                absolute.push(anon.is_some());
                batch.push((r.keys.clone(), anon));
                drop(st);
                live.push(r);
            }
            self.metrics.heartbeat_rooms(live.len());
            if live.is_empty() {
                continue;
            }
            match self.store.heartbeat(&batch).await {
                Ok(replies) => {
                    for ((r, (had, seq, _total)), abs) in live.iter().zip(replies).zip(&absolute) {
                        let mut st = lock(&r.state);
                        if *abs {
                            st.end_anon_absolute(seq);
                        }
                        if !had {
                            st.needs_sync = true;
                        }
                        drop(st);
                        r.wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rooms = live.len(), "presence heartbeat failed");
                    for (r, abs) in live.iter().zip(&absolute) {
                        if *abs {
                            lock(&r.state).fail_anon_write();
                        }
                        r.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Shutdown: no more joins or presence writes, then every room's presence of this node removed
    /// with one `sync` call per room (the other nodes see the leaves at once, not after a TTL).
    /// Writes already under way (joins, anonymous batches, syncs) are waited for first, within the
    /// command deadline, so none of them lands after the release.
    pub async fn release_all(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let _no_heartbeat = self.heartbeat_lock.lock().await;
        let deadline =
            Instant::now() + self.cfg.redis.command_timeout() + Duration::from_millis(100);
        loop {
            let busy = lock(&self.rooms).values().any(|r| {
                let st = lock(&r.state);
                st.pending_joins > 0 || st.pending_leaves > 0 || st.anon_writing || st.syncing
            });
            if !busy || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let calls = rooms.iter().filter(|r| !r.is_deleted()).map(|r| async move {
            if let Err(e) = self.store.sync(&r.keys, Some(0), true, &[]).await {
                tracing::warn!(room = %r.id, error = %e, "releasing presence failed; it will lapse by TTL");
            }
        });
        futures_util::future::join_all(calls).await;
    }
}
