//! `portico up`: a Tower and an ingress in one process. The ingress reads
//! the Tower's table directly, with no datagram per request.

use tokio::sync::watch;

use crate::cli::UpArgs;
use crate::config::{parse_listen, ProxyConfig, StartupError};
use crate::discovery::{Discovery, Source};

pub async fn run(
    args: UpArgs,
    explicit: &dyn Fn(&str) -> bool,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartupError> {
    let config = ProxyConfig::from_args(&args.proxy, explicit)?;
    let tower_addr = parse_listen("--tower-listen", &args.tower_listen)?;
    let (registry, bound) = super::tower::build(tower_addr, &args.registry).await?;
    let discovery = Discovery::new(Source::Local(registry.clone()), config.balance);
    let tower = tokio::spawn(super::tower::serve(bound, registry, shutdown.clone()));
    let result = super::ingress::serve(config, discovery, shutdown).await;
    tower.abort();
    result
}
