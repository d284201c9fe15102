//! THE request path, in order: `handle` (timing, log, error -> response)
//! -> `proxy`: route -> pick a replica -> rewrite headers -> send upstream
//! (retrying only when the error says it is safe) -> rewrite headers ->
//! response.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;

use super::access_log::{AccessLog, Record};
use super::body::{Completion, ResponseBody};
use super::compress;
use super::conn::ConnState;
use super::error::{replayable, ProxyError, UpstreamError};
use super::h1::client as own;
use super::headers;
use super::route::{self, RouteTable, UpstreamProtocol};
use super::tunnel;
use super::upstream::{Capped, Conn, Pool, SendError, ToPool, UpstreamBody, UpstreamRequestBody};
use crate::admin::metrics::{Metrics, RouteStats};
use crate::discovery::snapshot::Load;
use crate::discovery::{Discovery, DiscoveryError};
use arc_swap::ArcSwap;

/// How long a request whose every known replica failed waits for a newer
/// endpoint table before giving up with 502.
const DISCOVERY_CATCH_UP: Duration = Duration::from_millis(500);

/// The route table and the metric handles of its routes, in its order;
/// swapped as one on a config reload.
#[derive(Debug)]
pub struct LiveRoutes {
    pub table: RouteTable,
    pub stats: Vec<Arc<RouteStats>>,
}

impl LiveRoutes {
    pub fn new(table: RouteTable, metrics: &Metrics) -> Self {
        let stats = metrics.for_routes(&table);
        Self { table, stats }
    }
}

/// Everything the request path reads. Only the routes change, by an atomic
/// swap of the whole table.
#[derive(Debug)]
pub struct Proxy {
    pub routes: ArcSwap<LiveRoutes>,
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    pub attempts: u32,
    pub backend_timeout: Duration,
    /// Longest request target accepted; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest request head (target and header fields); larger gets 431.
    pub max_header_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    /// Idle timeout of upgraded (tunnelled) connections.
    pub tunnel_idle: Duration,
    /// `--max-body-bytes`: request bodies past this get 413.
    pub max_body_bytes: Option<u64>,
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

/// What the request path learned, for metrics and the access log.
#[derive(Debug, Default)]
struct Exchange {
    stats: Option<Arc<RouteStats>>,
    route: Option<String>,
    service: Option<String>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    request_id: Option<HeaderValue>,
    compress: compress::Plan,
}

/// Answer one request. Never fails: every error becomes a response here.
///
/// This and the steps below are plain functions that return an `async move`
/// block rather than `async fn`s: an `async fn` keeps each argument twice in
/// its state (as the argument and as the local it is moved to), and the
/// request's state is boxed and moved whole at every step. The request
/// itself was 4,464 bytes.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn handle(
    proxy: Arc<Proxy>,
    client: Client,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static {
    // In flight from the moment hyper hands the request over, before the
    // future's first poll: hyper may read on (and find the client's end of
    // input, `ConnState::hold_eof`) before it polls us.
    let in_flight = client
        .state
        .begin_request(req.version(), !req.body().is_end_stream());
    async move {
        let closes = headers::request_closes(req.version(), req.headers());
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let version = req.version();
        let (referer, user_agent) = match &proxy.access_log {
            Some(_) => (
                req.headers().get(header::REFERER).cloned(),
                req.headers().get(header::USER_AGENT).cloned(),
            ),
            None => (None, None),
        };
        let mut exchange = Exchange::default();
        let response = match proxy_request(&proxy, &client, req, &mut exchange).await {
            Ok(resp) => resp,
            Err(e) => {
                let (status, text) = e.response_parts();
                if status.is_server_error() {
                    tracing::warn!(client = %client.addr, %method, %uri, %status, error = %super::error::chain(&e), "request failed");
                } else {
                    tracing::debug!(client = %client.addr, %method, %uri, %status, error = %e, "request refused");
                }
                let mut resp = local_response(status, text);
                if matches!(
                    status,
                    StatusCode::BAD_REQUEST
                        | StatusCode::PAYLOAD_TOO_LARGE
                        | StatusCode::NOT_IMPLEMENTED
                ) && version < Version::HTTP_2
                {
                    // After a malformed request the rest of the byte stream
                    // cannot be trusted to be framed as the client meant.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        let mut response = compress::apply(exchange.compress, &method, response);
        if client.state.had_trailers() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(max) = proxy.max_requests_per_connection {
            if in_flight.served() >= max && version < Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        if closes && response.body().is_in_hand() {
            client.state.hold_last_response();
        }
        let log = proxy.access_log.clone().map(|sink| {
            Box::new(Record {
                sink,
                time: std::time::SystemTime::now(),
                client: client.addr,
                method,
                uri,
                version,
                referer,
                user_agent,
                request_id: exchange.request_id,
                route: exchange.route,
                service: exchange.service,
                endpoint: exchange.endpoint,
                attempts: exchange.attempts,
            })
        });
        let done = Completion {
            in_flight,
            stats: exchange
                .stats
                .unwrap_or_else(|| proxy.metrics.unrouted().clone()),
            status: response.status().as_u16(),
            started,
            log,
            bytes: 0,
        };
        Ok(response.map(|b| b.on_completion(done)))
    }
}

pub fn local_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn proxy_request<'a>(
    proxy: &'a Proxy,
    client: &'a Client,
    req: Request<Incoming>,
    exchange: &'a mut Exchange,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    // Split before the state machine, which then holds the parts once.
    let (mut parts, body) = req.into_parts();
    async move {
        if let Some(pq) = parts.uri.path_and_query() {
            if pq.as_str().len() > proxy.max_uri_bytes {
                return Ok(local_response(
                    StatusCode::URI_TOO_LONG,
                    "Request target too long.\n",
                ));
            }
        }
        // hyper bounds the head only while it is incomplete: a head that arrives
        // whole in one read can pass its buffer limit. The limit is ours.
        let head_bytes = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + parts
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if head_bytes > proxy.max_header_bytes {
            return Ok(local_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request header fields too large.\n",
            ));
        }
        let client_version = parts.version;
        if let (Some(limit), Some(len)) = (proxy.max_body_bytes, body.size_hint().exact()) {
            // A declared length over the limit is refused before anything moves.
            if len > limit {
                return Err(ProxyError::BodyTooLarge);
            }
        }

        if !headers::only_chunked(&parts.headers) {
            return Err(ProxyError::UnsupportedTransferCoding);
        }

        // Route on the host the client addressed and the normalised path.
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let host_header = hosts.next().cloned();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest(
                "Bad request: more than one Host header.\n",
            ));
        }
        if host_header.is_none() && parts.version == Version::HTTP_11 {
            // RFC 9112 section 3.2: a server must answer 400 to such a request.
            return Err(ProxyError::BadRequest(
                "Bad request: HTTP/1.1 requires a Host header.\n",
            ));
        }
        let authority = request_authority(&parts.uri, host_header.as_ref())?;
        let host = authority.as_ref().map(|a| a.host());
        // RFC 9112 3.2.2 and RFC 9113 8.3.1: the Host a backend sees is made
        // from an absolute-form target or :authority, not forwarded.
        let target_host = parts.uri.authority().map(host_field).transpose()?;
        let raw_path = parts.uri.path();
        if let Some(why) = route::ambiguous_path(raw_path, proxy.path_escapes) {
            return Err(ProxyError::BadRequest(why.message()));
        }
        let path: Cow<'_, str> = if route::is_normal(raw_path) {
            Cow::Borrowed(raw_path)
        } else {
            Cow::Owned(
                route::normalise_path(raw_path).ok_or(ProxyError::BadRequest(
                    "Bad request: the request target must be an absolute path.\n",
                ))?,
            )
        };
        let live = proxy.routes.load_full();
        let (index, route) = live
            .table
            .find_indexed(host, &path)
            .ok_or(ProxyError::NoRoute)?;
        let service = &route.service;
        exchange.stats = Some(live.stats[index].clone());
        let compress = route.options.compress.unwrap_or(proxy.compress);
        exchange.compress = compress::plan(compress, &parts.headers);
        if proxy.access_log.is_some() {
            exchange.route = Some(format!(
                "{}{}",
                route.host.as_deref().unwrap_or(""),
                route.prefix
            ));
            exchange.service = Some(service.to_string());
        }
        // The route may ask for its prefix to be cut before the backend sees it.
        let path: Cow<'_, str> = match route.options.strip_prefix {
            true if route.prefix != "/" => {
                let rest = &path[route.prefix.len()..];
                Cow::Owned(if rest.starts_with('/') {
                    rest.to_owned()
                } else {
                    format!("/{rest}")
                })
            }
            _ => path,
        };

        // The backend sees what we routed on: the normalised path, the query as
        // sent. Most requests already carry exactly that (an origin-form target,
        // a normal path, no prefix cut): those keep their target untouched.
        if matches!(path, Cow::Owned(_)) || parts.uri.authority().is_some() {
            let target = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.into_owned(),
            };
            parts.uri = Uri::try_from(target).map_err(|_| {
                ProxyError::BadRequest("Bad request: the request target is malformed.\n")
            })?;
        }
        parts.version = Version::HTTP_11;
        // An Upgrade (WebSocket...) over HTTP/1.1 is passed on; the tunnel is
        // set up once the backend answers 101.
        let upgrade = match client_version {
            Version::HTTP_11 => headers::requested_upgrade(&parts.headers),
            _ => None,
        };
        let client_upgrade = upgrade
            .is_some()
            .then(|| parts.extensions.remove::<OnUpgrade>())
            .flatten();
        // TE is hop-by-hop: the client's goes, and the backend hears ours.
        let te_trailers = headers::wants_trailers(&parts.headers);
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = upgrade {
            headers::set_upgrade(&mut parts.headers, protocol);
        }
        if te_trailers && route.options.upstream == UpstreamProtocol::Http1 {
            headers::accept_trailers(&mut parts.headers);
        }
        let host_value = match target_host {
            Some(h) => {
                parts.headers.insert(header::HOST, h.clone());
                Some(h)
            }
            // Already the request's one Host field.
            None => host_header,
        };
        if host_value.is_none() {
            // HTTP/1.0 may name no host, but the backend's request is
            // HTTP/1.1 and must (RFC 9112 section 3.2): the service's name,
            // as nginx sends its upstream's name ($proxy_host).
            if let Ok(name) = HeaderValue::from_str(service.as_str()) {
                parts.headers.insert(header::HOST, name);
            }
        }
        let forwarding = headers::Forwarding::new(
            &parts.headers,
            &client.ip,
            if client.tls { "https" } else { "http" },
            host_value.as_ref(),
        )
        .with_request_id(&parts.headers);
        if proxy.access_log.is_some() {
            exchange.request_id = forwarding.request_id().cloned();
        }
        let (body, fault) = Capped::new(body, proxy.max_body_bytes.unwrap_or(u64::MAX));
        let mut body = body.ending_for(&client.state);
        if client_version < Version::HTTP_2
            && !body.is_end_stream()
            && body.size_hint().exact().is_none()
        {
            // Chunked: framing that is already in hand and broken is
            // refused before anything is forwarded.
            body.read_ahead().await?;
        }
        // Our own client writes them after the request's fields; hyper's
        // clients take them in the map.
        let own_client = uses_own_client(route.options.upstream, &parts.headers, &body);
        let forwarding = if own_client {
            Some(forwarding)
        } else {
            forwarding.apply(&mut parts.headers);
            None
        };

        if route.options.upstream == UpstreamProtocol::H2c {
            // HTTP/2 names the host in :authority, taken from the Host
            // the request would carry over HTTP/1.1.
            let authority = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("backend");
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = Uri::try_from(format!("http://{authority}{target}"))
                .map_err(|_| ProxyError::BadRequest("Bad request: malformed Host header.\n"))?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            if te_trailers {
                // The one TE HTTP/2 allows (RFC 9113 section 8.2.2).
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }

        // A bodiless idempotent request may be sent again after bytes went
        // out (`error::replayable`, the half of `may_resend` known now).
        // hyper's clients take the request, so they need a copy; our own
        // HTTP/1.1 client keeps it.
        let replay = (!own_client && replayable(&parts.method, body.is_end_stream())).then(|| {
            let mut r = Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let request = Request::from_parts(parts, Either::Left(body));
        let backend_timeout = route
            .options
            .backend_timeout
            .unwrap_or(proxy.backend_timeout);
        let upstream = route.options.upstream;
        let sent = send_with_failover(
            proxy,
            service,
            request,
            forwarding,
            replay,
            backend_timeout,
            upstream,
            exchange,
        )
        .await;
        // However the send failed, a body that failed is the client's doing.
        if let Some(fault) = fault.and_then(|f| f.get()) {
            return Err(fault.into());
        }
        let mut response = sent?;
        // Our framing towards the client is ours, whatever the backend spoke.
        *response.version_mut() = client_version;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let backend_upgrade = response.extensions_mut().remove::<OnUpgrade>();
            match (client_upgrade, backend_upgrade) {
                (Some(upgrade), Some(backend)) => {
                    client.state.upgraded();
                    tokio::spawn(tunnel::run(
                        upgrade,
                        backend,
                        proxy.tunnel_idle,
                        client.state.clone(),
                    ));
                }
                _ => {
                    return Err(ProxyError::Backend {
                        service: service.clone(),
                        addr: exchange
                            .endpoint
                            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                        source: UpstreamError::UnaskedUpgrade,
                    })
                }
            }
        }
        Ok(response)
    }
}

/// Up to `attempts` replicas. A connect failure always moves on (nothing was
/// sent); a failure after sending moves on only for a replayable request.
#[allow(clippy::too_many_arguments)]
fn send_with_failover<'a>(
    proxy: &'a Proxy,
    service: &'a portico_wire::ServiceName,
    request: Request<UpstreamRequestBody>,
    mut forwarding: Option<headers::Forwarding>,
    replay: Option<Request<()>>,
    backend_timeout: Duration,
    upstream: UpstreamProtocol,
    exchange: &'a mut Exchange,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    let method = request.method().clone();
    let mut request = Some(request);
    async move {
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(proxy.attempts as usize);
        let mut last: Option<(SocketAddr, UpstreamError)> = None;
        let health = proxy.discovery.health();

        let mut caught_up = false;
        for _ in 0..proxy.attempts {
            let generation = proxy.discovery.generation();
            let mut picked = proxy.discovery.pick(service, &tried).await;
            if matches!(picked, Err(DiscoveryError::Exhausted(_))) && !caught_up {
                // Every replica we know failed, with attempts left: the table may
                // lag a replacement in progress. Wait once, briefly, for news.
                caught_up = true;
                if Box::pin(proxy.discovery.newer_than(generation, DISCOVERY_CATCH_UP)).await {
                    picked = proxy.discovery.pick(service, &tried).await;
                }
            }
            let (addr, load) = match picked {
                Ok(p) => (p.addr, p.load),
                // Out of replicas to try: report what went wrong with the last one.
                Err(e @ (DiscoveryError::Exhausted(_) | DiscoveryError::NotFound(_))) => {
                    return Err(give_up(service, &tried, last).unwrap_or(e.into()))
                }
                Err(e) => return Err(e.into()),
            };
            tried.push(addr);
            exchange.endpoint = Some(addr);
            exchange.attempts = tried.len() as u32;
            if tried.len() > 1 {
                if let Some(stats) = &exchange.stats {
                    stats.retry();
                }
            }

            if request
                .as_ref()
                .is_some_and(|r| uses_own_client(upstream, r.headers(), r.body()))
            {
                let Some(req) = request.take() else { break };
                let (parts, body) = req.into_parts();
                // A pooled connection may have been closed by the backend
                // just now; when that is all that failed, a fresh connection
                // to the same replica is tried before counting it as failed.
                let mut pooled = proxy.pool.checkout_own(addr);
                let error = loop {
                    let reused = pooled.is_some();
                    let mut conn = match pooled.take() {
                        Some(c) => c,
                        None => match Box::pin(proxy.pool.connect_own(addr)).await {
                            Ok(c) => c,
                            Err(e) => {
                                connect_failed(proxy, exchange, addr);
                                tracing::debug!(backend = %addr, %service, error = %e, "connect failed; trying another replica");
                                break e;
                            }
                        },
                    };
                    let answer =
                        conn.exchange(&parts, forwarding.as_ref(), own::MAX_RESPONSE_HEAD_BYTES);
                    match tokio::time::timeout(backend_timeout, answer).await {
                        Err(_elapsed) => return Err(timed_out(service, addr, backend_timeout)),
                        Ok(Ok(head)) => {
                            health.record_success(addr);
                            // A 101 to a request that asked for no upgrade
                            // is refused by `proxy_request`, as for hyper's
                            // client; its body gives the connection up.
                            let body =
                                own::ResponseBody::new(conn, &head, ToPool(proxy.pool.clone()));
                            let mut response = Response::new(ResponseBody::upstream(
                                UpstreamBody::own(body, load),
                            ));
                            *response.status_mut() = head.status;
                            *response.headers_mut() = head.headers;
                            if head.hop_by_hop {
                                headers::remove_hop_by_hop(response.headers_mut());
                            }
                            return Ok(response);
                        }
                        Ok(Err(e)) => {
                            let e = UpstreamError::Exchange(e);
                            if !(reused && stale(&e) && e.may_resend(&parts.method, true)) {
                                break e;
                            }
                            tracing::debug!(backend = %addr, %service, error = %super::error::chain(&e), "pooled connection closed by the backend; retrying on a new one");
                        }
                    }
                };
                if !error.may_resend(&parts.method, true) {
                    return Err(ProxyError::Backend {
                        service: service.clone(),
                        addr,
                        source: error,
                    });
                }
                tracing::debug!(backend = %addr, %service, error = %super::error::chain(&error), "request failed before an answer; trying another replica");
                last = Some((addr, error));
                request = Some(Request::from_parts(parts, body));
                continue;
            }

            // hyper's clients: HTTP/2 with prior knowledge, and HTTP/1.1 for
            // requests with a body and upgrades. Boxed: their state is
            // kilobytes, and the bodiless requests of our own client would
            // otherwise move it and allocate it every time.
            if let (Some(f), Some(r)) = (forwarding.take(), request.as_mut()) {
                // Meant for our client, which no request leaves once chosen
                // (`uses_own_client` holds for it on every try); kept right
                // whatever happens.
                f.apply(r.headers_mut());
            }
            let attempt = Attempt {
                proxy,
                service,
                method: &method,
                addr,
                load,
                request: &mut request,
                replay: replay.as_ref(),
                backend_timeout,
                exchange,
                last: &mut last,
            };
            let sent = match upstream {
                UpstreamProtocol::H2c => Box::pin(send_h2c(attempt)).await?,
                _ => Box::pin(send_hyper(attempt)).await?,
            };
            match sent {
                Some(response) => return Ok(response),
                None if request.is_none() => break,
                None => {}
            }
        }
        Err(give_up(service, &tried, last)
            .unwrap_or_else(|| DiscoveryError::Exhausted(service.clone()).into()))
    }
}

/// One try of one replica through hyper's clients. Their answer `Ok(None)`
/// means: move on to the next replica, with `last` telling why and
/// `request` what to send there.
struct Attempt<'a> {
    proxy: &'a Proxy,
    service: &'a portico_wire::ServiceName,
    method: &'a Method,
    addr: SocketAddr,
    load: Option<Load>,
    request: &'a mut Option<Request<UpstreamRequestBody>>,
    replay: Option<&'a Request<()>>,
    backend_timeout: Duration,
    exchange: &'a Exchange,
    last: &'a mut Option<(SocketAddr, UpstreamError)>,
}

/// One replica over HTTP/2 with prior knowledge.
async fn send_h2c(a: Attempt<'_>) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    let mut sender = match a.proxy.pool.h2(a.addr).await {
        Ok(s) => s,
        Err(e) => {
            connect_failed(a.proxy, a.exchange, a.addr);
            *a.last = Some((a.addr, e));
            return Ok(None);
        }
    };
    let Some(req) = a.request.take() else {
        return Ok(None);
    };
    match tokio::time::timeout(a.backend_timeout, sender.try_send_request(req)).await {
        Err(_elapsed) => Err(timed_out(a.service, a.addr, a.backend_timeout)),
        Ok(Ok(mut resp)) => {
            a.proxy.discovery.health().record_success(a.addr);
            headers::remove_hop_by_hop(resp.headers_mut());
            Ok(Some(resp.map(|body| {
                ResponseBody::upstream(UpstreamBody::unpooled(body, a.load))
            })))
        }
        Ok(Err(e)) => {
            let (again, error) = resend_or_fail(e, &a)?;
            *a.request = Some(again);
            *a.last = Some((a.addr, error));
            Ok(None)
        }
    }
}

/// One replica through hyper's HTTP/1.1 client.
async fn send_hyper(a: Attempt<'_>) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    let health = a.proxy.discovery.health();
    // A pooled connection may have been closed by the backend just now;
    // when that is all that failed, a fresh connection to the same
    // replica is tried before counting the replica as failed.
    let mut pooled = a.proxy.pool.checkout(a.addr).await;
    loop {
        let reused = pooled.is_some();
        let mut conn: Conn = match pooled.take() {
            Some(s) => s,
            // Boxed: few requests connect, and hyper's handshake need not
            // size the future of every one.
            None => match Box::pin(a.proxy.pool.connect(a.addr)).await {
                Ok(s) => s,
                Err(e) => {
                    connect_failed(a.proxy, a.exchange, a.addr);
                    tracing::debug!(backend = %a.addr, service = %a.service, error = %e, "connect failed; trying another replica");
                    *a.last = Some((a.addr, e));
                    return Ok(None);
                }
            },
        };
        let Some(req) = a.request.take() else {
            return Ok(None);
        };
        let sent = tokio::time::timeout(a.backend_timeout, conn.send(req)).await;
        match sent {
            Err(_elapsed) => return Err(timed_out(a.service, a.addr, a.backend_timeout)),
            Ok(Ok(mut resp)) => {
                health.record_success(a.addr);
                if resp.headers().contains_key(header::TRANSFER_ENCODING)
                    && resp.headers().contains_key(header::CONTENT_LENGTH)
                {
                    // RFC 9112 6.3: ambiguous framing; the connection's
                    // state is unknown, so it is dropped, not pooled.
                    return Err(ProxyError::Backend {
                        service: a.service.clone(),
                        addr: a.addr,
                        source: UpstreamError::AmbiguousFraming,
                    });
                }
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // The connection now belongs to the tunnel: it never
                    // goes back to the pool.
                    let protocol = resp.headers().get(header::UPGRADE).cloned();
                    headers::remove_hop_by_hop(resp.headers_mut());
                    if let Some(p) = protocol {
                        headers::set_upgrade(resp.headers_mut(), p);
                    }
                    conn.finish_upgrade();
                    return Ok(Some(resp.map(|_| ResponseBody::empty())));
                }
                headers::remove_hop_by_hop(resp.headers_mut());
                let pool = a.proxy.pool.clone();
                return Ok(Some(resp.map(|body| {
                    ResponseBody::upstream(UpstreamBody::new(body, pool, conn, a.load))
                })));
            }
            Ok(Err(e)) => {
                let (again, error) = resend_or_fail(e, &a)?;
                *a.request = Some(again);
                tracing::debug!(backend = %a.addr, service = %a.service, reused, error = %super::error::chain(&error), "request failed before an answer; retrying");
                *a.last = Some((a.addr, error));
                if !reused {
                    return Ok(None);
                }
            }
        }
    }
}

/// The backend took longer than the route's backend timeout to answer.
fn timed_out(
    service: &portico_wire::ServiceName,
    addr: SocketAddr,
    timeout: Duration,
) -> ProxyError {
    ProxyError::Timeout {
        service: service.clone(),
        addr,
        timeout,
    }
}

fn give_up(
    service: &portico_wire::ServiceName,
    tried: &[SocketAddr],
    last: Option<(SocketAddr, UpstreamError)>,
) -> Option<ProxyError> {
    last.map(|(last_addr, source)| ProxyError::Unreachable {
        service: service.clone(),
        attempts: tried.len() as u32,
        last_addr,
        source,
    })
}

/// A connect to `addr` failed: nothing was sent, so the next replica may
/// take the request. The replica is set aside for a while.
fn connect_failed(proxy: &Proxy, exchange: &Exchange, addr: SocketAddr) {
    proxy
        .discovery
        .health()
        .record_failure(addr, Instant::now());
    if let Some(stats) = &exchange.stats {
        stats.connect_error();
    }
}

/// After a failed send through hyper's clients: the request to try again,
/// as `UpstreamError::may_resend` allows (hyper's own if it never sent it,
/// else a copy of a bodiless one); otherwise the final error.
fn resend_or_fail(
    mut e: SendError,
    a: &Attempt<'_>,
) -> Result<(Request<UpstreamRequestBody>, UpstreamError), ProxyError> {
    let unsent = e.take_message();
    let error = UpstreamError::Request {
        source: e.into_error(),
        unsent: unsent.is_some(),
    };
    let again = match error.may_resend(a.method, a.replay.is_some()) {
        true => unsent.or_else(|| a.replay.map(rebuild)),
        false => None,
    };
    match again {
        Some(request) => Ok((request, error)),
        None => Err(ProxyError::Backend {
            service: a.service.clone(),
            addr: a.addr,
            source: error,
        }),
    }
}

/// A pooled connection the backend closed meanwhile fails this way; a new
/// connection to the same replica may then take the request.
fn stale(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Exchange(e) if e.before_response())
}

fn rebuild(template: &Request<()>) -> Request<UpstreamRequestBody> {
    let mut r = Request::new(Either::Right(Empty::<Bytes>::new()));
    *r.method_mut() = template.method().clone();
    *r.uri_mut() = template.uri().clone();
    *r.version_mut() = template.version();
    *r.headers_mut() = template.headers().clone();
    r
}

/// Our own HTTP/1.1 client takes requests without a body that ask for no
/// upgrade on an HTTP/1.1 route; hyper's clients take the others. A request
/// gets the same answer on every try: its body and fields stay as they are.
fn uses_own_client(
    upstream: UpstreamProtocol,
    headers: &http::HeaderMap,
    body: &impl Body,
) -> bool {
    upstream != UpstreamProtocol::H2c
        && body.is_end_stream()
        && !headers.contains_key(header::UPGRADE)
}

/// The authority the client addressed: an absolute-form target or
/// :authority if present, else the Host header. An absolute-form target
/// whose host differs from the Host header is refused (RFC 9112 section
/// 3.2.2 lets a proxy pick either; a mismatch is a classic routing-confusion
/// probe). Hosts compare without regard to case, as routes match them.
fn request_authority(
    uri: &Uri,
    host_header: Option<&HeaderValue>,
) -> Result<Option<Authority>, ProxyError> {
    if host_header.is_some_and(|v| v.as_bytes().contains(&b'@')) {
        // RFC 9110 section 7.2: Host carries no userinfo; a backend might
        // take the part before `@` for the host.
        return Err(ProxyError::BadRequest(
            "Bad request: userinfo in the Host header.\n",
        ));
    }
    let from_header = match host_header {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .ok_or(ProxyError::BadRequest(
                    "Bad request: malformed Host header.\n",
                ))?,
        ),
        None => None,
    };
    match (uri.authority(), from_header) {
        (Some(a), Some(h)) if !a.host().eq_ignore_ascii_case(h.host()) => {
            Err(ProxyError::BadRequest(
                "Bad request: the request target and Host name different hosts.\n",
            ))
        }
        (Some(a), _) => Ok(Some(a.clone())),
        (None, h) => Ok(h),
    }
}

/// A Host field for `authority`: host and port as the client sent them, any
/// userinfo left out (RFC 9110 section 7.2).
fn host_field(authority: &Authority) -> Result<HeaderValue, ProxyError> {
    let value = match authority.port() {
        Some(port) => HeaderValue::from_str(&format!("{}:{}", authority.host(), port.as_str())),
        None => HeaderValue::from_str(authority.host()),
    };
    value.map_err(|_| ProxyError::BadRequest("Bad request: the request target is malformed.\n"))
}
