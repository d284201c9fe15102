//! The retry pause of the loops that keep a connection to a peer (the
//! Tower's watch, etcd's watch, the etcd writer): doubling from a first
//! pause up to a ceiling, back to the first once the peer answers, and cut
//! short by shutdown.

use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The peer answered: the next failure pauses from the start again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Pause before the next try; false when shutdown was asked meanwhile.
    pub async fn pause(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.wait_for(|s| *s) => false,
        }
    }
}
