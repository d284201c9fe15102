//! Everything that can go wrong on the request path, who failed, and the one
//! exhaustive mapping to the status and text the client gets.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
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
    /// The request body's framing is broken (or it was cut short): the
    /// client's error, whether found before or while it was forwarded.
    #[error("the request body is malformed")]
    MalformedBody,
    /// A Transfer-Encoding other than `chunked` alone: the body's coding
    /// would be dropped when it is re-framed for the backend (RFC 9112
    /// section 6.1: 501).
    #[error("a transfer coding other than chunked")]
    UnsupportedTransferCoding,
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

/// How a client's request body failed: the client's doing, never the
/// backend's, whichever client path was streaming it when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyFault {
    #[error("request body over the --max-body-bytes limit")]
    TooLarge,
    /// Malformed framing (a bad chunk size or line end), or cut short.
    #[error("the client's request body is malformed or cut short")]
    Malformed,
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
    /// hyper's clients failed the request; `unsent` when they gave it back
    /// untouched (nothing of it was written).
    #[error("request failed")]
    Request {
        #[source]
        source: hyper::Error,
        unsent: bool,
    },
    #[error("the backend switched protocols though the client asked for no upgrade")]
    UnaskedUpgrade,
    #[error("the backend's response has both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("the HTTP/1.1 exchange with the backend failed")]
    Exchange(#[source] super::h1::client::ExchangeError),
}

impl From<ClientBodyFault> for ProxyError {
    fn from(fault: ClientBodyFault) -> Self {
        match fault {
            ClientBodyFault::TooLarge => ProxyError::BodyTooLarge,
            ClientBodyFault::Malformed => ProxyError::MalformedBody,
        }
    }
}

/// What of a failed request may have reached the backend, which is all
/// that decides whether it may be sent again (Pingora's `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryType {
    /// Not one byte of it: any request may go again.
    Unsent,
    /// Some or all of it: the backend may have acted on it.
    Sent,
}

impl UpstreamError {
    pub fn retry_type(&self) -> RetryType {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::ConnectTimeout(_)
            | UpstreamError::Handshake(_)
            | UpstreamError::Request { unsent: true, .. } => RetryType::Unsent,
            UpstreamError::Request { unsent: false, .. }
            | UpstreamError::UnaskedUpgrade
            | UpstreamError::AmbiguousFraming => RetryType::Sent,
            UpstreamError::Exchange(e) if !e.sent() => RetryType::Unsent,
            UpstreamError::Exchange(_) => RetryType::Sent,
        }
    }

    /// THE rule for sending a failed request again, on a new connection or
    /// to the next replica, for every client path (ours, hyper's HTTP/1.1
    /// and h2c): a request nothing of which went out may; one that went out
    /// only if it is idempotent (RFC 9110 section 9.2.2) and has no body
    /// (a streamed body is gone once sent).
    pub fn may_resend(&self, method: &Method, bodiless: bool) -> bool {
        match self.retry_type() {
            RetryType::Unsent => true,
            RetryType::Sent => replayable(method, bodiless),
        }
    }
}

/// Whether a request may go again once it went out: the half of
/// `UpstreamError::may_resend` that a caller can know before sending, to
/// keep a copy only of a request that could use it.
pub fn replayable(method: &Method, bodiless: bool) -> bool {
    bodiless && is_idempotent(method)
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl ProxyError {
    /// The status and plain-text body the client gets. Seed wording where the
    /// seed had one.
    pub fn response_parts(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "No route for this path.\n"),
            ProxyError::MalformedBody => (
                StatusCode::BAD_REQUEST,
                "Bad request: malformed request body.\n",
            ),
            ProxyError::UnsupportedTransferCoding => (
                StatusCode::NOT_IMPLEMENTED,
                "Not implemented: a Transfer-Encoding other than chunked.\n",
            ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::h1::client::ExchangeError;
    use std::io::ErrorKind;

    #[test]
    fn a_request_goes_again_if_nothing_went_out_or_it_is_idempotent_and_bodiless() {
        let refused = UpstreamError::Connect(ErrorKind::ConnectionRefused.into());
        let unsent = UpstreamError::Exchange(ExchangeError::Unsent(ErrorKind::BrokenPipe.into()));
        let unanswered = UpstreamError::Exchange(ExchangeError::ClosedBeforeResponse(None));
        for nothing_sent in [&refused, &unsent] {
            assert!(nothing_sent.may_resend(&Method::POST, true));
            assert!(nothing_sent.may_resend(&Method::POST, false));
        }
        assert!(
            !unanswered.may_resend(&Method::POST, true),
            "may have charged"
        );
        assert!(!unanswered.may_resend(&Method::PATCH, true));
        assert!(unanswered.may_resend(&Method::GET, true));
        assert!(unanswered.may_resend(&Method::DELETE, true));
        assert!(
            !unanswered.may_resend(&Method::PUT, false),
            "its body is gone"
        );
        assert!(!UpstreamError::AmbiguousFraming.may_resend(&Method::GET, false));
    }
}
