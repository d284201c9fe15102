//! Prometheus metrics with bounded cardinality: labels are route, service,
//! status class and endpoint state, never a raw path or a client address.
//! Per-route handles are resolved once, when the route table is built, so
//! the request path only does atomic increments.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

use crate::ingress::route::{Route, RouteTable};

type Labels = Vec<(&'static str, String)>;

fn duration_histogram() -> Histogram {
    // 100 µs to ~27 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Counters and histograms of one route, resolved up front.
#[derive(Debug)]
pub struct RouteStats {
    by_class: [Counter; 5],
    duration: Histogram,
    connect_errors: Counter,
    retries: Counter,
}

impl RouteStats {
    pub fn record(&self, status: u16, seconds: f64) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    pub fn connect_error(&self) {
        self.connect_errors.inc();
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    /// Requests answered so far, by status class 1xx..5xx.
    pub fn totals(&self) -> [u64; 5] {
        self.by_class.each_ref().map(|c| c.get())
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: PromRegistry,
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    connect_errors: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    pub endpoints: Family<Labels, Gauge>,
    pub active_connections: Gauge,
    pub connections: Counter,
    pub refused_at_capacity: Counter,
    pub discovery_synced: Gauge,
    pub discovery_age: Gauge<f64, AtomicU64>,
    pub access_log_dropped: Counter,
    pub config_reloads: Family<Labels, Counter>,
    pub upstream_connections: Counter,
    pub upstream_idle_connections: Gauge,
    pub runtime_shared_queue_depth: Gauge,
    unrouted: Arc<RouteStats>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = PromRegistry::with_prefix("portico");
        let requests = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let connect_errors = Family::<Labels, Counter>::default();
        let retries = Family::<Labels, Counter>::default();
        let endpoints = Family::<Labels, Gauge>::default();
        let active_connections = Gauge::default();
        let connections = Counter::default();
        let refused_at_capacity = Counter::default();
        let discovery_synced = Gauge::default();
        let discovery_age = Gauge::<f64, AtomicU64>::default();
        let access_log_dropped = Counter::default();
        let config_reloads = Family::<Labels, Counter>::default();
        let upstream_connections = Counter::default();
        let upstream_idle_connections = Gauge::default();
        let runtime_shared_queue_depth = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by route, service and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response, by route",
            durations.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed connects to backends, by route and service",
            connect_errors.clone(),
        );
        registry.register(
            "retries",
            "Requests sent to another replica after a failure, by route and service",
            retries.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints per service, by state (healthy, set_aside, failing_checks)",
            endpoints.clone(),
        );
        registry.register(
            "active_connections",
            "Client connections open now, upgraded tunnels (WebSockets) included",
            active_connections.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        registry.register(
            "refused_at_capacity",
            "Client connections refused past --max-connections",
            refused_at_capacity.clone(),
        );
        registry.register(
            "discovery_synced",
            "1 while the ingress's endpoint table follows the Tower (watch or embedded), else 0",
            discovery_synced.clone(),
        );
        registry.register(
            "discovery_last_update_age_seconds",
            "Seconds since the endpoint table last heard from the Tower",
            discovery_age.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        registry.register(
            "config_reloads",
            "Config file reloads, by result (applied, refused)",
            config_reloads.clone(),
        );
        registry.register(
            "upstream_connections",
            "Connections opened to backends; against requests, it tells how well the pool reuses them",
            upstream_connections.clone(),
        );
        registry.register(
            "upstream_idle_connections",
            "Idle HTTP/1.1 backend connections pooled now (at most --pool-max-idle per replica)",
            upstream_idle_connections.clone(),
        );
        registry.register(
            "runtime_shared_queue_depth",
            "Tasks (mostly connections with work to do) waiting in the runtime's shared queue; \
             staying above zero means the proxy is saturated (see --fair-interval)",
            runtime_shared_queue_depth.clone(),
        );
        let unrouted = Arc::new(Self::stats_in(
            &requests,
            &durations,
            &connect_errors,
            &retries,
            "none",
            "",
        ));
        Arc::new(Self {
            registry,
            requests,
            durations,
            connect_errors,
            retries,
            endpoints,
            active_connections,
            connections,
            refused_at_capacity,
            discovery_synced,
            discovery_age,
            access_log_dropped,
            config_reloads,
            upstream_connections,
            upstream_idle_connections,
            runtime_shared_queue_depth,
            unrouted,
        })
    }

    fn stats_in(
        requests: &Family<Labels, Counter>,
        durations: &Family<Labels, Histogram, fn() -> Histogram>,
        connect_errors: &Family<Labels, Counter>,
        retries: &Family<Labels, Counter>,
        route: &str,
        service: &str,
    ) -> RouteStats {
        let base = || vec![("route", route.to_owned()), ("service", service.to_owned())];
        let class = |c: &str| {
            let mut l = base();
            l.push(("status_class", c.to_owned()));
            requests.get_or_create(&l).clone()
        };
        RouteStats {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: durations
                .get_or_create(&vec![("route", route.to_owned())])
                .clone(),
            connect_errors: connect_errors.get_or_create(&base()).clone(),
            retries: retries.get_or_create(&base()).clone(),
        }
    }

    /// Handles for every route of a table, in the table's order.
    pub fn for_routes(&self, table: &RouteTable) -> Vec<Arc<RouteStats>> {
        table
            .routes()
            .iter()
            .map(|r| Arc::new(self.route_stats(r)))
            .collect()
    }

    fn route_stats(&self, r: &Route) -> RouteStats {
        let route = format!("{}{}", r.host.as_deref().unwrap_or(""), r.prefix);
        Self::stats_in(
            &self.requests,
            &self.durations,
            &self.connect_errors,
            &self.retries,
            &route,
            r.service.as_str(),
        )
    }

    /// For answers given before a route was found (404, 400...).
    pub fn unrouted(&self) -> &Arc<RouteStats> {
        &self.unrouted
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
