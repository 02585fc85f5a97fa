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

/// One frame, unmasked.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
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
    /// Received bytes from `pos` on are not returned yet; no allocation while there are none.
    buf: Vec<u8>,
    pos: usize,
    /// Bytes still missing from the frame at `pos`, when its header is known.
    missing: usize,
    max_payload: usize,
}

impl FrameReader {
    /// `early`: bytes the HTTP layer read past the upgrade request (the first frames, if the client
    /// sent them at once). They are copied, and the HTTP layer's buffer they live in is let go.
    pub fn new(tcp: OwnedReadHalf, early: Bytes, max_payload: usize) -> Self {
        FrameReader {
            tcp,
            buf: early.to_vec(),
            pos: 0,
            missing: 0,
            max_payload,
        }
    }

    /// The next frame. Cancel-safe: a read that is dropped loses no bytes.
    pub async fn next(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Capacity held for this socket's unread bytes (0 when idle).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        loop {
            self.tcp.readable().await.map_err(|_| ReadError::Gone)?;
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.buf.reserve(self.missing.max(READ_CHUNK));
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = Vec::new();
                    }
                }
                Err(_) => return Err(ReadError::Gone),
            }
        }
    }

    /// A whole frame from the buffer, or None when more bytes are needed.
    fn parse(&mut self) -> Result<Option<Frame>, ReadError> {
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(ReadError::Protocol); // no extension was negotiated
        }
        let opcode = match b[0] & 0x0f {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            _ => return Err(ReadError::Protocol),
        };
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
