//! A socket's joined channels, found by topic.
//!
//! A short list, not a hash map: most sockets join one channel, and a `HashMap`'s smallest table
//! holds four entries (340 bytes with the topic keys, on every idle socket; BENCHMARKS.md). The
//! topic is the room's own (`Room::topic`), so no key string is kept either. At most
//! `server.max_channels_per_socket` entries, so a linear search is short.

use super::Channel;

#[derive(Default)]
pub(super) struct Channels(Vec<Channel>);

impl Channels {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains_key(&self, topic: &str) -> bool {
        self.get(topic).is_some()
    }

    pub fn get(&self, topic: &str) -> Option<&Channel> {
        self.0.iter().find(|c| c.room.topic() == topic)
    }

    pub fn remove(&mut self, topic: &str) -> Option<Channel> {
        let i = self.0.iter().position(|c| c.room.topic() == topic)?;
        let ch = self.0.swap_remove(i);
        if self.0.is_empty() {
            // a socket that left its channels holds no storage
            self.0 = Vec::new();
        }
        Some(ch)
    }

    /// Adds a channel; its topic is not joined (the caller removed an earlier one).
    pub fn insert(&mut self, ch: Channel) {
        debug_assert!(!self.contains_key(ch.room.topic()));
        // one slot more, not the four a `Vec`'s first push allocates
        self.0.reserve_exact(1);
        self.0.push(ch);
    }

    pub fn values(&self) -> impl Iterator<Item = &Channel> {
        self.0.iter()
    }

    pub fn take(&mut self) -> Vec<Channel> {
        std::mem::take(&mut self.0)
    }
}
