//! Redis Cluster arithmetic the client library does not expose: the slot of a key (CRC16 of its
//! hash tag) and the slot map read with `CLUSTER SLOTS`, so that work can be grouped per master
//! (one heartbeat pipeline per shard), each master can be scanned (cluster-wide listings), and
//! readiness can tell a lost shard the node needs from one it does not.

use redis::Value;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: the hash of its first non-empty `{…}` tag, or of the whole key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS
}

/// One master and the slot ranges it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub host: String,
    pub port: u16,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Shard {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    /// `host:port`, the shard's name in logs, metrics and readiness answers.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Its slot ranges, `0-5460,10923-16383`: what stays the same through a failover.
    pub fn ranges(&self) -> String {
        let r: Vec<String> = self.slots.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        r.join(",")
    }
}

/// Parses a `CLUSTER SLOTS` reply into one [`Shard`] per master (sorted by address).
pub fn parse_slots(v: &Value) -> Option<Vec<Shard>> {
    let Value::Array(ranges) = v else {
        return None;
    };
    let mut shards: Vec<Shard> = Vec::new();
    for r in ranges {
        let Value::Array(f) = r else { return None };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(master))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
            Value::SimpleString(h) => h.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return None;
        };
        let (host, port) = (host, u16::try_from(*port).ok()?);
        let range = (u16::try_from(*a).ok()?, u16::try_from(*b).ok()?);
        match shards.iter_mut().find(|s| s.host == host && s.port == port) {
            Some(s) => s.slots.push(range),
            None => shards.push(Shard {
                host,
                port,
                slots: vec![range],
            }),
        }
    }
    shards.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    Some(shards)
}

/// A hash tag of the form `<base>-<n>` whose slot is served by `shard`, for per-shard channels
/// such as the liveness probe's. `None` only if the shard serves no slot.
pub fn tag_on(shard: &Shard, base: &str) -> Option<String> {
    if shard.slots.is_empty() {
        return None;
    }
    // a shard holds at least one slot of 16384; random tags hit it within a few hundred tries
    // for any realistic shard count, and the search is bounded
    (0..1_000_000u32)
        .map(|n| format!("{base}-{n}"))
        .find(|t| shard.owns(slot(t.as_bytes())))
}

/// The masters (by address) that are down and serve at least one of the node's rooms: a master
/// is down when the probe channel the node keeps on it (`lost_probes`) did not come back. Each
/// entry is `("<master> (slots <ranges>)", rooms of the node on it)`. A lost probe whose slot is in no known shard
/// counts as serving every room (the map is stale; be safe). Rooms on healthy shards are never
/// counted, so a node whose rooms all sit elsewhere stays ready through another shard's outage.
pub fn shards_needed_down(
    shards: &[Shard],
    lost_probes: &[String],
    room_channels: &[String],
) -> Vec<(String, usize)> {
    let room_slots: Vec<u16> = room_channels.iter().map(|c| slot(c.as_bytes())).collect();
    let mut out: Vec<(String, usize)> = Vec::new();
    for probe in lost_probes {
        let ps = slot(probe.as_bytes());
        let (addr, n) = match shards.iter().find(|s| s.owns(ps)) {
            Some(s) => (
                format!("{} (slots {})", s.addr(), s.ranges()),
                room_slots.iter().filter(|&&r| s.owns(r)).count(),
            ),
            None => (format!("of slot {ps}"), room_slots.len()),
        };
        if n > 0 && !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // values from `CLUSTER KEYSLOT` on Redis 7
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"gw:room:{lobby}:presence"), slot(b"lobby"));
        assert_eq!(slot(b"gw:room:{lobby}:events"), slot(b"gw:room:{lobby}"));
        // an empty tag hashes the whole key
        assert_eq!(slot(b"a{}b"), crc16(b"a{}b") % SLOTS);
    }

    #[test]
    fn parses_cluster_slots_and_finds_tags_per_shard() {
        let node = |p: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |a: i64, b: i64, p: i64| {
            Value::Array(vec![Value::Int(a), Value::Int(b), node(p), node(p + 3)])
        };
        let v = Value::Array(vec![
            range(0, 5460, 7000),
            range(10923, 16383, 7002),
            range(5461, 10922, 7001),
        ]);
        let shards = parse_slots(&v).expect("parsed");
        assert_eq!(shards.len(), 3);
        assert_eq!(shards[1].port, 7001);
        assert!(shards[1].owns(5461) && !shards[1].owns(5460));
        for s in &shards {
            let t = tag_on(s, "probe").expect("a tag");
            assert!(s.owns(slot(t.as_bytes())));
        }
        assert_eq!(parse_slots(&Value::Int(1)), None);
    }

    #[test]
    fn only_shards_holding_the_nodes_rooms_count_as_needed() {
        let shard = |port: u16, a: u16, b: u16| Shard {
            host: "127.0.0.1".into(),
            port,
            slots: vec![(a, b)],
        };
        let shards = vec![
            shard(7000, 0, 5460),
            shard(7001, 5461, 10922),
            shard(7002, 10923, 16383),
        ];
        let probe_on = |s: &Shard| format!("gw:node:n:probe:{{{}}}", tag_on(s, "p").expect("tag"));
        let room_on = |s: &Shard| format!("gw:room:{{{}}}:events", tag_on(s, "room").expect("tag"));
        let lost = vec![probe_on(&shards[0])];
        // no room on the lost shard: not needed
        let rooms = vec![room_on(&shards[1]), room_on(&shards[2])];
        assert!(shards_needed_down(&shards, &lost, &rooms).is_empty());
        // a room there: needed, named by its master
        let rooms = vec![room_on(&shards[0]), room_on(&shards[1])];
        assert_eq!(
            shards_needed_down(&shards, &lost, &rooms),
            vec![("127.0.0.1:7000 (slots 0-5460)".to_string(), 1)]
        );
        // nothing lost: nothing needed
        assert!(shards_needed_down(&shards, &[], &rooms).is_empty());
        // an unknown slot map (empty): every room may be on it
        assert_eq!(shards_needed_down(&[], &lost, &rooms)[0].1, 2);
        assert!(shards_needed_down(&[], &lost, &[]).is_empty());
    }
}
