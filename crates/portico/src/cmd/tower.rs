//! `portico tower`: the registry daemon.

use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::cli::TowerArgs;
use crate::config::{parse_listen, registry_limits, StartupError};
use crate::registry::{udp, Registry};

pub async fn run(args: TowerArgs, shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
    let addr = parse_listen("--listen", &args.listen)?;
    let limits = registry_limits(&args.registry)?;
    let socket = bind_udp(addr).await?;
    let registry = Registry::new(limits);
    serve(socket, registry, shutdown).await;
    Ok(())
}

pub async fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, StartupError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| StartupError::Bind {
            what: "the Tower (UDP)",
            addr,
            source,
        })?;
    let local = socket.local_addr().unwrap_or(addr);
    tracing::info!("tower listening on udp {local}");
    Ok(socket)
}

/// The UDP server and the reaper, until shutdown.
pub async fn serve(socket: UdpSocket, registry: Registry, shutdown: watch::Receiver<bool>) {
    let period = udp::reap_period(registry.lock().limits().ttl);
    tokio::join!(
        udp::serve(socket, registry.clone(), shutdown.clone()),
        udp::reap(registry, period, shutdown),
    );
}
