//! `portico up`: a Tower and an ingress in one process. The ingress reads
//! the Tower's table directly, with no datagram per request.

use tokio::sync::watch;

use crate::cli::UpArgs;
use crate::config::{parse_listen, registry_limits, ProxyConfig, StartupError};
use crate::discovery::{Discovery, Source};
use crate::registry::Registry;

pub async fn run(args: UpArgs, shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
    let config = ProxyConfig::from_args(&args.proxy)?;
    let tower_addr = parse_listen("--tower-listen", &args.tower_listen)?;
    let limits = registry_limits(&args.registry)?;
    let socket = super::tower::bind_udp(tower_addr).await?;
    let registry = Registry::new(limits);
    let discovery = Discovery::new(Source::Local(registry.clone()));
    let tower = tokio::spawn(super::tower::serve(socket, registry, shutdown.clone()));
    let result = super::ingress::serve(config, discovery, shutdown).await;
    tower.abort();
    result
}
