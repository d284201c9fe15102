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

use super::{stream, Mode, TowerSource, Watched};
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
/// The largest document (or stream line) taken from a Tower.
pub(super) const MAX_DOC: usize = 64 * 1024 * 1024;
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
    #[error("the Tower ended its change stream")]
    Ended,
    #[error("the Tower's answer broke off")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the Tower's answer is not its services document")]
    Json(#[source] serde_json::Error),
}

pub(super) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

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

/// Follow the Tower's change stream; with a Tower that has none, make
/// blocking queries instead (and try the stream again after an error: the
/// Tower may have been upgraded).
async fn watch_loop(
    source: &TowerSource,
    client: &HttpClient,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut state = LoopState {
        backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
        logged_down: false,
        warned_corrupt: false,
        told_no_stream: false,
        stream: true,
        fresh: true,
    };
    loop {
        let watched = source.watched();
        let pause = if state.stream {
            let resume = (!state.fresh && watched.ever_synced()).then(|| {
                let s = watched.snapshot();
                (s.index, s.epoch)
            });
            let mut progress = stream::Progress::default();
            let ended = tokio::select! {
                e = stream::follow(client, source.http_addr, watched, resume, &mut progress) => e,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            state.stream_ended(source, ended, &progress)
        } else {
            let after = watched.is_synced().then(|| {
                let s = watched.snapshot();
                (s.index, s.epoch)
            });
            let fetched = tokio::select! {
                f = fetch(client, source.http_addr, after) => f,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            state.fetched(watched, fetched)
        };
        if pause && !state.backoff.pause(&mut shutdown).await {
            return;
        }
    }
}

/// What the watch loop remembers between connections.
struct LoopState {
    backoff: Backoff,
    /// Said once per outage that the Tower is away.
    logged_down: bool,
    /// Said once that a stream was not to be trusted, until one delivers.
    warned_corrupt: bool,
    told_no_stream: bool,
    /// Whether to ask for the change stream (false: blocking queries).
    stream: bool,
    /// The next stream starts from a full document.
    fresh: bool,
}

impl LoopState {
    /// After a stream: what to do next. True to pause before it.
    fn stream_ended(
        &mut self,
        source: &TowerSource,
        ended: stream::Ended,
        progress: &stream::Progress,
    ) -> bool {
        let watched = source.watched();
        if progress.changes > 0 {
            self.warned_corrupt = false;
        }
        let corrupt = matches!(ended, stream::Ended::Corrupt(_));
        if progress.documents + progress.changes > 0 {
            self.logged_down = false;
            // A Tower whose streams keep going bad after a document is
            // asked again ever more slowly: each ask may cost 64 MiB.
            if !corrupt {
                self.backoff.reset();
            }
        }
        match ended {
            stream::Ended::NoStream(doc) => {
                stream::install(watched, &doc);
                self.stream = false;
                if !self.told_no_stream {
                    tracing::info!(
                        "discovery: the Tower at http://{} has no change stream; using blocking queries",
                        source.http_addr
                    );
                    self.told_no_stream = true;
                }
                self.backoff.reset();
                false
            }
            stream::Ended::Corrupt(e) => {
                if self.warned_corrupt {
                    tracing::debug!(
                        "discovery: {}; starting again from the full document",
                        crate::error_chain::chain(&e)
                    );
                } else {
                    tracing::warn!("discovery: {}; starting again from the full document (said once until a stream delivers)", crate::error_chain::chain(&e));
                    self.warned_corrupt = true;
                }
                self.fresh = true;
                true
            }
            stream::Ended::Lost(e) => {
                self.fresh = false;
                self.lost(watched, &e);
                true
            }
        }
    }

    /// After a blocking query. True to pause before the next.
    fn fetched(&mut self, watched: &Watched, fetched: Result<ServicesDoc, WatchError>) -> bool {
        match fetched {
            Ok(doc) => {
                stream::install(watched, &doc);
                self.logged_down = false;
                self.backoff.reset();
                false
            }
            Err(e) => {
                self.lost(watched, &e);
                self.stream = true;
                self.fresh = true;
                true
            }
        }
    }

    fn lost(&mut self, watched: &Watched, e: &WatchError) {
        watched.set_unsynced();
        if !self.logged_down {
            tracing::warn!(
                "discovery: lost the Tower's watch ({}); serving the last known endpoints and reconnecting",
                crate::error_chain::chain(e)
            );
            self.logged_down = true;
        }
    }
}
