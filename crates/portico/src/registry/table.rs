//! The registry table: a pure state machine over the Tower's requests. No
//! sockets and no clock: the caller passes `now`, so TTL expiry is tested
//! with a fake clock instead of sleeping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portico_wire::{ErrorReply, ListEntry, Registration, Reply, Request, ServiceName};

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
    /// Bumped on every change to the set of endpoints (not on a refresh), so
    /// watchers can tell whether anything moved.
    revision: u64,
}

impl Table {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            services: HashMap::new(),
            total: 0,
            serve_counter: 0,
            revision: 0,
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
                if !e.live(now) {
                    // Expired but not yet reaped: for watchers it is new again.
                    self.revision += 1;
                }
                e.expires = Some(expires);
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
        self.total += 1;
        self.revision += 1;
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
        entries.swap_remove(pos);
        if entries.is_empty() {
            self.services.remove(&r.name);
        }
        self.total -= 1;
        self.revision += 1;
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
        self.services
            .values()
            .flatten()
            .filter_map(|e| e.expires)
            .min()
    }

    /// Mark a change that is not in the entries themselves (the Tower
    /// finishing its warm-up), so that watchers fetch again.
    pub fn bump_revision(&mut self) {
        self.revision += 1;
    }

    /// Drop expired entries; returns how many went.
    pub fn reap(&mut self, now: Instant) -> usize {
        let before = self.total;
        self.services.retain(|_, entries| {
            entries.retain(|e| e.live(now));
            !entries.is_empty()
        });
        self.total = self.services.values().map(Vec::len).sum();
        let reaped = before - self.total;
        if reaped > 0 {
            self.revision += 1;
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
            e.expires = None;
            return false;
        }
        entries.push(Entry {
            addr,
            expires: None,
            last_served: 0,
        });
        self.total += 1;
        self.revision += 1;
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
}
