//! The lease heartbeat (one pipelined script call per room of this node, never per socket) and the
//! release of all of this node's presence on drain.

use super::*;

impl Hub {
    /// Renews this node's leases in all its rooms every `presence.heartbeat_interval_ms`: one
    /// pipelined script call per room (in chunks, each with its own deadline), one outcome per
    /// room.
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
            let replies = self.store.heartbeat(&batch).await;
            let mut failed = 0usize;
            let mut first_error = None;
            for ((r, reply), abs) in live.iter().zip(replies).zip(&absolute) {
                match reply {
                    Ok(h) if !h.exists => {
                        if *abs {
                            lock(&r.state).end_anon_absolute(0);
                        }
                        self.mark_deleted(r);
                    }
                    Ok(h) => {
                        let mut st = lock(&r.state);
                        if *abs {
                            st.end_anon_absolute(h.seq);
                        }
                        if !h.had_lease {
                            st.needs_sync = true;
                        }
                        st.lease_held = true;
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                        if *abs {
                            lock(&r.state).fail_anon_write();
                        }
                    }
                }
                r.wake.notify_one();
            }
            if let Some(e) = first_error {
                tracing::warn!(error = %e, failed, rooms = live.len(), "presence heartbeat failed for some rooms");
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
