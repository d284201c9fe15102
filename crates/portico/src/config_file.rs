//! The optional config file (`--config portico.toml`), for what the command
//! line says awkwardly: many routes, per-route options, and a few settings.
//! Routes are reloaded on SIGHUP and when the file changes, validated first;
//! the other settings are read at start. A flag given on the command line
//! wins over the file.
//!
//! ```toml
//! listen = ["0.0.0.0:80"]    # as --listen (plain HTTP)
//! tls_listen = ["0.0.0.0:443"]  # as --tls-listen
//! redirect_https = true      # as --redirect-https
//! balance = "p2c"            # or "round-robin"
//! attempts = 3
//! path_escapes = "reject"    # or "keep-encoded" (the default), "keep"
//! proxy_protocol_from = ["10.0.0.0/8"]   # as --proxy-protocol-from
//! [timeouts]
//! connect = "5s"
//! header = "10s"
//! idle = "30s"
//! backend = "60s"
//!
//! [[route]]
//! prefix = "/api"
//! service = "api"
//! host = "api.example.com"   # optional
//! strip_prefix = true        # optional: /api/x reaches the backend as /x
//! backend_timeout = "5s"     # optional: this route's backend timeout
//! redirect_https = false     # optional: this route's choice over --redirect-https
//! compress = true            # optional: compress responses (default: --compress)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::discovery::snapshot::Balance;
use crate::ingress::route::{
    PathEscapes, Route, RouteError, RouteOptions, RouteTable, UpstreamProtocol,
};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// As `--listen`: plain HTTP listeners.
    pub listen: Option<Vec<String>>,
    /// As `--tls-listen`: HTTPS listeners.
    pub tls_listen: Option<Vec<String>>,
    /// As `--redirect-https`.
    pub redirect_https: Option<bool>,
    pub balance: Option<BalanceName>,
    pub attempts: Option<u32>,
    /// As `--path-escapes`.
    pub path_escapes: Option<PathEscapesName>,
    /// As `--proxy-protocol-from`.
    pub proxy_protocol_from: Option<Vec<String>>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceName {
    RoundRobin,
    P2c,
}

impl From<BalanceName> for Balance {
    fn from(b: BalanceName) -> Self {
        match b {
            BalanceName::RoundRobin => Balance::RoundRobin,
            BalanceName::P2c => Balance::P2c,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathEscapesName {
    Keep,
    KeepEncoded,
    Reject,
}

impl From<PathEscapesName> for PathEscapes {
    fn from(p: PathEscapesName) -> Self {
        match p {
            PathEscapesName::Keep => PathEscapes::Keep,
            PathEscapesName::KeepEncoded => PathEscapes::KeepEncoded,
            PathEscapesName::Reject => PathEscapes::Reject,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<String>,
    pub header: Option<String>,
    pub idle: Option<String>,
    pub backend: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub prefix: String,
    pub service: String,
    pub host: Option<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub backend_timeout: Option<String>,
    /// `http1` (the default) or `h2c` (HTTP/2 prior knowledge, for gRPC).
    pub upstream: Option<UpstreamName>,
    /// Whether plain-HTTP requests for this route are sent to HTTPS
    /// (unset: as `--redirect-https`).
    pub redirect_https: Option<bool>,
    /// Compress this route's responses, or not, whatever --compress says.
    pub compress: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamName {
    Http1,
    H2c,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: {what} {value:?} is not a duration (write e.g. 30s, 250ms)")]
    Duration {
        path: String,
        what: String,
        value: String,
    },
    #[error("config file {path}")]
    Route {
        path: String,
        #[source]
        source: RouteError,
    },
    #[error(
        "config file {path}: route prefix {prefix:?} must start with '/' (put a host in `host`)"
    )]
    Prefix { path: String, prefix: String },
    #[error("config file {path}: proxy_protocol_from")]
    Cidr {
        path: String,
        #[source]
        source: crate::cidr::CidrError,
    },
    #[error("no routes: give --route, or [[route]] entries in the config file")]
    NoRoutes,
}

/// A config file as read, with its path for messages.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub file: FileConfig,
}

impl Loaded {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: shown,
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let loaded = Self {
            path: path.to_owned(),
            file,
        };
        // Refuse a file whose routes would not build, before anything uses it.
        loaded.routes()?;
        loaded.proxy_protocol_from()?;
        Ok(loaded)
    }

    /// The file's `proxy_protocol_from` networks, if it has the setting.
    pub fn proxy_protocol_from(&self) -> Result<Option<Vec<crate::cidr::Cidr>>, ConfigError> {
        let Some(networks) = &self.file.proxy_protocol_from else {
            return Ok(None);
        };
        networks
            .iter()
            .map(|n| {
                n.parse().map_err(|source| ConfigError::Cidr {
                    path: self.path.display().to_string(),
                    source,
                })
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub fn duration(
        &self,
        what: &str,
        value: &Option<String>,
    ) -> Result<Option<Duration>, ConfigError> {
        value
            .as_deref()
            .map(|v| {
                crate::units::parse_duration(v).map_err(|_| ConfigError::Duration {
                    path: self.path.display().to_string(),
                    what: what.to_owned(),
                    value: v.to_owned(),
                })
            })
            .transpose()
    }

    /// The file's routes, validated.
    pub fn routes(&self) -> Result<Vec<Route>, ConfigError> {
        let path = self.path.display().to_string();
        self.file
            .routes
            .iter()
            .map(|e| {
                if !e.prefix.starts_with('/') {
                    return Err(ConfigError::Prefix {
                        path: path.clone(),
                        prefix: e.prefix.clone(),
                    });
                }
                let spec = format!(
                    "{}{}:{}",
                    e.host.as_deref().unwrap_or(""),
                    e.prefix,
                    e.service
                );
                let mut route = Route::parse(&spec).map_err(|source| ConfigError::Route {
                    path: path.clone(),
                    source,
                })?;
                route.options = RouteOptions {
                    strip_prefix: e.strip_prefix,
                    upstream: match e.upstream {
                        Some(UpstreamName::H2c) => UpstreamProtocol::H2c,
                        Some(UpstreamName::Http1) | None => UpstreamProtocol::Http1,
                    },
                    backend_timeout: self.duration(
                        &format!("backend_timeout of route {spec}"),
                        &e.backend_timeout,
                    )?,
                    redirect_https: e.redirect_https,
                    compress: e.compress,
                };
                Ok(route)
            })
            .collect()
    }
}

/// The routes given on the command line: `--route` and `--route-h2c`.
#[derive(Debug, Clone, Default)]
pub struct CliRoutes {
    pub http1: Vec<String>,
    pub h2c: Vec<String>,
}

/// The route table from the command line's routes and the file's. A
/// command-line route replaces a file route for the same host and prefix.
pub fn route_table(cli: &CliRoutes, file: Option<&Loaded>) -> Result<RouteTable, ConfigError> {
    let parse = |spec: &String, upstream| {
        Route::parse(spec).map(|mut r| {
            r.options.upstream = upstream;
            r
        })
    };
    let cli_routes = cli
        .http1
        .iter()
        .map(|s| parse(s, UpstreamProtocol::Http1))
        .chain(cli.h2c.iter().map(|s| parse(s, UpstreamProtocol::H2c)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConfigError::Route {
            path: "(command line)".into(),
            source,
        })?;
    let mut routes = match file {
        Some(f) => f.routes()?,
        None => Vec::new(),
    };
    routes.retain(|r| {
        !cli_routes
            .iter()
            .any(|c| c.host == r.host && c.prefix == r.prefix)
    });
    routes.extend(cli_routes);
    if routes.is_empty() {
        return Err(ConfigError::NoRoutes);
    }
    RouteTable::new(routes).map_err(|source| ConfigError::Route {
        path: file.map_or("(command line)".into(), |f| f.path.display().to_string()),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loaded(text: &str) -> Result<Loaded, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "portico-cfg-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("portico.toml");
        std::fs::write(&path, text).unwrap();
        let r = Loaded::read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn routes_with_options_and_cli_override() {
        let f = loaded(
            r#"
            balance = "p2c"
            [timeouts]
            backend = "5s"
            [[route]]
            prefix = "/api"
            service = "api"
            strip_prefix = true
            backend_timeout = "2s"
            compress = false
            [[route]]
            prefix = "/"
            service = "web"
            "#,
        )
        .unwrap();
        let cli = CliRoutes {
            http1: vec!["/:other".into()],
            h2c: vec!["/grpc:greeter".into()],
        };
        let table = route_table(&cli, Some(&f)).unwrap();
        assert_eq!(
            table.find(None, "/grpc/x").unwrap().options.upstream,
            UpstreamProtocol::H2c
        );
        let api = table.find(None, "/api/x").unwrap();
        assert!(api.options.strip_prefix);
        assert_eq!(api.options.backend_timeout, Some(Duration::from_secs(2)));
        assert_eq!(api.options.compress, Some(false));
        assert_eq!(table.find(None, "/x").unwrap().options.compress, None);
        assert_eq!(table.find(None, "/x").unwrap().service.as_str(), "other");
        assert!(matches!(f.file.balance, Some(BalanceName::P2c)));
    }

    #[test]
    fn path_escapes_by_name() {
        for (name, want) in [
            ("keep", PathEscapes::Keep),
            ("keep-encoded", PathEscapes::KeepEncoded),
            ("reject", PathEscapes::Reject),
        ] {
            let f = loaded(&format!("path_escapes = \"{name}\"\n")).unwrap();
            assert_eq!(f.file.path_escapes.map(PathEscapes::from), Some(want));
        }
        assert!(loaded("path_escapes = \"decode\"\n").is_err());
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let f = loaded(include_str!("../../../contrib/portico.toml")).unwrap();
        let table = route_table(&CliRoutes::default(), Some(&f)).unwrap();
        assert_eq!(table.routes().len(), 3);
    }

    #[test]
    fn trusted_proxies_from_the_file() {
        let f = loaded("proxy_protocol_from = [\"10.0.0.0/8\", \"fd00::1\"]\n").unwrap();
        let nets = f.proxy_protocol_from().unwrap().unwrap();
        let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "fd00::1/128"]);
        assert!(loaded("").unwrap().proxy_protocol_from().unwrap().is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e = loaded("[[route]]\nprefix = \"/api\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `service`"), "{e}");
        let e = loaded("[[route]]\nprefix = \"api\"\nservice = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must start with '/'"), "{e}");
        let e = loaded("colour = \"blue\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = loaded("[[route]]\nprefix = \"/\"\nservice = \"a\"\nbackend_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a duration"), "{e}");
        let e = loaded("proxy_protocol_from = [\"10.0.0.0/33\"]\n").unwrap_err();
        let e = crate::error_chain::chain(&e);
        assert!(
            e.contains("proxy_protocol_from") && e.contains("/33"),
            "{e}"
        );
        assert!(matches!(
            route_table(&CliRoutes::default(), None),
            Err(ConfigError::NoRoutes)
        ));
    }
}
