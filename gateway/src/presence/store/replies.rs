//! The replies of the presence scripts, read out of their flat arrays into the gateway's types:
//! integers, flags, the snapshot's metas, and the events hook's parts — the edges a call caused and
//! the outbox entries it took over (see lua/common.lua).

use std::collections::HashMap;

use crate::hooks::events::{Event, EventKind};

use super::super::Meta;
use super::StoreError;

pub(super) fn int_at(v: &[redis::Value], i: usize) -> Result<u64, StoreError> {
    match v.get(i) {
        Some(redis::Value::Int(n)) => Ok((*n).max(0) as u64),
        other => Err(StoreError::Reply(format!(
            "expected an integer at {i}, got {other:?}"
        ))),
    }
}

/// A 1/0 flag a script appends to its reply; absent means 1 (a reply from before the flag).
pub(super) fn flag_at(v: &[redis::Value], i: usize) -> Result<bool, StoreError> {
    if v.len() <= i {
        return Ok(true);
    }
    Ok(int_at(v, i)? == 1)
}

/// The edges part of a script reply (see lua/common.lua): `{}` or `{seq, at, type, user,
/// username, ...}` with user `''` on `room_*` edges. Absent (a script from before the events
/// hook) is no edges.
pub(super) fn edges_at(room: &str, v: &[redis::Value], i: usize) -> Result<Vec<Event>, StoreError> {
    let flat = match v.get(i) {
        None => return Ok(Vec::new()),
        Some(redis::Value::Array(flat)) => flat,
        Some(other) => {
            return Err(StoreError::Reply(format!(
                "expected the events array at {i}, got {other:?}"
            )));
        }
    };
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    let seq = int_at(flat, 0)?;
    let at_ms = int_at(flat, 1)?;
    let text = |x: &redis::Value| match x {
        redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(StoreError::Reply(format!(
            "expected a string, got {other:?}"
        ))),
    };
    let rest = flat.get(2..).unwrap_or_default();
    if rest.len() % 3 != 0 {
        return Err(StoreError::Reply("events not in threes".into()));
    }
    let mut out = Vec::with_capacity(rest.len() / 3);
    for e in rest.chunks(3) {
        let kind = text(&e[0])?;
        let kind = EventKind::parse(&kind)
            .ok_or_else(|| StoreError::Reply(format!("unknown event type {kind:?}")))?;
        let user = match kind {
            EventKind::MemberAdded | EventKind::MemberRemoved => Some((text(&e[1])?, text(&e[2])?)),
            EventKind::RoomOccupied | EventKind::RoomVacated => None,
        };
        out.push(Event {
            kind,
            room: room.to_string(),
            user,
            seq,
            at_ms,
        });
    }
    Ok(out)
}

pub(super) fn metas_at(v: &[redis::Value], i: usize) -> Result<HashMap<String, Meta>, StoreError> {
    let Some(redis::Value::Array(flat)) = v.get(i) else {
        return Err(StoreError::Reply(format!("expected an array at {i}")));
    };
    let mut out = HashMap::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let (Some(redis::Value::BulkString(k)), Some(redis::Value::BulkString(m))) =
            (pair.first(), pair.get(1))
        else {
            return Err(StoreError::Reply("malformed presence hash".into()));
        };
        let conn = String::from_utf8_lossy(k).into_owned();
        match serde_json::from_slice::<Meta>(m) {
            Ok(meta) => {
                out.insert(conn, meta);
            }
            Err(e) => tracing::warn!(%conn, error = %e, "ignoring unreadable presence meta"),
        }
    }
    Ok(out)
}

/// The takeover part of a script reply (see lua/common.lua): `{}` or `{id, at, username, ...}`,
/// the outbox entries of dead nodes (or stale ones) this call took over, to be posted again with
/// their original ids. Absent (a script from before the outbox) is none.
pub(super) fn taken_at(room: &str, v: &[redis::Value], i: usize) -> Result<Vec<Event>, StoreError> {
    let flat = match v.get(i) {
        None => return Ok(Vec::new()),
        Some(redis::Value::Array(flat)) => flat,
        Some(other) => {
            return Err(StoreError::Reply(format!(
                "expected the taken-over array at {i}, got {other:?}"
            )));
        }
    };
    if flat.len() % 3 != 0 {
        return Err(StoreError::Reply("taken-over events not in threes".into()));
    }
    let text = |x: &redis::Value| match x {
        redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(StoreError::Reply(format!(
            "expected a string, got {other:?}"
        ))),
    };
    let mut out = Vec::with_capacity(flat.len() / 3);
    for e in flat.chunks(3) {
        let id = text(&e[0])?;
        let at_ms = text(&e[1])?
            .parse::<u64>()
            .map_err(|_| StoreError::Reply(format!("bad time of taken-over event {id:?}")))?;
        out.push(event_of_id(room, &id, at_ms, text(&e[2])?)?);
    }
    Ok(out)
}

/// The event whose id is `id` (`<room>:<seq>:<type>[:<user id>]`, see `Event::id`): the id holds
/// the room, seq, type and user id; the outbox keeps the time and username beside it.
pub(super) fn event_of_id(
    room: &str,
    id: &str,
    at_ms: u64,
    username: String,
) -> Result<Event, StoreError> {
    let bad = || StoreError::Reply(format!("unreadable event id {id:?}"));
    let rest = id
        .strip_prefix(room)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(bad)?;
    let (seq, rest) = rest.split_once(':').ok_or_else(bad)?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    let (kind, user) = match rest.split_once(':') {
        Some((k, u)) => (k, Some(u)),
        None => (rest, None),
    };
    let kind = EventKind::parse(kind).ok_or_else(bad)?;
    let user = match (kind, user) {
        (EventKind::MemberAdded | EventKind::MemberRemoved, Some(u)) => {
            Some((u.to_string(), username))
        }
        (EventKind::RoomOccupied | EventKind::RoomVacated, None) => None,
        _ => return Err(bad()),
    };
    Ok(Event {
        kind,
        room: room.to_string(),
        user,
        seq,
        at_ms,
    })
}
