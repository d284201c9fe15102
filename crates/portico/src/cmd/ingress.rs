//! `portico ingress`: the reverse proxy against a Tower reached over UDP.

use std::sync::Arc;

use tokio::sync::watch;

use crate::cli::IngressArgs;
use crate::config::{resolve_tower, ProxyConfig, StartupError};
use crate::discovery::{Discovery, Source, TowerSource};
use crate::ingress::{self, handler::Proxy, upstream::Pool};
use crate::registry::client::TowerClient;

pub async fn run(args: IngressArgs, shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
    let config = ProxyConfig::from_args(&args.proxy)?;
    let tower = resolve_tower(&args.tower)?;
    let client = TowerClient::new(tower, args.tower_timeout, 2);
    let source = TowerSource::new(client);
    // The Tower may start after us: the watch keeps trying, and logs it.
    tokio::spawn(crate::discovery::watch::run(
        source.clone(),
        args.discovery,
        shutdown.clone(),
    ));
    let balance = config.balance;
    serve(
        config,
        Discovery::new(Source::Tower(source), balance),
        shutdown,
    )
    .await
}

/// Bind, then proxy until shutdown (shared with `portico up`).
pub async fn serve(
    config: ProxyConfig,
    discovery: Arc<Discovery>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartupError> {
    let listener = ingress::bind(config.listen).map_err(|source| StartupError::Bind {
        what: "HTTP",
        addr: config.listen,
        source,
    })?;
    let local = listener.local_addr().unwrap_or(config.listen);
    for route in config.routes.routes() {
        tracing::info!("route {route}");
    }
    for check in config.health_checks {
        tracing::info!(service = %check.service, path = %check.path, interval = ?check.interval, "active health check");
        tokio::spawn(crate::discovery::active::run(
            discovery.clone(),
            check,
            shutdown.clone(),
        ));
    }
    tracing::info!("ingress listening on {local}");
    let proxy = Arc::new(Proxy {
        routes: config.routes,
        discovery,
        pool: Pool::new(config.pool),
        attempts: config.attempts,
        backend_timeout: config.backend_timeout,
        max_uri_bytes: config.max_uri_bytes,
    });
    ingress::serve(listener, proxy, config.serve, shutdown).await;
    Ok(())
}
