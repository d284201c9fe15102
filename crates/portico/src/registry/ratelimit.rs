//! Per-source reply rate limiting for the Tower's UDP side, as DNS servers'
//! response rate limiting: a UDP source address can be forged, so without a
//! limit anyone could aim the Tower's replies at a victim. Each source
//! (an IPv4 address, or an IPv6 /64, which one host usually owns) has a
//! token bucket of `rate` replies a second and a burst of as many; a
//! datagram from a source with no token left is handled but not answered:
//! a forged flood in a workload's name must not make its heartbeats
//! expire. Loopback senders are
//! exempt by default: their replies cannot leave the host. Pure: the caller
//! passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::admit::Cidr;

/// Sources tracked at once. Past this, buckets that have refilled (idle
/// sources) are dropped; if none has, new sources share one bucket, so a
/// spray of forged addresses cannot grow memory or escape the limit.
const MAX_SOURCES: usize = 16_384;
/// The least time between two sweeps of a full table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ReplyLimit {
    /// Replies a second per source; 0 turns limiting off.
    pub rate: u32,
    /// Sources never limited.
    pub exempt: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    /// Refill for the time passed, then take a token if there is one.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + passed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refilled(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + passed * rate >= burst
    }
}

#[derive(Debug)]
pub struct ReplyLimiter {
    limit: ReplyLimit,
    max_sources: usize,
    buckets: HashMap<u128, Bucket>,
    /// Shared by new sources while the table is full.
    overflow: Option<Bucket>,
    last_sweep: Option<Instant>,
}

/// The bucket a source address counts against.
fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        // The top bit marks IPv6 keys, so that they never meet IPv4 ones.
        IpAddr::V6(v6) => (u128::from(v6) >> 64) | (1 << 127),
    }
}

impl ReplyLimiter {
    pub fn new(limit: ReplyLimit) -> Self {
        Self::with_capacity(limit, MAX_SOURCES)
    }

    fn with_capacity(limit: ReplyLimit, max_sources: usize) -> Self {
        Self {
            limit,
            max_sources,
            buckets: HashMap::new(),
            overflow: None,
            last_sweep: None,
        }
    }

    /// Whether a datagram from `from` may be answered now.
    pub fn allow(&mut self, from: IpAddr, now: Instant) -> bool {
        if self.limit.rate == 0 || self.limit.exempt.iter().any(|c| c.contains(from)) {
            return true;
        }
        let rate = f64::from(self.limit.rate);
        let burst = rate;
        let key = source_key(from);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.take(rate, burst, now);
        }
        if self.buckets.len() >= self.max_sources {
            self.sweep(rate, burst, now);
        }
        if self.buckets.len() >= self.max_sources {
            return self
                .overflow
                .get_or_insert_with(|| Bucket::full(burst, now))
                .take(rate, burst, now);
        }
        let mut bucket = Bucket::full(burst, now);
        let allowed = bucket.take(rate, burst, now);
        self.buckets.insert(key, bucket);
        allowed
    }

    /// Forget sources whose bucket has refilled: a new bucket is the same.
    fn sweep(&mut self, rate: f64, burst: f64, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.buckets.retain(|_, b| !b.refilled(rate, burst, now));
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limiter(rate: u32, exempt: &[&str]) -> ReplyLimiter {
        ReplyLimiter::new(ReplyLimit {
            rate,
            exempt: exempt.iter().map(|c| c.parse().unwrap()).collect(),
        })
    }

    fn allowed(l: &mut ReplyLimiter, from: &str, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| l.allow(ip(from), now)).count()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut l = limiter(100, &[]);
        let now = Instant::now();
        assert_eq!(allowed(&mut l, "10.0.0.1", 1000, now), 100);
        // Another source has its own bucket.
        assert_eq!(allowed(&mut l, "10.0.0.2", 1000, now), 100);
        // A tenth of a second later: ten more.
        let later = now + Duration::from_millis(100);
        assert_eq!(allowed(&mut l, "10.0.0.1", 1000, later), 10);
        // Never more than the burst, however long the pause.
        let much_later = now + Duration::from_secs(3600);
        assert_eq!(allowed(&mut l, "10.0.0.1", 1000, much_later), 100);
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let mut l = limiter(10, &[]);
        let now = Instant::now();
        assert_eq!(allowed(&mut l, "2001:db8::1", 6, now), 6);
        assert_eq!(allowed(&mut l, "2001:db8::ffff:2", 6, now), 4);
        assert_eq!(allowed(&mut l, "2001:db8:0:1::1", 20, now), 10);
        assert_eq!(allowed(&mut l, "10.0.0.1", 6, now), 6);
        assert_eq!(allowed(&mut l, "::ffff:10.0.0.1", 6, now), 4);
    }

    #[test]
    fn exempt_sources_and_rate_zero_are_never_limited() {
        let now = Instant::now();
        let mut l = limiter(5, &["127.0.0.0/8", "::1"]);
        assert_eq!(allowed(&mut l, "127.0.0.2", 1000, now), 1000);
        assert_eq!(allowed(&mut l, "::1", 1000, now), 1000);
        assert_eq!(allowed(&mut l, "10.0.0.1", 1000, now), 5);
        let mut off = limiter(0, &[]);
        assert_eq!(allowed(&mut off, "10.0.0.1", 1000, now), 1000);
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn forged_source_sprays_stay_bounded_and_limited() {
        let mut l = ReplyLimiter::with_capacity(
            ReplyLimit {
                rate: 10,
                exempt: vec![],
            },
            100,
        );
        let now = Instant::now();
        let spray = |l: &mut ReplyLimiter, first: u32, at: Instant| {
            (first..first + 10_000)
                .filter(|i| l.allow(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), at))
                .count()
        };
        // 100 sources get their token; the other 9,900 share one bucket.
        assert_eq!(spray(&mut l, 0, now), 100 + 10);
        assert_eq!(l.tracked(), 100);
        // Once the tracked sources have refilled, they make room for others.
        let later = now + Duration::from_secs(2);
        assert_eq!(spray(&mut l, 10_000, later), 100 + 10);
        assert_eq!(l.tracked(), 100);
    }
}
