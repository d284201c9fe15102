//! How the ingress learns backends. Against a Tower, the default is a local
//! snapshot fed by the Tower's HTTP watch (`watch`), so a request costs no
//! registry round trip; against a Tower without an HTTP API, one UDP LOOKUP
//! per request, as the seed (`lookup`). `portico up` reads its embedded
//! table directly (`Local`). Passive health sits on top of all three.

pub mod active;
pub mod confirm;
pub mod etcd;
pub mod health;
pub mod snapshot;
pub mod stream;
pub mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use arc_swap::ArcSwap;
use portico_wire::{ErrorReply, Reply, Request, ServiceName};

use crate::registry::client::{TowerClient, TowerError};
use crate::registry::Registry;
use health::PassiveHealth;
use snapshot::{Balance, Load, Snapshot};

#[derive(Debug)]
pub enum Source {
    /// A Tower reached over the network.
    Tower(Arc<TowerSource>),
    /// The Tower's table in this same process (`portico up`).
    Local(Registry),
    /// etcd, watched directly.
    Etcd(Arc<etcd::EtcdSource>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Not yet known whether the Tower has an HTTP API: LOOKUP meanwhile.
    Probing = 0,
    Watch = 1,
    Lookup = 2,
}

/// A Tower over the network: its UDP client, its HTTP address, and the
/// snapshot the watch keeps current.
#[derive(Debug)]
pub struct TowerSource {
    pub udp: TowerClient,
    pub http_addr: SocketAddr,
    mode: AtomicU8,
    watched: Watched,
    /// LOOKUPs for services the snapshot lacks (read your writes).
    confirmations: confirm::Confirmations,
}

/// A snapshot kept current by a watch (of a Tower or of etcd), read by
/// requests without locks.
#[derive(Debug, Default)]
pub struct Watched {
    table: ArcSwap<Snapshot>,
    synced: AtomicBool,
    ever_synced: AtomicBool,
    /// Bumped on every snapshot swap; requests that ran out of replicas
    /// wait on `swapped` for a newer table.
    generation: AtomicU64,
    swapped: Notify,
    /// Unix ms of the last answer from the watch.
    last_update_ms: AtomicU64,
}

impl TowerSource {
    pub fn new(udp: TowerClient) -> Arc<Self> {
        let http_addr = udp.addr();
        Arc::new(Self {
            udp,
            http_addr,
            mode: AtomicU8::new(Mode::Probing as u8),
            watched: Watched::default(),
            confirmations: confirm::Confirmations::default(),
        })
    }

    pub fn watched(&self) -> &Watched {
        &self.watched
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            1 => Mode::Watch,
            2 => Mode::Lookup,
            _ => Mode::Probing,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// One LOOKUP of a service the snapshot lacks, under one
    /// `--tower-timeout`. A Tower that fails to answer leaves the table's
    /// word standing.
    async fn lookup_once(&self, service: &ServiceName) -> confirm::Answer {
        match self.udp.call_once(&Request::Lookup(service.clone())).await {
            Ok(Reply::Lookup(r)) => confirm::Answer::Found(r.addr),
            Ok(Reply::Error(ErrorReply::NotFound(_))) => confirm::Answer::Absent,
            Ok(other) => {
                tracing::debug!(%service, reply = ?other, "discovery: unexpected answer to a LOOKUP");
                confirm::Answer::Absent
            }
            Err(e) => {
                tracing::debug!(%service, error = %crate::error_chain::chain(&e), "discovery: no answer to a LOOKUP");
                confirm::Answer::Absent
            }
        }
    }
}

impl Watched {
    /// Whether the snapshot reflects its source now (the watch is connected).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    fn mark_synced(&self) {
        self.last_update_ms
            .store(crate::registry::unix_ms(), Ordering::Relaxed);
        self.synced.store(true, Ordering::Relaxed);
        self.ever_synced.store(true, Ordering::Relaxed);
    }

    fn set_unsynced(&self) {
        self.synced.store(false, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.table.load_full()
    }

    pub fn ever_synced(&self) -> bool {
        self.ever_synced.load(Ordering::Relaxed)
    }

    /// Swap in the snapshot for a new document and wake requests waiting
    /// for a newer table.
    pub fn install(&self, doc: &crate::services_doc::ServicesDoc) {
        let next = Snapshot::from_doc(doc, &self.table.load());
        tracing::debug!(
            index = doc.index,
            warm = doc.warm,
            endpoints = next.endpoint_count(),
            "discovery: new snapshot"
        );
        self.swap(next);
    }

    /// Swap in the snapshot after `changes` (now at `index`): the cost is
    /// that of the services they touch, not of the table.
    pub fn apply(&self, changes: &[crate::services_doc::Change], index: u64) {
        let next = self.table.load().apply(changes, index);
        tracing::debug!(
            index,
            changes = changes.len(),
            endpoints = next.endpoint_count(),
            "discovery: changes applied"
        );
        self.swap(next);
    }

    fn swap(&self, next: Snapshot) {
        self.table.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.swapped.notify_waiters();
        self.mark_synced();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No live replica is registered.
    #[error("service '{0}' has no live replica in the Tower")]
    NotFound(ServiceName),
    /// Every replica was already tried for this request.
    #[error("every replica of '{0}' was already tried")]
    Exhausted(ServiceName),
    #[error(transparent)]
    Tower(#[from] TowerError),
    #[error("the Tower answered LOOKUP with an error: {0}")]
    TowerRefused(ErrorReply),
    /// Watching etcd, before the first listing.
    #[error("the registrations in etcd have not been read yet (is etcd up?)")]
    NotSynced,
}

/// The replica to try, and its in-flight mark where the balance policy
/// keeps count.
#[derive(Debug)]
pub struct Picked {
    pub addr: SocketAddr,
    pub load: Option<Load>,
}

#[derive(Debug)]
pub struct Discovery {
    source: Source,
    health: PassiveHealth,
    active: active::ActiveHealth,
    balance: Balance,
}

impl Discovery {
    pub fn new(source: Source, balance: Balance) -> Arc<Self> {
        Arc::new(Self {
            source,
            health: PassiveHealth::default(),
            active: active::ActiveHealth::default(),
            balance,
        })
    }

    pub fn health(&self) -> &PassiveHealth {
        &self.health
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn active(&self) -> &active::ActiveHealth {
        &self.active
    }

    /// Whether a replica should get new requests: not set aside after failed
    /// connects, not failing its active health check.
    fn usable(&self, addr: SocketAddr) -> bool {
        !self.health.is_set_aside_now(addr) && !self.active.is_unhealthy(addr)
    }

    /// Every known endpoint, by service, for the admin side.
    pub async fn all_endpoints(&self) -> Vec<(ServiceName, SocketAddr, Option<usize>)> {
        match &self.source {
            Source::Local(registry) => registry
                .view(Instant::now())
                .endpoints
                .into_iter()
                .map(|(n, a, _)| (n, a, None))
                .collect(),
            _ if self.watched().is_some() => {
                let snap = self.watched().map(Watched::snapshot).unwrap_or_default();
                let mut out: Vec<_> = snap
                    .services()
                    .flat_map(|(name, set)| {
                        set.endpoints()
                            .iter()
                            .map(move |e| (name.clone(), e.addr, Some(e.in_flight())))
                    })
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
                out
            }
            // A Tower's UDP LIST may be cut to one datagram: its first entries.
            Source::Tower(t) => match t.udp.call(&Request::List).await.map(Reply::list_entries) {
                Ok(Some(entries)) => entries
                    .into_iter()
                    .map(|e| (e.name, e.addr, None))
                    .collect(),
                _ => Vec::new(),
            },
            Source::Etcd(_) => Vec::new(),
        }
    }

    /// The snapshot requests pick from, when the source keeps one and it
    /// has been filled once.
    fn watched(&self) -> Option<&Watched> {
        let w = match &self.source {
            Source::Tower(t) if t.mode() == Mode::Watch => &t.watched,
            Source::Etcd(e) => e.watched(),
            _ => return None,
        };
        w.ever_synced().then_some(w)
    }

    /// The snapshot holder of a watching source, filled or not.
    fn watched_any(&self) -> Option<&Watched> {
        match &self.source {
            Source::Tower(t) if t.mode() == Mode::Watch => Some(&t.watched),
            Source::Etcd(e) => Some(e.watched()),
            _ => None,
        }
    }

    /// Whether the ingress knows its endpoints now: the embedded table
    /// always; a watch while connected; LOOKUP while the Tower answers.
    pub async fn is_ready(&self) -> bool {
        match &self.source {
            Source::Local(_) => true,
            Source::Tower(t) => match t.mode() {
                Mode::Watch => t.watched.is_synced(),
                Mode::Lookup => matches!(t.udp.call(&Request::Ping).await, Ok(Reply::Pong)),
                Mode::Probing => false,
            },
            Source::Etcd(e) => e.watched().is_synced(),
        }
    }

    /// How the endpoints are learned, for the admin side.
    pub fn describe(&self) -> &'static str {
        match &self.source {
            Source::Local(_) => "embedded",
            Source::Tower(t) => match t.mode() {
                Mode::Watch => "watch",
                Mode::Lookup => "lookup",
                Mode::Probing => "probing",
            },
            Source::Etcd(_) => "etcd",
        }
    }

    /// Seconds since the table last heard from the Tower (watch mode).
    pub fn last_update_age(&self) -> Option<f64> {
        let at = self.watched_any()?.last_update_ms.load(Ordering::Relaxed);
        (at > 0).then(|| crate::registry::unix_ms().saturating_sub(at) as f64 / 1000.0)
    }

    /// Whether `addr` is set aside by passive health or failing its checks.
    pub fn endpoint_state(&self, addr: SocketAddr) -> &'static str {
        if self.active.is_unhealthy(addr) {
            "failing_checks"
        } else if self.health.is_set_aside_now(addr) {
            "set_aside"
        } else {
            "healthy"
        }
    }

    /// Every known endpoint of `service` (for active health checks).
    pub async fn endpoints(&self, service: &ServiceName) -> Vec<SocketAddr> {
        let from_list = |entries: Vec<(ServiceName, SocketAddr)>| {
            entries
                .into_iter()
                .filter(|(n, _)| n == service)
                .map(|(_, a)| a)
                .collect()
        };
        match &self.source {
            Source::Local(registry) => from_list(
                registry
                    .view(Instant::now())
                    .endpoints
                    .into_iter()
                    .map(|(n, a, _)| (n, a))
                    .collect(),
            ),
            _ if self.watched().is_some() => self
                .watched()
                .map(Watched::snapshot)
                .unwrap_or_default()
                .service(service)
                .map(|set| set.endpoints().iter().map(|e| e.addr).collect())
                .unwrap_or_default(),
            Source::Tower(t) => match t.udp.call(&Request::List).await.map(Reply::list_entries) {
                Ok(Some(entries)) => {
                    from_list(entries.into_iter().map(|e| (e.name, e.addr)).collect())
                }
                _ => Vec::new(),
            },
            Source::Etcd(_) => Vec::new(),
        }
    }

    /// The version of the endpoint table a pick is about to read (watch mode;
    /// 0 for the other sources, whose answers have no version).
    pub fn generation(&self) -> u64 {
        self.watched_any()
            .map_or(0, |w| w.generation.load(Ordering::Acquire))
    }

    /// Wait, at most `limit`, for a table newer than `seen`. True if one came.
    /// A request whose every replica failed uses this: replicas are often
    /// replaced faster than the news of it arrives (register new, then stop
    /// old), and a moment's wait beats an error.
    pub async fn newer_than(&self, seen: u64, limit: Duration) -> bool {
        let Some(t) = self.watched_any() else {
            return false;
        };
        let wait = async {
            loop {
                let notified = t.swapped.notified();
                if t.generation.load(Ordering::Acquire) != seen {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// The next replica to try, skipping those in `tried` and preferring ones
    /// not set aside by passive health.
    pub async fn pick(
        &self,
        service: &ServiceName,
        tried: &[SocketAddr],
    ) -> Result<Picked, DiscoveryError> {
        if let Some(w) = self.watched() {
            return match self.pick_from_snapshot(w, service, tried) {
                // Boxed, as below: most requests never get here.
                Err(DiscoveryError::NotFound(_)) => {
                    Box::pin(self.pick_unlisted(service, tried)).await
                }
                picked => picked,
            };
        }
        // Until a Tower's watch has answered once there is no table to
        // trust; asking the Tower per request bridges that moment. etcd has
        // no per-request question to ask.
        if let Source::Etcd(_) = &self.source {
            return Err(DiscoveryError::NotSynced);
        }
        // Boxed: the asking (UDP, retries, timeouts) would otherwise size
        // every request's future, watch mode or not.
        Box::pin(self.pick_by_asking(service, tried)).await
    }

    /// The request path in watch mode: no I/O, no lock.
    fn pick_from_snapshot(
        &self,
        t: &Watched,
        service: &ServiceName,
        tried: &[SocketAddr],
    ) -> Result<Picked, DiscoveryError> {
        let snapshot = t.table.load();
        let set = snapshot
            .service(service)
            .ok_or_else(|| DiscoveryError::NotFound(service.clone()))?;
        let endpoint = set
            .pick(self.balance, tried, |a| self.usable(a))
            .ok_or_else(|| DiscoveryError::Exhausted(service.clone()))?;
        Ok(Picked {
            addr: endpoint.addr,
            load: Some(endpoint.begin()),
        })
    }

    /// Read your writes: the snapshot lacks `service`, but the Tower may
    /// have answered its REGISTER a moment ago, before the watch told us.
    /// Ask the Tower (coalesced and remembered, see `confirm`). etcd has no
    /// one to ask: a write reaches it after its Tower answered, and its
    /// watch is the only news.
    async fn pick_unlisted(
        &self,
        service: &ServiceName,
        tried: &[SocketAddr],
    ) -> Result<Picked, DiscoveryError> {
        let Source::Tower(t) = &self.source else {
            return Err(DiscoveryError::NotFound(service.clone()));
        };
        let generation = self.generation();
        let answer = t
            .confirmations
            .confirm(service, generation, || t.lookup_once(service))
            .await;
        match answer {
            confirm::Answer::Found(addr) if !tried.contains(&addr) => {
                Ok(Picked { addr, load: None })
            }
            confirm::Answer::Found(_) => Err(DiscoveryError::Exhausted(service.clone())),
            confirm::Answer::Absent => Err(DiscoveryError::NotFound(service.clone())),
        }
    }

    /// LOOKUP-style sources hand out one replica per ask, in the Tower's
    /// round robin: ask a few more times than replicas already tried to get
    /// past them and the set-aside ones. When every offer is set aside, one
    /// is tried all the same.
    async fn pick_by_asking(
        &self,
        service: &ServiceName,
        tried: &[SocketAddr],
    ) -> Result<Picked, DiscoveryError> {
        let asks = tried.len() + 3;
        let mut fallback = None;
        for _ in 0..asks {
            let addr = self.ask(service).await?;
            if tried.contains(&addr) {
                continue;
            }
            if self.usable(addr) {
                return Ok(Picked { addr, load: None });
            }
            fallback.get_or_insert(addr);
        }
        fallback
            .map(|addr| Picked { addr, load: None })
            .ok_or_else(|| DiscoveryError::Exhausted(service.clone()))
    }

    async fn ask(&self, service: &ServiceName) -> Result<SocketAddr, DiscoveryError> {
        let client = match &self.source {
            Source::Local(registry) => {
                return registry
                    .lookup(service, Instant::now())
                    .ok_or_else(|| DiscoveryError::NotFound(service.clone()))
            }
            Source::Tower(t) => &t.udp,
            Source::Etcd(_) => return Err(DiscoveryError::NotSynced),
        };
        match client.call(&Request::Lookup(service.clone())).await? {
            Reply::Lookup(r) => Ok(r.addr),
            Reply::Error(ErrorReply::NotFound(_)) => Err(DiscoveryError::NotFound(service.clone())),
            Reply::Error(e) => Err(DiscoveryError::TowerRefused(e)),
            other => Err(DiscoveryError::TowerRefused(ErrorReply::Other(format!(
                "unexpected reply {other:?}"
            )))),
        }
    }
}
