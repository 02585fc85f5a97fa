//! Tests of the [`Tail`]: warm joins answered in memory, cold loads bridged with what arrived
//! meanwhile, reads raced by resets, the hole state, recoveries and gaps, and members skipping what
//! their history already had — the cases the order proof in the header of `fanout/history.rs` names.

use super::*;
use crate::history::entry_frame;

fn id(ms: u64) -> StreamId {
    StreamId { ms, seq: 0 }
}

fn frame(ms: u64) -> Bytes {
    entry_frame(
        "rooms:t",
        "new_msg",
        br#"{"body":"x"}"#,
        &id(ms).to_string(),
    )
}

fn ids(s: &Served) -> Vec<u64> {
    s.frames.iter().map(|e| e.0.ms).collect()
}

/// A read of a stream holding `range` (ids in ms), newest `n` of it, `trimmed` or not.
fn read_last(range: std::ops::RangeInclusive<u64>, n: usize, trimmed: bool) -> Read {
    let all: Vec<u64> = range.collect();
    let start = all.len().saturating_sub(n);
    Read {
        exists: !all.is_empty() || trimmed,
        last: all.last().map_or(StreamId::ZERO, |m| id(*m)),
        first: all.first().map(|m| id(*m)),
        trimmed,
        ahead: false,
        entries: all[start..].iter().map(|m| (id(*m), frame(*m))).collect(),
    }
}

fn read_since(range: std::ops::RangeInclusive<u64>, since: u64, trimmed: bool) -> Read {
    let mut r = read_last(range, usize::MAX, trimmed);
    r.entries.retain(|e| e.0 > id(since));
    r
}

/// A warm tail: cap 10, on_join 3, loaded from a stream 1..=k (k <= 10 → complete).
fn warm(k: u64, trimmed: bool) -> Tail {
    let mut t = Tail::new(10, 3);
    let (g, req) = t.begin_load();
    assert_eq!(req, ReadReq::Last(10));
    t.end_load(
        g,
        Some(&read_last(1..=k, 10, trimmed)),
        Duration::from_secs(1),
    );
    assert!(t.is_ready());
    t
}

const NOW: u64 = 1_000_000;

#[test]
fn a_warm_tail_answers_joins_in_memory() {
    let mut t = warm(5, false);
    let s = t.answer(Want::Last, true, None, NOW).unwrap();
    assert_eq!(ids(&s), [3, 4, 5]);
    assert_eq!(s.last, Some(id(5)));
    // live frames extend it; the oldest go past the cap
    for m in 6..=14 {
        assert!(t.accept(id(m), &frame(m)));
    }
    assert_eq!(t.len(), 10);
    assert_eq!(
        ids(&t.answer(Want::Last, true, None, NOW).unwrap()),
        [12, 13, 14]
    );
    // a recovery within the tail
    let s = t.answer(Want::Since(id(9)), true, None, NOW).unwrap();
    assert_eq!(
        (ids(&s), s.recovered),
        (vec![10, 11, 12, 13, 14], Some(true))
    );
    // nothing missed
    let s = t.answer(Want::Since(id(14)), true, None, NOW).unwrap();
    assert_eq!(
        (ids(&s), s.recovered, s.last),
        (vec![], Some(true), Some(id(14)))
    );
    // the oldest entry still held: everything after it
    assert_eq!(
        t.answer(Want::Since(id(5)), true, None, NOW)
            .unwrap()
            .recovered,
        Some(true)
    );
    // older than the tail, which is full: more than the cap was missed
    let s = t.answer(Want::Since(id(3)), true, None, NOW).unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![12, 13, 14], Some(false)));
}

#[test]
fn a_short_stream_is_held_whole() {
    // never trimmed: any since is answered, with everything after it
    let t = warm(2, false);
    assert_eq!(ids(&t.answer(Want::Last, true, None, NOW).unwrap()), [1, 2]);
    let s = t
        .answer(Want::Since(StreamId { ms: 0, seq: 5 }), true, None, NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![1, 2], Some(true)));
    // trimmed to 5..=8 (say by another node with a smaller cap): before 5 is a gap
    let mut t = Tail::new(10, 3);
    let (g, _) = t.begin_load();
    let mut r = read_last(5..=8, 10, true);
    r.first = Some(id(5));
    t.end_load(g, Some(&r), Duration::from_secs(1));
    let s = t.answer(Want::Since(id(2)), true, None, NOW).unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![6, 7, 8], Some(false)));
    let s = t.answer(Want::Since(id(5)), true, None, NOW).unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![6, 7, 8], Some(true)));
}

#[test]
fn an_empty_room_has_nothing_to_recover() {
    let t = warm(0, false);
    let s = t.answer(Want::Last, true, None, NOW).unwrap();
    assert!(s.frames.is_empty() && s.last.is_none());
    // an id this room never had: Redis decides (once)
    assert_eq!(
        t.answer(Want::Since(id(7)), true, None, NOW),
        Err(ReadReq::Since(id(7), 3))
    );
    // an id far in the future: a gap without a read
    let s = t
        .answer(Want::Since(id(NOW + 3_600_000)), true, None, NOW)
        .unwrap();
    assert_eq!(s.recovered, Some(false));
}

#[test]
fn a_cold_load_is_bridged_with_what_arrived_meanwhile() {
    let mut t = Tail::new(10, 3);
    let (g, req) = t.begin_load();
    assert_eq!(req, ReadReq::Last(10));
    // subscribed; 20 and 21 arrive while the read (which saw up to 20) runs
    assert!(t.accept(id(20), &frame(20)));
    assert!(t.accept(id(21), &frame(21)));
    t.end_load(
        g,
        Some(&read_last(1..=20, 10, true)),
        Duration::from_secs(1),
    );
    let s = t.answer(Want::Last, true, None, NOW).unwrap();
    assert_eq!(ids(&s), [19, 20, 21]);
    assert_eq!(t.len(), 10);
    // a frame that was on its way while the read already had it: not added twice, but the
    // members who only know the subscription still get it
    let mut t = Tail::new(10, 3);
    let (g, _) = t.begin_load();
    t.end_load(
        g,
        Some(&read_last(1..=20, 10, true)),
        Duration::from_secs(1),
    );
    assert!(t.accept(id(20), &frame(20)));
    assert_eq!(t.len(), 10);
    assert!(!t.accept(id(20), &frame(20)), "a true duplicate is dropped");
    assert!(t.accept(id(22), &frame(22)));
    assert_eq!(
        ids(&t.answer(Want::Last, true, None, NOW).unwrap()),
        [19, 20, 22]
    );
}

#[test]
fn a_load_that_raced_with_a_reset_is_not_merged() {
    let mut t = Tail::new(10, 3);
    let (g, _) = t.begin_load();
    t.invalidate();
    t.accept(id(30), &frame(30));
    t.end_load(
        g,
        Some(&read_last(1..=20, 10, true)),
        Duration::from_secs(1),
    );
    assert!(!t.is_ready(), "still the hole state");
    assert!(
        t.load_due(Instant::now()).is_ok(),
        "the reset wants its own load"
    );
    let (g, _) = t.begin_load();
    t.end_load(
        g,
        Some(&read_last(1..=30, 10, true)),
        Duration::from_secs(1),
    );
    assert_eq!(
        ids(&t.answer(Want::Last, true, None, NOW).unwrap()),
        [28, 29, 30]
    );
}

#[test]
fn a_failed_load_is_retried_later() {
    let mut t = Tail::new(10, 3);
    let (g, _) = t.begin_load();
    t.end_load(g, None, Duration::from_secs(1));
    let now = Instant::now();
    assert!(matches!(t.load_due(now), Err(Some(at)) if at > now));
    assert!(t.load_due(now + Duration::from_secs(2)).is_ok());
}

#[test]
fn the_hole_state_needs_reads_and_bridges_them() {
    let mut t = warm(20, true);
    t.invalidate();
    // nothing known: a join needs a read
    assert_eq!(t.answer(Want::Last, true, None, NOW), Err(ReadReq::Last(3)));
    assert_eq!(
        t.answer(Want::Since(id(15)), true, None, NOW),
        Err(ReadReq::Since(id(15), 3))
    );
    // the read (up to 25) comes back after 26 arrived
    let g = t.generation;
    t.accept(id(26), &frame(26));
    let r = read_since(11..=25, 17, true);
    let s = t
        .answer(Want::Since(id(17)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!(
        (ids(&s), s.recovered),
        ((18..=26).collect::<Vec<_>>(), Some(true))
    );
    // 11 events after 15: more than the cap (10) is a gap
    let r = read_since(11..=25, 15, true);
    let s = t
        .answer(Want::Since(id(15)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![24, 25, 26], Some(false)));
    let r = read_last(11..=25, 3, true);
    let s = t.answer(Want::Last, true, Some(&(g, r)), NOW).unwrap();
    assert_eq!(ids(&s), [24, 25, 26]);
    // a read issued before another reset is not used
    let r = read_last(11..=25, 3, true);
    t.invalidate();
    assert!(t.answer(Want::Last, true, Some(&(g, r)), NOW).is_err());
    // three frames since the reset: a plain join can be answered from them
    for m in 27..=29 {
        t.accept(id(m), &frame(m));
    }
    assert_eq!(
        ids(&t.answer(Want::Last, true, None, NOW).unwrap()),
        [27, 28, 29]
    );
}

#[test]
fn a_read_whose_end_the_tail_no_longer_covers_is_a_gap() {
    let mut t = Tail::new(3, 2);
    let g = t.generation;
    // 4 frames arrive during the read: the tail (cap 3) dropped 10, which the read lacks
    for m in 10..=13 {
        t.accept(id(m), &frame(m));
    }
    let r = read_since(1..=9, 5, false);
    let s = t
        .answer(Want::Since(id(5)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![12, 13], Some(false)));
}

#[test]
fn recoveries_from_reads() {
    let t = Tail::new(10, 3);
    let g = t.generation;
    // trimmed past since: a gap, then the last 3
    let mut r = read_since(50..=60, 20, true);
    r.first = Some(id(50));
    let s = t
        .answer(Want::Since(id(20)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![58, 59, 60], Some(false)));
    // an id above the stream's last (the script then returns the newest instead)
    let mut r = read_last(1..=9, 3, false);
    r.ahead = true;
    let s = t
        .answer(Want::Since(id(500)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![7, 8, 9], Some(false)));
    // more missed than the cap: a gap
    let r = read_since(1..=30, 5, false);
    let s = t
        .answer(Want::Since(id(5)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!((ids(&s), s.recovered), (vec![28, 29, 30], Some(false)));
    // a since this node has not seen yet, which Redis has: recovered, nothing to send, and
    // the channel's position is the since (so the frame arriving later is skipped)
    let r = read_since(1..=12, 12, false);
    let s = t
        .answer(Want::Since(id(12)), true, Some(&(g, r)), NOW)
        .unwrap();
    assert_eq!(
        (ids(&s), s.recovered, s.last),
        (vec![], Some(true), Some(id(12)))
    );
}

#[test]
fn an_untrusted_tail_is_not_used_and_the_fallback_says_gap() {
    let t = warm(8, false);
    assert_eq!(
        t.answer(Want::Since(id(4)), false, None, NOW),
        Err(ReadReq::Since(id(4), 3))
    );
    let s = t.fallback(Want::Since(id(4)));
    assert_eq!((ids(&s), s.recovered), (vec![6, 7, 8], Some(false)));
    assert_eq!(t.fallback(Want::Last).recovered, None);
}

#[test]
fn ids_going_backwards_reset_the_tail() {
    let mut t = warm(5, false);
    assert!(t.accept(id(6), &frame(6)));
    assert!(t.accept(id(7), &frame(7)));
    assert!(!t.accept(id(6), &frame(6)), "a duplicate");
    // a recreated stream starts below what was delivered, with an id the tail never had
    assert!(t.accept(StreamId { ms: 2, seq: 7 }, &frame(2)));
    assert!(!t.is_ready());
    assert_eq!(t.len(), 1);
}

#[test]
fn history_off_keeps_nothing() {
    let mut t = Tail::new(0, 20);
    assert!(!t.enabled());
    assert!(t.accept(id(1), &frame(1)));
    assert!(t.is_empty());
    assert!(t.load_due(Instant::now()).is_err());
    let s = t.answer(Want::Since(id(1)), true, None, NOW).unwrap();
    assert_eq!((s.frames.len(), s.recovered), (0, Some(false)));
}

#[test]
fn members_skip_what_their_history_already_had() {
    let out = Outbox::new(
        crate::outbox::Limits::frames(16),
        crate::metrics::Metrics::new(),
    );
    let mut st = RoomState::default();
    st.members.insert(
        1,
        Member {
            out: out.clone(),
            join_ref: Arc::from("1"),
            anonymous: true,
            user: None,
            skip_until: Some(Box::new(id(5))),
        },
    );
    assert_eq!(st.send_event(id(4), &frame(4)), 0);
    assert_eq!(st.send_event(id(5), &frame(5)), 0);
    assert_eq!(st.send_event(id(6), &frame(6)), 1);
    assert_eq!(st.members[&1].skip_until, None);
    assert_eq!(st.send_event(id(7), &frame(7)), 1);
}
