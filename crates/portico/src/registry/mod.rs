//! The Tower: the registry table, its UDP and HTTP servers, signed writes,
//! and a client.

pub mod auth;
pub mod client;
pub mod http;
pub mod table;
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portico_wire::{Envelope, ErrorReply, Reply, Request, ServiceName};
use tokio::sync::watch;

use auth::{Key, Verifier};
pub use table::{Limits, Table};

/// The registry every transport of a Tower goes through: the table, the
/// signature check for writes, and the revision watchers wait on. Locks are
/// held only for the table's pure operations, never across I/O.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Mutex<Table>,
    verifier: Mutex<Verifier>,
    revision: watch::Sender<u64>,
    started: Instant,
    /// Random per process: an index from another run of the Tower is never
    /// mistaken for one of ours.
    epoch: u64,
    warm_announced: AtomicBool,
    pub(crate) counters: Counters,
}

/// What the Tower counts, for its /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// By command: REGISTER, LOOKUP, DEREGISTER, LIST, PING.
    pub requests: [AtomicU64; 5],
    /// Malformed requests and refused writes.
    pub errors: AtomicU64,
    pub unauthorized: AtomicU64,
    pub expiries: AtomicU64,
}

pub const COMMANDS: [&str; 5] = ["REGISTER", "LOOKUP", "DEREGISTER", "LIST", "PING"];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every method finishes its writes before it could panic, so a poisoned
    // lock still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Unix time in milliseconds, read at the edge.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A consistent view of every live endpoint.
#[derive(Debug, Clone)]
pub struct View {
    pub index: u64,
    pub epoch: u64,
    /// False during the first TTL after start, while workloads have not all
    /// heartbeated to this Tower yet: what it lacks may still exist.
    pub warm: bool,
    pub endpoints: Vec<(ServiceName, SocketAddr, Duration)>,
}

impl Registry {
    pub fn new(limits: Limits, key: Option<Key>) -> Self {
        let (revision, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::new(limits)),
                verifier: Mutex::new(Verifier::new(key)),
                revision,
                started: Instant::now(),
                epoch: fastrand::u64(..),
                warm_announced: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        lock(&self.inner.table).limits()
    }

    /// Answer one request from any transport. `signed` is the span of the
    /// original bytes that a signature covers.
    pub fn handle(&self, envelope: Envelope, signed: &[u8], now: Instant, now_ms: u64) -> Reply {
        let c = &self.inner.counters;
        let (command, write) = match envelope.request {
            Request::Register(_) => (0, true),
            Request::Lookup(_) => (1, false),
            Request::Deregister(_) => (2, true),
            Request::List => (3, false),
            Request::Ping => (4, false),
        };
        c.requests[command].fetch_add(1, Ordering::Relaxed);
        if write {
            let checked = lock(&self.inner.verifier).check(envelope.signature, signed, now_ms);
            if let Err(e) = checked {
                c.unauthorized.fetch_add(1, Ordering::Relaxed);
                return Reply::Error(ErrorReply::Unauthorized(e.to_string()));
            }
        }
        let mut table = lock(&self.inner.table);
        let reply = table.handle(envelope.request, now);
        let revision = table.revision();
        drop(table);
        self.publish(revision);
        reply
    }

    /// The next replica of `name` by the Tower's round robin.
    pub fn lookup(&self, name: &ServiceName, now: Instant) -> Option<SocketAddr> {
        lock(&self.inner.table).lookup(name, now)
    }

    pub fn view(&self, now: Instant) -> View {
        let table = lock(&self.inner.table);
        View {
            index: table.revision(),
            epoch: self.inner.epoch,
            warm: self.is_warm(now, table.limits().ttl),
            endpoints: table.endpoints(now),
        }
    }

    fn is_warm(&self, now: Instant, ttl: Duration) -> bool {
        now.duration_since(self.inner.started) >= ttl
    }

    /// Reap expired entries, and announce the end of the warm-up once.
    /// Returns how many entries went and when to reap next: the next
    /// expiry, so that watchers learn of it at once.
    pub fn reap(&self, now: Instant, period: Duration) -> (usize, Instant) {
        let mut table = lock(&self.inner.table);
        let reaped = table.reap(now);
        self.inner
            .counters
            .expiries
            .fetch_add(reaped as u64, Ordering::Relaxed);
        self.inner
            .counters
            .expiries
            .fetch_add(reaped as u64, Ordering::Relaxed);
        let ttl = table.limits().ttl;
        let warm = self.is_warm(now, ttl);
        if warm && !self.inner.warm_announced.swap(true, Ordering::Relaxed) {
            table.bump_revision();
        }
        let mut next = now + period;
        if let Some(expiry) = table.next_expiry() {
            next = next.min(expiry);
        }
        if !warm {
            next = next.min(self.inner.started + ttl);
        }
        let revision = table.revision();
        drop(table);
        self.publish(revision);
        (reaped, next)
    }

    /// A malformed request that never reached `handle`.
    pub fn count_malformed(&self) {
        self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Registrations held now.
    pub fn len(&self) -> usize {
        lock(&self.inner.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    fn publish(&self, revision: u64) {
        self.inner.revision.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
    }
}
