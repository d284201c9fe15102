//! `portico ingress`: the reverse proxy against a Tower reached over UDP.

use std::sync::Arc;

use tokio::sync::watch;

use crate::cli::IngressArgs;
use crate::config::{etcd_settings, resolve_tower, ProxyConfig, StartupError};
use crate::discovery::etcd::EtcdSource;
use crate::discovery::watch::DiscoveryMode;
use crate::discovery::{Discovery, Source, TowerSource};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::ingress;
use crate::ingress::access_log::AccessLog;
use crate::ingress::checks::Limits;
use crate::ingress::front::{FrontDoor, Http01Tokens, Redirect};
use crate::ingress::handler::{LiveRoutes, Shared};
use crate::ingress::tls::Certs;
use crate::ingress::upstream::{Clients, Pool};
use crate::metrics::Metrics;
use crate::registry::client::TowerClient;

pub async fn run(
    args: IngressArgs,
    explicit: &dyn Fn(&str) -> bool,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartupError> {
    let config = ProxyConfig::from_args(&args.proxy, explicit)?;
    if args.discovery == DiscoveryMode::Etcd {
        let (client, layout) = etcd_settings(&args.etcd, "--discovery")?;
        client.check(layout.services_prefix()).await?;
        tracing::info!(
            etcd = %client.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            prefix = %String::from_utf8_lossy(layout.services_prefix()),
            "discovery: watching the registrations in etcd"
        );
        let source = EtcdSource::new(layout.clone());
        tokio::spawn(crate::etcd::watch::run(
            client,
            layout,
            source.clone(),
            "discovery",
            shutdown.clone(),
        ));
        let balance = config.balance;
        return serve(
            config,
            Discovery::new(Source::Etcd(source), balance),
            shutdown,
        )
        .await;
    }
    let tower = resolve_tower(&args.tower)?;
    let client = TowerClient::new(tower, args.tower_timeout, 2).per_worker(config.serve.workers);
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
    let (tls, certs) = match config.listeners.iter().any(|l| l.tls) {
        true => {
            let (tls, certs) = tls_termination(&config, &shutdown)?;
            (Some(tls), Some(certs))
        }
        false => (None, None),
    };
    let mut listeners = Vec::new();
    for spec in &config.listeners {
        let socket = ingress::bind(spec.addr).map_err(|source| StartupError::Bind {
            what: if spec.tls { "HTTPS" } else { "HTTP" },
            addr: spec.addr,
            source,
        })?;
        listeners.push(ingress::Listener {
            socket,
            tls: tls.clone().filter(|_| spec.tls),
        });
    }
    let trusted = config.serve.proxy_protocol_from.networks();
    if !trusted.is_empty() {
        let from: Vec<String> = trusted.iter().map(ToString::to_string).collect();
        tracing::info!(
            from = %from.join(","),
            "PROXY protocol: connections from these networks open with a header naming the client"
        );
    }
    let tokens = config
        .acme
        .as_ref()
        .map(|_| Arc::new(Http01Tokens::default()));
    let front = Arc::new(FrontDoor::new(
        redirect_target(&config, &listeners),
        tokens.clone(),
    ));
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
    // Before the first connection: a restart serves the stored
    // certificates at once.
    let acme = start_acme(&config, certs, tokens, &metrics, &shutdown)?;
    let proxy = Arc::new(Shared {
        routes: ArcSwap::from_pointee(LiveRoutes::new(config.routes, &metrics)),
        discovery: discovery.clone(),
        upstream: Clients {
            pool: Pool::new(config.pool, metrics.upstream_connections.clone()),
        },
        attempts: config.attempts,
        backend_timeout: config.backend_timeout,
        limits: Limits {
            max_uri_bytes: config.max_uri_bytes,
            max_header_bytes: config.serve.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
        },
        metrics,
        access_log,
        tunnel_idle: config.serve.timeouts.idle,
        max_requests_per_connection: config.max_requests_per_connection,
        path_escapes: config.path_escapes,
        compress: config.compress,
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
        tokio::spawn(crate::admin::serve(
            admin,
            proxy.clone(),
            acme.as_ref().map(crate::acme::Acme::status),
            shutdown.clone(),
        ));
    }
    if let Some(file) = config.config_file {
        tokio::spawn(reload(
            file,
            config.cli_routes,
            proxy.clone(),
            acme,
            shutdown.clone(),
        ));
    }
    // Plain listeners first: tests and scripts read the first line.
    for l in &listeners {
        let at = l
            .socket
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        match l.tls {
            None => tracing::info!("ingress listening on {at}"),
            Some(_) => tracing::info!("ingress listening on {at} (TLS)"),
        }
    }
    // A task of its own, so that a panic in it is logged, not the process's.
    let serving = tokio::spawn(ingress::serve(
        listeners,
        proxy,
        config.serve.clone(),
        front,
        shutdown,
    ));
    if let Err(e) = serving.await {
        tracing::error!(error = %e, "the accept loop ended abnormally");
    }
    Ok(())
}

/// The ACME manager, when `--acme` is on, with the resolver and the tokens
/// it fills.
fn start_acme(
    config: &ProxyConfig,
    certs: Option<Arc<Certs>>,
    tokens: Option<Arc<Http01Tokens>>,
    metrics: &Metrics,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<crate::acme::Acme>, StartupError> {
    let (Some(settings), Some(certs), Some(tokens)) = (&config.acme, certs, tokens) else {
        return Ok(None);
    };
    let parts = crate::acme::Parts {
        certs,
        tokens,
        expiry: metrics.tls_certificate_expiry.clone(),
        orders: metrics.acme_orders.clone(),
    };
    let hosts = config
        .routes
        .routes()
        .iter()
        .filter_map(|r| r.host.as_deref());
    let acme = crate::acme::start(settings.clone(), hosts, parts, shutdown.clone())?;
    Ok(Some(acme))
}

/// The certificates (files reloaded when they change) and the TLS
/// settings every HTTPS listener shares.
fn tls_termination(
    config: &ProxyConfig,
    shutdown: &watch::Receiver<bool>,
) -> Result<(ingress::TlsTermination, Arc<Certs>), StartupError> {
    let certs = Certs::load(config.tls.clone())?;
    let server = crate::ingress::tls::server_config(certs.clone(), config.acme.is_some())?;
    if !config.tls.is_empty() {
        tokio::spawn(crate::ingress::tls::watch_files(
            certs.clone(),
            Duration::from_secs(1),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        pairs = config.tls.len(),
        "tls: serving HTTPS (TLS 1.2 and 1.3, ALPN h2 and http/1.1)"
    );
    let termination = ingress::TlsTermination {
        acceptor: tokio_rustls::TlsAcceptor::from(server),
        handshake_timeout: config.tls_handshake_timeout,
    };
    Ok((termination, certs))
}

/// Where plain-HTTP clients are redirected: the first HTTPS listener's
/// port (as bound: it may have been 0). `None` without HTTPS listeners, or
/// when neither the flag nor a route asks for redirects.
fn redirect_target(config: &ProxyConfig, listeners: &[ingress::Listener]) -> Option<Redirect> {
    let https = listeners.iter().find(|l| l.tls.is_some())?;
    let https_port = https.socket.local_addr().ok()?.port();
    let wanted = config.redirect_https || config.config_file.is_some() || config.routes.redirects();
    wanted.then_some(Redirect {
        default: config.redirect_https,
        https_port,
    })
}

/// Reload the config file's routes on SIGHUP and whenever its contents
/// change (checked every second). A file that does not validate is refused
/// with the reason and the running table stays; a good one replaces the
/// route table in one atomic swap: no listener is rebound, no connection
/// is touched.
async fn reload(
    first: crate::config_file::Loaded,
    cli_routes: crate::config_file::CliRoutes,
    proxy: Arc<Shared>,
    acme: Option<crate::acme::Acme>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let path = first.path.clone();
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "cannot watch SIGHUP ({e}); config changes are still picked up from the file"
            );
            None
        }
    };
    let mut last_seen = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let now = std::fs::read(&path).ok();
        if !forced && now == last_seen {
            continue;
        }
        last_seen = now;
        let outcome = crate::config_file::Loaded::read(&path)
            .and_then(|loaded| crate::config_file::route_table(&cli_routes, Some(&loaded)));
        match outcome {
            Ok(table) => {
                let n = table.routes().len();
                if let Some(acme) = &acme {
                    acme.manage(table.routes().iter().filter_map(|r| r.host.as_deref()));
                }
                proxy
                    .routes
                    .store(Arc::new(LiveRoutes::new(table, &proxy.metrics)));
                proxy
                    .metrics
                    .config_reloads
                    .get_or_create(&vec![("result", "applied".to_owned())])
                    .inc();
                tracing::info!(routes = n, file = %path.display(), "config reloaded; only routes are reloaded, other settings need a restart");
            }
            Err(e) => {
                proxy
                    .metrics
                    .config_reloads
                    .get_or_create(&vec![("result", "refused".to_owned())])
                    .inc();
                tracing::warn!(
                    "config refused, the running routes stay: {}",
                    crate::error_chain::chain(&e)
                );
            }
        }
    }
}
