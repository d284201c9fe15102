//! The ingress's local endpoint table: one immutable snapshot, swapped on
//! each change and read by requests without locks. Pure: built from the
//! Tower's document, changed by its stream's changes in proportion to
//! them, picked from with the balance policy.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use portico_wire::ServiceName;

use crate::services_doc::{Change, ServicesDoc};

/// How a replica is chosen among those of a service (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Balance {
    /// In turn, as the Tower's LOOKUP.
    #[default]
    RoundRobin,
    /// Two replicas at random, the one with fewer requests in flight.
    P2c,
}

/// One replica, with the requests in flight to it (for p2c). Kept across
/// snapshots while the replica stays registered.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Count a request to this replica until the mark is dropped.
    pub fn begin(self: &Arc<Self>) -> Load {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Load(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct Load(Arc<Endpoint>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct ServiceSet {
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl ServiceSet {
    fn new(endpoints: Vec<Arc<Endpoint>>, position: usize) -> Self {
        Self {
            endpoints,
            next: AtomicUsize::new(position),
        }
    }

    /// Where round robin stands, for the set that replaces this one.
    fn position(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    fn find(&self, addr: SocketAddr) -> Option<&Arc<Endpoint>> {
        self.endpoints
            .binary_search_by_key(&addr, |e| e.addr)
            .ok()
            .map(|i| &self.endpoints[i])
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Choose a replica not in `tried`, preferring `usable` ones; when no
    /// untried replica is usable, an unusable one is returned all the same
    /// (a possibly-dead replica beats a certain error).
    pub fn pick(
        &self,
        policy: Balance,
        tried: &[SocketAddr],
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        match policy {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut fallback = None;
                for i in 0..n {
                    let e = &self.endpoints[(start + i) % n];
                    if tried.contains(&e.addr) {
                        continue;
                    }
                    if usable(e.addr) {
                        return Some(e);
                    }
                    fallback.get_or_insert(e);
                }
                fallback
            }
            Balance::P2c => {
                let untried = || self.endpoints.iter().filter(|e| !tried.contains(&e.addr));
                let mut candidates: Vec<&Arc<Endpoint>> =
                    untried().filter(|e| usable(e.addr)).collect();
                if candidates.is_empty() {
                    candidates = untried().collect();
                }
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    len => {
                        let a = fastrand::usize(..len);
                        let b = (a + 1 + fastrand::usize(..len - 1)) % len;
                        let (ea, eb) = (candidates[a], candidates[b]);
                        Some(if eb.in_flight() < ea.in_flight() {
                            eb
                        } else {
                            ea
                        })
                    }
                }
            }
        }
    }
}

/// Services by name, split into shards so that a change copies one shard's
/// map, not every service's: a snapshot shares every untouched shard, and
/// every untouched service, with the one before it.
const SHARDS: usize = 64;

type Shard = HashMap<ServiceName, Arc<ServiceSet>>;

#[derive(Debug)]
pub struct Snapshot {
    pub index: u64,
    pub epoch: u64,
    /// The source's word is the whole truth (nothing carried over).
    warm: bool,
    shards: Vec<Arc<Shard>>,
    /// Picks the shard; the same for a snapshot and its successors.
    hasher: RandomState,
    endpoints: usize,
    /// Endpoints carried over from before a Tower restart, by service, in
    /// the services' shards: a change copies one shard's, not all.
    inherited: Vec<Arc<Carried>>,
}

type Carried = HashMap<ServiceName, Vec<SocketAddr>>;

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            index: 0,
            epoch: 0,
            warm: false,
            shards: vec![Arc::default(); SHARDS],
            hasher: RandomState::new(),
            endpoints: 0,
            inherited: vec![Arc::default(); SHARDS],
        }
    }
}

impl Snapshot {
    /// Build from the Tower's document. Replicas already known keep their
    /// state, services their round-robin position. A Tower that restarted
    /// (a new epoch) knows only the replicas that have heartbeated to it
    /// since; until it is warm (one TTL), the replicas it lacks are carried
    /// over from before the restart: their absence is not evidence of
    /// death. Within one run of the Tower its document is the whole truth,
    /// so a deregistration takes effect at once.
    pub fn from_doc(doc: &ServicesDoc, previous: &Snapshot) -> Snapshot {
        let mut services: HashMap<ServiceName, Vec<Arc<Endpoint>>> = HashMap::new();
        for (name, endpoints) in &doc.services {
            // The Tower validated the names; one that fails here is skipped.
            let Ok(name) = ServiceName::parse(name) else {
                continue;
            };
            let known = previous.service(&name);
            let list = services.entry(name).or_default();
            for e in endpoints {
                let addr = SocketAddr::new(e.ip, e.port);
                let endpoint = known
                    .and_then(|k| k.find(addr))
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(addr));
                list.push(endpoint);
            }
        }
        let inherited = if doc.warm {
            HashMap::new()
        } else {
            carry_over(&mut services, previous, doc.epoch != previous.epoch)
        };
        let mut next = Snapshot {
            index: doc.index,
            epoch: doc.epoch,
            warm: doc.warm,
            shards: vec![Arc::default(); SHARDS],
            hasher: previous.hasher.clone(),
            endpoints: 0,
            inherited: vec![Arc::default(); SHARDS],
        };
        for (name, addrs) in inherited {
            let shard = next.shard_of(&name);
            Arc::make_mut(&mut next.inherited[shard]).insert(name, addrs);
        }
        for (name, mut list) in services {
            if list.is_empty() {
                continue;
            }
            list.sort_by_key(|e| e.addr);
            list.dedup_by_key(|e| e.addr);
            next.endpoints += list.len();
            let position = previous.service(&name).map_or(0, ServiceSet::position);
            let set = ServiceSet::new(list, position);
            let shard = next.shard_of(&name);
            Arc::make_mut(&mut next.shards[shard]).insert(name, Arc::new(set));
        }
        next
    }

    /// The snapshot after `changes`, in order, now at `index`: only the
    /// services they touch are rebuilt; every other one is shared with
    /// `self`, its replicas' in-flight counts and its round-robin position
    /// with it. Applying a change already in effect does nothing, so a
    /// replay is harmless.
    pub fn apply(&self, changes: &[Change], index: u64) -> Snapshot {
        let mut next = Snapshot {
            index,
            epoch: self.epoch,
            warm: self.warm,
            shards: self.shards.clone(),
            hasher: self.hasher.clone(),
            endpoints: self.endpoints,
            inherited: self.inherited.clone(),
        };
        for change in changes {
            match change {
                Change::Add { service, addr, .. } => {
                    next.disinherit(service, *addr);
                    next.edit(service, |list| {
                        match list.binary_search_by_key(addr, |e| e.addr) {
                            Ok(_) => {}
                            Err(at) => list.insert(at, Endpoint::new(*addr)),
                        }
                    });
                }
                Change::Remove { service, addr } => {
                    next.disinherit(service, *addr);
                    next.edit(service, |list| list.retain(|e| e.addr != *addr));
                }
                Change::Warm => next.end_carry_over(),
            }
        }
        next
    }

    fn shard_of(&self, name: &ServiceName) -> usize {
        (self.hasher.hash_one(name) % SHARDS as u64) as usize
    }

    /// Replace one service's replicas by `edit` of them (copy on write;
    /// an edit that changes nothing copies nothing).
    fn edit(&mut self, name: &ServiceName, edit: impl FnOnce(&mut Vec<Arc<Endpoint>>)) {
        let shard = self.shard_of(name);
        let old = self.shards[shard].get(name);
        let mut list = old.map(|s| s.endpoints.clone()).unwrap_or_default();
        let position = old.map_or(0, |s| s.position());
        let before = list.len();
        edit(&mut list);
        // Edits add a replica that is not there or remove one that is.
        if list.len() == before {
            return;
        }
        self.endpoints = self.endpoints + list.len() - before;
        let map = Arc::make_mut(&mut self.shards[shard]);
        if list.is_empty() {
            map.remove(name);
        } else {
            map.insert(name.clone(), Arc::new(ServiceSet::new(list, position)));
        }
    }

    /// A replica the source now speaks of is no longer carried over.
    fn disinherit(&mut self, name: &ServiceName, addr: SocketAddr) {
        if self.warm {
            return;
        }
        let shard = self.shard_of(name);
        let carried = self.inherited[shard]
            .get(name)
            .is_some_and(|list| list.contains(&addr));
        if carried {
            let inherited = Arc::make_mut(&mut self.inherited[shard]);
            if let Some(list) = inherited.get_mut(name) {
                list.retain(|a| *a != addr);
                if list.is_empty() {
                    inherited.remove(name);
                }
            }
        }
    }

    /// The source is warm: what it lacks, carried over, goes.
    fn end_carry_over(&mut self) {
        self.warm = true;
        let shards = std::mem::replace(&mut self.inherited, vec![Arc::default(); SHARDS]);
        for (name, addrs) in shards.iter().flat_map(|shard| shard.iter()) {
            self.edit(name, |list| list.retain(|e| !addrs.contains(&e.addr)));
        }
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &ServiceSet)> {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter().map(|(name, set)| (name, &**set)))
    }

    pub fn service(&self, name: &ServiceName) -> Option<&ServiceSet> {
        self.shards[self.shard_of(name)].get(name).map(|s| &**s)
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }
}

/// The replicas of `previous` that a cold document lacks but that are
/// kept all the same (added to `services`), by service: after a restart,
/// all of them; within one run, those already carried.
fn carry_over(
    services: &mut HashMap<ServiceName, Vec<Arc<Endpoint>>>,
    previous: &Snapshot,
    restarted: bool,
) -> HashMap<ServiceName, Vec<SocketAddr>> {
    let mut inherited: HashMap<ServiceName, Vec<SocketAddr>> = HashMap::new();
    for (name, set) in previous.services() {
        let carried_before = previous.inherited[previous.shard_of(name)].get(name);
        for e in &set.endpoints {
            let carry = restarted || carried_before.is_some_and(|c| c.contains(&e.addr));
            let list = services.entry(name.clone()).or_default();
            if carry && !list.iter().any(|x| x.addr == e.addr) {
                list.push(e.clone());
                inherited.entry(name.clone()).or_default().push(e.addr);
            }
        }
    }
    inherited
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::services_doc::EndpointDoc;

    fn doc(warm: bool, entries: &[(&str, &str)]) -> ServicesDoc {
        doc_of(7, warm, entries)
    }

    fn doc_of(epoch: u64, warm: bool, entries: &[(&str, &str)]) -> ServicesDoc {
        let mut services: std::collections::BTreeMap<String, Vec<EndpointDoc>> = Default::default();
        for (name, addr) in entries {
            let a: SocketAddr = addr.parse().unwrap();
            services
                .entry((*name).to_owned())
                .or_default()
                .push(EndpointDoc {
                    ip: a.ip(),
                    port: a.port(),
                    ttl_left_ms: 30_000,
                });
        }
        ServicesDoc {
            index: 1,
            epoch,
            warm,
            services,
        }
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn addrs(s: &Snapshot, n: &str) -> Vec<String> {
        s.service(&name(n))
            .map(|set| set.endpoints.iter().map(|e| e.addr.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn within_one_tower_run_the_document_is_the_whole_truth() {
        let three = [
            ("a", "10.0.0.1:80"),
            ("a", "10.0.0.2:80"),
            ("b", "10.0.0.3:80"),
        ];
        let s1 = Snapshot::from_doc(&doc(true, &three), &Snapshot::default());
        let s2 = Snapshot::from_doc(&doc(true, &[("a", "10.0.0.2:80")]), &s1);
        assert_eq!(addrs(&s2, "a"), ["10.0.0.2:80"]);
        assert!(
            s2.service(&name("b")).is_none(),
            "a service gone from the Tower is gone"
        );
        // Cold, but the same run: a deregistration still counts at once.
        let c1 = Snapshot::from_doc(&doc(false, &three), &Snapshot::default());
        let c2 = Snapshot::from_doc(&doc(false, &[("a", "10.0.0.2:80")]), &c1);
        assert_eq!(addrs(&c2, "a"), ["10.0.0.2:80"]);
    }

    #[test]
    fn a_restarted_cold_tower_does_not_erase_live_replicas() {
        let before = Snapshot::from_doc(
            &doc_of(1, true, &[("a", "10.0.0.1:80"), ("b", "10.0.0.3:80")]),
            &Snapshot::default(),
        );
        // New epoch, cold: what it lacks is carried over...
        let r1 = Snapshot::from_doc(&doc_of(2, false, &[("a", "10.0.0.9:80")]), &before);
        assert_eq!(addrs(&r1, "a"), ["10.0.0.1:80", "10.0.0.9:80"]);
        assert_eq!(addrs(&r1, "b"), ["10.0.0.3:80"]);
        // ...through further cold documents of that run...
        let r2 = Snapshot::from_doc(
            &doc_of(2, false, &[("a", "10.0.0.1:80"), ("a", "10.0.0.9:80")]),
            &r1,
        );
        assert_eq!(addrs(&r2, "b"), ["10.0.0.3:80"]);
        // ...but one registered and then removed within the run goes.
        let r3 = Snapshot::from_doc(&doc_of(2, false, &[("a", "10.0.0.1:80")]), &r2);
        assert_eq!(addrs(&r3, "a"), ["10.0.0.1:80"]);
        assert_eq!(addrs(&r3, "b"), ["10.0.0.3:80"]);
        // Once warm, the document is the whole truth again.
        let warm = Snapshot::from_doc(&doc_of(2, true, &[("a", "10.0.0.1:80")]), &r3);
        assert!(warm.service(&name("b")).is_none());
    }

    #[test]
    fn endpoint_state_survives_a_new_snapshot() {
        let s1 = Snapshot::from_doc(&doc(true, &[("a", "10.0.0.1:80")]), &Snapshot::default());
        let load = s1.service(&name("a")).unwrap().endpoints[0].begin();
        let s2 = Snapshot::from_doc(
            &doc(true, &[("a", "10.0.0.1:80"), ("a", "10.0.0.2:80")]),
            &s1,
        );
        let e = &s2.service(&name("a")).unwrap().endpoints[0];
        assert_eq!(e.in_flight(), 1);
        drop(load);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn round_robin_skips_tried_and_prefers_usable() {
        let s = Snapshot::from_doc(
            &doc(
                true,
                &[
                    ("a", "10.0.0.1:80"),
                    ("a", "10.0.0.2:80"),
                    ("a", "10.0.0.3:80"),
                ],
            ),
            &Snapshot::default(),
        );
        let set = s.service(&name("a")).unwrap();
        let picks: Vec<String> = (0..6)
            .map(|_| {
                set.pick(Balance::RoundRobin, &[], |_| true)
                    .unwrap()
                    .addr
                    .to_string()
            })
            .collect();
        assert_eq!(picks[..3], picks[3..]);
        let mut first3 = picks[..3].to_vec();
        first3.sort();
        assert_eq!(first3, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let tried: Vec<SocketAddr> = vec![
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        ];
        for _ in 0..3 {
            assert_eq!(
                set.pick(Balance::RoundRobin, &tried, |_| true)
                    .unwrap()
                    .addr
                    .to_string(),
                "10.0.0.3:80"
            );
        }
        let dead: SocketAddr = "10.0.0.3:80".parse().unwrap();
        for _ in 0..3 {
            assert_ne!(
                set.pick(Balance::RoundRobin, &[], |a| a != dead)
                    .unwrap()
                    .addr,
                dead
            );
        }
        // All set aside: still an answer.
        assert!(set.pick(Balance::RoundRobin, &[], |_| false).is_some());
        let all: Vec<SocketAddr> = set.endpoints.iter().map(|e| e.addr).collect();
        assert!(set.pick(Balance::RoundRobin, &all, |_| true).is_none());
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let s = Snapshot::from_doc(
            &doc(true, &[("a", "10.0.0.1:80"), ("a", "10.0.0.2:80")]),
            &Snapshot::default(),
        );
        let set = s.service(&name("a")).unwrap();
        let busy = &set.endpoints[0];
        let _loads: Vec<Load> = (0..5).map(|_| busy.begin()).collect();
        for _ in 0..20 {
            assert_eq!(
                set.pick(Balance::P2c, &[], |_| true).unwrap().addr,
                set.endpoints[1].addr
            );
        }
        let only: Vec<SocketAddr> = vec![set.endpoints[1].addr];
        assert_eq!(
            set.pick(Balance::P2c, &only, |_| true).unwrap().addr,
            busy.addr
        );
    }

    fn add(n: &str, a: &str) -> Change {
        Change::Add {
            service: name(n),
            addr: a.parse().unwrap(),
            ttl_ms: 30_000,
        }
    }

    fn remove(n: &str, a: &str) -> Change {
        Change::Remove {
            service: name(n),
            addr: a.parse().unwrap(),
        }
    }

    fn table(s: &Snapshot) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = s
            .services()
            .flat_map(|(n, set)| {
                set.endpoints
                    .iter()
                    .map(move |e| (n.to_string(), e.addr.to_string()))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn changes_give_the_table_their_document_would() {
        let start: Vec<(String, &str)> = (0..300)
            .map(|i| {
                (
                    format!("s{}", i % 100),
                    ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"][i / 100],
                )
            })
            .collect();
        let entries: Vec<(&str, &str)> = start.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let s1 = Snapshot::from_doc(&doc(true, &entries), &Snapshot::default());
        let changes = [
            remove("s1", "10.0.0.2:80"),
            add("s1", "10.0.0.9:80"),
            add("new", "10.0.0.5:80"),
            remove("s2", "10.0.0.1:80"),
            remove("s2", "10.0.0.2:80"),
            remove("s2", "10.0.0.3:80"),
            add("s3", "10.0.0.1:80"),
            remove("nothere", "10.0.0.1:80"),
        ];
        let s2 = s1.apply(&changes, 9);
        assert_eq!(s2.index, 9);
        let mut expected = table(&s1);
        expected.retain(|(n, a)| !(n == "s1" && a == "10.0.0.2:80") && n != "s2");
        expected.push(("s1".into(), "10.0.0.9:80".into()));
        expected.push(("new".into(), "10.0.0.5:80".into()));
        expected.sort();
        assert_eq!(table(&s2), expected);
        assert_eq!(s2.endpoint_count(), expected.len());
        assert!(s2.service(&name("s2")).is_none(), "an emptied service goes");
        // Untouched services are the same sets, shared.
        let untouched = name("s50");
        assert!(std::ptr::eq(
            s1.service(&untouched).unwrap(),
            s2.service(&untouched).unwrap()
        ));
        let shared = (0..SHARDS)
            .filter(|&i| Arc::ptr_eq(&s1.shards[i], &s2.shards[i]))
            .count();
        assert!(
            shared >= SHARDS - 4,
            "only the touched shards are copied: {shared}"
        );
    }

    #[test]
    fn a_changed_service_keeps_its_turn_and_its_loads() {
        let s1 = Snapshot::from_doc(
            &doc(
                true,
                &[
                    ("a", "10.0.0.1:80"),
                    ("a", "10.0.0.2:80"),
                    ("a", "10.0.0.3:80"),
                ],
            ),
            &Snapshot::default(),
        );
        let set = s1.service(&name("a")).unwrap();
        let first = set.pick(Balance::RoundRobin, &[], |_| true).unwrap().addr;
        let load = set.find("10.0.0.3:80".parse().unwrap()).unwrap().begin();
        let s2 = s1.apply(&[add("a", "10.0.0.4:80")], 2);
        let set2 = s2.service(&name("a")).unwrap();
        assert_eq!(
            set2.find("10.0.0.3:80".parse().unwrap())
                .unwrap()
                .in_flight(),
            1
        );
        let second = set2.pick(Balance::RoundRobin, &[], |_| true).unwrap().addr;
        assert_ne!(first, second, "round robin goes on, not from the start");
        drop(load);
        // A whole document keeps the turn too.
        let s3 = Snapshot::from_doc(
            &doc(true, &[("a", "10.0.0.1:80"), ("a", "10.0.0.2:80")]),
            &s2,
        );
        assert_eq!(s3.service(&name("a")).unwrap().position(), 2);
    }

    #[test]
    fn changes_of_a_cold_tower_keep_the_carry_over_until_warm() {
        let before = Snapshot::from_doc(
            &doc_of(1, true, &[("a", "10.0.0.1:80"), ("b", "10.0.0.3:80")]),
            &Snapshot::default(),
        );
        let cold = Snapshot::from_doc(&doc_of(2, false, &[("a", "10.0.0.9:80")]), &before);
        // The carried replica heartbeats to the new Tower: now its own...
        let c1 = cold.apply(&[add("a", "10.0.0.1:80"), add("b", "10.0.0.4:80")], 2);
        let copied = (0..SHARDS)
            .filter(|&i| !Arc::ptr_eq(&cold.inherited[i], &c1.inherited[i]))
            .count();
        assert_eq!(copied, 1, "only the shard of the replica no longer carried");
        assert_eq!(addrs(&c1, "a"), ["10.0.0.1:80", "10.0.0.9:80"]);
        assert_eq!(addrs(&c1, "b"), ["10.0.0.3:80", "10.0.0.4:80"]);
        // ...and at warm-up, only what was never heard of goes.
        let warm = c1.apply(&[Change::Warm], 3);
        assert_eq!(addrs(&warm, "a"), ["10.0.0.1:80", "10.0.0.9:80"]);
        assert_eq!(addrs(&warm, "b"), ["10.0.0.4:80"]);
        assert_eq!(warm.endpoint_count(), 3);
        let again = warm.apply(&[add("a", "10.0.0.1:80"), remove("b", "10.0.0.3:80")], 4);
        assert_eq!(
            table(&again),
            table(&warm),
            "a replayed change does nothing"
        );
    }
}
