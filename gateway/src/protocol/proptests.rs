//! Property tests of the decoders: arbitrary bytes, arbitrary JSON values, and round trips.

use super::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

const CASES: u32 = 2048;

/// Short strings of any chars (control chars, quotes, backslashes, non-ASCII included).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        vec(any::<char>(), 0..8).prop_map(String::from_iter),
        "[a-z0-9:\"\\\\ ]{0,6}",
    ]
}

/// Any JSON value, nested a few levels. Floats are exact binary fractions, so a value written
/// and read back by serde_json compares equal.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(text(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    btree_map(text(), json_value(), 0..5).prop_map(|m| m.into_iter().collect())
}

/// The fields of a valid V2 frame.
type Fields = (
    Option<String>,
    Option<String>,
    String,
    String,
    Map<String, Value>,
);

fn fields() -> impl Strategy<Value = Fields> {
    (
        proptest::option::of(text()),
        proptest::option::of(text()),
        text(),
        text(),
        json_object(),
    )
}

fn frame_value((join_ref, reference, topic, event, payload): &Fields) -> Value {
    json!([join_ref, reference, topic, event, payload])
}

/// Mostly frame-like values: valid frames, valid frames with one element replaced by any
/// value, with an element added or removed, and any JSON value at all.
fn frame_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => fields().prop_map(|f| frame_value(&f)),
        3 => (fields(), 0..5usize, json_value()).prop_map(|(f, i, v)| {
            let mut a = frame_value(&f);
            a[i] = v;
            a
        }),
        1 => (fields(), 0..6usize, json_value()).prop_map(|(f, i, v)| {
            let Value::Array(mut a) = frame_value(&f) else { unreachable!() };
            a.insert(i, v);
            Value::Array(a)
        }),
        1 => (fields(), 0..5usize).prop_map(|(f, i)| {
            let Value::Array(mut a) = frame_value(&f) else { unreachable!() };
            a.remove(i);
            Value::Array(a)
        }),
        1 => json_value(),
    ]
}

/// What `decode_text` must make of a parsed JSON value, written from the protocol text
/// (PHOENIX_PROTOCOL.md §2.1): exactly five elements, refs strings or null, topic and event
/// strings, payload an object. `Err` lists every rule the value breaks; the decoder may name
/// any one of them.
fn expected(v: &Value) -> Result<Inbound, Vec<DecodeError>> {
    let Some(a) = v.as_array().filter(|a| a.len() == 5) else {
        return Err(vec![DecodeError::Shape]);
    };
    let mut broken = Vec::new();
    let is_ref = |v: &Value| v.is_null() || v.as_str().is_some_and(|s| s.len() <= MAX_REF_BYTES);
    if !is_ref(&a[0]) || !is_ref(&a[1]) {
        broken.push(DecodeError::Ref);
    }
    if !a[2].is_string() || !a[3].is_string() {
        broken.push(DecodeError::TopicEvent);
    }
    if !a[4].is_object() {
        broken.push(DecodeError::PayloadType);
    }
    if !broken.is_empty() {
        return Err(broken);
    }
    let s = |v: &Value| v.as_str().map(str::to_string);
    Ok(Inbound {
        join_ref: s(&a[0]),
        reference: s(&a[1]),
        topic: s(&a[2]).unwrap_or_default(),
        event: s(&a[3]).unwrap_or_default(),
        payload: Payload::Json(a[4].as_object().cloned().unwrap_or_default()),
    })
}

/// `decode_text` agrees with [`expected`] on whatever serde_json makes of the bytes (and
/// says `Json` when they are not JSON at all).
fn check_text(bytes: &[u8]) -> Result<(), TestCaseError> {
    let got = decode_text(bytes);
    match serde_json::from_slice::<Value>(bytes) {
        Err(_) => prop_assert_eq!(got, Err(DecodeError::Json)),
        Ok(v) => match (expected(&v), got) {
            (Ok(want), Ok(got)) => prop_assert_eq!(got, want),
            (Err(rules), Err(e)) => prop_assert!(
                rules.contains(&e),
                "{v} refused with {e:?}, but it breaks only {rules:?}"
            ),
            (want, got) => prop_assert!(false, "{v}: wanted {want:?}, got {got:?}"),
        },
    }
    Ok(())
}

/// Bits of JSON text, some broken (lone surrogate, out-of-range number, stray byte).
fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just("["),
        Just("]"),
        Just("{"),
        Just("}"),
        Just(","),
        Just(":"),
        Just(" "),
        Just("null"),
        Just("true"),
        Just("\"\""),
        Just("\"3\""),
        Just("\"rooms:a\""),
        Just("\"phx_join\""),
        Just("\"a\\\"b\""),
        Just("\"\\ud800\""),
        Just("\"\\u00e9\""),
        Just("0"),
        Just("-1.5e3"),
        Just("1e400"),
        Just("\u{fffd}"),
    ];
    vec(token, 0..24).prop_map(|t| t.concat().into_bytes())
}

/// A valid frame's text with a few bytes overwritten, inserted or removed.
fn mangled_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        fields(),
        vec((any::<u8>(), 0..3u8, any::<prop::sample::Index>()), 1..4),
    )
        .prop_map(|(f, edits)| {
            let mut b = serde_json::to_vec(&frame_value(&f)).unwrap_or_default();
            for (byte, kind, at) in edits {
                let i = at.index(b.len() + 1);
                match kind {
                    0 if i < b.len() => b[i] = byte,
                    1 if i < b.len() => {
                        b.remove(i);
                    }
                    _ => b.insert(i, byte),
                }
            }
            b
        })
}

/// What `decode_binary` must make of the bytes, from the layout in PHOENIX_PROTOCOL.md §2.4:
/// kind 0, four single-byte lengths, four UTF-8 fields, then any payload; empty refs are null.
fn expected_binary(b: &[u8]) -> Option<Inbound> {
    if b.len() < 5 || b[0] != 0 {
        return None;
    }
    let mut at = 5;
    let mut parts = Vec::new();
    for &len in &b[1..5] {
        let part = b.get(at..at + usize::from(len))?;
        parts.push(String::from_utf8(part.to_vec()).ok()?);
        at += usize::from(len);
    }
    let nonempty = |s: &String| Some(s.clone()).filter(|s| !s.is_empty());
    Some(Inbound {
        join_ref: nonempty(&parts[0]),
        reference: nonempty(&parts[1]),
        topic: parts[2].clone(),
        event: parts[3].clone(),
        payload: Payload::Binary,
    })
}

/// Binary frames with kind 0 and small lengths, so the header is often (not always) right.
fn binary_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
        [0..8u8, 0..8u8, 0..12u8, 0..8u8],
        vec(prop_oneof![3 => 0x20..0x7fu8, 1 => any::<u8>()], 0..40),
    )
        .prop_map(|(kind, lens, rest)| {
            let mut b = vec![kind];
            b.extend_from_slice(&lens);
            b.extend_from_slice(&rest);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Any bytes at all: both decoders return (never panic) and agree with the protocol text.
    #[test]
    fn arbitrary_bytes_never_panic(b in prop_oneof![
        vec(any::<u8>(), 0..200),
        vec(prop_oneof![Just(0u8), any::<u8>()], 0..8),
        token_soup(),
        mangled_frame(),
        binary_like(),
    ]) {
        check_text(&b)?;
        prop_assert_eq!(decode_binary(&b).ok(), expected_binary(&b));
    }

    /// Any JSON value: accepted exactly when it is a V2 frame, with its fields; otherwise
    /// refused for a rule it really breaks.
    #[test]
    fn decodes_exactly_the_v2_frames(v in frame_like()) {
        check_text(&serde_json::to_vec(&v).unwrap_or_default())?;
    }

    /// A valid frame, written by `encode` or by serde_json (compact or pretty), decodes to
    /// the same fields; so does a binary push with the same (short) fields.
    #[test]
    fn valid_frames_round_trip(f in fields(), pretty in any::<bool>()) {
        let (join_ref, reference, topic, event, payload) = &f;
        let want = Inbound {
            join_ref: join_ref.clone(),
            reference: reference.clone(),
            topic: topic.clone(),
            event: event.clone(),
            payload: Payload::Json(payload.clone()),
        };
        let encoded = encode(
            join_ref.as_deref(),
            reference.as_deref(),
            topic,
            event,
            &Value::Object(payload.clone()),
        );
        prop_assert_eq!(decode_text(&encoded), Ok(want.clone()));
        let written = if pretty {
            serde_json::to_vec_pretty(&frame_value(&f))
        } else {
            serde_json::to_vec(&frame_value(&f))
        };
        prop_assert_eq!(decode_text(&written.unwrap_or_default()), Ok(want));

        // binary: every field fits in one length byte; an empty ref reads as null
        let mut b = vec![0u8];
        let strs = [
            join_ref.as_deref().unwrap_or(""),
            reference.as_deref().unwrap_or(""),
            topic.as_str(),
            event.as_str(),
        ];
        for s in strs {
            b.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
        }
        for s in strs {
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(&serde_json::to_vec(payload).unwrap_or_default());
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        prop_assert_eq!(
            decode_binary(&b),
            Ok(Inbound {
                join_ref: nonempty(join_ref),
                reference: nonempty(reference),
                topic: topic.clone(),
                event: event.clone(),
                payload: Payload::Binary,
            })
        );
    }

    /// Deeply nested payloads are refused as bad JSON (serde_json's depth limit), never
    /// overflow the stack; shallow ones are accepted.
    #[test]
    fn deep_nesting_is_refused_not_a_crash(depth in prop_oneof![0..120usize, 0..5000usize]) {
        let mut b = br#"[null,"1","rooms:a","new_msg",{"a":"#.to_vec();
        b.extend(std::iter::repeat_n(b'[', depth));
        b.push(b'0');
        b.extend(std::iter::repeat_n(b']', depth));
        b.extend_from_slice(b"}]");
        let got = decode_text(&b);
        if depth <= 100 {
            prop_assert!(got.is_ok(), "depth {depth}: {got:?}");
        } else {
            prop_assert!(matches!(got, Ok(_) | Err(DecodeError::Json)), "depth {depth}: {got:?}");
        }
    }
}
