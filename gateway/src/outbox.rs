//! A socket's outbound side: its bounded queue and the single writer that empties it onto the
//! socket. The writer is a task only while it has work: a frame sent to an idle socket is written
//! by its sender at once, and a writer task is spawned only for what the kernel did not take and
//! for the close; once drained it hands the socket back and ends, so an idle socket has no task
//! of its own for writing. Every frame a socket gets (replies, room broadcasts, presence, pongs,
//! the close frame) goes through the one queue, so per-socket order is the order of enqueueing.
//! A queue that fills up — in frames (`server.outbound_queue`) or in bytes
//! (`server.outbound_queue_bytes`) — closes the socket as a slow consumer (4008): a slow client
//! never slows a room or grows memory.
//! Used by `session` (replies), `fanout` (room frames) and the drain alike.
//!
//! A close the gateway starts (a refusal's 4009, a drain's 1012, a 1002/1007/1009 for bad input)
//! goes out after everything queued before it, within the write timeout; only the slow-consumer
//! close (4008), the echo of a client's close and an abort (the peer is gone) drop the queue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use crate::protocol::close;

mod cork;
pub use cork::Cork;
mod frame;
use frame::{BATCH, Out, write_now, write_rest};

/// The queued frames and their payload bytes, under one lock, and the socket while the writer
/// lends it out.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Out>,
    bytes: usize,
    /// The socket, while no writer task runs (nothing queued, nothing of its own to write): a frame
    /// sent then is written at once by the sender (see [`Outbox::push`]). `None` before
    /// [`Outbox::attach`], while a writer task holds it, and after it ended.
    sock: Option<OwnedWriteHalf>,
    /// The writer ended (close frame sent, or the peer gone): the socket is closed.
    ended: bool,
    /// The session's reader, woken when a close is asked for and when the writer ends.
    reader: Option<Waker>,
    /// `server.write_timeout`, for the writer tasks, in milliseconds (4 bytes, not a
    /// `Duration`'s 16: this is in every socket).
    write_timeout_ms: u32,
}

impl Queue {
    /// Puts back, first in line, what a write began and the kernel did not take: the frame's
    /// remaining bytes, written as they are before anything else.
    fn put_back(&mut self, rest: Vec<Bytes>) {
        for part in rest.into_iter().rev() {
            self.bytes += part.len();
            self.frames.push_front(Out::Raw(part));
        }
    }
}

/// A socket's outbound queue and close request, shared by the reader, every room the socket is
/// in (the hub), the drain, and the single writer that empties it.
///
/// The queue is a `VecDeque` that is allocated only while something waits in it, and freed when
/// drained (a tokio channel would keep a 32-slot block per socket).
pub struct Shared {
    queue: std::sync::Mutex<Queue>,
    /// At most this many frames queued (`server.outbound_queue`).
    cap: usize,
    /// At most this many payload bytes queued (`server.outbound_queue_bytes`), except that an
    /// empty queue always takes one frame: a large `presence_state` is never refused by itself.
    cap_bytes: usize,
    /// 0 = open; a close code; [`ABORT`] = stop without a close frame (the peer is gone).
    code: AtomicU32,
    /// When the socket is closed as idle (`server.idle_timeout_ms`): milliseconds on the
    /// session's clock (`session::idle`), set by the reader after each frame; 0 = not set.
    idle_deadline: AtomicU64,
    metrics: crate::metrics::Metrics,
    /// The socket negotiated permessage-deflate: large payloads go out compressed.
    deflate: bool,
}

const ABORT: u32 = u32::MAX;
/// Marks the echo of a client's close: the client is leaving and may read nothing more, so its
/// queue is dropped and the session ends at once (DESIGN §14: every close ends within 1 s).
const ECHO: u32 = 1 << 16;
/// The client closed without a status code; the echo carries none either.
pub(crate) const NO_STATUS: u16 = 1005;

/// The sending side of a socket; cloned into every room the socket is a member of.
#[derive(Clone)]
pub struct Outbox(Arc<Shared>);

/// The bounds of a socket's queue: frames and bytes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub frames: usize,
    pub bytes: usize,
}

impl Limits {
    /// A bound in frames only (tests).
    #[cfg(test)]
    pub(crate) const fn frames(frames: usize) -> Limits {
        Limits {
            frames,
            bytes: usize::MAX,
        }
    }
}

impl Outbox {
    pub fn new(limits: Limits, metrics: crate::metrics::Metrics) -> Self {
        Outbox(Arc::new(Shared {
            queue: std::sync::Mutex::new(Queue::default()),
            cap: limits.frames,
            cap_bytes: limits.bytes,
            code: AtomicU32::new(0),
            idle_deadline: AtomicU64::new(0),
            metrics,
            deflate: false,
        }))
    }

    /// The same outbox, for a socket that negotiated permessage-deflate (before it is shared).
    pub fn deflating(mut self, on: bool) -> Self {
        if let Some(s) = Arc::get_mut(&mut self.0) {
            s.deflate = on;
        }
        self
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a text frame. A full queue closes the socket as a slow consumer; a closing socket
    /// takes nothing more. Returns whether the frame was queued.
    pub fn send(&self, frame: Bytes) -> bool {
        self.push(Out::Text(frame))
    }

    /// Queues the text frame `head ++ payload ++ "]"` (see [`crate::protocol::push_head`]).
    pub fn send_wrapped(&self, head: Bytes, payload: Bytes) -> bool {
        self.push(Out::Wrapped(head, payload))
    }

    /// A frame sent to a socket with no writer task (the queue empty, the socket here) goes to
    /// the kernel in the sender's own call: a room's fan-out costs one non-blocking write per
    /// member and no task wake-up. What the kernel does not take is queued (as the frame's
    /// remaining bytes) for a writer task, which is spawned only then. Order holds: a direct
    /// write happens only while nothing is queued and no writer runs, under the queue's lock.
    fn push(&self, out: Out) -> bool {
        if self.code() != 0 {
            return false;
        }
        let out = if self.0.deflate { out.deflated() } else { out };
        let len = out.len();
        let mut q = self.queue();
        // under a cork the frame is queued without waking the writer: the cork writes it
        let corked = q.sock.is_some() && cork::corked(self, q.frames.is_empty());
        if !corked
            && q.frames.is_empty()
            && let Some(sock) = q.sock.as_ref()
        {
            match write_now(sock, std::iter::once(&out)) {
                Ok(None) => return true,
                Ok(Some(rest)) => {
                    q.put_back(rest);
                    self.spawn_writer(&mut q);
                    return true;
                }
                Err(_) => {
                    drop(q);
                    self.abort();
                    return false;
                }
            }
        }
        let full = q.frames.len() >= self.0.cap
            || (!q.frames.is_empty() && q.bytes + len > self.0.cap_bytes);
        if full {
            drop(q);
            if self.code() == 0 {
                self.0.metrics.slow_consumer();
            }
            self.close(close::SLOW_CONSUMER);
            return false;
        }
        q.frames.push_back(out);
        q.bytes += len;
        if !corked {
            self.spawn_writer(&mut q);
        }
        true
    }

    /// Hands the socket to the outbox when the session starts. Frames queued before (or a close)
    /// get a writer at once; otherwise senders write directly until the kernel pushes back.
    pub fn attach(&self, w: OwnedWriteHalf, write_timeout: Duration) {
        let mut q = self.queue();
        q.write_timeout_ms = u32::try_from(write_timeout.as_millis()).unwrap_or(u32::MAX);
        q.sock = Some(w);
        if !q.frames.is_empty() || self.code() != 0 {
            self.spawn_writer(&mut q);
        }
    }

    /// Gives the socket to a new writer task, unless one runs already (it sees what was queued
    /// before it hands the socket back) or there is no socket (not attached yet, or ended).
    fn spawn_writer(&self, q: &mut Queue) {
        if let Some(w) = q.sock.take() {
            let limit = Duration::from_millis(u64::from(q.write_timeout_ms));
            tokio::spawn(write_task(self.clone(), w, limit));
        }
    }

    /// Asks the writer to send what is queued, then a close frame with `code`, and stop (4008
    /// drops the queue). The first request wins. Code 0 (which no peer may send, and which would
    /// read as "open") is taken as 1002, so no close request can ever be lost.
    pub fn close(&self, code: u16) {
        let code = if code == 0 { 1002 } else { code };
        self.set_code(u32::from(code));
    }

    /// Answers a client's close frame with `code` (NO_STATUS: an empty close). What is still
    /// queued is dropped: the client asked to go. The first request wins.
    pub fn echo_close(&self, code: u16) {
        self.set_code(ECHO | u32::from(code));
    }

    /// Stops the writer without a close frame (the peer is gone).
    pub fn abort(&self) {
        self.set_code(ABORT);
    }

    fn set_code(&self, code: u32) {
        if self
            .0
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let mut q = self.queue();
            self.spawn_writer(&mut q);
            let reader = q.reader.take();
            drop(q);
            if let Some(r) = reader {
                r.wake();
            }
        }
    }

    /// For the session's reader: ready once a close is asked for (by anyone: the reader itself,
    /// the writer, a drain, the idle sweep, an expired token); until then the reader's waker is
    /// kept, and [`Outbox::set_code`] wakes it.
    pub(crate) fn poll_closing(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.code() != 0 {
            return Poll::Ready(());
        }
        let mut q = self.queue();
        if !q.reader.as_ref().is_some_and(|r| r.will_wake(cx.waker())) {
            q.reader = Some(cx.waker().clone());
        }
        drop(q);
        // a close asked for before the waker was kept may not have seen it
        if self.code() != 0 {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Waits until the writer has ended: the close frame is out (or the peer is gone) and the
    /// socket's write side is closed. Only after a close was asked for.
    pub(crate) async fn ended(&self) {
        std::future::poll_fn(|cx| {
            let mut q = self.queue();
            if q.ended {
                return Poll::Ready(());
            }
            q.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// The writer task ended for good: the socket is dropped with it, the reader is woken.
    fn finish(&self) {
        let mut q = self.queue();
        q.ended = true;
        let reader = q.reader.take();
        drop(q);
        if let Some(r) = reader {
            r.wake();
        }
    }

    /// The socket is closed as idle once `server.idle_timeout_ms` passes with nothing read:
    /// the reader sets the deadline after each frame, the node's idle sweep reads it.
    pub(crate) fn set_idle_deadline(&self, ms: u64) {
        self.0.idle_deadline.store(ms.max(1), Ordering::Relaxed);
    }

    /// Whether the idle deadline is set and passed at `now_ms`.
    pub(crate) fn idle_past(&self, now_ms: u64) -> bool {
        let d = self.0.idle_deadline.load(Ordering::Relaxed);
        d != 0 && d <= now_ms
    }

    /// 0 while open; else the close requested.
    pub(crate) fn code(&self) -> u32 {
        self.0.code.load(Ordering::Acquire)
    }

    /// Takes as many queued frames as `into` holds; a drained queue gives back its storage.
    fn take_into(&self, into: &mut [Option<Out>]) -> usize {
        let mut q = self.queue();
        let k = q.frames.len().min(into.len());
        let mut taken = 0;
        for (slot, m) in into.iter_mut().zip(q.frames.drain(..k)) {
            taken += m.len();
            *slot = Some(m);
        }
        q.bytes -= taken;
        if q.frames.is_empty() {
            q.frames = VecDeque::new();
        }
        k
    }

    /// For a close that drops the queue: drops it, except the rest of a frame a direct write
    /// began, which must be finished before a close frame can follow it on the wire.
    fn drop_queue(&self) {
        let mut q = self.queue();
        let started = q
            .frames
            .iter()
            .take_while(|m| matches!(m, Out::Raw(_)))
            .count();
        q.frames.truncate(started);
        q.bytes = q.frames.iter().map(Out::len).sum();
    }

    /// A drained writer hands the socket back to direct writes and ends; it keeps the socket when
    /// frames were queued meanwhile or a close was asked for (it must send those first).
    fn hand_back(&self, w: OwnedWriteHalf) -> Result<(), OwnedWriteHalf> {
        let mut q = self.queue();
        if !q.frames.is_empty() || self.code() != 0 {
            return Err(w);
        }
        q.sock = Some(w);
        Ok(())
    }

    /// Writes what a cork queued for this idle socket, several frames in one write; spawns a
    /// writer for whatever the kernel does not take. While a writer task runs, it sends them.
    fn uncork(&self) {
        let mut guard = self.queue();
        let q = &mut *guard;
        if q.frames.is_empty() {
            return;
        }
        let Some(sock) = q.sock.as_ref() else {
            return;
        };
        let n = q.frames.len().min(BATCH);
        let written = write_now(sock, q.frames.iter().take(n));
        match written {
            Ok(rest) => {
                for m in q.frames.drain(..n) {
                    q.bytes -= m.len();
                }
                if let Some(rest) = rest {
                    q.put_back(rest);
                }
                if q.frames.is_empty() {
                    // nothing kept for an idle socket: the storage was made and is freed here,
                    // on the same thread
                    q.frames = VecDeque::new();
                    return;
                }
                self.spawn_writer(q);
            }
            Err(_) => {
                drop(guard);
                self.abort();
            }
        }
    }
}

impl Outbox {
    /// Queues a reply whose fate the caller does not need.
    pub fn send_unit(&self, frame: Bytes) {
        self.send(frame);
    }

    /// Queues the pong a client's ping obliges.
    pub(crate) fn pong(&self, payload: Bytes) {
        self.push(Out::Pong(payload));
    }

    /// The close code the socket ended with: 1006 when it ended without a close frame.
    pub(crate) fn closed_code(&self) -> u16 {
        match self.code() {
            ABORT | 0 => 1006,
            c => (c & !ECHO) as u16,
        }
    }
}

/// A writer task: drains the queue, then either hands the socket back (nothing more to write)
/// or, once a close was asked for, ends the socket and wakes the reader.
async fn write_task(out: Outbox, w: OwnedWriteHalf, write_timeout: Duration) {
    if let Written::Ended = write_loop(&out, w, write_timeout).await {
        // the socket was dropped with the loop: closed, whoever still holds the outbox
        out.finish();
    }
}

enum Written {
    /// Drained: the socket went back to direct writes.
    HandedBack,
    /// The close frame is out, or the peer is gone: the socket is closed.
    Ended,
}

/// The single writer: drains the queue and sends the close frame last. Once a close is asked
/// for, what was queued before it still goes out first, unless the close is 4008 (the queue is
/// the problem) or an abort (nobody to write to).
///
/// A batch is first handed to the kernel without waiting (`writev` over the frames' own bytes:
/// headers built on the stack, shared bodies not copied), which takes it whole unless the client
/// reads slowly. Only then is the rest copied and awaited, under `server.write_timeout`. So an
/// idle socket holds no write buffer, and a delivery costs no allocation or timer here.
///
/// When there is nothing to write and no close asked for, it hands the socket back to
/// [`Outbox::push`] (direct writes) and ends; the next frame the kernel does not take, or a
/// close, spawns a new one.
async fn write_loop(out: &Outbox, mut w: OwnedWriteHalf, write_timeout: Duration) -> Written {
    loop {
        loop {
            let code = out.code();
            if code == ABORT {
                return Written::Ended;
            }
            if drops_queue(code) {
                out.drop_queue();
            }
            let rest = match flush_now(out, &w) {
                Ok(Flushed::Empty) => break,
                Ok(Flushed::All) => continue,
                Ok(Flushed::Rest(rest)) => rest,
                Err(_) => {
                    out.abort();
                    return Written::Ended;
                }
            };
            // a peer that does not read for write_timeout is dropped: the writer never hangs
            match Box::pin(tokio::time::timeout(
                write_timeout,
                write_rest(&mut w, &rest),
            ))
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    out.abort();
                    return Written::Ended;
                }
                Err(_) => {
                    out.0.metrics.slow_consumer();
                    out.abort();
                    return Written::Ended;
                }
            }
        }
        match out.code() {
            0 => match out.hand_back(w) {
                Ok(()) => return Written::HandedBack,
                Err(sock) => w = sock,
            },
            ABORT => return Written::Ended,
            code => {
                let code = (code & !ECHO) as u16;
                let mut frame = vec![0x88u8];
                if code == NO_STATUS {
                    frame.push(0);
                } else {
                    frame.push(2);
                    frame.extend_from_slice(&code.to_be_bytes());
                }
                let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = w.write_all(&frame).await;
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                }))
                .await;
                return Written::Ended;
            }
        }
    }
}

/// Closes that leave the queue unsent: the peer is gone, the queue is the problem (4008), or the
/// client closed (its echo goes out at once).
fn drops_queue(code: u32) -> bool {
    code == ABORT || code == u32::from(close::SLOW_CONSUMER) || (code & ECHO != 0)
}

enum Flushed {
    /// Nothing was queued.
    Empty,
    /// The kernel took every frame taken from the queue.
    All,
    /// What it did not take, to be written before anything else.
    Rest(Vec<Bytes>),
}

/// Takes up to [`BATCH`] frames from the queue and writes what the kernel takes of them without
/// waiting. The frames live on this function's stack only, never in the writer's state.
fn flush_now(out: &Outbox, w: &OwnedWriteHalf) -> std::io::Result<Flushed> {
    let mut batch: [Option<Out>; BATCH] = Default::default();
    let n = out.take_into(&mut batch);
    if n == 0 {
        return Ok(Flushed::Empty);
    }
    Ok(match write_now(w, batch[..n].iter().flatten())? {
        None => Flushed::All,
        Some(rest) => Flushed::Rest(rest),
    })
}

#[cfg(test)]
mod tests;
