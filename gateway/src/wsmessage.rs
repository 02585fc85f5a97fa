//! Client frames → messages (RFC 6455 §5.4–5.5, §7.4, §8.1): reassembly of fragments under
//! `server.max_frame_bytes`, UTF-8 of text messages, validation of the client's close frame, and
//! the deadline of an unfinished fragmented message. Pure: no I/O, no tokio; the caller gives the
//! time.
//!
//! Frames come from [`crate::wsread`] (which already refused what no frame may be); what comes out
//! is an [`Event`] the connection acts on — a whole message for `protocol::decode_*`, a pong or a
//! close to queue — or a [`Violation`] whose [`Violation::close_code`] fails the connection.
//! The session and the Autobahn echo server (`gateway/examples/echo.rs`) share these rules.
//!
//! An idle socket holds nothing here: a fragment's bytes are kept only while its message is
//! unfinished, and the first fragment's buffer becomes the message's.

use std::time::{Duration, Instant};

use crate::protocol::close;
use crate::wsread::{Frame, OpCode, ReadError};

/// What a frame asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole message.
    Message(Message),
    /// A fragment was taken in; its message is not finished yet.
    Partial,
    /// Answer with a pong carrying this payload.
    Ping(Vec<u8>),
    /// Nothing to do (a pong, solicited or not).
    Pong,
    /// The client closes: answer with a close frame with this code (`None`: with no payload, as
    /// the client's had none), then stop.
    Close(Option<u16>),
}

/// A reassembled message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// Valid UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

/// Why the connection fails; [`Violation::close_code`] is the code it closes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Frames out of order, a close frame of one byte or with a code a client may not send.
    #[error("WebSocket protocol error")]
    Protocol,
    /// A message (all its fragments together) above the limit.
    #[error("message too big")]
    TooBig,
    /// A text message or a close reason that is not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A fragmented message not finished within its time from its first fragment.
    #[error("fragmented message not finished in time")]
    FragmentTimeout,
    /// A compressed message (permessage-deflate) that is not valid DEFLATE data.
    #[error("invalid compressed data")]
    BadCompression,
}

impl Violation {
    pub fn close_code(self) -> u16 {
        match self {
            Violation::Protocol => close::PROTOCOL_ERROR,
            Violation::TooBig => close::TOO_BIG,
            Violation::InvalidUtf8 | Violation::BadCompression => close::MALFORMED,
            Violation::FragmentTimeout => close::IDLE_TIMEOUT,
        }
    }

    /// What a read error means for the connection; `None` when the peer is gone (nothing can be
    /// written to it).
    pub fn of_read(e: &ReadError) -> Option<Violation> {
        match e {
            ReadError::Gone => None,
            ReadError::TooBig => Some(Violation::TooBig),
            ReadError::Protocol => Some(Violation::Protocol),
        }
    }
}

/// Whether a client may send `code` in a close frame (RFC 6455 §7.4; 1004–1006 and 1015 are
/// reserved, 1016–2999 unassigned, 0–999 and 5000 up not used).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// An unfinished fragmented message.
struct Partial {
    text: bool,
    /// permessage-deflate: `buf` is compressed and is checked as UTF-8 once inflated.
    compressed: bool,
    buf: Vec<u8>,
    /// `buf[..checked]` is known to be UTF-8 (text only); the rest is at most an unfinished
    /// character.
    checked: usize,
    /// When the message must be finished: its first fragment's arrival plus the allowed time.
    deadline: Instant,
}

/// One connection's message state: the unfinished fragmented message, if any.
pub struct Assembler {
    /// Bytes, at most `u32::MAX` (4 bytes, not 8, in every socket's task).
    max_message: u32,
    /// Milliseconds.
    fragment_ms: u32,
    /// Boxed: every idle socket holds an assembler, few a fragmented message.
    partial: Option<Box<Partial>>,
}

impl Assembler {
    /// `max_message`: the largest message, all fragments together (`server.max_frame_bytes`);
    /// `fragment_time`: how long a fragmented message may take from its first fragment
    /// (`server.idle_timeout_ms`: a client that sends pings but never finishes a message must not
    /// keep its buffer forever).
    pub fn new(max_message: usize, fragment_time: Duration) -> Self {
        Assembler {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            fragment_ms: u32::try_from(fragment_time.as_millis()).unwrap_or(u32::MAX),
            partial: None,
        }
    }

    fn max(&self) -> usize {
        self.max_message as usize
    }

    /// When the unfinished fragmented message must be finished; `None` when there is none. Past
    /// it, the connection fails with [`Violation::FragmentTimeout`].
    pub fn deadline(&self) -> Option<Instant> {
        self.partial.as_ref().map(|p| p.deadline)
    }

    /// Takes in the next frame, which arrived at `now`.
    pub fn push(&mut self, frame: Frame, now: Instant) -> Result<Event, Violation> {
        if self.deadline().is_some_and(|d| now >= d) {
            return Err(Violation::FragmentTimeout);
        }
        let Frame {
            fin,
            opcode,
            payload,
            compressed,
        } = frame;
        match opcode {
            OpCode::Close => close_reply(&payload).map(Event::Close),
            OpCode::Ping => Ok(Event::Ping(payload)),
            OpCode::Pong => Ok(Event::Pong),
            OpCode::Text | OpCode::Binary if self.partial.is_some() => Err(Violation::Protocol),
            OpCode::Text | OpCode::Binary => {
                let text = opcode == OpCode::Text;
                if payload.len() > self.max() {
                    return Err(Violation::TooBig);
                }
                let checked = if text && !compressed {
                    utf8_checked(&payload, 0, fin)?
                } else {
                    0
                };
                if fin {
                    return Ok(Event::Message(self.finish(text, compressed, payload)?));
                }
                self.partial = Some(Box::new(Partial {
                    text,
                    compressed,
                    buf: payload,
                    checked,
                    deadline: now + Duration::from_millis(u64::from(self.fragment_ms)),
                }));
                Ok(Event::Partial)
            }
            OpCode::Continuation => {
                let max = self.max();
                let Some(p) = self.partial.as_mut() else {
                    return Err(Violation::Protocol);
                };
                if p.buf.len() + payload.len() > max {
                    return Err(Violation::TooBig);
                }
                p.buf.extend_from_slice(&payload);
                if p.text && !p.compressed {
                    p.checked = utf8_checked(&p.buf, p.checked, fin)?;
                }
                if !fin {
                    return Ok(Event::Partial);
                }
                match self.partial.take() {
                    Some(p) => Ok(Event::Message(self.finish(p.text, p.compressed, p.buf)?)),
                    None => Err(Violation::Protocol),
                }
            }
        }
    }
}

impl Assembler {
    /// A whole message's payload as the connection gets it: inflated under the message limit
    /// when it came compressed, then checked as UTF-8 when it is text (a plain text message's
    /// fragments were checked as they came).
    fn finish(&self, text: bool, compressed: bool, payload: Vec<u8>) -> Result<Message, Violation> {
        if !compressed {
            return Ok(message(text, payload));
        }
        let payload = crate::deflate::inflate(&payload, self.max()).map_err(|e| match e {
            crate::deflate::InflateError::TooBig => Violation::TooBig,
            crate::deflate::InflateError::Corrupt => Violation::BadCompression,
        })?;
        if text {
            utf8_checked(&payload, 0, true)?;
        }
        Ok(message(text, payload))
    }
}

fn message(text: bool, payload: Vec<u8>) -> Message {
    if text {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

/// Checks `buf[from..]` (`from` is a character boundary) and returns how far `buf` is known to be
/// UTF-8. An unfinished last character is fine until the message's last fragment (`fin`); a byte
/// that no continuation can make valid fails at once, fragment by fragment.
fn utf8_checked(buf: &[u8], from: usize, fin: bool) -> Result<usize, Violation> {
    match std::str::from_utf8(&buf[from..]) {
        Ok(_) => Ok(buf.len()),
        Err(e) if e.error_len().is_none() && !fin => Ok(from + e.valid_up_to()),
        Err(_) => Err(Violation::InvalidUtf8),
    }
}

/// The answer to a client's close frame: its code echoed, or no payload for no payload.
fn close_reply(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !valid_close_code(code) {
                return Err(Violation::Protocol);
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Violation::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16;
    const T: Duration = Duration::from_secs(10);

    fn f(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: payload.to_vec(),
            compressed: false,
        }
    }

    fn close(payload: &[u8]) -> Result<Event, Violation> {
        Assembler::new(MAX, T).push(f(true, OpCode::Close, payload), Instant::now())
    }

    #[test]
    fn close_codes_a_client_may_send_are_echoed_the_others_fail_with_1002() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1010, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            let mut p = u16::to_be_bytes(code).to_vec();
            assert_eq!(close(&p), Ok(Event::Close(Some(code))), "{code}");
            p.extend_from_slice("bye ✓".as_bytes());
            assert_eq!(
                close(&p),
                Ok(Event::Close(Some(code))),
                "{code} with a reason"
            );
        }
        for code in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let got = close(&u16::to_be_bytes(code));
            assert_eq!(got, Err(Violation::Protocol), "{code}");
            assert_eq!(Violation::Protocol.close_code(), 1002);
        }
        assert_eq!(close(&[]), Ok(Event::Close(None)));
        assert_eq!(close(&[3]), Err(Violation::Protocol));
        let bad_reason = [0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xff];
        assert_eq!(close(&bad_reason), Err(Violation::InvalidUtf8));
        assert_eq!(Violation::InvalidUtf8.close_code(), 1007);
    }

    #[test]
    fn fragments_are_reassembled_with_control_frames_between() {
        let now = Instant::now();
        let mut a = Assembler::new(MAX, T);
        assert_eq!(
            a.push(f(false, OpCode::Text, b"he"), now),
            Ok(Event::Partial)
        );
        assert_eq!(
            a.push(f(true, OpCode::Ping, b"p"), now),
            Ok(Event::Ping(b"p".to_vec()))
        );
        assert_eq!(a.push(f(true, OpCode::Pong, b""), now), Ok(Event::Pong));
        assert_eq!(
            a.push(f(false, OpCode::Continuation, b""), now),
            Ok(Event::Partial)
        );
        assert_eq!(
            a.push(f(true, OpCode::Continuation, b"llo"), now),
            Ok(Event::Message(Message::Text(b"hello".to_vec())))
        );
        assert_eq!(a.deadline(), None);
        assert_eq!(
            a.push(f(true, OpCode::Binary, &[0xff]), now),
            Ok(Event::Message(Message::Binary(vec![0xff])))
        );
    }

    #[test]
    fn frames_out_of_order_fail_with_1002() {
        let now = Instant::now();
        let mut a = Assembler::new(MAX, T);
        assert_eq!(
            a.push(f(true, OpCode::Continuation, b"x"), now),
            Err(Violation::Protocol)
        );
        let mut a = Assembler::new(MAX, T);
        a.push(f(false, OpCode::Binary, b"x"), now).unwrap();
        assert_eq!(
            a.push(f(true, OpCode::Text, b"y"), now),
            Err(Violation::Protocol)
        );
    }

    #[test]
    fn the_limit_holds_for_all_fragments_together() {
        let now = Instant::now();
        let mut a = Assembler::new(MAX, T);
        a.push(f(false, OpCode::Binary, &[0; 10]), now).unwrap();
        a.push(f(false, OpCode::Continuation, &[0; 6]), now)
            .unwrap();
        assert_eq!(
            a.push(f(true, OpCode::Continuation, &[0]), now),
            Err(Violation::TooBig)
        );
        assert_eq!(Violation::TooBig.close_code(), 1009);
        let mut a = Assembler::new(MAX, T);
        assert_eq!(
            a.push(f(true, OpCode::Text, &[b'x'; MAX]), now),
            Ok(Event::Message(Message::Text(vec![b'x'; MAX])))
        );
    }

    #[test]
    fn text_must_be_utf8_and_fails_at_the_first_impossible_fragment() {
        let now = Instant::now();
        let mut a = Assembler::new(MAX, T);
        assert_eq!(
            a.push(f(true, OpCode::Text, b"a\xff"), now),
            Err(Violation::InvalidUtf8)
        );
        // "κ" (ce ba) split between fragments is fine
        let mut a = Assembler::new(MAX, T);
        assert_eq!(
            a.push(f(false, OpCode::Text, b"\xce"), now),
            Ok(Event::Partial)
        );
        assert_eq!(
            a.push(f(true, OpCode::Continuation, b"\xba!"), now),
            Ok(Event::Message(Message::Text("κ!".as_bytes().to_vec())))
        );
        // a code point above U+10FFFF fails on its second byte, before the message ends
        let mut a = Assembler::new(MAX, T);
        a.push(f(false, OpCode::Text, b"ok"), now).unwrap();
        assert_eq!(
            a.push(f(false, OpCode::Continuation, b"\xf4\x90"), now),
            Err(Violation::InvalidUtf8)
        );
        // an unfinished character at the end of the message
        let mut a = Assembler::new(MAX, T);
        a.push(f(false, OpCode::Text, b"\xe2\x82"), now).unwrap();
        assert_eq!(
            a.push(f(true, OpCode::Continuation, b""), now),
            Err(Violation::InvalidUtf8)
        );
    }

    #[test]
    fn a_fragmented_message_has_its_time_from_the_first_fragment() {
        let t0 = Instant::now();
        let mut a = Assembler::new(MAX, T);
        assert_eq!(a.deadline(), None);
        a.push(f(false, OpCode::Text, b"a"), t0).unwrap();
        assert_eq!(a.deadline(), Some(t0 + T));
        // pings and empty fragments do not extend it
        let later = t0 + T / 2;
        a.push(f(true, OpCode::Ping, b""), later).unwrap();
        a.push(f(false, OpCode::Continuation, b""), later).unwrap();
        assert_eq!(a.deadline(), Some(t0 + T));
        assert_eq!(
            a.push(f(true, OpCode::Ping, b""), t0 + T),
            Err(Violation::FragmentTimeout)
        );
        assert_eq!(Violation::FragmentTimeout.close_code(), 4000);
        // in time, the next message gets a time of its own
        let mut a = Assembler::new(MAX, T);
        a.push(f(false, OpCode::Text, b"a"), t0).unwrap();
        a.push(f(true, OpCode::Continuation, b"b"), later).unwrap();
        a.push(f(false, OpCode::Text, b"c"), later).unwrap();
        assert_eq!(a.deadline(), Some(later + T));
    }

    #[test]
    fn read_errors_map_to_their_close_codes() {
        assert_eq!(Violation::of_read(&ReadError::Gone), None);
        assert_eq!(
            Violation::of_read(&ReadError::TooBig).map(Violation::close_code),
            Some(1009)
        );
        assert_eq!(
            Violation::of_read(&ReadError::Protocol).map(Violation::close_code),
            Some(1002)
        );
    }

    /// `data` compressed as a permessage-deflate sender sends it (without the sync tail).
    fn deflated(data: &[u8]) -> Vec<u8> {
        let c = crate::deflate::compressed(&bytes::Bytes::copy_from_slice(data));
        c[..c.len() - 4].to_vec()
    }

    fn z(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame {
        Frame {
            compressed: true,
            ..f(fin, opcode, payload)
        }
    }

    #[test]
    fn a_compressed_message_is_inflated_whole_or_in_fragments() {
        let text = "héllo wörld, héllo wörld, héllo wörld".repeat(20);
        let c = deflated(text.as_bytes());
        let max = text.len();
        let now = Instant::now();
        let mut a = Assembler::new(max, T);
        assert_eq!(
            a.push(z(true, OpCode::Text, &c), now),
            Ok(Event::Message(Message::Text(text.clone().into_bytes())))
        );
        // RSV1 on the first frame only; the fragments split the compressed bytes anywhere,
        // including inside a character's compressed form (no UTF-8 check before inflating)
        let (one, two) = c.split_at(c.len() / 2);
        assert_eq!(a.push(z(false, OpCode::Text, one), now), Ok(Event::Partial));
        assert_eq!(
            a.push(f(true, OpCode::Continuation, two), now),
            Ok(Event::Message(Message::Text(text.clone().into_bytes())))
        );
        assert_eq!(
            a.push(z(true, OpCode::Binary, &deflated(&[0xff, 0xfe])), now),
            Ok(Event::Message(Message::Binary(vec![0xff, 0xfe])))
        );
    }

    #[test]
    fn a_compressed_message_too_big_corrupt_or_not_utf8_fails() {
        let now = Instant::now();
        // 512 bytes allowed; 64 KiB of zeros compresses to far fewer
        let bomb = deflated(&[b'0'; 65536]);
        assert!(bomb.len() <= 512, "{}", bomb.len());
        assert_eq!(
            Assembler::new(512, T).push(z(true, OpCode::Text, &bomb), now),
            Err(Violation::TooBig)
        );
        assert_eq!(
            Assembler::new(MAX, T).push(z(true, OpCode::Text, &[0xff, 0xff, 0xff]), now),
            Err(Violation::BadCompression)
        );
        assert_eq!(Violation::BadCompression.close_code(), 1007);
        assert_eq!(
            Assembler::new(MAX, T).push(z(true, OpCode::Text, &deflated(&[0xc3, 0x28])), now),
            Err(Violation::InvalidUtf8)
        );
    }
}
