//! Active health checks, for replicas that accept connections but answer
//! errors (which passive health cannot see): per service, `GET <path>` to
//! every endpoint each interval; `fall` failures in a row take it out of
//! rotation, `rise` passes in a row bring it back. The request path reads
//! the unhealthy set from one atomic pointer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portico_wire::ServiceName;
use tokio::sync::watch;

use super::Discovery;

/// One `--health-check SERVICE:PATH[,interval=5s,timeout=2s,fall=3,rise=2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub service: ServiceName,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

impl std::str::FromStr for CheckSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let usage = "expected SERVICE:PATH[,interval=5s,timeout=2s,fall=3,rise=2]";
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (service, path) = head
            .split_once(':')
            .ok_or_else(|| format!("{spec:?}: {usage}"))?;
        let service = ServiceName::parse(service).map_err(|e| format!("{spec:?}: {e}"))?;
        if !path.starts_with('/') {
            return Err(format!("{spec:?}: the path must start with '/'; {usage}"));
        }
        let mut c = CheckSpec {
            service,
            path: path.to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            fall: 3,
            rise: 2,
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("{spec:?}: {usage}"))?;
            let number = || {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{spec:?}: {k} takes a whole number >= 1"))
            };
            match k {
                "interval" => c.interval = crate::units::parse_duration(v)?,
                "timeout" => c.timeout = crate::units::parse_duration(v)?,
                "fall" => c.fall = number()?,
                "rise" => c.rise = number()?,
                _ => return Err(format!("{spec:?}: unknown option {k:?}; {usage}")),
            }
        }
        if c.interval.is_zero() || c.timeout.is_zero() {
            return Err(format!(
                "{spec:?}: interval and timeout must be longer than zero"
            ));
        }
        Ok(c)
    }
}

/// Endpoints that active checks currently fail, across all services.
#[derive(Debug, Default)]
pub struct ActiveHealth {
    unhealthy: ArcSwap<HashSet<SocketAddr>>,
    by_service: Mutex<HashMap<ServiceName, HashSet<SocketAddr>>>,
}

impl ActiveHealth {
    pub fn is_unhealthy(&self, addr: SocketAddr) -> bool {
        let set = self.unhealthy.load();
        !set.is_empty() && set.contains(&addr)
    }

    fn publish(&self, service: &ServiceName, unhealthy: HashSet<SocketAddr>) {
        let mut by = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        by.insert(service.clone(), unhealthy);
        let all: HashSet<SocketAddr> = by.values().flatten().copied().collect();
        self.unhealthy.store(Arc::new(all));
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    healthy: bool,
    passes: u32,
    fails: u32,
}

impl Streak {
    /// Fold one result in; returns whether the state flipped.
    fn record(&mut self, ok: bool, spec: &CheckSpec) -> bool {
        if ok {
            self.passes += 1;
            self.fails = 0;
            if !self.healthy && self.passes >= spec.rise {
                self.healthy = true;
                return true;
            }
        } else {
            self.fails += 1;
            self.passes = 0;
            if self.healthy && self.fails >= spec.fall {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

/// Check one service's endpoints every interval until shutdown.
pub async fn run(discovery: Arc<Discovery>, spec: CheckSpec, mut shutdown: watch::Receiver<bool>) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let endpoints = discovery.endpoints(&spec.service).await;
        let mut probes = tokio::task::JoinSet::new();
        for addr in endpoints.iter().copied() {
            let (path, timeout) = (spec.path.clone(), spec.timeout);
            probes.spawn(async move { (addr, probe(addr, &path, timeout).await) });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((addr, result)) = done else { continue };
            let streak = streaks.entry(addr).or_insert(Streak {
                healthy: true,
                ..Streak::default()
            });
            if streak.record(result.is_ok(), &spec) {
                match &result {
                    Ok(()) => {
                        tracing::info!(service = %spec.service, endpoint = %addr, "health check passes again; back in rotation")
                    }
                    Err(why) => {
                        tracing::warn!(service = %spec.service, endpoint = %addr, "health check failing ({why}); out of rotation")
                    }
                }
            }
        }
        streaks.retain(|addr, _| endpoints.contains(addr));
        let unhealthy = streaks
            .iter()
            .filter(|(_, s)| !s.healthy)
            .map(|(a, _)| *a)
            .collect();
        discovery.active().publish(&spec.service, unhealthy);
    }
}

/// One `GET path`; Ok for a 2xx or 3xx answer within the timeout.
async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "portico-health-check")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"));
        driver.abort();
        let status = resp?.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_options() {
        let c: CheckSpec = "api:/healthz".parse().unwrap();
        assert_eq!((c.path.as_str(), c.fall, c.rise), ("/healthz", 3, 2));
        let c: CheckSpec = "api:/h,interval=250ms,timeout=1s,fall=1,rise=4"
            .parse()
            .unwrap();
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!((c.fall, c.rise), (1, 4));
        for bad in [
            "api",
            "api:healthz",
            "a b:/h",
            "api:/h,fall=0",
            "api:/h,speed=1",
            "api:/h,interval=0s",
        ] {
            assert!(bad.parse::<CheckSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn streaks_need_fall_and_rise_in_a_row() {
        let spec: CheckSpec = "api:/h,fall=2,rise=2".parse().unwrap();
        let mut s = Streak {
            healthy: true,
            ..Streak::default()
        };
        assert!(!s.record(false, &spec));
        assert!(!s.record(true, &spec), "a pass resets the failures");
        assert!(!s.record(false, &spec));
        assert!(s.record(false, &spec) && !s.healthy);
        assert!(!s.record(true, &spec));
        assert!(s.record(true, &spec) && s.healthy);
    }
}
