//! List-then-watch: keep a cache of the registrations in etcd current, for
//! the Tower's local table and for an ingress watching etcd directly.
//!
//! The watch resumes from the last revision seen when it breaks, on the next
//! member if the last one failed; only a compacted revision (or a store that
//! went back in time, i.e. lost its data) costs a full re-list. A member
//! that keeps its watch open but cannot reach its quorum (a partition) sends
//! nothing, so a linearizable probe of the same member runs every second:
//! two failures in a row drop the watch and move on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;

use super::{EtcdClient, EtcdError, Event, KeyValue};
use crate::etcd::keys::Layout;

const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_FAILURES: u32 = 2;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a list-then-watch feeds.
pub trait Sink: Send + Sync + 'static {
    /// A full listing, to replace what was known.
    fn replace(&self, kvs: &[KeyValue], revision: i64);
    /// Changes since the last revision.
    fn apply(&self, events: &[Event], revision: i64);
    /// The last revision applied.
    fn revision(&self) -> i64;
    /// Whether the cache reflects etcd now. While false, the last known
    /// registrations stay in use.
    fn set_current(&self, current: bool);
}

enum Broke {
    /// Start over with a full listing.
    Relist,
    Error(EtcdError),
}

/// Keep `sink` current until shutdown. `who` names the caller in logs.
pub async fn run<S: Sink>(
    client: EtcdClient,
    layout: Layout,
    sink: Arc<S>,
    who: &'static str,
    mut shutdown: watch::Receiver<bool>,
) {
    let prefix = layout.services_prefix().to_vec();
    let mut need_list = true;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut down_logged = false;
    let mut ever = false;
    loop {
        let cycle = async {
            if need_list {
                let listed = client.range_prefix(&prefix).await?;
                sink.replace(&listed.kvs, listed.header.revision);
                need_list = false;
            }
            let member = client.current();
            let mut stream = match client.watch(member, &prefix, sink.revision() + 1).await {
                Ok(s) => s,
                Err(e) => {
                    client.rotate_from(member);
                    return Err(Broke::Error(e));
                }
            };
            let mut probe = tokio::time::interval(PROBE_EVERY);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.tick().await;
            let mut failures = 0;
            let mut created = false;
            loop {
                tokio::select! {
                    answer = stream.next() => {
                        let answer = match answer {
                            None => {
                                return Err(Broke::Error(EtcdError::WatchCancelled(
                                    client.endpoints()[member].to_string(),
                                    "the stream closed".into(),
                                )))
                            }
                            Some(Err(e)) => {
                                client.rotate_from(member);
                                return Err(Broke::Error(e));
                            }
                            Some(Ok(a)) => a,
                        };
                        if answer.canceled {
                            if answer.compact_revision > 0 {
                                tracing::info!(
                                    compacted_to = answer.compact_revision,
                                    "{who}: etcd compacted past the last revision seen; listing again"
                                );
                                return Err(Broke::Relist);
                            }
                            return Err(Broke::Error(EtcdError::WatchCancelled(
                                client.endpoints()[member].to_string(),
                                answer.cancel_reason.unwrap_or_default(),
                            )));
                        }
                        if !created {
                            created = true;
                            if answer.header.revision < sink.revision() {
                                tracing::warn!(
                                    etcd_revision = answer.header.revision,
                                    seen = sink.revision(),
                                    "{who}: etcd's revision went back (its data was lost or replaced); listing again"
                                );
                                return Err(Broke::Relist);
                            }
                            sink.set_current(true);
                            backoff.reset();
                            if down_logged || !ever {
                                tracing::info!(
                                    member = %client.endpoints()[member],
                                    revision = sink.revision(),
                                    "{who}: in sync with etcd"
                                );
                            }
                            down_logged = false;
                            ever = true;
                        }
                        if !answer.events.is_empty() {
                            sink.apply(&answer.events, answer.header.revision);
                        }
                    }
                    _ = probe.tick() => {
                        match client.probe(member, &prefix).await {
                            Ok(()) => {
                                if failures > 0 && created {
                                    sink.set_current(true);
                                }
                                failures = 0;
                            }
                            Err(e) => {
                                failures += 1;
                                sink.set_current(false);
                                if failures >= PROBE_FAILURES {
                                    client.rotate_from(member);
                                    return Err(Broke::Error(e));
                                }
                            }
                        }
                    }
                }
            }
        };
        let broke: Result<(), Broke> = tokio::select! {
            r = cycle => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match broke {
            Ok(()) => {}
            Err(Broke::Relist) => need_list = true,
            Err(Broke::Error(e)) => {
                sink.set_current(false);
                if !down_logged {
                    tracing::warn!(
                        "{who}: lost etcd ({}); serving the last known registrations and reconnecting",
                        crate::error_chain::chain(&e)
                    );
                    down_logged = true;
                }
                if !backoff.pause(&mut shutdown).await {
                    return;
                }
            }
        }
    }
}

impl From<EtcdError> for Broke {
    fn from(e: EtcdError) -> Self {
        Broke::Error(e)
    }
}
