//! The registry table: a pure state machine over the Tower's requests. No
//! sockets and no clock: the caller passes `now`, so TTL expiry is tested
//! with a fake clock instead of sleeping.
//!
//! Every change to the set of endpoints goes through `record`, which gives
//! it the next index: the caller drains them (`drain_changes`) into the
//! change stream, one line per index, with no gap.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portico_wire::{ErrorReply, ListEntry, Registration, Reply, Request, ServiceName};

use crate::services_doc::Change;

/// Caps that keep memory bounded whatever a client sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long an entry lives after its last REGISTER.
    pub ttl: Duration,
    /// Replicas under one name.
    pub max_per_name: usize,
    /// Replicas in total.
    pub max_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_per_name: 1024,
            max_total: 65_536,
        }
    }
}

#[derive(Debug)]
struct Entry {
    addr: SocketAddr,
    /// `None` for an entry held by an external store (etcd), which ends it
    /// by saying so rather than by time.
    expires: Option<Instant>,
    /// Value of the table's serve counter when this replica was last handed
    /// out; 0 for never, so a new replica is served next.
    last_served: u64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }

    fn left(&self, now: Instant, ttl: Duration) -> Duration {
        self.expires
            .map_or(ttl, |t| t.saturating_duration_since(now))
    }
}

/// The order of LIST and of the HTTP API: by name, then address.
pub fn sort_endpoints(endpoints: &mut [(ServiceName, SocketAddr, Duration)]) {
    endpoints.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
}

/// Every live registration, by service name.
#[derive(Debug)]
pub struct Table {
    limits: Limits,
    services: HashMap<ServiceName, Vec<Entry>>,
    total: usize,
    serve_counter: u64,
    /// Bumped once per change to the set of endpoints (not on a refresh),
    /// so watchers can tell whether anything moved and by how much.
    revision: u64,
    /// The changes not yet drained, each with its revision.
    changes: Vec<(u64, Change)>,
    /// Every entry with an expiry, soonest first: the reaper and
    /// `next_expiry` touch only what expires, whatever the table's size.
    expiries: BTreeSet<(Instant, ServiceName, SocketAddr)>,
}

/// Move an entry's place in the expiry index (`None`: not in it).
fn reindex(
    expiries: &mut BTreeSet<(Instant, ServiceName, SocketAddr)>,
    name: &ServiceName,
    addr: SocketAddr,
    old: Option<Instant>,
    new: Option<Instant>,
) {
    if old == new {
        return;
    }
    if let Some(t) = old {
        expiries.remove(&(t, name.clone(), addr));
    }
    if let Some(t) = new {
        expiries.insert((t, name.clone(), addr));
    }
}

impl Table {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            services: HashMap::new(),
            total: 0,
            serve_counter: 0,
            revision: 0,
            changes: Vec::new(),
            expiries: BTreeSet::new(),
        }
    }

    /// One change, at the next revision.
    fn record(&mut self, change: Change) {
        self.revision += 1;
        self.changes.push((self.revision, change));
    }

    /// The changes since the last drain, oldest first; their revisions
    /// follow each other with no gap.
    pub fn drain_changes(&mut self) -> std::vec::Drain<'_, (u64, Change)> {
        self.changes.drain(..)
    }

    fn added(&self, r: &Registration) -> Change {
        Change::Add {
            service: r.name.clone(),
            addr: r.addr,
            ttl_ms: self.limits.ttl.as_millis() as u64,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Answer one request as of `now`.
    pub fn handle(&mut self, request: Request, now: Instant) -> Reply {
        match request {
            Request::Register(r) => match self.register(&r, now) {
                Ok(()) => Reply::Registered(r.name),
                Err(e) => Reply::Error(e),
            },
            Request::Deregister(r) => {
                if self.deregister(&r) {
                    Reply::Deregistered(r.name)
                } else {
                    Reply::Error(ErrorReply::NotFound(r.name.to_string()))
                }
            }
            Request::Lookup(name) => match self.lookup(&name, now) {
                Some(addr) => Reply::Lookup(Registration { name, addr }),
                None => Reply::Error(ErrorReply::NotFound(name.to_string())),
            },
            Request::List => Reply::List(self.list(now)),
            Request::Ping => Reply::Pong,
        }
    }

    /// Add a replica, or refresh its TTL if it is already there.
    pub fn register(&mut self, r: &Registration, now: Instant) -> Result<(), ErrorReply> {
        let expires = now + self.limits.ttl;
        if let Some(entries) = self.services.get_mut(&r.name) {
            if let Some(e) = entries.iter_mut().find(|e| e.addr == r.addr) {
                let was_live = e.live(now);
                let old = e.expires.replace(expires);
                reindex(&mut self.expiries, &r.name, r.addr, old, Some(expires));
                if !was_live {
                    // Expired but not yet reaped: for watchers it is new again.
                    self.record(self.added(r));
                }
                return Ok(());
            }
        }
        // Reap before refusing, so that dead entries never block live ones.
        if self.total >= self.limits.max_total
            || self.services.get(&r.name).map_or(0, Vec::len) >= self.limits.max_per_name
        {
            self.reap(now);
        }
        if self.total >= self.limits.max_total
            || self.services.get(&r.name).map_or(0, Vec::len) >= self.limits.max_per_name
        {
            return Err(ErrorReply::RegistryFull);
        }
        self.services
            .entry(r.name.clone())
            .or_default()
            .push(Entry {
                addr: r.addr,
                expires: Some(expires),
                last_served: 0,
            });
        self.expiries.insert((expires, r.name.clone(), r.addr));
        self.total += 1;
        self.record(self.added(r));
        Ok(())
    }

    /// Remove a replica; false when it was not registered.
    pub fn deregister(&mut self, r: &Registration) -> bool {
        let Some(entries) = self.services.get_mut(&r.name) else {
            return false;
        };
        let Some(pos) = entries.iter().position(|e| e.addr == r.addr) else {
            return false;
        };
        let gone = entries.swap_remove(pos);
        if entries.is_empty() {
            self.services.remove(&r.name);
        }
        reindex(&mut self.expiries, &r.name, r.addr, gone.expires, None);
        self.total -= 1;
        self.record(Change::Remove {
            service: r.name.clone(),
            addr: r.addr,
        });
        true
    }

    /// The least recently served live replica of `name` (round robin, and a
    /// newly registered replica is served first).
    pub fn lookup(&mut self, name: &ServiceName, now: Instant) -> Option<SocketAddr> {
        let entries = self.services.get_mut(name)?;
        let entry = entries
            .iter_mut()
            .filter(|e| e.live(now))
            .min_by_key(|e| e.last_served)?;
        self.serve_counter += 1;
        entry.last_served = self.serve_counter;
        Some(entry.addr)
    }

    /// Every live replica, sorted by name then address, with the time left.
    pub fn endpoints(&self, now: Instant) -> Vec<(ServiceName, SocketAddr, Duration)> {
        let mut out = self.endpoints_unsorted(now);
        sort_endpoints(&mut out);
        out
    }

    /// The live replicas of one service, with the time left, in no order.
    pub fn service_endpoints(
        &self,
        name: &ServiceName,
        now: Instant,
    ) -> Vec<(SocketAddr, Duration)> {
        let ttl = self.limits.ttl;
        self.services.get(name).map_or_else(Vec::new, |entries| {
            entries
                .iter()
                .filter(|e| e.live(now))
                .map(|e| (e.addr, e.left(now, ttl)))
                .collect()
        })
    }

    /// Every live replica in no order: the copy a caller takes under the
    /// lock, to sort after letting go of it.
    pub fn endpoints_unsorted(&self, now: Instant) -> Vec<(ServiceName, SocketAddr, Duration)> {
        let ttl = self.limits.ttl;
        self.services
            .iter()
            .flat_map(|(name, entries)| {
                entries
                    .iter()
                    .filter(move |e| e.live(now))
                    .map(move |e| (name.clone(), e.addr, e.left(now, ttl)))
            })
            .collect()
    }

    /// Every live replica for LIST, with whole seconds left.
    pub fn list(&self, now: Instant) -> Vec<ListEntry> {
        self.endpoints(now)
            .into_iter()
            .map(|(name, addr, left)| ListEntry {
                name,
                addr,
                ttl_left_secs: left.as_secs(),
            })
            .collect()
    }

    /// When the next entry expires, if any: the reaper wakes then, so that
    /// watchers learn of an expiry at once rather than at the next sweep.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(t, _, _)| *t)
    }

    /// Record the end of the Tower's warm-up, a change that is not in the
    /// entries themselves, so that watchers hear of it.
    pub fn bump_revision(&mut self) {
        self.record(Change::Warm);
    }

    /// Drop expired entries, one change each; returns how many went.
    /// Touches only the expired ones.
    pub fn reap(&mut self, now: Instant) -> usize {
        let mut reaped = 0;
        while self.expiries.first().is_some_and(|(t, _, _)| *t <= now) {
            let Some((_, name, addr)) = self.expiries.pop_first() else {
                break;
            };
            let Some(entries) = self.services.get_mut(&name) else {
                continue;
            };
            let Some(pos) = entries.iter().position(|e| e.addr == addr) else {
                continue;
            };
            entries.swap_remove(pos);
            if entries.is_empty() {
                self.services.remove(&name);
            }
            self.total -= 1;
            reaped += 1;
            self.record(Change::Remove {
                service: name,
                addr,
            });
        }
        reaped
    }

    /// Whether one more replica of `name` would pass the caps.
    pub fn has_room_for(&self, name: &ServiceName) -> bool {
        self.total < self.limits.max_total
            && self.services.get(name).map_or(0, Vec::len) < self.limits.max_per_name
    }

    /// Add a replica held by an external store. True if it was not there.
    pub fn hold(&mut self, name: &ServiceName, addr: SocketAddr) -> bool {
        let entries = self.services.entry(name.clone()).or_default();
        if let Some(e) = entries.iter_mut().find(|e| e.addr == addr) {
            let old = e.expires.take();
            reindex(&mut self.expiries, name, addr, old, None);
            return false;
        }
        entries.push(Entry {
            addr,
            expires: None,
            last_served: 0,
        });
        self.total += 1;
        self.record(self.added(&Registration {
            name: name.clone(),
            addr,
        }));
        true
    }

    /// Remove a replica, whoever holds it. True if it was there.
    pub fn release(&mut self, name: &ServiceName, addr: SocketAddr) -> bool {
        self.deregister(&Registration {
            name: name.clone(),
            addr,
        })
    }

    /// Make the table exactly `held` (all held by the external store),
    /// keeping the round-robin state of the replicas that stay. True if
    /// anything changed.
    pub fn set_held(&mut self, held: &[(ServiceName, SocketAddr)]) -> bool {
        let mut wanted: HashMap<&ServiceName, Vec<SocketAddr>> = HashMap::new();
        for (name, addr) in held {
            wanted.entry(name).or_default().push(*addr);
        }
        let before = self.revision;
        let gone: Vec<(ServiceName, SocketAddr)> = self
            .services
            .iter()
            .flat_map(|(name, entries)| {
                let keep = wanted.get(name);
                entries
                    .iter()
                    .filter(move |e| !keep.is_some_and(|k| k.contains(&e.addr)))
                    .map(move |e| (name.clone(), e.addr))
            })
            .collect();
        for (name, addr) in gone {
            self.release(&name, addr);
        }
        for (name, addr) in held {
            self.hold(name, *addr);
        }
        self.revision != before
    }

    /// Replicas held, live or expired-but-unreaped.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_wire::decode_request;

    fn req(s: &str) -> Request {
        decode_request(s.as_bytes()).unwrap()
    }

    fn table() -> (Table, Instant) {
        (Table::new(Limits::default()), Instant::now())
    }

    fn lookup_addr(t: &mut Table, name: &str, now: Instant) -> Option<String> {
        match t.handle(req(&format!("LOOKUP|{name}")), now) {
            Reply::Lookup(r) => Some(r.addr.to_string()),
            Reply::Error(ErrorReply::NotFound(_)) => None,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn register_then_lookup() {
        let (mut t, now) = table();
        assert_eq!(
            t.handle(req("REGISTER|web|127.0.0.1|8181"), now),
            Reply::Registered(ServiceName::parse("web").unwrap())
        );
        assert_eq!(
            lookup_addr(&mut t, "web", now).as_deref(),
            Some("127.0.0.1:8181")
        );
        assert_eq!(lookup_addr(&mut t, "other", now), None);
    }

    #[test]
    fn lookup_round_robins_and_serves_new_replicas_first() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|web|10.0.0.1|80"), now);
        t.handle(req("REGISTER|web|10.0.0.2|80"), now);
        let a = lookup_addr(&mut t, "web", now).unwrap();
        let b = lookup_addr(&mut t, "web", now).unwrap();
        assert_ne!(a, b);
        assert_eq!(lookup_addr(&mut t, "web", now).unwrap(), a);
        t.handle(req("REGISTER|web|10.0.0.3|80"), now);
        assert_eq!(
            lookup_addr(&mut t, "web", now).as_deref(),
            Some("10.0.0.3:80")
        );
    }

    #[test]
    fn reregister_refreshes_without_duplicating() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|web|10.0.0.1|80"), now);
        let rev = t.revision();
        t.handle(
            req("REGISTER|web|10.0.0.1|80"),
            now + Duration::from_secs(20),
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.revision(), rev, "a refresh is not a change");
        // Alive at 49 s (20 + 30 > 49), gone at 50 s.
        assert!(lookup_addr(&mut t, "web", now + Duration::from_secs(49)).is_some());
        assert!(lookup_addr(&mut t, "web", now + Duration::from_secs(50)).is_none());
    }

    #[test]
    fn entries_expire_after_ttl_and_are_reaped() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|web|10.0.0.1|80"), now);
        t.handle(
            req("REGISTER|db|10.0.0.2|5432"),
            now + Duration::from_secs(10),
        );
        let at = now + Duration::from_secs(30);
        assert!(lookup_addr(&mut t, "web", at).is_none(), "expired at ttl");
        assert!(lookup_addr(&mut t, "db", at).is_some());
        assert_eq!(t.list(at).len(), 1);
        assert_eq!(t.reap(at), 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.reap(at), 0);
    }

    #[test]
    fn deregister_removes_only_that_replica() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|web|10.0.0.1|80"), now);
        t.handle(req("REGISTER|web|10.0.0.2|80"), now);
        assert_eq!(
            t.handle(req("DEREGISTER|web|10.0.0.1|80"), now),
            Reply::Deregistered(ServiceName::parse("web").unwrap())
        );
        for _ in 0..3 {
            assert_eq!(
                lookup_addr(&mut t, "web", now).as_deref(),
                Some("10.0.0.2:80")
            );
        }
        assert_eq!(
            t.handle(req("DEREGISTER|web|10.0.0.1|80"), now),
            Reply::Error(ErrorReply::NotFound("web".into()))
        );
        assert_eq!(
            t.handle(req("DEREGISTER|nope|10.0.0.1|80"), now),
            Reply::Error(ErrorReply::NotFound("nope".into()))
        );
    }

    #[test]
    fn list_shows_ttl_left_sorted() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|b|10.0.0.2|80"), now);
        t.handle(req("REGISTER|a|::1|81"), now);
        let reply =
            portico_wire::encode_reply(&t.handle(req("LIST"), now + Duration::from_millis(1500)));
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            "OK|LIST|2|a:::1:81:28,b:10.0.0.2:80:28"
        );
    }

    #[test]
    fn next_expiry_is_the_earliest() {
        let (mut t, now) = table();
        assert_eq!(t.next_expiry(), None);
        t.handle(req("REGISTER|a|10.0.0.1|1"), now);
        t.handle(req("REGISTER|b|10.0.0.1|2"), now + Duration::from_secs(5));
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(30)));
    }

    #[test]
    fn ping() {
        let (mut t, now) = table();
        assert_eq!(t.handle(Request::Ping, now), Reply::Pong);
    }

    #[test]
    fn caps_refuse_with_registry_full_but_keep_existing() {
        let mut t = Table::new(Limits {
            ttl: Duration::from_secs(30),
            max_per_name: 2,
            max_total: 3,
        });
        let now = Instant::now();
        t.handle(req("REGISTER|a|10.0.0.1|1"), now);
        t.handle(req("REGISTER|a|10.0.0.1|2"), now);
        assert_eq!(
            t.handle(req("REGISTER|a|10.0.0.1|3"), now),
            Reply::Error(ErrorReply::RegistryFull)
        );
        t.handle(req("REGISTER|b|10.0.0.1|1"), now);
        assert_eq!(
            t.handle(req("REGISTER|c|10.0.0.1|1"), now),
            Reply::Error(ErrorReply::RegistryFull)
        );
        // A refresh of an existing entry is always accepted.
        assert!(matches!(
            t.handle(req("REGISTER|a|10.0.0.1|1"), now),
            Reply::Registered(_)
        ));
        assert_eq!(t.len(), 3);
        // Once entries expire, room is made without waiting for the reaper.
        let later = now + Duration::from_secs(31);
        assert!(matches!(
            t.handle(req("REGISTER|c|10.0.0.1|1"), later),
            Reply::Registered(_)
        ));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn held_entries_live_until_released_and_keep_their_turn() {
        let (mut t, now) = table();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let web = ServiceName::parse("web").unwrap();
        assert!(t.set_held(&[(web.clone(), a), (web.clone(), b)]));
        let r0 = t.revision();
        assert!(!t.set_held(&[(web.clone(), b), (web.clone(), a)]));
        assert_eq!(t.revision(), r0, "the same set is no change");
        // Held entries do not expire with time.
        let later = now + Duration::from_secs(3600);
        assert_eq!(t.reap(later), 0);
        assert_eq!(t.endpoints(later).len(), 2);
        assert_eq!(t.endpoints(later)[0].2, t.limits().ttl);
        let first = t.lookup(&web, later).unwrap();
        // Dropping the other replica keeps the round robin's memory of this one.
        let other = if first == a { b } else { a };
        assert!(t.set_held(&[(web.clone(), first)]));
        assert_eq!(t.lookup(&web, later), Some(first));
        assert!(t.set_held(&[(web.clone(), first), (web.clone(), other)]));
        assert_eq!(
            t.lookup(&web, later),
            Some(other),
            "a new replica is served first"
        );
        assert!(t.set_held(&[]));
        assert!(t.is_empty());
    }

    #[test]
    fn revision_moves_on_changes_only() {
        let (mut t, now) = table();
        let r0 = t.revision();
        t.handle(req("REGISTER|a|10.0.0.1|1"), now);
        let r1 = t.revision();
        assert!(r1 > r0);
        t.handle(req("LOOKUP|a"), now);
        t.handle(req("LIST"), now);
        assert_eq!(t.revision(), r1);
        t.handle(req("DEREGISTER|a|10.0.0.1|1"), now);
        assert!(t.revision() > r1);
    }

    /// Every entry the table holds, live or not yet reaped.
    fn held(t: &Table) -> std::collections::BTreeSet<(ServiceName, SocketAddr)> {
        t.services
            .iter()
            .flat_map(|(n, es)| es.iter().map(move |e| (n.clone(), e.addr)))
            .collect()
    }

    #[test]
    fn changes_are_gap_free_and_replay_to_the_table() {
        let (mut t, start) = table();
        let mut now = start;
        let mut replayed = held(&t);
        let mut last = t.revision();
        let mut rng = fastrand::Rng::with_seed(21);
        for step in 0..2000 {
            let name = ServiceName::parse(&format!("s{}", rng.u8(0..4))).unwrap();
            let addr: SocketAddr = format!("10.0.0.{}:80", rng.u8(1..6)).parse().unwrap();
            let r = Registration { name, addr };
            match rng.u8(0..10) {
                0..=4 => drop(t.register(&r, now)),
                5 | 6 => drop(t.deregister(&r)),
                7 => drop(t.reap(now)),
                8 => now += Duration::from_secs(rng.u64(1..20)),
                _ => t.bump_revision(),
            }
            for (index, change) in t.drain_changes() {
                assert_eq!(index, last + 1, "step {step}: a gap or a repeat");
                last = index;
                match change {
                    Change::Add { service, addr, .. } => drop(replayed.insert((service, addr))),
                    Change::Remove { service, addr } => drop(replayed.remove(&(service, addr))),
                    Change::Warm => {}
                }
            }
            assert_eq!(last, t.revision(), "step {step}");
            assert_eq!(replayed, held(&t), "step {step}");
            let soonest = t
                .services
                .values()
                .flatten()
                .filter_map(|e| e.expires)
                .min();
            assert_eq!(t.next_expiry(), soonest, "step {step}");
        }
    }

    #[test]
    fn a_reap_of_k_entries_is_k_changes_and_a_comeback_is_an_add() {
        let (mut t, now) = table();
        for i in 1..=3 {
            t.handle(req(&format!("REGISTER|web|10.0.0.{i}|80")), now);
        }
        t.drain_changes();
        let r0 = t.revision();
        let later = now + Duration::from_secs(30);
        // Expired, not reaped: registering again is an add.
        t.handle(req("REGISTER|web|10.0.0.1|80"), later);
        assert_eq!(t.revision(), r0 + 1);
        assert_eq!(t.reap(later), 2);
        let changes: Vec<_> = t.drain_changes().collect();
        assert_eq!(changes.len(), 3);
        assert!(matches!(changes[0], (i, Change::Add { .. }) if i == r0 + 1));
        assert!(matches!(changes[1], (_, Change::Remove { .. })));
        assert!(matches!(changes[2], (i, Change::Remove { .. }) if i == r0 + 3));
    }

    #[test]
    fn a_heartbeat_moves_only_its_own_expiry() {
        let (mut t, now) = table();
        t.handle(req("REGISTER|a|10.0.0.1|1"), now);
        t.handle(req("REGISTER|b|10.0.0.1|2"), now + Duration::from_secs(5));
        t.drain_changes();
        t.handle(req("REGISTER|a|10.0.0.1|1"), now + Duration::from_secs(10));
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(35)));
        assert_eq!(t.drain_changes().count(), 0, "a refresh is no change");
        assert_eq!(t.reap(now + Duration::from_secs(35)), 1);
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(40)));
    }
}
