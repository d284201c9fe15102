//! `portico tower`: the registry daemon: UDP protocol, HTTP API, reaper.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::cli::{RegistryArgs, StoreKind, TowerArgs};
use crate::config::{
    etcd_settings, parse_listen, registry_limits, reply_limit, tower_http_settings, StartupError,
};
use crate::etcd::EtcdClient;
use crate::registry::admit::Admission;
use crate::registry::auth::Key;
use crate::registry::http::HttpSettings;
use crate::registry::ratelimit::ReplyLimit;
use crate::registry::{http, udp, Registry};

pub async fn run(args: TowerArgs, shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
    let addr = parse_listen("--listen", &args.listen)?;
    let (registry, bound) = build(addr, &args.registry).await?;
    serve(bound, registry, shutdown).await;
    Ok(())
}

/// The sockets of one Tower.
pub struct Bound {
    udp: UdpSocket,
    http: Option<(TcpListener, HttpSettings)>,
    etcd: Option<EtcdClient>,
    reply_limit: ReplyLimit,
}

/// Validate the registry flags, bind, and make the registry.
pub async fn build(addr: SocketAddr, a: &RegistryArgs) -> Result<(Registry, Bound), StartupError> {
    let limits = registry_limits(a)?;
    let limit = reply_limit(a)?;
    let http_settings = tower_http_settings(a)?;
    let key = a.key_file.as_deref().map(Key::load).transpose()?;
    if key.is_some() {
        tracing::info!("tower: REGISTER and DEREGISTER must be signed");
    }
    let http = match a.http.as_str() {
        "off" => HttpAt::Off,
        "same" => HttpAt::Same,
        other => HttpAt::At(parse_listen("--http", other)?),
    };
    let store = match a.store {
        StoreKind::Memory => None,
        StoreKind::Etcd => {
            let (client, layout) = etcd_settings(&a.etcd, "--store")?;
            client.check(layout.services_prefix()).await?;
            Some((client, layout))
        }
    };
    if !a.allow_register.is_empty() {
        let nets: Vec<String> = a.allow_register.iter().map(ToString::to_string).collect();
        tracing::info!(networks = %nets.join(","), "tower: REGISTER accepted only for endpoints in these networks");
    }
    let admission = Admission::new(a.allow_register.clone());
    let mut bound = bind(addr, http, http_settings, limit).await?;
    let registry = match store {
        None => Registry::new(limits, key, admission),
        Some((client, layout)) => {
            tracing::info!(
                etcd = %client.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                prefix = %String::from_utf8_lossy(layout.services_prefix()),
                "tower: registrations live in etcd"
            );
            bound.etcd = Some(client);
            Registry::with_etcd(limits, key, admission, layout)
        }
    };
    Ok((registry, bound))
}

enum HttpAt {
    Same,
    Off,
    At(SocketAddr),
}

async fn bind(
    addr: SocketAddr,
    http: HttpAt,
    settings: HttpSettings,
    reply_limit: ReplyLimit,
) -> Result<Bound, StartupError> {
    let bind_err = |what, addr, source| StartupError::Bind { what, addr, source };
    // With port 0 the UDP port is chosen first; the TCP port of the same
    // number may be taken by someone else, so try a few.
    let tries = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| bind_err("the Tower (UDP)", addr, e))?;
        crate::registry::udp::widen_receive_buffer(&udp);
        let local = udp.local_addr().unwrap_or(addr);
        let tcp_at = match http {
            HttpAt::Off => None,
            HttpAt::Same => Some(local),
            HttpAt::At(a) => Some(a),
        };
        let Some(tcp_at) = tcp_at else {
            tracing::info!("tower listening on udp {local}");
            tracing::info!("tower http api off");
            return Ok(Bound {
                udp,
                http: None,
                etcd: None,
                reply_limit,
            });
        };
        match TcpListener::bind(tcp_at).await {
            Ok(tcp) => {
                let tcp_local = tcp.local_addr().unwrap_or(tcp_at);
                tracing::info!("tower listening on udp {local}");
                tracing::info!("tower http api on http://{tcp_local}");
                return Ok(Bound {
                    udp,
                    http: Some((tcp, settings)),
                    etcd: None,
                    reply_limit,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries > 1 => last = Some((tcp_at, e)),
            Err(e) => return Err(bind_err("the Tower's HTTP API (TCP)", tcp_at, e)),
        }
    }
    let (at, e) = last.unwrap_or((addr, io::Error::from(io::ErrorKind::AddrInUse)));
    Err(bind_err("the Tower's HTTP API (TCP)", at, e))
}

/// UDP server, HTTP API and reaper, until shutdown.
pub async fn serve(bound: Bound, registry: Registry, shutdown: watch::Receiver<bool>) {
    let period = udp::reap_period(registry.limits().ttl);
    if let Some(client) = bound.etcd {
        if let Some(layout) = registry.store_layout() {
            let label = bound
                .udp
                .local_addr()
                .map_or_else(|_| "tower".to_owned(), |a| a.to_string());
            tokio::spawn(crate::etcd::watch::run(
                client.clone(),
                layout,
                std::sync::Arc::new(registry.clone()),
                "tower",
                shutdown.clone(),
            ));
            tokio::spawn(crate::registry::etcd::write_loop(
                registry.clone(),
                client,
                label,
                shutdown.clone(),
            ));
        }
    }
    let api = async {
        if let Some((listener, settings)) = bound.http {
            http::serve(listener, registry.clone(), settings, shutdown.clone()).await;
        }
    };
    tokio::join!(
        udp::serve(
            bound.udp,
            registry.clone(),
            bound.reply_limit,
            shutdown.clone()
        ),
        udp::reap(registry.clone(), period, shutdown.clone()),
        api,
    );
}
