//! Up to `--attempts` replicas for one request: pick, try, and after a
//! failure do what the error allows (`AttemptError::next`) and nothing
//! else. Generic over where replicas come from and how a try is sent, so
//! that the loop is tested with doubles of both.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Response;
use portico_wire::ServiceName;

use super::error::{AttemptError, Next, ProxyError, UpstreamError};
use super::upstream::{Connection, Outgoing, Upstream, UpstreamBody};
use crate::discovery::{Discovery, DiscoveryError, Picked};
use crate::error_chain::chain;
use crate::metrics::RouteStats;

/// How long a request whose every known replica failed waits for a newer
/// endpoint table before giving up with 502.
const DISCOVERY_CATCH_UP: Duration = Duration::from_millis(500);

/// Where replicas come from, and where their health is told.
pub trait Replicas: Sync {
    /// The version of the table a pick is about to read.
    fn generation(&self) -> u64;
    /// The next replica to try, not one of `tried`.
    fn pick<'a>(
        &'a self,
        service: &'a ServiceName,
        tried: &'a [SocketAddr],
    ) -> impl Future<Output = Result<Picked, DiscoveryError>> + Send + 'a;
    /// Wait, at most `limit`, for a table newer than `generation`.
    fn newer_than(&self, generation: u64, limit: Duration) -> impl Future<Output = bool> + Send;
    /// `addr` could not be reached: set it aside for a while.
    fn unreachable(&self, addr: SocketAddr);
    /// `addr` answered.
    fn answered(&self, addr: SocketAddr);
}

impl Replicas for Discovery {
    fn generation(&self) -> u64 {
        Discovery::generation(self)
    }

    fn pick<'a>(
        &'a self,
        service: &'a ServiceName,
        tried: &'a [SocketAddr],
    ) -> impl Future<Output = Result<Picked, DiscoveryError>> + Send + 'a {
        Discovery::pick(self, service, tried)
    }

    async fn newer_than(&self, generation: u64, limit: Duration) -> bool {
        // Boxed: most requests never wait.
        Box::pin(Discovery::newer_than(self, generation, limit)).await
    }

    fn unreachable(&self, addr: SocketAddr) {
        self.health().record_failure(addr, Instant::now());
    }

    fn answered(&self, addr: SocketAddr) {
        self.health().record_success(addr);
    }
}

/// One request's tries, and what they found, for the metrics and the log.
pub struct Failover<'a, R, U> {
    replicas: &'a R,
    upstream: &'a U,
    service: &'a ServiceName,
    attempts: u32,
    timeout: Duration,
    /// The route's counters (retries, connect errors), moved as it happens.
    stats: Option<&'a RouteStats>,
    /// Replicas tried, in order.
    pub tried: Vec<SocketAddr>,
    caught_up: bool,
}

impl<'a, R: Replicas, U: Upstream> Failover<'a, R, U> {
    pub fn new(
        replicas: &'a R,
        upstream: &'a U,
        service: &'a ServiceName,
        attempts: u32,
        timeout: Duration,
        stats: Option<&'a RouteStats>,
    ) -> Self {
        Self {
            replicas,
            upstream,
            service,
            attempts,
            timeout,
            stats,
            tried: Vec::with_capacity(attempts as usize),
            caught_up: false,
        }
    }

    /// The replica tried last.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.tried.last().copied()
    }

    /// Send `out` to one replica after another until one answers, the
    /// error allows no other try, or the attempts run out.
    pub async fn send(&mut self, out: &mut Outgoing) -> Result<Response<UpstreamBody>, ProxyError> {
        let mut last: Option<(SocketAddr, UpstreamError)> = None;
        while self.tried.len() < self.attempts as usize {
            let picked = match self.pick().await {
                Ok(p) => p,
                Err(e @ (DiscoveryError::Exhausted(_) | DiscoveryError::NotFound(_))) => {
                    return Err(self.give_up(last).unwrap_or(e.into()));
                }
                Err(e) => return Err(e.into()),
            };
            let addr = picked.addr;
            self.tried.push(addr);
            if let (Some(stats), true) = (self.stats, self.tried.len() > 1) {
                stats.retry();
            }
            match self.try_replica(addr, out).await {
                Ok(mut response) => {
                    self.replicas.answered(addr);
                    response.body_mut().hold_load(picked.load);
                    return Ok(response);
                }
                Err(e) if e.next(out.replayable()) == Next::GiveUp => {
                    if e.error.answered() {
                        self.replicas.answered(addr);
                    }
                    return Err(self.failed(addr, e.error));
                }
                Err(e) => {
                    if e.error.is_connect() {
                        self.replicas.unreachable(addr);
                        if let Some(stats) = self.stats {
                            stats.connect_error();
                        }
                    }
                    tracing::debug!(backend = %addr, service = %self.service, error = %chain(&e), "try failed; trying another replica");
                    last = Some((addr, e.error));
                }
            }
        }
        Err(self
            .give_up(last)
            .unwrap_or_else(|| DiscoveryError::Exhausted(self.service.clone()).into()))
    }

    /// The next replica. When every replica in the table has failed and
    /// attempts remain, the table may lag a replacement in progress: wait
    /// once, briefly, for news.
    async fn pick(&mut self) -> Result<Picked, DiscoveryError> {
        let generation = self.replicas.generation();
        let picked = self.replicas.pick(self.service, &self.tried).await;
        if !matches!(picked, Err(DiscoveryError::Exhausted(_))) || self.caught_up {
            return picked;
        }
        self.caught_up = true;
        if self
            .replicas
            .newer_than(generation, DISCOVERY_CATCH_UP)
            .await
        {
            return self.replicas.pick(self.service, &self.tried).await;
        }
        picked
    }

    /// One replica: a pooled connection, and once more on a new one when
    /// the pooled one failed in a way that allows it. (A connect failure of
    /// that new one is the replica's, and sets it aside like any other.)
    async fn try_replica(
        &self,
        addr: SocketAddr,
        out: &mut Outgoing,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        let first = self
            .upstream
            .send(addr, out, Connection::PooledOrNew, self.timeout)
            .await;
        match first {
            Err(e) if e.next(out.replayable()) == Next::FreshConnection => {
                tracing::debug!(backend = %addr, service = %self.service, error = %chain(&e), "pooled connection failed; retrying on a new one");
                self.upstream
                    .send(addr, out, Connection::New, self.timeout)
                    .await
            }
            other => other,
        }
    }

    fn failed(&self, addr: SocketAddr, error: UpstreamError) -> ProxyError {
        let service = self.service.clone();
        match error {
            UpstreamError::Timeout(timeout) => ProxyError::Timeout {
                service,
                addr,
                timeout,
            },
            source => ProxyError::Backend {
                service,
                addr,
                source,
            },
        }
    }

    fn give_up(&self, last: Option<(SocketAddr, UpstreamError)>) -> Option<ProxyError> {
        last.map(|(last_addr, source)| ProxyError::Unreachable {
            service: self.service.clone(),
            attempts: self.tried.len() as u32,
            last_addr,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ingress::h1::client::ExchangeError;
    use crate::ingress::headers::Forwarding;
    use crate::ingress::upstream::{Connection, H1Request};
    use http::{HeaderValue, Method, Request};
    use std::io::ErrorKind;
    use std::sync::Mutex;

    fn replica(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Replicas 1, 2, 3... in order; `coming` joins the table when a
    /// request waits for a newer one.
    struct Listed {
        addrs: Mutex<Vec<SocketAddr>>,
        coming: Mutex<Option<SocketAddr>>,
        unreachable: Mutex<Vec<SocketAddr>>,
        answered: Mutex<Vec<SocketAddr>>,
    }

    fn listed(n: u16) -> Listed {
        Listed {
            addrs: Mutex::new((1..=n).map(replica).collect()),
            coming: Mutex::default(),
            unreachable: Mutex::default(),
            answered: Mutex::default(),
        }
    }

    impl Replicas for Listed {
        fn generation(&self) -> u64 {
            0
        }
        async fn pick(
            &self,
            service: &ServiceName,
            tried: &[SocketAddr],
        ) -> Result<Picked, DiscoveryError> {
            self.addrs
                .lock()
                .unwrap()
                .iter()
                .find(|a| !tried.contains(a))
                .map(|&addr| Picked { addr, load: None })
                .ok_or_else(|| DiscoveryError::Exhausted(service.clone()))
        }
        async fn newer_than(&self, _: u64, _: Duration) -> bool {
            let coming = self.coming.lock().unwrap().take();
            coming.map(|a| self.addrs.lock().unwrap().push(a)).is_some()
        }
        fn unreachable(&self, addr: SocketAddr) {
            self.unreachable.lock().unwrap().push(addr);
        }
        fn answered(&self, addr: SocketAddr) {
            self.answered.lock().unwrap().push(addr);
        }
    }

    /// What each try meets, in order; records each try.
    #[derive(Clone, Copy, Debug)]
    enum Meets {
        Answer,
        Refused,
        /// Written on a reused connection, closed before any answer.
        StaleReused,
        /// Written, then the connection broke, no answer.
        Broken,
        TimedOut,
    }

    struct Scripted {
        script: Mutex<Vec<Meets>>,
        tries: Mutex<Vec<(u16, Connection)>>,
        /// Whether the pool has a connection for a first try to reuse.
        pooled: bool,
    }

    fn scripted(script: &[Meets]) -> Scripted {
        Scripted {
            script: Mutex::new(script.iter().rev().copied().collect()),
            tries: Mutex::default(),
            pooled: true,
        }
    }

    fn unpooled(script: &[Meets]) -> Scripted {
        Scripted {
            pooled: false,
            ..scripted(script)
        }
    }

    impl Upstream for Scripted {
        async fn send(
            &self,
            addr: SocketAddr,
            _out: &mut Outgoing,
            via: Connection,
            timeout: Duration,
        ) -> Result<Response<UpstreamBody>, AttemptError> {
            self.tries.lock().unwrap().push((addr.port(), via));
            let meets = self
                .script
                .lock()
                .unwrap()
                .pop()
                .expect("a try past the script");
            let reused = self.pooled && via == Connection::PooledOrNew;
            let error = match meets {
                Meets::Answer => return Ok(Response::new(UpstreamBody::empty())),
                Meets::Refused => UpstreamError::Connect(ErrorKind::ConnectionRefused.into()),
                Meets::StaleReused => {
                    UpstreamError::Exchange(ExchangeError::ClosedBeforeResponse(None))
                }
                Meets::Broken => {
                    UpstreamError::Exchange(ExchangeError::Io(ErrorKind::ConnectionReset.into()))
                }
                Meets::TimedOut => UpstreamError::Timeout(timeout),
            };
            let reused = reused && !matches!(meets, Meets::Refused);
            Err(AttemptError::new(error, reused))
        }
    }

    fn bodiless(method: Method) -> Outgoing {
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri("/")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.insert("host", HeaderValue::from_static("x"));
        let forwarding = Forwarding::new(
            &parts.headers,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            None,
        );
        Outgoing::H1(H1Request { parts, forwarding })
    }

    fn run(
        replicas: &Listed,
        upstream: &Scripted,
        mut out: Outgoing,
        attempts: u32,
    ) -> (Result<u16, ProxyError>, Vec<(u16, Connection)>) {
        let service: ServiceName = "svc".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut failover = Failover::new(
            replicas,
            upstream,
            &service,
            attempts,
            Duration::from_secs(1),
            None,
        );
        let result = rt.block_on(failover.send(&mut out));
        let answered = result.map(|_| failover.endpoint().unwrap().port());
        (answered, upstream.tries.lock().unwrap().clone())
    }

    use Connection::{New, PooledOrNew};

    #[test]
    fn a_refused_connect_moves_on_and_sets_the_replica_aside() {
        let replicas = listed(3);
        let upstream = scripted(&[Meets::Refused, Meets::Answer]);
        let (answered, tries) = run(&replicas, &upstream, bodiless(Method::POST), 3);
        assert_eq!(answered.unwrap(), 2);
        assert_eq!(tries, [(1, PooledOrNew), (2, PooledOrNew)]);
        assert_eq!(replicas.unreachable.lock().unwrap().len(), 1);
        assert_eq!(replicas.answered.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_once_on_a_new_one_if_replayable() {
        let upstream = scripted(&[Meets::StaleReused, Meets::Answer]);
        let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::GET), 3);
        assert_eq!(answered.unwrap(), 1);
        assert_eq!(tries, [(1, PooledOrNew), (1, New)]);
    }

    #[test]
    fn a_post_that_went_out_is_never_sent_again() {
        for meets in [Meets::StaleReused, Meets::Broken] {
            let upstream = scripted(&[meets]);
            let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::POST), 3);
            assert!(
                matches!(answered, Err(ProxyError::Backend { .. })),
                "{meets:?}"
            );
            assert_eq!(tries.len(), 1, "{meets:?}: sent once");
        }
    }

    #[test]
    fn a_broken_get_moves_on_to_the_next_replica() {
        let upstream = scripted(&[Meets::Broken, Meets::Answer]);
        let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::GET), 3);
        assert_eq!(answered.unwrap(), 2);
        assert_eq!(tries, [(1, PooledOrNew), (2, PooledOrNew)]);
    }

    #[test]
    fn a_timeout_is_a_504_with_no_other_try() {
        let upstream = scripted(&[Meets::TimedOut]);
        let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::GET), 3);
        assert!(matches!(answered, Err(ProxyError::Timeout { .. })));
        assert_eq!(tries.len(), 1);
    }

    #[test]
    fn attempts_bound_the_tries_and_the_last_error_is_reported() {
        let upstream = scripted(&[Meets::Refused, Meets::Refused]);
        let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::GET), 2);
        assert!(matches!(
            answered,
            Err(ProxyError::Unreachable { attempts: 2, .. })
        ));
        assert_eq!(tries.len(), 2);
    }

    #[test]
    fn fewer_replicas_than_attempts_ends_with_the_last_error() {
        let upstream = scripted(&[Meets::Refused]);
        let (answered, _) = run(&listed(1), &upstream, bodiless(Method::GET), 3);
        assert!(matches!(
            answered,
            Err(ProxyError::Unreachable { attempts: 1, .. })
        ));
    }

    #[test]
    fn a_get_that_broke_on_a_new_connection_moves_on_without_a_second_try_there() {
        let upstream = unpooled(&[Meets::StaleReused, Meets::Answer]);
        let (answered, tries) = run(&listed(3), &upstream, bodiless(Method::GET), 3);
        assert_eq!(answered.unwrap(), 2);
        assert_eq!(tries, [(1, PooledOrNew), (2, PooledOrNew)]);
    }

    #[test]
    fn a_new_connection_refused_after_a_stale_one_sets_the_replica_aside() {
        let replicas = listed(3);
        let upstream = scripted(&[Meets::StaleReused, Meets::Refused, Meets::Answer]);
        let (answered, tries) = run(&replicas, &upstream, bodiless(Method::GET), 3);
        assert_eq!(answered.unwrap(), 2);
        assert_eq!(tries, [(1, PooledOrNew), (1, New), (2, PooledOrNew)]);
        assert_eq!(*replicas.unreachable.lock().unwrap(), [replica(1)]);
    }

    #[test]
    fn when_every_known_replica_failed_a_newer_table_is_waited_for_once() {
        let replicas = listed(1);
        *replicas.coming.lock().unwrap() = Some(replica(9));
        let upstream = scripted(&[Meets::Refused, Meets::Answer]);
        let (answered, tries) = run(&replicas, &upstream, bodiless(Method::GET), 3);
        assert_eq!(answered.unwrap(), 9, "the replacement the table learned of");
        assert_eq!(tries, [(1, PooledOrNew), (9, PooledOrNew)]);
    }
}
