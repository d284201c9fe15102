//! How the ingress learns backends. A source answers "which replica of this
//! service next?"; the seed's source is one UDP LOOKUP per request, `up` asks
//! the embedded table directly. Passive health sits on top of both.

pub mod health;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use portico_wire::{ErrorReply, Reply, Request, ServiceName};

use crate::registry::client::{TowerClient, TowerError};
use crate::registry::Registry;
use health::PassiveHealth;

/// Where replicas come from.
#[derive(Debug)]
pub enum Source {
    /// One LOOKUP datagram to a Tower per pick, as the seed does.
    Lookup(TowerClient),
    /// The Tower's table in this same process (`portico up`).
    Local(Registry),
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No live replica is registered.
    #[error("service '{0}' has no live replica in the Tower")]
    NotFound(ServiceName),
    /// Every replica the Tower offered was already tried for this request.
    #[error("every replica of '{0}' offered by the Tower was already tried")]
    Exhausted(ServiceName),
    #[error(transparent)]
    Tower(#[from] TowerError),
    #[error("the Tower answered LOOKUP with an error: {0}")]
    TowerRefused(ErrorReply),
}

#[derive(Debug)]
pub struct Discovery {
    source: Source,
    health: PassiveHealth,
}

impl Discovery {
    pub fn new(source: Source) -> Arc<Self> {
        Arc::new(Self {
            source,
            health: PassiveHealth::default(),
        })
    }

    pub fn health(&self) -> &PassiveHealth {
        &self.health
    }

    /// The next replica to try, skipping those in `tried` and preferring ones
    /// not set aside by passive health. When every offer is set aside, one is
    /// tried all the same: a possibly-dead replica beats a certain 503.
    pub async fn pick(
        &self,
        service: &ServiceName,
        tried: &[SocketAddr],
    ) -> Result<SocketAddr, DiscoveryError> {
        // Round robin offers each replica once per cycle; a few more asks
        // than replicas already tried get past them and the set-aside ones.
        let asks = tried.len() + 3;
        let mut fallback = None;
        for _ in 0..asks {
            let addr = self.next(service).await?;
            if tried.contains(&addr) {
                continue;
            }
            if !self.health.is_set_aside(addr, Instant::now()) {
                return Ok(addr);
            }
            fallback.get_or_insert(addr);
        }
        fallback.ok_or_else(|| DiscoveryError::Exhausted(service.clone()))
    }

    async fn next(&self, service: &ServiceName) -> Result<SocketAddr, DiscoveryError> {
        match &self.source {
            Source::Local(registry) => registry
                .lock()
                .lookup(service, Instant::now())
                .ok_or_else(|| DiscoveryError::NotFound(service.clone())),
            Source::Lookup(client) => match client.call(&Request::Lookup(service.clone())).await? {
                Reply::Lookup(r) => Ok(r.addr),
                Reply::Error(ErrorReply::NotFound(_)) => {
                    Err(DiscoveryError::NotFound(service.clone()))
                }
                Reply::Error(e) => Err(DiscoveryError::TowerRefused(e)),
                other => Err(DiscoveryError::TowerRefused(ErrorReply::Other(format!(
                    "unexpected reply {other:?}"
                )))),
            },
        }
    }
}
