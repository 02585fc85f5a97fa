//! Tests of Phoenix V2 frames: decoding joins, heartbeats and binary pushes, refusing malformed
//! frames, encoding replies as Phoenix does, escaping.

use super::*;

#[test]
fn decodes_a_join() {
    let f = decode_text(br#"["3","3","rooms:lobby","phx_join",{"guardian_token":"t"}]"#).unwrap();
    assert_eq!(f.join_ref.as_deref(), Some("3"));
    assert_eq!(f.reference.as_deref(), Some("3"));
    assert_eq!(f.topic, "rooms:lobby");
    assert_eq!(f.event, "phx_join");
    let Payload::Json(p) = f.payload else {
        panic!("json")
    };
    assert_eq!(p["guardian_token"], "t");
}

#[test]
fn decodes_a_heartbeat_with_null_join_ref() {
    let f = decode_text(br#"[null,"4","phoenix","heartbeat",{}]"#).unwrap();
    assert_eq!(f.join_ref, None);
    assert_eq!(f.reference.as_deref(), Some("4"));
}

#[test]
fn refuses_malformed_frames() {
    assert_eq!(decode_text(b"nope"), Err(DecodeError::Json));
    assert_eq!(decode_text(b"{}"), Err(DecodeError::Shape));
    assert_eq!(
        decode_text(br#"[null,"1","t","e"]"#),
        Err(DecodeError::Shape)
    );
    assert_eq!(
        decode_text(br#"[null,"1","t","e",{},1]"#),
        Err(DecodeError::Shape)
    );
    assert_eq!(decode_text(br#"[1,"1","t","e",{}]"#), Err(DecodeError::Ref));
    // refs are echoed in every reply: a long one is refused, 64 bytes are fine
    let r64 = "7".repeat(MAX_REF_BYTES);
    let ok = format!(r#"["{r64}","{r64}","phoenix","heartbeat",{{}}]"#);
    assert!(decode_text(ok.as_bytes()).is_ok());
    let long = format!(r#"[null,"{r64}8","phoenix","heartbeat",{{}}]"#);
    assert_eq!(decode_text(long.as_bytes()), Err(DecodeError::Ref));
    let long = format!(r#"["{r64}8",null,"phoenix","heartbeat",{{}}]"#);
    assert_eq!(decode_text(long.as_bytes()), Err(DecodeError::Ref));
    assert_eq!(
        decode_text(br#"[null,"1",5,"e",{}]"#),
        Err(DecodeError::TopicEvent)
    );
    assert_eq!(
        decode_text(br#"[null,"1","t","e",[]]"#),
        Err(DecodeError::PayloadType)
    );
    assert_eq!(
        decode_text(br#"[null,"1","t","e",null]"#),
        Err(DecodeError::PayloadType)
    );
}

#[test]
fn decodes_binary_pushes() {
    let mut b = vec![0u8, 1, 1, 7, 3];
    b.extend_from_slice(b"3");
    b.extend_from_slice(b"5");
    b.extend_from_slice(b"rooms:a");
    b.extend_from_slice(b"msg");
    b.extend_from_slice(&[1, 2, 3]);
    let f = decode_binary(&b).unwrap();
    assert_eq!(f.join_ref.as_deref(), Some("3"));
    assert_eq!(f.reference.as_deref(), Some("5"));
    assert_eq!(f.topic, "rooms:a");
    assert_eq!(f.event, "msg");
    assert_eq!(f.payload, Payload::Binary);
    assert_eq!(decode_binary(&[0, 9, 0, 0, 0]), Err(DecodeError::Binary));
    assert_eq!(decode_binary(&[1, 0, 0, 0, 0]), Err(DecodeError::Binary));
}

#[test]
fn encodes_replies_like_phoenix() {
    assert_eq!(
        &heartbeat_reply(Some("4"))[..],
        br#"[null,"4","phoenix","phx_reply",{"response":{},"status":"ok"}]"#
    );
    assert_eq!(
        &reply_error(Some("3"), Some("3"), "rooms:x", reason::ROOM_DOES_NOT_EXIST)[..],
        br#"["3","3","rooms:x","phx_reply",{"response":{"reason":"Room does not exist"},"status":"error"}]"#
    );
    assert_eq!(
        &phx_close("7", "rooms:x")[..],
        br#"["7","7","rooms:x","phx_close",{}]"#
    );
    assert_eq!(
        &broadcast("rooms:x", "new_msg", &json!({"body":"hi"}))[..],
        br#"[null,null,"rooms:x","new_msg",{"body":"hi"}]"#
    );
}

#[test]
fn push_head_plus_payload_is_a_frame() {
    let mut b = push_head("3", "rooms:a", "presence_state").to_vec();
    b.extend_from_slice(br#"{"u":{"metas":[]}}"#);
    b.push(b']');
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v,
        json!(["3", null, "rooms:a", "presence_state", {"u":{"metas":[]}}])
    );
}

#[test]
fn encoded_strings_are_escaped() {
    let b = broadcast("rooms:x", "new_msg", &json!({"body":"\"]\n"}));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v[4]["body"], "\"]\n");
}
