//! The node-local tail of each subscribed room's history, and how joins are answered from it.
//!
//! A room's [`Tail`] lives in its `RoomState`, under the same lock as the room's members. It holds
//! the newest `rooms.history_len` broadcasts as the live frames (shared `Bytes`), fed by this
//! node's own subscription ([`Hub::deliver_event`], the dispatch hook): a warm join
//! (`rooms.history_on_join` events) and a recovery within the tail (`since`) read nothing from
//! Redis. A cold room costs one read ([`ReadReq::Last`] of the whole cap), done while it is
//! installed.
//!
//! ## Why no event is lost or doubled
//!
//! *The tail's invariant.* `after = Some(a)`: the tail holds every entry of the room's stream with
//! an id above `a`, oldest first, without holes. `after = None` (the "hole" state of a fresh or
//! reset tail): it holds every entry *published since its last reset*, which happened while the
//! node was subscribed (or before it subscribed: a fresh room object); nothing older is known.
//! Entries come in by the subscription, in stream order (`publish.lua` appends and publishes in one
//! atomic call, so pub/sub order is stream order), and only ever at the end; when the tail is over
//! its cap the oldest goes and `after` becomes its id.
//!
//! *Cold install, and every read.* The subscription is confirmed first, then the stream is read:
//! the read (at time T) returns everything up to the stream's last id `L` at T. Every entry above
//! `L` was published after T, hence after the subscription, so it reaches this node's tail — it
//! is already there, or still on its way. So the read's entries, followed by the tail's entries
//! above `L`, are the stream without a hole, provided the tail did not drop any of them to its cap
//! while the read ran (`after <= L`, or the hole state). A read is only merged if no reset
//! happened since it was issued (`gen`), since a reset may have thrown away entries it relied on.
//! Frames still on their way when a read was merged arrive later: [`Tail::accept`] does not add
//! them twice (their id is not above the tail's last), but still hands them to the members that
//! have not had them.
//!
//! *Resets.* The subscription may have lost frames when the pub/sub connection was rebuilt (the
//! subscriber then asks for a presence re-snapshot of every room, setting `resnapshot`) or when a
//! presence envelope went missing (the same flag). While `resnapshot` is set the tail is not
//! trusted for joins, and the first frame arriving then resets it ([`Tail::invalidate`]); the
//! driver resets it too when it starts the re-snapshot (not when it retries a failed one), then
//! reloads it (one read, merged as above). A reset keeps nothing but the ids' high-water mark.
//!
//! *Per channel.* A join is answered under the room lock, in one step with queuing its reply,
//! `presence_state`, `presence_count` and its history frames, and adding it to the members; every
//! live frame is handed to members under the same lock after it was added to the tail. So a
//! channel gets its history, then exactly the live frames after it. When a channel's history
//! reaches beyond what this node has dispatched (it came from a read, or a `since` ahead of this
//! node), the member keeps a `skip_until` mark and frames up to it are not sent to it again: for
//! each channel the ids are strictly increasing.
//!
//! *How many events.* A recovery delivers at most `rooms.history_len` events (what every node
//! keeps); more missed than that is a gap: `"recovered": false` and the last
//! `rooms.history_on_join` events.

use std::collections::VecDeque;

use super::*;
use crate::history::{Read, ReadReq, StreamId, channel_head, frame_body, frame_id};
use crate::metrics::recovery_outcome;

/// Reads one join may make before it settles for what memory holds (each is one round trip; a
/// second is only needed when a reset raced with the first).
const JOIN_READS: usize = 2;
/// A `since` whose time is this far ahead of the gateway's clock cannot be an id the room will
/// have soon: it is a gap at once, without a Redis read (stream ids are Redis's clock in ms).
const SINCE_FUTURE_SLACK_MS: u64 = 60_000;

/// What a joining channel asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The last `rooms.history_on_join` events.
    Last,
    /// Every event after the id (at most `rooms.history_len`), or, after a gap, the last
    /// `rooms.history_on_join`.
    Since(StreamId),
}

/// The history a joining channel gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    /// Oldest first, as live frames (`[null,null,…]`).
    pub frames: Vec<(StreamId, Bytes)>,
    /// The channel's position: the last id it has been given (or `since`, when nothing after it
    /// exists yet).
    pub last: Option<StreamId>,
    /// For a `since` join: every event after it was delivered.
    pub recovered: Option<bool>,
}

/// One room's history in this node's memory. See the module doc for the invariant.
#[derive(Debug, Default)]
pub struct Tail {
    /// `rooms.history_len` (0: history off, nothing kept).
    cap: usize,
    /// `rooms.history_on_join`.
    on_join: usize,
    entries: VecDeque<(StreamId, Bytes)>,
    /// Every stream entry above this id is in `entries` (None: only those since the last reset).
    after: Option<StreamId>,
    /// From the last read: every entry the stream ever had above this id is still in Redis.
    floor: Option<StreamId>,
    /// The highest id known to exist (the stream's last id at the last read).
    known_last: Option<StreamId>,
    /// The highest id handed to this room's members by the subscription (kept across resets).
    delivered: Option<StreamId>,
    /// Bumped by every reset: a read issued before a reset is not merged after it.
    generation: u64,
    load_wanted: bool,
    loading: bool,
    load_retry_at: Option<Instant>,
    load_backoff: Duration,
}

impl Tail {
    pub fn new(cap: usize, on_join: usize) -> Self {
        Self {
            cap,
            on_join: on_join.min(cap),
            load_wanted: cap > 0,
            ..Default::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the tail has a known lower bound (not the hole state).
    pub fn is_ready(&self) -> bool {
        self.after.is_some()
    }

    /// The highest id this room's members got from the subscription.
    pub fn delivered(&self) -> Option<StreamId> {
        self.delivered
    }

    /// The tail holds everything the stream retains (it is not only the newest part).
    fn complete(&self) -> bool {
        matches!((self.after, self.floor), (Some(a), Some(f)) if a <= f)
    }

    fn last(&self) -> Option<StreamId> {
        self.entries.back().map(|e| e.0)
    }

    fn known_last(&self) -> Option<StreamId> {
        self.known_last.max(self.last())
    }

    /// A live frame with id `id` arrived on the subscription. Returns whether the room's members
    /// get it (false: a duplicate of one they had).
    pub fn accept(&mut self, id: StreamId, frame: &Bytes) -> bool {
        if let Some(d) = self.delivered
            && id <= d
        {
            if self.entries.binary_search_by_key(&id, |e| e.0).is_ok() {
                return false;
            }
            // below what was delivered and unknown: the stream was recreated (the room deleted and
            // created again, Redis lost it): start over from here
            tracing::warn!(%id, delivered = %d, "history ids went backwards; resetting the room's tail");
            self.invalidate();
        }
        self.delivered = Some(id);
        if self.cap == 0 {
            return true;
        }
        if self.last().is_some_and(|l| id <= l) {
            // a read already put it in the tail before it arrived here; the members still need it
            return true;
        }
        self.entries.push_back((id, frame.clone()));
        while self.entries.len() > self.cap {
            if let Some((old, _)) = self.entries.pop_front() {
                self.after = Some(old);
            }
        }
        true
    }

    /// The subscription may have lost frames: forget everything but the high-water mark; what
    /// arrives from now on is kept, and a reload is wanted.
    pub fn invalidate(&mut self) {
        self.entries.clear();
        self.after = None;
        self.floor = None;
        self.known_last = None;
        self.generation += 1;
        self.load_wanted = self.cap > 0;
        self.load_retry_at = None;
    }

    /// Whether a load should start now; otherwise when to look again (if one is wanted).
    pub fn load_due(&self, now: Instant) -> Result<(), Option<Instant>> {
        if !self.load_wanted || self.loading {
            return Err(None);
        }
        match self.load_retry_at {
            Some(t) if now < t => Err(Some(t)),
            _ => Ok(()),
        }
    }

    /// Starts a load; returns its generation and request.
    pub fn begin_load(&mut self) -> (u64, ReadReq) {
        self.loading = true;
        self.load_wanted = false;
        (self.generation, ReadReq::Last(self.cap))
    }

    /// A load finished. A failed one is retried after a pause that doubles up to `max`.
    pub fn end_load(&mut self, generation: u64, r: Option<&Read>, max: Duration) {
        self.loading = false;
        match r {
            Some(r) if generation == self.generation => {
                self.load_backoff = Duration::ZERO;
                self.merge(r);
            }
            // a reset happened meanwhile: it wanted a load of its own
            Some(_) => {}
            None => {
                self.load_wanted = true;
                self.load_retry_at = Some(back_off(&mut self.load_backoff, true, max));
            }
        }
    }

    /// Merges a read of the newest `cap` entries (see the module doc).
    fn merge(&mut self, r: &Read) {
        self.floor = self.floor.max(Some(r.floor()));
        self.known_last = self.known_last.max(Some(r.last));
        if self.after.is_some_and(|a| a > r.last) {
            // the tail dropped entries above the read's end while it ran: they are not in the read
            // either; what the tail has is still right
            return;
        }
        let newer: Vec<(StreamId, Bytes)> = self
            .entries
            .drain(..)
            .filter(|(id, _)| *id > r.last)
            .collect();
        self.after = Some(if r.entries.len() < self.cap {
            // the whole stream: whatever it lacks was trimmed
            r.floor()
        } else {
            r.entries.first().map_or(r.last, |e| e.0.pred())
        });
        self.entries.extend(r.entries.iter().cloned());
        self.entries.extend(newer);
        while self.entries.len() > self.cap {
            if let Some((old, _)) = self.entries.pop_front() {
                self.after = Some(old);
            }
        }
    }

    /// The newest `n` entries of `list`.
    fn newest<'a>(
        list: impl DoubleEndedIterator<Item = &'a (StreamId, Bytes)>,
        n: usize,
    ) -> Vec<(StreamId, Bytes)> {
        let mut v: Vec<_> = list.rev().take(n).cloned().collect();
        v.reverse();
        v
    }

    fn last_of(frames: &[(StreamId, Bytes)]) -> Option<StreamId> {
        frames.last().map(|e| e.0)
    }

    /// Answers a join: from `read` (done for this join, merged with the tail's newer entries), or
    /// from memory when `trusted` (no re-snapshot pending). `Err`: the read it needs.
    pub fn answer(
        &self,
        want: Want,
        trusted: bool,
        read: Option<&(u64, Read)>,
        now_ms: u64,
    ) -> Result<Served, ReadReq> {
        if self.cap == 0 {
            return Ok(Served {
                recovered: matches!(want, Want::Since(_)).then_some(false),
                ..Default::default()
            });
        }
        if let Some((generation, r)) = read
            && *generation == self.generation
            && let Some(s) = self.bridge(want, r)
        {
            return Ok(s);
        }
        if trusted && let Some(s) = self.in_memory(want, now_ms) {
            return Ok(s);
        }
        Err(match want {
            Want::Last => ReadReq::Last(self.on_join),
            Want::Since(s) => ReadReq::Since(s, self.on_join),
        })
    }

    /// What memory alone can answer, when that is all there is (a read failed, or the deadline
    /// passed): the newest entries it has, and a gap for a `since`.
    pub fn fallback(&self, want: Want) -> Served {
        let frames = Self::newest(self.entries.iter(), self.on_join);
        Served {
            last: Self::last_of(&frames),
            frames,
            recovered: matches!(want, Want::Since(_)).then_some(false),
        }
    }

    fn gap(frames: Vec<(StreamId, Bytes)>) -> Served {
        Served {
            last: Self::last_of(&frames),
            frames,
            recovered: Some(false),
        }
    }

    fn in_memory(&self, want: Want, now_ms: u64) -> Option<Served> {
        let full = self.entries.len() >= self.cap;
        let last_n = || Self::newest(self.entries.iter(), self.on_join);
        match want {
            Want::Last => {
                if self.entries.len() >= self.on_join || self.complete() {
                    let frames = last_n();
                    return Some(Served {
                        last: Self::last_of(&frames),
                        frames,
                        recovered: None,
                    });
                }
                None
            }
            Want::Since(s) => {
                let can_list = full || self.complete();
                if s.ms > now_ms.saturating_add(SINCE_FUTURE_SLACK_MS) {
                    // an id the room cannot have: a gap, whatever Redis would say
                    return can_list.then(|| Self::gap(last_n()));
                }
                // this node has not seen that id (yet): only Redis can tell
                let known = self.known_last()?;
                if s > known {
                    return None;
                }
                let after = self.after?;
                if s >= after {
                    let frames: Vec<_> = self.entries.iter().filter(|e| e.0 > s).cloned().collect();
                    return Some(Served {
                        last: Self::last_of(&frames).max(Some(s)),
                        frames,
                        recovered: Some(true),
                    });
                }
                // older than the tail: more than the cap was missed, or it was trimmed
                if can_list {
                    return Some(Self::gap(last_n()));
                }
                None
            }
        }
    }

    /// A read's entries, then the tail's above the read's end, if together they have no hole.
    fn bridge(&self, want: Want, r: &Read) -> Option<Served> {
        if self.after.is_some_and(|a| a > r.last) {
            return None;
        }
        let newer = self.entries.iter().filter(|e| e.0 > r.last);
        let mut all: Vec<(StreamId, Bytes)> = r.entries.clone();
        all.extend(newer.cloned());
        match want {
            Want::Last => {
                let frames = Self::newest(all.iter(), self.on_join);
                Some(Served {
                    last: Self::last_of(&frames),
                    frames,
                    recovered: None,
                })
            }
            Want::Since(s) => {
                let events: Vec<_> = all.iter().filter(|e| e.0 > s).cloned().collect();
                if r.recovered(s) && events.len() <= self.cap {
                    Some(Served {
                        last: Self::last_of(&events).max(Some(s)),
                        frames: events,
                        recovered: Some(true),
                    })
                } else {
                    Some(Self::gap(Self::newest(all.iter(), self.on_join)))
                }
            }
        }
    }
}

impl RoomState {
    /// The tail is trusted for joins unless a re-snapshot is pending (the subscription may have
    /// lost frames that the tail does not know it lacks).
    fn history_trusted(&self) -> bool {
        !self.resnapshot
    }

    /// Hands a live frame with a stream id to every member that has not had it.
    fn send_event(&mut self, id: StreamId, frame: &Bytes) -> usize {
        let mut n = 0;
        for m in self.members.values_mut() {
            if let Some(s) = m.skip_until.as_deref() {
                if id <= *s {
                    continue;
                }
                m.skip_until = None;
            }
            if m.out.send(frame.clone()) {
                n += 1;
            }
        }
        n
    }
}

impl Hub {
    /// The subscriber's hook for a room broadcast frame (`[...]`): kept in the room's tail when
    /// it carries a stream id, and handed to the room's local members, encoded once.
    pub(super) fn deliver_event(&self, room: &Room, payload: &[u8]) {
        let frame = Bytes::copy_from_slice(payload);
        let mut st = lock(&room.state);
        let mut wake = false;
        let n = match frame_id(&frame) {
            None => st.send_all(&frame),
            Some(id) => {
                if st.resnapshot && st.installed && st.history.is_ready() {
                    // frames may have been lost before this one (see the module doc)
                    st.history.invalidate();
                    wake = true;
                }
                if st.history.accept(id, &frame) {
                    st.send_event(id, &frame)
                } else {
                    0
                }
            }
        };
        drop(st);
        if wake {
            room.wake.notify_one();
        }
        self.metrics.fanout(n);
    }

    /// A cold room's first read of its history (while it is installed), merged into its tail.
    /// A failure leaves the load to the driver's retries; the install goes on without it.
    pub(super) async fn load_history(&self, room: &Room, until: Instant) {
        let (generation, req) = {
            let mut st = lock(&room.state);
            if !st.history.enabled() || st.history.load_due(Instant::now()).is_err() {
                return;
            }
            st.history.begin_load()
        };
        let r =
            tokio::time::timeout_at(until, self.history.read(&room.keys, room.topic(), req)).await;
        let r = match r {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(room = %room.id, error = %e, "reading the room's history failed; retrying");
                None
            }
            Err(_) => None,
        };
        let max = self.cfg.presence.heartbeat_interval();
        lock(&room.state)
            .history
            .end_load(generation, r.as_ref(), max);
        room.wake.notify_one();
    }

    /// The reads a joining channel needs before its history can be answered (none for a warm
    /// room); at most [`JOIN_READS`], within the join's deadline.
    pub(super) async fn history_reads(
        &self,
        room: &Room,
        want: Want,
        until: Instant,
    ) -> Option<(u64, Read)> {
        if !self.history.enabled() {
            return None;
        }
        let mut read: Option<(u64, Read)> = None;
        for _ in 0..JOIN_READS {
            let need = {
                let st = lock(&room.state);
                let generation = st.history.generation;
                st.history
                    .answer(
                        want,
                        st.history_trusted(),
                        read.as_ref(),
                        crate::unix_ms() as u64,
                    )
                    .err()
                    .map(|req| (generation, req))
            };
            let Some((generation, req)) = need else {
                break;
            };
            match tokio::time::timeout_at(until, self.history.read(&room.keys, room.topic(), req))
                .await
            {
                Ok(Ok(r)) => read = Some((generation, r)),
                Ok(Err(e)) => {
                    tracing::warn!(room = %room.id, error = %e, "history read for a join failed");
                    break;
                }
                Err(_) => break,
            }
        }
        read
    }

    /// Under the room lock, with the join's other frames: the channel's history (from `read` or
    /// memory, else what memory has) and its recovery outcome, counted.
    pub(super) fn serve_history(
        &self,
        st: &RoomState,
        want: Want,
        read: Option<&(u64, Read)>,
    ) -> Served {
        if !st.history.enabled() && matches!(want, Want::Last) {
            return Served::default();
        }
        let served = st
            .history
            .answer(want, st.history_trusted(), read, crate::unix_ms() as u64)
            .unwrap_or_else(|_| st.history.fallback(want));
        if let (Want::Since(_), Some(recovered)) = (want, served.recovered) {
            self.metrics
                .recovery(match (recovered, served.frames.is_empty()) {
                    (false, _) => recovery_outcome::GAP,
                    (true, true) => recovery_outcome::NONE,
                    (true, false) => recovery_outcome::RECOVERED,
                });
        }
        served
    }
}

/// Queues a channel's history frames (its join_ref set: a channel that has rejoined since drops
/// them) without copying the shared payloads.
pub(super) fn send_history(out: &Outbox, join_ref: &str, served: &Served) -> bool {
    if served.frames.is_empty() {
        return true;
    }
    let head = channel_head(join_ref);
    let mut ok = true;
    for (_, frame) in &served.frames {
        ok &= match frame_body(frame) {
            Some(body) => out.send_wrapped(head.clone(), body),
            None => out.send(frame.clone()),
        };
    }
    ok
}

#[cfg(test)]
mod tests;
