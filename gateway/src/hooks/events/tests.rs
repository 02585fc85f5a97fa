use super::*;

fn ev(kind: EventKind, user: Option<(&str, &str)>) -> Event {
    Event {
        kind,
        room: "lobby".into(),
        user: user.map(|(a, b)| (a.into(), b.into())),
        seq: 1_700_000_000_000_001,
        at_ms: 1_700_000_000_000,
    }
}

#[test]
fn ids_name_room_seq_type_and_user() {
    let a = ev(EventKind::MemberAdded, Some(("u:1", "ann")));
    assert_eq!(a.id(), "lobby:1700000000000001:member_added:u:1");
    let o = ev(EventKind::RoomOccupied, None);
    assert_eq!(o.id(), "lobby:1700000000000001:room_occupied");
    let v: serde_json::Value = serde_json::from_slice(&a.to_json()).unwrap();
    assert_eq!(
        v,
        json!({"id": "lobby:1700000000000001:member_added:u:1", "type": "member_added",
               "room": "lobby", "user": {"id": "u:1", "username": "ann"},
               "seq": 1_700_000_000_000_001u64, "at": 1_700_000_000_000u64})
    );
    let v: serde_json::Value = serde_json::from_slice(&o.to_json()).unwrap();
    assert!(v.get("user").is_none(), "no user on room events: {v}");
    for k in [
        EventKind::MemberAdded,
        EventKind::MemberRemoved,
        EventKind::RoomOccupied,
        EventKind::RoomVacated,
    ] {
        assert_eq!(EventKind::parse(k.as_str()), Some(k));
    }
    assert_eq!(EventKind::parse("member"), None);
}

#[test]
fn a_batch_is_one_json_object() {
    let es = [
        ev(EventKind::RoomOccupied, None).to_json(),
        ev(EventKind::MemberAdded, Some(("7", "x"))).to_json(),
    ];
    let v: serde_json::Value = serde_json::from_slice(&batch_body(&es)).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 2);
    let v: serde_json::Value = serde_json::from_slice(&batch_body([])).unwrap();
    assert_eq!(v, json!({"events": []}));
}

#[tokio::test]
async fn the_queue_is_bounded_and_drops_the_oldest() {
    let metrics = Metrics::new();
    let hook = EventsHook::new(
        "http://127.0.0.1:9/".parse().unwrap(),
        b"k".to_vec(),
        (Duration::from_millis(100), 10, Duration::from_millis(10)),
        Duration::ZERO,
        metrics.clone(),
    );
    let mut e = ev(EventKind::RoomOccupied, None);
    let many: Vec<Event> = (0..QUEUE_MAX as u64 + 5)
        .map(|i| {
            e.seq = i;
            e.clone()
        })
        .collect();
    hook.report(&many, None);
    assert_eq!(hook.queued(), QUEUE_MAX);
    let first: serde_json::Value =
        serde_json::from_slice(&lock(&hook.queue).events[0].json).unwrap();
    assert_eq!(first["seq"], 5, "the oldest five went");
    let text = String::from_utf8(metrics.render().1).unwrap();
    assert!(
        text.contains("gateway_hook_events_total{result=\"dropped\"} 5"),
        "{text}"
    );
}

#[test]
fn acknowledgements_group_ids_by_outbox_key_in_order() {
    let q = |key: Option<&str>, id: &str| Queued {
        json: Bytes::new(),
        outbox: key.map(|k| (Arc::from(k), id.to_string())),
    };
    let items = [
        q(Some("gw:room:{a}:unacked"), "a:1:room_occupied"),
        q(Some("gw:room:{b}:unacked"), "b:5:member_added:u1"),
        q(None, "c:1:room_occupied"),
        q(Some("gw:room:{a}:unacked"), "a:2:room_vacated"),
    ];
    let got = ack_entries(&items);
    assert_eq!(got.len(), 2, "one call per room");
    assert_eq!(&*got[0].0, "gw:room:{a}:unacked");
    assert_eq!(got[0].1, ["a:1:room_occupied", "a:2:room_vacated"]);
    assert_eq!(got[1].1, ["b:5:member_added:u1"]);
    assert!(
        ack_entries(&items[2..3]).is_empty(),
        "no outbox, nothing to delete"
    );
}
