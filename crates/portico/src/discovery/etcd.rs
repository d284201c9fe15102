//! An ingress watching etcd directly: the same list-then-watch as a Tower
//! over etcd, feeding the same lock-free snapshot as the Tower watch: a
//! listing replaces it, each watch answer's events change only the
//! services they name. While
//! etcd is away the last snapshot keeps serving and `/readyz` says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Watched;
use crate::etcd::keys::{Cache, EndpointKey, Layout};
use crate::etcd::watch::Sink;
use crate::etcd::{Event, KeyValue};
use crate::registry::admit::Admission;
use crate::registry::View;
use crate::services_doc::{Change, ServicesDoc};

#[derive(Debug)]
pub struct EtcdSource {
    layout: Layout,
    cache: Mutex<Cache>,
    watched: Watched,
}

impl EtcdSource {
    pub fn new(layout: Layout) -> Arc<Self> {
        Arc::new(Self {
            layout,
            cache: Mutex::new(Cache::default()),
            watched: Watched::default(),
        })
    }

    pub fn watched(&self) -> &Watched {
        &self.watched
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn install(&self, cache: &Cache) {
        // etcd is the whole truth: warm, and one epoch for its lifetime. The
        // lease's owner renews it; what is left is not ours to know, nor
        // needed to route.
        let view = View {
            index: cache.revision().max(0) as u64,
            epoch: 0,
            warm: true,
            // Keys anyone with write access may have put there: never a
            // link-local (metadata), multicast or unspecified endpoint.
            endpoints: cache
                .iter()
                .filter(|((_, addr), _)| Admission::default().serves(addr.ip()))
                .map(|((name, addr), _)| (name.clone(), *addr, Duration::ZERO))
                .collect(),
        };
        self.watched.install(&ServicesDoc::from(view));
    }
}

impl Sink for EtcdSource {
    fn replace(&self, kvs: &[KeyValue], revision: i64) {
        let mut cache = self.cache();
        cache.replace(&self.layout, kvs, revision);
        self.install(&cache);
    }

    fn apply(&self, events: &[Event], revision: i64) {
        let mut cache = self.cache();
        // The keys the events name, and whether each was there before.
        let mut before: HashMap<EndpointKey, bool> = HashMap::new();
        for ev in events {
            if let Some(key) = self.layout.parse(&ev.kv.key) {
                let was = cache.get(&key).is_some();
                before.entry(key).or_insert(was);
            }
        }
        if !cache.apply(&self.layout, events, revision) {
            return;
        }
        let changes: Vec<Change> = before
            .into_iter()
            .filter(|((_, addr), _)| Admission::default().serves(addr.ip()))
            .filter_map(|(key, was)| {
                let is = cache.get(&key).is_some();
                let (service, addr) = key;
                match (was, is) {
                    (false, true) => Some(Change::Add {
                        service,
                        addr,
                        ttl_ms: 0,
                    }),
                    (true, false) => Some(Change::Remove { service, addr }),
                    _ => None,
                }
            })
            .collect();
        let index = cache.revision().max(0) as u64;
        drop(cache);
        self.watched.apply(&changes, index);
    }

    fn revision(&self) -> i64 {
        self.cache().revision()
    }

    fn set_current(&self, current: bool) {
        if current {
            self.watched.mark_synced();
        } else {
            self.watched.set_unsynced();
        }
    }
}
