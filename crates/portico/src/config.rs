//! Command-line values -> validated, typed settings. Every check that spans
//! more than one flag, or needs the system (name resolution), is here.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::api_server::ServerLimits;
use crate::cli::{ProxyArgs, RegistryArgs};
use crate::ingress::conn::ConnTimeouts;
use crate::ingress::route::{RouteError, RouteTable};
use crate::ingress::upstream::PoolSettings;
use crate::ingress::ServeSettings;
use crate::registry::admit::Cidr;
use crate::registry::http::HttpSettings;
use crate::registry::ratelimit::ReplyLimit;
use crate::registry::Limits;

pub const TOWER_PORT: u16 = 7772;

/// Everything that stops Portico from starting, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid {flag} {value:?}: {why}")]
    Flag {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Config(#[from] crate::config_file::ConfigError),
    #[error("cannot resolve the Tower address {0:?}; give HOST or HOST:PORT, e.g. 127.0.0.1 or tower.local:7772")]
    TowerAddress(String, #[source] io::Error),
    #[error("{}", bind_advice(.what, .addr, .source))]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot open the access log {path}")]
    AccessLog {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {command:?}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tower(#[from] crate::registry::client::TowerError),
    #[error("the Tower refused: {0}")]
    TowerRefused(portico_wire::ErrorReply),
    #[error(transparent)]
    Key(#[from] crate::registry::auth::KeyError),
    #[error(transparent)]
    Tls(#[from] crate::ingress::tls::TlsError),
    #[error(transparent)]
    Acme(#[from] crate::acme::AcmeError),
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error(transparent)]
    EtcdTls(#[from] crate::etcd::connect::TlsFileError),
    #[error(transparent)]
    EtcdPassword(#[from] crate::etcd::auth::PasswordError),
}

/// The etcd client and key layout from `--etcd`/`--etcd-prefix`; `needed_by`
/// names the flag that asked for etcd, for the error when `--etcd` is missing.
pub fn etcd_settings(
    args: &crate::cli::EtcdArgs,
    needed_by: &'static str,
) -> Result<(crate::etcd::EtcdClient, crate::etcd::keys::Layout), StartupError> {
    let Some(list) = args.etcd.as_deref() else {
        return Err(StartupError::Flag {
            flag: needed_by,
            value: "etcd".into(),
            why: "it needs --etcd http://HOST:PORT[,https://HOST:PORT...]".into(),
        });
    };
    let endpoints = crate::etcd::parse_endpoints(list)?;
    if !args.etcd_prefix.starts_with('/') || args.etcd_prefix.trim_end_matches('/').is_empty() {
        return Err(StartupError::Flag {
            flag: "--etcd-prefix",
            value: args.etcd_prefix.clone(),
            why: "a key prefix like /portico/v1: starting with / and not only /".into(),
        });
    }
    let access = etcd_access(args, &endpoints)?;
    Ok((
        crate::etcd::EtcdClient::new(endpoints, access),
        crate::etcd::keys::Layout::new(&args.etcd_prefix),
    ))
}

/// TLS and credentials for etcd, from `--etcd-ca-cert`, `--etcd-cert`,
/// `--etcd-key`, `--etcd-user` and the password's file or variable.
fn etcd_access(
    args: &crate::cli::EtcdArgs,
    endpoints: &[http::Uri],
) -> Result<crate::etcd::Access, StartupError> {
    use crate::etcd::auth::{Credentials, PASSWORD_ENV};
    use crate::etcd::connect::TlsFiles;
    let https = endpoints.iter().any(|u| u.scheme_str() == Some("https"));
    let tls = match (&args.etcd_ca_cert, https) {
        (None, false) if args.etcd_cert.is_some() => {
            return Err(StartupError::Flag {
                flag: "--etcd-cert",
                value: args
                    .etcd_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                why: "a client certificate is for TLS: give https:// members in --etcd, and --etcd-ca-cert".into(),
            })
        }
        (None, false) => None,
        (None, true) => {
            return Err(StartupError::Flag {
                flag: "--etcd",
                value: args.etcd.clone().unwrap_or_default(),
                why: "https:// members need --etcd-ca-cert FILE, the CA that signed etcd's certificate".into(),
            })
        }
        (Some(ca), false) => {
            return Err(StartupError::Flag {
                flag: "--etcd-ca-cert",
                value: ca.display().to_string(),
                why: "no --etcd member is https://; write https:// for members that serve TLS".into(),
            })
        }
        (Some(ca), true) => {
            let files = TlsFiles {
                ca: ca.clone(),
                client: args.etcd_cert.clone().zip(args.etcd_key.clone()),
            };
            Some(std::sync::Arc::new(files.client_config()?))
        }
    };
    let creds = Credentials::load(
        args.etcd_user.as_deref(),
        args.etcd_password_file.as_deref(),
        std::env::var(PASSWORD_ENV).ok(),
    )?;
    if creds.is_some() && endpoints.iter().any(|u| u.scheme_str() == Some("http")) {
        tracing::warn!("the etcd password and token go unencrypted to the http:// members in --etcd; use https://");
    }
    Ok(crate::etcd::Access { tls, creds })
}

fn bind_advice(what: &str, addr: &SocketAddr, e: &io::Error) -> String {
    let advice = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "another process is listening there; stop it or choose another address".to_owned()
        }
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; run with that, or listen on e.g. {}",
            SocketAddr::new(addr.ip(), 9090)
        ),
        io::ErrorKind::AddrNotAvailable => {
            "that address is not on this machine; use 0.0.0.0 or one of its own".to_owned()
        }
        _ => "check the address".to_owned(),
    };
    format!("cannot listen for {what} on {addr}: {e} ({advice})")
}

/// `--listen` takes a port (all IPv4 interfaces) or ADDR:PORT.
pub fn parse_listen(flag: &'static str, value: &str) -> Result<SocketAddr, StartupError> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    value.parse().map_err(|_| StartupError::Flag {
        flag,
        value: value.to_owned(),
        why: "expected a port (9090) or ADDR:PORT (127.0.0.1:9090, [::]:9090)".into(),
    })
}

/// One listener to bind: its address, and whether it serves TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// The listeners from `--listen` and `--tls-listen` (or the config file's
/// `listen` and `tls_listen`). `certs`: --tls-cert was given; `acme`:
/// --acme was. Without --tls-listen, --listen keeps its old meaning: HTTPS
/// when there are certificates.
pub fn plan_listeners(
    plain: &[String],
    tls: &[String],
    certs: bool,
    acme: bool,
) -> Result<Vec<ListenSpec>, StartupError> {
    let parse = |flag, values: &[String], tls| {
        values
            .iter()
            .map(|v| {
                Ok(ListenSpec {
                    addr: parse_listen(flag, v)?,
                    tls,
                })
            })
            .collect::<Result<Vec<_>, StartupError>>()
    };
    if tls.is_empty() && acme {
        return Err(StartupError::Flag {
            flag: "--acme",
            value: plain.join(","),
            why: "certificates are served on HTTPS listeners: add --tls-listen 443 (and keep --listen 80 for HTTP-01 challenges and redirects)".into(),
        });
    }
    if !tls.is_empty() && !certs && !acme {
        return Err(StartupError::Flag {
            flag: "--tls-listen",
            value: tls.join(","),
            why: "HTTPS needs certificates: give --tls-cert/--tls-key, or --acme".into(),
        });
    }
    let default = ["0.0.0.0:80".to_owned()];
    let plain = if plain.is_empty() && tls.is_empty() {
        &default[..]
    } else {
        plain
    };
    if tls.is_empty() {
        // As before --tls-listen: with certificates, --listen is HTTPS.
        return parse("--listen", plain, certs);
    }
    let mut out = parse("--listen", plain, false)?;
    out.extend(parse("--tls-listen", tls, true)?);
    Ok(out)
}

/// The ACME flags, checked: an https:// directory, a plausible e-mail
/// address, DNS names, the state directory's default.
fn acme_settings(
    a: &ProxyArgs,
    listeners: &[ListenSpec],
) -> Result<crate::acme::Settings, StartupError> {
    use crate::acme::Challenge;
    let plain = listeners.iter().any(|l| !l.tls);
    let challenge = match a.acme_challenge {
        Some(Challenge::Http01) if !plain => {
            return Err(StartupError::Flag {
                flag: "--acme-challenge",
                value: "http-01".into(),
                why: "HTTP-01 is answered on a plain listener: add --listen 80".into(),
            })
        }
        Some(c) => c,
        None if plain => Challenge::Http01,
        None => Challenge::TlsAlpn01,
    };
    let directory = a.acme_directory.trim().to_owned();
    let https = directory
        .parse::<http::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
    if !https {
        return Err(StartupError::Flag {
            flag: "--acme-directory",
            value: directory,
            why: "expected the https:// URL of an ACME directory, e.g. https://acme-staging-v02.api.letsencrypt.org/directory".into(),
        });
    }
    if let Some(email) = &a.acme_email {
        let plausible = email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && host.contains('.') && !email.contains([' ', ',', '<', '>'])
        });
        if !plausible {
            return Err(StartupError::Flag {
                flag: "--acme-email",
                value: email.clone(),
                why: "expected one address, e.g. you@example.com".into(),
            });
        }
    }
    let mut domains = Vec::new();
    for name in &a.acme_domains {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !crate::acme::is_certifiable(&name) {
            return Err(StartupError::Flag {
                flag: "--acme-domain",
                value: name,
                why: "expected a DNS name with a dot, e.g. app.example.com (no IP address, no wildcard)".into(),
            });
        }
        domains.push(name);
    }
    Ok(crate::acme::Settings {
        directory,
        email: a.acme_email.clone(),
        ca_cert: a.acme_ca_cert.clone(),
        state_dir: a.acme_state.clone().unwrap_or_else(default_acme_state),
        domains,
        challenge,
        retry: a.acme_retry.max(Duration::from_secs(1)),
    })
}

/// systemd's StateDirectory= when it set one, /var/lib as root, else the
/// user's XDG state directory.
fn default_acme_state() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // Several directories are separated by ':'; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        if !first.is_empty() {
            return PathBuf::from(first).join("acme");
        }
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/portico/acme");
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    state.join("portico/acme")
}

/// `--tower` takes HOST or HOST:PORT, the port being 7772 when left out.
pub fn resolve_tower(value: &str) -> Result<SocketAddr, StartupError> {
    // A bare address, IPv6 included ("::1").
    if let Ok(ip) = value.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, TOWER_PORT));
    }
    let has_port = value
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let with_port = if has_port {
        value.to_owned()
    } else {
        format!("{value}:{TOWER_PORT}")
    };
    let mut addrs = with_port
        .to_socket_addrs()
        .map_err(|e| StartupError::TowerAddress(value.to_owned(), e))?;
    addrs.next().ok_or_else(|| {
        StartupError::TowerAddress(value.to_owned(), io::Error::other("no address found"))
    })
}

/// The validated form of an ingress's flags.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenSpec>,
    /// `--redirect-https`: plain listeners send clients to HTTPS.
    pub redirect_https: bool,
    pub routes: RouteTable,
    pub serve: ServeSettings,
    pub pool: PoolSettings,
    pub attempts: u32,
    pub backend_timeout: Duration,
    pub max_uri_bytes: usize,
    pub balance: crate::discovery::snapshot::Balance,
    pub health_checks: Vec<crate::discovery::active::CheckSpec>,
    pub admin: Option<SocketAddr>,
    pub access_log: crate::ingress::access_log::Format,
    pub access_log_file: Option<std::path::PathBuf>,
    /// For reloads: the file, and the routes the command line gave.
    pub config_file: Option<crate::config_file::Loaded>,
    pub cli_routes: crate::config_file::CliRoutes,
    pub tls: Vec<crate::ingress::tls::CertPair>,
    pub tls_handshake_timeout: Duration,
    /// `--acme` and its flags.
    pub acme: Option<crate::acme::Settings>,
    pub max_body_bytes: Option<u64>,
    pub max_requests_per_connection: Option<u32>,
    pub path_escapes: crate::ingress::route::PathEscapes,
    pub compress: bool,
}

impl ProxyConfig {
    /// `explicit` tells whether a flag (by its field name) was given on the
    /// command line: those win over the config file, defaults do not.
    pub fn from_args(a: &ProxyArgs, explicit: &dyn Fn(&str) -> bool) -> Result<Self, StartupError> {
        let file = a
            .config
            .as_deref()
            .map(crate::config_file::Loaded::read)
            .transpose()?;
        let cli_routes = crate::config_file::CliRoutes {
            http1: a.routes.clone(),
            h2c: a.h2c_routes.clone(),
        };
        let routes = crate::config_file::route_table(&cli_routes, file.as_ref())?;
        let mut a = a.clone();
        if let Some(f) = &file {
            let t = &f.file.timeouts;
            for (field, value, slot) in [
                ("connect_timeout", &t.connect, &mut a.connect_timeout),
                ("header_timeout", &t.header, &mut a.header_timeout),
                ("idle_timeout", &t.idle, &mut a.idle_timeout),
                ("backend_timeout", &t.backend, &mut a.backend_timeout),
            ] {
                if let Some(d) = f.duration(
                    &format!("timeouts.{}", field.trim_end_matches("_timeout")),
                    value,
                )? {
                    if !explicit(field) {
                        *slot = d;
                    }
                }
            }
            if let (Some(b), false) = (f.file.balance, explicit("balance")) {
                a.balance = b.into();
            }
            if let (Some(n), false) = (f.file.attempts, explicit("attempts")) {
                a.attempts = n;
            }
            if let (Some(p), false) = (f.file.path_escapes, explicit("path_escapes")) {
                a.path_escapes = p.into();
            }
            if let (Some(n), false) = (f.proxy_protocol_from()?, explicit("proxy_protocol_from")) {
                a.proxy_protocol_from = n;
            }
            if let (Some(l), false) = (&f.file.listen, explicit("listen")) {
                a.listen = l.clone();
            }
            if let (Some(l), false) = (&f.file.tls_listen, explicit("tls_listen")) {
                a.tls_listen = l.clone();
            }
            if let (Some(r), false) = (f.file.redirect_https, explicit("redirect_https")) {
                a.redirect_https = r;
            }
        }
        let a = &a;
        let positive = |flag: &'static str, v: usize| {
            if v == 0 {
                Err(StartupError::Flag {
                    flag,
                    value: "0".into(),
                    why: "must be at least 1".into(),
                })
            } else {
                Ok(v)
            }
        };
        if a.tls_certs.len() != a.tls_keys.len() {
            return Err(StartupError::Flag {
                flag: "--tls-cert/--tls-key",
                value: format!("{} certificates, {} keys", a.tls_certs.len(), a.tls_keys.len()),
                why: "give them in pairs: --tls-cert A.pem --tls-key A.key [--tls-cert B.pem --tls-key B.key]".into(),
            });
        }
        let listeners = plan_listeners(&a.listen, &a.tls_listen, !a.tls_certs.is_empty(), a.acme)?;
        let acme = a.acme.then(|| acme_settings(a, &listeners)).transpose()?;
        let redirects = a.redirect_https
            || routes
                .routes()
                .iter()
                .any(|r| r.options.redirect_https == Some(true));
        if redirects && !listeners.iter().any(|l| l.tls) {
            return Err(StartupError::Flag {
                flag: "--redirect-https",
                value: "on".into(),
                why: "it sends clients to an HTTPS listener: give --tls-listen ADDR (and --listen for the plain side)".into(),
            });
        }
        positive("--max-connections", a.max_connections)?;
        positive("--attempts", a.attempts as usize)?;
        positive("--max-headers", a.max_headers)?;
        if a.max_header_bytes < 1024 {
            return Err(StartupError::Flag {
                flag: "--max-header-bytes",
                value: a.max_header_bytes.to_string(),
                why: "must be at least 1024".into(),
            });
        }
        for (flag, d) in [
            ("--connect-timeout", a.connect_timeout),
            ("--header-timeout", a.header_timeout),
            ("--idle-timeout", a.idle_timeout),
            ("--backend-timeout", a.backend_timeout),
        ] {
            if d.is_zero() {
                return Err(StartupError::Flag {
                    flag,
                    value: "0".into(),
                    why: "a timeout must be longer than zero".into(),
                });
            }
        }
        let workers = a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        if a.fair_interval.is_some() {
            tracing::warn!(
                "--fair-interval has no effect any more: each worker thread serves its \
                 connections from one queue, in the order they became ready; remove it"
            );
        }
        Ok(Self {
            listeners,
            redirect_https: a.redirect_https,
            routes,
            serve: ServeSettings {
                max_connections: a.max_connections,
                timeouts: ConnTimeouts {
                    header: a.header_timeout,
                    idle: a.idle_timeout,
                    backend: a.backend_timeout,
                },
                drain_timeout: a.drain_timeout,
                max_header_bytes: a.max_header_bytes,
                max_headers: a.max_headers,
                max_h2_streams: a.max_h2_streams.max(1),
                proxy_protocol_from: crate::ingress::proxy_protocol::TrustedProxies::new(
                    a.proxy_protocol_from.clone(),
                ),
                workers,
            },
            pool: PoolSettings {
                connect_timeout: a.connect_timeout,
                max_idle_per_backend: a.pool_max_idle,
                idle_timeout: a.pool_idle_timeout,
                workers,
            },
            attempts: a.attempts,
            backend_timeout: a.backend_timeout,
            // The request line must fit in the head, and a little headroom.
            max_uri_bytes: a.max_header_bytes.min(16 * 1024),
            balance: a.balance,
            health_checks: a.health_checks.clone(),
            admin: match a.admin.as_str() {
                "off" => None,
                other => Some(parse_listen("--admin", other)?),
            },
            access_log: a.access_log,
            access_log_file: a.access_log_file.clone(),
            config_file: file,
            cli_routes,
            tls: a
                .tls_certs
                .iter()
                .zip(&a.tls_keys)
                .map(|(cert, key)| crate::ingress::tls::CertPair {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .collect(),
            tls_handshake_timeout: a.tls_handshake_timeout,
            acme,
            max_body_bytes: (a.max_body_bytes > 0).then_some(a.max_body_bytes),
            max_requests_per_connection: (a.max_requests_per_connection > 0)
                .then_some(a.max_requests_per_connection),
            path_escapes: a.path_escapes,
            compress: a.compress,
        })
    }
}

/// The UDP reply limit: `--udp-reply-rate` and its exempt networks.
pub fn reply_limit(a: &RegistryArgs) -> Result<ReplyLimit, StartupError> {
    let mut exempt = Vec::new();
    for value in &a.udp_rate_exempt {
        if value == "none" {
            continue;
        }
        let cidr = value.parse::<Cidr>().map_err(|e| StartupError::Flag {
            flag: "--udp-rate-exempt",
            value: value.clone(),
            why: e.to_string(),
        })?;
        exempt.push(cidr);
    }
    Ok(ReplyLimit {
        rate: a.udp_reply_rate,
        exempt,
    })
}

pub fn registry_limits(a: &RegistryArgs) -> Result<Limits, StartupError> {
    if a.ttl < Duration::from_millis(100) {
        return Err(StartupError::Flag {
            flag: "--ttl",
            value: format!("{:?}", a.ttl),
            why: "must be at least 100ms".into(),
        });
    }
    Ok(Limits {
        ttl: a.ttl,
        max_per_name: a.max_per_name.max(1),
        max_total: a.max_entries.max(1),
    })
}

/// The Tower's HTTP API: timeouts, caps and the web origins let in.
pub fn tower_http_settings(a: &RegistryArgs) -> Result<HttpSettings, StartupError> {
    let flag = |flag: &'static str, value: String, why: &str| StartupError::Flag {
        flag,
        value,
        why: why.into(),
    };
    for (name, d) in [
        ("--http-header-timeout", a.http_header_timeout),
        ("--http-idle-timeout", a.http_idle_timeout),
    ] {
        if d.is_zero() {
            return Err(flag(name, "0".into(), "a timeout must be longer than zero"));
        }
    }
    for (name, n) in [
        ("--http-max-connections", a.http_max_connections),
        ("--http-max-watches", a.http_max_watches),
    ] {
        if !(1..=1_000_000).contains(&n) {
            return Err(flag(name, n.to_string(), "must be 1 to 1,000,000"));
        }
    }
    if !(16..=1_048_576).contains(&a.http_watch_log) {
        return Err(flag(
            "--http-watch-log",
            a.http_watch_log.to_string(),
            "must be 16 to 1,048,576 changes",
        ));
    }
    for origin in &a.http_allow_origins {
        if !is_origin(origin) {
            return Err(flag(
                "--http-allow-origin",
                origin.clone(),
                "an origin as a browser sends it: SCHEME://HOST[:PORT], no path (https://ops.example.com)",
            ));
        }
    }
    Ok(HttpSettings {
        limits: ServerLimits {
            header_timeout: a.http_header_timeout,
            idle_timeout: a.http_idle_timeout,
            max_connections: a.http_max_connections,
        },
        max_watches: a.http_max_watches,
        watch_log: a.http_watch_log,
        allow_origins: a.http_allow_origins.clone(),
    })
}

/// `http://host` or `https://host:port`: what an `Origin` header holds,
/// so that a listed value can ever match.
fn is_origin(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    rest.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' ']))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(clap::Parser)]
    struct EtcdOnly {
        #[command(flatten)]
        etcd: crate::cli::EtcdArgs,
    }

    fn etcd_error(args: &str) -> String {
        use clap::Parser as _;
        let parsed = EtcdOnly::try_parse_from(std::iter::once("t").chain(args.split(' ')));
        match parsed {
            Err(e) => e.to_string(),
            Ok(a) => etcd_settings(&a.etcd, "--store").unwrap_err().to_string(),
        }
    }

    #[test]
    fn etcd_tls_and_user_flags_must_fit_together() {
        for (args, want) in [
            (
                "--etcd https://e:2379",
                "https:// members need --etcd-ca-cert",
            ),
            (
                "--etcd http://e:2379 --etcd-ca-cert ca.pem",
                "no --etcd member is https://",
            ),
            (
                "--etcd http://e:2379 --etcd-cert c.pem --etcd-key k.pem",
                "a client certificate is for TLS",
            ),
            (
                "--etcd https://e:2379 --etcd-ca-cert /nonexistent/ca.pem",
                "cannot read --etcd-ca-cert /nonexistent/ca.pem",
            ),
            ("--etcd http://e:2379 --etcd-cert c.pem", "--etcd-key"),
            (
                "--etcd ftp://e:2379",
                "expected http://HOST:PORT or https://HOST:PORT",
            ),
        ] {
            let e = etcd_error(args);
            assert!(e.contains(want), "{args}: {e:?} should say {want:?}");
        }
        // Without a password from the environment either.
        if std::env::var_os(crate::etcd::auth::PASSWORD_ENV).is_none() {
            let e = etcd_error("--etcd http://e:2379 --etcd-user portico");
            assert!(e.contains("--etcd-user needs a password"), "{e}");
        }
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("--listen", "9090").unwrap(),
            "0.0.0.0:9090".parse().unwrap()
        );
        assert_eq!(
            parse_listen("--listen", "127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            parse_listen("--listen", "[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert!(parse_listen("--listen", "nine").is_err());
    }

    #[test]
    fn listeners_plain_tls_and_the_old_meaning_of_listen() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let plan = |plain: &[&str], tls: &[&str], certs, acme| {
            plan_listeners(&v(plain), &v(tls), certs, acme).map(|l| {
                l.iter()
                    .map(|l| format!("{}{}", l.addr, if l.tls { "s" } else { "" }))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        };
        assert_eq!(plan(&[], &[], false, false).unwrap(), "0.0.0.0:80");
        assert_eq!(
            plan(&["80", "8080"], &[], false, false).unwrap(),
            "0.0.0.0:80 0.0.0.0:8080"
        );
        // With certificates and no --tls-listen, --listen is HTTPS, as before.
        assert_eq!(plan(&["443"], &[], true, false).unwrap(), "0.0.0.0:443s");
        assert_eq!(
            plan(&["80"], &["443"], true, false).unwrap(),
            "0.0.0.0:80 0.0.0.0:443s"
        );
        // --tls-listen alone: no plain listener.
        assert_eq!(plan(&[], &["443"], false, true).unwrap(), "0.0.0.0:443s");
        let e = plan(&["80"], &["443"], false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert/--tls-key, or --acme"), "{e}");
        let e = plan(&["443"], &[], false, true).unwrap_err().to_string();
        assert!(e.contains("add --tls-listen 443"), "{e}");
        assert!(plan(&["eighty"], &[], false, false).is_err());
    }

    #[test]
    fn tower_forms() {
        assert_eq!(
            resolve_tower("127.0.0.1").unwrap(),
            "127.0.0.1:7772".parse().unwrap()
        );
        assert_eq!(
            resolve_tower("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(resolve_tower("::1").unwrap(), "[::1]:7772".parse().unwrap());
        assert_eq!(
            resolve_tower("[::1]:9").unwrap(),
            "[::1]:9".parse().unwrap()
        );
        assert_eq!(resolve_tower("localhost:9").unwrap().port(), 9);
        assert!(resolve_tower("no such host.invalid").is_err());
    }

    #[test]
    fn origins_are_checked_as_browsers_send_them() {
        assert!(is_origin("https://ops.example.com"));
        assert!(is_origin("http://localhost:3000"));
        assert!(!is_origin("ops.example.com"));
        assert!(!is_origin("https://ops.example.com/"));
        assert!(!is_origin("*"));
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let e = StartupError::Bind {
            what: "HTTP",
            addr: "0.0.0.0:80".parse().unwrap(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(e.to_string().contains("CAP_NET_BIND_SERVICE"), "{e}");
    }
}
