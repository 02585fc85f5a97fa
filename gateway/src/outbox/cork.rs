//! Corking: while a [`Cork`] is held on a thread, frames sent there to sockets whose writer is
//! idle are queued instead of written at once, and dropping the cork writes each socket's frames
//! in one `writev` ([`Outbox::uncork`]).

use std::cell::RefCell;

use super::Outbox;

thread_local! {
    /// The sockets a cork on this thread queued frames for, in order; `None` when not corked.
    static CORKED: RefCell<Option<Vec<Outbox>>> = const { RefCell::new(None) };
}

/// Whether a cork is held on this thread; if so and `first` (the socket's queue was empty), the
/// socket is remembered for the cork's write.
pub(super) fn corked(out: &Outbox, first: bool) -> bool {
    CORKED.with(|c| match c.borrow_mut().as_mut() {
        Some(list) => {
            if first {
                list.push(out.clone());
            }
            true
        }
        None => false,
    })
}

/// While held, frames sent on this thread to idle sockets are queued instead of written at once,
/// and dropping it writes each socket's frames in one `writev`. The subscriber holds one over a
/// burst of pub/sub messages that arrived together: when messages come faster than they are
/// written, each member then gets them in one write instead of one write per message (what
/// uWebSockets calls corking). Nested corks are one.
pub struct Cork {
    outer: bool,
    /// Held on one thread only (never across an `.await`): the list is the thread's.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Cork {
    pub fn new() -> Cork {
        let outer = CORKED.with(|c| {
            let mut c = c.borrow_mut();
            let outer = c.is_none();
            if outer {
                *c = Some(Vec::new());
            }
            outer
        });
        Cork {
            outer,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Default for Cork {
    fn default() -> Self {
        Cork::new()
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let list = CORKED.with(|c| c.borrow_mut().take()).unwrap_or_default();
        for out in list {
            out.uncork();
        }
    }
}
