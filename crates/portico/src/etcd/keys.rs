//! The key layout in etcd and the cache a list-then-watch keeps of it. Pure:
//! no I/O, so every edge (foreign keys, deletes of unknown keys, a re-list
//! that drops keys) is unit-tested.
//!
//! Layout: one key per endpoint, `<prefix>/services/<name>/<ip>:<port>`
//! (IPv6 as `[::1]:80`), bound to the lease of the Tower that registered it.
//! The address is the last segment, so a name may itself contain `/`. The
//! value is informational JSON (`{"service","addr","tower"}`); the key is
//! the truth.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use portico_wire::ServiceName;

use super::{Event, KeyValue};

/// A registration: a service name and one replica's address.
pub type EndpointKey = (ServiceName, SocketAddr);

#[derive(Debug, Clone)]
pub struct Layout {
    services: String,
}

impl Layout {
    /// `prefix` like `/portico/v1`; a trailing `/` is ignored.
    pub fn new(prefix: &str) -> Self {
        Self {
            services: format!("{}/services/", prefix.trim_end_matches('/')),
        }
    }

    /// Every registration lives under this.
    pub fn services_prefix(&self) -> &[u8] {
        self.services.as_bytes()
    }

    pub fn key(&self, name: &ServiceName, addr: SocketAddr) -> Vec<u8> {
        format!("{}{name}/{addr}", self.services).into_bytes()
    }

    /// The registration a key names; `None` for a key that is not one of
    /// ours (written by hand, say), which is then ignored.
    pub fn parse(&self, key: &[u8]) -> Option<EndpointKey> {
        let rest = key.strip_prefix(self.services.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (name, addr) = rest.rsplit_once('/')?;
        Some((ServiceName::parse(name).ok()?, addr.parse().ok()?))
    }

    pub fn value(name: &ServiceName, addr: SocketAddr, tower: &str) -> Vec<u8> {
        serde_json::json!({"service": name.as_str(), "addr": addr.to_string(), "tower": tower})
            .to_string()
            .into_bytes()
    }
}

/// What etcd holds for one registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// 0 for a key with no lease.
    pub lease: i64,
    pub mod_revision: i64,
}

/// The registrations under the prefix as of `revision`.
#[derive(Debug, Default)]
pub struct Cache {
    entries: BTreeMap<EndpointKey, Held>,
    revision: i64,
    /// Keys under the prefix that are not registrations, seen so far.
    pub foreign: u64,
}

impl Cache {
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn get(&self, key: &EndpointKey) -> Option<Held> {
        self.entries.get(key).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EndpointKey, &Held)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Replace everything with a fresh listing. True if anything changed.
    pub fn replace(&mut self, layout: &Layout, kvs: &[KeyValue], revision: i64) -> bool {
        let mut next = BTreeMap::new();
        for kv in kvs {
            match layout.parse(&kv.key) {
                Some(k) => {
                    next.insert(
                        k,
                        Held {
                            lease: kv.lease,
                            mod_revision: kv.mod_revision,
                        },
                    );
                }
                None => self.foreign += 1,
            }
        }
        let changed = next != self.entries;
        self.entries = next;
        self.revision = self.revision.max(revision);
        changed
    }

    /// Apply a watch answer's events. True if anything changed.
    pub fn apply(&mut self, layout: &Layout, events: &[Event], revision: i64) -> bool {
        let mut changed = false;
        for ev in events {
            let Some(k) = layout.parse(&ev.kv.key) else {
                self.foreign += 1;
                continue;
            };
            if ev.is_delete() {
                changed |= self.entries.remove(&k).is_some();
            } else {
                let held = Held {
                    lease: ev.kv.lease,
                    mod_revision: ev.kv.mod_revision,
                };
                changed |= self.entries.insert(k, held) != Some(held);
            }
            self.revision = self.revision.max(ev.kv.mod_revision);
        }
        self.revision = self.revision.max(revision);
        changed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn kv(layout: &Layout, n: &str, a: &str, lease: i64, rev: i64) -> KeyValue {
        KeyValue {
            key: layout.key(&name(n), a.parse().unwrap()),
            value: Vec::new(),
            mod_revision: rev,
            lease,
        }
    }

    #[test]
    fn keys_round_trip_including_ipv6_and_slashes_in_names() {
        let l = Layout::new("/portico/v1/");
        for (n, a) in [
            ("web", "127.0.0.1:8080"),
            ("team/api", "[::1]:80"),
            ("a", "[fe80::1]:1"),
        ] {
            let key = l.key(&name(n), a.parse().unwrap());
            assert!(key.starts_with(b"/portico/v1/services/"));
            assert_eq!(l.parse(&key), Some((name(n), a.parse().unwrap())));
        }
        assert_eq!(
            l.key(&name("web"), "10.0.0.1:80".parse().unwrap()),
            b"/portico/v1/services/web/10.0.0.1:80"
        );
        for foreign in [
            &b"/portico/v1/services/web"[..],
            b"/portico/v1/services/web/notanaddr",
            b"/portico/v1/other/web/10.0.0.1:80",
            b"/portico/v1/services//10.0.0.1:80",
            b"/portico/v1/services/bad|name/10.0.0.1:80",
            b"/portico/v1/services/web/\xff",
        ] {
            assert_eq!(
                l.parse(foreign),
                None,
                "{:?}",
                String::from_utf8_lossy(foreign)
            );
        }
    }

    #[test]
    fn the_cache_follows_lists_and_events() {
        let l = Layout::new("/p");
        let mut c = Cache::default();
        assert!(c.replace(
            &l,
            &[
                kv(&l, "a", "10.0.0.1:80", 5, 2),
                kv(&l, "a", "10.0.0.2:80", 5, 3)
            ],
            3
        ));
        assert_eq!(c.len(), 2);
        assert!(!c.replace(
            &l,
            &[
                kv(&l, "a", "10.0.0.1:80", 5, 2),
                kv(&l, "a", "10.0.0.2:80", 5, 3)
            ],
            3
        ));
        let del = Event {
            kind: Some("DELETE".into()),
            kv: kv(&l, "a", "10.0.0.1:80", 0, 4),
        };
        let put = Event {
            kind: None,
            kv: kv(&l, "b", "10.0.0.3:80", 9, 5),
        };
        assert!(c.apply(&l, &[del.clone(), put], 5));
        assert_eq!(c.revision(), 5);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.get(&(name("b"), "10.0.0.3:80".parse().unwrap())),
            Some(Held {
                lease: 9,
                mod_revision: 5
            })
        );
        // A delete of a key the cache does not have changes nothing.
        assert!(!c.apply(&l, &[del], 6));
        assert_eq!(c.revision(), 6);
        // A re-list is the whole truth: what it lacks is gone.
        assert!(c.replace(&l, &[kv(&l, "b", "10.0.0.3:80", 9, 5)], 7));
        assert_eq!(c.len(), 1);
        // Foreign keys are counted and skipped.
        let junk = KeyValue {
            key: b"/p/services/junk".to_vec(),
            value: Vec::new(),
            mod_revision: 8,
            lease: 0,
        };
        assert!(!c.apply(
            &l,
            &[Event {
                kind: None,
                kv: junk
            }],
            8
        ));
        assert_eq!(c.foreign, 1);
    }
}
