//! The node's pub/sub connection: subscribe and unsubscribe requests from joins and teardowns,
//! dispatch of every message (room frames, presence envelopes, deletions, probes), the liveness
//! probe, the rebuild after a lost or silent connection, and the re-subscription of the channels
//! a cluster slot move took away.

use std::collections::HashSet;

use futures_util::FutureExt;

use super::*;
use crate::metrics::pubsub_event;
use crate::redis::{Event, Publisher, Subscriber};

/// Queued requests applied in one go: one SUBSCRIBE for many rooms, not a round trip each.
const SUBSCRIBE_BATCH: usize = 256;
/// A slot's old owner pushes one `sunsubscribe` per channel of the slot, back to back: the first
/// re-subscription waits this long so that one pass takes them all.
const RESUBSCRIBE_GATHER: Duration = Duration::from_millis(10);
/// A failed re-subscription after a slot move is tried again after this pause, doubling up to
/// [`RESUBSCRIBE_MAX`]: short, since a room's events must flow again within 2 s of a move.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);
/// At most this many pub/sub messages are handled under one cork, so the first of a long burst
/// is not held back for long.
const BURST_MAX: usize = 64;

impl Hub {
    fn dispatch(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        if channel == self.control_channel {
            return self.control(payload);
        }
        if channel.starts_with(self.probe_channel.as_str()) {
            let got = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            let now = self.epoch.elapsed().as_nanos() as u64;
            let mut probes = lock(&self.probes);
            if let Some(p) = probes
                .iter_mut()
                .find(|p| p.channel == channel && Some(p.sent) == got)
            {
                p.seen = true;
                self.metrics
                    .pubsub_lag(now.saturating_sub(p.sent) as f64 / 1e9);
            }
            return;
        }
        let Some(id) = self.keys.room_of_channel(channel) else {
            return;
        };
        let Some(room) = lock(&self.rooms).get(&id).cloned() else {
            return;
        };
        match payload.first() {
            Some(b'[') => self.deliver_event(&room, payload),
            // the room was deleted (admin API / CLI)
            Some(b'{') if payload.starts_with(br#"{"deleted""#) => self.mark_deleted(&room),
            // an operator kicked a user from the room (admin API / CLI)
            Some(b'{') if payload.starts_with(br#"{"kick""#) => self.kick(&room, payload),
            Some(b'{') => match serde_json::from_slice::<Envelope>(payload) {
                Ok(env) => {
                    let mut st = lock(&room.state);
                    if st.mirror.apply(env) == Applied::Gap {
                        st.resnapshot = true;
                    }
                    drop(st);
                    room.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(room = %id, error = %e, "unreadable presence envelope; re-snapshotting");
                    let mut st = lock(&room.state);
                    st.mirror.begin_resync();
                    st.resnapshot = true;
                    drop(st);
                    room.wake.notify_one();
                }
            },
            _ => {
                tracing::warn!(room = %id, "ignoring a message that is neither a frame nor an envelope")
            }
        }
    }

    /// Handles `first` and every message ready right behind it (at most [`BURST_MAX`]) under
    /// one [`Cork`](crate::outbox::Cork): a member of a room that got several messages of the
    /// burst receives them in one write. Returns the first event that is not a message, for the
    /// caller (`Some(None)`: the connection ended); `None` when there is none.
    fn dispatch_burst(
        self: &Arc<Self>,
        sub: &mut Subscriber,
        first: Option<Event>,
    ) -> Option<Option<Event>> {
        let _cork = crate::outbox::Cork::new();
        let mut ev = first;
        for n in 1.. {
            match ev {
                Some(Event::Message { channel, payload }) => self.dispatch(&channel, &payload),
                other => return Some(other),
            }
            if n == BURST_MAX {
                break;
            }
            // only what is ready now: an event not taken here stays in the stream
            ev = sub.next().now_or_never()?;
        }
        None
    }

    /// Marks every installed room for a re-snapshot and every room for a `sync`: messages may
    /// have been missed, and what Redis holds for this node may be stale.
    fn resync_all(&self) {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        Self::resync(rooms);
    }

    /// [`Hub::resync_all`] for some rooms only.
    fn resync(rooms: Vec<Arc<Room>>) {
        for r in rooms {
            let mut st = lock(&r.state);
            if st.installed {
                st.mirror.begin_resync();
                st.resnapshot = true;
            }
            st.needs_sync = true;
            drop(st);
            r.wake.notify_one();
        }
    }

    /// Runs the pub/sub connection for the life of the process.
    pub async fn run_subscriber(self: Arc<Self>) {
        let Some(mut cmds) = lock(&self.sub_rx).take() else {
            return;
        };
        let sub_name = format!("{}-sub-{}", self.keys.prefix(), self.node);
        let hot = self.store.redis().clone();
        let mut first = true;
        let mut backoff = Duration::from_millis(50);
        // the channels this task has subscribed: what a new connection subscribes again
        // (the control channel from the start: disconnects reach every node, whatever its rooms)
        let mut subscribed: HashSet<String> = HashSet::from([self.control_channel.clone()]);
        loop {
            let t = self.cfg.redis.command_timeout();
            let connected = tokio::time::timeout(self.cfg.redis.connect_timeout() + t, async {
                let mut sub = Subscriber::connect(&self.cfg.redis, &sub_name, &hot).await?;
                let probes = sub.probe_channels(&self.probe_channel).await?;
                Ok::<_, redis::RedisError>((sub, probes))
            })
            .await;
            let (mut sub, probe_channels) = match connected {
                Ok(Ok(c)) => c,
                other => {
                    let err = match other {
                        Ok(Err(e)) => crate::redis::dial::describe(&e),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(error = %err, "pub/sub connect failed");
                    self.metrics.redis_error("pubsub");
                    // keep answering subscribe requests (negatively) while Redis is away
                    let deadline = tokio::time::sleep(backoff);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            c = cmds.recv() => match c {
                                Some(c) => self.refuse(c, &mut subscribed),
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            let channels: Vec<String> = subscribed.iter().cloned().collect();
            let mut all: Vec<&str> = probe_channels.iter().map(String::as_str).collect();
            all.extend(channels.iter().map(String::as_str));
            let mut ok = true;
            for chunk in all.chunks(256) {
                ok = matches!(
                    tokio::time::timeout(t, sub.subscribe(chunk)).await,
                    Ok(Ok(()))
                );
                if !ok {
                    break;
                }
            }
            if !ok {
                tracing::warn!("pub/sub resubscribe failed; reconnecting");
                continue;
            }
            if !first {
                self.metrics.pubsub_reconnect();
                self.metrics.pubsub_event(pubsub_event::RECONNECT);
                tracing::info!(
                    rooms = channels.len(),
                    "pub/sub reconnected; re-snapshotting rooms"
                );
                self.resync_all();
            }
            first = false;
            *lock(&self.probes) = probe_channels
                .into_iter()
                .map(|channel| Probe {
                    channel,
                    sent: 0,
                    seen: true,
                    lost: false,
                })
                .collect();
            self.shards_down.store(0, Ordering::Relaxed);
            self.pubsub_up.store(true, Ordering::Relaxed);
            let publisher = sub.publisher(&hot);
            let mut probe = tokio::time::interval(
                self.cfg
                    .presence
                    .heartbeat_interval()
                    .min(Duration::from_secs(5)),
            );
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.tick().await;
            let mut probe_deadline: Option<Instant> = None;
            // channels the server dropped (their slot moved) and not subscribed again yet, and
            // when the next attempt is due
            let mut dropped: HashSet<String> = HashSet::new();
            let mut resubscribe_at: Option<Instant> = None;
            let mut resubscribe_backoff = RESUBSCRIBE_RETRY;
            self.channels_dropped.store(0, Ordering::Relaxed);
            // after a burst of messages, the node's other tasks (readers, a publisher's push)
            // run before the next: writes of a busy room never hold them back for long
            let mut yield_next = false;
            loop {
                if std::mem::take(&mut yield_next) {
                    tokio::task::yield_now().await;
                }
                tokio::select! {
                    m = sub.next() => match self.dispatch_burst(&mut sub, m) {
                        None => yield_next = true,
                        Some(Some(Event::Message { channel, payload })) => self.dispatch(&channel, &payload),
                        Some(Some(Event::Interrupted(why))) => {
                            self.metrics.pubsub_event(if why == "disconnect" {
                                pubsub_event::DISCONNECT
                            } else {
                                pubsub_event::RESUBSCRIBE
                            });
                            tracing::info!(event = why, "pub/sub interrupted; re-snapshotting rooms");
                            self.resync_all();
                        }
                        Some(Some(Event::Dropped(channel))) => {
                            self.metrics.pubsub_event(pubsub_event::SLOT_MOVED);
                            dropped.insert(channel);
                            resubscribe_at.get_or_insert_with(|| Instant::now() + RESUBSCRIBE_GATHER);
                        }
                        Some(None) => { tracing::warn!("pub/sub connection lost"); break; }
                    },
                    _ = tokio::time::sleep_until(resubscribe_at.unwrap_or_else(Instant::now)), if resubscribe_at.is_some() => {
                        resubscribe_at = None;
                        if !self.resubscribe_dropped(&mut sub, &subscribed, &mut dropped, t).await {
                            resubscribe_at = Some(Instant::now() + resubscribe_backoff);
                            resubscribe_backoff = (resubscribe_backoff * 2).min(RESUBSCRIBE_MAX);
                        } else {
                            resubscribe_backoff = RESUBSCRIBE_RETRY;
                        }
                    }
                    c = cmds.recv() => {
                        let Some(c) = c else { return };
                        // everything queued meanwhile goes out together, in order
                        let mut batch = vec![c];
                        while batch.len() < SUBSCRIBE_BATCH {
                            match cmds.try_recv() {
                                Ok(c) => batch.push(c),
                                Err(_) => break,
                            }
                        }
                        if !self.apply(&mut sub, &mut subscribed, batch, t).await {
                            tracing::warn!("SUBSCRIBE or UNSUBSCRIBE failed; reconnecting");
                            break;
                        }
                    }
                    _ = probe.tick() => {
                        // a round is judged once all its probes are back or its deadline passed
                        let all_back = lock(&self.probes).iter().all(|p| p.seen);
                        let due = probe_deadline.is_none_or(|d| Instant::now() > d);
                        if !all_back && !due {
                            continue;
                        }
                        if probe_deadline.is_some() {
                            let (healthy, came_back) = self.check_probes();
                            if !healthy && !sub.reconnects_itself() {
                                tracing::warn!("pub/sub probe did not come back; rebuilding the connection");
                                break;
                            }
                            if !healthy {
                                // ask the shard's current owner again: the client may not have
                                // re-subscribed there yet
                                let lost: Vec<String> = lock(&self.probes).iter().filter(|p| p.lost).map(|p| p.channel.clone()).collect();
                                let lost: Vec<&str> = lost.iter().map(String::as_str).collect();
                                let _ = tokio::time::timeout(t, sub.subscribe(&lost)).await;
                            }
                            if came_back {
                                // the rooms' channels too, then re-snapshot everything
                                let channels: Vec<&str> = subscribed.iter().map(String::as_str).collect();
                                for chunk in channels.chunks(256) {
                                    if !matches!(tokio::time::timeout(t, sub.subscribe(chunk)).await, Ok(Ok(()))) {
                                        tracing::warn!("re-subscribing rooms after a shard came back failed");
                                        break;
                                    }
                                }
                                self.resync_all();
                            }
                        }
                        self.send_probes(&publisher, sub.reconnects_itself());
                        // a standalone connection is rebuilt on a miss, so it gets two command
                        // deadlines; a cluster shard is only reported down (readiness), after one
                        let wait = if sub.reconnects_itself() { t } else { t * 2 };
                        probe_deadline = Some(Instant::now() + wait);
                    }
                }
            }
            self.pubsub_up.store(false, Ordering::Relaxed);
            self.metrics.redis_error("pubsub");
        }
    }

    /// Subscribes again, on the slot's new owner, the channels the server dropped when their
    /// slot moved, as long as the node still wants them (a room torn down meanwhile is left
    /// alone); then re-snapshots those rooms and re-asserts the node's presence in them with
    /// `sync`, since their messages published during the move are lost. Stops at the first
    /// failure and returns false: the rest is tried again after a pause, and readiness is false
    /// until every channel is back.
    async fn resubscribe_dropped(
        &self,
        sub: &mut Subscriber,
        subscribed: &HashSet<String>,
        dropped: &mut HashSet<String>,
        t: Duration,
    ) -> bool {
        dropped.retain(|ch| subscribed.contains(ch) || ch.starts_with(self.probe_channel.as_str()));
        let mut back: Vec<String> = Vec::new();
        let mut failure = None;
        for ch in dropped.iter() {
            // the cluster client routes it by slot and follows the `MOVED` (refreshing its slot
            // map) to the new owner
            match tokio::time::timeout(t, sub.subscribe(&[ch.as_str()])).await {
                Ok(Ok(())) => back.push(ch.clone()),
                Ok(Err(e)) => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    failure = Some("timed out".into());
                    break;
                }
            }
        }
        for ch in &back {
            dropped.remove(ch);
        }
        let rooms: Vec<Arc<Room>> = {
            let map = lock(&self.rooms);
            back.iter()
                .filter_map(|ch| self.keys.room_of_channel(ch))
                .filter_map(|id| map.get(&id).cloned())
                .collect()
        };
        if !back.is_empty() {
            tracing::info!(
                rooms = rooms.len(),
                channels = back.len(),
                "slot moved: channels re-subscribed on the new owner; re-snapshotting their rooms"
            );
        }
        Self::resync(rooms);
        self.channels_dropped.store(
            if failure.is_some() { dropped.len() } else { 0 },
            Ordering::Relaxed,
        );
        match failure {
            Some(e) => {
                tracing::warn!(
                    channels = dropped.len(),
                    error = %e,
                    "slot moved: re-subscribing its channels failed; retrying"
                );
                false
            }
            None => true,
        }
    }

    /// After a probe round's deadline: marks the shards whose probe did not come back as down
    /// (readiness is false while any is) and those whose probe came back after a loss as up
    /// again, re-snapshotting the rooms then (their messages may have been lost meanwhile).
    /// Returns whether every probe came back, and whether a shard came back after a loss.
    fn check_probes(&self) -> (bool, bool) {
        let mut lost = Vec::new();
        let mut back = 0;
        let mut down = 0;
        for p in lock(&self.probes).iter_mut() {
            if !p.seen && !p.lost {
                p.lost = true;
                lost.push(p.channel.clone());
            } else if p.seen && p.lost {
                p.lost = false;
                back += 1;
            }
            if p.lost {
                down += 1;
            }
        }
        self.shards_down.store(down, Ordering::Relaxed);
        for ch in &lost {
            self.metrics.pubsub_event(pubsub_event::SHARD_LOST);
            tracing::warn!(probe = %ch, "pub/sub probe did not come back: shard unreachable");
        }
        if back > 0 {
            for _ in 0..back {
                self.metrics.pubsub_event(pubsub_event::SHARD_BACK);
            }
            tracing::info!(
                shards = back,
                "pub/sub probe back; re-subscribing and re-snapshotting rooms"
            );
        }
        (down == 0, back > 0)
    }

    /// Answers a request while there is no connection: no subscription now (the joiner gets an
    /// error); an unsubscribe just leaves the set.
    fn refuse(&self, c: SubCmd, subscribed: &mut HashSet<String>) {
        match c {
            SubCmd::Subscribe(_, tx) => {
                self.sub_pending.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(false);
            }
            SubCmd::Unsubscribe(ch) => {
                subscribed.remove(&ch);
            }
        }
    }

    /// Applies requests in order, each run of subscribes (or unsubscribes) as one command. A
    /// subscribe whose joiner stopped waiting is skipped; one of a channel already subscribed is
    /// answered at once. Returns false when the connection failed; the requests after the failure
    /// are answered as while disconnected.
    async fn apply(
        &self,
        sink: &mut Subscriber,
        subscribed: &mut HashSet<String>,
        batch: Vec<SubCmd>,
        t: Duration,
    ) -> bool {
        let mut ok = true;
        let mut it = batch.into_iter().peekable();
        while let Some(c) = it.next() {
            if !ok {
                self.refuse(c, subscribed);
                continue;
            }
            match c {
                SubCmd::Subscribe(ch, tx) => {
                    let mut group = vec![(ch, tx)];
                    while let Some(SubCmd::Subscribe(..)) = it.peek() {
                        if let Some(SubCmd::Subscribe(ch, tx)) = it.next() {
                            group.push((ch, tx));
                        }
                    }
                    self.sub_pending.fetch_sub(group.len(), Ordering::AcqRel);
                    group.retain(|(_, tx)| !tx.is_closed());
                    let mut new: Vec<&str> = Vec::new();
                    for (ch, _) in &group {
                        if !subscribed.contains(ch) && !new.contains(&ch.as_str()) {
                            new.push(ch);
                        }
                    }
                    ok = new.is_empty()
                        || matches!(
                            tokio::time::timeout(t, sink.subscribe(&new)).await,
                            Ok(Ok(()))
                        );
                    if ok {
                        subscribed.extend(new.into_iter().map(String::from));
                    }
                    for (_, tx) in group {
                        let _ = tx.send(ok);
                    }
                }
                SubCmd::Unsubscribe(ch) => {
                    let mut gone: Vec<String> = Vec::new();
                    gone.extend(subscribed.take(&ch));
                    while let Some(SubCmd::Unsubscribe(_)) = it.peek() {
                        if let Some(SubCmd::Unsubscribe(ch)) = it.next() {
                            gone.extend(subscribed.take(&ch));
                        }
                    }
                    ok = gone.is_empty()
                        || matches!(
                            tokio::time::timeout(
                                t,
                                sink.unsubscribe(
                                    &gone.iter().map(String::as_str).collect::<Vec<_>>()
                                )
                            )
                            .await,
                            Ok(Ok(()))
                        );
                }
            }
        }
        ok
    }

    /// Publishes one probe per shard; each must come back on the subscriber before the next
    /// round's check.
    /// A probe that cannot even be published on a standalone server is not the subscriber's
    /// fault (Redis is down for everyone, and the stream ends by itself): it counts as seen. In a
    /// cluster it means the shard is unreachable.
    fn send_probes(self: &Arc<Self>, publisher: &Publisher, per_shard: bool) {
        let sent = self.epoch.elapsed().as_nanos() as u64;
        let channels: Vec<String> = lock(&self.probes)
            .iter_mut()
            .map(|p| {
                // only a new probe resets the flag
                p.sent = sent;
                p.seen = false;
                p.channel.clone()
            })
            .collect();
        for ch in channels {
            let hub = self.clone();
            let mut publisher = publisher.clone();
            let t = self.cfg.redis.command_timeout();
            tokio::spawn(async move {
                let payload = sent.to_string();
                let r = tokio::time::timeout(t, publisher.publish(&ch, payload.as_bytes())).await;
                if !matches!(r, Ok(Ok(_))) {
                    hub.metrics.redis_error("publish");
                    if !per_shard
                        && let Some(p) = lock(&hub.probes).iter_mut().find(|p| p.channel == ch)
                    {
                        p.seen = true;
                    }
                }
            });
        }
    }
}
