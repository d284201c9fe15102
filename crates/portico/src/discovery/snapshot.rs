//! The ingress's local endpoint table: one immutable snapshot, replaced as a
//! whole on each change and read by requests without locks. Pure: built
//! from the Tower's document, picked from with the balance policy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use portico_wire::ServiceName;

use crate::services_doc::ServicesDoc;

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

#[derive(Debug, Default)]
pub struct Snapshot {
    pub index: u64,
    pub epoch: u64,
    services: HashMap<ServiceName, ServiceSet>,
    /// Endpoints carried over from before a Tower restart, by service.
    inherited: HashMap<ServiceName, Vec<SocketAddr>>,
}

impl Snapshot {
    /// Build from the Tower's document. Replicas already known keep their
    /// state. A Tower that restarted (a new epoch) knows only the replicas
    /// that have heartbeated to it since; until it is warm (one TTL), the
    /// replicas it lacks are carried over from before the restart: their
    /// absence is not evidence of death. Within one run of the Tower its
    /// document is the whole truth, so a deregistration takes effect at once.
    pub fn from_doc(doc: &ServicesDoc, previous: &Snapshot) -> Snapshot {
        let mut services: HashMap<ServiceName, Vec<Arc<Endpoint>>> = HashMap::new();
        for (name, endpoints) in &doc.services {
            // The Tower validated the names; one that fails here is skipped.
            let Ok(name) = ServiceName::parse(name) else {
                continue;
            };
            let known = previous.services.get(&name);
            let list = services.entry(name).or_default();
            for e in endpoints {
                let addr = SocketAddr::new(e.ip, e.port);
                let endpoint = known
                    .and_then(|k| k.endpoints.iter().find(|p| p.addr == addr))
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(addr));
                list.push(endpoint);
            }
        }
        let mut inherited: HashMap<ServiceName, Vec<SocketAddr>> = HashMap::new();
        if !doc.warm {
            let restarted = doc.epoch != previous.epoch;
            for (name, set) in &previous.services {
                let carried_before = previous.inherited.get(name);
                for e in &set.endpoints {
                    let carry = restarted || carried_before.is_some_and(|c| c.contains(&e.addr));
                    let list = services.entry(name.clone()).or_default();
                    if carry && !list.iter().any(|x| x.addr == e.addr) {
                        list.push(e.clone());
                        inherited.entry(name.clone()).or_default().push(e.addr);
                    }
                }
            }
        }
        let services = services
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(name, mut list)| {
                list.sort_by_key(|e| e.addr);
                let set = ServiceSet {
                    endpoints: list,
                    next: AtomicUsize::new(0),
                };
                (name, set)
            })
            .collect();
        Snapshot {
            index: doc.index,
            epoch: doc.epoch,
            services,
            inherited,
        }
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &ServiceSet)> {
        self.services.iter()
    }

    pub fn service(&self, name: &ServiceName) -> Option<&ServiceSet> {
        self.services.get(name)
    }

    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
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
}
