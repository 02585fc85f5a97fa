use super::*;
use crate::hooks::events::EventKind;
use redis::Value;

fn s(x: &str) -> Value {
    Value::BulkString(x.as_bytes().to_vec())
}

#[test]
fn edges_of_a_reply_become_events_of_the_room() {
    // a join reply: {1, seq, total, snapshot, lost, had, edges}
    let edges = Value::Array(vec![
        Value::Int(42),
        Value::Int(1_700_000_000_000),
        s("room_occupied"),
        s(""),
        s(""),
        s("member_added"),
        s("u1"),
        s("Ann"),
    ]);
    let reply = vec![
        Value::Int(1),
        Value::Int(42),
        Value::Int(0),
        Value::Array(vec![]),
        Value::Int(0),
        Value::Int(1),
        edges,
    ];
    let evs = edges_at("lobby", &reply, 6).unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0].kind, EventKind::RoomOccupied);
    assert_eq!(evs[0].user, None);
    assert_eq!(evs[1].kind, EventKind::MemberAdded);
    assert_eq!(evs[1].user, Some(("u1".into(), "Ann".into())));
    assert!(evs.iter().all(|e| e.seq == 42 && e.room == "lobby"));
    assert_eq!(evs[1].id(), "lobby:42:member_added:u1");
    // none, or a reply from before the hook: no events
    assert!(edges_at("lobby", &reply[..6], 6).unwrap().is_empty());
    let empty = [Value::Array(vec![])];
    assert!(edges_at("lobby", &empty, 0).unwrap().is_empty());
    // malformed parts are errors, never panics
    for bad in [
        Value::Int(3),
        Value::Array(vec![
            Value::Int(1),
            Value::Int(2),
            s("member_added"),
            s("u"),
        ]),
        Value::Array(vec![
            Value::Int(1),
            Value::Int(2),
            s("joined"),
            s(""),
            s(""),
        ]),
        Value::Array(vec![s("x"), Value::Int(2), s("room_vacated"), s(""), s("")]),
    ] {
        assert!(
            edges_at("lobby", std::slice::from_ref(&bad), 0).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn taken_over_outbox_entries_become_events_with_their_original_ids() {
    // a heartbeat reply: {had, seq, total, exists, edges, taken}
    let taken = Value::Array(vec![
        s("lobby:1796624182210516:room_occupied"),
        s("1700000000000"),
        s(""),
        s("lobby:1796624182210516:member_added:auth0|u:1"),
        s("1700000000001"),
        s("Ann"),
    ]);
    let reply = [
        Value::Int(1),
        Value::Int(0),
        Value::Int(0),
        Value::Int(1),
        Value::Array(vec![]),
        taken,
    ];
    let evs = replies::taken_at("lobby", &reply, 5).unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0].id(), "lobby:1796624182210516:room_occupied");
    assert_eq!(evs[0].user, None);
    assert_eq!(evs[0].at_ms, 1_700_000_000_000);
    assert_eq!(
        evs[1].id(),
        "lobby:1796624182210516:member_added:auth0|u:1",
        "a user id may hold ':'"
    );
    assert_eq!(evs[1].user, Some(("auth0|u:1".into(), "Ann".into())));
    assert_eq!(evs[1].seq, 1_796_624_182_210_516);
    // absent (an older script) or empty: none
    assert!(
        replies::taken_at("lobby", &reply[..5], 5)
            .unwrap()
            .is_empty()
    );
    // malformed: an error, not a panic
    for bad in [
        vec![s("lobby:1:room_occupied"), s("1")],
        vec![s("other:1:room_occupied"), s("1"), s("")],
        vec![s("lobby:x:room_occupied"), s("1"), s("")],
        vec![s("lobby:1:member_added"), s("1"), s("")],
        vec![s("lobby:1:room_vacated:u1"), s("1"), s("")],
        vec![s("lobby:1:room_occupied"), s("soon"), s("")],
    ] {
        assert!(replies::taken_at("lobby", &[Value::Array(bad)], 0).is_err());
    }
}
