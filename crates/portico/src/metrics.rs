//! Prometheus metrics with bounded cardinality: labels are route, service,
//! status class and endpoint state, never a raw path or a client address.
//! Per-route handles are resolved once, when the route table is built, so
//! the request path only does atomic increments.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

pub type Labels = Vec<(&'static str, String)>;

/// The states `portico_endpoints` counts, in the order of its counts.
pub const ENDPOINT_STATES: [&str; 3] = ["healthy", "set_aside", "failing_checks"];

/// Distinct `service` values in `portico_endpoints` at most. The Tower
/// holds whatever anyone registered (the ingress sees all of it), so past
/// this the rest is summed under `service="_other"`.
pub const MAX_SERVICE_SERIES: usize = 1000;
pub const OTHER_SERVICES: &str = "_other";

/// The services to show, each with its counts by state: the first
/// `max` of `by_service` (in its order; callers put routed ones first),
/// the rest summed under `_other` (a service of that name too).
fn cap_services<'a>(
    by_service: impl IntoIterator<Item = (&'a str, [usize; 3])>,
    max: usize,
) -> BTreeMap<&'a str, [usize; 3]> {
    let mut shown = BTreeMap::new();
    let mut other: Option<[usize; 3]> = None;
    for (name, counts) in by_service {
        if name != OTHER_SERVICES && shown.len() < max {
            shown.insert(name, counts);
        } else {
            let sum = other.get_or_insert([0; 3]);
            for (s, c) in sum.iter_mut().zip(counts) {
                *s += c;
            }
        }
    }
    if let Some(counts) = other {
        shown.insert(OTHER_SERVICES, counts);
    }
    shown
}

fn duration_histogram() -> Histogram {
    // 100 µs to ~27 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// What names a route in its series: `route="[host]prefix"` and its
/// service.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel<'a> {
    pub host: Option<&'a str>,
    pub prefix: &'a str,
    pub service: &'a str,
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
    endpoints: Family<Labels, Gauge>,
    /// The `service` values `endpoints` holds series for now.
    endpoint_services: Mutex<BTreeSet<String>>,
    pub active_connections: Gauge,
    pub connections: Counter,
    pub refused_at_capacity: Counter,
    proxy_protocol_refused: Family<Labels, Counter>,
    pub discovery_synced: Gauge,
    pub discovery_age: Gauge<f64, AtomicU64>,
    pub access_log_dropped: Counter,
    pub config_reloads: Family<Labels, Counter>,
    pub upstream_connections: Counter,
    pub upstream_idle_connections: Gauge,
    /// Time the worker threads spent running tasks, as read from tokio at
    /// the last scrape (`set_worker_busy`).
    worker_busy: Counter<f64, AtomicU64>,
    worker_busy_read: Mutex<()>,
    /// By `name`: when its certificate expires, as Unix time.
    pub tls_certificate_expiry: Family<Labels, Gauge>,
    /// By `result`: `issued` or `failed`.
    pub acme_orders: Family<Labels, Counter>,
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
        let proxy_protocol_refused = Family::<Labels, Counter>::default();
        let discovery_synced = Gauge::default();
        let discovery_age = Gauge::<f64, AtomicU64>::default();
        let access_log_dropped = Counter::default();
        let config_reloads = Family::<Labels, Counter>::default();
        let upstream_connections = Counter::default();
        let upstream_idle_connections = Gauge::default();
        let worker_busy = Counter::<f64, AtomicU64>::default();
        let tls_certificate_expiry = Family::<Labels, Gauge>::default();
        let acme_orders = Family::<Labels, Counter>::default();
        registry.register(
            "tls_certificate_expiry_seconds",
            "When the certificate served for a name expires (Unix time), by name; ACME-managed names",
            tls_certificate_expiry.clone(),
        );
        registry.register(
            "acme_orders",
            "ACME certificate orders, by result (issued, failed)",
            acme_orders.clone(),
        );
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
            "proxy_protocol_refused",
            "Client connections closed for their PROXY protocol header, by reason: missing, \
             malformed, incomplete or timeout (from a trusted proxy), untrusted (a header from \
             another source)",
            proxy_protocol_refused.clone(),
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
            "Idle HTTP/1.1 backend connections pooled now (at most --pool-max-idle per replica and worker)",
            upstream_idle_connections.clone(),
        );
        registry.register(
            "worker_busy_seconds",
            "Wall time the worker threads (--threads) spent serving, not waiting for work; its \
             rate over the thread count is how busy the proxy is, near 1 when saturated",
            worker_busy.clone(),
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
            endpoint_services: Mutex::default(),
            active_connections,
            connections,
            refused_at_capacity,
            proxy_protocol_refused,
            discovery_synced,
            discovery_age,
            access_log_dropped,
            config_reloads,
            upstream_connections,
            upstream_idle_connections,
            worker_busy,
            worker_busy_read: Mutex::new(()),
            tls_certificate_expiry,
            acme_orders,
            unrouted,
        })
    }

    /// Bring the busy-time counter up to `total`, tokio's reading of it.
    pub fn set_worker_busy(&self, total: std::time::Duration) {
        let _one_at_a_time = self
            .worker_busy_read
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let behind = total.as_secs_f64() - self.worker_busy.get();
        if behind > 0.0 {
            self.worker_busy.inc_by(behind);
        }
    }

    /// A connection closed for its PROXY protocol header (`reason`: a
    /// fixed word, so the series stay few).
    pub fn proxy_protocol_refused(&self, reason: &'static str) {
        self.proxy_protocol_refused
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
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

    /// Handles for each of these routes, in their order.
    pub fn for_routes<'a>(
        &self,
        routes: impl IntoIterator<Item = RouteLabel<'a>>,
    ) -> Vec<Arc<RouteStats>> {
        routes
            .into_iter()
            .map(|r| Arc::new(self.route_stats(r)))
            .collect()
    }

    fn route_stats(&self, r: RouteLabel<'_>) -> RouteStats {
        let route = format!("{}{}", r.host.unwrap_or(""), r.prefix);
        Self::stats_in(
            &self.requests,
            &self.durations,
            &self.connect_errors,
            &self.retries,
            &route,
            r.service,
        )
    }

    /// Set `portico_endpoints` to these counts by service (routed services
    /// first: they keep their own series past the cap), and remove the
    /// series of services no longer there, so that a service that went away
    /// does not read as still having endpoints.
    pub fn set_endpoints<'a>(&self, by_service: impl IntoIterator<Item = (&'a str, [usize; 3])>) {
        let shown = cap_services(by_service, MAX_SERVICE_SERIES);
        let labels = |service: &str, state: &str| {
            vec![("service", service.to_owned()), ("state", state.to_owned())]
        };
        // One scrape at a time: another's removals must not interleave.
        let mut live = self
            .endpoint_services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for gone in live.iter().filter(|s| !shown.contains_key(s.as_str())) {
            for state in ENDPOINT_STATES {
                self.endpoints.remove(&labels(gone, state));
            }
        }
        for (service, counts) in &shown {
            for (state, n) in ENDPOINT_STATES.into_iter().zip(counts) {
                self.endpoints
                    .get_or_create(&labels(service, state))
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        *live = shown.keys().map(|s| (*s).to_owned()).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_past_the_cap_are_summed_under_other() {
        let by_service = [
            ("routed", [1, 0, 0]),
            ("a", [2, 1, 0]),
            ("b", [3, 0, 1]),
            ("_other", [1, 0, 0]),
        ];
        let shown = cap_services(by_service, 2);
        assert_eq!(shown.len(), 3);
        assert_eq!(shown["routed"], [1, 0, 0]);
        assert_eq!(shown["a"], [2, 1, 0]);
        assert_eq!(shown[OTHER_SERVICES], [4, 0, 1]);
        assert!(!cap_services(by_service[..2].to_vec(), 2).contains_key(OTHER_SERVICES));
    }

    #[test]
    fn a_route_is_named_by_its_host_and_prefix() {
        let m = Metrics::new();
        let label = RouteLabel {
            host: Some("api.example.com"),
            prefix: "/v1",
            service: "api",
        };
        let stats = m.for_routes([
            label,
            RouteLabel {
                host: None,
                ..label
            },
        ]);
        stats[0].record(200, 0.001);
        stats[1].record(404, 0.001);
        let text = m.render();
        assert!(
            text.contains(r#"route="api.example.com/v1",service="api",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"route="/v1",service="api",status_class="4xx"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn series_of_services_gone_are_removed() {
        let m = Metrics::new();
        m.set_endpoints([("a", [1, 0, 0]), ("b", [0, 1, 0])]);
        assert!(m.render().contains(r#"service="b""#));
        m.set_endpoints([("a", [1, 0, 0])]);
        let text = m.render();
        assert!(
            text.contains(r#"portico_endpoints{service="a",state="healthy"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"service="b""#), "{text}");
    }
}
