//! THE request path, in named phases. `handle` is the outer part: the
//! in-flight mark, an error turned into its response, the connection's
//! close rules, the completion that records metrics and the log line.
//! `Pass::run` is the inner part: check -> route -> rewrite -> send (with
//! failover) -> respond. The checks that need no I/O are in `checks`, the
//! tries in `failover`, the clients in `upstream`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;

use super::access_log::{AccessLog, Record};
use super::body::{Completion, DownstreamBody};
use super::checks::{self, Addressed, Limits};
use super::compress;
use super::conn::ConnState;
use super::error::{ProxyError, UpstreamError};
use super::failover::Failover;
use super::headers::{self, Forwarding};
use super::route::{self, Route, RouteTable, UpstreamProtocol};
use super::tunnel;
use super::upstream::{Capped, ClientBody, Clients, FaultNote, Outgoing, UpstreamBody};
use super::websocket_h2::{self, Handshake};
use crate::discovery::Discovery;
use crate::error_chain::chain;
use crate::metrics::{Metrics, RouteLabel, RouteStats};

/// The route table and the metric handles of its routes, in its order;
/// swapped as one on a config reload.
#[derive(Debug)]
pub struct LiveRoutes {
    pub table: RouteTable,
    pub stats: Vec<Arc<RouteStats>>,
}

impl LiveRoutes {
    pub fn new(table: RouteTable, metrics: &Metrics) -> Self {
        let stats = metrics.for_routes(table.routes().iter().map(|r| RouteLabel {
            host: r.host.as_deref(),
            prefix: &r.prefix,
            service: r.service.as_str(),
        }));
        Self { table, stats }
    }
}

/// What every request reads: settings, the routes, discovery, the clients.
/// Only the routes change, by an atomic swap of the whole table.
#[derive(Debug)]
pub struct Shared {
    pub routes: ArcSwap<LiveRoutes>,
    pub discovery: Arc<Discovery>,
    pub upstream: Clients,
    pub attempts: u32,
    pub backend_timeout: Duration,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    /// Idle timeout of upgraded (tunnelled) connections.
    pub tunnel_idle: Duration,
    /// `--max-requests-per-connection`: after this many, HTTP/1.1
    /// connections are closed after their response.
    pub max_requests_per_connection: Option<u32>,
    /// `--path-escapes`: which ambiguous paths get 400.
    pub path_escapes: route::PathEscapes,
    /// `--compress`: for routes that do not say.
    pub compress: bool,
}

/// What the request path knows of the client connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub state: Arc<ConnState>,
    /// Whether the client came over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
    /// `addr`'s IP as a header value, for X-Forwarded-For and X-Real-IP.
    pub ip: HeaderValue,
}

/// What a request learned on its way, for the metrics and the access log.
#[derive(Debug, Default)]
struct Trace {
    stats: Option<Arc<RouteStats>>,
    route: Option<String>,
    service: Option<String>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    request_id: Option<HeaderValue>,
    /// Whether and how the response may be compressed, from the route and
    /// the request's Accept-Encoding.
    compress: compress::Plan,
}

/// The request's own line and fields, kept for the log before the request
/// is taken apart.
struct Seen {
    method: Method,
    uri: Uri,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    closes: bool,
    started: Instant,
}

impl Seen {
    fn of<B>(req: &Request<B>, logged: bool) -> Self {
        let field = |name| logged.then(|| req.headers().get(name).cloned()).flatten();
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: field(header::REFERER),
            user_agent: field(header::USER_AGENT),
            closes: headers::request_closes(req.version(), req.headers()),
            started: Instant::now(),
        }
    }
}

/// Answer one request. Never fails: every error becomes a response here.
///
/// A plain function that returns an `async move` block rather than an
/// `async fn`: an `async fn` keeps each argument twice in its state (as the
/// argument and as the local it is moved to), and the request is large.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn handle(
    shared: Arc<Shared>,
    client: Client,
    req: Request<ClientBody>,
) -> impl Future<Output = Result<Response<DownstreamBody>, Infallible>> + Send + 'static {
    // In flight from the moment hyper hands the request over, before the
    // future's first poll: hyper may read on (and find the client's end of
    // input, `ConnState::hold_eof`) before it polls us.
    let in_flight = client
        .state
        .begin_request(req.version(), !req.body().is_end_stream());
    async move {
        let seen = Seen::of(&req, shared.access_log.is_some());
        let mut pass = Pass {
            shared: &shared,
            client: &client,
            trace: Trace::default(),
        };
        let response = match pass.run(req).await {
            Ok(response) => response,
            Err(e) => refusal(&e, &client, &seen),
        };
        let mut trace = pass.trace;
        let mut response = compress::apply(trace.compress, &seen.method, response);
        let closes_after = client.state.had_trailers()
            || shared
                .max_requests_per_connection
                .is_some_and(|max| in_flight.served() >= max && seen.version < Version::HTTP_2);
        if closes_after {
            close_after(&mut response);
        }
        if seen.closes && response.body().is_in_hand() {
            client.state.hold_last_response();
        }
        let done = Completion {
            in_flight,
            stats: trace
                .stats
                .take()
                .unwrap_or_else(|| shared.metrics.unrouted().clone()),
            status: response.status().as_u16(),
            started: seen.started,
            log: log_record(&shared, &client, seen, trace),
            bytes: 0,
        };
        Ok(response.map(|b| b.on_completion(done)))
    }
}

fn close_after(response: &mut Response<DownstreamBody>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// The response to a request that failed, logged by how it failed.
fn refusal(e: &ProxyError, client: &Client, seen: &Seen) -> Response<DownstreamBody> {
    let (status, text) = e.response_parts();
    let (method, uri) = (&seen.method, &seen.uri);
    if status.is_server_error() {
        tracing::warn!(client = %client.addr, %method, %uri, %status, error = %chain(e), "request failed");
    } else {
        tracing::debug!(client = %client.addr, %method, %uri, %status, error = %e, "request refused");
    }
    let mut response = local_response(status, text);
    let unframed = matches!(
        status,
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_IMPLEMENTED
    );
    if unframed && seen.version < Version::HTTP_2 {
        // After a malformed request the rest of the byte stream cannot be
        // trusted to be framed as the client meant.
        close_after(&mut response);
    }
    response
}

fn log_record(shared: &Shared, client: &Client, seen: Seen, trace: Trace) -> Option<Box<Record>> {
    let sink = shared.access_log.clone()?;
    Some(Box::new(Record {
        sink,
        time: std::time::SystemTime::now(),
        client: client.addr,
        method: seen.method,
        uri: seen.uri,
        version: seen.version,
        referer: seen.referer,
        user_agent: seen.user_agent,
        request_id: trace.request_id,
        route: trace.route,
        service: trace.service,
        endpoint: trace.endpoint,
        attempts: trace.attempts,
    }))
}

pub fn local_response(status: StatusCode, text: &'static str) -> Response<DownstreamBody> {
    let mut resp = Response::new(DownstreamBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// One request's way through the phases, and what it learned.
struct Pass<'a> {
    shared: &'a Shared,
    client: &'a Client,
    trace: Trace,
}

/// What rewriting the request for the backend made beside its parts.
struct Rewritten {
    forwarding: Forwarding,
    /// The client's side of an upgrade it asked for: HTTP/1.1's, or an
    /// extended CONNECT's over HTTP/2.
    client_upgrade: Option<OnUpgrade>,
    /// The WebSocket handshake made for an HTTP/2 client (RFC 8441).
    handshake: Option<Handshake>,
    /// The client accepts trailers (`TE: trailers`).
    te_trailers: bool,
}

impl<'a> Pass<'a> {
    /// check -> route -> rewrite -> send -> respond. (A plain function for
    /// the reason given at `handle`.)
    fn run(
        &mut self,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Result<Response<DownstreamBody>, ProxyError>> + Send + use<'_, 'a>
    {
        // Split before the state machine, which then holds the parts once.
        let (mut parts, body) = req.into_parts();
        async move {
            let shared = self.shared;
            let declared = body.size_hint().exact();
            checks::within_limits(&parts.uri, &parts.headers, declared, &shared.limits)?;
            let addressed = checks::addressed(parts.version, &parts.uri, &parts.headers)?;
            let path = checks::routing_path(parts.uri.path(), shared.path_escapes)?;
            let live = shared.routes.load_full();
            let route = self.route(&live, addressed.host(), &path)?;
            let compress = route.options.compress.unwrap_or(shared.compress);
            self.trace.compress = compress::plan(compress, &parts.headers);
            let path = match route.options.strip_prefix {
                true => checks::strip_prefix(path, &route.prefix),
                false => path,
            };
            let target = checks::backend_target(&parts.uri, path)?;
            let client_version = parts.version;
            let rewritten = self.rewrite(&mut parts, target, route, addressed)?;
            let (body, fault) = self.request_body(body, client_version).await?;
            let (client_upgrade, handshake) = (rewritten.client_upgrade, rewritten.handshake);
            let mut outgoing = Outgoing::new(
                parts,
                body,
                rewritten.forwarding,
                route.options.upstream,
                rewritten.te_trailers,
            )?;
            let timeout = route
                .options
                .backend_timeout
                .unwrap_or(shared.backend_timeout);
            let sent = self.send(&route.service, &mut outgoing, timeout).await;
            // However the send failed, a body that failed is the client's doing.
            if let Some(fault) = fault.and_then(|f| f.get()) {
                return Err(fault.into());
            }
            let upgrade = client_upgrade.map(|u| (u, handshake));
            self.respond(sent?, client_version, upgrade, &route.service)
        }
    }

    /// The route for the host and path, its metrics noted.
    fn route<'r>(
        &mut self,
        live: &'r LiveRoutes,
        host: Option<&str>,
        path: &str,
    ) -> Result<&'r Route, ProxyError> {
        let (index, route) = live
            .table
            .find_indexed(host, path)
            .ok_or(ProxyError::NoRoute)?;
        self.trace.stats = Some(live.stats[index].clone());
        if self.shared.access_log.is_some() {
            let host = route.host.as_deref().unwrap_or("");
            self.trace.route = Some(format!("{host}{}", route.prefix));
            self.trace.service = Some(route.service.to_string());
        }
        Ok(route)
    }

    /// The request as the backend sees it: the target routed on, HTTP/1.1,
    /// no hop-by-hop fields but the upgrade asked for and our TE, a Host,
    /// and the forwarding fields (X-Forwarded-*, X-Real-IP, X-Request-Id).
    fn rewrite(
        &mut self,
        parts: &mut Parts,
        target: Option<Uri>,
        route: &Route,
        addressed: Addressed,
    ) -> Result<Rewritten, ProxyError> {
        if let Some(target) = target {
            parts.uri = target;
        }
        // An Upgrade (WebSocket...) over HTTP/1.1 is passed on, and a
        // WebSocket over HTTP/2 becomes one; the tunnel is set up once the
        // backend answers 101.
        let mut handshake = None;
        let upgrade = match parts.version {
            Version::HTTP_11 => headers::requested_upgrade(&parts.headers),
            Version::HTTP_2 if websocket_h2::is_extended_connect(parts) => {
                let nonce: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new())
                    .map_err(|_| ProxyError::UnsupportedProtocol)?
                    .expose();
                handshake = Some(websocket_h2::to_upgrade(parts, nonce)?);
                headers::requested_upgrade(&parts.headers)
            }
            _ => None,
        };
        let client_upgrade = upgrade
            .is_some()
            .then(|| parts.extensions.remove::<OnUpgrade>())
            .flatten();
        parts.version = Version::HTTP_11;
        // TE is hop-by-hop: the client's goes, and the backend hears ours.
        let te_trailers = headers::wants_trailers(&parts.headers);
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = upgrade {
            headers::set_upgrade(&mut parts.headers, protocol);
        }
        if te_trailers && route.options.upstream == UpstreamProtocol::Http1 {
            headers::accept_trailers(&mut parts.headers);
        }
        let host = checks::set_backend_host(&mut parts.headers, &addressed, route.service.as_str());
        let client = self.client;
        let scheme = if client.tls { "https" } else { "http" };
        let forwarding = Forwarding::new(&parts.headers, &client.ip, scheme, host.as_ref())
            .with_request_id(&parts.headers);
        if self.shared.access_log.is_some() {
            self.trace.request_id = forwarding.request_id().cloned();
        }
        Ok(Rewritten {
            forwarding,
            client_upgrade,
            handshake,
            te_trailers,
        })
    }

    /// The client's body, capped; a chunked one read ahead as far as it
    /// has come, so that framing already broken is refused with nothing
    /// forwarded.
    async fn request_body(
        &self,
        body: ClientBody,
        client_version: Version,
    ) -> Result<(Capped, Option<Arc<FaultNote>>), ProxyError> {
        let limit = self.shared.limits.max_body_bytes.unwrap_or(u64::MAX);
        let (body, fault) = Capped::new(body, limit);
        let mut body = body.ending_for(&self.client.state);
        if client_version < Version::HTTP_2
            && !body.is_end_stream()
            && body.size_hint().exact().is_none()
        {
            body.read_ahead().await?;
        }
        Ok((body, fault))
    }

    /// Send with failover, and note where it went.
    async fn send(
        &mut self,
        service: &portico_wire::ServiceName,
        outgoing: &mut Outgoing,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let shared = self.shared;
        let mut failover = Failover::new(
            &*shared.discovery,
            &shared.upstream,
            service,
            shared.attempts,
            timeout,
            self.trace.stats.as_deref(),
        );
        let sent = failover.send(outgoing).await;
        self.trace.endpoint = failover.endpoint();
        self.trace.attempts = failover.tried.len() as u32;
        sent
    }

    /// The backend's response as the client gets it: our framing, and
    /// after a 101 the tunnel between the two upgraded connections (for an
    /// HTTP/2 client, the 101 becomes the 200 that opens its stream).
    fn respond(
        &self,
        response: Response<UpstreamBody>,
        client_version: Version,
        client_upgrade: Option<(OnUpgrade, Option<Handshake>)>,
        service: &portico_wire::ServiceName,
    ) -> Result<Response<DownstreamBody>, ProxyError> {
        let handshake = client_upgrade.as_ref().and_then(|(_, h)| h.as_ref());
        if response.status() != StatusCode::SWITCHING_PROTOCOLS && handshake.is_none() {
            let mut response = response.map(DownstreamBody::upstream);
            *response.version_mut() = client_version;
            return Ok(response);
        }
        let backend_failed = |source| ProxyError::Backend {
            service: service.clone(),
            addr: self
                .trace
                .endpoint
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        };
        let (mut head, body) = response.into_parts();
        head.version = client_version;
        let switched = head.status == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(handshake) = handshake {
            websocket_h2::to_h2_response(handshake, &mut head.status, &mut head.headers)
                .map_err(backend_failed)?;
        }
        let backend_upgrade = head.extensions.remove::<OnUpgrade>();
        let response = Response::from_parts(head, DownstreamBody::upstream(body));
        if !switched {
            return Ok(response);
        }
        let (Some((upgrade, _)), Some(backend)) = (client_upgrade, backend_upgrade) else {
            return Err(backend_failed(UpstreamError::UnaskedUpgrade));
        };
        let state = &self.client.state;
        state.upgraded();
        tokio::spawn(tunnel::run(
            upgrade,
            backend,
            self.shared.tunnel_idle,
            state.clone(),
        ));
        Ok(response)
    }
}
