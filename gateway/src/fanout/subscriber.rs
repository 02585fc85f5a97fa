//! The node's pub/sub connection: subscribe and unsubscribe requests from joins and teardowns,
//! dispatch of every message (room frames, presence envelopes, deletions, probes), the liveness
//! probe, and the rebuild after a lost or silent connection.

use std::collections::HashSet;

use super::*;

/// Queued requests applied in one go: one SUBSCRIBE for many rooms, not a round trip each.
const SUBSCRIBE_BATCH: usize = 256;

impl Hub {
    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if channel == self.probe_channel {
            let sent = self.probe_sent.load(Ordering::Relaxed);
            let now = self.epoch.elapsed().as_nanos() as u64;
            if std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                == Some(sent)
            {
                self.probe_seen.store(true, Ordering::Relaxed);
                self.metrics
                    .pubsub_lag(now.saturating_sub(sent) as f64 / 1e9);
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

    /// Runs the pub/sub connection for the life of the process.
    pub async fn run_subscriber(self: Arc<Self>, client: redis::Client) {
        let Some(mut cmds) = lock(&self.sub_rx).take() else {
            return;
        };
        let probe_channel = self.probe_channel.clone();
        let sub_name = format!("{}-sub-{}", self.keys.prefix(), self.node);
        let mut first = true;
        let mut backoff = Duration::from_millis(50);
        // the channels this task has subscribed: what a new connection subscribes again
        let mut subscribed: HashSet<String> = HashSet::new();
        loop {
            let ps = match tokio::time::timeout(
                self.cfg.redis.connect_timeout(),
                crate::redis::named_pubsub(&client, &sub_name),
            )
            .await
            {
                Ok(Ok(ps)) => ps,
                other => {
                    let err = match other {
                        Ok(Err(e)) => e.to_string(),
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
            let (mut sink, mut stream) = ps.split();
            let channels: Vec<String> = subscribed.iter().cloned().collect();
            let t = self.cfg.redis.command_timeout();
            let mut ok = matches!(
                tokio::time::timeout(t, sink.subscribe(&probe_channel)).await,
                Ok(Ok(()))
            );
            for chunk in channels.chunks(256) {
                if !ok {
                    break;
                }
                ok = matches!(
                    tokio::time::timeout(t, sink.subscribe(chunk)).await,
                    Ok(Ok(()))
                );
            }
            if !ok {
                tracing::warn!("pub/sub resubscribe failed; reconnecting");
                continue;
            }
            if !first {
                self.metrics.pubsub_reconnect();
                tracing::info!(
                    rooms = channels.len(),
                    "pub/sub reconnected; re-snapshotting rooms"
                );
                let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
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
            first = false;
            self.probe_seen.store(true, Ordering::Relaxed);
            self.pubsub_up.store(true, Ordering::Relaxed);
            let mut probe = tokio::time::interval(
                self.cfg
                    .presence
                    .heartbeat_interval()
                    .min(Duration::from_secs(5)),
            );
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.tick().await;
            let mut probe_deadline: Option<Instant> = None;
            loop {
                tokio::select! {
                    m = stream.next() => match m {
                        Some(msg) => self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => { tracing::warn!("pub/sub connection lost"); break; }
                    },
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
                        if !self.apply(&mut sink, &mut subscribed, batch, t).await {
                            tracing::warn!("SUBSCRIBE or UNSUBSCRIBE failed; reconnecting");
                            break;
                        }
                    }
                    _ = probe.tick() => {
                        if let Some(d) = probe_deadline && !self.probe_seen.load(Ordering::Relaxed) && Instant::now() > d {
                            tracing::warn!("pub/sub probe did not come back; rebuilding the connection");
                            break;
                        }
                        self.send_probe();
                        probe_deadline = Some(Instant::now() + t * 2);
                    }
                }
            }
            self.pubsub_up.store(false, Ordering::Relaxed);
            self.metrics.redis_error("pubsub");
        }
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
        sink: &mut redis::aio::PubSubSink,
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
                            tokio::time::timeout(t, sink.unsubscribe(&gone)).await,
                            Ok(Ok(()))
                        );
                }
            }
        }
        ok
    }

    fn send_probe(self: &Arc<Self>) {
        let hub = self.clone();
        let sent = self.epoch.elapsed().as_nanos() as u64;
        // Only a new probe resets the flag; if PUBLISH itself fails, Redis is down for everyone
        // and the stream ends by itself.
        self.probe_sent.store(sent, Ordering::Relaxed);
        self.probe_seen.store(false, Ordering::Relaxed);
        tokio::spawn(async move {
            let cmd = redis::cmd("PUBLISH")
                .arg(&hub.probe_channel)
                .arg(sent.to_string())
                .clone();
            if hub.store.command::<i64>("publish", &cmd).await.is_err() {
                // not the subscriber's fault: do not count this probe
                hub.probe_seen.store(true, Ordering::Relaxed);
            }
        });
    }
}
