//! `portico ingress`: the reverse proxy against a Tower reached over UDP.

use std::sync::Arc;

use tokio::sync::watch;

use crate::cli::IngressArgs;
use crate::config::{resolve_tower, ProxyConfig, StartupError};
use crate::discovery::{Discovery, Source, TowerSource};
use arc_swap::ArcSwap;

use crate::admin::metrics::Metrics;
use crate::ingress::access_log::AccessLog;
use crate::ingress::handler::{LiveRoutes, Proxy};
use crate::ingress::{self, upstream::Pool};
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
    let admin = match config.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind {
                    what: "the admin listener (--admin ADDR or --admin off)",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let metrics = Metrics::new();
    let access_log = AccessLog::start(
        config.access_log,
        config.access_log_file.clone(),
        metrics.access_log_dropped.clone(),
    )
    .map_err(|source| StartupError::AccessLog {
        path: config
            .access_log_file
            .as_ref()
            .map_or("stdout".into(), |p| p.display().to_string()),
        source,
    })?;
    for route in config.routes.routes() {
        tracing::info!("route {route}");
    }
    let proxy = Arc::new(Proxy {
        routes: ArcSwap::from_pointee(LiveRoutes::new(config.routes, &metrics)),
        discovery: discovery.clone(),
        pool: Pool::new(config.pool),
        attempts: config.attempts,
        backend_timeout: config.backend_timeout,
        max_uri_bytes: config.max_uri_bytes,
        metrics,
        access_log,
    });
    for check in config.health_checks {
        tracing::info!(service = %check.service, path = %check.path, interval = ?check.interval, "active health check");
        tokio::spawn(crate::discovery::active::run(
            discovery.clone(),
            check,
            shutdown.clone(),
        ));
    }
    if let Some(admin) = admin {
        let at = admin
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        tracing::info!("admin listening on http://{at}");
        tokio::spawn(crate::admin::serve(admin, proxy.clone(), shutdown.clone()));
    }
    tracing::info!("ingress listening on {local}");
    ingress::serve(listener, proxy, config.serve, shutdown).await;
    Ok(())
}
