//! The Tower: the registry table, its UDP and HTTP servers, signed writes,
//! which endpoints may register, and a client.

pub mod admit;
pub mod auth;
pub mod client;
pub mod etcd;
pub mod http;
pub mod ratelimit;
pub mod store;
pub mod stream;
pub mod table;
pub mod udp;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use portico_wire::{
    encode_list, Envelope, ErrorReply, ListEntry, Registration, Reply, Request, ServiceName,
    Signature, MAX_UDP_PAYLOAD, MAX_UDP_REPLY_LEN,
};
use tokio::sync::{watch, Notify};

use crate::etcd::keys::{EndpointKey, Layout};
use crate::services_doc::{encode_change, EndpointDoc, ServicesDoc};
use admit::Admission;
use auth::{Key, Verifier};
use store::{Job, Outcome, StoreState};
pub use table::{Limits, Table};

/// The registry every transport of a Tower goes through: the table, the
/// signature check for writes, the revision watchers wait on, the log of
/// the last changes (each encoded once) and the document cached per
/// revision. Locks are held only for pure operations, never across I/O;
/// the order is store state, table, change log.
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
    /// Set when the registrations live in etcd; the table is then the
    /// local cache of what this Tower serves.
    store: Option<Store>,
    /// Which endpoints a REGISTER may name.
    admission: Admission,
    /// The last LIST datagram of each `ListSize`, reused while the table's
    /// revision stays and for at most `LIST_REUSE`. Its own lock, never
    /// held with the table's.
    list_cache: Mutex<[Option<ListCache>; 2]>,
    /// The last changes as stream lines. Appended under the table's lock,
    /// so its order is the table's; read by watchers without it.
    log: Mutex<ChangeLog>,
    /// The document (`GET /v1/services`, a stream's `full`) of the latest
    /// revision asked for. Its own lock, never held with another.
    doc_cache: Mutex<Option<DocCache>>,
}

/// How many change lines the log keeps unless told (`--http-watch-log`).
pub const DEFAULT_WATCH_LOG: usize = 16_384;

/// The last `capacity` changes, by index with no gap: `lines[0]` is change
/// `first`. A watcher holds only its place in it.
#[derive(Debug)]
struct ChangeLog {
    first: u64,
    lines: VecDeque<Bytes>,
    capacity: usize,
}

impl ChangeLog {
    fn push(&mut self, line: Bytes) {
        if self.lines.len() >= self.capacity {
            self.lines.pop_front();
            self.first += 1;
        }
        self.lines.push_back(line);
    }

    fn shrink_to(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.lines.len() > capacity {
            self.lines.pop_front();
            self.first += 1;
        }
    }
}

/// A watcher's place fell out of the change log: it needs a whole document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind;

#[derive(Debug)]
struct DocCache {
    index: u64,
    built: Instant,
    doc: Bytes,
}

/// How long one encoded LIST is reused while nothing changes. Its
/// `ttl_left` fields (whole seconds, rounded down) are then at most this
/// much too high; a refresh or an expiry between two encodings shows at
/// the next one. A flood of LIST costs one encoding per change or per
/// second, and a copy of an `Arc` per datagram.
const LIST_REUSE: Duration = Duration::from_secs(1);

/// How large a LIST reply datagram may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListSize {
    /// `MAX_UDP_REPLY_LEN`: for any sender, who may be forged.
    Safe = 0,
    /// `MAX_UDP_PAYLOAD`: for a signed LIST whose signature verified.
    Whole = 1,
}

impl ListSize {
    fn cap(self) -> usize {
        match self {
            ListSize::Safe => MAX_UDP_REPLY_LEN,
            ListSize::Whole => MAX_UDP_PAYLOAD,
        }
    }
}

#[derive(Debug)]
struct ListCache {
    revision: u64,
    built: Instant,
    datagram: Bytes,
}

#[derive(Debug)]
struct Store {
    state: Mutex<StoreState>,
    /// Wakes the etcd writer when a write is owed.
    wake: Notify,
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
    /// Changes to the set of endpoints (each one stream line).
    pub changes: AtomicU64,
    /// Change streams open now.
    pub streams: AtomicU64,
    /// `full` documents sent to a stream whose place fell out of the log.
    pub resyncs: AtomicU64,
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

/// The document of `GET /v1/services`: the view, by service.
impl From<View> for ServicesDoc {
    fn from(v: View) -> Self {
        let mut services: BTreeMap<String, Vec<EndpointDoc>> = BTreeMap::new();
        for (name, addr, left) in v.endpoints {
            services
                .entry(name.to_string())
                .or_default()
                .push(EndpointDoc {
                    ip: addr.ip(),
                    port: addr.port(),
                    ttl_left_ms: left.as_millis() as u64,
                });
        }
        Self {
            index: v.index,
            epoch: v.epoch,
            warm: v.warm,
            services,
        }
    }
}

impl Registry {
    pub fn new(limits: Limits, key: Option<Key>, admission: Admission) -> Self {
        Self::build(limits, key, admission, None)
    }

    /// A registry whose registrations live in etcd under `layout`.
    pub fn with_etcd(
        limits: Limits,
        key: Option<Key>,
        admission: Admission,
        layout: Layout,
    ) -> Self {
        let state = StoreState::new(layout, limits.ttl);
        Self::build(
            limits,
            key,
            admission,
            Some(Store {
                state: Mutex::new(state),
                wake: Notify::new(),
            }),
        )
    }

    fn build(limits: Limits, key: Option<Key>, admission: Admission, store: Option<Store>) -> Self {
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
                store,
                admission,
                list_cache: Mutex::new([None, None]),
                log: Mutex::new(ChangeLog {
                    first: 1,
                    lines: VecDeque::new(),
                    capacity: DEFAULT_WATCH_LOG,
                }),
                doc_cache: Mutex::new(None),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        lock(&self.inner.table).limits()
    }

    /// Answer one request from any transport. `signed` is the span of the
    /// original bytes that a signature covers; `from` is the sender's
    /// address (a loopback endpoint is accepted only from this host).
    pub fn handle(
        &self,
        envelope: Envelope,
        signed: &[u8],
        from: IpAddr,
        now: Instant,
        now_ms: u64,
    ) -> Reply {
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
        if let Request::Register(r) = &envelope.request {
            if let Err(why) = self.inner.admission.check(r.addr.ip(), from) {
                return Reply::Error(ErrorReply::RegisterRefused(why.to_string()));
            }
        }
        if let Some(store) = &self.inner.store {
            if let Some(reply) = self.handle_stored(store, &envelope.request, now) {
                return reply;
            }
        }
        self.mutate(|table| table.handle(envelope.request, now))
    }

    /// Run `f` on the table, then log what it changed (each change encoded
    /// once, under the table's lock so the log keeps the table's order) and
    /// wake the watchers. Every change of the table goes through here.
    fn mutate<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let mut table = lock(&self.inner.table);
        let out = f(&mut table);
        let mut changes = table.drain_changes().peekable();
        if changes.peek().is_none() {
            return out;
        }
        let mut log = lock(&self.inner.log);
        let mut n = 0;
        for (index, change) in changes {
            debug_assert_eq!(index, log.first + log.lines.len() as u64);
            log.push(encode_change(index, &change));
            n += 1;
        }
        drop(log);
        let revision = table.revision();
        drop(table);
        self.inner.counters.changes.fetch_add(n, Ordering::Relaxed);
        self.publish(revision);
        out
    }

    /// Keep the last `capacity` changes for streams (`--http-watch-log`).
    pub fn set_watch_log(&self, capacity: usize) {
        lock(&self.inner.log).shrink_to(capacity);
    }

    /// Copy the change lines from index `from` on into `out`, at most
    /// `max`; returns the index after the last one copied. `Behind` when
    /// `from` fell out of the log.
    pub fn read_log(&self, from: u64, max: usize, out: &mut Vec<Bytes>) -> Result<u64, Behind> {
        let log = lock(&self.inner.log);
        let Some(skip) = from.checked_sub(log.first) else {
            return Err(Behind);
        };
        let start = usize::try_from(skip).unwrap_or(usize::MAX);
        let lines = log.lines.iter().skip(start).take(max);
        let before = out.len();
        out.extend(lines.cloned());
        Ok(from + (out.len() - before) as u64)
    }

    /// Whether the log still holds every change after `index` (the
    /// current revision included: nothing after it yet).
    pub fn log_covers(&self, index: u64) -> bool {
        let revision = lock(&self.inner.table).revision();
        index <= revision && lock(&self.inner.log).first <= index + 1
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The JSON document of every live endpoint and its index: encoded
    /// once per revision, and again at most once per `LIST_REUSE` while
    /// the revision stays (its `ttl_left_ms` age). Every change after the
    /// index is in the change log after it, so a stream may start here.
    pub fn document(&self, now: Instant) -> (u64, Bytes) {
        let revision = lock(&self.inner.table).revision();
        if let Some(c) = lock(&self.inner.doc_cache).as_ref() {
            if c.index == revision && now.saturating_duration_since(c.built) < LIST_REUSE {
                return (c.index, c.doc.clone());
            }
        }
        let view = self.view(now);
        let index = view.index;
        let doc = Bytes::from(serde_json::to_vec(&ServicesDoc::from(view)).unwrap_or_default());
        let mut cache = lock(&self.inner.doc_cache);
        if cache.as_ref().is_none_or(|c| c.index <= index) {
            *cache = Some(DocCache {
                index,
                built: now,
                doc: doc.clone(),
            });
        }
        (index, doc)
    }

    /// One service's live endpoints, sorted by address: the table's lock
    /// is held for that service's entries only.
    pub fn service_view(&self, name: &ServiceName, now: Instant) -> Vec<EndpointDoc> {
        let mut endpoints = lock(&self.inner.table).service_endpoints(name, now);
        endpoints.sort_unstable_by_key(|(addr, _)| *addr);
        endpoints
            .into_iter()
            .map(|(addr, left)| EndpointDoc {
                ip: addr.ip(),
                port: addr.port(),
                ttl_left_ms: left.as_millis() as u64,
            })
            .collect()
    }

    /// The next replica of `name` by the Tower's round robin.
    pub fn lookup(&self, name: &ServiceName, now: Instant) -> Option<SocketAddr> {
        lock(&self.inner.table).lookup(name, now)
    }

    pub fn view(&self, now: Instant) -> View {
        // The store's lock is taken before the table's, never inside it.
        let warm = self.is_warm(now, self.limits().ttl);
        let table = lock(&self.inner.table);
        let index = table.revision();
        let mut endpoints = table.endpoints_unsorted(now);
        drop(table);
        table::sort_endpoints(&mut endpoints);
        View {
            index,
            epoch: self.inner.epoch,
            warm,
            endpoints,
        }
    }

    /// The LIST reply datagram for UDP. A signed LIST to a Tower with a key
    /// gets the whole list, up to `MAX_UDP_PAYLOAD` bytes, once its
    /// signature passes the same check as a write's (window, replay cache);
    /// else the error, for the caller to cut to the request's size. Any
    /// other LIST gets at most `MAX_UDP_REPLY_LEN` bytes. Without a key a
    /// signature proves nothing (anyone can make one), so it earns nothing.
    pub fn list_reply(
        &self,
        signature: Option<Signature>,
        signed: &[u8],
        now: Instant,
        now_ms: u64,
    ) -> Result<Bytes, ErrorReply> {
        self.inner.counters.requests[3].fetch_add(1, Ordering::Relaxed);
        // An unsigned LIST (a flood's) takes no lock but the table's.
        let size = match signature {
            Some(sig) => self.signed_list_size(sig, signed, now_ms)?,
            None => ListSize::Safe,
        };
        Ok(self.list_datagram(now, size))
    }

    /// What a signed LIST earns: the whole list when the Tower has a key
    /// and the signature passes; the safe size when the Tower has no key.
    fn signed_list_size(
        &self,
        signature: Signature,
        signed: &[u8],
        now_ms: u64,
    ) -> Result<ListSize, ErrorReply> {
        let mut verifier = lock(&self.inner.verifier);
        if !verifier.requires_signatures() {
            return Ok(ListSize::Safe);
        }
        verifier
            .check(Some(signature), signed, now_ms)
            .map_err(|e| {
                self.inner
                    .counters
                    .unauthorized
                    .fetch_add(1, Ordering::Relaxed);
                ErrorReply::Unauthorized(e.to_string())
            })?;
        Ok(ListSize::Whole)
    }

    /// The LIST datagram of `size` (cut with a marker past it), encoded
    /// once per change of the table or per `LIST_REUSE`, with the sort and
    /// the encoding off the table's lock: a LIST flood must not starve
    /// heartbeats.
    fn list_datagram(&self, now: Instant, size: ListSize) -> Bytes {
        let revision = lock(&self.inner.table).revision();
        if let Some(c) = lock(&self.inner.list_cache)[size as usize].as_ref() {
            if c.revision == revision && now.saturating_duration_since(c.built) < LIST_REUSE {
                return c.datagram.clone();
            }
        }
        let table = lock(&self.inner.table);
        let revision = table.revision();
        let mut endpoints = table.endpoints_unsorted(now);
        drop(table);
        table::sort_endpoints(&mut endpoints);
        let entries: Vec<ListEntry> = endpoints
            .into_iter()
            .map(|(name, addr, left)| ListEntry {
                name,
                addr,
                ttl_left_secs: left.as_secs(),
            })
            .collect();
        let datagram = Bytes::from(encode_list(&entries, size.cap()));
        lock(&self.inner.list_cache)[size as usize] = Some(ListCache {
            revision,
            built: now,
            datagram: datagram.clone(),
        });
        datagram
    }

    fn is_warm(&self, now: Instant, ttl: Duration) -> bool {
        match &self.inner.store {
            // etcd remembers what a restarted Tower forgot: once listed, the
            // Tower knows everything.
            Some(store) => lock(&store.state).ever_current(),
            None => now.duration_since(self.inner.started) >= ttl,
        }
    }

    /// Writes over etcd: REGISTER and DEREGISTER change what this Tower owns
    /// and owes etcd; reads are answered from the table like any Tower.
    fn handle_stored(&self, store: &Store, request: &Request, now: Instant) -> Option<Reply> {
        let (r, register) = match request {
            Request::Register(r) => (r, true),
            Request::Deregister(r) => (r, false),
            _ => return None,
        };
        let key: EndpointKey = (r.name.clone(), r.addr);
        let mut state = lock(&store.state);
        let was = state.visible(&key, now);
        let reply = if register {
            if !was && !lock(&self.inner.table).has_room_for(&r.name) {
                return Some(Reply::Error(ErrorReply::RegistryFull));
            }
            state.register(key.clone(), now);
            Reply::Registered(r.name.clone())
        } else if state.deregister(&key, now) {
            Reply::Deregistered(r.name.clone())
        } else {
            return Some(Reply::Error(ErrorReply::NotFound(r.name.to_string())));
        };
        let is = state.visible(&key, now);
        drop(state);
        if was != is {
            self.show(r, is);
        }
        store.wake.notify_one();
        Some(reply)
    }

    /// Add or remove one replica in the table served.
    fn show(&self, r: &Registration, visible: bool) {
        self.mutate(|table| {
            if visible {
                table.hold(&r.name, r.addr);
            } else {
                table.release(&r.name, r.addr);
            }
        });
    }

    /// Make the table exactly what the store says is served, less what
    /// this Tower's rules refuse: etcd holds what other Towers (with other
    /// rules) and anyone with write access put there.
    fn show_all(&self, state: &StoreState, now: Instant) {
        let mut keys = state.visible_keys(now);
        keys.retain(|(_, addr)| self.inner.admission.serves(addr.ip()));
        self.mutate(|table| table.set_held(&keys));
    }

    /// Whether this Tower keeps its registrations in etcd.
    pub fn is_stored(&self) -> bool {
        self.inner.store.is_some()
    }

    /// Whether registrations are current: always in memory; over etcd,
    /// while the watch is in sync.
    pub fn is_current(&self) -> bool {
        self.inner
            .store
            .as_ref()
            .is_none_or(|s| lock(&s.state).is_current())
    }

    /// Registrations this Tower owns, and writes it owes etcd.
    pub fn store_backlog(&self) -> Option<(usize, usize)> {
        let s = self.inner.store.as_ref()?;
        let state = lock(&s.state);
        Some((state.owned_count(), state.backlog()))
    }

    pub fn store_layout(&self) -> Option<Layout> {
        Some(lock(&self.inner.store.as_ref()?.state).layout.clone())
    }

    /// The writes owed etcd now (for the writer).
    pub fn store_take_work(&self, max: usize) -> Vec<Job> {
        match &self.inner.store {
            Some(s) => lock(&s.state).take_work(max),
            None => Vec::new(),
        }
    }

    /// Wait until a write may be owed.
    pub async fn store_wait(&self) {
        match &self.inner.store {
            Some(s) => s.wake.notified().await,
            None => std::future::pending().await,
        }
    }

    pub fn store_complete(&self, job: &Job, outcome: Outcome) {
        let Some(store) = &self.inner.store else {
            return;
        };
        let now = Instant::now();
        let key = job.key();
        let mut state = lock(&store.state);
        let was = state.visible(key, now);
        state.complete(job, outcome);
        let is = state.visible(key, now);
        drop(state);
        if was != is {
            self.show(
                &Registration {
                    name: key.0.clone(),
                    addr: key.1,
                },
                is,
            );
        }
    }

    /// Reap expired entries, and announce the end of the warm-up once.
    /// Returns how many entries went and when to reap next: the next
    /// expiry, so that watchers learn of it at once.
    pub fn reap(&self, now: Instant, period: Duration) -> (usize, Instant) {
        if let Some(store) = &self.inner.store {
            let mut state = lock(&store.state);
            let before = state.owned_count();
            if state.reap(now) {
                self.show_all(&state, now);
            }
            let reaped = before - state.owned_count();
            let next = state
                .next_expiry()
                .map_or(now + period, |t| t.min(now + period));
            drop(state);
            if reaped > 0 {
                self.inner
                    .counters
                    .expiries
                    .fetch_add(reaped as u64, Ordering::Relaxed);
                store.wake.notify_one();
            }
            return (reaped, next);
        }
        let ttl = self.limits().ttl;
        let warm = self.is_warm(now, ttl);
        let (reaped, next_expiry) = self.mutate(|table| {
            let reaped = table.reap(now);
            if warm && !self.inner.warm_announced.swap(true, Ordering::Relaxed) {
                table.bump_revision();
            }
            (reaped, table.next_expiry())
        });
        self.inner
            .counters
            .expiries
            .fetch_add(reaped as u64, Ordering::Relaxed);
        let mut next = now + period;
        if let Some(expiry) = next_expiry {
            next = next.min(expiry);
        }
        if !warm {
            next = next.min(self.inner.started + ttl);
        }
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

    /// Tell watchers of `revision`. Two writers publish in either order
    /// once off the table's lock, so the value only moves forward.
    fn publish(&self, revision: u64) {
        self.inner.revision.send_if_modified(|r| {
            let changed = revision > *r;
            if changed {
                *r = revision;
            }
            changed
        });
    }
}

/// The Tower's side of the etcd watch: the cache feeds the table served.
impl crate::etcd::watch::Sink for Registry {
    fn replace(&self, kvs: &[crate::etcd::KeyValue], revision: i64) {
        let Some(store) = &self.inner.store else {
            return;
        };
        let mut state = lock(&store.state);
        state.replace(kvs, revision);
        self.show_all(&state, Instant::now());
        drop(state);
        // A re-list can find writes owed (keys etcd lost).
        store.wake.notify_one();
    }

    fn apply(&self, events: &[crate::etcd::Event], revision: i64) {
        let Some(store) = &self.inner.store else {
            return;
        };
        let now = Instant::now();
        let mut state = lock(&store.state);
        // Only the keys of the events can change what is served: each is
        // shown or hidden on its own, not the whole table recomputed.
        for (key, visible) in state.apply_seen(events, revision, now) {
            let visible = visible && self.inner.admission.serves(key.1.ip());
            self.show(
                &Registration {
                    name: key.0,
                    addr: key.1,
                },
                visible,
            );
        }
    }

    fn revision(&self) -> i64 {
        self.inner
            .store
            .as_ref()
            .map_or(0, |s| lock(&s.state).revision())
    }

    fn set_current(&self, current: bool) {
        let Some(store) = &self.inner.store else {
            return;
        };
        let mut state = lock(&store.state);
        let first = current && !state.ever_current();
        let returned = state.set_current(current);
        drop(state);
        if first {
            // The end of the warm-up, for watchers of this Tower.
            self.mutate(Table::bump_revision);
        }
        if returned {
            store.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_wire::decode_envelope;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn send(r: &Registry, datagram: &str, from: IpAddr, now: Instant) -> Reply {
        let e = decode_envelope(datagram.as_bytes()).unwrap();
        let signed = datagram.as_bytes()[..e.signed_len].to_vec();
        r.handle(e, &signed, from, now, 0)
    }

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn list_is_reused_within_a_revision_and_a_second_only() {
        let r = Registry::new(Limits::default(), None, Admission::default());
        let t0 = Instant::now();
        send(&r, "REGISTER|a|10.0.0.1|80", LOCAL, t0);
        assert_eq!(
            text(r.list_datagram(t0, ListSize::Safe)),
            "OK|LIST|1|a:10.0.0.1:80:30"
        );
        // Same revision, within the second: the same bytes, ttl_left as built.
        let soon = t0 + Duration::from_millis(900);
        assert_eq!(
            text(r.list_datagram(soon, ListSize::Safe)),
            "OK|LIST|1|a:10.0.0.1:80:30"
        );
        // A change shows at once.
        send(&r, "REGISTER|b|10.0.0.2|80", LOCAL, soon);
        assert_eq!(
            text(r.list_datagram(soon, ListSize::Safe)),
            "OK|LIST|2|a:10.0.0.1:80:29,b:10.0.0.2:80:30"
        );
        // A second on, ttl_left is counted again (a refresh is no change
        // of revision, so this is how it shows).
        send(&r, "REGISTER|a|10.0.0.1|80", LOCAL, soon);
        let later = soon + Duration::from_secs(1);
        assert_eq!(
            text(r.list_datagram(later, ListSize::Safe)),
            "OK|LIST|2|a:10.0.0.1:80:29,b:10.0.0.2:80:29"
        );
    }

    /// `n` registrations, more than one safe datagram holds.
    fn fill(r: &Registry, n: usize, now: Instant) {
        for i in 0..n {
            let d = format!(
                "REGISTER|service-{i:04}|10.0.{}.{}|8080",
                i / 250,
                1 + i % 250
            );
            assert!(matches!(send(r, &d, LOCAL, now), Reply::Registered(_)));
        }
    }

    fn signed_list(key: &Key, ts_ms: u64) -> (Envelope, Vec<u8>) {
        let d = auth::sign(key, &Request::List, ts_ms);
        let e = decode_envelope(&d).unwrap();
        let signed = d[..e.signed_len].to_vec();
        (e, signed)
    }

    #[test]
    fn a_signed_list_gets_the_whole_list_once() {
        let key = Key::from_bytes(b"0123456789abcdef0123");
        let r = Registry::new(Limits::default(), Some(key.clone()), Admission::default());
        let now = Instant::now();
        let ms = 1_700_000_000_000;
        // Writes to a keyed Tower must be signed; sign them as any client.
        for i in 0..100 {
            let write = format!("REGISTER|service-{i:04}|10.0.0.{}|8080", 1 + i);
            let req = portico_wire::decode_request(write.as_bytes()).unwrap();
            let d = auth::sign(&key, &req, ms + i as u64);
            let e = decode_envelope(&d).unwrap();
            let signed = d[..e.signed_len].to_vec();
            assert!(matches!(
                r.handle(e, &signed, LOCAL, now, ms),
                Reply::Registered(_)
            ));
        }
        let unsigned = r.list_reply(None, b"LIST", now, ms).unwrap();
        assert!(unsigned.len() <= MAX_UDP_REPLY_LEN);
        assert!(text(unsigned).ends_with("|TRUNCATED|100"));
        let (e, signed) = signed_list(&key, ms);
        let whole = text(r.list_reply(e.signature, &signed, now, ms).unwrap());
        assert!(whole.starts_with("OK|LIST|100|service-0000:"), "{whole}");
        assert!(!whole.contains(portico_wire::TRUNCATED));
        // The same signature again, a stale one, another key's: refused.
        let replayed = r.list_reply(e.signature, &signed, now, ms);
        assert_eq!(
            replayed,
            Err(ErrorReply::Unauthorized("replayed signature".into()))
        );
        let (old, signed) = signed_list(&key, ms - 60_000);
        assert!(r.list_reply(old.signature, &signed, now, ms).is_err());
        let other = Key::from_bytes(b"another key of enough length");
        let (forged, signed) = signed_list(&other, ms);
        assert!(r.list_reply(forged.signature, &signed, now, ms).is_err());
        assert_eq!(r.counters().unauthorized.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn without_a_key_a_signed_list_is_capped_like_any_list() {
        let r = Registry::new(Limits::default(), None, Admission::default());
        let now = Instant::now();
        fill(&r, 100, now);
        let (e, signed) = signed_list(&Key::from_bytes(b"anyone can make one"), 1);
        let reply = r.list_reply(e.signature, &signed, now, 1).unwrap();
        assert!(reply.len() <= MAX_UDP_REPLY_LEN);
        assert!(text(reply).ends_with("|TRUNCATED|100"));
    }

    #[test]
    fn register_checks_the_endpoint_against_the_sender() {
        let allow = vec!["10.0.0.0/8".parse().unwrap()];
        let r = Registry::new(Limits::default(), None, Admission::new(allow));
        let now = Instant::now();
        let remote: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(matches!(
            send(&r, "REGISTER|a|10.0.0.1|80", remote, now),
            Reply::Registered(_)
        ));
        for (datagram, from) in [
            ("REGISTER|a|127.0.0.1|80", remote),
            ("REGISTER|a|192.168.0.1|80", LOCAL),
            ("REGISTER|a|169.254.169.254|80", LOCAL),
        ] {
            let reply = send(&r, datagram, from, now);
            assert!(
                matches!(reply, Reply::Error(ErrorReply::RegisterRefused(_))),
                "{datagram}: {reply:?}"
            );
        }
        // DEREGISTER is not checked: it can only remove what was admitted.
        assert!(matches!(
            send(&r, "DEREGISTER|a|10.0.0.1|80", remote, now),
            Reply::Deregistered(_)
        ));
        assert_eq!(r.len(), 0);
    }
}
