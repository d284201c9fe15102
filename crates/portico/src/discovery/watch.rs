//! The Tower watch: long-poll the Tower's HTTP API, decode, build a new
//! snapshot, swap it in. In `auto` mode, first find out whether the Tower
//! has an HTTP API at all, and fall back to per-request LOOKUP if not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use portico_wire::{Reply, Request};
use tokio::sync::watch;

use crate::backoff::Backoff;

use super::{Mode, TowerSource};
use crate::services_doc::ServicesDoc;

/// How the ingress learns endpoints (`--discovery`): `Auto` probes the
/// Tower for its HTTP API and watches it, or falls back to `Lookup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    Auto,
    Watch,
    Lookup,
    Etcd,
}

/// How long one blocking query waits at the Tower.
const WAIT: Duration = Duration::from_secs(30);
const MAX_DOC: usize = 64 * 1024 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot reach the Tower's HTTP API at {0}")]
    Connect(SocketAddr, #[source] hyper_util::client::legacy::Error),
    #[error("the Tower's HTTP API at {0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("the Tower's HTTP API answered {0}")]
    Status(http::StatusCode),
    #[error("the Tower's answer broke off")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the Tower's answer is not its services document")]
    Json(#[source] serde_json::Error),
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

async fn fetch(
    client: &HttpClient,
    addr: SocketAddr,
    after: Option<(u64, u64)>,
) -> Result<ServicesDoc, WatchError> {
    let uri = match after {
        Some((index, epoch)) => format!(
            "http://{addr}/v1/services?index={index}&epoch={epoch}&wait={}s",
            WAIT.as_secs()
        ),
        None => format!("http://{addr}/v1/services"),
    };
    let uri: http::Uri = uri.parse().map_err(|_| WatchError::Timeout(addr))?;
    let limit = if after.is_some() {
        WAIT + Duration::from_secs(10)
    } else {
        Duration::from_secs(5)
    };
    let resp = match tokio::time::timeout(limit, client.get(uri)).await {
        Err(_) => return Err(WatchError::Timeout(addr)),
        Ok(Err(e)) => return Err(WatchError::Connect(addr, e)),
        Ok(Ok(r)) => r,
    };
    if resp.status() != http::StatusCode::OK {
        return Err(WatchError::Status(resp.status()));
    }
    let body = tokio::time::timeout(limit, Limited::new(resp.into_body(), MAX_DOC).collect())
        .await
        .map_err(|_| WatchError::Timeout(addr))?
        .map_err(WatchError::Body)?
        .to_bytes();
    serde_json::from_slice(&body).map_err(WatchError::Json)
}

/// Decide the mode, then keep the snapshot current until shutdown.
pub async fn run(
    source: Arc<TowerSource>,
    wanted: DiscoveryMode,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = client();
    match wanted {
        DiscoveryMode::Lookup => {
            source.set_mode(Mode::Lookup);
            tracing::info!(
                "discovery: one UDP LOOKUP per request to the Tower at {}",
                source.udp.addr()
            );
            return;
        }
        DiscoveryMode::Watch => source.set_mode(Mode::Watch),
        // The ingress builds an etcd source instead of a Tower source.
        DiscoveryMode::Etcd => return,
        DiscoveryMode::Auto => {
            let mut backoff = FIRST_BACKOFF;
            let mut warned = false;
            loop {
                let probe = tokio::select! {
                    p = fetch(&client, source.http_addr, None) => p,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                match probe {
                    // The watch loop fetches again at once and installs it;
                    // keeping one path for installing keeps its logging whole.
                    Ok(_) => {
                        source.set_mode(Mode::Watch);
                        break;
                    }
                    Err(e) => match source.udp.call(&Request::Ping).await {
                        Ok(Reply::Pong) => {
                            source.set_mode(Mode::Lookup);
                            tracing::info!(
                                "discovery: the Tower at {} has no HTTP API ({e}); falling back to one UDP LOOKUP per request",
                                source.udp.addr()
                            );
                            return;
                        }
                        _ => {
                            if !warned {
                                tracing::warn!("discovery: the Tower at {} does not answer yet ({e}); retrying", source.udp.addr());
                                warned = true;
                            }
                        }
                    },
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    tracing::info!(
        "discovery: watching the Tower at http://{}",
        source.http_addr
    );
    watch_loop(&source, &client, shutdown).await;
}

async fn watch_loop(
    source: &TowerSource,
    client: &HttpClient,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut logged_down = false;
    loop {
        let watched = source.watched();
        let after = watched.is_synced().then(|| {
            let s = watched.snapshot();
            (s.index, s.epoch)
        });
        let fetched = tokio::select! {
            f = fetch(client, source.http_addr, after) => f,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match fetched {
            Ok(doc) => {
                let was_synced = watched.is_synced();
                watched.install(&doc);
                if !was_synced {
                    tracing::info!(
                        endpoints = watched.snapshot().endpoint_count(),
                        "discovery: in sync with the Tower"
                    );
                }
                logged_down = false;
                backoff.reset();
            }
            Err(e) => {
                watched.set_unsynced();
                if !logged_down {
                    tracing::warn!(
                        "discovery: lost the Tower's watch ({}); serving the last known endpoints and reconnecting",
                        crate::error_chain::chain(&e)
                    );
                    logged_down = true;
                }
                if !backoff.pause(&mut shutdown).await {
                    return;
                }
            }
        }
    }
}
