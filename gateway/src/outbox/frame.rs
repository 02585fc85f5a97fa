//! What a socket's writer puts on the wire: the frames it queues ([`Out`]: text, pongs, pushes
//! around a shared payload, their compressed forms, and the raw rest of a frame a write began),
//! their headers, and the non-blocking `writev` of a batch that returns, without copying, what the
//! kernel did not take.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use crate::deflate;

/// What the writer sends.
pub(super) enum Out {
    Text(Bytes),
    Pong(Bytes),
    /// A text frame `head ++ body ++ "]"`: a channel push around a payload shared by many
    /// sockets (a room's `presence_state`), without a copy per socket.
    Wrapped(Bytes, Bytes),
    /// The rest of a frame a direct write began (the kernel took only part of it): bytes already
    /// framed, written as they are, before anything else.
    Raw(Bytes),
    /// A compressed text frame (permessage-deflate, RSV1): [`crate::deflate::compressed`] bytes,
    /// sent without their last four.
    Deflated(Bytes),
    /// A compressed channel push around a shared payload: the head as a stored block, the shared
    /// compressed payload, then `"]"` ([`crate::deflate::STORED_CLOSE_BRACKET`]).
    DeflatedWrapped(Bytes, Bytes),
}

impl Out {
    /// The payload bytes this frame holds, counted against `server.outbound_queue_bytes`. A
    /// payload shared by many sockets counts in full for each: the bound is per socket and must
    /// hold whatever the others do.
    pub(super) fn len(&self) -> usize {
        match self {
            Out::Text(b) | Out::Pong(b) | Out::Raw(b) => b.len(),
            Out::Wrapped(h, b) => h.len() + b.len() + 1,
            Out::Deflated(c) => c.len() - deflate::SYNC_TAIL.len(),
            Out::DeflatedWrapped(h, c) => h.len() + c.len() + deflate::STORED_CLOSE_BRACKET.len(),
        }
    }

    /// The frame as a socket that negotiated permessage-deflate sends it: a payload of
    /// [`deflate::MIN_BYTES`] or more compressed (once per payload, however many sockets send it),
    /// anything else as it is.
    pub(super) fn deflated(self) -> Out {
        match self {
            Out::Text(b) if b.len() >= deflate::MIN_BYTES => Out::Deflated(deflate::compressed(&b)),
            Out::Wrapped(h, b) if b.len() >= deflate::MIN_BYTES => {
                Out::DeflatedWrapped(deflate::stored(&h), deflate::compressed(&b))
            }
            other => other,
        }
    }
}

/// Frames per write: several queued frames go out in one syscall.
pub(super) const BATCH: usize = 16;
/// The longest frame header: FIN + opcode, 127, a 64-bit length (server frames are not masked).
const HEAD_MAX: usize = 10;

/// Writes what the kernel takes of `batch` (at most [`BATCH`] frames) without waiting; returns
/// the bytes it did not take, or None when it took them all. The rest is the frames' own `Bytes`,
/// sliced, not a copy: a megabyte `presence_state` the kernel took half of is not copied again.
pub(super) fn write_now<'a>(
    w: &OwnedWriteHalf,
    batch: impl Iterator<Item = &'a Out> + Clone,
) -> std::io::Result<Option<Vec<Bytes>>> {
    // small arrays on the stack: a delivery is usually a batch of one frame
    let mut heads = [([0u8; HEAD_MAX], 0usize); BATCH];
    for (head, m) in heads.iter_mut().zip(batch.clone()) {
        *head = frame_parts(m).0;
    }
    let mut slices = [IoSlice::new(&[]); 4 * BATCH];
    let (mut k, mut total) = (0, 0);
    for ((head, n), m) in heads.iter().zip(batch.clone()) {
        for part in std::iter::once(&head[..*n]).chain(frame_parts(m).1) {
            if !part.is_empty() {
                slices[k] = IoSlice::new(part);
                k += 1;
                total += part.len();
            }
        }
    }
    let written = match w.try_write_vectored(&slices[..k]) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written == total {
        return Ok(None);
    }
    let mut rest = Vec::new();
    let mut skip = written;
    for ((head, n), m) in heads.iter().zip(batch) {
        let head = Bytes::copy_from_slice(&head[..*n]);
        let parts = match m {
            Out::Text(b) | Out::Pong(b) | Out::Raw(b) => {
                [head, b.clone(), Bytes::new(), Bytes::new()]
            }
            Out::Wrapped(h, b) => [head, h.clone(), b.clone(), Bytes::from_static(b"]")],
            Out::Deflated(c) => [
                head,
                c.slice(..c.len() - deflate::SYNC_TAIL.len()),
                Bytes::new(),
                Bytes::new(),
            ],
            Out::DeflatedWrapped(h, c) => [
                head,
                h.clone(),
                c.clone(),
                Bytes::from_static(&deflate::STORED_CLOSE_BRACKET),
            ],
        };
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
            } else {
                rest.push(part.slice(skip..));
                skip = 0;
            }
        }
    }
    Ok(Some(rest))
}

/// Writes the pieces a non-blocking write left, in order.
pub(super) async fn write_rest(w: &mut OwnedWriteHalf, rest: &[Bytes]) -> std::io::Result<()> {
    for part in rest {
        w.write_all(part).await?;
    }
    Ok(())
}

/// A frame's header (and its length) and its payload's parts: `head ++ body ++ tail`.
pub(super) fn frame_parts(m: &Out) -> (([u8; HEAD_MAX], usize), [&[u8]; 3]) {
    let (op, parts): (u8, [&[u8]; 3]) = match m {
        Out::Text(b) => (0x81, [&[], b, &[]]),
        Out::Pong(b) => (0x8A, [&[], b, &[]]),
        Out::Wrapped(h, b) => (0x81, [h, b, b"]"]),
        // RSV1: the payload is compressed
        Out::Deflated(c) => (0xC1, [&[], &c[..c.len() - deflate::SYNC_TAIL.len()], &[]]),
        Out::DeflatedWrapped(h, c) => (0xC1, [h, c, &deflate::STORED_CLOSE_BRACKET]),
        // already framed: no header of its own
        Out::Raw(b) => return (([0u8; HEAD_MAX], 0), [&[], b, &[]]),
    };
    let n: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; HEAD_MAX];
    head[0] = op;
    let len = if n < 126 {
        head[1] = n as u8;
        2
    } else if n <= usize::from(u16::MAX) {
        head[1] = 126;
        head[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(n as u64).to_be_bytes());
        10
    };
    ((head, len), parts)
}
