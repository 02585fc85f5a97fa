//! Tests of the history helpers: stream ids (parse, order, step back), `since` validation, entry
//! and channel frames as `publish.lua` writes them, and reads that know what was trimmed.

use super::*;
use serde_json::json;

fn id(s: &str) -> StreamId {
    StreamId::parse(s).unwrap()
}

#[test]
fn ids_parse_order_and_step_back() {
    assert_eq!(
        id("1700000000000-3"),
        StreamId {
            ms: 1700000000000,
            seq: 3
        }
    );
    assert!(id("5-0") > id("4-999"));
    assert!(id("5-10") > id("5-9"), "numeric, not lexicographic");
    assert_eq!(id("00012-01").to_string(), "12-1", "canonical form");
    for bad in [
        "",
        "-",
        "5",
        "5-",
        "-5",
        "a-1",
        "1-a",
        "1-2-3",
        " 1-2",
        "1-2 ",
        "+1-2",
        "99999999999999999999-0",
        "1-184467440737095516150",
    ] {
        assert!(StreamId::parse(bad).is_none(), "{bad:?}");
    }
    assert_eq!(id("5-3").pred(), id("5-2"));
    assert_eq!(
        id("5-0").pred(),
        StreamId {
            ms: 4,
            seq: u64::MAX
        }
    );
    assert_eq!(StreamId::ZERO.pred(), StreamId::ZERO);
}

#[test]
fn since_is_validated() {
    let p = |v: Value| since_param(v.as_object().unwrap());
    assert_eq!(p(json!({})), Ok(None));
    assert_eq!(p(json!({"since": null})), Ok(None));
    assert_eq!(p(json!({"since": "1-2"})), Ok(Some(id("1-2"))));
    for bad in [
        json!({"since": 12}),
        json!({"since": ""}),
        json!({"since": "x"}),
        json!({"since": ["1-2"]}),
        json!({"since": "1-2-3"}),
    ] {
        assert_eq!(p(bad.clone()), Err(InvalidSince), "{bad}");
    }
}

#[test]
fn entry_frames_match_what_the_script_publishes() {
    // what publish.lua sends for ARGV head, payload and the id XADD returned
    let lua = |head: &str, payload: &str, id: &str| {
        let body = if payload == "{}" {
            format!("{{\"id\":\"{id}\"}}")
        } else {
            format!("{},\"id\":\"{id}\"}}", &payload[..payload.len() - 1])
        };
        format!("{head}{body}]")
    };
    let payload =
        json!({"body": "hi \"there\"]}", "user": {"id": "7", "username": "ann"}, "at": 5});
    let p = serde_json::to_vec(&payload).unwrap();
    let head = String::from_utf8(broadcast_head("rooms:lobby", "new_msg")).unwrap();
    assert_eq!(head, r#"[null,null,"rooms:lobby","new_msg","#);
    let f = entry_frame("rooms:lobby", "new_msg", &p, "17-4");
    assert_eq!(
        std::str::from_utf8(&f).unwrap(),
        lua(&head, std::str::from_utf8(&p).unwrap(), "17-4")
    );
    let v: Value = serde_json::from_slice(&f).unwrap();
    assert_eq!(v[4]["id"], "17-4");
    assert_eq!(v[4]["body"], "hi \"there\"]}");
    // the same as protocol::broadcast of the payload with the id added last
    let mut with = payload.as_object().unwrap().clone();
    with.insert("id".into(), json!("17-4"));
    assert_eq!(
        v,
        serde_json::from_slice::<Value>(&crate::protocol::broadcast(
            "rooms:lobby",
            "new_msg",
            &Value::Object(with)
        ))
        .unwrap()
    );
    assert_eq!(frame_id(&f), Some(id("17-4")));
    let empty = entry_frame("rooms:x", "ping", b"{}", "1-0");
    assert_eq!(&empty[..], br#"[null,null,"rooms:x","ping",{"id":"1-0"}]"#);
    assert_eq!(frame_id(&empty), Some(id("1-0")));
}

#[test]
fn frame_ids_are_read_only_from_the_last_member() {
    assert_eq!(frame_id(br#"[null,null,"rooms:a","e",{"body":"x"}]"#), None);
    assert_eq!(
        frame_id(br#"[null,null,"rooms:a","e",{"body":"x","xid":"1-2"}]"#),
        None
    );
    assert_eq!(
        frame_id(br#"[null,null,"rooms:a","e",{"body":{"id":"1-2"},"at":1}]"#),
        None
    );
    assert_eq!(
        frame_id(br#"[null,null,"rooms:a","e",{"body":"x","id":"1-2"}]"#),
        Some(id("1-2"))
    );
    assert_eq!(
        frame_id(br#"[null,null,"rooms:a","e",{"body":"x","id":"1-x"}]"#),
        None
    );
    assert_eq!(frame_id(b"[]"), None);
}

#[test]
fn channel_frames_reuse_the_live_bytes() {
    let live = entry_frame("rooms:a", "new_msg", br#"{"body":"x"}"#, "3-1");
    let body = frame_body(&live).unwrap();
    let mut framed = channel_head("12").to_vec();
    framed.extend_from_slice(&body);
    framed.push(b']');
    assert_eq!(
        framed,
        br#"["12",null,"rooms:a","new_msg",{"body":"x","id":"3-1"}]"#.to_vec()
    );
    assert!(frame_body(&Bytes::from_static(b"[\"1\",null,\"t\",\"e\",{}]")).is_none());
}

#[test]
fn a_read_knows_what_was_trimmed() {
    let mut r = Read {
        exists: true,
        last: id("90-0"),
        first: Some(id("50-0")),
        trimmed: true,
        ..Default::default()
    };
    assert_eq!(
        r.floor(),
        StreamId {
            ms: 49,
            seq: u64::MAX
        }
    );
    assert!(r.recovered(id("50-0")));
    assert!(
        r.recovered(id("49-18446744073709551615")),
        "the entry just before the first"
    );
    assert!(
        !r.recovered(id("49-5")),
        "older than the first retained: maybe trimmed"
    );
    assert!(!r.recovered(id("91-0")), "an id the stream never had");
    r.trimmed = false;
    assert!(r.recovered(id("1-0")), "nothing was ever trimmed");
    r.exists = false;
    assert!(
        !r.recovered(id("1-0")),
        "no stream: cannot vouch for anything"
    );
}
