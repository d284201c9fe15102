//! Passive health: a replica that refuses or times out connections is set
//! aside for a back-off that doubles with each failure (100 ms up to 10 s)
//! and is cleared by the next success.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
struct SetAside {
    until: Instant,
    failures: u32,
}

#[derive(Debug, Default)]
pub struct PassiveHealth {
    set_aside: Mutex<HashMap<SocketAddr, SetAside>>,
    /// Entries in `set_aside`; lets the healthy common case skip the lock.
    count: AtomicUsize,
}

impl PassiveHealth {
    pub fn is_set_aside(&self, addr: SocketAddr, now: Instant) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let map = self.set_aside.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&addr).is_some_and(|s| s.until > now)
    }

    /// `is_set_aside` now. The clock is read only when something is set
    /// aside: on the request path it usually is not, and a clock read
    /// under the hypervisor costs tens of nanoseconds.
    pub fn is_set_aside_now(&self, addr: SocketAddr) -> bool {
        self.count.load(Ordering::Relaxed) != 0 && self.is_set_aside(addr, Instant::now())
    }

    pub fn record_failure(&self, addr: SocketAddr, now: Instant) {
        let mut map = self.set_aside.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            // Forget replicas that have been quiet for a whole back-off; the
            // map never outgrows what the registry itself can hold.
            map.retain(|_, s| s.until + MAX_BACKOFF > now);
        }
        let entry = map.entry(addr).or_insert(SetAside {
            until: now,
            failures: 0,
        });
        entry.failures = entry.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (entry.failures - 1).min(16))
            .min(MAX_BACKOFF);
        entry.until = now + backoff;
        self.count.store(map.len(), Ordering::Relaxed);
    }

    pub fn record_success(&self, addr: SocketAddr) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut map = self.set_aside.lock().unwrap_or_else(|p| p.into_inner());
        if map.remove(&addr).is_some() {
            self.count.store(map.len(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_success_clears() {
        let h = PassiveHealth::default();
        let a: SocketAddr = ([127, 0, 0, 1], 1).into();
        let t = Instant::now();
        assert!(!h.is_set_aside(a, t));
        h.record_failure(a, t);
        assert!(h.is_set_aside(a, t + Duration::from_millis(99)));
        assert!(!h.is_set_aside(a, t + Duration::from_millis(100)));
        h.record_failure(a, t);
        assert!(h.is_set_aside(a, t + Duration::from_millis(199)));
        for _ in 0..40 {
            h.record_failure(a, t);
        }
        assert!(h.is_set_aside(a, t + MAX_BACKOFF - Duration::from_millis(1)));
        assert!(!h.is_set_aside(a, t + MAX_BACKOFF));
        h.record_success(a);
        assert!(!h.is_set_aside(a, t));
    }
}
