//! A Tower over etcd: which registrations it serves, and what it still owes
//! etcd. Pure: the time is passed in, and the writes to etcd come out as
//! jobs whose outcomes are passed back, so every race with etcd (a write in
//! flight while the workload deregisters, a lease lost, a store that comes
//! back) is a unit test.
//!
//! Two sources meet here:
//! - the cache of etcd (every Tower's registrations), fed by list-then-watch;
//! - the registrations this Tower owns: those its workloads heartbeat to it.
//!   Each is a key bound to its own lease; a heartbeat renews the lease, and
//!   re-writes the key when etcd no longer has it.
//!
//! A registration is served when etcd has it, or when this Tower owns it and
//! etcd has not confirmed it yet (just registered, or etcd is down): a
//! workload's REGISTER is answered at once and never waits on etcd. One this
//! Tower removed (DEREGISTER, or its heartbeats stopped) is hidden at once,
//! before etcd confirms, so a re-list during an outage cannot bring it back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::etcd::keys::{Cache, EndpointKey, Held, Layout};
use crate::etcd::{Event, KeyValue};

#[derive(Debug)]
struct Owned {
    expires: Instant,
    lease: Option<i64>,
    /// The etcd revision of this Tower's last write of the key.
    put_revision: Option<i64>,
    work: Work,
    /// Tells this registration from an earlier one of the same replica
    /// (deregistered, then registered again) whose write may still be in
    /// flight: that write's outcome is not this one's.
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    Idle,
    KeepAlive,
    Put,
}

/// What is owed etcd for a registration this Tower removed, and what was
/// done there that the watch may not show yet. The watch is often still
/// backing off after an outage when the owed writes go through; without
/// the second half its stale entry would serve the removed replica again
/// until it caught up.
#[derive(Debug, Default)]
struct Removal {
    /// Delete the key whatever lease holds it (DEREGISTER).
    delete_key: bool,
    /// Revoke these leases of ours (deletes the key only if still bound).
    leases: Vec<i64>,
    /// The key was deleted at this revision: a cached entry written at or
    /// before it is stale.
    deleted_at: Option<i64>,
    /// Leases of ours that etcd no longer has: an entry bound to one is
    /// stale.
    dead: Vec<i64>,
    /// The watch has seen all of the above once the cache is at this
    /// revision (0: etcd did not say; the cached entry going decides).
    settles_at: i64,
}

impl Removal {
    /// Whether the cache's entry for the key is one this removal took (or
    /// is taking) away.
    fn hides(&self, held: Held) -> bool {
        self.delete_key
            || self.leases.contains(&held.lease)
            || self.dead.contains(&held.lease)
            || self.deleted_at.is_some_and(|rev| held.mod_revision <= rev)
    }

    /// Whether a write is owed for it.
    fn owes(&self) -> bool {
        self.delete_key || !self.leases.is_empty()
    }

    /// Nothing owed and nothing left for it to hide.
    fn settled(&self, cache: &Cache, key: &EndpointKey) -> bool {
        !self.owes()
            && cache.revision() >= self.settles_at
            && cache.get(key).is_none_or(|held| !self.hides(held))
    }
}

/// A write for the etcd writer to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Bind the key to a live lease: `reuse` if etcd still has it, else a
    /// new one.
    Put {
        key: EndpointKey,
        reuse: Option<i64>,
    },
    KeepAlive {
        key: EndpointKey,
        lease: i64,
    },
    Remove {
        key: EndpointKey,
        delete_key: bool,
        leases: Vec<i64>,
    },
}

impl Job {
    /// The registration the job is for.
    pub fn key(&self) -> &EndpointKey {
        match self {
            Job::Put { key, .. } | Job::KeepAlive { key, .. } | Job::Remove { key, .. } => key,
        }
    }
}

/// How a job went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Put {
        lease: i64,
        revision: i64,
    },
    KeepAlive {
        alive: bool,
        /// etcd's revision when it answered (0 if unknown).
        revision: i64,
    },
    Removed {
        /// The revision of the delete, if the job deleted the key.
        deleted_at: Option<i64>,
        /// etcd's revision after the job (0 if unknown).
        revision: i64,
    },
    /// etcd could not be reached or refused; the job is owed again.
    Failed,
}

#[derive(Debug)]
pub struct StoreState {
    pub layout: Layout,
    ttl: Duration,
    cache: Cache,
    current: bool,
    ever_current: bool,
    owned: HashMap<EndpointKey, Owned>,
    removals: HashMap<EndpointKey, Removal>,
    /// Keys with a job in flight, and the generation of the registration
    /// it was for. One job per key at a time: writes to one key never race
    /// each other in etcd.
    busy: HashMap<EndpointKey, Option<u64>>,
    next_generation: u64,
}

impl StoreState {
    pub fn new(layout: Layout, ttl: Duration) -> Self {
        Self {
            layout,
            ttl,
            cache: Cache::default(),
            current: false,
            ever_current: false,
            owned: HashMap::new(),
            removals: HashMap::new(),
            busy: HashMap::new(),
            next_generation: 0,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the cache reflects etcd now.
    pub fn is_current(&self) -> bool {
        self.current
    }

    pub fn ever_current(&self) -> bool {
        self.ever_current
    }

    pub fn revision(&self) -> i64 {
        self.cache.revision()
    }

    pub fn owned_count(&self) -> usize {
        self.owned.len()
    }

    /// Writes owed to etcd (pending or in flight).
    pub fn backlog(&self) -> usize {
        self.owned.values().filter(|o| o.work != Work::Idle).count()
            + self.removals.values().filter(|r| r.owes()).count()
    }

    /// Whether `key` is served now.
    pub fn visible(&self, key: &EndpointKey, now: Instant) -> bool {
        let removal = self.removals.get(key);
        if removal.is_some_and(|r| r.delete_key) {
            return false;
        }
        if let Some(o) = self.owned.get(key) {
            let unconfirmed = o.put_revision.is_none_or(|rev| self.cache.revision() < rev);
            if o.expires > now && unconfirmed {
                return true;
            }
        }
        match self.cache.get(key) {
            Some(held) => !removal.is_some_and(|r| r.hides(held)),
            None => false,
        }
    }

    /// Every registration served now.
    pub fn visible_keys(&self, now: Instant) -> Vec<EndpointKey> {
        let mut keys: Vec<EndpointKey> = self
            .cache
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| self.visible(k, now))
            .collect();
        keys.extend(
            self.owned
                .keys()
                .filter(|k| self.cache.get(k).is_none() && self.visible(k, now))
                .cloned(),
        );
        keys
    }

    /// A REGISTER (first or heartbeat) received by this Tower.
    pub fn register(&mut self, key: EndpointKey, now: Instant) {
        let expires = now + self.ttl;
        // A registration removed a moment ago and not yet deleted in etcd:
        // the delete must not land after the new write.
        if let Some(r) = self.removals.get_mut(&key) {
            if !self.busy.contains_key(&key) {
                r.delete_key = false;
                if r.settled(&self.cache, &key) {
                    self.removals.remove(&key);
                }
            }
        }
        let in_etcd = self.cache.get(&key).is_some();
        let cache_rev = self.cache.revision();
        let generation = self.next_generation;
        let o = self.owned.entry(key).or_insert_with(|| Owned {
            expires,
            lease: None,
            put_revision: None,
            work: Work::Put,
            generation,
        });
        if o.generation == generation {
            self.next_generation += 1;
        }
        o.expires = expires;
        let wanted = match (o.lease, o.put_revision) {
            // Our write was seen by the watch, and since removed by someone
            // (a DEREGISTER at another Tower, a lease that ran out): a
            // heartbeat means the workload is alive, so write it again.
            (Some(_), Some(rev)) if cache_rev >= rev && !in_etcd => {
                o.put_revision = None;
                Work::Put
            }
            (Some(_), _) => Work::KeepAlive,
            (None, _) => Work::Put,
        };
        o.work = o.work.max(wanted);
    }

    /// A DEREGISTER received by this Tower. False if it serves no such
    /// registration.
    pub fn deregister(&mut self, key: &EndpointKey, now: Instant) -> bool {
        let found = self.visible(key, now) || self.owned.contains_key(key);
        if !found {
            return false;
        }
        let lease = self.owned.remove(key).and_then(|o| o.lease);
        let r = self.removals.entry(key.clone()).or_default();
        r.delete_key = true;
        r.leases.extend(lease);
        true
    }

    /// Drop owned registrations whose heartbeats stopped; their leases are
    /// revoked (which deletes the key only if it is still ours). True if
    /// any was served.
    pub fn reap(&mut self, now: Instant) -> bool {
        let expired: Vec<EndpointKey> = self
            .owned
            .iter()
            .filter(|(_, o)| o.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut changed = false;
        for key in expired {
            let was_visible = self.visible(&key, now);
            if let Some(lease) = self.owned.remove(&key).and_then(|o| o.lease) {
                self.removals
                    .entry(key.clone())
                    .or_default()
                    .leases
                    .push(lease);
            }
            changed |= was_visible != self.visible(&key, now);
        }
        changed
    }

    /// When the next owned registration expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.owned.values().map(|o| o.expires).min()
    }

    /// A full listing from etcd.
    pub fn replace(&mut self, kvs: &[KeyValue], revision: i64) {
        let layout = self.layout.clone();
        self.cache.replace(&layout, kvs, revision);
        self.forget_settled();
        // What we wrote and etcd no longer has (a lost lease, a store that
        // lost its data) is written again.
        for (key, o) in &mut self.owned {
            let confirmed = o.put_revision.is_some_and(|rev| revision >= rev);
            if confirmed && self.cache.get(key).is_none() {
                o.put_revision = None;
                o.work = Work::Put;
            }
        }
    }

    pub fn apply(&mut self, events: &[Event], revision: i64) {
        let layout = self.layout.clone();
        self.cache.apply(&layout, events, revision);
        self.forget_settled();
    }

    /// `apply`, and the keys of the events whose visibility it changed,
    /// each with whether it is served now: the Tower shows or hides those
    /// alone rather than recomputing every key.
    pub fn apply_seen(
        &mut self,
        events: &[Event],
        revision: i64,
        now: Instant,
    ) -> Vec<(EndpointKey, bool)> {
        let mut keys: Vec<EndpointKey> = events
            .iter()
            .filter_map(|ev| self.layout.parse(&ev.kv.key))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let was: Vec<bool> = keys.iter().map(|k| self.visible(k, now)).collect();
        self.apply(events, revision);
        keys.into_iter()
            .zip(was)
            .filter_map(|(k, was)| {
                let is = self.visible(&k, now);
                (is != was).then_some((k, is))
            })
            .collect()
    }

    fn forget_settled(&mut self) {
        let cache = &self.cache;
        self.removals.retain(|key, r| !r.settled(cache, key));
    }

    /// A lease of ours for `key` that etcd no longer has, found at
    /// `revision`.
    fn bury(&mut self, key: &EndpointKey, lease: i64, revision: i64) {
        let r = self.removals.entry(key.clone()).or_default();
        if !r.dead.contains(&lease) {
            r.dead.push(lease);
        }
        r.settles_at = r.settles_at.max(revision);
        if r.settled(&self.cache, key) {
            self.removals.remove(key);
        }
    }

    /// Whether the cache reflects etcd now. On a return, every lease this
    /// Tower holds is checked (etcd may have lost or expired it meanwhile).
    pub fn set_current(&mut self, current: bool) -> bool {
        let returned = current && !self.current;
        self.current = current;
        if returned {
            self.ever_current = true;
            for o in self.owned.values_mut() {
                if o.lease.is_some() {
                    o.work = o.work.max(Work::KeepAlive);
                }
            }
        }
        returned
    }

    /// The writes owed now, each marked in flight until `complete`.
    pub fn take_work(&mut self, max: usize) -> Vec<Job> {
        let mut jobs = Vec::new();
        for (key, r) in &self.removals {
            if jobs.len() >= max {
                return jobs;
            }
            if r.owes() && !self.busy.contains_key(key) {
                self.busy.insert(key.clone(), None);
                jobs.push(Job::Remove {
                    key: key.clone(),
                    delete_key: r.delete_key,
                    leases: r.leases.clone(),
                });
            }
        }
        for (key, o) in &mut self.owned {
            if jobs.len() >= max {
                break;
            }
            // A removal of the same key goes first (it was taken above).
            if o.work == Work::Idle || self.busy.contains_key(key) {
                continue;
            }
            let job = match (o.work, o.lease) {
                (Work::KeepAlive, Some(lease)) => Job::KeepAlive {
                    key: key.clone(),
                    lease,
                },
                _ => Job::Put {
                    key: key.clone(),
                    reuse: o.lease,
                },
            };
            self.busy.insert(key.clone(), Some(o.generation));
            o.work = Work::Idle;
            jobs.push(job);
        }
        jobs
    }

    /// The outcome of a job from `take_work`.
    pub fn complete(&mut self, job: &Job, outcome: Outcome) {
        let generation = self.busy.remove(job.key()).flatten();
        // The registration the job was for, if it is still this Tower's.
        let same = |o: &&mut Owned| Some(o.generation) == generation;
        match (job, outcome) {
            (Job::Remove { .. }, Outcome::Failed) => {}
            (
                Job::Remove {
                    key,
                    delete_key,
                    leases,
                },
                outcome,
            ) => {
                if let Some(r) = self.removals.get_mut(key) {
                    if *delete_key {
                        r.delete_key = false;
                    }
                    if let Outcome::Removed {
                        deleted_at,
                        revision,
                    } = outcome
                    {
                        r.deleted_at = r.deleted_at.max(deleted_at);
                        r.settles_at = r.settles_at.max(revision);
                    }
                    r.leases.retain(|l| !leases.contains(l));
                    r.dead.extend(leases);
                    if r.settled(&self.cache, key) {
                        self.removals.remove(key);
                    }
                }
            }
            (Job::Put { key, reuse }, Outcome::Put { lease, revision }) => {
                if let Some(old) = reuse.filter(|old| *old != lease) {
                    self.bury(key, old, revision);
                }
                match self.owned.get_mut(key).filter(same) {
                    Some(o) => {
                        o.lease = Some(lease);
                        o.put_revision = Some(revision);
                        // The lease was just granted or renewed: heartbeats
                        // during the write are answered by it.
                        o.work = Work::Idle;
                    }
                    // Deregistered or expired while the write was in flight
                    // (and perhaps registered again since): take it back.
                    None => self
                        .removals
                        .entry(key.clone())
                        .or_default()
                        .leases
                        .push(lease),
                }
            }
            (Job::KeepAlive { key, lease }, Outcome::KeepAlive { alive, revision }) => {
                if alive {
                    return;
                }
                if let Some(o) = self.owned.get_mut(key).filter(same) {
                    o.lease = None;
                    o.put_revision = None;
                    o.work = Work::Put;
                }
                self.bury(key, *lease, revision);
            }
            (Job::Put { key, .. } | Job::KeepAlive { key, .. }, _) => {
                if let Some(o) = self.owned.get_mut(key).filter(same) {
                    let retry = if matches!(job, Job::Put { .. }) {
                        Work::Put
                    } else {
                        Work::KeepAlive
                    };
                    o.work = o.work.max(retry);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_wire::ServiceName;

    const TTL: Duration = Duration::from_secs(30);

    fn key(n: &str, a: &str) -> EndpointKey {
        (ServiceName::parse(n).unwrap(), a.parse().unwrap())
    }

    fn state() -> (StoreState, Instant) {
        (StoreState::new(Layout::new("/p"), TTL), Instant::now())
    }

    fn kv(s: &StoreState, k: &EndpointKey, lease: i64, rev: i64) -> KeyValue {
        KeyValue {
            key: s.layout.key(&k.0, k.1),
            value: Vec::new(),
            mod_revision: rev,
            lease,
        }
    }

    fn put_event(s: &StoreState, k: &EndpointKey, lease: i64, rev: i64) -> Event {
        Event {
            kind: None,
            kv: kv(s, k, lease, rev),
        }
    }

    fn delete_event(s: &StoreState, k: &EndpointKey, rev: i64) -> Event {
        Event {
            kind: Some("DELETE".into()),
            kv: kv(s, k, 0, rev),
        }
    }

    /// A state where `k` is registered here, written to etcd with lease 7
    /// at revision 5, and seen back by the watch.
    fn confirmed(k: &EndpointKey) -> (StoreState, Instant) {
        let (mut s, now) = state();
        s.register(k.clone(), now);
        settle(&mut s, 7, 5);
        s.apply(&[put_event(&s, k, 7, 5)], 5);
        (s, now)
    }

    /// Run every owed job against a pretend etcd that grants lease `lease`
    /// and writes at `revision`.
    fn settle(s: &mut StoreState, lease: i64, revision: i64) -> Vec<Job> {
        let jobs = s.take_work(100);
        for j in &jobs {
            let outcome = match j {
                Job::Put { .. } => Outcome::Put { lease, revision },
                Job::KeepAlive { .. } => Outcome::KeepAlive {
                    alive: true,
                    revision,
                },
                Job::Remove { delete_key, .. } => Outcome::Removed {
                    deleted_at: delete_key.then_some(revision),
                    revision,
                },
            };
            s.complete(j, outcome);
        }
        jobs
    }

    #[test]
    fn a_registration_is_served_at_once_and_written_once() {
        let (mut s, now) = state();
        let k = key("web", "10.0.0.1:80");
        s.register(k.clone(), now);
        assert!(s.visible(&k, now), "served before etcd confirms");
        let jobs = s.take_work(10);
        assert_eq!(
            jobs,
            [Job::Put {
                key: k.clone(),
                reuse: None
            }]
        );
        assert!(
            s.take_work(10).is_empty(),
            "a job in flight is not handed out twice"
        );
        s.register(k.clone(), now);
        assert!(
            s.take_work(10).is_empty(),
            "a heartbeat during the write waits for it"
        );
        s.complete(
            &jobs[0],
            Outcome::Put {
                lease: 7,
                revision: 5,
            },
        );
        assert!(s.take_work(10).is_empty(), "the write renewed the lease");
        assert!(s.visible(&k, now), "still served while the watch lags");
        s.apply(&[put_event(&s, &k, 7, 5)], 5);
        assert!(s.visible(&k, now));
        assert_eq!(s.visible_keys(now), [k]);
    }

    #[test]
    fn heartbeats_keep_the_lease_alive_and_a_lost_lease_is_written_again() {
        let k = key("web", "10.0.0.1:80");
        let (mut s, now) = confirmed(&k);
        s.register(k.clone(), now + Duration::from_secs(10));
        let jobs = s.take_work(10);
        assert_eq!(
            jobs,
            [Job::KeepAlive {
                key: k.clone(),
                lease: 7
            }]
        );
        s.complete(
            &jobs[0],
            Outcome::KeepAlive {
                alive: false,
                revision: 6,
            },
        );
        assert_eq!(
            s.take_work(10),
            [Job::Put {
                key: k.clone(),
                reuse: None
            }]
        );
    }

    #[test]
    fn a_key_deleted_elsewhere_is_written_again_on_the_next_heartbeat() {
        let k = key("web", "10.0.0.1:80");
        let (mut s, now) = confirmed(&k);
        s.apply(&[delete_event(&s, &k, 6)], 6);
        assert!(!s.visible(&k, now), "a delete in etcd is seen at once");
        s.register(k.clone(), now);
        assert!(s.visible(&k, now), "the heartbeat brings it back");
        assert_eq!(
            s.take_work(10),
            [Job::Put {
                key: k,
                reuse: Some(7)
            }]
        );
    }

    #[test]
    fn deregister_hides_at_once_and_deletes_the_key() {
        let k = key("web", "10.0.0.1:80");
        let (mut s, now) = confirmed(&k);
        assert!(s.deregister(&k, now));
        assert!(!s.visible(&k, now));
        assert!(!s.deregister(&k, now), "twice is not found");
        // etcd is down: the delete fails and stays owed; a re-list that
        // still has the key does not bring it back.
        let jobs = s.take_work(10);
        assert_eq!(
            jobs,
            [Job::Remove {
                key: k.clone(),
                delete_key: true,
                leases: vec![7]
            }]
        );
        s.complete(&jobs[0], Outcome::Failed);
        s.replace(&[kv(&s, &k, 7, 5)], 5);
        assert!(!s.visible(&k, now));
        let jobs = s.take_work(10);
        s.complete(
            &jobs[0],
            Outcome::Removed {
                deleted_at: Some(6),
                revision: 6,
            },
        );
        assert_eq!(s.backlog(), 0);
        assert!(s.take_work(10).is_empty());
        // The watch is still backing off: its stale entry stays hidden.
        assert!(!s.visible(&k, now), "a deleted replica came back");
        assert!(!s.deregister(&k, now));
        s.apply(&[delete_event(&s, &k, 6)], 6);
        assert!(s.visible_keys(now).is_empty());
        assert!(s.removals.is_empty(), "nothing kept once the watch saw it");
    }

    #[test]
    fn a_deregistration_elsewhere_registered_is_deleted_here_too() {
        let (mut s, now) = state();
        let k = key("web", "10.0.0.1:80");
        s.replace(&[kv(&s, &k, 99, 3)], 3);
        assert!(s.visible(&k, now));
        assert!(s.deregister(&k, now));
        assert_eq!(
            s.take_work(10),
            [Job::Remove {
                key: k,
                delete_key: true,
                leases: vec![]
            }]
        );
    }

    #[test]
    fn expiry_revokes_only_our_lease() {
        let k = key("web", "10.0.0.1:80");
        let (mut s, now) = confirmed(&k);
        let later = now + TTL;
        assert!(s.reap(later));
        assert!(!s.visible(&k, later), "our expired lease hides the key");
        assert_eq!(
            s.take_work(10),
            [Job::Remove {
                key: k.clone(),
                delete_key: false,
                leases: vec![7]
            }]
        );
        // Meanwhile the workload moved to another Tower, which re-bound the
        // key to its own lease: that is served, our revoke does not touch it.
        s.apply(&[put_event(&s, &k, 42, 6)], 6);
        assert!(s.visible(&k, later));
    }

    #[test]
    fn a_write_that_lands_after_a_deregister_is_taken_back() {
        let (mut s, now) = state();
        let k = key("web", "10.0.0.1:80");
        s.register(k.clone(), now);
        let jobs = s.take_work(10);
        assert!(s.deregister(&k, now));
        s.complete(
            &jobs[0],
            Outcome::Put {
                lease: 7,
                revision: 5,
            },
        );
        let jobs = s.take_work(10);
        assert_eq!(
            jobs,
            [Job::Remove {
                key: k.clone(),
                delete_key: true,
                leases: vec![7]
            }]
        );
        // A re-register while the removal is in flight waits for it.
        s.register(k.clone(), now);
        assert!(s.take_work(10).is_empty());
        s.complete(
            &jobs[0],
            Outcome::Removed {
                deleted_at: Some(6),
                revision: 6,
            },
        );
        assert_eq!(
            s.take_work(10),
            [Job::Put {
                key: k,
                reuse: None
            }]
        );
    }

    #[test]
    fn a_relist_that_lost_our_key_writes_it_again_and_keeps_serving_it() {
        let k = key("web", "10.0.0.1:80");
        let (mut s, now) = confirmed(&k);
        // etcd came back without its data.
        s.replace(&[], 9);
        assert!(s.visible(&k, now), "still heartbeated here: served");
        assert_eq!(
            s.take_work(10),
            [Job::Put {
                key: k,
                reuse: Some(7)
            }]
        );
    }

    #[test]
    fn a_return_of_etcd_checks_every_lease() {
        let (mut s, now) = state();
        let a = key("web", "10.0.0.1:80");
        let b = key("web", "10.0.0.2:80");
        s.register(a.clone(), now);
        s.register(b.clone(), now);
        settle(&mut s, 7, 5);
        assert!(s.set_current(true));
        let mut jobs = s.take_work(10);
        jobs.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
        assert_eq!(
            jobs,
            [
                Job::KeepAlive { key: a, lease: 7 },
                Job::KeepAlive { key: b, lease: 7 }
            ]
        );
        assert!(!s.set_current(true), "no change, no checks");
    }

    #[test]
    fn other_towers_registrations_come_and_go_with_etcd() {
        let (mut s, now) = state();
        let k = key("api", "[::1]:9000");
        s.apply(&[put_event(&s, &k, 11, 4)], 4);
        assert_eq!(s.visible_keys(now), std::slice::from_ref(&k));
        // No expiry here: the other Tower's lease decides.
        s.reap(now + TTL * 10);
        assert!(s.visible(&k, now + TTL * 10));
        s.apply(&[delete_event(&s, &k, 5)], 5);
        assert!(s.visible_keys(now).is_empty());
    }

    /// A pretend etcd for the model test: keys bound to leases, a revision,
    /// and the watch events it owes.
    #[derive(Default)]
    struct FakeEtcd {
        up: bool,
        revision: i64,
        next_lease: i64,
        leases: std::collections::HashSet<i64>,
        /// Key to (lease, mod revision).
        keys: HashMap<EndpointKey, (i64, i64)>,
        events: Vec<(Event, i64)>,
    }

    impl FakeEtcd {
        fn put(&mut self, s: &StoreState, key: &EndpointKey, lease: i64) -> i64 {
            self.revision += 1;
            self.keys.insert(key.clone(), (lease, self.revision));
            self.events
                .push((put_event(s, key, lease, self.revision), self.revision));
            self.revision
        }

        fn delete(&mut self, s: &StoreState, key: &EndpointKey) {
            if self.keys.remove(key).is_some() {
                self.revision += 1;
                self.events
                    .push((delete_event(s, key, self.revision), self.revision));
            }
        }

        fn drop_lease(&mut self, s: &StoreState, lease: i64) {
            self.leases.remove(&lease);
            let bound: Vec<EndpointKey> = self
                .keys
                .iter()
                .filter(|(_, (l, _))| *l == lease)
                .map(|(k, _)| k.clone())
                .collect();
            for k in bound {
                self.delete(s, &k);
            }
        }

        fn run(&mut self, s: &StoreState, job: &Job) -> Outcome {
            if !self.up {
                return Outcome::Failed;
            }
            match job {
                Job::Put { key, reuse } => {
                    let lease = match reuse {
                        Some(l) if self.leases.contains(l) => *l,
                        _ => {
                            self.next_lease += 1;
                            self.leases.insert(self.next_lease);
                            self.next_lease
                        }
                    };
                    let revision = self.put(s, key, lease);
                    Outcome::Put { lease, revision }
                }
                Job::KeepAlive { lease, .. } => Outcome::KeepAlive {
                    alive: self.leases.contains(lease),
                    revision: self.revision,
                },
                Job::Remove {
                    key,
                    delete_key,
                    leases,
                } => {
                    if *delete_key {
                        self.delete(s, key);
                    }
                    let deleted_at = delete_key.then_some(self.revision);
                    for l in leases {
                        self.drop_lease(s, *l);
                    }
                    Outcome::Removed {
                        deleted_at,
                        revision: self.revision,
                    }
                }
            }
        }
    }

    /// Random registrations, deregistrations, expiries, outages, lost
    /// leases and re-lists against a pretend etcd. Whenever etcd is up and
    /// every owed write and watch event has gone through (after one round
    /// of heartbeats), etcd holds exactly the live registrations, and the
    /// Tower serves exactly those: nothing lost, nothing resurrected.
    #[test]
    fn a_tower_and_etcd_converge_whatever_happens_between() {
        for seed in 0..std::env::var("STORE_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300)
        {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (mut s, start) = state();
            let mut etcd = FakeEtcd {
                up: true,
                ..FakeEtcd::default()
            };
            let keys: Vec<EndpointKey> = (1..=6)
                .map(|i| {
                    key(
                        if i % 2 == 0 { "a" } else { "b" },
                        &format!("10.0.0.{i}:80"),
                    )
                })
                .collect();
            let mut now = start;
            let mut in_flight: Vec<Job> = Vec::new();
            for _ in 0..300 {
                let k = &keys[rng.usize(..keys.len())];
                match rng.u8(..100) {
                    0..=29 => s.register(k.clone(), now),
                    30..=39 => {
                        s.deregister(k, now);
                    }
                    40..=49 => now += Duration::from_secs(rng.u64(1..20)),
                    50..=54 => {
                        s.reap(now);
                    }
                    55..=59 => {
                        etcd.up = !etcd.up;
                        s.set_current(etcd.up);
                    }
                    60..=62 => {
                        // etcd loses a lease (expired while this Tower was cut off).
                        if let Some(&l) = etcd.leases.iter().next() {
                            etcd.drop_lease(&s, l);
                        }
                    }
                    63..=65 if etcd.up => {
                        // The watch re-lists.
                        let kvs: Vec<KeyValue> = etcd
                            .keys
                            .iter()
                            .map(|(k, (l, rev))| kv(&s, k, *l, *rev))
                            .collect();
                        etcd.events.clear();
                        s.replace(&kvs, etcd.revision);
                    }
                    66..=79 => in_flight.extend(s.take_work(rng.usize(1..4))),
                    80..=89 if !in_flight.is_empty() => {
                        let job = in_flight.remove(rng.usize(..in_flight.len()));
                        let outcome = etcd.run(&s, &job);
                        s.complete(&job, outcome);
                    }
                    _ if etcd.up && !etcd.events.is_empty() => {
                        let n = rng.usize(1..=etcd.events.len());
                        let batch: Vec<(Event, i64)> = etcd.events.drain(..n).collect();
                        let rev = batch.last().map_or(0, |b| b.1);
                        let events: Vec<Event> = batch.into_iter().map(|b| b.0).collect();
                        s.apply(&events, rev);
                    }
                    _ => {}
                }
                // Only this Tower registers here, so what it no longer owns
                // (deregistered, expired) is never served again: not from
                // a cache the watch has yet to bring up to date either.
                for k in keys.iter().filter(|k| !s.owned.contains_key(*k)) {
                    assert!(!s.visible(k, now), "seed {seed}: {k:?} came back");
                }
            }
            // Quiesce: etcd up, in-flight writes finish, a round of
            // heartbeats from whatever is still alive, everything drains.
            etcd.up = true;
            s.set_current(true);
            for job in std::mem::take(&mut in_flight) {
                let outcome = etcd.run(&s, &job);
                s.complete(&job, outcome);
            }
            s.reap(now);
            let alive: Vec<EndpointKey> = keys
                .iter()
                .filter(|k| s.owned.get(*k).is_some_and(|o| o.expires > now))
                .cloned()
                .collect();
            for k in &alive {
                s.register(k.clone(), now);
            }
            for _ in 0..20 {
                for job in s.take_work(100) {
                    let outcome = etcd.run(&s, &job);
                    s.complete(&job, outcome);
                }
                let events: Vec<(Event, i64)> = etcd.events.drain(..).collect();
                if let Some(rev) = events.last().map(|e| e.1) {
                    s.apply(&events.into_iter().map(|e| e.0).collect::<Vec<_>>(), rev);
                }
            }
            let mut in_etcd: Vec<EndpointKey> = etcd.keys.keys().cloned().collect();
            in_etcd.sort();
            let mut served = s.visible_keys(now);
            served.sort();
            let mut want = alive.clone();
            want.sort();
            assert_eq!(
                in_etcd, want,
                "seed {seed}: etcd holds the live registrations"
            );
            assert_eq!(served, want, "seed {seed}: the Tower serves them");
            assert_eq!(s.backlog(), 0, "seed {seed}: nothing owed");
            assert!(
                s.removals.is_empty(),
                "seed {seed}: nothing kept once the watch has caught up"
            );
        }
    }
}
