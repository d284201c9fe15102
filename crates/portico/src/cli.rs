//! The command line: one `Args` struct per subcommand. Values are parsed to
//! their types here (durations, addresses); cross-field checks live in
//! `config`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::discovery::snapshot::Balance;
use crate::discovery::watch::DiscoveryMode;
use crate::units::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "portico",
    version,
    about = "A dynamic HTTP ingress that finds its backends in a service registry (the Tower)"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter;
    /// RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,

    /// Log lines as human-readable text or as JSON objects.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reverse proxy, finding backends in a Tower.
    Ingress(IngressArgs),
    /// Run the registry daemon (UDP).
    Tower(TowerArgs),
    /// Run a Tower and an ingress in one process: the zero-setup default.
    Up(UpArgs),
    /// Keep one registration alive, optionally while a command runs.
    Register(RegisterArgs),
    /// Show what a Tower has registered.
    Services(ServicesArgs),
}

/// Options every ingress has, whether it stands alone or runs in `up`.
#[derive(Debug, Args, Clone)]
pub struct ProxyArgs {
    /// Where to accept plain HTTP connections: a port (all IPv4
    /// interfaces) or ADDR:PORT; repeatable. Default 0.0.0.0:80 when no
    /// --tls-listen is given either. With --tls-cert and no --tls-listen,
    /// these listeners serve HTTPS instead.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Where to accept HTTPS connections: a port or ADDR:PORT; repeatable.
    /// Needs certificates: --tls-cert/--tls-key, or --acme.
    #[arg(long = "tls-listen", value_name = "ADDR")]
    pub tls_listen: Vec<String>,

    /// Plain-HTTP listeners answer every request with 308 to the same URL
    /// on https:// (the first --tls-listen's port when it is not 443),
    /// except ACME HTTP-01 challenges. A route in the config file may say
    /// otherwise (`redirect_https`).
    #[arg(long)]
    pub redirect_https: bool,

    /// Route PREFIX:SERVICE or HOST/PREFIX:SERVICE; repeatable. Longest prefix
    /// wins, matching on path segment boundaries.
    #[arg(long = "route", value_name = "[HOST]PREFIX:SERVICE")]
    pub routes: Vec<String>,

    /// As --route, with the backends spoken to over HTTP/2 without TLS
    /// (prior knowledge): for gRPC and other h2-only services. Repeatable.
    #[arg(long = "route-h2c", value_name = "[HOST]PREFIX:SERVICE")]
    pub h2c_routes: Vec<String>,

    /// TOML file with routes (and per-route options), timeouts, balance and
    /// attempts. Its routes are reloaded on SIGHUP and when it changes; a
    /// flag given on the command line wins over the file.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Most client connections served at once; past it a client gets
    /// `503 At capacity.` (the seed's --workers).
    #[arg(
        long = "max-connections",
        visible_alias = "workers",
        default_value_t = 10_000
    )]
    pub max_connections: usize,

    /// Attempts per request on different replicas when connecting fails.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,

    /// Time allowed to connect to a backend.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,

    /// Time allowed for a client to send a request's headers.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: Duration,

    /// A client connection with no traffic for this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub idle_timeout: Duration,

    /// Time allowed for a backend to start its response (answered with 504).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub backend_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// Largest request head (request line and headers) in bytes; past it
    /// the client gets 431 (or 414 for the request line).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// Most request headers; past it the client gets 431.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,

    /// Concurrent streams a client may open on one HTTP/2 connection.
    #[arg(long, default_value_t = 256)]
    pub max_h2_streams: u32,

    /// Largest request body in bytes; past it the client gets 413 (0: no
    /// limit, the default).
    #[arg(long, default_value_t = 0)]
    pub max_body_bytes: u64,

    /// Paths that backends resolve under another prefix than we route on:
    /// `keep-encoded` (the default) answers 400 to dot segments with
    /// parameters (`/..;/`, which Tomcat climbs) and to backslashes (`\`,
    /// a `/` to WHATWG URL parsers), and passes `%2F` and `%5C` on;
    /// `reject` refuses `%2F` and `%5C` too; `keep` forwards every path as
    /// sent (the behaviour before this flag).
    #[arg(long, value_enum, default_value_t = crate::ingress::route::PathEscapes::KeepEncoded)]
    pub path_escapes: crate::ingress::route::PathEscapes,

    /// Close an HTTP/1.1 connection after this many requests (0: no limit,
    /// the default).
    #[arg(long, default_value_t = 0)]
    pub max_requests_per_connection: u32,

    /// Idle keep-alive connections kept per backend replica, by each worker
    /// thread (as nginx's `keepalive`, per worker process).
    #[arg(long, default_value_t = 256)]
    pub pool_max_idle: usize,

    /// An idle pooled backend connection is closed after this long.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub pool_idle_timeout: Duration,

    /// Worker threads (default: one per core). Each serves the connections
    /// it accepts, in the order they become ready, as nginx's workers do.
    #[arg(long)]
    pub threads: Option<usize>,

    /// No effect any more (each worker serves one queue in order): accepted
    /// so that command lines with it still start, with a warning.
    #[arg(long, hide = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=255))]
    pub fair_interval: Option<u32>,

    /// Active health check for a service, repeatable:
    /// SERVICE:PATH[,interval=5s,timeout=2s,fall=3,rise=2]. A replica whose
    /// `GET PATH` fails `fall` times in a row (non-2xx/3xx, no answer) gets
    /// no new requests until it passes `rise` times in a row.
    #[arg(long = "health-check", value_name = "SERVICE:PATH[,..]")]
    pub health_checks: Vec<crate::discovery::active::CheckSpec>,

    /// Serve HTTPS with this certificate chain (PEM); repeatable, paired in
    /// order with --tls-key. With several pairs, the client's SNI picks the
    /// certificate valid for its name (the first pair otherwise). Files are
    /// reloaded when they change, without a restart.
    #[arg(long = "tls-cert", value_name = "PEM")]
    pub tls_certs: Vec<PathBuf>,

    /// The private key (PEM) of the --tls-cert at the same position.
    #[arg(long = "tls-key", value_name = "PEM")]
    pub tls_keys: Vec<PathBuf>,

    /// Obtain and renew certificates with ACME (Let's Encrypt by default)
    /// for every host named in a host route and every --acme-domain;
    /// served on --tls-listen, kept in --acme-state.
    #[arg(long)]
    pub acme: bool,

    /// A name to get a certificate for besides the route hosts; repeatable.
    #[arg(long = "acme-domain", value_name = "NAME")]
    pub acme_domains: Vec<String>,

    /// Contact address given to the CA (expiry notices, policy changes).
    #[arg(long, value_name = "ADDRESS")]
    pub acme_email: Option<String>,

    /// The CA's ACME directory (the default is Let's Encrypt's production
    /// one; its staging one, for trials, is
    /// https://acme-staging-v02.api.letsencrypt.org/directory).
    #[arg(long, value_name = "URL", default_value = crate::acme::LETS_ENCRYPT)]
    pub acme_directory: String,

    /// An extra root (PEM) to trust for the directory's own HTTPS: a
    /// private CA, or a test server.
    #[arg(long, value_name = "FILE")]
    pub acme_ca_cert: Option<PathBuf>,

    /// Where the ACME account, certificates and keys are kept (created
    /// with mode 0700). Default: $STATE_DIRECTORY/acme under systemd
    /// (StateDirectory=portico), /var/lib/portico/acme as root, else
    /// ~/.local/state/portico/acme.
    #[arg(long, value_name = "DIR")]
    pub acme_state: Option<PathBuf>,

    /// How the CA checks a name: `http-01` (answered on --listen, port 80
    /// for a public CA) or `tls-alpn-01` (on --tls-listen, port 443).
    /// Default: http-01 when there is a plain listener, else tls-alpn-01.
    #[arg(long, value_enum, value_name = "KIND")]
    pub acme_challenge: Option<crate::acme::Challenge>,

    /// The wait after a failed order; it doubles with each failure in a
    /// row, up to a day.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    pub acme_retry: Duration,

    /// Time allowed for a client's TLS handshake.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub tls_handshake_timeout: Duration,

    /// Connections from this network (repeatable) come through a front
    /// proxy (HAProxy's send-proxy or send-proxy-v2, a cloud load
    /// balancer): each must open with a PROXY protocol header, v1 or v2,
    /// within --header-timeout, or it is closed. The client the header
    /// names goes in X-Forwarded-For, X-Real-IP and the access log. A header
    /// from any other source is refused (400; on TLS, a failed handshake).
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    pub proxy_protocol_from: Vec<crate::cidr::Cidr>,

    /// Admin listener (metrics, health, status page): ADDR:PORT or `off`.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: String,

    /// Compress responses of the text types (HTML, CSS, JavaScript, JSON,
    /// XML, SVG, plain text) with zstd, Brotli or gzip, as the client's
    /// Accept-Encoding prefers; streamed. Not compressed: bodies under 1 KiB,
    /// responses with a Content-Encoding or `Cache-Control: no-transform`,
    /// HEAD, 1xx/204/206/304, gRPC, event streams, images, video, archives.
    /// A route in the config file may say otherwise (`compress = false`).
    #[arg(long)]
    pub compress: bool,

    /// Access log: one line per request, Apache combined or JSON.
    #[arg(long, value_enum, default_value_t = crate::ingress::access_log::Format::Off)]
    pub access_log: crate::ingress::access_log::Format,

    /// Write the access log to this file (appending) instead of stdout.
    #[arg(long)]
    pub access_log_file: Option<PathBuf>,

    /// How a replica is chosen among those of a service (watch mode; in
    /// lookup mode the Tower's round robin decides).
    #[arg(long, value_enum, default_value_t = Balance::RoundRobin)]
    pub balance: Balance,
}

#[derive(Debug, Args)]
pub struct IngressArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// The Tower: HOST or HOST:PORT (port 7772 when left out).
    #[arg(long, default_value = "127.0.0.1")]
    pub tower: String,

    /// How long to wait for the Tower's answer to a LOOKUP before asking again.
    /// In watch mode, how long a request for a service the table lacks waits
    /// for the one LOOKUP that checks the Tower has not just registered it.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    pub tower_timeout: Duration,

    /// How to learn endpoints: `watch` keeps a local table fed by the
    /// Tower's HTTP watch (no registry round trip per request); `lookup`
    /// asks the Tower over UDP per request, as the seed; `auto` watches when
    /// the Tower has an HTTP API and falls back to lookup when it does not;
    /// `etcd` watches the registrations in etcd directly (needs --etcd).
    #[arg(long, value_enum, default_value_t = DiscoveryMode::Auto)]
    pub discovery: DiscoveryMode,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Where etcd is, for a Tower storing registrations there or an ingress
/// watching them.
#[derive(Debug, Args, Clone)]
pub struct EtcdArgs {
    /// etcd members: http://HOST:PORT or https://HOST:PORT, comma-separated;
    /// tried in turn.
    #[arg(long, value_name = "URL[,URL..]")]
    pub etcd: Option<String>,

    /// Key prefix of Portico's registrations in etcd.
    #[arg(long, default_value = "/portico/v1")]
    pub etcd_prefix: String,

    /// CA certificate(s), PEM, that etcd's server certificate is verified
    /// against; needed for https:// members.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_cert: Option<PathBuf>,

    /// Client certificate (PEM) to present to etcd, for an etcd run with
    /// --client-cert-auth; with --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user to authenticate as. The password comes from
    /// --etcd-password-file or the PORTICO_ETCD_PASSWORD environment
    /// variable, never from the command line.
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,

    /// File holding the password of --etcd-user (one line).
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreKind {
    /// In this process: lost on restart, relearned from heartbeats.
    #[default]
    Memory,
    /// In etcd, shared by every Tower using the same etcd and prefix.
    Etcd,
}

/// Options of the registry daemon, alone or in `up`.
#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// Registration lifetime after the last REGISTER.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ttl: Duration,

    /// Most replicas in total; past it REGISTER gets `ERR|registry full`.
    #[arg(long, default_value_t = 65_536)]
    pub max_entries: usize,

    /// Most replicas under one name.
    #[arg(long, default_value_t = 1024)]
    pub max_per_name: usize,

    /// TCP address of the HTTP API (list, watch, register): `same` as the
    /// UDP address, ADDR:PORT, or `off`.
    #[arg(long, default_value = "same")]
    pub http: String,

    /// A web origin (`https://ops.example.com`) whose pages may call the
    /// HTTP API; repeatable. Requests carrying any other `Origin` header
    /// are refused with 403 (none is listed by default).
    #[arg(long = "http-allow-origin", value_name = "ORIGIN")]
    pub http_allow_origins: Vec<String>,

    /// Time allowed for a client of the HTTP API to send a request's head
    /// (and a write's body).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub http_header_timeout: Duration,

    /// An HTTP API connection with no request in flight and no traffic for
    /// this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub http_idle_timeout: Duration,

    /// Most HTTP API connections open at once; past it a client gets 503.
    #[arg(long, default_value_t = 1024)]
    pub http_max_connections: usize,

    /// Most blocking queries (`?index=`, an ingress's watch) waiting at once;
    /// past it one gets 503 at once. Keep it below --http-max-connections.
    #[arg(long, default_value_t = 768)]
    pub http_max_watches: usize,

    /// Changes the Tower keeps for change streams (`?watch=1`), 16 to
    /// 1,048,576, each encoded once and shared by every stream. A stream
    /// that falls further behind (or resumes from an older index) gets the
    /// whole document once instead; about 100 bytes a change.
    #[arg(long, value_name = "N", default_value_t = crate::registry::DEFAULT_WATCH_LOG)]
    pub http_watch_log: usize,

    /// Require REGISTER/DEREGISTER (UDP and HTTP) to be signed with the key
    /// in this file (HMAC-SHA256; reads stay open). A LIST signed with it
    /// gets the whole list in one UDP datagram, not the first 1,232 bytes.
    #[arg(long)]
    pub key_file: Option<PathBuf>,

    /// Accept REGISTER only for endpoints inside this network (repeatable):
    /// the registered address must match, whoever sends it. Without it any
    /// address that can be a backend is accepted; unspecified, broadcast,
    /// multicast and link-local ones never are, loopback only from this host.
    #[arg(long = "allow-register", value_name = "CIDR")]
    pub allow_register: Vec<crate::registry::admit::Cidr>,

    /// UDP replies a second per source address (an IPv6 /64 counts as one);
    /// datagrams past it are handled but not answered, so that a forged source
    /// cannot aim the Tower at a victim. 0 turns the limit off.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub udp_reply_rate: u32,

    /// Sources exempt from --udp-reply-rate (repeatable; replaces the
    /// default, loopback, whose replies cannot leave the host; `none` for
    /// no exemption). E.g. the network of ingresses in --discovery lookup.
    #[arg(long, value_name = "CIDR", default_values = ["127.0.0.0/8", "::1"])]
    pub udp_rate_exempt: Vec<String>,

    /// Where registrations live: `memory`, or `etcd` (shared by every Tower
    /// on the same etcd; needs --etcd).
    #[arg(long, value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Args)]
pub struct TowerArgs {
    /// UDP address to serve the Tower protocol on: a port, or ADDR:PORT.
    #[arg(long, default_value = "0.0.0.0:7772")]
    pub listen: String,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// UDP address of the embedded Tower.
    #[arg(long, default_value = "0.0.0.0:7772")]
    pub tower_listen: String,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name to register under.
    #[arg(long)]
    pub name: String,

    /// Port the replica listens on.
    #[arg(long)]
    pub port: u16,

    /// Address the replica is reached at.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,

    /// The Tower: HOST or HOST:PORT.
    #[arg(long, default_value = "127.0.0.1")]
    pub tower: String,

    /// The Tower's TTL; heartbeats go out every third of it.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ttl: Duration,

    /// With a command: how long to wait for it to accept connections on
    /// --port before registering anyway.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub ready_timeout: Duration,

    /// Sign registrations with the key in this file (for a Tower started
    /// with --key-file).
    #[arg(long)]
    pub key_file: Option<PathBuf>,

    /// Command to run; registered while it lives, its exit status is ours.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// The Tower: HOST or HOST:PORT.
    #[arg(long, default_value = "127.0.0.1")]
    pub tower: String,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Sign the LIST with the key in this file: a Tower started with the
    /// same --key-file then sends the whole list in one datagram (up to
    /// 64 KB) rather than the first 1,232 bytes.
    #[arg(long)]
    pub key_file: Option<PathBuf>,

    /// Only this service (LOOKUP-free: filters the LIST).
    pub name: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_seed_command_line_parses() {
        let cli = Cli::try_parse_from([
            "portico",
            "ingress",
            "--listen",
            "9090",
            "--tower",
            "127.0.0.1",
            "--route",
            "/api:api-service",
            "--route",
            "/:frontend",
            "--workers",
            "64",
        ])
        .unwrap();
        let Command::Ingress(a) = cli.command else {
            panic!("not ingress")
        };
        assert_eq!(a.proxy.routes, ["/api:api-service", "/:frontend"]);
        assert_eq!(a.proxy.max_connections, 64);
    }
}
