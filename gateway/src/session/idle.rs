//! The idle timeout (`server.idle_timeout_ms`) without a timer per socket.
//!
//! Each socket's reader stores its deadline (the last frame's arrival plus the idle timeout, or
//! sooner while a fragmented message is unfinished) in its outbox, as milliseconds on one clock
//! (`ms`). One task per node sweeps the open sockets every twentieth of the idle timeout (at
//! most once a second) and closes those past their deadline with 4000. A socket is so closed at
//! most one sweep late (5 % of the timeout); an idle socket costs no timer entry and its task
//! nothing to wake (a tokio `Sleep` is 100 bytes in every idle socket's future).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::app::App;
use crate::protocol::close;

/// The clock's zero: the first time it is read (the node's start).
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// `at` in milliseconds since the clock's zero (at least 1: 0 means "no deadline").
pub fn ms(at: Instant) -> u64 {
    let zero = *EPOCH.get_or_init(Instant::now);
    let ms = at.saturating_duration_since(zero).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// How often the sweep runs for an idle timeout.
pub fn sweep_every(idle: Duration) -> Duration {
    (idle / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Closes the sockets whose idle deadline has passed, every [`sweep_every`], until the node
/// stops.
pub async fn sweep(app: Arc<App>) {
    ms(Instant::now()); // the clock starts with the node
    let mut tick = tokio::time::interval(sweep_every(app.cfg.server.idle_timeout()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for out in app.sessions.idle_past(ms(Instant::now())) {
            out.close(close::IDLE_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_is_a_twentieth_of_the_timeout_within_bounds() {
        assert_eq!(sweep_every(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(
            sweep_every(Duration::from_millis(1500)),
            Duration::from_millis(75)
        );
        assert_eq!(
            sweep_every(Duration::from_millis(50)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn the_clock_counts_milliseconds_and_never_reads_0() {
        ms(Instant::now()); // the clock has started
        let now = Instant::now() + Duration::from_millis(10);
        let a = ms(now);
        assert!(a >= 10);
        assert_eq!(ms(now + Duration::from_millis(1500)) - a, 1500);
        // the clock's zero itself still reads as a deadline, not as "none"
        let zero = *EPOCH.get().expect("started");
        assert_eq!(ms(zero), 1);
    }
}
