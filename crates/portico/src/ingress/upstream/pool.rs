//! Keep-alive connections to backends, per replica: one `IdleSet` for each
//! HTTP/1.1 client (ours and hyper's), the HTTP/2 connection of each
//! replica, and the TCP connect they all start with. The idle sets take the
//! time as an argument, so their expiry is tested without waiting.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::h2c::H2Sender;
use super::hyper_h1::HyperConn;
use crate::ingress::conn::coarse_ms;
use crate::ingress::error::UpstreamError;
use crate::ingress::h1::client as h1;
use crate::worker::PerWorker;

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle_per_backend: usize,
    pub idle_timeout: Duration,
    /// Worker threads: each has its own share of the idle connections.
    pub workers: usize,
}

/// A connection that can wait in an `IdleSet`.
pub trait Pooled {
    fn addr(&self) -> SocketAddr;
    /// Whether it can take a request: the backend neither closed it nor
    /// sent anything unasked. Cheap: no system call unless the socket
    /// became readable while it idled.
    fn is_fit(&mut self) -> bool;
}

/// Keyed by backend address and looked up twice per request (checkout and
/// return), so the hash is a fast one; foldhash is seeded per process, so
/// colliding keys (registered addresses) cannot be worked out in advance.
type ByBackend<T> = foldhash::HashMap<SocketAddr, T>;

struct Idle<C> {
    conn: C,
    /// When it was parked, in ms on the coarse clock.
    since_ms: u64,
}

/// One worker's idle connections of a kind, by replica, newest last.
type Share<C> = Mutex<ByBackend<Vec<Idle<C>>>>;

/// The idle connections of one client kind, newest first out, in one share
/// per worker thread (`crate::worker`): a worker reuses only the
/// connections it opened. Each share keeps up to the limit, as each nginx
/// worker keeps its own `keepalive` connections: a worker that carries more
/// of the clients needs more of them.
pub struct IdleSet<C> {
    shares: PerWorker<Share<C>>,
    max_per_backend: usize,
    idle_ms: u64,
}

impl<C: Pooled> IdleSet<C> {
    pub fn new(max_per_backend: usize, idle_timeout: Duration, workers: usize) -> Self {
        Self {
            shares: PerWorker::new(workers, Mutex::default),
            max_per_backend,
            idle_ms: idle_timeout.as_millis() as u64,
        }
    }

    /// The calling worker's share.
    fn lock(&self) -> MutexGuard<'_, ByBackend<Vec<Idle<C>>>> {
        self.shares.lock_mine()
    }

    fn expired(&self, idle: &Idle<C>, now_ms: u64) -> bool {
        now_ms.saturating_sub(idle.since_ms) >= self.idle_ms
    }

    /// A connection to `addr` that has not idled too long and is fit;
    /// the others met on the way are dropped.
    pub fn checkout(&self, addr: SocketAddr, now_ms: u64) -> Option<C> {
        loop {
            let mut idle = self.lock().get_mut(&addr).and_then(Vec::pop)?;
            if !self.expired(&idle, now_ms) && idle.conn.is_fit() {
                return Some(idle.conn);
            }
        }
    }

    /// Keep `conn` unless its replica already has as many idle as allowed.
    pub fn park(&self, conn: C, now_ms: u64) {
        let mut conns = self.lock();
        let parked = conns.entry(conn.addr()).or_default();
        if parked.len() < self.max_per_backend {
            parked.push(Idle {
                conn,
                since_ms: now_ms,
            });
        }
    }

    /// Drop connections that closed or idled too long, and empty entries.
    pub fn sweep(&self, now_ms: u64) {
        for mut share in self.shares.lock_each() {
            share.retain(|_, conns| {
                conns.retain_mut(|c| {
                    now_ms.saturating_sub(c.since_ms) < self.idle_ms && c.conn.is_fit()
                });
                !conns.is_empty()
            });
        }
    }

    pub(super) fn len(&self) -> usize {
        self.shares
            .lock_each()
            .map(|share| share.values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

pub struct Pool {
    pub(super) settings: PoolSettings,
    /// Connections opened, for the metrics.
    opened: Counter,
    pub(super) h1: IdleSet<h1::Connection>,
    pub(super) hyper_h1: IdleSet<HyperConn>,
    /// Each worker's HTTP/2 connection to each replica, driven on it.
    pub(super) h2: PerWorker<Mutex<ByBackend<H2Sender>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, opened: Counter) -> Arc<Self> {
        let (max, idle) = (settings.max_idle_per_backend, settings.idle_timeout);
        Arc::new(Self {
            settings,
            opened,
            h1: IdleSet::new(max, idle, settings.workers),
            hyper_h1: IdleSet::new(max, idle, settings.workers),
            h2: PerWorker::new(settings.workers, Mutex::default),
        })
    }

    /// A new TCP connection to `addr`, within the connect timeout.
    pub(super) async fn tcp(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout(timeout)),
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Ok(Ok(s)) => s,
        };
        // Small requests and responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        self.opened.inc();
        Ok(stream)
    }

    /// The calling worker's HTTP/2 connections.
    pub(super) fn h2_senders(&self) -> MutexGuard<'_, ByBackend<H2Sender>> {
        self.h2.lock_mine()
    }

    /// Drop connections that closed or idled too long.
    pub fn sweep(&self) {
        for mut share in self.h2.lock_each() {
            share.retain(|_, s| !s.is_closed());
        }
        let now = coarse_ms();
        self.h1.sweep(now);
        self.hyper_h1.sweep(now);
    }

    /// Idle connections held, for tests and metrics.
    pub fn idle_count(&self) -> usize {
        self.h1.len() + self.hyper_h1.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Fake {
        addr: SocketAddr,
        fit: bool,
        id: u32,
    }

    impl Pooled for Fake {
        fn addr(&self) -> SocketAddr {
            self.addr
        }
        fn is_fit(&mut self) -> bool {
            self.fit
        }
    }

    fn fake(id: u32, fit: bool) -> Fake {
        Fake {
            addr: "127.0.0.1:1".parse().unwrap(),
            fit,
            id,
        }
    }

    #[test]
    fn a_connection_idle_past_the_timeout_is_not_handed_out() {
        let set = IdleSet::new(4, Duration::from_millis(100), 1);
        let addr = fake(0, true).addr;
        set.park(fake(1, true), 1_000);
        assert!(set.checkout(addr, 1_100).is_none(), "100 ms idle: expired");
        set.park(fake(2, true), 1_000);
        assert_eq!(set.checkout(addr, 1_099).map(|c| c.id), Some(2));
    }

    #[test]
    fn the_newest_fit_connection_comes_out_and_unfit_ones_go() {
        let set = IdleSet::new(4, Duration::from_secs(10), 1);
        let addr = fake(0, true).addr;
        set.park(fake(1, true), 0);
        set.park(fake(2, false), 1);
        assert_eq!(set.checkout(addr, 2).map(|c| c.id), Some(1));
        assert_eq!(set.len(), 0, "the unfit one was dropped on the way");
    }

    #[test]
    fn parking_stops_at_the_limit_per_replica() {
        let set = IdleSet::new(2, Duration::from_secs(10), 1);
        for id in 0..3 {
            set.park(fake(id, true), 0);
        }
        assert_eq!(set.len(), 2);
    }

    #[tokio::test]
    async fn a_worker_takes_only_the_connections_it_parked() {
        let set = Arc::new(IdleSet::new(4, Duration::from_secs(10), 2));
        let addr = fake(0, true).addr;
        for id in 1..=3 {
            set.park(fake(id, true), 0);
        }
        assert_eq!(set.len(), 3, "the limit is each worker's");
        let workers = crate::ingress::workers::start(2);
        assert_eq!(workers.len(), 2);
        let other = set.clone();
        let taken = workers[1]
            .spawn(async move { other.checkout(addr, 1).map(|c| c.id) })
            .await
            .unwrap();
        assert_eq!(taken, None, "worker 1 parked none");
        assert_eq!(set.checkout(addr, 1).map(|c| c.id), Some(3));
    }

    #[test]
    fn sweep_drops_expired_and_unfit() {
        let set = IdleSet::new(8, Duration::from_millis(50), 1);
        set.park(fake(1, true), 0);
        set.park(fake(2, true), 40);
        set.park(fake(3, false), 40);
        set.sweep(60);
        assert_eq!(set.len(), 1, "only the fit one parked at 40 is left");
        set.sweep(90);
        assert_eq!(set.len(), 0);
    }
}
