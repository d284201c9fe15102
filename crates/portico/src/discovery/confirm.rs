//! Read your writes in watch mode. When the snapshot has no replica of a
//! service, the Tower may have registered one a moment ago that the watch
//! has not delivered yet; a request then asks the Tower once (a LOOKUP)
//! before answering 503. The questions are coalesced: at most one per
//! service is in flight, and the requests that come meanwhile share its
//! answer. A NOT_FOUND (or no answer) is remembered until the table
//! changes, and at most `REMEMBER`, so a flood of requests for an unknown
//! service costs the Tower one LOOKUP per table change or per second.
//!
//! The bookkeeping is pure, with the time passed in (`join`, `settle`);
//! `confirm` wraps it around the caller's question.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use portico_wire::ServiceName;
use tokio::sync::OnceCell;

/// How long a NOT_FOUND is believed while the table does not change (a
/// watch that is down changes nothing).
pub const REMEMBER: Duration = Duration::from_secs(1);

/// What the Tower said about a service the table lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A replica the watch has not delivered yet.
    Found(SocketAddr),
    /// NOT_FOUND, or no usable answer in time: the table stands.
    Absent,
}

#[derive(Debug)]
enum Entry {
    /// A question in flight; later requests wait for its answer. Should
    /// the asking request go away, a waiting one asks in its place
    /// (`OnceCell::get_or_init`).
    Asking(Arc<OnceCell<Answer>>),
    /// NOT_FOUND as of table `generation`, answered at `at`.
    Absent { generation: u64, at: Instant },
}

enum Join {
    Known(Answer),
    Wait(Arc<OnceCell<Answer>>),
}

/// The questions in flight and the answers remembered, by service. Holds
/// at most one entry per service a route names (NOT_FOUNDs of older
/// tables are dropped as new ones come).
#[derive(Debug, Default)]
pub struct Confirmations {
    entries: Mutex<HashMap<ServiceName, Entry>>,
}

impl Confirmations {
    /// What the Tower says of `service`, the table being at `generation`:
    /// remembered, shared with the question in flight, or got by `ask`.
    pub async fn confirm<F, Fut>(&self, service: &ServiceName, generation: u64, ask: F) -> Answer
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer>,
    {
        let cell = match self.join(service, generation, Instant::now()) {
            Join::Known(answer) => return answer,
            Join::Wait(cell) => cell,
        };
        let answer = *cell.get_or_init(ask).await;
        self.settle(service, &cell, answer, generation, Instant::now());
        answer
    }

    /// The remembered answer, or the question to wait on (a new one if none
    /// is in flight).
    fn join(&self, service: &ServiceName, generation: u64, now: Instant) -> Join {
        let mut entries = self.lock();
        match entries.get(service) {
            Some(Entry::Absent { generation: g, at })
                if *g == generation && now.saturating_duration_since(*at) < REMEMBER =>
            {
                return Join::Known(Answer::Absent)
            }
            Some(Entry::Asking(cell)) => return Join::Wait(cell.clone()),
            _ => {}
        }
        let cell = Arc::new(OnceCell::new());
        entries.insert(service.clone(), Entry::Asking(cell.clone()));
        Join::Wait(cell)
    }

    /// The question `cell` was answered: remember a NOT_FOUND, forget a
    /// replica (the watch brings it). Only the first of its waiters finds
    /// it still in place.
    fn settle(
        &self,
        service: &ServiceName,
        cell: &Arc<OnceCell<Answer>>,
        answer: Answer,
        generation: u64,
        now: Instant,
    ) {
        let mut entries = self.lock();
        let current =
            matches!(entries.get(service), Some(Entry::Asking(c)) if Arc::ptr_eq(c, cell));
        if !current {
            return;
        }
        match answer {
            Answer::Found(_) => {
                entries.remove(service);
            }
            Answer::Absent => {
                entries.retain(|_, e| match e {
                    Entry::Asking(_) => true,
                    Entry::Absent { generation: g, at } => {
                        *g >= generation && now.saturating_duration_since(*at) < REMEMBER
                    }
                });
                entries.insert(
                    service.clone(),
                    Entry::Absent {
                        generation,
                        at: now,
                    },
                );
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ServiceName, Entry>> {
        // No method panics between its reads and writes.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn waits(j: Join) -> Arc<OnceCell<Answer>> {
        match j {
            Join::Wait(c) => c,
            Join::Known(a) => panic!("expected a question, got {a:?}"),
        }
    }

    /// Answer the question `cell` as its asker would.
    fn answer(
        c: &Confirmations,
        s: &ServiceName,
        cell: &Arc<OnceCell<Answer>>,
        a: Answer,
        g: u64,
        now: Instant,
    ) {
        cell.set(a).unwrap();
        c.settle(s, cell, a, g, now);
    }

    #[test]
    fn one_question_in_flight_per_service() {
        let c = Confirmations::default();
        let (a, b) = (name("a"), name("b"));
        let now = Instant::now();
        let first = waits(c.join(&a, 1, now));
        let second = waits(c.join(&a, 1, now));
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second request waits on the first's question"
        );
        let other = waits(c.join(&b, 1, now));
        assert!(
            !Arc::ptr_eq(&first, &other),
            "another service asks for itself"
        );
    }

    #[test]
    fn not_found_is_remembered_until_the_table_changes_or_a_second_passes() {
        let c = Confirmations::default();
        let a = name("a");
        let t0 = Instant::now();
        let q = waits(c.join(&a, 1, t0));
        answer(&c, &a, &q, Answer::Absent, 1, t0);
        assert!(matches!(
            c.join(&a, 1, t0 + Duration::from_millis(900)),
            Join::Known(Answer::Absent)
        ));
        // A new table: ask again.
        let q2 = waits(c.join(&a, 2, t0 + Duration::from_millis(10)));
        answer(
            &c,
            &a,
            &q2,
            Answer::Absent,
            2,
            t0 + Duration::from_millis(10),
        );
        assert!(matches!(
            c.join(&a, 2, t0 + Duration::from_millis(20)),
            Join::Known(_)
        ));
        // The same table, a while later (a watch that is down): ask again.
        waits(c.join(&a, 2, t0 + Duration::from_millis(10) + REMEMBER));
    }

    #[test]
    fn a_found_replica_is_not_remembered() {
        let c = Confirmations::default();
        let a = name("a");
        let now = Instant::now();
        let q = waits(c.join(&a, 1, now));
        answer(
            &c,
            &a,
            &q,
            Answer::Found("127.0.0.1:80".parse().unwrap()),
            1,
            now,
        );
        let next = waits(c.join(&a, 1, now));
        assert!(!Arc::ptr_eq(&q, &next), "the next request asks anew");
    }

    #[test]
    fn only_the_question_in_place_is_settled() {
        let c = Confirmations::default();
        let a = name("a");
        let now = Instant::now();
        let q = waits(c.join(&a, 1, now));
        answer(&c, &a, &q, Answer::Absent, 1, now);
        // A later waiter of the same question changes nothing.
        c.settle(&a, &q, Answer::Absent, 1, now + Duration::from_millis(500));
        let q2 = waits(c.join(&a, 2, now));
        c.settle(&a, &q, Answer::Absent, 1, now);
        assert!(matches!(c.lock().get(&a), Some(Entry::Asking(x)) if Arc::ptr_eq(x, &q2)));
    }

    #[test]
    fn stale_not_founds_are_dropped() {
        let c = Confirmations::default();
        let now = Instant::now();
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            let s = name(s);
            let q = waits(c.join(&s, i as u64, now));
            answer(&c, &s, &q, Answer::Absent, i as u64, now);
        }
        assert_eq!(
            c.lock().len(),
            1,
            "only the newest table's NOT_FOUND is kept"
        );
    }

    #[tokio::test]
    async fn waiters_share_the_askers_answer() {
        let c = Arc::new(Confirmations::default());
        let a = name("a");
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (c, a, asked, release) = (c.clone(), a.clone(), asked.clone(), release.clone());
            tasks.push(tokio::spawn(async move {
                c.confirm(&a, 1, || async move {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    release.notified().await;
                    Answer::Absent
                })
                .await
            }));
        }
        // Every task has joined once one asks and the rest wait on it.
        while asked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Answer::Absent);
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
