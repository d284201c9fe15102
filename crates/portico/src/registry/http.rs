//! The Tower's HTTP API (TCP, same address as UDP by default), JSON:
//!
//! - `GET /v1/services`: every live endpoint, with `index`, `epoch`, `warm`.
//! - `GET /v1/services?index=N&epoch=E&wait=30s`: a blocking query (as
//!   Consul's): answers when the registry's index differs from N (or the
//!   epoch from E: another run of the Tower), or when `wait` passes.
//! - `GET /v1/services?watch=1[&index=N&epoch=E]`: the change stream
//!   (NDJSON, `registry::stream`): a `full` document unless resuming after
//!   N, then every change with its index, a `ping` after 10 s of silence.
//! - `GET /v1/services/NAME`: one service's endpoints (404 if none).
//! - `POST /v1/register`, `POST /v1/deregister`: `{"name","ip","port"}`,
//!   plus `"ts_ms"` and `"hmac"` when the Tower requires signatures (the MAC
//!   is over the UDP form `REGISTER|name|ip|port|ts_ms`).
//! - `GET /healthz`: the process answers.
//! - `GET /readyz`: 200 while registrations are current (always in memory;
//!   over etcd, while the watch is in sync), 503 otherwise.
//!
//! Writes need `Content-Type: application/json` (415 otherwise), and a
//! request with an `Origin` header, from a web page, is refused (403)
//! unless `--http-allow-origin` lists it. Connections are capped and timed
//! by `api_server`; blocking queries and streams are capped by
//! `--http-max-watches`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use portico_wire::{
    signing_prefix, Envelope, ErrorReply, Registration, Reply, Request as WireRequest, ServiceName,
    Signature,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::stream::{WatchBody, PING_EVERY};
use super::{unix_ms, Registry};
use crate::api_server::ServerLimits;

/// Longest a blocking query may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_BODY: usize = 4096;

/// What the API answers with: a whole buffer, or a change stream.
type ApiBody = Either<Full<Bytes>, WatchBody>;

#[derive(Debug, Deserialize)]
struct WriteDoc {
    name: String,
    ip: IpAddr,
    port: u16,
    ts_ms: Option<u64>,
    hmac: Option<String>,
}

#[derive(Serialize)]
struct ErrorDoc<'a> {
    error: &'a str,
}

/// How the API is served: how long and how many connections a client may
/// hold, blocking queries at most, and the web origins whose pages may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub limits: ServerLimits,
    pub max_watches: usize,
    /// Change lines kept for streams (`--http-watch-log`).
    pub watch_log: usize,
    /// As browsers send them: `https://ops.example.com`, `http://localhost:3000`.
    pub allow_origins: Vec<String>,
}

/// What each request needs; cloned per request (all handles).
#[derive(Clone)]
struct Api {
    registry: Registry,
    shutdown: watch::Receiver<bool>,
    watches: Arc<Semaphore>,
    max_watches: usize,
    allow_origins: Arc<[String]>,
    /// A write's body must arrive within the header timeout too.
    body_timeout: Duration,
    /// A stream's silence before a ping: within the idle timeout, which
    /// would otherwise close a quiet stream's connection.
    ping_every: Duration,
}

impl Api {
    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        let origin = origin.to_str().unwrap_or("");
        self.allow_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    }
}

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 75\r\nconnection: close\r\n\r\n{\"error\":\"at capacity: too many open connections (--http-max-connections)\"}";

/// Serve the API until shutdown. Connections are spawned; a slow client
/// holds only its own task, up to the timeouts.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    settings: HttpSettings,
    shutdown: watch::Receiver<bool>,
) {
    let api = Api {
        registry,
        shutdown: shutdown.clone(),
        watches: Arc::new(Semaphore::new(settings.max_watches)),
        max_watches: settings.max_watches,
        allow_origins: settings.allow_origins.into(),
        body_timeout: settings.limits.header_timeout,
        ping_every: PING_EVERY.min(settings.limits.idle_timeout / 2),
    };
    api.registry.set_watch_log(settings.watch_log);
    let handler = move |peer, req| answer(api.clone(), peer, req);
    crate::api_server::serve(
        listener,
        "tower http",
        settings.limits,
        AT_CAPACITY,
        handler,
        shutdown,
    )
    .await;
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    json(status, &ErrorDoc { error: why })
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

/// A request carrying an `Origin` comes from a web page (browsers add it to
/// every cross-origin request and to every POST): refused unless listed,
/// so that no page a person happens to open can rewrite the registry.
async fn answer(api: Api, peer: IpAddr, req: Request<Incoming>) -> Response<ApiBody> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let Some(origin) = origin else {
        return route(api, peer, req).await;
    };
    if !api.origin_allowed(&origin) {
        return error(
            StatusCode::FORBIDDEN,
            "requests from web pages are refused unless their origin is listed with --http-allow-origin",
        )
        .map(Either::Left);
    }
    let mut resp = if req.method() == Method::OPTIONS {
        preflight().map(Either::Left)
    } else {
        route(api, peer, req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// The answer to a listed origin's CORS preflight: its page may read, and
/// write with a JSON body.
fn preflight() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// The change stream, or any other request.
async fn route(api: Api, peer: IpAddr, req: Request<Incoming>) -> Response<ApiBody> {
    if req.method() == Method::GET && req.uri().path() == "/v1/services" {
        let query = req.uri().query().unwrap_or("");
        // `watch=0` or `false` is a plain read, as Kubernetes reads it.
        if let Some(on) = query_param(query, "watch").filter(|v| !matches!(*v, "0" | "false")) {
            return watch(&api, on, query);
        }
    }
    route_whole(api, peer, req).await.map(Either::Left)
}

/// Answer the change stream: from `index=N&epoch=E` when the log covers
/// it, else from a `full` document.
fn watch(api: &Api, on: &str, query: &str) -> Response<ApiBody> {
    if on != "1" && on != "true" {
        return error(
            StatusCode::BAD_REQUEST,
            "watch takes 1 or true (0 or false for the plain document)",
        )
        .map(Either::Left);
    }
    // A stream holds a connection and a task for as long as it lasts.
    let Ok(slot) = api.watches.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many blocking queries and streams open (--http-max-watches); retry later",
        )
        .map(Either::Left);
    };
    let epoch = query_param(query, "epoch").and_then(|v| v.parse::<u64>().ok());
    let resume = query_param(query, "index")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| epoch == Some(api.registry.epoch()));
    let body = WatchBody::start(
        api.registry.clone(),
        resume,
        slot,
        api.shutdown.clone(),
        api.ping_every,
    );
    let mut r = Response::new(Either::Right(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn route_whole(api: Api, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let registry = &api.registry;
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/metrics") => metrics(&api),
        (&Method::GET, "/readyz") => {
            let store = if registry.is_stored() {
                "etcd"
            } else {
                "memory"
            };
            if registry.is_current() {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "store": store}),
                )
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "not ready", "store": store,
                        "why": "etcd is unreachable; serving the last known registrations"}),
                )
            }
        }
        (&Method::GET, "/v1/services") => {
            let query = req.uri().query().unwrap_or("").to_owned();
            services(&api, &query).await
        }
        (&Method::GET, p) if p.starts_with("/v1/services/") => {
            let endpoints = ServiceName::parse(&p["/v1/services/".len()..])
                .map(|name| registry.service_view(&name, Instant::now()))
                .unwrap_or_default();
            if endpoints.is_empty() {
                error(StatusCode::NOT_FOUND, "no live endpoint under that name")
            } else {
                json(StatusCode::OK, &endpoints)
            }
        }
        (&Method::POST, "/v1/register") => write(&api, peer, req, WireRequest::Register).await,
        (&Method::POST, "/v1/deregister") => write(&api, peer, req, WireRequest::Deregister).await,
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/v1/services" | "/v1/register"
            | "/v1/deregister",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint; see /v1/services"),
    }
}

async fn services(api: &Api, query: &str) -> Response<Full<Bytes>> {
    let registry = &api.registry;
    let index = query_param(query, "index").and_then(|v| v.parse::<u64>().ok());
    let epoch = query_param(query, "epoch").and_then(|v| v.parse::<u64>().ok());
    let wait = match query_param(query, "wait") {
        Some(w) => match crate::units::parse_duration(w) {
            Ok(d) => d.min(MAX_WAIT),
            Err(why) => return error(StatusCode::BAD_REQUEST, &format!("bad wait: {why}")),
        },
        None => DEFAULT_WAIT,
    };
    if let Some(index) = index {
        let same_run = epoch.is_none_or(|e| e == registry.epoch());
        if same_run {
            // Each waiting query holds a connection and a task for minutes:
            // past the cap, the client is told at once rather than queued.
            let Ok(_slot) = api.watches.clone().try_acquire_owned() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many blocking queries open (--http-max-watches); retry later",
                );
            };
            let mut rx = registry.subscribe();
            let mut shutdown = api.shutdown.clone();
            // Answers on a change, at the deadline, or when the Tower stops.
            tokio::select! {
                _ = tokio::time::timeout(wait, rx.wait_for(|r| *r != index)) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        }
    }
    // The same bytes for every client at this index (and a stream's full).
    let (index, doc) = registry.document(Instant::now());
    let mut resp = Response::new(Full::new(doc));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert("x-portico-index", index.into());
    resp
}

/// `Content-Type: application/json`, parameters aside. A browser sends a
/// form or text/plain to another origin without asking first (no CORS
/// preflight); JSON it must ask for, and the Tower does not say yes.
fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

async fn write(
    api: &Api,
    peer: IpAddr,
    req: Request<Incoming>,
    make: fn(Registration) -> WireRequest,
) -> Response<Full<Bytes>> {
    let registry = &api.registry;
    if !is_json(&req) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes need Content-Type: application/json",
        );
    }
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(api.body_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body over 4 KiB, or unreadable",
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body not received within the header timeout",
            )
        }
    };
    let doc: WriteDoc = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"name\",\"ip\",\"port\"}} JSON: {e}"),
            )
        }
    };
    let name = match ServiceName::parse(&doc.name) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if doc.port == 0 {
        return error(StatusCode::BAD_REQUEST, "port must be 1-65535");
    }
    let request = make(Registration {
        name,
        addr: SocketAddr::new(doc.ip, doc.port),
    });
    let signature = match (doc.ts_ms, doc.hmac.as_deref()) {
        (Some(ts_ms), Some(hex)) => match portico_wire::parse_hex32(hex) {
            Some(mac) => Some(Signature { ts_ms, mac }),
            None => return error(StatusCode::BAD_REQUEST, "hmac must be 64 hex digits"),
        },
        (None, None) => None,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give both ts_ms and hmac, or neither",
            )
        }
    };
    let signed = signature
        .map(|s| signing_prefix(&request, s.ts_ms))
        .unwrap_or_default();
    let envelope = Envelope {
        request,
        signature,
        signed_len: signed.len(),
    };
    match registry.handle(envelope, &signed, peer, Instant::now(), unix_ms()) {
        Reply::Registered(n) => json(
            StatusCode::OK,
            &serde_json::json!({"registered": n.as_str()}),
        ),
        Reply::Deregistered(n) => json(
            StatusCode::OK,
            &serde_json::json!({"deregistered": n.as_str()}),
        ),
        Reply::Error(ErrorReply::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, "no such registration")
        }
        Reply::Error(ErrorReply::RegistryFull) => {
            error(StatusCode::INSUFFICIENT_STORAGE, "registry full")
        }
        Reply::Error(e @ ErrorReply::Unauthorized(_)) => {
            error(StatusCode::UNAUTHORIZED, &e.to_string())
        }
        Reply::Error(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("unexpected {other:?}"),
        ),
    }
}

/// One metric family in the text format: HELP, TYPE, then its samples
/// (`labels` is `{k="v"}` or empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The Tower's Prometheus metrics, in the text format.
fn metrics(api: &Api) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let registry = &api.registry;
    let c = registry.counters();
    let mut out = String::new();
    family(
        &mut out,
        "portico_tower_registrations",
        "gauge",
        "Registrations held now (live or not yet reaped).",
        &[("", registry.len() as u64)],
    );
    let by_command: Vec<String> = super::COMMANDS
        .iter()
        .map(|name| format!("{{command=\"{name}\"}}"))
        .collect();
    let requests: Vec<(&str, u64)> = by_command
        .iter()
        .zip(c.requests.iter())
        .map(|(labels, n)| (labels.as_str(), n.load(Relaxed)))
        .collect();
    family(
        &mut out,
        "portico_tower_requests_total",
        "counter",
        "Requests by command, over UDP and HTTP.",
        &requests,
    );
    family(
        &mut out,
        "portico_tower_errors_total",
        "counter",
        "Requests refused: malformed, or writes without a valid signature.",
        &[
            ("{kind=\"malformed\"}", c.errors.load(Relaxed)),
            ("{kind=\"unauthorized\"}", c.unauthorized.load(Relaxed)),
        ],
    );
    family(
        &mut out,
        "portico_tower_expiries_total",
        "counter",
        "Registrations that expired without a heartbeat.",
        &[("", c.expiries.load(Relaxed))],
    );
    family(
        &mut out,
        "portico_tower_watches",
        "gauge",
        "Blocking queries waiting and change streams open now (together at most --http-max-watches).",
        &[(
            "",
            (api.max_watches - api.watches.available_permits()) as u64,
        )],
    );
    family(
        &mut out,
        "portico_tower_watch_streams",
        "gauge",
        "Change streams (?watch=1) open now.",
        &[("", c.streams.load(Relaxed))],
    );
    family(
        &mut out,
        "portico_tower_changes_total",
        "counter",
        "Changes to the set of endpoints, each one line of the change stream.",
        &[("", c.changes.load(Relaxed))],
    );
    family(
        &mut out,
        "portico_tower_watch_resyncs_total",
        "counter",
        "Full documents sent to a stream whose place fell out of the change log (--http-watch-log).",
        &[("", c.resyncs.load(Relaxed))],
    );
    if let Some((owned, backlog)) = registry.store_backlog() {
        family(
            &mut out,
            "portico_tower_store_current",
            "gauge",
            "1 while the cache of etcd is in sync, else 0.",
            &[("", u64::from(registry.is_current()))],
        );
        family(
            &mut out,
            "portico_tower_store_owned",
            "gauge",
            "Registrations this Tower keeps alive in etcd.",
            &[("", owned as u64)],
        );
        family(
            &mut out,
            "portico_tower_store_backlog",
            "gauge",
            "Writes owed to etcd (pending or in flight).",
            &[("", backlog as u64)],
        );
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_past_the_cap_is_framed() {
        assert!(crate::api_server::is_framed(super::AT_CAPACITY));
    }
}
