//! The Tower's etcd writer: turns what the store state owes etcd into calls,
//! a few at a time, and feeds the outcomes back. A REGISTER never waits on
//! it; while etcd is down the owed writes wait here (bounded by the number
//! of registrations, since each is owed at most once) and go out on return.

use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use tokio::task::JoinSet;

use super::store::{Job, Outcome};
use super::Registry;
use crate::etcd::keys::Layout;
use crate::etcd::{EtcdClient, EtcdError};

/// Calls to etcd in flight at once.
const CONCURRENCY: usize = 32;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Write what is owed until shutdown. `tower` names this Tower in the
/// values written (for people reading etcd).
pub async fn write_loop(
    registry: Registry,
    client: EtcdClient,
    tower: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(layout) = registry.store_layout() else {
        return;
    };
    let ttl = registry.limits().ttl;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut failing = false;
    loop {
        let jobs = registry.store_take_work(CONCURRENCY);
        if jobs.is_empty() {
            tokio::select! {
                _ = registry.store_wait() => continue,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let mut set = JoinSet::new();
        for job in jobs {
            let client = client.clone();
            let layout = layout.clone();
            let tower = tower.clone();
            set.spawn(async move {
                let outcome = run(&client, &layout, &job, ttl, &tower).await;
                (job, outcome)
            });
        }
        let mut error = None;
        while let Some(done) = set.join_next().await {
            let Ok((job, outcome)) = done else {
                continue;
            };
            match outcome {
                Ok(o) => registry.store_complete(&job, o),
                Err(e) => {
                    registry.store_complete(&job, Outcome::Failed);
                    error = Some(e);
                }
            }
        }
        match error {
            None => {
                if failing {
                    tracing::info!("tower: writing to etcd again");
                    failing = false;
                }
                backoff.reset();
            }
            Some(e) => {
                if !failing {
                    tracing::warn!(
                        "tower: cannot write to etcd ({}); registrations are served from this Tower and written when etcd answers",
                        crate::error_chain::chain(&e)
                    );
                    failing = true;
                }
                if !backoff.pause(&mut shutdown).await {
                    return;
                }
            }
        }
    }
}

async fn run(
    client: &EtcdClient,
    layout: &Layout,
    job: &Job,
    ttl: Duration,
    tower: &str,
) -> Result<Outcome, EtcdError> {
    match job {
        Job::Put { key, reuse } => {
            let lease = match reuse {
                Some(l) if client.keep_alive(*l).await?.alive => *l,
                _ => client.grant(ttl).await?,
            };
            let value = Layout::value(&key.0, key.1, tower);
            let revision = client
                .put(&layout.key(&key.0, key.1), &value, lease)
                .await?;
            Ok(Outcome::Put { lease, revision })
        }
        Job::KeepAlive { lease, .. } => {
            let check = client.keep_alive(*lease).await?;
            Ok(Outcome::KeepAlive {
                alive: check.alive,
                revision: check.revision,
            })
        }
        Job::Remove {
            key,
            delete_key,
            leases,
        } => {
            let mut deleted_at = None;
            if *delete_key {
                deleted_at = Some(client.delete(&layout.key(&key.0, key.1)).await?);
            }
            let mut revision = deleted_at.unwrap_or(0);
            for lease in leases {
                revision = revision.max(client.revoke(*lease).await?.unwrap_or(0));
            }
            Ok(Outcome::Removed {
                deleted_at,
                revision,
            })
        }
    }
}
