//! The admin listener (default 127.0.0.1:9901): `/metrics` (Prometheus),
//! `/healthz`, `/readyz`, `/routes`, `/endpoints`, `/status.json`, and `/`,
//! a status page for a person, served from the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api_server::ServerLimits;
use crate::ingress::handler::Shared;

const STATUS_PAGE: &str = include_str!("status.html");

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 46\r\nconnection: close\r\n\r\nAt capacity: too many admin connections open.\n";

/// Serve the admin endpoints until shutdown, under fixed limits
/// (`ServerLimits::ADMIN`). Every endpoint is a read without side effects
/// (GET and HEAD only), so a web page can change nothing here.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Shared>,
    acme: Option<Arc<crate::acme::Status>>,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |_peer, req| answer(proxy.clone(), acme.clone(), req);
    crate::api_server::serve(
        listener,
        "admin",
        ServerLimits::ADMIN,
        AT_CAPACITY,
        handler,
        shutdown,
    )
    .await;
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

#[derive(Serialize)]
struct RouteDoc {
    host: Option<String>,
    prefix: String,
    service: String,
    strip_prefix: bool,
    backend_timeout_ms: Option<u64>,
    /// The route's own `redirect_https`, when it has one.
    redirect_https: Option<bool>,
    /// Requests answered, by status class.
    responses: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct EndpointDoc {
    address: String,
    state: &'static str,
    in_flight: Option<usize>,
}

#[derive(Serialize)]
struct StatusDoc {
    version: &'static str,
    discovery: &'static str,
    ready: bool,
    last_update_age_seconds: Option<f64>,
    routes: Vec<RouteDoc>,
    services: BTreeMap<String, Vec<EndpointDoc>>,
    /// ACME-managed names: their certificate, its expiry, the last error.
    certificates: Vec<crate::acme::NameStatus>,
}

fn routes(proxy: &Shared) -> Vec<RouteDoc> {
    let live = proxy.routes.load();
    live.table
        .routes()
        .iter()
        .zip(live.stats.iter())
        .map(|(r, stats)| {
            let totals = stats.totals();
            let responses = ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .into_iter()
                .zip(totals)
                .collect();
            RouteDoc {
                host: r.host.clone(),
                prefix: r.prefix.clone(),
                service: r.service.to_string(),
                strip_prefix: r.options.strip_prefix,
                backend_timeout_ms: r.options.backend_timeout.map(|d| d.as_millis() as u64),
                redirect_https: r.options.redirect_https,
                responses,
            }
        })
        .collect()
}

async fn services(proxy: &Shared) -> BTreeMap<String, Vec<EndpointDoc>> {
    let mut out: BTreeMap<String, Vec<EndpointDoc>> = BTreeMap::new();
    // Every routed service is listed, also one with no endpoint.
    for r in proxy.routes.load().table.routes() {
        out.entry(r.service.to_string()).or_default();
    }
    for (name, addr, in_flight) in proxy.discovery.all_endpoints().await {
        out.entry(name.to_string()).or_default().push(EndpointDoc {
            address: addr.to_string(),
            state: proxy.discovery.endpoint_state(addr),
            in_flight,
        });
    }
    out
}

async fn refresh_gauges(
    proxy: &Shared,
    services: &BTreeMap<String, Vec<EndpointDoc>>,
    ready: bool,
) {
    let m = &proxy.metrics;
    let live = proxy.routes.load();
    let routed: BTreeSet<&str> = live
        .table
        .routes()
        .iter()
        .map(|r| r.service.as_str())
        .collect();
    let counts = |endpoints: &[EndpointDoc]| {
        crate::metrics::ENDPOINT_STATES
            .map(|state| endpoints.iter().filter(|e| e.state == state).count())
    };
    // Routed services first: they keep their own series past the cap.
    let (first, rest): (Vec<_>, Vec<_>) = services
        .iter()
        .map(|(name, endpoints)| (name.as_str(), counts(endpoints)))
        .partition(|(name, _)| routed.contains(name));
    m.set_endpoints(first.into_iter().chain(rest));
    m.discovery_synced.set(i64::from(ready));
    m.upstream_idle_connections
        .set(i64::try_from(proxy.upstream.pool.idle_count()).unwrap_or(i64::MAX));
    m.set_worker_busy(crate::ingress::workers::busy());
    m.discovery_age
        .set(proxy.discovery.last_update_age().unwrap_or(0.0));
}

async fn answer(
    proxy: Arc<Shared>,
    acme: Option<Arc<crate::acme::Status>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/" | "/status" => respond(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if proxy.discovery.is_ready().await {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: endpoint discovery is not in sync with the Tower\n",
                )
            }
        }
        "/metrics" => {
            let ready = proxy.discovery.is_ready().await;
            let services = services(&proxy).await;
            refresh_gauges(&proxy, &services, ready).await;
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                proxy.metrics.render(),
            )
        }
        "/routes" => json(&routes(&proxy)),
        "/endpoints" => json(&services(&proxy).await),
        "/status.json" => {
            let ready = proxy.discovery.is_ready().await;
            json(&StatusDoc {
                version: env!("CARGO_PKG_VERSION"),
                discovery: proxy.discovery.describe(),
                ready,
                last_update_age_seconds: proxy.discovery.last_update_age(),
                routes: routes(&proxy),
                services: services(&proxy).await,
                certificates: acme.map(|a| a.snapshot()).unwrap_or_default(),
            })
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /, /metrics, /healthz, /readyz, /routes, /endpoints\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_past_the_cap_is_framed() {
        assert!(crate::api_server::is_framed(super::AT_CAPACITY));
    }
}
