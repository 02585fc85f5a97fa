//! The client-to-server half of RFC 6455 framing (§5), read straight from the TCP stream.
//!
//! fastwebsockets' reader keeps an 8 KiB buffer for the whole life of a socket, and an idle viewer
//! would hold it for hours. This reader waits for readiness with no buffer, reads what the kernel
//! has, and drops its buffer again as soon as every byte in it was returned as a frame: an idle
//! socket holds no read buffer at all. Only a frame that has arrived in part keeps one, sized to
//! that frame (at most `server.max_frame_bytes` plus its header).
//!
//! It checks what a server must (RFC 6455 §5.1–5.5): client frames are masked, no reserved bits
//! or opcodes, control frames are final and at most 125 bytes. Reassembling fragments, UTF-8 of
//! text messages and close codes are [`crate::wsmessage`]'s.

use bytes::Bytes;
use std::task::{Context, Poll, ready};

use tokio::net::tcp::OwnedReadHalf;

/// Bytes asked of the kernel per read when no frame length says more.
const READ_CHUNK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The opcode of a frame's low four bits; None for the reserved ones (RFC 6455 §5.2).
    pub fn from_bits(op: u8) -> Option<OpCode> {
        Some(match op {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            _ => return None,
        })
    }
}

/// One frame, unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Vec<u8>,
    /// RSV1 on a message's first frame: its payload is compressed (permessage-deflate, only when
    /// negotiated).
    pub compressed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// End of stream, reset or another I/O error: nothing more can be read.
    Gone,
    /// The frame's payload is longer than the limit (close 1009).
    TooBig,
    /// Not a valid client frame (close 1002).
    Protocol,
}

pub struct FrameReader {
    tcp: OwnedReadHalf,
    unread: Unread,
}

/// The bytes received and not yet returned as frames, and the parse of them; kept apart from the
/// socket so that tests can feed it any split of a byte stream.
struct Unread {
    /// Received bytes from `pos` on are not returned yet; no allocation while there are none.
    buf: Vec<u8>,
    pos: usize,
    /// Bytes still missing from the frame at `pos`, when its header is known.
    missing: usize,
    max_payload: usize,
    /// permessage-deflate was negotiated: RSV1 may mark a message's first frame.
    deflate: bool,
}

impl FrameReader {
    /// `early`: bytes the HTTP layer read past the upgrade request (the first frames, if the client
    /// sent them at once). They are copied, and the HTTP layer's buffer they live in is let go.
    pub fn new(tcp: OwnedReadHalf, early: Bytes, max_payload: usize) -> Self {
        FrameReader {
            tcp,
            unread: Unread {
                buf: early.to_vec(),
                pos: 0,
                missing: 0,
                max_payload,
                deflate: false,
            },
        }
    }

    /// The same reader, for a socket that negotiated permessage-deflate: RSV1 is then allowed on
    /// the first frame of a text or binary message (and nowhere else).
    pub fn deflating(mut self, on: bool) -> Self {
        self.unread.deflate = on;
        self
    }

    /// The next frame. Cancel-safe: a read that is dropped loses no bytes.
    /// Reads and discards what the peer still sends, until it closes or `limit` passes: a
    /// lingering close. The socket's descriptor stays open meanwhile, so data arriving after our
    /// close frame (a client's last pings) does not make the kernel answer with a reset, which
    /// can make the client lose the close frame it has not read yet.
    pub async fn linger(self, limit: std::time::Duration) {
        let tcp = self.tcp;
        let _ = tokio::time::timeout(limit, async {
            let mut buf = [0u8; 1024];
            loop {
                if tcp.readable().await.is_err() {
                    return;
                }
                match tcp.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .await;
    }

    pub async fn next(&mut self) -> Result<Frame, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// The next frame, polled: the socket's readiness keeps the waker, so a reader waiting here
    /// holds no future of its own (an idle socket's task stays small). Loses no bytes when not
    /// polled again.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, ReadError>> {
        loop {
            if let Some(frame) = self.unread.parse()? {
                return Poll::Ready(Ok(frame));
            }
            if ready!(self.tcp.as_ref().poll_read_ready(cx)).is_err() {
                return Poll::Ready(Err(ReadError::Gone));
            }
            let buf = self.unread.make_room();
            match self.tcp.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(Err(ReadError::Gone)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // readiness is cleared: the next poll waits for more
                    if buf.is_empty() {
                        *buf = Vec::new();
                    }
                }
                Err(_) => return Poll::Ready(Err(ReadError::Gone)),
            }
        }
    }

    /// Capacity held for this socket's unread bytes (0 when idle).
    pub fn buffered_capacity(&self) -> usize {
        self.unread.buf.capacity()
    }
}

impl Unread {
    /// Drops the bytes already returned and reserves room for the next read: what the frame under
    /// way still misses, else [`READ_CHUNK`].
    fn make_room(&mut self) -> &mut Vec<u8> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(self.missing.max(READ_CHUNK));
        &mut self.buf
    }

    /// A whole frame from the buffer, or None when more bytes are needed.
    fn parse(&mut self) -> Result<Option<Frame>, ReadError> {
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = OpCode::from_bits(b[0] & 0x0f).ok_or(ReadError::Protocol)?;
        // RSV2 and RSV3 are never ours; RSV1 only marks a compressed message's first frame
        let compressed = b[0] & 0x40 != 0;
        if b[0] & 0x30 != 0
            || (compressed && !(self.deflate && matches!(opcode, OpCode::Text | OpCode::Binary)))
        {
            return Err(ReadError::Protocol);
        }
        if b[1] & 0x80 == 0 {
            return Err(ReadError::Protocol); // a client must mask every frame
        }
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() < 10 => return Ok(None),
            127 => {
                let mut n = [0; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            n => (u64::from(n), 2),
        };
        let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if control && (!fin || len > 125) {
            return Err(ReadError::Protocol);
        }
        if len > self.max_payload as u64 {
            return Err(ReadError::TooBig);
        }
        let total = head + 4 + len as usize;
        if b.len() < total {
            self.missing = total - b.len();
            return Ok(None);
        }
        let mask = [b[head], b[head + 1], b[head + 2], b[head + 3]];
        let mut payload = b[head + 4..total].to_vec();
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        self.pos += total;
        self.missing = 0;
        if self.pos == self.buf.len() {
            // everything read was handed out: an idle socket keeps no buffer
            self.buf = Vec::new();
            self.pos = 0;
        }
        Ok(Some(Frame {
            fin,
            opcode,
            payload,
            compressed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    async fn pair(early: &[u8], max: usize) -> (FrameReader, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (r, _w) = server.into_split();
        (
            FrameReader::new(r, Bytes::copy_from_slice(early), max),
            client,
        )
    }

    #[tokio::test]
    async fn rsv1_marks_a_compressed_message_only_where_deflate_allows_it() {
        // 0xc1: FIN + RSV1 + text; 0x41: RSV1 + text, unfinished; 0x80: continuation
        for (first, deflating, want) in [
            (0xc1, true, Ok(true)),
            (0xc2, true, Ok(true)),
            (0xc1, false, Err(ReadError::Protocol)),
            (0xc0, true, Err(ReadError::Protocol)), // on a continuation
            (0xc9, true, Err(ReadError::Protocol)), // on a ping
            (0xa1, true, Err(ReadError::Protocol)), // RSV2
            (0x91, true, Err(ReadError::Protocol)), // RSV3
            (0x81, true, Ok(false)),
        ] {
            let (rd, _client) = pair(&frame(first, b"x"), 1024).await;
            let mut rd = rd.deflating(deflating);
            let got = rd.next().await.map(|f| f.compressed);
            assert_eq!(got, want, "first byte {first:#x}, deflating {deflating}");
        }
    }

    #[tokio::test]
    async fn reads_frames_and_holds_no_buffer_between_them() {
        let (mut rd, mut client) = pair(&frame(0x81, b"early"), 1024).await;
        let f = rd.next().await.unwrap();
        assert_eq!(
            (f.fin, f.opcode, &f.payload[..]),
            (true, OpCode::Text, &b"early"[..])
        );
        assert_eq!(rd.buffered_capacity(), 0);

        // two frames in one write, then one split over two writes
        let mut two = frame(0x01, b"frag");
        two.extend(frame(0x80, b"ment"));
        client.write_all(&two).await.unwrap();
        let f = rd.next().await.unwrap();
        assert_eq!(
            (f.fin, f.opcode, &f.payload[..]),
            (false, OpCode::Text, &b"frag"[..])
        );
        let f = rd.next().await.unwrap();
        assert_eq!((f.fin, f.opcode), (true, OpCode::Continuation));
        assert_eq!(rd.buffered_capacity(), 0);

        let big = vec![b'x'; 1000];
        let bytes = frame(0x82, &big);
        client.write_all(&bytes[..300]).await.unwrap();
        let reader = tokio::spawn(async move {
            let f = rd.next().await.unwrap();
            (f, rd.buffered_capacity())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(&bytes[300..]).await.unwrap();
        let (f, cap) = reader.await.unwrap();
        assert_eq!((f.opcode, f.payload), (OpCode::Binary, big));
        assert_eq!(cap, 0);
    }

    #[tokio::test]
    async fn refuses_what_a_server_must_refuse() {
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (frame(0x81, &[b'x'; 1025]), ReadError::TooBig),
            (vec![0x81, 0x02, b'h', b'i'], ReadError::Protocol), // unmasked
            (frame(0xc1, b"x"), ReadError::Protocol),            // RSV1
            (frame(0x83, b"x"), ReadError::Protocol),            // reserved opcode
            (frame(0x09, b"x"), ReadError::Protocol),            // fragmented ping
            (frame(0x89, &[0; 126]), ReadError::Protocol),       // long ping
        ];
        for (bytes, want) in cases {
            let (mut rd, _client) = pair(&bytes, 1024).await;
            assert_eq!(rd.next().await.unwrap_err(), want, "{bytes:02x?}");
        }
        // exactly the limit is fine; a 64-bit length is read
        let (mut rd, _client) = pair(&frame(0x82, &[7; 1024]), 1024).await;
        assert_eq!(rd.next().await.unwrap().payload.len(), 1024);
        let (mut rd, _client) = pair(&frame(0x82, &[7; 70_000]), 100_000).await;
        assert_eq!(rd.next().await.unwrap().payload.len(), 70_000);
    }

    #[tokio::test]
    async fn end_of_stream_is_gone() {
        let (mut rd, client) = pair(&[], 1024).await;
        drop(client);
        assert_eq!(rd.next().await.unwrap_err(), ReadError::Gone);
    }
}

#[cfg(test)]
mod proptests {
    //! Any stream of client frames, valid and not, read in pieces split at any points, gives the
    //! same frames and the same error as read whole — and as the frames that were written.
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    const MAX: usize = 300;

    /// One frame as written by a client (or not quite): its bytes, and what reading it must give.
    #[derive(Clone, Debug)]
    struct Written {
        bytes: Vec<u8>,
        want: Result<Frame, ReadError>,
    }

    prop_compose! {
        /// A frame header and payload with every field drawn: mostly valid, sometimes unmasked,
        /// with reserved bits or opcodes, control frames long or unfinished, payloads over the
        /// limit; lengths in the shortest form or a longer one.
        fn written()(
            fin in prop_oneof![4 => Just(true), 1 => Just(false)],
            rsv in prop_oneof![12 => Just(0u8), 1 => 1u8..8],
            op in prop_oneof![
                10 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
                1 => 0u8..16,
            ],
            masked in prop_oneof![15 => Just(true), 1 => Just(false)],
            len in prop_oneof![4 => 0usize..130, 1 => 0usize..=MAX + 40],
            form in 0u8..3,
            mask in any::<[u8; 4]>(),
            seed in any::<u8>(),
        ) -> Written {
            let payload: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
            let mut bytes = vec![(u8::from(fin) << 7) | (rsv << 4) | op];
            let m = if masked { 0x80 } else { 0 };
            match (len, form) {
                (n, 0) if n < 126 => bytes.push(m | n as u8),
                (n, 0 | 1) if n < 65536 => {
                    bytes.push(m | 126);
                    bytes.extend_from_slice(&(n as u16).to_be_bytes());
                }
                (n, _) => {
                    bytes.push(m | 127);
                    bytes.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            if masked {
                bytes.extend_from_slice(&mask);
            }
            bytes.extend(payload.iter().enumerate().map(|(i, b)| if masked { b ^ mask[i & 3] } else { *b }));
            let want = match OpCode::from_bits(op) {
                _ if rsv != 0 || !masked => Err(ReadError::Protocol),
                None => Err(ReadError::Protocol),
                Some(OpCode::Close | OpCode::Ping | OpCode::Pong) if !fin || len > 125 => {
                    Err(ReadError::Protocol)
                }
                Some(_) if len > MAX => Err(ReadError::TooBig),
                Some(opcode) => Ok(Frame { fin, opcode, payload, compressed: false }),
            };
            Written { bytes, want }
        }
    }

    /// What reading `frames` must give: every frame up to the first that is refused, and then
    /// its error (or `Gone` when the stream simply ends).
    fn expected(frames: &[Written]) -> Vec<Result<Frame, ReadError>> {
        let mut out = Vec::new();
        for w in frames {
            out.push(w.want.clone());
            if w.want.is_err() {
                return out;
            }
        }
        out.push(Err(ReadError::Gone));
        out
    }

    /// Reads `stream` delivered in `pieces` (their lengths; the rest comes last) the way
    /// `FrameReader::fill` does, stopping at the first error.
    fn read_in_pieces(stream: &[u8], pieces: &[usize]) -> Vec<Result<Frame, ReadError>> {
        let mut u = Unread {
            buf: Vec::new(),
            pos: 0,
            missing: 0,
            max_payload: MAX,
            deflate: false,
        };
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts = pieces.iter().copied().chain(std::iter::once(stream.len()));
        loop {
            match u.parse() {
                Ok(Some(f)) => out.push(Ok(f)),
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
                Ok(None) => {
                    if at == stream.len() {
                        out.push(Err(ReadError::Gone));
                        // a stream that ended at a frame boundary left nothing held
                        if u.pos == u.buf.len() {
                            assert_eq!(u.buf.capacity(), 0);
                        }
                        return out;
                    }
                    let n = cuts
                        .next()
                        .unwrap_or(stream.len())
                        .clamp(1, stream.len() - at);
                    u.make_room().extend_from_slice(&stream[at..at + n]);
                    at += n;
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn any_split_reads_as_the_whole(
            frames in vec(written(), 0..12),
            pieces in vec(prop_oneof![3 => 1usize..8, 1 => 1usize..400], 0..40),
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|w| w.bytes.clone()).collect();
            let whole = read_in_pieces(&stream, &[stream.len()]);
            prop_assert_eq!(&whole, &expected(&frames));
            prop_assert_eq!(read_in_pieces(&stream, &pieces), whole.clone());
            let bytewise = vec![1; stream.len()];
            prop_assert_eq!(read_in_pieces(&stream, &bytewise), whole);
        }
    }

    proptest! {
        // real sockets: fewer cases, each a few milliseconds
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The same over a loopback TCP pair: the pieces are written one by one, with a pause
        /// after some, so the reader sees its reads end at arbitrary points.
        #[test]
        fn any_split_over_tcp_reads_as_the_whole(
            frames in vec(written(), 0..8),
            pieces in vec((1usize..64, any::<bool>()), 0..12),
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|w| w.bytes.clone()).collect();
            let want = expected(&frames);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let got = rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
                client.set_nodelay(true).unwrap();
                let (server, _) = l.accept().await.unwrap();
                let (r, _w) = server.into_split();
                let mut rd = FrameReader::new(r, Bytes::new(), MAX);
                let writer = tokio::spawn(async move {
                    let mut at = 0;
                    for (n, pause) in pieces {
                        let n = n.min(stream.len() - at);
                        if client.write_all(&stream[at..at + n]).await.is_err() {
                            return;
                        }
                        at += n;
                        if pause {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                    }
                    let _ = client.write_all(&stream[at..]).await;
                    let _ = client.shutdown().await;
                });
                let mut got = Vec::new();
                loop {
                    let r = rd.next().await;
                    let end = r.is_err();
                    got.push(r);
                    if end {
                        break;
                    }
                }
                drop(rd);
                let _ = writer.await;
                got
            });
            prop_assert_eq!(got, want);
        }
    }
}
