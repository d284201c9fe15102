//! Everything that can go wrong on the request path, who failed, and the one
//! exhaustive mapping to the status and text the client gets.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use portico_wire::ServiceName;

use crate::discovery::DiscoveryError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's request cannot be routed as sent.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route for this path")]
    NoRoute,
    #[error("request body over the --max-body-bytes limit")]
    BodyTooLarge,
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Replicas exist but none could be connected to.
    #[error("no replica of '{service}' answered ({attempts} attempts; last tried {last_addr})")]
    Unreachable {
        service: ServiceName,
        attempts: u32,
        last_addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    /// The backend was reached but failed the exchange.
    #[error("backend {addr} of '{service}' failed")]
    Backend {
        service: ServiceName,
        addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    #[error("backend {addr} of '{service}' did not start its response within {timeout:?}")]
    Timeout {
        service: ServiceName,
        addr: SocketAddr,
        timeout: Duration,
    },
}

/// A failure talking to one backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("request failed")]
    Request(#[source] hyper::Error),
    #[error("the backend switched protocols though the client asked for no upgrade")]
    UnaskedUpgrade,
    #[error("the backend's response has both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("the HTTP/1.1 exchange with the backend failed")]
    Exchange(#[source] super::h1::client::ExchangeError),
}

impl ProxyError {
    /// The status and plain-text body the client gets. Seed wording where the
    /// seed had one.
    pub fn response_parts(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "No route for this path.\n"),
            ProxyError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload too large: the request body is over the limit.\n",
            ),
            ProxyError::Discovery(e) => match e {
                DiscoveryError::NotFound(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service not found in Tower\n",
                ),
                DiscoveryError::Exhausted(_) => (
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway: no replica answered.\n",
                ),
                DiscoveryError::Tower(_) | DiscoveryError::TowerRefused(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Tower unreachable: cannot look up the service.\n",
                ),
                DiscoveryError::NotSynced => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Registry unavailable: etcd has not been read yet.\n",
                ),
            },
            ProxyError::Unreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "Bad gateway: no replica answered.\n",
            ),
            ProxyError::Backend { .. } => (
                StatusCode::BAD_GATEWAY,
                "Bad gateway: the backend failed to answer.\n",
            ),
            ProxyError::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway timeout: the backend did not answer in time.\n",
            ),
        }
    }
}

/// The error and its causes on one line, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
