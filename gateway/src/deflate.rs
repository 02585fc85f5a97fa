//! permessage-deflate (RFC 7692) as a fan-out server can afford it: every frame is compressed on
//! its own (`server_no_context_takeover`, `client_no_context_takeover`), so a socket holds no
//! compression state at all, and a payload shared by many sockets is compressed once.
//!
//! - [`negotiate`] picks the client's first acceptable offer and gives the answer to send.
//! - [`compressed`] deflates a shared payload once per thread and hands the same [`Bytes`] to
//!   every socket that sends it (a small cache keyed by the payload's identity).
//! - [`stored`] wraps a socket's own few bytes (a channel push's head) in an uncompressed DEFLATE
//!   block, so `head ++ shared body ++ "]"` goes out compressed with the body compressed only once:
//!   DEFLATE blocks that each end on a byte boundary can be laid end to end.
//! - [`inflate`] decompresses a client's message under the message size limit.
//!
//! Frames below [`MIN_BYTES`] go out uncompressed (RSV1 clear), which RFC 7692 §6 allows per
//! message: replies and small broadcasts cost nothing extra.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The answer to an accepted offer. Both directions without context takeover: no socket keeps a
/// 32 KiB window (and the compressor's tables) for its lifetime.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The answer to an offer that named `server_max_window_bits=15`, which the answer must repeat
/// (RFC 7692 §7.1.2.1).
pub const RESPONSE_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";

/// Payloads shorter than this are sent uncompressed.
pub const MIN_BYTES: usize = 1024;

/// The empty stored block a sync flush ends with; a message's compressed payload is sent without
/// it (RFC 7692 §7.2.1) and the receiver appends it back.
pub const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The end of a channel push (`"]"`) as a stored block, then the first byte of the empty stored
/// block whose other four bytes the receiver appends.
pub const STORED_CLOSE_BRACKET: [u8; 7] = [0x00, 0x01, 0x00, 0xfe, 0xff, b']', 0x00];

/// The answer to the `Sec-WebSocket-Extensions` header values when they offer permessage-deflate
/// in a form this server accepts (the first such offer): an offer whose parameters are all known,
/// not repeated, and that does not ask for a server window below 15 bits (the compressor always
/// uses 32 KiB). A client window size, if given, needs nothing: the inflater takes any window up
/// to 32 KiB. `None`: no offer taken, the socket runs uncompressed.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(acceptable_offer)
}

/// [`negotiate`] over a request's `Sec-WebSocket-Extensions` headers.
pub fn negotiate_headers(headers: &hyper::HeaderMap) -> Option<&'static str> {
    negotiate(
        headers
            .get_all(hyper::header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

fn acceptable_offer(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut answer = RESPONSE;
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match (name, value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) if window_bits(v).is_some() => {}
            ("server_max_window_bits", Some(v)) if window_bits(v) == Some(15) => {
                answer = RESPONSE_WINDOW_15;
            }
            _ => return None,
        }
    }
    Some(answer)
}

fn window_bits(v: &str) -> Option<u8> {
    let b: u8 = v.parse().ok()?;
    (8..=15).contains(&b).then_some(b)
}

/// How many compressed payloads a thread keeps: a fan-out sends one payload to every member in a
/// row, a join cork a few; more would only hold memory.
const CACHE: usize = 4;

struct Deflater {
    compress: Compress,
    /// (payload, its compression): the payload is kept so its memory, and so its identity, stays
    /// what it was while it is in the cache.
    cache: Vec<(Bytes, Bytes)>,
    next: usize,
}

thread_local! {
    static DEFLATER: RefCell<Option<Deflater>> = const { RefCell::new(None) };
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// `payload` deflated on its own, ending with a sync flush (so with [`SYNC_TAIL`], on a byte
/// boundary). The same `payload` (the same bytes, shared) sent again on this thread gets the same
/// compressed `Bytes` without compressing again.
pub fn compressed(payload: &Bytes) -> Bytes {
    DEFLATER.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.get_or_insert_with(|| Deflater {
            compress: Compress::new(Compression::fast(), false),
            cache: Vec::with_capacity(CACHE),
            next: 0,
        });
        if let Some((_, c)) = d
            .cache
            .iter()
            .find(|(p, _)| p.as_ptr() == payload.as_ptr() && p.len() == payload.len())
        {
            return c.clone();
        }
        let c = Bytes::from(deflate_with(&mut d.compress, payload));
        if d.cache.len() < CACHE {
            d.cache.push((payload.clone(), c.clone()));
        } else {
            d.cache[d.next] = (payload.clone(), c.clone());
            d.next = (d.next + 1) % CACHE;
        }
        c
    })
}

fn deflate_with(c: &mut Compress, input: &[u8]) -> Vec<u8> {
    c.reset();
    let mut out = Vec::with_capacity(input.len() / 3 + 64);
    loop {
        let read = c.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        // a sync flush that fills the buffer is called again until it leaves room to spare and
        // has written its empty stored block
        match c.compress_vec(&input[read..], &mut out, FlushCompress::Sync) {
            Ok(_)
                if c.total_in() as usize == input.len()
                    && out.len() < out.capacity()
                    && out.ends_with(&SYNC_TAIL) =>
            {
                break;
            }
            Ok(_) => {}
            Err(_) => unreachable!("compressing into a growing buffer cannot fail"),
        }
    }
    debug_assert!(out.ends_with(&SYNC_TAIL));
    out
}

/// `data` as uncompressed (stored) DEFLATE blocks, each starting on a byte boundary and ending on
/// one: they can sit before a [`compressed`] payload.
pub fn stored(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 5 * (data.len() / 65535 + 1));
    for chunk in data.chunks(65535) {
        let n = chunk.len() as u16;
        out.push(0x00); // BFINAL 0, BTYPE 00, then the rest of the byte
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    Bytes::from(out)
}

/// Why a compressed message could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooBig,
    /// Not valid DEFLATE data.
    Corrupt,
}

/// A client's compressed message (all its frames' payloads together), inflated; at most `max`
/// bytes come out, whatever the input claims.
pub fn inflate(input: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let mut out = Vec::with_capacity((input.len() * 4).max(256).min(max.saturating_add(1)));
        // the message, then the empty stored block the sender left off
        for part in [input, &SYNC_TAIL[..]] {
            let start = d.total_in();
            // called until a call moves nothing with all of `part` taken: the inflater may hold
            // output back (its window) after it has taken the last input byte
            loop {
                if out.len() == out.capacity() {
                    let room = out.capacity().min((max + 1).saturating_sub(out.len()));
                    if room == 0 {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve_exact(room);
                }
                let (used, made) = ((d.total_in() - start) as usize, out.len());
                let status = d
                    .decompress_vec(&part[used..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                // a final block (BFINAL) ends the message; what follows it is ignored
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                let used_now = (d.total_in() - start) as usize;
                if used_now == used && out.len() == made && out.len() < out.capacity() {
                    if used_now == part.len() {
                        break;
                    }
                    // input left, room left, and nothing moves
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: usize) -> Bytes {
        let mut s = String::from("{");
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                r#""user{i}":{{"metas":[{{"online_at":17650000{i:05},"phx_ref":"gw-node.{i}","username":"User {i}"}}]}}"#
            ));
        }
        s.push('}');
        Bytes::from(s)
    }

    #[test]
    fn a_compressed_payload_inflates_back_and_is_smaller() {
        let p = json(500);
        let c = compressed(&p);
        assert!(c.ends_with(&SYNC_TAIL));
        assert!(c.len() * 3 < p.len(), "{} of {}", c.len(), p.len());
        // as sent: without the tail the receiver appends
        let sent = &c[..c.len() - 4];
        assert_eq!(inflate(sent, 1 << 20).unwrap(), &p[..]);
    }

    /// Found by Autobahn's 12.2 and 12.5 (64 KiB slices of a bitmap and a PDF): miniz_oxide can
    /// take all the input of a sync flush, leave room in the buffer, and not have written the
    /// flush yet; a compressor that stopped there sent a message cut short.
    #[test]
    fn a_sync_flush_is_finished_whatever_the_data() {
        let mut x: u64 = 99;
        for k in 0..40usize {
            let data: Bytes = (0..65536usize)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if (i / 64) % (2 + k % 5) == 0 {
                        (x % 256) as u8
                    } else {
                        (x % 4) as u8
                    }
                })
                .collect::<Vec<u8>>()
                .into();
            let c = compressed(&data);
            assert!(
                c.ends_with(&SYNC_TAIL),
                "input {k}: no sync flush at the end"
            );
            assert_eq!(
                inflate(&c[..c.len() - 4], 1 << 20).unwrap(),
                &data[..],
                "input {k}"
            );
        }
    }

    #[test]
    fn the_same_payload_is_compressed_once_and_another_is_not_confused_with_it() {
        let p = json(50);
        let a = compressed(&p);
        let b = compressed(&p.clone());
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the cached compression is handed out again"
        );
        // equal bytes elsewhere in memory, and a slice of the same memory, are other payloads
        let q = Bytes::copy_from_slice(&p);
        let c = compressed(&q);
        assert_ne!(a.as_ptr(), c.as_ptr());
        assert_eq!(inflate(&c[..c.len() - 4], 1 << 20).unwrap(), &p[..]);
        let s = p.slice(..100);
        let d = compressed(&s);
        assert_eq!(inflate(&d[..d.len() - 4], 1 << 20).unwrap(), &p[..100]);
        // more payloads than the cache holds: each still compresses to its own bytes
        let many: Vec<Bytes> = (0..3 * CACHE).map(|i| json(i + 1)).collect();
        for p in many.iter().chain(many.iter()) {
            let c = compressed(p);
            assert_eq!(inflate(&c[..c.len() - 4], 1 << 20).unwrap(), &p[..]);
        }
    }

    #[test]
    fn a_stored_head_a_shared_body_and_a_stored_bracket_make_one_message() {
        let body = json(300);
        let head = br#"["3",null,"room:lobby","presence_state","#;
        let mut wire = stored(head).to_vec();
        wire.extend_from_slice(&compressed(&body));
        wire.extend_from_slice(&STORED_CLOSE_BRACKET);
        let mut want = head.to_vec();
        want.extend_from_slice(&body);
        want.push(b']');
        assert_eq!(inflate(&wire, 1 << 20).unwrap(), want);
        // a head longer than one stored block
        let long = vec![b'x'; 70_000];
        let mut wire = stored(&long).to_vec();
        wire.extend_from_slice(&STORED_CLOSE_BRACKET);
        let mut want = long.clone();
        want.push(b']');
        assert_eq!(inflate(&wire, 1 << 20).unwrap(), want);
    }

    #[test]
    fn inflate_stops_at_the_limit_and_refuses_garbage() {
        // a megabyte of zeros is about a kilobyte compressed
        let zeros = Bytes::from(vec![0u8; 1 << 20]);
        let c = compressed(&zeros);
        assert!(c.len() < 8 * 1024, "{}", c.len());
        let sent = &c[..c.len() - 4];
        assert_eq!(inflate(sent, 65536), Err(InflateError::TooBig));
        assert_eq!(inflate(sent, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 1024),
            Err(InflateError::Corrupt)
        );
        // limits below the first buffer's size hold too
        let hi = compressed(&Bytes::from_static(b"hi"));
        let hi = &hi[..hi.len() - 4];
        assert_eq!(inflate(hi, 2).unwrap(), b"hi");
        assert_eq!(inflate(hi, 1), Err(InflateError::TooBig));
        assert_eq!(inflate(sent, 0), Err(InflateError::TooBig));
        // an empty message (the client sent only the tail's complement)
        assert_eq!(inflate(&[0x00], 1024).unwrap(), b"");
    }

    #[test]
    fn offers_are_taken_only_when_every_parameter_is_understood() {
        let ok = [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=10; server_no_context_takeover",
            "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=10, permessage-deflate",
            "permessage-deflate; server_max_window_bits=15; client_no_context_takeover",
        ];
        for o in ok {
            assert!(negotiate([o]).is_some(), "{o}");
        }
        // an offer naming the server's window gets it repeated in the answer
        assert_eq!(negotiate(["permessage-deflate"]), Some(RESPONSE));
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=15"]),
            Some(RESPONSE_WINDOW_15)
        );
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=9, permessage-deflate"]),
            Some(RESPONSE)
        );
        let refused = [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_parameter",
            "permessage-deflate; server_no_context_takeover=1",
        ];
        for o in refused {
            assert_eq!(negotiate([o]), None, "{o}");
        }
        // two header lines
        assert_eq!(negotiate(["foo", "permessage-deflate"]), Some(RESPONSE));
    }

    mod proptests {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any head and any body (random bytes, or runs of a few, as JSON compresses): a
            /// compressed message alone, and a stored head before the shared compressed body and
            /// the stored bracket, inflate to exactly what they stand for.
            #[test]
            fn composed_messages_inflate_to_their_parts(
                head in vec(any::<u8>(), 0..300),
                runs in vec((any::<u8>(), 1usize..300), 0..40),
                noise in vec(any::<u8>(), 0..2000),
            ) {
                let mut body: Vec<u8> = runs.iter().flat_map(|&(b, n)| std::iter::repeat_n(b, n)).collect();
                body.extend_from_slice(&noise);
                let body = Bytes::from(body);
                let c = compressed(&body);
                prop_assert!(c.ends_with(&SYNC_TAIL));
                prop_assert_eq!(inflate(&c[..c.len() - 4], 1 << 20).unwrap(), body.to_vec());
                let mut wire = stored(&head).to_vec();
                wire.extend_from_slice(&c);
                wire.extend_from_slice(&STORED_CLOSE_BRACKET);
                let mut want = head.clone();
                want.extend_from_slice(&body);
                want.push(b']');
                prop_assert_eq!(inflate(&wire, 1 << 20).unwrap(), want.clone());
                // the limit holds at the exact size and one below it
                prop_assert_eq!(inflate(&wire, want.len()).unwrap().len(), want.len());
                prop_assert_eq!(inflate(&wire, want.len() - 1), Err(InflateError::TooBig));
            }
        }
    }
}
