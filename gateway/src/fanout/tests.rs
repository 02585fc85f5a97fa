use super::*;

#[test]
fn a_failed_delta_is_never_resent_as_a_delta() {
    let mut st = RoomState {
        anon_local: 4,
        anon_unflushed: 4,
        ..Default::default()
    };
    assert_eq!(st.begin_anon_delta(), Some(4));
    st.fail_anon_write(); // timed out: it may have landed
    assert_eq!(st.anon_display(), 4, "still shown");
    assert_eq!(
        st.begin_anon_delta(),
        None,
        "no second delta that could count twice"
    );
    assert_eq!(
        st.begin_anon_absolute(),
        Some(4),
        "the heartbeat sets the count instead"
    );
    st.end_anon_absolute(9);
    st.anon_local = 5;
    st.anon_unflushed = 1;
    assert_eq!(st.begin_anon_delta(), Some(1), "deltas flow again");
}

#[test]
fn failed_syncs_back_off() {
    let mut st = RoomState::default();
    let max = Duration::from_secs(5);
    st.retry_sync(true, max);
    let first = st.sync_backoff;
    st.retry_sync(true, max);
    st.retry_sync(true, max);
    assert!(st.sync_backoff > first);
    for _ in 0..10 {
        st.retry_sync(true, max);
    }
    assert_eq!(st.sync_backoff, max);
    assert!(st.needs_sync && st.sync_retry_at.is_some());
}

#[test]
fn anonymous_accounting_survives_batches_and_failures() {
    let mut st = RoomState {
        anon_local: 3,
        anon_unflushed: 3,
        ..Default::default()
    };
    assert_eq!(st.anon_display(), 3);
    let d = st.begin_anon_delta().unwrap();
    assert_eq!(d, 3);
    assert_eq!(st.anon_display(), 3, "in flight still counts");
    assert!(st.begin_anon_absolute().is_none(), "one write at a time");
    st.fail_anon_write();
    assert_eq!(st.anon_unflushed, 3);
    assert_eq!(st.anon_display(), 3);
    assert_eq!(
        st.begin_anon_absolute(),
        Some(3),
        "after a failure the count is re-asserted"
    );
    st.end_anon_absolute(7);
    // until the mirror has seen seq 7, the delta is shown on top of it
    assert_eq!(st.anon_display(), 3);
    st.mirror.install(Snapshot {
        seq: 7,
        anon: 3,
        metas: HashMap::new(),
    });
    assert_eq!(st.anon_display(), 3);
    assert!(st.anon_inflight.is_empty());
    // heartbeat absorbs unflushed deltas into an absolute write
    st.anon_local = 2;
    st.anon_unflushed = -1;
    assert_eq!(st.begin_anon_absolute(), Some(2));
    assert_eq!(st.anon_display(), 2);
    st.end_anon_write(8);
    assert_eq!(st.anon_display(), 2);
    st.mirror.apply(Envelope {
        seq: 8,
        anon: 2,
        joins: HashMap::new(),
        leaves: vec![],
    });
    assert_eq!(st.anon_display(), 2);
    assert!(st.anon_inflight.is_empty());
}
